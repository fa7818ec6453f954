"""Two runs' per-point results side by side (`pair`): the points both defend, one only, or
neither, and the exact McNemar test of the difference. The one pairing of runs: compare's
pairs (`pagctl.compare.build`) and the study's verdicts (`pagctl.study.report`) both come
from here, so they cannot disagree on which results may be paired or how they are counted.

Paired only on the same points, named as the records name them: the same n, the same
digest of the indices (``subset.indices_sha256``) and of the images
(``subset.data_sha256``, or what stands for it). Bit i of one run is then the same image as
bit i of the other; with other indices, or the same indices of another split or data
folder, the test would pair strangers. Unknown indices are never taken for the same.
"""

from __future__ import annotations

from dataclasses import dataclass

from pagctl.stats import mcnemar_exact


@dataclass(frozen=True)
class PointResults:
    """One run's per-point results under one attack and the points they are of: ``bits``
    (`pagctl.stats.bits_as_int`: point 0 in the highest of ``n`` bits, 1 where the point
    was defended), ``indices_sha256`` (None: not recorded) and ``data_sha256``."""

    n: int
    bits: int
    indices_sha256: str | None
    data_sha256: str | None

    @property
    def points(self) -> tuple[int, str | None, str | None]:
        """What names the measured points: (n, indices digest, images digest)."""
        return self.n, self.indices_sha256, self.data_sha256


def same_points(a: PointResults, b: PointResults) -> bool:
    """Whether ``a`` and ``b`` were measured on the same points (n and both digests equal,
    the indices' digest known), so that they may be paired."""
    return a.indices_sha256 is not None and a.points == b.points


@dataclass(frozen=True)
class Paired:
    """Two runs on the same ``n`` points: defended by both, by A only, by B only, by
    neither, and the exact two-sided McNemar p-value (a binomial test of ``a_only`` against
    ``a_only + b_only`` draws at 1/2; the points both or neither defend carry no
    information about the difference)."""

    n: int
    both: int
    a_only: int
    b_only: int
    neither: int
    p_value: float


def pair(a: PointResults, b: PointResults) -> Paired:
    """``a`` and ``b`` point by point. ValueError when they were not measured on the same
    points (`same_points`): callers ask first, and say "no test" in their own words."""
    if not same_points(a, b):
        raise ValueError(f"cannot pair {a.n} points with {b.n} points of other indices or "
                         "images: measure both on the same points")
    full = (1 << a.n) - 1
    both = (a.bits & b.bits).bit_count()
    a_only = (a.bits & ~b.bits & full).bit_count()
    b_only = (b.bits & ~a.bits & full).bit_count()
    return Paired(n=a.n, both=both, a_only=a_only, b_only=b_only,
                  neither=a.n - both - a_only - b_only, p_value=mcnemar_exact(a_only, b_only))
