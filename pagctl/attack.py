"""Run an attack over a test subset and report clean and robust accuracy, what each stage
of the attack contributed, what it cost, and whether the numbers can be trusted.

``run_attack`` owns the model's mode: it evaluates in eval mode and restores every module's
previous mode afterwards. Every attack output is checked at the boundary (shape, dtype,
device, finite, inside [0, 1], inside the budget, inputs untouched, model mode, parameters
and buffers unchanged). A point counts as robust only if it is classified correctly clean
and under every stage, so robust <= clean per point.

Attacks made of stages (an ``Ensemble`` such as AutoAttack) run stage by stage over the
whole subset, each stage only on the points still robust: the per-point worst case. A
``--state`` file records the progress after every batch, so an interrupted run resumes
where it stopped (the report and the state file: `pagctl.attack_report`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pagctl.attack_report import STATE_VERSION as STATE_VERSION
from pagctl.attack_report import Z95 as Z95
from pagctl.attack_report import AttackReport as AttackReport
from pagctl.attack_report import StageReport as StageReport
from pagctl.attack_report import _Progress, _report
from pagctl.attack_report import indices_digest as indices_digest
from pagctl.attack_report import pack_bits as pack_bits
from pagctl.attack_report import subset_record as subset_record
from pagctl.attack_report import unpack_bits as unpack_bits
from pagctl.attack_report import wilson_interval as wilson_interval
from pagctl.errors import PagctlError, PluginContractError, PluginRuntimeError

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch
    from pydantic import BaseModel
    from torch import Tensor, nn
    from torch.utils.data import Dataset

    from pagctl.protocols import Attack

BUDGET_TOLERANCE = 1e-6


@runtime_checkable
class Ensemble(Protocol):
    """An attack made of named stages run one after another on the points still robust.

    ``stages()`` returns ``[(name, attack), ...]``; each attack follows the Attack protocol.
    """

    def stages(self) -> list[tuple[str, Attack]]: ...


def attack_stages(attack: Any, name: str) -> list[tuple[str, Attack]]:
    """The stages of ``attack``: its own list for an Ensemble, else one stage named ``name``."""
    stages = getattr(attack, "stages", None)
    if callable(stages):
        listed = list(stages())
        if not listed:
            raise PluginContractError(f"attack '{name}' broke the contract: stages() is empty")
        return listed
    return [(name, attack)]


@dataclass
class PerBatch:
    """Builds a fresh attack for each batch (``build(batch_number)``), so each batch's
    randomness depends only on its number: a resumed run equals an uninterrupted one."""

    build: Callable[[int], Any]


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


class _PassCounter:
    """Wraps a model to count forward and backward passes, one per example."""

    def __init__(self, model: nn.Module) -> None:
        import torch

        class Counted(torch.nn.Module):
            def __init__(self, inner: nn.Module, owner: _PassCounter) -> None:
                super().__init__()
                self.inner = inner
                self._owner = [owner]  # a list, so the owner is not registered as a module

            def forward(self, x: Tensor) -> Tensor:
                out: Tensor = self.inner(x)
                owner, rows = self._owner[0], int(x.shape[0]) if x.dim() else 1
                owner.forwards += rows
                if out.requires_grad:
                    out.register_hook(lambda g: owner._backward(rows))  # type: ignore[no-untyped-call]
                return out

        self.forwards = 0
        self.backwards = 0
        self.module = Counted(model, self)

    def _backward(self, rows: int) -> None:
        self.backwards += rows


def _check_output(who: str, x: Tensor, x_before: Tensor, x_adv: Any, norm: str | None,
                  eps: float | None) -> None:
    """``who`` names the attack in messages, e.g. "attack 'noise' (dist 0.1.0)"."""
    import torch

    def fail(what: str) -> None:
        raise PluginContractError(f"{who} broke the contract: {what}")

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
    if x_adv.numel() and (x_adv.min().item() < 0 or x_adv.max().item() > 1):
        fail(f"values outside [0, 1] (min {x_adv.min().item():.4g}, max "
             f"{x_adv.max().item():.4g})")
    if norm is not None and eps is not None:
        delta = (x_adv - x).flatten(1)
        size = delta.norm(dim=1) if norm == "l2" else delta.abs().amax(dim=1)
        worst = size.max().item() if size.numel() else 0.0
        if worst > eps * (1 + BUDGET_TOLERANCE) + 1e-7:
            fail(f"perturbation {norm} norm {worst:.6g} exceeds eps {eps:.6g}")


def _check_model(who: str, model: nn.Module, before: dict[str, Tensor]) -> None:
    import torch

    if any(m.training for m in model.modules()):
        raise PluginContractError(f"{who} broke the contract: it changed the model's "
                                  "train/eval mode")
    for key, value in model.state_dict().items():
        if key in before and not torch.equal(value, before[key]):
            raise PluginContractError(f"{who} broke the contract: it changed the model's "
                                      f"parameter or buffer '{key}'")


def attack_budget(attack: Any, params: BaseModel) -> tuple[str | None, float | None]:
    """(norm, eps) declared by the attack's params or class, when it has them."""
    eps = getattr(params, "eps", None)
    norm = getattr(params, "norm", None) or getattr(attack, "norm", None)
    return (str(norm) if norm is not None else None, float(eps) if eps is not None else None)


def clean_accuracy(model: nn.Module, dataset: Dataset[Any], indices: Tensor, *,
                   batch_size: int = 256, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy on ``dataset[indices]`` in eval mode."""
    return float(clean_correct_mask(model, dataset, indices, batch_size=batch_size,
                                    device=device).float().mean()) if len(indices) else 0.0


def clean_correct_mask(model: nn.Module, dataset: Dataset[Any], indices: Tensor, *,
                       batch_size: int = 256,
                       device: torch.device | str = "cpu") -> Tensor:
    """Which of ``dataset[indices]`` the model classifies correctly, in eval mode.
    Shape: (n,) -> (n,) bool on the CPU."""
    import torch

    from pagctl.data import get_batch

    parts = []
    with eval_mode(model), torch.no_grad():
        for lo in range(0, len(indices), batch_size):
            x, y = get_batch(dataset, indices[lo: lo + batch_size])
            parts.append((model(x.to(device)).argmax(1) == y.to(device)).cpu())
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


def run_attack(
    model: nn.Module,
    attack: Attack | PerBatch,
    dataset: Dataset[Any],
    indices: Tensor,
    *,
    name: str,
    params: BaseModel,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    seed: int = 0,
    state_path: Path | None = None,
    progress: bool = False,
    keep_images: int = 0,
    on_batch: Callable[[], None] | None = None,
    origin: str = "built-in",
) -> AttackReport:
    """Attack ``dataset[indices]`` stage by stage, in batches, in eval mode.

    ``attack`` is an Attack, an Ensemble, or a :class:`PerBatch` that builds one per batch.
    ``state_path``: read to resume, rewritten after every batch. ``keep_images``: keep the
    adversarial versions of the first that many points (``AttackReport.images``).
    ``origin`` names the plugin's distribution in error messages.
    Shape: indices (n,) int64 positions in ``dataset``.
    """
    import torch

    from pagctl.data import get_batch
    from pagctl.progress import AttackProgress

    n = len(indices)
    starts = list(range(0, n, batch_size))

    def built(batch: int) -> Any:
        return attack.build(batch) if isinstance(attack, PerBatch) else attack

    first = built(0)
    stage_list = attack_stages(first, name)
    stage_names = [s for s, _ in stage_list]
    norm, eps = attack_budget(first, params)
    key = {"attack": name, "params": params.model_dump(mode="json"), "n": n,
           "indices_sha256": indices_digest(indices), "seed": seed, "batch_size": batch_size,
           "stages": stage_names}

    state: _Progress | None = None
    if state_path is not None and state_path.exists():
        state = _Progress.load(state_path, key)
    start = time.perf_counter()
    prior_seconds = float(state.stats["seconds"]) if state is not None else 0.0
    with eval_mode(model):
        if state is None:
            clean = clean_correct_mask(model, dataset, indices, batch_size=batch_size,
                                       device=device)
            kept = min(keep_images, n)
            images = (get_batch(dataset, indices[:kept])[0].float() if kept
                      else torch.zeros(0))
            state = _Progress(
                key=key, clean=clean, robust=clean.clone(),
                broken_by=torch.full((n,), -1, dtype=torch.int64), images=images,
                stages=[StageReport(s) for s in stage_names],
                stats={"max_l2": 0.0, "max_linf": 0.0, "pixel_min": 1.0, "pixel_max": 0.0,
                       "nan_count": 0, "seconds": 0.0},
            )
        with AttackProgress(stage_names, len(starts), n, enabled=progress) as bar:
            bar.advance_to(state.stage, state.batch, int(state.robust.sum()))
            while state.stage < len(stage_names):
                s = state.stage
                if state.batch < len(starts):
                    _attack_batch(model, built(state.batch), state, s, dataset, indices,
                                  starts[state.batch], batch_size, name, norm, eps, device,
                                  origin)
                    state.batch += 1
                    bar.step(s, int(state.robust.sum()))
                if state.batch >= len(starts):
                    state.stage, state.batch = state.stage + 1, 0
                state.stats["seconds"] = prior_seconds + time.perf_counter() - start
                if state_path is not None:
                    state.save(state_path)
                if on_batch is not None:
                    on_batch()
    state.stats["seconds"] = prior_seconds + time.perf_counter() - start
    if state_path is not None:
        state.save(state_path)
    report = _report(state, name, params, norm, eps, indices, seed)
    report.images = state.images if keep_images else None
    return report


def _attack_batch(model: nn.Module, attack: Any, state: _Progress, stage: int,
                  dataset: Dataset[Any], indices: Tensor, lo: int, batch_size: int,
                  name: str, norm: str | None, eps: float | None,
                  device: torch.device | str, origin: str = "built-in") -> None:
    """Run stage ``stage`` on the points of batch ``[lo, lo + batch_size)`` still robust."""
    import torch

    from pagctl.data import get_batch

    hi = min(lo + batch_size, len(indices))
    pos = torch.arange(lo, hi)[state.robust[lo:hi]]
    report = state.stages[stage]
    if pos.numel() == 0:
        return
    stage_name, stage_attack = attack_stages(attack, name)[stage]
    label = stage_name if stage_name == name else f"{name}/{stage_name}"
    who = f"attack '{label}' ({origin})"
    x, y = get_batch(dataset, indices[pos])
    x, y = x.to(device), y.to(device)
    x_before = x.clone()
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    counter = _PassCounter(model)
    t0 = time.perf_counter()
    try:
        x_adv = stage_attack(counter.module, x, y)
    except PagctlError:
        raise
    except Exception as exc:
        text = str(exc).strip().splitlines()
        raise PluginRuntimeError(f"{who} raised {type(exc).__name__}: "
                                 f"{text[0] if text else '(no message)'}") from exc
    report.seconds += time.perf_counter() - t0
    _check_output(who, x, x_before, x_adv, norm, eps)
    _check_model(who, model, before)
    with torch.no_grad():
        fooled = (model(x_adv).argmax(dim=1) != y).cpu()
    report.attacked += int(pos.numel())
    report.broke += int(fooled.sum())
    report.forwards += counter.forwards
    report.backwards += counter.backwards
    state.robust[pos[fooled]] = False
    state.broken_by[pos[fooled]] = stage
    delta = (x_adv - x).flatten(1)
    stats = state.stats
    stats["max_l2"] = max(stats["max_l2"], float(delta.norm(dim=1).max()))
    stats["max_linf"] = max(stats["max_linf"], float(delta.abs().max()))
    stats["pixel_min"] = min(stats["pixel_min"], float(x_adv.min()))
    stats["pixel_max"] = max(stats["pixel_max"], float(x_adv.max()))
    stats["nan_count"] += int(torch.isnan(x_adv).sum())
    kept = pos < len(state.images)
    if bool(kept.any()):
        state.images[pos[kept]] = x_adv[kept.to(x_adv.device)].detach().float().cpu()
