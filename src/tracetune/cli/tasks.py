"""``tracetune tasks ...``: generate verifiable tasks from task programs, and describe them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tracetune.cli.common import App, run_async

app = App(no_args_is_help=True)
out_console = Console()


def _programs_options(
    list_programs: Annotated[bool, typer.Option("--list", help="List the programs, exit.")] = False,
    config: Annotated[
        Path | None,
        typer.Option(
            help="YAML file with these options (keys: the field names, e.g. programs_modules); "
            "flags given override it."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Carries the options that are not config fields (never run)."""


def _programs(**values: Any) -> None:
    from tracetune.cli.options_from_config import config_from_options
    from tracetune.synth.programs import load_program_modules, registered_programs
    from tracetune.synth.programs.generate import ProgramsConfig, generate_tasks

    config_file, quiet = values.pop("config"), bool(values.pop("quiet"))
    if values.pop("list_programs"):
        load_program_modules(list(values.get("programs_modules") or []))
        table = Table("program", "tools", "what it draws")
        for name, prog in registered_programs().items():
            table.add_row(name, ", ".join(prog.tools), prog.description)
        out_console.print(table)
        return
    cfg = config_from_options(
        ProgramsConfig, values, config_file=config_file, what="tasks programs"
    )
    result, dataset = run_async(generate_tasks(cfg, progress=not quiet))
    out_console.print(result.summary())
    out_console.print(f"tasks: {dataset.root} ({len(dataset)} records)")


def _programs_command() -> None:
    """``tasks programs``: its options generated from ProgramsConfig's fields (declared
    there once), plus --list, --config and --quiet."""
    import inspect

    from tracetune.cli.options_from_config import command_function, config_params
    from tracetune.synth.programs.generate import ProgramsConfig

    shared = inspect.signature(_programs_options, eval_str=True).parameters.values()
    params = [
        *config_params(ProgramsConfig),
        *(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in shared),
    ]
    doc = """Generate tasks whose answers and tool chains are known by construction; rerunning
    skips the tasks already written."""
    app.command("programs")(command_function(_programs, params, doc))


_programs_command()


@app.command("stats")
def stats(
    path: Annotated[Path, typer.Argument(help="Task dataset directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Counts by family, variant and tool; gold chain lengths; image sizes."""
    from tracetune.schema import Task
    from tracetune.store import Dataset
    from tracetune.synth.programs.generate import task_stats

    dataset = Dataset.open(path, Task)
    report = task_stats(dataset)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    out_console.print(f"[bold]{report['tasks']}[/bold] tasks in {path}")
    for section in (
        "families",
        "variants",
        "gold_chain_tools",
        "gold_chain_length",
        "difficulty",
        "answer_kinds",
        "file_types",
    ):
        if not report[section]:
            continue
        table = Table(section.replace("_", " "), "count")
        for k, v in report[section].items():
            table.add_row(str(k), str(v))
        out_console.print(table)
    images = report["images"]
    if images["count"]:
        w, h = images["width"], images["height"]
        out_console.print(
            f"images: {images['count']}, width {w['min']}-{w['max']} (median {w['median']}), "
            f"height {h['min']}-{h['max']} (median {h['median']})"
        )
