"""``tracetune agent ...``: run a tool-using agent."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.panel import Panel

from tracetune.cli.common import App, run_async

app = App(no_args_is_help=True)
out_console = Console()


# Backend settings are a nested section of the config: their flags are declared here,
# merged key by key into a YAML `backend:` section. Every other option comes from a field
# of AgentRunConfig (tracetune.agent.run), declared there once.
def _backend_options(
    base_url: Annotated[str | None, typer.Option(help="OpenAI-compatible endpoint URL.")] = None,
    adapter: Annotated[
        Path | None, typer.Option(help="LoRA adapter dir for local: models.")
    ] = None,
    no_stop: Annotated[
        bool,
        typer.Option(
            "--no-stop",
            help="Send no stop strings (for servers that reject `stop`); replies are cut at "
            "them here instead. YAML: backend: {stop: none}.",
        ),
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option(
            help="YAML file with these options (keys: the field names, e.g. max_cost_usd, "
            "images; backend settings under backend:); flags given override it."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No transcript or progress bar.")] = False,
) -> None:
    """Carries the backend, --config and --quiet options (never run)."""


def _run_command() -> None:
    import inspect

    from tracetune.agent.run import AgentRunConfig
    from tracetune.cli.options_from_config import command_function, config_params

    shared = inspect.signature(_backend_options, eval_str=True).parameters.values()
    params = [
        *config_params(AgentRunConfig),
        *(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in shared),
    ]

    def callback(**values: Any) -> None:
        from tracetune.agent.run import run_agent
        from tracetune.cli.options_from_config import config_from_options

        adapter = values.pop("adapter")
        backend = {  # a dict, not ModelOptions: merged key by key into YAML's backend
            "base_url": values.pop("base_url"),
            "adapter": str(adapter) if adapter else None,
            "stop": "none" if values.pop("no_stop") else None,
        }
        config_file, quiet = values.pop("config"), bool(values.pop("quiet"))
        cfg = config_from_options(
            AgentRunConfig,
            values,
            config_file=config_file,
            extra={"backend": backend},
            what="agent run",
        )
        result, dataset = run_async(run_agent(cfg, progress=not quiet))
        if not quiet and len(dataset) <= 3:
            for trajectory in dataset:
                print_transcript(trajectory)
        out_console.print(result.summary())
        out_console.print(f"trajectories: {dataset.root} ({len(dataset)} records)")

    doc = "Run an agent on one task (--task) or many (--tasks); rerunning skips finished work."
    app.command("run")(command_function(callback, params, doc))


_run_command()


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
