"""Perplexity on held-out text: the batched value equals a one-passage-at-a-time hand computation, and
padding (how passages share a batch, the pad token) does not change it."""

from __future__ import annotations

import json
import math

import pytest
import torch
from eval_helpers import crafted_records, sharp_llama

from flearning.errors import FlearnError
from flearning.evaluation import EvalResult, write_report
from flearning.evaluation.corpus import (
    DEFAULT_CORPUS,
    PerplexityCorpus,
    corpus_path,
    load_passages,
    split_passages,
)
from flearning.evaluation.evaluate import evaluate
from flearning.evaluation.perplexity import encode_passages, passage_nll, perplexity, token_batches
from flearning.evaluation.results import aggregate_perplexity

PASSAGES = [
    "The quick brown fox jumps over the lazy dog.",
    "A",  # one token: nothing to predict, left out
    "Homarus gammarus , known as the European lobster , is a species of clawed lobster .",
    "It may grow to a length of 60 cm ( 24 in ) and a mass of 6 kilograms ( 13 lb ) , and bears a "
    "conspicuous pair of claws . In life , the lobsters are blue , only becoming lobster red on cooking .",
    "Short one.",
    "Mating occurs in the summer , producing eggs which are carried by the females for up to a year.",
]
MAX_TOKENS = 64  # byte tokens: the three longer passages are cut


def hand_perplexity(model, tokenizer, passages, max_tokens):
    """One unpadded forward per passage, full logits, log-softmax in float64: exp(Σ NLL / N)."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for text in passages:
            ids = tokenizer(text)["input_ids"][:max_tokens]
            if len(ids) < 2:
                continue
            logits = model(input_ids=torch.tensor([ids])).logits[0].double()
            log_probs = torch.log_softmax(logits[:-1], dim=-1)
            total -= float(log_probs.gather(1, torch.tensor(ids[1:])[:, None]).sum())
            count += len(ids) - 1
    return math.exp(total / count), total / count, count


@pytest.mark.parametrize("batch_tokens", [1, 100, 10_000])
def test_batched_perplexity_equals_one_passage_at_a_time(tokenizer, batch_tokens):
    model = sharp_llama(0)
    want, want_nll, want_tokens = hand_perplexity(model, tokenizer, PASSAGES, MAX_TOKENS)
    got = perplexity(model, tokenizer, PASSAGES, max_tokens=MAX_TOKENS, batch_tokens=batch_tokens)
    assert got.tokens == want_tokens
    cut = sum(len(tokenizer(p)["input_ids"]) > MAX_TOKENS for p in PASSAGES)
    assert got.passages == len(PASSAGES) - 1 and got.truncated == cut == 3 and got.max_tokens == MAX_TOKENS
    assert abs(got.nll - want_nll) < 1e-5
    assert got.perplexity == pytest.approx(want, rel=1e-5)
    assert got.perplexity == pytest.approx(math.exp(got.nll), rel=1e-12)


def test_padding_does_not_change_a_passage(tokenizer):
    """Each passage's summed NLL is the same alone (no padding), in one batch padded to the longest with
    one pad id, and padded with another; its count is its token count minus one."""
    model = sharp_llama(1)
    encoded, _ = encode_passages(tokenizer, PASSAGES, MAX_TOKENS)
    alone = passage_nll(model, encoded, pad_id=0, batch_tokens=1)
    padded = passage_nll(model, encoded, pad_id=0, batch_tokens=10_000)
    other_pad = passage_nll(model, encoded, pad_id=200, batch_tokens=10_000)
    assert len(token_batches([len(p) for p in encoded], 10_000)) == 1  # really one padded batch
    for (a, n), (b, m), (c, k), ids in zip(alone, padded, other_pad, encoded, strict=True):
        assert n == m == k == len(ids) - 1
        assert abs(a - b) < 1e-5 * n and abs(a - c) < 1e-5 * n


def test_model_mode_is_restored_and_errors(tokenizer):
    model = sharp_llama(0)
    model.train()
    perplexity(model, tokenizer, PASSAGES[:1], max_tokens=8)
    assert model.training
    with pytest.raises(ValueError, match="nothing to predict"):
        perplexity(model, tokenizer, ["A", ""], max_tokens=8)
    with pytest.raises(ValueError):
        encode_passages(tokenizer, PASSAGES, 1)


def test_token_batches_respect_the_budget():
    lengths = [5, 3, 9, 9, 2, 7]
    batches = token_batches(lengths, 18)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) == 1 or len(batch) * max(lengths[i] for i in batch) <= 18
        assert lengths[batch[0]] == max(lengths[i] for i in batch)  # the first row is the longest
    assert token_batches([50, 40], 10) == [[0], [1]]  # a passage longer than the budget is alone


def test_passages_are_blocks_between_blank_lines(tmp_path):
    text = "First line\nstill the first.\n\n\n  Second  \n \t \nThird\r\n\r\nFourth"
    assert split_passages(text) == ["First line\nstill the first.", "Second", "Third", "Fourth"]
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    assert load_passages(path, 2) == ["First line\nstill the first.", "Second"]
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(FlearnError, match="holds no text"):
        load_passages(tmp_path / "empty.txt")
    with pytest.raises(FlearnError, match="not found"):
        load_passages(tmp_path / "missing.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(FlearnError, match="not UTF-8"):
        load_passages(tmp_path / "latin1.txt")


def test_the_shipped_corpus():
    path = corpus_path(DEFAULT_CORPUS)
    assert path.stat().st_size < 100_000
    passages = load_passages(DEFAULT_CORPUS)
    assert len(passages) == 200
    assert all(200 <= len(p) <= 600 and "\n" not in p and not p.startswith("=") for p in passages)
    readme = (path.parent / "README.md").read_text()
    assert path.name in readme and "CC BY-SA" in readme


def test_evaluate_measures_perplexity_when_asked(tokenizer):
    model = sharp_llama(0)
    corpus = PerplexityCorpus(tuple(PASSAGES), max_tokens=MAX_TOKENS, corpus="mine.txt")
    records = crafted_records(3)
    result = evaluate(model, tokenizer, records, generation=False, perplexity=corpus, progress=False)
    alone = perplexity(model, tokenizer, PASSAGES, max_tokens=MAX_TOKENS, corpus="mine.txt")
    assert result.perplexity == {**alone.to_json(), "seconds": result.perplexity["seconds"]}
    assert result.perplexity["corpus"] == "mine.txt" and "perplexity" in result.meta["seconds"]
    assert evaluate(model, tokenizer, records, generation=False, progress=False).perplexity is None


def test_the_default_corpus_loads_as_an_input():
    corpus = PerplexityCorpus.load()
    assert corpus.corpus == DEFAULT_CORPUS == "sample:wikitext-2-valid-200.txt"
    assert len(corpus.passages) == 200 and corpus.max_tokens == 256
    assert len(PerplexityCorpus.load(passages=5).passages) == 5


def _result(seed, value):
    ppl = {
        "perplexity": value,
        "nll": math.log(value),
        "tokens": 10,
        "passages": 2,
        "truncated": 0,
        "max_tokens": 8,
        "corpus": "c.txt",
        "seconds": 0.1,
    }
    return EvalResult(records=[{"id": "a", "reliability": 1.0}], seed=seed, perplexity=ppl)


def test_aggregate_perplexity_over_seeds():
    agg = aggregate_perplexity([_result(0, 10.0), _result(1, 14.0)])
    assert agg["mean"] == 12.0 and agg["std_seeds"] == pytest.approx(math.sqrt(8.0))
    assert agg["seed_values"] == [10.0, 14.0] and agg["n_seeds"] == 2
    assert (agg["corpus"], agg["passages"], agg["tokens"], agg["max_tokens"]) == ("c.txt", 2, 10, 8)
    assert aggregate_perplexity([EvalResult(records=[])]) is None


def test_report_shows_perplexity(tmp_path):
    results = {
        "before": [_result(0, 10.0)],
        "after": [_result(0, 12.5)],
        "other": [EvalResult(records=[{"id": "a", "reliability": 0.0}])],
    }
    sweep = {"m": {0.5: [_result(0, 11.0)], 1.0: [_result(0, 30.0)]}}
    write_report(results, tmp_path, sweep=sweep, sweep_baselines=["before"])
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert doc["methods"]["after"]["perplexity"]["mean"] == 12.5
    assert (
        "perplexity" not in doc["methods"]["other"] and "perplexity" not in doc["methods"]["after"]["metrics"]
    )
    md = (tmp_path / "summary.md").read_text()
    assert "## General ability: perplexity on held-out text" in md
    assert "| before | 10.00 |" in md and "| after | 12.50 |" in md and "| other | – |" in md
    points = json.loads((tmp_path / "sweep.json").read_text())["methods"]["m"]
    assert [p["perplexity"]["mean"] for p in points] == [11.0, 30.0]
    assert (tmp_path / "metrics.png").stat().st_size > 0 and (tmp_path / "sweep.png").stat().st_size > 0


def test_perplexity_is_cached_by_weights_and_passages(tokenizer, tmp_path, caplog):
    model = sharp_llama(0)
    first = perplexity(model, tokenizer, PASSAGES, max_tokens=MAX_TOKENS, cache_dir=tmp_path, corpus="a")
    (path,) = tmp_path.glob("perplexity-*.json")
    again = perplexity(model, tokenizer, PASSAGES, max_tokens=MAX_TOKENS, cache_dir=tmp_path, corpus="b")
    assert again.cached and not first.cached
    assert (again.perplexity, again.tokens, again.seconds, again.corpus) == (
        first.perplexity,
        first.tokens,
        first.seconds,
        "b",
    )
    # other passages, another cut, other weights: measured anew
    assert not perplexity(model, tokenizer, PASSAGES[:3], max_tokens=MAX_TOKENS, cache_dir=tmp_path).cached
    assert not perplexity(model, tokenizer, PASSAGES, max_tokens=MAX_TOKENS - 1, cache_dir=tmp_path).cached
    weight = next(model.parameters())
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.add_(1e-3)
    moved = perplexity(model, tokenizer, PASSAGES, max_tokens=MAX_TOKENS, cache_dir=tmp_path)
    assert not moved.cached and moved.perplexity != first.perplexity
    # an unreadable cache file is measured again, with a warning
    path.write_text("{not json")
    with torch.no_grad():
        weight.copy_(saved)  # the first weights again: their cache file is the unreadable one
    redone = perplexity(model, tokenizer, PASSAGES, max_tokens=MAX_TOKENS, cache_dir=tmp_path)
    assert not redone.cached and redone.perplexity == pytest.approx(first.perplexity, rel=1e-9)
    assert "unreadable perplexity cache" in caplog.text
