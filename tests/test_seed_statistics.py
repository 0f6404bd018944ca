"""Mean, standard deviation, Student-t quantiles at fractional degrees of freedom and Welch's interval."""
from __future__ import annotations

import math

import pytest

from seed_statistics import incomplete_beta, mean_std, student_t_cdf, student_t_quantile, welch_interval


def test_mean_and_sample_std():
    assert mean_std([2.0, 4.0, 4.0, 4.0, 5.0, 5.0, 7.0, 9.0]) == pytest.approx((5.0, math.sqrt(32 / 7)))
    assert mean_std([3.5]) == (3.5, None)  # one run: no spread to tell


@pytest.mark.parametrize("df, p, table", [(1, 0.975, 12.706), (2, 0.975, 4.303), (3, 0.975, 3.182),
                                          (4, 0.975, 2.776), (5, 0.95, 2.015), (10, 0.975, 2.228),
                                          (30, 0.975, 2.042), (120, 0.975, 1.980), (4, 0.995, 4.604)])
def test_t_quantiles_match_the_printed_table(df, p, table):
    assert student_t_quantile(p, df) == pytest.approx(table, abs=6e-4)
    assert student_t_quantile(1 - p, df) == pytest.approx(-table, abs=6e-4)


@pytest.mark.parametrize("p", [0.6, 0.9, 0.975, 0.999])
def test_t_quantiles_match_the_closed_forms_of_one_and_two_df(p):
    assert student_t_quantile(p, 1) == pytest.approx(math.tan(math.pi * (p - 0.5)), rel=1e-9)  # Cauchy
    assert student_t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), rel=1e-9)


@pytest.mark.parametrize("df, t", [(1.5, 2.0), (2.7, 0.8), (4.959, 2.5), (7.25, -1.3)])
def test_t_cdf_at_fractional_df_equals_the_integral_of_the_density(df, t):
    """Simpson's rule over the t density from 0 to t, an independent route to P(0 < T < t)."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    density = lambda x: math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))  # noqa: E731
    steps, h = 20_000, t / 20_000
    integral = h / 3 * sum((1 if i in (0, steps) else 4 if i % 2 else 2) * density(i * h) for i in range(steps + 1))
    assert student_t_cdf(t, df) == pytest.approx(0.5 + integral, abs=1e-9)
    assert student_t_cdf(student_t_quantile(0.975, df), df) == pytest.approx(0.975, abs=1e-12)


def test_t_quantile_falls_with_the_degrees_of_freedom():
    values = [student_t_quantile(0.975, df) for df in (1, 1.5, 2, 2.5, 3, 4.959, 5, 30)]
    assert all(b < a for a, b in zip(values, values[1:]))
    assert student_t_quantile(0.975, 1e6) == pytest.approx(1.95996, abs=1e-4)  # the normal's


def test_incomplete_beta_known_values():
    assert incomplete_beta(1, 1, 0.3) == pytest.approx(0.3)  # uniform
    assert incomplete_beta(2, 3, 0.4) == pytest.approx(0.5248)  # 1 - sum of binomial terms, by hand
    assert incomplete_beta(0.5, 0.5, 0.5) == pytest.approx(0.5)


def test_welch_interval_by_hand():
    # equal n and variances: df = 2 (n - 1) = 4, se = sqrt(1/3 + 1/3), t(0.975, 4) = 2.7764
    difference = welch_interval([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    half = 2.776445 * math.sqrt(2 / 3)
    assert difference.delta == 3.0 and difference.df == pytest.approx(4.0)
    assert (difference.low, difference.high) == pytest.approx((3.0 - half, 3.0 + half), abs=1e-5)
    # unequal: s^2 = 1 and 5/3, se^2 = 1/3 + 5/12 = 0.75, df = 0.5625 / (1/18 + 25/432) = 4.9586...
    difference = welch_interval([1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0])
    assert difference.delta == 3.5 and difference.df == pytest.approx(0.5625 / (1 / 18 + 25 / 432))
    half = student_t_quantile(0.975, difference.df) * math.sqrt(0.75)
    assert difference.high - difference.low == pytest.approx(2 * half) and 2.57 < half / math.sqrt(0.75) < 2.58


def test_welch_interval_needs_two_runs_per_group():
    assert welch_interval([70.0], [72.0, 74.0]) == (3.0, None, None, None)
    assert welch_interval([1.0, 1.0], [2.0, 2.0]) == (1.0, 1.0, 1.0, None)  # no spread at all
