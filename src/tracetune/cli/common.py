"""Shared CLI plumbing: YAML configs filled by flags, and readable errors."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, ParamSpec, TypeVar

import click
import typer
import yaml
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from tracetune.errors import BAD_INPUT_EXIT, ConfigError, TracetuneError

C = TypeVar("C", bound=BaseModel)
T = TypeVar("T")
P = ParamSpec("P")
console = Console(stderr=True, soft_wrap=True)  # paths in messages stay whole, copyable


def _unset(value: Any) -> bool:
    return value is None or value == [] or value == ()


def merge_flags(data: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """``data`` with the flags that were set laid over it. A dict of flags merges into its
    section key by key, so one nested flag does not wipe the rest of a YAML section."""
    out = dict(data)
    for key, value in flags.items():
        if isinstance(value, dict):
            section = out.get(key)
            merged = merge_flags(section if isinstance(section, dict) else {}, value)
            if merged or key in out:
                out[key] = merged
        elif not _unset(value):
            out[key] = value
    return out


def build_config(cls: type[C], config: Path | None, **flags: Any) -> C:
    """The config from a YAML file (if given), with flags that were set taking precedence."""
    data = merge_flags(read_config_file(cls, config), flags)
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        lines = [_error_line(err) for err in exc.errors()]
        fail(f"invalid {cls.__name__}:\n" + "\n".join(lines))
        raise  # unreachable


def read_config_file(cls: type[BaseModel], config: Path | None) -> dict[str, Any]:
    """The mapping a YAML config file holds for ``cls`` (empty without a file); its
    ``executor:`` and ``mcp_servers:`` keys, where ``cls`` has no such field, are applied
    here (where the stages run, MCP servers whose tools join the registry)."""
    data: dict[str, Any] = {}
    if config is not None:
        if not config.is_file():
            fail(f"config file {config} does not exist")
        from tracetune.inputs import InputError, read_text

        try:
            loaded = yaml.safe_load(read_text(config)) or {}
        except InputError as exc:  # not UTF-8: named, with the line of the first bad byte
            fail(str(exc))
        except yaml.YAMLError as exc:
            fail(f"{config} is not valid YAML: {' '.join(str(exc).split())}")
        if not isinstance(loaded, dict):
            fail(f"{config} must hold a mapping of option names to values")
        data.update(loaded)
    if "executor" in data and "executor" not in cls.model_fields:
        from tracetune.runner import executor

        try:  # where the stages run: not a field of the stage's own config
            executor.apply_yaml(data.pop("executor"))
        except ConfigError as exc:
            raise ConfigError(f"{config}: {exc.message}") from None
    if "mcp_servers" in data and "mcp_servers" not in cls.model_fields:
        from tracetune.cli.mcp_options import connect_servers

        servers = data.pop("mcp_servers") or []
        # MCP servers whose tools join the registry: not a field of the stage's config
        connect_servers(servers if isinstance(servers, list) else [servers], f"{config}: ")
    return data


def _error_line(err: Any) -> str:
    where = ".".join(str(p) for p in err["loc"])
    # A model validator's error belongs to no one field: its message says what is wrong.
    message = str(err["msg"]).removeprefix("Value error, ")
    return f"  {where}: {message}" if where else f"  {message}"


RetryDroppedOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--retry-dropped",
        metavar="REASON",
        help="Process again the items this command's stages dropped for REASON (a drop reason "
        "as the stats list it, or its first words; repeatable), asking the model afresh "
        "instead of reading its cached reply.",
    ),
]


def split_names(value: str | None) -> list[str] | None:
    """A comma-separated flag (``--tools ocr,calculator``) as a list; None when not given."""
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def fail(message: str, code: int = BAD_INPUT_EXIT, hint: str | None = None) -> None:
    """Print ``error: message`` (and ``hint: hint``) and exit with ``code``."""
    # Messages quote user input and data (e.g. "[x1, y1, x2, y2]"): never read them as markup.
    console.print(f"[red]error:[/red] {escape(message)}")
    if hint:
        console.print(f"[yellow]hint:[/yellow] {escape(hint)}")
    raise typer.Exit(code)


def report_error(exc: TracetuneError) -> None:
    """Print a user error (its message and hint) and exit with its exit status."""
    message = getattr(exc, "message", None) or BaseException.__str__(exc) or type(exc).__name__
    fail(str(message), code=exc.exit_code, hint=exc.hint)


def _run_reporting_errors(invoke: Callable[[], T]) -> T:
    """``invoke()``, with its errors turned into exit statuses; the one rule for commands:

    - A :class:`~tracetune.errors.TracetuneError` (bad input or configuration) prints
      ``error: <message>`` and ``hint: <hint>``, no traceback, and exits with its
      ``exit_code``: :data:`~tracetune.errors.BAD_INPUT_EXIT` (2), or
      :data:`~tracetune.errors.ITEMS_FAILED_EXIT` (3) for a stage that aborted because too
      many items failed. A full disk is reported the same way, whatever raised it.
    - Any other exception is a bug: it propagates with its traceback (exit status 1).
    """
    from tracetune.runner import outcome

    try:
        return invoke()
    except (typer.Exit, typer.Abort, click.exceptions.ClickException):
        raise
    except Exception as exc:
        if (why := outcome.disk_full(exc)) is not None:  # whatever layer hit it
            fail(f"the disk is full ({why})", hint=outcome.DISK_FULL_HINT)
        if isinstance(exc, TracetuneError):  # the user can fix it: no traceback
            report_error(exc)
        raise  # a bug: its traceback is what to report


def reports_errors(command: Callable[P, T]) -> Callable[P, T]:
    """A command function that reports errors by :func:`_run_reporting_errors` itself, for
    the commands registered on the root (``tracetune rollout``), so the rule holds also
    where the function is put into another Typer app."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> T:
        return _run_reporting_errors(lambda: command(*args, **kwargs))

    return run


class ReportingCommand(TyperCommand):
    """A command whose errors become exit statuses (see :func:`_run_reporting_errors`),
    also when its app is run on its own rather than under ``tracetune``."""

    def invoke(self, ctx: Any) -> Any:
        return _run_reporting_errors(lambda: super(ReportingCommand, self).invoke(ctx))


class ReportingGroup(TyperGroup):
    """A command group whose errors become exit statuses (see
    :func:`_run_reporting_errors`)."""

    def invoke(self, ctx: Any) -> Any:
        return _run_reporting_errors(lambda: super(ReportingGroup, self).invoke(ctx))


class App(typer.Typer):
    """The ``typer.Typer`` of every tracetune command group: its commands and the group
    report errors by one rule (:func:`_run_reporting_errors`), wherever they are run from."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("cls", ReportingGroup)
        super().__init__(**kwargs)

    def command(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["cls"] = kwargs.get("cls") or ReportingCommand
        return super().command(*args, **kwargs)


class CommandGroup(ReportingGroup):
    """The root command group: errors become exit statuses as in every group
    (:func:`_run_reporting_errors`), and after any command failed items decide the exit
    status: every stage records its result (:mod:`tracetune.runner.outcome`); a command that
    leaves items failed prints them with their reasons and exits with
    :data:`~tracetune.errors.ITEMS_FAILED_EXIT` (3).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from tracetune.cli.executor_options import add_executor_options

        add_executor_options(self)  # --executor, --ray-address... on item-processing commands

    def invoke(self, ctx: Any) -> Any:
        from tracetune.runner import executor, outcome

        outcome.reset()
        executor.reset_command()
        value = super().invoke(ctx)
        if (report := outcome.failure_report()) is not None:
            console.print(f"[red]error:[/red] {escape(report)}")
            raise typer.Exit(outcome.ITEMS_FAILED_EXIT)
        return value


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine on uvloop (less CPU per HTTP call; measured in
    bench/RESULTS.md), falling back to asyncio where uvloop is not installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
