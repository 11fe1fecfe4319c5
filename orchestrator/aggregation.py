"""Weighted averaging of client states (FedAvg's aggregation), streaming: one running sum, no list of states."""
from __future__ import annotations

import torch

State = dict[str, torch.Tensor]


class WeightedMean:
    """Accumulates ``sum_k w_k * state_k`` on the states' device; :meth:`result` divides by ``sum_k w_k``.

    Floating tensors are summed in their own dtype (float64 sums for integer buffers such as BN's
    ``num_batches_tracked``, rounded back to the integer dtype).
    """

    def __init__(self):
        self._sums: State | None = None
        self._dtypes: dict[str, torch.dtype] = {}
        self.total_weight = 0.0
        self.count = 0

    def add(self, state: State, weight: float) -> None:
        if not weight > 0:
            raise ValueError(f"aggregation weight must be > 0, got {weight}")
        if self._sums is None:
            self._sums = {}
            for key, value in state.items():
                self._dtypes[key] = value.dtype
                acc_dtype = value.dtype if value.is_floating_point() else torch.float64
                self._sums[key] = value.detach().to(acc_dtype) * weight
        else:
            if state.keys() != self._sums.keys():
                raise ValueError("client states to aggregate have different keys")
            for key, value in state.items():
                acc = self._sums[key]
                acc.add_(value.detach().to(acc.dtype), alpha=weight)
        self.total_weight += weight
        self.count += 1

    def result(self) -> State:
        if self._sums is None:
            raise ValueError("nothing to aggregate: no client state was added")
        out = {}
        for key, acc in self._sums.items():
            mean = acc / self.total_weight
            dtype = self._dtypes[key]
            out[key] = mean if dtype.is_floating_point else mean.round().to(dtype)
        return out


def weighted_average(states: list[State], weights: list[float]) -> State:
    agg = WeightedMean()
    for state, weight in zip(states, weights):
        agg.add(state, weight)
    return agg.result()
