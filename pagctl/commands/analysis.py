"""``pagctl align-score`` and ``pagctl compare``: measure a run's gradient alignment, and
put runs side by side."""

from __future__ import annotations

import json
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from pagctl.cli_common import (
    DataDirOpt,
    DeviceOpt,
    Format,
    _complete_plugins,
    _fmt,
    _parse_params,
    _plugin_params,
    _print_json,
    _read_indices,
    _stdout_table,
)
from pagctl.errors import SpecError


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

    from pagctl import checkpoint, registry
    from pagctl.align import alignment_report
    from pagctl.attack import subset_record
    from pagctl.build import build_context, default_cache_dir, resolve_device
    from pagctl.data import load_data, select_test_indices

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
    indices = select_test_indices(len(bundle.test), indices, limit)  # type: ignore[arg-type]
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


class CompareFormat(str, Enum):
    table = "table"
    json = "json"
    csv = "csv"
    markdown = "markdown"


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
