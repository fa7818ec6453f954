"""``pagctl attack``: attack a trained run, with eps sweeps, plots, example images and
resumable progress."""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pagctl.checkpoint import check_output
from pagctl.cli.common import (
    DataDirOpt,
    DatasetOpt,
    DeviceOpt,
    DpiOpt,
    Format,
    IndicesOpt,
    MergeShardsOpt,
    ProgressOpt,
    RecordOpt,
    RunAccess,
    ShardOpt,
    TrustCodeOpt,
    WeightsOpt,
    check_dpi,
    check_figure,
    check_run_folders,
    complete_plugins,
    evaluate_run,
    format_help,
    parse_params,
    plugin_params,
    print_collected,
    print_envelope,
    print_table,
    read_indices,
    record_results,
    run_heading,
    shard_request,
)
from pagctl.errors import SpecError

if TYPE_CHECKING:
    from pagctl.evaluation.request import EvaluationRequest
    from pagctl.robustness.evaluate import AttackJob


def attack(
    runs: Annotated[list[Path], typer.Argument(
        help="Run folder(s) written by 'pagctl train' or 'pagctl import'; several (e.g. a "
        "grid's, runs/grid/*) are attacked in turn, each recording its own result.",
        metavar="RUN...")],
    attack_name: Annotated[str, typer.Option(
        "--attack", "-a", help="Attack plugin name (pagctl plugins).",
        autocompletion=complete_plugins("attacks"))] = "pgd_l2",
    param: Annotated[list[str], typer.Option(
        "--param", "-p", help="Attack parameter KEY=VALUE; repeatable (eps=8/255).")] = [],  # noqa: B006
    limit: Annotated[int | None, typer.Option(
        "--limit", min=1, help="Attack the first N test images (of --indices if given).")] = None,
    indices_file: IndicesOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1,
                                            help="Images per attack batch.")] = 256,
    seed: Annotated[int, typer.Option("--seed", min=0, max=2**32 - 1,
                                      help="Seed for the attack's randomness.")] = 0,
    eps_sweep: Annotated[str | None, typer.Option(
        "--eps-sweep", help="Comma-separated budgets to attack at in turn, e.g. "
        "0.25,0.5,1,2 or 2/255,4/255,8/255 (replaces the eps parameter).")] = None,
    plot: Annotated[Path | None, typer.Option(
        "--plot", metavar="FILE", help="Write robust accuracy vs eps (needs --eps-sweep), as "
        "PNG, PDF or SVG by the suffix (.png, .pdf, .svg).")] = None,
    dpi: DpiOpt = None,
    save_images: Annotated[Path | None, typer.Option(
        "--save-images", help="Write clean | adversarial | perturbation for the first 8 "
        "points to this PNG, and the first 4 images turned toward each class to "
        "<name>-classes.png.")] = None,
    export: Annotated[Path | None, typer.Option(
        "--export", help="Write per-example and per-class CSVs and a RobustBench-style "
        "result JSON into this folder (one set per eps).")] = None,
    card: Annotated[list[str], typer.Option(
        "--card", help="A RobustBench model-card field of the --export JSON, KEY=VALUE; "
        "repeatable (link, name, authors, venue, architecture, reported, external, footnote, "
        "additional_data=true|false, unreliable=true|false, number_forward_passes=N).")
    ] = [],  # noqa: B006 - typer needs a literal default
    save_adversarial: Annotated[Path | None, typer.Option(
        "--save-adversarial", help="Write every attacked point's clean and adversarial "
        "image, label, test-set index and results to this .safetensors file (-eps<i> "
        "before the suffix with --eps-sweep).")] = None,
    state: Annotated[Path | None, typer.Option(
        "--state", help="Progress file: written after every batch, read to resume an "
        "interrupted run (one file per eps with --eps-sweep).")] = None,
    shard: ShardOpt = None,
    merge_shards: MergeShardsOpt = None,
    probes: Annotated[bool, typer.Option(
        "--probes/--no-probes", help="Run the gradient-masking probes and give a "
        "reliability verdict.")] = True,
    probe_size: Annotated[int, typer.Option(
        "--probe-size", min=1, help="Test points the probes use.")] = 100,
    precision: Annotated[str, typer.Option(
        "--precision", help="The model's forward: float32, or bfloat16 autocast (faster on "
        "GPUs; opt-in, and marked in the result and the record).")] = "float32",
    progress: ProgressOpt = True,
    strict: Annotated[bool, typer.Option(
        "--strict", help="Exit with code 3 when the reliability verdict is not 'reliable' "
        "(for CI; the result is still shown and recorded); refuse an eps whose ball holds "
        "the whole [0, 1] pixel box (exit 2, nothing run or recorded) rather than warn.")] = \
        False,
    keep_record: RecordOpt = True,
    weights: WeightsOpt = "last",
    trust_code: TrustCodeOpt = False,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
    dataset: DatasetOpt = None,
    fmt: Annotated[Format, typer.Option("--format", help=format_help("attack"))] = \
        Format.table,
) -> None:
    """Attack a trained run on its test set: clean and robust accuracy with 95% intervals,
    what each stage broke and cost, and a reliability verdict from gradient-masking probes.
    Each result is appended to the run's metrics.jsonl (unless --no-record). Several runs
    are attacked in turn, with the same options."""

    given = parse_params(param, "--param")
    params = plugin_params("attacks", attack_name, given, "--attack")
    budgets = _parse_sweep(eps_sweep, params) if eps_sweep is not None else None
    if plot is not None and budgets is None:
        raise SpecError("--plot: draws robust accuracy against eps; add --eps-sweep "
                        "(e.g. --eps-sweep 0.25,0.5,1)")
    if strict and not probes:
        raise SpecError("--strict: exits on the probes' reliability verdict, which "
                        "--no-probes turns off; drop one of them")
    launch, shard_of = shard_request(shard, merge_shards)
    # Under torchrun rank 0 merges, so the options are those of a merge.
    _check_shard_options(None if launch is not None else shard_of,
                         launch.world_size if launch is not None else merge_shards,
                         state=state, plot=plot, export=export, strict=strict,
                         save_images=save_images, save_adversarial=save_adversarial)
    check_figure("--plot", plot)
    check_figure("--save-images", save_images, ("png",))
    dots = check_dpi(dpi, {"--plot": plot, "--save-images": save_images})
    check_output("--state", state)
    if save_adversarial is not None:
        from pagctl.robustness.adversarial import adversarial_file

        adversarial_file(save_adversarial)
    if export is not None and export.exists() and not export.is_dir():
        raise SpecError(f"--export: {export} is a file; give a folder")
    if card and export is None:
        raise SpecError("--card: fills the RobustBench JSON that --export writes; add "
                        "--export DIR")
    from pagctl.robustness.exports import parse_card

    card_fields = parse_card(card)
    check_run_folders(runs, {"--state": state, "--save-images": save_images,
                             "--save-adversarial": save_adversarial, "--export": export,
                             "--shard torchrun": launch is not None}, weights, trust_code)
    from pagctl.evaluation.request import EvaluationRequest
    from pagctl.robustness.evaluate import AttackJob

    job = AttackJob(attack_name, params, budgets=budgets, probes=probes,
                    probe_size=probe_size, refuse_implausible=strict)
    request = EvaluationRequest(
        indices=read_indices(indices_file) if indices_file is not None else None,
        limit=limit, batch_size=batch_size, seed=seed, precision=precision,
        progress=progress, state=state, shard=None if launch is not None else shard_of,
        merge_shards=merge_shards)
    access = RunAccess(device, data_dir, weights, trust_code, launch, dataset)
    outputs = _Outputs(given, save_images, save_adversarial, export, keep_record, fmt,
                       dots, card_fields)
    curves: list[tuple[Path, list[Any]]] = []
    printed: list[dict[str, Any]] = []
    try:
        for position, run in enumerate(runs):
            run_heading(position, runs)
            done = _attack_run(run, job, request, access, outputs, several=len(runs) > 1)
            if done is not None:
                curves.append((run, done[0]))
                printed.extend(done[1])
    except BaseException:
        if fmt is Format.json and len(runs) > 1:
            print_collected("attack", printed)
        raise
    if not curves:
        return  # shards: nothing to show
    if fmt is Format.json and len(runs) > 1:
        print_envelope("attack", printed)
    if plot is not None:
        _plot_curves(plot, attack_name, curves, dots)
    if strict:
        _exit_if_unreliable([r for _, reports in curves for r in reports])


@dataclass(frozen=True)
class _Outputs:
    """What ``pagctl attack`` writes besides the record: the params as typed, the figure,
    the exports, the adversarial images, whether it records, the output format, the
    figures' dots per inch, the model-card fields of the exported JSON."""

    given: dict[str, Any]
    save_images: Path | None
    save_adversarial: Path | None
    export: Path | None
    keep_record: bool
    fmt: Format
    dpi: int
    card: dict[str, Any]

    @property
    def keep_images(self) -> int | None:
        """How many adversarial images the evaluation keeps (None: every point)."""
        return None if self.save_adversarial is not None else \
            8 if self.save_images is not None else 0


def _attack_run(run: Path, job: AttackJob, request: EvaluationRequest, access: RunAccess,
                outputs: _Outputs, *, several: bool,
                ) -> tuple[list[Any], list[dict[str, Any]]] | None:
    """Attack one run folder: evaluate (or its shard, or merge its shards), show the result
    (its JSON records are returned instead when ``several``), write the figures and exports,
    record it. Returns (reports, the records as printed), or None for a shard or a
    follower rank."""
    from pagctl.checkpoint import SHARDS_DIR, RunLock, check_appendable, confined
    from pagctl.robustness.evaluate import evaluate_attack

    with RunLock(run, exclusive=False, command="attack"):  # not while it is being trained
        if outputs.keep_record:
            check_appendable(run)
        loaded, bundle, dev = access.open(run)
        keep = outputs.keep_images
        job = replace(job, keep_images=len(bundle.test) if keep is None else keep)  # type: ignore[arg-type]
        done = evaluate_run(lambda part: evaluate_attack(loaded.model, bundle, job, part),
                            request.part(device=dev, shard_dir=confined(run, SHARDS_DIR)),
                            run, access.launch)
        if done is None:
            return None
        reports, attacked = done
        records = [report.to_record(params_given=outputs.given)  # e.g. eps "8/255" as typed
                   for report in reports]
        for rec in records:
            rec.weights = loaded.weights
        printed = [{**rec.to_json(), "run": str(run)} if several else rec.to_json()
                   for rec in records]
        # the result first (stdout, figures), then the record: a record that cannot be
        # written loses nothing that was measured (with several runs and --format json, the
        # one envelope of all of them comes after the last)
        if outputs.fmt is Format.json and not several:
            print_envelope("attack", printed)
        elif outputs.fmt is not Format.json:
            _render_attack(job.name, run, reports, loaded.weights)
        if outputs.save_images is not None:
            _save_attack_images(outputs.save_images, loaded.model, bundle, reports[-1],
                                attacked, job.name, dev, outputs.dpi)
        _write_exports(outputs, run, loaded, bundle, reports)
        if not outputs.keep_record:
            typer.echo("not recorded (--no-record)", err=True)
        elif access.recordable(run, bundle, loaded.weights):
            record_results(run, [(rec, report.indices) for rec, report in
                                 zip(records, reports, strict=True)], loaded.weights, bundle,
                           access.trust_code)
    return reports, printed


def _write_exports(outputs: _Outputs, run: Path, loaded: Any, bundle: Any,
                   reports: list[Any]) -> None:
    """``--export`` (CSVs, RobustBench JSON) and ``--save-adversarial`` (safetensors)."""
    export, save_adversarial = outputs.export, outputs.save_adversarial
    if export is not None:
        from pagctl.robustness.exports import write_exports

        written = write_exports(export, reports, name=loaded.spec.name,
                                dataset=bundle.name,
                                architecture=loaded.spec.model.arch,
                                class_names=_class_names(run),
                                eps_given=outputs.given.get("eps"), card=outputs.card)
        typer.echo(f"wrote {len(written)} files to {export}", err=True)
    if save_adversarial is not None:
        from pagctl.robustness.adversarial import numbered

        for i, report in enumerate(reports):
            path = numbered(save_adversarial, i, len(reports))
            assert report.adversarial is not None  # every point's were kept
            report.adversarial.save(path, {"attack": report.attack, "norm": str(report.norm),
                                           "eps": str(report.eps), "run": str(run)})
            typer.echo(f"wrote {path}", err=True)


def _exit_if_unreliable(reports: list[Any]) -> None:
    """``--strict``: exit code 3, with one line on stderr, when any report's reliability
    verdict is not 'reliable' (its reasons are in the result shown above)."""
    bad = [r for r in reports if not (r.reliability or {}).get("reliable", False)]
    if bad:
        fired = sum(len((r.reliability or {}).get("reasons", [])) for r in bad)
        where = ", ".join(f"eps {r.eps:.4g}" if r.eps is not None else "its budget"
                          for r in bad)
        typer.echo(f"strict: the reliability verdict is 'unreliable' at {where} ({fired} "
                   "probe finding(s), listed in the result); exit 3", err=True)
        raise typer.Exit(3)


def _plot_curves(plot: Path, attack_name: str, curves: list[tuple[Path, list[Any]]],
                 dpi: int) -> None:
    """``--plot``: robust accuracy against eps, one curve per run, at ``dpi``."""
    from pagctl.figures import robustness_curve

    first = curves[0][1][0]
    title = (f"{curves[0][0].name}: {attack_name}, n = {first.n}" if len(curves) == 1
             else f"{attack_name}, {len(curves)} runs, n = {first.n}")
    robustness_curve(plot, [{
        "label": f"{attack_name} on {run.name}", "eps": [r.eps for r in reports],
        "accuracy": [r.robust_accuracy for r in reports],
        "interval": [r.robust_interval for r in reports]} for run, reports in curves],
        norm=first.norm, title=title, dpi=dpi)


def _render_attack(name: str, run: Path, reports: list[Any], weights: str | None) -> None:
    """Summary on stdout: the result (per eps for a sweep), the stages, the verdict."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    first, last = reports[0], reports[-1]
    rows = [("params", json.dumps(last.params)), ("weights", str(weights)),
            ("n", f"{first.n} (subset {first.subset['indices_sha256']}, seed {first.seed})"),
            ("clean accuracy", f"{first.clean_accuracy:.4f}  95% CI "
             f"[{first.clean_interval[0]:.3f}, {first.clean_interval[1]:.3f}]")]
    if len(reports) == 1:
        lo, hi = first.robust_interval
        rows.append(("robust accuracy", f"{first.robust_accuracy:.4f}  95% CI [{lo:.3f}, "
                     f"{hi:.3f}]"))
    rows += [("max L0 (pixels) / L1 / L2 / Linf",
              f"{last.max_l0:.0f} / {last.max_l1:.4f} / {last.max_l2:.4f} / "
              f"{last.max_linf:.4f}"),
             ("pixel range, NaNs", f"[{last.pixel_min:.4g}, {last.pixel_max:.4g}], "
              f"{last.nan_count}"),
             ("passes fwd / bwd", f"{sum(r.forwards for r in reports)} / "
              f"{sum(r.backwards for r in reports)}"),
             ("seconds", f"{sum(r.seconds for r in reports):.1f}")]
    if first.precision != "float32":
        rows.insert(0, ("precision", f"{first.precision} autocast (opt-in, not float32)"))
    print_table(f"{name} on {run}", rows)
    if len(reports) > 1:
        sweep = Table(title=f"robust accuracy vs eps ({first.norm or 'budget'})")
        for col in ("eps", "robust", "95% CI"):
            sweep.add_column(col, justify="right")
        for r in reports:
            sweep.add_row(f"{r.eps:.4g}", f"{r.robust_accuracy:.4f}",
                          f"[{r.robust_interval[0]:.3f}, {r.robust_interval[1]:.3f}]")
        console.print(sweep)
    stages = Table(title="stages" + (f" at eps = {last.eps:.4g}" if len(reports) > 1 else ""))
    for col in ("stage", "attacked", "broke", "fwd", "bwd", "s"):
        stages.add_column(col, justify="right")
    for st in last.stages:
        stages.add_row(st.name, str(st.attacked), str(st.broke), str(st.forwards),
                       str(st.backwards), f"{st.seconds:.1f}")
    console.print(stages)
    per_class = last.per_class()
    if per_class:
        names = _class_names(run)
        classes = Table(title="per true class" + (f" at eps = {last.eps:.4g}"
                                                  if len(reports) > 1 else ""))
        for col in ("class", "n", "clean", "robust"):
            classes.add_column(col, justify="right")
        for label, c in per_class.items():
            name = names[int(label)] if int(label) < len(names) else label
            classes.add_row(name, str(c.n), f"{c.clean_correct / c.n:.3f}",
                            f"{c.robust_correct / c.n:.3f}")
        console.print(classes)
    rel = first.reliability
    if rel is not None:
        console.print(f"reliable: {'true' if rel['reliable'] else 'false'}")
        for reason in rel["reasons"]:
            console.print(f"  - {reason}", soft_wrap=True)


def _class_names(run: Path) -> list[str]:
    """The run's class names from config.json (label_names), or none."""
    try:
        cfg = json.loads((run / "config.json").read_text(encoding="utf-8"))
        names = cfg.get("pretrained_cfg", {}).get("label_names") or []
    except (OSError, ValueError, AttributeError):
        return []
    return [str(n) for n in names]


def _check_shard_options(shard: tuple[int, int] | None, merge: int | None, *,
                         state: Path | None, plot: Path | None, export: Path | None,
                         strict: bool, save_images: Path | None,
                         save_adversarial: Path | None) -> None:
    """What a shard or a merge cannot take, each refused with the way out."""
    if (shard is not None or merge is not None) and state is not None:
        raise SpecError("--state: shards keep their progress in RUN/shards/ themselves; "
                        "drop --state")
    if shard is not None:
        for flag, given in (("--plot", plot), ("--export", export), ("--strict", strict)):
            if given:
                raise SpecError(f"{flag}: applies to the whole result; give it with "
                                "--merge-shards")
    if (shard is not None or merge is not None) and (save_images or save_adversarial):
        flag = "--save-images" if save_images else "--save-adversarial"
        raise SpecError(f"{flag}: shards keep no images yet; attack unsharded to save them")


def _parse_sweep(text: str, params: Any) -> list[float]:
    """``--eps-sweep`` as budgets, checked as every evaluation's are
    (`pagctl.evaluation.sweep_budgets`)."""
    from pagctl.evaluation.request import sweep_budgets

    return sweep_budgets(params, [part.strip() for part in text.split(",")])


def _save_attack_images(path: Path, model: Any, bundle: Any, report: Any, indices: Any,
                        name: str, device: Any, dpi: int) -> None:
    import torch

    from pagctl.data import get_batch
    from pagctl.figures import adversarial_grid, class_grid
    from pagctl.models import eval_mode
    from pagctl.robustness.targeted import turn_toward_classes

    adv = report.images  # the first points of the attacked subset
    x, y = get_batch(bundle.test, indices[: len(adv)])
    with eval_mode(model), torch.no_grad():
        clean_pred = model(x.to(device)).argmax(1).cpu()
        adv_pred = model(adv.to(device)).argmax(1).cpu()
    adversarial_grid(path, x, adv, y, clean_pred, adv_pred,
                     title=f"{name}, eps = {report.eps:.4g} ({report.norm})"
                     if report.eps is not None else name, dpi=dpi)
    # The class grid is drawn with targeted PGD, which has L∞ and L2 steps; an L1 or
    # budget-free evaluation draws it in L2.
    same_norm = report.norm in ("l2", "linf")
    norm = report.norm if same_norm else "l2"
    eps = report.eps if report.eps and same_norm else 1.0
    big = max(eps, 2.0 if norm == "l2" else 16 / 255)
    turned = turn_toward_classes(model, x[:4].to(device), num_classes=bundle.num_classes,
                                 norm=norm, eps=big)
    class_grid(path.with_name(f"{path.stem}-classes{path.suffix}"), x[:4], turned.cpu(), y[:4],
               title=f"targeted PGD toward each class, {norm} eps = {big:.4g}", dpi=dpi)
