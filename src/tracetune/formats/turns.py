"""Training chats as format-neutral turns, and turns parsed back into records.

Every exporter starts from the one rendering in :mod:`tracetune.formats.chat` (the chat the
agent sees at inference) and only changes how turns are spelled: ``<image>`` markers instead
of image parts, and, for JSON-action steps when asked, the trainer's structured tool-call and
tool-result turns instead of the assistant's text. Importers read rows into the same turns
and :func:`turns_to_trajectory` parses them back into steps, checking that the system prompt
and task turn are tracetune's own, so a record imported from an export renders the same chat
it was exported from.

Two things a trainer's format cannot carry are normalized on export: turns after the last
assistant turn (the echo of the final answer, which has no training signal) are dropped, and
a structured JSON step is written as its thought and call, so its text comes back in the
canonical ``Thought: ...`` / ``Action: {...}`` spelling.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from tracetune.agent.formats import ParseError, get_format
from tracetune.agent.render import task_text
from tracetune.formats.chat import dialogue_chat, pair_chat, system_prompt, trajectory_chat
from tracetune.formats.registry import FormatError, ImportContext
from tracetune.schema import (
    Action,
    ContentPart,
    Dialogue,
    ErrorKind,
    FileRef,
    Message,
    Observation,
    PreferencePair,
    Provenance,
    Step,
    StepError,
    Task,
    ToolCall,
    Trajectory,
)

Role = Literal["system", "user", "assistant", "tool"]


@dataclass(frozen=True)
class PendingMedia:
    """An image or file an imported row points at; stored once its name is known."""

    path: str
    kind: Literal["image", "file"] = "image"


Part = str | FileRef | PendingMedia
"""Text, or an image (a stored ref on export, a pending path on import)."""


@dataclass
class Turn:
    """One chat turn: text and images in order, or a structured tool call with its thought.

    ``tool`` turns carry the result of a structured call (without the ``Observation:``
    prefix the text spelling has).
    """

    role: Role
    parts: list[Part] = field(default_factory=list)
    call: ToolCall | None = None
    thought: str = ""

    @property
    def text(self) -> str:
        return "".join(p for p in self.parts if isinstance(p, str))

    @property
    def images(self) -> list[FileRef | PendingMedia]:
        return [p for p in self.parts if not isinstance(p, str)]


class NotAnEpisode(ValueError):
    """A chat that is not a tracetune agent episode (it can still be kept as a dialogue)."""


# -- records to turns (export) ----------------------------------------------------------------
def chat_turns(messages: list[dict[str, Any]], images: list[Any]) -> list[Turn]:
    """Turns of a TRL-shaped chat whose image placeholders take ``images`` in order."""
    pending = iter(images)
    turns = []
    for m in messages:
        parts: list[Part] = []
        for p in m["content"]:
            if p.get("type") == "image":
                parts.append(next(pending))
            else:
                parts.append(p.get("text") or "")
        turns.append(Turn(role=m["role"], parts=parts))
    return turns


def end_on_assistant(turns: list[Turn]) -> list[Turn]:
    """Drop the turns after the last assistant turn (they carry no training signal)."""
    end = len(turns)
    while end and turns[end - 1].role != "assistant":
        end -= 1
    return turns[:end]


def step_call(step: Step) -> tuple[str, ToolCall] | None:
    """A JSON-action step's thought and tool call (the final answer is a call too), if it
    parsed. Read from the raw text when it parses: stored arguments have their keys sorted,
    the raw text keeps the order the model wrote."""
    action, thought = step.action, step.thought
    if action is None:
        return None
    if step.raw:
        try:
            parsed = get_format("json").parse(step.raw)
        except ParseError:
            pass
        else:
            action, thought = parsed.action, parsed.thought
    call = _action_call(action)
    return None if call is None else (thought, call)


def _action_call(action: Action) -> ToolCall | None:
    if action.type == "tool_call" and action.tool_call is not None:
        return ToolCall(name=action.tool_call.name, arguments=action.tool_call.arguments)
    if action.type == "final_answer":
        return ToolCall(name="final_answer", arguments={"answer": action.answer or ""})
    return None


_OBSERVATION = "Observation:"


def _tool_result(turn: Turn) -> Turn:
    """An observation user turn as the result of a structured call (prefix dropped)."""
    parts = list(turn.parts)
    if parts and isinstance(parts[-1], str) and parts[-1].startswith(_OBSERVATION):
        text = parts[-1][len(_OBSERVATION) :]
        parts[-1] = text[1:] if text.startswith(" ") else text
    return Turn(role="tool", parts=parts)


def _structure(turns: list[Turn], steps: list[Step], action_format: str) -> list[Turn]:
    """Rewrite the turns of JSON-action steps as structured calls and tool results."""
    if action_format != "json":
        return turns
    turns = list(turns)
    for i, step in enumerate(steps):
        found = step_call(step)
        if found is None:
            continue
        turns[2 + 2 * i] = Turn(role="assistant", call=found[1], thought=found[0])
        turns[3 + 2 * i] = _tool_result(turns[3 + 2 * i])
    return turns


def trajectory_turns(trajectory: Trajectory, structured: bool) -> list[Turn]:
    """A trajectory's chat as turns, ending on its last assistant turn."""
    chat = trajectory_chat(trajectory)
    turns = chat_turns(chat["messages"], chat["images"])
    if structured:
        turns = _structure(turns, trajectory.steps, trajectory.action_format)
    return end_on_assistant(turns)


def dialogue_turns(dialogue: Dialogue) -> list[Turn]:
    chat = dialogue_chat(dialogue)
    return end_on_assistant(chat_turns(chat["messages"], chat["images"]))


def record_turns(record: Trajectory | Dialogue, structured: bool) -> list[Turn]:
    if isinstance(record, Trajectory):
        return trajectory_turns(record, structured)
    return dialogue_turns(record)


def pair_turns(pair: PreferencePair, structured: bool) -> tuple[list[Turn], Turn, Turn]:
    """A pair as its shared prompt turns and the chosen and rejected assistant turns."""
    chat = pair_chat(pair)
    prompt = chat_turns(chat["prompt"], chat["images"])
    chosen = Turn(role="assistant", parts=[chat["chosen"][0]["content"][0]["text"]])
    rejected = Turn(role="assistant", parts=[chat["rejected"][0]["content"][0]["text"]])
    if structured and pair.action_format == "json":
        prompt = _structure(prompt, pair.prefix, "json")
        found = step_call(pair.chosen)
        if found is not None:
            chosen = Turn(role="assistant", call=found[1], thought=found[0])
        found = step_call(pair.rejected)
        if found is not None:
            rejected = Turn(role="assistant", call=found[1], thought=found[0])
    return prompt, chosen, rejected


def task_attachments(record: Trajectory | Dialogue | PreferencePair) -> list[FileRef]:
    """An episode's non-image task files: the chat lists them by name only, so their bytes
    travel beside the rows (a dialogue's chat does not mention them)."""
    if isinstance(record, Dialogue):
        return []
    return [f for f in record.task.files if not f.is_image]


def tool_names(schemas: Any) -> list[str]:
    """Tool names from a ``tools`` value: a JSON string or a list of (OpenAI) schemas."""
    if schemas in (None, ""):
        return []
    if isinstance(schemas, str):
        try:
            schemas = json.loads(schemas)
        except json.JSONDecodeError:
            raise FormatError("the tools column is not valid JSON") from None
    if not isinstance(schemas, list):
        raise FormatError("the tools column must be a JSON list of tool schemas")
    names = []
    for s in schemas:
        fn = s.get("function", s) if isinstance(s, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise FormatError(f"a tool schema without a name: {str(s)[:80]}")
        names.append(fn["name"])
    return names


def split_placeholders(
    text: str, images: list[PendingMedia], marker: str = "<image>"
) -> list[Part]:
    """Split ``text`` at ``marker`` and put the next image at each one (consumes ``images``)."""
    pieces = text.split(marker)
    if len(pieces) - 1 > len(images):
        raise FormatError(
            f"more {marker} markers than images ({len(pieces) - 1} so far, {len(images)} left)"
        )
    parts: list[Part] = []
    for i, piece in enumerate(pieces):
        if i:
            parts.append(images.pop(0))
        if piece:
            parts.append(piece)
    return parts


def parse_call(value: str) -> tuple[str, ToolCall]:
    """A structured call written as ``[<think>...</think>] {"name": ..., "arguments": ...}``."""
    thought = ""
    m = re.match(r"\s*<think>\n?(.*?)\n?</think>\s*", value, re.S)
    if m:
        thought, value = m.group(1), value[m.end() :]
    try:
        obj = json.loads(value)
    except json.JSONDecodeError:
        raise FormatError(f"a tool-call turn is not JSON: {value[:80]!r}") from None
    if isinstance(obj, list) and len(obj) == 1:
        obj = obj[0]
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        raise FormatError(
            f'a tool-call turn needs {{"name": ..., "arguments": ...}}: {value[:80]!r}'
        )
    arguments = obj.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            raise FormatError(f"tool-call arguments are not JSON: {arguments[:80]!r}") from None
    if not isinstance(arguments, dict):
        raise FormatError("tool-call arguments must be a JSON object")
    return thought, ToolCall(name=obj["name"], arguments=arguments)


def call_value(turn: Turn) -> str:
    """A structured call as text: the thought in ``<think>`` tags, then the call as JSON."""
    assert turn.call is not None
    call = json.dumps(
        {"name": turn.call.name, "arguments": turn.call.arguments}, ensure_ascii=False
    )
    return f"<think>\n{turn.thought}\n</think>\n\n{call}" if turn.thought else call


# -- turns to records (import) ----------------------------------------------------------------
def _stored(part: Part, ctx: ImportContext, name: str | None = None) -> FileRef:
    """An image part as a stored ref (imported parts are pending until named)."""
    if isinstance(part, PendingMedia):
        return ctx.store(part, name)
    if isinstance(part, FileRef):
        return part
    raise NotAnEpisode("text where an image was expected")


_ERROR = re.compile(r"Error \(([a-z_]+)\): (.*)", re.S)
_PROMPT_TOOL = re.compile(r"^([A-Za-z_]\w*)\(.*\) -> \w+$", re.M)  # a tool's signature line
_LISTING = "\n\nAttached files: "
_ENTRY = re.compile(r"(.+?) \((image|[\w.+-]+/[\w.+-]+)\)(?:, |$)", re.S)


def _match_format(system: str, tools: list[str]) -> str:
    # Only registered tools count: a 'module:attr' name would import code named by the data.
    odd = [t for t in tools if not t.isidentifier()]
    if odd:
        raise NotAnEpisode(f"tool names {odd} are not registered tool names")
    for name in ("json", "code"):
        try:
            if system_prompt(name, tools) == system:
                return name
        except KeyError as exc:
            raise NotAnEpisode(f"{exc.args[0]}") from None
    raise NotAnEpisode(
        "its system prompt is not tracetune's agent prompt for its tools "
        f"({', '.join(tools) or 'none'})"
    )


def _parse_task(
    turn: Turn, files: list[PendingMedia], tools: list[str], rid: str, ctx: ImportContext
) -> Task:
    if turn.role != "user" or not turn.parts or not isinstance(turn.parts[-1], str):
        raise NotAnEpisode("the turn after the system prompt is not the task")
    images = turn.parts[:-1]
    if any(isinstance(p, str) for p in images):
        raise NotAnEpisode("the task turn is not its images followed by its text")
    text = turn.parts[-1]
    if not images and not files:
        query, entries = text, []
    else:
        cut = text.rfind(_LISTING)
        if cut < 0:
            raise NotAnEpisode("the task turn does not list its attached files")
        query, listing = text[:cut], text[cut + len(_LISTING) :]
        entries = _ENTRY.findall(listing)
        if len(entries) != len(images) + len(files):
            raise NotAnEpisode(
                f"the task lists {len(entries)} files but the row has {len(images)} images "
                f"and {len(files)} other files"
            )
    pending_images, pending_files = list(images), list(files)
    refs = []
    for name, kind in entries:
        if kind == "image":
            if not pending_images:
                raise NotAnEpisode("the task lists more images than the row has")
            media = pending_images.pop(0)
            refs.append(_stored(media, ctx, name))
        else:
            if not pending_files:
                raise NotAnEpisode("the task lists more files than the row has")
            refs.append(ctx.store(pending_files.pop(0), name, mime=kind))
    task = Task(
        id=rid,
        query=query,
        files=refs,
        tools=[t for t in tools if t != "final_answer"],
        provenance=Provenance(source=f"import:{ctx.format_name}"),
    )
    if task_text(task) != text:
        raise NotAnEpisode("the task turn is not tracetune's rendering of a task")
    return task


def code_final_answer(code: str) -> str | None:
    """The literal argument of a ``final_answer(...)`` call in ``code``, if any."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return None
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id == "final_answer"
        ):
            args = [*node.args, *(k.value for k in node.keywords)]
            if not args:
                return ""
            try:
                value = ast.literal_eval(args[0])
            except ValueError:
                return ast.unparse(args[0])
            return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return None


def _parse_step(turn: Turn, action_format: str, index: int) -> Step:
    fmt = get_format(action_format)
    if turn.call is not None:
        if action_format != "json":
            raise NotAnEpisode("a structured tool call in a code-action episode")
        call = turn.call
        if call.name == "final_answer":
            answer = call.arguments.get("answer", next(iter(call.arguments.values()), ""))
            action = Action(type="final_answer", answer=str(answer))
        else:
            action = Action(type="tool_call", tool_call=call)
        return Step(
            index=index, raw=fmt.render(turn.thought, action), thought=turn.thought, action=action
        )
    if turn.images:
        raise NotAnEpisode("an assistant turn with images")
    raw = turn.text
    step = Step(index=index, raw=raw)
    try:
        parsed = fmt.parse(raw)
    except ParseError:
        return step
    step.thought, step.action = parsed.thought, parsed.action
    if parsed.action.type == "code" and parsed.action.code is not None:
        answer = code_final_answer(parsed.action.code)
        if answer is not None:
            step.action = Action(type="code", code=parsed.action.code, answer=answer)
    return step


def _observe(step: Step, turn: Turn, ctx: ImportContext) -> None:
    """Fill ``step``'s observation or error from the turn that answered it."""
    if not turn.parts or not isinstance(turn.parts[-1], str):
        raise NotAnEpisode(f"observation {step.index} has no text")
    images = turn.parts[:-1]
    if any(isinstance(p, str) for p in images):
        raise NotAnEpisode(f"observation {step.index} is not images followed by text")
    text = turn.parts[-1]
    error = _ERROR.fullmatch(text)
    if error and error.group(1) in ErrorKind._value2member_map_ and not images:
        step.error = StepError(kind=ErrorKind(error.group(1)), message=error.group(2))
        return
    if turn.role == "user":
        if not text.startswith(_OBSERVATION):
            raise NotAnEpisode(f"turn for step {step.index} is neither an observation nor an error")
        text = text[len(_OBSERVATION) :]
        text = text[1:] if text.startswith(" ") else text
    refs = [_stored(m, ctx) for m in images]
    step.observation = Observation(text=text, images=refs)


def _is_final(step: Step) -> bool:
    return (
        step.action is not None
        and step.error is None
        and (step.action.type == "final_answer" or step.action.answer is not None)
    )


def _steps(turns: list[Turn], action_format: str, ctx: ImportContext, start: int = 0) -> list[Step]:
    steps: list[Step] = []
    i = 0
    while i < len(turns):
        turn = turns[i]
        if turn.role != "assistant":
            raise NotAnEpisode(f"expected the agent's turn, found a {turn.role} turn")
        step = _parse_step(turn, action_format, start + len(steps))
        i += 1
        if i < len(turns) and turns[i].role in ("user", "tool"):
            _observe(step, turns[i], ctx)
            i += 1
        elif step.action is not None and step.action.type == "final_answer":
            # The agent echoes a JSON final answer as its observation; exports drop the echo.
            step.observation = Observation(text=step.action.answer or "")
        steps.append(step)
    return steps


def _head(
    turns: list[Turn], tools: list[str], files: list[PendingMedia], rid: str, ctx: ImportContext
) -> tuple[str, list[str], Task]:
    """The action format, the tools and the task of an episode's first two turns."""
    if len(turns) < 2 or turns[0].role != "system":
        raise NotAnEpisode("it has no system prompt")
    if turns[0].images:
        raise NotAnEpisode("its system prompt has images")
    if not tools:  # exports meant for plain-text training leave the tools to the prompt
        tools = _PROMPT_TOOL.findall(turns[0].text)
    action_format = _match_format(turns[0].text, tools)
    return action_format, tools, _parse_task(turns[1], files, tools, rid, ctx)


def turns_to_trajectory(
    turns: list[Turn],
    tools: list[str],
    files: list[PendingMedia],
    rid: str,
    ctx: ImportContext,
) -> Trajectory:
    """A tracetune episode (system prompt, task, steps) read back into a trajectory."""
    action_format, tools, task = _head(turns, tools, files, rid, ctx)
    steps = _steps(turns[2:], action_format, ctx)
    final = steps[-1] if steps and _is_final(steps[-1]) else None
    answer = None
    if final is not None and final.action is not None:
        answer = final.action.answer
    return Trajectory(
        id=rid,
        task=task,
        controller=f"import:{ctx.format_name}",
        action_format=action_format,  # type: ignore[arg-type]
        tools=tools,
        steps=steps,
        final_answer=answer,
        status="completed" if final is not None else "max_steps",
        prompt_hash=get_format(action_format).prompt_hash,
        metadata={"imported_from": ctx.format_name},
    )


def turns_to_pair(
    prompt: list[Turn],
    chosen: Turn,
    rejected: Turn,
    tools: list[str],
    files: list[PendingMedia],
    rid: str,
    ctx: ImportContext,
) -> PreferencePair:
    """A step-wise preference (episode prefix, chosen and rejected next step) read back."""
    action_format, tools, task = _head(prompt, tools, files, rid, ctx)
    rest = prompt[2:]
    if rest and rest[-1].role == "assistant":
        raise NotAnEpisode("the prompt ends on an assistant turn, not on an observation")
    prefix = _steps(rest, action_format, ctx)
    return PreferencePair(
        id=rid,
        task=task,
        action_format=action_format,  # type: ignore[arg-type]
        tools=tools,
        prefix=prefix,
        chosen=_parse_step(chosen, action_format, len(prefix)),
        rejected=_parse_step(rejected, action_format, len(prefix)),
        metadata={"imported_from": ctx.format_name},
    )


def turns_to_dialogue(turns: list[Turn], rid: str, ctx: ImportContext) -> Dialogue:
    """Any chat as a plain dialogue; structured calls become the JSON-action text."""
    fmt = get_format("json")
    messages = []
    for turn in turns:
        if turn.call is not None:
            action = Action(type="tool_call", tool_call=turn.call)
            parts = [ContentPart(type="text", text=fmt.render(turn.thought, action))]
        else:
            parts = [
                ContentPart(type="text", text=p)
                if isinstance(p, str)
                else ContentPart(type="image", image=_stored(p, ctx))
                for p in turn.parts
            ]
        messages.append(Message(role=turn.role, content=parts))
    first_user = next((m for m in messages if m.role == "user"), None)
    task = Task(
        id=rid,
        query=first_user.text if first_user else "",
        files=[p.image for p in first_user.content if p.image is not None] if first_user else [],
        provenance=Provenance(source=f"import:{ctx.format_name}"),
    )
    return Dialogue(
        id=rid,
        task=task,
        format="chat",
        messages=messages,
        provenance=Provenance(source=f"import:{ctx.format_name}"),
        metadata={"imported_from": ctx.format_name},
    )


def convert_chat(
    turns: list[Turn],
    tools: list[str],
    files: list[PendingMedia],
    rid: str,
    ctx: ImportContext,
    want: str,
) -> Trajectory | Dialogue:
    if want == "trajectory":
        return turns_to_trajectory(turns, tools, files, rid, ctx)
    return turns_to_dialogue(turns, rid, ctx)


def check_placeholders(texts: list[str], n_images: int, rid: str, marker: str = "<image>") -> None:
    """The ``marker`` count in ``texts`` must equal the number of images (and no videos or
    audios may be announced): trainers pair them one to one and fail, or silently misalign,
    otherwise."""
    count = sum(t.count(marker) for t in texts)
    if count != n_images:
        raise FormatError(
            f"record {rid}: {count} {marker} placeholders but {n_images} images: the text "
            f"itself contains {marker!r}, which the trainer would take for an image"
        )
    for other in ("<video>", "<audio>"):
        if any(other in t for t in texts):
            raise FormatError(
                f"record {rid}: the text contains {other!r}, which trainers read as a "
                "media placeholder; the record has no such media"
            )
