"""Options that many commands share, attached after the commands are built: a template
function declares them once (as typer options), and each target command gets its own copy."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import typer


def template_options(template: Callable[..., None]) -> list[Any]:
    """Fresh click parameters for ``template``'s options (a parameter belongs to one
    command), built by typer exactly as a command's own options are."""
    holder = typer.Typer(add_completion=False)  # else each target got --install-completion
    holder.command()(template)
    return list(typer.main.get_command(holder).params)


def attach_options(
    root: Any,
    targets: Iterable[tuple[str, str]],
    read_only: set[str],
    template: Callable[..., None],
    marker: str,
) -> list[str]:
    """Give the commands named by ``targets`` (``(group, command)``; command ``"*"``: every
    command of the group but the ``read_only`` ones; ``""``: the group's own command) the
    options of ``template``, unless they already have the option named ``marker``. Returns
    the commands that got them (``group command``)."""

    def add(command: Any) -> None:
        if not any(p.name == marker for p in command.params):
            command.params.extend(template_options(template))

    added = []
    for group_name, command_name in targets:
        target = root.commands.get(group_name)
        if target is None:
            continue
        if not command_name:
            add(target)
            added.append(group_name)
            continue
        for name, command in getattr(target, "commands", {}).items():
            if (command_name == "*" and name not in read_only) or name == command_name:
                if not hasattr(command, "commands"):
                    add(command)
                    added.append(f"{group_name} {name}")
    return added
