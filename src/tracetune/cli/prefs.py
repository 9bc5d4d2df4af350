"""``tracetune prefs``: step-wise exploration, preference pairs and their statistics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tracetune.cli.common import App, run_async

app = App(no_args_is_help=True, help="Step-wise exploration and preference pairs.")
out_console = Console()


# Backend settings are nested sections of the config: their URL flags are declared here,
# merged into the YAML `backend:` / `judge_backend:` sections. Every other setting comes
# from a field of ExploreConfig (tracetune.prefs.explore), declared there once.
def _explore_options(
    base_url: Annotated[str | None, typer.Option(help="Policy's OpenAI-compatible URL.")] = None,
    judge_base_url: Annotated[str | None, typer.Option(help="Judge's endpoint URL.")] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="YAML file with these options (keys: the field names, e.g. max_cost_usd; "
            "backend settings under backend: and judge_backend:); flags given override it."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Carries the options that are not config fields (never run)."""


def _explore(**values: Any) -> None:
    from tracetune.cli.options_from_config import config_from_options
    from tracetune.prefs.explore import ExploreConfig, run_explore
    from tracetune.prefs.stats import prefs_stats

    # Dicts, not ModelOptions: merged key by key into the YAML backend sections.
    backends = {
        "backend": {"base_url": values.pop("base_url")},
        "judge_backend": {"base_url": values.pop("judge_base_url")},
    }
    config_file, quiet = values.pop("config"), bool(values.pop("quiet"))
    cfg = config_from_options(
        ExploreConfig, values, config_file=config_file, extra=backends, what="prefs explore"
    )
    result, dataset = run_async(run_explore(cfg, progress=not quiet))
    out_console.print(result.summary())
    print_stats(prefs_stats(dataset.root))


def _explore_command() -> None:
    import inspect

    from tracetune.cli.options_from_config import command_function, config_params
    from tracetune.prefs.explore import ExploreConfig

    shared = inspect.signature(_explore_options, eval_str=True).parameters.values()
    params = [
        *config_params(ExploreConfig),
        *(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in shared),
    ]
    doc = """Explore tasks step by step: K candidates per step, each run on its own fork of the
    episode, ranked by a step verifier; the best is committed.

    Writes explored trajectories (every step's candidates, observations and ranking) to OUT;
    `tracetune prefs build` turns them into preference pairs.
    """
    app.command("explore")(command_function(_explore, params, doc))


_explore_command()


def _build_options(
    config: Annotated[Path | None, typer.Option(help="YAML file with these options.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Carries the options that are not BuildConfig fields (never run)."""


def _build(**values: Any) -> None:
    from tracetune.cli.options_from_config import config_from_options
    from tracetune.prefs.pairs import BuildConfig, run_build
    from tracetune.prefs.stats import prefs_stats

    config_file, quiet = values.pop("config"), bool(values.pop("quiet"))
    cfg = config_from_options(BuildConfig, values, config_file=config_file, what="prefs build")
    result, dataset = run_async(run_build(cfg, progress=not quiet))
    out_console.print(result.summary())
    for reason, count in result.drop_reasons.items():
        out_console.print(f"  {count} x {reason}", highlight=False)
    print_stats(prefs_stats(dataset.root))


def _build_command() -> None:
    import inspect

    from tracetune.cli.options_from_config import command_function, config_params
    from tracetune.prefs.pairs import BuildConfig

    shared = inspect.signature(_build_options, eval_str=True).parameters.values()
    params = [
        *config_params(BuildConfig),
        *(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in shared),
    ]
    doc = """Build step-wise preference pairs (chosen = the verifier's best) from explored
    trajectories; `tracetune train dpo --pairs OUT` trains on them."""
    app.command("build")(command_function(_build, params, doc))


_build_command()


@app.command("stats")
def stats(
    paths: Annotated[
        list[Path], typer.Argument(help="Explored trajectory and/or pair dataset directories.")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Pairs per task and step and rejection reasons (pair datasets); steps, faults, judge
    fallbacks and the judge's agreement with the gold verifier (explored datasets)."""
    from tracetune.prefs.stats import prefs_stats

    reports = [prefs_stats(path) for path in paths]
    if as_json:
        typer.echo(json.dumps(reports, indent=2))
        return
    for report in reports:
        print_stats(report)


def print_stats(report: dict[str, Any]) -> None:
    from tracetune.runner.stats import stage_stats, stats_table

    table = Table(title=f"{report['path']} ({report['kind']})", show_header=False)
    table.add_column("what")
    table.add_column("value")
    for key, value in report.items():
        if key in ("path", "kind", "runs"):
            continue
        if key == "per_task" and isinstance(value, dict) and len(value) > 8:
            counts = sorted(value.values())  # thousands of tasks: the spread, not the list
            value = (
                f"{len(counts)} tasks; pairs per task min {counts[0]}, median "
                f"{counts[len(counts) // 2]}, max {counts[-1]} (--json lists them)"
            )
        elif isinstance(value, dict):
            value = ", ".join(f"{k}: {v}" for k, v in value.items()) or "-"
        table.add_row(key, str(value))
    out_console.print(table)
    rows = stage_stats(report["path"])
    if rows:
        out_console.print(stats_table(rows))
