"""The statistics every report shares: intervals, tests, correlation, subset digests and
per-example bits.

- `wilson_interval`: 95% interval of an accuracy (attack reports, compare, the toy study);
- `mean_interval`: 95% normal interval of a mean (the alignment score);
- `mcnemar_exact`: exact two-sided McNemar test of two models on the same points;
- `pearson`: correlation of alignment and robustness across runs;
- `indices_digest` / `first_n_digest` / `subset_record`: which test points were used;
- `tensors_digest`: which weights, or which images, exactly;
- `pack_bits` / `unpack_bits` / `bits_as_int`: which points were correct, as hex strings.

Importing this module imports neither torch nor numpy (``compare`` reads hundreds of runs
with it); the tensor helpers import them when called.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["Z95", "bits_as_int", "first_n_digest", "indices_digest", "mcnemar_exact",
           "mean_interval", "pack_bits", "pearson", "subset_record", "tensors_digest",
           "unpack_bits", "wilson_interval"]

Z95 = 1.959963984540054
"""The standard normal quantile of 0.975: a two-sided 95% interval."""


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion ``k / n`` (95% by default).

    Unlike the normal approximation it stays inside [0, 1] and is not empty at k = 0 or n.
    It always holds ``k / n`` and is exact at the ends: the lower bound is 0.0 at k = 0 and
    the upper bound 1.0 at k = n (the formula alone leaves float noise there).
    """
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    low = 0.0 if k <= 0 else min(p, max(0.0, centre - half))
    high = 1.0 if k >= n else max(p, min(1.0, centre + half))
    return (low, high)


def error_bars(values: Sequence[float],
               intervals: Sequence[tuple[float, float] | None]) -> list[list[float]]:
    """matplotlib's ``yerr``/``xerr`` for points with intervals: [below, above] lengths,
    never negative (an interval that misses its point by float noise gives 0, not a
    negative bar), and 0 for a point without an interval."""
    below, above = [], []
    for value, interval in zip(values, intervals, strict=True):
        lo, hi = interval if interval is not None else (value, value)
        below.append(max(0.0, value - lo))
        above.append(max(0.0, hi - value))
    return [below, above]


def mean_interval(mean: float, sd: float, n: int, *, low: float = -math.inf,
                  high: float = math.inf, z: float = Z95) -> tuple[float, float]:
    """Normal 95% interval of a mean of ``n`` values with sample standard deviation ``sd``,
    clipped to [low, high]; a single value (n <= 1) gives the point itself."""
    half = z * sd / math.sqrt(n) if n > 1 else 0.0
    return (max(low, mean - half), min(high, mean + half))


def mcnemar_exact(b: int, c: int) -> float:
    """Exact two-sided McNemar p-value: 2·P(X <= min(b, c)), X ~ Binomial(b + c, 1/2),
    capped at 1. The binomial sum is taken in exact integers from the largest term down and
    stops once a term no longer changes a double (terms shrink geometrically there)."""
    n, k = b + c, min(b, c)
    if n == 0 or 2 * k == n:
        return 1.0
    term = math.comb(n, k)
    total = 0
    i = k
    while i >= 0 and term:
        total += term
        if term < total >> 64:
            break
        term = term * i // (n - i + 1)
        i -= 1
    return min(1.0, 2 * total / (1 << n))


def pearson(xs: list[float], ys: list[float]) -> float | None:
    """Pearson correlation; None with fewer than 3 points or without variation."""
    n = len(xs)
    if n < 3 or max(xs) == min(xs) or max(ys) == min(ys):
        return None  # (tested exactly: a mean's rounding must not pass for variation)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx <= 0 or syy <= 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / math.sqrt(sxx * syy)


def ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties given their average rank (what Spearman's correlation uses)."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Spearman's rank correlation (Pearson's on average ranks); None as `pearson`."""
    return pearson(ranks(xs), ranks(ys))


def bootstrap_correlations(
    x_per_run: Sequence[Sequence[float]], y_per_run: Sequence[Sequence[float]], *,
    resamples: int = 2000, seed: int = 0, level: float = 0.95,
) -> dict[str, tuple[float | None, tuple[float, float] | None]]:
    """Pearson's and Spearman's correlation across runs of the runs' mean x and mean y (e.g.
    alignment and robust accuracy), with percentile intervals from a bootstrap over test
    points.

    Every run was measured on the same n points: ``x_per_run[r][i]`` and
    ``y_per_run[r][i]`` belong to point i. A resample draws n points with replacement (the
    same points for every run), recomputes each run's means and the correlations; the
    interval holds the central ``level`` of the resampled correlations (resamples where one
    is undefined, without variation, are left out). Returns ``{"pearson": (r, interval),
    "spearman": (rho, interval)}``; a correlation is None with fewer than 3 runs or without
    variation, and its interval None when it is or when fewer than half the resamples
    define it."""
    import numpy as np

    xs, ys = np.asarray(x_per_run, dtype=np.float64), np.asarray(y_per_run, dtype=np.float64)
    if xs.ndim != 2 or xs.shape != ys.shape:
        raise ValueError(f"x and y must be (runs, points) of one shape, got {xs.shape} and "
                         f"{ys.shape}")
    runs, points = xs.shape
    estimate = {"pearson": pearson(xs.mean(axis=1).tolist(), ys.mean(axis=1).tolist()),
                "spearman": spearman(xs.mean(axis=1).tolist(), ys.mean(axis=1).tolist())}
    draws: dict[str, list[float]] = {"pearson": [], "spearman": []}
    if runs >= 3 and points > 0:
        rng = np.random.default_rng(seed)
        for _ in range(resamples):
            pick = rng.integers(0, points, size=points)
            mx, my = xs[:, pick].mean(axis=1).tolist(), ys[:, pick].mean(axis=1).tolist()
            for name, fn in (("pearson", pearson), ("spearman", spearman)):
                value = fn(mx, my)
                if value is not None:
                    draws[name].append(value)
    out: dict[str, tuple[float | None, tuple[float, float] | None]] = {}
    tail = (1 - level) / 2 * 100
    for name, r in estimate.items():
        got = draws[name]
        interval = None
        if r is not None and len(got) >= resamples / 2:
            lo, hi = np.percentile(got, [tail, 100 - tail])
            interval = (float(lo), float(hi))
        out[name] = (r, interval)
    return out


# ---------------------------------------------------------------------------------------
# which points: subset digests


def _digest(values: Iterable[int]) -> str:
    """sha256 of the values as native int64, first 16 hex digits."""
    return hashlib.sha256(array("q", values).tobytes()).hexdigest()[:16]


def indices_digest(indices: Tensor) -> str:
    """The digest that names a subset of test points. Shape: (n,) int64."""
    return _digest(int(i) for i in indices.detach().cpu().reshape(-1).tolist())


_FIRST_N: dict[int, str] = {}


def first_n_digest(n: int) -> str:
    """`indices_digest` of ``arange(n)`` (the first n test points), cached, without torch."""
    if n not in _FIRST_N:
        _FIRST_N[n] = _digest(range(n))
    return _FIRST_N[n]


def tensors_digest(items: Iterable[tuple[str, Tensor]]) -> str:
    """sha256 (16 hex digits) over named tensors: each name, dtype, shape and bytes, in the
    order given. Names a model's weights (its state dict) or the images of a subset."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in items:
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        if t.numel():  # the raw bytes, whatever the dtype (bool, bfloat16 included)
            digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def subset_record(indices: Tensor) -> dict[str, Any]:
    """How a record names its test points: count, digest, first and last index."""
    n = len(indices)
    return {"count": n, "indices_sha256": indices_digest(indices),
            "first": int(indices[0]) if n else None, "last": int(indices[-1]) if n else None}


# ---------------------------------------------------------------------------------------
# which points were correct: per-example bits


def pack_bits(mask: Tensor) -> str:
    """A boolean vector as a hex string, 8 points per byte, first point in the high bit."""
    import numpy as np

    return bytes(np.packbits(mask.detach().cpu().numpy().astype(bool))).hex()


def unpack_bits(text: str, n: int) -> Tensor:
    """Inverse of :func:`pack_bits`. Shape: -> (n,) bool."""
    import numpy as np
    import torch

    bits = np.unpackbits(np.frombuffer(bytes.fromhex(text), dtype=np.uint8))[:n]
    return torch.from_numpy(bits.astype(bool))


def bits_as_int(text: str, n: int) -> int:
    """A :func:`pack_bits` string as an int, point 0 in bit n - 1 (set algebra without
    numpy: ``(a & ~b).bit_count()`` counts the points only A gets right)."""
    if n == 0:
        return 0
    return int(text, 16) >> (4 * len(text) - n)
