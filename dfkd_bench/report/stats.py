"""Which differences are real: the statistics of the report's tables.

Every choice here is named under the tables that use it and in the README:

* **Per cell**: the 95 % t-interval of the mean over seeds (Student's t with
  n − 1 degrees of freedom), next to mean ± sample std and n.
  # CHOSEN: a t-interval, not a bootstrap: with the 2-5 seeds a DFKD cell has, a percentile bootstrap
  # interval is far too narrow (it can never be wider than the range of the seeds), while the t-interval
  # is exact for normal seed-to-seed noise and honest (wide) about few seeds.
* **Two methods in one column**: a paired t-test over seeds when both cells ran with the same teacher and
  the same seeds (seed s of one method is paired with seed s of the other: same student initialisation
  stream, same teacher), otherwise Welch's unequal-variance t-test. Within a column the p-values of
  every method against the column's best are Holm-corrected (Holm 1979; family-wise error 5 %).
* **Bold** = the column's best mean and every method whose Holm-adjusted p-value against it is ≥ 0.05
  (not significantly worse). A cell with one seed cannot be tested and is never bold.
* **Probability of improvement** P(X > Y): the chance that a run of one method beats a run of the
  other, ties counting one half (Agarwal et al., NeurIPS 2021, the ``rliable`` estimator per task),
  i.e. the Mann-Whitney U statistic divided by n_x n_y.
* **Across ≥ 2 columns** (data sets or teacher/student pairs): average ranks (1 = best, ties averaged),
  the Friedman test on them and the Nemenyi critical difference (Demšar, JMLR 2006).
* **Power**: the number of seeds per method a test at α = 0.05 (two-sided) needs to detect the
  observed difference with probability 0.8, given the observed spread (noncentral t distribution),
  so that "3 seeds cannot tell" is a number the report prints.

scipy does the distributions and the tests (``scipy.stats``: t, nct, studentized_range, ttest_rel,
ttest_ind, mannwhitneyu, friedmanchisquare, rankdata); Holm's step-down correction is four lines and
not in scipy, so it is written here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

CONFIDENCE = 0.95
ALPHA = 0.05
POWER = 0.8
MAX_SEEDS = 1000  # seeds_needed above this is reported as "> 1000"

PAIRED = "paired t"
WELCH = "Welch t"


def _clean(values) -> np.ndarray:
    array = np.asarray(list(values), dtype=float)
    return array[np.isfinite(array)]


@dataclass(frozen=True)
class Interval:
    """Mean, sample std (ddof=1), n and the two-sided t-interval of the mean (NaN when n < 2)."""

    mean: float
    std: float
    n: int
    low: float
    high: float


def t_interval(values, confidence: float = CONFIDENCE) -> Interval:
    """Student's t-interval of the mean: mean ± t_{(1+c)/2, n−1} · s / √n."""
    from scipy import stats

    x = _clean(values)
    n = len(x)
    if n == 0:
        return Interval(math.nan, math.nan, 0, math.nan, math.nan)
    mean = float(x.mean())
    if n == 1:
        return Interval(mean, math.nan, 1, math.nan, math.nan)
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf((1 + confidence) / 2, n - 1)) * std / math.sqrt(n)
    return Interval(mean, std, n, mean - half, mean + half)


@dataclass(frozen=True)
class Comparison:
    """``a`` against ``b``: difference of means a − b, its t-interval, the test and its p-value."""

    test: str  # PAIRED, WELCH, or "" when it cannot be tested (a side with fewer than 2 seeds)
    diff: float
    low: float
    high: float
    p: float
    n_a: int
    n_b: int
    spread: float  # the std the power calculation uses: of the paired differences, or the pooled std
    seeds_needed: float  # per method, for power POWER at ALPHA; inf: more than MAX_SEEDS; NaN: no difference

    @property
    def paired(self) -> bool:
        return self.test == PAIRED


def _degenerate_p(diff: float) -> float:
    """No spread at all: a non-zero difference is certain, a zero one is not a difference."""
    return 0.0 if diff != 0 else 1.0


def compare(a: Mapping[int, float], b: Mapping[int, float], *, pairable: bool = True,
            confidence: float = CONFIDENCE) -> Comparison:
    """Compare the runs ``a`` and ``b`` (seed -> value).

    Paired t-test over the seeds when ``pairable`` (same teacher) and both have exactly the same seeds
    (at least 2); otherwise Welch's t-test. The interval is the t-interval of the mean difference
    (paired: of the per-seed differences; Welch: with the Welch-Satterthwaite degrees of freedom).
    """
    from scipy import stats

    a = {s: float(v) for s, v in a.items() if v is not None and math.isfinite(float(v))}
    b = {s: float(v) for s, v in b.items() if v is not None and math.isfinite(float(v))}
    xa, xb = np.array(list(a.values())), np.array(list(b.values()))
    na, nb = len(xa), len(xb)
    diff = float(xa.mean() - xb.mean()) if na and nb else math.nan
    if na < 2 or nb < 2:
        return Comparison("", diff, math.nan, math.nan, math.nan, na, nb, math.nan, math.nan)
    q = (1 + confidence) / 2
    if pairable and set(a) == set(b):
        d = np.array([a[s] - b[s] for s in sorted(a)])
        sd = float(d.std(ddof=1))
        half = float(stats.t.ppf(q, na - 1)) * sd / math.sqrt(na)
        p = float(stats.ttest_rel([a[s] for s in sorted(a)], [b[s] for s in sorted(a)]).pvalue) if sd > 0 \
            else _degenerate_p(diff)
        return Comparison(PAIRED, diff, diff - half, diff + half, p, na, nb, sd,
                          seeds_needed(diff, sd, paired=True))
    va, vb = float(xa.var(ddof=1)), float(xb.var(ddof=1))
    se = math.sqrt(va / na + vb / nb)
    if se > 0:
        df = se ** 4 / ((va / na) ** 2 / (na - 1) + (vb / nb) ** 2 / (nb - 1))
        half = float(stats.t.ppf(q, df)) * se
        p = float(stats.ttest_ind(xa, xb, equal_var=False).pvalue)
    else:
        half, p = 0.0, _degenerate_p(diff)
    pooled = math.sqrt((va + vb) / 2)
    return Comparison(WELCH, diff, diff - half, diff + half, p, na, nb, pooled,
                      seeds_needed(diff, pooled, paired=False))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaNs stay NaN and do not count in the family).

    Sorted ascending p_(1) ≤ ... ≤ p_(m): adjusted p_(i) = max_{j ≤ i} min(1, (m − j + 1) p_(j)).
    """
    p = [float(v) if v is not None else math.nan for v in pvalues]
    order = sorted((i for i, v in enumerate(p) if not math.isnan(v)), key=lambda i: p[i])
    m = len(order)
    adjusted = [math.nan] * len(p)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted


def probability_of_improvement(a, b) -> float:
    """P(X > Y) + ½ P(X = Y) for a run X of ``a`` and a run Y of ``b`` (Mann-Whitney U / (n_a n_b))."""
    from scipy import stats

    xa, xb = _clean(a), _clean(b)
    if not len(xa) or not len(xb):
        return math.nan
    return float(stats.mannwhitneyu(xa, xb).statistic) / (len(xa) * len(xb))


def seeds_needed(diff: float, spread: float, *, paired: bool, alpha: float = ALPHA, power: float = POWER,
                 max_seeds: int = MAX_SEEDS) -> float:
    """The smallest number of seeds n per method at which a two-sided t-test at ``alpha`` detects a true
    difference ``diff`` with probability ``power``, when runs spread by ``spread``.

    Paired: a one-sample t-test on n differences with std ``spread``: noncentrality diff/spread·√n,
    n − 1 degrees of freedom. Independent (Welch, planned with equal n and the pooled std ``spread``):
    noncentrality diff/(spread·√(2/n)), 2n − 2 degrees of freedom. Power = P(|T'| > t_{1−α/2}).
    NaN when there is no difference (or no spread estimate); inf when more than ``max_seeds``.
    """
    from scipy import stats

    if diff is None or spread is None or math.isnan(diff) or math.isnan(spread) or diff == 0:
        return math.nan
    if spread == 0:
        return 2.0
    n = np.arange(2, max_seeds + 1, dtype=float)
    if paired:
        df, nc = n - 1, abs(diff) / spread * np.sqrt(n)
    else:
        df, nc = 2 * n - 2, abs(diff) / (spread * np.sqrt(2 / n))
    critical = stats.t.ppf(1 - alpha / 2, df)
    achieved = stats.nct.sf(critical, df, nc) + stats.nct.cdf(-critical, df, nc)
    enough = np.nonzero(achieved >= power)[0]
    return float(n[enough[0]]) if len(enough) else math.inf


def format_seeds(value: float) -> str:
    if value is None or math.isnan(value):
        return "—"
    return f"> {MAX_SEEDS}" if math.isinf(value) else f"{int(value)}"


# --------------------------------------------------------- several data sets ---

def average_ranks(scores: pd.DataFrame) -> tuple[pd.DataFrame, pd.Series]:
    """Ranks of the methods (rows) within each column (data set), 1 = highest score, ties averaged;
    and each method's average rank over the columns."""
    from scipy import stats

    ranks = scores.apply(lambda column: pd.Series(stats.rankdata(-column.to_numpy(dtype=float)),
                                                  index=column.index))
    return ranks, ranks.mean(axis=1)


@dataclass(frozen=True)
class RankTest:
    """Friedman's test over N columns and k methods, and the Nemenyi critical difference."""

    k: int
    n: int
    statistic: float  # Friedman's chi-square (with scipy's tie correction)
    p: float
    critical_difference: float  # Nemenyi, at ALPHA


def nemenyi_critical_difference(k: int, n: int, alpha: float = ALPHA) -> float:
    """CD = q_α √(k(k+1)/(6N)), q_α the studentized range quantile over √2 (Demšar 2006, Sec. 3.2.2)."""
    from scipy import stats

    q = float(stats.studentized_range.ppf(1 - alpha, k, np.inf)) / math.sqrt(2)
    return q * math.sqrt(k * (k + 1) / (6 * n))


def friedman(scores: pd.DataFrame, alpha: float = ALPHA) -> RankTest:
    """Friedman's test of equal average ranks: methods are rows, columns are data sets (k ≥ 3, N ≥ 2)."""
    from scipy import stats

    k, n = scores.shape
    if k < 3 or n < 2:
        raise ValueError(f"Friedman's test needs at least 3 methods and 2 data sets, got {k} and {n}")
    result = stats.friedmanchisquare(*[scores.iloc[i].to_numpy(dtype=float) for i in range(k)])
    return RankTest(k, n, float(result.statistic), float(result.pvalue), nemenyi_critical_difference(k, n, alpha))
