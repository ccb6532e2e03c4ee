"""The recsys models are tiny: run their tests on one CPU thread (faster than two threads on a busy
machine), restoring the thread count afterwards."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
