"""Prompt templates: how a record's prompt is dressed before its answer, the same for training and
evaluation (``encoding.encode_pair`` is their one user).

- ``plain``: the prompt as it is, the answer after one space (``prompt + " " + answer``, EasyEdit's
  convention and the project's default).
- ``alpaca``: the Stanford Alpaca instruction format without an input, the F-Learning paper's format
  (its §5: "Alpaca-style"). The text is ``PROMPT_DICT["prompt_no_input"]`` of tatsu-lab/stanford_alpaca,
  train.py (commit 761dc5b): the prompt is the instruction, and the answer follows ``### Response:``
  after one space, as in ``plain``, so the answer's tokens are the same under both templates.
- ``chat``: the tokenizer's own chat template (``tokenizer.apply_chat_template``) with the prompt as the
  one user message and the assistant's turn opened (``add_generation_prompt``); the answer follows
  directly (the template ends the line before the assistant's text). The template's text already holds
  the model's special tokens, so none are added. For instruct models; a tokenizer without a chat
  template is refused (``check_template``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from flearning.errors import FlearnError

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

TEMPLATES: tuple[str, ...] = ("plain", "alpaca", "chat")
TemplateName = Literal["plain", "alpaca", "chat"]
PLAIN = "plain"

# tatsu-lab/stanford_alpaca @761dc5bfbdeeffa89b8bff5d038781a4055f796a, train.py, PROMPT_DICT["prompt_no_input"]
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:"
)


@dataclass(frozen=True)
class TemplatedPrompt:
    """A prompt as the model reads it: its text, whether the tokenizer adds its special tokens (a BOS)
    to it, and the text between it and the answer."""

    text: str
    add_special_tokens: bool
    separator: str


def check_template(tokenizer: PreTrainedTokenizerBase, template: str) -> None:
    """Refuse a template name that is not one of ``TEMPLATES``, and ``chat`` for a tokenizer without a
    chat template (before any work).

    Raises:
        FlearnError: naming the template and what to choose instead.
    """
    if template not in TEMPLATES:
        raise FlearnError(f"unknown prompt template {template!r} (choose from: {', '.join(TEMPLATES)})")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or "the model"
        raise FlearnError(
            f"template chat: the tokenizer of {name} has no chat template (tokenizer.chat_template is "
            "empty; it is an instruct model's); use --template plain or --template alpaca"
        )


def template_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, template: str) -> TemplatedPrompt:
    """The text of ``prompt`` under ``template`` (``TEMPLATES``), and how its answer is joined to it.

    Raises:
        FlearnError: an unknown template, or ``chat`` with a tokenizer without a chat template.
    """
    if template == PLAIN:
        return TemplatedPrompt(prompt, True, " ")
    if template == "alpaca":
        return TemplatedPrompt(ALPACA_NO_INPUT.format(instruction=prompt), True, " ")
    check_template(tokenizer, template)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    return TemplatedPrompt(text, False, "")
