"""Prompt and answer tokenised together when a tokenizer would give the answer a lone space token.

A SentencePiece/Llama-style tokenizer (every word carries its own "▁", one is prepended) encodes
" Paris" alone as ["▁", "▁Paris"]; inside "... is Paris" the answer is ["▁Paris"]. Training's encoding
(``data.encoding.encode_pair``, used by ``training.dataset``) and the evaluation's probes must both use
the answer's real tokens.
"""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, processors
from transformers import PreTrainedTokenizerFast

from flearning.data.encoding import encode_pair
from flearning.data.records import KnowledgeRecord
from flearning.evaluation.evaluate import evaluate
from flearning.evaluation.probes import record_probes
from flearning.training.dataset import IGNORE_INDEX, build_examples
from tiny import tiny_llama, tiny_tokenizer

WORDS = ["The", "capital", "of", "France", "is", "Paris", "New", "York", "City", "Lyon", "a", "city"]


def llama_style_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer built the way Llama-2's fast tokenizer is: a normalizer that prepends "▁" and turns
    spaces into "▁", no pre-tokenizer, a BOS added, a decoder that strips the prepended space. Its model
    is a small Unigram (whole words "▁Word", single letters as fallback). Like Llama-2 (token 29871),
    it encodes " Paris" alone as ["▁", "▁Paris"]."""
    letters = sorted({ch for w in WORDS for ch in w})
    pieces = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0), ("▁", -2.0)]
    pieces += [(f"▁{w}", -1.0) for w in WORDS] + [(ch, -5.0) for ch in letters]
    tok = Tokenizer(models.Unigram(pieces, unk_id=0))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>"
    )


def test_the_tokenizer_really_gives_a_lone_space():
    tok = llama_style_tokenizer()
    alone = tok(" Paris", add_special_tokens=False)["input_ids"]
    assert tok.convert_ids_to_tokens(alone) == ["▁", "▁Paris"]
    assert tok.decode(alone[:1]).strip() == ""
    joint = tok("The capital of France is Paris")["input_ids"]
    assert tok.convert_ids_to_tokens(joint) == ["<s>", "▁The", "▁capital", "▁of", "▁France", "▁is", "▁Paris"]


@pytest.mark.parametrize(
    ("target", "tokens"),
    [("Paris", ["▁Paris"]), ("New York City", ["▁New", "▁York", "▁City"]), ("Lyons", ["▁Lyon", "s"])],
)
def test_encode_pair_uses_the_joint_tokenisation(target, tokens):
    tok = llama_style_tokenizer()
    prompt = "The capital of France is"
    pair = encode_pair(tok, prompt, target)
    assert tok.convert_ids_to_tokens(pair.target_ids) == tokens
    assert pair.input_ids == tok(f"{prompt} {target}")["input_ids"]  # what the model sees in a text
    assert pair.prompt_len == len(tok(prompt)["input_ids"])  # BOS included, once
    with_eos = encode_pair(tok, prompt, target, add_eos=True)
    assert with_eos.target_ids == [*pair.target_ids, tok.eos_token_id]


def test_training_and_evaluation_see_the_same_answer_tokens():
    tok = llama_style_tokenizer()
    record = KnowledgeRecord(
        id="fr", prompt="The capital of France is", target_old="Lyon", target_new="Paris"
    )
    (example,) = build_examples(tok, [record.new_pair], add_eos=True)
    trained = [t for t in example.labels if t != IGNORE_INDEX]
    assert tok.convert_ids_to_tokens(trained) == ["▁Paris", "</s>"]  # the loss never sees a lone "▁"
    probes = record_probes(tok, record)
    assert tok.convert_ids_to_tokens(list(probes.new.target_ids)) == ["▁Paris"]
    assert list(probes.new.prompt_ids + probes.new.target_ids) == example.input_ids[:-1]  # without EOS


def test_teacher_forced_metrics_score_the_real_answer_tokens():
    """Reliability of a one-token answer is 0 or 1: the argmax after "▁is" equals "▁Paris" or not, by
    hand from one unpadded forward of the joint text (a lone "▁" would have made it a two-token answer)."""
    tok = llama_style_tokenizer()
    record = KnowledgeRecord(
        id="fr", prompt="The capital of France is", target_old="Lyon", target_new="Paris"
    )
    ids = tok("The capital of France is Paris")["input_ids"]
    paris, lyon = tok.convert_tokens_to_ids(["▁Paris", "▁Lyon"])
    for seed in range(4):
        model = tiny_llama(seed, vocab_size=len(tok))
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids])).logits[0]
        log_probs = torch.log_softmax(logits[-2].float(), -1)  # the position before the answer
        row = evaluate(model, tok, [record], generation=False, progress=False).records[0]
        assert row["reliability"] == float(int(logits[-2].argmax()) == paris)
        assert row["old_retention"] == float(int(logits[-2].argmax()) == lyon)
        want = float(-log_probs[paris] < -log_probs[lyon])
        assert row["efficacy"] == want


def test_byte_level_tokenizers_are_encoded_as_before():
    tok = tiny_tokenizer()  # " " is its own token here too, but also inside a text: nothing changes
    pair = encode_pair(tok, "The capital is", "Paris")
    assert pair.target_ids == tok(" Paris", add_special_tokens=False)["input_ids"]
    assert pair.input_ids == tok("The capital is")["input_ids"] + pair.target_ids
