"""Statistics: Wilson intervals, the exact McNemar test, Pearson's r, subset digests."""

from __future__ import annotations

import hashlib
import math
from array import array


def wilson_interval(k: int, n: int) -> tuple[float, float]:
    """95% Wilson score interval of ``k / n`` (the one ``pagctl attack`` reports)."""
    from pagctl.attack_report import wilson_interval as wilson

    return wilson(k, n)


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
    if n < 3:
        return None
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    if sxx <= 0 or syy <= 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / math.sqrt(sxx * syy)


_DIGESTS: dict[int, str] = {}


def first_n_digest(n: int) -> str:
    """``pagctl.attack.indices_digest(arange(n))`` without numpy: sha256 of int64s."""
    if n not in _DIGESTS:
        _DIGESTS[n] = hashlib.sha256(array("q", range(n)).tobytes()).hexdigest()[:16]
    return _DIGESTS[n]
