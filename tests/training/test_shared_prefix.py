"""A prompt prefix common to a batch (the Alpaca template's preamble) computed once for the batch: the
training loss and every gradient equal the whole forward's (plain and LoRA, tiny Llama and GPT-2), and
the prefix is found only where it is safe (no answer inside it, several examples, long enough)."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from flearning.training import attach_lora
from flearning.training.dataset import build_examples, collate
from flearning.training.loss import answer_loss
from flearning.training.prefix import MIN_SHARED, shared_prefix_length
from tiny import tiny_llama

PAIRS = [
    ("The capital of France is", "Paris"),
    ("Q", "a much longer answer with many tokens"),
    ("Fact number seven of the list says that the sky is", "blue"),
    ("x", "y"),
]


def alpaca_batch(tokenizer):
    return collate(build_examples(tokenizer, PAIRS, add_eos=True, template="alpaca"), tokenizer.pad_token_id)


def tiny_gpt2():
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=257,
        n_embd=32,
        n_inner=64,
        n_layer=2,
        n_head=4,
        n_positions=512,
        eos_token_id=256,
        bos_token_id=256,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


def loss_and_grads(model, b, **kw):
    model.zero_grad(set_to_none=True)
    loss = answer_loss(model, b, **kw)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["llama", "llama-lora", "gpt2"])
def test_the_shared_prefix_gives_the_whole_forwards_loss_and_gradients(tokenizer, kind):
    b = alpaca_batch(tokenizer)
    shared = shared_prefix_length(b)
    # the tiny byte tokenizer: one token per byte of "Below is an instruction ... ### Instruction:\n"
    assert shared >= 100
    model = tiny_gpt2() if kind == "gpt2" else tiny_llama()
    if kind == "llama-lora":
        from flearning.training import LoraSettings

        model = attach_lora(model, LoraSettings(r=4, alpha=8))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    model.train()
    whole, whole_grads = loss_and_grads(copy.deepcopy(model), b)
    ours, our_grads = loss_and_grads(model, b, share_prefix=True)
    assert whole.item() > 1.0
    torch.testing.assert_close(ours, whole, atol=1e-5, rtol=1e-5)
    assert set(our_grads) == set(whole_grads) and whole_grads
    for name, g in whole_grads.items():
        torch.testing.assert_close(
            our_grads[name], g, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}"
        )


def test_the_prefix_is_what_every_example_shares_before_its_first_answer(tokenizer):
    b = alpaca_batch(tokenizer)
    shared = shared_prefix_length(b)
    ids = b["input_ids"]
    assert bool((ids[:, :shared] == ids[:1, :shared]).all())
    assert not bool((ids[:, shared] == ids[0, shared]).all())  # the instructions differ right after it
    first_answer = int((b["labels"] != -100).any(0).nonzero()[0])
    assert shared <= first_answer - 1


def test_no_prefix_for_plain_prompts_one_example_or_an_answer_inside_it(tokenizer):
    plain = collate(build_examples(tokenizer, PAIRS, add_eos=True), tokenizer.pad_token_id)
    assert shared_prefix_length(plain) == 0  # "The", "Q", "Fact", "x": nothing shared
    one = collate(
        build_examples(tokenizer, PAIRS[:1], add_eos=True, template="alpaca"), tokenizer.pad_token_id
    )
    assert shared_prefix_length(one) == 0
    same = collate(
        build_examples(tokenizer, [("abcdefghijkl", "m")] * 3, add_eos=True), tokenizer.pad_token_id
    )
    # every token is shared, but the answer's must be predicted: the prefix stops before the prediction
    assert shared_prefix_length(same) == len("abcdefghijkl") - 1
    assert shared_prefix_length(same, minimum=len("abcdefghijkl")) == 0
    assert MIN_SHARED > 1


def test_the_plain_template_loss_is_unchanged_by_the_option(tokenizer, tiny_model):
    plain = collate(build_examples(tokenizer, PAIRS, add_eos=True), tokenizer.pad_token_id)
    tiny_model.train()
    assert torch.equal(answer_loss(tiny_model, plain, share_prefix=True), answer_loss(tiny_model, plain))


def test_active_dropout_runs_the_batch_whole(tokenizer):
    """GPT-2 trains with dropout 0.1: a shared prefix would share its dropout mask, so it is not used."""
    from flearning.logits import can_share_prefix as can_share

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=257, n_embd=32, n_inner=64, n_layer=2, n_head=4))
    assert not can_share(model.train()) and can_share(model.eval())
    assert can_share(tiny_gpt2().train())  # dropout 0
