"""Reading what a model replied: the text of a message, and JSON values inside prose.

One place for it, so every stage that asks a model for structured output (query generation,
judges, verifiers) reads replies by the same rules and fails with the same error type.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass
from typing import Any

from tracetune.errors import TracetuneError


class MalformedOutput(TracetuneError, ValueError):
    """A model's output could not be read as what the prompt asked for."""


class JudgeReplyError(MalformedOutput):
    """A judge's reply that does not hold what was asked for (a JSON object with the
    expected keys and values); the message says what is wrong."""


_FENCE = re.compile(r"```(?:json|JSON)?\s*\n(.*?)```", re.S)
_CLOSERS = {"[": "]", "{": "}"}


@dataclass(frozen=True)
class JsonMatch:
    """A JSON value found in a text, and where: ``text[start:end]`` is its source."""

    value: Any
    start: int
    end: int


def _cut_off(exc: json.JSONDecodeError, text: str) -> bool:
    # The text ended inside the value: a reply cut at its token limit.
    return exc.msg.startswith("Unterminated string") or exc.pos >= len(text.rstrip())


def _balanced_end(text: str, start: int) -> int | None:
    """The index after the bracket that closes the one at ``start`` (brackets inside
    single- or double-quoted strings do not count), or None when it never closes."""
    stack: list[str] = []
    quote: str | None = None
    i = start
    while i < len(text):
        ch = text[i]
        if quote is not None:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch in _CLOSERS:
            stack.append(_CLOSERS[ch])
        elif stack and ch == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
        i += 1
    return None


def _python_literal(source: str) -> Any:
    try:  # models often answer with a Python literal ('single quotes', True, None)
        return ast.literal_eval(source)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None


def _scan(text: str, kind: type[Any], python_literals: bool) -> tuple[JsonMatch | None, bool]:
    """The first value of ``kind`` in ``text``, and whether the search stopped at a value
    the text ends inside of (a cut-off reply)."""
    opener = "[" if kind is list else "{"
    decoder = json.JSONDecoder()
    start = text.find(opener)
    while start != -1:
        try:
            value, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError as exc:
            close = _balanced_end(text, start)
            if python_literals and close is not None:
                value = _python_literal(text[start:close])
                if isinstance(value, kind):
                    return JsonMatch(value, start, close), False
            if close is None and _cut_off(exc, text):
                # Whatever follows is inside the cut-off value: a nested part of it is not
                # the answer.
                return None, True
            # Not JSON here (prose in brackets, a broken value): go on after it, never into
            # a part nested inside it.
            start = text.find(opener, close if close is not None else start + 1)
            continue
        if isinstance(value, kind):
            return JsonMatch(value, start, end), False
        start = text.find(opener, start + 1)
    return None, False


def find_json(
    text: str,
    kind: type[list[Any]] | type[dict[str, Any]] = dict,
    *,
    python_literals: bool = False,
) -> JsonMatch | None:
    """The first JSON list or object (``kind``) in ``text`` with its position, or None.

    The text is read as it stands (code fences are prose around the value). A value that
    does not parse is stepped over whole, so none of its nested parts is taken for the
    answer; a value the text ends inside of (a reply cut off) ends the search.
    ``python_literals``: also accept a Python literal (``{'score': 1}``).
    """
    return _scan(text, kind, python_literals)[0]


def extract_json(
    text: str,
    kind: type[list[Any]] | type[dict[str, Any]],
    *,
    python_literals: bool = False,
) -> Any:
    """The first JSON list or object (``kind``) in ``text``, else :class:`MalformedOutput`.

    Models wrap JSON in prose and code fences: a fenced block (```json) is read first, then
    the whole text; in each, the first well-formed value of the wanted kind is taken, so a
    sentence before it does not sink an otherwise good answer. A value that does not parse
    is stepped over whole (none of its nested parts is taken for the answer), and a reply
    that ends inside the value (cut off at its token limit) is an error that says so.
    ``python_literals``: also accept a Python literal (``{'score': 1}``), as judges write.
    """
    cut_off = False
    for candidate in [m.group(1) for m in _FENCE.finditer(text)] + [text]:
        found, cut = _scan(candidate, kind, python_literals)
        if found is not None:
            return found.value
        cut_off = cut_off or cut
    what = "a JSON list" if kind is list else "a JSON object"
    snippet = " ".join(text.split())[:160]
    message = f"expected {what}, got: {snippet!r}"
    if cut_off:
        message += " (the reply ends inside it: cut off?)"
    elif ("[" if kind is list else "{") not in text:
        message = f"no JSON {what.split()[-1]} in the reply: {message}"
    raise MalformedOutput(message)


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
