"""One evaluation as ``pagctl attack`` runs it: pick the subset, probe the model, run the
attack (once or over an ε-sweep) with the engine (`pagctl.robustness.engine`) and attach
the reliability verdict (`pagctl.robustness.reliability`) to every report."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagctl.errors import SpecError

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
    budgets: list[float] | None = None,
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
) -> tuple[list[AttackReport], Tensor]:
    """Attack ``bundle.test[indices]`` (first ``limit``) with the registered attack ``name``
    (once, or at each budget of ``budgets``) and attach the reliability verdict.

    Returns the reports (one per budget) and the attacked indices. Raises SpecError when
    the indices are out of range or AutoAttack standard/plus meets a randomised model.
    """
    import torch

    from pagctl import registry
    from pagctl.build import build_context
    from pagctl.data import get_batch, labels_of, select_test_indices
    from pagctl.robustness.engine import PerBatch, run_attack
    from pagctl.robustness.reliability import (
        attack_probes,
        quick_probes,
        square_stage_check,
        sweep_check,
    )

    indices = select_test_indices(len(bundle.test), indices, limit)  # type: ignore[arg-type]
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
    out: list[AttackReport] = []
    for i, eps in enumerate(budgets if budgets is not None else [None]):
        p = params if eps is None else params.model_copy(update={"eps": eps})

        def build(batch: int, p: BaseModel = p) -> Any:
            ctx = build_context(bundle, torch.device(device), seed * 1_000_003 + batch, None)
            return registry.attacks.instantiate(name, p, ctx, "--param")

        path = state
        if state is not None and budgets is not None:
            path = state.with_name(f"{state.stem}-eps{i}{state.suffix}")
        report = run_attack(model, PerBatch(build), bundle.test, indices, name=name, params=p,
                            batch_size=batch_size, device=device, seed=seed, state_path=path,
                            progress=progress, keep_images=keep_images,
                            origin=registry.attacks.origin(name))
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
        if verdict is not None:
            report.reliability = verdict.to_record()
    return out, indices
