"""``flearn prime``: teach a model the old facts until it holds them (the benchmark's first stage)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer


def prime_command(
    data: Path = typer.Option(..., "--data", help="Facts whose target_old is taught."),
    out: Path = typer.Option(..., "--out", "-o", help="Output model directory (written atomically)."),
    model: str = typer.Option("smollm2-135m", "--model", "-m"),
    fmt: str | None = typer.Option(None, "--format"),
    limit: int | None = typer.Option(None, "--limit"),
    threshold: float = typer.Option(0.9, help="Stop once teacher-forced old-fact accuracy reaches this."),
    max_epochs: float = typer.Option(15, help="Upper bound on epochs."),
    lr: float = typer.Option(1e-4),
    batch_size: int = typer.Option(8),
    seed: int = typer.Option(0),
    overwrite: bool = typer.Option(False, "--overwrite"),
    no_progress: bool = typer.Option(False, "--no-progress"),
) -> None:
    """Fine-tune on prompt → old answer until the old facts are held; report the accuracy reached."""
    from flearning.data import load_dataset
    from flearning.distributed import on_main_process
    from flearning.io.atomic import atomic_directory, check_output_dir, write_errors_as_flearn
    from flearning.models import load_model, resolve_model
    from flearning.recipes.prime import prime

    cfg = _stage_config(lr=lr, max_epochs=max_epochs, threshold=threshold, batch_size=batch_size, seed=seed)
    dataset = load_dataset(data, fmt, limit=limit)
    source = resolve_model(model)
    target = check_output_dir(
        out, overwrite=overwrite, protected=[Path(source)] if Path(source).exists() else []
    )
    theta, tokenizer = load_model(source)
    result = prime(theta, tokenizer, dataset.records, cfg, threshold=threshold, progress=not no_progress)
    info = {
        "model": model,
        "data": str(data),
        "data_sha256": dataset.sha256,
        "records": len(dataset.records),
        "threshold": threshold,
        "accuracy_before": result.accuracy_before,
        "accuracy": result.accuracy,
        "epochs": result.epochs,
        "seconds": round(result.seconds, 1),
        "history": result.history,
        "stage": cfg.model_dump(mode="json"),
    }

    def write() -> None:
        with atomic_directory(target) as tmp:
            result.model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / "prime.json").write_text(json.dumps(info, indent=2) + "\n")

    note = "Nothing was written; a previous output is untouched."
    with write_errors_as_flearn(target, what="the primed model", note=note):
        on_main_process(write)  # launched as several processes, the main one writes, the others wait
    reached = "reached" if result.accuracy >= threshold else "did NOT reach"
    typer.echo(
        f"old-fact accuracy {result.accuracy_before:.3f} → {result.accuracy:.3f} after {result.epochs} "
        f"epochs ({reached} {threshold}); primed model written to {target}"
    )


def _stage_config(**options: Any):
    """The priming stage's TrainConfig from the options, each checked like a config's setting (a finite
    number, in range, a seed NumPy takes): every problem at once, naming its option (``--lr``), exit 2."""
    from pydantic import ValidationError

    from flearning.config import PrimeOptions
    from flearning.errors import ConfigError, Problem
    from flearning.training import TrainConfig

    try:
        checked = PrimeOptions(**options)
    except ValidationError as ex:
        raise ConfigError(
            [
                Problem("command line", None, "--" + str(err["loc"][0]).replace("_", "-"), err["msg"])
                for err in ex.errors()
            ]
        ) from ex
    return TrainConfig(
        lr=checked.lr, epochs=checked.max_epochs, batch_size=checked.batch_size, seed=checked.seed
    )
