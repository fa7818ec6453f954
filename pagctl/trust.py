"""Which code pagctl may run: the one trust rule for Python named in a file.

A run folder, a spec file, a shard or a record is data. People share run folders with
colleagues, attach them to papers and download them with a model, so a value read from one
must never make pagctl import or call code the user did not ask for. The only values that
name code are architectures of the form ``package.module:factory`` (`is_import_path`):
pagctl imports that module and calls that callable to build the network.

The rule, as Hugging Face's ``trust_remote_code``: code named in a file is refused unless the
user asked for it, either by passing ``--trust-code`` (``trust_code=True`` in the Python API)
for the files this command reads, or by naming the same callable on the command line
(``--model pkg.mod:make``, ``--set model.arch=pkg.mod:make``, ``--grid model.arch=…``) or in
Python (``pagctl.api.import_model(model=...)``). What is installed stays trusted: timm names,
RobustBench zoo entries (``robustbench:<name>``, built by the installed ``robustbench``
package) and the entry points of installed packages (attacks, sources, model providers) are
code the user chose to install. The edge (a command, an API function) builds one `CodeTrust` from
those choices and passes it inward to whatever builds a network (`pagctl.models
.create_network`), which asks it before importing anything.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from pagctl.errors import UntrustedCodeError

__all__ = ["UNTRUSTED", "CodeTrust", "is_import_path", "named_architectures"]

TIMM_SOURCES = ("hf-hub:", "local-dir:")
"""timm's model-source prefixes: names timm resolves itself (never an import)."""
INSTALLED_SOURCES = (*TIMM_SOURCES, "robustbench:")
"""Prefixes of names that installed packages resolve (timm's sources and RobustBench's zoo,
`pagctl.robustbench_zoo`): code the user installed, never an import path."""

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


def is_import_path(arch: str) -> bool:
    """Whether ``arch`` names a callable by import path (``package.module:factory``)."""
    return bool(_IMPORT_PATH.fullmatch(arch)) and not arch.startswith(INSTALLED_SOURCES)


@dataclass(frozen=True)
class CodeTrust:
    """What the user allowed this command to import: ``everything`` named in the files it
    reads (``--trust-code``), or only the callables in ``named`` (given on the command line
    or in Python). The default allows nothing named in a file."""

    everything: bool = False
    named: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def of(cls, trust_code: bool = False, named: Iterable[str] = ()) -> CodeTrust:
        return cls(everything=bool(trust_code), named=frozenset(named))

    def allows(self, path: str) -> bool:
        """Whether the callable ``path`` (``package.module:factory``) may be imported."""
        return self.everything or path in self.named

    def require(self, path: str, where: str, *, folder: str | None = None) -> None:
        """UntrustedCodeError (one line: the field, the callable, the flag) unless `allows`.
        ``where`` names the field that holds it; ``folder``: the run folder it was read
        from, when it came from one."""
        if self.allows(path):
            return
        origin = f"read from {folder}" if folder is not None else "read from a file"
        named = "" if folder is not None else \
            f", or name it on the command line (--set model.arch={path})"
        raise UntrustedCodeError(
            f"{where}: '{path}' names Python code to import and run, {origin}; pagctl runs "
            f"code named in a file only when asked: pass --trust-code (trust_code=True in "
            f"the Python API) if you trust its source{named}")


UNTRUSTED = CodeTrust()
"""Nothing named in a file may run: every default."""


def named_architectures(items: Iterable[str]) -> set[str]:
    """The import-path architectures that ``KEY=VALUE`` options name on the command line
    (``--set model.arch=…``, and each value of ``--grid model.arch=V1,V2``): code the user
    typed, so trusted for this command."""
    found: set[str] = set()
    for item in items:
        key, sep, value = item.partition("=")
        if sep and key.strip() == "model.arch":
            found.update(v.strip().strip("'\"") for v in value.split(","))
    return {v for v in found if is_import_path(v)}
