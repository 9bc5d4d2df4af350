"""Reflection stage: two judge checks per rationale, and a repair for the flagged ones.

(a) ``unsupported``: read without its final answer, does the trace claim a conclusion the
tool outputs and the image do not support? (b) ``math``: does it state computed numbers
without the calculation? The judge and the repairer see the task's images with the trace.

Flagged rationales are repaired, not dropped: a model writes a critique and a corrected
derivation. In RR the flagged final step becomes the assistant turn that says the reasoning
is insufficient (its thought, then the critique; ``SIGNAL=reflection``), a user turn asks to
reflect, and the derivation follows as an assistant turn ending ``SIGNAL=end``, before the
closing question. The critique joins the final step rather than getting a turn of its own
because turns alternate and a step signalled ``end`` is followed by the closing question:
a separate turn would need an invented empty "no results" exchange in between. Every
judgement is kept as a ``Verdict`` in ``OUT/verdicts``; flagged counts per check are in
``OUT/stats.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from tracetune.engine.common import (
    EngineOptions,
    ReplyError,
    close_models,
    json_object,
    load_stage_models,
    reference_text,
    stage_stats,
)
from tracetune.engine.grammar import strip_markers
from tracetune.engine.leak import reflection_reveals
from tracetune.engine.render import mmat_prompt_hash, rr_dialogue
from tracetune.engine.trace import Rationale, Reflection
from tracetune.models.base import ChatModel, Sampling, text_message
from tracetune.prompts import render
from tracetune.runner import Drop, StageResult, run_stage
from tracetune.schema import Dialogue, Provenance, Verdict
from tracetune.store import AssetStore, Dataset

STAGE = "mmat-reflect"
Check = Literal["unsupported", "math"]
_TEMPLATES = {"unsupported": "mmat/judge_unsupported.jinja", "math": "mmat/judge_math.jinja"}


def _all_checks() -> list[Check]:
    return ["unsupported", "math"]


class ReflectOptions(EngineOptions):
    """How rationales are judged and repaired."""

    judge: str = Field(default="openai:gpt-4o-mini", description="Model spec of the judge.")
    repairer: str | None = Field(
        default=None, description="Model spec that writes repairs (default: the judge)."
    )
    checks: list[Check] = Field(
        default_factory=_all_checks,
        description="Judge checks to run: unsupported (reasoning forced to fit the label), "
        "math (skipped calculation steps).",
    )
    max_tries: int = Field(
        default=2, ge=1, description="Tries per judge or repair call whose reply is not JSON."
    )
    max_tokens: int = Field(default=768, ge=16, description="Max new tokens per call.")


class ReflectConfig(ReflectOptions):
    """Configuration of ``tracetune mmat reflect``."""

    dialogues: Path = Field(description="RR dialogues written by `tracetune mmat rationale`.")
    out: Path = Field(description="Output dataset of (repaired) RR dialogues (resumable).")


def trace_text(rationale: Rationale) -> str:
    """The rationale as a judge reads it: thoughts and tool outputs, no final answer."""
    lines = []
    for i, step in enumerate(rationale.steps, 1):
        lines.append(f"Step {i}. {step.thought}")
        for op in step.operators:
            lines.append(f"  [{op.name} output]\n  " + op.result.replace("\n", "\n  "))
        if step.rag is not None:
            lines.append(
                f"  [search for {step.rag.query!r}]\n  " + step.rag.result.replace("\n", "\n  ")
            )
    return "\n".join(lines)


def _flag(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "1")
    return bool(value)


class Reflector:
    def __init__(
        self,
        options: ReflectOptions,
        judge: ChatModel,
        repairer: ChatModel,
        verdicts: Dataset[Verdict],
        source: AssetStore | None = None,
    ) -> None:
        self.options = options
        self.judge = judge
        self.repairer = repairer
        self.verdicts = verdicts.writer(chunk_size=16)
        self.source = source

    def _images(self, dialogue: Dialogue) -> list[str]:
        """The task's image files: "unsupported" asks whether a plain look at the image gives
        a claim, and the repair derives from the image, so neither can work from text alone."""
        if self.source is None:
            return []
        return [str(self.source.path(ref)) for ref in dialogue.task.images]

    async def _json(
        self, model: ChatModel, prompt: str, images: list[str] | None = None
    ) -> dict[str, object]:
        messages = [text_message("user", prompt, images)]
        last = ""
        for attempt in range(self.options.max_tries):
            sampling = Sampling(
                temperature=0.0 if attempt == 0 else 0.5, max_tokens=self.options.max_tokens
            )
            reply = (await model.generate(messages, sampling=sampling)).text
            try:
                return json_object(reply)
            except ReplyError as exc:
                last = f"{exc}: {reply[:200]!r}"
        raise ReplyError(
            f"{model.spec} gave no JSON object after {self.options.max_tries} tries ({last})"
        )

    async def process(self, dialogue: Dialogue) -> Dialogue | Drop:
        meta = dialogue.metadata
        if "rationale" not in meta:
            return Drop("not_a_rationale")
        rationale = Rationale.model_validate(meta["rationale"])
        if rationale.reflection is not None:  # already repaired upstream
            return dialogue.model_copy(update={"metadata": {**meta, "stage": "reflect"}})
        trace = trace_text(rationale)
        images = self._images(dialogue)
        results: dict[str, dict[str, object]] = {}
        for check in self.options.checks:
            reply = await self._json(
                self.judge,
                render(_TEMPLATES[check], question=rationale.question, trace=trace),
                images,
            )
            results[check] = {
                "flagged": _flag(reply.get("flagged")),
                "reason": str(reply.get("reason", "")).strip(),
            }
        flagged = [c for c, r in results.items() if r["flagged"]]
        reasons = [f"{c}: {results[c]['reason']}" for c in flagged]
        self.verdicts.write(
            Verdict(
                id=f"verdict-reflect-{dialogue.id}",
                target_id=dialogue.id,
                target_kind="dialogue",
                judge=self.judge.spec,
                passed=not flagged,
                reasons=reasons,
                prompt_hash=mmat_prompt_hash(),
                details={"checks": results},
            )
        )
        new_meta = {**meta, "stage": "reflect", "checks": results, "flagged": flagged}
        if not flagged:
            return dialogue.model_copy(update={"metadata": new_meta})
        reflection = await self.repair(dialogue, rationale, trace, flagged, reasons)
        if isinstance(reflection, Drop):
            return reflection
        repaired = rationale.model_copy(update={"reflection": reflection})
        return rr_dialogue(
            dialogue.task,
            repaired,
            list(meta.get("operators", [])),
            bool(meta.get("rag")),
            Provenance(
                source="mmat:reflect",
                model=self.repairer.spec,
                prompt_hash=mmat_prompt_hash(),
                parent_id=dialogue.id,
            ),
            {k: v for k, v in new_meta.items() if k not in ("rationale", "reflected")},
        )

    async def repair(
        self,
        dialogue: Dialogue,
        rationale: Rationale,
        trace: str,
        flagged: list[str],
        reasons: list[str],
    ) -> Reflection | Drop:
        task = dialogue.task
        prompt = render(
            "mmat/repair.jinja",
            question=rationale.question,
            trace=trace,
            answer=reference_text(task) if task.gold else rationale.answer,
            reasons=reasons,
        )
        reply = await self._json(self.repairer, prompt, self._images(dialogue))
        critique = strip_markers(str(reply.get("critique", "")))
        derivation = strip_markers(str(reply.get("derivation", "")))
        if not critique or not derivation:
            return Drop("repair_incomplete", {"reply": str(reply)[:300]})
        reflection = Reflection(
            flagged=flagged, reasons=reasons, critique=critique, derivation=derivation
        )
        # Only the repair's own text is checked: the steps passed the leak check already,
        # and re-checking them here without the question and choices could report a step
        # first and hide a critique that says the answer was given.
        leak = reflection_reveals(rationale.model_copy(update={"reflection": reflection}))
        if leak is not None:
            return Drop("reveals_reference", {"where": leak.describe()})
        return reflection

    def close(self) -> None:
        self.verdicts.close()


async def run_reflect(
    config: ReflectConfig,
    judge: ChatModel | None = None,
    repairer: ChatModel | None = None,
    progress: bool = True,
) -> tuple[StageResult, Dataset[Dialogue]]:
    """Judge and repair every RR dialogue of ``config.dialogues`` into ``config.out``."""
    source = Dataset.open(config.dialogues, Dialogue)
    out: Dataset[Dialogue] = Dataset.create(config.out, Dialogue)
    verdicts: Dataset[Verdict] = Dataset.create(out.root / "verdicts", Verdict)
    items = [d for d in source if d.format == "rr"]
    if config.limit:
        items = items[: config.limit]
    judge_model, repair_model = load_stage_models(
        config.judge,
        config.repairer,
        config.backend.for_stage(config.concurrency),
        out,
        STAGE,
        judge,
        repairer,
    )
    reflector = Reflector(config, judge_model, repair_model, verdicts, source.assets)
    try:
        result = await run_stage(
            STAGE,
            items,
            key=lambda d: d.id,
            process=reflector.process,
            out=out,
            concurrency=config.concurrency,
            budget=config.budget(),
            sources=[source.assets],
            progress=progress,
            total=len(items),
        )
    finally:
        reflector.close()
        await close_models(judge_model, repair_model)
    stage_stats(out, STAGE, result, reflection_counts(out))
    return result, out


def reflection_counts(out: Dataset[Dialogue]) -> dict[str, object]:
    """How many dialogues each check flagged, and how many were repaired."""
    flagged: dict[str, int] = {}
    repaired = 0
    for d in out:
        for check in d.metadata.get("flagged", []):
            flagged[check] = flagged.get(check, 0) + 1
        repaired += bool(d.metadata.get("reflected"))
    return {"flagged": flagged, "repaired": repaired, "judged": len(out)}
