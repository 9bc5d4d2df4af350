"""The controller loop: a model acts with tools until it answers or runs out of budget.

Every episode yields a ``Trajectory``. Parse errors and tool errors are typed step errors
that the model reads as its next observation and may recover from; the episode ends on a
final answer, after ``max_steps`` steps, or after ``max_errors`` failed steps.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tracetune.agent.formats import ActionFormat, ParseError, get_format
from tracetune.agent.render import episode_messages
from tracetune.agent.toolbox import ToolBox
from tracetune.errors import ConfigError
from tracetune.models.base import BackendError, ChatMessage, ChatModel, Sampling
from tracetune.schema import (
    Action,
    ErrorKind,
    FileRef,
    Observation,
    Step,
    StepError,
    Task,
    Trajectory,
    TrajectoryStatus,
    Usage,
)
from tracetune.store import AssetStore
from tracetune.tools import Tool

DEFAULT_STOP = ("\nObservation:",)


class EpisodeBackendError(BackendError):
    """The controller's backend failed for good during an episode (after its retries).

    Raised out of :meth:`Agent.run` rather than written down as a finished episode, so that
    the stage runner records the item as failed and retries it on the next run: an outage
    (HTTP 503, an unreachable URL, a prompt over the model's context) must never turn into
    a trajectory on disk or an item marked done.
    """


@dataclass
class Outcome:
    """What executing one action produced."""

    observation: Observation | None
    error: StepError | None = None
    final_answer: str | None = None


class Executor(Protocol):
    """Runs a parsed action: tool calls directly, code in the sandbox."""

    async def execute(self, action: Action, step_index: int) -> Outcome: ...

    async def close(self) -> None: ...


class ToolCallExecutor:
    """Executes JSON tool calls with the episode's toolbox."""

    def __init__(self, toolbox: ToolBox) -> None:
        self.toolbox = toolbox

    async def execute(self, action: Action, step_index: int) -> Outcome:
        if action.type == "final_answer":
            return Outcome(Observation(text=action.answer or ""), final_answer=action.answer or "")
        if action.tool_call is None:
            return Outcome(None, StepError(kind=ErrorKind.PARSE, message="expected a tool call"))
        outcome = await self.toolbox.call(action.tool_call, step_index)
        final = None
        if outcome.result is not None and outcome.result.final:
            final = outcome.result.text
        return Outcome(outcome.observation, outcome.error, final)

    async def close(self) -> None:
        # Removing a directory waits on the filesystem (milliseconds on a busy disk): off the
        # event loop, so hundreds of episodes in flight do not queue behind it.
        await asyncio.to_thread(self.toolbox.cleanup)


async def make_executor(fmt: ActionFormat, toolbox: ToolBox) -> Executor:
    if fmt.name in ("json", "tools"):
        return ToolCallExecutor(toolbox)
    from tracetune.agent.code import CodeExecutor  # needs the sandbox

    return await CodeExecutor.start(toolbox)


class Episode:
    """One task in progress: its messages so far, its steps, and its executor.

    ``Agent.run`` drives an episode to the end; step-wise exploration drives it one
    ``apply`` at a time, choosing among several candidate outputs.
    """

    def __init__(
        self,
        task: Task,
        model: ChatModel,
        fmt: ActionFormat,
        tools: list[Tool],
        executor: Executor,
        toolbox: ToolBox,
        source: AssetStore,
    ) -> None:
        self.task = task
        self.model = model
        self.fmt = fmt
        self.tools = tools
        self.executor = executor
        self.toolbox = toolbox
        self.source = source
        self.steps: list[Step] = []
        self.final_answer: str | None = None
        self.errors = 0
        self.system_prompt = fmt.system_prompt(tools)

    def _resolve(self, ref: FileRef) -> Any:
        for store in (self.toolbox.assets, self.source):
            if store.has(ref):
                return store.path(ref)
        raise FileNotFoundError(f"image {ref.name} is in neither the input nor output assets")

    def messages(self) -> list[ChatMessage]:
        return episode_messages(
            self.system_prompt, self.task, self.steps, self._resolve, self.fmt.name
        )

    def tool_schemas(self) -> list[dict[str, Any]] | None:
        """The request's ``tools`` (native tool-call format only)."""
        return [t.openai_schema() for t in self.tools] if self.fmt.native_tools else None

    async def apply(self, raw: str, usage: Usage | None = None, latency_s: float = 0.0) -> Step:
        """Parse a model output, execute its action, and append the step."""
        index = len(self.steps)
        step = Step(index=index, raw=raw, usage=usage or Usage(), latency_s=latency_s)
        try:
            parsed = self.fmt.parse(raw)
        except ParseError as exc:
            step.error = StepError(kind=ErrorKind.PARSE, message=str(exc))
        else:
            step.thought, step.action = parsed.thought, parsed.action
            started = time.monotonic()
            outcome = await self.executor.execute(parsed.action, index)
            step.exec_s = time.monotonic() - started
            step.observation, step.error = outcome.observation, outcome.error
            if outcome.final_answer is not None and outcome.error is None:
                self.final_answer = outcome.final_answer
                if step.action is not None and step.action.type == "tool_call":
                    step.action = Action(type="final_answer", answer=outcome.final_answer)
                elif step.action is not None and step.action.type == "code":
                    step.action = Action(
                        type="code", code=step.action.code, answer=outcome.final_answer
                    )
        if step.error is not None:
            self.errors += 1
        self.steps.append(step)
        return step

    async def close(self) -> None:
        await self.executor.close()


class Agent:
    """A controller model with tools, an action format, and step/error budgets."""

    def __init__(
        self,
        model: ChatModel,
        tools: list[Tool],
        action_format: str = "json",
        max_steps: int = 8,
        max_errors: int = 3,
        sampling: Sampling | None = None,
        tool_options: dict[str, Any] | None = None,
        tool_model: ChatModel | None = None,
    ) -> None:
        if max_steps < 1:
            raise ConfigError("max_steps must be at least 1")
        if max_errors < 1:
            raise ConfigError("max_errors must be at least 1")
        if not any(t.name == "final_answer" for t in tools) and action_format != "code":
            from tracetune.tools import get_tool

            tools = [*tools, get_tool("final_answer")]
        self.model = model
        self.tools = tools
        self.fmt = get_format(action_format)
        self.max_steps = max_steps
        self.max_errors = max_errors
        self.sampling = sampling or Sampling(stop=DEFAULT_STOP)
        self.tool_options = tool_options or {}
        self.tool_model = tool_model  # the VLM that visual_qa / inspect_file ask; none by default
        self._assets: AssetStore | None = None

    async def start(self, task: Task, source: AssetStore, assets: AssetStore) -> Episode:
        """Set up an episode: working directory with the task's files, and its executor."""
        unknown = [n for n in task.tools if n not in {t.name for t in self.tools}]
        if unknown:
            raise ConfigError(f"task {task.id} needs tools {unknown} that this agent was not given")
        # A fresh working directory waits on the filesystem: off the event loop.
        toolbox = await asyncio.to_thread(
            ToolBox.for_task,
            task,
            self.tools,
            source,
            assets,
            model=self.tool_model,
            options=self.tool_options,
        )
        executor = await make_executor(self.fmt, toolbox)
        return Episode(task, self.model, self.fmt, self.tools, executor, toolbox, source)

    @property
    def assets(self) -> AssetStore:
        """Where episodes run without stores keep their files: a temporary directory made on
        first use and kept for the agent's lifetime (pass stores to :meth:`run` to choose)."""
        if self._assets is None:
            import tempfile

            self._assets = AssetStore(tempfile.mkdtemp(prefix="tracetune-agent-"))
        return self._assets

    def ask(
        self, query: str, files: Sequence[str | Path] = (), sampling: Sampling | None = None
    ) -> Trajectory:
        """Run one episode on ``query`` with local ``files`` (images, documents) and return
        its trajectory; the blocking entry point for scripts and notebooks."""
        import asyncio

        from tracetune.store.tasks import task_from_inputs

        task = task_from_inputs(query, list(files), self.assets, source="python")
        return asyncio.run(self.run(task, sampling=sampling))

    async def run(
        self,
        task: Task,
        source: AssetStore | None = None,
        assets: AssetStore | None = None,
        trajectory_id: str | None = None,
        sampling: Sampling | None = None,
    ) -> Trajectory:
        """Run ``task`` to a final answer or a budget.

        The task's files are read from ``source`` and the images tools return are written to
        ``assets``; both default to :attr:`assets`. ``sampling`` overrides the agent's for
        this episode (e.g. a per-sample seed).
        """
        assets = assets or self.assets
        source = source or assets
        sampling = sampling or self.sampling
        started_at, t0 = time.time(), time.monotonic()
        episode = await self.start(task, source, assets)
        status: TrajectoryStatus = "max_steps"
        try:
            for _ in range(self.max_steps):
                try:
                    generation = await self.model.generate(
                        episode.messages(), n=1, sampling=sampling, tools=episode.tool_schemas()
                    )
                except BackendError as exc:
                    raise EpisodeBackendError(
                        f"task {task.id}, step {len(episode.steps)}: {exc}"
                    ) from exc
                raw = self.fmt.raw(generation.completions[0]) if generation.completions else ""
                step = await episode.apply(raw, generation.usage, generation.latency_s)
                if episode.final_answer is not None:
                    status = "completed"
                    break
                if step.error is not None and episode.errors >= self.max_errors:
                    status = "max_errors"
                    break
        finally:
            await episode.close()
        usage = Usage()
        for step in episode.steps:
            usage = usage.add(step.usage)
        return Trajectory(
            id=trajectory_id or f"{task.id}-{self.model.spec}",
            task=task,
            controller=self.model.spec,
            action_format=self.fmt.name,
            tools=[t.name for t in self.tools],
            steps=episode.steps,
            final_answer=episode.final_answer,
            status=status,
            usage=usage,
            started_at=started_at,
            duration_s=time.monotonic() - t0,
            prompt_hash=self.fmt.prompt_hash,
            sampling=sampling.to_dict(),
        )
