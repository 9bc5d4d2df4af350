"""``tracetune run``: whole pipelines from one config file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tracetune.cli.common import App, run_async

app = App(no_args_is_help=True, help="Run whole pipelines from one config file.")
out_console = Console()


# The loop's own fields and its ``eval:`` section are options; the stages' sections (sft:,
# explore:, pairs:, dpo:) and the two program sets (tasks:, heldout:) are YAML mappings.
_MATRIX_SECTIONS = ("tasks", "heldout", "sft", "explore", "pairs", "dpo", "eval")


def _matrix_options(
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bars.")] = False,
) -> None:
    """Carries the options that are not config fields (never run)."""


def _matrix(config: Path, values: dict[str, Any]) -> None:
    from tracetune.cli.options_from_config import config_from_options, pop_section
    from tracetune.prefs.matrix import MatrixConfig, run_matrix

    as_json, quiet = bool(values.pop("as_json")), bool(values.pop("quiet"))
    extra = {"eval": pop_section(MatrixConfig, "eval", values)}
    cfg = config_from_options(
        MatrixConfig, values, config_file=config, extra=extra, what="run matrix"
    )
    report = run_async(run_matrix(cfg, progress=not quiet))
    if as_json:
        typer.echo(json.dumps(report["stages"], indent=2, default=str))
        return
    table = Table("stage", "result", title=f"MATRIX loop in {report['elapsed_s']} s")
    for stage, numbers in report["stages"].items():
        if not isinstance(numbers, dict):
            table.add_row(stage, str(numbers))
            continue
        shown = {k: v for k, v in numbers.items() if k not in ("by_family",)}
        if stage == "eval":
            shown = {
                name: f"{acc['passed']}/{acc['total']} ({acc['accuracy']:.1%}; valid actions "
                f"{acc.get('valid_actions', 0):.0%}, first tool (macro) "
                f"{acc.get('first_tool_macro', 0):.0%} vs always-majority "
                f"{acc.get('majority_first_tool_macro', 0):.0%})"
                for name, acc in numbers["heldout_accuracy"].items()
            }
        table.add_row(stage, ", ".join(f"{k}={v}" for k, v in shown.items()))
    out_console.print(table)
    anchored = report["stages"].get("explore", {}).get("chosen_from_gold_anchor")
    if cfg.explore.get("gold_anchor"):
        out_console.print(
            f"explore.gold_anchor is on: {anchored} chosen steps are the gold chain's, not "
            "the policy's samples (for policies too weak to sample usable steps; leave it "
            "off for real ones)",
            highlight=False,
        )
    out_console.print(f"report: {cfg.out / 'report.json'}", highlight=False)


def _register_matrix() -> None:
    import inspect

    from tracetune.cli.options_from_config import (
        command_function,
        config_argument,
        config_params,
        section_params,
    )
    from tracetune.prefs.matrix import MatrixConfig

    shared = inspect.signature(_matrix_options, eval_str=True).parameters.values()
    params = config_argument(
        [
            *config_params(MatrixConfig, skip=set(_MATRIX_SECTIONS)),
            *section_params(MatrixConfig, "eval"),
            *(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in shared),
        ],
        "YAML file of the loop (MatrixConfig keys; options override them).",
    )

    def callback(**values: Any) -> None:
        _matrix(values.pop("config"), values)

    doc = """The MATRIX loop: task programs -> gold trajectories -> SFT -> step-wise exploration
    with the SFT policy -> preference pairs -> DPO -> held-out evaluation (exact gold checks).

    Rerunning resumes: finished stages are skipped. The report is written to OUT/report.json.
    Each stage's own options are YAML sections (tasks:, heldout:, sft:, explore:, pairs:,
    dpo:); the loop's fields and its evaluation's are options too.
    """
    app.command("matrix")(command_function(callback, params, doc))


_register_matrix()
