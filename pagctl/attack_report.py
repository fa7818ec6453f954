"""What an attack run records: the report, its parts, and the ``--state`` file.

`AttackReport` (with one `StageReport` per stage) is what `pagctl.attack.run_attack`
returns; `AttackReport.to_record` is its JSON form. Accuracies carry Wilson 95% intervals
(`wilson_interval`); which points were correct is kept as hex bit strings (`pack_bits`,
`unpack_bits`) and the subset as a digest of its indices (`subset_record`). `_Progress` is
the run in progress, saved to the ``--state`` file after every batch and loaded to resume.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagctl.errors import SpecError

if TYPE_CHECKING:
    from pydantic import BaseModel
    from torch import Tensor

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
