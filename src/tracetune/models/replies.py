"""Reading what a model replied: the text of a message, and JSON values inside prose.

One place for it, so every stage that asks a model for structured output (query generation,
judges, verifiers) reads replies by the same rules and fails with the same error type.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tracetune.errors import TracetuneError


class MalformedOutput(TracetuneError, ValueError):
    """A model's output could not be read as what the prompt asked for."""


class JudgeReplyError(MalformedOutput):
    """A judge's reply that does not hold what was asked for (a JSON object with the
    expected keys and values); the message says what is wrong."""


_FENCE = re.compile(r"```(?:json|JSON)?\s*\n(.*?)```", re.S)


def extract_json(text: str, kind: type[list[Any]] | type[dict[str, Any]]) -> Any:
    """The first JSON list or object in ``text`` (fenced or bare), else ``MalformedOutput``.

    Models wrap JSON in prose and code fences; the first well-formed value of the wanted
    kind is taken, so a sentence before it does not sink an otherwise good answer.
    """
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    opener = "[" if kind is list else "{"
    decoder = json.JSONDecoder()
    for candidate in candidates:
        start = candidate.find(opener)
        while start != -1:
            try:
                value, _ = decoder.raw_decode(candidate[start:])
            except json.JSONDecodeError:
                start = candidate.find(opener, start + 1)
                continue
            if isinstance(value, kind):
                return value
            start = candidate.find(opener, start + 1)
    what = "a JSON list" if kind is list else "a JSON object"
    snippet = " ".join(text.split())[:160]
    raise MalformedOutput(f"expected {what}, got: {snippet!r}")


def content_text(content: Any) -> str:
    """The text of a message's content: a string, a list of parts (OpenAI's ``{type, text}``),
    or a ``{type, content}`` wrapper as GTA's dialogs write it."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text") or "") if isinstance(p, dict) else str(p) for p in content)
    if isinstance(content, dict) and "content" in content:
        return content_text(content["content"])
    return str(content)
