"""``--executor`` and the ``--ray-*`` options, given to every command that processes items.

The options are added to the commands once the command tree is built, so each command's
own code stays as it is: their values go to :mod:`tracetune.runner.executor`, which
:func:`~tracetune.runner.run_stage` consults, and lie over the ``executor:`` key of the
command's YAML (read by ``build_config``).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from tracetune.cli._attach import attach_options, template_options

# Commands whose stages process items: (group, command); "*" is every command of the group
# but those that only read (stats, report, render).
TARGETS: tuple[tuple[str, str], ...] = (
    ("synth", "*"),
    ("mmat", "*"),
    ("rollout", ""),
    ("agent", "run"),
    ("eval", "run"),
    ("prefs", "explore"),
    ("prefs", "build"),
    ("tasks", "programs"),
    ("run", "*"),
)
READ_ONLY = {"stats", "report", "render", "show"}


def _callback(name: str) -> Any:
    def store(value: Any) -> Any:
        from tracetune.errors import ConfigError
        from tracetune.runner import executor

        try:
            executor.set_flag(name, value)
        except ConfigError as exc:  # shown as a usage error of the flag
            raise typer.BadParameter(str(exc).split("\n", 1)[-1].strip()) from None
        return value

    return store


_PANEL = "Executor (where items are processed)"


def _template(
    executor: Annotated[
        str | None,
        typer.Option(
            "--executor",
            metavar="local|ray",
            expose_value=False,
            callback=_callback("kind"),
            rich_help_panel=_PANEL,
            help="local: in this process (the default); ray: in Ray actors, on a local Ray "
            "instance or the cluster of --ray-address (YAML key executor).",
        ),
    ] = None,
    ray_address: Annotated[
        str | None,
        typer.Option(
            "--ray-address",
            expose_value=False,
            callback=_callback("address"),
            rich_help_panel=_PANEL,
            help="Ray cluster to join: auto, HOST:PORT or ray://HOST:PORT (unset: start a "
            "local Ray instance). Implies --executor ray.",
        ),
    ] = None,
    ray_workers: Annotated[
        int | None,
        typer.Option(
            "--ray-workers",
            expose_value=False,
            callback=_callback("workers"),
            rich_help_panel=_PANEL,
            help="Ray actors to run (default: the cluster's CPUs / --ray-num-cpus).",
        ),
    ] = None,
    ray_num_cpus: Annotated[
        float | None,
        typer.Option(
            "--ray-num-cpus",
            expose_value=False,
            callback=_callback("num_cpus"),
            rich_help_panel=_PANEL,
            help="CPUs each Ray actor reserves (default 1).",
        ),
    ] = None,
    ray_num_gpus: Annotated[
        float | None,
        typer.Option(
            "--ray-num-gpus",
            expose_value=False,
            callback=_callback("num_gpus"),
            rich_help_panel=_PANEL,
            help="GPUs each Ray actor reserves (default 0; a local: model loads on it).",
        ),
    ] = None,
) -> None:
    """Carries the executor options (never run)."""


def add_executor_options(root: Any) -> list[str]:
    """Give the item-processing commands under ``root`` the executor options; returns the
    commands that got them (``group command``)."""
    return attach_options(root, TARGETS, READ_ONLY, _template, "executor")


def executor_params() -> list[Any]:
    """Fresh executor options for a command built outside the tree (``eval run NAME``)."""
    return template_options(_template)
