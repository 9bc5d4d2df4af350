"""The errors a user can fix, and the exit status of every command.

Every error that reports bad user input (a config value, a file, a command-line argument, a
model reply that a stage cannot use) derives from :class:`TracetuneError`. It carries a
message that says what is wrong and an optional ``hint`` that says how to fix it. The command
line catches it in one place, prints ``error: <message>`` and ``hint: <hint>`` and exits with
:data:`BAD_INPUT_EXIT`; any other exception is a bug and keeps its traceback
(:data:`CRASH_EXIT`).

Domain errors keep their builtin base as well (``class DatasetError(TracetuneError,
ValueError)``), so code that catches ``ValueError`` keeps working. From Python::

    import tracetune

    try:
        tracetune.Dataset.open("runs/missing")
    except tracetune.TracetuneError as exc:
        print(exc.message, exc.hint)

This module imports nothing from tracetune: every layer can use it.
"""

from __future__ import annotations

OK_EXIT = 0
"""Exit status of a command that processed every item (written, already done, or dropped for
a counted reason)."""

CRASH_EXIT = 1
"""Exit status of an unexpected crash: a bug, printed with its traceback."""

BAD_INPUT_EXIT = 2
"""Exit status of bad input or configuration (a :class:`TracetuneError`): the message says
what to change."""

ITEMS_FAILED_EXIT = 3
"""Exit status of a command in which items failed (recorded as failed, retried on a rerun),
whether the command finished the other items or aborted because too many failed."""


class TracetuneError(Exception):
    """An error the user can fix: ``message`` says what is wrong, ``hint`` (optional) how to
    fix it. ``str()`` shows both. A subclass may set a class-level ``hint`` as its default,
    and ``exit_code``, the exit status of a command that stops on it (default
    :data:`BAD_INPUT_EXIT`)."""

    hint: str | None = None
    exit_code: int = BAD_INPUT_EXIT

    def __init__(self, message: str = "", *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint

    def __reduce__(self) -> tuple[object, ...]:
        # Rebuilt without calling __init__, so subclasses whose __init__ takes other
        # arguments (a path, a reason) cross process boundaries intact, hint included.
        state = dict(self.__dict__)
        if isinstance(self, OSError):  # errno and the file names are slots, not in __dict__
            state.update(errno=self.errno, filename=self.filename, filename2=self.filename2)
        return (_rebuild, (type(self), self.args, state))

    def __str__(self) -> str:
        # the message as given (KeyError's own str() would quote it)
        message = getattr(self, "message", None)
        if not isinstance(message, str):
            message = super().__str__()
        return f"{message}\nhint: {self.hint}" if self.hint else message


def _rebuild(
    cls: type[TracetuneError], args: tuple[object, ...], state: dict[str, object]
) -> TracetuneError:
    exc = cls.__new__(cls, *args)
    exc.args = args
    for name, value in state.items():
        setattr(exc, name, value)
    return exc


class ConfigError(TracetuneError, ValueError):
    """A config value, YAML config file or command-line option that is not valid."""


class InputFileError(TracetuneError, FileNotFoundError):
    """A file or directory the user named that does not exist."""


class MissingPackage(TracetuneError, ModuleNotFoundError):
    """An optional package that a feature needs is not installed; the message names the
    feature and the hint the ``pip install`` command."""


__all__ = [
    "OK_EXIT",
    "CRASH_EXIT",
    "BAD_INPUT_EXIT",
    "ITEMS_FAILED_EXIT",
    "TracetuneError",
    "ConfigError",
    "InputFileError",
    "MissingPackage",
]
