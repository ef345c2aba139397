"""Optimised values kept on disk (``editing.value_cache``): a second run reads every value back without
a forward pass, a run holding some of them optimises only the others and gives what a run without the
cache gives, other weights miss, a damaged entry is recomputed, and sequential ROME edits resume."""

from __future__ import annotations

import torch
from editing_helpers import REQUESTS, llama

from flearning.editing import ValueCache, rome_edits
from flearning.editing.architectures import architecture_of
from flearning.editing.requests import CONTEXT_PREFIXES, as_requests
from flearning.editing.values import ValueSettings, optimise_values

SETTINGS = ValueSettings(steps=6, requests_per_pass=2)


def run(model, tok, requests, cache=None):
    module = architecture_of(model).block_name(2)
    return optimise_values(
        model, tok, requests, module, prefixes=CONTEXT_PREFIXES, settings=SETTINGS, cache=cache
    )


def forwards(model):
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(1))
    return calls


def assert_same(a, b):
    for name in ("target", "init", "delta"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert (a.losses, a.nll, a.steps) == (b.losses, b.nll, b.steps)


def test_a_second_run_reads_every_value_back(tok, tmp_path):
    model, requests, cache = llama(), as_requests(REQUESTS), ValueCache(tmp_path / "values")
    first = run(model, tok, requests, cache)
    assert len(list((tmp_path / "values").glob("*.safetensors"))) == len(requests)
    calls = forwards(model)
    second = run(model, tok, requests, cache)
    assert calls == []  # nothing optimised again
    assert_same(second, first)
    assert first.steps[0] > 0 and float(first.delta.abs().sum()) > 0


def test_a_partly_filled_cache_gives_what_no_cache_gives(tok, tmp_path):
    model, requests, cache = llama(), as_requests(REQUESTS), ValueCache(tmp_path / "values")
    one = run(model, tok, requests[1:2], cache)
    cached = run(model, tok, requests, cache)
    plain = run(model, tok, requests)
    assert torch.equal(cached.target[1], one.target[0])
    assert torch.allclose(cached.target, plain.target, rtol=1e-4, atol=1e-5)
    assert cached.steps == plain.steps


def test_other_weights_miss_and_a_damaged_entry_is_recomputed(tok, tmp_path):
    model, requests, cache = llama(), as_requests(REQUESTS)[:2], ValueCache(tmp_path / "values")
    first = run(model, tok, requests, cache)
    other = llama(seed=1)
    calls = forwards(other)
    run(other, tok, requests, cache)
    assert calls  # optimised: its weights are not those of the cached values
    assert len(list((tmp_path / "values").glob("*.safetensors"))) == 4
    for path in (tmp_path / "values").glob("*.safetensors"):
        path.write_bytes(b"not a safetensors file")
    again = run(model, tok, requests, cache)
    assert torch.allclose(again.target, first.target, rtol=1e-5, atol=1e-6)


def test_sequential_rome_edits_resume_from_the_cache(tok, tmp_path):
    model, requests = llama(), as_requests(REQUESTS)
    cache = ValueCache(tmp_path / "values")
    settings = ValueSettings(steps=6)
    _, earlier = rome_edits(
        model, tok, requests[:2], 1, mom2_adjustment=False, values=settings, value_cache=cache
    )
    calls = forwards(model)
    total, results = rome_edits(
        model, tok, requests, 1, mom2_adjustment=False, values=settings, value_cache=cache
    )
    plain, _ = rome_edits(model, tok, requests, 1, mom2_adjustment=False, values=settings)
    assert calls  # the third edit was optimised (and the keys read)
    assert len(list((tmp_path / "values").glob("*.safetensors"))) == 3
    for name, delta in plain.items():
        torch.testing.assert_close(total[name], delta, rtol=1e-4, atol=1e-6)
    for before, now in zip(earlier, results[:2], strict=True):  # the first two edits read back exactly
        assert torch.equal(now.value, before.value)
