"""RR and ORR renderings as ``Dialogue`` records, and the parser that reads RR back.

RR is rendered from the structured ``Rationale``; ORR is derived from the RR dialogue's
messages alone (``orr_from_rr`` parses them with the grammar), so ORR is a deterministic
function of RR: same RR bytes in, same ORR bytes out. ORR keeps every thought in order,
reflection included, inlines every operator call with its result and leaves RAG results out.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

from tracetune.engine.grammar import (
    GrammarError,
    ParsedStep,
    closing_turn,
    no_results_turn,
    orr_assistant_text,
    orr_user_text,
    parse_results,
    parse_step,
    reflect_turn,
    render_step,
    results_turn,
)
from tracetune.engine.trace import RAG, Rationale
from tracetune.prompts import render
from tracetune.schema import Dialogue, FileRef, Message, Provenance, Task


@cache
def mmat_prompt_hash() -> str:
    """One hash over every MMAT prompt template: any prompt change changes it."""
    root = resources.files("tracetune.prompts").joinpath("mmat")
    digest = hashlib.sha256()
    for entry in sorted(root.iterdir(), key=lambda p: p.name):
        if entry.name.endswith(".jinja"):
            digest.update(entry.name.encode() + b"\0" + entry.read_bytes())
    return digest.hexdigest()[:16]


def rr_system_prompt(operators: list[str], rag: bool) -> str:
    return render("mmat/rr_system.jinja", operators=operators, rag=rag)


def orr_system_prompt() -> str:
    return render("mmat/orr_system.jinja")


def _text(role: str, text: str) -> Message:
    return Message.of(role, text)


def rr_messages(task: Task, rationale: Rationale, operators: list[str], rag: bool) -> list[Message]:
    """The RR conversation of a rationale (system, question, steps, results, answer)."""
    messages = [
        _text("system", rr_system_prompt(operators, rag)),
        Message.of("user", rationale.question, task.images),
    ]
    last = len(rationale.steps) - 1
    for i, step in enumerate(rationale.steps):
        thought, signal = step.thought, step.signal
        reflection = rationale.reflection if i == last else None
        if reflection is not None:
            # The flagged final step becomes the turn that says its reasoning is insufficient.
            thought, signal = f"{thought}\n{reflection.critique}", "reflection"
        names = [op.name for op in step.operators]
        query = step.rag.query if step.rag is not None else None
        messages.append(_text("assistant", render_step(thought, names, query, signal)))
        if signal == "continue":
            results = [(op.name, op.result) for op in step.operators]
            if step.rag is not None:
                results.append((RAG, step.rag.result))
            messages.append(_text("user", results_turn(results) if results else no_results_turn()))
        elif reflection is not None:
            messages.append(_text("user", reflect_turn()))
            messages.append(_text("assistant", render_step(reflection.derivation, [], None, "end")))
    messages.append(_text("user", closing_turn(rationale.question)))
    messages.append(_text("assistant", rationale.answer))
    return messages


def rr_dialogue_id(task_id: str) -> str:
    return f"rr-{task_id}"


def rr_dialogue(
    task: Task,
    rationale: Rationale,
    operators: list[str],
    rag: bool,
    provenance: Provenance,
    metadata: dict[str, object] | None = None,
) -> Dialogue:
    meta: dict[str, object] = {
        "rationale": rationale.model_dump(mode="json"),
        "operators": operators,
        "rag": rag,
        "reflected": rationale.reflection is not None,
    }
    meta.update(metadata or {})
    return Dialogue(
        id=rr_dialogue_id(task.id),
        task=task,
        format="rr",
        messages=rr_messages(task, rationale, operators, rag),
        provenance=provenance,
        metadata=meta,
    )


# -- parsing RR back --------------------------------------------------------------------------
@dataclass
class ParsedRRStep:
    step: ParsedStep
    results: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class ParsedRR:
    system: str | None
    question: str
    images: list[FileRef]
    steps: list[ParsedRRStep]
    answer: str

    @property
    def reflected(self) -> bool:
        return any(s.step.signal == "reflection" for s in self.steps)

    def thoughts(self) -> list[str]:
        return [s.step.thought for s in self.steps]


def parse_rr(dialogue: Dialogue) -> ParsedRR:
    """Parse an RR dialogue's messages with the grammar; raises ``GrammarError`` naming the
    turn that does not fit."""
    msgs = list(dialogue.messages)
    where = f"dialogue {dialogue.id}"
    system = None
    if msgs and msgs[0].role == "system":
        system = msgs.pop(0).text
    if not msgs or msgs[0].role != "user":
        raise GrammarError(f"{where}: the first turn after the system prompt must be the user's")
    first = msgs.pop(0)
    question = first.text
    images = [p.image for p in first.content if p.type == "image" and p.image is not None]
    steps: list[ParsedRRStep] = []
    turn = 1
    while True:
        if len(msgs) < 2:
            raise GrammarError(f"{where}: ends before the closing question and short answer")
        assistant, user = msgs.pop(0), msgs.pop(0)
        turn += 2
        if assistant.role != "assistant" or user.role != "user":
            raise GrammarError(f"{where}: turns {turn - 1}-{turn} must be assistant then user")
        try:
            step = parse_step(assistant.text)
        except GrammarError as exc:
            raise GrammarError(f"{where}, turn {turn - 1}: {exc}") from None
        parsed = ParsedRRStep(step)
        steps.append(parsed)
        if step.signal == "continue":
            expected = step.operators + ([RAG] if step.rag else [])
            if expected:
                parsed.results = parse_results(user.text)
                got = [name for name, _ in parsed.results]
                if got != expected or user.text != results_turn(parsed.results):
                    raise GrammarError(
                        f"{where}, turn {turn}: expected the results of {', '.join(expected)}, "
                        f"got {', '.join(got) or 'none'}"
                    )
            elif user.text != no_results_turn():
                raise GrammarError(f"{where}, turn {turn}: expected the no-results turn")
        elif step.signal == "reflection":
            if user.text != reflect_turn():
                raise GrammarError(f"{where}, turn {turn}: expected the reflection request")
        else:
            if user.text != closing_turn(question):
                raise GrammarError(f"{where}, turn {turn}: expected the closing question")
            break
    if len(msgs) != 1 or msgs[0].role != "assistant":
        raise GrammarError(f"{where}: must end with exactly one assistant turn (the answer)")
    return ParsedRR(system, question, images, steps, msgs[0].text)


# -- ORR from RR --------------------------------------------------------------------------------
def orr_dialogue_id(rr_id: str) -> str:
    return "orr-" + rr_id.removeprefix("rr-")


def orr_from_rr(dialogue: Dialogue) -> Dialogue:
    """The ORR rendering of an RR dialogue, derived from its messages alone."""
    if dialogue.format != "rr":
        raise GrammarError(f"dialogue {dialogue.id} is {dialogue.format}, not rr")
    parsed = parse_rr(dialogue)
    calls = [(name, text) for s in parsed.steps for name, text in s.results if name != RAG]
    dropped = sum(1 for s in parsed.steps for name, _ in s.results if name == RAG)
    messages = [
        _text("system", orr_system_prompt()),
        Message.of("user", orr_user_text(parsed.question, calls), parsed.images),
        _text("assistant", orr_assistant_text(parsed.thoughts(), parsed.answer)),
    ]
    return Dialogue(
        id=orr_dialogue_id(dialogue.id),
        task=dialogue.task,
        format="orr",
        messages=messages,
        provenance=Provenance(
            source="mmat:orr",
            model=dialogue.provenance.model,
            prompt_hash=mmat_prompt_hash(),
            parent_id=dialogue.id,
        ),
        metadata={
            "derived_from": dialogue.id,
            "operator_calls": [name for name, _ in calls],
            "rag_results_left_out": dropped,
            "reflected": parsed.reflected,
        },
    )
