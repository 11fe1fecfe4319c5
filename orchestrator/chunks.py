"""Chunks of clients sized to the device's memory, for the batched engine.

The batched engine trains, fine-tunes and evaluates many clients as one computation; its memory grows with their
number (MobileNet: ~0.45 GB per client of batch 50). ``batched.max_clients`` caps a computation's clients (0: all of
them). When a computation does not fit the device anyway (``torch.OutOfMemoryError``), :class:`ClientChunks` splits
that chunk in halves and runs it again, and every later computation of the run uses the size that fitted (a line
says so, naming the key that avoids the retry). Nothing is lost by the retry: the failed computation handed nothing
back, each client's computation is independent of the others in its chunk, and its batches are keyed on (seed, round,
client); the results equal those of a run with ``batched.max_clients`` set to that size from the start.
"""
from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


class ClientChunks:
    """Runs work over chunks of at most ``size`` items, halving ``size`` when a chunk runs out of device memory."""

    def __init__(self, size: int, log: Callable[[str], None] = print):
        if size < 1:
            raise ValueError(f"chunk size must be >= 1, got {size}")
        self.size, self.log = size, log

    def run(self, items: Sequence[T], work: Callable[[list[T]], R]) -> list[R]:
        """``[work(chunk) for chunk in chunks of items]``, chunks in order, each of at most ``self.size`` items. A
        chunk of one item that does not fit re-raises the out-of-memory error."""
        results: list[R] = []
        start = 0
        while start < len(items):
            chunk = list(items[start:start + self.size])
            try:
                results.append(work(chunk))
            except torch.OutOfMemoryError:
                if len(chunk) == 1:
                    raise
                self.size = len(chunk) // 2
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.log(f"batched engine: {len(chunk)} clients at once do not fit the device's memory; "
                         f"{self.size} per computation from now on (set batched.max_clients: {self.size} to start "
                         "there)")
                continue
            start += len(chunk)
        return results
