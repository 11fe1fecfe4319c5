"""Interval arithmetic (orchestrator/stats.py) against scipy and hand-computed numbers."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from orchestrator.stats import mean_interval, paired_difference

VALUES = [83.54, 87.20, 90.39, 85.10, 88.02]
BASE = {1: 84.43, 2: 87.30, 3: 90.78, 4: 84.00, 5: 88.50}


def test_mean_interval_matches_scipy_t_interval():
    iv = mean_interval(VALUES)
    low, high = sps.t.interval(0.95, len(VALUES) - 1, loc=np.mean(VALUES), scale=sps.sem(VALUES))
    assert iv.mean == pytest.approx(np.mean(VALUES), abs=1e-12)
    assert (iv.low, iv.high) == (pytest.approx(low, abs=1e-10), pytest.approx(high, abs=1e-10))
    assert iv.std == pytest.approx(np.std(VALUES, ddof=1), abs=1e-12)
    # by hand: t(0.975, 4) = 2.7764451, std = 2.5921..., half = t * std / sqrt(5)
    assert iv.half_width == pytest.approx(2.7764451 * np.std(VALUES, ddof=1) / math.sqrt(5), rel=1e-6)
    iv90 = mean_interval(VALUES, confidence=0.9)
    assert iv90.half_width == pytest.approx(sps.t.ppf(0.95, 4) * sps.sem(VALUES), rel=1e-12)
    assert iv90.half_width < iv.half_width


def test_paired_difference_uses_common_seeds_and_matches_scipy():
    values = dict(zip([1, 2, 3, 4, 5, 6], VALUES + [99.0]))  # seed 6 has no baseline: left out
    d = paired_difference(values, BASE)
    diffs = [values[s] - BASE[s] for s in range(1, 6)]
    low, high = sps.t.interval(0.95, 4, loc=np.mean(diffs), scale=sps.sem(diffs))
    assert d.n == 5 and (d.low, d.high) == (pytest.approx(low, abs=1e-10), pytest.approx(high, abs=1e-10))
    # the paired interval is much narrower than the unpaired spread of either side
    assert d.half_width < mean_interval(VALUES).half_width / 3
    assert not d.excludes_zero()
    shifted = {s: v + 1.0 for s, v in BASE.items()}
    assert paired_difference(shifted, BASE).excludes_zero()  # a constant +1 gap: zero width, excludes 0
    assert paired_difference({7: 1.0}, BASE) is None


def test_single_value_and_bad_input():
    iv = mean_interval([42.0])
    assert iv.mean == 42.0 and math.isnan(iv.half_width) and iv.format() == "42.00 (n=1)"
    with pytest.raises(ValueError, match="at least one"):
        mean_interval([])
    with pytest.raises(ValueError, match="confidence"):
        mean_interval([1.0, 2.0], confidence=1.5)
