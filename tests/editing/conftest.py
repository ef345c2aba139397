from __future__ import annotations

import pytest
import torch

from tiny import tiny_tokenizer


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matrices: one thread is ~50x faster than two on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tok():
    return tiny_tokenizer()
