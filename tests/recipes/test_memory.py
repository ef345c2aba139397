from __future__ import annotations

import pytest
from transformers import LlamaConfig

from flearning.cli.tables import dry_run_report, plan_table, render
from flearning.config import StagePlan, UpdateConfig
from flearning.errors import FlearnError
from flearning.models import count_parameters
from flearning.recipes.memory import (
    ADAM,
    RUNTIME_OVERHEAD,
    available_memory,
    dry_run_plan,
    fmt_bytes,
    plan_memory,
)
from flearning.recipes.model_shape import FP32, model_shape
from flearning.training import LoraSettings, TrainConfig

GiB = 2**30
BIG = 10**15  # a budget nothing exceeds


@pytest.fixture(scope="module")
def llama7b():
    """Llama-2-7B's shape; built on the meta device only, so no memory and no weights."""
    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    return model_shape(config)


def test_parameter_count_from_the_config_matches_the_real_model(tiny_model, tiny_model_dir):
    for source in (tiny_model.config, tiny_model_dir):
        shape = model_shape(source)
        assert shape.params == count_parameters(tiny_model)  # the tied embedding counted once
        assert shape.embedding_params == tiny_model.get_input_embeddings().weight.numel()
        assert (shape.layers, shape.hidden, shape.vocab) == (2, 32, 257)
        assert shape.kv_hidden == 2 * (32 // 4)  # GQA: 2 key/value heads of width 8


def test_llama_7b_has_its_6_7_billion_parameters(llama7b):
    assert llama7b.params == 6_738_415_616
    assert llama7b.embedding_params == 2 * 32000 * 4096  # untied: embedding and lm_head


def test_full_fine_tuning_costs_16_bytes_per_parameter_plus_activations(llama7b):
    plan = plan_memory(llama7b, "ft", batch_size=1, seq_len=32, available=BIG)
    (learn,) = plan.stages
    assert (learn.weights, learn.gradients, learn.optimizer) == (
        4 * llama7b.params,
        4 * llama7b.params,
        8 * llama7b.params,
    )
    states = learn.weights + learn.gradients + learn.optimizer
    assert states == 16 * llama7b.params == pytest.approx(107.8e9, rel=1e-3)  # ≈ 108 GB
    # batch 1 × 32 tokens: activations are a small addition (~0.4 GB) to the 108 GB
    assert 0 < learn.activations < 0.01 * states
    assert learn.total == states + learn.activations + RUNTIME_OVERHEAD
    assert plan.fits


def test_activations_grow_linearly_with_the_batch(llama7b):
    one = plan_memory(llama7b, "ft", batch_size=1, available=BIG).stages[0].activations
    eight = plan_memory(llama7b, "ft", batch_size=8, available=BIG).stages[0].activations
    assert eight == pytest.approx(8 * one, rel=1e-6)


def test_lora_pays_16_bytes_only_per_adapter_parameter(llama7b):
    lora = LoraSettings(r=8, target_modules=["q_proj", "v_proj"])
    (learn,) = plan_memory(llama7b, "lora", batch_size=1, lora=lora, available=BIG).stages
    adapter = 32 * 2 * 8 * (4096 + 4096)  # 32 layers × (q, v) × r·(in + out)
    assert learn.trainable == adapter
    assert learn.weights == (llama7b.params + adapter) * FP32
    assert learn.gradients + learn.optimizer == adapter * (FP32 + ADAM)
    full = plan_memory(llama7b, "ft", batch_size=1, available=BIG).stages[0]
    assert learn.total < 0.3 * full.total


def test_forget_stage_holds_theta_twice_and_delta_lives_through_learning(llama7b):
    plan = plan_memory(llama7b, "flearning-ft", batch_size=1, available=BIG)
    forget, learn = plan.stages
    assert dict(forget.other) == {"θ (kept)": 4 * llama7b.params}
    assert dict(learn.other) == {"Δ_old": 4 * llama7b.params}
    assert forget.total == pytest.approx(20 * llama7b.params, rel=0.01)
    lora_forget = plan_memory(llama7b, "flearning-lora-ft", batch_size=1, available=BIG)
    assert lora_forget.stages[0].total < 0.3 * forget.total
    # the LoRA vector is dense over the adapted matrices only
    q_v = plan_memory(
        llama7b,
        "flearning-lora",
        batch_size=1,
        lora=LoraSettings(target_modules=["q_proj", "v_proj"]),
        available=BIG,
    )
    assert dict(q_v.stages[1].other) == {"Δ_old (LoRA)": 32 * 2 * 4096 * 4096 * FP32}


def test_ft_c_keeps_its_anchor_and_an_output_keeps_theta(llama7b):
    (learn,) = plan_memory(llama7b, "ft-c", batch_size=1, available=BIG, keep_theta=True).stages
    assert dict(learn.other) == {
        "ft-c anchor": 4 * llama7b.params,
        "θ snapshot": 4 * llama7b.params,
    }


def test_frozen_embeddings_are_not_trained(llama7b):
    stages = StagePlan(learn=TrainConfig(batch_size=1, freeze_embeddings=True))
    (learn,) = plan_memory(llama7b, "ft", stages, available=BIG).stages
    assert learn.trainable == llama7b.params - llama7b.embedding_params
    assert learn.weights == 4 * llama7b.params


def test_stage_settings_are_taken_from_a_stage_plan(llama7b):
    plan = StagePlan(learn=TrainConfig(batch_size=3), forget=TrainConfig(batch_size=5))
    forget, learn = plan_memory(llama7b, "flearning-ft", plan, available=BIG).stages
    assert (forget.batch_size, learn.batch_size) == (5, 3)


def test_a_fused_step_holds_the_activations_of_all_its_micro_batches(llama7b):
    def activations(**kw):
        plan = StagePlan(learn=TrainConfig(batch_size=4, grad_accum=4, **kw))
        return plan_memory(llama7b, "ft", plan, available=BIG).stages[0].activations

    assert activations(fused_accumulation=True) == pytest.approx(4 * activations(), rel=1e-6)


def test_processes_on_one_machine_multiply_the_peak(llama7b):
    one = plan_memory(llama7b, "lora", batch_size=1, available=BIG)
    two = plan_memory(llama7b, "lora", batch_size=1, available=BIG, processes=2)
    assert two.peak == 2 * one.peak


def test_no_suggestions_when_it_fits(llama7b):
    plan = plan_memory(llama7b, "ft", batch_size=1, available=BIG)
    assert plan.fits and plan.suggestions == ()
    assert "fits" in render(plan_table(plan))


def test_a_small_budget_gets_lora_accumulation_and_sharding_suggestions(llama7b):
    q_v = LoraSettings(target_modules=["q_proj", "v_proj"])
    plan = plan_memory(llama7b, "flearning-ft", batch_size=64, available=80 * GiB, lora=q_v)
    assert plan.fits is False
    text = "\n".join(plan.suggestions)
    assert "flearning-lora-ft" in text  # LoRA forgetting: no copy of θ, a small dense Δ_old
    assert "method flearning-lora" in text
    assert "grad_accum=4" in text and "batch_size=16" in text
    # the fewest FSDP2 GPUs whose per-process plan fits 80 GiB, with that plan's number
    gpus = next(n for n in (2, 4, 8) if f"over {n} GPUs" in text)
    sharded = plan_memory(
        llama7b, "flearning-ft", batch_size=64, lora=q_v, processes=gpus, sharding="fsdp2", available=0
    )
    assert max(s.total for s in sharded.stages) <= 80 * GiB
    assert f"configs/accelerate/fsdp2.yaml` (num_processes: {gpus})" in text
    assert f"≈ {fmt_bytes(max(s.total for s in sharded.stages))} per GPU" in text
    report = render(plan_table(plan))
    assert "does NOT fit" in report and "forget (full)" in report and "learn (full)" in report
    for line in plan.suggestions:
        assert line.split()[0] in report


def test_an_alternative_that_does_not_lower_the_peak_is_not_suggested(llama7b):
    # LoRA on all linear layers: Δ_old is dense over almost every weight and lives through the full-FT
    # learning stage, so flearning-lora-ft peaks where flearning-ft does
    plan = plan_memory(llama7b, "flearning-ft", batch_size=8, available=24 * GiB)
    alt = plan_memory(llama7b, "flearning-lora-ft", batch_size=8, available=24 * GiB)
    assert alt.peak > 0.9 * plan.peak
    assert not any("flearning-lora-ft" in s for s in plan.suggestions)


def test_suggested_alternatives_really_need_less(llama7b):
    plan = plan_memory(llama7b, "flearning-ft", batch_size=8, available=24 * GiB)
    lora = plan_memory(llama7b, "flearning-lora", batch_size=8, available=24 * GiB)
    assert lora.peak < plan.peak
    assert any(f"needs {lora.peak / GiB:.1f} GiB" in s for s in plan.suggestions)


def test_tight_plans_are_flagged(tiny_model):
    plan = plan_memory(tiny_model.config, "ft", batch_size=8, available=BIG)
    tight = plan_memory(tiny_model.config, "ft", batch_size=8, available=int(plan.peak / 0.95))
    assert tight.fits and tight.suggestions
    assert "little headroom" in render(plan_table(tight))


def test_unknown_lora_targets_are_an_error(tiny_model):
    with pytest.raises(FlearnError, match="match no linear layer"):
        plan_memory(tiny_model.config, "lora", lora=LoraSettings(target_modules=["c_attn"]), available=BIG)


def test_available_memory_reads_the_machine():
    available, source = available_memory()
    assert available is None or available > 0
    assert source


def test_dry_run_report_from_an_update_config(tiny_model_dir, tmp_path):
    cfg = UpdateConfig(model=str(tiny_model_dir), method="flearning-lora-ft", out=tmp_path / "out")
    plan = dry_run_plan(cfg, available=BIG)
    assert [s.name for s in plan.stages] == ["forget", "learn"]
    assert [s.kind for s in plan.stages] == ["lora", "full"]
    assert "θ snapshot" in dict(plan.stages[1].other)
    report = dry_run_report(cfg, available=BIG)
    assert "flearning-lora-ft" in report and "forget (lora)" in report and "fits" in report
    small = dry_run_report(cfg.model_copy(update={"learn": cfg.learn.model_copy(update={"batch_size": 64})}),
                           available=10 * 2**20)  # fmt: skip
    assert "does NOT fit" in small


def test_update_dry_run_prints_the_plan_and_writes_nothing(tiny_model_dir, tmp_path, capsys):
    from flearning.cli import main

    facts = tmp_path / "facts.jsonl"
    facts.write_text('{"prompt": "a is", "target_old": "b", "target_new": "c"}\n')
    out = tmp_path / "never"
    code = main(
        [
            "update",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(facts),
            "--method",
            "flearning-ft",
            "--out",
            str(out),
            "--dry-run",
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "forget" in text and "learn" in text
    assert not out.exists()


def test_an_fsdp2_plan_splits_weights_gradients_adam_and_the_forget_tensors_over_the_processes(llama7b):
    one = plan_memory(llama7b, "flearning-ft", seq_len=64, keep_theta=True, available=0)
    for n in (4, 8):
        plan = plan_memory(
            llama7b, "flearning-ft", seq_len=64, keep_theta=True, processes=n, sharding="fsdp2", available=0
        )
        for whole, part in zip(one.stages, plan.stages, strict=True):
            assert part.weights == -(-whole.weights // n)
            assert part.gradients == -(-whole.gradients // n) and part.optimizer == -(-whole.optimizer // n)
            assert part.activations == whole.activations  # each process runs its own micro-batch
            other = dict(part.other)
            assert "θ snapshot" not in other  # kept by the main process only, counted in main_save
            block = (llama7b.params - llama7b.embedding_params) // llama7b.layers
            assert other["FSDP2 gathered blocks"] == 2 * block * 4
        forget = dict(plan.stages[0].other)
        assert forget["θ (kept) (shards)"] == -(-4 * llama7b.params // n)
        # θ*, Δ_old, θ and θ* − θ, whole, while writing
        assert plan.main_save == 4 * 4 * llama7b.params


def test_sharded_vector_files_keep_a_group_not_the_whole_vectors_on_the_main_process(llama7b):
    def main_save(vector_files: str, keep_theta: bool) -> int:
        return plan_memory(
            llama7b, "flearning-ft", seq_len=64, keep_theta=keep_theta, processes=4, sharding="fsdp2",
            available=0, vector_files=vector_files,
        ).main_save  # fmt: skip

    params = llama7b.params
    block = (params - llama7b.embedding_params) // llama7b.layers
    rest = params - 32 * block  # the untied embedding and head (the plan's blocks take the final norm)
    assert rest == 2 * 32000 * 4096 > block
    # θ* and θ whole; one group of Δ_old or θ* − θ at a time, and the buffer it is gathered through
    assert main_save("sharded", True) == (2 * params + 2 * rest) * 4
    assert main_save("sharded", False) == (params + 2 * rest) * 4
    assert main_save("consolidated", False) == 2 * params * 4  # θ* and Δ_old
    assert main_save("sharded", True) < 0.55 * main_save("consolidated", True)
    with pytest.raises(FlearnError, match="vector_files"):
        main_save("split", True)


def test_a_lora_stage_under_fsdp2_keeps_its_adapter_whole_on_every_process(llama7b):
    one = plan_memory(llama7b, "lora", seq_len=64, available=0)
    plan = plan_memory(llama7b, "lora", seq_len=64, processes=4, sharding="fsdp2", available=0)
    whole, part = one.stages[0], plan.stages[0]
    adapter = whole.trainable * 4
    assert part.weights == -(-(whole.weights - adapter) // 4) + adapter
    assert part.optimizer == whole.optimizer and part.gradients == whole.gradients
    with pytest.raises(FlearnError, match="sharding"):
        plan_memory(llama7b, "lora", sharding="zero3", available=0)
