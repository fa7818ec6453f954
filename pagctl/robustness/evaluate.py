"""One evaluation as ``pagctl attack`` runs it: pick the subset, probe the model, run the
attack (once or over an ε-sweep) with the engine (`pagctl.robustness.engine`) and attach
the reliability verdict (`pagctl.robustness.reliability`) to every report.

A long evaluation can be split into N shards run as independent jobs (``shard=(i, N)``),
each attacking every N-th batch and keeping its progress in a shard file named by the
evaluation's key; ``merge_shards=N`` then combines the N finished shards into the report of
the unsharded run — the same per-point results and counts — and runs the probes on it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagctl.distributed.shards import shard_files
from pagctl.errors import CheckpointError, FieldError, SpecError

if TYPE_CHECKING:
    import torch
    from pydantic import BaseModel
    from torch import Tensor, nn

    from pagctl.data import DataBundle
    from pagctl.robustness.report import AttackReport


def evaluate_attack(
    model: nn.Module,
    bundle: DataBundle,
    name: str,
    params: BaseModel,
    budgets: Sequence[Any] | None = None,
    *,
    indices: Tensor | None = None,
    limit: int | None = None,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str = "cpu",
    state: Path | None = None,
    probes: bool = True,
    probe_size: int = 100,
    progress: bool = False,
    keep_images: int = 0,
    shard: tuple[int, int] | None = None,
    merge_shards: int | None = None,
    shard_dir: Path | None = None,
    precision: str = "float32",
) -> tuple[list[AttackReport], Tensor]:
    """Attack ``bundle.test[indices]`` (first ``limit``) with the registered attack ``name``
    (once, or at each budget of ``budgets``) and attach the reliability verdict.

    ``shard=(i, N)`` runs shard i of N into ``shard_dir`` (resuming it if it stopped) and
    returns its partial reports, without probes' verdict; ``merge_shards=N`` runs nothing
    but merges the N shards found in ``shard_dir`` (module docstring). Neither keeps images.
    ``precision="bfloat16"`` runs the model's forward under bfloat16 autocast
    (`pagctl.models.LowPrecision`; opt-in, marked in every report; its resumable states and
    shards are another evaluation's than float32's, as the precision is part of their
    key). Returns the reports (one per budget) and the attacked indices. Raises a
    `FieldError` for what `pagctl.evaluation` refuses (limit, batch size, seed, indices,
    budgets, shards, a model whose outputs do not fit the data), SpecError when AutoAttack
    standard/plus meets a randomised model or a shard to merge is missing or unfinished.
    """
    import torch

    from pagctl import registry
    from pagctl.build import build_context
    from pagctl.data import get_batch, labels_of, subset_digest
    from pagctl.evaluation import (
        check_outputs,
        check_settings,
        check_shards,
        evaluation_points,
        sweep_budgets,
    )
    from pagctl.models import PRECISIONS, LowPrecision
    from pagctl.protocols import attack_stages, declared_budget
    from pagctl.provenance import model_digest
    from pagctl.robustness.engine import PerBatch, evaluation_key, run_attack
    from pagctl.robustness.reliability import (
        attack_probes,
        quick_probes,
        square_stage_check,
        sweep_check,
    )

    if (shard is not None or merge_shards is not None) and shard_dir is None:
        raise ValueError("shard and merge_shards need shard_dir")
    if shard is not None and merge_shards is not None:
        raise FieldError("merge_shards", "run one shard, or merge them all; not both")
    check_settings(batch_size=batch_size, seed=seed, probe_size=probe_size)
    if precision not in PRECISIONS:
        raise FieldError("precision", f"{precision!r} is not one of {', '.join(PRECISIONS)}")
    if budgets is not None:
        budgets = sweep_budgets(params, budgets)
    indices = evaluation_points(len(bundle.test), indices, limit)  # type: ignore[arg-type]
    check_shards(len(indices), batch_size, shard, merge_shards)
    check_outputs(model, bundle, device)
    measured = model_digest(model)  # the model itself, whatever precision runs it
    if precision == "bfloat16":
        model = LowPrecision(model)
    if shard is not None or merge_shards is not None:
        keep_images = 0
    points = subset_digest(bundle.test, indices)
    probe_idx = indices[:probe_size]
    px, py = get_batch(bundle.test, probe_idx)
    px, py = px.to(device), py.to(device)
    verdict = None
    if probes:
        verdict, randomised = quick_probes(model, px, py)
        if randomised and getattr(params, "version", None) in ("standard", "plus"):
            raise SpecError(
                f"--param version: the model's outputs change between identical forwards "
                f"(spread {verdict.measured['output_spread']:.3g}); AutoAttack "
                f"'{getattr(params, 'version', '')}' assumes a deterministic model; use "
                "--param version=rand")
        if shard is not None:
            verdict = None  # a shard is a part: the merge runs the probes on the whole
    out: list[AttackReport] = []
    for i, eps in enumerate(budgets if budgets is not None else [None]):
        p = params if eps is None else params.model_copy(update={"eps": eps})

        def build(batch: int, p: BaseModel = p) -> Any:
            ctx = build_context(bundle, torch.device(device), seed * 1_000_003 + batch, None)
            return registry.attacks.instantiate(name, p, ctx, "--param")

        path = state
        if state is not None and budgets is not None:
            path = state.with_name(f"{state.stem}-eps{i}{state.suffix}")
        files: list[Path] = []
        key = evaluation_key(name=name, params=p, seed=seed, batch_size=batch_size,
                             stages=[s for s, _ in attack_stages(build(0), name)],
                             indices=indices, model_sha256=measured, data_sha256=points,
                             precision=precision)
        count = shard[1] if shard is not None else merge_shards
        if count is not None and shard_dir is not None:
            files = shard_files(shard_dir, name, key, count)
        if merge_shards is not None:
            norm, declared_eps = declared_budget(build(0), p)
            report = _merged(files, key, name=name, params=p, norm=norm, eps=declared_eps,
                             indices=indices, seed=seed, model=model, bundle=bundle,
                             batch_size=batch_size, device=device)
        else:
            if shard is not None:
                path = files[shard[0]]
                path.parent.mkdir(parents=True, exist_ok=True)
            report = run_attack(model, PerBatch(build), bundle.test, indices, name=name,
                                params=p, batch_size=batch_size, device=device, seed=seed,
                                state_path=path, progress=progress, keep_images=keep_images,
                                origin=registry.attacks.origin(name), shard=shard,
                                key=key)
        if verdict is not None and i == 0:
            stage_names = [s.name for s in report.stages]
            if report.norm in ("l2", "linf", "l1") and report.eps is not None and report.eps > 0:
                attack_probes(model, px, py, report.robust_mask[: len(probe_idx)],
                              norm=report.norm, eps=report.eps, seed=seed,
                              white_box_only="square" not in stage_names,
                              verdict=verdict, device=device)
            square_stage_check(report.stages, report.n, verdict)
        out.append(report)
    if verdict is not None and len(out) > 1:
        sweep_check([float(r.eps or 0.0) for r in out], [r.robust_accuracy for r in out],
                    out[0].n, verdict)
    labels = torch.as_tensor(labels_of(bundle.test)[indices.numpy()])
    for report in out:
        report.indices, report.labels = indices.clone(), labels
        report.precision = precision
        report.model_sha256 = measured
        report.subset["data_sha256"] = points
        if verdict is not None:
            report.reliability = verdict.to_record()
    return out, indices


def _merged(files: list[Path], key: dict[str, Any], *, name: str, params: BaseModel,
            norm: str | None, eps: float | None, indices: Tensor, seed: int,
            model: nn.Module, bundle: DataBundle, batch_size: int,
            device: torch.device | str) -> AttackReport:
    """The report of the whole evaluation from its finished shard files. Each file is
    checked as it loads (`AttackState.load`: its payload digest and invariants); the clean
    bits they agree on are checked once more against the model itself (one forward pass over
    the subset), so a shard file cannot claim points the model gets wrong."""
    from pagctl.evaluation import check_shard_files
    from pagctl.robustness.engine import clean_correct_mask, merge_shards
    from pagctl.robustness.report import AttackReport
    from pagctl.robustness.state import AttackState

    count = len(files)
    check_shard_files(files, "evaluation", "attack, params, seed, subset and weights")
    states = [AttackState.load(path, {**key, "shard": [i, count]})
              for i, path in enumerate(files)]
    for i, st in enumerate(states):
        if st.stage < len(st.stages):
            raise FieldError("merge_shards", f"shard {i}/{count} stopped before the end "
                             f"(stage {st.stage + 1} of {len(st.stages)}); run shard "
                             f"{i}/{count} (shard=({i}, {count}), --shard {i}/{count} on the "
                             "command line) again to finish it")
    try:
        merged = merge_shards(states)
    except ValueError as exc:
        raise FieldError("merge_shards", str(exc)) from None
    clean = clean_correct_mask(model, bundle.test, indices, batch_size=batch_size,
                               device=device)
    if not bool((clean == merged.clean).all()):
        wrong = int((clean != merged.clean).sum())
        raise CheckpointError(
            f"{files[0].parent}: the shards claim {wrong} point(s) "
            "classified otherwise than the model classifies them; they were not written by "
            "this model's evaluation: delete them and run the shards again")
    return AttackReport.from_state(merged, name, params, norm, eps, indices, seed)
