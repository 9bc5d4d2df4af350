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
    build_config,
    fail,
    run_async,
    split_names,
)

app = App(no_args_is_help=True)
out_console = Console()

ConfigOpt = Annotated[Path | None, typer.Option(help="YAML SynthConfig (flags override it).")]
OutOpt = Annotated[Path | None, typer.Option(help="Run directory (resumable).")]
BaseUrlOpt = Annotated[str | None, typer.Option(help="OpenAI-compatible endpoint URL.")]
ConcurrencyOpt = Annotated[
    int | None,
    typer.Option(help="Model requests in flight, and items run at once, per stage (default 4)."),
]
MaxCostOpt = Annotated[float | None, typer.Option(help="Stop the run at this many USD.")]
MaxTokensOpt = Annotated[int | None, typer.Option(help="Stop the run at this many tokens.")]
EmbedderOpt = Annotated[str | None, typer.Option(help="Embedder: minilm (default) or hashing.")]
QuietOpt = Annotated[bool, typer.Option(help="No progress bars.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the stage statistics as JSON.")]


def load_config(config: Path | None, **flags: Any) -> Any:
    """The SynthConfig from YAML with the flags that were set merged in."""
    from tracetune.synth.mtrace import SynthConfig

    base_url = flags.pop("base_url", None)
    if base_url:
        flags["backend"] = {"base_url": base_url}
    return build_config(SynthConfig, config, **flags)


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


@app.command("queries")
def queries(
    out: OutOpt = None,
    seeds: Annotated[Path | None, typer.Option(help='Seed JSONL of {"query", "tools"}.')] = None,
    generator: Annotated[str | None, typer.Option(help="Generator model spec.")] = None,
    tools: Annotated[str | None, typer.Option(help="Comma-separated tool catalogue.")] = None,
    batches: Annotated[int | None, typer.Option(help="Generator calls.")] = None,
    per_batch: Annotated[int | None, typer.Option(help="Queries per call.")] = None,
    few_shot: Annotated[int | None, typer.Option(help="Seed examples drawn per call.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Generator temperature.")] = None,
    topics: Annotated[str | None, typer.Option(help="Comma-separated topics.")] = None,
    tool_quota: Annotated[int | None, typer.Option(help="Max queries kept per tool.")] = None,
    topic_quota: Annotated[int | None, typer.Option(help="Max queries kept per topic.")] = None,
    dedup_threshold: Annotated[
        float | None, typer.Option(help="Similarity at which a query is a near-duplicate.")
    ] = None,
    benchmark: Annotated[
        list[Path] | None,
        typer.Option(
            help="Benchmark file to decontaminate against (GTA dataset.json, GAIA "
            "metadata.jsonl, JSONL of questions; repeatable)."
        ),
    ] = None,
    decontaminate: Annotated[
        bool | None,
        typer.Option("--decontaminate/--no-decontaminate", help="Drop benchmark near-copies."),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the few-shot draws.")] = None,
    embedder: EmbedderOpt = None,
    base_url: BaseUrlOpt = None,
    concurrency: ConcurrencyOpt = None,
    max_cost: MaxCostOpt = None,
    max_tokens: MaxTokensOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    retry_dropped: RetryDroppedOpt = None,
) -> None:
    """Generate queries from seeds and the tool catalogue, then drop malformed ones,
    benchmark near-copies, near-duplicates and those over quota (OUT/candidates,
    OUT/queries)."""
    cfg = load_config(
        config,
        out=out,
        generator=generator,
        embedder=embedder,
        base_url=base_url,
        concurrency=concurrency,
        max_cost_usd=max_cost,
        max_tokens=max_tokens,
        queries={
            "seeds": seeds,
            "tools": split_names(tools),
            "batches": batches,
            "per_batch": per_batch,
            "few_shot": few_shot,
            "temperature": temperature,
            "topics": split_names(topics),
            "tool_quota": tool_quota,
            "topic_quota": topic_quota,
            "dedup_threshold": dedup_threshold,
            "benchmarks": benchmark,
            "decontaminate": decontaminate,
            "seed": seed,
        },
    )
    _run(cfg, ["queries.generate", "queries.filter"], quiet, as_json, retry_dropped)


@app.command("files")
def files(
    out: OutOpt = None,
    pool: Annotated[Path | None, typer.Option(help="Image pool (tracetune pool build).")] = None,
    generator: Annotated[str | None, typer.Option(help="Generator model spec.")] = None,
    max_files: Annotated[int | None, typer.Option(help="Most files per task.")] = None,
    image_reuse_cap: Annotated[
        int | None, typer.Option(help="Most tasks that may share one pool image.")
    ] = None,
    code_retries: Annotated[
        int | None, typer.Option(help="Rewrites of a file's failing code.")
    ] = None,
    base_url: BaseUrlOpt = None,
    concurrency: ConcurrencyOpt = None,
    max_cost: MaxCostOpt = None,
    max_tokens: MaxTokensOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    retry_dropped: RetryDroppedOpt = None,
) -> None:
    """Give each query a solving scenario and its files: pool images retrieved by
    embedding, other files made by model-written code in the sandbox (OUT/tasks)."""
    cfg = load_config(
        config,
        out=out,
        generator=generator,
        base_url=base_url,
        concurrency=concurrency,
        max_cost_usd=max_cost,
        max_tokens=max_tokens,
        files={
            "pool": pool,
            "max_files": max_files,
            "image_reuse_cap": image_reuse_cap,
            "code_retries": code_retries,
        },
    )
    _run(cfg, ["files"], quiet, as_json, retry_dropped)


@app.command("verify-tasks")
def verify_tasks_cmd(
    out: OutOpt = None,
    judge: Annotated[str | None, typer.Option(help="Judge model spec.")] = None,
    repair: Annotated[
        bool | None,
        typer.Option(
            "--repair/--no-repair", help="Re-verify once with the judge's rewritten query."
        ),
    ] = None,
    base_url: BaseUrlOpt = None,
    concurrency: ConcurrencyOpt = None,
    max_cost: MaxCostOpt = None,
    max_tokens: MaxTokensOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    retry_dropped: RetryDroppedOpt = None,
) -> None:
    """Judge each task's query against its files (images as images, documents as
    markdown); repair or drop the rejected ones (OUT/verified, OUT/verified/verdicts)."""
    cfg = load_config(
        config,
        out=out,
        judge=judge,
        base_url=base_url,
        concurrency=concurrency,
        max_cost_usd=max_cost,
        max_tokens=max_tokens,
        verify_tasks={"repair": repair},
    )
    _run(cfg, ["verify_tasks"], quiet, as_json, retry_dropped)


@app.command("rollout")
def rollout_cmd(
    out: OutOpt = None,
    teacher: Annotated[str | None, typer.Option(help="Teacher model spec (any backend).")] = None,
    tool_model: Annotated[
        str | None,
        typer.Option(
            help="VLM behind visual_qa/caption/inspect_file questions (default: teacher)."
        ),
    ] = None,
    action_format: Annotated[str | None, typer.Option(help="code (default) or json.")] = None,
    samples: Annotated[int | None, typer.Option(help="Trajectories per task.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Teacher temperature.")] = None,
    max_steps: Annotated[int | None, typer.Option(help="Step budget per episode.")] = None,
    corpus: Annotated[Path | None, typer.Option(help="Search corpus for `search`.")] = None,
    base_url: BaseUrlOpt = None,
    concurrency: ConcurrencyOpt = None,
    max_cost: MaxCostOpt = None,
    max_tokens: MaxTokensOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    retry_dropped: RetryDroppedOpt = None,
) -> None:
    """Roll out the teacher on the verified tasks with the full tool set (code actions run
    in the sandbox) (OUT/trajectories)."""
    cfg = load_config(
        config,
        out=out,
        base_url=base_url,
        concurrency=concurrency,
        max_cost_usd=max_cost,
        max_tokens=max_tokens,
        rollout={
            "teacher": teacher,
            "tool_model": tool_model,
            "action_format": action_format,
            "samples": samples,
            "temperature": temperature,
            "max_steps": max_steps,
            "corpus": corpus,
        },
    )
    _run(cfg, ["rollout"], quiet, as_json, retry_dropped)


@app.command("verify-trajectories")
def verify_trajectories_cmd(
    out: OutOpt = None,
    judge: Annotated[str | None, typer.Option(help="Judge model spec.")] = None,
    base_url: BaseUrlOpt = None,
    concurrency: ConcurrencyOpt = None,
    max_cost: MaxCostOpt = None,
    max_tokens: MaxTokensOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    retry_dropped: RetryDroppedOpt = None,
) -> None:
    """Judge every trajectory (tools, query, images, steps, answer; gold answers checked
    exactly); keep the ones that pass (OUT/final, OUT/final/verdicts)."""
    cfg = load_config(
        config,
        out=out,
        judge=judge,
        base_url=base_url,
        concurrency=concurrency,
        max_cost_usd=max_cost,
        max_tokens=max_tokens,
    )
    _run(cfg, ["verify_trajectories"], quiet, as_json, retry_dropped)


@app.command("run")
def run_cmd(
    config: Annotated[Path, typer.Argument(help="YAML SynthConfig of the whole chain.")],
    out: OutOpt = None,
    base_url: BaseUrlOpt = None,
    concurrency: ConcurrencyOpt = None,
    max_cost: MaxCostOpt = None,
    max_tokens: MaxTokensOpt = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
    retry_dropped: RetryDroppedOpt = None,
) -> None:
    """Run the whole chain: queries, files, verify-tasks, rollout, verify-trajectories.
    Rerunning resumes; a budget stop ends the run cleanly."""
    from tracetune.synth.mtrace.pipeline import STAGES

    cfg = load_config(
        config,
        out=out,
        base_url=base_url,
        concurrency=concurrency,
        max_cost_usd=max_cost,
        max_tokens=max_tokens,
    )
    _run(cfg, [name for name, _ in STAGES], quiet, as_json, retry_dropped)


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
