"""Run a controller on GTA, step by step or end to end, and score it with GTA's own rules.

*Step mode* (tools are not executed): for every gold assistant turn the controller sees the
query, its images and the gold history before that turn (gold tool outputs as
observations) and writes one action. The final turn is asked for the answer without tools
(``prompts/eval/gta_final_turn.jinja``); an output there with no action in it is taken as a
plain-text answer. Elsewhere an output that does not parse, or that calls a tool the query
does not offer, is a message with an ``error`` (it fails InstAcc, as in GTA).

*End-to-end mode*: the controller runs with the GTA toolset (``gta_tools``) on the query
alone, and its episode becomes a GTA dialog. Tools that cannot run here are reported before
the run; queries whose gold chain needs one are scored apart (``gta/e2e/PROTOCOL`` covers
the rest, ``gta/e2e/PROTOCOL/all-queries`` everything), never silently counted as wrong answers.

Both protocols are scored: ``official`` (GTA's evaluator) and ``mat`` (the MAT/MATRIX
substring rule), named apart. Prompts show the tools as the query's ``tools`` metadata
describes them (names, descriptions and inputs from ``dataset.json``).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from tracetune.agent.formats import JsonFormat, ParseError
from tracetune.agent.loop import Agent, Episode, make_executor
from tracetune.agent.render import step_messages, task_message
from tracetune.agent.toolbox import ToolBox
from tracetune.evaluate.adapter import BenchConfig, BenchmarkAdapter, Scored
from tracetune.evaluate.base import ScoringInputError, read_json
from tracetune.evaluate.gta import (
    GTAQuery,
    GTAScorer,
    content_text,
    first_call,
    load_gta_gold,
    load_gta_predictions,
)
from tracetune.evaluate.gta_tools import (
    GTATool,
    ToolStatus,
    episode_tools,
    gta_tool,
    toolset_status,
)
from tracetune.evaluate.runs import (
    EvalRunError,
    Notify,
    RunContext,
    stable_id,
    trajectories_by,
    write_json,
    write_jsonl,
)
from tracetune.inputs import InputError
from tracetune.models.base import ChatMessage, ChatModel
from tracetune.prompts import prompt_hash, render
from tracetune.runner import StageResult
from tracetune.schema import (
    Action,
    ErrorKind,
    FileRef,
    Observation,
    Provenance,
    Step,
    StepError,
    Task,
    ToolCall,
    Trajectory,
)
from tracetune.store import AssetStore

FINAL_TURN_PROMPT = "eval/gta_final_turn.jinja"


class GTAConfig(BenchConfig):
    """Options of ``tracetune eval run gta``."""

    VOLATILE = BenchConfig.VOLATILE | {"embedder"}  # not part of the run's identity
    bench: Literal["gta"] = "gta"
    data: Path | None = Field(
        default=None, description="The folder of GTA's dataset.json and its files."
    )
    mode: Literal["step", "e2e"] = Field(
        default="step",
        description="step (each gold turn predicted from the gold history) or e2e (end to "
        "end, with the GTA toolset).",
    )
    embedder: str = Field(
        default="auto",
        description="Sentence embedder for subjective answers: auto (official "
        "all-mpnet-base-v2 if on disk, else the packaged MiniLM), packaged, or a path.",
    )

    def run_mode(self) -> str | None:
        return self.mode


# -- data ----------------------------------------------------------------------------------
def gta_paths(data: Path | None) -> tuple[Path, Path]:
    """(dataset.json, the folder its file paths are relative to)."""
    if data is None:
        raise EvalRunError("gta needs --data: the folder holding GTA's dataset.json and files")
    path = Path(data)
    if path.is_dir():
        path = path / "dataset.json"
    if not path.is_file():
        raise EvalRunError(f"{path} does not exist; --data is GTA's folder or its dataset.json")
    return path, path.parent


def gta_task(query: GTAQuery, raw: dict[str, Any], root: Path, assets: AssetStore) -> Task:
    """A GTA query as a Task; files keep GTA's relative paths as names (the model uses them)."""
    refs: list[FileRef] = []
    for rel in query.files:
        file = (root / rel).resolve()
        if root.resolve() not in file.parents:
            raise ScoringInputError(f"{query.where}: file path {rel!r} leaves the data folder")
        if not file.is_file():
            raise EvalRunError(
                f"{query.where}: file {rel!r} is not at {file}; GTA's files must sit beside "
                "dataset.json under the paths it names"
            )
        refs.append(assets.put_file(file, name=rel))
    user = next((m for m in query.dialogs if m.get("role") == "user"), None)
    if user is None:
        raise ScoringInputError(f"{query.where}: the dialog has no user message")
    return Task(
        id=f"gta-{query.id}",
        query=content_text(user.get("content")),
        files=refs,
        tools=[str(t.get("name")) for t in raw.get("tools") or []],
        provenance=Provenance(source="import:gta"),
        metadata={"gta_id": query.id, "answer_kind": query.answer_kind},
    )


def _tool_metas(raw: dict[str, Any], where: str) -> list[dict[str, Any]]:
    metas = [t for t in raw.get("tools") or [] if isinstance(t, dict)]
    for meta in metas:
        try:
            gta_tool(str(meta.get("name")))
        except KeyError as exc:
            raise ScoringInputError(f"{where}: {exc.args[0]}") from None
    return metas


# -- GTA messages from our steps -----------------------------------------------------------
def call_message(call: ToolCall, thought: str = "") -> dict[str, Any]:
    return {
        "role": "assistant",
        "thought": thought,
        "tool_calls": [
            {"type": "function", "function": {"name": call.name, "arguments": call.arguments}}
        ],
    }


def trajectory_dialog(trajectory: Trajectory) -> list[dict[str, Any]]:
    """An end-to-end episode as a GTA dialog (user, assistant, tool, ..., assistant)."""
    dialog: list[dict[str, Any]] = [{"role": "user", "content": trajectory.task.query}]
    for step in trajectory.steps:
        action = step.action
        if action is None:
            # No action could be read: an error turn without content, so it never passes for
            # an answer when it ends the episode.
            message = {"role": "assistant", "content": "", "raw": step.raw}
            message["error"] = step.error.message if step.error else "no action"
            dialog.append(message)
        elif action.type == "final_answer":
            dialog.append(
                {"role": "assistant", "thought": step.thought, "content": action.answer or ""}
            )
        elif action.tool_call is not None:
            message = call_message(action.tool_call, step.thought)
            if step.error is not None:
                message["error"] = f"{step.error.kind.value}: {step.error.message}"
            dialog.append(message)
            output = step.observation.text if step.observation else ""
            dialog.append(
                {
                    "role": "tool",
                    "name": action.tool_call.name,
                    "content": {"type": "text", "content": output},
                }
            )
    return dialog


# -- step mode -----------------------------------------------------------------------------
def gold_history(
    query: GTAQuery, turn: int, fmt: JsonFormat, resolve: Any, task: Task
) -> list[ChatMessage]:
    """The conversation before gold assistant turn ``turn``, as the controller is shown it."""
    messages: list[ChatMessage] = [task_message(task, resolve)]
    seen = 0
    dialog = query.dialogs
    first_user = True
    i = 0
    while i < len(dialog):
        message = dialog[i]
        role = message.get("role")
        if role == "assistant":
            if seen == turn:
                break
            seen += 1
            call = first_call(message, query.where)
            thought = str(message.get("thought") or "")
            if call is not None:
                output = ""
                if i + 1 < len(dialog) and dialog[i + 1].get("role") == "tool":
                    output = content_text(dialog[i + 1].get("content"))
                    i += 1
                action = Action(
                    type="tool_call",
                    tool_call=ToolCall(name=call.name, arguments=_dict(call.arguments)),
                )
                step = Step(
                    index=seen - 1,
                    raw=fmt.render(thought, action),
                    thought=thought,
                    action=action,
                    observation=Observation(text=output),
                )
                messages.extend(step_messages(step, resolve))
            else:
                answer = content_text(message.get("content"))
                action = Action(type="final_answer", answer=answer)
                messages.append({"role": "assistant", "content": fmt.render(thought, action)})
        elif role == "user":
            if first_user:
                first_user = False
            else:
                messages.append({"role": "user", "content": content_text(message.get("content"))})
        i += 1
    return messages


def _dict(arguments: Any) -> dict[str, Any]:
    return arguments if isinstance(arguments, dict) else {"value": arguments}


def _append_text(message: ChatMessage, text: str) -> None:
    content = message.get("content")
    if isinstance(content, list):
        message["content"] = [*content, {"type": "text", "text": "\n\n" + text}]
    else:
        message["content"] = f"{content or ''}\n\n{text}"


def step_prediction(
    raw: str, fmt: JsonFormat, tool_names: set[str], final_turn: bool
) -> tuple[dict[str, Any], Step]:
    """The GTA message for one predicted turn, and the step record behind it."""
    step = Step(index=0, raw=raw)
    try:
        parsed = fmt.parse(raw)
    except ParseError as exc:
        if final_turn and raw.strip():
            # Asked to answer without tools, a model may simply answer in words.
            answer = raw.strip()
            if answer.lower().startswith("thought:"):
                answer = answer.split(":", 1)[1].strip()
            step.action = Action(type="final_answer", answer=answer)
            return {"role": "assistant", "content": answer}, step
        step.error = StepError(kind=ErrorKind.PARSE, message=str(exc))
        return {"role": "assistant", "content": "", "raw": raw, "error": str(exc)}, step
    step.thought, step.action = parsed.thought, parsed.action
    if parsed.action.type == "final_answer":
        return {
            "role": "assistant",
            "thought": parsed.thought,
            "content": parsed.action.answer or "",
        }, step
    call = parsed.action.tool_call
    assert call is not None
    message = call_message(call, parsed.thought)
    if call.name not in tool_names:
        why = f"there is no tool {call.name!r}; available: {', '.join(sorted(tool_names))}"
        step.error = StepError(kind=ErrorKind.UNKNOWN_TOOL, message=why)
        message["error"] = why
    return message, step


# -- end-to-end mode -----------------------------------------------------------------------
class GTAAgent(Agent):
    """The agent loop, with the query's files at GTA's relative paths in the workdir."""

    async def start(self, task: Task, source: AssetStore, assets: AssetStore) -> Episode:
        workdir = Path(tempfile.mkdtemp(prefix="tracetune-gta-"))
        try:
            for ref in task.files:
                target = (workdir / ref.name).resolve()
                if workdir.resolve() not in target.parents:
                    raise InputError(f"file name {ref.name!r} leaves the working directory")
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source.path(ref), target)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        toolbox = ToolBox(
            self.tools, workdir, assets, model=self.tool_model, options=self.tool_options
        )
        executor = await make_executor(self.fmt, toolbox)
        return Episode(task, self.model, self.fmt, self.tools, executor, toolbox, source)


def affected_queries(
    gold: dict[str, GTAQuery], status: dict[str, ToolStatus]
) -> dict[str, list[str]]:
    """Queries whose gold chain calls a tool that cannot run here, with those tools."""
    out: dict[str, list[str]] = {}
    for qid, query in gold.items():
        missing = sorted(
            {
                c.name
                for c in query.gold_calls()
                if c.name in status and status[c.name].status == "unavailable"
            }
        )
        if missing:
            out[qid] = missing
    return out


# -- the run -------------------------------------------------------------------------------
class GTAAdapter(BenchmarkAdapter[GTAConfig]):
    """GTA: step mode's items are (query, gold turn) pairs, answered once each from the
    gold history; e2e mode's items are queries, run as agent episodes on the GTA toolset."""

    config_model = GTAConfig
    agent_class = GTAAgent

    def check(self) -> None:
        config = self.config
        self.dataset_json, self.data_root = gta_paths(config.data)
        gold = load_gta_gold(self.dataset_json)
        self.raw_items = read_json(self.dataset_json, "GTA gold")
        ids = list(gold)[: config.limit] if config.limit else list(gold)
        self.gold = {qid: gold[qid] for qid in ids}
        self.metas = {qid: _tool_metas(self.raw_items[qid], gold[qid].where) for qid in ids}
        self.status = toolset_status(config.tool_options, tool_model=bool(config.tool_model))
        self.affected = affected_queries(self.gold, self.status) if config.mode == "e2e" else {}
        self.max_chunk = 32 if config.mode == "step" else 16
        self.fmt = JsonFormat()

    async def load_items(self, run: RunContext) -> Sequence[Any]:
        config, gold = self.config, self.gold
        self.tasks = {
            qid: gta_task(q, self.raw_items[qid], self.data_root, run.trajectories.assets)
            for qid, q in gold.items()
        }
        write_json(run.root / "gold.json", {qid: self.raw_items[qid] for qid in gold})
        if config.mode == "e2e":
            lines = [
                f"  {name}: {s.status} ({s.backend}{'; ' + s.note if s.note else ''})"
                for name, s in self.status.items()
            ]
            run.notify("GTA toolset:\n" + "\n".join(lines))
            if self.affected:
                run.notify(
                    f"{len(self.affected)} of {len(gold)} queries need a tool that cannot run "
                    "here; they are scored apart (see metrics.json 'affected_queries')"
                )
            return list(gold)
        self.final_text = render(FINAL_TURN_PROMPT)
        return [(qid, turn) for qid in gold for turn in range(len(gold[qid].gold_turns))]

    def run_info(self) -> dict[str, Any]:
        e2e = self.config.mode == "e2e"
        return {
            "data": str(self.dataset_json),
            "toolset": {n: s.as_dict() for n, s in self.status.items()} if e2e else None,
            "affected_queries": self.affected,
            "prompt_hashes": {
                "agent": self.fmt.prompt_hash,
                "final_turn": prompt_hash(FINAL_TURN_PROMPT),
            },
        }

    def key(self, item: Any, controller: str) -> str:
        if self.config.mode == "step":
            return stable_id("gta", "step", item[0], item[1], controller)
        return stable_id("gta", "e2e", item, controller)

    def label(self, item: Any) -> str:
        if self.config.mode == "step":
            return f"gta-{item[0]} turn {item[1]}"
        return f"gta-{item}"

    # e2e: an agent episode on the query's GTA tools
    def task(self, item: Any) -> Task:
        return self.tasks[item]

    def tools(self, item: Any) -> list[Any]:
        return list(episode_tools(self.metas[item], self.status))

    def action_format(self, item: Any) -> str:
        return "json"

    async def episode(self, run: RunContext, item: Any, trajectory_id: str) -> Trajectory:
        if self.config.mode == "e2e":
            return await super().episode(run, item, trajectory_id)
        return await self._step(run, item, trajectory_id)

    async def _step(self, run: RunContext, item: tuple[str, int], tid: str) -> Trajectory:
        """One gold turn predicted from the gold history (tools are not executed)."""
        qid, turn = item
        fmt, sampling = self.fmt, run.sampling()
        assert run.model is not None
        query, task = self.gold[qid], self.tasks[qid]
        tools = [gta_tool(str(m.get("name")), m) for m in self.metas[qid]]
        gold_msg = query.gold_turns[turn]
        final_turn = first_call(gold_msg, query.where) is None
        messages = [{"role": "system", "content": fmt.system_prompt(_prompt_tools(tools))}]
        messages += gold_history(query, turn, fmt, run.trajectories.assets.path, task)
        if final_turn:
            _append_text(messages[-1], self.final_text)
        generation = await run.model.generate(messages, n=1, sampling=sampling)
        raw, usage, latency = generation.text, generation.usage, generation.latency_s
        prediction, step = step_prediction(raw, fmt, {t.name for t in tools}, final_turn)
        step.usage, step.latency_s = usage, latency
        return Trajectory(
            id=tid,
            task=task,
            controller=run.model.spec,
            action_format="json",
            tools=[t.name for t in tools],
            steps=[step],
            final_answer=step.action.answer if step.action and step.action.answer else None,
            status="completed",
            usage=usage,
            prompt_hash=fmt.prompt_hash,
            sampling=sampling.to_dict(),
            metadata={
                "mode": "step",
                "gta_id": qid,
                "turn": turn,
                "final_turn": final_turn,
                # the nudge appended to a final turn is a template too
                "final_turn_prompt_hash": prompt_hash(FINAL_TURN_PROMPT) if final_turn else None,
                "prediction": prediction,
                "gold": gold_msg,
                "context_messages": len(messages),
            },
        )

    def annotate(self, item: Any, trajectory: Trajectory) -> dict[str, Any]:
        if self.config.mode == "step":
            return {}
        return {"mode": "e2e", "gta_id": item, "prediction": trajectory_dialog(trajectory)}

    async def score(self, run: RunContext, items: Sequence[Any], result: StageResult) -> Scored:
        return _score(self.config, run, self.gold, self.affected, self.status)


async def run_gta(
    config: GTAConfig,
    model: ChatModel | None = None,
    progress: bool = True,
    notify: Notify | None = None,
) -> dict[str, Any]:
    from tracetune.evaluate.runs import run_benchmark

    return await run_benchmark(config, model, progress, notify)


def _prompt_tools(tools: list[GTATool]) -> list[Any]:
    from tracetune.tools import get_tool

    # The answer is given with final_answer, as in training data.
    return [*tools, get_tool("final_answer")]


def _score(
    config: GTAConfig,
    ctx: RunContext,
    gold: dict[str, GTAQuery],
    affected: dict[str, list[str]],
    status: dict[str, ToolStatus],
) -> Scored:
    groups = trajectories_by(ctx.trajectories, "gta_id")
    rows: list[dict[str, Any]] = []
    trajectory_of: dict[str, str] = {}
    for qid, query in gold.items():
        found = groups.get(qid, [])
        if not found:
            continue
        if config.mode == "step":
            by_turn = {int(t.metadata["turn"]): t for t in found}
            steps = []
            for turn in range(len(query.gold_turns)):
                if turn not in by_turn:
                    break  # an unfinished turn and everything after it count as missing
                steps.append(by_turn[turn].metadata["prediction"])
            rows.append({"id": qid, "steps": steps})
            trajectory_of[qid] = by_turn[max(by_turn)].id
        else:
            rows.append({"id": qid, "dialog": found[0].metadata["prediction"]})
            trajectory_of[qid] = found[0].id
    predictions = ctx.root / "predictions.jsonl"
    write_jsonl(predictions, rows)
    loaded = load_gta_predictions(predictions, config.mode)
    reports = {}
    for protocol in ("official", "mat"):
        # The MAT rule is plain substring matching: its scorer never loads the embedder.
        scorer = GTAScorer(config.mode, protocol, config.embedder)  # type: ignore[arg-type]
        name = f"gta/{config.mode}/{protocol}"
        if affected:
            runnable = {q: g for q, g in gold.items() if q not in affected}
            report = scorer.score(runnable, {q: p for q, p in loaded.items() if q in runnable})
            report.benchmark = name
            report.details["subset"] = "queries whose gold tools all run here"
            reports[name] = report
            full = scorer.score(gold, loaded)
            full.benchmark = f"{name}/all-queries"
            full.details["subset"] = (
                "all queries, including those needing a tool that cannot run here"
            )
            reports[full.benchmark] = full
        else:
            reports[name] = scorer.score(gold, loaded)
    extra = {
        "affected_queries": affected,
        "unavailable_tools": sorted(n for n, s in status.items() if s.status == "unavailable")
        if config.mode == "e2e"
        else [],
        "approximate_tools": sorted(n for n, s in status.items() if s.status == "approximate")
        if config.mode == "e2e"
        else [],
        "predictions": str(predictions),
    }
    return Scored(reports, f"gta/{config.mode}/official", trajectory_of, extra)


__all__ = [
    "GTAAdapter",
    "GTAAgent",
    "GTAConfig",
    "gold_history",
    "run_gta",
    "step_prediction",
    "trajectory_dialog",
]
