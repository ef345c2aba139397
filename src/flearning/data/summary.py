"""Numbers that describe a loaded dataset: field coverage and sequence lengths (for ``flearn data check``).

Pure functions on records; the tokenizer (or word counter) is passed in, so nothing here loads a model.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from flearning.data.loading import LoadedDataset, Location
from flearning.data.records import KnowledgeRecord

# (prompt, target) -> length of ``prompt + " " + target`` in some unit (tokens or words)
LengthFn = Callable[[str, str], int]


def word_count(prompt: str, target: str) -> int:
    """Whitespace-separated words of ``prompt + " " + target`` (when no tokenizer is wanted)."""
    return len(f"{prompt} {target}".split())


def coverage(records: Sequence[KnowledgeRecord]) -> dict[str, int]:
    """How many records carry each optional part (subject, rephrase, locality, portability)."""
    return {
        "subject": sum(r.subject is not None for r in records),
        "rephrase": sum(bool(r.rephrase_prompts) for r in records),
        "locality": sum(bool(r.locality) for r in records),
        "portability": sum(bool(r.portability) for r in records),
    }


def probe_totals(records: Sequence[KnowledgeRecord]) -> dict[str, int]:
    """Total rephrase prompts, locality and portability probes over all records."""
    return {
        "rephrase_prompts": sum(len(r.rephrase_prompts) for r in records),
        "locality": sum(len(r.locality) for r in records),
        "portability": sum(len(r.portability) for r in records),
    }


def conflicting_edits(
    records: Sequence[KnowledgeRecord], locations: Sequence[Location] | None = None
) -> list[str]:
    """One note per prompt that two records give different new targets (the update cannot teach both),
    naming each record: ``conflicting edits: the same prompt 'P' gets target_new 'A' (FILE:line 3, id a)
    and 'B' (FILE:line 8, id b)``. Exact repeats of an edit are not conflicts."""
    by_prompt: dict[str, list[int]] = {}
    for i, record in enumerate(records):
        by_prompt.setdefault(record.prompt, []).append(i)
    notes = []
    for prompt, indices in by_prompt.items():
        if len({records[i].target_new for i in indices}) < 2:
            continue
        parts = []
        for i in indices:
            where = f"{locations[i]}, " if locations else ""
            parts.append(f"'{records[i].target_new}' ({where}id {records[i].id})")
        listed = ", ".join(parts[:-1]) + " and " + parts[-1]
        notes.append(f"conflicting edits: the same prompt '{prompt}' gets target_new {listed}")
    return notes


def length_stats(lengths: Sequence[int]) -> dict[str, float]:
    """min / median / mean / p95 (nearest rank) / max of a non-empty list of lengths."""
    ordered = sorted(lengths)
    p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]
    return {
        "min": ordered[0],
        "median": statistics.median(ordered),
        "mean": round(statistics.fmean(ordered), 2),
        "p95": p95,
        "max": ordered[-1],
    }


def histogram(lengths: Sequence[int], max_bins: int = 12) -> list[tuple[int, int, int]]:
    """Integer-aligned bins covering min..max.

    Args:
        lengths: non-empty list of lengths.
        max_bins: upper bound on the number of bins; each bin spans the same number of integers.
    Returns:
        ``[(low, high, count), ...]`` with inclusive bounds, in increasing order.
    """
    low, high = min(lengths), max(lengths)
    width = max(1, math.ceil((high - low + 1) / max_bins))
    counts = [0] * ((high - low) // width + 1)
    for n in lengths:
        counts[(n - low) // width] += 1
    return [(low + i * width, low + (i + 1) * width - 1, c) for i, c in enumerate(counts)]


def summarize(dataset: LoadedDataset, length_fn: LengthFn, unit: str) -> dict[str, Any]:
    """Everything ``flearn data check`` reports, as plain JSON-ready values.

    Args:
        dataset: a loaded dataset (at least one record).
        length_fn: length of ``prompt + " " + target``.
        unit: name of the length unit ("tokens" or "words").
    Returns:
        A dict with file facts (path, format, how it was read: ``reader``, ``split``, ``fields``, the
        ``unused_columns``), counts, coverage and length statistics; the histogram is over the
        edit prompt + new target (the sequences the learning stage trains on).
    """
    records = dataset.records
    new_lengths = [length_fn(r.prompt, r.target_new) for r in records]
    old_lengths = [length_fn(r.prompt, r.target_old) for r in records]
    return {
        "path": str(dataset.path),
        "format": dataset.format,
        "reader": dataset.reader,
        "split": dataset.split,
        "fields": dataset.fields,
        "unused_columns": list(dataset.unused_columns),
        "sha256": dataset.sha256,
        "n_raw": dataset.n_raw,
        "n_kept": len(records),
        "dropped": dict(dataset.dropped),
        "coverage": coverage(records),
        "totals": probe_totals(records),
        "lengths": {
            "unit": unit,
            "prompt+target_new": length_stats(new_lengths),
            "prompt+target_old": length_stats(old_lengths),
            "histogram": [{"low": lo, "high": hi, "count": c} for lo, hi, c in histogram(new_lengths)],
        },
    }
