"""The two verifier stages: tasks (query-file) and trajectories.

* ``verify_tasks`` (OUT/tasks -> OUT/verified): the query-file judge; a rejected task whose
  verdict carries a rewritten query is re-verified once with it (``verify_tasks.repair``)
  and kept with the new query if it passes, else dropped. Verdicts stay on the task
  (``metadata['verdicts']``) and go to OUT/verified/verdicts.
* ``verify_trajectories`` (OUT/trajectories -> OUT/final): episodes without a final answer
  are dropped, gold answers are checked exactly, then the trajectory judge decides.
  Every verdict, passed or not, is a record in OUT/final/verdicts.
"""

from __future__ import annotations

from typing import Any

from tracetune.judge.answers import judge_answer
from tracetune.judge.query_files import MalformedVerdict, verify_task
from tracetune.judge.trajectory import verify_trajectory
from tracetune.runner import Drop, StageResult
from tracetune.schema import Task, Trajectory, Verdict
from tracetune.store import Dataset
from tracetune.synth.mtrace.common import run_synth_stage, stable_id, stage_model
from tracetune.synth.mtrace.config import SynthConfig
from tracetune.tools import load_tools

TASKS_STAGE = "verify_tasks"
TRAJECTORIES_STAGE = "verify_trajectories"


def collect_verdicts(out: Dataset[Any], stage: str) -> Dataset[Verdict]:
    """OUT/verdicts from the stage's drops and the kept records' metadata (idempotent)."""
    verdicts: Dataset[Verdict] = Dataset.create(out.root / "verdicts", Verdict)
    found: dict[str, Verdict] = {}
    for _, status, info in out.state.items(stage):
        if status == "dropped":
            for v in info.get("verdicts", []):
                verdict = Verdict.model_validate(v)
                found[verdict.id] = verdict
    for record in out:
        for v in record.metadata.get("verdicts", []):
            verdict = Verdict.model_validate(v)
            found[verdict.id] = verdict
    verdicts.write_all([found[k] for k in sorted(found)])
    return verdicts


async def verify_tasks(config: SynthConfig, progress: bool = True) -> StageResult:
    """Stage ``verify_tasks``: OUT/tasks -> OUT/verified."""
    vc = config.verify_tasks
    spec = config.need("judge", "verify-tasks")
    tasks: Dataset[Task] = Dataset.open(config.dir("tasks"), Task)
    out: Dataset[Task] = Dataset.create(config.dir("verified"), Task)
    model = stage_model(spec, config.backend.for_stage(config.concurrency), out.state, TASKS_STAGE)

    async def process(task: Task) -> Task | Drop:
        verdicts: list[Verdict] = []
        query = task.query
        for round_ in (1, 2):
            try:
                verdict = await verify_task(
                    task,
                    query,
                    tasks.assets,
                    model,
                    max_doc_chars=vc.max_doc_chars,
                    max_tokens=vc.max_tokens,
                    verdict_id=stable_id("verdict", task.id, spec, TASKS_STAGE, round_),
                )
            except MalformedVerdict as exc:
                return Drop(
                    "malformed verdict",
                    {
                        "error": str(exc),
                        "round": round_,
                        "verdicts": [v.model_dump(mode="json") for v in verdicts],
                    },
                )
            verdict.details["round"] = round_
            verdicts.append(verdict)
            if verdict.passed:
                break
            rewrite = str(verdict.details.get("updated_query") or "")
            if not vc.repair or round_ == 2 or not rewrite or rewrite == query:
                break
            query = rewrite
        dumped = [v.model_dump(mode="json") for v in verdicts]
        if not verdicts[-1].passed:
            reason = (
                "rejected after repair" if len(verdicts) > 1 else "rejected by query-file verifier"
            )
            return Drop(reason, {"verdicts": dumped, "why": verdicts[-1].reasons})
        metadata = {**task.metadata, "verdicts": dumped}
        if query != task.query:
            metadata["original_query"] = task.query
        return task.model_copy(update={"query": query, "metadata": metadata})

    try:
        result = await run_synth_stage(
            config,
            TASKS_STAGE,
            sorted(tasks, key=lambda t: t.id),
            lambda t: t.id,
            process,
            out,
            progress=progress,
            sources=[tasks.assets],
        )
    finally:
        await model.aclose()
    collect_verdicts(out, TASKS_STAGE)
    return result


async def verify_trajectories(config: SynthConfig, progress: bool = True) -> StageResult:
    """Stage ``verify_trajectories``: OUT/trajectories -> OUT/final."""
    vc = config.verify_trajectories
    spec = config.need("judge", "verify-trajectories")
    trajectories: Dataset[Trajectory] = Dataset.open(config.dir("trajectories"), Trajectory)
    out: Dataset[Trajectory] = Dataset.create(config.dir("final"), Trajectory)
    model = stage_model(
        spec, config.backend.for_stage(config.concurrency), out.state, TRAJECTORIES_STAGE
    )
    tool_cache: dict[tuple[str, ...], list[Any]] = {}

    def tools_of(trajectory: Trajectory) -> list[Any]:
        names = tuple(trajectory.tools)
        if names not in tool_cache:
            tool_cache[names] = load_tools(list(names))
        return tool_cache[names]

    async def process(trajectory: Trajectory) -> Trajectory | Drop:
        verdicts: list[Verdict] = []

        def drop(reason: str, **info: Any) -> Drop:
            return Drop(reason, {"verdicts": [v.model_dump(mode="json") for v in verdicts], **info})

        if trajectory.final_answer is None:
            verdicts.append(
                Verdict(
                    id=stable_id("verdict", trajectory.id, "rules"),
                    target_id=trajectory.id,
                    judge="rules",
                    passed=False,
                    score=0.0,
                    reasons=[f"no final answer (episode ended: {trajectory.status})"],
                    details={"task_id": trajectory.task.id},
                )
            )
            return drop("no final answer", status=trajectory.status)
        if trajectory.task.gold is not None:
            gold = judge_answer(trajectory, judge="gold")
            verdicts.append(gold)
            if not gold.passed:
                return drop("wrong answer (gold check)", why=gold.reasons)
        try:
            verdict = await verify_trajectory(
                trajectory,
                tools_of(trajectory),
                [trajectories.assets],
                model,
                verdict_id=stable_id("verdict", trajectory.id, spec, TRAJECTORIES_STAGE),
                max_observation_chars=vc.max_observation_chars,
                max_images=vc.max_images,
                max_tokens=vc.max_tokens,
            )
        except MalformedVerdict as exc:
            return drop("malformed verdict", error=str(exc))
        verdicts.append(verdict)
        if not verdict.passed:
            problems = verdict.details.get("known_problems") or ["rejected"]
            return drop(f"trajectory verifier: {problems[0]}", why=verdict.reasons)
        metadata = {
            **trajectory.metadata,
            "verdicts": [v.model_dump(mode="json") for v in verdicts],
        }
        return trajectory.model_copy(update={"metadata": metadata})

    try:
        result = await run_synth_stage(
            config,
            TRAJECTORIES_STAGE,
            sorted(trajectories, key=lambda t: t.id),
            lambda t: t.id,
            process,
            out,
            progress=progress,
            sources=[trajectories.assets],
        )
    finally:
        await model.aclose()
    collect_verdicts(out, TRAJECTORIES_STAGE)
    return result
