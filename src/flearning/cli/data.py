"""``flearn data``: validate and summarise knowledge datasets.

Heavy libraries (transformers, rich rendering) are imported inside the command so ``flearn --help``
stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from flearning.data.formats import FORMATS, JSONL_FIELDS
from flearning.data.summary import LengthFn

# The data options flearn update, eval and bench share with data check (the rules: data/README.md).
DATA_HELP = (
    "a JSON list or .jsonl file, a .parquet or .csv file, a directory written by datasets' save_to_disk, or "
    "a hub dataset (hf:owner/name) from your Hugging Face cache"
)
FIELD_HELP = (
    "Read your own column names as the project's fields: FIELD=COLUMN, repeatable or comma-separated "
    f"(e.g. prompt=question,target_new=answer); fields: {', '.join(JSONL_FIELDS)}."
)
SPLIT_HELP = "The split of a DatasetDict directory or a hub dataset (default: its only split)."
ZSRE_OLD_HELP = (
    "Where a ZsRE file's old answers come from: pred (the base model's prediction the file records; the "
    "F-Learning paper's choice) or answers (answers[0], the gold answer). Default: pred when every record "
    "has one, else answers. Other formats ignore it."
)
TEMPLATE_HELP = (
    "Prompt template of training and evaluation alike: plain (prompt + ' ' + answer), alpaca (the Stanford "
    "Alpaca instruction format, the paper's) or chat (the tokenizer's own chat template, for instruct models)."
)

data_app = typer.Typer(
    help="Validate and summarise knowledge datasets.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

NO_MODEL = "none"
_BAR_WIDTH = 40


@data_app.callback()
def _data() -> None:
    """Validate and summarise knowledge datasets."""
    # A callback keeps ``data`` a command group even while it has a single command, so the command
    # line is ``flearn data check FILE`` in every context (including tests that call data_app).


def length_function(model: str | None, tokenizer: Any = None) -> tuple[LengthFn, str, str | None]:
    """How sequence lengths are measured for ``--model``.

    Args:
        model: ``none`` (word counts), None (the embedded default model), a local directory or a hub id.
        tokenizer: the model's tokenizer when already loaded (``model_tokenizer``).
    Returns:
        ``(length function, unit, model label)``. Only the tokenizer is loaded, never the weights.
    Raises:
        FlearnError: the model cannot be found or its tokenizer cannot be loaded.
    """
    from flearning.data.summary import word_count

    if model is not None and model.strip().lower() == NO_MODEL:
        return word_count, "words", None

    from flearning.data.encoding import encode_pair
    from flearning.models import DEFAULT_MODEL

    if tokenizer is None:
        tokenizer, _ = model_tokenizer(model)

    def n_tokens(prompt: str, target: str) -> int:
        # encode_pair is what training and scoring use, so these are the lengths they will see.
        return len(encode_pair(tokenizer, prompt, target).input_ids)

    return n_tokens, "tokens", model or DEFAULT_MODEL


def model_tokenizer(model: str | None) -> tuple[Any, tuple[int, str] | None]:
    """The tokenizer of ``model`` and its context limit (``data.context.context_limit`` of its config;
    None when the config states none or cannot be read). The weights are never loaded.

    Raises:
        FlearnError: the model cannot be found or its tokenizer cannot be loaded.
    """
    from transformers import AutoConfig, AutoTokenizer

    from flearning.data.context import context_limit
    from flearning.errors import FlearnError
    from flearning.models import DEFAULT_MODEL, resolve_model

    source = resolve_model(model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as ex:
        raise FlearnError(f"cannot load the tokenizer of '{model or DEFAULT_MODEL}': {ex}") from ex
    try:
        limit = context_limit(AutoConfig.from_pretrained(source))
    except (OSError, ValueError):  # a tokenizer-only directory: lengths, but no limit to check
        limit = None
    return tokenizer, limit


def input_notes(
    dataset: Any, tokenizer: Any, limit: tuple[int, str] | None
) -> tuple[dict[str, Any], list[str]]:
    """What ``data check`` warns about, as JSON and as lines: records longer than the model's context
    (``data.context``, the rule ``update`` and ``eval`` apply) and conflicting edits."""
    from flearning.data.context import TRUNCATE_HINT, find_too_long
    from flearning.data.summary import conflicting_edits

    notes = [f"note: {line}" for line in conflicting_edits(dataset.records, dataset.locations)]
    context: dict[str, Any] | None = None
    if tokenizer is not None and limit is not None:
        positions, name = limit
        too_long = find_too_long(dataset.records, tokenizer, positions, dataset.locations)
        context = {"limit": positions, "too_long": [t.to_json() for t in too_long]}
        notes += [
            f"warning: {t.where}:{t.field}: {t.message(positions, name)}; flearn update and eval refuse it "
            f"({TRUNCATE_HINT})"
            for t in too_long
        ]
    return {"context": context, "conflicts": conflicting_edits(dataset.records, dataset.locations)}, notes


def _percent(n: int, total: int) -> str:
    return f"{n}/{total} ({100 * n / total:.0f}%)" if total else "0/0"


def render_summary(summary: dict[str, Any], model_label: str | None) -> None:
    """Print a summary produced by ``flearning.data.summary.summarize`` as rich tables."""
    from rich.console import Console
    from rich.table import Table

    from flearning.data.loading import DROP_REASONS

    console = Console()
    kept, raw = summary["n_kept"], summary["n_raw"]
    facts = Table(title=f"Dataset {summary['path']}", show_header=False, title_justify="left")
    facts.add_column(style="bold")
    facts.add_column(overflow="fold")  # the full sha256 matters more than a tidy column
    facts.add_row("format", summary["format"])
    if summary.get("reader", "json") != "json":
        split = f", split {summary['split']}" if summary.get("split") else ""
        facts.add_row("read as", f"{summary['reader']}{split}")
    if summary.get("zsre_old"):
        facts.add_row(
            "old answers from", "answers[0]" if summary["zsre_old"] == "answers" else summary["zsre_old"]
        )
    if summary.get("fields"):
        facts.add_row("fields", ", ".join(f"{k}={v}" for k, v in summary["fields"].items()))
    if summary.get("unused_columns"):
        facts.add_row("columns not read", ", ".join(summary["unused_columns"]))
    facts.add_row("sha256", summary["sha256"])
    facts.add_row("records", f"{raw} in the file, {kept} kept")
    for reason, n in summary["dropped"].items():
        facts.add_row("dropped", f"{n} ({reason}: {DROP_REASONS[reason]})")
    cov, totals = summary["coverage"], summary["totals"]
    facts.add_row("with subject", _percent(cov["subject"], kept))
    facts.add_row("with rephrase", f"{_percent(cov['rephrase'], kept)}, {totals['rephrase_prompts']} prompts")
    facts.add_row("with locality", f"{_percent(cov['locality'], kept)}, {totals['locality']} probes")
    facts.add_row("with portability", f"{_percent(cov['portability'], kept)}, {totals['portability']} probes")
    console.print(facts)

    lengths = summary["lengths"]
    unit = lengths["unit"]
    how = f"{model_label} tokenizer" if model_label else "whitespace word count"
    stats = Table(title=f"Lengths ({unit}, {how})", title_justify="left")
    for col in ("sequence", "min", "median", "mean", "p95", "max"):
        stats.add_column(col, justify="left" if col == "sequence" else "right")
    for key in ("prompt+target_new", "prompt+target_old"):
        s = lengths[key]
        stats.add_row(key, *(str(s[k]) for k in ("min", "median", "mean", "p95", "max")))
    console.print(stats)

    hist = Table(title=f"Histogram of prompt + target_new lengths ({unit})", title_justify="left")
    hist.add_column(unit, justify="right")
    hist.add_column("records", justify="right")
    hist.add_column("")
    peak = max(b["count"] for b in lengths["histogram"])
    for b in lengths["histogram"]:
        span = str(b["low"]) if b["low"] == b["high"] else f"{b['low']}-{b['high']}"
        bar = "█" * max(1 if b["count"] else 0, round(_BAR_WIDTH * b["count"] / peak))
        hist.add_row(span, str(b["count"]), bar)
    console.print(hist)
    if kept and not cov["rephrase"]:
        console.print("[yellow]note[/]: no rephrase prompts: Generality cannot be measured on this file")
    if kept and not cov["locality"]:
        console.print("[yellow]note[/]: no locality probes: Locality cannot be measured on this file")


@data_app.command("check")
def check_command(
    file: Path = typer.Argument(..., help=f"The dataset: {DATA_HELP}.", show_default=False),
    fmt: str | None = typer.Option(
        None, "--format", "-f", help=f"One of: {', '.join(FORMATS)}. Detected from the content when omitted."
    ),
    field: list[str] | None = typer.Option(None, "--field", help=FIELD_HELP, show_default=False),
    split: str | None = typer.Option(None, "--split", help=SPLIT_HELP),
    zsre_old: str | None = typer.Option(None, "--zsre-old", help=ZSRE_OLD_HELP, show_default=False),
    strict: bool = typer.Option(False, "--strict", help="Report records that would be dropped as errors."),
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="Tokenizer for the length statistics and the context check (records longer than the model's "
        "max_position_embeddings are named): an embedded model name, a local model directory or a hub id "
        "(default: the embedded model); 'none' counts whitespace words instead.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON on stdout."),
) -> None:
    """Validate a dataset and summarise it: format, counts, drops, field coverage, lengths; warn about
    records longer than the model's context (with a model) and conflicting edits (one prompt, two new
    targets)."""
    from flearning.data.fields import parse_fields
    from flearning.data.loading import load_dataset
    from flearning.data.summary import summarize

    # Load first: a bad file is reported before any tokenizer is loaded.
    dataset = load_dataset(
        file, fmt, strict=strict, fields=parse_fields(field), split=split, zsre_old=zsre_old
    )
    tokenizer = limit = None
    if model is None or model.strip().lower() != NO_MODEL:
        tokenizer, limit = model_tokenizer(model)
    length_fn, unit, model_label = length_function(model, tokenizer)
    summary = summarize(dataset, length_fn, unit)
    summary["lengths"]["model"] = model_label
    if dataset.zsre_old is not None:
        summary["zsre_old"] = dataset.zsre_old
    checks, notes = input_notes(dataset, tokenizer, limit)
    summary.update(checks)
    if as_json:
        typer.echo(json.dumps(summary, indent=2, ensure_ascii=False))
    else:
        render_summary(summary, model_label)
        for line in notes:  # plain lines: a path is never folded
            typer.echo(line)
