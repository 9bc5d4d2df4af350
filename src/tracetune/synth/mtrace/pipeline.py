"""The whole M-TRACE chain, and its statistics.

``run_chain`` runs the stages in order over one run directory::

    OUT/candidates    queries.generate     generated queries (invalid ones marked)
    OUT/queries       queries.filter       deduplicated, decontaminated, within quotas
    OUT/tasks         files                queries with their images and generated files
    OUT/verified      verify_tasks         tasks the query-file verifier passed (+ verdicts/)
    OUT/trajectories  rollout              teacher trajectories
    OUT/final         verify_trajectories  verified trajectories (+ verdicts/): the product

Each stage resumes where it stopped; a stage stopped by the budget stops the chain (rerun
with a larger budget to go on).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tracetune.errors import ConfigError
from tracetune.runner import StageResult
from tracetune.runner.stats import StageStats, stage_stats
from tracetune.synth.mtrace.config import LAYOUT, SynthConfig
from tracetune.synth.mtrace.files import associate_files
from tracetune.synth.mtrace.queries import filter_queries, generate_queries
from tracetune.synth.mtrace.teacher import rollout_tasks
from tracetune.synth.mtrace.verify import verify_tasks, verify_trajectories

StageFn = Callable[[SynthConfig, bool], Awaitable[StageResult]]
STAGES: list[tuple[str, StageFn]] = [
    ("queries.generate", generate_queries),
    ("queries.filter", filter_queries),
    ("files", associate_files),
    ("verify_tasks", verify_tasks),
    ("rollout", rollout_tasks),
    ("verify_trajectories", verify_trajectories),
]


def check_config(config: SynthConfig) -> None:
    """Everything the chain needs, checked before the first model call."""
    for field, stage in (
        ("generator", "queries"),
        ("judge", "verify-tasks"),
        ("teacher", "rollout"),
    ):
        config.need(field, stage)
    if config.queries.seeds is None:
        raise ConfigError("synth run needs seed examples: set queries.seeds")
    if config.files.pool is None:
        raise ConfigError(
            "synth run needs an image pool: set files.pool (build one with `tracetune pool build`)"
        )
    from tracetune.synth.mtrace.pool import Pool
    from tracetune.tools import load_tools

    Pool.load(config.files.pool)
    load_tools(config.queries.tools)
    from tracetune.synth.mtrace.queries import benchmark_questions

    for path in config.queries.benchmarks:
        benchmark_questions(Path(path))  # exists and holds questions


async def run_chain(
    config: SynthConfig, progress: bool = True, report: Callable[[str], Any] | None = None
) -> list[StageResult]:
    """Run every stage in order; returns their results (the last may say it stopped)."""
    check_config(config)
    results = []
    for _, fn in STAGES:
        result = await fn(config, progress)
        results.append(result)
        if report is not None:
            report(result.summary())
        if result.stopped:
            break
    return results


def chain_stats(out: str | Path) -> list[StageStats]:
    """Per-stage statistics of a run directory, in chain order."""
    out = Path(out)
    rows: list[StageStats] = []
    for name, _ in LAYOUT:
        rows += stage_stats(out / name)
    return rows


def dataset_records(out: str | Path, name: str = "final") -> list[Any]:
    """The records of one stage directory of a run, sorted by id (for inspection, tests)."""
    from tracetune.store import Dataset

    root = Path(out) / name
    if not (root / "manifest.json").exists():
        return []
    return sorted(Dataset.open(root), key=lambda r: r.id)
