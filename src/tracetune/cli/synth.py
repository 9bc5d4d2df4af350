"""``tracetune synth ...``: M-TRACE task and trajectory synthesis, stage by stage or whole.

Every stage command reads the same SynthConfig (``--config CONFIG.yaml``), with flags
taking precedence, and writes its sub-directory of the run directory ``--out``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console

from tracetune.cli.common import (
    App,
    RetryDroppedOpt,
    fail,
    run_async,
)

app = App(no_args_is_help=True)
out_console = Console()

ConfigOpt = Annotated[Path | None, typer.Option(help="YAML SynthConfig (flags override it).")]
BaseUrlOpt = Annotated[str | None, typer.Option(help="OpenAI-compatible endpoint URL.")]
QuietOpt = Annotated[bool, typer.Option(help="No progress bars.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the stage statistics as JSON.")]


def _run(
    cfg: Any, stages: list[str], quiet: bool, as_json: bool, retry: list[str] | None = None
) -> None:
    from tracetune.runner.outcome import retrying_dropped
    from tracetune.runner.stats import stage_stats, stats_json, stats_table
    from tracetune.synth.mtrace.config import LAYOUT
    from tracetune.synth.mtrace.pipeline import STAGES, check_config

    fns = dict(STAGES)

    async def go() -> list[Any]:
        if len(stages) == len(STAGES):
            check_config(cfg)
        results = []
        for name in stages:
            result = await fns[name](cfg, not quiet)
            results.append(result)
            if not as_json:
                out_console.print(result.summary(), highlight=False)
            if result.stopped:
                break
        return results

    with retrying_dropped(retry):
        run_async(go())
    dirs = [d for d, s in LAYOUT if s in stages]
    rows = [r for d in dict.fromkeys(dirs) for r in stage_stats(cfg.dir(d))]
    if as_json:
        typer.echo(stats_json(rows))
        return
    out_console.print(stats_table(rows))
    _print_reasons(rows)


def _print_reasons(rows: list[Any]) -> None:
    for row in rows:
        for reason, count in row.drop_reasons.items():
            out_console.print(f"  {row.stage}: {count} x {reason}", highlight=False)
        for error in row.failures:
            out_console.print(f"  {row.stage}: failed: {error}", highlight=False)


# Every option of a stage command is a field: the chain's own (SynthConfig: out, models,
# budgets) and the fields of that stage's section (``queries:``, ``files:`` ... in YAML):
# --max-tokens is the stage's tokens per call, --max-total-tokens the whole run's budget.
_SECTIONS = ("queries", "files", "verify_tasks", "rollout", "verify_trajectories")


def _command_options(
    base_url: BaseUrlOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    retry_dropped: RetryDroppedOpt = None,
) -> None:
    """Carries the options that are not config fields (never run)."""


def _stage_command(
    name: str,
    stages: list[str] | None,
    section: str | None,
    doc: str,
    config_argument: bool = False,
) -> None:
    """Register ``tracetune synth NAME``, running ``stages`` (None: the whole chain)."""
    import inspect

    from tracetune.cli.options_from_config import (
        command_function,
        config_from_options,
        config_params,
        pop_section,
        section_params,
    )
    from tracetune.cli.options_from_config import (
        config_argument as with_config_argument,
    )
    from tracetune.synth.mtrace import SynthConfig

    shared = inspect.signature(_command_options, eval_str=True).parameters.values()
    params = [
        *config_params(SynthConfig, skip={"backend", *_SECTIONS}),
        *(section_params(SynthConfig, section) if section else []),
        *(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in shared),
    ]
    if config_argument:
        params = with_config_argument(params, "YAML SynthConfig of the whole chain.")

    def callback(**values: Any) -> None:
        from tracetune.synth.mtrace.pipeline import STAGES

        extra: dict[str, Any] = {"backend": {"base_url": values.pop("base_url")}}
        config_file, quiet = values.pop("config"), bool(values.pop("quiet"))
        as_json, retry = bool(values.pop("as_json")), values.pop("retry_dropped")
        if section:
            extra[section] = pop_section(SynthConfig, section, values)
        cfg = config_from_options(
            SynthConfig, values, config_file=config_file, extra=extra, what=f"synth {name}"
        )
        _run(cfg, stages or [stage for stage, _ in STAGES], quiet, as_json, retry)

    app.command(name)(command_function(callback, params, doc))


_stage_command(
    "queries",
    ["queries.generate", "queries.filter"],
    "queries",
    """Generate queries from seeds and the tool catalogue, then drop malformed ones,
    benchmark near-copies, near-duplicates and those over quota (OUT/candidates,
    OUT/queries).""",
)
_stage_command(
    "files",
    ["files"],
    "files",
    """Give each query a solving scenario and its files: pool images retrieved by
    embedding, other files made by model-written code in the sandbox (OUT/tasks).""",
)
_stage_command(
    "verify-tasks",
    ["verify_tasks"],
    "verify_tasks",
    """Judge each task's query against its files (images as images, documents as
    markdown); repair or drop the rejected ones (OUT/verified, OUT/verified/verdicts).""",
)
_stage_command(
    "rollout",
    ["rollout"],
    "rollout",
    """Roll out the teacher on the verified tasks with the full tool set (code actions run
    in the sandbox) (OUT/trajectories).""",
)
_stage_command(
    "verify-trajectories",
    ["verify_trajectories"],
    "verify_trajectories",
    """Judge every trajectory (tools, query, images, steps, answer; gold answers checked
    exactly); keep the ones that pass (OUT/final, OUT/final/verdicts).""",
)
_stage_command(
    "run",
    None,
    None,
    """Run the whole chain: queries, files, verify-tasks, rollout, verify-trajectories.
    Rerunning resumes; a budget stop ends the run cleanly.""",
    config_argument=True,
)


@app.command("stats")
def stats_cmd(
    run_dir: Annotated[Path, typer.Argument(help="Run directory of synth commands.")],
    as_json: JsonOpt = False,
) -> None:
    """Yield at each stage and the reasons for drops, with tokens and cost."""
    from tracetune.runner.stats import stats_json, stats_table
    from tracetune.synth.mtrace.pipeline import chain_stats

    if not run_dir.is_dir():
        fail(f"{run_dir} is not a directory")
    rows = chain_stats(run_dir)
    if not rows:
        fail(f"{run_dir} holds no synth stage (no */state.sqlite); run `tracetune synth ...`")
    if as_json:
        typer.echo(stats_json(rows))
        return
    out_console.print(stats_table(rows, title=str(run_dir)))
    _print_reasons(rows)
    total = sum((r.usage.cost_usd for r in rows), 0.0)
    tokens = sum(r.usage.total_tokens for r in rows)
    final = next((r for r in rows if r.stage == "verify_trajectories"), None)
    out_console.print(
        f"verified trajectories: {final.done if final else 0}; {tokens:,} tokens, ${total:.4f}",
        highlight=False,
    )
