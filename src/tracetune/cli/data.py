"""``tracetune data ...``: check dataset directories."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tracetune.cli.common import App

app = App(no_args_is_help=True)
out_console = Console()


@app.command("check")
def check(
    directory: Annotated[Path, typer.Argument(help="A dataset directory written by tracetune.")],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only report; change nothing.")
    ] = False,
) -> None:
    """Confirm that every item marked done has its records on disk; put back to pending
    those that don't (a rerun of the same command then redoes them). Exit status 1 when
    --dry-run finds problems."""
    from tracetune.store.check import check_dataset

    report = check_dataset(directory, repair=not dry_run)
    out_console.print(report.summary(), highlight=False, markup=False)
    if dry_run and not report.ok:
        raise typer.Exit(1)
