"""Edit requests and the token sequences the locate-then-edit methods read.

A request is ROME's ``{prompt, subject, target_new}``: ``prompt`` is the text the model completes, with
the subject in it (ROME writes ``"{} plays the"`` and the subject apart; both forms are accepted). The
fact is looked up at the subject's last token (``fact_token: subject_last``, the setting of every
reference hyper-parameter file), found here from the tokenizer's character offsets.

Context templates: ROME and MEMIT average keys (and optimise values) over the prompt alone and the
prompt after a few short texts the model itself samples (``get_context_templates`` in ``rome_main.py``
and ``memit_main.py``). To stay deterministic and download-free, this package uses the fixed neutral
prefixes of ``CONTEXT_PREFIXES`` instead (five, one per seed word MEMIT samples from: "The", "Therefore",
"Because", "I", "You").

The text fed to the model is ``prompt + " " + target`` encoded by ``data.encoding.encode_pair``, the
encoding of training and evaluation, so an edit is optimised on the positions the metrics score.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flearning.data.encoding import encode_pair
from flearning.errors import FlearnError, Problem

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from flearning.data.records import KnowledgeRecord

PLACEHOLDER = "{}"
# Fixed stand-ins for the texts ROME/MEMIT sample from the model (10 tokens after each of MEMIT's seed
# words), each followed by ". " as in their templates ``x + ". {}"``.
CONTEXT_PREFIXES: tuple[str, ...] = (
    "The weather was mild that day. ",
    "Therefore, we read it again. ",
    "Because it was late, we stopped. ",
    "I wrote this down last week. ",
    "You may already know this. ",
)
KL_SUFFIX = " is a"  # ROME's KL prompt "{} is a"


@dataclass(frozen=True)
class EditRequest:
    """One fact to write: after ``prompt`` (which contains ``subject`` at ``subject_start``) the model
    should say ``target_new``."""

    prompt: str
    subject: str
    target_new: str
    subject_start: int

    @property
    def subject_end(self) -> int:
        return self.subject_start + len(self.subject)


def edit_request(prompt: str, subject: str, target_new: str) -> EditRequest:
    """A request from a prompt holding ``{}`` once (ROME's template) or the subject itself (its first
    occurrence is the one edited).

    Raises:
        FlearnError: an empty subject or target, a prompt with several ``{}``, or without the subject.
    """
    subject, target_new = subject.strip(), target_new.strip()
    prompt = prompt.rstrip()
    if not subject:
        raise FlearnError("an edit request needs a non-empty subject (the tokens the fact is looked up at)")
    if not target_new:
        raise FlearnError(f"edit request '{prompt}': target_new is empty")
    if PLACEHOLDER in prompt:
        if prompt.count(PLACEHOLDER) != 1:
            raise FlearnError(f"edit request '{prompt}': the prompt must hold '{{}}' (the subject) once")
        start = prompt.index(PLACEHOLDER)
        prompt = prompt[:start] + subject + prompt[start + len(PLACEHOLDER) :]
    else:
        start = prompt.find(subject)
        if start < 0:
            raise FlearnError(
                f"edit request '{prompt}': the subject '{subject}' is not in the prompt; write it there or "
                f"mark its place with '{{}}'"
            )
    return EditRequest(prompt=prompt, subject=subject, target_new=target_new, subject_start=start)


def as_request(item: EditRequest | KnowledgeRecord | Mapping[str, Any]) -> EditRequest:
    """An ``EditRequest`` from itself, a ``KnowledgeRecord`` with a subject, or a mapping with ``prompt``,
    ``subject`` and ``target_new`` (a string, or ROME's ``{"str": ...}``)."""
    if isinstance(item, EditRequest):
        return item
    if isinstance(item, Mapping):
        missing = [key for key in ("prompt", "subject", "target_new") if not item.get(key)]
        if missing:
            raise FlearnError(f"edit request {dict(item)}: missing {', '.join(missing)}")
        target = item["target_new"]
        target = target["str"] if isinstance(target, Mapping) else target
        return edit_request(str(item["prompt"]), str(item["subject"]), str(target))
    subject = getattr(item, "subject", None)
    if not subject:
        raise FlearnError(
            f"record {getattr(item, 'id', '?')}: ROME, MEMIT and AlphaEdit need the record's subject "
            "(the 'subject' field: the words the fact is about)"
        )
    return edit_request(item.prompt, subject, item.target_new)


def as_requests(items: Iterable[EditRequest | KnowledgeRecord | Mapping[str, Any]]) -> list[EditRequest]:
    requests = [as_request(item) for item in items]
    if not requests:
        raise FlearnError("no edit request given")
    return requests


def request_problems(
    records: Sequence[KnowledgeRecord], locations: Sequence[Any] | None = None
) -> list[Problem]:
    """Every record that cannot be an edit request (no subject, the subject not in the prompt, an empty
    target), as ``errors.Problem``s naming the file, the record and the field (``locations``: where each
    record is, ``data.loading.Location``; without it, the record's id). Checked before any work."""
    problems = []
    for i, record in enumerate(records):
        where = locations[i] if locations else None
        source = where.source if where is not None else f"record {record.id}"
        index, kind = (where.index, where.kind) if where is not None else (None, "record")
        subject = (record.subject or "").strip()
        if not subject:
            problems.append(
                Problem(
                    source,
                    index,
                    "subject",
                    "missing: ROME, MEMIT and AlphaEdit edit the fact at the subject's last token; give "
                    "each record a 'subject' (the words of the prompt the fact is about), or use a method "
                    "that fine-tunes",
                    kind,
                )
            )
            continue
        try:
            edit_request(record.prompt, subject, record.target_new)
        except FlearnError as ex:
            problems.append(Problem(source, index, "subject", str(ex), kind))
    return problems


@dataclass(frozen=True)
class Encoded:
    """One tokenised text: ``lookup`` is the index of the subject's last token; ``targets`` the target
    token ids, predicted from positions ``predict_from``, ``predict_from + 1``, ...; ``request`` the
    index of the request it belongs to."""

    ids: list[int]
    lookup: int
    request: int
    targets: tuple[int, ...] = ()
    predict_from: int = -1


def subject_last_index(
    tokenizer: PreTrainedTokenizerBase, text: str, start: int, end: int
) -> tuple[list[int], int]:
    """The token ids of ``text`` (with the model's special tokens) and the index of the last token that
    overlaps characters ``[start, end)``."""
    if getattr(tokenizer, "is_fast", False):
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
        if inside:
            return ids, inside[-1]
    else:  # ROME's way: the subject ends where the tokenised text up to its end ends
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        head = tokenizer(text[:end], add_special_tokens=True)["input_ids"]
        if 0 < len(head) <= len(ids):
            return ids, len(head) - 1
    raise FlearnError(f"cannot find the tokens of the subject '{text[start:end]}' in '{text}'")


def rewrite_sequence(
    tokenizer: PreTrainedTokenizerBase, request: EditRequest, index: int, prefix: str
) -> Encoded:
    """``prefix + prompt + " " + target_new`` without its last token: the positions from the prompt's
    last token on predict the target's tokens (ROME's ``rewriting_prompts``)."""
    text = prefix + request.prompt
    ids, lookup = subject_last_index(
        tokenizer, text, len(prefix) + request.subject_start, len(prefix) + request.subject_end
    )
    pair = encode_pair(tokenizer, text, request.target_new)
    if pair.input_ids[: pair.prompt_len] != ids:
        raise FlearnError(
            f"'{text}' tokenises differently alone and before its target '{request.target_new}'"
        )
    return Encoded(
        ids=pair.input_ids[:-1],
        lookup=lookup,
        request=index,
        targets=tuple(pair.target_ids),
        predict_from=pair.prompt_len - 1,
    )


def kl_sequence(tokenizer: PreTrainedTokenizerBase, request: EditRequest, index: int) -> Encoded:
    """ROME's KL prompt ``"{subject} is a"``, read at the subject's last token."""
    text = request.subject + KL_SUFFIX
    ids, lookup = subject_last_index(tokenizer, text, 0, len(request.subject))
    return Encoded(ids=ids, lookup=lookup, request=index)


def key_sequence(
    tokenizer: PreTrainedTokenizerBase, request: EditRequest, index: int, prefix: str
) -> Encoded:
    """``prefix + prompt``, read at the subject's last token (where keys and z are taken)."""
    text = prefix + request.prompt
    ids, lookup = subject_last_index(
        tokenizer, text, len(prefix) + request.subject_start, len(prefix) + request.subject_end
    )
    return Encoded(ids=ids, lookup=lookup, request=index)


def key_sequences(
    tokenizer: PreTrainedTokenizerBase, requests: Sequence[EditRequest], prefixes: Sequence[str]
) -> list[Encoded]:
    """For each request (outer loop) the prompt alone, then after each prefix."""
    return [key_sequence(tokenizer, r, i, p) for i, r in enumerate(requests) for p in ("", *prefixes)]


def pad_batch(tokenizer: PreTrainedTokenizerBase, sequences: Sequence[Encoded], device: Any = None):
    """``input_ids`` and ``attention_mask`` padded on the right (positions of real tokens unchanged)."""
    import torch

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id or 0
    width = max(len(s.ids) for s in sequences)
    ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq.ids)] = torch.tensor(seq.ids, dtype=torch.long)
        mask[row, : len(seq.ids)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}
