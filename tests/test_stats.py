"""`pagctl.stats`: intervals, the exact McNemar test, Pearson, subset digests and
per-example bits, against known values and independent implementations."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from pagctl.stats import (
    bits_as_int,
    bootstrap_correlations,
    error_bars,
    first_n_digest,
    indices_digest,
    mcnemar_exact,
    mean_interval,
    pack_bits,
    pearson,
    ranks,
    spearman,
    subset_record,
    unpack_bits,
    wilson_interval,
)


def test_wilson_interval_known_values() -> None:
    lo, hi = wilson_interval(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(1 - 0.2775, abs=1e-4)
    # the interval shrinks like 1/sqrt(n) and always holds the estimate
    for k, n in ((3, 7), (50, 100), (500, 1000)):
        lo, hi = wilson_interval(k, n)
        assert lo <= k / n <= hi
    assert wilson_interval(500, 1000)[1] - wilson_interval(500, 1000)[0] < 0.07
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_mean_interval_is_the_normal_interval_clipped() -> None:
    lo, hi = mean_interval(0.5, 0.2, 100)
    assert lo == pytest.approx(0.5 - 1.959964 * 0.02) and hi == pytest.approx(0.5 + 1.959964 * 0.02)
    assert mean_interval(0.99, 0.5, 4, low=-1.0, high=1.0)[1] == 1.0
    assert mean_interval(0.3, 0.7, 1) == (0.3, 0.3)


def test_mcnemar_exact_known_values() -> None:
    assert mcnemar_exact(10, 2) == pytest.approx(2 * (1 + 12 + 66) / 4096)
    assert mcnemar_exact(2, 10) == pytest.approx(0.0385742, abs=1e-7)
    assert mcnemar_exact(0, 0) == 1.0 and mcnemar_exact(7, 7) == 1.0
    assert mcnemar_exact(0, 1) == 1.0
    assert mcnemar_exact(0, 20) == pytest.approx(2 / 2**20)
    # a large case agrees with the full exact sum
    exact = Fraction(2 * sum(math.comb(1500, i) for i in range(701)), 2**1500)
    assert mcnemar_exact(800, 700) == pytest.approx(float(exact), rel=1e-12)


def test_pearson_known_values() -> None:
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 2], [1, 2]) is None  # too few points
    assert pearson([1, 1, 1], [1, 2, 3]) is None  # no variation
    assert pearson([0.1] * 3, [1, 2, 3]) is None  # whose mean rounds to 0.10000000000000002
    xs, ys = [0.1, 0.4, 0.35, 0.8], [0.2, 0.3, 0.5, 0.9]
    mx, my = sum(xs) / 4, sum(ys) / 4
    num = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    den = math.sqrt(sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys))
    assert pearson(xs, ys) == pytest.approx(num / den)


def test_digests_name_the_same_subset_with_and_without_torch() -> None:
    import hashlib

    import numpy as np

    for n in (0, 1, 360, 10_000):
        want = hashlib.sha256(np.arange(n, dtype=np.int64).tobytes()).hexdigest()[:16]
        assert first_n_digest(n) == indices_digest(torch.arange(n)) == want
    idx = torch.tensor([5, 2, 9])
    assert subset_record(idx) == {"count": 3, "indices_sha256": indices_digest(idx),
                                  "first": 5, "last": 9}
    assert indices_digest(idx) != indices_digest(torch.tensor([2, 5, 9]))  # order counts


def _bits_hex(bits: list[int]) -> str:
    """An independent packer: first point in the high bit of the first byte."""
    padded = bits + [0] * (-len(bits) % 8)
    return bytes(int("".join(map(str, padded[i:i + 8])), 2)
                 for i in range(0, len(padded), 8)).hex()


def test_bits_round_trip_and_layout() -> None:
    g = torch.Generator().manual_seed(0)
    for n in (0, 1, 7, 8, 9, 1000):
        mask = torch.rand(n, generator=g) > 0.5
        assert torch.equal(unpack_bits(pack_bits(mask), n), mask)
        assert pack_bits(mask) == _bits_hex([int(b) for b in mask])
    mask = torch.tensor([True, False, True, True, False, False, True, False, True, True, False])
    assert bits_as_int(pack_bits(mask), 11) == int("10110010110", 2)
    assert bits_as_int("", 0) == 0


def test_wilson_interval_holds_its_estimate_and_is_exact_at_the_ends() -> None:
    """Over every n in 1..10,000 (all k up to n = 300, the ends and a spread of k above):
    0 <= low <= k/n <= high <= 1, low is exactly 0.0 at k = 0 and high exactly 1.0 at k = n
    (the formula alone leaves 1 - 1e-16 there, which gave plots negative error bars), and the
    error bars built from it are never negative."""
    for n in range(1, 10_001):
        ks = range(n + 1) if n <= 300 else sorted({0, 1, 2, n // 3, n // 2, n - 2, n - 1, n})
        for k in ks:
            lo, hi = wilson_interval(k, n)
            p = k / n
            assert 0.0 <= lo <= p <= hi <= 1.0, (k, n, lo, hi)
            below, above = error_bars([p], [(lo, hi)])
            assert below[0] >= 0.0 and above[0] >= 0.0
        assert wilson_interval(0, n)[0] == 0.0 and wilson_interval(n, n)[1] == 1.0


def test_error_bars_clamp_noise_and_treat_missing_intervals_as_zero() -> None:
    # an interval recorded by an older version can miss its point by float noise
    assert error_bars([1.0, 0.0, 0.5], [(0.96, 1.0 - 1e-16), (1e-17, 0.04), None]) == [
        [pytest.approx(0.04), 0.0, 0.0], [0.0, 0.04, 0.0]]


def test_spearman_and_ranks_known_values() -> None:
    """Ranks average ties; Spearman is 1 for any increasing relation, where Pearson is not,
    and matches scipy's."""
    assert ranks([10.0, 20.0, 20.0, 5.0]) == [2.0, 3.5, 3.5, 1.0]
    xs = [1.0, 2.0, 3.0, 4.0, 5.0]
    cubes = [x ** 3 for x in xs]
    assert spearman(xs, cubes) == pytest.approx(1.0)
    assert (pearson(xs, cubes) or 1.0) < 0.99
    scipy_stats = pytest.importorskip("scipy.stats")
    a, b = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0], [2.0, 7.0, 1.0, 8.0, 2.0, 8.0, 1.0]
    assert spearman(a, b) == pytest.approx(scipy_stats.spearmanr(a, b).statistic)
    assert spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]) is None


def test_bootstrap_correlations_of_run_means() -> None:
    """The estimates are the correlations of the runs' means; the intervals hold them, are
    reproducible with the seed, shrink with more points, and are (1, 1) when y is a fixed
    increasing function of x point by point in every resample."""
    import numpy as np

    rng = np.random.default_rng(0)
    runs, points = 6, 300
    x_level = np.linspace(0.0, 1.0, runs)[:, None]
    y_level = np.array([0.0, 0.6, 0.2, 1.0, 0.4, 0.8])[:, None]  # correlated about 0.66
    x = (x_level + rng.normal(0, 0.5, (runs, points))).tolist()
    y = (y_level + rng.normal(0, 0.5, (runs, points))).tolist()
    out = bootstrap_correlations(x, y, resamples=400, seed=1)
    r, interval = out["pearson"]
    assert r == pytest.approx(pearson([sum(v) / points for v in x], [sum(v) / points for v in y]))
    assert interval is not None and interval[0] <= r <= interval[1]
    assert bootstrap_correlations(x, y, resamples=400, seed=1) == out
    wider = bootstrap_correlations([v[:30] for v in x], [v[:30] for v in y], resamples=400,
                                   seed=1)["pearson"][1]
    assert wider is not None and wider[1] - wider[0] > interval[1] - interval[0]
    same = [[i + 0.01 * j for j in range(points)] for i in range(runs)]
    exact = bootstrap_correlations(same, same, resamples=200)
    assert exact["pearson"] == (pytest.approx(1.0), (pytest.approx(1.0), pytest.approx(1.0)))
    assert exact["spearman"][0] == pytest.approx(1.0)
    two = bootstrap_correlations(x[:2], y[:2])
    assert two == {"pearson": (None, None), "spearman": (None, None)}
    with pytest.raises(ValueError, match="one shape"):
        bootstrap_correlations(x, y[:3])
