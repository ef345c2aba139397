"""The training loss computes logits at answer-predicting positions only; its value and gradients must be
those of the model's own loss over full logits (``model(**batch).loss``)."""

from __future__ import annotations

import copy

import pytest
import torch

from flearning.logits import logits_at
from flearning.training import attach_lora
from flearning.training.dataset import build_examples, collate
from flearning.training.loss import answer_loss

# prompts and answers of different lengths: right padding of several widths in one batch
PAIRS = [
    ("The capital of France is", "Paris"),
    ("Q", "a much longer answer with many tokens"),
    ("Fact number seven of the list says that the sky is", "blue"),
    ("x", "y"),
]


def batch(tokenizer):
    return collate(build_examples(tokenizer, PAIRS, add_eos=True), tokenizer.pad_token_id)


def loss_and_grads(model, b, fn):
    model.zero_grad(set_to_none=True)
    loss = fn(model, b)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def full_logits_loss(model, b):
    return model(**b).loss


class NoLogitsToKeep(torch.nn.Module):
    """A causal LM whose forward does not know ``logits_to_keep`` (older or custom models)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, input_ids, attention_mask=None, labels=None, use_cache=None):
        return self.inner(
            input_ids=input_ids, attention_mask=attention_mask, labels=labels, use_cache=use_cache
        )


@pytest.mark.parametrize("kind", ["plain", "lora", "no_logits_to_keep"])
def test_answer_loss_equals_the_full_logits_loss_with_the_same_gradients(tiny_model, tokenizer, kind):
    b = batch(tokenizer)
    assert len({int(m.sum()) for m in b["attention_mask"]}) == len(PAIRS)  # padding of several widths
    if kind == "lora":
        from flearning.training import LoraSettings

        model = attach_lora(tiny_model, LoraSettings(r=4, alpha=8))
        with torch.no_grad():  # B = 0 at init would give A zero gradients: make both sides non-trivial
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.02)
    elif kind == "no_logits_to_keep":
        model = NoLogitsToKeep(tiny_model)
    else:
        model = tiny_model
    model.train()
    ours, our_grads = loss_and_grads(model, b, answer_loss)
    ref_model = model if kind != "no_logits_to_keep" else model.inner
    want, want_grads = loss_and_grads(copy.deepcopy(ref_model), b, full_logits_loss)
    assert ours.item() > 1.0  # a random model: a real cross-entropy, not a degenerate zero
    torch.testing.assert_close(ours, want, atol=1e-6, rtol=1e-6)
    assert len(our_grads) == len(want_grads) > 0
    for name, g in want_grads.items():
        ours_g = our_grads[name if kind != "no_logits_to_keep" else f"inner.{name}"]
        torch.testing.assert_close(ours_g, g, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_logits_at_returns_the_kept_rows_of_the_full_logits_in_row_major_order(tiny_model, tokenizer):
    b = batch(tokenizer)
    keep = torch.zeros_like(b["input_ids"], dtype=torch.bool)
    keep[0, [0, 2]] = True
    keep[2, 5] = True
    keep[3, 1] = True
    tiny_model.eval()
    with torch.no_grad():
        full = tiny_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        got = logits_at(tiny_model, keep, input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    assert got.shape == (4, full.shape[-1])
    torch.testing.assert_close(got, torch.stack([full[0, 0], full[0, 2], full[2, 5], full[3, 1]]))


def test_logits_at_refuses_a_mask_that_is_not_boolean(tiny_model, tokenizer):
    b = batch(tokenizer)
    with pytest.raises(ValueError, match="keep must be a 2D boolean mask"):
        logits_at(tiny_model, b["attention_mask"], input_ids=b["input_ids"])
