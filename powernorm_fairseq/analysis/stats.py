"""Statistics for comparing norms over seeds: summaries, paired confidence intervals, and the
paired bootstrap of BLEU on one test set.

The reproduction campaign trains every norm with the same seeds (the seed fixes the data order
and the initialisation draws), so differences are taken **per seed** and the interval is the
paired Student-t interval of those differences:

    d_s = X_s - LN_s,  s = 1..n
    mean(d) +- t_{1-(1-level)/2, n-1} * sd(d) / sqrt(n)

A difference is called a difference only when this interval excludes 0 (``verdict``). With
n = 3 seeds the t factor is 4.30, so only large, consistent gaps pass: that is the point. Each
interval carries the paired t statistic and its two-sided p-value; over the comparisons of one
table (every norm minus LN, one evaluation) :func:`holm` applies Holm's step-down correction, and
a table names a direction only where the Holm-adjusted p-value is below 0.05 (equivalently, the
interval at the level of its Holm step excludes 0).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Interval:
    """A paired difference over seeds: ``mean`` and its two-sided ``level`` interval."""

    n: int
    mean: float
    low: float
    high: float
    level: float = 0.95
    sd: float = math.nan  # of the per-seed differences

    @property
    def t(self) -> float:
        """The paired t statistic ``mean / (sd / sqrt(n))`` (nan for one seed)."""
        if self.n < 2 or not self.sd > 0:
            return math.nan if self.n < 2 else math.copysign(math.inf, self.mean) if self.mean else 0.0
        return self.mean / (self.sd / math.sqrt(self.n))

    @property
    def p(self) -> float:
        """The two-sided p-value of the paired t-test (nan for one seed)."""
        from scipy.stats import t as student

        if self.n < 2:
            return math.nan
        return float(2 * student.sf(abs(self.t), self.n - 1))

    def at_level(self, level: float) -> Interval:
        """The same difference with its interval at another two-sided ``level``."""
        if self.n < 2:
            return Interval(self.n, self.mean, math.nan, math.nan, level, self.sd)
        half = t_quantile(1 - (1 - level) / 2, self.n - 1) * self.sd / math.sqrt(self.n)
        return Interval(self.n, self.mean, self.mean - half, self.mean + half, level, self.sd)

    def fmt_tp(self) -> str:
        """``t = .., p = ..`` (empty for one seed)."""
        return "" if self.n < 2 else f"t = {self.t:.2f}, p = {self.p:.3f}"

    @property
    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.low > 0 or self.high < 0)

    def fmt(self, digits: int = 2) -> str:
        if self.n < 2:
            return f"{self.mean:+.{digits}f} (1 seed: no interval)"
        return (f"{self.mean:+.{digits}f} [{self.low:+.{digits}f}, {self.high:+.{digits}f}] "
                f"({self.n} seeds)")


def t_quantile(p: float, df: int) -> float:
    """Student-t quantile (scipy; exact, not a table)."""
    from scipy.stats import t

    return float(t.ppf(p, df))


def mean_sd(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    if not values:
        raise ValueError("mean_sd of no values")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else None)


def paired_interval(x: dict[int, float], base: dict[int, float], level: float = 0.95) -> Interval | None:
    """Paired-t interval of ``x[s] - base[s]`` over the seeds both have; None when none shared."""
    seeds = sorted(set(x) & set(base))
    if not seeds:
        return None
    d = [x[s] - base[s] for s in seeds]
    m = statistics.mean(d)
    if len(d) < 2:
        return Interval(1, m, math.nan, math.nan, level)
    sd = statistics.stdev(d)
    half = t_quantile(1 - (1 - level) / 2, len(d) - 1) * sd / math.sqrt(len(d))
    return Interval(len(d), m, m - half, m + half, level, sd)


@dataclass(frozen=True)
class Holm:
    """One comparison of a family after Holm's step-down correction: its interval at the level of
    its step (``1 - alpha / (m - rank)``, rank 0 the smallest p), the adjusted p-value, and
    whether it holds (adjusted p < alpha: a direction may be named)."""

    interval: Interval
    p_adjusted: float
    holds: bool
    m: int


def holm(intervals: dict, alpha: float = 0.05) -> dict:
    """Holm's step-down correction over ``intervals`` (key -> :class:`Interval`; those of fewer
    than two seeds are left out of the family): key -> :class:`Holm`."""
    tested = {k: iv for k, iv in intervals.items() if iv is not None and iv.n >= 2}
    m = len(tested)
    out, running = {}, 0.0
    for rank, (key, iv) in enumerate(sorted(tested.items(), key=lambda kv: kv[1].p)):
        running = max(running, min(1.0, (m - rank) * iv.p))  # adjusted p-values stay monotone
        out[key] = Holm(iv.at_level(1 - alpha / (m - rank)), running, running < alpha, m)
    return out


def verdict(name: str, base: str, iv: Interval | None, higher_better: bool, corrected: Holm | None = None) -> str:
    """The words a table may use: a direction only when the interval excludes 0 (and, given the
    family's ``corrected`` result, only when it holds after Holm's correction), "no significant
    difference" only when there is an interval (two or more seeds) and it holds 0."""
    if iv is None:
        return "not run"
    if iv.n < 2:  # one seed pair has no spread to test against: silence, not "no difference"
        return "untested"  # fmt() says "1 seed: no interval"
    if not iv.excludes_zero:
        return "no significant difference at this scale"
    if corrected is not None and not corrected.holds:
        return "no significant difference after Holm's correction"
    sign = ">" if iv.mean > 0 else "<"
    better = (iv.mean > 0) == higher_better
    return f"{name} {sign} {base} ({'better' if better else 'worse'})"


def paired_bootstrap_bleu(refs: list[str], baseline: list[str], system: list[str], *,
                          tokenize: str = "13a", lowercase: bool = False,
                          n_samples: int = 1000) -> dict:
    """sacreBLEU's paired bootstrap resampling (``sacrebleu --paired-bs``) of ``system`` against
    ``baseline`` on one test set, with each system's bootstrap mean and 95% half-width.

    The p-value is sacreBLEU's for the observed *absolute* difference (two-sided: the direction
    is read from the scores).

    ``tokenize``/``lowercase`` as in :class:`sacrebleu.metrics.BLEU` (``"none"`` for already
    tokenized text). The resampling seed is sacreBLEU's fixed default (12345), so the result is
    reproducible and in the signature.
    """
    from sacrebleu.metrics import BLEU
    from sacrebleu.significance import PairedTest

    if not (len(refs) == len(baseline) == len(system)):
        raise ValueError(f"paired bootstrap needs equal lengths: refs {len(refs)}, baseline "
                         f"{len(baseline)}, system {len(system)}")
    metric = BLEU(tokenize=tokenize, lowercase=lowercase, force=tokenize == "none")
    test = PairedTest([("baseline", baseline), ("system", system)], {"BLEU": metric}, [refs],
                      test_type="bs", n_samples=n_samples)
    signatures, scores = test()
    base_res, sys_res = scores["BLEU"]
    return {"p_value": float(sys_res.p_value), "signature": str(signatures["BLEU"]),
            "baseline": {"score": round(float(base_res.score), 2), "mean": round(float(base_res.mean), 2),
                         "ci95": round(float(base_res.ci), 2)},
            "system": {"score": round(float(sys_res.score), 2), "mean": round(float(sys_res.mean), 2),
                       "ci95": round(float(sys_res.ci), 2)}}
