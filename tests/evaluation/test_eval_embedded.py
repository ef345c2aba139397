"""Integration: batched evaluation of the embedded SmolLM2-135M equals one-at-a-time evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest
from eval_helpers import assert_same_records

from flearning.resources import sample_path

REPO = Path(__file__).resolve().parents[2]
SAMPLE = sample_path("counterfact-200.json")
SHARED = REPO.parent / "shared" / "data" / "counterfact" / "counterfact-val.json"
N_RECORDS = 16


def _records():
    from flearning.data import load_records

    for path in (SAMPLE, SHARED):
        if path.is_file():
            return load_records(path, "counterfact", limit=N_RECORDS)
    pytest.skip("no CounterFact records available")


@pytest.fixture(scope="module")
def smollm():
    from flearning.models import load_model

    try:
        return load_model()
    except Exception as ex:  # the embedded package is missing on this machine
        pytest.skip(f"embedded model unavailable: {ex}")


@pytest.mark.slow
def test_embedded_batched_equals_one_at_a_time(smollm):
    from flearning.evaluation.evaluate import evaluate
    from flearning.evaluation.oracle import evaluate_oracle, single_score
    from flearning.evaluation.probes import pad_token_id, record_probes, unique_probes
    from flearning.evaluation.scoring import score_probes

    model, tokenizer = smollm
    records = _records()
    batched = evaluate(model, tokenizer, records, reference=model, batch_size=8, progress=False)
    single = evaluate_oracle(model, tokenizer, records, reference_model=model)
    assert_same_records(batched.records, single.records, tol=1e-6)

    # Position by position: every probe's argmaxes identical, mean NLL equal to float precision.
    probes, _ = unique_probes(record_probes(tokenizer, r).all() for r in records)
    scores = score_probes(model, probes, pad_id=pad_token_id(tokenizer), batch_size=8)
    for probe, score in zip(probes, scores, strict=True):
        alone = single_score(model, probe)
        assert score.argmax == alone.argmax
        assert abs(score.accuracy - alone.accuracy) <= 1e-6
        assert abs(score.nll - alone.nll) <= 1e-4


@pytest.mark.slow
def test_embedded_perplexity_is_plausible_and_batched_equals_one_at_a_time(smollm):
    """SmolLM2-135M on 8 of the shipped WikiText-2 passages: a language model's perplexity (not a random
    model's ~49 152), the same batched as one passage at a time."""
    from flearning.evaluation.corpus import PerplexityCorpus
    from flearning.evaluation.perplexity import perplexity

    model, tokenizer = smollm
    corpus = PerplexityCorpus.load(passages=8)
    batched = perplexity(model, tokenizer, corpus.passages, batch_tokens=2048)
    alone = perplexity(model, tokenizer, corpus.passages, batch_tokens=1)
    assert 5.0 < batched.perplexity < 200.0 and batched.tokens > 600
    assert abs(batched.nll - alone.nll) < 1e-5
