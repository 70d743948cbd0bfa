"""Statistics for ``adapter bench compare``: robust spread, the Mann-Whitney U test, verdicts.

The U test comes from scipy when it is installed; otherwise from :func:`mann_whitney_own`
(exact null distribution for small untied samples, normal approximation with tie and
continuity corrections otherwise), which the tests check against scipy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["Verdict", "judge", "mad", "mann_whitney", "mann_whitney_own", "robust_rsd", "smallest_p"]

MAD_TO_SD = 1.4826
"""MAD × this estimates the standard deviation of normally distributed samples."""
BAND_SDS = 3.0
"""The noise band is this many standard errors of the difference of the two medians."""
MEDIAN_SE = 1.2533
"""Standard error of a median of n normal samples: this × SD / sqrt(n)."""
EXACT_LIMIT = 40
"""Samples up to this combined size without ties get the exact U distribution."""

VERDICTS = ("regression", "improvement", "unchanged", "noisy", "missing")


@dataclass
class Verdict:
    """How one case changed between a baseline and a new run."""

    case: str
    verdict: str
    """regression, improvement, unchanged, noisy or missing."""
    baseline_ms: float | None = None
    new_ms: float | None = None
    change: float | None = None
    """Relative change of the medians: new / baseline - 1 (positive is slower)."""
    p_value: float | None = None
    """Two-sided Mann-Whitney U p-value on the raw samples (None without enough samples)."""
    band: float | None = None
    """The relative change a verdict needs to exceed: max(threshold, the noise band)."""
    baseline_rsd: float | None = None
    new_rsd: float | None = None
    n_baseline: int = 0
    n_new: int = 0
    note: str = ""

    def to_json(self) -> dict:
        return asdict(self)


def mad(samples: Sequence[float]) -> float:
    """Median absolute deviation from the median."""
    values = np.asarray(samples, dtype=float)
    if values.size == 0:
        return float("nan")
    return float(np.median(np.abs(values - np.median(values))))


def robust_rsd(samples: Sequence[float]) -> float:
    """Robust relative standard deviation: 1.4826 × MAD / median (0 for fewer than 2 samples)."""
    values = np.asarray(samples, dtype=float)
    if values.size < 2:
        return 0.0
    centre = float(np.median(values))
    return MAD_TO_SD * mad(values) / centre if centre > 0 else float("inf")


def _ranks(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Average ranks (1-based) of ``values`` and the sizes of the tie groups."""
    unique, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    average = upper - (counts - 1) / 2.0
    return average[inverse], counts


def _u_distribution(n1: int, n2: int) -> np.ndarray:
    """Counts of each U value (0..n1·n2) over all C(n1+n2, n1) orderings without ties.

    They are the coefficients of the Gaussian binomial [n1+n2 choose n1] in q, built as
    the product over i = 1..n1 of (1 - q^(n2+i)) / (1 - q^i); each division by (1 - q^i)
    is exact and amounts to a running sum with stride i.
    """
    size = n1 * n2 + 1
    poly = np.zeros(size, dtype=np.int64)
    poly[0] = 1
    for i in range(1, n1 + 1):
        shift = n2 + i
        if shift < size:
            poly[shift:] -= poly[:-shift].copy()
        for k in range(i, size):
            poly[k] += poly[k - i]
    return poly


def mann_whitney_own(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Two-sided Mann-Whitney U test of ``x`` against ``y``, numpy only.

    Returns:
        ``(U of x, p-value)``. Exact for untied samples of combined size up to
        ``EXACT_LIMIT``; otherwise the normal approximation with tie correction and a
        continuity correction of 1/2.
    """
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    n1, n2 = a.size, b.size
    if n1 == 0 or n2 == 0:
        return float("nan"), float("nan")
    ranks, ties = _ranks(np.concatenate([a, b]))
    u1 = float(ranks[:n1].sum() - n1 * (n1 + 1) / 2.0)
    tied = bool((ties > 1).any())
    if not tied and n1 + n2 <= EXACT_LIMIT:
        counts = _u_distribution(min(n1, n2), max(n1, n2)).astype(float)
        total = counts.sum()
        k = int(round(u1))
        low, high = counts[: k + 1].sum() / total, counts[k:].sum() / total
        return u1, float(min(1.0, 2.0 * min(low, high)))
    n = n1 + n2
    mean = n1 * n2 / 2.0
    tie_term = float((ties**3 - ties).sum()) / (n * (n - 1))
    sd = math.sqrt(n1 * n2 / 12.0 * ((n + 1) - tie_term))
    if sd == 0:
        return u1, 1.0
    z = (abs(u1 - mean) - 0.5) / sd
    return u1, float(min(1.0, math.erfc(max(z, 0.0) / math.sqrt(2.0))))


def mann_whitney(x: Sequence[float], y: Sequence[float]) -> float:
    """Two-sided Mann-Whitney U p-value: scipy's when installed, else :func:`mann_whitney_own`."""
    if len(x) == 0 or len(y) == 0:
        return float("nan")
    try:
        from scipy.stats import mannwhitneyu
    except ImportError:
        return mann_whitney_own(x, y)[1]
    return float(mannwhitneyu(x, y, alternative="two-sided").pvalue)


def smallest_p(n1: int, n2: int) -> float:
    """The smallest two-sided p-value the U test can give for these sample sizes."""
    if n1 == 0 or n2 == 0:
        return 1.0
    orderings = math.comb(n1 + n2, n1)
    return min(1.0, 2.0 / orderings) if orderings < 1e300 else 0.0


def judge(
    case: str,
    baseline: Sequence[float],
    new: Sequence[float],
    threshold: float = 0.10,
    alpha: float = 0.01,
    history_rsd: float | None = None,
) -> Verdict:
    """Judge one case from its raw samples (latencies: lower is better).

    A change counts only when all three hold: the medians differ by more than
    ``threshold`` (relative), by more than the noise band, and the U test rejects equal
    distributions at ``alpha``. The band is ``BAND_SDS`` standard errors of the difference
    of the two medians, the standard deviation taken from the baseline's samples (robust:
    1.4826 × MAD) or, when ``history_rsd`` is given and larger, from the run-to-run spread of
    earlier runs' medians (which also sees drift between runs, not just within one)
    (skipped, with a note, when the sample sizes cannot reach ``alpha``). A change past the
    threshold that fails the other two is ``noisy``; so is a small change measured with
    samples spread wider than the threshold.
    """
    b, n = [float(v) for v in baseline], [float(v) for v in new]
    verdict = Verdict(case, "unchanged", n_baseline=len(b), n_new=len(n))
    if not b or not n:
        verdict.verdict = "missing"
        verdict.note = "no samples in the baseline" if not b else "no samples in the new run"
        return verdict
    med_b, med_n = float(np.median(b)), float(np.median(n))
    verdict.baseline_ms, verdict.new_ms = med_b, med_n
    verdict.change = med_n / med_b - 1.0 if med_b > 0 else float("inf")
    verdict.baseline_rsd, verdict.new_rsd = robust_rsd(b), robust_rsd(n)
    within = MEDIAN_SE * verdict.baseline_rsd * math.sqrt(1 / len(b) + 1 / len(n))
    noise = BAND_SDS * max(within, math.sqrt(2) * (history_rsd or 0.0))
    verdict.band = max(threshold, noise)
    notes = []
    testable = smallest_p(len(b), len(n)) < alpha
    if len(b) >= 2 and len(n) >= 2:
        verdict.p_value = mann_whitney(b, n)
    if not testable:
        notes.append(f"{len(b)} vs {len(n)} samples cannot reach p<{alpha:g}: judged on threshold and band only")
    significant = (not testable) or (verdict.p_value is not None and verdict.p_value < alpha)
    size = abs(verdict.change)
    if size <= threshold:
        spread = max(verdict.baseline_rsd, verdict.new_rsd)
        if spread > threshold:
            verdict.verdict = "noisy"
            notes.append(f"samples spread {spread:.0%} (robust SD), more than the {threshold:.0%} threshold")
    elif size > verdict.band and significant:
        verdict.verdict = "regression" if verdict.change > 0 else "improvement"
    else:
        verdict.verdict = "noisy"
        if size <= verdict.band:
            source = "earlier runs" if history_rsd and math.sqrt(2) * history_rsd >= within else "the baseline"
            notes.append(f"within the noise band of {verdict.band:.0%} learned from {source}")
        if not significant:
            notes.append(f"not significant (p={verdict.p_value:.3g} ≥ {alpha:g})")
    verdict.note = "; ".join(notes)
    return verdict
