"""``pagctl align-score``: measure how well a run's input gradients align with a
target-gradient source."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from pagctl.cli.common import (
    DataDirOpt,
    DatasetOpt,
    DeviceOpt,
    Format,
    IndicesOpt,
    MergeShardsOpt,
    ProgressOpt,
    RecordOpt,
    RunAccess,
    ShardOpt,
    TrustCodeOpt,
    WeightsOpt,
    cell_text,
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


def align_score(
    runs: Annotated[list[Path], typer.Argument(
        help="Run folder(s) written by 'pagctl train' or 'pagctl import'; several (e.g. a "
        "grid's, runs/grid/*) are scored in turn, each recording its own result.",
        metavar="RUN...")],
    source_name: Annotated[str, typer.Option(
        "--source", "-s", help="Target-gradient source to compare against (pagctl plugins); "
        "any source, whatever the run was trained with.",
        autocompletion=complete_plugins("target_gradients"))] = "nearest_neighbor",
    param: Annotated[list[str], typer.Option(
        "--param", "-p", help="Source parameter KEY=VALUE; repeatable.")] = [],  # noqa: B006
    classes_per_image: Annotated[int | None, typer.Option(
        "--classes-per-image", "-k", min=1,
        help="K target classes sampled per image (default: the run's train K).")] = None,
    limit: Annotated[int | None, typer.Option(
        "--limit", min=1, help="Score the first N test images (of --indices if given).")] = None,
    indices_file: IndicesOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1,
                                            help="Images per batch.")] = 256,
    seed: Annotated[int, typer.Option(
        "--seed", min=0, max=2**32 - 1,
        help="Seed of the target-class draw and of the source.")] = 0,
    save_images: Annotated[Path | None, typer.Option(
        "--save-images", help="Write, for the first 4 images, the model's gradient toward "
        "every class and the source's target gradient to this PNG.")] = None,
    shard: ShardOpt = None,
    merge_shards: MergeShardsOpt = None,
    progress: ProgressOpt = True,
    keep_record: RecordOpt = True,
    weights: WeightsOpt = "last",
    trust_code: TrustCodeOpt = False,
    device: DeviceOpt = "auto",
    data_dir: DataDirOpt = None,
    dataset: DatasetOpt = None,
    fmt: Annotated[Format, typer.Option("--format", help=format_help("align-score"))] = \
        Format.table,
) -> None:
    """Score how well a run's input gradients align with a target-gradient source: mean
    cosine with a 95% interval, per true class and per target (true vs other classes), the
    fraction of images aligned above 0. Appended to the run's metrics.jsonl (unless
    --no-record). Long scores split into shards (--shard, --merge-shards) that merge into
    the unsharded result. Several runs are scored in turn, with the same options."""

    given = parse_params(param, "--param")
    params = plugin_params("target_gradients", source_name, given, "--source")
    check_figure("--save-images", save_images, ("png",))
    launch, shard_of = shard_request(shard, merge_shards)
    if shard_of is not None and launch is None and save_images is not None:
        raise SpecError("--save-images: applies to the whole result; give it with "
                        "--merge-shards")
    check_run_folders(runs, {"--save-images": save_images,
                             "--shard torchrun": launch is not None}, weights, trust_code)
    from pagctl.evaluation.request import EvaluationRequest

    request = EvaluationRequest(
        indices=read_indices(indices_file) if indices_file is not None else None,
        limit=limit, batch_size=batch_size, seed=seed, progress=progress,
        shard=None if launch is not None else shard_of, merge_shards=merge_shards)
    access = RunAccess(device, data_dir, weights, trust_code, launch, dataset)
    asked = _Asked(source_name, params, classes_per_image, given, save_images, keep_record,
                   fmt)
    printed: list[dict[str, Any]] = []
    try:
        for position, run in enumerate(runs):
            run_heading(position, runs)
            record = _score_run(run, asked, request, access, several=len(runs) > 1)
            if record is not None:
                printed.append(record)
    except BaseException:
        if fmt is Format.json and len(runs) > 1:
            print_collected("align-score", printed)
        raise
    if fmt is Format.json and len(runs) > 1 and printed:
        print_envelope("align-score", printed)


@dataclass(frozen=True)
class _Asked:
    """What ``pagctl align-score`` asks of every run: the source, its params (validated and
    as typed), K (None: each run's own), the figure, whether it records, the format."""

    source: str
    params: Any
    classes_per_image: int | None
    given: dict[str, Any]
    save_images: Path | None
    keep_record: bool
    fmt: Format


def _score_run(run: Path, asked: _Asked, request: EvaluationRequest, access: RunAccess, *,
               several: bool) -> dict[str, Any] | None:
    """Score one run folder (or its shard, or merge its shards), show the result (its JSON
    record is returned instead when ``several``), write the figure, record it. Returns the
    record as printed, or None for a shard or a follower rank."""
    from pagctl.align import AlignmentJob, alignment_source, evaluate_alignment
    from pagctl.checkpoint import SHARDS_DIR, RunLock, check_appendable, confined

    with RunLock(run, exclusive=False, command="align-score"):  # not while being trained
        if asked.keep_record:
            check_appendable(run)
        loaded, bundle, dev = access.open(run)
        k = asked.classes_per_image or min(loaded.spec.train.classes_per_image, bundle.num_classes)
        job = AlignmentJob(asked.source, asked.params, k)
        request = request.part(device=dev, shard_dir=confined(run, SHARDS_DIR))
        source = alignment_source(bundle, job, request)
        report = evaluate_run(
            lambda part: evaluate_alignment(loaded.model, bundle, job, part, source),
            request, run, access.launch)
        if report is None:
            return None
        record = report.to_record(asked.given)
        record.weights = loaded.weights
        printed = {**record.to_json(), "run": str(run)} if several else record.to_json()
        # the result first (stdout, figure), then the record: nothing measured is lost (with
        # several runs and --format json, the one envelope of all comes after the last)
        if asked.fmt is Format.json and not several:
            print_envelope("align-score", [printed])
        elif asked.fmt is not Format.json:
            _render(run, asked.source, asked.params, report, loaded.weights)
        if asked.save_images is not None:
            from pagctl.align import gradient_panels
            from pagctl.data import get_batch
            from pagctl.figures import gradient_grid

            assert report.indices is not None
            x, y = get_batch(bundle.test, report.indices[:4])
            grads, targets = gradient_panels(loaded.model, x.to(dev), y.to(dev), source,
                                             bundle.num_classes)
            gradient_grid(asked.save_images, x, y, grads.cpu(), targets.cpu(),
                          source=asked.source,
                          title=f"{run.name}: ∇ log p(t|x) vs {asked.source} (mean cos "
                          f"{report.mean:.3f})")
        if not asked.keep_record:
            typer.echo("not recorded (--no-record)", err=True)
        elif access.recordable(run, bundle, loaded.weights):
            record_results(run, [(record, report.indices)], loaded.weights, bundle,
                           access.trust_code)
    return printed


def _render(run: Path, source_name: str, params: Any, report: Any, weights: str) -> None:
    """The score as a table on stdout."""
    lo, hi = report.interval
    per_target = report.per_target
    rows = [("source", f"{source_name} {json.dumps(params.model_dump(mode='json'))}"),
            ("weights", weights),
            ("n, K", f"{report.n} images (subset {report.subset['indices_sha256']}), "
             f"K = {report.classes_per_image}"),
            ("mean cosine", f"{report.mean:.4f}  95% CI [{lo:.4f}, {hi:.4f}]"),
            ("aligned above 0", f"{report.fraction_positive:.3f} of images"),
            ("target = true class", cell_text(per_target.get("true"))),
            ("target = other class", cell_text(per_target.get("other"))),
            ("per true class", "  ".join(f"{c}: {v:.3f}"
                                         for c, v in report.per_true_class.items())),
            ("seconds", f"{report.seconds:.1f}")]
    print_table(f"alignment of {run}", rows)
