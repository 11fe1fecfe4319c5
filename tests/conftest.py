"""Test-session settings: one intra-op thread.

The tests use tiny models, for which torch's second thread buys little; on a shared 2-core machine a second thread
that waits for a busy core makes small CPU ops up to 10x slower. Subprocess tests set OMP_NUM_THREADS=1 likewise.
"""
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/fed_fixtures.py
torch.set_num_threads(1)


@pytest.fixture
def one_thread():
    """Bitwise parity needs the same torch thread count in the in-process run and in each client (num_cpus: 1)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
