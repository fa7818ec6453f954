"""What the commands share: output formats and writers, option types, parsers of option
values, plugin parameters and plugin-name completion, and loading a run with its data.
Nothing here imports torch at import time."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from pagctl.errors import SpecError
from pagctl.figures import DEFAULT_DPI, FIGURE_FORMATS, figure_format, pyplot

if TYPE_CHECKING:
    import torch

    from pagctl.checkpoint import LoadedRun
    from pagctl.data import DataBundle
    from pagctl.evaluation.request import EvaluationRequest


class Format(str, Enum):
    table = "table"
    json = "json"


# ---------------------------------------------------------------------------------------
# --format json: one envelope for every command

ENVELOPE_SCHEMA_VERSION = 1
"""The envelope's ``schema_version``: raised when its keys, or a command's records, change
incompatibly (a field removed or renamed; new fields do not raise it)."""

ENVELOPE_RECORDS = {  # per command as typed: what its envelope's records are
    "train": "one summary, the run folder, its last epoch's metrics (that epoch's seconds as "
             "epoch_train_seconds) and train_seconds, the whole run's (with --dry-run: what "
             "training would build); with --grid, one per point, with its values and status",
    "train-score": "one summary, the run folder, steps, samples and the last logged step's "
                   "record",
    "attack": "one 'attack' record per eps (one without --eps-sweep), as metrics.jsonl "
              "receives it; with several run folders, those of each in turn, each with a "
              "'run' key naming its folder; a --shard run prints none",
    "bank": "one summary of the bank written (path, shape, source, params)",
    "align-score": "one 'align' record, as metrics.jsonl receives it; with several run "
                   "folders, one per run, each with a 'run' key naming its folder",
    "compare": "one comparison (runs, columns, pairs, mismatches, warnings, weights)",
    "import": "one summary, the run folder and its import record",
    "plugins": "one per plugin listed; with NAME, one per plugin of that name (usually one), "
               "with its parameters' schema",
}


def format_help(command: str, what: str = "Output format") -> str:
    """The ``--format`` option's help for ``command``: what its JSON envelope's records are."""
    return (f"{what}; json: one object {{kind, schema_version, pagctl_version, records}}, "
            f"records: {ENVELOPE_RECORDS[command]}.")


def print_envelope(kind: str, records: list[Any]) -> None:
    """A command's ``--format json`` result on stdout, one shape whatever its flags::

        {"kind": "<command as typed>", "pagctl_version": "<pagctl.__version__>",
         "records": [...], "schema_version": 1}

    ``records`` is always a list (see ``ENVELOPE_RECORDS``). Indented 2, keys sorted, ASCII
    (other characters escaped), one trailing newline, so ``| jq '.records[0]'`` works; logs
    and progress stay on stderr."""
    from pagctl import __version__

    if kind not in ENVELOPE_RECORDS:
        raise ValueError(f"print_envelope: '{kind}' is not a command with --format json")
    envelope = {"kind": kind, "schema_version": ENVELOPE_SCHEMA_VERSION,
                "pagctl_version": __version__, "records": list(records)}
    sys.stdout.write(json.dumps(envelope, indent=2, sort_keys=True) + "\n")


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    """A result on stdout as a two-column rich table (name, value)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


def cell_text(v: Any) -> str:
    """A value in a table: floats to 4 decimals, None as "-"."""
    if isinstance(v, float):
        return f"{v:.4f}"
    return "-" if v is None else str(v)


def parse_params(items: list[str], where: str) -> dict[str, Any]:
    """``KEY=VALUE`` items (values parsed as YAML, else kept as text) as a mapping;
    SpecError naming ``where`` (the option) for an item without ``=`` or a refused value."""
    from pagctl.spec import parse_value

    params: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"{where}: '{item}' is not KEY=VALUE, e.g. {where} eps=0.5")
        try:
            params[key.strip()] = parse_value(raw)
        except ValueError as exc:
            raise SpecError(f"{where} {key.strip()}: {exc}") from None
    return params


SetOpt = Annotated[list[str], typer.Option(
    "--set", help="Override a spec field, KEY=VALUE with a dotted key (value parsed as YAML); "
    "repeatable, e.g. --set train.epochs=5.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
DataDirOpt = Annotated[Path | None, typer.Option(
    "--data-dir", help="Folder with the dataset files, or the file of the dataset tensors "
    "(sets data.root).")]
RunOutOpt = Annotated[Path | None, typer.Option("--out", help="Run folder (sets out_dir).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted run.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing run "
                                            "folder.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
ProgressOpt = Annotated[bool, typer.Option(
    "--progress/--no-progress", help="Progress with ETA on stderr (a bar on a terminal, "
    "periodic lines in a log).")]
RecordOpt = Annotated[bool, typer.Option(
    "--record/--no-record", help="Append the result to the run's metrics.jsonl; --no-record "
    "for a quick look that must not become the run's latest result.")]
DpiOpt = Annotated[int | None, typer.Option(
    "--dpi", min=50, max=1200, help=f"Resolution of the figures in dots per inch (default "
    f"{DEFAULT_DPI}): the pixels of a PNG; a PDF or SVG is vector, and uses it only for "
    "images inside it.")]
ShardOpt = Annotated[str | None, typer.Option(
    "--shard", metavar="I/N", help="Evaluate shard I of N (0 <= I < N) as an independent job: "
    "every N-th batch, progress kept in RUN/shards/ (rerun to resume); shows and records "
    "nothing. Then --merge-shards N. 'torchrun': under torchrun each rank evaluates its shard "
    "and rank 0 merges.")]
MergeShardsOpt = Annotated[int | None, typer.Option(
    "--merge-shards", min=1, metavar="N", help="Merge the N finished shards of this evaluation "
    "(same options, without --shard) into the unsharded result (attack: probed as well), show "
    "and record it.")]
TrustCodeOpt = Annotated[bool, typer.Option(
    "--trust-code", help="Allow an architecture that the spec or run folder names as "
    "package.module:factory to be imported and run. A spec or run folder is data: without "
    "this flag pagctl runs only code named on the command line (and installed plugins and "
    "timm models).")]
WeightsOpt = Annotated[str, typer.Option(
    "--weights", help="Which of the run's weights: last (model.safetensors) or best "
    "(model-best.safetensors: the best epoch by validation robust accuracy, for runs with "
    "data.validation_size). Recorded with the result.")]


IndicesOpt = Annotated[str | None, typer.Option(
    "--indices", metavar="FILE|START:STOP", help="Test points to evaluate, as positions in "
    "the test set (with --dataset tensors: in your file's x): a range START:STOP (STOP "
    "excluded, e.g. 0:1000), or a file of integers separated by spaces, commas or "
    "newlines, or a JSON list.")]
DatasetOpt = Annotated[str | None, typer.Option(
    "--dataset", help="Evaluate on other data than the run's own test split, read from "
    "--data-dir: 'tensors' (your .safetensors or .npz file of x and y) or a named dataset "
    "(cifar10, ...). Results on data that is not the run's test split are shown and "
    "exported, not recorded.")]


def read_indices(given: str) -> Any:
    """``--indices``: a range ``START:STOP`` (STOP excluded; START defaults to 0), or a file
    of integers (ASCII digits) separated by spaces, commas or newlines, or a JSON list, each
    once. Shape: -> (n,) int64 tensor."""
    import re

    import torch

    span = re.fullmatch(r"\s*([0-9]*)\s*:\s*([0-9]+)\s*", given)
    if span is not None and not Path(given).exists():
        start, stop = int(span.group(1) or 0), int(span.group(2))
        if stop <= start or stop > 2**40:
            raise SpecError(f"--indices {given}: the range START:STOP holds no index; give "
                            "STOP > START, e.g. 0:1000")
        return torch.arange(start, stop, dtype=torch.int64)
    path = Path(given)
    if path.is_dir():
        raise SpecError(f"--indices {given}: is a folder; give a file of indices or a range "
                        "START:STOP, e.g. 0:1000")
    if not path.is_file():
        raise SpecError(f"--indices {given}: no such file; give a file of indices or a range "
                        "START:STOP, e.g. 0:1000")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"--indices {path}: cannot read it ({exc.__class__.__name__}); give "
                        "a text file of integers") from None
    try:
        if text.lstrip().startswith("["):
            values = json.loads(text)
            if not isinstance(values, list) or not all(
                    isinstance(v, int) and not isinstance(v, bool) for v in values):
                raise ValueError
        else:
            parts = [v for v in re.split(r"[\s,]+", text.strip()) if v]
            if not all(re.fullmatch(r"-?[0-9]+", v) for v in parts):
                raise ValueError
            values = [int(v) for v in parts]
    except (ValueError, RecursionError):
        raise SpecError(f"--indices {path}: expected integers separated by spaces, commas or "
                        "newlines, or a JSON list of integers") from None
    if not values:
        raise SpecError(f"--indices {path}: the file lists no index")
    seen: set[int] = set()
    for v in values:
        if v in seen:
            raise SpecError(f"--indices {path}: index {v} appears twice; list each once")
        seen.add(v)
    if any(not -2**63 <= v < 2**63 for v in values):
        raise SpecError(f"--indices {path}: an index is far outside any test set; give the "
                        "test-set positions to evaluate")
    return torch.tensor(values, dtype=torch.int64)


def plugin_params(group: str, name: str, given: dict[str, Any], option: str) -> Any:
    """Validate ``option NAME``/``--param`` against the plugin's Params; errors name the
    option as typed (``--param eps: ...``), not a spec path."""
    from pydantic import ValidationError

    from pagctl import registry
    from pagctl.errors import PluginError
    from pagctl.spec import format_validation_error

    try:
        factory = registry.REGISTRIES[group].get(name)
    except PluginError as exc:
        raise type(exc)(f"{option}: {exc}") from None
    try:
        return factory.Params.model_validate(given)
    except ValidationError as exc:
        lines = format_validation_error(exc, schema=f"pagctl plugins {name}",
                                        model=factory.Params).splitlines()
        raise SpecError("\n".join(f"--param {line}" for line in lines)) from None


def complete_plugins(group: str | None) -> Any:
    """Shell completion of plugin names (built-ins and installed entry points)."""

    def complete(incomplete: str) -> list[str]:
        from pagctl.registry import REGISTRIES

        regs = [REGISTRIES[group]] if group else list(REGISTRIES.values())
        names = sorted({n for reg in regs for n in reg.names()})
        return [n for n in names if n.startswith(incomplete)]

    return complete


def check_figure(option: str, path: Path | None,
                 formats: tuple[str, ...] = FIGURE_FORMATS) -> None:
    """An option that writes a figure: a name whose suffix is one of ``formats`` (PNG, PDF
    or SVG by default), a place it can be written, and matplotlib installed (checked before
    any work is done)."""
    if path is None:
        return
    figure_format(option, path, formats)
    from pagctl.checkpoint import check_output

    check_output(option, path)
    pyplot(option)


def check_dpi(dpi: int | None, figures: dict[str, Path | None]) -> int:
    """``--dpi`` as given, or `DEFAULT_DPI`; refused when none of ``figures`` (option:
    file) is asked for, as it would change nothing."""
    if dpi is not None and all(path is None for path in figures.values()):
        raise SpecError(f"--dpi: sets the resolution of {' and '.join(figures)}; add "
                        f"{next(iter(figures))} FILE or drop --dpi")
    return DEFAULT_DPI if dpi is None else dpi


def load_run_and_data(run: Path, device: str, data_dir: Path | None, weights: str = "last",
                      trust_code: bool = False) -> tuple[LoadedRun, DataBundle, torch.device]:
    """A run folder's model (``weights``: last or best) on ``device`` and its dataset (from
    ``--data-dir`` when given, else the spec's ``data.root``); the load's warnings go to
    stderr. ``trust_code``: ``--trust-code`` (`pagctl.trust`)."""
    from pagctl import checkpoint
    from pagctl.build import resolve_device
    from pagctl.data import load_data
    from pagctl.provenance import check_test_images
    from pagctl.trust import CodeTrust

    dev = resolve_device(device)
    loaded = checkpoint.load_run(run, dev, weights=weights,
                                 trust=CodeTrust.of(trust_code))
    for line in loaded.warnings:
        typer.echo(line, err=True)
    data_spec = loaded.spec.data
    if data_dir is not None:
        data_spec = data_spec.model_copy(update={"root": data_dir})
    bundle = load_data(data_spec)
    check_test_images(run, bundle, weights)  # another --data-dir: other images
    return loaded, bundle, dev


def check_run_folders(runs: list[Path], options: dict[str, object],
                      weights: str = "last", trust_code: bool = False) -> None:
    """Before anything runs on several run folders: each one a readable pagctl run folder
    with the ``weights`` asked for, naming no code the user has not trusted
    (``--trust-code``), none given twice, and none of ``options`` (flag: value) that apply
    to one run only set; one line naming the folder or the flag otherwise."""
    from pagctl.checkpoint import BEST_MODEL_FILE, MODEL_FILE, read_run_spec
    from pagctl.errors import CheckpointError
    from pagctl.spec import RunSpec
    from pagctl.trust import CodeTrust, is_import_path

    if len(runs) < 2:
        return
    for flag, value in options.items():
        if value:
            raise SpecError(f"{flag}: applies to one run folder; give one run, or run the "
                            "command once per run")
    seen: set[Path] = set()
    for run in runs:
        resolved = run.resolve()
        if resolved in seen:
            raise SpecError(f"{run}: given twice; list each run folder once")
        seen.add(resolved)
        arch = read_run_spec(run, RunSpec).model.arch
        if is_import_path(arch):
            CodeTrust.of(trust_code).require(arch, f"{run}/spec.json: model.arch",
                                             folder=str(run))
        file = BEST_MODEL_FILE if weights == "best" else MODEL_FILE
        if not (run / file).is_file():
            raise CheckpointError(f"{run}: no {file} (training has not finished an epoch, "
                                  "or is still running); leave it out, or wait for it")


def print_collected(kind: str, records: list[dict[str, Any]]) -> None:
    """After a failure on a later run folder: the JSON envelope of the runs already done
    (they are recorded; what was measured is not lost)."""
    if records:
        print_envelope(kind, records)


def parse_shard(text: str, flag: str = "--shard") -> tuple[int, int]:
    """``I/N`` as (I, N); SpecError naming ``flag`` unless 0 <= I < N."""
    index, _, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise SpecError(f"{flag}: expected I/N with 0 <= I < N, shards being numbered from "
                        f"0 (e.g. {flag} 0/4 … {flag} 3/4), or 'torchrun', got '{text}'")
    return i, n


def shard_request(shard: str | None, merge_shards: int | None) -> tuple[Any, Any]:
    """``--shard I/N|torchrun`` and ``--merge-shards N`` as (the torchrun launch or None,
    this process's shard ``(i, N)`` or None); SpecError for a bad shard, for both options,
    or for ``--shard torchrun`` outside torchrun."""
    launch = None
    if shard == "torchrun":
        from pagctl.distributed.launch import torchrun_launch

        if merge_shards is not None:
            raise SpecError("--merge-shards: under --shard torchrun rank 0 merges the shards "
                            "itself; drop --merge-shards")
        launch = torchrun_launch("--shard torchrun")
    shard_of = ((launch.rank, launch.world_size) if launch is not None
                else parse_shard(shard) if shard is not None else None)
    if shard_of is not None and merge_shards is not None and launch is None:
        raise SpecError("--shard, --merge-shards: run one shard, or merge them all; not both")
    return launch, shard_of


T = TypeVar("T")


@dataclass(frozen=True)
class RunAccess:
    """How a command opens each run folder it is given: ``--device``, ``--data-dir``,
    ``--weights``, ``--trust-code``, ``--dataset`` (data other than the run's own: the
    user's held-out file, ``--dataset tensors --data-dir FILE``), and, under ``--shard
    torchrun``, the launch (each rank on its own device)."""

    device: str
    data_dir: Path | None
    weights: str
    trust_code: bool
    launch: Any = None
    dataset: str | None = None

    def open(self, run: Path) -> tuple[LoadedRun, DataBundle, torch.device]:
        """The run's model and data on this process's device (`load_run_and_data`), or with
        ``dataset`` that dataset read from ``data_dir``: the model must take its images and
        give one logit per class of it (checked as the evaluation starts)."""
        device = self.device
        if self.launch is not None:
            from pagctl.distributed.launch import rank_device

            device = rank_device(device, self.launch)
        if self.dataset is None:
            return load_run_and_data(run, device, self.data_dir, self.weights,
                                     self.trust_code)
        return self._other_data(run, device)

    def _other_data(self, run: Path, device: str) -> tuple[LoadedRun, DataBundle,
                                                            torch.device]:
        from pydantic import ValidationError

        from pagctl import checkpoint
        from pagctl.build import resolve_device
        from pagctl.data import load_data
        from pagctl.spec import DataSpec, format_validation_error
        from pagctl.trust import CodeTrust

        if self.data_dir is None:
            raise SpecError(f"--dataset {self.dataset}: reads its files from --data-dir; give "
                            "it (for tensors: the .safetensors or .npz file of x and y)")
        dev = resolve_device(device)
        loaded = checkpoint.load_run(run, dev, weights=self.weights,
                                     trust=CodeTrust.of(self.trust_code))
        for line in loaded.warnings:
            typer.echo(line, err=True)
        fields: dict[str, Any] = {"dataset": self.dataset, "root": self.data_dir}
        if self.dataset == "tensors":
            fields["num_classes"] = int(loaded.config["num_classes"])
        try:
            data_spec = DataSpec.model_validate(fields)
        except ValidationError as exc:
            raise SpecError(format_validation_error(exc, model=DataSpec).splitlines()[0]
                            .replace("dataset:", "--dataset:", 1)) from None
        return loaded, load_data(data_spec), dev

    def recordable(self, run: Path, bundle: DataBundle, weights: str) -> bool:
        """Whether a result on ``bundle`` may enter ``run``'s metrics.jsonl: always for the
        run's own data (checked as it was opened); with ``--dataset``, only when its test
        split is the one the run was trained or imported with (else one line on stderr
        says the result is shown, not recorded, and how to keep such results)."""
        if self.dataset is None:
            return True
        from pagctl.provenance import holds_test_images

        if holds_test_images(run, bundle, weights):
            return True
        typer.echo(f"not recorded: {self.data_dir} is not the test split of {run}, whose "
                   "records are about its own test points only; to keep results on this "
                   f"data, import the model with --dataset {self.dataset} --data-dir "
                   f"{self.data_dir}", err=True)
        return False


def evaluate_run(evaluate: Callable[[EvaluationRequest], T], request: EvaluationRequest,
                 run: Path, launch: Any) -> T | None:
    """``evaluate(request)`` for one run folder as the options ask, through the one
    shard / merge / torchrun driver (`pagctl.evaluation.sharding.across_ranks`): whole, one
    shard (None, after saying how to merge), a merge, or under torchrun (None on the ranks
    other than 0). A Ctrl-C in a shard, or with a progress ``state`` file, says where the
    progress is and exits 130."""
    from pagctl.evaluation.sharding import across_ranks

    try:
        result = across_ranks(evaluate, request, launch)
    except KeyboardInterrupt:
        if request.state is None and request.shard is None and launch is None:
            raise
        from pagctl.progress import stderr_console

        where = request.state if request.state is not None else request.shard_dir
        stderr_console.print(f"interrupted: progress is in {where}; run the same command "
                             "again to resume", soft_wrap=True)
        raise typer.Exit(130) from None
    if request.shard is not None and launch is None:
        i, count = request.shard
        typer.echo(f"shard {i}/{count} done ({request.shard_dir}); when all {count} are, run "
                   f"the same command with --merge-shards {count} instead of --shard",
                   err=True)
        return None
    return result


def run_heading(position: int, runs: list[Path]) -> None:
    """With several run folders, which one the command is on now (stderr)."""
    if len(runs) > 1:
        from pagctl.progress import stderr_console

        stderr_console.rule(f"run {position + 1}/{len(runs)}: {runs[position]}")


def record_results(run: Path, results: list[tuple[Any, Any]], weights: str,
                   bundle: DataBundle, trust_code: bool) -> None:
    """Append the records of a result already shown to the run's metrics.jsonl, each with
    the test-set indices it measured, through the one gate
    (`pagctl.provenance.record_measurements`: the run's own weights and images); when that
    fails, one error line says the result above was not recorded, and why."""
    from pagctl.errors import CheckpointError
    from pagctl.provenance import Measurement, record_measurements
    from pagctl.trust import CodeTrust

    try:
        record_measurements(run, [Measurement(rec, indices) for rec, indices in results],
                            weights=weights, bundle=bundle, trust=CodeTrust.of(trust_code))
    except CheckpointError as exc:
        raise CheckpointError(f"the result above was not recorded: {exc}") from None
