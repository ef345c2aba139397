"""``flearn vector``: compute, apply, scale and inspect knowledge vectors.

Which way ``apply`` goes is said in words: ``--forget X`` computes θ − X·Δ (F-Learning's θ − λ·Δ_old, the
sign ``flearn update --lambda`` uses), ``--add X`` computes θ + X·Δ (replaying ``update_vector/``), and
``--lambda L`` (kept for compatibility) computes θ + L·Δ, so forgetting there is a negative L. Exactly one.

Big checkpoints: ``compute`` and ``apply`` stream safetensors files tensor by tensor
(``vectors.streaming``) instead of loading models, with ``--stream``, and by default when the model
directory is sharded (``model.safetensors.index.json``), the vector is sharded, or ``apply --vector`` is a
LoRA adapter directory. ``--no-stream`` forces the in-memory path.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from flearning.vectors.streaming import StreamResult
    from flearning.vectors.vector import KnowledgeVector

log = logging.getLogger(__name__)

vector_app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    help="Compute, apply and inspect knowledge vectors (Δ = fine-tuned − base).",
)

_STREAM_HELP = (
    "Stream the safetensors files tensor by tensor instead of loading whole models (memory: a few "
    "64 MiB blocks, whatever the model size). Default: stream when {when}. Streaming keeps the stored "
    "dtype and the shard layout; the in-memory path (--no-stream) loads in fp32 and saves fp32."
)


def _summary(vector: KnowledgeVector) -> str:
    s = vector.stats()
    return (
        f"{vector.metadata.kind} vector: {s.num_tensors} tensors, {s.num_params:,} parameters, "
        f"norm {s.norm:.6g}, max |Δ| {s.max_abs:.3g}"
    )


def _files_and_time(result: StreamResult) -> str:
    """How many files a streamed command wrote and how long it took: "3 files, 1.2 s"."""
    return f"{result.num_shards} file{'s' if result.num_shards != 1 else ''}, {result.seconds:.1f} s"


@contextmanager
def _claimed(out: Path, *, kind: str, inputs: dict, overwrite: bool, what: str) -> Iterator[Path]:
    """Before any work (minutes of loading), the output's rule and lock (``io.output``): never an input or
    a directory holding one, ``--overwrite`` only over an earlier output of the same command, a second
    run on it exits 2. Then a failure to write it (disk full, read-only, ...) is reported naming it."""
    from flearning.io.atomic import write_errors_as_flearn
    from flearning.io.output import claim_output

    with claim_output(out, kind=kind, inputs=inputs, overwrite=overwrite) as target:
        note = "Nothing was written; a previous output is untouched."
        with write_errors_as_flearn([target, out.expanduser().absolute()], what=what, note=note):
            yield target


@vector_app.command("compute")
def compute_command(
    base: str = typer.Option(
        ..., "--base", help="Base model θ: a model directory or an embedded model name."
    ),
    out: Path = typer.Option(..., "--out", help="Directory to write the vector into."),
    finetuned: Path | None = typer.Option(
        None, "--finetuned", help="Fully fine-tuned model directory: Δ = fine-tuned − base."
    ),
    lora_adapter: Path | None = typer.Option(
        None, "--lora-adapter", help="PEFT LoRA adapter directory trained on the base: Δ = B·A·scaling."
    ),
    method: str | None = typer.Option(None, "--method", help="Recorded in the metadata (e.g. ft, lora)."),
    keep_zero: bool = typer.Option(False, "--keep-zero", help="Keep tensors whose delta is exactly zero."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an earlier output of this command in --out (never anything else)."
    ),
    stream: bool | None = typer.Option(
        None,
        "--stream/--no-stream",
        help=_STREAM_HELP.format(when="--base is a sharded model directory")
        + " A streamed vector from a sharded base is sharded the same way (vector-0000i-of-0000n).",
        show_default=False,
    ),
) -> None:
    """Compute the knowledge vector of a fine-tuning: from a fine-tuned model or from a LoRA adapter."""
    from flearning.vectors.apply import compute_vector
    from flearning.vectors.streaming import StreamResult

    inputs = {"base model": base, "fine-tuned model": finetuned, "adapter": lora_adapter}
    with _claimed(out, kind="vector", inputs=inputs, overwrite=overwrite, what="the vector"):
        result = compute_vector(
            base,
            out,
            finetuned=finetuned,
            lora_adapter=lora_adapter,
            method=method,
            drop_zero=not keep_zero,
            overwrite=overwrite,
            stream=stream,
        )
    if not isinstance(result, StreamResult):
        typer.echo(f"{_summary(result)} -> {out}")
        return
    typer.echo(
        f"{'full' if finetuned is not None else 'lora'} vector: {result.num_tensors} tensors, "
        f"{result.num_params:,} parameters, norm {result.norm:.6g}, max |Δ| {result.max_abs:.3g} -> {out} "
        f"(streamed, {_files_and_time(result)})"
    )


def _signed_amount(forget: float | None, add: float | None, lam: float | None) -> float:
    """L of θ + L·Δ from exactly one of --forget X (L = −X), --add X (L = X) and --lambda L (FlearnError)."""
    from flearning.errors import FlearnError

    given = [
        name for name, value in (("--forget", forget), ("--add", add), ("--lambda", lam)) if value is not None
    ]
    if len(given) != 1:
        raise FlearnError(
            f"give exactly one of --forget, --add or --lambda (got {', '.join(given) or 'none'}): --forget 0.7 "
            "computes θ − 0.7·Δ, --add 0.7 computes θ + 0.7·Δ, --lambda L computes θ + L·Δ"
        )
    if forget is not None and not forget > 0:
        raise FlearnError(
            f"--forget takes how much to forget (> 0), got {forget}: θ − {forget}·Δ; use --add to add Δ"
        )
    if add is not None and not add > 0:
        raise FlearnError(
            f"--add takes how much to add (> 0), got {add}: θ + {add}·Δ; use --forget to subtract Δ"
        )
    return -forget if forget is not None else add if add is not None else lam


def _formula(lam: float) -> str:
    return f"θ {'−' if lam < 0 else '+'} {abs(lam):g}·Δ"


@vector_app.command("apply")
def apply_command(
    model_path: str = typer.Option(
        ..., "--model", help="Model to change: a directory or an embedded model name."
    ),
    vector_path: Path = typer.Option(
        ..., "--vector", help="Knowledge-vector directory (or a PEFT LoRA adapter directory, streamed)."
    ),
    forget: float | None = typer.Option(
        None,
        "--forget",
        help="Subtract: --forget 0.7 computes θ − 0.7·Δ (F-Learning's forgetting, λ of update).",
    ),
    add: float | None = typer.Option(
        None, "--add", help="Add: --add 1 computes θ + 1·Δ (replays update_vector/)."
    ),
    lam: float | None = typer.Option(
        None,
        "--lambda",
        help="Signed scale L in θ + L·Δ, kept for compatibility: forgetting is NEGATIVE here (--lambda=-0.7 "
        "is --forget 0.7). Give exactly one of --forget, --add, --lambda.",
    ),
    out: Path = typer.Option(..., "--out", help="New model directory (never the input model's)."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an earlier output of this command in --out (never anything else)."
    ),
    check_base: bool = typer.Option(
        True, "--check-base/--no-check-base", help="Refuse a model that is not the vector's base model."
    ),
    stream: bool | None = typer.Option(
        None,
        "--stream/--no-stream",
        help=_STREAM_HELP.format(
            when="--model is a sharded model directory, the vector is sharded, or --vector is a PEFT "
            "LoRA adapter directory (Δ = B·A·scaling, applied by the streaming path only)"
        ),
        show_default=False,
    ),
) -> None:
    """Write a new model θ − X·Δ (--forget X), θ + X·Δ (--add X) or θ + L·Δ (--lambda L).

    --vector is a knowledge-vector directory or, streamed, a PEFT LoRA adapter directory.
    """
    from flearning.vectors.apply import apply_vector
    from flearning.vectors.lora import is_lora_adapter
    from flearning.vectors.streaming import StreamResult

    lam = _signed_amount(forget, add, lam)  # before any work
    inputs = {"model": model_path, "vector": vector_path}
    with _claimed(out, kind="vector-apply", inputs=inputs, overwrite=overwrite, what="the model"):
        result = apply_vector(
            model_path, vector_path, lam, out, check_base=check_base, overwrite=overwrite, stream=stream
        )
    if not isinstance(result, StreamResult):
        typer.echo(f"applied {_summary(result)} as {_formula(lam)} (lambda={lam}) to {model_path} -> {out}")
        return
    typer.echo(
        f"applied {'LoRA adapter' if is_lora_adapter(vector_path) else 'vector'} {vector_path} as "
        f"{_formula(lam)} (lambda={lam}) to {model_path} -> {out} (streamed: {result.num_tensors} tensors, "
        f"{result.num_params:,} parameters changed, {_files_and_time(result)})"
    )


@vector_app.command("scale")
def scale_command(
    vector_path: Path = typer.Argument(..., help="Knowledge-vector directory."),
    by: float = typer.Option(..., "--by", help="Factor S: the new vector is S·Δ (S=-1 negates)."),
    out: Path = typer.Option(..., "--out", help="Directory for the new vector."),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an earlier output of this command in --out (never anything else)."
    ),
) -> None:
    """Write a new vector S·Δ."""
    from flearning.vectors.vector import KnowledgeVector

    with _claimed(out, kind="vector", inputs={"vector": vector_path}, overwrite=overwrite, what="the vector"):
        scaled = KnowledgeVector.load(vector_path) * by
        scaled.save(out, overwrite=overwrite)
    typer.echo(f"{_summary(scaled)} -> {out}")


def _layer_of(name: str) -> str:
    """Group ``model.layers.3.mlp.up_proj.weight`` under ``model.layers.3``; others by their module."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:-1]) or name


@vector_app.command("info")
def info_command(
    vector_path: Path = typer.Argument(..., help="Knowledge-vector directory."),
    top: int = typer.Option(
        10, "--top", min=1, help="How many tensors and layers to list, largest norm first."
    ),
) -> None:
    """Show a vector's metadata, size, norm and the layers/tensors that changed most."""
    import math

    from rich.console import Console
    from rich.table import Table

    from flearning.vectors.vector import KnowledgeVector

    vector = KnowledgeVector.load(vector_path)
    meta = vector.metadata
    stats = vector.stats()
    console = Console()

    about = Table(title=f"knowledge vector {vector_path}", show_header=False)
    about.add_column("field", style="bold")
    about.add_column("value", overflow="fold")
    for field, value in (
        ("kind", meta.kind),
        ("method", meta.method),
        ("base model", meta.base_model),
        ("base fingerprint", meta.base_fingerprint),
        ("data hash", meta.data_hash),
        ("created", meta.created),
        ("flearning version", meta.flearning_version),
        ("hyper-parameters", ", ".join(f"{k}={v}" for k, v in meta.hyperparameters.items()) or None),
        ("history", "; ".join(meta.history) or None),
        ("zero deltas left out", len(meta.dropped_zero)),
        ("tensors", stats.num_tensors),
        ("parameters", f"{stats.num_params:,}"),
        ("norm (L2)", f"{stats.norm:.6g}"),
        ("rms", f"{stats.rms:.4g}"),
        ("max |Δ|", f"{stats.max_abs:.4g}"),
    ):
        about.add_row(field, "-" if value is None else str(value))
    console.print(about)

    norms = vector.tensor_norms()
    layers: dict[str, float] = {}
    for name, norm in norms.items():
        group = _layer_of(name)
        layers[group] = layers.get(group, 0.0) + norm**2
    by_layer = Table(title=f"layers by norm (top {min(top, len(layers))} of {len(layers)})")
    by_layer.add_column("layer")
    by_layer.add_column("norm", justify="right")
    by_layer.add_column("share of ‖Δ‖²", justify="right")
    total = stats.norm**2 or 1.0
    for group, sq in sorted(layers.items(), key=lambda kv: -kv[1])[:top]:
        by_layer.add_row(group, f"{math.sqrt(sq):.4g}", f"{100 * sq / total:.1f}%")
    console.print(by_layer)

    by_tensor = Table(title=f"tensors by norm (top {min(top, len(norms))} of {len(norms)})")
    for column in ("tensor", "shape", "norm", "rms", "max |Δ|"):
        by_tensor.add_column(column, justify="left" if column in ("tensor", "shape") else "right")
    for name, norm in sorted(norms.items(), key=lambda kv: -kv[1])[:top]:
        t = vector[name]
        by_tensor.add_row(
            name,
            "×".join(map(str, t.shape)),
            f"{norm:.4g}",
            f"{norm / math.sqrt(max(t.numel(), 1)):.3g}",
            f"{float(t.abs().max()) if t.numel() else 0.0:.3g}",
        )
    console.print(by_tensor)
