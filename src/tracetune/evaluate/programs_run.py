"""The ``programs`` benchmark: a held-out split of task programs, checked exactly against gold.

Training tasks come from ``tracetune tasks programs --seed S`` (seeds derived under the
``tracetune-programs`` namespace). The held-out split draws its seeds under a namespace of
its own (``tracetune-heldout:SEED:i``), so it shares no instance with any training run,
and ``--exclude DIR`` drops every task whose id is in the given task datasets as well (e.g.
the exact training set). Its tasks are written to ``OUT/tasks`` and reused on rerun.
``--data DIR`` evaluates a task dataset of your own instead.

Each answer is checked with ``tracetune.judge.answers`` (the checker the gold rollouts use:
numbers with their tolerance and units, aliases, lists), so "correct" means the same here as
in data generation. ``used_gold_tools`` says whether the episode called every tool of the
task's gold chain (an answer without them is a guess that happened to be right).
"""

from __future__ import annotations

import copy
import hashlib
from collections import defaultdict
from typing import Any

from tracetune.agent.loop import Agent
from tracetune.evaluate.base import ItemScore, ScoreReport, percent
from tracetune.evaluate.runs import (
    EvalRunConfig,
    EvalRunError,
    Notify,
    RunContext,
    check_backend,
    stable_id,
    write_jsonl,
)
from tracetune.judge.answers import check_answer
from tracetune.models.base import ChatModel
from tracetune.rollout import called_tools
from tracetune.schema import GoldAnswer, Task, Trajectory
from tracetune.store import Dataset
from tracetune.store.tasks import load_tasks
from tracetune.tools import load_tools

HELDOUT_NAMESPACE = "tracetune-heldout"


def heldout_seed(seed: int, index: int) -> int:
    """Seed of the ``index``-th held-out task: never one a training run draws."""
    digest = hashlib.sha256(f"{HELDOUT_NAMESPACE}:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def heldout_split(config: EvalRunConfig, out: Dataset[Task]) -> list[Task]:
    """Draw (or reload) the held-out split: ``n`` tasks, round robin over the families."""
    from tracetune.synth.programs.base import get_program, program_task_id
    from tracetune.synth.programs.generate import resolve_families

    families = resolve_families(config.families)
    excluded: set[str] = set()
    for path in config.exclude:
        excluded |= Dataset.open(path, Task).ids()
    have = {t.id: t for t in out}
    chosen: list[Task] = []
    new: list[Task] = []
    index = 0
    while len(chosen) < config.n:
        if index > 50 * config.n:
            raise EvalRunError(
                f"could not draw {config.n} held-out tasks outside the excluded datasets"
            )
        family = families[len(chosen) % len(families)]
        prog = get_program(family)
        seed = heldout_seed(config.seed, index)
        index += 1
        task_id = program_task_id(family, seed, prog.version)
        if task_id in excluded:
            continue
        task = have.get(task_id) or prog.task(seed, out.assets)
        if task_id not in have:
            task.metadata["split"] = "heldout"
            new.append(task)
        chosen.append(task)
    out.write_all(new)
    return chosen


def task_options(task: Task, options: dict[str, Any]) -> dict[str, Any]:
    """The run's tool settings plus the search corpus a retrieval task was written against."""
    merged = copy.deepcopy(options)
    corpus = task.metadata.get("search_corpus")
    if corpus and not (merged.get("search") or {}).get("corpus"):
        from tracetune.synth.programs.retrieval import resolve_corpus

        merged.setdefault("search", {})["corpus"] = str(resolve_corpus(str(corpus)))
    return merged


def score_programs(
    gold: list[dict[str, Any]], predictions: dict[str, dict[str, Any]]
) -> ScoreReport:
    """Accuracy overall and per family, and how often the gold chain's tools were used."""
    items = []
    for row in gold:
        task_id = row["id"]
        answer = GoldAnswer.model_validate(row["gold"])
        pred = predictions.get(task_id)
        prediction = pred.get("prediction") if pred else None
        check = check_answer(
            prediction, answer, ordered=bool(row.get("ordered")), choices=row.get("choices")
        )
        needed = set(row.get("gold_tools") or [])
        used = set(pred.get("called_tools") or []) if pred else set()
        items.append(
            ItemScore(
                id=task_id,
                scores={
                    "accuracy": check.score,
                    "used_gold_tools": float(needed <= used) if pred else 0.0,
                    "steps": len(pred.get("steps") or []) if pred else 0,
                },
                prediction=prediction,
                details={
                    "family": row.get("family"),
                    "gold": answer.value,
                    "reasons": check.reasons,
                    "extracted": check.extracted,
                    "status": pred.get("status") if pred else "missing",
                    "missing": pred is None,
                },
            )
        )
    metrics: dict[str, float | int] = {
        "accuracy": percent(sum(float(i.scores["accuracy"] or 0) for i in items), len(items)),
        "used_gold_tools": percent(
            sum(float(i.scores["used_gold_tools"] or 0) for i in items), len(items)
        ),
        "mean_steps": (sum(int(i.scores["steps"] or 0) for i in items) / len(items))
        if items
        else 0.0,
    }
    by_family: dict[str, list[ItemScore]] = defaultdict(list)
    for item in items:
        by_family[str(item.details["family"])].append(item)
    for family, chosen in sorted(by_family.items()):
        metrics[f"accuracy/{family}"] = percent(
            sum(float(i.scores["accuracy"] or 0) for i in chosen), len(chosen)
        )
    return ScoreReport(
        benchmark="programs",
        metrics=metrics,
        n_items=len(items),
        details={
            "checker": "tracetune.judge.answers.check_answer",
            "tasks_per_family": {f: len(c) for f, c in sorted(by_family.items())},
            "missing_predictions": [i.id for i in items if i.details["missing"]],
            "percent": ["accuracy", "used_gold_tools"],
        },
        items=items,
    )


async def run_programs(
    config: EvalRunConfig,
    model: ChatModel | None = None,
    progress: bool = True,
    notify: Notify | None = None,
) -> dict[str, Any]:
    ctx = RunContext(config, notify)
    out = ctx.trajectories
    if config.data is not None:
        tasks, source = load_tasks(config.data, out.assets)
        tasks = [t for t in tasks if t.gold is not None]
        if not tasks:
            raise EvalRunError(f"{config.data} has no tasks with a gold answer to check")
        split = f"tasks from {config.data}"
    else:
        task_store: Dataset[Task] = Dataset.create(ctx.root / "tasks", Task)
        tasks = heldout_split(config, task_store)
        source = task_store.assets
        split = f"held-out split (seed {config.seed}, {len(tasks)} tasks)"
    if config.limit:
        tasks = tasks[: config.limit]
    names = sorted({n for t in tasks for n in t.tools})
    tools = load_tools([*names, "final_answer"] if config.action_format == "json" else names)
    gold_rows = [
        {
            "id": t.id,
            "family": t.metadata.get("family"),
            "gold": t.gold.model_dump(mode="json"),
            "gold_tools": sorted({c.name for c in t.gold_chain} - {"final_answer"}),
            "ordered": bool(t.metadata.get("answer_ordered", False)),
            "choices": t.metadata.get("choices"),
        }
        for t in tasks
        if t.gold is not None
    ]
    write_jsonl(ctx.root / "gold.jsonl", gold_rows)
    ctx.notify(f"programs: {split}; tools: {', '.join(names)}")
    ctx.write_run(
        {
            "data": str(config.data) if config.data else None,
            "split": split,
            "tools": names,
            "excluded_datasets": [str(p) for p in config.exclude],
        }
    )
    controller = ctx.load_models(model)
    agents: dict[str, Agent] = {}

    def agent_for(options: dict[str, Any]) -> Agent:
        k = repr(sorted(options.items()))
        if k not in agents:
            agents[k] = Agent(
                controller,
                tools,
                config.action_format,
                config.max_steps,
                config.max_errors,
                ctx.sampling(),
                tool_options=options,
                tool_model=ctx.tool_model,
            )
        return agents[k]

    def key(task: Task) -> str:
        return stable_id("programs", task.id, controller.spec, config.action_format)

    async def process(task: Task) -> Trajectory:
        agent = agent_for(task_options(task, config.tool_options))
        trajectory = check_backend(await agent.run(task, source, out.assets, key(task)))
        trajectory.metadata.update(
            {"bench": "programs", "task_id": task.id, "family": task.metadata.get("family")}
        )
        return trajectory

    try:
        result = await ctx.run_items(tasks, key, process, progress=progress, sources=[source])
    finally:
        await ctx.close()
    wanted = {t.id for t in tasks}
    predictions: dict[str, dict[str, Any]] = {}
    trajectory_of: dict[str, str] = {}
    for trajectory in out:
        task_id = trajectory.task.id
        if task_id not in wanted:
            continue
        trajectory_of[task_id] = trajectory.id
        predictions[task_id] = {
            "id": task_id,
            "prediction": trajectory.final_answer,
            "family": trajectory.task.metadata.get("family"),
            "status": trajectory.status,
            "called_tools": sorted(called_tools(trajectory)),
            "steps": [s.index for s in trajectory.steps],
        }
    write_jsonl(
        ctx.root / "predictions.jsonl", [predictions[t.id] for t in tasks if t.id in predictions]
    )
    report = score_programs(gold_rows, predictions)
    return ctx.finish(
        {"programs": report},
        "programs",
        trajectory_of,
        result,
        {"split": split, "predictions": str(ctx.root / "predictions.jsonl")},
    )


__all__ = ["heldout_seed", "heldout_split", "run_programs", "score_programs"]
