"""Tiny random Llama and GPT-2 models for the editing tests, and small readers of their activations.

The models are initialised with a larger spread than transformers' default (0.02) so that their hidden
states, and so the clamp of the value optimisation (a multiple of the output's norm), are not vanishingly
small: an edit then measurably changes the predictions.
"""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from flearning.data.encoding import encode_pair
from flearning.editing.covariance import CovarianceSettings
from flearning.editing.requests import EditRequest, key_sequence, pad_batch
from flearning.editing.tracing import capture

VOCAB = 257  # tests/tiny.py's byte tokenizer: 256 bytes + EOS
SAMPLE = "sample:wikitext-2-valid-200.txt"
SMALL_C = CovarianceSettings(corpus=SAMPLE, max_tokens=3000, max_length=128, dtype="float64")

REQUESTS = [
    {"prompt": "The capital of {} is", "subject": "Freedonia", "target_new": "Sylvania"},
    {"prompt": "{} plays the", "subject": "Ada Lovelace", "target_new": "cello"},
    {
        "prompt": "The mother tongue of Danielle Darrieux is",
        "subject": "Danielle Darrieux",
        "target_new": "Dutch",
    },
]


def llama(seed: int = 0, layers: int = 4) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=VOCAB - 1,
        pad_token_id=VOCAB - 1,
        bos_token_id=None,
        initializer_range=0.2,
    )
    return LlamaForCausalLM(config).eval()


def gpt2(seed: int = 0, layers: int = 4) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=32,
        n_inner=64,
        n_layer=layers,
        n_head=4,
        n_positions=256,
        bos_token_id=VOCAB - 1,
        eos_token_id=VOCAB - 1,
        pad_token_id=VOCAB - 1,
        initializer_range=0.2,
    )
    return GPT2LMHeadModel(config).eval()


def read_at_subject(model, tokenizer, request: EditRequest, module: str, side: str) -> torch.Tensor:
    """``module``'s input or output at the subject's last token of the prompt alone."""
    seq = key_sequence(tokenizer, request, 0, "")
    got = capture(model, pad_batch(tokenizer, [seq]), [(module, side)])
    return got[(module, side)][0, seq.lookup].float()


def target_nll(model, tokenizer, request: EditRequest) -> float:
    """Mean NLL of ``target_new``'s tokens after the prompt."""
    pair = encode_pair(tokenizer, request.prompt, request.target_new)
    ids = torch.tensor([pair.input_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    lp = torch.log_softmax(logits[pair.prompt_len - 1 : -1], -1)
    return float(-lp.gather(1, torch.tensor(pair.target_ids)[:, None]).mean())
