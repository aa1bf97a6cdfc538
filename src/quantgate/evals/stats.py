"""Statistics for paired baseline-vs-candidate evaluation results.

Every function here is pure: it takes numpy arrays / Python numbers and
returns numbers or frozen dataclasses.  No I/O, no global state.  Anything
random takes an explicit ``seed`` and draws from
``numpy.random.default_rng(seed)``, so results are reproducible.

"Paired" means the baseline and the candidate were scored on the *same*
items, in the same order: ``base[i]`` and ``cand[i]`` belong to item ``i``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

__all__ = [
    "MeanQuantile",
    "PairedBootstrap",
    "KSResult",
    "bootstrap_mean_quantile",
    "fisher_exact",
    "interval_difference_p",
    "ks_2samp",
    "kolmogorov_sf",
    "mcnemar_exact",
    "min_detectable_drop",
    "normal_quantile",
    "paired_bootstrap",
    "paired_quantile_ratio",
    "QuantileRatio",
    "wilson_interval",
]

# Upper bound on the number of array elements materialised per bootstrap
# chunk (n_replicates_in_chunk * n_items); bounds memory to a few tens of MB.
_CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------


def normal_quantile(p: float) -> float:
    """Inverse CDF of the standard normal distribution (no scipy needed).

    Args:
        p: probability, strictly between 0 and 1.

    Returns:
        z such that P(Z <= z) = p for Z ~ N(0, 1).

    Raises:
        ValueError: if p is not in (0, 1).
    """
    if not 0.0 < p < 1.0:
        raise ValueError(f"normal_quantile: p must be in (0, 1), got {p}")
    return NormalDist().inv_cdf(p)


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _check_n_boot(n_boot: int) -> None:
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot}")


def _percentile_ci(reps: np.ndarray, confidence: float) -> tuple[float, float]:
    """Percentile interval of bootstrap replicates ``reps`` (1-D).

    NaN replicates are ignored; all-NaN gives (nan, nan).
    """
    finite = reps[~np.isnan(reps)]
    if finite.size == 0:
        return (math.nan, math.nan)
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(finite, [tail, 1.0 - tail])
    return (float(lo), float(hi))


def _chunks(n_boot: int, n_items: int):
    """Yield replicate counts per chunk so that count * n_items stays bounded."""
    per_chunk = max(1, _CHUNK_ELEMENTS // max(1, n_items))
    done = 0
    while done < n_boot:
        size = min(per_chunk, n_boot - done)
        yield size
        done += size


# --------------------------------------------------------------------------
# 1. exact McNemar
# --------------------------------------------------------------------------


def mcnemar_exact(c2w: int, w2c: int) -> float:
    """Exact one-sided McNemar test that the candidate is worse.

    Args:
        c2w: number of items the baseline got right and the candidate wrong.
        w2c: number of items the baseline got wrong and the candidate right.

    Returns:
        p = P(X >= c2w) for X ~ Binomial(c2w + w2c, 1/2), i.e. the probability
        under "no difference" of seeing at least this many correct-to-wrong
        flips among the discordant pairs.  1.0 when there are no discordant
        pairs.  Computed exactly with Python integers (the binomial tail sum
        is an integer divided by 2**n; int / int division is correctly
        rounded), so it is exact for any n, no normal approximation.

    Raises:
        ValueError: for negative or non-integer counts.
    """
    for name, value in (("c2w", c2w), ("w2c", w2c)):
        if int(value) != value or value < 0:
            raise ValueError(f"mcnemar_exact: {name} must be a non-negative integer, got {value}")
    c2w, w2c = int(c2w), int(w2c)
    n = c2w + w2c
    if n == 0:
        return 1.0
    # Exact integer tail sum_{k=c2w..n} C(n, k), summing the shorter side
    # (sum_{k<c2w} C(n, k) = 2**n - tail) with C(n, k+1) = C(n, k)(n-k)/(k+1).
    upper = 2 * c2w >= n  # True: sum the upper tail directly
    lo, hi = (c2w, n) if upper else (0, c2w - 1)
    term, part = math.comb(n, lo), 0
    for k in range(lo, hi + 1):
        part += term
        term = term * (n - k) // (k + 1)
    tail = part if upper else (1 << n) - part
    return min(1.0, tail / (1 << n))


# --------------------------------------------------------------------------
# 2. Wilson score interval
# --------------------------------------------------------------------------


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k / n.

    Args:
        k: number of successes (e.g. flipped items), 0 <= k <= n.
        n: number of trials (items), n >= 1.
        confidence: two-sided confidence level in (0, 1).

    Returns:
        (lo, hi) with 0 <= lo <= k/n <= hi <= 1, from
        center = (p + z^2/(2n)) / (1 + z^2/n),
        half   = z / (1 + z^2/n) * sqrt(p(1-p)/n + z^2/(4n^2)),
        where p = k/n and z = normal_quantile(1 - (1 - confidence)/2).

    Raises:
        ValueError: if n <= 0, k outside [0, n], or confidence outside (0, 1).
    """
    if n <= 0:
        raise ValueError(f"wilson_interval: n must be positive, got {n}")
    if not 0 <= k <= n:
        raise ValueError(f"wilson_interval: k must be in [0, n={n}], got {k}")
    _check_confidence(confidence)
    z = normal_quantile(1.0 - (1.0 - confidence) / 2.0)
    p = k / n
    denom = 1.0 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # Clip against rounding; mathematically lo=0 at k=0 and hi=1 at k=n.
    lo = 0.0 if k == 0 else max(0.0, center - half)
    hi = 1.0 if k == n else min(1.0, center + half)
    return (lo, hi)


# --------------------------------------------------------------------------
# 3. paired bootstrap of accuracy difference and recovery ratio
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class PairedBootstrap:
    """Result of :func:`paired_bootstrap`.

    Fields:
        base_mean: mean baseline score.
        cand_mean: mean candidate score.
        diff: cand_mean - base_mean (negative = candidate worse).
        diff_ci: (lo, hi) percentile interval for diff.
        ratio: cand_mean / base_mean ("recovery"); nan when base_mean == 0.
        ratio_ci: (lo, hi) percentile interval for ratio; (nan, nan) when
            base_mean == 0.
        n: number of paired items.
    """

    base_mean: float
    cand_mean: float
    diff: float
    diff_ci: tuple[float, float]
    ratio: float
    ratio_ci: tuple[float, float]
    n: int


def _check_scores(name: str, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {x.shape}")
    if x.size == 0:
        raise ValueError(f"{name} is empty: need at least one item")
    if not np.all(np.isfinite(x)) or x.min() < 0.0 or x.max() > 1.0:
        raise ValueError(f"{name} scores must be finite and in [0, 1]")
    return x


def paired_bootstrap(
    base: np.ndarray,
    cand: np.ndarray,
    *,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedBootstrap:
    """Paired percentile bootstrap of the accuracy difference and recovery.

    Args:
        base: shape (n,), per-item baseline scores in [0, 1] (usually 0/1).
        cand: shape (n,), per-item candidate scores on the same items, same order.
        n_boot: number of bootstrap replicates.
        confidence: two-sided confidence level in (0, 1).
        seed: seed for numpy.random.default_rng.

    Each replicate draws n item indices with replacement and uses the *same*
    indices for base and cand (pairing), so item difficulty cancels in the
    difference.  Intervals are percentile intervals of the replicates.

    Ratio: cand_mean / base_mean.  If base_mean == 0 the ratio is undefined
    and ratio / ratio_ci are nan.  Individual replicates whose resampled
    baseline mean is 0 (only possible for tiny n) are dropped from the ratio
    interval.

    Returns:
        PairedBootstrap(base_mean, cand_mean, diff, diff_ci, ratio, ratio_ci, n).

    Raises:
        ValueError: for non-1-D, empty, mismatched-length or out-of-range
            inputs, or bad n_boot / confidence.
    """
    base = _check_scores("base", base)
    cand = _check_scores("cand", cand)
    if base.shape != cand.shape:
        raise ValueError(
            f"base and cand must have the same length (paired items), got {base.size} and {cand.size}"
        )
    _check_n_boot(n_boot)
    _check_confidence(confidence)
    n = base.size
    rng = np.random.default_rng(seed)

    base_reps = np.empty(n_boot)
    cand_reps = np.empty(n_boot)
    start = 0
    for size in _chunks(n_boot, n):
        idx = rng.integers(0, n, size=(size, n))  # (size, n) shared indices
        base_reps[start : start + size] = base[idx].mean(axis=1)
        cand_reps[start : start + size] = cand[idx].mean(axis=1)
        start += size

    base_mean = float(base.mean())
    cand_mean = float(cand.mean())
    if base_mean > 0.0:
        ratio = cand_mean / base_mean
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio_reps = np.where(base_reps > 0.0, cand_reps / base_reps, np.nan)
        ratio_ci = _percentile_ci(ratio_reps, confidence)
    else:
        ratio, ratio_ci = math.nan, (math.nan, math.nan)

    return PairedBootstrap(
        base_mean=base_mean,
        cand_mean=cand_mean,
        diff=cand_mean - base_mean,
        diff_ci=_percentile_ci(cand_reps - base_reps, confidence),
        ratio=ratio,
        ratio_ci=ratio_ci,
        n=n,
    )


# --------------------------------------------------------------------------
# 4. (cluster) bootstrap of the mean and a quantile, e.g. per-token KL
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class MeanQuantile:
    """Result of :func:`bootstrap_mean_quantile`.

    Fields:
        mean: mean of the values.
        mean_ci: (lo, hi) percentile interval for the mean.
        quantile: the q-quantile of the values (numpy's default linear method).
        quantile_ci: (lo, hi) percentile interval for the q-quantile.
        q: the quantile level used.
        n: number of values.
    """

    mean: float
    mean_ci: tuple[float, float]
    quantile: float
    quantile_ci: tuple[float, float]
    q: float
    n: int


def _weighted_quantile_sorted(sorted_vals: np.ndarray, weights: np.ndarray, q: float) -> np.ndarray:
    """q-quantile of each row's sample where sorted_vals[j] appears weights[r, j] times.

    Args:
        sorted_vals: shape (m,), ascending.
        weights: shape (r, m), non-negative integer multiplicities, row sums >= 1.
        q: quantile level in [0, 1].

    Returns:
        shape (r,): identical to np.quantile(np.repeat(sorted_vals, weights[i]), q)
        (linear interpolation at position h = (N - 1) q of the expanded sample).
    """
    r, m = weights.shape
    cum = np.cumsum(weights, axis=1, dtype=np.int64)  # (r, m), each row non-decreasing
    total = cum[:, -1]  # (r,)
    h = (total - 1) * q
    lo_pos = np.floor(h).astype(np.int64)
    hi_pos = np.minimum(lo_pos + 1, total - 1)
    # Element at 0-based position p of the expanded sample is
    # sorted_vals[#(cum_row <= p)].  Offsetting row i by i * (max total + 1)
    # makes the flattened cum globally sorted, so one searchsorted serves all rows.
    offset = np.arange(r, dtype=np.int64) * (int(total.max()) + 1)  # (r,)
    cum += offset[:, None]  # in place: (r, m)
    flat = cum.ravel()
    row_start = np.arange(r, dtype=np.int64) * m
    lo_idx = np.searchsorted(flat, lo_pos + offset, side="right") - row_start
    hi_idx = np.searchsorted(flat, hi_pos + offset, side="right") - row_start
    x_lo, x_hi = sorted_vals[lo_idx], sorted_vals[hi_idx]
    return x_lo + (h - lo_pos) * (x_hi - x_lo)


def bootstrap_mean_quantile(
    values: np.ndarray,
    *,
    q: float,
    clusters: np.ndarray | None = None,
    n_boot: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> MeanQuantile:
    """Bootstrap intervals for the mean and the q-quantile of values.

    Args:
        values: shape (n,), finite values (e.g. per-token KL divergences).
        q: quantile level in [0, 1], e.g. 0.99.
        clusters: optional shape (n,) integer ids (e.g. the text window each
            token came from).  If given, each replicate resamples whole
            clusters with replacement (G draws from the G distinct ids), since
            values within a cluster are correlated; otherwise single values
            are resampled (each value is its own cluster).
        n_boot: number of bootstrap replicates.
        confidence: two-sided confidence level in (0, 1).
        seed: seed for numpy.random.default_rng.

    A replicate is represented by how many times each cluster was drawn; a
    value's weight is its cluster's count.  The replicate mean is the weighted
    mean and the replicate quantile equals np.quantile of the expanded
    (repeated) sample.  Intervals are percentile intervals.

    Returns:
        MeanQuantile(mean, mean_ci, quantile, quantile_ci, q, n); the point
        estimates are np.mean(values) and np.quantile(values, q).

    Raises:
        ValueError: for non-1-D, empty or non-finite values, q outside [0, 1],
            clusters of the wrong shape / non-integer, bad n_boot / confidence.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1:
        raise ValueError(f"values must be 1-D, got shape {values.shape}")
    if values.size == 0:
        raise ValueError("values is empty: need at least one value")
    if not np.all(np.isfinite(values)):
        raise ValueError("values must be finite")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    _check_n_boot(n_boot)
    _check_confidence(confidence)
    n = values.size

    if clusters is None:
        cluster_idx = np.arange(n)
    else:
        clusters = np.asarray(clusters)
        if clusters.shape != values.shape:
            raise ValueError(
                f"clusters must have the same length as values, got {clusters.size} and {n}"
            )
        if not np.issubdtype(clusters.dtype, np.integer):
            raise ValueError(f"clusters must be integer ids, got dtype {clusters.dtype}")
        _, cluster_idx = np.unique(clusters, return_inverse=True)  # ids -> 0..G-1
    n_clusters = int(cluster_idx.max()) + 1

    order = np.argsort(values, kind="stable")
    sorted_vals = values[order]  # (n,)
    sorted_cluster = cluster_idx[order]  # (n,) cluster of each sorted value
    cluster_sums = np.bincount(cluster_idx, weights=values, minlength=n_clusters)  # (G,)
    cluster_sizes = np.bincount(cluster_idx, minlength=n_clusters).astype(np.float64)  # (G,)

    rng = np.random.default_rng(seed)
    mean_reps = np.empty(n_boot)
    quant_reps = np.empty(n_boot)
    start = 0
    for size in _chunks(n_boot, max(n, n_clusters)):
        draws = rng.integers(0, n_clusters, size=(size, n_clusters))  # cluster draws
        offsets = (np.arange(size) * n_clusters)[:, None]
        counts = np.bincount((draws + offsets).ravel(), minlength=size * n_clusters)
        counts = counts.reshape(size, n_clusters)  # (size, G) times each cluster drawn
        fcounts = counts.astype(np.float64)
        mean_reps[start : start + size] = (fcounts @ cluster_sums) / (fcounts @ cluster_sizes)
        weights = counts[:, sorted_cluster]  # (size, n) multiplicity of each value
        quant_reps[start : start + size] = _weighted_quantile_sorted(sorted_vals, weights, q)
        start += size

    return MeanQuantile(
        mean=float(values.mean()),
        mean_ci=_percentile_ci(mean_reps, confidence),
        quantile=float(np.quantile(values, q)),
        quantile_ci=_percentile_ci(quant_reps, confidence),
        q=float(q),
        n=n,
    )


# --------------------------------------------------------------------------
# 4b. paired bootstrap of a ratio of quantiles, e.g. candidate / baseline speed
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantileRatio:
    """Result of :func:`paired_quantile_ratio`.

    Fields:
        ratio: quantile(cand, q) / quantile(base, q).
        ratio_ci: (lo, hi) percentile interval for the ratio.
        q: the quantile level used (0.5: the ratio of medians).
        n: number of paired units.
    """

    ratio: float
    ratio_ci: tuple[float, float]
    q: float
    n: int


def paired_quantile_ratio(
    base: np.ndarray,
    cand: np.ndarray,
    *,
    q: float = 0.5,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> QuantileRatio:
    """Paired percentile bootstrap of the ratio of two q-quantiles.

    Args:
        base: shape (n,), positive finite values of the reference (e.g. the
            baseline's decode tokens/s, one per measured request).
        cand: shape (n,), the candidate's values; unit i of both was measured
            under the same conditions (the same prompt in the same round).
        q: quantile level in [0, 1] (0.5: medians; 0.99: a latency p99).
        n_boot: number of bootstrap replicates.
        confidence: two-sided confidence level in (0, 1).
        seed: seed for numpy.random.default_rng.

    Each replicate draws n unit indices with replacement and uses the same
    indices for base and cand (pairing: a slow moment of the machine that
    both saw stays in both), then takes the ratio of the two replicate
    quantiles (numpy's default linear method).  The interval is the
    percentile interval of those ratios.

    Returns:
        QuantileRatio(ratio, ratio_ci, q, n).

    Raises:
        ValueError: for non-1-D, empty, mismatched, non-positive or non-finite
            values, q outside [0, 1], bad n_boot / confidence.
    """
    base, cand = _sample("base", base), _sample("cand", cand)
    if base.shape != cand.shape:
        raise ValueError(f"base and cand must have the same length (paired units), got {base.size} and {cand.size}")
    if base.min() <= 0.0 or cand.min() <= 0.0:
        raise ValueError("base and cand must be positive (a ratio of quantiles)")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    _check_n_boot(n_boot)
    _check_confidence(confidence)
    n = base.size
    rng = np.random.default_rng(seed)
    reps = np.empty(n_boot)
    start = 0
    for size in _chunks(n_boot, n):
        idx = rng.integers(0, n, size=(size, n))  # (size, n) shared indices
        reps[start : start + size] = np.quantile(cand[idx], q, axis=1) / np.quantile(base[idx], q, axis=1)
        start += size
    ratio = float(np.quantile(cand, q) / np.quantile(base, q))
    return QuantileRatio(ratio=ratio, ratio_ci=_percentile_ci(reps, confidence), q=float(q), n=n)


# --------------------------------------------------------------------------
# 5. minimum detectable drop (power of McNemar's test)
# --------------------------------------------------------------------------


def min_detectable_drop(
    n: int,
    *,
    discordance: float,
    alpha: float = 0.05,
    power: float = 0.8,
) -> float:
    """Smallest accuracy drop a one-sided paired (McNemar) test detects.

    Args:
        n: number of paired items, n >= 1.
        discordance: psi, the fraction of items that are discordant (flip
            either way), in (0, 1].
        alpha: one-sided significance level in (0, 1).
        power: desired power in (0, 1).

    Model (Connor 1987, after Miettinen 1968): with p10 = P(base right, cand
    wrong), p01 = P(base wrong, cand right), psi = p10 + p01 and the drop
    delta = p10 - p01, the normal-approximation power of McNemar's test is

        power = Phi( (sqrt(n) * delta - z_a * sqrt(psi)) / sqrt(psi - delta^2) ),

    equivalently the sample-size formula

        n = (z_a * sqrt(psi) + z_b * sqrt(psi - delta^2))^2 / delta^2,

    with z_a = Phi^-1(1 - alpha), z_b = Phi^-1(power).  Solving for delta:

        delta = sqrt(psi) * (z_a * sqrt(n) + z_b * sqrt(n + z_b^2 - z_a^2))
                / (n + z_b^2).

    Returns:
        delta, as a positive fraction of 1 (0.02 = two accuracy points).
        math.inf when no drop is detectable under the approximation: n <=
        z_a^2, or delta would exceed psi (a drop cannot exceed the
        discordance, which is reached only if every flip goes one way).

    Raises:
        ValueError: for n <= 0, discordance outside (0, 1], alpha or power
            outside (0, 1).
    """
    if n <= 0:
        raise ValueError(f"min_detectable_drop: n must be positive, got {n}")
    if not 0.0 < discordance <= 1.0:
        raise ValueError(f"min_detectable_drop: discordance must be in (0, 1], got {discordance}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"min_detectable_drop: alpha must be in (0, 1), got {alpha}")
    if not 0.0 < power < 1.0:
        raise ValueError(f"min_detectable_drop: power must be in (0, 1), got {power}")
    z_a = normal_quantile(1.0 - alpha)
    z_b = normal_quantile(power)
    if n <= z_a * z_a:  # even delta -> psi cannot reach significance
        return math.inf
    delta = (
        math.sqrt(discordance)
        * (z_a * math.sqrt(n) + z_b * math.sqrt(n + z_b * z_b - z_a * z_a))
        / (n + z_b * z_b)
    )
    return delta if delta <= discordance else math.inf


# --------------------------------------------------------------------------
# 6. two independent samples: did a distribution or a proportion move?
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class KSResult:
    """Result of :func:`ks_2samp`.

    Fields:
        d: the two-sample Kolmogorov-Smirnov statistic, sup_x |F_x(t) - F_y(t)| in [0, 1].
        p: two-sided asymptotic p-value of "both samples come from one continuous distribution".
        n_x, n_y: the sample sizes.
    """

    d: float
    p: float
    n_x: int
    n_y: int


def kolmogorov_sf(lam: float) -> float:
    """Survival function of the Kolmogorov distribution, Q(lam) = P(K > lam).

    Q(lam) = 2 sum_{k>=1} (-1)^(k-1) exp(-2 k^2 lam^2)   (used for lam >= 1.18), and the
    equivalent Jacobi-theta form 1 - sqrt(2 pi)/lam sum_{k>=1} exp(-(2k-1)^2 pi^2 / (8 lam^2))
    for small lam, where the first series converges slowly. Both are summed until the terms
    vanish in double precision (a handful of terms either side of 1.18).

    Returns:
        Q in [0, 1]; 1.0 for lam <= 0.
    """
    if lam <= 0.0:
        return 1.0
    if lam < 1.18:
        y = math.pi**2 / (8.0 * lam * lam)
        s = sum(math.exp(-((2 * k - 1) ** 2) * y) for k in range(1, 8))
        return min(1.0, max(0.0, 1.0 - math.sqrt(2.0 * math.pi) / lam * s))
    s = sum((-1) ** (k - 1) * math.exp(-2.0 * k * k * lam * lam) for k in range(1, 12))
    return min(1.0, max(0.0, 2.0 * s))


def ks_2samp(x: np.ndarray, y: np.ndarray) -> KSResult:
    """Two-sample Kolmogorov-Smirnov test.

    Args:
        x: shape (n_x,), finite values of one sample (e.g. per-item NLL of the original eval set).
        y: shape (n_y,), finite values of the other (e.g. of new production inputs).

    D = max over all observed values t of |F_x(t) - F_y(t)| with right-continuous empirical CDFs
    (ties between the samples handled exactly). p = Q((sqrt(m) + 0.12 + 0.11/sqrt(m)) * D) with
    m = n_x n_y / (n_x + n_y) and Q = kolmogorov_sf: the asymptotic distribution with Stephens'
    small-sample correction (Press et al., Numerical Recipes, 14.3); conservative for discrete data
    (e.g. token counts with ties).

    Returns:
        KSResult(d, p, n_x, n_y).

    Raises:
        ValueError: for non-1-D, empty or non-finite samples.
    """
    x, y = _sample("x", x), _sample("y", y)
    xs, ys = np.sort(x), np.sort(y)
    grid = np.concatenate([xs, ys])  # (n_x + n_y,) every point where a CDF jumps
    fx = np.searchsorted(xs, grid, side="right") / xs.size
    fy = np.searchsorted(ys, grid, side="right") / ys.size
    d = float(np.max(np.abs(fx - fy)))
    m = xs.size * ys.size / (xs.size + ys.size)
    p = kolmogorov_sf((math.sqrt(m) + 0.12 + 0.11 / math.sqrt(m)) * d)
    return KSResult(d=d, p=p, n_x=int(xs.size), n_y=int(ys.size))


def _sample(name: str, x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sample, got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} must be finite")
    return x


def fisher_exact(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided Fisher exact test that two proportions k1/n1 and k2/n2 are equal.

    Args:
        k1, n1: successes and trials of sample 1 (e.g. flipped items of the original run).
        k2, n2: the same for sample 2 (e.g. of a drift check); 0 <= k <= n, n >= 1.

    Conditional on the margins, k1 ~ Hypergeometric(N = n1 + n2, K = k1 + k2, n1). The p-value
    sums the probabilities of every table no more likely than the observed one (with a relative
    tolerance of 1e-7 for ties in floating point), as R's fisher.test and SciPy do. Probabilities
    are computed exactly from integer binomial coefficients.

    Returns:
        p in [0, 1].

    Raises:
        ValueError: for counts outside 0 <= k <= n or n < 1.
    """
    for k, n in ((k1, n1), (k2, n2)):
        if int(k) != k or int(n) != n or n < 1 or not 0 <= k <= n:
            raise ValueError(f"fisher_exact: need integers 0 <= k <= n, n >= 1; got k={k}, n={n}")
    k1, n1, k2, n2 = int(k1), int(n1), int(k2), int(n2)
    total, hits = n1 + n2, k1 + k2
    lo, hi = max(0, hits - n2), min(hits, n1)
    weight = {a: math.comb(n1, a) * math.comb(n2, hits - a) for a in range(lo, hi + 1)}
    observed = weight[k1]
    extreme = sum(w for w in weight.values() if w <= observed * (1 + 1e-7))
    return min(1.0, extreme / math.comb(total, hits))


def interval_difference_p(a: float, a_ci: tuple[float, float], b: float, b_ci: tuple[float, float],
                          confidence: float) -> float:
    """Two-sided p-value that two independent estimates a and b are equal, from their intervals.

    Args:
        a, b: point estimates (e.g. a candidate's recovery in the original run and in a drift check).
        a_ci, b_ci: their two-sided (lo, hi) intervals at `confidence` (e.g. bootstrap intervals).
        confidence: the intervals' confidence level in (0, 1).

    Each interval is read as estimate +- z * se with z = normal_quantile((1 + confidence) / 2),
    so se = (hi - lo) / (2 z); then z_diff = (b - a) / sqrt(se_a^2 + se_b^2) and p = 2 (1 - Phi(|z_diff|))
    (Altman & Bland, BMJ 2003, "Interval estimation for a difference between independent
    quantities"). When both intervals have zero width p is 1 for a == b, else 0.

    Returns:
        p in [0, 1]; nan when an estimate or interval end is nan.

    Raises:
        ValueError: for confidence outside (0, 1).
    """
    _check_confidence(confidence)
    values = (a, b, *a_ci, *b_ci)
    if any(v is None or math.isnan(v) for v in values):
        return math.nan
    z = normal_quantile((1.0 + confidence) / 2.0)
    se = math.hypot((a_ci[1] - a_ci[0]) / (2 * z), (b_ci[1] - b_ci[0]) / (2 * z))
    if se == 0.0:
        return 1.0 if a == b else 0.0
    return 2.0 * (1.0 - NormalDist().cdf(abs(b - a) / se))
