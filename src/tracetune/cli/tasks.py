"""``tracetune tasks ...``: generate verifiable tasks from task programs, and describe them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tracetune.cli.common import App, build_config, run_async, split_names

app = App(no_args_is_help=True)
out_console = Console()


@app.command("programs")
def programs(
    out: Annotated[Path | None, typer.Option(help="Output task dataset directory.")] = None,
    n: Annotated[int | None, typer.Option(help="How many tasks to generate.")] = None,
    seed: Annotated[int | None, typer.Option(help="Run seed (same seed, same tasks).")] = None,
    families: Annotated[
        str | None, typer.Option(help="Comma-separated program names (default: all; see --list).")
    ] = None,
    programs_module: Annotated[
        list[str] | None,
        typer.Option(help="Module that registers your own programs with @program (repeatable)."),
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Rendering processes.")] = None,
    list_programs: Annotated[bool, typer.Option("--list", help="List the programs, exit.")] = False,
    config: Annotated[Path | None, typer.Option(help="YAML file with these options.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Generate tasks whose answers and tool chains are known by construction; rerunning
    skips the tasks already written."""
    from tracetune.synth.programs import load_program_modules, registered_programs
    from tracetune.synth.programs.generate import ProgramsConfig, generate_tasks

    if list_programs:
        load_program_modules(programs_module or [])
        table = Table("program", "tools", "what it draws")
        for name, prog in registered_programs().items():
            table.add_row(name, ", ".join(prog.tools), prog.description)
        out_console.print(table)
        return
    cfg = build_config(
        ProgramsConfig,
        config,
        out=out,
        n=n,
        seed=seed,
        families=split_names(families),
        programs_modules=programs_module,
        workers=workers,
    )
    result, dataset = run_async(generate_tasks(cfg, progress=not quiet))
    out_console.print(result.summary())
    out_console.print(f"tasks: {dataset.root} ({len(dataset)} records)")


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
