"""Native tool calls in a model's own text: the hermes ``<tool_call>`` format.

Qwen2.5-VL, Qwen2-VL fine-tunes and tracetune's tiny models write a call as::

    <tool_call>
    {"name": "image_crop", "arguments": {"image": "a.png", "box": [0, 0, 0.5, 0.5]}}
    </tool_call>

which is what vLLM's ``--tool-call-parser hermes`` reads back. This module parses that text
into OpenAI-style tool calls (for ``tracetune serve`` and the ``local:`` backend), and writes
the tools block for chat templates that do not render ``tools`` themselves, so every model
served here speaks the same format.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from tracetune.errors import TracetuneError

TOOL_CALL_OPEN = "<tool_call>"
TOOL_CALL_CLOSE = "</tool_call>"
_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.S)


@dataclass
class ParsedToolCalls:
    """The text before the first call, and the calls (``arguments`` as a dict)."""

    content: str
    calls: list[dict[str, Any]] = field(default_factory=list)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse_tool_calls(text: str) -> ParsedToolCalls:
    """Split a completion into its content and hermes tool calls.

    A block that is not a JSON object with a string ``name`` is not a call: the whole text
    then stays content, as vLLM's hermes parser does, so the caller sees what the model wrote.
    """
    start = text.find(TOOL_CALL_OPEN)
    if start < 0:
        return ParsedToolCalls(text)
    calls: list[dict[str, Any]] = []
    for match in _CALL.finditer(text, start):
        try:
            obj = json.loads(match.group(1))
        except json.JSONDecodeError:
            return ParsedToolCalls(text)
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return ParsedToolCalls(text)
        arguments = obj.get("arguments", obj.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                return ParsedToolCalls(text)
        if not isinstance(arguments, dict):
            return ParsedToolCalls(text)
        calls.append({"id": new_call_id(), "name": obj["name"], "arguments": arguments})
    if not calls:
        return ParsedToolCalls(text)
    return ParsedToolCalls(text[:start].strip(), calls)


def render_tool_call(name: str, arguments: dict[str, Any]) -> str:
    """One call in the hermes spelling (what a model tuned on it writes)."""
    call = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
    return f"{TOOL_CALL_OPEN}\n{call}\n{TOOL_CALL_CLOSE}"


def tools_system_block(tools: list[dict[str, Any]]) -> str:
    """Instructions and tool schemas for templates that cannot render ``tools`` themselves."""
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "# Tools\nCall a tool by writing "
        '<tool_call>{"name": ..., "arguments": {...}}</tool_call>. Available tools:\n'
        f"<tools>\n{listing}\n</tools>"
    )


class ToolSchemaError(TracetuneError, ValueError):
    """A request's ``tools`` that are not a list of OpenAI-style function tools."""

    hint = (
        "give each tool as {'type': 'function', 'function': {'name': ..., 'description': "
        "..., 'parameters': {JSON schema}}}"
    )


def validate_tools(tools: Any) -> list[dict[str, Any]]:
    """``tools`` of a request, checked: a list of ``{"type": "function", "function": {...}}``."""
    if not isinstance(tools, list):
        raise ToolSchemaError("'tools' must be a list of {'type': 'function', 'function': {...}}")
    out = []
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not fn:
            raise ToolSchemaError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ToolSchemaError(f"tools[{i}].function needs a non-empty string 'name'")
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ToolSchemaError(f"tools[{i}].function.parameters must be a JSON schema object")
        out.append({"type": "function", "function": {**fn, "parameters": params}})
    return out
