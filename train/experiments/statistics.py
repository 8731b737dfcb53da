"""Statistics of ablation tables: a metric's spread over seeds, and paired comparisons.

`mean_sd_interval`: mean, sample standard deviation (ddof=1) and the Student-t
confidence interval of the mean over seeds: mean ± t_{(1+c)/2, n-1} · sd / √n. Seeds
are few (3 to 5), so the t-interval, not a normal one; with one seed there is no
spread and no interval ("1 seed").

`paired_test`: two conditions run with the same seeds (same data order, same
initialisation draws), compared seed by seed with a two-sided paired t-test
(scipy.stats.ttest_rel). Pairing removes the variation the seed causes in both; with
fewer than 2 pairs, or pairs that all differ by the same amount, there is no test.

`format_summary` / `format_test` are the texts the reports print, so every table says
the same thing the same way: a difference with p ≥ alpha (or untested) is written
"not significant (...)" and must not be read as a ranking.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import stats

ALPHA = 0.05  # Two-sided significance level of the reports' findings.
INTERVAL = "Student-t interval of the mean over seeds"


@dataclasses.dataclass(frozen=True)
class Summary:
    """A metric over seeds: n values, their mean, sd (ddof=1) and t-interval."""

    n: int
    mean: float
    sd: float | None  # None with one seed.
    low: float | None  # The interval's bounds; None with one seed.
    high: float | None
    confidence: float


@dataclasses.dataclass(frozen=True)
class PairedTest:
    """b against a over n pairs: the mean of (b - a), its t-interval, and the p-value of
    the two-sided paired t-test; p_value None when untestable (`reason` says why)."""

    n: int
    mean_difference: float | None  # mean(b - a); None without pairs.
    low: float | None  # The difference's t-interval (None when untestable).
    high: float | None
    p_value: float | None
    reason: str = ""

    def significant(self, alpha=ALPHA):
        return self.p_value is not None and self.p_value < alpha


def _finite(values):
    return [float(v) for v in values
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]


def mean_sd_interval(values, confidence=0.95):
    """-> Summary of the finite numbers in `values` (None entries are runs that did not
    finish), or None when there are none."""
    values = _finite(values)
    if not values:
        return None
    n, mean = len(values), float(np.mean(values))
    if n == 1:
        return Summary(1, mean, None, None, None, confidence)
    sd = float(np.std(values, ddof=1))
    if sd == 0.0:  # Identical over seeds: the interval is the point (scipy gives NaN).
        return Summary(n, mean, 0.0, mean, mean, confidence)
    low, high = stats.t.interval(confidence, n - 1, loc=mean, scale=sd / math.sqrt(n))
    return Summary(n, mean, sd, float(low), float(high), confidence)


def paired_test(a, b, confidence=0.95):
    """-> PairedTest of `b` against `a`: aligned sequences (index i = the same seed);
    a pair with a missing or non-finite value is dropped."""
    pairs = [(float(x), float(y)) for x, y in zip(a, b)
             if len(_finite([x, y])) == 2]
    n = len(pairs)
    if n == 0:
        return PairedTest(0, None, None, None, None, "no pairs")
    differences = np.array([y - x for x, y in pairs])
    mean = float(differences.mean())
    if n < 2:
        return PairedTest(n, mean, None, None, None, "1 seed")
    if np.ptp(differences) <= 1e-12 * max(1.0, abs(mean)):
        return PairedTest(n, mean, None, None, None, "identical differences over seeds")
    result = stats.ttest_rel([y for _, y in pairs], [x for x, _ in pairs])
    interval = result.confidence_interval(confidence)
    return PairedTest(n, mean, float(interval.low), float(interval.high),
                      float(result.pvalue))


def holm(p_values):
    """Holm's step-down adjustment of a family of p-values (Holm 1979; scipy has only the
    FDR procedures): the i-th smallest of m is multiplied by m - i, made monotone and
    capped at 1. Rejecting where the adjusted p < alpha holds the family-wise error rate
    at alpha over all m tests. None entries (untestable) stay None."""
    known = [(p, i) for i, p in enumerate(p_values) if p is not None]
    adjusted, running = [None] * len(p_values), 0.0
    for rank, (p, i) in enumerate(sorted(known)):
        running = max(running, min(1.0, (len(known) - rank) * p))
        adjusted[i] = running
    return adjusted


def format_p(p_value):
    return "p < 0.001" if p_value < 0.001 else f"p = {p_value:.3g}"


def format_test(test, alpha=ALPHA):
    """'p = 0.004' when significant; 'not significant (p = 0.41)', or 'not significant
    (1 seed: untested)' when there is no test."""
    if test.p_value is None:
        return f"not significant ({test.reason}: untested)"
    if test.p_value < alpha:
        return format_p(test.p_value)
    return f"not significant ({format_p(test.p_value)})"


def format_summary(summary, scale=1.0, digits=3, unit="", n_expected=None):
    """'45.2% ± 1.3 [41.9, 48.5]' (mean ± sd [t-interval]), '45.2% (1 seed)', or '–'.

    `scale`/`unit`: 100 and "%" for fractions shown as percentages. `n_expected`: the
    table's seeds per cell, which its caption states; a cell with fewer says how many it
    has ('(2 seeds)'), and with n_expected=1 a one-seed cell is the bare mean."""
    if summary is None:
        return "–"
    fmt = f"{{:.{digits}f}}"
    text = fmt.format(scale * summary.mean) + unit
    if summary.sd is not None:
        text += (f" ± {fmt.format(scale * summary.sd)} "
                 f"[{fmt.format(scale * summary.low)}, {fmt.format(scale * summary.high)}]")
    if (summary.n == 1 and n_expected != 1) or (n_expected or 0) > summary.n:
        text += f" ({summary.n} seed{'s' if summary.n > 1 else ''})"
    return text


# --- Per-example intervals and paired tests (one run, the same examples) ---------------

def wilson(successes, n, z=1.96):
    """The Wilson score interval of a binomial proportion (95% at z = 1.96)."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, float(centre - half)), min(1.0, float(centre + half)))


def bootstrap_interval(values, resamples=2000, seed=0, level=0.95):
    """The percentile bootstrap interval of the mean of `values` (per-example scores,
    e.g. token F1): `resamples` resamples of the examples with replacement, `seed`ed."""
    values = np.asarray(values, np.float64)
    if values.size == 0:
        return (0.0, 1.0)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, (resamples, values.size))].mean(1)
    tail = (1 - level) / 2 * 100
    return (float(np.percentile(means, tail)), float(np.percentile(means, 100 - tail)))


def paired_difference(a, b, resamples=2000, seed=0, level=0.95):
    """mean(a) - mean(b) of paired per-example scores (the same examples under two
    settings) and its percentile bootstrap interval (examples resampled together): an
    interval excluding 0 is a significant difference at that level."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"Paired scores differ in shape: {a.shape} vs {b.shape}")
    low, high = bootstrap_interval(a - b, resamples, seed, level)
    return float(a.mean() - b.mean()), (low, high)


def mcnemar_exact(a, b):
    """Two-sided exact McNemar test of paired 0/1 outcomes (the same examples under two
    settings): the p-value of the discordant pairs' split under a fair coin. The
    bootstrap is too optimistic on a handful of discordant pairs; this is exact."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2 ** n
    return min(1.0, 2 * tail)
