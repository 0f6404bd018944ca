"""Statistics over runs that differ only in their seed: mean and standard deviation of a group, and
Welch's t confidence interval of the difference of two groups' means.

Welch's interval needs Student-t quantiles at fractional degrees of freedom, which neither torch
(``torch.distributions.StudentT`` has no ``cdf`` or ``icdf``) nor numpy provide, and scipy is not
a dependency. ``student_t_cdf`` is the exact CDF through the regularised incomplete beta function
(its continued fraction, evaluated by the modified Lentz method, Numerical Recipes 6.4), and
``student_t_quantile`` inverts it by bisection to 1e-12; the tests check both against printed
t tables, the closed forms for 1 and 2 degrees of freedom and a numerical integral of the density.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

CONFIDENCE = 0.95  # two-sided level of the intervals compare_runs.py prints


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1 in the denominator); std None for fewer than 2 values."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def _beta_continued_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of I_x(a, b) (Numerical Recipes' betacf), modified Lentz method."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    fraction = d
    for m in range(1, 1000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),                 # even step
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):   # odd step
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            fraction *= c * d
        if abs(c * d - 1.0) < 1e-15:
            return fraction
    raise ArithmeticError(f"incomplete beta continued fraction did not converge (a={a}, b={b}, x={x})")


def incomplete_beta(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b) for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):  # where the fraction converges fast; else use the symmetry
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b


def student_t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with `df` > 0 degrees of freedom (fractional df allowed)."""
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
    return 1.0 - tail if t > 0 else tail


def student_t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p, for 0 < p < 1 and df > 0, by bisection on student_t_cdf."""
    if not 0.0 < p < 1.0 or not df > 0:
        raise ValueError(f"need 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -student_t_quantile(1.0 - p, df)
    low, high = 0.0, 1.0
    while student_t_cdf(high, df) < p:
        low, high = high, 2.0 * high
    while high - low > 1e-12 * max(1.0, high):
        middle = 0.5 * (low + high)
        low, high = (middle, high) if student_t_cdf(middle, df) < p else (low, middle)
    return 0.5 * (low + high)


class Difference(NamedTuple):
    """mean(b) - mean(a) and its Welch interval; low/high/df are None when either group has n < 2."""
    delta: float
    low: float | None
    high: float | None
    df: float | None


def welch_interval(a: Sequence[float], b: Sequence[float], confidence: float = CONFIDENCE) -> Difference:
    """Welch's t interval for mean(b) - mean(a): no assumption that the two variances are equal.

    se^2 = s_a^2 / n_a + s_b^2 / n_b, with Welch-Satterthwaite degrees of freedom
    df = se^4 / ((s_a^2 / n_a)^2 / (n_a - 1) + (s_b^2 / n_b)^2 / (n_b - 1)).
    Two groups without any spread give the zero-width interval at the difference (df None).
    """
    (mean_a, std_a), (mean_b, std_b) = mean_std(a), mean_std(b)
    delta = mean_b - mean_a
    if std_a is None or std_b is None:
        return Difference(delta, None, None, None)
    var_a, var_b = std_a ** 2 / len(a), std_b ** 2 / len(b)  # squared standard errors of the means
    se2 = var_a + var_b
    if se2 == 0.0:
        return Difference(delta, delta, delta, None)
    df = se2 ** 2 / (var_a ** 2 / (len(a) - 1) + var_b ** 2 / (len(b) - 1))
    half = student_t_quantile(0.5 + confidence / 2.0, df) * math.sqrt(se2)
    return Difference(delta, delta - half, delta + half, df)
