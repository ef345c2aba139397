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


# ``update`` and ``prime`` train data-parallel when started by ``accelerate launch`` / ``torchrun`` (the
# main process writes, the others wait); ``data`` and ``model`` only read (or convert under a lock).
# These write results that W processes would each compute alone, so they refuse a multi-process launch.
SINGLE_PROCESS_COMMANDS = ("eval", "bench", "vector")


def _not_printed_yet(record: logging.LogRecord) -> bool:
    """Whether a record still needs printing when it reaches the root logger: not if a handler on its way
    up printed it. huggingface_hub gives its logger a stderr handler of its own and lets records
    propagate too (transformers does the same when ``CI`` is set), so each of their warnings (e.g. every
    retry of a hub request) printed twice."""
    logger: logging.Logger | None = logging.getLogger(record.name)
    while logger is not None and logger is not logging.root:
        for other in logger.handlers:
            if not isinstance(other, logging.NullHandler) and record.levelno >= other.level:
                return False
        logger = logger.parent if logger.propagate else None
    return True


def _print_version(value: bool) -> None:
    if value:
        from flearning._version import __version__

        typer.echo(f"flearn {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Log warnings and errors only."),
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    from flearning.distributed import launched_processes

    processes = launched_processes()
    if processes > 1 and ctx.invoked_subcommand in SINGLE_PROCESS_COMMANDS:
        raise FlearnError(
            f"flearn {ctx.invoked_subcommand} runs on one process, but it was launched as {processes} "
            f"(WORLD_SIZE={processes}); only update and prime train data-parallel. "
            "Run it without accelerate launch / torchrun."
        )
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_not_printed_yet)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", handlers=[handler])
    # transformers and peft are chatty at INFO; keep their warnings only.
    for name in ("transformers", "peft", "accelerate", "urllib3", "filelock", "matplotlib"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))


# Each command module keeps its heavy imports (torch, transformers) inside its commands.
from flearning.cli import bench as _bench  # noqa: E402
from flearning.cli import clean as _clean  # noqa: E402
from flearning.cli import data as _data  # noqa: E402
from flearning.cli import eval as _eval  # noqa: E402
from flearning.cli import generate as _generate  # noqa: E402
from flearning.cli import model as _model  # noqa: E402
from flearning.cli import prime as _prime  # noqa: E402
from flearning.cli import update as _update  # noqa: E402
from flearning.cli import vector as _vector  # noqa: E402

app.add_typer(_data.data_app, name="data", help="Validate and summarise knowledge datasets.")
app.add_typer(_model.model_app, name="model", help="Inspect and prepare models.")
app.command("update", help="Replace old facts by new ones (forget, then learn).")(_update.update_command)
app.command("eval", help="Score a model on an editing dataset with every metric.")(_eval.eval_command)
app.command("generate", help="See the change: greedy continuations of prompts, before | after.")(
    _generate.generate_command
)
app.command("prime", help="Teach a model the old facts until it holds them.")(_prime.prime_command)
app.command("bench", help="Reproduce the paper's experiment: every method side by side.")(
    _bench.bench_command
)
app.add_typer(_vector.vector_app, name="vector", help="Compute, apply and inspect knowledge vectors.")
app.command("clean", help="Remove what killed runs left behind (hidden .NAME.tmp-… directories).")(
    _clean.clean_command
)


# Exit codes of an interrupted command: 128 + the signal's number, as a shell reports a process the signal
# killed. Both run the same clean-up (temporary directories removed, training state saved).
EXIT_SIGINT = 130
EXIT_SIGTERM = 143


class _TerminateAsInterrupt:
    """While installed, SIGTERM (what ``kill``, SLURM and Kubernetes send) raises ``KeyboardInterrupt`` in
    the main thread, so a terminated command cleans up and saves its training state exactly as after
    Ctrl-C instead of dying on the spot.

    Only the first SIGTERM interrupts. A second one, while that clean-up runs (it may hang, e.g. in a
    DDP broadcast whose peers are gone) or after something swallowed the ``KeyboardInterrupt``, restores
    the default action and re-sends SIGTERM to this process: it dies as an unhandled SIGTERM would (killed
    by signal 15), no SIGKILL needed. A SIGTERM inherited as ignored (``nohup``-like launchers) stays
    ignored, as Python leaves an ignored SIGINT alone. ``restore`` puts the previous handler back (it may
    be called more than once). Outside the main thread (where Python cannot set handlers) it does nothing.
    """

    def __init__(self) -> None:
        self.received = False
        self._previous = None
        self._active = False

    def _handle(self, signum, frame) -> None:
        import os
        import signal

        if self.received:  # the second SIGTERM: stop waiting for the clean-up
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        self.received = True
        raise KeyboardInterrupt("SIGTERM")

    def install(self) -> None:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return
        previous = signal.getsignal(signal.SIGTERM)
        if previous == signal.SIG_IGN:
            return
        self._previous = previous
        self._active = True  # before the handler: a SIGTERM right after it must find it restorable
        signal.signal(signal.SIGTERM, self._handle)

    def restore(self) -> None:
        import signal

        if self._active:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._active = False


def main(argv: list[str] | None = None) -> int:
    """Console entry point: run the app, print user errors without a traceback, exit 2 on them; exit 130
    after Ctrl-C (SIGINT) and 143 after SIGTERM, once the command has cleaned up.

    An interrupt that lands outside the command (while ``_run`` reports an error, after it returned, or
    while the handler is restored) is caught here too, so it never escapes as a traceback.
    """
    terminate = _TerminateAsInterrupt()
    try:
        try:
            terminate.install()
            code = _run(argv)
        finally:
            terminate.restore()
    except KeyboardInterrupt:
        terminate.restore()  # in case the interrupt landed inside the first restore
        code = EXIT_SIGINT
    if code == EXIT_SIGINT:
        typer.echo("terminated (SIGTERM)" if terminate.received else "aborted", err=True)
    return EXIT_SIGTERM if terminate.received and code == EXIT_SIGINT else code


def _run(argv: list[str] | None) -> int:
    try:
        # typer turns Ctrl-C into a returned 130 (not an exception) when not standalone
        result = app(args=argv, standalone_mode=False)
        if isinstance(result, int) and not isinstance(result, bool) and result:
            return result
    except FlearnError as err:
        typer.echo(f"error: {err}", err=True)
        return err.exit_code
    except typer.Exit as ex:
        return ex.exit_code
    except typer.Abort:
        return EXIT_SIGINT
    except Exception as ex:  # click usage errors (typer may vendor its own click: match by shape)
        if callable(getattr(ex, "show", None)) and isinstance(getattr(ex, "exit_code", None), int):
            ex.show()
            return ex.exit_code
        raise
    return 0
