"""``flearn prime``: teach a model the old facts until it holds them (the benchmark's first stage)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from flearning.cli.data import TEMPLATE_HELP, ZSRE_OLD_HELP
from flearning.data.templates import TEMPLATES


def prime_command(
    data: Path = typer.Option(..., "--data", help="Facts whose target_old is taught."),
    out: Path = typer.Option(..., "--out", "-o", help="Output model directory (written atomically)."),
    model: str | None = typer.Option(None, "--model", "-m", help="Model directory, hub id, or smollm2-135m."),
    fmt: str | None = typer.Option(None, "--format"),
    limit: int | None = typer.Option(None, "--limit"),
    zsre_old: str | None = typer.Option(None, "--zsre-old", help=ZSRE_OLD_HELP, show_default=False),
    template: str = typer.Option(
        "plain", "--template", help=f"{TEMPLATE_HELP} Prime with the one the updates will use."
    ),
    # unset options take the bench's prime settings (flearning.config.PrimeSettings)
    threshold: float | None = typer.Option(
        None,
        help="Stop once teacher-forced old-fact accuracy reaches this (default: the bench's prime.threshold).",
    ),
    max_epochs: float | None = typer.Option(
        None, help="Upper bound on epochs (default: the bench's prime.max_epochs)."
    ),
    lr: float | None = typer.Option(None, help="Learning rate (default: the bench's prime.lr)."),
    batch_size: int | None = typer.Option(None, help="Batch size (default: the bench's prime.batch_size)."),
    seed: int | None = typer.Option(None, help="Seed of the priming stage."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an earlier output of flearn prime (never anything else)."
    ),
    no_progress: bool = typer.Option(
        False, "--no-progress", help="Hide progress (a bar on a terminal, else a line every 10 s)."
    ),
) -> None:
    """Fine-tune on prompt → old answer until the old facts are held; report the accuracy reached."""
    from flearning.data import load_dataset
    from flearning.distributed import on_main_process
    from flearning.io.output import claim_output
    from flearning.models import DEFAULT_MODEL, resolve_model

    options = _options(lr=lr, max_epochs=max_epochs, threshold=threshold, batch_size=batch_size, seed=seed)
    if template not in TEMPLATES:
        raise typer.BadParameter(
            f"{template!r} is not one of {', '.join(TEMPLATES)}", param_hint="--template"
        )
    cfg, threshold = options.train_config(options.seed, template), options.threshold
    model = model or DEFAULT_MODEL
    dataset = load_dataset(data, fmt, limit=limit, zsre_old=zsre_old)
    source = resolve_model(model)
    # the output's rule (io.output); the main process holds its lock for the whole command
    claims = []

    def claim() -> Path:
        claims.append(
            claim_output(out, kind="prime", inputs={"model": source, "data": data}, overwrite=overwrite)
        )
        return claims[-1].path

    target = on_main_process(claim)
    try:
        _prime_into(target, model, source, data, dataset, cfg, threshold, not no_progress)
    finally:
        for held in claims:
            held.release()


def _prime_into(
    target: Path, model: str, source: str, data: Path, dataset, cfg, threshold: float, progress: bool
) -> None:
    from flearning.data.templates import check_template
    from flearning.distributed import on_main_process
    from flearning.io.atomic import write_errors_as_flearn
    from flearning.io.output import write_marker
    from flearning.models import load_model
    from flearning.recipes.prime import prime, save_primed
    from flearning.sharding import is_sharded, whole_state

    theta, tokenizer = load_model(source)
    check_template(tokenizer, cfg.template)  # chat: the tokenizer has a chat template
    result = prime(theta, tokenizer, dataset.records, cfg, threshold=threshold, progress=progress)
    info = {
        "model": model,
        "data": str(data),
        "data_sha256": dataset.sha256,
        "records": len(dataset.records),
        "zsre_old": dataset.zsre_old,  # a ZsRE file: the field its old answers were read from
        "template": cfg.template,
        "threshold": threshold,
        "accuracy_before": result.accuracy_before,
        "accuracy": result.accuracy,
        "epochs": result.epochs,
        "seconds": round(result.seconds, 1),
        "history": result.history,
        "stage": cfg.model_dump(mode="json"),
    }

    note = "Nothing was written; a previous output is untouched."
    with write_errors_as_flearn(target, what="the primed model", note=note):
        # launched as several processes, the main one writes, the others wait
        # under FSDP2 every process takes part in gathering the weights onto the main one first
        whole = whole_state(result.model) if is_sharded(result.model) else None
        on_main_process(save_primed, target, result.model, tokenizer, info, whole)
        on_main_process(write_marker, target, "prime")  # recognisable: --overwrite may replace it
    reached = "reached" if result.accuracy >= threshold else "did NOT reach"
    typer.echo(
        f"old-fact accuracy {result.accuracy_before:.3f} → {result.accuracy:.3f} after {result.epochs} "
        f"epochs ({reached} {threshold}); primed model written to {target}"
    )


def _options(**options: Any):
    """The options, each checked like a config's setting (a finite number, in range, a seed NumPy takes),
    unset ones from the bench's prime settings: every problem at once, naming its option (``--lr``), exit 2."""
    from flearning.config import PrimeOptions, load_config
    from flearning.errors import ConfigError, Problem

    try:
        return load_config(PrimeOptions, None, [], options)
    except ConfigError as ex:
        raise ConfigError(
            [
                Problem(
                    p.source, p.record, p.field and "--" + p.field.split(".")[0].replace("_", "-"), p.message
                )
                for p in ex.problems
            ]
        ) from ex
