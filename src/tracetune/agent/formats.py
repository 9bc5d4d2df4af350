"""Action formats: how a controller writes an action, and how we read it back.

``json``: a thought and one tool call as a JSON object (OpenAI function-calling shape).
``code``: a thought and a block of Python that calls tools as functions (the MATRIX style),
executed in the sandbox.
``tools``: native tool calls. The tool schemas travel in the request's ``tools`` (so the chat
template or the endpoint renders them), the controller answers with ``tool_calls`` (hermes
``<tool_call>`` text for local models), and results go back as ``tool`` messages. A step's raw
text spells its call the hermes way, which is also what training renders teach.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Literal

from tracetune.errors import ConfigError, TracetuneError
from tracetune.models.base import Completion
from tracetune.models.replies import find_json
from tracetune.models.toolcalls import parse_tool_calls, render_tool_call
from tracetune.prompts import prompt_hash, render
from tracetune.schema import Action, ToolCall
from tracetune.tools import Tool

ActionFormatName = Literal["json", "code", "tools"]


class ParseError(TracetuneError, ValueError):
    """The model's output holds no valid action; the message tells the model the fix."""


@dataclass(frozen=True)
class Parsed:
    thought: str
    action: Action


_THOUGHT = re.compile(r"^\s*(?:Thought\s*:)?\s*", re.I)


def _thought(text: str) -> str:
    return _THOUGHT.sub("", text, count=1).strip()


def first_json_object(text: str) -> tuple[dict[str, object], int, int] | None:
    """The first JSON object in ``text`` with its start and end, or None: the reply rules of
    :func:`tracetune.models.replies.find_json` (a broken or cut-off value is never mined for
    a nested object)."""
    found = find_json(text, dict)
    return None if found is None else (found.value, found.start, found.end)


# Rendered system prompts by template and tool list: an agent renders the same prompt for
# every episode (a Jinja render is ~0.1-0.4 ms). The tool objects are kept with the text, so
# the ids in the key cannot be reused by other objects while the entry lives.
_PROMPTS: dict[tuple[str, tuple[int, ...]], tuple[tuple[Tool, ...], str]] = {}


def _system_prompt(template: str, tools: list[Tool]) -> str:
    key = (template, tuple(id(t) for t in tools))
    hit = _PROMPTS.get(key)
    if hit is None:
        if len(_PROMPTS) >= 64:
            _PROMPTS.pop(next(iter(_PROMPTS)))
        hit = (tuple(tools), render(template, tools=tools))
        _PROMPTS[key] = hit
    return hit[1]


class JsonFormat:
    """``Thought: ...`` then ``Action: {"name": ..., "arguments": {...}}``."""

    name: ActionFormatName = "json"
    template = "agent/json.jinja"

    def system_prompt(self, tools: list[Tool]) -> str:
        return _system_prompt(self.template, tools)

    @property
    def prompt_hash(self) -> str:
        return prompt_hash(self.template)

    def parse(self, text: str) -> Parsed:
        marker = re.search(r"Action\s*:", text, re.I)
        search_from = marker.end() if marker else 0
        found = first_json_object(text[search_from:])
        if found is None:
            raise ParseError(
                "no action found. End your turn with one tool call as JSON, e.g. "
                'Action: {"name": "calculator", "arguments": {"expression": "2+2"}}'
            )
        obj, start, _ = found
        thought_text = text[: marker.start()] if marker else text[: search_from + start]
        thought = _thought(re.sub(r"```(?:json)?\s*$", "", thought_text.strip()))
        name = obj.get("name") or obj.get("tool")
        if not isinstance(name, str) or not name:
            raise ParseError('the action JSON needs a "name" field with the tool to call')
        arguments = obj.get("arguments", obj.get("args", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                raise ParseError('"arguments" must be a JSON object') from None
        if not isinstance(arguments, dict):
            raise ParseError('"arguments" must be a JSON object')
        if name == "final_answer":
            answer = arguments.get("answer", next(iter(arguments.values()), ""))
            return Parsed(thought, Action(type="final_answer", answer=_answer_text(answer)))
        return Parsed(
            thought, Action(type="tool_call", tool_call=ToolCall(name=name, arguments=arguments))
        )

    native_tools = False

    def raw(self, completion: Completion) -> str:
        """The step's text; a native tool call an endpoint returned reads as its Action line."""
        text = completion.text
        for call in completion.tool_calls or []:
            action = json.dumps(
                {"name": call.get("name"), "arguments": call.get("arguments")}, ensure_ascii=False
            )
            text = f"{text}\nAction: {action}" if text else f"Action: {action}"
        return text

    def render(self, thought: str, action: Action) -> str:
        """Canonical text of a step, as the controller should have written it."""
        if action.type == "final_answer":
            call = {"name": "final_answer", "arguments": {"answer": action.answer or ""}}
        elif action.tool_call is not None:
            call = {"name": action.tool_call.name, "arguments": action.tool_call.arguments}
        else:
            raise ValueError("json format cannot render a code action")
        return f"Thought: {thought}\nAction: {json.dumps(call, ensure_ascii=False)}"


_CODE_BLOCK = re.compile(r"```(?:py|python)?[ \t]*\n(.*?)(?:```|<end_code>|\Z)", re.S | re.I)


class CodeFormat:
    """``Thought: ...`` then ``Code:`` and a fenced Python block calling tools."""

    name: ActionFormatName = "code"
    template = "agent/code.jinja"

    def system_prompt(self, tools: list[Tool]) -> str:
        return _system_prompt(self.template, tools)

    @property
    def prompt_hash(self) -> str:
        return prompt_hash(self.template)

    def parse(self, text: str) -> Parsed:
        match = _CODE_BLOCK.search(text)
        if match is None or not match.group(1).strip():
            raise ParseError(
                "no code found. Write Code: followed by a ```py fenced block that calls the "
                "tools, or calls final_answer(...) when you know the answer"
            )
        thought_text = text[: match.start()]
        thought_text = re.sub(r"Code\s*:\s*$", "", thought_text.strip(), flags=re.I)
        return Parsed(_thought(thought_text), Action(type="code", code=match.group(1).rstrip()))

    native_tools = False

    def raw(self, completion: Completion) -> str:
        return completion.text

    def render(self, thought: str, action: Action) -> str:
        if action.type == "final_answer":
            code = f"final_answer({json.dumps(action.answer or '', ensure_ascii=False)})"
        elif action.type == "code" and action.code is not None:
            code = action.code
        elif action.tool_call is not None:
            code = call_as_code(action.tool_call)
        else:
            raise ValueError(f"cannot render {action!r} as code")
        return f"Thought: {thought}\nCode:\n```py\n{code}\n```"


class ToolsFormat:
    """Native tool calls: schemas in the request's ``tools``, answers as ``tool_calls``.

    One call runs per step: when a turn holds several, the first runs and the rest are
    dropped (the rendered turn then shows only the call that ran).
    """

    name: ActionFormatName = "tools"
    template = "agent/tools.jinja"
    native_tools = True

    def system_prompt(self, tools: list[Tool]) -> str:
        return _system_prompt(self.template, tools)

    @property
    def prompt_hash(self) -> str:
        return prompt_hash(self.template)

    def raw(self, completion: Completion) -> str:
        """The turn as text: the content, then each native call in the hermes spelling."""
        parts = [completion.text.strip()] if completion.text.strip() else []
        for call in completion.tool_calls or []:
            arguments = call.get("arguments")
            if not isinstance(arguments, dict):  # what the model wrote; parse() reports it
                text = json.dumps({"name": call.get("name"), "arguments": arguments})
                parts.append(f"<tool_call>\n{text}\n</tool_call>")
            else:
                parts.append(render_tool_call(str(call.get("name")), arguments))
        return "\n".join(parts)

    def parse(self, text: str) -> Parsed:
        parsed = parse_tool_calls(text)
        if not parsed.calls:
            if "<tool_call>" in text:
                raise ParseError(
                    'the tool call is not valid JSON with a "name" and an "arguments" object'
                )
            raise ParseError(
                "no tool call found. Call one of the tools; when you know the answer, call "
                "final_answer with it"
            )
        call = parsed.calls[0]
        thought = _thought(parsed.content)
        if call["name"] == "final_answer":
            arguments = call["arguments"]
            answer = arguments.get("answer", next(iter(arguments.values()), ""))
            return Parsed(thought, Action(type="final_answer", answer=_answer_text(answer)))
        tool_call = ToolCall(name=call["name"], arguments=call["arguments"])
        return Parsed(thought, Action(type="tool_call", tool_call=tool_call))

    def render(self, thought: str, action: Action) -> str:
        if action.type == "final_answer":
            call = render_tool_call("final_answer", {"answer": action.answer or ""})
        elif action.tool_call is not None:
            call = render_tool_call(action.tool_call.name, action.tool_call.arguments)
        else:
            raise ValueError("tools format cannot render a code action")
        return f"{thought}\n{call}" if thought else call


ActionFormat = JsonFormat | CodeFormat | ToolsFormat


def call_as_code(call: ToolCall, assign: str | None = None) -> str:
    """A tool call as one line of Python with keyword arguments."""
    args = ", ".join(f"{k}={py_literal(v)}" for k, v in call.arguments.items())
    line = f"{call.name}({args})"
    return f"{assign} = {line}" if assign else line


def py_literal(value: object) -> str:
    """A JSON-like value written as the Python literal a code action passes."""
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, str | int | float):
        return json.dumps(value, ensure_ascii=False) if isinstance(value, str) else repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(py_literal(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{py_literal(k)}: {py_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _answer_text(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return json.dumps(value, ensure_ascii=False) if isinstance(value, list | dict) else str(value)


FORMATS: dict[str, type[JsonFormat] | type[CodeFormat] | type[ToolsFormat]] = {
    "json": JsonFormat,
    "code": CodeFormat,
    "tools": ToolsFormat,
}


def get_format(name: str) -> ActionFormat:
    if name not in FORMATS:
        raise ConfigError(f"unknown action format {name!r}; choose one of: {', '.join(FORMATS)}")
    return FORMATS[name]()
