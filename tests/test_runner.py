"""The stage runner: resume, drops, failure threshold, budgets."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tracetune.runner import Budget, Drop, MeteredModel, StageAborted, run_stage
from tracetune.schema import Task, Usage
from tracetune.store import Dataset
from tracetune.testing import ScriptedChatModel


def tasks(n: int) -> list[Task]:
    return [Task(id=f"t{i}", query=f"q{i}") for i in range(n)]


def test_each_item_once_across_reruns_and_drops_are_remembered(tmp_path: Path) -> None:
    calls: list[str] = []

    async def process(task: Task) -> Task | Drop:
        calls.append(task.id)
        if task.id == "t3":
            return Drop("too short", {"length": 2})
        return task.model_copy(update={"query": task.query.upper()})

    out = Dataset.create(tmp_path / "out", Task)
    first = asyncio.run(
        run_stage(
            "s", tasks(6), lambda t: t.id, process, out, progress=False, chunk_size=2, concurrency=3
        )
    )
    assert (first.written, first.dropped, first.skipped) == (5, 1, 0)
    assert first.drop_reasons == {"too short": 1}
    second = asyncio.run(run_stage("s", tasks(8), lambda t: t.id, process, out, progress=False))
    assert (second.written, second.skipped) == (2, 6)
    assert sorted(calls) == sorted(f"t{i}" for i in range(8))
    assert sorted(out.ids()) == [f"t{i}" for i in range(8) if i != 3]
    assert out.state.items("s")[3][2] == {"reason": "too short", "length": 2}


def test_failures_are_recorded_retried_and_abort_past_threshold(tmp_path: Path) -> None:
    broken = {"t1"}

    async def process(task: Task) -> Task:
        if task.id in broken:
            raise RuntimeError(f"bad {task.id}")
        return task

    out = Dataset.create(tmp_path / "out", Task)
    result = asyncio.run(run_stage("s", tasks(4), lambda t: t.id, process, out, progress=False))
    assert (result.written, result.failed) == (3, 1)
    assert out.state.status("s", "t1") == "failed"
    broken.clear()  # fixed: the rerun retries the failed item only
    result = asyncio.run(run_stage("s", tasks(4), lambda t: t.id, process, out, progress=False))
    assert (result.written, result.skipped) == (1, 3)

    async def always_fails(task: Task) -> Task:
        raise ValueError("schema mismatch")

    with pytest.raises(StageAborted, match="schema mismatch"):
        asyncio.run(
            run_stage(
                "x",
                tasks(20),
                lambda t: t.id,
                always_fails,
                Dataset.create(tmp_path / "o2", Task),
                progress=False,
                max_failures=3,
                concurrency=1,
            )
        )


def test_budget_stops_cleanly_and_keeps_finished_work(tmp_path: Path) -> None:
    out = Dataset.create(tmp_path / "out", Task)
    model = MeteredModel(ScriptedChatModel(lambda m: "word " * 10), out.state, "s")

    async def process(task: Task) -> Task:
        await model.generate([{"role": "user", "content": task.query}])
        return task

    result = asyncio.run(
        run_stage(
            "s",
            tasks(10),
            lambda t: t.id,
            process,
            out,
            progress=False,
            concurrency=1,
            budget=Budget(max_tokens=25),
        )
    )
    assert result.stopped is not None and "token budget" in result.stopped
    assert result.written == 3  # 11 tokens per call: stops once 25 are spent
    assert len(out) == 3 and out.state.usage("s").total_tokens == 33
    assert Budget(max_cost_usd=1.0).exceeded(Usage(cost_usd=1.5)) is not None


def test_a_run_where_every_item_failed_is_aborted_however_few(tmp_path: Path) -> None:
    async def always_fails(task: Task) -> Task:
        raise ConnectionError("endpoint down")

    out = Dataset.create(tmp_path / "out", Task)
    with pytest.raises(StageAborted, match="2 of 2 items failed.*endpoint down"):
        asyncio.run(run_stage("s", tasks(2), lambda t: t.id, always_fails, out, progress=False))
    assert out.state.status("s", "t0") == "failed"  # recorded, so a rerun retries it
