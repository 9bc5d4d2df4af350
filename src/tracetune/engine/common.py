"""Plumbing shared by the engine's stages: models, JSON replies, answers, stats files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import Field

from tracetune.models.base import ChatModel, ModelOptions
from tracetune.models.replies import MalformedOutput, extract_json
from tracetune.runner import MeteredModel, StageResult
from tracetune.schema import Task
from tracetune.stageoptions import RunOptions
from tracetune.store import Dataset


class EngineOptions(RunOptions):
    """Settings every engine stage shares (:class:`RunOptions`, four samples at once)."""

    concurrency: int = Field(
        default=4, ge=1, description="Model requests in flight, and samples run at once."
    )


def load_metered(
    spec: str, backend: ModelOptions, out: Dataset[Any], stage: str, model: ChatModel | None = None
) -> MeteredModel:
    """A model whose usage lands in ``out``'s run state (budgets, caching)."""
    from tracetune.models.base import load_model

    return MeteredModel(model or load_model(spec, backend), out.state, stage)


def load_stage_models(
    spec: str,
    second_spec: str | None,
    backend: ModelOptions,
    out: Dataset[Any],
    stage: str,
    model: ChatModel | None = None,
    second_model: ChatModel | None = None,
) -> tuple[MeteredModel, MeteredModel]:
    """The stage's model and a second one for another role (the model behind
    ``image_caption``, the reflection repairer): the same model unless the second is named
    (or passed). Close both with ``close_models``."""
    metered = load_metered(spec, backend, out, stage, model)
    if not second_spec and second_model is None:
        return metered, metered
    return metered, load_metered(second_spec or spec, backend, out, stage, second_model)


async def close_models(*models: ChatModel) -> None:
    """Close each distinct model once."""
    for model in {id(m): m for m in models}.values():
        await model.aclose()


ReplyError = MalformedOutput
"""A model reply that is not the JSON object asked for: the one error type of model replies
(:class:`tracetune.models.replies.MalformedOutput`), under the name the engine's stages use."""


def json_object(text: str) -> dict[str, Any]:
    """The JSON object in a model reply (code fences and text around it are tolerated), by
    :func:`tracetune.models.replies.extract_json`'s rules; else :class:`MalformedOutput`."""
    value: dict[str, Any] = extract_json(text, dict)
    return value


def choices_of(task: Task) -> list[str]:
    choices = task.metadata.get("choices") or []
    return [str(c) for c in choices] if isinstance(choices, list) else []


def answer_agrees(prediction: str, task: Task) -> bool:
    """Whether a short answer matches the task's reference answer."""
    from tracetune.judge.answers import check_answer
    from tracetune.judge.vqa import extract_choice

    if task.gold is None:
        return True
    choices = choices_of(task)
    if task.gold.kind == "choice" and choices:
        return extract_choice(prediction, choices) == task.gold.value.strip().upper()
    return check_answer(prediction, task.gold).passed


def reference_text(task: Task) -> str:
    """The reference answer as the teacher is told it (an option letter with its text)."""
    assert task.gold is not None
    choices = choices_of(task)
    if task.gold.kind == "choice" and choices:
        index = ord(task.gold.value.strip().upper()) - ord("A")
        if 0 <= index < len(choices):
            return f"{task.gold.value} ({choices[index]})"
    return task.gold.value


def stage_stats(
    out: Dataset[Any],
    stage: str,
    result: StageResult | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The runner's statistics of ``stage`` in ``out`` (every run, not just this one: counts,
    drop reasons, first failures, usage), with this run's outcome and the stage's own
    counts in ``extra``; written to ``OUT/stats.json``."""
    from tracetune.runner.stats import stage_stats as runner_stats

    rows = [r for r in runner_stats(out.root) if r.stage == stage]
    stats: dict[str, Any] = rows[0].to_dict() if rows else {"stage": stage, "records": len(out)}
    if result is not None:
        stats["this_run"] = {
            "written": result.written,
            "skipped": result.skipped,
            "dropped": result.dropped,
            "failed": result.failed,
            "stopped": result.stopped,
        }
    stats.update(extra or {})
    path = Path(out.root) / "stats.json"
    path.write_text(json.dumps(stats, indent=2, ensure_ascii=False) + "\n")
    return stats
