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


def tool_call_id(step: Step) -> str:
    """The id a step's native tool call gets in the chat (stable, so renders repeat)."""
    return f"call_{step.index}"


def native_step_messages(step: Step, resolve: ImageResolver) -> list[ChatMessage]:
    """A ``tools``-format step: the assistant's thought with its ``tool_calls``, then a
    ``tool`` message with the result (images the tool returned follow in a user turn, since
    tool messages carry text only). A step without a parsed call is an assistant text turn
    and the error as a user turn."""
    action = step.action
    if (
        action is None
        or action.type not in ("tool_call", "final_answer")
        or (action.type == "tool_call" and action.tool_call is None)
    ):
        error: list[dict[str, Any]] = [{"type": "text", "text": observation_text(step)}]
        return [{"role": "assistant", "content": step.raw}, {"role": "user", "content": error}]
    if action.type == "final_answer":
        name, arguments = "final_answer", {"answer": action.answer or ""}
    else:
        assert action.tool_call is not None
        name, arguments = action.tool_call.name, action.tool_call.arguments
    call_id = tool_call_id(step)
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    text = observation_text(step).removeprefix("Observation: ").removeprefix("Observation:")
    messages: list[ChatMessage] = [
        {"role": "assistant", "content": step.thought, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call_id, "name": name, "content": text},
    ]
    images = step.observation.images if step.observation and step.error is None else []
    if images:
        parts: list[dict[str, Any]] = [{"type": "image", "image": resolve(f)} for f in images]
        parts.append({"type": "text", "text": f"Images returned by {name}."})
        messages.append({"role": "user", "content": parts})
    return messages


def episode_messages(
    system_prompt: str,
    task: Task,
    steps: list[Step],
    resolve: ImageResolver,
    action_format: str = "json",
) -> list[ChatMessage]:
    """System prompt, the task, then each step's action and observation.

    In the ``tools`` format, steps are native tool-call turns (see
    :func:`native_step_messages`); otherwise the assistant's text and an observation turn.
    """
    messages: list[ChatMessage] = [{"role": "system", "content": system_prompt}]
    messages.append(task_message(task, resolve))
    for step in steps:
        if action_format == "tools":
            messages.extend(native_step_messages(step, resolve))
        else:
            messages.extend(step_messages(step, resolve))
    return messages
