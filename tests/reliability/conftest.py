from __future__ import annotations

import pytest
from reliability_helpers import write_facts


@pytest.fixture
def facts(tmp_path):
    """The toy facts as a JSONL file, for commands that read old and new facts."""
    return write_facts(tmp_path / "facts.jsonl")
