"""The ``flearn`` command line.

Each area owns its commands in its own ``cli`` module; this file only wires them together and turns
user errors (``FlearnError``) into a clear message and exit code 2. Heavy libraries (torch,
transformers) are imported inside the commands, so ``flearn --help`` stays fast.
"""

from __future__ import annotations

import logging
import sys

import typer

from flearning.errors import FlearnError

app = typer.Typer(
    name="flearn",
    help="Update the factual knowledge of causal language models by forgetting before learning.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Log warnings and errors only."),
) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # transformers and peft are chatty at INFO; keep their warnings only.
    for name in ("transformers", "peft", "accelerate", "urllib3", "filelock", "matplotlib"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))


def _register() -> None:
    from flearning.data.cli import data_app
    from flearning.models_cli import model_app

    app.add_typer(data_app, name="data", help="Validate and summarise knowledge datasets.")
    app.add_typer(model_app, name="model", help="Inspect and prepare models.")
    try:
        from flearning.evaluation.cli import eval_command
    except ImportError:  # pragma: no cover - area not built yet
        pass
    else:
        app.command("eval", help="Score a model on an editing dataset with every metric.")(eval_command)
    try:
        from flearning.recipes.cli import update_command
    except ImportError:  # pragma: no cover
        pass
    else:
        app.command("update", help="Replace old facts by new ones (forget, then learn).")(update_command)
    try:
        from flearning.arithmetic.cli import vector_app
    except ImportError:  # pragma: no cover
        pass
    else:
        app.add_typer(vector_app, name="vector", help="Compute, apply and inspect knowledge vectors.")
    try:
        from flearning.recipes.bench_cli import bench_command
    except ImportError:  # pragma: no cover
        pass
    else:
        app.command("bench", help="Reproduce the paper's experiment: every method side by side.")(bench_command)


_register()


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app, print user errors without a traceback, exit 2 on them."""
    try:
        app(args=argv, standalone_mode=False)
    except FlearnError as err:
        typer.echo(f"error: {err}", err=True)
        return err.exit_code
    except typer.Exit as ex:
        return ex.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except Exception as ex:  # click usage errors
        import click

        if isinstance(ex, click.ClickException):
            ex.show()
            return ex.exit_code
        raise
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
