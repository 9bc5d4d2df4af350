"""Run a controller on a VQA or Dyn-VQA file, directly or the MMAT way (RR / ORR).

``--data`` is a JSON lines file (or a JSON list) of ``{question_id | id, image, question,
answer[, choices]}`` rows, images given as paths relative to the file (or bytes, data URLs:
whatever ``tracetune mmat ingest`` reads). ``answer`` is one answer or a list: Dyn-VQA's
aliases, or VQAv2's ten human answers. The rows become tasks in ``OUT/tasks`` through the
MMAT ingest stage (the same question text, choices and answer-style line a tuned model saw
in training), then each question is answered in one of three ways (``--answer-mode``):

- ``direct``: one turn, the question with its images (``prompts/eval/vqa_direct.jinja``);
- ``rr`` / ``orr``: ``tracetune.engine.infer.MMATInference``, the multi-turn RR loop with
  the real operators, or ORR's operators-first single turn (``--tools`` picks the
  operators, ``--corpus`` turns retrieval on).

Every answer is a Trajectory (one step per model turn; the next user turn, e.g. operator
results, is its observation) and the raw final reply is the prediction that ``score_vqa``
(VQA accuracy, multiple-choice accuracy) or ``score_dynvqa`` (token recall) scores, with
their answer extraction (``<ANSWER>``, "The answer is: ..."). Gold keeps the file's own
answers (all ten VQAv2 answers, all Dyn-VQA aliases).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import Field

from tracetune.engine.infer import InferenceResult, InferOptions, MMATInference
from tracetune.engine.ingest import IngestConfig, IngestError, run_ingest
from tracetune.engine.ingest import read_rows as read_qa_rows
from tracetune.engine.operators import OperatorConfig, OperatorSet, OperatorUnavailable, Workdir
from tracetune.engine.render import mmat_prompt_hash
from tracetune.evaluate.adapter import BenchConfig, BenchmarkAdapter, Scored
from tracetune.evaluate.dynvqa import score_dynvqa
from tracetune.evaluate.runs import (
    EvalRunError,
    Notify,
    RunContext,
    stable_id,
    trajectories_by,
    write_jsonl,
)
from tracetune.evaluate.vqa import score_vqa
from tracetune.judge.vqa import extract_answer
from tracetune.models.base import ChatModel, Sampling, text_message
from tracetune.prompts import prompt_hash, render
from tracetune.runner import StageResult
from tracetune.schema import Action, Observation, Step, Task, Trajectory, TrajectoryStatus, Usage
from tracetune.store import Dataset

DIRECT_PROMPT = "eval/vqa_direct.jinja"
# MMAT's loop statuses, as trajectory statuses.
_STATUS: dict[str, TrajectoryStatus] = {
    "completed": "completed",
    "max_turns": "max_steps",
    "max_reflections": "max_steps",
    "format_errors": "max_errors",
}


class VQAConfig(BenchConfig):
    """Options of ``tracetune eval run vqa`` (and ``dynvqa``)."""

    bench: Literal["vqa", "dynvqa"] = "vqa"
    data: Path | None = Field(
        default=None,
        description="A JSON lines (or JSON list) file of {question_id, image, question, "
        "answer[, choices]} rows, images beside it.",
    )
    answer_mode: Literal["direct", "rr", "orr"] = Field(
        default="direct",
        description="direct (one turn), or the MMAT way: rr (multi-turn with operators, "
        "max-steps model turns) or orr (operator results first, one turn).",
    )
    tools: list[str] = Field(
        default_factory=list,
        description="rr/orr: the MMAT operators (default: all).",
    )


class DynVQAConfig(VQAConfig):
    """Options of ``tracetune eval run dynvqa``."""

    bench: Literal["vqa", "dynvqa"] = "dynvqa"


def vqa_source(data: Path | None, bench: str) -> tuple[Path, IngestConfig]:
    """The data file and how its columns are read; a wrong layout fails here, with the fix."""
    if data is None:
        raise EvalRunError(
            f"{bench} needs --data: a JSON lines (or JSON list) file of "
            "{question_id, image, question, answer[, choices]} rows"
        )
    path = Path(data)
    if not path.is_file() or path.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
        raise EvalRunError(
            f"{path} is not a .jsonl or .json file; --data for {bench} is a file of "
            "{question_id, image, question, answer[, choices]} rows (images beside it)"
        )
    try:
        first = next(read_qa_rows(path, IngestConfig(source=path, out=path)), None)
    except (IngestError, ValueError) as exc:
        why = str(exc) if str(path) in str(exc) else f"{path}: {exc}"
        raise EvalRunError(
            f"{why}; --data for {bench} holds {{question_id, image, ...}} rows"
        ) from exc
    if first is None:
        raise EvalRunError(f"{path} has no rows")
    if "__error__" in first:
        raise EvalRunError(f"{path}: the first row cannot be read: {first['__error__']}")
    answer = "answer" if "answer" in first or "answers" not in first else "answers"
    ident = "question_id" if "question_id" in first else "id"
    missing = [c for c in ("image", "question", answer, ident) if c not in first]
    if missing:
        hint = ""
        if "image" in missing and "image_url" in first:
            hint = (
                " (Dyn-VQA's image_url are web addresses: download the images and give "
                "their paths in an 'image' column)"
            )
        raise EvalRunError(
            f"{path}: the first row has no {', '.join(map(repr, missing))}; its keys are "
            f"{', '.join(map(repr, first))}. Rows are {{question_id, image, question, "
            f"answer[, choices]}}{hint}"
        )
    columns = {"image": "image", "question": "question", "answer": answer, "id": ident}
    config = IngestConfig(source=path, out=path, columns=columns)  # type: ignore[arg-type]
    return path, config


async def ingest_tasks(source: Path, ingest: IngestConfig, root: Path) -> list[Task]:
    """The rows as tasks in ``root/tasks`` (resumable); unreadable rows fail the run."""
    config = ingest.model_copy(update={"out": root / "tasks"})
    try:
        result, tasks = await run_ingest(config, progress=False)
    except IngestError as exc:
        raise EvalRunError(str(exc)) from exc
    dropped = [
        (key, info) for key, status, info in tasks.state.items("mmat-ingest") if status == "dropped"
    ]
    if dropped:
        examples = "; ".join(
            f"row {info.get('row')}: {info.get('reason')} {info.get('detail', '')}".strip()
            for _, info in dropped[:3]
        )
        raise EvalRunError(
            f"{len(dropped)} row(s) of {source} cannot be evaluated ({examples}); fix them "
            "(an image path is relative to the data file) and rerun"
        )
    return sorted(tasks, key=lambda t: int(t.metadata.get("source_row", 0)))


def item_of(task: Task) -> str:
    return str(task.metadata.get("item_id") or task.id)


def gold_rows(
    bench: str, tasks: list[Task], source: Path, ingest: IngestConfig
) -> list[dict[str, Any]]:
    """Gold lines for the scorer, with the file's own answers (not deduplicated)."""
    rows = list(read_qa_rows(source, ingest))
    answer_key = ingest.columns.answer
    out = []
    for task in tasks:
        row = rows[int(task.metadata["source_row"])]
        answers = row[answer_key]
        if bench == "dynvqa":
            out.append({"question_id": item_of(task), "answer": answers})
        elif task.metadata.get("choices"):
            assert task.gold is not None  # ingest gives every task its (letter) answer
            out.append(
                {
                    "id": item_of(task),
                    "options": task.metadata["choices"],
                    "answer": task.gold.value,
                }
            )
        else:
            out.append({"id": item_of(task), "answers": answers})
    return out


def result_trajectory(
    result: InferenceResult, task: Task, trajectory_id: str, controller: str, mode: str
) -> Trajectory:
    """An MMAT answer as a trajectory: each model turn a step, the next user turn its
    observation; the last turn carries the extracted answer."""
    messages = result.messages
    steps: list[Step] = []
    for i, message in enumerate(messages):
        if message.role != "assistant":
            continue
        after = messages[i + 1] if i + 1 < len(messages) else None
        steps.append(
            Step(
                index=len(steps),
                raw=message.text,
                observation=Observation(text=after.text) if after is not None else None,
            )
        )
    steps[-1].action = Action(type="final_answer", answer=result.answer)
    return Trajectory(
        id=trajectory_id,
        task=task,
        controller=controller,
        tools=list(dict.fromkeys(result.operator_calls)),
        steps=steps,
        final_answer=result.answer,
        status=_STATUS.get(result.status, "completed"),
        metadata={
            "mmat_status": result.status,
            "turns": result.turns,
            "reflections": result.reflections,
            "format_errors": result.format_errors,
            "operator_calls": result.operator_calls,
        },
    )


class VQAAdapter(BenchmarkAdapter[VQAConfig]):
    """A VQA file answered directly or the MMAT way, scored by VQA accuracy (or, for
    multiple choice, choice accuracy)."""

    config_model: ClassVar[type[BenchConfig]] = VQAConfig

    def check(self) -> None:
        self.source_path, self.ingest = vqa_source(self.config.data, self.config.bench)
        mode = self.config.answer_mode
        self.operators = _operator_config(self.config) if mode != "direct" else None

    async def load_items(self, run: RunContext) -> Sequence[Task]:
        config = self.config
        tasks = await ingest_tasks(self.source_path, self.ingest, run.root)
        if config.limit:
            tasks = tasks[: config.limit]
        gold = gold_rows(config.bench, tasks, self.source_path, self.ingest)
        write_jsonl(run.root / "gold.jsonl", gold)
        self.task_store: Dataset[Task] = Dataset.open(run.root / "tasks", Task)
        operators = self.operators
        run.notify(
            f"{config.bench}: {len(tasks)} questions, answer mode {config.answer_mode}"
            + (f", operators: {', '.join(operators.operators)}" if operators else "")
            + (", retrieval on" if operators and operators.rag else "")
        )
        return tasks

    def run_info(self) -> dict[str, Any]:
        return {
            "data": str(self.source_path),
            "answer_mode": self.config.answer_mode,
            "operators": self.operators.model_dump(mode="json") if self.operators else None,
            "prompt_hashes": {"direct": prompt_hash(DIRECT_PROMPT)},
        }

    def key(self, item: Task, controller: str) -> str:
        return stable_id(self.config.bench, self.config.answer_mode, item.id, controller)

    def label(self, item: Task) -> str:
        return item_of(item)

    def sources(self, run: RunContext) -> list[Any]:
        return [self.task_store.assets]

    async def start(self, run: RunContext, controller: ChatModel) -> None:
        config = self.config
        self.controller = controller
        self.engine: MMATInference | None = None
        self.sampling = Sampling(temperature=config.temperature, max_tokens=config.max_tokens)
        self.mmat_hash = mmat_prompt_hash()
        if self.operators is None:
            return
        captioner = run.tool_model or controller  # as `mmat infer`: the model under test
        operator_set = OperatorSet(self.operators, captioner)
        try:
            await operator_set.startup()
        except OperatorUnavailable as exc:
            raise EvalRunError(f"{exc} (eval run: choose operators with --tools)") from exc
        options = InferOptions(
            model=config.model,
            mode=config.answer_mode,  # type: ignore[arg-type]
            operators=self.operators,
            max_turns=config.max_steps,
            max_format_errors=config.max_errors,
            temperature=config.temperature,
            max_tokens=config.max_tokens,
        )
        self.engine = MMATInference(controller, operator_set, options)

    async def episode(self, run: RunContext, item: Task, trajectory_id: str) -> Trajectory:
        controller = self.controller
        if self.engine is None:
            trajectory = await _direct(
                controller, item, self.task_store, self.sampling, trajectory_id
            )
            trajectory.prompt_hash = prompt_hash(DIRECT_PROMPT)
        else:
            result = await self.engine.run(item, self.task_store.assets)
            trajectory = result_trajectory(
                result, item, trajectory_id, controller.spec, self.config.answer_mode
            )
            trajectory.prompt_hash = self.mmat_hash
        return trajectory

    def annotate(self, item: Task, trajectory: Trajectory) -> dict[str, Any]:
        return {
            "item_id": item_of(item),
            "answer_mode": self.config.answer_mode,
            "prediction": trajectory.steps[-1].raw,
        }

    async def score(self, run: RunContext, items: Sequence[Task], result: StageResult) -> Scored:
        bench, mode = self.config.bench, self.config.answer_mode
        groups = trajectories_by(run.trajectories, "item_id")
        id_key = "question_id" if bench == "dynvqa" else "id"
        predictions, trajectory_of = [], {}
        for task in items:
            found = [
                t for t in groups.get(item_of(task), []) if t.metadata.get("answer_mode") == mode
            ]
            if found:
                trajectory_of[item_of(task)] = found[0].id
                predictions.append(
                    {id_key: item_of(task), "prediction": found[0].metadata["prediction"]}
                )
        path = run.root / "predictions.jsonl"
        write_jsonl(path, predictions)
        scorer = score_dynvqa if bench == "dynvqa" else score_vqa
        report = scorer(run.root / "gold.jsonl", path)
        return Scored(
            {bench: report},
            bench,
            trajectory_of,
            {"answer_mode": mode, "predictions": str(path)},
        )


class DynVQAAdapter(VQAAdapter):
    """Dyn-VQA: the same runs, scored by token recall against every alias."""

    config_model = DynVQAConfig


async def run_vqa(
    config: VQAConfig,
    model: ChatModel | None = None,
    progress: bool = True,
    notify: Notify | None = None,
) -> dict[str, Any]:
    from tracetune.evaluate.runs import run_benchmark

    return await run_benchmark(config, model, progress, notify)


def _operator_config(config: VQAConfig) -> OperatorConfig:
    search = config.tool_options.get("search") or {}
    backend = search.get("backend", "local")
    rag = bool(search.get("corpus")) or backend != "local"
    fields: dict[str, Any] = {"rag": rag, "rag_backend": backend, "corpus": search.get("corpus")}
    if config.tools:
        fields["operators"] = list(config.tools)
    if (config.tool_options.get("object_localization") or {}).get("model"):
        fields["detector"] = config.tool_options["object_localization"]["model"]
    try:
        return OperatorConfig(**fields)
    except ValueError as exc:
        raise EvalRunError(
            f"--tools for {config.bench} in {config.answer_mode} mode names MMAT operators "
            f"(image_caption, label_bbox, ocr, face_detection): {exc}"
        ) from exc


async def _direct(
    controller: ChatModel, task: Task, tasks: Dataset[Task], sampling: Sampling, tid: str
) -> Trajectory:
    """One turn: the question and its images; the reply is the answer."""
    with Workdir(task, tasks.assets) as workdir:
        images = [str(workdir.path / n) for n in workdir.images]
        prompt = render(DIRECT_PROMPT, question=task.query)
        generation = await controller.generate(
            [text_message("user", prompt, images)], n=1, sampling=sampling
        )
    text = generation.text
    step = Step(
        index=0,
        raw=text,
        action=Action(type="final_answer", answer=extract_answer(text)),
        usage=generation.usage,
        latency_s=generation.latency_s,
    )
    return Trajectory(
        id=tid,
        task=task,
        controller=controller.spec,
        tools=[],
        steps=[step],
        final_answer=step.action.answer if step.action else None,
        status="completed",
        usage=generation.usage or Usage(),
        sampling=sampling.to_dict(),
    )


__all__ = [
    "DynVQAAdapter",
    "DynVQAConfig",
    "VQAAdapter",
    "VQAConfig",
    "result_trajectory",
    "run_vqa",
    "vqa_source",
]
