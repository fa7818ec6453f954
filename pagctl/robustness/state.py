"""`AttackState`: the progress of one attack run, saved to the ``--state`` file (or a
shard's file) after every batch and loaded to resume where the run stopped, or to merge.

One safetensors file: the per-point tensors (clean, robust, the stage that broke each point,
the kept adversarial images) and, in its metadata, the counters, the per-stage reports and
the run's *key* (attack, params, seed, batch size, stages, precision, and digests of the
subset's indices, of its images and labels, and of the model). A state is resumed only by
the evaluation whose key it holds; anything else is refused, naming what differs. Written
atomically, so a killed run leaves the previous batch's state.

A state checks itself on load (`AttackState.load`): the metadata carries a digest of the
whole payload (`pagctl.checkpoint.save_checked`), so a damaged file or a hand edit is
refused, naming the file; and the payload must keep the engine's invariants (sizes equal the
subset, robust only where clean-correct, a breaking stage exactly where a clean-correct
point is no longer robust, each stage's count of broken points equal to its bits). A file
rewritten consistently by hand is not caught by either; the merge of shards checks the clean
bits against the model once more (`pagctl.robustness.evaluate`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagctl.records import StageRecord

if TYPE_CHECKING:
    from torch import Tensor

STATE_VERSION = 2
METADATA_KEY = "pagctl_attack_state"
WHAT = "attack state file"
_WHAT = {"model_sha256": "model weights", "data_sha256": "test images or labels",
         "indices_sha256": "test indices", "n": "number of points", "attack": "attack",
         "params": "params", "seed": "seed", "batch_size": "batch size",
         "stages": "stages"}


@dataclass
class AttackState:
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
                   stats={"max_l1": 0.0, "max_l2": 0.0, "max_linf": 0.0, "pixel_min": 1.0,
                          "pixel_max": 0.0, "nan_count": 0, "seconds": 0.0})

    def save(self, path: Path) -> None:
        import torch

        from pagctl.checkpoint import save_checked

        meta = {"version": STATE_VERSION, "key": self.key, "stage": self.stage,
                "batch": self.batch, "stages": [s.model_dump() for s in self.stages],
                "stats": self.stats}
        save_checked(path, {"clean": self.clean.to(torch.uint8),
                            "robust": self.robust.to(torch.uint8),
                            "broken_by": self.broken_by, "images": self.images},
                     METADATA_KEY, meta)

    @classmethod
    def load(cls, path: Path, key: dict[str, Any]) -> AttackState:
        """The state at ``path``, which must have been written for ``key``; SpecError (one
        line, naming the file and what differs) otherwise, CheckpointError naming the file
        when it is damaged, edited, or breaks the engine's invariants (module docstring)."""
        import torch
        from pydantic import ValidationError

        from pagctl.checkpoint import contradiction, load_checked

        tensors, meta = load_checked(path, METADATA_KEY, WHAT, version=STATE_VERSION,
                                     expected=key, names=_WHAT)
        try:
            state = cls(key=key, clean=tensors["clean"].to(torch.bool),
                        robust=tensors["robust"].to(torch.bool),
                        broken_by=tensors["broken_by"].to(torch.int64),
                        images=tensors["images"], stage=int(meta["stage"]),
                        batch=int(meta["batch"]),
                        stages=[StageRecord(**s) for s in meta["stages"]],
                        stats={k: float(v) for k, v in meta["stats"].items()})
        except (KeyError, TypeError, ValueError, AttributeError, ValidationError) as exc:
            raise contradiction(path, WHAT, f"incomplete: {type(exc).__name__}: "
                                f"{str(exc).splitlines()[0][:80]}") from None
        problem = state.problem()
        if problem is not None:
            raise contradiction(path, WHAT, problem)
        return state

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
