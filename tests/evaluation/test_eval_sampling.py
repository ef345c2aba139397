"""The sampled Fluency (ROME/EasyEdit): top-5 sampling to 100 tokens, seeded per prompt, batched equal
to one prompt at a time and to a plain ROME-style loop (full forward per step, softmax, top-k,
renormalise, draw)."""

from __future__ import annotations

import torch
from eval_helpers import assert_same_records, crafted_records, sharp_llama

from flearning.evaluation import evaluate_oracle
from flearning.evaluation.definitions import FLUENCY_SAMPLED_LENGTH, METRIC_LABELS
from flearning.evaluation.evaluate import evaluate
from flearning.evaluation.probes import record_probes
from flearning.evaluation.sampling import prompt_seed, rome_text, sample_generate, sample_top_k
from flearning.evaluation.text import compute_n_gram_entropy
from tiny import tiny_llama

PAD = 256


def test_labels_say_which_fluency_is_which():
    assert METRIC_LABELS["fluency"] == "Fluency (greedy)"
    assert METRIC_LABELS["fluency_sampled"] == "Fluency (top-5 sampled, ROME/EasyEdit)"


def test_sample_top_k_inverse_transform():
    # candidates by probability: token 3 (0.4), 0 (0.3), 4 (0.2), 1 (0.1); token 2 is outside the top 4
    logits = torch.log(torch.tensor([[0.3, 0.1, 0.0001, 0.4, 0.2]])).repeat(6, 1)
    renorm = torch.tensor([0.4, 0.3, 0.2, 0.1]) / (1.0001 - 0.0001)
    edges = renorm.cumsum(0)
    draws = torch.tensor(
        [0.0, float(edges[0]) - 1e-6, float(edges[0]) + 1e-6, float(edges[1]) + 1e-6, 0.95, 0.999999]
    )
    assert sample_top_k(logits, 4, draws).tolist() == [3, 3, 0, 4, 1, 1]


def test_sample_top_k_frequencies_follow_the_renormalised_top_k():
    probs = torch.tensor([0.05, 0.25, 0.02, 0.30, 0.10, 0.08, 0.20])
    logits = torch.log(probs).repeat(40_000, 1)
    draws = torch.rand(40_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    counts = torch.bincount(sample_top_k(logits, 5, draws), minlength=7).double() / 40_000
    top5 = torch.tensor([0, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
    expected = torch.where(top5, probs / probs[top5].sum(), torch.zeros(7))
    assert torch.allclose(counts, expected.double(), atol=0.01)
    assert counts[0] == 0 and counts[2] == 0  # outside the top 5: never drawn


def rome_loop(model, prompt, new_tokens, seed, top_k=5):
    """ROME's generate_fast for one prompt, written plainly: a full forward of the whole text at every
    step, softmax over the vocabulary, top-k, renormalise, one draw (the prompt's own generator)."""
    generator = torch.Generator().manual_seed(prompt_seed(seed, prompt))
    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(new_tokens):
            probs = torch.softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), dim=-1)
            top = torch.topk(probs, top_k)
            cumulative = (top.values / top.values.sum()).cumsum(0)
            u = torch.rand((), generator=generator, dtype=torch.float64)
            ids.append(int(top.indices[min(int((cumulative < u).sum()), top_k - 1)]))
    return ids[len(prompt) :]


def test_batched_sampling_equals_a_plain_rome_loop_per_prompt(tokenizer):
    model = sharp_llama(0)
    prompts = [
        tokenizer(t)["input_ids"] for t in ["The capital of", "A", "Berlin is the capital of Germany", "x y"]
    ]
    budgets = [12, 20, 5, 0]
    batched = sample_generate(model, prompts, budgets, pad_id=PAD, seed=7, batch_size=4)
    assert [len(t) for t in batched] == budgets
    for prompt, budget, got in zip(prompts, budgets, batched, strict=True):
        assert got == rome_loop(model, prompt, budget, seed=7)
    # a prompt's continuation does not depend on the others, the batch size or the order
    alone = sample_generate(model, prompts[2:3], budgets[2:3], pad_id=PAD, seed=7, batch_size=1)
    assert alone[0] == batched[2]
    reordered = sample_generate(model, prompts[::-1], budgets[::-1], pad_id=PAD, seed=7, batch_size=2)
    assert reordered[::-1] == batched
    # another seed gives another text; the same seed the same
    other = sample_generate(model, prompts, budgets, pad_id=PAD, seed=8, batch_size=4)
    assert other[1] != batched[1]
    assert sample_generate(model, prompts, budgets, pad_id=PAD, seed=7, batch_size=3) == batched


def test_sampling_does_not_stop_at_eos(tokenizer):
    """ROME's generate_fast runs to its length whatever it samples: a model that mostly says EOS still
    gets its full budget (EOS tokens included; decoding drops them)."""
    model = tiny_llama(0, tie=False)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.weight[PAD] = 50.0  # EOS (the pad token here) is by far the most likely next token
    prompt = tokenizer("Hello there")["input_ids"]
    tokens = sample_generate(model, [prompt], [15], pad_id=PAD, seed=0)[0]
    assert len(tokens) == 15 and tokens.count(PAD) >= 10
    assert tokenizer.decode([*prompt, *tokens], skip_special_tokens=True).startswith("Hello there")


def test_evaluate_sampled_fluency_batched_equals_one_at_a_time(tokenizer):
    model = sharp_llama(2)
    records = crafted_records(6)
    batched = evaluate(
        model,
        tokenizer,
        records,
        generation=False,
        fluency_sampled=True,
        fluency_seed=3,
        batch_size=4,
        progress=False,
    )
    single = evaluate_oracle(
        model, tokenizer, records, generation=False, fluency_sampled=True, fluency_seed=3
    )
    assert_same_records(batched.records, single.records, tol=1e-12)
    assert batched.meta["fluency_sampled"] is True and batched.meta["fluency_seed"] == 3
    for record, row in zip(records, batched.records, strict=True):
        prompt = list(record_probes(tokenizer, record).new.prompt_ids)
        new = rome_loop(model, prompt, FLUENCY_SAMPLED_LENGTH - len(prompt), seed=3)
        assert len(prompt) + len(new) == FLUENCY_SAMPLED_LENGTH  # 100 tokens, prompt included
        text = rome_text(tokenizer.decode([*prompt, *new], skip_special_tokens=True))
        assert row["fluency_sampled_text"] == text
        assert row["fluency_sampled"] == compute_n_gram_entropy(text)
        assert row["fluency"] is None  # the greedy variant was not asked for
    assert batched.summary()["fluency_sampled"]["n"] == len(records)


def test_rome_text_normalisation():
    assert rome_text("Cafe\u0301 one\n\ntwo\nthree") == "Cafe\u0301 one two\nthree"
    assert rome_text("café") == "cafe\u0301"  # NFKD splits the accent, as ROME's output has it
