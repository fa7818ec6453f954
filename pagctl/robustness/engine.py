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
its forward and backward passes are counted, one per example. How it runs is one
`pagctl.evaluation.EvaluationRequest` (batch size, device, seed, progress, state, shard).
With a ``state`` file the progress (`pagctl.robustness.state.AttackState`) is saved after
every batch, so an interrupted run resumes where it stopped and ends exactly as an
uninterrupted one; a state resumes only the evaluation it was saved by (`attack_key`:
attack, params, seed, batch size, the subset, the model's weights and the test images, by
digest).

**Shards.** With ``shard=(i, N)`` a run attacks only the batches ``b`` with ``b % N == i``
(every stage), each with the attack its batch number builds, so the union of the N shards
is the unsharded run batch for batch: the same seeds, the same per-point results.
`AttackState.merge` combines the N finished shard states into the state of the whole run.

**ETA.** The progress bar counts model passes, not stages: the stages of an ensemble cost
very different amounts per point and attack ever fewer points, so one step per stage and
batch would promise the last stages the time of the first. `estimate_remaining` prices what
is left (module section "the ETA"), and the bar shows its estimate.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pagctl.errors import PagctlError
from pagctl.evaluation.request import EvaluationRequest
from pagctl.protocols import (
    ModelSnapshot,
    attack_stages,
    check_attack_output,
    check_inputs_untouched,
    declared_budget,
    declared_passes,
    perturbation_norms,
    raised,
)
from pagctl.robustness.report import AttackReport
from pagctl.robustness.state import AttackState

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
    (if given) hears the running forward and backward counts after every forward."""

    def __init__(self, model: nn.Module,
                 on_forward: Callable[[int, int], None] | None = None) -> None:
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
                    owner.on_forward(owner.forwards, owner.backwards)
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


WHOLE = EvaluationRequest()
"""The default request: every point given, batches of 256, seed 0, on the CPU, no state."""


def run_attack(
    model: nn.Module,
    attack: Attack | PerBatch,
    dataset: Dataset[Any],
    indices: Tensor,
    *,
    name: str,
    params: BaseModel,
    request: EvaluationRequest = WHOLE,
    keep_images: int = 0,
    key: dict[str, Any] | None = None,
    origin: str | None = None,
) -> AttackReport:
    """Attack ``dataset[indices]`` stage by stage, in batches, in eval mode, as ``request``
    asks (its batch size, device, seed, progress; its ``indices`` and ``limit`` are the
    caller's: ``indices`` here are the points already chosen).

    ``attack`` is an Attack, an Ensemble, or a :class:`PerBatch` that builds one per batch.
    ``request.state``: read to resume, rewritten after every batch, keyed by ``key`` (the
    caller's `attack_key`, computed once; computed here when not given).
    ``keep_images``: keep the adversarial versions of the first that many points
    (``AttackReport.images``). ``origin`` names the plugin's provider in error messages
    (default: as the registry knows ``name``). ``request.shard=(i, N)``: attack only the batches
    ``b % N == i`` (module docstring); the report then counts the other points as not
    attacked (robust when clean-correct) and is only a part of the whole. Shape: indices
    (n,) int64 positions in ``dataset``.
    """
    from pagctl.evaluation.sharding import owned_batches
    from pagctl.models import eval_mode
    from pagctl.progress import ProgressBar
    from pagctl.robustness.adversarial import image_store

    n, batch_size, device = len(indices), request.batch_size, request.device
    starts = list(range(0, n, batch_size))

    def built(batch: int) -> Any:
        return attack.build(batch) if isinstance(attack, PerBatch) else attack

    first = built(0)
    stage_names = [s for s, _ in attack_stages(first, name)]
    norm, eps = declared_budget(first, params)
    mine = owned_batches(len(starts), request.shard)
    state_path, state = request.state, None
    if state_path is not None:
        if key is None:
            key = attack_key(model, dataset, indices, name=name, params=params,
                             stages=stage_names, request=request)
        if request.shard is not None:
            key = {**key, "shard": list(request.shard)}
        state = AttackState.load(state_path, key) if state_path.exists() else None
    batches = _Batches(model, dataset, indices, name, norm, eps, device,
                       origin if origin is not None else _origin(name))
    start = time.perf_counter()
    prior_seconds = float(state.stats["seconds"]) if state is not None else 0.0
    declared = [declared_passes(a) for _, a in attack_stages(first, name)]
    owned = _owned_points(n, starts, batch_size, mine)
    with eval_mode(model):
        if state is None:
            kept = min(keep_images, n)
            clean = clean_correct_mask(model, dataset, indices, batch_size=batch_size,
                                       device=device)
            state = AttackState.start(
                dict(key or {}) if state_path is not None else {}, clean,
                image_store(dataset, indices, kept),
                stage_names)
        with ProgressBar(stage_names[0], 1, enabled=request.progress) as bar:
            while state.stage < len(stage_names):
                s = state.stage
                robust = f"robust {int(state.robust.sum())}/{n}"
                done = sum(1 for b in mine if b < state.batch)
                left = _remaining(state, declared, owned, starts)
                bar.update(completed=left.done, total=left.done + math.ceil(left.passes),
                           remaining=left.seconds, description=stage_names[s], info=robust)
                if state.batch < len(starts) and state.batch not in mine:
                    state.batch += 1  # another shard's batch
                    if state.batch < len(starts):
                        continue
                elif state.batch < len(starts):
                    where = f"{robust}, batch {done + 1}/{len(mine)}"
                    batches.attack(built(state.batch), state, starts[state.batch], batch_size,
                                   _heartbeat(bar, where, left) if request.progress else None)
                    state.batch += 1
                if state.batch >= len(starts):
                    state.stage, state.batch = state.stage + 1, 0
                state.stats["seconds"] = prior_seconds + time.perf_counter() - start
                if state_path is not None:
                    state.save(state_path)
            spent = max(_remaining(state, declared, owned, starts).done, 1)
            bar.update(completed=spent, total=spent, remaining=0.0,
                       info=f"robust {int(state.robust.sum())}/{n}")
    state.stats["seconds"] = prior_seconds + time.perf_counter() - start
    if state_path is not None:
        state.save(state_path)
    report = AttackReport.from_state(state, name, params, norm, eps, indices, request.seed)
    report.images = state.images if keep_images else None
    return report


def _origin(name: str) -> str:
    """Who provides the attack ``name`` in error messages: its distribution, or "built-in"
    for one the registry does not know (an attack object handed to the engine directly)."""
    from pagctl import registry
    from pagctl.errors import PluginError

    try:
        return registry.attacks.origin(name)
    except PluginError:
        return "built-in"


HEARTBEAT_SECONDS = 1.0
"""Within a batch, the bar shows the stage's forward count at most this often."""


def _heartbeat(bar: Any, where: str, left: RemainingCost) -> Callable[[int, int], None]:
    """A pass-count listener that refreshes ``bar`` (at most every HEARTBEAT_SECONDS): a
    stage on one batch can run for minutes (APGD-T's 9 targets × 100 steps), and the
    forward count in its text shows it is moving; the bar moves by the batch's passes, and
    its ETA by the passes ``left`` (the estimate at the batch's start) no longer has to
    spend. Off a terminal the bar's periodic line carries it into the log."""
    last = [time.monotonic()]

    def beat(forwards: int, backwards: int) -> None:
        now = time.monotonic()
        if now - last[0] >= HEARTBEAT_SECONDS:
            last[0] = now
            spent = forwards + backwards
            after = left.after(spent)
            bar.update(completed=after.done, total=after.done + math.ceil(after.passes),
                       remaining=after.seconds, info=f"{where}, {forwards:,} forwards")

    return beat


# ---------------------------------------------------------------------------------------
# the ETA


FALLBACK_PASSES = 1.0
"""Passes per point of a stage whose attack declares no cost, when no stage has been
measured or declared either: then every stage weighs the same per point."""


@dataclass(frozen=True)
class StageCost:
    """One stage as the ETA sees it: the model passes per attacked point its attack declares
    (`pagctl.protocols.declared_passes`, read from its params: an upper bound; None when it
    declares none), and what its finished batches measured (the stage's `StageRecord`:
    points attacked, passes, seconds)."""

    declared: float | None
    attacked: int = 0
    passes: int = 0
    seconds: float = 0.0


@dataclass(frozen=True)
class RemainingCost:
    """What a run has spent and has left: ``done`` model passes spent, ``passes`` the
    estimate of those to come, and the measured seconds per pass (None before any)."""

    done: int
    passes: float
    seconds_per_pass: float | None

    @property
    def seconds(self) -> float | None:
        """The estimated seconds left; None until a pass has been timed."""
        return None if self.seconds_per_pass is None else self.passes * self.seconds_per_pass

    def after(self, spent: int) -> RemainingCost:
        """The estimate once ``spent`` more passes went into the work it counted."""
        return RemainingCost(self.done + spent, max(self.passes - spent, 0.0),
                             self.seconds_per_pass)


def estimate_remaining(stages: Sequence[StageCost], current: int, to_attack: int,
                       robust: int) -> RemainingCost:
    """The cost left to a run now at stage ``current`` (``len(stages)`` once it is over),
    whose stage still has ``to_attack`` points to attack (those still robust in the batches
    it has not reached) and ``robust`` points still robust in all.

    The passes left are, for the current stage, ``to_attack`` × its passes per point (as its
    finished batches measured them, else as its attack declares), and for each later stage
    ``robust`` × its declared passes per point: every point still robust is one it may
    attack, an upper bound that shrinks as earlier stages break points; a point broken
    early in a stage that stops querying it (Square) costs less than declared. A stage
    that declares nothing costs, per point, the mean of the stages measured so far (else
    declared, else `FALLBACK_PASSES`). The seconds per pass are those the finished batches
    of all stages took over the passes they spent; a forward and a backward count one pass
    each, though a backward costs more and a forward without a gradient less.
    """
    measured = [st.passes / st.attacked for st in stages if st.attacked > 0]
    priced = measured or [st.declared for st in stages if st.declared is not None]
    fallback = sum(priced) / len(priced) if priced else FALLBACK_PASSES

    def per_point(stage: StageCost) -> float:
        if stage.attacked > 0:
            return stage.passes / stage.attacked
        return stage.declared if stage.declared is not None else fallback

    passes = 0.0
    if current < len(stages):
        passes = to_attack * per_point(stages[current])
        passes += sum(robust * per_point(stage) for stage in stages[current + 1:])
    done = sum(st.passes for st in stages)
    timed = sum(st.seconds for st in stages if st.passes > 0)
    return RemainingCost(done, passes, timed / done if done > 0 else None)


def _remaining(state: AttackState, declared: list[float | None], owned: Tensor,
               starts: list[int]) -> RemainingCost:
    """`estimate_remaining` of a run in ``state``, on its shard's points (``owned``)."""
    robust = state.robust & owned
    here = starts[state.batch] if state.batch < len(starts) else len(robust)
    stages = [StageCost(cost, record.attacked, record.forwards + record.backwards,
                        record.seconds) for cost, record in zip(declared, state.stages,
                                                                 strict=True)]
    return estimate_remaining(stages, state.stage, int(robust[here:].sum()),
                              int(robust.sum()))


def _owned_points(n: int, starts: list[int], batch_size: int, mine: list[int]) -> Tensor:
    """Which of the ``n`` points lie in the batches ``mine`` (a shard's). Shape: (n,) bool."""
    import torch

    owned = torch.zeros(n, dtype=torch.bool)
    for b in mine:
        owned[starts[b]: starts[b] + batch_size] = True
    return owned


def attack_key(model: nn.Module, dataset: Dataset[Any], indices: Tensor, *, name: str,
               params: BaseModel, stages: list[str], request: EvaluationRequest,
               model_sha256: str | None = None, data_sha256: str | None = None,
               ) -> dict[str, Any]:
    """What identifies one attack evaluation, for its resumable state and its shards
    (`pagctl.evaluation.state.evaluation_key`): the attack, its params and stages and the
    precision of the model's forward, besides what every evaluation's key holds. The
    digests of the model and of the subset's images are computed here unless the caller
    has them already."""
    from pagctl.data import subset_digest
    from pagctl.evaluation.state import evaluation_key
    from pagctl.provenance import model_digest

    return evaluation_key(
        {"attack": name, "params": params.model_dump(mode="json"), "stages": stages,
         "precision": request.precision},
        indices=indices, seed=request.seed, batch_size=request.batch_size,
        model_sha256=model_sha256 if model_sha256 is not None else model_digest(model),
        data_sha256=data_sha256 if data_sha256 is not None else subset_digest(dataset,
                                                                               indices))


@dataclass(frozen=True)
class _Batches:
    """What every batch of one run is attacked with: the model and points, the attack's
    name, declared budget and provider (for the boundary checks and their messages)."""

    model: nn.Module
    dataset: Dataset[Any]
    indices: Tensor
    name: str
    norm: str | None
    eps: float | None
    device: Any
    origin: str

    def attack(self, attack: Any, state: AttackState, lo: int, batch_size: int,
               heartbeat: Callable[[int, int], None] | None = None) -> None:
        """Run stage ``state.stage`` on the points of batch ``[lo, lo + batch_size)`` still
        robust; ``heartbeat`` hears the stage's running forward and backward counts."""
        import torch

        from pagctl.data import get_batch

        hi = min(lo + batch_size, len(self.indices))
        pos = torch.arange(lo, hi)[state.robust[lo:hi]]
        stage = state.stage
        report = state.stages[stage]
        if pos.numel() == 0:
            return
        stage_name, stage_attack = attack_stages(attack, self.name)[stage]
        label = stage_name if stage_name == self.name else f"{self.name}/{stage_name}"
        who = f"attack '{label}' ({self.origin})"
        x, y = get_batch(self.dataset, self.indices[pos])
        x, y = x.to(self.device), y.to(self.device)
        x_before = x.clone()
        snapshot = ModelSnapshot(self.model)
        counter = _PassCounter(self.model, heartbeat)
        t0 = time.perf_counter()
        try:
            x_adv = stage_attack(counter.module, x, y)
        except PagctlError:
            raise
        except Exception as exc:
            raise raised(who, exc) from exc
        report.seconds += time.perf_counter() - t0
        check_inputs_untouched(who, [(x, x_before)])
        check_attack_output(who, x, x_adv, self.norm, self.eps)
        snapshot.check(who)
        with torch.no_grad():
            fooled = (self.model(x_adv).argmax(dim=1) != y).cpu()
        report.attacked += int(pos.numel())
        report.broke += int(fooled.sum())
        report.forwards += counter.forwards
        report.backwards += counter.backwards
        state.robust[pos[fooled]] = False
        state.broken_by[pos[fooled]] = stage
        _record_perturbations(state, x, x_adv, pos)


def _record_perturbations(state: AttackState, x: Tensor, x_adv: Tensor, pos: Tensor) -> None:
    """The running maxima of the perturbations (L0 in pixels, L1, L2, L∞) and pixels, the NaN
    count, and the kept adversarial images, after one batch's stage."""
    import torch

    delta = (x_adv - x).flatten(1)
    stats = state.stats
    stats["max_l1"] = max(stats.get("max_l1", 0.0), float(delta.abs().sum(dim=1).max()))
    stats["max_l2"] = max(stats["max_l2"], float(delta.norm(dim=1).max()))
    stats["max_linf"] = max(stats["max_linf"], float(delta.abs().max()))
    pixels = float(perturbation_norms(x_adv - x, "l0").max())  # pixels changed, any channel
    stats["max_l0"] = max(stats.get("max_l0", 0.0), pixels)
    stats["pixel_min"] = min(stats["pixel_min"], float(x_adv.min()))
    stats["pixel_max"] = max(stats["pixel_max"], float(x_adv.max()))
    stats["nan_count"] += int(torch.isnan(x_adv).sum())
    kept = pos < len(state.images)
    if bool(kept.any()):
        state.images[pos[kept]] = x_adv[kept.to(x_adv.device)].detach().float().cpu()
