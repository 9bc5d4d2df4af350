"""``tracetune agent ...``: run a tool-using agent."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.panel import Panel

from tracetune.cli.common import App, build_config, run_async, split_names

app = App(no_args_is_help=True)
out_console = Console()


@app.command("run")
def run(
    model: Annotated[
        str | None, typer.Option(help="Controller: openai:NAME or local:PATH.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output trajectory dataset directory.")] = None,
    task: Annotated[str | None, typer.Option(help="One task's query text.")] = None,
    image: Annotated[list[Path] | None, typer.Option(help="Image for --task (repeatable).")] = None,
    tasks: Annotated[Path | None, typer.Option(help="Task dataset dir or JSONL file.")] = None,
    tools: Annotated[str | None, typer.Option(help="Comma-separated tool names.")] = None,
    action_format: Annotated[str | None, typer.Option(help="json, code or tools.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Step budget per episode.")] = None,
    max_errors: Annotated[int | None, typer.Option(help="Failed steps allowed.")] = None,
    samples: Annotated[int | None, typer.Option(help="Trajectories per task.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Max new tokens per step.")] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(help="Model requests in flight, and episodes run at once (default 4)."),
    ] = None,
    base_url: Annotated[str | None, typer.Option(help="OpenAI-compatible endpoint URL.")] = None,
    adapter: Annotated[
        Path | None, typer.Option(help="LoRA adapter dir for local: models.")
    ] = None,
    max_cost: Annotated[float | None, typer.Option(help="Stop after this many USD.")] = None,
    no_stop: Annotated[
        bool,
        typer.Option(
            "--no-stop",
            help="Send no stop strings (for servers that reject `stop`); replies are cut at "
            "them here instead. YAML: backend: {stop: none}.",
        ),
    ] = False,
    config: Annotated[Path | None, typer.Option(help="YAML file with these options.")] = None,
    quiet: Annotated[bool, typer.Option(help="No transcript or progress bar.")] = False,
) -> None:
    """Run an agent on one task (--task) or many (--tasks); rerunning skips finished work."""
    from tracetune.agent.run import AgentRunConfig, run_agent

    # A dict, not ModelOptions: merged key by key into a YAML backend section.
    backend = {
        "base_url": base_url,
        "adapter": str(adapter) if adapter else None,
        "stop": "none" if no_stop else None,
    }
    cfg = build_config(
        AgentRunConfig,
        config,
        model=model,
        out=out,
        task=task,
        images=image,
        tasks=tasks,
        tools=split_names(tools),
        action_format=action_format,
        max_steps=max_steps,
        max_errors=max_errors,
        samples=samples,
        temperature=temperature,
        max_tokens=max_tokens,
        concurrency=concurrency,
        max_cost_usd=max_cost,
        backend=backend,
    )
    result, dataset = run_async(run_agent(cfg, progress=not quiet))
    if not quiet and len(dataset) <= 3:
        for trajectory in dataset:
            print_transcript(trajectory)
    out_console.print(result.summary())
    out_console.print(f"trajectories: {dataset.root} ({len(dataset)} records)")


def print_transcript(trajectory: object) -> None:
    """A readable transcript of one trajectory."""
    from tracetune.schema import Trajectory

    assert isinstance(trajectory, Trajectory)
    out_console.print(Panel(trajectory.task.query, title=f"task {trajectory.task.id}"))
    for step in trajectory.steps:
        out_console.rule(f"step {step.index}")
        if step.thought:
            out_console.print(f"[bold]thought[/bold] {step.thought}", markup=True, highlight=False)
        if step.action is not None:
            action = step.action
            if action.type == "tool_call" and action.tool_call is not None:
                out_console.print(
                    f"[bold]call[/bold] {action.tool_call.name}({action.tool_call.arguments})",
                    highlight=False,
                )
            elif action.type == "code":
                out_console.print(f"[bold]code[/bold]\n{action.code}", highlight=False)
            else:
                out_console.print(f"[bold]answer[/bold] {action.answer}", highlight=False)
        else:
            out_console.print(f"[bold]raw[/bold] {step.raw[:300]!r}", highlight=False)
        if step.error is not None:
            out_console.print(
                f"[red]error ({step.error.kind.value})[/red] {step.error.message}", highlight=False
            )
        elif step.observation is not None and step.action and step.action.type != "final_answer":
            out_console.print(
                f"[bold]observation[/bold] {step.observation.text[:500]}", highlight=False
            )
    out_console.print(
        f"status: [bold]{trajectory.status}[/bold]  final answer: {trajectory.final_answer!r}  "
        f"steps: {len(trajectory.steps)}  tokens: {trajectory.usage.total_tokens}  "
        f"retries: {trajectory.usage.retries}  {trajectory.duration_s:.1f}s"
    )
