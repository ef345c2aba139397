"""Tiny randomly initialised models and a byte-level tokenizer, built inside the tests (no download)."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

EOS = "<|endoftext|>"


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A lossless byte-level BPE tokenizer with no merges: one token per byte, plus an EOS/pad token."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab[EOS] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS)
    fast.padding_side = "right"
    return fast


def tiny_llama(
    seed: int = 0, tie: bool = True, vocab_size: int = 257, hidden: int = 32, layers: int = 2
) -> LlamaForCausalLM:
    """A 2-layer Llama with tied embeddings (like SmolLM2), deterministic for a seed, in eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=tie,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.eval()
    return model


def toy_facts(n: int = 12) -> list[dict]:
    """``n`` made-up facts in the JSONL format, with a rephrase and a locality probe each."""
    return [
        {
            "id": f"f{i}",
            "prompt": f"The code of item {i} is",
            "target_old": f"old{i % 3}",
            "target_new": f"new{i % 4}",
            "rephrase_prompts": [f"Item {i} has the code"],
            "locality": [{"prompt": f"Colour {i} is", "answer": "blue"}],
        }
        for i in range(n)
    ]
