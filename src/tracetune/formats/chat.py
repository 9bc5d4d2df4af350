"""Records as multimodal chats in the TRL conversational shape.

A chat is ``{"messages": [...], "images": [...], "tools": [...]}`` where image parts in
``messages`` are bare ``{"type": "image"}`` placeholders and ``images`` holds the images in
placeholder order. The episode rendering is the one the agent uses at inference
(``tracetune.agent.render``), so a model is trained on exactly what it will be shown.
Observations are user turns; loss belongs on assistant turns only.
"""

from __future__ import annotations

from typing import Any

from tracetune.agent.formats import get_format
from tracetune.agent.render import episode_messages, native_step_messages
from tracetune.errors import TracetuneError
from tracetune.models.base import ChatMessage
from tracetune.schema import Dialogue, FileRef, PreferencePair, Step, Task, Trajectory
from tracetune.store import AssetStore
from tracetune.tools import get_tool

Chat = dict[str, Any]


class ChatFormatError(TracetuneError, ValueError):
    """A record cannot become a valid training chat; the message names the record."""


def _split_images(messages: list[ChatMessage], load: Any) -> tuple[list[dict[str, Any]], list[Any]]:
    """Replace image payloads by placeholders; return the images in order."""
    images: list[Any] = []
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            parts = []
            for p in content:
                if p.get("type") == "image":
                    images.append(load(p["image"]))
                    parts.append({"type": "image"})
                else:
                    parts.append({"type": "text", "text": p["text"]})
            content = parts
        else:
            content = [{"type": "text", "text": content}]
        # tool_calls, tool_call_id and name (native tool-call turns) go to the template as is.
        out.append({**{k: v for k, v in m.items() if k != "content"}, "content": content})
    return out, images


def _identity(ref: FileRef) -> FileRef:
    return ref


def system_prompt(action_format: str, tool_names: list[str]) -> str:
    tools = [get_tool(n) for n in tool_names]
    return get_format(action_format).system_prompt(tools)


def tool_schemas(tool_names: list[str]) -> list[dict[str, Any]]:
    return [get_tool(n).openai_schema() for n in tool_names]


def steps_with_raw(steps: list[Step], action_format: str) -> list[Step]:
    """Steps whose raw text is missing (e.g. imported ones) get their canonical rendering."""
    fmt = get_format(action_format)
    return [
        s
        if s.raw or s.action is None
        else s.model_copy(update={"raw": fmt.render(s.thought, s.action)})
        for s in steps
    ]


def trajectory_chat(trajectory: Trajectory, load_image: Any = _identity) -> Chat:
    """A trajectory as one SFT chat. ``load_image(FileRef)`` turns refs into images."""
    tools = trajectory.tools or trajectory.task.tools
    messages = episode_messages(
        system_prompt(trajectory.action_format, tools),
        trajectory.task,
        steps_with_raw(trajectory.steps, trajectory.action_format),
        _identity,
        trajectory.action_format,
    )
    msgs, images = _split_images(messages, load_image)
    chat = {"messages": msgs, "images": images, "tools": tool_schemas(tools)}
    check_chat(chat, trajectory.id)
    return chat


def pair_chat(pair: PreferencePair, load_image: Any = _identity) -> Chat:
    """A step-wise pair as ``prompt`` (shared prefix), ``chosen`` and ``rejected`` turns."""
    tools = pair.tools or pair.task.tools
    prefix = episode_messages(
        system_prompt(pair.action_format, tools),
        pair.task,
        steps_with_raw(pair.prefix, pair.action_format),
        _identity,
        pair.action_format,
    )
    prompt, images = _split_images(prefix, load_image)
    chosen, rejected = steps_with_raw([pair.chosen, pair.rejected], pair.action_format)
    chat = {
        "prompt": prompt,
        "chosen": [_assistant_turn(chosen, pair.action_format)],
        "rejected": [_assistant_turn(rejected, pair.action_format)],
        "images": images,
        "tools": tool_schemas(tools),
    }
    check_chat({"messages": prompt, "images": images}, pair.id)
    return chat


def _assistant_turn(step: Step, action_format: str) -> dict[str, Any]:
    """A step's assistant turn: its text, or (tools format) its thought and tool call."""
    if action_format == "tools":
        message = native_step_messages(step, _identity)[0]
        text = message["content"] or ""
        return {**message, "content": [{"type": "text", "text": text}]}
    return {"role": "assistant", "content": [{"type": "text", "text": step.raw}]}


def dialogue_chat(dialogue: Dialogue, load_image: Any = _identity) -> Chat:
    """An RR/ORR/plain dialogue as one SFT chat."""
    messages: list[ChatMessage] = []
    for m in dialogue.messages:
        parts: list[dict[str, Any]] = []
        for p in m.content:
            if p.type == "image" and p.image is not None:
                parts.append({"type": "image", "image": p.image})
            else:
                parts.append({"type": "text", "text": p.text or ""})
        messages.append({"role": m.role, "content": parts})
    msgs, images = _split_images(messages, load_image)
    chat = {"messages": msgs, "images": images, "tools": []}
    check_chat(chat, dialogue.id)
    return chat


def check_chat(chat: Chat, record_id: str) -> None:
    """Placeholders must match images one to one; the chat must end on the assistant."""
    placeholders = sum(
        1
        for m in chat["messages"]
        for p in m["content"]
        if isinstance(p, dict) and p.get("type") == "image"
    )
    if placeholders != len(chat["images"]):
        raise ChatFormatError(
            f"record {record_id}: {placeholders} image placeholders but "
            f"{len(chat['images'])} images"
        )


def asset_loader(assets: AssetStore, as_pil: bool = True) -> Any:
    """A ``load_image`` for the chat builders: PIL images (or paths) from a dataset's assets."""
    if as_pil:
        return assets.open_image
    return lambda ref: str(assets.path(ref))


def task_chat_prompt(task: Task, action_format: str, tool_names: list[str]) -> Chat:
    """The opening prompt of an episode (system + task), as placeholders and images."""
    messages = episode_messages(
        system_prompt(action_format, tool_names), task, [], _identity, action_format
    )
    msgs, images = _split_images(messages, _identity)
    return {"messages": msgs, "images": images}
