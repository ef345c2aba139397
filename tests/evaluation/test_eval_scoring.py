"""Batched scoring and generation give exactly what one unpadded record at a time gives."""

from __future__ import annotations

import pytest
import torch
from eval_helpers import crafted_records, sharp_llama
from transformers import GenerationConfig

from flearning.evaluation.oracle import single_score
from flearning.evaluation.probes import record_probes, unique_probes
from flearning.evaluation.scoring import (
    PackedRow,
    Probe,
    collate_rows,
    greedy_generate,
    length_batches,
    pack_probes,
    score_probes,
    shared_prompt_length,
)

PAD = 256


def test_pack_probes_groups_by_prompt():
    probes = [Probe((1, 2), (3,)), Probe((5,), (6, 7)), Probe((1, 2), (4, 4)), Probe((1, 2), (9,))]
    rows = pack_probes(probes, max_segments=2)
    assert [(r.prompt_ids, [i for i, _ in r.segments]) for r in rows] == [
        ((1, 2), [0, 2]),
        ((1, 2), [3]),
        ((5,), [1]),
    ]
    assert [len(r.segments) for r in pack_probes(probes, pack=False)] == [1, 1, 1, 1]


def test_length_batches_sorted_and_complete():
    batches = length_batches([3, 9, 1, 9, 5], 2)
    assert batches == [[1, 3], [4, 0], [2]]
    with pytest.raises(ValueError):
        length_batches([1], 0)


def test_collate_packed_row_mask_positions_and_predictions():
    # prompt [10, 11], target A [20, 21], target B [30]; second row: prompt [12], target [40], padded.
    rows = [PackedRow((10, 11), [(0, (20, 21)), (1, (30,))]), PackedRow((12,), [(2, (40,))])]
    batch = collate_rows(rows, PAD)
    assert batch.input_ids.tolist() == [[10, 11, 20, 21, 30], [12, 40, PAD, PAD, PAD]]
    # target B restarts right after the prompt
    assert batch.position_ids[0].tolist() == [0, 1, 2, 3, 2]
    allowed = batch.attention_mask[0, 0] == 0
    assert allowed.tolist() == [
        [True, False, False, False, False],
        [True, True, False, False, False],
        [True, True, True, False, False],
        [True, True, True, True, False],
        [True, True, False, False, True],  # B sees the prompt and itself, not A
    ]
    pad_rows = (batch.attention_mask[1, 0] == 0).tolist()
    assert pad_rows[2] == [False, False, True, False, False]  # padding sees only itself
    # kept positions: row 0 -> 1 (last prompt token, predicts 20 and 30), 2 (predicts 21); row 1 -> 0
    assert batch.keep.tolist() == [[False, True, True, False, False], [True, False, False, False, False]]
    assert batch.labels.tolist() == [20, 21, 30, 40]
    assert batch.pred_index.tolist() == [0, 1, 0, 2]
    assert batch.probe_of.tolist() == [0, 0, 1, 2]
    assert batch.probes == [0, 1, 2]


def test_collate_single_segment_rows_use_a_plain_padding_mask():
    batch = collate_rows([PackedRow((1, 2), [(0, (3,))]), PackedRow((1,), [(1, (3,))])], PAD)
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 1, 0]]


def _all_probes(tokenizer):
    probes, _ = unique_probes(record_probes(tokenizer, r).all() for r in crafted_records())
    return probes


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pack", [True, False])
def test_batched_scores_equal_one_at_a_time(tokenizer, attn, pack):
    model = sharp_llama(0, attn=attn)
    probes = _all_probes(tokenizer)
    batched = score_probes(model, probes, pad_id=PAD, batch_size=5, pack=pack)
    single = [single_score(model, p) for p in probes]
    assert max(abs(a.accuracy - b.accuracy) for a, b in zip(batched, single, strict=True)) <= 1e-6
    assert max(abs(a.nll - b.nll) for a, b in zip(batched, single, strict=True)) <= 1e-5
    assert [a.argmax for a in batched] == [b.argmax for b in single]
    # The crafted data is not trivial for this model: accuracies vary.
    assert len({round(b.accuracy, 3) for b in single}) > 2


def test_batch_size_does_not_change_scores(tokenizer):
    model = sharp_llama(1)
    probes = _all_probes(tokenizer)
    reference = score_probes(model, probes, pad_id=PAD, batch_size=1, pack=False)
    for batch_size in (2, 7, 64):
        other = score_probes(model, probes, pad_id=PAD, batch_size=batch_size, pack=True)
        assert [a.argmax for a in other] == [b.argmax for b in reference]
        assert max(abs(a.nll - b.nll) for a, b in zip(other, reference, strict=True)) <= 1e-5


def _prompts(tokenizer):
    return [list(record_probes(tokenizer, r).new.prompt_ids) for r in crafted_records()]


def test_batched_generation_equals_unpadded_generate(tokenizer):
    model = sharp_llama(2)
    prompts = _prompts(tokenizer)
    budgets = [3 + i % 4 for i in range(len(prompts))]
    batched = greedy_generate(model, prompts, budgets, pad_id=PAD, eos_id=PAD, batch_size=4)
    for prompt, budget, got in zip(prompts, budgets, batched, strict=True):
        config = GenerationConfig(
            max_new_tokens=budget, do_sample=False, num_beams=1, pad_token_id=PAD, eos_token_id=PAD
        )
        with torch.inference_mode():
            out = model.generate(input_ids=torch.tensor([prompt]), generation_config=config)
        expected = out[0, len(prompt) :].tolist()
        if PAD in expected:
            expected = expected[: expected.index(PAD)]
        assert got == expected
        assert len(got) <= budget
    assert any(len(g) == b for g, b in zip(batched, budgets, strict=True))


def test_generation_stops_at_eos(tokenizer):
    model = sharp_llama(3)
    prompts = _prompts(tokenizer)[:4]
    free = greedy_generate(model, prompts, [6] * 4, pad_id=PAD, eos_id=PAD, batch_size=4)
    # Pretend the second generated token of the first prompt is EOS: output is cut before it.
    eos = free[0][1]
    cut = greedy_generate(model, prompts[:1], [6], pad_id=PAD, eos_id=eos, batch_size=1)[0]
    assert cut == free[0][: free[0].index(eos)]


def test_generation_input_checks():
    model = sharp_llama(0)
    with pytest.raises(ValueError):
        greedy_generate(model, [[1]], [1, 2], pad_id=PAD, eos_id=PAD)
    with pytest.raises(ValueError):
        greedy_generate(model, [[]], [1], pad_id=PAD, eos_id=PAD)


def _alpaca_probes(tokenizer):
    probes, _ = unique_probes(record_probes(tokenizer, r, template="alpaca").all() for r in crafted_records())
    return probes


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pack", [True, False])
def test_a_shared_preamble_run_once_gives_the_same_scores(tokenizer, attn, pack):
    model = sharp_llama(2, attn=attn)
    probes = _alpaca_probes(tokenizer)
    rows = pack_probes(probes, pack=pack)
    batches = length_batches([r.length for r in rows], 6)
    # the Alpaca preamble (one token per byte of the tiny tokenizer) is shared by every batch
    assert min(shared_prompt_length([rows[i] for i in b]) for b in batches if len(b) > 1) > 100
    whole = score_probes(model, probes, pad_id=PAD, batch_size=6, pack=pack, share_prefix=False)
    shared = score_probes(model, probes, pad_id=PAD, batch_size=6, pack=pack)
    assert [a.argmax for a in shared] == [b.argmax for b in whole]
    assert max(abs(a.nll - b.nll) for a, b in zip(shared, whole, strict=True)) <= 1e-4
    assert max(abs(a.accuracy - b.accuracy) for a, b in zip(shared, whole, strict=True)) <= 1e-6
    assert len({round(b.accuracy, 3) for b in whole}) > 2


def test_the_shared_prompt_stops_before_the_token_that_predicts_a_target():
    a = PackedRow(tuple(range(20)), [(0, (50,))])
    b = PackedRow((*range(12), 99, 98), [(1, (51,))])
    assert shared_prompt_length([a, b]) == 12
    short = PackedRow(tuple(range(10)), [(2, (52,))])
    assert shared_prompt_length([a, short]) == 9  # the last prompt token predicts: never shared
    assert shared_prompt_length([a, PackedRow((7, *range(1, 20)), [(3, (53,))])]) == 0
    assert shared_prompt_length([a]) == 0


def test_a_shared_preamble_run_once_gives_the_same_scores_on_gpt2(tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=257, n_embd=32, n_inner=64, n_layer=2, n_head=4, n_positions=512)
    model = GPT2LMHeadModel(config).eval()
    probes = _alpaca_probes(tokenizer)
    for pack in (True, False):
        whole = score_probes(model, probes, pad_id=PAD, batch_size=6, pack=pack, share_prefix=False)
        shared = score_probes(model, probes, pad_id=PAD, batch_size=6, pack=pack)
        assert [a.argmax for a in shared] == [b.argmax for b in whole]
        assert max(abs(a.nll - b.nll) for a, b in zip(shared, whole, strict=True)) <= 1e-4
        assert len({round(b.nll, 3) for b in whole}) > 10
