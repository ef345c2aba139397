"""Gradient accumulation run as one batch (``fused_accumulation``): each micro-batch's loss and the
step's gradient equal accumulation's, whole stages end at the same weights and losses, and a step
whose rows share no prefix runs its micro-batches one after the other, bit for bit as accumulation."""

from __future__ import annotations

import copy

import pytest
import torch

from flearning.training import LoraSettings, TrainConfig, train
from flearning.training.dataset import IGNORE_INDEX, build_examples, collate
from flearning.training.fused import accumulate, concat_batches
from flearning.training.loss import answer_loss, answer_losses
from tiny import tiny_llama

PAIRS = [(f"Fact number {i} of the list is", f"answer{i % 5}" + " long" * (i % 3)) for i in range(22)]


def micro_batches(tokenizer, template="alpaca", size=4):
    examples = build_examples(tokenizer, PAIRS[:10], add_eos=True, template=template)
    return [collate(examples[i : i + size], tokenizer.pad_token_id) for i in range(0, len(examples), size)]


def test_concat_batches_pads_every_row_to_the_longest_and_names_its_micro_batch(tokenizer):
    a = collate(build_examples(tokenizer, [("ab", "c")], add_eos=False), tokenizer.pad_token_id)
    b = collate(build_examples(tokenizer, [("abcdef", "gh"), ("x", "y")], add_eos=False), 7)
    fused, groups = concat_batches([a, b], pad_id=99)
    width = b["input_ids"].shape[1]
    assert fused["input_ids"].shape == (3, width) and groups.tolist() == [0, 1, 1]
    n = a["input_ids"].shape[1]
    assert fused["input_ids"][0].tolist() == a["input_ids"][0].tolist() + [99] * (width - n)
    assert fused["attention_mask"][0].tolist() == [1] * n + [0] * (width - n)
    assert (fused["labels"][0, n:] == IGNORE_INDEX).all()
    assert torch.equal(fused["labels"][1:], b["labels"])


def test_answer_losses_are_each_groups_own_mean(tokenizer):
    batches = micro_batches(tokenizer, template="plain")
    fused, groups = concat_batches(batches, tokenizer.pad_token_id)
    model = tiny_llama().eval()
    with torch.no_grad():
        ours = answer_losses(model, fused, groups, len(batches))
        each = torch.stack([answer_loss(model, b) for b in batches])
    assert ours.shape == (3,) and (each > 1.0).all()
    torch.testing.assert_close(ours, each, atol=1e-5, rtol=1e-5)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["full", "lora"])
def test_a_fused_step_has_accumulations_losses_and_gradient(tokenizer, kind):
    batches = micro_batches(tokenizer)  # 4 + 4 + 2 rows, one Alpaca preamble
    model = tiny_llama()
    if kind == "lora":
        from flearning.training import attach_lora

        model = attach_lora(model, LoraSettings(r=4, alpha=8))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    model.train()
    reference = copy.deepcopy(model)
    expected = []
    for b in batches:  # accumulation as accelerate does it: each backward divided by grad_accum
        loss = answer_loss(reference, b)
        (loss / 4).backward()
        expected.append(loss.item())
    checked = []
    losses = accumulate(
        model,
        batches,
        pad_id=tokenizer.pad_token_id,
        backward=lambda loss: (loss / 4).backward(),
        check=lambda loss, m: checked.append(m),
    )
    assert checked == [0, 1, 2]
    assert losses == pytest.approx(expected, rel=1e-5)
    want, got = grads(reference), grads(model)
    assert want.keys() == got.keys() and want
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, atol=1e-6, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def stage(tokenizer, pairs=PAIRS, **kw):
    cfg = TrainConfig(lr=1e-2, epochs=2, batch_size=4, grad_accum=4, **kw)
    return train(tiny_llama(), tokenizer, pairs, cfg, progress=False)


@pytest.mark.parametrize("lora", [False, True])
def test_a_fused_stage_ends_where_accumulation_ends(tokenizer, lora):
    # 22 pairs: 6 micro-batches of 4 (the last short) per epoch, steps of 4 and of 2
    extra = {"lora": LoraSettings(r=4, alpha=8)} if lora else {}
    plain = stage(tokenizer, template="alpaca", **extra)
    fused = stage(tokenizer, template="alpaca", fused_accumulation=True, **extra)
    assert fused.steps == plain.steps == 4 and fused.tokens == plain.tokens
    assert fused.losses == pytest.approx(plain.losses, rel=1e-4)
    assert plain.losses[-1] < plain.losses[0]
    a = dict(plain.model.named_parameters())
    for name, p in fused.model.named_parameters():
        torch.testing.assert_close(p, a[name], atol=2e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def test_without_a_shared_prefix_a_fused_stage_is_accumulation_bit_for_bit(tokenizer):
    pairs = [(f"{i} is the number of fact", f"answer{i % 5}") for i in range(22)]  # nothing shared
    plain = stage(tokenizer, pairs)
    fused = stage(tokenizer, pairs, fused_accumulation=True)
    assert fused.losses == plain.losses
    a = dict(plain.model.named_parameters())
    for name, p in fused.model.named_parameters():
        assert torch.equal(p, a[name]), name


def test_fused_accumulation_stays_out_of_the_keys_when_off():
    assert "fused_accumulation" not in TrainConfig().model_dump()
    assert TrainConfig(fused_accumulation=True).model_dump()["fused_accumulation"] is True
