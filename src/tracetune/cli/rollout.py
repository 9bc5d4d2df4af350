"""``tracetune rollout``: a teacher (the gold chains, or a model) rolls out tasks with gold
answers; trajectories that reach the gold answer are kept."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from tracetune.cli.common import RetryDroppedOpt, build_config, reports_errors, run_async

out_console = Console()


@reports_errors
def rollout(
    tasks: Annotated[Path | None, typer.Option(help="Task dataset dir with gold answers.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output directory (resumable).")] = None,
    teacher: Annotated[
        str | None,
        typer.Option(
            help="'gold' replays the gold tool chains, or a model spec (openai:NAME, local:PATH)."
        ),
    ] = None,
    action_format: Annotated[str | None, typer.Option(help="json, code or tools.")] = None,
    corpus: Annotated[
        Path | None,
        typer.Option(help="Search corpus (default: the one each task was written against)."),
    ] = None,
    tool_module: Annotated[
        list[str] | None, typer.Option(help="Module that registers tools (repeatable).")
    ] = None,
    samples: Annotated[int | None, typer.Option(help="Trajectories per task (models).")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Step budget (models).")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Max new tokens per step.")] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(help="Model requests in flight, and episodes run at once (default 2)."),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N tasks.")] = None,
    base_url: Annotated[str | None, typer.Option(help="OpenAI-compatible endpoint URL.")] = None,
    max_cost: Annotated[float | None, typer.Option(help="Stop after this many USD.")] = None,
    max_time: Annotated[
        str | None,
        typer.Option(help="Start no new item after this long (600, 10m, 1.5h); rerun resumes."),
    ] = None,
    require_tools: Annotated[
        bool | None,
        typer.Option(
            "--require-tools/--no-require-tools",
            help="Reject model trajectories that skip the gold chain's tools.",
        ),
    ] = None,
    keep_rejected: Annotated[
        bool | None,
        typer.Option(
            "--keep-rejected/--no-keep-rejected", help="Write failed trajectories to OUT/rejected."
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the gold thought templates.")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file with these options.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    retry_dropped: RetryDroppedOpt = None,
) -> None:
    """Roll out a teacher on tasks with gold answers; keep the trajectories that pass.

    Writes OUT (kept trajectories), OUT/verdicts (every verdict, with reasons), OUT/rejected.
    """
    from tracetune.rollout import RolloutConfig, rollout_summary, run_rollout

    # A dict, not ModelOptions: merged key by key into a YAML backend section.
    backend = {"base_url": base_url}
    from tracetune.timelimit import duration

    cfg = build_config(
        RolloutConfig,
        config,
        tasks=tasks,
        out=out,
        teacher=teacher,
        action_format=action_format,
        corpus=corpus,
        tool_modules=tool_module,
        samples=samples,
        max_steps=max_steps,
        temperature=temperature,
        max_tokens=max_tokens,
        concurrency=concurrency,
        limit=limit,
        max_cost_usd=max_cost,
        max_time=duration(max_time),
        require_tools=require_tools,
        keep_rejected=keep_rejected,
        seed=seed,
        backend=backend,
    )
    from tracetune.runner.outcome import retrying_dropped

    with retrying_dropped(retry_dropped):
        result, dataset = run_async(run_rollout(cfg, progress=not quiet))
    summary = rollout_summary(dataset)
    if as_json:
        typer.echo(json.dumps({"stage": result.summary(), **summary}, indent=2))
        return
    out_console.print(result.summary())
    table = Table("family", "passed", "total", "pass rate")
    for family, row in summary["by_family"].items():
        table.add_row(family, str(row["passed"]), str(row["total"]), f"{row['pass_rate']:.1%}")
    table.add_row(
        "[bold]all[/bold]",
        str(summary["passed"]),
        str(summary["total"]),
        f"{summary['pass_rate']:.1%}",
    )
    out_console.print(table)
    for reason, count in list(summary["failures"].items())[:8]:
        out_console.print(f"  {count} x {reason}", highlight=False)
    out_console.print(
        f"trajectories: {dataset.root} ({len(dataset)} kept); verdicts: {dataset.root / 'verdicts'}"
    )
