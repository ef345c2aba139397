"""``flearn clean``: list and remove what killed runs left behind (``io.output.clean``).

A command killed while it writes its output leaves a hidden ``.OUT.tmp-XXXXXXXX`` beside it (as big as the
output: a model), or ``.OUT.old-XXXXXXXX`` holding the previous output when the kill cut a replacement
between its two renames. The next run of the same output removes its own; this removes every one under a
directory, putting a previous output back where the replacement was cut, and keeps those a running
command may be writing (it holds the output's lock).
"""

from __future__ import annotations

from pathlib import Path

import typer


def _size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"  # pragma: no cover


def clean_command(
    directories: list[Path] = typer.Argument(
        None, help="Directories to search, subdirectories included (default: the current one)."
    ),
    dry_run: bool = typer.Option(False, "--dry-run", "-n", help="Only list what would be done."),
) -> None:
    """Remove the temporary directories killed runs left (.NAME.tmp-…, .NAME.old-…), keeping a running
    command's; a previous output left aside by a cut replacement is put back."""
    from flearning.errors import FlearnError
    from flearning.io.locks import describe_holder
    from flearning.io.output import clean

    freed, count = 0, 0
    for directory in directories or [Path(".")]:
        if not directory.expanduser().is_dir():
            raise FlearnError(f"{directory}: no such directory")
        for item in clean(directory, dry_run=dry_run):
            path, output, size = item["path"], item["output"], _size(item["bytes"])
            if item["action"] == "kept":
                holder = item.get("holder")
                by = describe_holder(holder) if isinstance(holder, dict) else "a running process"
                typer.echo(f"keeping {path}: {output} is being written by {by}")
                continue
            count += 1
            freed += item["bytes"]
            if item["action"] == "put back":
                typer.echo(f"{'would put back' if dry_run else 'put back'} {path / 'previous'} as {output}")
            else:
                verb = "would remove" if dry_run else "removed"
                typer.echo(f"{verb} {path} ({size}, left by an interrupted write of {output})")
    if count == 0:
        typer.echo("nothing to clean")
    else:
        typer.echo(
            f"{count} left behind by killed runs, {_size(freed)}{' (dry run)' if dry_run else ' freed'}"
        )
