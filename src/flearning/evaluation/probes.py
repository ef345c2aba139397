"""From knowledge records to token probes: every (prompt, target) a metric scores, deduplicated.

Probes go through ``encode_pair``, as training does, under the same prompt template
(``data.templates``), so a target's positions are the ones the model was trained on.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flearning.data.encoding import encode_pair
from flearning.data.templates import PLAIN
from flearning.errors import FlearnError
from flearning.evaluation.scoring import Probe

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from flearning.data.records import KnowledgeRecord


@dataclass(frozen=True)
class RecordProbes:
    """Every teacher-forced probe one record needs."""

    new: Probe  # target_new after the edit prompt
    old: Probe  # target_old after the edit prompt
    rephrase_new: tuple[Probe, ...]
    rephrase_old: tuple[Probe, ...]
    locality: tuple[Probe, ...]
    portability: tuple[Probe, ...]
    # each locality / portability probe's category (None: uncategorised), in the same order
    locality_categories: tuple[str | None, ...] = ()
    portability_categories: tuple[str | None, ...] = ()

    def all(self) -> Iterable[Probe]:
        yield self.new
        yield self.old
        yield from self.rephrase_new
        yield from self.rephrase_old
        yield from self.locality
        yield from self.portability


def encode_probe(
    tokenizer: PreTrainedTokenizerBase, prompt: str, target: str, template: str = PLAIN
) -> Probe:
    """The probe of ``prompt + " " + target`` exactly as training encodes it (no EOS).

    Args:
        tokenizer: the model's tokenizer.
        prompt: text before the answer.
        target: the answer.
        template: the prompt template (``data.templates``), the one training used.
    Returns:
        A ``Probe`` with the prompt tokens and the target tokens.
    """
    pair = encode_pair(tokenizer, prompt, target, template=template)
    return Probe(tuple(pair.input_ids[: pair.prompt_len]), tuple(pair.target_ids))


def record_probes(
    tokenizer: PreTrainedTokenizerBase, record: KnowledgeRecord, template: str = PLAIN
) -> RecordProbes:
    """All probes of one record (rephrases, locality and portability may be empty).

    Args:
        tokenizer: the model's tokenizer.
        record: the fact.
        template: the prompt template of every probe (``data.templates``).
    Returns:
        ``RecordProbes``.
    """

    def probe(prompt: str, target: str) -> Probe:
        return encode_probe(tokenizer, prompt, target, template)

    return RecordProbes(
        new=probe(record.prompt, record.target_new),
        old=probe(record.prompt, record.target_old),
        rephrase_new=tuple(probe(p, record.target_new) for p in record.rephrase_prompts),
        rephrase_old=tuple(probe(p, record.target_old) for p in record.rephrase_prompts),
        locality=tuple(probe(pa.prompt, pa.answer) for pa in record.locality),
        portability=tuple(probe(pa.prompt, pa.answer) for pa in record.portability),
        locality_categories=tuple(pa.category for pa in record.locality),
        portability_categories=tuple(pa.category for pa in record.portability),
    )


def probe_categories(probes: Sequence[Probe], categories: Sequence[str | None]) -> list[str | None]:
    """The category of each probe (``RecordProbes.locality_categories`` or ``portability_categories``;
    all None when they were not given)."""
    if not categories:
        return [None] * len(probes)
    if len(categories) != len(probes):
        raise ValueError("one category per probe is needed")
    return list(categories)


def probe_key(probe: Probe) -> str:
    """A stable text key of a probe's tokens (used to store reference predictions as JSON)."""
    payload = json.dumps([list(probe.prompt_ids), list(probe.target_ids)], separators=(",", ":"))
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


def probes_hash(probes: Sequence[Probe]) -> str:
    """Hash of a set of probes (order and duplicates do not matter): the 'records hash' of a cache key.

    Hashing token ids rather than text also covers the tokenizer.
    """
    keys = sorted({probe_key(p) for p in probes})
    return hashlib.sha256("\n".join(keys).encode()).hexdigest()


def unique_probes(groups: Iterable[Iterable[Probe]]) -> tuple[list[Probe], dict[Probe, int]]:
    """Deduplicate probes (e.g. a locality prompt shared by many records is scored once).

    Args:
        groups: probes, possibly repeated.
    Returns:
        ``(probes, index)`` with ``index[probe]`` its position in ``probes``.
    """
    index: dict[Probe, int] = {}
    for group in groups:
        for probe in group:
            index.setdefault(probe, len(index))
    return list(index), index


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The padding id (the EOS token when the tokenizer has no pad token)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise FlearnError("the tokenizer has neither a pad nor an EOS token")
    return int(pad)


def eos_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The token that ends a greedy generation (the pad token when there is no EOS)."""
    eos = tokenizer.eos_token_id
    return int(eos) if eos is not None else pad_token_id(tokenizer)
