"""The one rule for inputs longer than the model's context.

Every sequence the model sees for a record (``prompt + " " + target`` + EOS, as ``data.encoding`` builds it:
the edit prompt with both targets, each rephrase with both, each locality and portability probe with its
answer) must fit in the model's context (``max_position_embeddings`` or its equivalent in the model's
config). ``find_too_long`` names each field that does not (file, record, field, tokens against the limit);
``check_context`` refuses them, or with ``truncate`` cuts the prompts from the left (keeping the words
right before the answer) and reports what it cut. ``flearn data check --model`` warns with
``find_too_long``; ``flearn update`` (and its dry run) and ``flearn eval`` apply ``check_context``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flearning.data.encoding import encode_pair
from flearning.data.loading import Location
from flearning.data.records import KnowledgeRecord
from flearning.data.templates import PLAIN
from flearning.errors import InputError, Problem

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# where a model's config states how many positions it takes, by architecture family
LIMIT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
TRUNCATE_HINT = "shorten it, or pass --truncate (truncate: true) to cut prompts from the left"


def context_limit(config: Any) -> tuple[int, str] | None:
    """(positions the model takes, the config field saying so), or None when its config states none."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in LIMIT_FIELDS:
        value = getattr(text, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, name
    return None


@dataclass(frozen=True)
class TooLong:
    """One field of a record whose longest sequence does not fit (``field`` names the record's field:
    ``prompt``, ``rephrase_prompts[0]``, ``locality[1].prompt``, or a target/answer too long on its own)."""

    location: Location | None
    id: str
    field: str
    tokens: int  # the field's longest sequence, before any cut
    fixable: bool = True  # cutting the prompt can make it fit (not when the answer alone does not)

    @property
    def where(self) -> str:
        return str(self.location) if self.location is not None else f"record {self.id}"

    def message(self, limit: int, limit_name: str) -> str:
        what = "with its answer and EOS" if self.fixable else "its answer alone, with EOS,"
        return f"{self.tokens} tokens ({what}) but the model takes at most {limit} ({limit_name})"

    def problem(self, limit: int, limit_name: str, hint: str) -> Problem:
        loc = self.location
        message = f"{self.message(limit, limit_name)}; {hint}"
        if loc is None:
            return Problem(f"record {self.id}", None, self.field, message)
        return Problem(loc.source, loc.index, self.field, message, loc.kind)

    def to_json(self) -> dict[str, Any]:
        return {"where": self.where, "id": self.id, "field": self.field, "tokens": self.tokens}


def _prompts(record: KnowledgeRecord) -> Iterator[tuple[str, str, list[tuple[str, str]]]]:
    """(field, prompt, [(answer field, answer), ...]) for every prompt of a record."""
    both = [("target_old", record.target_old), ("target_new", record.target_new)]
    yield "prompt", record.prompt, both
    for i, prompt in enumerate(record.rephrase_prompts):
        yield f"rephrase_prompts[{i}]", prompt, both
    for name in ("locality", "portability"):
        for i, probe in enumerate(getattr(record, name)):
            yield f"{name}[{i}].prompt", probe.prompt, [(f"{name}[{i}].answer", probe.answer)]


def _length(tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str, template: str = PLAIN) -> int:
    return len(encode_pair(tokenizer, prompt, answer, add_eos=True, template=template).input_ids)


def _longest(
    tokenizer: PreTrainedTokenizerBase, prompt: str, answers: list[tuple[str, str]], template: str = PLAIN
) -> int:
    return max(_length(tokenizer, prompt, answer, template) for _, answer in answers)


def find_too_long(
    records: Sequence[KnowledgeRecord],
    tokenizer: PreTrainedTokenizerBase,
    limit: int,
    locations: Sequence[Location] | None = None,
    template: str = PLAIN,
) -> list[TooLong]:
    """Every field of ``records`` whose sequence (under the prompt ``template``) does not fit in ``limit``
    tokens, in record order."""
    found: list[TooLong] = []
    for i, record in enumerate(records):
        where = locations[i] if locations else None
        for field, prompt, answers in _prompts(record):
            tokens = _longest(tokenizer, prompt, answers, template)
            if tokens <= limit:
                continue
            # the answer alone (an empty prompt still has its special tokens): can a cut prompt fit?
            worst = max(answers, key=lambda a: _length(tokenizer, "", a[1], template))
            alone = _length(tokenizer, "", worst[1], template)
            if alone > limit:
                found.append(TooLong(where, record.id, worst[0], alone, fixable=False))
            else:
                found.append(TooLong(where, record.id, field, tokens))
    return found


def _cut(tokenizer, prompt: str, answers: list[tuple[str, str]], limit: int, template: str = PLAIN) -> str:
    """The longest suffix of ``prompt`` (starting at a word when one fits) whose sequences fit."""

    def fits(start: int) -> bool:
        return _longest(tokenizer, prompt[start:], answers, template) <= limit

    low, high = 0, len(prompt)  # fits(high): the answer alone fits (checked by the caller)
    while low < high:
        mid = (low + high) // 2
        if fits(mid):
            high = mid
        else:
            low = mid + 1
    start = low
    space = prompt.find(" ", start)
    if 0 <= space < len(prompt) - 1 and fits(space + 1):
        start = space + 1  # begin at a word rather than inside one
    while start < len(prompt) and not fits(start):  # token counts are not strictly monotone
        start += 1
    return prompt[start:].strip()


def fit_to_context(
    records: Sequence[KnowledgeRecord],
    tokenizer: PreTrainedTokenizerBase,
    limit: int,
    locations: Sequence[Location] | None = None,
    template: str = PLAIN,
) -> tuple[list[KnowledgeRecord], list[TooLong]]:
    """``records`` with every too-long prompt cut from the left until its sequences (under the prompt
    ``template``) fit, and what was cut.

    Raises:
        ValueError: a field cannot be cut to fit (its answer alone is too long): ``check_context``
            reports those before cutting.
    """
    too_long = find_too_long(records, tokenizer, limit, locations, template)
    if any(not t.fixable for t in too_long):
        raise ValueError("an answer alone does not fit in the context; check_context reports it")
    fields = {(t.id, t.field) for t in too_long}
    fitted = []
    for record in records:
        if not any(rid == record.id for rid, _ in fields):
            fitted.append(record)
            continue
        update: dict[str, Any] = {}
        rephrases = list(record.rephrase_prompts)
        probes = {name: list(getattr(record, name)) for name in ("locality", "portability")}
        for field, prompt, answers in _prompts(record):
            if (record.id, field) not in fields:
                continue
            cut = _cut(tokenizer, prompt, answers, limit, template)
            if field == "prompt":
                update["prompt"] = cut
            elif field.startswith("rephrase_prompts["):
                rephrases[int(field[len("rephrase_prompts[") : -1])] = cut
            else:
                name, rest = field.split("[", 1)
                i = int(rest.split("]", 1)[0])
                probes[name][i] = probes[name][i].model_copy(update={"prompt": cut})
        update.update(rephrase_prompts=rephrases, **probes)
        fitted.append(record.model_copy(update=update))
    return fitted, too_long


def check_context(
    records: Sequence[KnowledgeRecord],
    tokenizer: PreTrainedTokenizerBase,
    limit: tuple[int, str] | None,
    locations: Sequence[Location] | None = None,
    *,
    truncate: bool = False,
    template: str = PLAIN,
) -> tuple[list[KnowledgeRecord], list[TooLong]]:
    """The rule: records that fit are returned as they are; a field that does not fit is refused, or with
    ``truncate`` its prompt is cut from the left (returned with the list of what was cut).

    Args:
        limit: ``context_limit`` of the model's config (None: the config states no limit, nothing to check).
        template: the prompt template training and evaluation encode with (``templates``).
    Raises:
        InputError: every field that does not fit (without ``truncate``), or whose answer alone does not
            (with it), naming file, record, field and the tokens against the limit.
    """
    if limit is None:
        return list(records), []
    positions, name = limit
    too_long = find_too_long(records, tokenizer, positions, locations, template)
    if not too_long:
        return list(records), []
    if truncate:
        unfixable = [t for t in too_long if not t.fixable]
        if unfixable:
            hint = "cutting the prompt cannot make it fit: shorten the answer or leave the record out"
            raise InputError([t.problem(positions, name, hint) for t in unfixable], what="dataset")
        return fit_to_context(records, tokenizer, positions, locations, template)
    hints = {True: TRUNCATE_HINT, False: "cutting the prompt cannot make it fit: shorten the answer"}
    raise InputError([t.problem(positions, name, hints[t.fixable]) for t in too_long], what="dataset")
