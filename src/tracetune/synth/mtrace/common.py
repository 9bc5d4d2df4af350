"""Pieces every M-TRACE stage shares: stable ids, reading model output, stage models."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from pydantic import Field

from tracetune.models.base import ChatModel, ModelOptions, load_model
from tracetune.models.replies import MalformedOutput as MalformedOutput  # the stages' import
from tracetune.models.replies import extract_json as extract_json
from tracetune.runner import Budget, MeteredModel, StageResult, run_stage
from tracetune.schema import Usage
from tracetune.store import AssetStore, Dataset, RunState
from tracetune.timelimit import TimedBudget

if TYPE_CHECKING:
    from tracetune.synth.mtrace.config import SynthConfig

T = TypeVar("T")


def stable_id(prefix: str, *parts: Any) -> str:
    """An id that a rerun computes again from the same inputs (so resume never duplicates)."""
    blob = json.dumps(parts, sort_keys=True, ensure_ascii=False, default=str)
    return f"{prefix}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


_CODE = re.compile(r"```(?:py|python|python3)?[ \t]*\n(.*?)```", re.S | re.I)


def extract_code(text: str) -> str:
    """The Python in a fenced block (the longest, when there are several)."""
    blocks = [b.strip() for b in _CODE.findall(text) if b.strip()]
    if not blocks:
        raise MalformedOutput("expected a ```python fenced code block, found none")
    return max(blocks, key=len)


def stage_model(spec: str, options: ModelOptions, state: RunState, stage: str) -> MeteredModel:
    """A fresh backend for one stage, caching its calls in that stage's run state.

    Each stage gets its own backend object: ``MeteredModel`` binds the response cache to
    the first state it sees, and every stage directory has its own.
    """
    model: ChatModel = load_model(spec, options)
    model.cache = state
    return MeteredModel(model, state, stage)


def spent_elsewhere(config: Any, current: Dataset[Any]) -> Usage:
    """What the run's other stage directories have spent (their run states' usage)."""
    from tracetune.synth.mtrace.config import LAYOUT

    total = Usage()
    for name, _ in LAYOUT:
        root = config.dir(name)
        if root.resolve() == current.root.resolve() or not (root / "state.sqlite").exists():
            continue
        state = RunState(root / "state.sqlite")
        try:
            total = total.add(state.usage())
        finally:
            state.close()
    return total


class RunBudget(TimedBudget):
    """The run's budget as one stage sees it: its own spend plus the other stages'."""

    elsewhere: Usage = Field(default_factory=Usage, description="The other stages' spend.")

    def exceeded(self, usage: Usage) -> str | None:
        # ``run_stage`` passes its own directory's usage; the limits are the whole run's,
        # and so is the spend the stop message reports.
        return super().exceeded(usage.add(self.elsewhere))


def stage_budget(config: SynthConfig, out: Dataset[Any]) -> Budget:
    """The run's budget (spend, tokens, time) for the stage writing ``out``."""
    budget = config.budget()
    if budget.unlimited:
        return budget
    return RunBudget(**budget.model_dump(), elsewhere=spent_elsewhere(config, out))


async def run_synth_stage(
    config: Any,
    stage: str,
    items: Sequence[T],
    key: Callable[[T], str],
    process: Callable[[T], Awaitable[Any]],
    out: Dataset[Any],
    *,
    progress: bool,
    sources: Iterable[AssetStore] = (),
) -> StageResult:
    """One M-TRACE stage on the stage runner, with the run's concurrency, budget and
    failure threshold (``config`` is the SynthConfig)."""
    return await run_stage(
        stage,
        items,
        key=key,
        process=process,
        out=out,
        concurrency=config.concurrency,
        budget=stage_budget(config, out),
        sources=sources,
        max_failures=config.max_failures,
        max_failure_rate=config.max_failure_rate,
        progress=progress,
        total=len(items),
    )


class Turns:
    """Lets items pass a critical section one at a time, in a fixed order.

    Work before the section runs concurrently; what the section decides (e.g. which pool
    image is still free under the reuse cap) depends only on the items before it in
    ``order``, never on scheduling, so a resumed run decides the same. Every item of
    ``order`` must call ``done`` once, whatever happened to it.
    """

    def __init__(self, order: list[str]) -> None:
        self.index = {key: i for i, key in enumerate(order)}
        self.order = order
        self.finished: set[str] = set()
        self.next = 0
        self.condition = asyncio.Condition()

    async def wait(self, key: str) -> None:
        async with self.condition:
            await self.condition.wait_for(lambda: self.next >= self.index[key])

    async def done(self, key: str) -> None:
        async with self.condition:
            self.finished.add(key)
            while self.next < len(self.order) and self.order[self.next] in self.finished:
                self.next += 1
            self.condition.notify_all()
