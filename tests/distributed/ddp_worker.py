"""Worker launched by tests/distributed/test_ddp.py under ``torchrun`` or ``accelerate launch``.

Not a test module (pytest collects ``test_*.py`` only). It runs the project's own training code with no
distributed-specific changes, from a model directory saved by the test, and records per rank what the
test compares:

    <out>/<scenario>/rank<r>.json              on every rank: steps, losses, weight fingerprint, ...
    <out>/<scenario>/model.rank<r>.safetensors  on the main process only (the "outputs written once" check)

Usage: python ddp_worker.py --model DIR --out DIR --scenarios a,b,...
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import torch

# Every scenario's data and stage settings live here and are imported by the test for its
# one-process references, so the two sides cannot drift apart.

# Facts of identical tokenized length (byte tokenizer: one token per byte): every micro-batch has
# the same number of answer tokens, so the mean of per-rank means equals the global token mean.
EQUAL_PAIRS = [(f"Item {i:02d} is", f"v{(7 * i) % 10}{(3 * i) % 10}") for i in range(8)]
# Facts of varied lengths (prompt 10-25 bytes, answer 2-9 bytes): per-rank token counts differ.
VARIED_PAIRS = [("Fact " + "x" * (i % 6) + f" {i} is", "ans" + "w" * (i % 7) + str(i % 3)) for i in range(16)]
COVERAGE_PAIRS = [(f"p{i}", "a" * (i % 5)) for i in range(13)]
NEW_EQUAL_PAIRS = [(p, f"n{(5 * i + 1) % 10}{(9 * i) % 10}") for i, (p, _) in enumerate(EQUAL_PAIRS)]

WORLD = 2  # processes the test launches
PER_RANK_BATCH = 4
LR = 1e-2  # full-FT stages; the test's tolerance is stated relative to it


def scenario_settings() -> dict:
    """{scenario: (kind, kwargs)}, the distributed side's settings; the test derives references."""
    from flearning.training import LoraSettings, TrainConfig

    lora = LoraSettings(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    return {
        # F-Learning FT end to end (forget on a deep copy, θ − λΔ, learn); each step sees all 8 facts.
        "flearning_ft": (
            "method",
            {
                "method": "flearning-ft",
                "old": EQUAL_PAIRS,
                "new": NEW_EQUAL_PAIRS,
                "forget": TrainConfig(lr=LR, max_steps=2, batch_size=PER_RANK_BATCH, seed=3),
                "learn": TrainConfig(lr=LR, max_steps=3, batch_size=PER_RANK_BATCH, seed=3),
                "lam": 0.5,
            },
        ),
        # LoRA forget (adapter read then unloaded under DDP) followed by a full-FT learning stage.
        "flearning_lora_ft": (
            "method",
            {
                "method": "flearning-lora-ft",
                "old": EQUAL_PAIRS,
                "new": NEW_EQUAL_PAIRS,
                "forget": TrainConfig(lr=5e-2, max_steps=2, batch_size=PER_RANK_BATCH, seed=4, lora=lora),
                "learn": TrainConfig(lr=LR, max_steps=2, batch_size=PER_RANK_BATCH, seed=4),
                "lam": 1.0,
            },
        ),
        # Varied lengths: 16 facts → 4 full batches of 4; rank r takes batches r, r+2 (round robin).
        "accum": (
            "train",
            {"pairs": VARIED_PAIRS, "cfg": TrainConfig(lr=LR, max_steps=3, batch_size=4, seed=5)},
        ),
        # 13 facts at 4 per rank: batches of 4, 4, 4 and 1, the short one anywhere in the shuffled order.
        "coverage": (
            "train",
            {"pairs": COVERAGE_PAIRS, "cfg": TrainConfig(lr=LR, epochs=3, batch_size=4, seed=0)},
        ),
        # A linear schedule with warm-up must give step k the same learning rate as on one process.
        "linear": (
            "train",
            {
                "pairs": EQUAL_PAIRS,
                "cfg": TrainConfig(
                    lr=LR,
                    max_steps=4,
                    batch_size=PER_RANK_BATCH,
                    scheduler="linear",
                    warmup_ratio=0.25,
                    seed=7,
                ),
            },
        ),
        # compile: true under DDP (regional compilation inside the DDP wrapper): the stage must hand back
        # the caller's module, with its own parameter names, and train as one compiled process does.
        "compiled": (
            "train",
            {
                "pairs": EQUAL_PAIRS,
                "cfg": TrainConfig(lr=LR, max_steps=3, batch_size=PER_RANK_BATCH, seed=8, compile=True),
            },
        ),
        # One epoch of 8 facts at 4 per rank should be ONE optimizer step of global batch 8.
        "epochs": (
            "train",
            {"pairs": EQUAL_PAIRS, "cfg": TrainConfig(lr=LR, epochs=1, batch_size=4, seed=6)},
        ),
    }


def load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Named parameters (a tied embedding once), detached copies, for safetensors."""
    return {n: p.detach().clone().contiguous() for n, p in model.named_parameters()}


def run_scenario(name: str, model_dir: Path):
    """Returns (final model, info dict)."""
    from flearning.config import StagePlan
    from flearning.methods import get_method
    from flearning.models import model_fingerprint
    from flearning.recipes.algorithm import run_method
    from flearning.training import EpochCheck, train

    kind, s = scenario_settings()[name]
    model, tokenizer = load(model_dir)
    if kind == "method":
        plan = StagePlan(learn=s["learn"], forget=s["forget"], lam=s["lam"])
        outcome = run_method(
            get_method(s["method"]), model, tokenizer, s["old"], s["new"], plan, progress=False
        )
        final = outcome.model
        info = {
            "steps": {k: len(v) for k, v in outcome.losses.items()},
            "losses": outcome.losses,
            "tokens": outcome.tokens,
        }
    else:
        epochs = [[]]  # per completed epoch, the example indices of each micro-batch this rank trained on
        hook = model.register_forward_pre_hook(
            record_examples(tokenizer, s["pairs"], epochs), with_kwargs=True
        )

        def next_epoch(epoch, _model, _log):
            epochs.append([])
            return EpochCheck(stop=False)

        result = train(model, tokenizer, s["pairs"], s["cfg"], progress=False, on_epoch_end=next_epoch)
        hook.remove()
        final = result.model
        info = {"steps": result.steps, "losses": result.losses, "tokens": result.tokens, "epochs": epochs}
    info["model_class"] = type(final).__name__
    info["fingerprint"] = model_fingerprint(final)
    return final, info


def record_examples(tokenizer, pairs, epochs: list[list[list[int]]]):
    """A forward pre-hook noting which training examples each forward pass sees (in train mode)."""
    from flearning.training.dataset import build_examples

    index = {tuple(e.input_ids): i for i, e in enumerate(build_examples(tokenizer, pairs, add_eos=True))}

    def hook(module, args, kwargs):
        if module.training:
            ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
            epochs[-1].append(
                [index[tuple(row[m.bool()].tolist())] for row, m in zip(ids, mask, strict=True)]
            )

    return hook


def sharded_batches(pairs, batch_size: int, seed: int, epochs: int) -> list[list[int]]:
    """The example indices this rank's prepared loader yields, built exactly as the trainer builds it."""
    from accelerate import Accelerator

    from flearning.training.dataset import LengthGroupedBatches

    accelerator = Accelerator()
    lengths = [len(p) + len(a) for p, a in pairs]
    sampler = LengthGroupedBatches(lengths, batch_size, seed)
    loader = torch.utils.data.DataLoader(
        list(range(len(pairs))),
        batch_sampler=sampler,
        collate_fn=partial(torch.tensor),
        generator=torch.Generator().manual_seed(seed),
    )
    loader = accelerator.prepare(loader)
    seen = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        sampler.set_epoch(epoch)
        seen += [batch.tolist() for batch in loader]
    return seen


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--scenarios", required=True)
    args = parser.parse_args()

    from accelerate.state import AcceleratorState, PartialState
    from safetensors.torch import save_file

    torch.set_num_threads(1)  # two processes on two cores
    for name in [s for s in args.scenarios.split(",") if s]:
        out = args.out / name
        if name == "loader":
            # 13 facts at batch 4 → batches of 4,4,4,1 in a shuffled order (the short one anywhere).
            info = {"batches": sharded_batches(COVERAGE_PAIRS, 4, seed=0, epochs=4)}
            model = None
        else:
            model, info = run_scenario(name, args.model)
        state = AcceleratorState()
        info.update(
            rank=state.process_index,
            num_processes=state.num_processes,
            distributed_type=str(state.distributed_type),
        )
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{state.process_index}.json").write_text(json.dumps(info))
        # The one output of the run: only the main process writes it.
        if model is not None and PartialState().is_main_process:
            save_file(weights(model), str(out / f"model.rank{state.process_index}.safetensors"))
        PartialState().wait_for_everyone()


if __name__ == "__main__":
    main()
