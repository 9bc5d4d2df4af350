"""Generate a task dataset from task programs, resumably and byte-for-byte reproducibly.

Task ``i`` of a run belongs to family ``families[i % len(families)]`` and is drawn from
``task_seed(seed, i)``; its id depends only on the family, that seed and the program's
version. Records are written in index order (rendering may run in worker processes, ahead
of the writer), so the same seed gives the same records and Parquet files.
"""

from __future__ import annotations

import asyncio
import statistics
from collections import Counter
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from tracetune.cliflag import CliFlag
from tracetune.runner import StageResult, run_stage
from tracetune.runner.executor import active_executor
from tracetune.schema import Task
from tracetune.store import Dataset
from tracetune.synth.programs.base import (
    ProgramError,
    TaskDraft,
    build_task,
    get_program,
    load_program_modules,
    program_task_id,
    registered_programs,
    task_seed,
)

STAGE = "programs"
CHUNK_SIZE = 32


class ProgramsConfig(BaseModel):
    """Configuration of ``tracetune tasks programs`` (YAML keys are these field names)."""

    model_config = ConfigDict(extra="forbid")

    out: Path = Field(description="Output task dataset directory (resumable).")
    n: int = Field(default=100, ge=1, description="How many tasks to generate.")
    seed: int = Field(default=0, description="Run seed; the same seed gives the same tasks.")
    families: list[str] = Field(
        default_factory=list,
        description="Program names to draw from, comma-separated or repeated (default: all; "
        "see --list).",
    )
    programs_modules: Annotated[list[str], CliFlag("--programs-module", "--programs-modules")] = (
        Field(
            default_factory=list,
            description="Module that registers your own programs with @program (repeatable).",
        )
    )
    workers: int = Field(
        default=1,
        ge=1,
        description="Processes rendering tasks in parallel (on Ray, the actors do instead).",
    )


@dataclass(frozen=True)
class PlannedTask:
    index: int
    family: str
    seed: int
    task_id: str


def plan(families: list[str], n: int, seed: int) -> list[PlannedTask]:
    """Which family and seed each of the ``n`` tasks gets (round robin over families)."""
    out = []
    for i in range(n):
        family = families[i % len(families)]
        s = task_seed(seed, i)
        task_id = program_task_id(family, s, get_program(family).version)
        out.append(PlannedTask(i, family, s, task_id))
    return out


def _draft(family: str, seed: int, modules: tuple[str, ...]) -> TaskDraft:
    load_program_modules(list(modules))
    return get_program(family).draft(seed)


def resolve_families(names: list[str]) -> list[str]:
    known = registered_programs()
    if not names:
        return list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ProgramError(
            f"unknown task program(s) {', '.join(unknown)}; known: {', '.join(known)}"
        )
    return list(dict.fromkeys(names))


async def generate_tasks(
    config: ProgramsConfig, progress: bool = True
) -> tuple[StageResult, Dataset[Task]]:
    """Draw ``config.n`` tasks into ``config.out``; tasks already there are skipped."""
    load_program_modules(config.programs_modules)
    families = resolve_families(config.families)
    out: Dataset[Task] = Dataset.create(config.out, Task)
    planned = plan(families, config.n, config.seed)
    done = out.state.keys(STAGE, "done")
    todo = [p for p in planned if p.task_id not in done]
    modules = tuple(config.programs_modules)
    pool: Executor | None = None
    futures: dict[int, Future[TaskDraft]] = {}
    # On Ray the actors draw the tasks (as many as --ray-workers); a process pool is the
    # in-process executor's way to use more cores.
    if config.workers > 1 and len(todo) > 1 and active_executor().kind != "ray":
        pool = ProcessPoolExecutor(config.workers)
    ahead = iter(todo)

    def submit_ahead() -> None:
        # Keep the workers busy while the writer takes tasks strictly in order.
        assert pool is not None
        while len(futures) < 2 * config.workers:
            nxt = next(ahead, None)
            if nxt is None:
                return
            futures[nxt.index] = pool.submit(_draft, nxt.family, nxt.seed, modules)

    async def process(item: PlannedTask) -> Task:
        prog = get_program(item.family)
        if pool is not None:
            submit_ahead()
            draft = await asyncio.wrap_future(futures.pop(item.index))
            submit_ahead()
        else:
            draft = prog.draft(item.seed)
        return build_task(prog, item.seed, draft, out.assets)

    try:
        result = await run_stage(
            STAGE,
            todo,
            key=lambda p: p.task_id,
            process=process,
            out=out,
            concurrency=1,  # records land in index order: reproducible Parquet files
            progress=progress,
            total=len(todo),
            chunk_size=CHUNK_SIZE,
            max_failures=0,
        )
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    result.skipped += len(planned) - len(todo)
    return result, out


def task_stats(dataset: Dataset[Task]) -> dict[str, Any]:
    """Counts by family, variant, tool and chain length; image sizes; answer kinds."""
    families: Counter[str] = Counter()
    variants: Counter[str] = Counter()
    tools: Counter[str] = Counter()
    chain_tools: Counter[str] = Counter()
    lengths: Counter[int] = Counter()
    kinds: Counter[str] = Counter()
    mimes: Counter[str] = Counter()
    difficulty: Counter[int] = Counter()
    widths: list[int] = []
    heights: list[int] = []
    n = 0
    for task in dataset:
        n += 1
        family = str(task.metadata.get("family", task.provenance.source))
        families[family] += 1
        variants[f"{family}/{task.metadata.get('variant', '-')}"] += 1
        tools.update(task.tools)
        chain_tools.update(c.name for c in task.gold_chain)
        lengths[len(task.gold_chain)] += 1
        kinds[task.gold.kind if task.gold else "none"] += 1
        if isinstance(task.metadata.get("difficulty"), int):
            difficulty[task.metadata["difficulty"]] += 1
        for ref in task.files:
            mimes[ref.mime] += 1
            if ref.width and ref.height:
                widths.append(ref.width)
                heights.append(ref.height)

    def spread(values: list[int]) -> dict[str, float]:
        if not values:
            return {}
        return {"min": min(values), "median": statistics.median(values), "max": max(values)}

    return {
        "tasks": n,
        "families": dict(sorted(families.items())),
        "variants": dict(sorted(variants.items())),
        "tools_allowed": dict(tools.most_common()),
        "gold_chain_tools": dict(chain_tools.most_common()),
        "gold_chain_length": {str(k): v for k, v in sorted(lengths.items())},
        "difficulty": {str(k): v for k, v in sorted(difficulty.items())},
        "answer_kinds": dict(kinds.most_common()),
        "file_types": dict(mimes.most_common()),
        "images": {"count": len(widths), "width": spread(widths), "height": spread(heights)},
    }
