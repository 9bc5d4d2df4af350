"""``--mcp``: MCP servers whose tools join the registry, on every command that uses tools.

The option is added to the commands once the command tree is built (as the executor
options are), so each command's own code stays as it is. Servers are started while the
command line is read: one that fails to start, or lists a malformed tool, is reported as a
usage error before any work begins. A command's YAML may name servers too
(``mcp_servers:``, read by ``build_config``).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from tracetune.cli._attach import attach_options, template_options

# Commands that load tools: (group, command); "*" is every command of the group.
TARGETS: tuple[tuple[str, str], ...] = (
    ("tools", "list"),
    ("tools", "run"),
    ("synth", "*"),
    ("rollout", ""),
    ("agent", "run"),
    ("eval", "run"),
    ("prefs", "explore"),
    ("prefs", "build"),
    ("run", "*"),
    # Rendering prompts and `tools` columns of records whose tools came from MCP servers.
    ("train", "*"),
    ("export", ""),
)
READ_ONLY = {"stats", "report", "render", "show"}

MCP_HELP = (
    "MCP server whose tools to add (repeatable): a command line started over stdio "
    "('python server.py --flag'), a streamable HTTP URL ('http://127.0.0.1:8000/mcp'), or "
    "a JSON object of server fields (command/url, prefix, tools, timeout_s, env, ...). Its "
    "tools are named like built-in ones; the tool name 'mcp' stands for all of them."
)


def connect_servers(values: list[Any], where: str = "") -> None:
    """Start ``values`` (``--mcp`` texts or ``mcp_servers:`` entries) now; raises
    ``ConfigError`` with one clear message when a server is wrong or fails to start."""
    from tracetune.errors import ConfigError
    from tracetune.tools import mcp

    try:
        mcp.connect(values)
    except (ConfigError, mcp.McpServerError) as exc:
        raise ConfigError(f"{where}{exc}") from None


def _store(value: list[str] | None) -> list[str] | None:
    from tracetune.errors import ConfigError

    if value:
        try:
            connect_servers(list(value))
        except ConfigError as exc:  # shown as a usage error of --mcp
            raise typer.BadParameter(str(exc)) from None
    return value


def _template(
    mcp: Annotated[
        list[str] | None,
        typer.Option(
            "--mcp",
            metavar="CMD|URL|JSON",
            expose_value=False,
            callback=_store,
            help=MCP_HELP,
        ),
    ] = None,
) -> None:
    """Carries the --mcp option (never run)."""


def add_mcp_options(root: Any) -> list[str]:
    """Give the commands under ``root`` that load tools the ``--mcp`` option; returns the
    commands that got it (``group command``)."""
    return attach_options(root, TARGETS, READ_ONLY, _template, "mcp")


def mcp_params() -> list[Any]:
    """A fresh ``--mcp`` option for a command built outside the tree (``eval run NAME``)."""
    return template_options(_template)
