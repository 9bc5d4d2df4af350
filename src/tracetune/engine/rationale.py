"""Rationale stage: a teacher reasons step by step toward the reference answer with operators.

Per task, the teacher sees the image(s), the question and the reference answer and replies
with one JSON step per turn (``thought``, ``operators``, ``rag``, ``next_action``). The engine
runs the operators and retrieval with the real tools and feeds their outputs back, until a
``final_answer`` step; a closing turn then asks for the short answer. The finished rationale
goes through the leak check; a leaking one is regenerated (with a note saying what leaked)
up to ``max_attempts`` times, then dropped with the reason ``answer_leak`` or
``reveals_reference``. Output: RR ``Dialogue`` records with the structured rationale on
their metadata.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pydantic import Field

from tracetune.engine.common import (
    EngineOptions,
    ReplyError,
    answer_agrees,
    choices_of,
    close_models,
    json_object,
    load_stage_models,
    reference_text,
    stage_stats,
)
from tracetune.engine.grammar import strip_markers
from tracetune.engine.leak import LeakChecker
from tracetune.engine.operators import OperatorConfig, OperatorSet, Workdir
from tracetune.engine.render import mmat_prompt_hash, rr_dialogue, rr_dialogue_id
from tracetune.engine.trace import RAG, Rationale, RationaleStep
from tracetune.models.base import ChatMessage, ChatModel, Sampling, text_message
from tracetune.prompts import render
from tracetune.runner import Drop, StageResult, run_stage
from tracetune.schema import Dialogue, Provenance, Task
from tracetune.store import AssetStore, Dataset

STAGE = "mmat-rationale"


class RationaleOptions(EngineOptions):
    """How the teacher writes rationales."""

    teacher: str = Field(default="openai:gpt-4o-mini", description="Model spec of the teacher VLM.")
    operators: OperatorConfig = Field(
        default_factory=OperatorConfig, description="Operators and retrieval offered."
    )
    max_steps: int = Field(default=6, ge=1, description="Teacher steps before giving up.")
    max_format_errors: int = Field(
        default=2, ge=0, description="Unparsable teacher replies tolerated per attempt."
    )
    max_attempts: int = Field(
        default=2, ge=1, description="Tries per sample when the leak check rejects one."
    )
    require_agreement: bool = Field(
        default=True,
        description="Drop a sample when the teacher's closing answer disagrees with the "
        "reference (reason answer_mismatch).",
    )
    temperature: float = Field(default=0.3, ge=0, description="Teacher sampling temperature.")
    max_tokens: int = Field(default=768, ge=16, description="Max new tokens per teacher turn.")


class RationaleConfig(RationaleOptions):
    """Configuration of ``tracetune mmat rationale``."""

    tasks: Path = Field(description="Task dataset written by `tracetune mmat ingest`.")
    out: Path = Field(description="Output dataset of RR dialogues (resumable).")


@dataclass
class TeacherStep:
    thought: str
    operators: list[str] = field(default_factory=list)
    rag_query: str | None = None
    final: bool = False


def parse_teacher_step(text: str) -> TeacherStep:
    """A teacher's JSON step; ``ReplyError`` says what is wrong with it."""
    data = json_object(text)
    thought = data.get("thought")
    if not isinstance(thought, str) or not thought.strip():
        raise ReplyError('"thought" must be a non-empty string')
    raw_ops = data.get("operators") or []
    if isinstance(raw_ops, str):
        raw_ops = [o for o in raw_ops.replace(";", ",").split(",")]
    if not isinstance(raw_ops, list):
        raise ReplyError('"operators" must be a list of operator names')
    ops = []
    for op in raw_ops:
        name = op.get("name") if isinstance(op, dict) else op
        if not isinstance(name, str):
            raise ReplyError(f'"operators" entries must be names, got {op!r}')
        if name.strip():
            ops.append(name.strip())
    rag = data.get("rag")
    query: str | None = None
    if isinstance(rag, dict):
        if rag.get("needed") in (True, "true", "yes") and str(rag.get("query") or "").strip():
            query = str(rag["query"]).strip()
    elif isinstance(rag, str) and rag.strip():
        query = rag.strip()
    action = str(data.get("next_action", "continue")).strip().lower()
    if action not in ("continue", "final_answer"):
        raise ReplyError('"next_action" must be "continue" or "final_answer"')
    return TeacherStep(
        strip_markers(thought),
        ops,
        strip_markers(query) if query else None,
        action == "final_answer",
    )


class RationaleWriter:
    """Runs the teacher conversation for one task at a time (shared by concurrent tasks)."""

    def __init__(
        self,
        options: RationaleOptions,
        teacher: ChatModel,
        operators: OperatorSet,
        source: AssetStore,
    ) -> None:
        self.options = options
        self.teacher = teacher
        self.operators = operators
        self.source = source

    def system_prompt(self) -> str:
        return render(
            "mmat/rationale_system.jinja",
            operators=self.operators.names,
            rag=self.operators.rag,
            top_k=self.operators.config.top_k,
            max_steps=self.options.max_steps,
        )

    async def write(self, task: Task) -> Dialogue | Drop:
        if task.gold is None:
            return Drop("no_reference_answer")
        with Workdir(task, self.source) as workdir:
            if not workdir.images:
                return Drop("no_image")
            checker = LeakChecker(
                task.gold.value,
                task.query,
                choices_of(task),
                task.gold.value if task.gold.kind == "choice" else None,
            )
            rejected: list[str] = []
            reason = "answer_leak"
            for attempt in range(1, self.options.max_attempts + 1):
                outcome = await self.converse(
                    task, workdir, attempt, rejected[-1] if rejected else None
                )
                if isinstance(outcome, Drop):
                    outcome.info["attempt"] = attempt
                    return outcome
                leak = checker.check(outcome)
                if leak is None:
                    return self.dialogue(task, outcome, attempt, rejected)
                rejected.append(leak.describe())
                reason = leak.reason
            return Drop(reason, {"leaks": rejected, "attempts": self.options.max_attempts})

    async def converse(
        self, task: Task, workdir: Workdir, attempt: int, leak: str | None
    ) -> Rationale | Drop:
        assert task.gold is not None
        images = [str(workdir.path / name) for name in workdir.images]
        user = render(
            "mmat/rationale_user.jinja", question=task.query, answer=reference_text(task), leak=leak
        )
        messages: list[ChatMessage] = [
            text_message("system", self.system_prompt()),
            text_message("user", user, images),
        ]
        sampling = Sampling(
            temperature=self.options.temperature, max_tokens=self.options.max_tokens, seed=attempt
        )
        steps: list[RationaleStep] = []
        format_errors = 0
        while True:
            if len(steps) >= self.options.max_steps:
                return Drop("max_steps", {"steps": len(steps)})
            raw = (await self.teacher.generate(messages, sampling=sampling)).text
            messages.append(text_message("assistant", raw))
            try:
                step = parse_teacher_step(raw)
            except ReplyError as exc:
                format_errors += 1
                if format_errors > self.options.max_format_errors:
                    return Drop("format_errors", {"last_error": str(exc), "reply": raw[:500]})
                messages.append(
                    text_message(
                        "user", render("mmat/rationale_format_error.jinja", error=str(exc))
                    )
                )
                continue
            if step.final:
                steps.append(RationaleStep(thought=step.thought, signal="end", raw=raw))
                break
            calls, problems = await self.operators.run(
                step.operators, workdir.path, workdir.images, task.query
            )
            rag = None
            if step.rag_query:
                if self.operators.rag:
                    rag = await self.operators.retrieve(step.rag_query, workdir.path)
                else:
                    problems.append("retrieval is not available")
            steps.append(RationaleStep(thought=step.thought, operators=calls, rag=rag, raw=raw))
            results = [(c.name, c.result) for c in calls]
            if rag is not None:
                results.append((RAG, rag.result))
            messages.append(
                text_message(
                    "user", render("mmat/rationale_results.jinja", results=results, errors=problems)
                )
            )
        messages.append(
            text_message("user", render("mmat/rationale_closing.jinja", question=task.query))
        )
        said = (await self.teacher.generate(messages, sampling=sampling)).text.strip()
        if self.options.require_agreement and not answer_agrees(said, task):
            return Drop(
                "answer_mismatch", {"teacher_answer": said[:200], "reference": task.gold.value}
            )
        return Rationale(
            question=task.query, steps=steps, answer=task.gold.value, teacher_answer=said
        )

    def dialogue(
        self, task: Task, rationale: Rationale, attempt: int, rejected: list[str]
    ) -> Dialogue:
        return rr_dialogue(
            task,
            rationale,
            self.operators.names,
            self.operators.rag,
            Provenance(
                source="mmat:rationale",
                model=self.teacher.spec,
                prompt_hash=mmat_prompt_hash(),
                parent_id=task.id,
            ),
            {"stage": "rationale", "attempts": attempt, "rejected_attempts": rejected},
        )


async def run_rationale(
    config: RationaleConfig,
    teacher: ChatModel | None = None,
    caption_model: ChatModel | None = None,
    progress: bool = True,
) -> tuple[StageResult, Dataset[Dialogue]]:
    """Write RR rationales for every task of ``config.tasks`` into ``config.out``."""
    tasks_ds = Dataset.open(config.tasks, Task)
    out: Dataset[Dialogue] = Dataset.create(config.out, Dialogue)
    tasks = tasks_ds.records()
    if config.limit:
        tasks = tasks[: config.limit]
    metered, captioner = load_stage_models(
        config.teacher,
        config.operators.caption_model,
        config.backend.for_stage(config.concurrency),
        out,
        STAGE,
        teacher,
        caption_model,
    )
    operators = OperatorSet(config.operators, captioner)
    try:
        await operators.startup()
        writer = RationaleWriter(config, metered, operators, tasks_ds.assets)
        result = await run_stage(
            STAGE,
            tasks,
            key=lambda t: rr_dialogue_id(t.id),
            process=writer.write,
            out=out,
            concurrency=config.concurrency,
            budget=config.budget(),
            sources=[tasks_ds.assets],
            progress=progress,
            total=len(tasks),
        )
    finally:
        await close_models(metered, captioner)
    steps = [len(d.metadata.get("rationale", {}).get("steps", [])) for d in out]
    stage_stats(
        out,
        STAGE,
        result,
        {
            "mean_steps": round(sum(steps) / len(steps), 3) if steps else 0.0,
            "operator_calls": _operator_counts(out),
        },
    )
    return result, out


def _operator_counts(out: Dataset[Dialogue]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for d in out:
        for step in d.metadata.get("rationale", {}).get("steps", []):
            for op in step.get("operators", []):
                counts[op["name"]] = counts.get(op["name"], 0) + 1
            if step.get("rag"):
                counts[RAG] = counts.get(RAG, 0) + 1
    return counts
