"""The ``tracetune`` command line: thin typer apps over the same pydantic configs."""

from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="tracetune",
    help="Tune vision-language models into robust tool-using agents.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)

# Each command group lives in its own module and imports heavy libraries (torch,
# transformers) inside its commands, so `tracetune --help` stays fast.
_GROUPS = {
    "agent": ("tracetune.cli.agent", "Run a tool-using agent on tasks."),
    "tools": ("tracetune.cli.tools", "List, inspect and run tools."),
    "model": ("tracetune.cli.model", "Build tiny test models; manage checkpoints."),
    "eval": ("tracetune.cli.eval", "Score predictions and run benchmarks."),
}

for _name, (_module, _help) in _GROUPS.items():
    try:
        _sub = importlib.import_module(_module).app
    except ModuleNotFoundError as exc:  # a group not built yet in this checkout
        if exc.name != _module:
            raise
        continue
    app.add_typer(_sub, name=_name, help=_help)

try:
    from tracetune.cli.quickstart import quickstart as _quickstart

    app.command("quickstart")(_quickstart)
except ModuleNotFoundError as exc:
    if exc.name != "tracetune.cli.quickstart":
        raise


@app.command("version")
def version() -> None:
    """Print the tracetune version."""
    from tracetune import __version__

    typer.echo(__version__)


def main() -> None:
    app()
