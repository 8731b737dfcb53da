"""Ablation statistics: the t-interval over seeds and the paired t-test against
textbook formulas (tabulated t quantiles), and the texts the reports print."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from train.experiments import statistics

T_975 = {2: 4.302652729911275, 3: 3.182446305284263}  # Student t, 97.5% quantile, by df.


def test_mean_sd_and_t_interval_over_seeds():
    values = [0.41, 0.47, 0.44]
    summary = statistics.mean_sd_interval([*values, None, float("nan")])  # Unfinished runs.
    mean = sum(values) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / 2)
    half = T_975[2] * sd / math.sqrt(3)
    assert (summary.n, summary.mean, summary.sd) == (3, pytest.approx(mean), pytest.approx(sd))
    assert (summary.low, summary.high) == (pytest.approx(mean - half),
                                           pytest.approx(mean + half))
    assert statistics.format_summary(summary, 100, 1, "%") == (
        f"{100 * mean:.1f}% ± {100 * sd:.1f} [{100 * (mean - half):.1f}, "
        f"{100 * (mean + half):.1f}]")
    assert statistics.format_summary(summary, 100, 1, "%", n_expected=5).endswith(
        "(3 seeds)")
    one = statistics.mean_sd_interval([0.45])
    assert (one.n, one.mean, one.sd, one.low, one.high) == (1, 0.45, None, None, None)
    assert statistics.format_summary(one, 100, 1, "%") == "45.0% (1 seed)"
    assert statistics.format_summary(one, 100, 1, "%", n_expected=1) == "45.0%"
    same = statistics.mean_sd_interval([0.5, 0.5])
    assert (same.sd, same.low, same.high) == (0.0, 0.5, 0.5)
    assert statistics.mean_sd_interval([None]) is None
    assert statistics.format_summary(None) == "–"


def test_paired_t_test_over_seeds():
    a, b = [0.40, 0.52, 0.47, 0.61], [0.45, 0.61, 0.51, 0.70]
    d = np.subtract(b, a)
    t = d.mean() / (d.std(ddof=1) / 2)
    p = 2 * scipy_stats.t.sf(abs(t), df=3)  # The two-sided tail of t with n - 1 df.
    test = statistics.paired_test(a, b)
    assert (test.n, test.mean_difference) == (4, pytest.approx(d.mean()))
    assert test.p_value == pytest.approx(p) and test.significant()
    half = T_975[3] * d.std(ddof=1) / 2
    assert (test.low, test.high) == (pytest.approx(d.mean() - half),
                                     pytest.approx(d.mean() + half))
    assert statistics.format_test(test) == f"p = {p:.3g}"
    # Pairs with a missing run are dropped; one pair left: no test.
    one = statistics.paired_test([0.4, None, 0.5], [0.5, 0.6, None])
    assert (one.n, one.mean_difference, one.p_value) == (1, pytest.approx(0.1), None)
    assert statistics.format_test(one) == "not significant (1 seed: untested)"
    same = statistics.paired_test([0.1, 0.2], [0.2, 0.3])  # Equal differences: no spread.
    assert same.p_value is None and not same.significant()
    assert statistics.paired_test([], []).mean_difference is None


@pytest.mark.parametrize("p,text", [
    (0.0004, "p < 0.001"), (0.012, "p = 0.012"), (0.05, "not significant (p = 0.05)"),
    (0.41, "not significant (p = 0.41)")])
def test_a_test_reads_not_significant_at_p_of_alpha_and_above(p, text):
    assert statistics.format_test(statistics.PairedTest(3, 0.01, -0.1, 0.1, p)) == text


def test_holm_adjustment_by_hand_and_its_family_wise_error_rate():
    # Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1: 0.02, 0.03, 0.06, 0.04 -> made
    # monotone: 0.02, 0.03, 0.06, 0.06 (Holm 1979, by hand).
    adjusted = statistics.holm([0.01, 0.04, 0.03, None, 0.005])
    assert adjusted[3] is None
    np.testing.assert_allclose([adjusted[i] for i in (0, 1, 2, 4)], [0.03, 0.06, 0.06, 0.02])
    assert statistics.holm([0.6, 0.7]) == [1.0, 1.0]  # Capped at 1.
    # Under the null (uniform p-values), rejecting where Holm's p < 0.05 errs at least
    # once in at most 5% of families of 10 tests; unadjusted, in ~40% (1 - 0.95^10).
    rng = np.random.default_rng(0)
    families = rng.uniform(size=(4000, 10))
    holm_errors = np.mean([min(statistics.holm(list(f))) < 0.05 for f in families])
    raw_errors = np.mean(families.min(axis=1) < 0.05)
    assert holm_errors <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 4000)
    assert raw_errors == pytest.approx(1 - 0.95 ** 10, abs=0.03)
