"""``flearn generate``: see the change. Greedy continuations of prompts (given, or a dataset's edit and
rephrase prompts) from a model, beside those of the model before the update (``--reference``).

The continuations are evaluation's batched greedy decoding (``evaluation.scoring.greedy_generate``) of
prompts encoded as training and evaluation encode them (``data.encoding``), so an edit prompt continues
here exactly as in the Generation exact match of ``flearn update`` and ``flearn eval``. Registered by
``flearning.cli``; heavy imports (torch, transformers) happen inside the command.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from flearning.cli.data import DATA_HELP, FIELD_HELP, SPLIT_HELP, TEMPLATE_HELP, ZSRE_OLD_HELP
from flearning.data.templates import TEMPLATES
from flearning.errors import FlearnError

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from flearning.data import KnowledgeRecord

DEFAULT_MAX_NEW_TOKENS = 20
DEFAULT_GENERATE_BATCH_SIZE = 16


@dataclass(frozen=True)
class GeneratePrompt:
    """One prompt to continue; from ``--data``, the fact it belongs to."""

    prompt: str
    id: str | None = None  # the record's id
    kind: str | None = None  # "edit" (the record's prompt) or "rephrase"
    target_old: str | None = None
    target_new: str | None = None


def data_prompts(records: list[KnowledgeRecord], rephrase: bool = True) -> list[GeneratePrompt]:
    """Each record's edit prompt, then (``rephrase``) its rephrase prompts."""
    prompts = []
    for record in records:
        texts = [("edit", record.prompt)] + [("rephrase", p) for p in record.rephrase_prompts if rephrase]
        for kind, text in texts:
            prompts.append(GeneratePrompt(text, record.id, kind, record.target_old, record.target_new))
    return prompts


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, template: str = "plain") -> list[int]:
    """The prompt's tokens as training and evaluation see them before an answer (``encode_pair``, under
    the prompt ``template`` the model was updated with)."""
    from flearning.data.encoding import encode_pair

    pair = encode_pair(tokenizer, prompt, "", template=template)
    return pair.input_ids[: pair.prompt_len]


def continuations(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_new_tokens: int,
    *,
    batch_size: int = DEFAULT_GENERATE_BATCH_SIZE,
    progress: bool = False,
    template: str = "plain",
) -> list[str]:
    """The greedy continuation of each prompt under the prompt ``template`` (decoded new tokens, cut at
    EOS, special tokens skipped).

    Raises:
        FlearnError: a prompt has no tokens, or with ``max_new_tokens`` does not fit in the model's
            context (every such prompt named).
    """
    from flearning.data.context import context_limit
    from flearning.evaluation.probes import eos_token_id, pad_token_id
    from flearning.evaluation.scoring import greedy_generate

    ids = [prompt_ids(tokenizer, p, template) for p in prompts]
    limit = context_limit(model.config)
    problems = []
    for n, (text, tokens) in enumerate(zip(prompts, ids, strict=True), start=1):
        if not tokens:
            problems.append(f"prompt {n} ({text!r}) has no tokens")
        elif limit is not None and len(tokens) + max_new_tokens > limit[0]:
            problems.append(
                f"prompt {n} ({text[:40]!r}…): {len(tokens)} tokens + {max_new_tokens} new tokens, but the "
                f"model takes at most {limit[0]} ({limit[1]})"
            )
    if problems:
        raise FlearnError("cannot generate:\n  " + "\n  ".join(problems))
    new = greedy_generate(
        model,
        ids,
        [max_new_tokens] * len(ids),
        pad_id=pad_token_id(tokenizer),
        eos_id=eos_token_id(tokenizer),
        batch_size=batch_size,
        progress=progress,
    )
    return [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in new]


def _generated(
    spec: str,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int,
    progress: bool,
    trust: bool,
    template: str = "plain",
) -> list[str]:
    """Load one model, continue every prompt, and let the model go (the two models never share memory)."""
    from flearning.data.templates import check_template
    from flearning.models import load_model

    model, tokenizer = load_model(spec, trust_remote_code=trust)
    try:
        check_template(tokenizer, template)  # chat: this model's tokenizer has a chat template
        return continuations(
            model,
            tokenizer,
            prompts,
            max_new_tokens,
            batch_size=batch_size,
            progress=progress,
            template=template,
        )
    finally:
        del model


def _first_line(text: str) -> str:
    """The continuation up to its first line break that follows some text (a leading one is skipped)."""
    stripped = text.lstrip("\n")
    return text[: len(text) - len(stripped)] + stripped.split("\n", 1)[0]


def _table(items: list[dict[str, Any]], model: str, reference: str | None, max_new_tokens: int):
    from flearning.cli.tables import continuations_table

    from_data = any(item["id"] is not None for item in items)
    rows, ends = [], []
    for i, item in enumerate(items):
        row = {"prompt": item["prompt"]}
        if from_data:
            edit = item["kind"] == "edit"
            row["old answer"] = (item["target_old"] or "") if edit else ""
            row["new answer"] = (item["target_new"] or "") if edit else ""
        if reference is not None:
            row["before"] = item["reference_generated"].strip()
            row["after"] = item["generated"].strip()
        else:
            row["continuation"] = item["generated"].strip()
        rows.append(row)
        following = items[i + 1] if i + 1 < len(items) else None
        ends.append(from_data and following is not None and following["id"] != item["id"])
    return continuations_table(rows, title=None, ends=ends)


def _heading(model: str, reference: str | None, max_new_tokens: int) -> str:
    """The line above the table (not its title: a title wraps to the width of a narrow table)."""
    who = f"before: {reference}, after: {model}" if reference is not None else model
    return f"Greedy continuations ({max_new_tokens} new tokens at most), {who}"


def generate_command(
    prompts: list[str] | None = typer.Argument(
        None,
        help="Prompts to continue (the dataset's prompts with --data come after them).",
        show_default=False,
    ),
    model: str = typer.Option(
        ...,
        "--model",
        "-m",
        help="The model to continue the prompts with (e.g. an updated model's directory): a local "
        "directory, an embedded model name or a hub id.",
        show_default=False,
    ),
    reference: str | None = typer.Option(
        None,
        "--reference",
        "-r",
        help="The model before the update (e.g. smollm2-135m), continued beside --model: before | after.",
    ),
    data: Path | None = typer.Option(
        None,
        "--data",
        "-d",
        help=f"Take each record's edit prompt and rephrase prompts from this dataset, and show its old and "
        f"new answers: {DATA_HELP} (sample:NAME: a shipped sample).",
    ),
    fmt: str | None = typer.Option(None, "--format", "-f", help="Dataset format; detected when omitted."),
    field: list[str] | None = typer.Option(None, "--field", help=FIELD_HELP, show_default=False),
    split: str | None = typer.Option(None, "--split", help=SPLIT_HELP),
    limit: int | None = typer.Option(
        None, "--limit", "-n", min=1, help="The first N records of --data only."
    ),
    rephrase: bool = typer.Option(
        True,
        "--rephrase/--no-rephrase",
        help="With --data, the rephrase prompts too (not only edit prompts).",
    ),
    max_new_tokens: int = typer.Option(
        DEFAULT_MAX_NEW_TOKENS, "--max-new-tokens", "-t", min=1, help="New tokens per prompt at most."
    ),
    stop_at_newline: bool = typer.Option(
        False, "--stop-at-newline", help="Cut each continuation at its first line break (after some text)."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print JSON (prompts, continuations, the data's answers) instead of a table."
    ),
    batch_size: int = typer.Option(
        DEFAULT_GENERATE_BATCH_SIZE, "--batch-size", "-b", min=1, help="Prompts per generate call."
    ),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Run the model repository's own code (only for models you trust)."
    ),
    progress: bool = typer.Option(False, "--progress/--no-progress", help="Show a progress bar."),
    template: str = typer.Option(
        "plain", "--template", help=f"{TEMPLATE_HELP} Give the one the model was updated with."
    ),
    zsre_old: str | None = typer.Option(None, "--zsre-old", help=ZSRE_OLD_HELP, show_default=False),
) -> None:
    """Print the greedy continuations of prompts by a model, and by the model before the update.

    Example: flearn generate --model runs/demo --reference smollm2-135m --data data/samples/facts.jsonl --limit 5
    """
    from flearning.models import resolve_model

    # Everything that can be wrong with the input is refused before any weights are loaded.
    if template not in TEMPLATES:
        raise FlearnError(f"--template {template!r} is not one of {', '.join(TEMPLATES)}")
    items = [GeneratePrompt(p) for p in prompts or []]
    if limit is not None and data is None:
        raise FlearnError("--limit takes the first N records of --data; without --data there are none")
    if data is not None:
        from flearning.data import load_dataset
        from flearning.data.fields import parse_fields
        from flearning.resources import resolve_sample

        fields = parse_fields(field)
        records = load_dataset(
            resolve_sample(data), fmt, limit=limit, fields=fields, split=split, zsre_old=zsre_old
        ).records
        items += data_prompts(records, rephrase=rephrase)
    elif fmt is not None or field or split is not None:
        raise FlearnError(
            "--format, --field and --split describe --data; without --data there is nothing to read"
        )
    if not items:
        raise FlearnError(
            'no prompts: give them as arguments (flearn generate -m DIR "prompt") or --data FILE'
        )
    empty = [str(n) for n, item in enumerate(items, start=1) if not item.prompt.strip()]
    if empty:
        raise FlearnError(f"empty prompt (prompt {', '.join(empty)}): there is nothing to continue")
    resolve_model(model)  # a mistyped directory is refused here, before the reference is loaded
    if reference is not None:
        resolve_model(reference)

    texts = [item.prompt for item in items]
    args = (max_new_tokens, batch_size, progress, trust_remote_code, template)
    before = _generated(reference, texts, *args) if reference is not None else None
    after = _generated(model, texts, *args)
    if stop_at_newline:
        after = [_first_line(t) for t in after]
        before = [_first_line(t) for t in before] if before is not None else None
    results = []
    for i, item in enumerate(items):
        result = asdict(item)
        if before is not None:
            result["reference_generated"] = before[i]
        result["generated"] = after[i]
        results.append(result)

    if as_json:
        out = {"model": model, "reference": reference, "max_new_tokens": max_new_tokens, "results": results}
        typer.echo(json.dumps(out, indent=2, ensure_ascii=False))
        return
    from rich.console import Console

    console = Console()
    console.print(_heading(model, reference, max_new_tokens), soft_wrap=True, markup=False, highlight=False)
    console.print(_table(results, model, reference, max_new_tokens))
