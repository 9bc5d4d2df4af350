"""The task program interface: a seeded generator of a task whose answer and tool chain are
known by construction.

A program is a function ``(rng: random.Random) -> TaskDraft`` registered by name::

    from tracetune.synth.programs import GoldStep, TaskDraft, number_of, program

    @program("sticky_note", tools=["ocr", "calculator"])
    def sticky_note(rng: random.Random) -> TaskDraft:
        \"\"\"A sticky note with two numbers; the task asks for their product.\"\"\"
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        image = ...  # render "a x b" with PIL
        return TaskDraft(
            query="Multiply the two numbers written on the note.",
            files=[ProgramFile("note.png", png_bytes(image))],
            steps=[
                GoldStep("ocr", {"image": "note.png"}, "read the two numbers",
                         expect=[str(a), str(b)]),
                GoldStep("calculator", {"expression": f"{a}*{b}"}, "multiply them",
                         expect=[str(a * b)]),
            ],
            answer=GoldAnswer(value=str(a * b), kind="number"),
            answer_from=number_of(1),
        )

Everything random must come from ``rng`` (or a numpy Generator seeded from it): the same
seed must give the same bytes, so datasets are reproducible and task ids stable. Import the
module that defines the program before generating (``--programs-module my_pkg.programs``).

The gold chain is what a correct solver does. ``expect`` lists what each tool's output must
show (strings rendered into the inputs, or how many items it must find); the gold rollout
checks them, so a tool that misreads an input is named in the verdict. ``answer_from`` says
how the final answer follows from the executed outputs (e.g. the calculator's number), so
the gold trajectory's answer really comes from the tools.
"""

from __future__ import annotations

import hashlib
import importlib
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tracetune.errors import TracetuneError
from tracetune.schema import GoldAnswer, Provenance, Task, ToolCall
from tracetune.store import AssetStore

PROGRAM_SOURCE_PREFIX = "program:"


class ProgramError(TracetuneError, ValueError):
    """A program is unknown, or drew a task that breaks the interface's rules."""


@dataclass
class ProgramFile:
    """An image or file a task comes with, rendered in memory."""

    name: str
    data: bytes
    description: str | None = None


@dataclass
class GoldStep:
    """One call of the gold tool chain and what its output must show."""

    tool: str
    arguments: dict[str, Any]
    purpose: str = ""
    """Why the call is made, in a few words ('read the prices'); thoughts are built on it."""
    expect: list[str] = field(default_factory=list)
    """Strings rendered into the inputs that the output must contain (e.g. prices)."""
    expect_number: float | None = None
    """The number the output must show (e.g. the calculator's result), within the gold
    answer's tolerance."""
    expect_count: int | None = None
    """How many items (e.g. detected faces) the output must hold."""
    expect_source: str | None = None
    """Where the expected strings come from, for verdict messages (e.g. 'receipt.png')."""


# -- answer recipes: how the final answer follows from the executed tool outputs -----------
def number_of(step: int) -> dict[str, Any]:
    """The answer is the number that gold step ``step`` printed (e.g. the calculator's)."""
    return {"op": "number", "step": step}


def text_in(step: int, value: str) -> dict[str, Any]:
    """The answer is ``value`` as it appears in gold step ``step``'s output."""
    return {"op": "text", "step": step, "value": value}


def count_of(step: int) -> dict[str, Any]:
    """The answer is how many items (e.g. boxes) gold step ``step`` returned."""
    return {"op": "count", "step": step}


def label_of_max(steps: list[int], labels: list[str], largest: bool = True) -> dict[str, Any]:
    """The answer is the label of the step whose number is the largest (or smallest)."""
    if len(steps) != len(labels) or len(steps) < 2:
        raise ProgramError("label_of_max needs one label per step, and at least two steps")
    return {"op": "argmax" if largest else "argmin", "steps": steps, "labels": labels}


@dataclass
class TaskDraft:
    """What a program returns: a task before its files are stored."""

    query: str
    files: list[ProgramFile]
    steps: list[GoldStep]
    answer: GoldAnswer
    answer_from: dict[str, Any]
    variant: str = "default"
    difficulty: int = 1
    tools: list[str] | None = None
    """Tools the agent may use; defaults to the program's tools."""
    metadata: dict[str, Any] = field(default_factory=dict)


ProgramFn = Callable[[random.Random], TaskDraft]


@dataclass(frozen=True)
class TaskProgram:
    """A registered task family."""

    name: str
    fn: ProgramFn
    tools: tuple[str, ...]
    description: str
    version: int = 1

    def draft(self, seed: int) -> TaskDraft:
        """Draw the instance for ``seed`` and check it against the interface's rules."""
        draft = self.fn(random.Random(seed))
        check_draft(self, draft)
        return draft

    def task(self, seed: int, assets: AssetStore) -> Task:
        """The task for ``seed``, its files stored in ``assets``."""
        return build_task(self, seed, self.draft(seed), assets)


_REGISTRY: dict[str, TaskProgram] = {}
_NAME = re.compile(r"[a-z][a-z0-9_]*")


def program(name: str, *, tools: list[str], version: int = 1) -> Callable[[ProgramFn], ProgramFn]:
    """Register ``fn`` as the task program ``name``; its docstring is its description.

    Bump ``version`` when a change alters what a seed draws: task ids include it, so old and
    new tasks never share an id.
    """
    if not _NAME.fullmatch(name):
        raise ProgramError(f"program name {name!r} must be lowercase letters, digits and _")
    if not tools:
        raise ProgramError(f"program {name!r} must name the tools its tasks need")

    def wrap(fn: ProgramFn) -> ProgramFn:
        paragraph = (fn.__doc__ or "").strip().split("\n\n")[0]
        _REGISTRY[name] = TaskProgram(
            name=name,
            fn=fn,
            tools=tuple(tools),
            description=" ".join(paragraph.split()) or name,
            version=version,
        )
        return fn

    return wrap


def _load_builtins() -> None:
    importlib.import_module("tracetune.synth.programs.families")


def load_program_modules(modules: list[str]) -> None:
    """Import user modules that register programs with ``@program``."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            raise ProgramError(
                f"cannot import program module {module!r} ({exc}); it must be importable "
                "from the current Python path"
            ) from None


def registered_programs() -> dict[str, TaskProgram]:
    _load_builtins()
    return dict(sorted(_REGISTRY.items()))


def get_program(name: str) -> TaskProgram:
    _load_builtins()
    if name not in _REGISTRY:
        raise ProgramError(
            f"unknown task program {name!r}; known: {', '.join(sorted(_REGISTRY))}. "
            "Register your own with @program and pass its module with --programs-module"
        )
    return _REGISTRY[name]


def task_seed(seed: int, index: int) -> int:
    """The seed of the ``index``-th task of a run seeded with ``seed`` (fits in int64)."""
    digest = hashlib.sha256(f"tracetune-programs:{seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def program_task_id(name: str, seed: int, version: int) -> str:
    digest = hashlib.sha256(f"{name}|{version}|{seed}".encode()).hexdigest()[:16]
    return f"prog-{name}-{digest}"


def check_draft(prog: TaskProgram, draft: TaskDraft) -> None:
    """Reject drafts that break the rules, naming the program and what is wrong."""

    def bad(why: str) -> ProgramError:
        return ProgramError(f"program {prog.name!r} drew an invalid task: {why}")

    if not draft.query.strip():
        raise bad("empty query")
    names = [f.name for f in draft.files]
    if len(set(names)) != len(names):
        raise bad(f"duplicate file names {names}")
    tools = draft.tools if draft.tools is not None else list(prog.tools)
    for i, step in enumerate(draft.steps):
        if step.tool not in tools:
            raise bad(f"gold step {i} calls {step.tool!r}, which is not in its tools {tools}")
    recipe = draft.answer_from
    steps = recipe.get("steps", [recipe.get("step")])
    if recipe.get("op") not in ("number", "text", "count", "argmax", "argmin", "given"):
        raise bad(f"unknown answer recipe {recipe!r}")
    if recipe.get("op") != "given" and not all(
        isinstance(s, int) and 0 <= s < len(draft.steps) for s in steps
    ):
        raise bad(f"answer recipe {recipe!r} refers to a step outside the chain")
    if draft.answer.kind == "number":
        try:
            float(draft.answer.value)
        except ValueError:
            raise bad(f"numeric answer {draft.answer.value!r} is not a number") from None


def build_task(prog: TaskProgram, seed: int, draft: TaskDraft, assets: AssetStore) -> Task:
    """Store the draft's files and assemble the ``Task`` record."""
    refs = [assets.put_bytes(f.data, f.name, description=f.description) for f in draft.files]
    gold_steps = [
        {
            "purpose": s.purpose,
            "expect": list(s.expect),
            "expect_number": s.expect_number,
            "expect_count": s.expect_count,
            "expect_source": s.expect_source,
        }
        for s in draft.steps
    ]
    metadata = {
        "family": prog.name,
        "variant": draft.variant,
        "difficulty": draft.difficulty,
        "gold_steps": gold_steps,
        "answer_from": draft.answer_from,
        **draft.metadata,
    }
    return Task(
        id=program_task_id(prog.name, seed, prog.version),
        query=draft.query,
        files=refs,
        tools=list(draft.tools if draft.tools is not None else prog.tools),
        gold=draft.answer,
        gold_chain=[ToolCall(name=s.tool, arguments=dict(s.arguments)) for s in draft.steps],
        provenance=Provenance(
            source=PROGRAM_SOURCE_PREFIX + prog.name,
            seed=seed,
            extra={"program_version": prog.version},
        ),
        metadata=metadata,
    )
