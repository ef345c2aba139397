"""How a (prompt, target) pair becomes tokens: shared by training and evaluation so both see the
exact same positions.

The text is ``prompt + " " + target`` (EasyEdit convention). We tokenize the prompt (with the model's
special tokens, e.g. a BOS where the tokenizer adds one) and ``" " + target`` separately and
concatenate, so the prompt/target boundary is exact even when a BPE merge could cross it.

One exception: a tokenizer that prepends its own word marker (SentencePiece/Llama-style ``▁``, a
Metaspace pre-tokenizer) encodes ``" Paris"`` alone as a lone space token and ``▁Paris``, a sequence it
never produces inside a text. Then the prompt and the answer are tokenised together, as EasyEdit does,
and the answer is what follows the prompt's tokens (``▁Paris``), so training and the teacher-forced
metrics see the answer's real tokens (when the prompt's tokens are not a prefix of the joint
tokenisation, the separate encoding is kept).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class EncodedPair:
    input_ids: list[int]
    prompt_len: int  # tokens before the first target token

    @property
    def target_ids(self) -> list[int]:
        return self.input_ids[self.prompt_len :]


def _is_lone_space(tokenizer: PreTrainedTokenizerBase, token_id: int) -> bool:
    """Whether a token is white space alone (``▁``, ``Ġ``, `` ``): nothing of the answer's text."""
    return not tokenizer.decode([token_id]).strip()


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, prompt: str, target: str, *, add_eos: bool = False
) -> EncodedPair:
    """Token ids of ``prompt + " " + target`` and the number of prompt tokens.

    Args:
        tokenizer: the model's tokenizer.
        prompt: text before the answer, without trailing space.
        target: the answer; one leading space is inserted between prompt and target.
        add_eos: append the EOS token after the target (teaches the model to stop).
    Returns:
        ``EncodedPair`` whose ``target_ids`` are the positions scored or trained on.
    """
    prompt, target = prompt.rstrip(), target.strip()
    prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    target_ids = tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    if len(target_ids) > 1 and _is_lone_space(tokenizer, target_ids[0]):
        joint = tokenizer(prompt + " " + target, add_special_tokens=True)["input_ids"]
        if len(joint) > len(prompt_ids) and joint[: len(prompt_ids)] == prompt_ids:
            target_ids = joint[len(prompt_ids) :]
    if add_eos and tokenizer.eos_token_id is not None:
        target_ids = [*target_ids, tokenizer.eos_token_id]
    return EncodedPair(input_ids=[*prompt_ids, *target_ids], prompt_len=len(prompt_ids))
