"""orchestrator/chunks.py: chunks of clients that halve when a chunk runs out of device memory."""
from __future__ import annotations

import pytest
import torch

from orchestrator.chunks import ClientChunks


def fits(limit: int, calls: list[list[int]]):
    def work(chunk: list[int]) -> list[int]:
        calls.append(chunk)
        if len(chunk) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [10 * c for c in chunk]
    return work


def test_a_chunk_that_does_not_fit_is_run_again_in_halves_and_the_size_is_kept():
    lines: list[str] = []
    chunks = ClientChunks(8, lines.append)
    calls: list[list[int]] = []
    out = chunks.run(list(range(7)), fits(3, calls))
    # 7 do not fit, nor 3 of them? 7 -> 3 (fits) -> 3 -> 1; every item once in the results, in order
    assert [c for r in out for c in r] == [10 * c for c in range(7)]
    assert calls == [list(range(7)), [0, 1, 2], [3, 4, 5], [6]]
    assert chunks.size == 3
    assert lines == ["batched engine: 7 clients at once do not fit the device's memory; 3 per computation from now on "
                     "(set batched.max_clients: 3 to start there)"]
    calls.clear()
    chunks.run([0, 1, 2, 3], fits(3, calls))  # a later phase starts at the size that fitted
    assert calls == [[0, 1, 2], [3]]


def test_halving_goes_down_to_one_client_and_then_the_error_stands():
    chunks = ClientChunks(4, lambda _: None)
    calls: list[list[int]] = []
    with pytest.raises(torch.OutOfMemoryError):
        chunks.run([0, 1, 2, 3], fits(0, calls))
    assert calls == [[0, 1, 2, 3], [0, 1], [0]]
    assert chunks.size == 1


def test_other_errors_are_not_retried():
    chunks = ClientChunks(4, lambda _: None)

    def work(chunk):
        raise FloatingPointError("client 2: NaN loss")
    with pytest.raises(FloatingPointError):
        chunks.run([0, 1], work)
    assert chunks.size == 4
    with pytest.raises(ValueError, match="chunk size must be >= 1"):
        ClientChunks(0)
