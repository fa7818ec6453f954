"""Error types. Every `PagctlError` is a user error: the CLI prints its message on one line
and exits with status 2, without a traceback."""

from __future__ import annotations


class PagctlError(Exception):
    """A problem the user can fix; the message names the field and the fix."""


class PagctlWarning(UserWarning):
    """Something the user should look at in an input that still runs (an ε that measures
    nothing: `pagctl.robustness.budget`). The CLI prints it as one line, ``warning: ...``,
    on stderr, a field it begins with as its flag."""


class SpecError(PagctlError):
    """An invalid run spec, override, or plugin parameter."""


class FieldError(SpecError):
    """A user error in one named input of a library function (``limit``, ``batch_size``,
    ...): ``field: detail``. The command line prints the flag that sets it in place of the
    field's name (`pagctl.cli.FLAGS`), so the API and the CLI refuse alike, each in its own
    words."""

    def __init__(self, field: str, detail: str) -> None:
        super().__init__(f"{field}: {detail}")
        self.field = field
        self.detail = detail

    def __reduce__(self) -> tuple[type[FieldError], tuple[str, str]]:
        return type(self), (self.field, self.detail)


class UntrustedCodeError(SpecError):
    """A file (spec, run folder) names Python code to import, and the user has not trusted it
    (`pagctl.trust`)."""


class PluginError(PagctlError):
    """Base class for registry failures."""


class UnknownPluginError(PluginError):
    """No plugin of that name in the group."""


class PluginConflictError(PluginError):
    """Two distributions provide the same name in one group."""


class PluginLoadError(PluginError):
    """A plugin's entry point failed to import or is not a valid factory."""


class PluginContractError(PluginError):
    """A plugin returned something that breaks the contract (shape, range, NaN, mode)."""


class PluginRuntimeError(PluginError):
    """A plugin raised an exception while being built or called."""


class CheckpointError(PagctlError):
    """A run folder that is missing, incomplete, corrupt, or does not match its spec."""


class DataError(PagctlError):
    """A dataset that cannot be found, read, or is invalid (e.g. NaN pixels)."""


class ModelError(PagctlError):
    """A model that cannot be trained or evaluated: its loss or outputs are not finite (NaN
    or infinite), from a too large learning rate or broken weights."""


class LeaderFailed(PagctlError):
    """On a rank of a torchrun launch other than 0: rank 0 met a user error in a step only it
    takes (the run folder's checks). That rank reports it; this one exits like it, silently."""


class RankError(PagctlError):
    """A user error one rank of a torchrun launch met in its own part of the work (a plugin
    failing on its slice of the batch): every rank reports its own, named by rank."""
