"""Run an attack over a test subset and report clean and robust accuracy.

``run_attack`` owns the model's mode: it evaluates in eval mode and restores every module's
previous mode afterwards. It checks each attack output at the boundary (shape, dtype, device,
finite, inside [0, 1], inside the budget, inputs untouched) and counts a point as robust only
if it is classified correctly both clean and under attack, so robust <= clean per point.
"""

from __future__ import annotations

import hashlib
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from pagctl.errors import PluginContractError

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch
    from pydantic import BaseModel
    from torch import Tensor, nn
    from torch.utils.data import Dataset

    from pagctl.protocols import Attack

BUDGET_TOLERANCE = 1e-6


@dataclass
class AttackReport:
    """Clean and robust accuracy of one attack on one subset."""

    attack: str
    params: dict[str, Any]
    n: int
    clean_correct: int
    robust_correct: int
    clean_accuracy: float
    robust_accuracy: float
    max_l2: float
    max_linf: float
    seconds: float
    subset: dict[str, Any] = field(default_factory=dict)
    seed: int = 0

    def to_record(self) -> dict[str, Any]:
        return {"kind": "attack", **asdict(self)}


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Put every module in eval mode; restore each module's own flag afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, was_training in modes:
            module.training = was_training


def indices_digest(indices: Tensor) -> str:
    return hashlib.sha256(indices.cpu().numpy().astype("int64").tobytes()).hexdigest()[:16]


def _check_output(name: str, x: Tensor, x_before: Tensor, x_adv: Any, norm: str | None,
                  eps: float | None) -> None:
    import torch

    def fail(what: str) -> None:
        raise PluginContractError(f"attack '{name}' broke the contract: {what}")

    if not isinstance(x_adv, torch.Tensor):
        fail(f"returned {type(x_adv).__name__}, expected a tensor")
    if x_adv.shape != x.shape or x_adv.dtype != x.dtype or x_adv.device != x.device:
        fail(f"returned {tuple(x_adv.shape)} {x_adv.dtype} on {x_adv.device}, expected "
             f"{tuple(x.shape)} {x.dtype} on {x.device}")
    if not torch.equal(x, x_before):
        fail("it modified its inputs in place")
    bad = (~torch.isfinite(x_adv)).sum().item()
    if bad:
        fail(f"{bad} non-finite values in the adversarial batch")
    if x_adv.min().item() < 0 or x_adv.max().item() > 1:
        fail(f"values outside [0, 1] (min {x_adv.min().item():.4g}, max "
             f"{x_adv.max().item():.4g})")
    if norm is not None and eps is not None:
        delta = (x_adv - x).flatten(1)
        size = delta.norm(dim=1) if norm == "l2" else delta.abs().amax(dim=1)
        worst = size.max().item() if size.numel() else 0.0
        if worst > eps * (1 + BUDGET_TOLERANCE) + 1e-7:
            fail(f"perturbation {norm} norm {worst:.6g} exceeds eps {eps:.6g}")


def attack_budget(attack: Any, params: BaseModel) -> tuple[str | None, float | None]:
    """(norm, eps) declared by the attack's params or class, when it has them."""
    eps = getattr(params, "eps", None)
    norm = getattr(params, "norm", None) or getattr(attack, "norm", None)
    return (str(norm) if norm is not None else None, float(eps) if eps is not None else None)


def clean_accuracy(model: nn.Module, dataset: Dataset[Any], indices: Tensor, *,
                   batch_size: int = 256, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy on ``dataset[indices]`` in eval mode."""
    import torch

    from pagctl.data import get_batch

    correct = 0
    with eval_mode(model), torch.no_grad():
        for lo in range(0, len(indices), batch_size):
            x, y = get_batch(dataset, indices[lo: lo + batch_size])
            correct += int((model(x.to(device)).argmax(1) == y.to(device)).sum())
    return correct / max(1, len(indices))


def run_attack(
    model: nn.Module,
    attack: Attack,
    dataset: Dataset[Any],
    indices: Tensor,
    *,
    name: str,
    params: BaseModel,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> AttackReport:
    """Attack ``dataset[indices]`` in batches; the model is evaluated in eval mode.

    Shape: indices (n,) int64 positions in ``dataset``.
    """
    import torch

    from pagctl.data import get_batch

    norm, eps = attack_budget(attack, params)
    clean_correct = robust_correct = 0
    max_l2 = max_linf = 0.0
    start = time.perf_counter()
    with eval_mode(model):
        for lo in range(0, len(indices), batch_size):
            idx = indices[lo: lo + batch_size]
            x, y = get_batch(dataset, idx)
            x, y = x.to(device), y.to(device)
            with torch.no_grad():
                clean_ok = model(x).argmax(dim=1) == y
            x_before = x.clone()
            x_adv = attack(model, x, y)
            _check_output(name, x, x_before, x_adv, norm, eps)
            if any(m.training for m in model.modules()):
                raise PluginContractError(f"attack '{name}' broke the contract: it changed "
                                          "the model's train/eval mode")
            with torch.no_grad():
                adv_ok = model(x_adv).argmax(dim=1) == y
            delta = (x_adv - x).flatten(1)
            if delta.numel():
                max_l2 = max(max_l2, delta.norm(dim=1).max().item())
                max_linf = max(max_linf, delta.abs().max().item())
            clean_correct += int(clean_ok.sum().item())
            robust_correct += int((clean_ok & adv_ok).sum().item())
    n = len(indices)
    return AttackReport(
        attack=name, params=params.model_dump(mode="json"), n=n,
        clean_correct=clean_correct, robust_correct=robust_correct,
        clean_accuracy=clean_correct / n if n else 0.0,
        robust_accuracy=robust_correct / n if n else 0.0,
        max_l2=max_l2, max_linf=max_linf, seconds=time.perf_counter() - start,
        subset={"count": n, "indices_sha256": indices_digest(indices),
                "first": int(indices[0]) if n else None,
                "last": int(indices[-1]) if n else None},
        seed=seed,
    )
