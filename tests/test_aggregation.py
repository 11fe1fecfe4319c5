"""Weighted averaging of client states (orchestrator/aggregation.py)."""
from __future__ import annotations

import pytest
import torch

from orchestrator.aggregation import WeightedMean, weighted_average


def test_weighted_mean_equals_hand_computed():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(10)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(20)}
    out = weighted_average([a, b], [1.0, 3.0])
    assert torch.allclose(out["w"], torch.tensor([(1 + 9) / 4, (2 + 18) / 4]))
    assert out["n"].dtype == torch.int64 and int(out["n"]) == round((10 + 60) / 4)
    with pytest.raises(ValueError):
        WeightedMean().result()
    with pytest.raises(ValueError):
        WeightedMean().add(a, 0.0)
    with pytest.raises(ValueError, match="different keys"):
        weighted_average([a, {"w": a["w"]}], [1.0, 1.0])
