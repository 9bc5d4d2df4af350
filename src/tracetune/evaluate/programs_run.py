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

Beside answer accuracy the report carries the learning metrics of
:mod:`tracetune.evaluate.learning` (valid actions, right first tool against the
always-majority-tool baseline, per-step tool and argument accuracy against the gold
chain). ``mode: step`` scores the next action from the gold prefix instead of whole
episodes: the gold chain is replayed with the real tools, and at every gold step the
controller writes one action, which is parsed and compared, never executed.
"""

from __future__ import annotations

import copy
import hashlib
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from tracetune.errors import InputFileError
from tracetune.evaluate.adapter import BenchConfig, BenchmarkAdapter, CliFlag, Scored
from tracetune.evaluate.base import ItemScore, ScoreReport, percent
from tracetune.evaluate.learning import (
    LEARNING_PERCENT,
    STEP_PERCENT,
    episode_scores,
    learning_metrics,
    step_action,
    step_mode_metrics,
    trajectory_actions,
)
from tracetune.evaluate.runs import (
    EpisodeBackendError,
    EvalRunError,
    Notify,
    RunContext,
    stable_id,
    write_jsonl,
)
from tracetune.judge.answers import check_answer
from tracetune.models.base import ChatModel
from tracetune.rollout import called_tools
from tracetune.runner import StageResult
from tracetune.schema import GoldAnswer, Task, Trajectory
from tracetune.store import Dataset
from tracetune.store.tasks import load_tasks
from tracetune.tools import load_tools

HELDOUT_NAMESPACE = "tracetune-heldout"


class ProgramsConfig(BenchConfig):
    """Options of ``tracetune eval run programs``."""

    VOLATILE = BenchConfig.VOLATILE | {"gold_prefixes"}  # not part of the run's identity
    bench: Literal["programs"] = "programs"
    data: Path | None = Field(
        default=None,
        description="A task dataset to evaluate (default: a held-out split drawn here).",
    )
    mode: Literal["e2e", "step"] = Field(
        default="e2e",
        description="e2e (whole episodes) or step (each gold step predicted from the gold "
        "prefix, never executed).",
    )
    action_format: Literal["json", "code", "tools"] = Field(
        default="json", description="How actions are written."
    )
    n: int = Field(default=40, ge=1, description="Size of the held-out split.")
    seed: int = Field(default=0, description="Seed of the held-out split.")
    families: Annotated[list[str], CliFlag("--family", "--families")] = Field(
        default_factory=list, description="Task families (repeatable; default: all)."
    )
    exclude: list[Path] = Field(
        default_factory=list,
        description="Task datasets (e.g. the training tasks) whose tasks never enter the "
        "held-out split (repeatable).",
    )
    gold_prefixes: Path | None = Field(
        default=None,
        description="Step mode: a trajectory dataset holding gold replays of the same tasks "
        "(e.g. OUT/trajectories of an earlier step-mode run) to take the gold prefixes from "
        "instead of replaying the gold chains again.",
    )


def heldout_seed(seed: int, index: int) -> int:
    """Seed of the ``index``-th held-out task: never one a training run draws."""
    digest = hashlib.sha256(f"{HELDOUT_NAMESPACE}:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def heldout_split(config: ProgramsConfig, out: Dataset[Task]) -> list[Task]:
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
        learning = episode_scores(row, pred) if row.get("gold_chain") is not None else None
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
                    "learning": learning,
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
    learned = [i for i in items if i.details["learning"] is not None]
    percent_names = ["accuracy", "used_gold_tools"]
    if learned and len(learned) == len(items):
        numbers = learning_metrics(
            [r for r in gold if r.get("gold_chain") is not None],
            [
                {
                    "family": i.details["family"],
                    "learning": i.details["learning"],
                    "accuracy": float(i.scores["accuracy"] or 0),
                    "used_gold_tools": float(i.scores["used_gold_tools"] or 0),
                    "completed": float(i.details["status"] == "completed"),
                }
                for i in items
            ],
        )
        metrics.update({k: v for k, v in numbers.items() if isinstance(v, int | float)})
        percent_names += LEARNING_PERCENT
        for item in items:
            learning = item.details["learning"]
            item.scores["first_tool"] = learning["first_tool"]
            item.scores["valid_steps"] = learning["valid_steps"]
    by_family: dict[str, list[ItemScore]] = defaultdict(list)
    for item in items:
        by_family[str(item.details["family"])].append(item)
    for family, chosen in sorted(by_family.items()):
        metrics[f"accuracy/{family}"] = percent(
            sum(float(i.scores["accuracy"] or 0) for i in chosen), len(chosen)
        )
        if learned and len(learned) == len(items):
            metrics[f"first_tool/{family}"] = percent(
                sum(float(i.scores["first_tool"] or 0) for i in chosen), len(chosen)
            )
    details: dict[str, Any] = {
        "checker": "tracetune.judge.answers.check_answer",
        "tasks_per_family": {f: len(c) for f, c in sorted(by_family.items())},
        "missing_predictions": [i.id for i in items if i.details["missing"]],
        "percent": percent_names,
    }
    if learned:
        details["majority_tool"] = majority_tool(gold)
    return ScoreReport(
        benchmark="programs",
        metrics=metrics,
        n_items=len(items),
        details=details,
        items=items,
    )


def majority_tool(gold: list[dict[str, Any]]) -> str | None:
    from tracetune.evaluate.learning import majority_baseline

    return majority_baseline([r for r in gold if r.get("gold_chain") is not None])[0]


def score_programs_steps(
    gold: list[dict[str, Any]], predictions: dict[str, dict[str, Any]]
) -> ScoreReport:
    """Step mode: each gold step predicted once from the gold prefix (teacher forcing)."""
    metrics, rows = step_mode_metrics(gold, predictions)
    items = [
        ItemScore(
            id=r["id"],
            scores={
                "tool_accuracy": percent(r.get("tool", 0), r.get("steps", 0)),
                "argument_accuracy": percent(r.get("arguments", 0), r.get("steps", 0)),
                "first_tool": float(r.get("first", 0)),
            },
            prediction=None,
            details={"family": r["family"], "missing": r["id"] not in predictions},
        )
        for r in rows
    ]
    numbers = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    return ScoreReport(
        benchmark="programs/step",
        metrics=numbers,
        n_items=len(items),
        details={
            "majority_tool": metrics.get("majority_tool"),
            "missing_predictions": [i.id for i in items if i.details["missing"]],
            "percent": STEP_PERCENT + [k for k in numbers if k.startswith("tool_accuracy/")],
        },
        items=items,
    )


class ProgramsAdapter(BenchmarkAdapter[ProgramsConfig]):
    """Held-out task programs (or a task dataset), answers checked exactly against gold."""

    config_model = ProgramsConfig

    async def load_items(self, run: RunContext) -> Sequence[Task]:
        config = self.config
        if config.data is not None:
            tasks, self.task_source = load_tasks(config.data, run.trajectories.assets)
            tasks = [t for t in tasks if t.gold is not None]
            if not tasks:
                raise EvalRunError(f"{config.data} has no tasks with a gold answer to check")
            self.split = f"tasks from {config.data}"
        else:
            task_store: Dataset[Task] = Dataset.create(run.root / "tasks", Task)
            tasks = heldout_split(config, task_store)
            self.task_source = task_store.assets
            self.split = f"held-out split (seed {config.seed}, {len(tasks)} tasks)"
        if config.limit:
            tasks = tasks[: config.limit]
        self.names = sorted({n for t in tasks for n in t.tools})
        names = self.names
        self._tools = load_tools(
            [*names, "final_answer"] if config.action_format == "json" else names
        )
        self.gold_rows = [
            {
                "id": t.id,
                "family": t.metadata.get("family"),
                "gold": t.gold.model_dump(mode="json"),
                "gold_tools": sorted({c.name for c in t.gold_chain} - {"final_answer"}),
                "gold_chain": [{"name": c.name, "arguments": c.arguments} for c in t.gold_chain],
                "ordered": bool(t.metadata.get("answer_ordered", False)),
                "choices": t.metadata.get("choices"),
            }
            for t in tasks
            if t.gold is not None
        ]
        write_jsonl(run.root / "gold.jsonl", self.gold_rows)
        run.notify(f"programs: {self.split}; tools: {', '.join(names)}")
        self.replays = gold_replays(config.gold_prefixes) if config.mode == "step" else {}
        return tasks

    def run_info(self) -> dict[str, Any]:
        config = self.config
        return {
            "data": str(config.data) if config.data else None,
            "split": self.split,
            "tools": self.names,
            "excluded_datasets": [str(p) for p in config.exclude],
        }

    def key(self, item: Task, controller: str) -> str:
        mode = ["step"] if self.config.mode == "step" else []
        return stable_id("programs", item.id, controller, self.config.action_format, *mode)

    def sources(self, run: RunContext) -> list[Any]:
        return [self.task_source]

    def source(self, run: RunContext, item: Task) -> Any:
        return self.task_source

    def tools(self, item: Task) -> list[Any]:
        return list(self._tools)

    def tool_options(self, item: Task) -> dict[str, Any]:
        return task_options(item, self.config.tool_options)

    async def episode(self, run: RunContext, item: Task, trajectory_id: str) -> Trajectory:
        if self.config.mode != "step":
            return await super().episode(run, item, trajectory_id)
        assert run.model is not None
        return await teacher_forced(
            item,
            run.model,
            self._tools,
            self.tool_options(item),
            run.sampling(),
            self.config.action_format,
            self.task_source,
            run.trajectories.assets,
            trajectory_id,
            replay=self.replays.get(item.id),
        )

    def annotate(self, item: Task, trajectory: Trajectory) -> dict[str, Any]:
        return {"task_id": item.id, "family": item.metadata.get("family")}

    async def score(self, run: RunContext, items: Sequence[Task], result: StageResult) -> Scored:
        wanted = {t.id for t in items}
        predictions: dict[str, dict[str, Any]] = {}
        trajectory_of: dict[str, str] = {}
        for trajectory in run.trajectories:
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
                "actions": trajectory_actions(trajectory),
            }
            if "step_predictions" in trajectory.metadata:
                predictions[task_id]["step_predictions"] = trajectory.metadata["step_predictions"]
        path = run.root / "predictions.jsonl"
        write_jsonl(path, [predictions[t.id] for t in items if t.id in predictions])
        if self.config.mode == "step":
            report = score_programs_steps(self.gold_rows, predictions)
        else:
            report = score_programs(self.gold_rows, predictions)
        return Scored(
            {"programs": report},
            "programs",
            trajectory_of,
            {"split": self.split, "predictions": str(path)},
        )


async def run_programs(
    config: ProgramsConfig,
    model: ChatModel | None = None,
    progress: bool = True,
    notify: Notify | None = None,
) -> dict[str, Any]:
    from tracetune.evaluate.runs import run_benchmark

    return await run_benchmark(config, model, progress, notify)


def gold_replays(path: Any) -> dict[str, tuple[Trajectory, Any]]:
    """Completed gold replays by task id from a trajectory dataset (step mode's prefixes)."""
    if path is None:
        return {}
    try:
        store: Dataset[Trajectory] = Dataset.open(path, Trajectory)
    except Exception as exc:
        raise EvalRunError(f"--gold-prefixes {path}: not a trajectory dataset ({exc})") from exc
    found: dict[str, tuple[Trajectory, Any]] = {}
    for trajectory in store:
        if trajectory.final_answer is not None and trajectory.status == "completed":
            found.setdefault(trajectory.task.id, (trajectory, store.assets))
    return found


# What makes two versions of a task the same task for a gold replay (its metadata may differ).
_TASK_CONTENT = {"query", "files", "tools", "gold", "gold_chain"}


def usable_replay(
    task: Task, replay: tuple[Trajectory, Any] | None
) -> tuple[Trajectory, Any] | None:
    """``replay`` if it was made for this very task, else None (replayed again): a task
    program of the same id rendered by another tracetune version can hold other images,
    and a prefix from those would name files this run does not have."""
    if replay is None:
        return None
    earlier = replay[0].task.model_dump(mode="json", include=_TASK_CONTENT)
    return replay if earlier == task.model_dump(mode="json", include=_TASK_CONTENT) else None


def programs_step_mode(config: ProgramsConfig) -> bool:
    """Whether a programs run is in step mode (``mode: step``)."""
    return config.mode == "step"


async def teacher_forced(
    task: Task,
    controller: ChatModel,
    tools: list[Any],
    tool_options: dict[str, Any],
    sampling: Any,
    action_format: str,
    source: Any,
    assets: Any,
    trajectory_id: str,
    replay: tuple[Trajectory, Any] | None = None,
) -> Trajectory:
    """Replay the gold chain with the real tools; at each gold step, ask for one action.

    ``replay``: an earlier gold replay of this task and its asset store, used instead.

    The returned trajectory is the gold replay; ``metadata["step_predictions"]`` holds the
    action predicted before each gold step (parsed and checked, never executed) and
    ``metadata["step_outputs"]`` the raw outputs.
    """
    from tracetune.agent.render import episode_messages
    from tracetune.models.base import BackendError
    from tracetune.rollout import GoldTeacher
    from tracetune.schema import ErrorKind, Step, StepError

    if not task.gold_chain:
        raise EvalRunError(f"task {task.id} has no gold chain; step mode needs one")
    teacher = GoldTeacher(tools, action_format)
    replay = usable_replay(task, replay)
    if replay is not None:
        earlier, store = replay
        gold = earlier.model_copy(deep=True)
        gold.id = trajectory_id
        gold.metadata = {}
        for step in gold.steps:  # images the earlier replay produced, into this run's assets
            for ref in step.observation.images if step.observation else []:
                if store.has(ref):
                    assets.import_from(store, ref)
    else:
        gold, _ = await teacher.run(task, source, assets, tool_options, trajectory_id)
    offered = {t.name for t in tools} | {"final_answer"}
    resolver_store = [assets, source]

    def resolve(ref: Any) -> Any:
        for store in resolver_store:
            if store.has(ref):
                return store.path(ref)
        raise InputFileError(f"image {ref.name} is in neither the input nor output assets")

    fmt = teacher.fmt
    system = fmt.system_prompt(tools)
    predicted: list[dict[str, Any]] = []
    outputs: list[str] = []
    for i in range(len(gold.steps)):
        messages = episode_messages(system, task, gold.steps[:i], resolve)
        try:
            generation = await controller.generate(messages, n=1, sampling=sampling)
        except BackendError as exc:
            raise EpisodeBackendError(f"{task.id}: {exc}") from exc
        step = Step(index=i, raw=generation.text)
        try:
            parsed = fmt.parse(generation.text)
        except ValueError as exc:
            step.error = StepError(kind=ErrorKind.PARSE, message=str(exc))
        else:
            step.action = parsed.action
            call = parsed.action.tool_call
            if call is not None and call.name not in offered:
                step.error = StepError(kind=ErrorKind.UNKNOWN_TOOL, message=call.name)
        predicted.append(step_action(step))
        outputs.append(generation.text)
    gold.controller = controller.spec
    gold.metadata.update({"step_predictions": predicted, "step_outputs": outputs, "mode": "step"})
    return gold


__all__ = [
    "ProgramsAdapter",
    "ProgramsConfig",
    "heldout_seed",
    "heldout_split",
    "programs_step_mode",
    "run_programs",
    "score_programs",
    "score_programs_steps",
    "teacher_forced",
]
