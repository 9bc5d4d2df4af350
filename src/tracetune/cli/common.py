"""Shared CLI plumbing: YAML configs filled by flags, and readable errors."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import typer
import yaml
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.markup import escape

C = TypeVar("C", bound=BaseModel)
T = TypeVar("T")
console = Console(stderr=True)


def build_config(cls: type[C], config: Path | None, **flags: Any) -> C:
    """The config from a YAML file (if given), with flags that were set taking precedence."""
    data: dict[str, Any] = {}
    if config is not None:
        if not config.is_file():
            fail(f"config file {config} does not exist")
        loaded = yaml.safe_load(config.read_text()) or {}
        if not isinstance(loaded, dict):
            fail(f"{config} must hold a mapping of option names to values")
        data.update(loaded)
    data.update({k: v for k, v in flags.items() if v is not None and v != [] and v != ()})
    try:
        return cls.model_validate(data)
    except ValidationError as exc:
        lines = [f"  {'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()]
        fail(f"invalid {cls.__name__}:\n" + "\n".join(lines))
        raise  # unreachable


def fail(message: str, code: int = 2) -> None:
    # Messages quote user input and data (e.g. "[x1, y1, x2, y2]"): never read them as markup.
    console.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine on uvloop (less CPU per HTTP call; measured in
    bench/RESULTS.md), falling back to asyncio where uvloop is not installed."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)
