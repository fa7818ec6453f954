"""The attack engine: clean and robust accuracy of a model on a test subset.

`run_attack` attacks ``dataset[indices]`` in batches, stage by stage (an `Ensemble` such as
AutoAttack runs each stage over the whole subset, on the points still robust: the per-point
worst case). A point counts as robust only if it is classified correctly clean and under
every stage, so robust <= clean per point. It returns an `AttackReport`
(`pagctl.robustness.report`).

The engine owns the model's mode: it evaluates in eval mode and restores every module's
previous mode afterwards. Every attack call is checked at the boundary with the plugin
contract's checks (`pagctl.protocols`: shape, dtype, device, finite, inside [0, 1], inside
the declared budget, inputs untouched, model mode, parameters and buffers unchanged), and
its forward and backward passes are counted, one per example. With ``state_path`` the
progress (`pagctl.robustness.state.AttackState`) is saved after every batch, so an
interrupted run resumes where it stopped and ends exactly as an uninterrupted one; a state
resumes only the evaluation it was saved by (attack, params, seed, batch size, the subset,
the model's weights and the test images, by digest).

**Shards.** With ``shard=(i, N)`` a run attacks only the batches ``b`` with ``b % N == i``
(every stage), each with the attack its batch number builds, so the union of the N shards
is the unsharded run batch for batch: the same seeds, the same per-point results.
`merge_shards` combines the N finished shard states into the state of the whole run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagctl.errors import PagctlError
from pagctl.protocols import (
    ModelSnapshot,
    attack_stages,
    check_attack_output,
    check_inputs_untouched,
    declared_budget,
    raised,
)
from pagctl.records import StageRecord
from pagctl.robustness.report import AttackReport
from pagctl.robustness.state import AttackState
from pagctl.stats import indices_digest

if TYPE_CHECKING:
    import torch
    from pydantic import BaseModel
    from torch import Tensor, nn
    from torch.utils.data import Dataset

    from pagctl.protocols import Attack


@dataclass
class PerBatch:
    """Builds a fresh attack for each batch (``build(batch_number)``), so each batch's
    randomness depends only on its number: a resumed run equals an uninterrupted one."""

    build: Callable[[int], Any]


class _PassCounter:
    """Wraps a model to count forward and backward passes, one per example; ``on_forward``
    (if given) hears the running forward count after every forward."""

    def __init__(self, model: nn.Module,
                 on_forward: Callable[[int], None] | None = None) -> None:
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
                if owner.on_forward is not None:
                    owner.on_forward(owner.forwards)
                if out.requires_grad:
                    out.register_hook(lambda g: owner._backward(rows))  # type: ignore[no-untyped-call]
                return out

        self.forwards = 0
        self.backwards = 0
        self.on_forward = on_forward
        self.module = Counted(model, self)

    def _backward(self, rows: int) -> None:
        self.backwards += rows


def clean_accuracy(model: nn.Module, dataset: Dataset[Any], indices: Tensor, *,
                   batch_size: int = 256, device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy on ``dataset[indices]`` in eval mode."""
    return float(clean_correct_mask(model, dataset, indices, batch_size=batch_size,
                                    device=device).float().mean()) if len(indices) else 0.0


def clean_correct_mask(model: nn.Module, dataset: Dataset[Any], indices: Tensor, *,
                       batch_size: int = 256,
                       device: torch.device | str = "cpu") -> Tensor:
    """Which of ``dataset[indices]`` the model classifies correctly, in eval mode.
    ModelError when its outputs are not finite. Shape: (n,) -> (n,) bool on the CPU."""
    import torch

    from pagctl.data import get_batch
    from pagctl.models import check_finite_outputs, eval_mode

    parts = []
    with eval_mode(model), torch.no_grad():
        for lo in range(0, len(indices), batch_size):
            x, y = get_batch(dataset, indices[lo: lo + batch_size])
            logits = model(x.to(device))
            check_finite_outputs(logits, "clean accuracy")
            parts.append((logits.argmax(1) == y.to(device)).cpu())
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
    shard: tuple[int, int] | None = None,
    key: dict[str, Any] | None = None,
) -> AttackReport:
    """Attack ``dataset[indices]`` stage by stage, in batches, in eval mode.

    ``attack`` is an Attack, an Ensemble, or a :class:`PerBatch` that builds one per batch.
    ``state_path``: read to resume, rewritten after every batch. ``keep_images``: keep the
    adversarial versions of the first that many points (``AttackReport.images``).
    ``origin`` names the plugin's distribution in error messages. ``shard=(i, N)``: attack
    only the batches ``b % N == i`` (module docstring); the report then counts the other
    points as not attacked (robust when clean-correct) and is only a part of the whole.
    ``key``: the `evaluation_key` when the caller has computed it already (it hashes the
    weights and every attacked image). Shape: indices (n,) int64 positions in ``dataset``.
    """
    from pagctl.data import get_batch
    from pagctl.distributed.shards import owned_batches
    from pagctl.models import eval_mode
    from pagctl.progress import ProgressBar

    n = len(indices)
    starts = list(range(0, n, batch_size))

    def built(batch: int) -> Any:
        return attack.build(batch) if isinstance(attack, PerBatch) else attack

    first = built(0)
    stage_names = [s for s, _ in attack_stages(first, name)]
    norm, eps = declared_budget(first, params)
    mine = owned_batches(len(starts), shard)
    state = None
    if state_path is not None:
        if key is None:
            from pagctl.data import subset_digest
            from pagctl.provenance import model_digest

            key = evaluation_key(name=name, params=params, seed=seed, batch_size=batch_size,
                                 stages=stage_names, indices=indices,
                                 model_sha256=model_digest(model),
                                 data_sha256=subset_digest(dataset, indices))
        key = dict(key)
        if shard is not None:
            key["shard"] = list(shard)
        state = AttackState.load(state_path, key) if state_path.exists() else None
    else:
        key = {}
    start = time.perf_counter()
    prior_seconds = float(state.stats["seconds"]) if state is not None else 0.0
    per_stage = max(len(mine), 1)
    total = len(stage_names) * per_stage
    with eval_mode(model):
        if state is None:
            kept = min(keep_images, n)
            state = AttackState.start(
                key, clean_correct_mask(model, dataset, indices, batch_size=batch_size,
                                        device=device),
                get_batch(dataset, indices[:kept])[0].float() if kept else _empty(),
                stage_names)
        with ProgressBar(stage_names[0], total, enabled=progress) as bar:
            while state.stage < len(stage_names):
                s = state.stage
                robust = f"robust {int(state.robust.sum())}/{n}"
                done = sum(1 for b in mine if b < state.batch)
                bar.update(completed=s * per_stage + done,
                           description=stage_names[s], info=robust)
                if state.batch < len(starts) and state.batch not in mine:
                    state.batch += 1  # another shard's batch
                    if state.batch < len(starts):
                        continue
                elif state.batch < len(starts):
                    where = f"{robust}, batch {done + 1}/{len(mine)}"
                    _attack_batch(model, built(state.batch), state, s, dataset, indices,
                                  starts[state.batch], batch_size, name, norm, eps, device,
                                  origin, _heartbeat(bar, where) if progress else None)
                    state.batch += 1
                if state.batch >= len(starts):
                    state.stage, state.batch = state.stage + 1, 0
                state.stats["seconds"] = prior_seconds + time.perf_counter() - start
                if state_path is not None:
                    state.save(state_path)
                if on_batch is not None:
                    on_batch()
            bar.update(completed=total, info=f"robust {int(state.robust.sum())}/{n}")
    state.stats["seconds"] = prior_seconds + time.perf_counter() - start
    if state_path is not None:
        state.save(state_path)
    report = AttackReport.from_state(state, name, params, norm, eps, indices, seed)
    report.images = state.images if keep_images else None
    return report


HEARTBEAT_SECONDS = 1.0
"""Within a batch, the bar's text shows the stage's forward count at most this often."""


def _heartbeat(bar: Any, where: str) -> Callable[[int], None]:
    """A forward-count listener that refreshes ``bar``'s text (at most every
    HEARTBEAT_SECONDS): a stage on one batch can run for minutes (APGD-T's 9 targets × 100
    steps), and the count shows it is moving; off a terminal the bar's periodic line
    carries it into the log."""
    last = [time.monotonic()]

    def beat(forwards: int) -> None:
        now = time.monotonic()
        if now - last[0] >= HEARTBEAT_SECONDS:
            last[0] = now
            bar.update(info=f"{where}, {forwards:,} forwards")

    return beat


def evaluation_key(*, name: str, params: BaseModel, seed: int, batch_size: int,
                   stages: list[str], indices: Tensor, model_sha256: str, data_sha256: str,
                   precision: str = "float32") -> dict[str, Any]:
    """What identifies one evaluation, for its resumable state and its shards: the attack,
    its params and stages, the seed and batch size (they fix every batch's randomness), the
    precision of the model's forward, and the digests of the subset's indices, of its images
    and labels (`pagctl.data.subset_digest`) and of the model
    (`pagctl.provenance.model_digest`)."""
    return {"attack": name, "params": params.model_dump(mode="json"), "n": len(indices),
            "indices_sha256": indices_digest(indices), "seed": seed,
            "batch_size": batch_size, "stages": stages, "precision": precision,
            "model_sha256": model_sha256, "data_sha256": data_sha256}


def merge_shards(states: list[AttackState]) -> AttackState:
    """The state of the whole run from its N finished shards (``states[i]`` is shard i/N,
    each keyed like the whole run plus ``shard: [i, N]``).

    Per point the owner of its batch decides: a shard leaves the points of other shards as
    clean-correct-and-unattacked, so robust is the AND over shards, the breaking stage the
    largest; stage counters and seconds add up, the perturbation and pixel extremes take
    the extreme. Shards keep no images, nor does the merge. ValueError when the states are
    not the N shards of one finished evaluation."""
    import torch

    count = len(states)
    keys = [dict(st.key) for st in states]
    shards = [key.pop("shard", None) for key in keys]
    if shards != [[i, count] for i in range(count)]:
        raise ValueError(f"expected shards 0/{count} … {count - 1}/{count} in order, got "
                         f"{shards}")
    if any(key != keys[0] for key in keys[1:]):
        raise ValueError("the shards come from different evaluations")
    for i, st in enumerate(states):
        if st.stage < len(st.stages):
            raise ValueError(f"shard {i}/{count} is not finished (stage {st.stage + 1} of "
                             f"{len(st.stages)})")
    first = states[0]
    robust = first.robust.clone()
    broken_by = first.broken_by.clone()
    for st in states[1:]:
        if not torch.equal(st.clean, first.clean):
            raise ValueError("the shards disagree on which points are classified correctly")
        robust &= st.robust
        broken_by = torch.maximum(broken_by, st.broken_by)
    stages = [StageRecord(
        name=rec.name,
        attacked=sum(st.stages[j].attacked for st in states),
        broke=sum(st.stages[j].broke for st in states),
        forwards=sum(st.stages[j].forwards for st in states),
        backwards=sum(st.stages[j].backwards for st in states),
        seconds=sum(st.stages[j].seconds for st in states))
        for j, rec in enumerate(first.stages)]
    stats: dict[str, float] = {}
    for field_name in first.stats:
        values = [float(st.stats.get(field_name, 0.0)) for st in states]
        stats[field_name] = (min(values) if field_name == "pixel_min"
                             else sum(values) if field_name in ("nan_count", "seconds")
                             else max(values))
    return AttackState(key=keys[0], clean=first.clean.clone(), robust=robust,
                       broken_by=broken_by, images=_empty(), stage=len(stages), batch=0,
                       stages=stages, stats=stats)


def _empty() -> Tensor:
    import torch

    return torch.zeros(0)


def _attack_batch(model: nn.Module, attack: Any, state: AttackState, stage: int,
                  dataset: Dataset[Any], indices: Tensor, lo: int, batch_size: int,
                  name: str, norm: str | None, eps: float | None,
                  device: torch.device | str, origin: str,
                  heartbeat: Callable[[int], None] | None = None) -> None:
    """Run stage ``stage`` on the points of batch ``[lo, lo + batch_size)`` still robust;
    ``heartbeat`` hears the stage's running forward count."""
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
    snapshot = ModelSnapshot(model)
    counter = _PassCounter(model, heartbeat)
    t0 = time.perf_counter()
    try:
        x_adv = stage_attack(counter.module, x, y)
    except PagctlError:
        raise
    except Exception as exc:
        raise raised(who, exc) from exc
    report.seconds += time.perf_counter() - t0
    check_inputs_untouched(who, [(x, x_before)])
    check_attack_output(who, x, x_adv, norm, eps)
    snapshot.check(who)
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
    stats["max_l1"] = max(stats.get("max_l1", 0.0), float(delta.abs().sum(dim=1).max()))
    stats["max_l2"] = max(stats["max_l2"], float(delta.norm(dim=1).max()))
    stats["max_linf"] = max(stats["max_linf"], float(delta.abs().max()))
    stats["pixel_min"] = min(stats["pixel_min"], float(x_adv.min()))
    stats["pixel_max"] = max(stats["pixel_max"], float(x_adv.max()))
    stats["nan_count"] += int(torch.isnan(x_adv).sum())
    kept = pos < len(state.images)
    if bool(kept.any()):
        state.images[pos[kept]] = x_adv[kept.to(x_adv.device)].detach().float().cpu()
