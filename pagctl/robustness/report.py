"""What an attack run reports: `AttackReport`, with one `pagctl.records.StageRecord` per
stage.

`pagctl.robustness.engine.run_attack` returns it; `AttackReport.to_record` is its line of
metrics.jsonl (`pagctl.records.AttackRecord`). Accuracies carry Wilson 95% intervals; which
points were correct is kept both as boolean tensors (``clean_mask``, ``robust_mask``, for
the caller) and as hex bit strings (``per_example``, for the record); the subset is named
by a digest of its indices (`pagctl.stats`). When the caller attaches the points' test-set
``indices`` and ``labels`` (`pagctl.robustness.evaluate` does), the report also gives the
counts per true class (`per_class`, in the record) and one row per point (`to_records`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pagctl.records import (
    AttackRecord,
    ClassCounts,
    PerExample,
    Reliability,
    StageRecord,
    Subset,
)
from pagctl.stats import pack_bits, subset_record, wilson_interval

if TYPE_CHECKING:
    from pydantic import BaseModel
    from torch import Tensor

    from pagctl.robustness.adversarial import AdversarialExamples
    from pagctl.robustness.state import AttackState


@dataclass
class AttackReport:
    """Clean and robust accuracy of one attack on one subset, and how it was measured.

    ``norm`` and ``eps`` are the budget the attack declares (`pagctl.protocols
    .declared_budget`), None when it declares none. ``clean_mask`` / ``robust_mask``: which
    points were correct, (n,) bool on the CPU; ``per_example`` holds the same as hex.
    """

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
    max_l1: float
    max_l0: float
    """The most pixels changed in one point (any channel; `pagctl.protocols.NORMS`)."""
    pixel_min: float
    pixel_max: float
    nan_count: int
    forwards: int
    backwards: int
    seconds: float
    clean_mask: Tensor = field(repr=False)
    robust_mask: Tensor = field(repr=False)
    stages: list[StageRecord] = field(default_factory=list)
    subset: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    per_example: dict[str, str] = field(default_factory=dict)
    reliability: dict[str, Any] | None = None
    precision: str = "float32"
    """The model's forward: float32, or bfloat16 autocast (opt-in, marked in the record)."""
    images: Tensor | None = field(default=None, repr=False)
    """Adversarial versions of the first ``keep_images`` points (not part of the record)."""
    indices: Tensor | None = field(default=None, repr=False)
    """The points' positions in the test set, (n,) int64, when the caller attached them."""
    labels: Tensor | None = field(default=None, repr=False)
    """The points' true classes, (n,) int64, when the caller attached them."""
    adversarial: AdversarialExamples | None = field(default=None, repr=False)
    """Every point's adversarial example, when the evaluation kept them all
    (`pagctl.robustness.adversarial`; not part of the record)."""
    model_sha256: str | None = None
    """Which model was measured (`pagctl.provenance.model_digest`), when the caller attached
    it (`pagctl.robustness.evaluate` does; the subset then has ``data_sha256`` too)."""

    @property
    def reliable(self) -> bool | None:
        """The probes' verdict: True when no probe fired, None when they did not run."""
        if self.reliability is None:
            return None
        return bool(self.reliability.get("reliable"))

    def per_class(self) -> dict[str, ClassCounts]:
        """Points, clean-correct and robust-correct counts per true class (by class index,
        as a string key), in class order; empty without ``labels``."""
        if self.labels is None:
            return {}
        out: dict[str, ClassCounts] = {}
        for label in sorted(set(self.labels.tolist())):
            mine = self.labels == label
            out[str(label)] = ClassCounts(
                n=int(mine.sum()), clean_correct=int((self.clean_mask & mine).sum()),
                robust_correct=int((self.robust_mask & mine).sum()))
        return out

    def to_records(self) -> list[dict[str, Any]]:
        """One row per attacked point, for a table or ``pandas.DataFrame(report.to_records())``:
        its position (``index`` in the test set when attached, else in the subset), ``label``
        (None when not attached), and whether it was correct clean and under attack."""
        positions = self.indices.tolist() if self.indices is not None else list(range(self.n))
        labels = self.labels.tolist() if self.labels is not None else [None] * self.n
        return [{"index": int(i), "label": lab, "clean_correct": bool(c),
                 "robust_correct": bool(r), "attack": self.attack, "eps": self.eps,
                 "norm": self.norm}
                for i, lab, c, r in zip(positions, labels, self.clean_mask.tolist(),
                                        self.robust_mask.tolist(), strict=True)]

    @classmethod
    def from_state(cls, state: AttackState, name: str, params: BaseModel, norm: str | None,
                   eps: float | None, indices: Tensor, seed: int) -> AttackReport:
        """The report of a finished (or stopped) run. Shape: indices (n,)."""
        n = len(indices)
        clean_k, robust_k = int(state.clean.sum()), int(state.robust.sum())
        stats = state.stats
        return cls(
            attack=name, params=params.model_dump(mode="json"), n=n,
            clean_correct=clean_k, robust_correct=robust_k,
            clean_accuracy=clean_k / n if n else 0.0,
            robust_accuracy=robust_k / n if n else 0.0,
            clean_interval=wilson_interval(clean_k, n),
            robust_interval=wilson_interval(robust_k, n), norm=norm, eps=eps,
            max_l2=stats["max_l2"], max_linf=stats["max_linf"],
            max_l1=stats.get("max_l1", 0.0), max_l0=stats.get("max_l0", 0.0),
            pixel_min=stats["pixel_min"] if stats["pixel_min"] <= stats["pixel_max"] else 0.0,
            pixel_max=stats["pixel_max"], nan_count=int(stats["nan_count"]),
            forwards=sum(s.forwards for s in state.stages),
            backwards=sum(s.backwards for s in state.stages),
            seconds=float(stats["seconds"]), clean_mask=state.clean.clone(),
            robust_mask=state.robust.clone(), stages=state.stages,
            subset=subset_record(indices), seed=seed,
            per_example={"clean": pack_bits(state.clean), "robust": pack_bits(state.robust)},
        )

    def to_record(self, params_given: dict[str, Any] | None = None) -> AttackRecord:
        """The metrics.jsonl record; ``params_given``: the parameters as the user typed them
        (e.g. eps "8/255")."""
        record = AttackRecord(
            attack=self.attack, params=self.params, n=self.n,
            clean_correct=self.clean_correct, robust_correct=self.robust_correct,
            clean_accuracy=self.clean_accuracy, robust_accuracy=self.robust_accuracy,
            clean_interval=self.clean_interval, robust_interval=self.robust_interval,
            norm=self.norm, eps=self.eps, max_l2=self.max_l2, max_linf=self.max_linf,
            max_l1=self.max_l1, max_l0=self.max_l0,
            pixel_min=self.pixel_min, pixel_max=self.pixel_max, nan_count=self.nan_count,
            forwards=self.forwards, backwards=self.backwards, seconds=self.seconds,
            stages=list(self.stages),
            subset=Subset(**self.subset), seed=self.seed,
            per_example=PerExample(**self.per_example),
            reliability=Reliability(**self.reliability) if self.reliability is not None
            else None)
        if params_given is not None:
            record.params_given = params_given
        if self.precision != "float32":
            record.precision = self.precision
        if self.model_sha256 is not None:
            record.model_sha256 = self.model_sha256
        per_class = self.per_class()
        if per_class:
            record.per_class = per_class
        return record
