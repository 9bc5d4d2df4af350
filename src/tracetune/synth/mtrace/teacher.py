"""Teacher rollouts (stage ``rollout``: OUT/verified -> OUT/trajectories).

Any backend is the teacher, in either action format (``code``: Python calling the tools
as functions, run in the sandbox; ``json``: one tool call per step), with the whole tool
catalogue, ``samples`` trajectories per task at ``temperature``. Each sample has its own
sampling seed, so samples of one task are neither the same request nor the same cache
entry. Every finished episode is written, whatever its outcome; the trajectory verifier
decides. An episode cut short by the backend failing for good is a failed item, retried
on the next run, not a trajectory.
"""

from __future__ import annotations

from typing import Any

from tracetune.agent.loop import DEFAULT_STOP, Agent
from tracetune.agent.run import trajectory_id
from tracetune.errors import TracetuneError
from tracetune.models.base import Sampling
from tracetune.runner import StageResult
from tracetune.schema import Task, Trajectory
from tracetune.store import Dataset
from tracetune.synth.mtrace.common import run_synth_stage, stage_model
from tracetune.synth.mtrace.config import SynthConfig
from tracetune.tools import load_tools

STAGE = "rollout"


class TeacherBackendError(TracetuneError, RuntimeError):
    """The teacher's backend failed for good during an episode."""


async def rollout_tasks(config: SynthConfig, progress: bool = True) -> StageResult:
    """Stage ``rollout``."""
    rc = config.rollout
    spec = config.need("teacher", "rollout")
    tasks: Dataset[Task] = Dataset.open(config.dir("verified"), Task)
    out: Dataset[Trajectory] = Dataset.create(config.dir("trajectories"), Trajectory)
    items = [(t, s) for t in sorted(tasks, key=lambda t: t.id) for s in range(rc.samples)]
    names = sorted(
        set(config.queries.tools) | {n for t, _ in items for n in t.tools} | {"final_answer"}
    )
    tools = load_tools(names)
    teacher = stage_model(spec, config.backend.for_stage(config.concurrency), out.state, STAGE)
    # The tools' model calls (visual_qa, caption) count as the stage's spend, for budgets
    # and for `synth stats`.
    tool_model = stage_model(
        rc.tool_model or spec, config.backend.for_stage(config.concurrency), out.state, STAGE
    )
    options: dict[str, Any] = {}
    if rc.corpus is not None:
        options["search"] = {"corpus": str(rc.corpus)}
    agents: dict[int, Agent] = {}

    def agent(sample: int) -> Agent:
        if sample not in agents:
            agents[sample] = Agent(
                teacher,
                tools,
                rc.action_format,
                rc.max_steps,
                rc.max_errors,
                Sampling(
                    temperature=rc.temperature,
                    max_tokens=rc.max_tokens,
                    stop=DEFAULT_STOP,
                    seed=sample,
                ),
                tool_options=options,
                tool_model=tool_model,
            )
        return agents[sample]

    def key(item: tuple[Task, int]) -> str:
        return trajectory_id(item[0], spec, rc.action_format, item[1])

    async def process(item: tuple[Task, int]) -> Trajectory:
        task, sample = item
        trajectory = await agent(sample).run(task, tasks.assets, out.assets, key(item))
        if trajectory.status == "failed" and trajectory.metadata.get("error"):
            raise TeacherBackendError(str(trajectory.metadata["error"]))
        trajectory.metadata["sample"] = sample
        return trajectory

    try:
        return await run_synth_stage(
            config, STAGE, items, key, process, out, progress=progress, sources=[tasks.assets]
        )
    finally:
        await teacher.aclose()
        await tool_model.aclose()
