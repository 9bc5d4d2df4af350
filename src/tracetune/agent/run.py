"""Run an agent over many tasks into a trajectory dataset, resumably."""

from __future__ import annotations

import hashlib
from itertools import islice
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from tracetune.agent.loop import Agent
from tracetune.cliflag import CliFlag
from tracetune.errors import ConfigError, InputFileError
from tracetune.models.base import ChatModel, Sampling, load_model
from tracetune.runner import MeteredModel, StageResult, run_stage
from tracetune.schema import Task, Trajectory
from tracetune.stageoptions import StageOptions
from tracetune.store import Dataset
from tracetune.store.tasks import TaskSource, task_from_inputs, task_source
from tracetune.tools import load_tools

DEFAULT_TOOLS = ["calculator", "image_crop"]


class AgentRunConfig(StageOptions):
    """Configuration of ``tracetune agent run`` (YAML keys are these field names)."""

    out: Path = Field(description="Output trajectory dataset directory (resumable).")
    concurrency: int = Field(
        default=4, ge=1, description="Model requests in flight, and episodes run at once."
    )
    model: str = Field(description="Controller spec: 'openai:NAME' or 'local:PATH_OR_HUB_ID'.")
    task: str | None = Field(default=None, description="A single task's query text.")
    images: Annotated[list[Path], CliFlag("--image")] = Field(
        default_factory=list, description="Image for --task (repeatable)."
    )
    tasks: Path | None = Field(
        default=None, description="A task dataset directory or a JSONL of {query, images, ...}."
    )
    tools: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TOOLS),
        description="Tool names, comma-separated or repeated (registered, or "
        "'package.module:tool').",
    )
    tool_modules: list[str] = Field(
        default_factory=list, description="Python modules to import first (they register tools)."
    )
    action_format: Literal["json", "code", "tools"] = Field(
        default="json", description="How actions are written."
    )
    max_steps: int = Field(default=8, ge=1, description="Step budget per episode.")
    max_errors: int = Field(default=3, ge=1, description="Failed steps allowed per episode.")
    samples: int = Field(default=1, ge=1, description="Trajectories per task.")
    temperature: float = Field(default=0.0, ge=0, description="Sampling temperature.")
    top_p: float = Field(default=1.0, gt=0, le=1, description="Nucleus sampling mass.")
    max_tokens: int = Field(default=512, ge=1, description="Max new tokens per step.")
    seed: int | None = Field(
        default=None, description="Sampling seed, where the backend supports it."
    )


def trajectory_id(task: Task, controller: str, action_format: str, sample: int) -> str:
    """Stable id, so a rerun recognises trajectories it already wrote."""
    blob = f"{task.id}|{controller}|{action_format}|{sample}"
    return "traj-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def prepare_tasks(config: AgentRunConfig, out: Dataset[Trajectory]) -> TaskSource:
    if (config.task is None) == (config.tasks is None):
        raise ConfigError("give exactly one of --task TEXT or --tasks PATH")
    if config.task is not None:
        task = task_from_inputs(config.task, list(config.images), out.assets, tools=None)
        return TaskSource(1, out.assets, lambda: iter([task]))
    assert config.tasks is not None
    return task_source(config.tasks, out.assets)


async def run_agent(
    config: AgentRunConfig, model: ChatModel | None = None, progress: bool = True
) -> tuple[StageResult, Dataset[Trajectory]]:
    """Run the configured agent over its tasks; trajectories already written are skipped."""
    if config.tasks is not None and not config.tasks.exists():
        # Checked before the output directory is created, so a typo leaves nothing behind.
        raise InputFileError(f"no task dataset or JSONL file at {config.tasks}")
    out: Dataset[Trajectory] = Dataset.create(config.out, Trajectory)
    tasks = prepare_tasks(config, out)  # streamed: read as the run reaches them
    source = tasks.assets
    tools = load_tools(config.tools, config.tool_modules)
    model = model or load_model(config.model, config.backend.for_stage(config.concurrency))
    metered = MeteredModel(model, out.state, "agent")
    sampling = Sampling(
        temperature=config.temperature,
        top_p=config.top_p,
        max_tokens=config.max_tokens,
        seed=config.seed,
        stop=("\nObservation:",),
    )
    agent = Agent(
        metered, tools, config.action_format, config.max_steps, config.max_errors, sampling
    )
    runs = len(tasks) if config.limit is None else min(len(tasks), config.limit)
    items = ((task, s) for task in islice(tasks, runs) for s in range(config.samples))

    async def process(item: tuple[Task, int]) -> Trajectory:
        task, sample = item
        return await agent.run(
            task,
            source,
            out.assets,
            trajectory_id(task, model.spec, config.action_format, sample),
            sampling=sampling.for_sample(sample),
        )

    try:
        result = await run_stage(
            "agent",
            items,
            key=lambda item: trajectory_id(item[0], model.spec, config.action_format, item[1]),
            process=process,
            out=out,
            concurrency=config.concurrency,
            budget=config.budget(),
            sources=[source],
            progress=progress,
            total=runs * config.samples,
        )
    finally:
        await model.aclose()
    return result, out
