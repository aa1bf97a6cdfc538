"""Tests for quantgate.evals.stats: paired statistics for baseline vs candidate."""

from __future__ import annotations

import dataclasses
import math
from statistics import NormalDist

import numpy as np
import pytest

from quantgate.evals.stats import (
    MeanQuantile,
    PairedBootstrap,
    _weighted_quantile_sorted,
    bootstrap_mean_quantile,
    mcnemar_exact,
    min_detectable_drop,
    normal_quantile,
    paired_bootstrap,
    wilson_interval,
)

# ---------------------------------------------------------------- McNemar


def _binom_upper_tail(k: int, n: int) -> float:
    """P(X >= k) for X ~ Binomial(n, 1/2), straight from the definition."""
    if n == 0:
        return 1.0
    return sum(math.comb(n, i) for i in range(k, n + 1)) / 2**n


@pytest.mark.parametrize(
    "c2w, w2c",
    [(0, 0), (5, 0), (0, 5), (10, 3), (3, 10), (40, 25), (300, 250), (250, 300), (1, 1), (7, 7)],
)
def test_mcnemar_matches_exact_binomial_tail(c2w, w2c):
    expected = _binom_upper_tail(c2w, c2w + w2c)
    assert mcnemar_exact(c2w, w2c) == pytest.approx(expected, rel=1e-12, abs=0.0)


def test_mcnemar_known_values():
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(0, 12) == 1.0  # c2w = 0: P(X >= 0) = 1
    assert mcnemar_exact(5, 0) == 1 / 32
    assert mcnemar_exact(10, 3) == pytest.approx(378 / 8192)  # C(13,10..13) = 286+78+13+1


def test_mcnemar_large_n_is_exact_not_normal():
    # n = 4100 discordant pairs; compare with the exact integer tail.
    p = mcnemar_exact(2100, 2000)
    assert p == pytest.approx(_binom_upper_tail(2100, 4100), rel=1e-12)
    assert mcnemar_exact(1000, 0) == 2.0**-1000  # tiny but exact, no underflow to 0
    assert mcnemar_exact(0, 3000) == 1.0


def test_mcnemar_monotone():
    # More candidate-worse flips (fixed reverse flips) -> smaller p-value.
    ps = [mcnemar_exact(c2w, 20) for c2w in range(0, 60, 5)]
    assert all(a > b for a, b in zip(ps, ps[1:]))
    # More reverse flips (fixed c2w) -> larger p-value.
    qs = [mcnemar_exact(30, w2c) for w2c in range(0, 60, 5)]
    assert all(a < b for a, b in zip(qs, qs[1:]))
    # Symmetry of Binomial(n, 1/2): P(X >= k) + P(X >= n - k + 1) = 1.
    assert mcnemar_exact(10, 3) + mcnemar_exact(4, 9) == pytest.approx(1.0)


@pytest.mark.parametrize("c2w, w2c", [(-1, 3), (3, -1), (2.5, 1)])
def test_mcnemar_bad_counts(c2w, w2c):
    with pytest.raises(ValueError, match="non-negative integer"):
        mcnemar_exact(c2w, w2c)


# ---------------------------------------------------------------- Wilson


def _wilson_reference(k: int, n: int, z: float) -> tuple[float, float]:
    p = k / n
    center = (2 * n * p + z * z) / (2 * (n + z * z))
    half = z * math.sqrt(z * z + 4 * n * p * (1 - p)) / (2 * (n + z * z))
    return center - half, center + half


@pytest.mark.parametrize("k, n", [(0, 10), (5, 10), (10, 10), (3, 40), (81, 263)])
def test_wilson_matches_formula(k, n):
    z = NormalDist().inv_cdf(0.975)
    lo_ref, hi_ref = _wilson_reference(k, n, z)
    lo, hi = wilson_interval(k, n)
    assert lo == pytest.approx(max(0.0, lo_ref), abs=1e-12)
    assert hi == pytest.approx(min(1.0, hi_ref), abs=1e-12)
    assert lo <= k / n <= hi
    assert 0.0 <= lo < hi <= 1.0


def test_wilson_literature_values():
    # Newcombe (1998), Stat Med 17:857, Table I, method 3 (Wilson score):
    # 81/263 -> 0.2553, 0.3662; 0/20 -> 0, 0.1611; 1/29 -> 0.0061, 0.1718.
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=5e-4)
    assert wilson_interval(0, 20) == pytest.approx((0.0, 0.1611), abs=5e-4)
    assert wilson_interval(1, 29) == pytest.approx((0.0061, 0.1718), abs=5e-4)
    # Textbook 5/10: 0.237, 0.763.
    assert wilson_interval(5, 10) == pytest.approx((0.237, 0.763), abs=5e-4)


def test_wilson_narrower_at_lower_confidence():
    lo95, hi95 = wilson_interval(7, 50, confidence=0.95)
    lo80, hi80 = wilson_interval(7, 50, confidence=0.80)
    assert lo95 < lo80 < 7 / 50 < hi80 < hi95


def test_wilson_bad_input():
    with pytest.raises(ValueError, match="n must be positive"):
        wilson_interval(0, 0)
    with pytest.raises(ValueError, match="k must be in"):
        wilson_interval(11, 10)
    with pytest.raises(ValueError, match="confidence"):
        wilson_interval(1, 10, confidence=1.0)


# ---------------------------------------------------------------- paired bootstrap

BASE_P = 0.70
P_C2W = 0.09  # P(candidate wrong | baseline right)
P_W2C = 0.11  # P(candidate right | baseline wrong)
TRUE_DIFF = -BASE_P * P_C2W + (1 - BASE_P) * P_W2C  # -0.063 + 0.033 = -0.03
TRUE_RATIO = (BASE_P + TRUE_DIFF) / BASE_P


def _paired_sample(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """0/1 baseline correctness and a candidate that flips items with known rates."""
    base = (rng.random(n) < BASE_P).astype(np.float64)
    u = rng.random(n)
    flip = np.where(base == 1.0, u < P_C2W, u < P_W2C)
    cand = np.where(flip, 1.0 - base, base)
    return base, cand


def test_paired_bootstrap_point_estimates_and_fields():
    base = np.array([1, 1, 1, 0, 1, 0, 1, 1, 0, 1], dtype=float)
    cand = np.array([1, 0, 1, 0, 1, 1, 0, 1, 0, 1], dtype=float)
    res = paired_bootstrap(base, cand, n_boot=300, seed=1)
    assert isinstance(res, PairedBootstrap)
    assert res.n == 10
    assert res.base_mean == pytest.approx(0.7)
    assert res.cand_mean == pytest.approx(0.6)
    assert res.diff == pytest.approx(-0.1)
    assert res.ratio == pytest.approx(0.6 / 0.7)
    assert res.diff_ci[0] <= res.diff <= res.diff_ci[1]
    assert res.ratio_ci[0] <= res.ratio <= res.ratio_ci[1]
    with pytest.raises(dataclasses.FrozenInstanceError):
        res.diff = 0.0  # type: ignore[misc]


def test_paired_bootstrap_is_paired():
    # Identical results: a paired bootstrap has zero spread; an unpaired one would not.
    rng = np.random.default_rng(3)
    base = (rng.random(500) < 0.6).astype(float)
    res = paired_bootstrap(base, base.copy(), n_boot=200, seed=0)
    assert res.diff_ci == (0.0, 0.0)
    assert res.ratio_ci == pytest.approx((1.0, 1.0))


def test_paired_bootstrap_deterministic_given_seed():
    rng = np.random.default_rng(5)
    base, cand = _paired_sample(rng, 300)
    a = paired_bootstrap(base, cand, n_boot=400, seed=11)
    b = paired_bootstrap(base, cand, n_boot=400, seed=11)
    c = paired_bootstrap(base, cand, n_boot=400, seed=12)
    assert a == b
    assert a.diff_ci != c.diff_ci


def test_paired_bootstrap_zero_baseline_gives_nan_ratio():
    base = np.zeros(20)
    cand = np.r_[np.ones(3), np.zeros(17)]
    res = paired_bootstrap(base, cand, n_boot=100)
    assert math.isnan(res.ratio)
    assert all(math.isnan(x) for x in res.ratio_ci)
    assert res.diff == pytest.approx(0.15)


def test_paired_bootstrap_coverage():
    """95% intervals cover the true diff and ratio in roughly 95% of synthetic runs."""
    n_runs, n_items = 300, 400
    cover_diff = cover_ratio = 0
    for seed in range(n_runs):
        rng = np.random.default_rng(10_000 + seed)
        base, cand = _paired_sample(rng, n_items)
        res = paired_bootstrap(base, cand, n_boot=500, seed=seed)
        cover_diff += res.diff_ci[0] <= TRUE_DIFF <= res.diff_ci[1]
        cover_ratio += res.ratio_ci[0] <= TRUE_RATIO <= res.ratio_ci[1]
    assert 0.90 <= cover_diff / n_runs <= 0.99
    assert 0.90 <= cover_ratio / n_runs <= 0.99


def test_paired_bootstrap_bad_input():
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap(np.ones(5), np.ones(6))
    with pytest.raises(ValueError, match="empty"):
        paired_bootstrap(np.array([]), np.array([]))
    with pytest.raises(ValueError, match="1-D"):
        paired_bootstrap(np.ones((2, 3)), np.ones((2, 3)))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        paired_bootstrap(np.array([0.0, 2.0]), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap(np.ones(3), np.ones(3), n_boot=0)


# ---------------------------------------------------------------- mean / quantile bootstrap


def test_weighted_quantile_equals_numpy_on_expanded_sample():
    rng = np.random.default_rng(0)
    vals = np.sort(rng.exponential(size=37))
    weights = rng.integers(0, 4, size=(50, 37))
    weights[:, 0] += 1  # every row non-empty
    for q in (0.0, 0.1, 0.5, 0.9, 0.99, 1.0):
        got = _weighted_quantile_sorted(vals, weights, q)
        want = [np.quantile(np.repeat(vals, w), q) for w in weights]
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15)


def test_mean_quantile_point_estimates():
    rng = np.random.default_rng(1)
    kl = rng.exponential(scale=0.02, size=2000)
    res = bootstrap_mean_quantile(kl, q=0.99, n_boot=300, seed=2)
    assert isinstance(res, MeanQuantile)
    assert res.n == 2000 and res.q == 0.99
    assert res.mean == pytest.approx(kl.mean())
    assert res.quantile == pytest.approx(np.quantile(kl, 0.99))
    assert res.mean_ci[0] < res.mean < res.mean_ci[1]
    assert res.quantile_ci[0] < res.quantile < res.quantile_ci[1]
    # Deterministic given the seed.
    assert res == bootstrap_mean_quantile(kl, q=0.99, n_boot=300, seed=2)


def _clustered_values(rng: np.random.Generator, n_clusters: int, size: int):
    """Values with a strong shared per-cluster effect (within-cluster correlation)."""
    effect = rng.exponential(scale=1.0, size=n_clusters)
    clusters = np.repeat(np.arange(n_clusters), size)
    values = effect[clusters] + 0.1 * rng.exponential(size=n_clusters * size)
    return values, clusters


def test_cluster_bootstrap_wider_when_correlated():
    rng = np.random.default_rng(7)
    values, clusters = _clustered_values(rng, n_clusters=40, size=50)
    flat = bootstrap_mean_quantile(values, q=0.9, n_boot=400, seed=0)
    clus = bootstrap_mean_quantile(values, q=0.9, clusters=clusters, n_boot=400, seed=0)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert clus.mean == flat.mean and clus.quantile == flat.quantile
    # Effective sample size is ~40 clusters, not 2000 values.
    assert width(clus.mean_ci) > 3 * width(flat.mean_ci)
    assert width(clus.quantile_ci) > 1.5 * width(flat.quantile_ci)


def test_cluster_bootstrap_accepts_arbitrary_ids():
    rng = np.random.default_rng(8)
    values, clusters = _clustered_values(rng, n_clusters=30, size=20)
    a = bootstrap_mean_quantile(values, q=0.5, clusters=clusters, n_boot=200, seed=4)
    b = bootstrap_mean_quantile(values, q=0.5, clusters=clusters * 7 + 1000, n_boot=200, seed=4)
    assert a == b


def test_cluster_mean_coverage():
    """Cluster-bootstrap 95% interval for the mean covers the true mean ~95% of the time."""
    n_runs, covered = 200, 0
    for seed in range(n_runs):
        rng = np.random.default_rng(20_000 + seed)
        values, clusters = _clustered_values(rng, n_clusters=150, size=10)
        true_mean = 1.0 + 0.1  # E[effect] + 0.1 * E[noise]
        res = bootstrap_mean_quantile(values, q=0.5, clusters=clusters, n_boot=300, seed=seed)
        covered += res.mean_ci[0] <= true_mean <= res.mean_ci[1]
    assert 0.90 <= covered / n_runs <= 0.99


def test_mean_quantile_bad_input():
    with pytest.raises(ValueError, match="empty"):
        bootstrap_mean_quantile(np.array([]), q=0.5)
    with pytest.raises(ValueError, match="same length"):
        bootstrap_mean_quantile(np.ones(4), q=0.5, clusters=np.arange(3))
    with pytest.raises(ValueError, match="integer"):
        bootstrap_mean_quantile(np.ones(4), q=0.5, clusters=np.ones(4) * 0.5)
    with pytest.raises(ValueError, match="q must be"):
        bootstrap_mean_quantile(np.ones(4), q=1.5)
    with pytest.raises(ValueError, match="finite"):
        bootstrap_mean_quantile(np.array([1.0, np.nan]), q=0.5)


# ---------------------------------------------------------------- min detectable drop


def test_min_detectable_drop_decreases_with_n():
    drops = [min_detectable_drop(n, discordance=0.1) for n in (100, 300, 1000, 3000)]
    assert all(a > b for a, b in zip(drops, drops[1:]))


def test_min_detectable_drop_increases_with_discordance():
    drops = [min_detectable_drop(1000, discordance=d) for d in (0.02, 0.05, 0.1, 0.3)]
    assert all(a < b for a, b in zip(drops, drops[1:]))


def test_min_detectable_drop_hand_computation():
    # n = 1000, psi = 0.1, one-sided alpha = 0.05, power = 0.8:
    # z_a = 1.644854, z_b = 0.841621;
    # delta = sqrt(.1) (1.644854 sqrt(1000) + 0.841621 sqrt(1000 + .708326 - 2.705543))
    #         / (1000 + .708326) = 0.316228 * (52.0148 + 26.5879) / 1000.7083 = 0.024839
    assert min_detectable_drop(1000, discordance=0.1) == pytest.approx(0.024839, abs=2e-6)
    # Round trip through Connor's (1987) sample-size formula.
    psi, za, zb = 0.1, normal_quantile(0.95), normal_quantile(0.8)
    d = min_detectable_drop(1000, discordance=psi)
    n_needed = (za * math.sqrt(psi) + zb * math.sqrt(psi - d * d)) ** 2 / (d * d)
    assert n_needed == pytest.approx(1000, rel=1e-9)


def test_min_detectable_drop_stricter_test_needs_bigger_drop():
    base = min_detectable_drop(500, discordance=0.1)
    assert min_detectable_drop(500, discordance=0.1, alpha=0.01) > base
    assert min_detectable_drop(500, discordance=0.1, power=0.95) > base


def test_min_detectable_drop_tiny_n_is_inf():
    assert min_detectable_drop(2, discordance=0.5) == math.inf  # n <= z_a^2
    assert min_detectable_drop(10, discordance=0.05) == math.inf  # drop would exceed psi


@pytest.mark.parametrize("n, disc", [(0, 0.1), (-5, 0.1), (100, 0.0), (100, 1.5), (100, -0.1)])
def test_min_detectable_drop_bad_input(n, disc):
    with pytest.raises(ValueError):
        min_detectable_drop(n, discordance=disc)


def test_normal_quantile():
    assert normal_quantile(0.975) == pytest.approx(1.959964, abs=1e-6)
    assert normal_quantile(0.5) == 0.0
    with pytest.raises(ValueError):
        normal_quantile(1.0)
