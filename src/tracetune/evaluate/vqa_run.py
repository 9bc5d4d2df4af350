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

from pathlib import Path
from typing import Any

from tracetune.engine.infer import InferenceResult, InferOptions, MMATInference
from tracetune.engine.ingest import IngestConfig, IngestError, run_ingest
from tracetune.engine.ingest import read_rows as read_qa_rows
from tracetune.engine.operators import OperatorConfig, OperatorSet, OperatorUnavailable, Workdir
from tracetune.engine.render import mmat_prompt_hash
from tracetune.evaluate.dynvqa import score_dynvqa
from tracetune.evaluate.runs import (
    EpisodeBackendError,
    EvalRunConfig,
    EvalRunError,
    Notify,
    RunContext,
    stable_id,
    trajectories_by,
    write_jsonl,
)
from tracetune.evaluate.vqa import score_vqa
from tracetune.judge.vqa import extract_answer
from tracetune.models.base import BackendError, ChatModel, Sampling, text_message
from tracetune.prompts import prompt_hash, render
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


async def run_vqa(
    config: EvalRunConfig,
    model: ChatModel | None = None,
    progress: bool = True,
    notify: Notify | None = None,
) -> dict[str, Any]:
    source, ingest = vqa_source(config.data, config.bench)
    ctx = RunContext(config, notify)
    tasks = await ingest_tasks(source, ingest, ctx.root)
    if config.limit:
        tasks = tasks[: config.limit]
    gold = gold_rows(config.bench, tasks, source, ingest)
    write_jsonl(ctx.root / "gold.jsonl", gold)
    task_store: Dataset[Task] = Dataset.open(ctx.root / "tasks", Task)
    mode = config.answer_mode
    operators = _operator_config(config) if mode != "direct" else None
    ctx.notify(
        f"{config.bench}: {len(tasks)} questions, answer mode {mode}"
        + (f", operators: {', '.join(operators.operators)}" if operators else "")
        + (", retrieval on" if operators and operators.rag else "")
    )
    ctx.write_run(
        {
            "data": str(source),
            "answer_mode": mode,
            "operators": operators.model_dump(mode="json") if operators else None,
            "prompt_hashes": {"direct": prompt_hash(DIRECT_PROMPT)},
        }
    )
    controller = ctx.load_models(model)
    engine: MMATInference | None = None
    try:
        if operators is not None:
            captioner = ctx.tool_model or controller  # as `mmat infer`: the model under test
            operator_set = OperatorSet(operators, captioner)
            try:
                await operator_set.startup()
            except OperatorUnavailable as exc:
                raise EvalRunError(f"{exc} (eval run: choose operators with --tools)") from exc
            options = InferOptions(
                model=config.model,
                mode=mode,  # type: ignore[arg-type]
                operators=operators,
                max_turns=config.max_steps,
                max_format_errors=config.max_errors,
                temperature=config.temperature,
                max_tokens=config.max_tokens,
            )
            engine = MMATInference(controller, operator_set, options)
        sampling = Sampling(temperature=config.temperature, max_tokens=config.max_tokens)
        mmat_hash = mmat_prompt_hash()

        def key(task: Task) -> str:
            return stable_id(config.bench, mode, task.id, controller.spec)

        async def answer(task: Task) -> Trajectory:
            if engine is None:
                return await _direct(controller, task, task_store, sampling, key(task))
            result = await engine.run(task, task_store.assets)
            return result_trajectory(result, task, key(task), controller.spec, mode)

        async def process(task: Task) -> Trajectory:
            try:
                trajectory = await answer(task)
            except BackendError as exc:  # retried on the next run, not scored as wrong
                raise EpisodeBackendError(f"{item_of(task)}: {exc}") from exc
            trajectory.prompt_hash = prompt_hash(DIRECT_PROMPT) if engine is None else mmat_hash
            trajectory.metadata.update(
                {
                    "bench": config.bench,
                    "item_id": item_of(task),
                    "answer_mode": mode,
                    "prediction": trajectory.steps[-1].raw,
                }
            )
            return trajectory

        result = await ctx.run_items(
            tasks, key, process, progress=progress, sources=[task_store.assets]
        )
    finally:
        await ctx.close()
    groups = trajectories_by(ctx.trajectories, "item_id")
    id_key = "question_id" if config.bench == "dynvqa" else "id"
    predictions, trajectory_of = [], {}
    for task in tasks:
        found = [t for t in groups.get(item_of(task), []) if t.metadata.get("answer_mode") == mode]
        if found:
            trajectory_of[item_of(task)] = found[0].id
            predictions.append(
                {id_key: item_of(task), "prediction": found[0].metadata["prediction"]}
            )
    write_jsonl(ctx.root / "predictions.jsonl", predictions)
    scorer = score_dynvqa if config.bench == "dynvqa" else score_vqa
    report = scorer(ctx.root / "gold.jsonl", ctx.root / "predictions.jsonl")
    return ctx.finish(
        {config.bench: report},
        config.bench,
        trajectory_of,
        result,
        {"answer_mode": mode, "predictions": str(ctx.root / "predictions.jsonl")},
    )


def _operator_config(config: EvalRunConfig) -> OperatorConfig:
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


__all__ = ["result_trajectory", "run_vqa", "vqa_source"]
