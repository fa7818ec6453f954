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
where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pagctl.errors import PagctlError, PluginContractError, PluginRuntimeError, SpecError

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch
    from pydantic import BaseModel
    from torch import Tensor, nn
    from torch.utils.data import Dataset

    from pagctl.protocols import Attack

BUDGET_TOLERANCE = 1e-6
Z95 = 1.959963984540054
"""The standard normal quantile of 0.975: a two-sided 95% interval."""
STATE_VERSION = 1


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``k / n`` (95% by default).

    Unlike the normal approximation it stays inside [0, 1] and is not empty at k = 0 or n.
    """
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return (max(0.0, centre - half), min(1.0, centre + half))


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


@dataclass
class StageReport:
    """What one stage did: points attacked and broken, passes (one per example) and time."""

    name: str
    attacked: int = 0
    broke: int = 0
    forwards: int = 0
    backwards: int = 0
    seconds: float = 0.0


@dataclass
class AttackReport:
    """Clean and robust accuracy of one attack on one subset, and how it was measured."""

    attack: str
    params: dict[str, Any]
    n: int
    clean_correct: int
    robust_correct: int
    clean_accuracy: float
    robust_accuracy: float
    clean_interval: tuple[float, float]
    robust_interval: tuple[float, float]
    norm: str | None
    eps: float | None
    max_l2: float
    max_linf: float
    pixel_min: float
    pixel_max: float
    nan_count: int
    forwards: int
    backwards: int
    seconds: float
    stages: list[StageReport] = field(default_factory=list)
    subset: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    per_example: dict[str, str] = field(default_factory=dict)
    reliability: dict[str, Any] | None = None
    images: Tensor | None = field(default=None, repr=False)
    """Adversarial versions of the first ``keep_images`` points (not part of the record)."""

    def to_record(self) -> dict[str, Any]:
        """A JSON-ready dict (everything but ``images``), ``kind: "attack"``."""
        from dataclasses import fields

        record: dict[str, Any] = {"kind": "attack"}
        for f in fields(self):
            if f.name != "images":
                value = getattr(self, f.name)
                record[f.name] = ([asdict(s) for s in value] if f.name == "stages"
                                  else list(value) if isinstance(value, tuple) else value)
        return record


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


def subset_record(indices: Tensor) -> dict[str, Any]:
    n = len(indices)
    return {"count": n, "indices_sha256": indices_digest(indices),
            "first": int(indices[0]) if n else None, "last": int(indices[-1]) if n else None}


def pack_bits(mask: Tensor) -> str:
    """A boolean vector as a hex string, 8 points per byte, first point in the high bit."""
    import numpy as np

    return bytes(np.packbits(mask.cpu().numpy().astype(bool))).hex()


def unpack_bits(text: str, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`. Shape: -> (n,) bool."""
    import numpy as np
    import torch

    bits = np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:n]
    return torch.from_numpy(bits.astype(bool))


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


# ----------------------------------------------------------------------------- run state


@dataclass
class _Progress:
    """Everything an interrupted run needs to go on, and nothing it could recompute."""

    key: dict[str, Any]
    clean: Tensor
    robust: Tensor
    broken_by: Tensor
    images: Tensor
    stage: int = 0
    batch: int = 0
    stages: list[StageReport] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        from pagctl.checkpoint import atomic_save_tensors

        meta = {"version": STATE_VERSION, "key": self.key, "stage": self.stage,
                "batch": self.batch, "stages": [asdict(s) for s in self.stages],
                "stats": self.stats}
        atomic_save_tensors(
            {"clean": self.clean.to(dtype=self._u8()), "robust": self.robust.to(self._u8()),
             "broken_by": self.broken_by, "images": self.images},
            path, metadata={"pagctl_attack_state": json.dumps(meta)})

    @staticmethod
    def _u8() -> Any:
        import torch

        return torch.uint8

    @classmethod
    def load(cls, path: Path, key: dict[str, Any]) -> _Progress:
        import torch
        from safetensors import safe_open

        from pagctl.checkpoint import load_tensors

        tensors = load_tensors(path)
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get("pagctl_attack_state")
        meta = json.loads(raw) if raw else None
        if not isinstance(meta, dict) or meta.get("version") != STATE_VERSION:
            raise SpecError(f"--state {path}: not a pagctl attack state file; pass a new path "
                            "or delete the file")
        if meta["key"] != key:
            differ = sorted(k for k in set(key) | set(meta["key"])
                            if key.get(k) != meta["key"].get(k))
            raise SpecError(f"--state {path}: written by a different evaluation "
                            f"({', '.join(differ)} differ); pass a new path or delete the file")
        return cls(key=key, clean=tensors["clean"].to(torch.bool),
                   robust=tensors["robust"].to(torch.bool), broken_by=tensors["broken_by"],
                   images=tensors["images"], stage=int(meta["stage"]),
                   batch=int(meta["batch"]),
                   stages=[StageReport(**s) for s in meta["stages"]], stats=meta["stats"])


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


def _report(state: _Progress, name: str, params: BaseModel, norm: str | None,
            eps: float | None, indices: Tensor, seed: int) -> AttackReport:
    n = len(indices)
    clean_k, robust_k = int(state.clean.sum()), int(state.robust.sum())
    stats = state.stats
    return AttackReport(
        attack=name, params=params.model_dump(mode="json"), n=n,
        clean_correct=clean_k, robust_correct=robust_k,
        clean_accuracy=clean_k / n if n else 0.0, robust_accuracy=robust_k / n if n else 0.0,
        clean_interval=wilson_interval(clean_k, n), robust_interval=wilson_interval(robust_k, n),
        norm=norm, eps=eps,
        max_l2=stats["max_l2"], max_linf=stats["max_linf"],
        pixel_min=stats["pixel_min"] if stats["pixel_min"] <= stats["pixel_max"] else 0.0,
        pixel_max=stats["pixel_max"], nan_count=int(stats["nan_count"]),
        forwards=sum(s.forwards for s in state.stages),
        backwards=sum(s.backwards for s in state.stages),
        seconds=float(stats["seconds"]), stages=state.stages,
        subset=subset_record(indices), seed=seed,
        per_example={"clean": pack_bits(state.clean), "robust": pack_bits(state.robust)},
    )
