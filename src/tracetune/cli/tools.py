"""``tracetune tools ...``: list the registered tools and run one by hand."""

from __future__ import annotations

import filecmp
import importlib
import json
import shutil
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tracetune.cli.common import App, fail, run_async

app = App(no_args_is_help=True)
out_console = Console()

_MODULE_HELP = "Import this module first, so the tools it registers are listed (repeatable)."


def _import_modules(modules: list[str] | None) -> None:
    for module in modules or []:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            fail(f"cannot import tool module {module!r}: {exc}")


@app.command("list")
def list_tools(
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the OpenAI `tools` array.")
    ] = False,
    module: Annotated[list[str] | None, typer.Option(help=_MODULE_HELP)] = None,
    sandbox: Annotated[
        bool, typer.Option(help="Also start a code sandbox and show its active layers.")
    ] = True,
) -> None:
    """Show every registered tool: signature, output type, and whether it can run here;
    then the code sandbox's active isolation layers."""
    from tracetune.tools import registered_tools

    _import_modules(module)
    tools = registered_tools()
    if as_json:
        typer.echo(json.dumps([t.openai_schema() for t in tools.values()], indent=2))
        return
    table = Table(title=f"{len(tools)} tools", show_lines=False)
    table.add_column("name", style="bold")
    table.add_column("signature")
    table.add_column("output")
    table.add_column("available")
    for name, tool in tools.items():
        ok, why = tool.available()
        table.add_row(
            name,
            tool.signature(),
            tool.output_type,
            "[green]yes[/green]" if ok else f"[yellow]{why}[/yellow]",
        )
    out_console.print(table)
    if sandbox:
        _print_layers(run_async(_probe_sandbox()))


async def _probe_sandbox() -> dict[str, Any]:
    from tracetune.sandbox import SandboxError, probe

    try:
        return await probe()
    except SandboxError as exc:
        fail(f"the code sandbox does not start here: {exc}")
        raise


def _print_layers(isolation: dict[str, Any]) -> None:
    from tracetune.sandbox import isolation_level, layers

    table = Table(title=f"code sandbox: level {isolation_level(isolation)}")
    table.add_column("layer", style="bold")
    table.add_column("active")
    table.add_column("detail")
    for name, on, detail in layers(isolation):
        table.add_row(name, "[green]yes[/green]" if on else "[yellow]no[/yellow]", detail)
    out_console.print(table)


@app.command("sandbox")
def sandbox_layers(
    min_level: Annotated[
        str | None,
        typer.Option(
            help="Exit with status 1 if the sandbox is below this level (basic, standard, strict)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Start a code sandbox and show which isolation layers are active on this machine."""
    from tracetune.sandbox import LEVELS, isolation_level, layers

    if min_level is not None and min_level not in LEVELS:
        fail(f"--min-level {min_level!r}: choose one of {', '.join(LEVELS)}")
    isolation = run_async(_probe_sandbox())
    level = isolation_level(isolation)
    if as_json:
        rows = [{"layer": n, "active": on, "detail": d} for n, on, d in layers(isolation)]
        typer.echo(json.dumps({"level": level, "layers": rows}, indent=2))
    else:
        _print_layers(isolation)
    if min_level is not None and list(LEVELS).index(level) < list(LEVELS).index(min_level):
        fail(f"the sandbox reaches level {level!r}, below the required {min_level!r}", code=1)


def parse_value(raw: str, schema: dict[str, Any]) -> Any:
    """A ``--arg`` value for a parameter of the given JSON schema.

    Arrays may be written as JSON (``[10, 20, 30, 40]``), bare (``10,20,30,40``), or for
    text items separated by semicolons (``x + y = 3; x - y = 1``). Everything else is
    passed as text and coerced by the tool's own argument validation.
    """
    kind = schema.get("type")
    if kind == "array":
        for text in (raw, f"[{raw}]"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(value, list):
                return value
        return [part.strip() for part in raw.split(";") if part.strip()]
    if kind == "object":
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            fail(f"{raw!r} is not a JSON object")
    return raw


def _bring_in(path: Path, workdir: Path) -> str:
    """The file's name inside the working directory, copying it in when it lives elsewhere."""
    if not path.is_file():
        fail(f"{path} is not a file")
    full, root = path.resolve(), workdir.resolve()
    if root in full.parents:
        return full.relative_to(root).as_posix()
    target = root / full.name
    if target.exists() and not filecmp.cmp(full, target, shallow=False):
        fail(f"{target} already exists and differs from {path}; rename one of them")
    if not target.exists():
        shutil.copyfile(full, target)
    return full.name


def _unique(workdir: Path, stem: str) -> Path:
    path, n = workdir / f"{stem}.png", 1
    while path.exists():
        path, n = workdir / f"{stem}_{n}.png", n + 1
    return path


def parse_options(option: list[str] | None, corpus: Path | None) -> dict[str, Any]:
    """Tool options from ``--option tool.key=value`` flags and ``--corpus``."""
    options: dict[str, Any] = {}
    for item in option or []:
        key, sep, raw = item.partition("=")
        tool_name, dot, field = key.partition(".")
        if not sep or not dot or not tool_name or not field:
            fail(f"--option must look like TOOL.KEY=VALUE (e.g. search.mode=bm25), got {item!r}")
        try:
            value: Any = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        options.setdefault(tool_name, {})[field] = value
    if corpus is not None:
        if not corpus.exists():
            fail(f"corpus {corpus} does not exist")
        options.setdefault("search", {})["corpus"] = str(corpus.resolve())
    return options


@app.command("run")
def run_tool(
    name: Annotated[str, typer.Argument(help="Tool name, or package.module:attr for your own.")],
    arg: Annotated[
        list[str] | None,
        typer.Option(
            "--arg", "-a", help="Argument as KEY=VALUE (repeatable); arrays as JSON or 1,2,3."
        ),
    ] = None,
    image: Annotated[
        list[Path] | None,
        typer.Option(
            help="Image to use (repeatable); copied into the workdir, and passed as `image` "
            "when the tool takes one and --arg did not set it."
        ),
    ] = None,
    file: Annotated[
        list[Path] | None,
        typer.Option(help="Any file to use; like --image but fills a `path` argument."),
    ] = None,
    workdir: Annotated[
        Path,
        typer.Option(
            help="Working directory: tool file arguments are names in it, results are saved in it."
        ),
    ] = Path("."),
    model: Annotated[
        str | None,
        typer.Option(
            help="Model for visual_qa/caption/inspect_file questions: openai:NAME or local:PATH."
        ),
    ] = None,
    base_url: Annotated[
        str | None,
        typer.Option(
            help="OpenAI-compatible endpoint for --model openai:NAME (default $OPENAI_BASE_URL)."
        ),
    ] = None,
    corpus: Annotated[
        Path | None,
        typer.Option(help="Corpus for `search`: a folder of .txt/.md/.pdf files or a .jsonl."),
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(help="Tool option as TOOL.KEY=VALUE, e.g. object_localization.model=DIR."),
    ] = None,
    module: Annotated[list[str] | None, typer.Option(help=_MODULE_HELP)] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print text, data and saved files as JSON.")
    ] = False,
) -> None:
    """Run one tool and print its result; returned images are saved in the workdir."""
    from tracetune.tools import ToolContext, get_tool

    _import_modules(module)
    tool = get_tool(name)  # an unknown or unloadable name raises UnknownToolError
    workdir.mkdir(parents=True, exist_ok=True)
    props: dict[str, Any] = tool.parameters.get("properties", {})
    arguments: dict[str, Any] = {}
    for item in arg or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            fail(f"--arg must look like KEY=VALUE, got {item!r}")
        if key not in props:
            fail(f"{tool.name} has no argument {key!r}; it takes: {', '.join(props) or 'none'}")
        value = parse_value(raw, props[key])
        if key in arguments and isinstance(arguments[key], list) and isinstance(value, list):
            arguments[key] = arguments[key] + value  # repeated --arg appends to a list
        else:
            arguments[key] = value
    for paths, param in ((image, "image"), (file, "path")):
        names = [_bring_in(p, workdir) for p in paths or []]
        if names and param in props and param not in arguments:
            arguments[param] = names[0]
    options = parse_options(option, corpus)
    chat_model = None
    if model:
        from tracetune.models.base import ModelOptions, load_model

        chat_model = load_model(model, ModelOptions(base_url=base_url))
    ctx = ToolContext(workdir=workdir.resolve(), model=chat_model, options=options)

    async def call() -> Any:
        try:
            return await tool.acall(ctx, arguments)
        finally:
            if chat_model is not None:
                await chat_model.aclose()

    result = run_async(call())  # a ToolError (ToolUnavailable names the extra) is reported
    saved = []
    for i, img in enumerate(result.images):
        path = _unique(workdir, f"{tool.name}_{i}" if len(result.images) > 1 else tool.name)
        img.save(path)
        saved.append(str(path))
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "text": result.text,
                    "data": result.data,
                    "images": saved,
                    "files": [str(f) for f in result.files],
                    "final": result.final,
                },
                indent=2,
                ensure_ascii=False,
                default=str,
            )
        )
        return
    if result.text:
        typer.echo(result.text)
    for saved_path in saved:
        typer.echo(f"saved image: {saved_path}")
