"""``pagctl train`` and ``pagctl train-score``: a spec (file, built-in name or run folder)
plus overrides, trained into a run folder."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pagctl.cli.common import (
    DataDirOpt,
    DeviceOpt,
    Format,
    OverwriteOpt,
    QuietOpt,
    ResumeOpt,
    RunOutOpt,
    SetOpt,
    TrustCodeOpt,
    cell_text,
    format_help,
    print_envelope,
    print_table,
)
from pagctl.errors import SpecError

if TYPE_CHECKING:
    from pagctl.distributed.launch import Launch
    from pagctl.grid import GridPoint
    from pagctl.trust import CodeTrust

ScoreSetOpt = Annotated[list[str], typer.Option(
    "--set", help="Override a score spec field, KEY=VALUE with a dotted key (value parsed as "
    "YAML); repeatable, e.g. --set train.steps=2000.")]


def _listed(list_: bool, schema: bool, names: Callable[[], list[str]],
            describe: Callable[[str], str], model: Any) -> bool:
    """``--list`` (built-in names with their descriptions) or ``--schema`` (the spec's JSON
    Schema, raw: a document for editors and validators, not a result, so never wrapped in
    the ``--format json`` envelope): print it and return True, the command is done;
    otherwise False."""
    if list_:
        for name in names():
            typer.echo(f"{name:24s} {describe(name)}")
        return True
    if schema:
        typer.echo(json.dumps(model.model_json_schema(), indent=2, sort_keys=True))
        return True
    return False


def _log(message: str) -> None:
    """A training log line on stderr."""
    from pagctl.progress import stderr_console

    stderr_console.print(message, soft_wrap=True)


def _stopped(command: str, after: str, run_dir: Path, launcher: str = "") -> None:
    """After a Ctrl-C or SIGTERM: how to continue, on stderr, and exit 130."""
    _log(f"interrupted after {after}; state saved. Continue with: {launcher}pagctl {command} "
         f"{run_dir} --resume")
    raise typer.Exit(130)


def _spec_and_values(command: str, spec: str, *, data_dir: Path | None, out: Path | None,
                     extra: dict[str, Any] | None = None) -> tuple[str, dict[str, Any]]:
    """The spec to load and the typed values its options set (applied after ``--set``, as
    they are, never parsed as YAML): a run folder given as SPEC (its spec.json, resumed in
    place), ``--data-dir``, ``extra`` and ``--out``."""
    values: dict[str, Any] = {}
    if Path(spec).is_dir():
        if not (Path(spec) / "spec.json").is_file():
            raise SpecError(f"{command}: '{spec}' is a folder without spec.json; pass a spec "
                            "file")
        values["out_dir"] = Path(spec)
        spec = str(Path(spec) / "spec.json")
    if data_dir is not None:
        values["data.root"] = data_dir
    values.update(extra or {})
    if out is not None:
        values["out_dir"] = out
    return spec, values


def train(
    spec: Annotated[str | None, typer.Argument(
        help="Spec file (YAML/JSON), built-in spec name, or a run folder to resume.")] = None,
    set_: SetOpt = [],  # noqa: B006 - typer needs a literal default
    data_dir: DataDirOpt = None,
    download: Annotated[bool, typer.Option(
        "--download", help="Allow the network: torchvision downloads the dataset into "
        "--data-dir, timm fetches pretrained weights (model.kwargs.pretrained).")] = False,
    out: RunOutOpt = None,
    device: DeviceOpt = "auto",
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    full_monitor: Annotated[bool, typer.Option(
        "--full-monitor", help="Run the per-epoch monitor after every epoch on every test "
        "image (eval.every=1, eval.limit=null) instead of the spec's cheaper one.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Build what training builds (run "
                                          "folder checks, data, model, plugins); train and "
                                          "write nothing.")] = False,
    list_: Annotated[bool, typer.Option("--list", help="List the built-in specs.")] = False,
    schema: Annotated[bool, typer.Option(
        "--schema", help="Print the spec's JSON Schema, for editors and validators (the "
        "schema itself, not wrapped like --format json results).")] = False,
    grid: Annotated[list[str], typer.Option(
        "--grid", help="Sweep a spec field over values, KEY=V1,V2,… (values parsed as YAML); "
        "repeatable: every combination is a run of its own, in --out (default "
        "runs/<name>-grid)/<key>=<value>__…; finished runs are skipped, interrupted ones "
        "resumed.")] = [],  # noqa: B006
    grid_point: Annotated[int | None, typer.Option(
        "--grid-point", min=0, metavar="I", help="Run only point I of the --grid (numbered "
        "from 0 in the order --print-commands lists them), e.g. a scheduler's array index.")]
    = None,
    print_commands: Annotated[bool, typer.Option(
        "--print-commands", help="With --grid: print one command per point (each with "
        "--grid-point) for a scheduler or torchrun, and run nothing.")] = False,
    trust_code: TrustCodeOpt = False,
    quiet: QuietOpt = False,
    fmt: Annotated[Format, typer.Option(
        "--format", help=format_help("train", "Final summary format"))] = Format.table,
) -> None:
    """Train a model from a spec; writes a run folder (weights, spec, metrics). Under
    torchrun, data-parallel over its processes (see the distributed guide). With --grid, a
    grid of runs, one per combination of values."""
    from pagctl import spec as specmod
    from pagctl.trust import CodeTrust, named_architectures

    if _listed(list_, schema, specmod.builtin_spec_names,
               lambda name: specmod.load_spec(name).description, specmod.RunSpec):
        return
    trust = CodeTrust.of(trust_code, named_architectures([*set_, *grid]))
    if spec is None:
        raise SpecError("train: give a spec file or built-in name (pagctl train --list)")
    extra: dict[str, Any] = {"data.download": True} if download else {}
    if full_monitor:
        extra.update({"eval.every": 1, "eval.limit": None})
    if not grid and (grid_point is not None or print_commands):
        flag = "--grid-point" if grid_point is not None else "--print-commands"
        raise SpecError(f"{flag}: applies to a grid; add --grid KEY=V1,V2,…")
    if grid:
        _train_grid(spec, set_, grid, data_dir=data_dir, out=out, extra=extra, device=device,
                    resume=resume, overwrite=overwrite, dry_run=dry_run, point=grid_point,
                    print_commands=print_commands, quiet=quiet, fmt=fmt, trust=trust,
                    flags=[*(["--download"] if download else []),
                           *(["--trust-code"] if trust_code else []),
                           *(["--full-monitor"] if full_monitor else []),
                           *(["--device", device] if device != "auto" else []),
                           *(["--dry-run"] if dry_run else []),
                           *(["--quiet"] if quiet else []),
                           *(["--format", fmt.value] if fmt is not Format.table else [])])
        return
    spec, values = _spec_and_values("train", spec, data_dir=data_dir, out=out, extra=extra)
    run_spec = specmod.load_spec(spec, set_, values)
    import pagctl.train

    if dry_run:
        s = pagctl.train.prepare(run_spec, device=device, resume=resume, overwrite=overwrite,
                                 trust=trust)
        summary: dict[str, Any] = {
            "valid": True, "run_dir": str(run_spec.run_dir), "dataset": s.bundle.name,
            "train_images": len(s.bundle.train), "test_images": len(s.bundle.test),  # type: ignore[arg-type]
            "classes": s.bundle.num_classes, "input_shape": list(s.bundle.input_shape),
            "arch": run_spec.model.arch,
            "parameters": sum(p.numel() for p in s.model.parameters()),
            "source": run_spec.target_gradients.name, "pag": s.pag_active,
            "pag_weight": run_spec.train.pag_weight,
            "classes_per_image": run_spec.train.classes_per_image}
        if fmt is Format.json:
            print_envelope("train", [summary])
            return
        print_table(f"dry run: {run_spec.name} (valid)", [
            ("run folder", str(run_spec.run_dir)), ("dataset", s.bundle.name),
            ("train / test", f"{summary['train_images']} / {summary['test_images']}"),
            ("classes", str(s.bundle.num_classes)), ("input", str(s.bundle.input_shape)),
            ("arch", run_spec.model.arch), ("parameters", f"{summary['parameters']:,}"),
            ("source", run_spec.target_gradients.name),
            ("lambda / K", f"{run_spec.train.pag_weight} / {run_spec.train.classes_per_image}"),
        ])
        return
    from pagctl.distributed.launch import training_launch

    launch = training_launch()
    result = pagctl.train.train(run_spec, device=device, resume=resume, overwrite=overwrite,
                                progress=not quiet, log=_log, launch=launch, trust=trust)
    if launch is not None and not launch.leader:  # rank 0 reports
        raise typer.Exit(130 if result.interrupted else 0)
    if result.interrupted:
        _stopped("train", f"epoch {result.epochs_done}", result.run_dir,
                 launcher="torchrun --nproc-per-node N -m " if launch is not None else "")
    summary = result.summary()
    if fmt is Format.json:
        print_envelope("train", [summary])
        return
    keys = ("run_dir", "epoch", "loss", "ce", "pag", "train_accuracy", "clean_accuracy",
            "robust_accuracy", "alignment", "n_test", "train_seconds", "epoch_train_seconds")
    rows = [(k, cell_text(summary[k])) for k in keys if summary.get(k) is not None]
    if "monitor" in summary:
        rows.append(("monitor", json.dumps(summary["monitor"])))
    print_table(f"trained {run_spec.name}", rows)


def _train_grid(spec: str, set_: list[str], grid: list[str], *, data_dir: Path | None,
                out: Path | None, extra: dict[str, Any], device: str, resume: bool,
                overwrite: bool, dry_run: bool, point: int | None, print_commands: bool,
                quiet: bool, fmt: Format, trust: CodeTrust, flags: list[str]) -> None:
    """``pagctl train SPEC --grid …``: every point checked first, then run in turn (or the
    one ``--grid-point``), finished points skipped, interrupted ones resumed
    (`pagctl.grid`), all under the root's `pagctl.grid.GridLock` (one grid at a time in a
    root, the ``--grid-point`` jobs of one grid together); or, with ``--print-commands``,
    one command per point, keeping every option given (``flags``: those not spelled out
    here)."""
    import shlex

    from pagctl import grid as gridmod
    from pagctl.distributed.launch import training_launch

    if Path(spec).is_dir():
        raise SpecError(f"--grid: '{spec}' is a run folder; give the spec file or built-in "
                        "name the grid sweeps")
    if resume:
        raise SpecError("--resume: a grid resumes its interrupted runs and skips finished "
                        "ones by itself; drop --resume")
    _, values = _spec_and_values("train", spec, data_dir=data_dir, out=None, extra=extra)
    points = gridmod.expand(spec, list(set_), values, list(grid), out)
    if point is not None and point >= len(points):
        raise SpecError(f"--grid-point: {point} is not a point of this grid (0 … "
                        f"{len(points) - 1})")
    launch = training_launch()
    if launch is not None and point is None and not (dry_run or print_commands):
        raise SpecError("--grid under torchrun: launch one point per torchrun with "
                        "--grid-point I (--print-commands lists them)")
    if print_commands and overwrite:
        raise SpecError("--overwrite: every printed command would retrain its point from "
                        "scratch each time it runs (a resubmitted job too); drop it, and delete "
                        "the grid's folders to start over")
    chosen = points if point is None else [points[point]]
    if print_commands or dry_run:  # nothing written: no lock
        if not overwrite:
            gridmod.check_folders(points)
        if print_commands:
            base = ["pagctl", "train", spec, *(a for s in set_ for a in ("--set", s)),
                    *(a for g in grid for a in ("--grid", g)),
                    *(["--data-dir", str(data_dir)] if data_dir is not None else []),
                    *(["--out", str(out)] if out is not None else []), *flags]
            for p in chosen:
                typer.echo(shlex.join([*base, "--grid-point", str(p.index)]))
        else:
            _dry_run_grid(points, chosen, device=device, overwrite=overwrite, fmt=fmt,
                          trust=trust)
        return
    command = " ".join(["train", spec, *(f"--grid {g}" for g in grid)])
    with gridmod.GridLock(points[0].run_dir.parent, gridmod.grid_digest(points),
                          command=command if len(command) <= 200 else command[:199] + "…"):
        if not overwrite:
            gridmod.check_folders(points)
        summaries = [_run_point(p, len(points), device=device, overwrite=overwrite,
                                quiet=quiet, launch=launch, trust=trust) for p in chosen]
    _grid_summary(points, summaries, fmt)


def _dry_run_grid(points: list[GridPoint], chosen: list[GridPoint], *, device: str,
                  overwrite: bool, fmt: Format, trust: CodeTrust) -> None:
    """``--grid … --dry-run``: build what each chosen point's training builds, and list the
    points with their folders and what running the grid would do with each."""
    from pagctl import grid as gridmod
    from pagctl.train import prepare

    plan = [(p, "new" if overwrite else gridmod.status(p)) for p in chosen]
    for p, _ in plan:
        prepare(p.spec, device=device, resume=False, overwrite=True, trust=trust)
    rows = [{"point": p.index, "values": dict(p.values), "run_dir": str(p.run_dir),
             "status": st} for p, st in plan]
    if fmt is Format.json:
        print_envelope("train", rows)
        return
    print_table(f"dry run: grid of {len(points)} runs (valid)",
                [(f"{r['point']}: {p.label}", f"{r['status']:9s} {r['run_dir']}")
                 for r, (p, _) in zip(rows, plan, strict=True)])


def _run_point(p: GridPoint, total: int, *, device: str, overwrite: bool, quiet: bool,
               launch: Launch | None, trust: CodeTrust) -> dict[str, Any]:
    """Run one point of a grid as its folder says, looked at when its turn comes (another
    job of the grid may have run it meanwhile); its summary row. A point that fails is
    reported and the grid goes on (a diverging λ stops no other point); one that another
    command is training (a job of the same grid) is left to it, said in the grid's terms
    rather than a run folder's (whose "pass --resume" a grid refuses). Under torchrun a
    failure ends the launch, as in one run."""
    import pagctl.train
    from pagctl import grid as gridmod
    from pagctl.checkpoint import read_metrics, run_folder_holder
    from pagctl.errors import CheckpointError
    from pagctl.records import TrainEpochRecord

    head = f"grid point {p.index + 1}/{total} ({p.label})"
    row: dict[str, Any] = {"point": p.index, "values": dict(p.values),
                           "run_dir": str(p.run_dir)}
    try:
        st = "new" if overwrite else gridmod.status(p)
        if st == "finished":
            _log(f"{head}: finished before, skipped ({p.run_dir})")
            epochs = read_metrics(p.run_dir).of(TrainEpochRecord)
            return {**row, "status": "skipped", **(epochs[-1].to_json() if epochs else {})}
        _log(f"{head}: {'resuming' if st == 'partial' else 'starting'} in {p.run_dir}")
        result = pagctl.train.train(p.spec, device=device, resume=st == "partial",
                                    overwrite=overwrite or st == "unsaved", progress=not quiet,
                                    log=_log, launch=launch, trust=trust)
    except Exception as exc:  # one point failing (a diverging λ, say) stops no other
        if launch is not None:
            raise
        holder = run_folder_holder(p.run_dir) if isinstance(exc, CheckpointError) \
            else None
        if holder is not None:
            _log(f"{head}: being trained by {holder}; left to it: run the grid again when "
                 "that ends")
            return {**row, "status": "busy", "error": f"being trained by {holder}"}
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        _log(f"{head} failed: {first}")
        return {**row, "status": "failed", "error": first}
    if launch is not None and not launch.leader:
        raise typer.Exit(130 if result.interrupted else 0)
    if result.interrupted:
        _log(f"interrupted in {head}, epoch {result.epochs_done}; state saved. Run the "
             "same command again: it skips the finished runs and resumes this one")
        raise typer.Exit(130)
    return {**row, "status": "trained", **result.summary()}


def _grid_summary(points: list[GridPoint], summaries: list[dict[str, Any]],
                  fmt: Format) -> None:
    """The grid's result: one row per point run (table or JSON); exit 1, with one line
    naming them, when some failed or were being trained by another command."""
    if fmt is Format.json:
        print_envelope("train", summaries)
    else:
        root = points[0].run_dir.parent
        print_table(f"grid of {len(points)} runs in {root}", [
            (f"{s['point']}: {' '.join(f'{k}={v}' for k, v in s['values'].items())}",
             "  ".join([s["status"], *(f"{label} {cell_text(s[key])}" for key, label in (
                 ("clean_accuracy", "clean"), ("robust_accuracy", "robust"),
                 ("alignment", "alignment")) if s.get(key) is not None),
                 *([s["error"]] if "error" in s else [])]))
            for s in summaries])

    def which(rows: list[dict[str, Any]]) -> str:
        return "; ".join(f"--grid-point {s['point']}: "
                         + " ".join(f"{k}={v}" for k, v in s["values"].items()) for s in rows)

    failed = [s for s in summaries if s["status"] == "failed"]
    busy = [s for s in summaries if s["status"] == "busy"]
    problems = [*([f"{len(failed)} of the grid's runs failed ({which(failed)})"] if failed
                  else []),
                *([f"{len(busy)} of the grid's runs {'was' if len(busy) == 1 else 'were'} "
                   f"being trained by another command ({which(busy)}): run the grid again "
                   "when that ends"] if busy else [])]
    if problems:
        typer.echo(f"error: {'; '.join(problems)}; the others are done", err=True)
        raise typer.Exit(1)


def train_score(
    spec: Annotated[str | None, typer.Argument(
        help="Score spec file (YAML/JSON), built-in name (--list), or a score run folder to "
        "resume.")] = None,
    set_: ScoreSetOpt = [],  # noqa: B006 - typer needs a literal default
    data_dir: DataDirOpt = None,
    out: RunOutOpt = None,
    device: DeviceOpt = "auto",
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    list_: Annotated[bool, typer.Option("--list", help="List the built-in score specs.")] =
    False,
    schema: Annotated[bool, typer.Option(
        "--schema", help="Print the score spec's JSON Schema, for editors and validators "
        "(the schema itself, not wrapped like --format json results).")] = False,
    quiet: QuietOpt = False,
    fmt: Annotated[Format, typer.Option(
        "--format", help=format_help("train-score", "Final summary format"))] = Format.table,
) -> None:
    """Train a class-conditional score model (denoising score matching over a range of noise
    levels) for the 'sbg' target-gradient source; writes a run folder with samples.png."""
    from pagctl.score.spec import ScoreSpec, builtin_score_spec_names, load_score_spec

    if _listed(list_, schema, builtin_score_spec_names,
               lambda name: load_score_spec(name).description, ScoreSpec):
        return
    if spec is None:
        raise SpecError("train-score: give a score spec file or built-in name "
                        "(pagctl train-score --list)")
    spec, values = _spec_and_values("train-score", spec, data_dir=data_dir, out=out)
    score_spec = load_score_spec(spec, set_, values)
    import pagctl.score.train

    result = pagctl.score.train.train_score(score_spec, device=device, progress=not quiet,
                                            resume=resume, overwrite=overwrite, log=_log)
    if result.interrupted:
        _stopped("train-score", f"step {result.steps_done}", result.run_dir)
    summary = {"run_dir": str(result.run_dir), "steps": result.steps_done,
               "samples": str(result.samples) if result.samples else None, **result.last}
    if fmt is Format.json:
        print_envelope("train-score", [summary])
        return
    print_table(f"trained score model {score_spec.name}",
                [(k, cell_text(v)) for k, v in summary.items()])
