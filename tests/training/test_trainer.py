from __future__ import annotations

import math

import pytest
import torch

from flearning.data.encoding import encode_pair
from flearning.training import EpochCheck, LoraSettings, TrainConfig, TrainingDivergedError, train
from flearning.training.dataset import IGNORE_INDEX, LengthGroupedBatches, build_examples, collate

PAIRS = [(f"Fact number {i} is", f"answer{i % 5}") for i in range(24)]


def test_labels_mask_prompt_and_keep_answer_and_eos(tokenizer):
    (example,) = build_examples(tokenizer, [("The capital is", "Paris")], add_eos=True)
    enc = encode_pair(tokenizer, "The capital is", "Paris")
    assert example.input_ids[: enc.prompt_len] == enc.input_ids[: enc.prompt_len]
    assert example.labels[: enc.prompt_len] == [IGNORE_INDEX] * enc.prompt_len
    assert example.labels[enc.prompt_len :] == [*tokenizer(" Paris")["input_ids"], tokenizer.eos_token_id]


def test_collate_pads_right_to_the_batch_maximum(tokenizer):
    examples = build_examples(tokenizer, [("ab", "c"), ("abcdef", "gh")], add_eos=False)
    batch = collate(examples, pad_id=tokenizer.pad_token_id)
    assert batch["input_ids"].shape == (2, len(examples[1]))
    assert batch["attention_mask"][0].tolist() == [1] * len(examples[0]) + [0] * (
        len(examples[1]) - len(examples[0])
    )
    assert (batch["labels"][0, len(examples[0]) :] == IGNORE_INDEX).all()


def test_length_grouped_batches_cover_everything_once_and_depend_only_on_seed_and_epoch():
    lengths = [5, 30, 7, 22, 9, 31, 6, 8, 25, 10, 11]
    sampler = LengthGroupedBatches(lengths, batch_size=3, seed=1, mega=2)
    first = sampler.batches()
    assert sorted(i for b in first for i in b) == list(range(len(lengths)))
    assert LengthGroupedBatches(lengths, 3, seed=1, mega=2).batches() == first
    sampler.set_epoch(1)
    assert sampler.batches() != first
    # within a mega-batch, batches are length-sorted: a batch's spread is small
    assert len(sampler) == math.ceil(len(lengths) / 3)


def test_grouped_by_step_a_steps_micro_batches_are_consecutive_and_of_similar_length():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(8, 40) for _ in range(70)]
    sampler = LengthGroupedBatches(lengths, batch_size=4, seed=3, step=4)
    batches = sampler.batches()
    assert sorted(i for b in batches for i in b) == list(range(70))
    assert len(batches) == len(sampler) == 18
    # 70 rows = 4 whole steps of 16 rows, then the short step (4 + 2 rows) last
    assert [len(b) for b in batches] == [4] * 17 + [2]
    ordered = sorted(lengths)
    slices = [ordered[k : k + 16] for k in range(0, 64, 16)]
    for s in range(4):  # one mega-batch: a step's 16 rows are 16 neighbours in length order
        assert sorted(lengths[i] for b in batches[4 * s : 4 * s + 4] for i in b) in slices

    # steps of random micro-batches pad much more: the same sampler without step grouping
    def padding(bs):
        steps = [sum(bs[k : k + 4], []) for k in range(0, len(bs), 4)]
        return sum(len(st) * max(lengths[i] for i in st) - sum(lengths[i] for i in st) for st in steps)

    assert padding(batches) < 0.5 * padding(LengthGroupedBatches(lengths, 4, seed=3).batches())
    assert LengthGroupedBatches(lengths, 4, seed=3, step=4).batches() == batches


def test_full_training_lowers_the_loss_and_is_deterministic(tiny_model, tokenizer):
    from tiny import tiny_llama

    cfg = TrainConfig(lr=1e-2, epochs=4, batch_size=8)
    result = train(tiny_model, tokenizer, PAIRS, cfg, progress=False)
    assert result.steps == 4 * 3
    assert result.losses[-1] < 0.6 * result.losses[0]
    assert result.tokens > 0 and result.tokens_per_second > 0
    again = train(tiny_llama(), tokenizer, PAIRS, cfg, progress=False)
    assert again.losses == result.losses
    for a, b in zip(result.model.parameters(), again.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_max_steps_wins_over_epochs(tiny_model, tokenizer):
    result = train(tiny_model, tokenizer, PAIRS, TrainConfig(lr=1e-3, epochs=10, max_steps=2), progress=False)
    assert result.steps == 2 and len(result.losses) == 2


def test_grad_accumulation_counts_optimizer_steps(tiny_model, tokenizer):
    result = train(
        tiny_model,
        tokenizer,
        PAIRS,
        TrainConfig(lr=1e-3, epochs=1, batch_size=4, grad_accum=2),
        progress=False,
    )
    assert result.steps == 3  # 6 micro-batches / 2


def test_ft_c_never_moves_a_weight_more_than_epsilon(tiny_model, tokenizer):
    before = {k: v.clone() for k, v in tiny_model.named_parameters()}
    eps = 1e-3
    result = train(
        tiny_model, tokenizer, PAIRS, TrainConfig(lr=5e-2, epochs=3, linf_bound=eps), progress=False
    )
    worst = max((p - before[k]).abs().max().item() for k, p in result.model.named_parameters())
    # fp32 cannot hold θ₀ ± ε exactly: allow one rounding step of the largest weight
    assert eps * 0.99 < worst <= eps + 1e-6


def test_lora_stage_returns_adapter_and_leaves_base_weights(tiny_model, tokenizer):
    before = {k: v.clone() for k, v in tiny_model.named_parameters()}
    cfg = TrainConfig(lr=1e-2, epochs=2, lora=LoraSettings(r=4, target_modules=["q_proj", "v_proj"]))
    result = train(tiny_model, tokenizer, PAIRS, cfg, progress=False)
    assert type(result.model).__name__ == "PeftModelForCausalLM"
    assert result.losses[-1] < result.losses[0]
    base = result.model.get_base_model()
    for name, p in base.named_parameters():
        if "lora_" not in name:
            key = name.replace(".base_layer", "")
            assert torch.equal(p, before[key]), name


def test_freeze_embeddings_keeps_the_tied_embedding(tiny_model, tokenizer):
    emb = tiny_model.get_input_embeddings().weight.clone()
    train(
        tiny_model, tokenizer, PAIRS, TrainConfig(lr=1e-2, epochs=1, freeze_embeddings=True), progress=False
    )
    assert torch.equal(tiny_model.get_input_embeddings().weight, emb)
    assert tiny_model.lm_head.weight is tiny_model.get_input_embeddings().weight


def test_nan_loss_stops_with_step_and_batch_named(tiny_model, tokenizer):
    with torch.no_grad():
        tiny_model.model.norm.weight.fill_(float("nan"))
    with pytest.raises(
        TrainingDivergedError, match=r"loss became nan at optimizer step 1 \(epoch 1, batch 1\)"
    ):
        train(tiny_model, tokenizer, PAIRS, TrainConfig(), progress=False)


def test_on_epoch_end_can_stop_early(tiny_model, tokenizer):
    seen = []

    def stop_after_two(epoch, model, log):
        seen.append((epoch, len(log)))
        return EpochCheck(stop=epoch == 2, record={"epoch": epoch})

    result = train(
        tiny_model,
        tokenizer,
        PAIRS,
        TrainConfig(lr=1e-3, epochs=10),
        progress=False,
        on_epoch_end=stop_after_two,
    )
    assert seen == [(1, 0), (2, 1)] and result.steps == 6
    assert result.epoch_log == [{"epoch": 1}, {"epoch": 2}]


def test_on_epoch_end_runs_after_the_last_epoch_and_not_inside_one(tiny_model, tokenizer):
    seen = []

    def never(epoch, model, log):
        seen.append(epoch)
        return EpochCheck(stop=False, record={"epoch": epoch})

    # 24 pairs, batch 8: 3 steps an epoch; 2 epochs end with a check each, max_steps=4 stops inside epoch 2
    full = train(tiny_model, tokenizer, PAIRS, TrainConfig(epochs=2), progress=False, on_epoch_end=never)
    assert seen == [1, 2] and full.steps == 6 and [r["epoch"] for r in full.epoch_log] == [1, 2]
    seen.clear()
    part = train(tiny_model, tokenizer, PAIRS, TrainConfig(max_steps=4), progress=False, on_epoch_end=never)
    assert seen == [1] and part.steps == 4


def test_config_rejects_lora_with_linf_bound():
    with pytest.raises(ValueError, match="linf_bound"):
        TrainConfig(lora=LoraSettings(), linf_bound=1e-3)
