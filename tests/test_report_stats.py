"""``dfkd_bench.report.stats`` against values computed by hand from the textbook formulas
(quantiles from printed tables, not from the library under test)."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from dfkd_bench.report import stats


def test_t_interval_by_hand():
    # x = 1, 2, 3, 4: mean 2.5, s^2 = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3; t_{0.975, 3} = 3.182 (t table).
    interval = stats.t_interval([1, 2, 3, 4])
    half = 3.182446 * math.sqrt(5 / 3) / math.sqrt(4)
    assert (interval.mean, interval.n) == (2.5, 4)
    assert interval.std == pytest.approx(math.sqrt(5 / 3))
    assert (interval.low, interval.high) == pytest.approx((2.5 - half, 2.5 + half), abs=1e-5)
    # Two seeds: t_{0.975, 1} = 12.706, so a tiny spread still gives a wide interval.
    two = stats.t_interval([90.0, 92.0])
    assert two.high - two.mean == pytest.approx(12.7062 * math.sqrt(2) / math.sqrt(2), abs=1e-3)
    one = stats.t_interval([90.0])
    assert one.n == 1 and math.isnan(one.std) and math.isnan(one.low)


def test_holm_by_hand():
    # Sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06; 0.04 x 1 = 0.04 -> max(0.06, 0.04) = 0.06.
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = stats.holm([0.5, math.nan, 0.6])  # NaN (an untestable cell) is not in the family: m = 2
    assert adjusted[0] == pytest.approx(1.0) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(1.0)
    assert stats.holm([0.2, 0.01]) == pytest.approx([0.2, 0.02])


def test_paired_and_welch_by_hand():
    a = {0: 95.0, 1: 96.0, 2: 97.0}
    b = {0: 94.0, 1: 94.0, 2: 96.0}
    # Paired: differences 1, 2, 1: mean 4/3, s_d = sqrt(1/3), t = (4/3) / (s_d / sqrt 3) = 4; df 2.
    # Two-sided p of t with 2 df: 1 - t / sqrt(2 + t^2) = 1 - 4 / sqrt(18) = 0.0572 (closed form of the t(2) cdf).
    paired = stats.compare(a, b)
    assert paired.test == stats.PAIRED and paired.diff == pytest.approx(4 / 3)
    assert paired.p == pytest.approx(1 - 4 / math.sqrt(18), abs=1e-6)
    half = 4.302653 * math.sqrt(1 / 3) / math.sqrt(3)  # t_{0.975, 2} = 4.303
    assert (paired.low, paired.high) == pytest.approx((4 / 3 - half, 4 / 3 + half), abs=1e-5)
    # Another teacher (or other seeds): Welch. var a = 1, var b = 4/3, se = sqrt(1/3 + 4/9) = sqrt(7/9);
    # df = se^4 / ((1/3)^2 / 2 + (4/9)^2 / 2) = (49/81) / (1/18 + 8/81) = 3.9200.
    welch = stats.compare(a, b, pairable=False)
    assert welch.test == stats.WELCH and welch.diff == pytest.approx(4 / 3)
    se = math.sqrt(7 / 9)
    df = (49 / 81) / (1 / 18 + 8 / 81)
    assert df == pytest.approx(3.92, abs=1e-3)
    assert welch.spread == pytest.approx(math.sqrt((1 + 4 / 3) / 2))
    t = (4 / 3) / se  # 1.5119; p between the table's two-sided 0.20 (t=1.533, df 4) and 0.30 (1.19)
    assert 0.19 < welch.p < 0.22 and t == pytest.approx(1.5119, abs=1e-4)
    assert stats.compare({0: 1.0, 1: 2.0}, {0: 1.0, 3: 2.0}).test == stats.WELCH  # other seeds: not paired
    single = stats.compare({0: 90.0}, b)
    assert single.test == "" and math.isnan(single.p)


def test_probability_of_improvement_by_hand():
    # Pairs (a_i, b_j): 1 beats 0 (1); 2 ties 2 twice (0.5 + 0.5) and beats 0 (1); 3 beats all three (3).
    assert stats.probability_of_improvement([1, 2, 3], [2, 2, 0]) == pytest.approx(6 / 9)
    assert stats.probability_of_improvement([5, 6], [1, 2]) == 1.0


def test_average_ranks_and_friedman_on_a_3x3_example():
    scores = pd.DataFrame({"d1": [90.0, 85.0, 80.0], "d2": [80.0, 82.0, 75.0], "d3": [70.0, 60.0, 65.0]},
                          index=["A", "B", "C"])
    ranks, average = stats.average_ranks(scores)
    # d1: A 1, B 2, C 3; d2: B 1, A 2, C 3; d3: A 1, C 2, B 3.
    assert ranks.to_dict() == {"d1": {"A": 1, "B": 2, "C": 3}, "d2": {"A": 2, "B": 1, "C": 3},
                               "d3": {"A": 1, "B": 3, "C": 2}}
    assert average.to_dict() == pytest.approx({"A": 4 / 3, "B": 2.0, "C": 8 / 3})
    # chi2_F = 12N / (k(k+1)) * (sum R_j^2 - k(k+1)^2 / 4) = 3 * (116/9 - 12) = 8/3; df 2: p = exp(-chi2/2).
    test = stats.friedman(scores)
    assert (test.k, test.n) == (3, 3)
    assert test.statistic == pytest.approx(8 / 3)
    assert test.p == pytest.approx(math.exp(-4 / 3))
    # Nemenyi: q_0.05 = 2.343 for k = 3 (Demsar 2006, Table 5a): CD = 2.343 * sqrt(3 * 4 / (6 * 3)).
    assert test.critical_difference == pytest.approx(2.343 * math.sqrt(2 / 3), abs=1e-3)
    ties, tied_average = stats.average_ranks(pd.DataFrame({"d": [1.0, 1.0, 0.0]}, index=["A", "B", "C"]))
    assert ties["d"].tolist() == [1.5, 1.5, 3.0]
    with pytest.raises(ValueError):
        stats.friedman(scores.iloc[:2])


def test_nemenyi_q_values_of_demsar_table():
    for k, q in ((2, 1.960), (4, 2.569), (5, 2.728), (10, 3.164)):
        assert stats.nemenyi_critical_difference(k, 6) == pytest.approx(q * math.sqrt(k * (k + 1) / 36), abs=2e-3)


def test_seeds_needed_matches_cohens_tables():
    # Cohen (1988), Table 2.4.1 (two-sample t, alpha 0.05 two-sided, power 0.80): d = 0.5 -> 64, d = 0.8 -> 26,
    # d = 1.0 -> 17 per group. Paired (one-sample t on differences), d_z = 0.5 -> 34 (G*Power).
    assert stats.seeds_needed(0.5, 1.0, paired=False) == 64
    assert stats.seeds_needed(0.8, 1.0, paired=False) == 26
    assert stats.seeds_needed(-1.0, 1.0, paired=False) == 17  # the sign does not matter
    assert stats.seeds_needed(0.5, 1.0, paired=True) == 34
    # The normal approximation n = ((z_0.975 + z_0.8) / d)^2 = (2.8016 / 0.5)^2 = 31.4 undercounts by a few.
    assert 31.4 < stats.seeds_needed(0.5, 1.0, paired=True) < 31.4 + 4
    assert math.isinf(stats.seeds_needed(0.01, 1.0, paired=True))
    assert math.isnan(stats.seeds_needed(0.0, 1.0, paired=True))
    assert stats.format_seeds(math.inf) == "> 1000" and stats.format_seeds(26.0) == "26"
    comparison = stats.compare({0: 95.0, 1: 96.0, 2: 97.0}, {0: 94.0, 1: 94.0, 2: 96.0})
    assert comparison.seeds_needed == stats.seeds_needed(4 / 3, math.sqrt(1 / 3), paired=True)
