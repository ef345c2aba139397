"""``flearn model``: inspect and prepare models."""

from __future__ import annotations

import json
import time

import typer

from flearning.models import DEFAULT_MODEL

model_app = typer.Typer(no_args_is_help=True)


@model_app.command("info")
def info(
    model: str = typer.Option(
        DEFAULT_MODEL,
        "--model",
        "-m",
        help="Model directory, embedded name or hub id (org/name; hf:org/name always means the hub).",
    ),
    trust_remote_code: bool = typer.Option(False, help="Allow the model's own Python code to run."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Parameters, dtype, architecture and where the weights live (converts the embedded model once)."""
    from rich.console import Console
    from rich.table import Table

    from flearning.models import cache_root, count_parameters, load_model, resolve_model

    start = time.perf_counter()
    path = resolve_model(model)
    model_obj, tokenizer = load_model(model, trust_remote_code=trust_remote_code)  # errors name --model
    load_s = time.perf_counter() - start
    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model_obj.parameters()})
    facts = {
        "model": model,
        "path": path,
        "architecture": type(model_obj).__name__,
        "parameters": count_parameters(model_obj),
        "dtype": ",".join(dtypes),
        "layers": getattr(model_obj.config, "num_hidden_layers", None),
        "hidden_size": getattr(model_obj.config, "hidden_size", None),
        "vocab_size": len(tokenizer),
        "tied_embeddings": bool(getattr(model_obj.config, "tie_word_embeddings", False)),
        "eos_token": tokenizer.eos_token,
        "pad_token": tokenizer.pad_token,
        "cache": str(cache_root()),
        "load_seconds": round(load_s, 2),
    }
    if as_json:
        typer.echo(json.dumps(facts, indent=2))
        return
    table = Table(title=f"model {model}", show_header=False)
    for key, value in facts.items():
        shown = f"{value:,}" if key == "parameters" else str(value)
        table.add_row(key, shown)
    Console().print(table)
