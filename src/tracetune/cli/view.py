"""``tracetune view DIR...``: browse datasets and runs in a local web app, or export them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tracetune.cli.common import fail, reports_errors


@reports_errors
def view(
    dirs: Annotated[
        list[Path],
        typer.Argument(
            help="Dataset folders, eval run folders, or folders above them (e.g. a "
            "quickstart output); every dataset and run found inside is shown."
        ),
    ],
    port: Annotated[int, typer.Option(help="Port to serve on.")] = 8765,
    host: Annotated[
        str, typer.Option(help="Address to bind (127.0.0.1: only this machine can connect).")
    ] = "127.0.0.1",
    export: Annotated[
        Path | None,
        typer.Option(
            "--export",
            help="Write every page as a static site into this folder instead of serving.",
        ),
    ] = None,
    page_size: Annotated[int, typer.Option(min=1, max=1000, help="Records per list page.")] = 50,
) -> None:
    """Browse tasks, trajectories, verdicts, pairs, dialogues, eval runs and run state.

    Read-only: nothing is ever written into the folders shown.
    """
    missing = [d for d in dirs if not d.exists()]
    if missing:
        fail(f"no such folder: {', '.join(map(str, missing))}")
    if export is not None:
        from tracetune.view.export import export_site

        result = export_site(dirs, export, page_size=page_size)
        typer.echo(
            f"wrote {result.pages} pages and {result.assets} assets to {result.out}; "
            f"open {result.out / 'index.html'}"
        )
        for problem in result.problems:
            typer.echo(f"skipped {problem}", err=True)
        return
    import uvicorn

    from tracetune.view.app import build_app

    app = build_app(dirs, page_size=page_size)
    typer.echo(f"tracetune view: http://{host}:{port}/index.html (Ctrl+C to stop)")
    uvicorn.run(app, host=host, port=port, log_level="warning")
