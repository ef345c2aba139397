"""Reusing the decoder blocks below the changed module (the value optimisation's saving): the same logits
and the same gradients as the whole forward, on a tiny Llama and a tiny GPT-2, for a whole block (MEMIT's
z) and a module inside a block (ROME's v), for several batches in one context; the blocks restored on
exit; a batch of another shape refused."""

from __future__ import annotations

import pytest
import torch
from editing_helpers import REQUESTS, gpt2, llama

from flearning.editing.architectures import architecture_of
from flearning.editing.requests import as_requests, pad_batch, rewrite_sequence
from flearning.editing.tracing import adding, frozen, reusing_lower_blocks


def _batch(tok):
    requests = as_requests(REQUESTS)
    sequences = [rewrite_sequence(tok, r, i, p) for i, r in enumerate(requests) for p in ("", "So. ")]
    batch = pad_batch(tok, sequences)
    rows = torch.arange(len(sequences))
    positions = torch.tensor([s.lookup for s in sequences])
    return batch, rows, positions


def _logits_and_grad(model, module, batch, rows, positions, width):
    """The logits with δ added at ``module``'s output, and the gradient of their sum of squares at δ."""
    delta = torch.linspace(-1, 1, len(rows) * width).reshape(len(rows), width).requires_grad_(True)
    with adding(model, module, rows, positions, lambda: delta):
        logits = model(**batch).logits
    (logits.pow(2).sum() / logits.numel()).backward()
    return logits.detach(), delta.grad.detach()


@pytest.mark.parametrize("build", [llama, gpt2], ids=["llama", "gpt2"])
@pytest.mark.parametrize("where", ["block", "mlp_output"])
def test_the_reused_forward_equals_the_whole_forward(build, where, tok):
    model = build(layers=4)
    arch = architecture_of(model)
    module = arch.block_name(2) if where == "block" else arch.rewrite_name(2)
    batch, rows, positions = _batch(tok)
    with frozen(model), torch.enable_grad():
        whole = _logits_and_grad(model, module, batch, rows, positions, 32)
        with reusing_lower_blocks(model, module, [batch]):
            reused = _logits_and_grad(model, module, batch, rows, positions, 32)
            again = _logits_and_grad(model, module, batch, rows, positions, 32)
    for a, b in ((whole, reused), (whole, again)):
        assert torch.allclose(a[0], b[0], rtol=0, atol=1e-6)
        assert torch.allclose(a[1], b[1], rtol=0, atol=1e-6)
    assert float(whole[1].abs().sum()) > 0  # the gradient reaches δ


def test_the_lower_blocks_are_skipped_and_restored(tok):
    model = llama(layers=4)
    arch = architecture_of(model)
    blocks = model.get_submodule(arch.layers)
    calls = [0] * len(blocks)
    originals = [type(b).forward for b in blocks]
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: calls.__setitem__(i, calls[i] + 1))
    batch, _, _ = _batch(tok)
    with torch.no_grad():
        before = model(**batch).logits
        calls[:] = [0] * len(blocks)
        with reusing_lower_blocks(model, arch.block_name(1), [batch]):
            calls[:] = [0] * len(blocks)  # the pass on entry ran blocks 0 and 1
            model(**batch)
            model(**batch)
            # every block is still called (its hooks fire), but 0 and 1 hand on the stored output
            assert calls == [2, 2, 2, 2]
            assert all("forward" in b.__dict__ for b in blocks[:2])
            assert all("forward" not in b.__dict__ for b in blocks[2:])
        after = model(**batch).logits
    assert all("forward" not in b.__dict__ for b in blocks)
    assert [type(b).forward for b in blocks] == originals
    assert torch.equal(before, after)


def test_a_forward_of_another_batch_is_refused(tok):
    model = llama(layers=3)
    arch = architecture_of(model)
    batch, _, _ = _batch(tok)
    other = {k: v[:2] for k, v in batch.items()}
    with (
        torch.no_grad(),
        reusing_lower_blocks(model, arch.rewrite_name(1), [batch]),
        pytest.raises(RuntimeError, match="not the selected batch's"),
    ):
        model(**other)


def test_a_module_in_the_lowest_block_skips_nothing(tok):
    model = gpt2(layers=2)
    arch = architecture_of(model)
    batch, _, _ = _batch(tok)
    with reusing_lower_blocks(model, arch.rewrite_name(0), [batch]):
        assert all("forward" not in b.__dict__ for b in model.get_submodule(arch.layers))
    with (
        pytest.raises(ValueError, match="not inside a decoder block"),
        reusing_lower_blocks(model, "lm_head", [batch]),
    ):
        pass


@pytest.mark.parametrize("build", [llama, gpt2], ids=["llama", "gpt2"])
def test_each_batch_gets_its_own_stored_output(build, tok):
    """Batches of different shapes in one context: selecting each gives its whole forward's logits."""
    model = build(layers=3)
    arch = architecture_of(model)
    batch, _, _ = _batch(tok)
    short = {k: v[:2, :-3] for k, v in batch.items()}
    second = {k: v[2:] for k, v in batch.items()}
    with torch.no_grad():
        whole = [model(**b).logits for b in (batch, short, second)]
        with reusing_lower_blocks(model, arch.block_name(1), [batch, short, second]) as select:
            for i in (2, 0, 1, 2):
                select(i)
                assert torch.allclose(model(**(batch, short, second)[i]).logits, whole[i], rtol=0, atol=1e-6)
            with pytest.raises(IndexError):
                select(3)
