"""``flearn update``: the command-line face of ``recipes.update`` (options → ``UpdateConfig``)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from flearning.cli.data import DATA_HELP, FIELD_HELP, SPLIT_HELP, TEMPLATE_HELP, ZSRE_OLD_HELP


def update_command(
    overrides: list[str] = typer.Argument(None, help="Config overrides as key=value (e.g. learn.lr=1e-4)."),
    config: Path | None = typer.Option(
        None,
        "--config",
        "-c",
        help="YAML run configuration: a file, or a shipped config's name (demo, ft, ...).",
    ),
    model: str | None = typer.Option(None, "--model", "-m", help="Model directory, hub id, or smollm2-135m."),
    data: Path | None = typer.Option(
        None,
        "--data",
        help=f"The facts, with old and new targets: {DATA_HELP}.",
    ),
    old: Path | None = typer.Option(None, "--old", help="File of the old facts (prompt → target_old)."),
    new: Path | None = typer.Option(None, "--new", help="File of the new facts (prompt → target_new)."),
    fmt: str | None = typer.Option(None, "--format", help="Data format (default: detected)."),
    field: list[str] | None = typer.Option(
        None, "--field", help=f"{FIELD_HELP} Config key: fields.", show_default=False
    ),
    split: str | None = typer.Option(None, "--split", help=SPLIT_HELP),
    zsre_old: str | None = typer.Option(
        None, "--zsre-old", help=f"{ZSRE_OLD_HELP} Config key: zsre_old.", show_default=False
    ),
    template: str | None = typer.Option(
        None, "--template", help=f"{TEMPLATE_HELP} Config key: template.", show_default="plain"
    ),
    method: str | None = typer.Option(
        None, "--method", help="ft, lora, ft-c, flearning-ft, flearning-lora, flearning-lora-ft."
    ),
    lam: float | None = typer.Option(
        None,
        "--lambda",
        help="λ: how much of Δ_old to subtract, θ' = θ − λ·Δ_old (F-Learning methods). λ > 0 forgets; a "
        "negative λ would strengthen the old facts and is refused unless --allow-negative-lambda.",
    ),
    allow_negative_lambda: bool = typer.Option(
        False, "--allow-negative-lambda", help="Accept λ < 0 (it adds Δ_old: the old facts get stronger)."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output directory (written atomically)."),
    overwrite: bool | None = typer.Option(None, "--overwrite", help="Replace a non-empty output directory."),
    seed: int | None = typer.Option(None, "--seed"),
    limit: int | None = typer.Option(None, "--limit", help="Use the first N facts only."),
    no_eval: bool = typer.Option(False, "--no-eval", help="Skip the before/after evaluation."),
    no_perplexity: bool = typer.Option(
        False,
        "--no-perplexity",
        help="Skip the perplexity on held-out text before and after (general ability; perplexity=null).",
    ),
    perplexity_corpus: Path | None = typer.Option(
        None,
        "--perplexity-corpus",
        help="Text file (passages separated by blank lines) to measure perplexity on before and after "
        "(default: sample:wikitext-2-valid-200.txt; perplexity.passages=N and perplexity.max_tokens=N set "
        "how much of it).",
    ),
    no_vectors: bool = typer.Option(
        False,
        "--no-vectors",
        help="Write the model only, without knowledge_vector/ and update_vector/ (each as large as the "
        "model's weights); the run then also keeps no copy of θ in memory.",
    ),
    vector_files: str | None = typer.Option(
        None,
        "--vector-files",
        help="How knowledge_vector/ and update_vector/ are written: 'consolidated' (one vector.safetensors; "
        "under FSDP2 gathered whole on the main process) or 'sharded' (one file per decoder block, the "
        "streaming vector format; under FSDP2 gathered a block at a time). Config key: vector_files.",
        show_default="consolidated",
    ),
    truncate: bool = typer.Option(
        False,
        "--truncate",
        help="Cut prompts longer than the model's context from the left (each named in a warning) instead "
        "of refusing them.",
    ),
    trust_remote_code: bool = typer.Option(
        False,
        "--trust-remote-code",
        help="Run the model repository's own code (off: only transformers' code).",
    ),
    no_progress: bool = typer.Option(
        False, "--no-progress", help="Hide progress (a bar on a terminal, else a line every 10 s)."
    ),
    report_to: list[str] | None = typer.Option(
        None,
        "--report-to",
        help="Log the run to experiment trackers: tensorboard, wandb, mlflow, trackio (repeatable or "
        "comma-separated; config key report_to; default none).",
        show_default=False,
    ),
    run_name: str | None = typer.Option(
        None, "--run-name", help="The tracked run's name (default: the output directory's name)."
    ),
    logging_dir: Path | None = typer.Option(
        None,
        "--logging-dir",
        help="Where TensorBoard and wandb write (default: OUT/logs/, kept in OUT.partial/logs/ while running).",
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Resuming is automatic: a run keeps its finished stages and checkpoints (every checkpoint_every "
        "optimizer steps, default 100) in OUT.partial/, and rerunning the same command after an interruption "
        "continues from there and writes the same model as an uninterrupted run. --resume also requires "
        "OUT.partial/ to exist; OUT.partial/ of other settings is refused, naming what differs.",
    ),
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the memory each stage needs for this model and method, then stop."
    ),
    processes: int = typer.Option(
        1, "--processes", min=1, help="With --dry-run: plan for N training processes (devices)."
    ),
    sharding: str = typer.Option(
        "none",
        "--sharding",
        help="With --dry-run: 'none' (DDP: every process holds everything) or 'fsdp2' (weights, gradients "
        "and AdamW state split over --processes; configs/accelerate/fsdp2.yaml).",
    ),
    restart: bool = typer.Option(
        False,
        "--restart",
        help="Discard OUT.partial/ left by an interrupted run and start afresh (needed after changing settings).",
    ),
) -> None:
    """Forget the old facts, learn the new ones, write the updated model, its vectors and a report.

    Resuming (the --resume help above; recipes/work_dir.py for how): rerun the same command.

    Example: flearn update --data data/samples/facts.jsonl --method flearning-ft --lambda 0.7 --out runs/x
    """
    from rich.console import Console

    from flearning.cli.tables import (
        answers_table,
        learn_schedule_line,
        locality_line,
        skipped_evaluation_line,
        update_table,
    )
    from flearning.config import UpdateConfig, config_source, load_config, stage_plan
    from flearning.data.fields import parse_fields
    from flearning.recipes.update import update
    from flearning.resources import resolve_config

    cli = {
        "model": model,
        "data": data,
        "old": old,
        "new": new,
        "format": fmt,
        "fields": parse_fields(field),
        "split": split,
        "zsre_old": zsre_old,
        "template": template,
        "method": method,
        "lambda": lam,
        "out": out,
        "overwrite": overwrite,
        "seed": seed,
        "limit": limit,
        "evaluate": False if no_eval else None,
        "allow_negative_lambda": True if allow_negative_lambda else None,
        "save_vectors": False if no_vectors else None,
        "vector_files": vector_files,
        "truncate": True if truncate else None,
        "trust_remote_code": True if trust_remote_code else None,
        "report_to": ",".join(report_to) if report_to else None,
        "run_name": run_name,
        "logging_dir": logging_dir,
    }
    if resume and restart:
        raise typer.BadParameter("--resume and --restart exclude each other")
    config = resolve_config(config) if config else None
    if no_perplexity and perplexity_corpus is not None:
        raise typer.BadParameter("--no-perplexity and --perplexity-corpus exclude each other")
    # the perplexity options change one key of the config's perplexity section (key=value overrides win)
    perplexity = ["perplexity=null"] if no_perplexity else []
    if perplexity_corpus is not None:
        perplexity.append(f"perplexity.corpus={json.dumps(str(perplexity_corpus))}")
    cfg = load_config(UpdateConfig, config, [*perplexity, *(overrides or [])], cli)
    stage_plan(cfg, source=config_source(config))  # the stages' settings are valid (else exit 2)
    if dry_run:  # the data and its lengths are checked as the update would, no weights are loaded
        from flearning.cli.tables import plan_table, render
        from flearning.recipes.dry_run import dry_run as plan_dry_run

        if sharding not in ("none", "fsdp2"):
            raise typer.BadParameter(f"--sharding must be none or fsdp2, not {sharding!r}")
        typer.echo(render(plan_table(plan_dry_run(cfg, processes=processes, sharding=sharding))))
        return
    if cfg.out is None:
        raise typer.BadParameter("an output directory is required (--out DIR or out=DIR)")
    mode = "resume" if resume else "restart" if restart else "auto"
    # the config file is an input too: --overwrite never deletes it with an earlier output holding it
    result = update(cfg, progress=not no_progress, resume=mode, inputs={"config": config})
    console = Console()
    answers = answers_table(result.records, result.before, result.after)
    if answers is not None:
        console.print(answers)
    table = update_table(result.summary)
    if table is not None:
        console.print(table)
    else:
        console.print(skipped_evaluation_line(result.summary), soft_wrap=True, markup=False)
    for line in (learn_schedule_line(result.summary), locality_line(result.summary)):
        if line is not None:
            console.print(line)
    console.print(f"updated model written to [bold]{result.out}[/bold]")
