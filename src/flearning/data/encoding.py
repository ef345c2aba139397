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

A prompt template (``templates``: ``plain``, ``alpaca``, ``chat``) dresses the prompt first; training and
evaluation pass the same one, so they see the same tokens. Under ``chat`` the answer follows the
template's text directly and is read from the joint tokenisation when the prompt's tokens are its prefix.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from flearning.data.templates import PLAIN, template_prompt

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
    tokenizer: PreTrainedTokenizerBase,
    prompt: str,
    target: str,
    *,
    add_eos: bool = False,
    template: str = PLAIN,
) -> EncodedPair:
    """Token ids of ``prompt + " " + target`` (under ``template``) and the number of prompt tokens.

    Args:
        tokenizer: the model's tokenizer.
        prompt: text before the answer, without trailing space.
        target: the answer; one leading space is inserted between prompt and target (none after a chat
            template's text).
        add_eos: append the EOS token after the target (teaches the model to stop).
        template: the prompt template (``templates.TEMPLATES``).
    Returns:
        ``EncodedPair`` whose ``target_ids`` are the positions scored or trained on.
    Raises:
        FlearnError: an unknown template, or ``chat`` with a tokenizer without a chat template.
    """
    prompt, target = prompt.rstrip(), target.strip()
    dressed = template_prompt(tokenizer, prompt, template)
    text, special = dressed.text, dressed.add_special_tokens
    prompt_ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    target_ids = tokenizer(dressed.separator + target, add_special_tokens=False)["input_ids"]
    joint_first = not dressed.separator  # a chat turn: the answer's first token may merge otherwise
    if joint_first or (len(target_ids) > 1 and _is_lone_space(tokenizer, target_ids[0])):
        joint = tokenizer(text + dressed.separator + target, add_special_tokens=special)["input_ids"]
        if len(joint) > len(prompt_ids) and joint[: len(prompt_ids)] == prompt_ids:
            target_ids = joint[len(prompt_ids) :]
    if add_eos and tokenizer.eos_token_id is not None:
        target_ids = [*target_ids, tokenizer.eos_token_id]
    return EncodedPair(input_ids=[*prompt_ids, *target_ids], prompt_len=len(prompt_ids))
