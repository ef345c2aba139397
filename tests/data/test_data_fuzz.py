"""Fuzzing the loaders: whatever the file holds, only InputError escapes, and a successful load returns
records that obey every promise the loader makes (and survive a save/load round trip)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from data_helpers import (
    USER_COLUMNS,
    counterfact_record,
    jsonl_record,
    rome_record,
    user_record,
    write_parquet,
    zsre_record,
)
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from flearning.data import FORMATS, KnowledgeRecord, LoadedDataset, load_dataset, save_jsonl
from flearning.data.formats import JSONL_FIELDS
from flearning.errors import InputError

BUILDERS = {
    "zsre": zsre_record,
    "counterfact": counterfact_record,
    "counterfact-rome": rome_record,
    "jsonl": jsonl_record,
}

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats()  # NaN and infinities too: Python's json writes and reads them
    | st.text(max_size=12)
    | st.sampled_from(["", " ", "  x  ", "{}", "é\u2028ü", "\t", "lone \udc80 surrogate"])
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def mutated(draw: st.DrawFn, value: Any, depth: int = 0) -> Any:
    """``value`` with random keys dropped, values replaced by random JSON or unicode text, and
    nested objects/lists mutated the same way."""
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            action = draw(st.sampled_from(["keep"] * 6 + ["recurse", "drop", "json", "text"]))
            if action == "drop":
                continue
            if action == "json":
                out[key] = draw(json_values)
            elif action == "text":
                out[key] = draw(st.text(max_size=15))
            elif action == "recurse" and depth < 3:
                out[key] = draw(mutated(item, depth + 1))
            else:
                out[key] = item
        if draw(st.integers(0, 9)) == 0:
            out[draw(st.text(max_size=8))] = draw(json_values)  # an unexpected extra field
        return out
    if isinstance(value, list):
        items = [draw(mutated(item, depth + 1)) if depth < 3 else item for item in value]
        if items and draw(st.booleans()):
            items.pop(draw(st.integers(0, len(items) - 1)))
        return items
    return value


@st.composite
def record_lists(draw: st.DrawFn, formats: tuple[str, ...] = FORMATS) -> tuple[str, list[Any]]:
    """A format and a list of its records, some of them mutated."""
    fmt = draw(st.sampled_from(formats))
    builder = BUILDERS[fmt]
    # ids drawn from a range small enough that duplicate ids happen now and then
    records = [builder(draw(st.integers(0, 40))) for _ in range(draw(st.integers(1, 5)))]
    # about one record in three is mutated, so that whole files still load often enough to check them
    records = [draw(mutated(r)) if draw(st.integers(0, 2)) == 0 else r for r in records]
    return fmt, records


@st.composite
def documents(draw: st.DrawFn) -> tuple[str, bytes, str | None]:
    """``(file suffix, file bytes, explicit format or None)``."""
    kind = draw(st.sampled_from(["random", "list", "list", "lines", "lines", "corrupt"]))
    explicit = draw(st.sampled_from(FORMATS)) if draw(st.integers(0, 5)) == 0 else None
    if kind == "random":
        text = json.dumps(draw(json_values), ensure_ascii=draw(st.booleans()))
        return draw(st.sampled_from([".json", ".jsonl"])), text.encode("utf-8", "surrogatepass"), explicit
    # mostly the matching layout (JSON lists for the public formats, lines for ours), sometimes not
    if draw(st.integers(0, 4)) == 0:
        fmt, records = draw(record_lists())
    elif kind == "lines":
        fmt, records = draw(record_lists(("jsonl",)))
    else:
        fmt, records = draw(record_lists(("zsre", "counterfact", "counterfact-rome")))
    if kind == "list" or (kind == "corrupt" and draw(st.booleans())):
        text = json.dumps(records, ensure_ascii=draw(st.booleans()), indent=draw(st.none() | st.just(2)))
        suffix = ".json"
    else:
        lines = [json.dumps(r, ensure_ascii=False) for r in records]
        if draw(st.booleans()):
            junk = draw(st.sampled_from(["", "   ", "\r", "", "[1]", "{", "null"]))
            lines.insert(draw(st.integers(0, len(lines))), junk)
        text = "\n".join(lines) + "\n"
        suffix = ".jsonl"
    if kind == "corrupt":
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.text(max_size=3)) + text[cut + draw(st.integers(0, 3)) :]
    data = text.encode("utf-8", errors="surrogatepass")
    if explicit is None and draw(st.integers(0, 3)) == 0:
        explicit = fmt
    return suffix, data, explicit


def check_loaded(ds: LoadedDataset) -> None:
    """Every promise a successful load makes."""
    assert ds.format in FORMATS
    assert ds.records
    assert len(ds.records) + ds.n_dropped == ds.n_raw
    assert all(n > 0 for n in ds.dropped.values())
    ids = [r.id for r in ds.records]
    assert len(set(ids)) == len(ids)
    for r in ds.records:
        assert isinstance(r, KnowledgeRecord)
        for text in (r.id, r.prompt, r.target_old, r.target_new):
            assert text and text == text.strip()
        assert r.target_old != r.target_new
        assert all(p and p == p.strip() for p in r.rephrase_prompts)
        for probe in (*r.locality, *r.portability):
            assert probe.prompt and probe.answer
        assert r.subject is None or r.subject


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


# The autouse cache fixture of conftest only sets environment variables: sharing it across examples is fine.
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=documents())
def test_only_input_errors_escape(fuzz_dir, doc):
    suffix, data, fmt = doc
    path = fuzz_dir / f"doc{suffix}"
    path.write_bytes(data)
    try:
        ds = load_dataset(path, fmt)
    except InputError as err:
        event("InputError")
        assert str(err).startswith("invalid dataset: ")
        assert all(str(p).startswith(str(path)) for p in err.problems)
        return
    event(f"loaded {ds.format}")
    check_loaded(ds)
    # whatever was loaded can be written and read back unchanged
    again = load_dataset(save_jsonl(ds.records, fuzz_dir / "roundtrip.jsonl"))
    assert again.records == ds.records


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fmt_records=record_lists(), limit=st.integers(1, 6))
def test_limit_never_exceeded(fuzz_dir, fmt_records, limit):
    fmt, records = fmt_records
    path = fuzz_dir / "limit.json"
    if fmt == "jsonl":
        path = fuzz_dir / "limit.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    try:
        full = load_dataset(path, fmt)
    except InputError:
        return
    limited = load_dataset(path, fmt, limit=limit)
    assert limited.records == full.records[:limit]
    assert limited.dropped == full.dropped


# field mappings as a user may write them: right, partly right, misspelt fields and columns, blanks
mappings = st.one_of(
    st.just(USER_COLUMNS),
    st.dictionaries(
        st.sampled_from([*JSONL_FIELDS, "promt", ""]),
        st.sampled_from([*USER_COLUMNS.values(), "nope", "", "prompt"]),
        max_size=8,
    ),
)


def _only_input_errors(path: Path, **kwargs: Any) -> LoadedDataset | None:
    try:
        ds = load_dataset(path, **kwargs)
    except InputError as err:
        event("InputError")
        assert str(err).startswith("invalid dataset: ")
        assert all(str(p).startswith(str(path)) for p in err.problems)
        return None
    event(f"loaded {ds.format}")
    check_loaded(ds)
    return ds


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(mutated(user_record(jsonl_record(0), topic="x")), min_size=1, max_size=4),
    fields=mappings,
)
def test_mapped_json_lines_raise_only_input_errors(fuzz_dir, rows, fields):
    path = fuzz_dir / "mapped.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), errors="surrogatepass")
    _only_input_errors(path, fields=fields)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(mutated(user_record(jsonl_record(0))), min_size=1, max_size=3),
    fields=mappings,
)
def test_mapped_parquet_raises_only_input_errors(fuzz_dir, rows, fields):
    """Random rows that Arrow can store (one type per column) read through datasets."""
    path = fuzz_dir / "mapped.parquet"
    try:
        write_parquet(path, rows)
    except Exception:  # mixed types in a column, text Arrow cannot encode: not a Parquet file to test
        assume(False)
    _only_input_errors(path, fields=fields)
