"""Writing records in the project's JSONL format, and a content hash of records for caches.

``save_jsonl`` writes a dataset atomically, UTF-8, one record per line with empty optional fields left
out (the format ``load_records`` reads). ``records_hash`` keys the caches that depend on what the
records say (the bench's stages), not on how their file was formatted.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flearning.data.records import KnowledgeRecord
from flearning.io.atomic import atomic_write

_HASH_SCHEME = b"flearning.records/v1\n"  # bump when the record fields change meaning


def record_to_json(record: KnowledgeRecord) -> dict[str, Any]:
    """One record as a ``jsonl``-format object; empty optional fields are left out."""
    obj: dict[str, Any] = {
        "id": record.id,
        "prompt": record.prompt,
        "target_old": record.target_old,
        "target_new": record.target_new,
    }
    if record.subject is not None:
        obj["subject"] = record.subject
    if record.rephrase_prompts:
        obj["rephrase_prompts"] = list(record.rephrase_prompts)
    for key in ("locality", "portability"):
        probes = getattr(record, key)
        if probes:
            obj[key] = [p.model_dump(mode="json") for p in probes]  # category only when there is one
    return obj


def save_jsonl(records: Iterable[KnowledgeRecord], path: str | os.PathLike[str]) -> Path:
    """Write records as JSON Lines, atomically (``io.atomic.atomic_write``).

    Everything is serialised first, then written to a temporary file in the target's directory and
    renamed over the target, so a reader sees the old file or the complete new one, never a part. The
    file gets the permissions of a plain new file (a dataset is meant to be shared).

    Args:
        records: the records, written in order.
        path: the output file; parent directories are created.
    Returns:
        The path written.
    """
    path = Path(path)
    lines = [json.dumps(record_to_json(r), ensure_ascii=False) + "\n" for r in records]

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
            fh.writelines(lines)

    atomic_write(path, write)
    return path


def records_hash(records: Iterable[KnowledgeRecord]) -> str:
    """A stable sha256 of the records' content and order (for cache keys).

    Each record is serialised as canonical JSON (sorted keys, ASCII, no spaces), so the hash does not
    depend on the source file's formatting or format, only on what the records say.

    Args:
        records: the records, in order.
    Returns:
        64 hex digits.
    """
    h = hashlib.sha256(_HASH_SCHEME)
    for record in records:
        canonical = json.dumps(
            record.model_dump(mode="json"), sort_keys=True, ensure_ascii=True, separators=(",", ":")
        )
        h.update(canonical.encode("ascii"))
        h.update(b"\n")
    return h.hexdigest()
