"""`AttackState`: the progress of one attack run, saved to the ``--state`` file after every
batch and loaded to resume where the run stopped.

One safetensors file: the per-point tensors (clean, robust, the stage that broke each point,
the kept adversarial images) and, in its metadata, the counters, the per-stage reports and
the run's *key* (attack, params, seed, batch size, stages, and digests of the subset's
indices, of its images and labels, and of the model's weights). A state is resumed only by
the evaluation whose key it holds; anything else is refused, naming what differs. Written
atomically, so a killed run leaves the previous batch's state.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagctl.errors import SpecError
from pagctl.records import StageRecord

if TYPE_CHECKING:
    from torch import Tensor

STATE_VERSION = 1
METADATA_KEY = "pagctl_attack_state"
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

        from pagctl.checkpoint import atomic_save_tensors

        meta = {"version": STATE_VERSION, "key": self.key, "stage": self.stage,
                "batch": self.batch, "stages": [s.model_dump() for s in self.stages],
                "stats": self.stats}
        atomic_save_tensors(
            {"clean": self.clean.to(torch.uint8), "robust": self.robust.to(torch.uint8),
             "broken_by": self.broken_by, "images": self.images},
            path, metadata={METADATA_KEY: json.dumps(meta)})

    @classmethod
    def load(cls, path: Path, key: dict[str, Any]) -> AttackState:
        """The state at ``path``, which must have been written for ``key``; SpecError (one
        line, naming ``--state`` and what differs) otherwise."""
        import torch
        from safetensors import safe_open

        from pagctl.checkpoint import load_tensors

        tensors = load_tensors(path)
        with safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
        meta = json.loads(raw) if raw else None
        if not isinstance(meta, dict) or meta.get("version") != STATE_VERSION:
            raise SpecError(f"--state {path}: not a pagctl attack state file; pass a new path "
                            "or delete the file")
        if meta["key"] != key:
            differ = [_WHAT.get(k, k) for k in sorted(set(key) | set(meta["key"]))
                      if key.get(k) != meta["key"].get(k)]
            raise SpecError(f"--state {path}: written by a different evaluation (its "
                            f"{', '.join(differ)} differ); pass a new path or delete the file")
        return cls(key=key, clean=tensors["clean"].to(torch.bool),
                   robust=tensors["robust"].to(torch.bool), broken_by=tensors["broken_by"],
                   images=tensors["images"], stage=int(meta["stage"]),
                   batch=int(meta["batch"]),
                   stages=[StageRecord(**s) for s in meta["stages"]], stats=meta["stats"])
