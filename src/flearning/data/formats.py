"""Per-format record parsers: one raw JSON value in, one ``Candidate`` (or problems) out.

Each parser checks the fields its format defines and collects a ``Problem`` for every missing or
mistyped one, so a user fixes a file in one pass. Parsers never apply the drop rules: ``loading`` does,
so the rules and their counts live in one place. Shared conventions: text is stripped; optional text
that is absent, ``null`` or blank counts as absent; a record's id is its ``id``/``case_id``, else its
0-based position among the file's records.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from flearning.data.records import PromptAnswer
from flearning.errors import Problem

FORMATS: tuple[str, ...] = ("zsre", "counterfact", "counterfact-rome", "jsonl")
# Where a ZsRE record's old answer is read from: ``pred`` (the answer the MEND/EasyEdit files record as the
# base model's prediction; the F-Learning paper's choice) or ``answers`` (``answers[0]``, the gold answer).
ZsreOld = Literal["pred", "answers"]
ZSRE_OLD: tuple[str, ...] = get_args(ZsreOld)

# The fields of the project's own JSON Lines format (see ``parse_jsonl``); anything else is a typo.
JSONL_FIELDS: tuple[str, ...] = (
    "id",
    "prompt",
    "target_old",
    "target_new",
    "subject",
    "rephrase_prompts",
    "locality",
    "portability",
)


@dataclass
class RecordContext:
    """Where a record came from, and the problems found in it so far."""

    source: str
    index: int  # 0-based record index (JSON list) or 1-based line number (JSON Lines)
    kind: str = "record"
    problems: list[Problem] = field(default_factory=list)
    # which targets the file must hold: "both", or one of a split pair of files ("old": target_old only,
    # "new": target_new only; the other target may be absent)
    part: str = "both"
    # the field a ZsRE record's old answer comes from (``ZSRE_OLD``; other formats ignore it)
    zsre_old: str = "answers"

    def add(self, path: str | None, message: str) -> None:
        """Record one problem at ``path`` (a dotted field path, or None for the whole record)."""
        self.problems.append(Problem(self.source, self.index, path, message, kind=self.kind))


@dataclass(frozen=True)
class Candidate:
    """A record as read from a file, before the drop rules: targets may still be empty or equal."""

    id: str | None  # None: the loader uses the record's position
    id_field: str | None  # the source field the id came from (for duplicate-id messages)
    prompt: str
    target_old: str
    target_new: str
    old_field: str  # source field names, so strict-mode messages point at the right place
    new_field: str
    subject: str | None = None
    rephrase_prompts: tuple[str, ...] = ()
    locality: tuple[PromptAnswer, ...] = ()
    portability: tuple[PromptAnswer, ...] = ()


# --------------------------------------------------------------------------------------------------
# Typed field readers. Each returns the value or None, adding a problem to ``ctx`` when it is wrong.


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type, with an article, for messages ("a string", "null")."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__  # pragma: no cover - json.loads yields only the types above


def join_path(prefix: str, key: str | int) -> str:
    """``a.b`` for keys and ``a[3]`` for list indices."""
    if isinstance(key, int):
        return f"{prefix}[{key}]"
    return f"{prefix}.{key}" if prefix else key


def _clean_text(ctx: RecordContext, value: Any, path: str, *, allow_empty: bool) -> str | None:
    """Check that ``value`` is a usable string and return it stripped.

    JSON ``\\ud800``-style escapes can produce unpaired surrogates, which Python keeps but no tokenizer
    or UTF-8 writer accepts, so they are rejected here rather than crashing later.
    """
    if not isinstance(value, str):
        ctx.add(path, f"expected a string, got {json_type(value)}")
        return None
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        ctx.add(path, "contains an unpaired surrogate (an invalid \\u escape)")
        return None
    text = value.strip()
    if not text and not allow_empty:
        ctx.add(path, "must not be empty")
        return None
    return text


def required_text(
    ctx: RecordContext, obj: Mapping[str, Any], key: str, *, prefix: str = "", allow_empty: bool = False
) -> str | None:
    """A required string field, stripped.

    Args:
        ctx: collects problems.
        obj: the JSON object holding the field.
        key: field name.
        prefix: path of ``obj`` inside the record, for messages.
        allow_empty: accept an empty string (targets: empty ones are dropped later, with a count).
    Returns:
        The stripped text, or None if the field is missing or wrong.
    """
    path = join_path(prefix, key)
    if key not in obj:
        ctx.add(path, "missing")
        return None
    return _clean_text(ctx, obj[key], path, allow_empty=allow_empty)


def target_text(ctx: RecordContext, obj: Mapping[str, Any], key: str, side: str) -> str | None:
    """A target field (``side``: "old" or "new"): required, empty allowed (dropped later with a count);
    in the other file of a split pair it may be absent ("" then)."""
    if key not in obj and ctx.part not in ("both", side):
        return ""
    return required_text(ctx, obj, key, allow_empty=True)


def optional_text(ctx: RecordContext, obj: Mapping[str, Any], key: str, *, prefix: str = "") -> str | None:
    """An optional string field: absent, null or blank gives None; a non-string is a problem."""
    value = obj.get(key)
    if value is None:
        return None
    return _clean_text(ctx, value, join_path(prefix, key), allow_empty=True) or None


def text_list(
    ctx: RecordContext, obj: Mapping[str, Any], key: str, *, single_ok: bool, prefix: str = ""
) -> list[str]:
    """An optional list of strings (blank entries skipped).

    Args:
        ctx: collects problems.
        obj: the JSON object holding the field.
        key: field name.
        single_ok: also accept one bare string (EasyEdit files use both shapes for rephrases).
        prefix: path of ``obj`` inside the record.
    Returns:
        The non-blank stripped strings, in order.
    """
    value = obj.get(key)
    path = join_path(prefix, key)
    if value is None:
        return []
    if isinstance(value, str) and single_ok:
        text = _clean_text(ctx, value, path, allow_empty=True)
        return [text] if text else []
    if not isinstance(value, list):
        expected = "a string or a list of strings" if single_ok else "a list of strings"
        ctx.add(path, f"expected {expected}, got {json_type(value)}")
        return []
    out = []
    for i, item in enumerate(value):
        text = _clean_text(ctx, item, join_path(path, i), allow_empty=True)
        if text:
            out.append(text)
    return out


def required_object(
    ctx: RecordContext, obj: Mapping[str, Any], key: str, *, prefix: str = ""
) -> dict[str, Any] | None:
    """A required nested JSON object."""
    path = join_path(prefix, key)
    if key not in obj:
        ctx.add(path, "missing")
        return None
    value = obj[key]
    if not isinstance(value, dict):
        ctx.add(path, f"expected an object, got {json_type(value)}")
        return None
    return value


def optional_id(
    ctx: RecordContext, obj: Mapping[str, Any], keys: tuple[str, ...]
) -> tuple[str | None, str | None]:
    """The record's own id from the first of ``keys`` present (a string or an integer).

    Returns:
        ``(id, field name)``, or ``(None, None)`` when the record has no id.
    """
    for key in keys:
        value = obj.get(key)
        if value is None:
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value), key
        if isinstance(value, str):
            text = _clean_text(ctx, value, key, allow_empty=False)
            return text, key
        ctx.add(key, f"expected a string or an integer, got {json_type(value)}")
        return None, key
    return None, None


# --------------------------------------------------------------------------------------------------
# Probes (locality / portability) in the shapes EasyEdit-derived files use.

_PROMPT_KEYS = ("New Question", "prompt")
_ANSWER_KEYS = ("New Answer", "answer", "ground_truth", "target")


def _answer_text(ctx: RecordContext, value: Any, path: str) -> str | None:
    """An answer that may be a string, a list of strings, or a list of lists of strings (KnowEdit
    stores alias lists): the first one is the answer scored."""
    for _ in range(2):  # unwrap at most two list levels
        if not isinstance(value, list):
            break
        if not value:
            return None
        value, path = value[0], join_path(path, 0)
    if isinstance(value, list):
        ctx.add(path, f"expected a string or a list of strings, got {json_type(value)}")
        return None
    return _clean_text(ctx, value, path, allow_empty=True) or None


def _probe(ctx: RecordContext, obj: Any, path: str, category: str | None = None) -> list[PromptAnswer]:
    """One ``{New Question, New Answer}`` or ``{prompt, answer|ground_truth|target}`` object (of
    ``category``, when the file groups its probes)."""
    if not isinstance(obj, dict):
        ctx.add(path, f"expected a {{prompt, answer}} object, got {json_type(obj)}")
        return []
    prompt_key = next((k for k in _PROMPT_KEYS if k in obj), None)
    answer_key = next((k for k in _ANSWER_KEYS if k in obj), None)
    if prompt_key is None:
        ctx.add(path, "missing the prompt ('prompt' or 'New Question')")
        return []
    if answer_key is None:
        ctx.add(path, "missing the answer ('answer', 'ground_truth' or 'New Answer')")
        return []
    prompt = optional_text(ctx, obj, prompt_key, prefix=path)
    answer = _answer_text(ctx, obj[answer_key], join_path(path, answer_key))
    if not prompt or not answer:
        return []  # a blank probe cannot be scored; treat it as absent
    return [PromptAnswer(prompt=prompt, answer=answer, category=category)]


def _is_probe(obj: Mapping[str, Any]) -> bool:
    return any(k in obj for k in _PROMPT_KEYS)


def probes(ctx: RecordContext, value: Any, path: str) -> list[PromptAnswer]:
    """Locality or portability probes of an EasyEdit-style record.

    Accepted shapes: null; one probe object; a list of probe objects; or an object mapping category
    names to a probe object or a list of them (KnowEdit: ``{"Reasoning": [...], ...}``; each probe keeps
    its category's name). A probe object is ``{"New Question", "New Answer"}`` or ``{"prompt",
    "answer"|"ground_truth"|"target"}``.

    Args:
        ctx: collects problems.
        value: the decoded field value.
        path: the field's path, for messages.
    Returns:
        The probes in file order; blank ones are skipped.
    """
    if value is None:
        return []
    if isinstance(value, dict) and _is_probe(value):
        return _probe(ctx, value, path)
    if isinstance(value, list):
        return [p for i, item in enumerate(value) for p in _probe(ctx, item, join_path(path, i))]
    if isinstance(value, dict):
        out: list[PromptAnswer] = []
        for name, group in value.items():
            sub = join_path(path, name)
            if isinstance(group, list):
                out += [
                    p for i, item in enumerate(group) for p in _probe(ctx, item, join_path(sub, i), str(name))
                ]
            else:
                out += _probe(ctx, group, sub, str(name))
        return out
    ctx.add(
        path, f"expected a probe object, a list of them or an object of such lists, got {json_type(value)}"
    )
    return []


def _paired(
    ctx: RecordContext, obj: Mapping[str, Any], prompt_key: str, answer_key: str
) -> list[PromptAnswer]:
    """Locality given as two sibling fields (ZsRE ``loc``/``loc_ans``, CounterFact
    ``locality_prompt``/``locality_ground_truth``); each may be a string or a list of strings.
    One answer may serve several prompts; otherwise the lists must have equal lengths."""
    prompts = text_list(ctx, obj, prompt_key, single_ok=True)
    answers = text_list(ctx, obj, answer_key, single_ok=True)
    if not prompts and not answers:
        return []
    if not answers:
        ctx.add(answer_key, f"missing, but {prompt_key} is given")
        return []
    if not prompts:
        ctx.add(prompt_key, f"missing, but {answer_key} is given")
        return []
    if len(answers) == 1:
        answers = answers * len(prompts)
    if len(answers) != len(prompts):
        ctx.add(answer_key, f"has {len(answers)} answers for {len(prompts)} prompts in {prompt_key}")
        return []
    return [PromptAnswer(prompt=p, answer=a) for p, a in zip(prompts, answers, strict=True)]


# --------------------------------------------------------------------------------------------------
# The formats.


def _finish(ctx: RecordContext, n_before: int, **fields: Any) -> Candidate | None:
    """A candidate only if this record added no problem (a half-valid record is never kept)."""
    if len(ctx.problems) > n_before:
        return None
    return Candidate(**fields)


def _zsre_old(ctx: RecordContext, rec: Mapping[str, Any]) -> str | None:
    """The old answer of a ZsRE record from the field ``ctx.zsre_old`` names: ``pred`` (a string) or
    ``answers`` (a list of strings, its first one; one string is accepted too). An empty answer is kept
    as "" (dropped later with a count, like an empty ``alt``)."""
    key = ctx.zsre_old
    if key not in rec:
        other = next(k for k in ZSRE_OLD if k != key)
        ctx.add(
            key,
            f"missing (the old answer is read from {key}: zsre_old {key}; zsre_old {other} reads {other})",
        )
        return None
    value = rec[key]
    if isinstance(value, list):
        return _clean_text(ctx, value[0], f"{key}[0]", allow_empty=True) if value else ""
    if isinstance(value, str):
        return _clean_text(ctx, value, key, allow_empty=True)
    expected = "a list of strings" if key == "answers" else "a string"
    ctx.add(key, f"expected {expected}, got {json_type(value)}")
    return None


def parse_zsre(ctx: RecordContext, rec: Mapping[str, Any]) -> Candidate | None:
    """MEND/EasyEdit ZsRE: ``src`` → ``pred`` or ``answers[0]`` (old, ``ctx.zsre_old``) / ``alt`` (new).

    Also reads ``rephrase`` (string or list), ``loc``/``loc_ans``, ``subject``, ``portability``, a
    KnowEdit-style ``locality`` (probes, or categories of them) and an optional ``id``/``case_id``;
    ``cond`` and the old-answer field not chosen are ignored.
    """
    n = len(ctx.problems)
    prompt = required_text(ctx, rec, "src")
    old = _zsre_old(ctx, rec)
    new = required_text(ctx, rec, "alt", allow_empty=True)
    rid, id_field = optional_id(ctx, rec, ("id", "case_id"))
    return _finish(
        ctx,
        n,
        id=rid,
        id_field=id_field,
        prompt=prompt,
        target_old=old,
        target_new=new,
        old_field=ctx.zsre_old,
        new_field="alt",
        subject=optional_text(ctx, rec, "subject"),
        rephrase_prompts=tuple(text_list(ctx, rec, "rephrase", single_ok=True)),
        locality=(*_paired(ctx, rec, "loc", "loc_ans"), *probes(ctx, rec.get("locality"), "locality")),
        portability=tuple(probes(ctx, rec.get("portability"), "portability")),
    )


def parse_counterfact(ctx: RecordContext, rec: Mapping[str, Any]) -> Candidate | None:
    """EasyEdit CounterFact: ``prompt`` → ``ground_truth`` (old) / ``target_new`` (new).

    Also reads ``subject``, ``rephrase_prompt`` (string or list), ``locality_prompt`` /
    ``locality_ground_truth``, a KnowEdit-style ``locality`` (probes, or categories of them),
    ``portability`` and ``case_id`` (or ``id``).
    """
    n = len(ctx.problems)
    prompt = required_text(ctx, rec, "prompt")
    old = required_text(ctx, rec, "ground_truth", allow_empty=True)
    new = required_text(ctx, rec, "target_new", allow_empty=True)
    rid, id_field = optional_id(ctx, rec, ("case_id", "id"))
    return _finish(
        ctx,
        n,
        id=rid,
        id_field=id_field,
        prompt=prompt,
        target_old=old,
        target_new=new,
        old_field="ground_truth",
        new_field="target_new",
        subject=optional_text(ctx, rec, "subject"),
        rephrase_prompts=tuple(text_list(ctx, rec, "rephrase_prompt", single_ok=True)),
        locality=(
            *_paired(ctx, rec, "locality_prompt", "locality_ground_truth"),
            *probes(ctx, rec.get("locality"), "locality"),
        ),
        portability=tuple(probes(ctx, rec.get("portability"), "portability")),
    )


def parse_counterfact_rome(ctx: RecordContext, rec: Mapping[str, Any]) -> Candidate | None:
    """ROME CounterFact: ``requested_rewrite.prompt`` is a template with ``{}`` where the subject goes.

    old = ``target_true.str``, new = ``target_new.str``; ``paraphrase_prompts`` become rephrases and
    each ``neighborhood_prompts`` entry becomes a locality probe whose answer is the true target (its
    subject shares the true object). ``generation_prompts`` and ``attribute_prompts`` are not used.
    """
    n = len(ctx.problems)
    rw_path = "requested_rewrite"
    rewrite = required_object(ctx, rec, rw_path)
    prompt = old = new = subject = None
    if rewrite is not None:
        template = required_text(ctx, rewrite, "prompt", prefix=rw_path)
        subject = required_text(ctx, rewrite, "subject", prefix=rw_path)
        if template is not None and template.count("{}") != 1:
            ctx.add(
                f"{rw_path}.prompt",
                f"must contain '{{}}' exactly once, where the subject goes (found {template.count('{}')})",
            )
        elif template is not None and subject is not None:
            # str.replace, not str.format: other braces in the text must not be interpreted.
            prompt = template.replace("{}", subject).strip()
        true_obj = required_object(ctx, rewrite, "target_true", prefix=rw_path)
        new_obj = required_object(ctx, rewrite, "target_new", prefix=rw_path)
        if true_obj is not None:
            old = required_text(ctx, true_obj, "str", prefix=f"{rw_path}.target_true", allow_empty=True)
        if new_obj is not None:
            new = required_text(ctx, new_obj, "str", prefix=f"{rw_path}.target_new", allow_empty=True)
    neighbours = text_list(ctx, rec, "neighborhood_prompts", single_ok=False)
    rid, id_field = optional_id(ctx, rec, ("case_id", "id"))
    return _finish(
        ctx,
        n,
        id=rid,
        id_field=id_field,
        prompt=prompt,
        target_old=old,
        target_new=new,
        old_field=f"{rw_path}.target_true.str",
        new_field=f"{rw_path}.target_new.str",
        subject=subject,
        rephrase_prompts=tuple(text_list(ctx, rec, "paraphrase_prompts", single_ok=False)),
        locality=tuple(PromptAnswer(prompt=p, answer=old) for p in neighbours if old),
        portability=tuple(probes(ctx, rec.get("portability"), "portability")),
    )


def _jsonl_probes(ctx: RecordContext, rec: Mapping[str, Any], key: str) -> list[PromptAnswer]:
    """``[{"prompt": ..., "answer": ...}, ...]`` exactly (each may name its ``category``): the project's
    own format is not lenient."""
    value = rec.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        ctx.add(key, f"expected a list of {{prompt, answer}} objects, got {json_type(value)}")
        return []
    out = []
    for i, item in enumerate(value):
        path = join_path(key, i)
        if not isinstance(item, dict):
            ctx.add(path, f"expected a {{prompt, answer}} object, got {json_type(item)}")
            continue
        for extra in sorted(set(item) - {"prompt", "answer", "category"}):
            ctx.add(join_path(path, extra), "unknown field (expected prompt, answer and optionally category)")
        prompt = required_text(ctx, item, "prompt", prefix=path)
        answer = required_text(ctx, item, "answer", prefix=path)
        category = optional_text(ctx, item, "category", prefix=path)
        if prompt and answer:
            out.append(PromptAnswer(prompt=prompt, answer=answer, category=category))
    return out


def parse_jsonl(ctx: RecordContext, rec: Mapping[str, Any]) -> Candidate | None:
    """The project's own format, one object per line (documented in ``flearning.data.loading``).

    Unknown fields are problems: a misspelt ``rephrase_prompt`` would otherwise silently lose the
    generality test. In a split pair of files (``ctx.part``) the other side's target may be absent.
    """
    n = len(ctx.problems)
    for extra in sorted(set(rec) - set(JSONL_FIELDS)):
        ctx.add(extra, f"unknown field (known: {', '.join(JSONL_FIELDS)})")
    prompt = required_text(ctx, rec, "prompt")
    old = target_text(ctx, rec, "target_old", "old")
    new = target_text(ctx, rec, "target_new", "new")
    rid, id_field = optional_id(ctx, rec, ("id",))
    return _finish(
        ctx,
        n,
        id=rid,
        id_field=id_field,
        prompt=prompt,
        target_old=old,
        target_new=new,
        old_field="target_old",
        new_field="target_new",
        subject=optional_text(ctx, rec, "subject"),
        rephrase_prompts=tuple(text_list(ctx, rec, "rephrase_prompts", single_ok=False)),
        locality=tuple(_jsonl_probes(ctx, rec, "locality")),
        portability=tuple(_jsonl_probes(ctx, rec, "portability")),
    )


PARSERS: dict[str, Callable[[RecordContext, Mapping[str, Any]], Candidate | None]] = {
    "zsre": parse_zsre,
    "counterfact": parse_counterfact,
    "counterfact-rome": parse_counterfact_rome,
    "jsonl": parse_jsonl,
}


def detect_record_format(rec: Mapping[str, Any]) -> str | None:
    """Name the format a JSON-list record belongs to from its fields, or None if none fits."""
    # One telling field is enough: a record that has ``src`` but lacks ``alt`` is better reported as a
    # ZsRE record with a missing field than as a file of unknown format.
    if "requested_rewrite" in rec:
        return "counterfact-rome"
    if any(k in rec for k in ("src", "alt", "answers", "loc_ans")):
        return "zsre"
    if "target_old" in rec:  # the project's own records, but in a JSON list: see the loader's hint
        return None
    if any(k in rec for k in ("ground_truth", "target_new", "locality_ground_truth", "rephrase_prompt")):
        return "counterfact"
    return None
