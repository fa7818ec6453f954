"""The ``pagctl`` command line: parse, call one library function, render.

Results go to stdout (table or JSON); progress and logs go to stderr. User errors print one
line per problem and exit 2; runtime failures exit 1 (traceback with --verbose or
PAGCTL_VERBOSE=1); Ctrl-C exits 130. torch is imported inside commands only.
"""

from __future__ import annotations

import json
import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

try:  # typer >= 0.22 ships its own copy of click and raises its exceptions
    from typer._click.exceptions import ClickException, UsageError
except ImportError:  # older typer runs on click itself
    from click.exceptions import ClickException, UsageError  # type: ignore[assignment]

from pagctl import __version__
from pagctl.errors import PagctlError, SpecError

app = typer.Typer(
    name="pagctl",
    help="Train classifiers with perceptually aligned gradients (PAG) and measure their "
    "robustness. Docs: docs/index.md.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class Format(str, Enum):
    table = "table"
    json = "json"


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


def _print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _stdout_table(title: str, rows: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for k, v in rows:
        table.add_row(k, v)
    Console().print(table)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    return "-" if v is None else str(v)


def _parse_params(items: list[str], where: str) -> dict[str, Any]:
    import yaml

    params: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SpecError(f"{where}: '{item}' is not KEY=VALUE, e.g. {where} eps=0.5")
        try:
            params[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            params[key.strip()] = raw
    return params


# ---------------------------------------------------------------------------------------
# train

SetOpt = Annotated[list[str], typer.Option(
    "--set", help="Override a spec field, KEY=VALUE with a dotted key (value parsed as YAML); "
    "repeatable, e.g. --set train.epochs=5.")]
ScoreSetOpt = Annotated[list[str], typer.Option(
    "--set", help="Override a score spec field, KEY=VALUE with a dotted key (value parsed as "
    "YAML); repeatable, e.g. --set train.steps=2000.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
DataDirOpt = Annotated[Path | None, typer.Option(
    "--data-dir", help="Folder with the dataset files (sets data.root).")]


def _spec_and_overrides(command: str, spec: str, set_: list[str], *, data_dir: Path | None,
                        out: Path | None, extra: list[str] | None = None
                        ) -> tuple[str, list[str]]:
    """The spec to load and its overrides: ``--set`` values, then a run folder given as
    SPEC (its spec.json, resumed in place), ``--data-dir``, ``extra`` and ``--out``."""
    overrides = list(set_)
    if Path(spec).is_dir():
        if not (Path(spec) / "spec.json").is_file():
            raise SpecError(f"{command}: '{spec}' is a folder without spec.json; pass a spec "
                            "file")
        overrides.append(f"out_dir={spec}")
        spec = str(Path(spec) / "spec.json")
    if data_dir is not None:
        overrides.append(f"data.root={data_dir}")
    overrides += extra or []
    if out is not None:
        overrides.append(f"out_dir={out}")
    return spec, overrides


@app.command()
def train(
    spec: Annotated[str | None, typer.Argument(
        help="Spec file (YAML/JSON), built-in spec name, or a run folder to resume.")] = None,
    set_: SetOpt = [],  # noqa: B006 - typer needs a literal default
    data_dir: DataDirOpt = None,
    download: Annotated[bool, typer.Option(
        "--download", help="Let torchvision download the dataset into --data-dir.")] = False,
    out: Annotated[Path | None, typer.Option("--out", help="Run folder (sets out_dir).")] = None,
    device: DeviceOpt = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run.")] =
    False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run "
                                            "folder.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate spec, data, model and "
                                          "plugin params; train nothing.")] = False,
    list_: Annotated[bool, typer.Option("--list", help="List the built-in specs.")] = False,
    schema: Annotated[bool, typer.Option("--schema", help="Print the spec's JSON schema.")] =
    False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    fmt: Annotated[Format, typer.Option("--format", help="Final summary format.")] =
    Format.table,
) -> None:
    """Train a model from a spec; writes a run folder (weights, spec, metrics)."""
    from pagctl import spec as specmod

    if list_:
        for name in specmod.builtin_spec_names():
            desc = specmod.load_spec(name).description
            typer.echo(f"{name:24s} {desc}")
        return
    if schema:
        _print_json(specmod.RunSpec.model_json_schema())
        return
    if spec is None:
        raise SpecError("train: give a spec file or built-in name (pagctl train --list)")
    spec, overrides = _spec_and_overrides(
        "train", spec, set_, data_dir=data_dir, out=out,
        extra=["data.download=true"] if download else [])
    run_spec = specmod.load_spec(spec, overrides)
    from pagctl.build import resolve_device, setup
    from pagctl.train import train as run_train

    if dry_run:
        s = setup(run_spec, resolve_device(device), build_plugins=False)
        _stdout_table(f"dry run: {run_spec.name} (valid)", [
            ("run folder", str(run_spec.run_dir)), ("dataset", s.bundle.name),
            ("train / test", f"{len(s.bundle.train)} / {len(s.bundle.test)}"),  # type: ignore
            ("classes", str(s.bundle.num_classes)), ("input", str(s.bundle.input_shape)),
            ("arch", run_spec.model.arch),
            ("parameters", f"{sum(p.numel() for p in s.model.parameters()):,}"),
            ("source", run_spec.target_gradients.name),
            ("lambda / K", f"{run_spec.train.pag_weight} / {run_spec.train.classes_per_image}"),
        ])
        return
    from pagctl.progress import stderr_console

    result = run_train(run_spec, device=device, resume=resume, overwrite=overwrite,
                       progress=not quiet,
                       log=lambda m: stderr_console.print(m, soft_wrap=True))
    if result.interrupted:
        stderr_console.print(f"interrupted after epoch {result.epochs_done}; state saved. "
                             f"Continue with: pagctl train {result.run_dir} --resume",
                             soft_wrap=True)
        raise typer.Exit(130)
    summary = {"run_dir": str(result.run_dir), **result.last}
    if fmt is Format.json:
        _print_json(summary)
        return
    keys = ("run_dir", "epoch", "loss", "ce", "pag", "train_accuracy", "clean_accuracy",
            "robust_accuracy", "alignment", "n_test", "train_seconds")
    rows = [(k, _fmt(summary[k])) for k in keys if summary.get(k) is not None]
    if "monitor" in summary:
        rows.append(("monitor", json.dumps(summary["monitor"])))
    _stdout_table(f"trained {run_spec.name}", rows)


@app.command("train-score")
def train_score(
    spec: Annotated[str | None, typer.Argument(
        help="Score spec file (YAML/JSON), built-in name (--list), or a score run folder to "
        "resume.")] = None,
    set_: ScoreSetOpt = [],  # noqa: B006 - typer needs a literal default
    data_dir: DataDirOpt = None,
    out: Annotated[Path | None, typer.Option("--out", help="Run folder (sets out_dir).")] = None,
    device: DeviceOpt = "auto",
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted run.")] =
    False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing run "
                                            "folder.")] = False,
    list_: Annotated[bool, typer.Option("--list", help="List the built-in score specs.")] =
    False,
    schema: Annotated[bool, typer.Option("--schema", help="Print the score spec's JSON "
                                         "schema.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    fmt: Annotated[Format, typer.Option("--format", help="Final summary format.")] =
    Format.table,
) -> None:
    """Train a class-conditional score model (denoising score matching over a range of noise
    levels) for the 'sbg' target-gradient source; writes a run folder with samples.png."""
    from pagctl import score as scoremod

    if list_:
        for name in scoremod.builtin_score_spec_names():
            desc = scoremod.load_score_spec(name).description
            typer.echo(f"{name:24s} {desc}")
        return
    if schema:
        _print_json(scoremod.ScoreSpec.model_json_schema())
        return
    if spec is None:
        raise SpecError("train-score: give a score spec file or built-in name "
                        "(pagctl train-score --list)")
    spec, overrides = _spec_and_overrides("train-score", spec, set_, data_dir=data_dir,
                                          out=out)
    score_spec = scoremod.load_score_spec(spec, overrides)
    from pagctl.progress import stderr_console

    result = scoremod.train_score(score_spec, device=device, progress=not quiet,
                                  resume=resume, overwrite=overwrite,
                                  log=lambda m: stderr_console.print(m, soft_wrap=True))
    if result.interrupted:
        stderr_console.print(f"interrupted after step {result.steps_done}; state saved. "
                             f"Continue with: pagctl train-score {result.run_dir} --resume",
                             soft_wrap=True)
        raise typer.Exit(130)
    summary = {"run_dir": str(result.run_dir), "steps": result.steps_done,
               "samples": str(result.samples) if result.samples else None, **result.last}
    if fmt is Format.json:
        _print_json(summary)
        return
    _stdout_table(f"trained score model {score_spec.name}",
                  [(k, _fmt(v)) for k, v in summary.items()])


# ---------------------------------------------------------------------------------------
# attack


@app.command()
def attack(
    run: Annotated[Path, typer.Argument(help="Run folder written by 'pagctl train'.")],
    attack_name: Annotated[str, typer.Option(
        "--attack", "-a", help="Attack plugin name (pagctl plugins).",
        autocompletion=_complete_plugins("attacks"))] = "pgd_l2",
    param: Annotated[list[str], typer.Option(
        "--param", "-p", help="Attack parameter KEY=VALUE; repeatable (eps=8/255).")] = [],  # noqa: B006
    limit: Annotated[int | None, typer.Option(
        "--limit", min=1, help="Attack the first N test images (of --indices if given).")] = None,
    indices_file: Annotated[Path | None, typer.Option(
        "--indices", help="File of test-set indices to attack: integers separated by "
        "spaces, commas or newlines, or a JSON list.")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1,
                                            help="Images per attack batch.")] = 256,
    seed: Annotated[int, typer.Option("--seed", help="Seed for the attack's randomness.")] = 0,
    eps_sweep: Annotated[str | None, typer.Option(
        "--eps-sweep", help="Comma-separated budgets to attack at in turn, e.g. "
        "0.25,0.5,1,2 or 2/255,4/255,8/255 (replaces the eps parameter).")] = None,
    plot: Annotated[Path | None, typer.Option(
        "--plot", help="Write robust accuracy vs eps to this PNG (needs --eps-sweep).")] = None,
    save_images: Annotated[Path | None, typer.Option(
        "--save-images", help="Write clean | adversarial | perturbation for the first 8 "
        "points to this PNG, and the first 4 images turned toward each class to "
        "<name>-classes.png.")] = None,
    state: Annotated[Path | None, typer.Option(
        "--state", help="Progress file: written after every batch, read to resume an "
        "interrupted run (one file per eps with --eps-sweep).")] = None,
    probes: Annotated[bool, typer.Option(
        "--probes/--no-probes", help="Run the gradient-masking probes and give a "
        "reliability verdict.")] = True,
    probe_size: Annotated[int, typer.Option(
        "--probe-size", min=1, help="Test points the probes use.")] = 100,
    progress: Annotated[bool, typer.Option(
        "--progress/--no-progress", help="Progress bar with ETA on stderr.")] = True,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.table,
) -> None:
    """Attack a trained run on its test set: clean and robust accuracy with 95% intervals,
    what each stage broke and cost, and a reliability verdict from gradient-masking probes.
    Each result is appended to the run's metrics.jsonl."""
    from pagctl import checkpoint
    from pagctl.build import resolve_device
    from pagctl.data import load_data
    from pagctl.evaluation import evaluate_attack

    given = _parse_params(param, "--param")
    params = _attack_params(attack_name, given)
    budgets = _parse_sweep(eps_sweep, params) if eps_sweep is not None else None
    if plot is not None and budgets is None:
        raise SpecError("--plot: draws robust accuracy against eps; add --eps-sweep "
                        "(e.g. --eps-sweep 0.25,0.5,1)")
    for option, path in (("--plot", plot), ("--save-images", save_images)):
        if path is not None and path.suffix.lower() != ".png":
            raise SpecError(f"{option}: writes a PNG; give a file name ending in .png")
    if (plot or save_images) is not None:
        from pagctl.figures import _pyplot

        _pyplot("--plot" if plot is not None else "--save-images")
    indices = _read_indices(indices_file) if indices_file is not None else None
    dev = resolve_device(device)
    loaded = checkpoint.load_run(run, dev)
    data_spec = loaded.spec.data
    if data_dir is not None:
        data_spec = data_spec.model_copy(update={"root": data_dir})
    bundle = load_data(data_spec)
    try:
        reports, attacked = evaluate_attack(
            loaded.model, bundle, attack_name, params, budgets, indices=indices, limit=limit,
            batch_size=batch_size, seed=seed, device=dev, state=state, probes=probes,
            probe_size=probe_size, progress=progress,
            keep_images=8 if save_images is not None else 0)
    except KeyboardInterrupt:
        if state is None:
            raise
        from pagctl.progress import stderr_console

        stderr_console.print(f"interrupted: progress is in {state}; run the same command "
                             "again to resume", soft_wrap=True)
        raise typer.Exit(130) from None
    records = []
    for report in reports:
        record = {**report.to_record(), "params_given": given}  # e.g. eps "8/255" as typed
        checkpoint.append_metrics(run, record)
        records.append(record)
    if plot is not None:
        from pagctl.figures import robustness_curve

        robustness_curve(plot, [{
            "label": f"{attack_name} on {run.name}", "eps": [r.eps for r in reports],
            "accuracy": [r.robust_accuracy for r in reports],
            "interval": [r.robust_interval for r in reports]}],
            norm=reports[0].norm, title=f"{run.name}: {attack_name}, n = {reports[0].n}")
    if save_images is not None:
        _save_attack_images(save_images, loaded.model, bundle, reports[-1], attacked,
                            attack_name, dev)
    if fmt is Format.json:
        _print_json(records[0] if budgets is None else records)
        return
    _render_attack(attack_name, run, reports)


def _render_attack(name: str, run: Path, reports: list[Any]) -> None:
    """Summary on stdout: the result (per eps for a sweep), the stages, the verdict."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    first, last = reports[0], reports[-1]
    rows = [("params", json.dumps(last.params)),
            ("n", f"{first.n} (subset {first.subset['indices_sha256']}, seed {first.seed})"),
            ("clean accuracy", f"{first.clean_accuracy:.4f}  95% CI "
             f"[{first.clean_interval[0]:.3f}, {first.clean_interval[1]:.3f}]")]
    if len(reports) == 1:
        lo, hi = first.robust_interval
        rows.append(("robust accuracy", f"{first.robust_accuracy:.4f}  95% CI [{lo:.3f}, "
                     f"{hi:.3f}]"))
    rows += [("max L2 / Linf", f"{last.max_l2:.4f} / {last.max_linf:.4f}"),
             ("pixel range, NaNs", f"[{last.pixel_min:.4g}, {last.pixel_max:.4g}], "
              f"{last.nan_count}"),
             ("passes fwd / bwd", f"{sum(r.forwards for r in reports)} / "
              f"{sum(r.backwards for r in reports)}"),
             ("seconds", f"{sum(r.seconds for r in reports):.1f}")]
    _stdout_table(f"{name} on {run}", rows)
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
    rel = first.reliability
    if rel is not None:
        console.print(f"reliable: {'true' if rel['reliable'] else 'false'}")
        for reason in rel["reasons"]:
            console.print(f"  - {reason}", soft_wrap=True)


def _parse_sweep(text: str, params: Any) -> list[float]:
    from pydantic import ValidationError

    if "eps" not in type(params).model_fields:
        raise SpecError("--eps-sweep: this attack has no eps parameter to sweep")
    values: list[float] = []
    for part in (p.strip() for p in text.split(",")):
        try:
            values.append(type(params).model_validate(
                {**params.model_dump(), "eps": part}).eps)
        except ValidationError:
            raise SpecError(f"--eps-sweep: {part!r} is not a valid eps for this attack; "
                            "give numbers >= 0 or fractions such as 8/255, separated by "
                            "commas") from None
    if len(set(values)) != len(values):
        raise SpecError("--eps-sweep: a budget appears twice; list each once")
    return values


def _read_indices(path: Path) -> Any:
    import re

    import torch

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"--indices {path}: cannot read it ({exc.__class__.__name__}); give "
                        "a text file of integers") from None
    try:
        values = (json.loads(text) if text.lstrip().startswith("[")
                  else [int(v) for v in re.split(r"[\s,]+", text.strip()) if v])
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise ValueError
    except ValueError:
        raise SpecError(f"--indices {path}: expected integers separated by spaces, commas or "
                        "newlines, or a JSON list of integers") from None
    if not values:
        raise SpecError(f"--indices {path}: the file lists no index")
    seen: set[int] = set()
    for v in values:
        if v in seen:
            raise SpecError(f"--indices {path}: index {v} appears twice; list each once")
        seen.add(v)
    return torch.tensor(values, dtype=torch.int64)


def _save_attack_images(path: Path, model: Any, bundle: Any, report: Any, indices: Any,
                        name: str, device: Any) -> None:
    import torch

    from pagctl.attack import eval_mode
    from pagctl.data import get_batch
    from pagctl.figures import adversarial_grid, class_grid, turn_toward_classes

    adv = report.images  # the first points of the attacked subset
    x, y = get_batch(bundle.test, indices[: len(adv)])
    with eval_mode(model), torch.no_grad():
        clean_pred = model(x.to(device)).argmax(1).cpu()
        adv_pred = model(adv.to(device)).argmax(1).cpu()
    adversarial_grid(path, x, adv, y, clean_pred, adv_pred,
                     title=f"{name}, eps = {report.eps:.4g} ({report.norm})"
                     if report.eps is not None else name)
    norm = report.norm if report.norm in ("l2", "linf") else "l2"
    eps = report.eps if report.eps else 1.0
    big = max(eps, 2.0 if norm == "l2" else 16 / 255)
    turned = turn_toward_classes(model, x[:4].to(device), num_classes=bundle.num_classes,
                                 norm=norm, eps=big)
    class_grid(path.with_name(f"{path.stem}-classes{path.suffix}"), x[:4], turned.cpu(), y[:4],
               title=f"targeted PGD toward each class, {norm} eps = {big:.4g}")
def _attack_params(name: str, given: dict[str, Any]) -> Any:
    """Validate ``--attack``/``--param`` against the attack's Params."""
    return _plugin_params("attacks", name, given, "--attack")


def _plugin_params(group: str, name: str, given: dict[str, Any], option: str) -> Any:
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
        lines = format_validation_error(exc).splitlines()
        raise SpecError("\n".join(f"--param {line}" for line in lines)) from None


# ---------------------------------------------------------------------------------------
# bank


class BankDtype(str, Enum):
    float16 = "float16"
    float32 = "float32"


@app.command()
def bank(
    source_name: Annotated[str, typer.Argument(
        help="Target-gradient source to precompute (pagctl plugins).",
        autocompletion=_complete_plugins("target_gradients"))],
    spec: Annotated[str, typer.Option(
        "--spec", help="Run spec (file or built-in name) whose training data the bank is "
        "for.")],
    out: Annotated[Path, typer.Option("--out", help="Bank file to write (.safetensors).")],
    param: Annotated[list[str], typer.Option(
        "--param", "-p", help="Source parameter KEY=VALUE; repeatable. When SOURCE is the "
        "spec's own target_gradients source, its params there are the starting point.")] = [],  # noqa: B006,E501
    set_: SetOpt = [],  # noqa: B006 - typer needs a literal default
    dtype: Annotated[BankDtype, typer.Option("--dtype", help="Storage dtype.")] =
    BankDtype.float16,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1,
                                            help="Images per source call.")] = 256,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted bank "
                                         "(finished chunks are kept).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing "
                                            "bank.")] = False,
    seed: Annotated[int | None, typer.Option(
        "--seed", help="Seed passed to the source (default: the spec's train.seed, as in "
        "training).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
    fmt: Annotated[Format, typer.Option("--format", help="Summary format.")] = Format.table,
) -> None:
    """Precompute a source's target gradients for every training image and class into a
    safetensors bank, served during training by the 'precomputed' source (docs/banks.md)."""
    from pagctl import registry
    from pagctl import spec as specmod
    from pagctl.banks import write_bank
    from pagctl.build import build_context, default_cache_dir, resolve_device
    from pagctl.data import load_data

    given = _parse_params(param, "--param")
    if out.suffix != ".safetensors":
        raise SpecError("--out: a bank is a .safetensors file; give a name ending in "
                        ".safetensors")
    overrides = list(set_) + ([f"data.root={data_dir}"] if data_dir is not None else [])
    run_spec = specmod.load_spec(spec, overrides)
    if run_spec.target_gradients.name == source_name:
        # the bank stands in for the spec's own source: start from its parameters
        given = {**run_spec.target_gradients.params, **given}
    params = _plugin_params("target_gradients", source_name, given, "SOURCE")
    dev = resolve_device(device)
    bundle = load_data(run_spec.data)
    ctx = build_context(bundle, dev, run_spec.train.seed if seed is None else seed,
                        default_cache_dir())
    source = registry.target_gradients.instantiate(source_name, params, ctx, "SOURCE")
    info = write_bank(source, bundle.train, out, num_classes=bundle.num_classes,
                      batch_size=batch_size, dtype=dtype.value, device=dev,
                      progress=not quiet, resume=resume, overwrite=overwrite,
                      source_name=source_name, source_params=params.model_dump(mode="json"),
                      data_fingerprint=bundle.fingerprint)
    record = info.to_record()
    if fmt is Format.json:
        _print_json(record)
        return
    _stdout_table(f"bank {out}", [(k, _fmt(v) if not isinstance(v, (dict, list))
                                   else json.dumps(v)) for k, v in record.items()])


# ---------------------------------------------------------------------------------------
# align-score


@app.command("align-score")
def align_score(
    run: Annotated[Path, typer.Argument(help="Run folder written by 'pagctl train'.")],
    source_name: Annotated[str, typer.Option(
        "--source", "-s", help="Target-gradient source to compare against (pagctl plugins); "
        "any source, whatever the run was trained with.",
        autocompletion=_complete_plugins("target_gradients"))] = "nearest_neighbor",
    param: Annotated[list[str], typer.Option(
        "--param", "-p", help="Source parameter KEY=VALUE; repeatable.")] = [],  # noqa: B006
    classes_per_image: Annotated[int | None, typer.Option(
        "--classes-per-image", "-k", min=1,
        help="K target classes sampled per image (default: the run's train K).")] = None,
    limit: Annotated[int | None, typer.Option(
        "--limit", min=1, help="Score the first N test images (of --indices if given).")] = None,
    indices_file: Annotated[Path | None, typer.Option(
        "--indices", help="File of test-set indices (as for pagctl attack).")] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1,
                                            help="Images per batch.")] = 256,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the target-class draw and of "
                                      "the source.")] = 0,
    save_images: Annotated[Path | None, typer.Option(
        "--save-images", help="Write, for the first 4 images, the model's gradient toward "
        "every class and the source's target gradient to this PNG.")] = None,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.table,
) -> None:
    """Score how well a run's input gradients align with a target-gradient source: mean
    cosine with a 95% interval, per true class and per target (true vs other classes), the
    fraction of images aligned above 0. Appended to the run's metrics.jsonl."""
    import torch

    from pagctl import checkpoint, registry
    from pagctl.align import alignment_report
    from pagctl.attack import subset_record
    from pagctl.build import build_context, default_cache_dir, resolve_device
    from pagctl.data import load_data

    given = _parse_params(param, "--param")
    params = _plugin_params("target_gradients", source_name, given, "--source")
    if save_images is not None:
        if save_images.suffix.lower() != ".png":
            raise SpecError("--save-images: writes a PNG; give a file name ending in .png")
        from pagctl.figures import _pyplot

        _pyplot("--save-images")
    indices = _read_indices(indices_file) if indices_file is not None else None
    dev = resolve_device(device)
    loaded = checkpoint.load_run(run, dev)
    data_spec = loaded.spec.data
    if data_dir is not None:
        data_spec = data_spec.model_copy(update={"root": data_dir})
    bundle = load_data(data_spec)
    k = classes_per_image or min(loaded.spec.train.classes_per_image, bundle.num_classes)
    if k > bundle.num_classes:
        raise SpecError(f"--classes-per-image: {k} is more than the {bundle.num_classes} "
                        "classes of the data")
    n_test = len(bundle.test)  # type: ignore[arg-type]
    if indices is None:
        indices = torch.arange(n_test)
    elif int(indices.min()) < 0 or int(indices.max()) >= n_test:
        bad = int(indices[(indices < 0) | (indices >= n_test)][0])
        raise SpecError(f"--indices: index {bad} is outside the test set (0..{n_test - 1})")
    if limit is not None:
        indices = indices[:limit]
    ctx = build_context(bundle, dev, seed, default_cache_dir())
    source = registry.target_gradients.instantiate(source_name, params, ctx, "--source")
    report = alignment_report(loaded.model, bundle.test, indices, source,
                              num_classes=bundle.num_classes, classes_per_image=k,
                              batch_size=batch_size, device=dev, seed=seed)
    record: dict[str, Any] = {"kind": "align", "source": source_name,
              "source_params": params.model_dump(mode="json"), "params_given": given,
              "n": report.n, "classes_per_image": k, "mean": report.mean,
              "interval": list(report.interval), "fraction_positive": report.fraction_positive,
              "per_true_class": report.per_true_class, "per_target": report.per_target,
              "subset": subset_record(indices), "seed": seed, "seconds": report.seconds}
    if save_images is not None:
        from pagctl.align import gradient_panels
        from pagctl.data import get_batch
        from pagctl.figures import gradient_grid

        x, y = get_batch(bundle.test, indices[:4])
        grads, targets = gradient_panels(loaded.model, x.to(dev), y.to(dev), source,
                                         bundle.num_classes)
        gradient_grid(save_images, x, y, grads.cpu(), targets.cpu(), source=source_name,
                      title=f"{run.name}: ∇ log p(t|x) vs {source_name} (mean cos "
                      f"{report.mean:.3f})")
    checkpoint.append_metrics(run, record)
    if fmt is Format.json:
        _print_json(record)
        return
    lo, hi = report.interval
    per_target = report.per_target
    rows = [("source", f"{source_name} {json.dumps(params.model_dump(mode='json'))}"),
            ("n, K", f"{report.n} images (subset {record['subset']['indices_sha256']}), "
             f"K = {k}"),
            ("mean cosine", f"{report.mean:.4f}  95% CI [{lo:.4f}, {hi:.4f}]"),
            ("aligned above 0", f"{report.fraction_positive:.3f} of images"),
            ("target = true class", _fmt(per_target.get("true"))),
            ("target = other class", _fmt(per_target.get("other"))),
            ("per true class", "  ".join(f"{c}: {v:.3f}"
                                         for c, v in report.per_true_class.items())),
            ("seconds", f"{report.seconds:.1f}")]
    _stdout_table(f"alignment of {run}", rows)


# ---------------------------------------------------------------------------------------
# compare, plugins


class CompareFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"
    markdown = "markdown"


@app.command()
def compare(
    runs: Annotated[list[Path], typer.Argument(help="Run folders.")],
    fmt: Annotated[CompareFormat, typer.Option(
        "--format", help="Output format.")] = CompareFormat.table,
    plot: Annotated[Path | None, typer.Option(
        "--plot", help="Write a PNG: robust accuracy vs eps per run, and alignment vs robust "
        "accuracy with Pearson's r.")] = None,
    force: Annotated[bool, typer.Option(
        "--force", help="Put side by side numbers measured on different subsets, eps or "
        "norms (marked in the output).")] = False,
) -> None:
    """Put runs side by side: spec differences and latest metrics (clean, robust per attack
    and eps, alignment) with n and 95% intervals, and per-example pair tests (reads no
    weights)."""
    from pagctl.compare import compare_runs, render
    from pagctl.compare import plot as plot_comparison

    if plot is not None and plot.suffix.lower() != ".png":
        raise SpecError("--plot: writes a PNG; give a file name ending in .png")
    comparison = compare_runs(runs, force=force)
    for line in comparison.warnings:
        typer.echo(line, err=True)
    if plot is not None:
        plot_comparison(comparison, plot)
    sys.stdout.write(render(comparison, fmt.value))
    if plot is not None:
        typer.echo(f"wrote {plot}", err=True)


def _complete_plugins(group: str | None) -> Any:
    """Shell completion of plugin names (built-ins and installed entry points)."""

    def complete(incomplete: str) -> list[str]:
        from pagctl.registry import REGISTRIES

        regs = [REGISTRIES[group]] if group else list(REGISTRIES.values())
        names = sorted({n for reg in regs for n in reg.names()})
        return [n for n in names if n.startswith(incomplete)]

    return complete


@app.command()
def plugins(
    name: Annotated[str | None, typer.Argument(
        help="Show this plugin's parameters (schema, defaults, descriptions).",
        autocompletion=_complete_plugins(None))] = None,
    fmt: Annotated[Format, typer.Option("--format", help="Output format.")] = Format.table,
) -> None:
    """List target-gradient sources and attacks: name, kind, distribution and version,
    status (ok, broken with its error, conflict) and what each does; with NAME, its
    parameters."""
    from dataclasses import asdict

    from pagctl.registry import REGISTRIES

    if name is not None:
        _plugin_detail(name, fmt)
        return
    rows = [info for reg in REGISTRIES.values() for info in reg.info()]
    if fmt is Format.json:
        _print_json([asdict(r) for r in rows])
        return
    kind = {"pagctl.target_gradients": "source", "pagctl.attacks": "attack"}
    header = ("kind", "name", "distribution", "version", "status", "description")
    cells = [(kind.get(r.group, r.group), r.name, r.distribution, r.version, r.status,
              r.summary) for r in rows]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(5)]
    for c in [header, *cells]:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(c[:5], widths, strict=True)) + "  " +
                   c[5])
    for r in rows:
        if r.error:
            typer.echo(f"{r.name} ({r.status}): {r.error}")


def _plugin_detail(name: str, fmt: Format) -> None:
    """``pagctl plugins NAME``: every group's plugin of that name, with its Params."""
    from pagctl.errors import UnknownPluginError
    from pagctl.registry import REGISTRIES

    found = []
    for reg in REGISTRIES.values():
        if name in reg.names():
            factory = reg.get(name)
            doc = (factory.__doc__ or "").strip()
            schema = factory.Params.model_json_schema()
            found.append({"name": name, "group": reg.group, "provided_by": reg.origin(name),
                          "doc": doc, "params": schema})
    if not found:
        names = sorted({n for reg in REGISTRIES.values() for n in reg.names()})
        from difflib import get_close_matches

        close = get_close_matches(name, names, n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise UnknownPluginError(f"NAME: no plugin named '{name}'.{hint} Run 'pagctl plugins' "
                                 "to list them.")
    if fmt is Format.json:
        _print_json(found[0] if len(found) == 1 else found)
        return
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for item in found:
        kind = "attack" if item["group"] == "pagctl.attacks" else "target-gradient source"
        console.print(f"[bold]{name}[/bold]: {kind} ({item['provided_by']}), group "
                      f"{item['group']}", soft_wrap=True)
        if item["doc"]:
            console.print(item["doc"], soft_wrap=True, markup=False)
        table = Table(title="parameters (--param KEY=VALUE, or the spec's params)")
        for col in ("name", "type", "default", "description"):
            table.add_column(col)
        props = item["params"].get("properties", {})
        required = set(item["params"].get("required", []))
        for key, prop in props.items():
            default = "required" if key in required else json.dumps(prop.get("default"))
            table.add_row(key, _schema_type(prop), default, prop.get("description", ""))
        if not props:
            console.print("no parameters")
        else:
            console.print(table)


def _schema_type(prop: dict[str, Any]) -> str:
    """A short type name from a JSON-schema property."""
    if "enum" in prop:
        return " | ".join(json.dumps(v) for v in prop["enum"])
    if "const" in prop:
        return json.dumps(prop["const"])
    if "anyOf" in prop:
        return " | ".join(_schema_type(p) for p in prop["anyOf"])
    kind = prop.get("type", "any")
    return str(kind)


# ---------------------------------------------------------------------------------------
# entry point and error mapping


def main(argv: list[str] | None = None) -> None:
    """Console entry point: maps errors to exit codes (2 user, 1 runtime, 130 Ctrl-C)."""
    verbose = os.environ.get("PAGCTL_VERBOSE") == "1" or any(
        a in ("--verbose", "-v") for a in (argv if argv is not None else sys.argv[1:]))
    try:
        code = app(args=argv, prog_name="pagctl", standalone_mode=False)
    except PagctlError as exc:
        for line in str(exc).splitlines() or [type(exc).__name__]:
            sys.stderr.write(f"error: {line}\n")
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except UsageError as exc:  # bad option or argument: one line, with where to find help
        msg = exc.format_message().strip()
        if msg:  # empty when no_args_is_help has already printed the help
            where = exc.ctx.command_path if exc.ctx is not None else "pagctl"
            first = msg.splitlines()[0]
            sys.stderr.write(f"error: {first} (see '{where} --help')\n")
        sys.exit(2)
    except ClickException as exc:
        sys.stderr.write(f"error: {exc.format_message()}\n")
        sys.exit(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    except Exception as exc:  # runtime failure: one line unless verbose
        if verbose:
            raise
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        sys.stderr.write(f"error: {type(exc).__name__}: {msg} (rerun with --verbose for the "
                         "traceback)\n")
        sys.exit(1)
    # standalone_mode=False returns typer.Exit's code (e.g. 130 after an interrupted train)
    if isinstance(code, int) and code:
        sys.exit(code)
