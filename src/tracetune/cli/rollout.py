"""``tracetune rollout``: a teacher (the gold chains, or a model) rolls out tasks with gold
answers; trajectories that reach the gold answer are kept."""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tracetune.cli.common import RetryDroppedOpt, reports_errors, run_async

out_console = Console()


# Backend settings are a nested section of the config: --base-url is declared here, merged
# into a YAML `backend:` section. Every other setting comes from a field of RolloutConfig
# (tracetune.rollout), declared there once.
def _command_options(
    base_url: Annotated[str | None, typer.Option(help="OpenAI-compatible endpoint URL.")] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="YAML file with these options (keys: the field names, e.g. tool_modules, "
            "max_cost_usd; backend settings under backend:); flags given override it."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    retry_dropped: RetryDroppedOpt = None,
) -> None:
    """Carries the options that are not config fields (never run)."""


def _rollout(**values: Any) -> None:
    from tracetune.cli.options_from_config import config_from_options
    from tracetune.rollout import RolloutConfig, rollout_summary, run_rollout
    from tracetune.runner.outcome import retrying_dropped

    backend = {"base_url": values.pop("base_url")}  # merged key by key into YAML's backend
    config_file, as_json = values.pop("config"), bool(values.pop("as_json"))
    quiet, retry_dropped = bool(values.pop("quiet")), values.pop("retry_dropped")
    cfg = config_from_options(
        RolloutConfig, values, config_file=config_file, extra={"backend": backend}, what="rollout"
    )
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


def _rollout_command() -> Callable[..., None]:
    """``tracetune rollout``: its options generated from RolloutConfig's fields, plus
    _command_options'."""
    from tracetune.cli.options_from_config import command_function, config_params
    from tracetune.rollout import RolloutConfig

    shared = inspect.signature(_command_options, eval_str=True).parameters.values()
    params = [
        *config_params(RolloutConfig),
        *(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in shared),
    ]
    doc = """Roll out a teacher on tasks with gold answers; keep the trajectories that pass.

    Writes OUT (kept trajectories), OUT/verdicts (every verdict, with reasons), OUT/rejected.
    """
    return reports_errors(command_function(_rollout, params, doc))


rollout = _rollout_command()
