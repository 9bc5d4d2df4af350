"""The RR and ORR grammars: rendering turns and parsing them back.

RR assistant step::

    <THOUGHT>...</THOUGHT>
    <OPERATOR>ocr, face_detection</OPERATOR>      (optional)
    <RAG>a search query</RAG>                      (optional)
    <SIGNAL>continue|reflection|end</SIGNAL>

RR user turns carry the previous step's results as ``<RESULT name="ocr">...</RESULT>`` blocks
under a one-line header, or say there were none, or ask for reflection, or (last) ask to
summarize and answer. ORR is one user turn (question, then every operator call inlined as
``<|begin_api_invoke|>NAME<|end_api_invoke|><|begin_result_of_api|>RESULT<|end_result_of_api|>``)
and one assistant turn ``<THOUGHT>...</THOUGHT><ANSWER>The answer is: X</ANSWER>``.

Tool outputs are cleaned of these markers when they are produced (``clean_result``), so every
rendering parses back to exactly what was rendered.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from tracetune.engine.trace import Signal
from tracetune.errors import TracetuneError
from tracetune.prompts import render

SIGNALS: tuple[Signal, ...] = ("continue", "reflection", "end")
API_INVOKE = ("<|begin_api_invoke|>", "<|end_api_invoke|>")
API_RESULT = ("<|begin_result_of_api|>", "<|end_result_of_api|>")
ANSWER_PREFIX = "The answer is: "

_STEP = re.compile(
    r"\s*<THOUGHT>(?P<thought>.*?)</THOUGHT>\s*"
    r"(?:<OPERATOR>(?P<operators>.*?)</OPERATOR>\s*)?"
    r"(?:<RAG>(?P<rag>.*?)</RAG>\s*)?"
    r"<SIGNAL>\s*(?P<signal>[a-zA-Z_]+)\s*</SIGNAL>\s*",
    re.DOTALL,
)
_RESULT = re.compile(r'<RESULT name="(?P<name>[^"]+)">\n(?P<text>.*?)\n</RESULT>', re.DOTALL)
_MARKERS = re.compile(
    r"</?(?:THOUGHT|OPERATOR|RAG|SIGNAL|ANSWER|RESULT)\b[^>]*>|<\|(?:begin|end)_[a-z_]+\|>"
)
_ORR_CALL = re.compile(
    re.escape(API_INVOKE[0])
    + r"(?P<name>.*?)"
    + re.escape(API_INVOKE[1])
    + re.escape(API_RESULT[0])
    + r"(?P<text>.*?)"
    + re.escape(API_RESULT[1]),
    re.DOTALL,
)
_ORR_ANSWER = re.compile(
    r"\s*<THOUGHT>(?P<thought>.*?)</THOUGHT>\s*<ANSWER>(?P<answer>.*?)</ANSWER>\s*", re.DOTALL
)


class GrammarError(TracetuneError, ValueError):
    """Text that does not follow the RR/ORR grammar; the message says what is wrong."""


@dataclass
class ParsedStep:
    """An RR assistant step as parsed from text."""

    thought: str
    operators: list[str] = field(default_factory=list)
    rag: str | None = None
    signal: Signal = "continue"


def strip_markers(text: str) -> str:
    """Text with any RR/ORR grammar markers removed, so it cannot break a rendering."""
    return _MARKERS.sub("", text).strip()


def clean_result(text: str) -> str:
    """A tool output as it is shown inside a result block (never empty)."""
    return strip_markers(text) or "(empty result)"


# -- RR assistant steps ----------------------------------------------------------------------
def render_step(thought: str, operators: list[str], rag: str | None, signal: Signal) -> str:
    parts = [f"<THOUGHT>{thought.strip()}</THOUGHT>"]
    if operators:
        parts.append(f"<OPERATOR>{', '.join(operators)}</OPERATOR>")
    if rag:
        parts.append(f"<RAG>{rag.strip()}</RAG>")
    parts.append(f"<SIGNAL>{signal}</SIGNAL>")
    return "\n".join(parts)


def parse_step(text: str, strict: bool = True) -> ParsedStep:
    """Parse an RR assistant step. ``strict=False`` (for model outputs at inference) allows
    text around the step, lower-case tags, ``<OPERATOR>``/``<RAG>`` in either order and
    operators separated by semicolons; the first step of the text is taken."""
    if not strict:
        return _parse_step_loose(text)
    match = _STEP.fullmatch(text)
    if match is None:
        raise GrammarError(
            "expected <THOUGHT>...</THOUGHT>, optional <OPERATOR>...</OPERATOR> and "
            "<RAG>...</RAG>, then <SIGNAL>continue|reflection|end</SIGNAL>"
        )
    for name in ("thought", "operators", "rag"):
        # The lazy groups would otherwise swallow a second step, or a stray tag, whole.
        found = _MARKERS.search(match.group(name) or "")
        if found is not None:
            raise GrammarError(
                f"a grammar tag {found.group(0)} inside the {name} field; one step per turn, "
                "each tag once"
            )
    return _step(
        match.group("thought"), match.group("operators"), match.group("rag"), match.group("signal")
    )


def _parse_step_loose(text: str) -> ParsedStep:
    text = _upper_tags(text)
    thought = re.search(r"<THOUGHT>(.*?)</THOUGHT>", text, re.DOTALL)
    if thought is None:
        raise GrammarError(
            "expected <THOUGHT>...</THOUGHT>, optional <OPERATOR>...</OPERATOR> and "
            "<RAG>...</RAG>, then <SIGNAL>continue|reflection|end</SIGNAL>"
        )
    rest = text[thought.end() :]
    signal = re.search(r"<SIGNAL>\s*([a-zA-Z_]+)\s*</SIGNAL>", rest)
    if signal is None:
        raise GrammarError("the step has a <THOUGHT> but no <SIGNAL>...</SIGNAL>")
    between = rest[: signal.start()]
    ops = re.search(r"<OPERATOR>(.*?)</OPERATOR>", between, re.DOTALL)
    rag = re.search(r"<RAG>(.*?)</RAG>", between, re.DOTALL)
    return _step(
        strip_markers(thought.group(1)),
        strip_markers(ops.group(1)) if ops else None,
        strip_markers(rag.group(1)) if rag else None,
        signal.group(1),
    )


def _step(thought: str, ops_text: str | None, rag: str | None, signal: str) -> ParsedStep:
    signal = signal.lower()
    if signal not in SIGNALS:
        raise GrammarError(f"unknown signal {signal!r}; use continue, reflection or end")
    operators = [o.strip() for o in re.split(r"[,;\n]", ops_text or "") if o.strip()]
    return ParsedStep(thought.strip(), operators, (rag or "").strip() or None, signal)  # type: ignore[arg-type]


def _upper_tags(text: str) -> str:
    return re.sub(
        r"<(/?)(thought|operator|rag|signal|answer)>",
        lambda m: f"<{m.group(1)}{m.group(2).upper()}>",
        text,
        flags=re.IGNORECASE,
    )


# -- RR user turns -----------------------------------------------------------------------------
def results_turn(results: list[tuple[str, str]]) -> str:
    """The user turn after a step with operators or retrieval: a header, then the blocks."""
    names = list(dict.fromkeys(name for name, _ in results))
    blocks = [f'<RESULT name="{name}">\n{text}\n</RESULT>' for name, text in results]
    return render("mmat/rr_results.jinja", names=names) + "\n" + "\n".join(blocks)


def parse_results(text: str) -> list[tuple[str, str]]:
    return [(m.group("name"), m.group("text")) for m in _RESULT.finditer(text)]


def no_results_turn() -> str:
    return render("mmat/rr_no_results.jinja")


def reflect_turn() -> str:
    return render("mmat/rr_reflect.jinja")


def closing_turn(question: str) -> str:
    return render("mmat/rr_closing.jinja", question=question)


# -- ORR ---------------------------------------------------------------------------------------
def orr_user_text(question: str, calls: list[tuple[str, str]]) -> str:
    if not calls:
        return question
    inlined = "\n".join(
        f"{API_INVOKE[0]}{name}{API_INVOKE[1]}{API_RESULT[0]}{text}{API_RESULT[1]}"
        for name, text in calls
    )
    return f"{question}\n\n{inlined}"


def parse_orr_user(text: str) -> tuple[str, list[tuple[str, str]]]:
    """The question and the inlined operator calls of an ORR user turn."""
    start = text.find(API_INVOKE[0])
    if start < 0:
        return text, []
    calls = [(m.group("name"), m.group("text")) for m in _ORR_CALL.finditer(text)]
    return text[:start].rstrip(), calls


def orr_assistant_text(thoughts: list[str], answer: str) -> str:
    joined = "\n".join(t.strip() for t in thoughts if t.strip())
    return f"<THOUGHT>{joined}</THOUGHT><ANSWER>{ANSWER_PREFIX}{answer.strip()}</ANSWER>"


def parse_orr_assistant(text: str, strict: bool = True) -> tuple[str, str]:
    """The thought and the answer of an ORR assistant turn."""
    match = _ORR_ANSWER.fullmatch(text) if strict else _ORR_ANSWER.search(_upper_tags(text))
    if match is None:
        raise GrammarError("expected <THOUGHT>...</THOUGHT><ANSWER>The answer is: X</ANSWER>")
    answer = match.group("answer").strip()
    if answer.startswith(ANSWER_PREFIX.strip()):
        answer = answer[len(ANSWER_PREFIX.strip()) :].strip()
    elif strict:
        raise GrammarError(f"the <ANSWER> must start with {ANSWER_PREFIX.strip()!r}")
    return match.group("thought").strip(), answer
