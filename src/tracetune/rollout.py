"""Roll out a teacher over a task dataset and keep the trajectories that reach the gold answer.

``tracetune rollout --tasks DIR --teacher gold --out DIR`` replays each task's gold tool
chain with the real tools, through exactly the agent's parsing and execution path (each
gold call is written out as the controller would write it and applied with
``Episode.apply``), with thoughts written from templates. The final answer is computed from
what the tools actually returned (e.g. the calculator's number), so a broken tool or a
program that renders something unreadable shows up as a failed verdict naming the tool
output that diverged. ``--teacher SPEC`` runs a model (any backend) as the controller on
the same tasks and checks its answers the same way.

Output::

    OUT/            trajectories that passed (a Trajectory dataset, SFT-ready)
    OUT/verdicts/   one Verdict per trajectory, passed or not, with its reasons
    OUT/rejected/   the trajectories that failed, for inspection

A rerun skips tasks already done.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import json
import random
import re
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

from tracetune.agent.formats import ActionFormat, get_format, py_literal
from tracetune.agent.loop import Agent
from tracetune.agent.run import trajectory_id
from tracetune.cliflag import CliFlag
from tracetune.errors import ConfigError
from tracetune.inputs import InputError
from tracetune.judge.answers import judge_answer, numbers_equal, numbers_in
from tracetune.models.base import ChatMessage, ChatModel, Generation, Sampling
from tracetune.runner import Drop, MeteredModel, StageResult, run_stage
from tracetune.schema import Action, Step, Task, ToolCall, Trajectory, Verdict
from tracetune.stageoptions import StageOptions
from tracetune.store import AssetStore, Dataset
from tracetune.store.tasks import load_tasks
from tracetune.tools import Tool, load_tools

GOLD = "gold"
STAGE = "rollout"


class RolloutConfig(StageOptions):
    """Configuration of ``tracetune rollout`` (YAML keys are these field names)."""

    tasks: Path = Field(description="Task dataset directory (or JSONL) with gold answers.")
    out: Path = Field(description="Output directory: passing trajectories, verdicts/, rejected/.")
    teacher: str = Field(
        default=GOLD,
        description="'gold' replays the gold tool chains, or a model spec (openai:NAME, "
        "local:PATH).",
    )
    action_format: Literal["json", "code", "tools"] = Field(
        default="json", description="How actions are written."
    )
    tool_modules: Annotated[list[str], CliFlag("--tool-module", "--tool-modules")] = Field(
        default_factory=list,
        description="Python module to import first, which registers tools (repeatable).",
    )
    corpus: Path | None = Field(
        default=None, description="Search corpus for tasks that use search (default: the task's)."
    )
    require_tools: bool = Field(
        default=True,
        description="Model teachers must call every tool of the gold chain (no answering blind).",
    )
    keep_rejected: bool = Field(
        default=True, description="Write failed trajectories to OUT/rejected."
    )
    seed: int = Field(default=0, description="Seed of the gold teacher's thought templates.")
    samples: int = Field(default=1, ge=1, description="Trajectories per task (model teachers).")
    max_steps: int = Field(default=10, ge=1, description="Step budget per model episode.")
    max_errors: int = Field(default=3, ge=1, description="Failed steps allowed per episode.")
    temperature: float = Field(default=0.0, ge=0, description="Sampling temperature.")
    max_tokens: int = Field(default=512, ge=1, description="Max new tokens per step.")


# -- thoughts ------------------------------------------------------------------------------
FIRST = [
    "To answer this I first need to {purpose}.",
    "First, I will {purpose}.",
    "Let me start: I need to {purpose}.",
    "The question needs information from {target}, so I will {purpose}.",
]
NEXT = [
    "The {prev} output gives me what I need. Next I will {purpose}.",
    "Now that I have the {prev} result, I will {purpose}.",
    "Good. The next step is to {purpose}.",
    "With that information I can {purpose}.",
]
TOOL_NOTE = ["", " I'll use {tool}.", " {tool} does this.", " Calling {tool}."]
FINAL = [
    "The {prev} output shows {shown}, so the answer is {answer}.",
    "{shown_cap} is what {prev} returned. That answers the question: {answer}.",
    "From the {prev} result ({shown}), the answer is {answer}.",
]
THOUGHTS_HASH = hashlib.sha256(json.dumps([FIRST, NEXT, TOOL_NOTE, FINAL]).encode()).hexdigest()[
    :16
]
"""Recorded on gold trajectories, like a prompt hash: which templates wrote the thoughts."""


def _target(call: ToolCall) -> str:
    for key in ("image", "path"):
        if isinstance(call.arguments.get(key), str):
            return str(call.arguments[key])
    return "the inputs"


class Thoughts:
    """Thoughts for a gold trajectory, drawn from the templates with a per-task seed."""

    def __init__(self, seed: int, task_id: str) -> None:
        digest = hashlib.sha256(f"{seed}|{task_id}".encode()).digest()
        self.rng = random.Random(int.from_bytes(digest[:8], "big"))

    def step(self, index: int, call: ToolCall, purpose: str, prev: ToolCall | None) -> str:
        purpose = purpose or f"call {call.name}"
        template = self.rng.choice(FIRST if prev is None else NEXT)
        text = template.format(
            purpose=purpose, target=_target(call), prev=prev.name if prev else ""
        )
        return text + self.rng.choice(TOOL_NOTE).format(tool=call.name)

    def final(self, prev: ToolCall | None, shown: str, answer: str) -> str:
        shown = _short(shown)
        template = self.rng.choice(FINAL)
        return template.format(
            prev=prev.name if prev else "tool",
            shown=shown,
            shown_cap=shown[:1].upper() + shown[1:],
            answer=answer,
        )


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# -- checking tool outputs against what the program rendered -------------------------------
def _thousands(text: str) -> str:
    return re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)


def _pattern(expected: str) -> re.Pattern[str]:
    """``expected`` with flexible spacing, digits not glued to other digits."""
    tokens = [re.escape(t) for t in _thousands(expected).split()]
    body = r"\s*".join(tokens)
    head = r"(?<![\d.])" if expected[:1].isdigit() else ""
    tail = r"(?![\d])" if expected[-1:].isdigit() else ""
    return re.compile(head + body + tail, re.I)


def find_value(text: str, expected: str) -> str | None:
    """``expected`` as it appears in a tool's output (None when it does not)."""
    match = _pattern(expected).search(_thousands(text))
    return " ".join(match.group(0).split()) if match else None


def closest_read(text: str, expected: str) -> str | None:
    """What the output holds that looks most like ``expected`` (for verdict messages)."""
    words = _thousands(text).split()
    n = max(1, len(expected.split()))
    grams = {" ".join(words[i : i + n]) for i in range(max(0, len(words) - n + 1))}
    close = difflib.get_close_matches(_thousands(expected), sorted(grams), n=1, cutoff=0.5)
    return close[0] if close else None


def observed_count(step: Step) -> int | None:
    """How many items a step's tool returned (e.g. faces), from its data or its text."""
    obs = step.observation
    if obs is None:
        return None
    data = obs.data
    if isinstance(data, dict):
        if isinstance(data.get("count"), int):
            return int(data["count"])
        for value in data.values():
            if isinstance(value, list):
                return len(value)
    if isinstance(data, list):
        return len(data)
    # JSON or a printed dict (code actions), else a sentence like "3 faces found"
    m = re.search(r"[\"']count[\"']\s*:\s*(\d+)", obs.text) or re.search(
        r"\b(\d+)\s+\w+\s+found", obs.text
    )
    if m:
        return int(m.group(1))
    return 0 if re.search(r"\bno \w+ found\b", obs.text) else None


def divergences(
    index: int, call: ToolCall, note: dict[str, Any], step: Step, tolerance: float | None
) -> list[str]:
    """Where a gold step's actual output differs from what the program put in the inputs."""
    where = f"step {index} ({call.name})"
    if step.error is not None:
        return [f"{where} failed: {step.error.kind.value}: {step.error.message}"]
    text = step.observation.text if step.observation else ""
    reasons = []
    source = note.get("expect_source") or _target(call)
    for expected in note.get("expect") or []:
        if find_value(text, expected) is None:
            near = closest_read(text, expected)
            seen = f"; closest read: {near!r}" if near else "; nothing similar in its output"
            reasons.append(f"{where} output lacks {expected!r}, which {source} holds{seen}")
    want = note.get("expect_number")
    if want is not None:
        got = [n.value for n in numbers_in(text)]
        if not any(numbers_equal(g, float(want), tolerance or 1e-6) for g in got):
            reasons.append(f"{where} returned {_short(text, 40)!r} where {want:g} was expected")
    count = note.get("expect_count")
    if count is not None:
        found = observed_count(step)
        if found != count:
            reasons.append(
                f"{where} found {found if found is not None else 'no'} item(s) where "
                f"{source} has {count}"
            )
    return reasons


def answer_from_outputs(recipe: dict[str, Any], steps: list[Step]) -> tuple[str | None, str]:
    """The final answer the recipe derives from the executed steps, and what it was read from."""
    op = recipe.get("op")

    def text_of(i: int) -> str:
        step = steps[i] if i < len(steps) else None
        return step.observation.text if step and step.observation and not step.error else ""

    if op == "number":
        numbers = numbers_in(text_of(recipe["step"]))
        if not numbers:
            return None, "no number"
        value = numbers[0].value
        return (f"{value:.10g}", f"{value:.10g}")
    if op == "text":
        text = text_of(recipe["step"])
        found = find_value(text, recipe["value"])
        if found is not None:
            return found, found
        near = closest_read(text, recipe["value"])
        return near, near or "nothing"
    if op == "count":
        i = recipe["step"]
        count = observed_count(steps[i]) if i < len(steps) else None
        return (None, "no count") if count is None else (str(count), f"{count} found")
    if op in ("argmax", "argmin"):
        values = []
        for i in recipe["steps"]:
            numbers = numbers_in(text_of(i))
            if not numbers:
                return None, f"no number from step {i}"
            values.append(numbers[0].value)
        pick = (max if op == "argmax" else min)(range(len(values)), key=values.__getitem__)
        shown = " vs ".join(f"{v:.10g}" for v in values)
        return recipe["labels"][pick], shown
    if op == "given":
        return recipe.get("value"), "the question"
    raise ValueError(f"unknown answer recipe {recipe!r}")


# -- the gold teacher ----------------------------------------------------------------------
class _Replay(ChatModel):
    """Stands in for a controller model: the gold teacher writes every step itself."""

    spec = GOLD

    async def generate(
        self,
        messages: list[ChatMessage],
        *,
        n: int = 1,
        sampling: Sampling = Sampling(),  # noqa: B008
        tools: list[dict[str, Any]] | None = None,
    ) -> Generation:
        raise RuntimeError("the gold teacher writes its own steps; it never samples a model")


_PRODUCED = re.compile(r"^(?P<tool>\w+)_step(?P<step>\d+)_(?P<i>\d+)\.png$")
_VARS = {
    "ocr": "text",
    "calculator": "result",
    "face_detection": "faces",
    "image_crop": "crop",
    "image_zoom": "zoom",
    "search": "hits",
    "inspect_file": "document",
}


def code_for(call: ToolCall, index: int, variables: dict[int, str]) -> str:
    """A gold call as Python for the code action format: assign, then print the result.

    Arguments naming an image an earlier step produced (``image_crop_step1_0.png``) become
    that step's variable, as a solver writing code would use them.
    """
    args = []
    for key, value in call.arguments.items():
        m = _PRODUCED.match(value) if isinstance(value, str) else None
        if m and int(m.group("step")) in variables:
            args.append(f"{key}={variables[int(m.group('step'))]}")
        else:
            args.append(f"{key}={py_literal(value)}")
    name = f"{_VARS.get(call.name, call.name)}_{index}"
    variables[index] = name
    return f"{name} = {call.name}({', '.join(args)})\nprint({name})"


def resolve_produced(call: ToolCall, steps: list[Step]) -> ToolCall:
    """Point references to images produced by earlier steps at the names they really got."""
    arguments = dict(call.arguments)
    for key, value in call.arguments.items():
        m = _PRODUCED.match(value) if isinstance(value, str) else None
        if not m or int(m.group("step")) >= len(steps):
            continue
        obs = steps[int(m.group("step"))].observation
        i = int(m.group("i"))
        if obs is not None and i < len(obs.images):
            arguments[key] = obs.images[i].name
    return ToolCall(name=call.name, arguments=arguments, id=call.id)


class GoldTeacher:
    """Replays gold tool chains with the real tools and checks every output on the way."""

    def __init__(self, tools: list[Tool], action_format: str = "json", seed: int = 0) -> None:
        self.tools = tools
        self.fmt: ActionFormat = get_format(action_format)
        self.seed = seed
        if action_format == "code":
            _require_code_executor()

    async def run(
        self,
        task: Task,
        source: AssetStore,
        assets: AssetStore,
        tool_options: dict[str, Any],
        trajectory_id: str,
    ) -> tuple[Trajectory, Verdict]:
        if not task.gold_chain or task.gold is None:
            raise ValueError(f"task {task.id} has no gold chain and answer to replay")
        notes = task.metadata.get("gold_steps") or [{} for _ in task.gold_chain]
        recipe = task.metadata.get("answer_from")
        if recipe is None:
            raise ValueError(f"task {task.id} has no metadata['answer_from'] recipe")
        agent = Agent(
            _Replay(),
            self.tools,
            self.fmt.name,
            max_steps=len(task.gold_chain) + 1,
            tool_options=tool_options,
        )
        started_at, t0 = time.time(), time.monotonic()
        thoughts = Thoughts(self.seed, task.id)
        problems: list[str] = []
        episode = await agent.start(task, source, assets)
        variables: dict[int, str] = {}
        prev: ToolCall | None = None
        try:
            for i, gold_call in enumerate(task.gold_chain):
                note = notes[i] if i < len(notes) else {}
                thought = thoughts.step(i, gold_call, note.get("purpose", ""), prev)
                if self.fmt.name == "json":
                    call = resolve_produced(gold_call, episode.steps)
                    raw = self.fmt.render(thought, Action(type="tool_call", tool_call=call))
                else:
                    code = code_for(gold_call, i, variables)
                    raw = self.fmt.render(thought, Action(type="code", code=code))
                step = await episode.apply(raw)
                problems += divergences(i, gold_call, note, step, task.gold.tolerance)
                prev = gold_call
            answer, shown = answer_from_outputs(recipe, episode.steps)
            final = answer if answer is not None else "unknown"
            thought = thoughts.final(prev, shown, final)
            await episode.apply(self.fmt.render(thought, Action(type="final_answer", answer=final)))
        finally:
            await episode.close()
        trajectory = Trajectory(
            id=trajectory_id,
            task=task,
            controller=GOLD,
            action_format=self.fmt.name,
            tools=[t.name for t in agent.tools],
            steps=episode.steps,
            final_answer=episode.final_answer,
            status="completed" if episode.final_answer is not None else "failed",
            started_at=started_at,
            duration_s=time.monotonic() - t0,
            prompt_hash=self.fmt.prompt_hash,
            metadata={"teacher": GOLD, "thoughts_hash": THOUGHTS_HASH},
        )
        verdict = judge_answer(trajectory, judge=GOLD)
        if problems:
            verdict.passed = False
            verdict.score = 0.0
            verdict.reasons = problems + verdict.reasons
            verdict.details["diverged"] = problems
        return trajectory, verdict


def _require_code_executor() -> None:
    try:
        importlib.import_module("tracetune.agent.code")
    except ModuleNotFoundError as exc:
        if exc.name != "tracetune.agent.code":
            raise
        raise ConfigError(
            "the code action format needs the sandboxed code executor "
            "(tracetune.agent.code), which this installation does not have; "
            "use --action-format json"
        ) from None


# -- checks for model teachers -------------------------------------------------------------
def called_tools(trajectory: Trajectory) -> set[str]:
    """Tools a trajectory called: JSON tool calls, or tool names called in its code."""
    names: set[str] = set()
    for step in trajectory.steps:
        action = step.action
        if action is None or step.error is not None:
            continue
        if action.type == "tool_call" and action.tool_call is not None:
            names.add(action.tool_call.name)
        elif action.type == "code" and action.code:
            names.update(re.findall(r"\b([A-Za-z_]\w*)\s*\(", action.code))
    return names


def check_trajectory(trajectory: Trajectory, judge: str, require_tools: bool) -> Verdict:
    """The answer check, plus (optionally) that the gold chain's tools were used."""
    verdict = judge_answer(trajectory, judge=judge)
    if require_tools:
        needed = sorted({c.name for c in trajectory.task.gold_chain} - {"final_answer"})
        missing = [name for name in needed if name not in called_tools(trajectory)]
        if missing:
            verdict.passed = False
            verdict.score = 0.0
            verdict.reasons = [
                f"never called {', '.join(missing)}, which the task needs "
                "(an answer without the tools is a guess)"
            ] + verdict.reasons
            verdict.details["missing_tools"] = missing
    return verdict


def _drop_reason(verdict: Verdict) -> str:
    if verdict.details.get("diverged"):
        first = verdict.details["diverged"][0]
        m = re.match(r"step \d+ \((\w+)\)", first)
        return f"tool output diverged ({m.group(1) if m else 'tool'})"
    if verdict.details.get("missing_tools"):
        return "did not use the tools"
    if verdict.details.get("prediction") is None:
        return "no final answer"
    return "wrong answer"


# -- the stage -----------------------------------------------------------------------------
def task_tool_options(task: Task, config: RolloutConfig) -> dict[str, Any]:
    """Per-task tool settings: the search corpus a program's task was written against."""
    options: dict[str, Any] = {}
    corpus = config.corpus
    if corpus is None and task.metadata.get("search_corpus"):
        from tracetune.synth.programs.retrieval import resolve_corpus

        corpus = resolve_corpus(str(task.metadata["search_corpus"]))
    if corpus is not None:
        options["search"] = {"corpus": str(corpus)}
    return options


async def run_rollout(
    config: RolloutConfig, model: ChatModel | None = None, progress: bool = True
) -> tuple[StageResult, Dataset[Trajectory]]:
    """Roll out the teacher over the tasks; write passing trajectories, verdicts, rejects."""
    out: Dataset[Trajectory] = Dataset.create(config.out, Trajectory)
    tasks, source = load_tasks(config.tasks, out.assets)
    tasks = [t for t in tasks if t.gold is not None]
    if not tasks:
        raise InputError(f"{config.tasks} has no tasks with a gold answer to check against")
    if config.limit:
        tasks = tasks[: config.limit]
    gold = config.teacher == GOLD
    if gold:
        missing = [t.id for t in tasks if not t.gold_chain]
        if missing:
            raise InputError(
                f"{len(missing)} task(s) have no gold tool chain (e.g. {missing[0]}); the gold "
                "teacher replays chains written by task programs (tracetune tasks programs)"
            )
    names = sorted({n for t in tasks for n in t.tools} | {"final_answer"})
    tools = load_tools(names, config.tool_modules)
    rejected: Dataset[Trajectory] | None = (
        Dataset.create(out.root / "rejected", Trajectory) if config.keep_rejected else None
    )
    controller = GOLD if gold else (model.spec if model else config.teacher)
    samples = 1 if gold else config.samples
    items = [(task, s) for task in tasks for s in range(samples)]

    def key(item: tuple[Task, int]) -> str:
        return trajectory_id(item[0], controller, config.action_format, item[1])

    teacher_model: ChatModel | None = None
    agents: dict[str, Agent] = {}
    teacher: GoldTeacher | None = None
    if gold:
        teacher = GoldTeacher(tools, config.action_format, config.seed)
    else:
        from tracetune.models.base import load_model

        loaded = model or load_model(config.teacher, config.backend.for_stage(config.concurrency))
        teacher_model = MeteredModel(loaded, out.state, STAGE)

    def agent_for(options: dict[str, Any]) -> Agent:
        k = json.dumps(options, sort_keys=True)
        if k not in agents:
            assert teacher_model is not None
            agents[k] = Agent(
                teacher_model,
                tools,
                config.action_format,
                config.max_steps,
                config.max_errors,
                Sampling(
                    temperature=config.temperature,
                    max_tokens=config.max_tokens,
                    stop=("\nObservation:",),
                ),
                tool_options=options,
            )
        return agents[k]

    reject_writer = rejected.writer(chunk_size=16) if rejected is not None else None

    async def process(item: tuple[Task, int]) -> Trajectory | Drop:
        task, sample = item
        options = task_tool_options(task, config)
        if teacher is not None:
            trajectory, verdict = await teacher.run(task, source, out.assets, options, key(item))
        else:
            agent = agent_for(options)
            trajectory = await agent.run(
                task, source, out.assets, key(item), sampling=agent.sampling.for_sample(sample)
            )
            verdict = check_trajectory(trajectory, controller, config.require_tools)
        verdict.details["task_id"] = task.id
        verdict.details["family"] = task.metadata.get("family")
        trajectory.metadata["verdict"] = verdict.model_dump(mode="json")
        if verdict.passed:
            return trajectory
        if reject_writer is not None:
            reject_writer.write(trajectory, sources=[out.assets, source])
        return Drop(_drop_reason(verdict), {"verdict": verdict.model_dump(mode="json")})

    try:
        result = await run_stage(
            STAGE,
            items,
            key=key,
            process=process,
            out=out,
            concurrency=config.concurrency,
            budget=config.budget(),
            sources=[source],
            progress=progress,
            total=len(items),
        )
    finally:
        if reject_writer is not None:
            reject_writer.close()
        if teacher_model is not None:
            await teacher_model.aclose()
    collect_verdicts(out)
    return result, out


def collect_verdicts(out: Dataset[Trajectory]) -> Dataset[Verdict]:
    """Write OUT/verdicts from the stage's state and the kept trajectories (idempotent)."""
    verdicts: Dataset[Verdict] = Dataset.create(out.root / "verdicts", Verdict)
    found: list[Verdict] = []
    for _, status, info in out.state.items(STAGE):
        if status == "dropped" and isinstance(info.get("verdict"), dict):
            found.append(Verdict.model_validate(info["verdict"]))
    for trajectory in out:
        if isinstance(trajectory.metadata.get("verdict"), dict):
            found.append(Verdict.model_validate(trajectory.metadata["verdict"]))
    found.sort(key=lambda v: v.id)
    verdicts.write_all(found)
    return verdicts


def rollout_summary(out: Dataset[Trajectory]) -> dict[str, Any]:
    """Pass rate overall and per task family, and the most common failure reasons."""
    verdicts = Dataset.open(out.root / "verdicts", Verdict)
    by_family: dict[str, list[int]] = {}
    reasons: dict[str, int] = {}
    total = passed = 0
    for verdict in verdicts:
        family = str(verdict.details.get("family") or "?")
        stats = by_family.setdefault(family, [0, 0])
        stats[0] += verdict.passed
        stats[1] += 1
        total += 1
        passed += verdict.passed
        if not verdict.passed:
            reasons[verdict.reasons[0] if verdict.reasons else "?"] = (
                reasons.get(verdict.reasons[0] if verdict.reasons else "?", 0) + 1
            )
    return {
        "passed": passed,
        "total": total,
        "pass_rate": passed / total if total else 0.0,
        "by_family": {
            f: {"passed": p, "total": n, "pass_rate": round(p / n, 4)}
            for f, (p, n) in sorted(by_family.items())
        },
        "failures": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
    }


__all__ = [
    "GOLD",
    "GoldTeacher",
    "RolloutConfig",
    "Thoughts",
    "answer_from_outputs",
    "check_trajectory",
    "collect_verdicts",
    "divergences",
    "rollout_summary",
    "run_rollout",
]
