"""`AttackState`: the progress of one attack run, saved to the ``--state`` file (or a
shard's file) after every batch and loaded to resume where the run stopped, or to merge.

Its file is the one evaluation state (`pagctl.evaluation.state.KeyedState`: version, key,
payload digest, atomic save, refusals naming what differs); its payload is the per-point
tensors (clean, robust, the stage that broke each point, the kept adversarial images) and,
in its metadata, the counters and the per-stage reports. Its key adds the attack, its
params and stages and the precision to what every evaluation's key holds.

On load the payload must keep the engine's invariants (`AttackState.problem`: sizes equal
the subset, robust only where clean-correct, a breaking stage exactly where a clean-correct
point is no longer robust, each stage's count of broken points equal to its bits). A file
rewritten consistently by hand is not caught by them; the merge of shards checks the clean
bits against the model once more (`pagctl.robustness.evaluate`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from pagctl.evaluation.state import KeyedState
from pagctl.records import StageRecord

if TYPE_CHECKING:
    from torch import Tensor

@dataclass
class AttackState(KeyedState):
    """Everything an interrupted run needs to go on, and nothing it could recompute.

    Shape: clean, robust (n,) bool; broken_by (n,) int64 (the stage that broke each point,
    -1: none); images (k, C, H, W) float32, the adversarial versions of the first k points.
    ``stage``/``batch``: the next batch to attack; ``stats``: running maxima of the
    perturbations and pixels, NaN count and seconds.
    """

    key: dict[str, Any]
    clean: Tensor
    robust: Tensor
    broken_by: Tensor
    images: Tensor
    stage: int = 0
    batch: int = 0
    stages: list[StageRecord] = field(default_factory=list)
    stats: dict[str, float] = field(default_factory=dict)

    VERSION: ClassVar[int] = 2
    METADATA_KEY: ClassVar[str] = "pagctl_attack_state"
    WHAT: ClassVar[str] = "attack state file"
    WORDS: ClassVar[dict[str, str]] = {"attack": "attack", "stages": "stages"}

    @classmethod
    def start(cls, key: dict[str, Any], clean: Tensor, images: Tensor,
              stage_names: list[str]) -> AttackState:
        """A fresh run: every clean-correct point robust so far, nothing attacked yet."""
        import torch

        n = clean.shape[0]
        return cls(key=key, clean=clean, robust=clean.clone(),
                   broken_by=torch.full((n,), -1, dtype=torch.int64), images=images,
                   stages=[StageRecord(name=s, attacked=0, broke=0, forwards=0, backwards=0,
                                       seconds=0.0) for s in stage_names],
                   stats={"max_l0": 0.0, "max_l1": 0.0, "max_l2": 0.0, "max_linf": 0.0,
                          "pixel_min": 1.0, "pixel_max": 0.0, "nan_count": 0,
                          "seconds": 0.0})

    def payload(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        import torch

        return ({"clean": self.clean.to(torch.uint8), "robust": self.robust.to(torch.uint8),
                 "broken_by": self.broken_by, "images": self.images},
                {"stage": self.stage, "batch": self.batch,
                 "stages": [s.model_dump() for s in self.stages], "stats": self.stats})

    @classmethod
    def restore(cls, key: dict[str, Any], tensors: dict[str, Tensor],
                meta: dict[str, Any]) -> AttackState:
        import torch

        return cls(key=key, clean=tensors["clean"].to(torch.bool),
                   robust=tensors["robust"].to(torch.bool),
                   broken_by=tensors["broken_by"].to(torch.int64), images=tensors["images"],
                   stage=int(meta["stage"]), batch=int(meta["batch"]),
                   stages=[StageRecord(**s) for s in meta["stages"]],
                   stats={k: float(v) for k, v in meta["stats"].items()})

    def unfinished(self) -> str | None:
        if self.stage < len(self.stages):
            return f"stage {self.stage + 1} of {len(self.stages)}"
        return None

    def problem(self) -> str | None:
        """The first invariant of the engine this state breaks (module docstring), or
        None."""
        import torch

        n = int(self.key.get("n", -1))
        if any(t.shape != (n,) for t in (self.clean, self.robust, self.broken_by)):
            return f"its per-point tensors are not {n} long"
        if self.images.dim() and self.images.shape[0] > n:
            return f"it keeps {self.images.shape[0]} images of {n} points"
        if bool((self.robust & ~self.clean).any()):
            return "a point is robust but not classified correctly clean"
        stages = len(self.stages)
        if bool(((self.broken_by < -1) | (self.broken_by >= stages)).any()):
            return f"a point is broken by a stage that is not one of its {stages}"
        if not torch.equal(self.broken_by >= 0, self.clean & ~self.robust):
            return "the points broken by a stage are not the clean-correct points no longer " \
                   "robust"
        for j, record in enumerate(self.stages):
            if int((self.broken_by == j).sum()) != record.broke:
                return f"stage '{record.name}' counts {record.broke} broken points but its " \
                       f"bits {int((self.broken_by == j).sum())}"
        if not 0 <= self.stage <= stages or self.batch < 0:
            return f"its position (stage {self.stage}, batch {self.batch}) is out of range"
        for name, value in self.stats.items():  # counts, seconds, perturbation maxima
            if not math.isfinite(value):
                return f"its {name} is {value}"
            if name not in ("pixel_min", "pixel_max") and value < 0:
                return f"its {name} is {value}, below 0"
        if self.stats.get("nan_count", 0) != int(self.stats.get("nan_count", 0)):
            return "its nan_count is not a count"
        return None

    @classmethod
    def merge(cls, parts: list[AttackState]) -> AttackState:
        """The state of the whole run from its N finished shards (``parts[i]`` is shard i/N,
        each keyed like the whole run plus ``shard: [i, N]``).

        Per point the owner of its batch decides: a shard leaves the points of other shards as
        clean-correct-and-unattacked, so robust is the AND over shards, the breaking stage the
        largest; stage counters and seconds add up, the perturbation and pixel extremes take
        the extreme. Shards keep no images, nor does the merge. ValueError when the states are
        not the N shards of one finished evaluation."""
        import torch

        states = parts
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
        return cls(key=keys[0], clean=first.clean.clone(), robust=robust, broken_by=broken_by,
                   images=torch.zeros(0), stage=len(stages), batch=0, stages=stages, stats=stats)
