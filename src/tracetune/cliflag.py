"""Command-line metadata for config fields, read by ``tracetune.cli.options_from_config``.

A config model stays plain pydantic; a field that the command line names differently, reads
as text or sets another way carries ``Annotated[..., CliFlag(...)]``. This module imports
nothing, so a config model of any layer can use it.
"""

from __future__ import annotations


class CliFlag:
    """Command-line metadata of a config field, for ``Annotated[...]``: the flags that name
    it (default ``--field-name``; the first is the one ``--help`` and errors show), the type
    its text is read as (``text=True``: ``str``, for a field whose validator parses text,
    such as a duration), or ``skip`` for a field the command line sets another way."""

    def __init__(
        self,
        *flags: str,
        text: bool = False,
        skip: bool = False,
        metavar: str | None = None,
    ) -> None:
        self.flags = flags
        self.text = text
        self.skip = skip
        self.metavar = metavar


__all__ = ["CliFlag"]
