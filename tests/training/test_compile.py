"""``compile: true``: the regional torch.compile of a stage trains the same model as eager execution
(to float rounding), hands back the caller's module, and compiles the decoder block once per process."""

from __future__ import annotations

import torch

from flearning.training import LoraSettings, TrainConfig, train

PAIRS = [(f"The code of item {i} is", f"c{i % 5}") for i in range(24)]


def _unique_graphs() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def test_compiled_full_stage_matches_eager_and_returns_the_original_module(tokenizer):
    from tiny import tiny_llama

    cfg = TrainConfig(lr=1e-2, epochs=2, batch_size=8)
    eager = train(tiny_llama(), tokenizer, PAIRS, cfg, progress=False)
    model = tiny_llama()
    compiled = train(model, tokenizer, PAIRS, cfg.model_copy(update={"compile": True}), progress=False)

    assert compiled.model is model  # not a compiled wrapper: saving and arithmetic see plain modules
    assert [n for n, _ in compiled.model.named_parameters()] == [n for n, _ in eager.model.named_parameters()]
    assert compiled.steps == eager.steps == 6
    # fused kernels round differently: the same training to float precision, not bit for bit
    for a, b in zip(compiled.losses, eager.losses, strict=True):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b))
    # Adam turns a rounding-size gradient difference into up to a step's size (lr) for a weight whose
    # gradient is near zero: measured worst 2.5e-3·lr, mean 3e-8 after 6 steps at lr 1e-2
    for (name, a), b in zip(compiled.model.named_parameters(), eager.model.parameters(), strict=True):
        assert (a - b).abs().max().item() <= 1e-2 * cfg.lr, name
        assert (a - b).abs().mean().item() <= 1e-6, name
    assert compiled.losses[-1] < 0.8 * compiled.losses[0]


def test_compiled_stages_are_deterministic_and_compile_the_block_once_per_process(tokenizer):
    from tiny import tiny_llama

    cfg = TrainConfig(lr=1e-2, epochs=1, batch_size=8, compile=True)
    first = train(tiny_llama(), tokenizer, PAIRS, cfg, progress=False)
    graphs = _unique_graphs()
    second = train(tiny_llama(), tokenizer, PAIRS, cfg, progress=False)
    assert _unique_graphs() == graphs  # a new model of the same code: nothing recompiled
    assert not torch.are_deterministic_algorithms_enabled()  # the stage's setting is not left behind
    assert second.losses == first.losses
    for a, b in zip(first.model.parameters(), second.model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_compiled_lora_stage_matches_eager(tokenizer):
    from tiny import tiny_llama

    cfg = TrainConfig(lr=1e-2, epochs=2, lora=LoraSettings(r=4, target_modules=["q_proj", "v_proj"]))
    eager = train(tiny_llama(), tokenizer, PAIRS, cfg, progress=False)
    compiled = train(tiny_llama(), tokenizer, PAIRS, cfg.model_copy(update={"compile": True}), progress=False)
    assert type(compiled.model).__name__ == "PeftModelForCausalLM"
    assert "_orig_mod" not in "".join(n for n, _ in compiled.model.named_parameters())
    for a, b in zip(compiled.losses, eager.losses, strict=True):
        assert abs(a - b) <= 1e-4 * max(1.0, abs(b))
    eager_lora = {n: p for n, p in eager.model.named_parameters() if "lora_" in n}
    for name, p in compiled.model.named_parameters():
        if "lora_" in name:
            assert (p - eager_lora[name]).abs().max().item() <= 1e-2 * cfg.lr, name


def test_update_stages_take_compile_from_their_own_settings():
    from flearning.config import UpdateConfig, load_config, stage_plan

    cfg = load_config(UpdateConfig, None, ["method=flearning-lora-ft", "learn.compile=true"])
    plan = stage_plan(cfg)
    assert plan.learn.compile is True and plan.forget.compile is False
    assert stage_plan(load_config(UpdateConfig, None, [])).learn.compile is False  # off by default


def test_compile_off_leaves_the_stage_keys_of_earlier_versions_unchanged():
    # checkpoints, work directories and bench caches are keyed on this dump: an eager stage must hash
    # as it did before the setting existed, and a compiled one differently
    assert "compile" not in TrainConfig().model_dump(mode="json")
    assert TrainConfig(compile=True).model_dump(mode="json")["compile"] is True
    assert TrainConfig(**TrainConfig(compile=True).model_dump()).compile is True
