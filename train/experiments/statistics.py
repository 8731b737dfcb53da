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
