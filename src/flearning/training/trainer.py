"""One supervised fine-tuning stage on prompt→answer pairs, full or LoRA, on accelerate.

A plain loop on ``accelerate`` rather than ``transformers.Trainer``: the same code runs on one CPU or
under ``accelerate launch`` / ``torchrun`` (DDP, FSDP, DeepSpeed through accelerate configs), and the
loop stays short enough to hold what F-Learning needs that Trainer makes awkward: the ft-c projection
after every optimizer step, stopping as soon as the old facts are held (prime), and a step-and-batch
precise error when the loss stops being finite.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import torch

from flearning.errors import FlearnError
from flearning.training.config import ALL_LINEAR, LoraSettings, TrainConfig
from flearning.training.dataset import LengthGroupedBatches, build_examples, collate

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

# Called after each full epoch with (epoch index, model); returning True ends the stage early.
EpochCallback = Callable[[int, torch.nn.Module], bool]


class TrainingDivergedError(FlearnError):
    """The loss became NaN or infinite; nothing is written."""


@dataclass
class TrainResult:
    model: torch.nn.Module  # a peft model when the stage trained LoRA
    steps: int
    epochs: float
    seconds: float
    tokens: int  # non-padding tokens processed (forward + backward)
    losses: list[float] = field(default_factory=list)  # one per optimizer step

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def attach_lora(model: PreTrainedModel, lora: LoraSettings, adapter_name: str = "default"):
    """Wrap ``model`` in a fresh peft LoRA adapter (B starts at zero, so the model is unchanged)."""
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules if lora.target_modules != ALL_LINEAR else "all-linear"
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config, adapter_name=adapter_name)


def freeze_embeddings(model: torch.nn.Module) -> None:
    """Freeze input and output embeddings (one tensor when tied, as in SmolLM2)."""
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            module.weight.requires_grad_(False)


def _oom_error(ex: BaseException, cfg: TrainConfig) -> FlearnError:
    return FlearnError(
        f"out of memory while training (batch size {cfg.batch_size}): {ex}. Try a smaller --batch-size "
        "with grad_accum to keep the effective batch, LoRA stages (method flearning-lora or "
        "flearning-lora-ft), or an accelerate config that shards the model (configs/accelerate/)."
    )


def train(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    pairs: Sequence[tuple[str, str]],
    cfg: TrainConfig,
    *,
    description: str = "train",
    progress: bool = True,
    on_epoch_end: EpochCallback | None = None,
) -> TrainResult:
    """Fine-tune ``model`` on (prompt, answer) pairs with loss on the answer tokens only.

    Args:
        model: a causal LM in fp32; trained in place (full) or wrapped with a LoRA adapter.
        tokenizer: its tokenizer (needs a pad token).
        pairs: (prompt, answer) texts; the model sees ``prompt + " " + answer`` (+ EOS).
        cfg: the stage's hyper-parameters.
        description: label of the progress bar.
        progress: show a progress bar with the running loss.
        on_epoch_end: optional callback after each complete epoch; True stops the stage.
    Returns:
        ``TrainResult`` with the trained model (peft-wrapped for LoRA) and the loss trace.
    Raises:
        TrainingDivergedError: the loss became NaN/inf (the step and batch are named).
        FlearnError: out of memory, with what to change.
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    if not pairs:
        raise FlearnError(f"{description}: no training pairs")
    set_seed(cfg.seed)
    examples = build_examples(tokenizer, pairs, add_eos=cfg.add_eos)

    if cfg.lora is not None:
        model = attach_lora(model, cfg.lora)
    elif cfg.freeze_embeddings:
        freeze_embeddings(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler = LengthGroupedBatches([len(e) for e in examples], cfg.batch_size, cfg.seed)
    loader = torch.utils.data.DataLoader(
        examples, batch_sampler=sampler, collate_fn=partial(collate, pad_id=tokenizer.pad_token_id)
    )
    steps_per_epoch = math.ceil(len(sampler) / cfg.grad_accum)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    scheduler = get_scheduler(
        cfg.scheduler,
        optimizer,
        num_warmup_steps=int(cfg.warmup_ratio * total_steps),
        num_training_steps=total_steps,
    )
    accelerator = Accelerator(gradient_accumulation_steps=cfg.grad_accum)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    # ft-c: the starting point every weight must stay within ε of.
    anchors = [p.detach().clone() for p in params] if cfg.linf_bound is not None else None

    model.train()
    losses: list[float] = []
    tokens = 0
    step = 0
    epoch = 0
    start = time.perf_counter()
    bar = tqdm(
        total=total_steps, desc=description, unit="step", disable=not progress or not accelerator.is_main_process
    )
    try:
        while step < total_steps:
            sampler.set_epoch(epoch)
            running = 0.0
            for batch_index, batch in enumerate(loader):
                with accelerator.accumulate(model):
                    out = model(**batch)
                    loss = out.loss
                    if not torch.isfinite(loss):
                        raise TrainingDivergedError(
                            f"{description}: loss became {loss.item()} at optimizer step {step + 1} "
                            f"(epoch {epoch + 1}, batch {batch_index + 1}); nothing was written. Lower the "
                            "learning rate or check the data."
                        )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.max_grad_norm is not None:
                        accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
                tokens += int(batch["attention_mask"].sum())
                running += loss.item() / cfg.grad_accum
                if accelerator.sync_gradients:
                    if anchors is not None:
                        _project_linf(params, anchors, cfg.linf_bound)
                    step += 1
                    losses.append(running)
                    running = 0.0
                    bar.update(1)
                    bar.set_postfix(loss=f"{losses[-1]:.4f}", epoch=epoch + 1)
                    if step >= total_steps:
                        break
            epoch += 1
            if step >= total_steps:
                break
            if on_epoch_end is not None:
                model.eval()
                stop = on_epoch_end(epoch, accelerator.unwrap_model(model))
                model.train()
                if stop:
                    break
    except torch.OutOfMemoryError as ex:
        raise _oom_error(ex, cfg) from ex
    except RuntimeError as ex:
        if "out of memory" in str(ex).lower() or "can't allocate memory" in str(ex).lower():
            raise _oom_error(ex, cfg) from ex
        raise
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    model.eval()
    unwrapped = accelerator.unwrap_model(model)
    epochs_done = step / steps_per_epoch
    log.info(
        "%s: %d steps (%.2f epochs) in %.1f s, %.0f tokens/s, final loss %.4f",
        description, step, epochs_done, seconds, tokens / max(seconds, 1e-9), losses[-1] if losses else float("nan"),
    )
    return TrainResult(unwrapped, step, epochs_done, seconds, tokens, losses)


@torch.no_grad()
def _project_linf(params: list[torch.Tensor], anchors: list[torch.Tensor], eps: float) -> None:
    """Clamp every weight into [θ₀ − ε, θ₀ + ε] (ft-c's constraint, applied after each step)."""
    for p, p0 in zip(params, anchors, strict=True):
        p.copy_(torch.minimum(torch.maximum(p, p0 - eps), p0 + eps))
