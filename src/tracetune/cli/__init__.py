"""The ``tracetune`` command line: thin typer apps over the same pydantic configs."""

from __future__ import annotations

import importlib

import typer

from tracetune.cli.common import App, CommandGroup


class _Root(CommandGroup):
    """The root group, with ``--mcp`` on every command that loads tools."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        from tracetune.cli.mcp_options import add_mcp_options

        add_mcp_options(self)


app = App(
    name="tracetune",
    cls=_Root,
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
    "tasks": ("tracetune.cli.tasks", "Generate verifiable task programs; task statistics."),
    "train": ("tracetune.cli.train", "SFT and step-wise DPO of VLM controllers."),
    "model": ("tracetune.cli.model", "Build tiny test models; merge adapters."),
    "eval": (
        "tracetune.cli.eval",
        "Run benchmarks, score predictions with their official rules, write reports.",
    ),
    "synth": ("tracetune.cli.synth", "M-TRACE synthesis: queries, files, verified trajectories."),
    "pool": ("tracetune.cli.pool", "Build the image pool that file association retrieves from."),
    "prefs": ("tracetune.cli.prefs", "Step-wise exploration, preference pairs and their stats."),
    "mmat": ("tracetune.cli.mmat", "MMAT data engine: QA to RR/ORR rationale dialogues."),
    "run": ("tracetune.cli.run", "Whole pipelines from one config (the MATRIX loop)."),
    "data": ("tracetune.cli.data", "Check dataset directories against their run state."),
}

for _name, (_module, _help) in _GROUPS.items():
    app.add_typer(importlib.import_module(_module).app, name=_name, help=_help)

from tracetune.cli.io import export_cmd, import_cmd  # noqa: E402
from tracetune.cli.quickstart import quickstart  # noqa: E402
from tracetune.cli.rollout import rollout  # noqa: E402
from tracetune.cli.serve import serve_cmd  # noqa: E402
from tracetune.cli.view import view  # noqa: E402

app.command("rollout")(rollout)
app.command("export")(export_cmd)
app.command("import")(import_cmd)
app.command("quickstart")(quickstart)
app.command("view")(view)
app.command("serve")(serve_cmd)


@app.command("version")
def version() -> None:
    """Print the tracetune version."""
    from tracetune import __version__

    typer.echo(__version__)


def main() -> None:
    """The ``tracetune`` command. Errors become exit statuses in one place,
    :class:`~tracetune.cli.common.CommandGroup` (every command runs inside it): a
    :class:`~tracetune.errors.TracetuneError` prints its message and hint, anything else
    its traceback."""
    app()
