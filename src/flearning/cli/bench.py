"""``flearn bench``."""

from __future__ import annotations

from pathlib import Path

import typer

from flearning.cli.data import FIELD_HELP, SPLIT_HELP, TEMPLATE_HELP, ZSRE_OLD_HELP


def _parse_data(items: list[str] | None) -> dict[str, str | list[str]] | None:
    """``NAME=PATH`` options as {name: path}; a name given several times is one dataset of those files."""
    if not items:
        return None
    out: dict[str, list[str]] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(f"--data expects NAME=PATH, got {item!r}")
        out.setdefault(name, []).append(path)
    return {name: paths[0] if len(paths) == 1 else paths for name, paths in out.items()}


def bench_command(
    overrides: list[str] = typer.Argument(
        None, help="Config overrides as key=value (e.g. prime.max_epochs=10)."
    ),
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML bench configuration."),
    profile: str | None = typer.Option(
        None,
        "--profile",
        help="quick (a smoke run in minutes on the shipped samples), paper (200 edits of the full datasets, 3 "
        "seeds) or paper-v2 (the F-Learning paper's appendix protocol: every stage lr 5e-5 × 3 epochs, batch "
        "4 × accumulation 4, LoRA on q_proj/v_proj, the paper's λ per method and dataset, Alpaca prompts, "
        "ZsRE old answers from pred, teacher-forced metrics only (generation=true adds Gen. EM); 100 edits, "
        "3 seeds: set them with --n and --seeds).",
    ),
    model: str | None = typer.Option(None, "--model", "-m"),
    data: list[str] | None = typer.Option(
        None,
        "--data",
        help="NAME=PATH, repeatable; a NAME given twice is one dataset of both files, read in order (e.g. "
        "ZsRE's dev and train files; record ids become FILE/ID) (default: the full datasets under "
        "--data-root if there, else the shipped samples); "
        "PATH as flearn update's --data (a JSON, Parquet or CSV file, a save_to_disk directory, hf:owner/name).",
    ),
    field: list[str] | None = typer.Option(
        None, "--field", help=f"{FIELD_HELP} Applies to every --data file.", show_default=False
    ),
    split: str | None = typer.Option(None, "--split", help=SPLIT_HELP),
    zsre_old: str | None = typer.Option(
        None, "--zsre-old", help=f"{ZSRE_OLD_HELP} Config key: zsre_old.", show_default=False
    ),
    template: str | None = typer.Option(
        None, "--template", help=f"{TEMPLATE_HELP} Config key: template.", show_default="plain"
    ),
    data_root: Path | None = typer.Option(
        None,
        "--data-root",
        help="Directory of the full datasets (default: $FLEARN_DATA, else ../shared/data).",
    ),
    methods: str | None = typer.Option(None, "--methods", help="Comma-separated methods (default: all six)."),
    n: int | None = typer.Option(None, "--n", help="Evaluated edits per dataset."),
    n_val: int | None = typer.Option(
        None, "--n-val", help="Validation edits per dataset (for --lambda auto)."
    ),
    seeds: int | None = typer.Option(None, "--seeds", help="Number of seeds (0, 1, ...)."),
    lam: str | None = typer.Option(
        None,
        "--lambda",
        help="λ values (comma-separated) or 'auto'. λ > 0 forgets (θ' = θ − λ·Δ_old); a negative λ is refused "
        "unless --allow-negative-lambda.",
    ),
    lambda_choice: str | None = typer.Option(
        None,
        "--lambda-choice",
        help="With --lambda auto: each_seed chooses λ on every seed's validation split, first_seed on the "
        "first seed's only and keeps it (the paper's one λ per method and dataset). Config key: lambda_choice.",
        show_default="each_seed",
    ),
    allow_negative_lambda: bool = typer.Option(
        False, "--allow-negative-lambda", help="Accept λ < 0 (it adds Δ_old: the old facts get stronger)."
    ),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output directory (results and cache)."),
    no_progress: bool = typer.Option(
        False, "--no-progress", help="Hide progress (a bar on a terminal, else a line every 10 s)."
    ),
    report_to: list[str] | None = typer.Option(
        None,
        "--report-to",
        help="Log every stage and run to experiment trackers: tensorboard, wandb, mlflow, trackio (repeatable "
        "or comma-separated; config key report_to; default none).",
        show_default=False,
    ),
    run_name: str | None = typer.Option(
        None, "--run-name", help="The tracked run's name (default: the bench directory's name)."
    ),
    logging_dir: Path | None = typer.Option(
        None, "--logging-dir", help="Where TensorBoard and wandb write (default: OUT/logs/)."
    ),
) -> None:
    """Run every method from the same primed model on ZsRE and CounterFact and tabulate them.

    Example: flearn bench --profile quick --out runs/bench-quick
    """
    from flearning.config import BenchConfig, load_config
    from flearning.data.fields import parse_fields
    from flearning.recipes.bench import default_out, run_bench

    cli = {
        "model": model,
        "data_root": data_root,
        "data": _parse_data(data),
        "fields": parse_fields(field),
        "split": split,
        "zsre_old": zsre_old,
        "template": template,
        "n": n,
        "n_val": n_val,
        "out": out,
        "methods": methods.split(",") if methods else None,
        "seeds": list(range(seeds)) if seeds else None,
        "lambdas": None if lam is None else ("auto" if lam == "auto" else _floats(lam)),
        "lambda_choice": lambda_choice,
        "allow_negative_lambda": True if allow_negative_lambda else None,
        "report_to": ",".join(report_to) if report_to else None,
        "run_name": run_name,
        "logging_dir": logging_dir,
    }
    # every problem of the file, the options and the overrides at once (exit 2)
    cfg = load_config(BenchConfig, config, overrides or [], cli, profile=profile)
    from flearning.io.atomic import write_errors_as_flearn

    # reused (its cache makes reruns resume); its entries are replaced, never the directory itself, so an
    # existing one must be writable, not its parent. run_bench checks it (io.output's rule) and locks it.
    target = default_out(cfg).resolve()
    note = (
        "The previous results are untouched; finished runs are kept in its cache: rerun the same command "
        "to continue."
    )
    # the path as written too: the bench writes through it (a symlink in it is not resolved)
    with write_errors_as_flearn([target, default_out(cfg)], what="the bench output", note=note):
        summary = run_bench(cfg, progress=not no_progress, inputs={"config": config})
    typer.echo(summary["table_markdown"])
    typer.echo(f"bench written to {target} in {summary['wall_seconds']:.0f} s")


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(
            f"--lambda expects numbers separated by commas or 'auto', got {text!r}"
        ) from None
