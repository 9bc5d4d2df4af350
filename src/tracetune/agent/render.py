"""An episode as chat messages: the one rendering used at inference and in training data."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from tracetune.models.base import ChatMessage
from tracetune.schema import FileRef, Step, Task

ImageResolver = Callable[[FileRef], Any]


def file_names(files: list[FileRef]) -> list[str]:
    """Names the task's files get in the working directory (duplicates made unique)."""
    seen: dict[str, int] = {}
    names = []
    for ref in files:
        name = ref.name
        if name in seen:
            seen[name] += 1
            stem, dot, ext = name.rpartition(".")
            name = f"{stem}_{seen[ref.name]}.{ext}" if dot else f"{name}_{seen[ref.name]}"
        else:
            seen[name] = 1
        names.append(name)
    return names


def task_text(task: Task) -> str:
    """The user turn's text: the query and the names of the attached files."""
    if not task.files:
        return task.query
    listing = ", ".join(
        f"{name} ({'image' if ref.is_image else ref.mime})"
        for name, ref in zip(file_names(task.files), task.files, strict=True)
    )
    return f"{task.query}\n\nAttached files: {listing}"


def observation_text(step: Step) -> str:
    text = step.observation.text if step.observation else ""
    if step.error is not None:
        error = f"Error ({step.error.kind.value}): {step.error.message}"
        # Code may print useful output before it fails; the model should see both.
        return f"Observation: {text}\n{error}" if text.strip() else error
    return f"Observation: {text}".rstrip()


def task_message(task: Task, resolve: ImageResolver) -> ChatMessage:
    parts: list[dict[str, Any]] = [{"type": "image", "image": resolve(f)} for f in task.images]
    parts.append({"type": "text", "text": task_text(task)})
    return {"role": "user", "content": parts}


def step_messages(step: Step, resolve: ImageResolver) -> list[ChatMessage]:
    """The assistant turn of a step, then the observation as a user turn with its images."""
    images = step.observation.images if step.observation and step.error is None else []
    obs: list[dict[str, Any]] = [{"type": "image", "image": resolve(f)} for f in images]
    obs.append({"type": "text", "text": observation_text(step)})
    return [{"role": "assistant", "content": step.raw}, {"role": "user", "content": obs}]


def episode_messages(
    system_prompt: str, task: Task, steps: list[Step], resolve: ImageResolver
) -> list[ChatMessage]:
    """System prompt, the task, then each step's action and observation."""
    messages: list[ChatMessage] = [{"role": "system", "content": system_prompt}]
    messages.append(task_message(task, resolve))
    for step in steps:
        messages.extend(step_messages(step, resolve))
    return messages
