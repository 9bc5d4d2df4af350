"""The stage runner: records flow through a stage with resume, concurrency and budgets.

An item is processed at most once per output directory: its key is marked done in the run
state only after the records it produced are on disk (their chunk flushed), so a killed run
loses at most the items in flight and the unflushed chunk, and a rerun redoes exactly those.
Output records must have ids derived from the item key, so a redone item cannot duplicate.
"""

from __future__ import annotations

import asyncio
import logging
import traceback
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydantic import BaseModel, Field
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tracetune.models.base import ChatMessage, ChatModel, Generation, Sampling
from tracetune.runner import outcome
from tracetune.schema import Record, Usage
from tracetune.store import AssetStore, Dataset, RunState

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Drop:
    """Returned by a stage's process function: the item yields no record, for this reason."""

    reason: str
    info: dict[str, Any] = field(default_factory=dict)


class Budget(BaseModel):
    """Limits after which a run stops cleanly (finishing the items in flight)."""

    max_cost_usd: float | None = Field(default=None, description="Stop after this much spend.")
    max_tokens: int | None = Field(default=None, description="Stop after this many tokens.")

    def exceeded(self, usage: Usage) -> str | None:
        if self.max_cost_usd is not None and usage.cost_usd >= self.max_cost_usd:
            return f"cost budget reached (${usage.cost_usd:.4f} >= ${self.max_cost_usd})"
        if self.max_tokens is not None and usage.total_tokens >= self.max_tokens:
            return f"token budget reached ({usage.total_tokens} >= {self.max_tokens})"
        return None


class StageAborted(RuntimeError):
    """Too many items failed; the run stopped so the cause can be fixed."""


@dataclass
class StageResult:
    stage: str
    written: int = 0
    skipped: int = 0
    dropped: int = 0
    failed: int = 0
    stopped: str | None = None  # why the run stopped early, if it did
    drop_reasons: dict[str, int] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    """(item key, error) of the items that failed in this run (retried on the next)."""

    def summary(self) -> str:
        parts = [f"{self.written} written", f"{self.skipped} already done"]
        if self.dropped:
            parts.append(f"{self.dropped} dropped")
        if self.failed:
            parts.append(f"{self.failed} failed")
        text = f"{self.stage}: " + ", ".join(parts)
        return text + (f"; stopped: {self.stopped}" if self.stopped else "")


class MeteredModel(ChatModel):
    """Wraps a backend so every call's usage lands in the run state at once (for budgets)."""

    def __init__(self, inner: ChatModel, state: RunState, stage: str) -> None:
        super().__init__()
        self.inner = inner
        self.state = state
        self.stage = stage
        self.spec = inner.spec
        if inner.cache is None:
            inner.cache = state

    async def generate(
        self,
        messages: list[ChatMessage],
        *,
        n: int = 1,
        sampling: Sampling = Sampling(),
        tools: list[dict[str, Any]] | None = None,
    ) -> Generation:
        generation = await self.inner.generate(messages, n=n, sampling=sampling, tools=tools)
        self.state.add_usage(self.stage, self.spec, generation.usage)
        return generation

    async def aclose(self) -> None:
        await self.inner.aclose()


class _Progress:
    def __init__(self, stage: str, total: int | None, state: RunState, enabled: bool) -> None:
        self.state = state
        self.stage = stage
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=Console(stderr=True),
            disable=not enabled,
            transient=False,
        )
        self.task = self.progress.add_task(stage, total=total, info="")

    def advance(self, result: StageResult) -> None:
        usage = self.state.usage(self.stage)
        info = f"tok {usage.total_tokens:,} ${usage.cost_usd:.4f}"
        if result.dropped or result.failed:
            info += f" dropped {result.dropped} failed {result.failed}"
        self.progress.update(self.task, advance=1, info=info)


async def run_stage(
    stage: str,
    items: Iterable[T],
    key: Callable[[T], str],
    process: Callable[[T], Awaitable[Record | list[Record] | Drop]],
    out: Dataset[Any],
    *,
    concurrency: int = 4,
    budget: Budget | None = None,
    sources: Iterable[AssetStore] = (),
    max_failures: int = 10,
    max_failure_rate: float = 0.5,
    chunk_size: int = 8,
    progress: bool = True,
    total: int | None = None,
) -> StageResult:
    """Process every item not yet done, writing its records to ``out``.

    The run stops early, cleanly, when ``budget`` is spent, and raises ``StageAborted``
    when more than ``max_failures`` items and ``max_failure_rate`` of those processed fail,
    or when every item it processed failed (a failure is an exception in ``process``; it is
    recorded and retried on the next run).
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    state = out.state
    done = state.keys(stage, "done") | state.keys(stage, "dropped")
    result = StageResult(stage)
    sources = list(sources)
    pending: list[str] = []  # keys whose records sit in the writer's unflushed buffer
    queue = iter(items)
    stop: str | None = None
    processed = 0
    bar = _Progress(stage, total, state, progress)

    with out.writer(chunk_size=chunk_size) as writer, bar.progress:

        def commit() -> None:
            if writer.buffered == 0 and pending:
                for k in pending:
                    state.mark(stage, k, "done")
                pending.clear()

        async def worker() -> None:
            nonlocal stop, processed
            while stop is None:
                try:
                    item = next(queue)
                except StopIteration:
                    return
                item_key = key(item)
                if item_key in done:
                    result.skipped += 1
                    bar.advance(result)
                    continue
                if budget is not None and (why := budget.exceeded(state.usage())):
                    stop = why
                    return
                try:
                    produced = await process(item)
                except Exception as exc:  # recorded, counted against the threshold, retried later
                    result.failed += 1
                    result.failures.append((item_key, f"{type(exc).__name__}: {exc}"))
                    state.mark(
                        stage,
                        item_key,
                        "failed",
                        {
                            "error": f"{type(exc).__name__}: {exc}",
                            "traceback": traceback.format_exc(limit=8),
                        },
                    )
                    log.warning("%s: item %s failed: %s", stage, item_key, exc)
                else:
                    if isinstance(produced, Drop):
                        result.dropped += 1
                        result.drop_reasons[produced.reason] = (
                            result.drop_reasons.get(produced.reason, 0) + 1
                        )
                        state.mark(
                            stage, item_key, "dropped", {"reason": produced.reason, **produced.info}
                        )
                    else:
                        records = produced if isinstance(produced, list) else [produced]
                        for record in records:
                            result.written += writer.write(record, sources=sources)
                        pending.append(item_key)
                        commit()
                processed += 1
                bar.advance(result)
                if result.failed > max_failures and result.failed > max_failure_rate * processed:
                    stop = f"aborted: {result.failed} of {processed} items failed"

        await asyncio.gather(*(worker() for _ in range(concurrency)))
        writer.flush()
        commit()

    if stop is None and result.failed and result.failed == processed:
        # Nothing came through: however few the items, this run is broken, not unlucky.
        stop = f"aborted: {processed} of {processed} items failed"
    result.stopped = stop
    outcome.record(result)
    if stop and stop.startswith("aborted"):
        failures = [i for i in state.items(stage) if i[1] == "failed"][:3]
        detail = "; ".join(f"{k}: {info.get('error')}" for k, _, info in failures)
        raise StageAborted(f"{stage} {stop}. First failures: {detail}")
    return result

