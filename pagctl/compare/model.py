"""The comparison's data: metric columns, cells, rows, pairs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pagctl.compare.pairing import Paired


@dataclass
class Column:
    """A metric column. ``kind``: clean | robust | align | align_monitor."""

    id: str
    kind: str
    attack: str | None = None
    norm: str | None = None
    eps: float | None = None
    source: str | None = None
    source_params: dict[str, Any] | None = None
    mismatch: str | None = None
    """Set (with force) when the column holds numbers measured on different subsets."""

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "attack": self.attack, "norm": self.norm,
                "eps": self.eps, "source": self.source, "source_params": self.source_params,
                "mismatch": self.mismatch}


@dataclass
class Cell:
    """One run's value in one metric column, and how it was measured."""

    value: float
    n: int | None
    interval: tuple[float, float] | None
    subset_sha: str | None
    subset_count: int | None
    line: int
    """Line of metrics.jsonl the value comes from (1-based)."""
    record_kind: str
    stale: bool = False
    """Written before the run's last training epoch: measured on older weights."""
    reliable: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    bits: int | None = field(default=None, repr=False)
    """Per-example robust bits, point 0 in the highest of n bits (robust columns only)."""
    images_sha: str | None = None
    """Which images those indices were: the record's ``subset.data_sha256``; for a record
    that predates it, ``spec:`` and a digest of the run's data source (dataset, folder,
    split), so records of two different sources never count as the same points."""

    @property
    def points(self) -> tuple[str | None, str | None]:
        """What makes two cells measurements of the same points: indices and images."""
        return self.subset_sha, self.images_sha

    def to_json(self) -> dict[str, Any]:
        return {"value": self.value, "n": self.n,
                "interval": list(self.interval) if self.interval else None,
                "subset_sha256": self.subset_sha, "subset_count": self.subset_count,
                "data_sha256": self.images_sha,
                "record": self.record_kind, "line": self.line, "stale": self.stale,
                "reliable": self.reliable, **self.extra}


@dataclass
class Row:
    label: str
    """The run's name, or its folder when the name is not unique among the runs."""
    name: str
    run_dir: Path
    spec: dict[str, Any]
    """Flattened spec (every field); the table shows ``Comparison.spec_columns`` of it."""
    epochs_trained: int | None
    cells: dict[str, Cell] = field(default_factory=dict)


@dataclass(frozen=True)
class Pair(Paired):
    """Per-example robust results of two runs on one column (the same points: indices and
    images): the counts and test of `pagctl.compare.pairing.pair`, and whose they are."""

    column: str
    run_a: str
    run_b: str

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))


@dataclass
class Comparison:
    rows: list[Row]
    spec_columns: list[str]
    """Dotted spec fields that differ across the runs, in display order."""
    columns: list[Column]
    pairs: list[Pair]
    warnings: list[str]
    mismatches: list[str] = field(default_factory=list)
    """Numbers put side by side although measured on different subsets, ε or norms (each
    such column is marked; ``strict=True`` refuses them instead)."""
    weights: str = "last"
    """Whose results: the runs' last weights, or their best by validation (``--weights``)."""
