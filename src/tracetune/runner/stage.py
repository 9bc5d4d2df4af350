"""The stage runner: records flow through a stage with resume, concurrency and budgets.

An item is processed at most once per output directory: its key is marked done in the run
state only after the records it produced are on disk (their chunk flushed), so a killed run
loses at most the items in flight and the unflushed chunk, and a rerun redoes exactly those.
Output records must have ids derived from the item key, so a redone item cannot duplicate:
a record that reached disk before its item was marked done is recognised by its id.

The runner has two layers. :class:`StageCore` is what every executor shares: the skip set
(loaded once), what an item's outcome does (records written, drops and failures recorded,
items marked done in batches as their chunks land), budgets and the failure threshold.
:func:`run_stage` is the in-process asyncio executor: a pool of workers over one iterator
that hands each outcome to the core. Another executor (processes, a cluster) drives a core
the same way: ``core.pending(items)`` for the work, ``core.finish_item`` /
``core.fail_item`` with each outcome, ``core.close()`` at the end.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, Field
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tracetune.errors import ITEMS_FAILED_EXIT, ConfigError, TracetuneError
from tracetune.models.base import ChatMessage, ChatModel, Generation, Sampling
from tracetune.runner import outcome
from tracetune.runner.executor import active_executor
from tracetune.schema import Record, Usage
from tracetune.store import AssetStore, Dataset, RunState
from tracetune.store.dataset import DEFAULT_CHUNK_BYTES, DEFAULT_FLUSH_INTERVAL_S

log = logging.getLogger(__name__)
T = TypeVar("T")

# Progress and failure marks are refreshed at most this often (seconds).
PROGRESS_INTERVAL_S = 0.1


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

    @property
    def unlimited(self) -> bool:
        return self.max_cost_usd is None and self.max_tokens is None


class StageAborted(TracetuneError, RuntimeError):
    """Too many items failed; the run stopped so the cause can be fixed (exit status 3)."""

    exit_code = ITEMS_FAILED_EXIT
    hint = "fix the cause and rerun the same command: finished items are kept"


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
    """The progress bar, redrawn from counters at most every PROGRESS_INTERVAL_S."""

    def __init__(self, stage: str, total: int | None, state: RunState, enabled: bool) -> None:
        self.state = state
        self.stage = stage
        self.enabled = enabled
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
        self._shown = 0
        self._last = 0.0

    def update(self, result: StageResult, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < PROGRESS_INTERVAL_S:
            return
        self._last = now
        usage = self.state.usage(self.stage)
        info = f"tok {usage.total_tokens:,} ${usage.cost_usd:.4f}"
        if result.dropped or result.failed:
            info += f" dropped {result.dropped} failed {result.failed}"
        done = result.written + result.skipped + result.dropped + result.failed
        self.progress.update(self.task, completed=done, info=info)
        self._shown = done


class StageCore(Generic[T]):
    """The executor-independent part of a stage run over ``out``.

    It owns the skip set, the output writer and the run state: executors ask it which items
    to process (:meth:`pending`) and hand it each outcome (:meth:`finish_item`,
    :meth:`fail_item`). Items are marked done in one transaction per chunk, right after the
    chunk holding their records is on disk; drops and failures are recorded in batches too.
    Each done item's info lists its record ids, so ``tracetune data check`` can confirm that
    they are on disk.
    """

    def __init__(
        self,
        stage: str,
        out: Dataset[Any],
        *,
        key: Callable[[T], str],
        budget: Budget | None = None,
        sources: Iterable[AssetStore] = (),
        max_failures: int = 10,
        max_failure_rate: float = 0.5,
        chunk_size: int | None = None,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
        progress: bool = True,
        total: int | None = None,
    ) -> None:
        self.stage = stage
        self.out = out
        self.state = out.state
        self.key = key
        self.budget = budget if budget is not None and not budget.unlimited else None
        self.sources = list(sources)
        self.max_failures = max_failures
        self.max_failure_rate = max_failure_rate
        self.result = StageResult(stage)
        self.processed = 0
        self.stop: str | None = None  # set when the run must stop: budget, failures
        # Loaded once: the cost of a rerun does not grow with what each item checks.
        self.done: set[str] = self.state.keys(stage, "done") | self.state.keys(stage, "dropped")
        # Drops the user asked to retry (--retry-dropped REASON) are pending again.
        self.retried = outcome.dropped_to_retry(self.state, stage)
        self.done -= self.retried
        self.writer = out.writer(
            chunk_size=chunk_size, flush_interval_s=flush_interval_s, target_bytes=chunk_bytes
        )
        self.writer.on_flush.append(self._commit_done)
        self._in_buffer: list[tuple[str, str, dict[str, Any] | None]] = []  # done once flushed
        self._chunk_landed = False  # set each time a chunk lands (see finish_item)
        self._marks: list[tuple[str, str, dict[str, Any] | None]] = []  # drops and failures
        self._last_marks = time.monotonic()
        self.bar = _Progress(stage, total, self.state, progress)

    # -- what to process -----------------------------------------------------------------
    def pending(self, items: Iterable[T]) -> Iterator[tuple[str, T]]:
        """``(key, item)`` of the items not done yet, counting the others as skipped.

        Stops yielding once the run must stop (budget reached, too many failures)."""
        for item in items:
            if self.stop is not None:
                return
            item_key = self.key(item)
            if item_key in self.done:
                self.result.skipped += 1
                continue
            if self.budget is not None and (why := self.budget.exceeded(self.state.usage())):
                self.stop = why
                return
            self.bar.update(self.result)
            yield item_key, item

    # -- outcomes --------------------------------------------------------------------------
    def finish_item(self, item_key: str, produced: Record | list[Record] | Drop) -> None:
        """Record what processing ``item_key`` produced: its records, or a drop."""
        result = self.result
        if isinstance(produced, Drop):
            result.dropped += 1
            result.drop_reasons[produced.reason] = result.drop_reasons.get(produced.reason, 0) + 1
            self._marks.append((item_key, "dropped", {"reason": produced.reason, **produced.info}))
        else:
            records = produced if isinstance(produced, list) else [produced]
            self._chunk_landed = False
            for record in records:
                result.written += self.writer.write(record, sources=self.sources)
            # Marked done with the next chunk to land: then every one of its records is on
            # disk, whether written now or found there already (ids are never written twice).
            self._in_buffer.append((item_key, "done", {"records": [r.id for r in records]}))
            if self._chunk_landed:
                # Writing these records flushed a chunk before the item was queued: land the
                # rest now, so the item is not left unmarked until some later chunk (a kill
                # in between would make a rerun process it again).
                self.flush()
        self._counted()

    def fail_item(self, item_key: str, exc: BaseException) -> None:
        """Record that processing ``item_key`` raised ``exc``; it is retried on the next run."""
        if why := outcome.disk_full(exc):  # every further item would fail the same way
            raise outcome.DiskFullError(f"disk full while processing {item_key}: {why}") from exc
        self.result.failed += 1
        error = f"{type(exc).__name__}: {exc}"
        self.result.failures.append((item_key, error))
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__, limit=8))
        self._marks.append((item_key, "failed", {"error": error, "traceback": tb}))
        log.warning("%s: item %s failed: %s", self.stage, item_key, exc)
        self._counted()

    def _counted(self) -> None:
        self.processed += 1
        result = self.result
        if (
            result.failed > self.max_failures
            and result.failed > self.max_failure_rate * self.processed
        ):
            self.stop = f"aborted: {result.failed} of {self.processed} items failed"
        if self.writer.due():
            self.writer.flush()  # marks the items of the chunk done
        elif self._marks and time.monotonic() - self._last_marks >= PROGRESS_INTERVAL_S * 10:
            self._commit_marks()
        self.bar.update(self.result)

    # -- state -------------------------------------------------------------------------------
    def _commit_done(self) -> None:
        # Called by the writer right after a chunk landed: every item queued so far has all
        # its records on disk now (or already had: ids seen before are not written twice).
        rows = self._in_buffer + self._marks
        self._in_buffer, self._marks = [], []
        self._chunk_landed = True
        self._last_marks = time.monotonic()
        self.state.mark_many(self.stage, rows)

    def _commit_marks(self) -> None:
        rows, self._marks = self._marks, []
        self._last_marks = time.monotonic()
        self.state.mark_many(self.stage, rows)

    def flush(self) -> None:
        """Put the buffered records on disk and record every outcome so far."""
        self.writer.flush()
        # Items whose records were all on disk before (ids seen) are done as well.
        self._commit_done()

    def close(self) -> StageResult:
        """Flush the last chunk, mark its items done, and settle how the run ended.

        Raises ``StageAborted`` when the failure threshold stopped the run, or when every
        item processed failed."""
        self.flush()
        self.bar.update(self.result, force=True)
        result = self.result
        stop = self.stop
        if stop is None and result.failed and result.failed == self.processed:
            # Nothing came through: however few the items, this run is broken, not unlucky.
            stop = f"aborted: {self.processed} of {self.processed} items failed"
        result.stopped = stop
        outcome.record(result)
        if stop and stop.startswith("aborted"):
            detail = "; ".join(f"{k}: {why}" for k, why in result.failures[:3])
            raise StageAborted(f"{self.stage} {stop}. First failures: {detail}")
        return result


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
    chunk_size: int | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
    progress: bool = True,
    total: int | None = None,
) -> StageResult:
    """Process every item not yet done, ``concurrency`` at a time, writing to ``out``.

    The run stops early, cleanly, when ``budget`` is spent, and raises ``StageAborted``
    when more than ``max_failures`` items and ``max_failure_rate`` of those processed fail,
    or when every item it processed failed (a failure is an exception in ``process``; it is
    recorded and retried on the next run). Output chunks hold about ``chunk_bytes`` of
    Parquet (at most ``chunk_size`` records when given) and are flushed at least every
    ``flush_interval_s`` seconds.
    """
    if concurrency < 1:
        raise ConfigError("concurrency must be at least 1")
    if (executor := active_executor()).kind == "ray":
        from tracetune.runner.ray_executor import run_stage_on_ray

        return await run_stage_on_ray(
            executor,
            stage,
            items,
            key,
            process,
            out,
            concurrency=concurrency,
            budget=budget,
            sources=sources,
            max_failures=max_failures,
            max_failure_rate=max_failure_rate,
            chunk_size=chunk_size,
            chunk_bytes=chunk_bytes,
            flush_interval_s=flush_interval_s,
            progress=progress,
            total=total,
        )
    core: StageCore[T] = StageCore(
        stage,
        out,
        key=key,
        budget=budget,
        sources=sources,
        max_failures=max_failures,
        max_failure_rate=max_failure_rate,
        chunk_size=chunk_size,
        chunk_bytes=chunk_bytes,
        flush_interval_s=flush_interval_s,
        progress=progress,
        total=total,
    )
    queue = core.pending(items)
    process = outcome.fresh_for(core.retried, key, process)

    async def worker() -> None:
        for item_key, item in queue:
            try:
                produced = await process(item)
            except Exception as exc:  # recorded, counted against the threshold, retried later
                core.fail_item(item_key, exc)
            else:
                core.finish_item(item_key, produced)

    async def flusher() -> None:
        # A slow stage's finished items reach disk within flush_interval_s of each other.
        while True:
            await asyncio.sleep(min(1.0, flush_interval_s))
            if core.writer.due():
                core.writer.flush()

    with core.bar.progress:
        ticker = asyncio.ensure_future(flusher())
        try:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        except BaseException:
            core.flush()  # what finished before the error is kept and marked done
            raise
        finally:
            ticker.cancel()
        return core.close()
