"""Confidence intervals over seeds: mean ± t-interval, and the paired difference to a baseline.

A seed fixes the partition, the initial model and every batch, so two algorithms run with the same seed see the same
clients: their difference seed by seed (a paired comparison) removes the partition's share of the spread, which is
often as large as the gaps between methods. Intervals are Student-t intervals over seeds (``scipy.stats.t``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Mapping

from scipy.stats import t as student_t


@dataclass(frozen=True)
class Interval:
    """``mean`` ± ``half_width``: a ``confidence`` t-interval over ``n`` values (half_width NaN when n < 2)."""

    mean: float
    half_width: float
    n: int
    std: float
    confidence: float = 0.95

    @property
    def low(self) -> float:
        return self.mean - self.half_width

    @property
    def high(self) -> float:
        return self.mean + self.half_width

    def excludes_zero(self) -> bool:
        return self.n >= 2 and (self.low > 0 or self.high < 0)

    def format(self, digits: int = 2) -> str:
        if self.n < 2:
            return f"{self.mean:.{digits}f} (n=1)"
        return f"{self.mean:.{digits}f} ± {self.half_width:.{digits}f}"


def mean_interval(values: Iterable[float], confidence: float = 0.95) -> Interval:
    """Mean and ``confidence`` t-interval of ``values`` (sample std, n - 1 degrees of freedom)."""
    xs = [float(v) for v in values]
    if not xs:
        raise ValueError("mean_interval needs at least one value")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    n = len(xs)
    mean = sum(xs) / n
    if n < 2:
        return Interval(mean, math.nan, n, math.nan, confidence)
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = float(student_t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Interval(mean, half, n, std, confidence)


def paired_difference(values: Mapping[int, float], baseline: Mapping[int, float],
                      confidence: float = 0.95) -> Interval | None:
    """``values - baseline`` seed by seed over the seeds both have, with its t-interval (None: no common seed)."""
    seeds = sorted(set(values) & set(baseline))
    if not seeds:
        return None
    return mean_interval([values[s] - baseline[s] for s in seeds], confidence)
