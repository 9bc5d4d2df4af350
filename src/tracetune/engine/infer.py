"""Inference the MMAT way: run a tuned model in RR or ORR mode, with the real operators.

RR mode: the model writes grammar steps; the engine runs the operators (and retrieval) it
names and feeds the results back, answers ``SIGNAL=reflection`` with the reflection request,
and after ``SIGNAL=end`` asks for the final answer. ORR mode: the operators run first, their
results are inlined after the question, and the model answers in one turn. Either way the
answer is extracted with the VQA answer extractor, so ``OUT/predictions.jsonl`` scores with
``tracetune eval score vqa --gold OUT/gold.jsonl --predictions OUT/predictions.jsonl``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from tracetune.engine.common import (
    EngineOptions,
    choices_of,
    close_models,
    load_stage_models,
    stage_stats,
)
from tracetune.engine.grammar import (
    GrammarError,
    closing_turn,
    no_results_turn,
    orr_user_text,
    parse_orr_assistant,
    parse_step,
    reflect_turn,
    results_turn,
)
from tracetune.engine.operators import OperatorConfig, OperatorName, OperatorSet, Workdir
from tracetune.engine.render import mmat_prompt_hash, orr_system_prompt, rr_system_prompt
from tracetune.engine.trace import RAG
from tracetune.judge.vqa import extract_answer
from tracetune.models.base import ChatMessage, ChatModel, Sampling, text_message
from tracetune.prompts import render
from tracetune.runner import StageResult, run_stage
from tracetune.schema import Dialogue, Message, Provenance, Task
from tracetune.store import AssetStore, Dataset

STAGE = "mmat-infer"
Mode = Literal["rr", "orr"]


class InferOptions(EngineOptions):
    """How a tuned model is run."""

    model: str = Field(description="Model spec of the tuned model (local:DIR, openai:NAME).")
    mode: Mode = Field(default="rr", description="rr (multi-turn) or orr (one turn).")
    operators: OperatorConfig = Field(
        default_factory=OperatorConfig, description="Operators and retrieval the engine runs."
    )
    orr_operators: list[OperatorName] | None = Field(
        default=None,
        description="ORR mode: operators run before the model (default: all enabled operators).",
    )
    max_turns: int = Field(default=8, ge=1, description="RR: model steps before forcing an answer.")
    max_format_errors: int = Field(
        default=2, ge=0, description="RR: steps off the grammar tolerated before forcing an answer."
    )
    max_reflections: int = Field(
        default=2, ge=0, description="RR: reflection rounds honoured per question."
    )
    temperature: float = Field(default=0.0, ge=0, description="Sampling temperature.")
    max_tokens: int = Field(default=512, ge=1, description="Max new tokens per turn.")


class InferConfig(InferOptions):
    """Configuration of ``tracetune mmat infer``."""

    tasks: Path = Field(description="Task dataset (e.g. from `tracetune mmat ingest`).")
    out: Path = Field(description="Output: inference dialogues, predictions.jsonl, gold.jsonl.")


@dataclass
class InferenceResult:
    """One question answered: the conversation, the raw final reply and the answer."""

    messages: list[Message]
    prediction: str
    answer: str
    status: str = "completed"
    turns: int = 0
    reflections: int = 0
    format_errors: int = 0
    operator_calls: list[str] = field(default_factory=list)


class MMATInference:
    """Runs one model in RR or ORR mode over tasks, one task per call of ``run``."""

    def __init__(self, model: ChatModel, operators: OperatorSet, options: InferOptions) -> None:
        self.model = model
        self.operators = operators
        self.options = options
        self.sampling = Sampling(temperature=options.temperature, max_tokens=options.max_tokens)

    async def run(self, task: Task, source: AssetStore) -> InferenceResult:
        with Workdir(task, source) as workdir:
            if self.options.mode == "orr":
                return await self._orr(task, workdir)
            return await self._rr(task, workdir)

    async def _say(self, chat: list[ChatMessage], record: list[Message]) -> str:
        text = (await self.model.generate(chat, sampling=self.sampling)).text
        chat.append(text_message("assistant", text))
        record.append(Message.of("assistant", text))
        return text

    @staticmethod
    def _user(chat: list[ChatMessage], record: list[Message], text: str) -> None:
        chat.append(text_message("user", text))
        record.append(Message.of("user", text))

    async def _rr(self, task: Task, workdir: Workdir) -> InferenceResult:
        images = [str(workdir.path / n) for n in workdir.images]
        system = rr_system_prompt(self.operators.names, self.operators.rag)
        chat = [text_message("system", system), text_message("user", task.query, images)]
        record = [Message.of("system", system), Message.of("user", task.query, task.images)]
        result = InferenceResult(record, "", "")
        status = "max_turns"
        while result.turns < self.options.max_turns:
            raw = await self._say(chat, record)
            result.turns += 1
            try:
                step = parse_step(raw, strict=False)
            except GrammarError as exc:
                result.format_errors += 1
                if result.format_errors > self.options.max_format_errors:
                    status = "format_errors"
                    break
                self._user(chat, record, render("mmat/rr_format_error.jinja", error=str(exc)))
                continue
            if step.signal == "end":
                status = "completed"
                break
            if step.signal == "reflection":
                result.reflections += 1
                if result.reflections > self.options.max_reflections:
                    status = "max_reflections"
                    break
                self._user(chat, record, reflect_turn())
                continue
            calls, problems = await self.operators.run(
                step.operators, workdir.path, workdir.images, task.query
            )
            results = [(c.name, c.result) for c in calls]
            result.operator_calls += [c.name for c in calls]
            if step.rag and not self.operators.rag:
                problems.append("retrieval is not available")
            elif step.rag:
                rag = await self.operators.retrieve(step.rag, workdir.path)
                results.append((RAG, rag.result))
                result.operator_calls.append(RAG)
            text = results_turn(results) if results else no_results_turn()
            if problems:
                text += "\n" + "; ".join(problems)
            self._user(chat, record, text)
        self._user(chat, record, closing_turn(task.query))
        result.prediction = await self._say(chat, record)
        result.answer = extract_answer(result.prediction)
        result.status = status
        return result

    async def _orr(self, task: Task, workdir: Workdir) -> InferenceResult:
        names: list[str] = list(self.options.orr_operators or self.operators.names)
        calls, _ = await self.operators.run(list(names), workdir.path, workdir.images, task.query)
        text = orr_user_text(task.query, [(c.name, c.result) for c in calls])
        images = [str(workdir.path / n) for n in workdir.images]
        system = orr_system_prompt()
        chat = [text_message("system", system), text_message("user", text, images)]
        record = [Message.of("system", system), Message.of("user", text, task.images)]
        result = InferenceResult(record, "", "", turns=1, operator_calls=[c.name for c in calls])
        result.prediction = await self._say(chat, record)
        try:
            _, result.answer = parse_orr_assistant(result.prediction, strict=False)
        except GrammarError:
            result.answer = extract_answer(result.prediction)
            result.format_errors = 1
        return result


def inference_id(task: Task, mode: str) -> str:
    return f"infer-{mode}-{task.id}"


async def run_infer(
    config: InferConfig,
    model: ChatModel | None = None,
    caption_model: ChatModel | None = None,
    progress: bool = True,
) -> tuple[StageResult, Dataset[Dialogue]]:
    """Answer every task in ``config.tasks``; write dialogues, predictions and gold files."""
    tasks_ds = Dataset.open(config.tasks, Task)
    out: Dataset[Dialogue] = Dataset.create(config.out, Dialogue)
    tasks = tasks_ds.records()
    if config.limit:
        tasks = tasks[: config.limit]
    metered, captioner = load_stage_models(
        config.model,
        config.operators.caption_model,
        config.backend.for_stage(config.concurrency),
        out,
        STAGE,
        model,
        caption_model,
    )
    operators = OperatorSet(config.operators, captioner)
    try:
        await operators.startup()
        engine = MMATInference(metered, operators, config)

        async def process(task: Task) -> Dialogue:
            r = await engine.run(task, tasks_ds.assets)
            return Dialogue(
                id=inference_id(task, config.mode),
                task=task,
                format=config.mode,
                messages=r.messages,
                provenance=Provenance(
                    source=f"mmat:infer:{config.mode}",
                    model=metered.spec,
                    prompt_hash=mmat_prompt_hash(),
                    parent_id=task.id,
                ),
                metadata={
                    "prediction": r.prediction,
                    "answer": r.answer,
                    "status": r.status,
                    "turns": r.turns,
                    "reflections": r.reflections,
                    "format_errors": r.format_errors,
                    "operator_calls": r.operator_calls,
                },
            )

        result = await run_stage(
            STAGE,
            tasks,
            key=lambda t: inference_id(t, config.mode),
            process=process,
            out=out,
            concurrency=config.concurrency,
            budget=config.budget(),
            sources=[tasks_ds.assets],
            progress=progress,
            total=len(tasks),
        )
    finally:
        await close_models(metered, captioner)
    write_eval_files(out)
    stage_stats(out, STAGE, result)
    return result, out


def item_id(task: Task) -> str:
    return str(task.metadata.get("item_id") or task.id)


def write_eval_files(out: Dataset[Dialogue]) -> None:
    """``predictions.jsonl`` and ``gold.jsonl`` for the VQA scorer, sorted by item id."""
    preds, golds = [], []
    for d in sorted(out, key=lambda d: item_id(d.task)):
        task = d.task
        preds.append(
            {
                "id": item_id(task),
                "prediction": d.metadata.get("prediction", ""),
                "extracted": d.metadata.get("answer", ""),
            }
        )
        if task.gold is not None:
            gold: dict[str, Any] = {"id": item_id(task), "answer": task.gold.value}
            if choices_of(task) and task.gold.kind == "choice":
                gold["options"] = choices_of(task)
            else:
                gold["answers"] = [task.gold.value, *task.gold.aliases]
                del gold["answer"]
            golds.append(gold)
    for name, rows in (("predictions.jsonl", preds), ("gold.jsonl", golds)):
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        (Path(out.root) / name).write_text(text, encoding="utf-8")
