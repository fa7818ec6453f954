"""The ``pagctl`` command line: parse, call one library function, render.

Results go to stdout (a table, or with ``--format json`` one envelope for every command,
``common.print_envelope``); progress and logs go to stderr. User errors print one
line per problem and exit 2; runtime failures exit 1 (traceback with --verbose or
PAGCTL_VERBOSE=1); Ctrl-C exits 130. torch is imported inside commands only. Under
torchrun every process runs the command: a user error is printed once per machine (by
LOCAL_RANK 0), unless one rank met it alone in its own work (`RankError`); a runtime failure
is printed by every rank, named.

This module holds the app, its root options, the command table and the error mapping; each
command group has its module here (``train``, ``attack``, ``bank``, ``align_score``,
``compare``, ``plugins``), and what they share is ``pagctl.cli.common``.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Annotated, Any

import typer

from pagctl import __version__
from pagctl.cli import align_score, attack, bank, benchmark, compare, importing, plugins, train
from pagctl.errors import LeaderFailed, PagctlError, PagctlWarning, RankError

app = typer.Typer(
    name="pagctl",
    help="Train classifiers with perceptually aligned gradients (PAG) and measure their "
    "robustness. Each command's options: pagctl COMMAND --help.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"pagctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v",
                                          help="Show tracebacks of runtime errors.")] = False,
) -> None:
    if verbose:
        os.environ["PAGCTL_VERBOSE"] = "1"


# ---------------------------------------------------------------------------------------
# commands, in the order `pagctl --help` lists them

SHORT_HELP = {  # one line each in `pagctl --help` (at most 58 characters: 80 columns)
    "train": "Train a model from a spec into a run folder.",
    "train-score": "Train a score model for the 'sbg' source.",
    "attack": "Attack a run: robust accuracy, stages, reliability.",
    "benchmark": "RobustBench's protocol on a run, its model-info JSON.",
    "bank": "Precompute a source's target gradients into a bank.",
    "align-score": "Score a run's gradient alignment with a source.",
    "compare": "Put runs side by side, with per-point tests.",
    "import": "Make a run folder of a model pagctl did not train.",
    "plugins": "List sources, attacks and model providers.",
}
app.command(short_help=SHORT_HELP["train"])(train.train)
app.command("train-score", short_help=SHORT_HELP["train-score"])(train.train_score)
app.command(short_help=SHORT_HELP["attack"])(attack.attack)
app.command(short_help=SHORT_HELP["benchmark"])(benchmark.benchmark)
app.command(short_help=SHORT_HELP["bank"])(bank.bank)
app.command("align-score", short_help=SHORT_HELP["align-score"])(align_score.align_score)
app.command(short_help=SHORT_HELP["compare"])(compare.compare)
app.command("import", short_help=SHORT_HELP["import"])(importing.import_model)
app.command(short_help=SHORT_HELP["plugins"])(plugins.plugins)


# ---------------------------------------------------------------------------------------
# entry point and error mapping

FLAGS = {"limit": "--limit", "batch_size": "--batch-size", "seed": "--seed",
         "probe_size": "--probe-size", "indices": "--indices", "eps_sweep": "--eps-sweep",
         "classes_per_image": "--classes-per-image", "precision": "--precision",
         "weights": "--weights", "shard": "--shard", "merge_shards": "--merge-shards",
         "device": "--device", "state": "--state", "params": "--param", "source": "--source",
         "model_dir": "--model-dir", "threat_model": "--threat-model", "card": "--card",
         "save_adversarial": "--save-adversarial"}
"""The flag that sets each library parameter a `FieldError` names: the library speaks of
``batch_size``, the command line of ``--batch-size`` (and of ``params.eps`` as
``--param eps``)."""


LEADER_GRACE_SECONDS = 1.0
"""How long a follower rank that met rank 0's user error waits before exiting."""


def _message(exc: PagctlError | PagctlWarning) -> str:
    """A user error's (or warning's) text as the command line says it: a library field it
    begins with (``batch_size: ...``, a `FieldError`'s form) as its flag (`FLAGS`)."""
    text = str(exc)
    field, sep, detail = text.partition(": ")  # a FieldError, or an error in its form
    if sep and field in FLAGS:
        return f"{FLAGS[field]}: {detail}"
    if sep and field.startswith("params.") and " " not in field:
        return f"--param {field.removeprefix('params.')}: {detail}"
    return text


def _parser_error(exc: Exception, reports: bool) -> int | None:
    """An error of the option parser (click's, as typer raises it: typer ships its own copy
    of click from 0.22 on, so its classes are told by their shape, not imported from a
    private module): a usage error (exit 2) in one line with where to find help, any other
    in one line; returns its exit code (None for anything else, which is not written)."""
    format_message, code = getattr(exc, "format_message", None), getattr(exc, "exit_code", None)
    if not callable(format_message) or not isinstance(code, int):
        return None
    msg = str(format_message()).strip()
    if code == 2 and hasattr(exc, "ctx"):  # bad option or argument
        if msg and reports:  # empty when no_args_is_help has already printed the help
            ctx = exc.ctx
            where = ctx.command_path if ctx is not None else "pagctl"
            sys.stderr.write(f"error: {msg.splitlines()[0]} (see '{where} --help')\n")
        return 2
    sys.stderr.write(f"error: {msg}\n")
    return code


def _one_line_warning(show: Any, reports: bool) -> Any:
    """``warnings.showwarning`` for the command line: a `PagctlWarning` as one line,
    ``warning: ...`` on stderr (by rank 0 alone under torchrun), its field as its flag;
    any other warning as Python shows it (``show``)."""

    def showwarning(message: Warning | str, category: type[Warning], filename: str,
                    lineno: int, file: Any = None, line: str | None = None) -> None:
        if isinstance(message, PagctlWarning):
            if reports:
                sys.stderr.write(f"warning: {_message(message)}\n")
            return
        show(message, category, filename, lineno, file, line)

    return showwarning


def main(argv: list[str] | None = None) -> None:
    """Console entry point: maps errors to exit codes (2 user, 1 runtime, 130 Ctrl-C; a
    command may exit 3 itself: ``attack --strict`` on an unreliable verdict)."""
    verbose = os.environ.get("PAGCTL_VERBOSE") == "1" or any(
        a in ("--verbose", "-v") for a in (argv if argv is not None else sys.argv[1:]))
    reports = os.environ.get("LOCAL_RANK", "0") == "0"  # user errors, under torchrun: once
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always", PagctlWarning)
            warnings.showwarning = _one_line_warning(warnings.showwarning, reports)
            code = app(args=argv, prog_name="pagctl", standalone_mode=False)
    except LeaderFailed:  # rank 0 of the launch reports it
        import time

        # torchrun stops every process once one exits: rank 0, which reports the error, is
        # given a moment to print its line first
        time.sleep(LEADER_GRACE_SECONDS)
        sys.exit(2)
    except PagctlError as exc:
        if reports or isinstance(exc, RankError):
            for line in _message(exc).splitlines() or [type(exc).__name__]:
                sys.stderr.write(f"error: {line}\n")
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except Exception as exc:  # runtime failure: one line unless verbose
        parser_exit = _parser_error(exc, reports)
        if parser_exit is not None:
            sys.exit(parser_exit)
        if verbose:
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        rank = f"rank {os.environ['RANK']}: " if "RANK" in os.environ else ""
        sys.stderr.write(f"error: {rank}{type(exc).__name__}: {msg} (rerun with --verbose for the "
                         "traceback)\n")
        sys.exit(1)
    # standalone_mode=False returns typer.Exit's code (e.g. 130 after an interrupted train)
    if isinstance(code, int) and code:
        sys.exit(code)
