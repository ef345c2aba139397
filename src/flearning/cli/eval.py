"""``flearn eval``: score a model on a knowledge dataset with every metric and write a report.

Registered by ``flearning.cli``; heavy imports (torch, transformers) happen inside the command.
"""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from flearning.cli.data import DATA_HELP, FIELD_HELP, SPLIT_HELP, TEMPLATE_HELP, ZSRE_OLD_HELP
from flearning.cli.tables import summary_table
from flearning.evaluation.definitions import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_FLUENCY_SEED,
    DEFAULT_FLUENCY_TOKENS,
    DEFAULT_PERPLEXITY_MAX_TOKENS,
    DEFAULT_PERPLEXITY_PASSAGES,
    PERPLEXITY_SAMPLE,
)

log = logging.getLogger(__name__)


def eval_command(
    data: Path = typer.Option(
        ...,
        "--data",
        "-d",
        help=f"The dataset (zsre, counterfact, counterfact-rome or jsonl): {DATA_HELP}.",
        show_default=False,
    ),
    out: Path = typer.Option(
        ...,
        "--out",
        "-o",
        help="Report directory (created if missing; other files in it are left alone). An earlier report "
        "there is replaced only with --overwrite.",
        show_default=False,
    ),
    overwrite: bool = typer.Option(
        False,
        "--overwrite",
        help="Replace the report files of an earlier flearn eval in --out (never anyone else's files).",
    ),
    model: str | None = typer.Option(
        None,
        "--model",
        "-m",
        help="Model to evaluate: an embedded model name, a local directory or a hub id "
        "(default: the embedded SmolLM2-135M).",
    ),
    reference: str | None = typer.Option(
        None, "--reference", "-r", help="The model before the update, for Locality (omitted: no Locality)."
    ),
    fmt: str | None = typer.Option(None, "--format", "-f", help="Dataset format; detected when omitted."),
    field: list[str] | None = typer.Option(None, "--field", help=FIELD_HELP, show_default=False),
    split: str | None = typer.Option(None, "--split", help=SPLIT_HELP),
    zsre_old: str | None = typer.Option(None, "--zsre-old", help=ZSRE_OLD_HELP, show_default=False),
    template: str = typer.Option(
        "plain", "--template", help=f"{TEMPLATE_HELP} Give the one the model was updated with."
    ),
    limit: int | None = typer.Option(None, "--limit", "-n", min=1, help="Evaluate the first N records only."),
    batch_size: int = typer.Option(
        DEFAULT_BATCH_SIZE, "--batch-size", "-b", min=1, help="Rows per forward pass."
    ),
    generation_batch_size: int | None = typer.Option(
        None, "--generation-batch-size", min=1, help="Rows per generate call (default: 4 x --batch-size)."
    ),
    no_generation: bool = typer.Option(False, "--no-generation", help="Skip Generation exact match."),
    fluency: bool = typer.Option(
        False,
        "--fluency",
        help="Also compute both Fluencies: greedy (this project's) and top-5 sampled to 100 tokens "
        "(ROME/EasyEdit's, comparable with published numbers). Slow: long generations.",
    ),
    fluency_tokens: int = typer.Option(
        DEFAULT_FLUENCY_TOKENS,
        "--fluency-tokens",
        min=1,
        help="New tokens generated per prompt for the greedy Fluency.",
    ),
    fluency_seed: int = typer.Option(
        DEFAULT_FLUENCY_SEED, "--fluency-seed", min=0, help="Seed of the sampled Fluency (with each prompt)."
    ),
    no_perplexity: bool = typer.Option(
        False, "--no-perplexity", help="Skip the model's perplexity on held-out text (general ability)."
    ),
    perplexity_corpus: str = typer.Option(
        f"sample:{PERPLEXITY_SAMPLE}",
        "--perplexity-corpus",
        help="Text file to measure perplexity on (passages separated by blank lines; sample:NAME: a shipped one).",
    ),
    perplexity_passages: int = typer.Option(
        DEFAULT_PERPLEXITY_PASSAGES, "--perplexity-passages", min=1, help="Its first N passages."
    ),
    perplexity_max_tokens: int = typer.Option(
        DEFAULT_PERPLEXITY_MAX_TOKENS, "--perplexity-max-tokens", min=2, help="Each passage cut to N tokens."
    ),
    name: str | None = typer.Option(
        None, "--name", help="Method name in the report (default: the model's name)."
    ),
    truncate: bool = typer.Option(
        False,
        "--truncate",
        help="Cut prompts longer than the model's context from the left (named in a warning) instead of "
        "refusing them.",
    ),
    progress: bool = typer.Option(
        True, "--progress/--no-progress", help="Show progress (a bar on a terminal, else a line every 10 s)."
    ),
) -> None:
    """Score a model on a dataset: Reliability, Generality, Locality, Portability, Old retention, Efficacy,
    Paraphrase score, Generation exact match, (optionally) both Fluencies, and its perplexity on held-out
    text."""
    from rich.console import Console

    from flearning.cli.data import model_tokenizer
    from flearning.data import load_dataset
    from flearning.data.context import check_context
    from flearning.data.fields import parse_fields
    from flearning.data.templates import check_template
    from flearning.evaluation.corpus import PerplexityCorpus, corpus_path
    from flearning.evaluation.evaluate import evaluate
    from flearning.evaluation.reference import reference_predictions
    from flearning.evaluation.report import REPORT_FILES, write_report
    from flearning.io.atomic import write_errors_as_flearn
    from flearning.io.output import claim_output, output_kind, write_marker
    from flearning.models import DEFAULT_MODEL, cache_root, load_model

    # The data first, and the context rule (data.context, as update applies it) from the model's tokenizer
    # and config alone: a bad file or a record longer than the context is refused (exit 2, naming file,
    # record and field) before any weights are loaded and before the output is touched.
    dataset = load_dataset(data, fmt, limit=limit, fields=parse_fields(field), split=split, zsre_old=zsre_old)
    context_tokenizer, context = model_tokenizer(model)
    check_template(context_tokenizer, template)  # a known name; chat: the tokenizer has a chat template
    records, cut = check_context(
        dataset.records, context_tokenizer, context, dataset.locations, truncate=truncate, template=template
    )
    for item in cut:
        log.warning(
            "%s:%s: %s; its prompt was cut from the left to fit (--truncate)",
            item.where,
            item.field,
            item.message(*context),
        )
    # the perplexity corpus too (a missing or empty file is exit 2 before any weights are loaded)
    held_out = None
    if not no_perplexity:
        held_out = PerplexityCorpus.load(perplexity_corpus, perplexity_passages, perplexity_max_tokens)
    # then the output's rule (io.output) and its lock, held to the end: never an input or a directory
    # holding one, never another's files. Only the report's files are replaced inside it: the directory
    # itself stays (its parent may be read-only, it may be the current directory, a symlink).
    inputs = {"model": model, "reference model": reference, "data": data}
    if held_out is not None:
        inputs["perplexity corpus"] = corpus_path(perplexity_corpus)
    claim = claim_output(
        out, kind="eval", inputs=inputs, overwrite=overwrite, whole=False, entries=REPORT_FILES
    )
    with claim as target:
        console = Console(stderr=False)
        evaluated, tokenizer = load_model(model)
        ref = None
        if reference is not None:
            ref_model, _ = load_model(reference)
            ref = reference_predictions(
                ref_model,
                tokenizer,
                records,
                batch_size=batch_size,
                cache_dir=cache_root() / "evaluation",
                progress=progress,
                template=template,
            )
            del ref_model
        result = evaluate(
            evaluated,
            tokenizer,
            records,
            reference=ref,
            batch_size=batch_size,
            generation_batch_size=generation_batch_size,
            generation=not no_generation,
            fluency=fluency,
            fluency_tokens=fluency_tokens,
            fluency_sampled=fluency,
            fluency_seed=fluency_seed,
            perplexity=held_out,
            cache_dir=cache_root() / "evaluation",  # the perplexity of these weights, once
            progress=progress,
            template=template,
        )
        result.meta.update(
            {
                "model": model or DEFAULT_MODEL,
                "reference": reference,
                "data": str(data),
                "format": dataset.format,
                "data_sha256": dataset.sha256,
            }
        )
        # how the data was read, when a split or a field mapping was used (data.sources, data.fields)
        result.meta.update({k: v for k, v in (("split", dataset.split), ("fields", dataset.fields)) if v})
        if dataset.zsre_old is not None:  # a ZsRE file: where its old answers came from
            result.meta["zsre_old"] = dataset.zsre_old
        if cut:
            result.meta["truncated"] = [item.to_json() for item in cut]
        method = name or Path(model or DEFAULT_MODEL).name
        title = f"{method} on {data.name} ({len(records)} records)"
        note = "Nothing was written; a previous report is untouched."
        with write_errors_as_flearn(target, what="the report", note=note):
            write_report({method: [result]}, target, title=title)
            if output_kind(target) != "eval":
                write_marker(target, "eval")  # recognisable: --overwrite may replace its report
        console.print(summary_table(result.summary(), title, perplexity=result.perplexity))
        if ref is None:
            console.print("[yellow]note[/]: no --reference given, so Locality was not measured")
        console.print(f"report written to {out}")
