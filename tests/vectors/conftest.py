from __future__ import annotations

import warnings

import pytest
from vector_helpers import finetuned_copy

from tiny import tiny_llama


@pytest.fixture
def base():
    return tiny_llama(0)


@pytest.fixture
def finetuned(base):
    return finetuned_copy(base)


@pytest.fixture(autouse=True)
def _quiet_peft():
    # peft warns about tiny test models (e.g. "all-linear" on a model without a known output layer name).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield
