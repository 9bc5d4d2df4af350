"""Run a controller on Agent-X: each query with its images and an Agent-X toolset, judged.

``--data`` is Agent-X's ``data.json`` (id -> ``[record]``, or a JSON list / JSON lines with
``id``), or the folder holding it. Each record names its media under ``file_path`` (Agent-X's
field: one file name, a comma-separated list of images, or a video), or under ``image``,
``file_name``, ``files`` or ``images``; names are looked up beside the data file, then in its
``files/`` folder (the release's layout). A video (.mp4, .avi, .mov, .mkv, .webm) is shown as
``VIDEO_FRAMES`` (8) frames evenly spaced over the clip. A query is never run without its
media: a record that names none, or a file that is missing, stops the run before any model
call, naming every such record; a video that opencv cannot decode, or an image that cannot
be read, skips its query, and the skips are counted with their reasons in metrics.json
(``skipped_queries``) and scored as missing predictions.

Agent-X's tools run on the GTA toolset's wrappers (``gta_tools``), which already implement
GTA's tools on tracetune's own, under Agent-X's names (``AGENTX_TO_GTA``). A query is offered
the tools its ``tool_metadata`` lists (else those its gold steps call). Tools that cannot run
here -- no weights, no tool VLM, no search corpus, or an Agent-X tool with no implementation at
all -- are reported before the run; queries whose gold steps need one are scored apart
(``agentx`` covers the rest, ``agentx/all-queries`` everything), as GTA end-to-end runs do.

Each episode becomes an Agent-X prediction: one reasoning step per tool call (``step``,
``task`` = the gist of its thought, ``tool``, ``input`` = the arguments, ``output`` = the
observation text, ``thought``) and ``final_answer {value, justification}`` with the last
thought as justification. ``score_agentx``'s scorer grades it with the ``--judge`` model;
judge replies are cached in the run state, so a rerun asks neither model again. Without a
judge only the scorer's judge-free metrics (``tool_precision``, ``toolset_accuracy``) are
computed, and metrics.json says so.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from tracetune.evaluate.adapter import BenchConfig, BenchmarkAdapter, Scored
from tracetune.evaluate.agentx import (
    AgentXPrediction,
    AgentXScorer,
    AgentXTask,
    JudgeResult,
    load_agentx_gold,
    load_agentx_predictions,
    tool_name,
)
from tracetune.evaluate.base import ScoreReport, index_unique, read_records
from tracetune.evaluate.gta_tools import GTA_TOOLS, GTATool, ToolStatus, gta_tool, toolset_status
from tracetune.evaluate.runs import (
    EvalRunError,
    Notify,
    RunContext,
    stable_id,
    trajectories_by,
    write_json,
    write_jsonl,
)
from tracetune.models.base import ChatMessage, ChatModel, Generation, Sampling, load_model
from tracetune.runner import MeteredModel, StageResult
from tracetune.schema import Provenance, Task, Trajectory
from tracetune.tools import ToolContext, ToolResult, ToolUnavailable

# Agent-X tool name -> the GTA wrapper that does the same job. GTA's own names map to
# themselves too (some Agent-X records use them).
AGENTX_TO_GTA: dict[str, str] = {
    "ObjectCounter": "CountGivenObject",
    "SceneDescriber": "ImageDescription",
    "WebSearch": "GoogleSearch",
    "RegionDescriber": "RegionAttributeDescription",
    "LocateObjectByText": "TextToBbox",
    "CodePlotter": "Plot",
    "DrawBoundingBox": "DrawBox",
    "OverlayText": "AddText",
    "ImageGenerator": "TextToImage",
    **{name: name for name in GTA_TOOLS},
}
# Where records name their media: Agent-X's data.json uses ``file_path`` (one name, a
# comma-separated list of images, or one video); the rest are accepted for hand-made files.
MEDIA_KEYS = ("file_path", "image", "file_name", "files", "images")
VIDEO_SUFFIXES = frozenset({".mp4", ".avi", ".mov", ".mkv", ".webm"})
# Frames a video query is shown: evenly spaced over the whole clip, first and last included
# (Agent-X's GPT-4o script also shows 8, though it takes the first 8 consecutive frames).
VIDEO_FRAMES = 8
JUDGE_STAGE = "eval:judge"


class AgentXConfig(BenchConfig):
    """Options of ``tracetune eval run agentx``."""

    VOLATILE = BenchConfig.VOLATILE | {"judge", "judge_base_url"}  # not part of the run's identity
    bench: Literal["agentx"] = "agentx"
    data: Path | None = Field(
        default=None,
        description="Agent-X's data.json (or its folder); media named by file_path, beside "
        "it or in files/.",
    )
    judge: str | None = Field(
        default=None,
        description="Judge model spec for the judged metrics, e.g. openai:gpt-4o; none: only "
        "the judge-free metrics (tool_precision, toolset_accuracy) are computed.",
    )
    judge_base_url: str | None = Field(
        default=None,
        description="OpenAI-compatible endpoint of the judge (default: the backend's).",
    )


# -- data ----------------------------------------------------------------------------------
def agentx_data(data: Path | None) -> Path:
    if data is None:
        raise EvalRunError(
            "agentx needs --data: Agent-X's data.json (its media beside it or in files/)"
        )
    path = Path(data)
    if path.is_dir():
        path = path / "data.json"
    if not path.is_file():
        raise EvalRunError(f"{path} does not exist; --data is Agent-X's data.json or its folder")
    return path


def media_names(row: dict[str, Any]) -> list[str]:
    """The media file names a record gives, in order, without repeats: ``file_path`` and the
    other ``MEDIA_KEYS``, each a name, a comma-separated list of names, or a JSON list."""
    names: list[str] = []
    for key in MEDIA_KEYS:
        value = row.get(key)
        values = value if isinstance(value, list) else [value]
        for v in values:
            if isinstance(v, str):
                names += [part.strip() for part in v.split(",") if part.strip()]
    return list(dict.fromkeys(names))


def media_roots(data: Path) -> list[Path]:
    """Folders media names are looked up in: beside data.json, then its ``files/`` folder
    (the layout of Agent-X's release, whose scripts read ``AgentX/files/NAME``)."""
    return [data.parent, data.parent / "files"]


def record_media(row: dict[str, Any], where: str, roots: list[Path]) -> list[Path]:
    """The media files a record names, checked to exist under one of ``roots``.

    Raises ``EvalRunError`` when the record names no media at all (every Agent-X query comes
    with an image or a video: running it without would be a different task) or names a file
    that is not there.
    """
    names = media_names(row)
    if not names:
        raise EvalRunError(
            f"{where}: names no image or video (Agent-X records give them under 'file_path'; "
            f"also read: {', '.join(MEDIA_KEYS[1:])})"
        )
    files = []
    for rel in names:
        found = None
        for root in roots:
            file = (root / rel).resolve()
            if root.resolve() not in file.parents:
                raise EvalRunError(f"{where}: media path {rel!r} leaves the data folder")
            if file.is_file():
                found = file
                break
        if found is None:
            tried = " or ".join(str(r / rel) for r in roots)
            raise EvalRunError(f"{where}: media {rel!r} is at neither {tried}")
        files.append(found)
    return files


def record_images(row: dict[str, Any], where: str, root: Path) -> list[Path]:
    """``record_media`` with the files looked up beside ``root`` and in ``root/files``."""
    return record_media(row, where, [root, root / "files"])


class MediaUnreadable(Exception):
    """Media that cannot be read (a video with no decodable frame, a corrupt image): its
    query is skipped, with this as the reason."""


class VideoUnreadable(MediaUnreadable):
    """A video that yields no frame."""


def video_frames(path: Path, n: int = VIDEO_FRAMES) -> list[tuple[float, Any]]:
    """Up to ``n`` frames evenly spaced over the video, as ``(seconds, PIL image)``."""
    import cv2
    from PIL import Image

    cap = cv2.VideoCapture(str(path))
    try:
        if not cap.isOpened():
            raise VideoUnreadable(f"opencv cannot open the video {path.name}")
        count = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)
        if count > 0:
            wanted = sorted({round(i * (count - 1) / max(n - 1, 1)) for i in range(n)})
        else:  # a stream without a frame count: its first n frames
            wanted = list(range(n))
        frames: list[tuple[float, Any]] = []
        for index in wanted:
            if count > 0:
                cap.set(cv2.CAP_PROP_POS_FRAMES, index)
            ok, frame = cap.read()
            if not ok or frame is None:
                continue
            rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            frames.append((index / fps if fps > 0 else float(index), Image.fromarray(rgb)))
    finally:
        cap.release()
    if not frames:
        raise VideoUnreadable(f"opencv decoded no frame of the video {path.name}")
    return frames


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


def load_media(files: list[Path], assets: Any) -> list[Any]:
    """Store a query's media: images as they are, each video as ``VIDEO_FRAMES`` frames
    (named ``STEM_frameK_of_N.jpg``, described with their time in the clip)."""
    refs = []
    for file in files:
        if not is_video(file):
            try:
                refs.append(assets.put_file(file, name=file.name))
            except (OSError, ValueError) as exc:  # a corrupt or truncated image, say
                raise MediaUnreadable(f"{file.name} cannot be read: {exc}") from exc
            continue
        frames = video_frames(file)
        for k, (seconds, image) in enumerate(frames, 1):
            refs.append(
                assets.put_image(
                    image.convert("RGB"),
                    name=f"{file.stem}_frame{k}_of_{len(frames)}.jpg",
                    description=f"frame {k} of {len(frames)} sampled from the video "
                    f"{file.name}, at {seconds:.1f} s",
                )
            )
    return refs


def metadata_tools(meta: Any) -> dict[str, dict[str, Any]]:
    """A record's ``tool_metadata`` as {tool name: its metadata}, whatever shape it has
    (a dict keyed by name, a list of {name, ...} objects or of names, one {name, ...})."""
    if isinstance(meta, dict) and isinstance(meta.get("name"), str):
        meta = [meta]
    out: dict[str, dict[str, Any]] = {}
    if isinstance(meta, dict):
        for name, value in meta.items():
            out[str(name)] = value if isinstance(value, dict) else {"description": str(value)}
    elif isinstance(meta, list):
        for item in meta:
            if isinstance(item, str):
                out[item] = {}
            elif isinstance(item, dict) and item.get("name"):
                out[str(item["name"])] = item
    return out


def query_tools(task: AgentXTask) -> dict[str, dict[str, Any]]:
    tools = metadata_tools(task.tool_metadata)
    if not tools:  # no metadata: offer what the gold steps call
        tools = {n: {} for s in task.steps if (n := tool_name(s))}
    return tools


# -- the toolset ---------------------------------------------------------------------------
class UnknownAgentXTool(GTATool):
    """An Agent-X tool tracetune has no implementation of: every call says so."""

    backend = "none"
    unavailable = "tracetune has no implementation of this Agent-X tool"

    async def forward(self, ctx: ToolContext, **kwargs: Any) -> ToolResult:
        raise ToolUnavailable(f"{self.name} is not available here: {self.unavailable}")


def agentx_status(names: set[str], gta: dict[str, ToolStatus]) -> dict[str, ToolStatus]:
    """What each Agent-X tool of the run runs on here, and which cannot run (with why)."""
    out = {}
    for name in sorted(names):
        target = AGENTX_TO_GTA.get(name)
        if target is None:
            out[name] = ToolStatus(name, "unavailable", "none", UnknownAgentXTool.unavailable)
            continue
        s = gta[target]
        backend = s.backend if target == name else f"GTA {target}: {s.backend}"
        out[name] = ToolStatus(name, s.status, backend, s.note)
    return out


def agentx_tool(name: str, meta: dict[str, Any], status: ToolStatus) -> GTATool:
    """The tool an episode gets for Agent-X's ``name``: the GTA wrapper under that name, with
    the record's description (arguments stay the wrapper's: they are what it executes)."""
    target = AGENTX_TO_GTA.get(name)
    tool: GTATool = copy.copy(gta_tool(target)) if target else UnknownAgentXTool()
    tool.name = name
    if isinstance(meta.get("description"), str) and meta["description"].strip():
        tool.description = meta["description"].strip()
    if status.status == "unavailable":
        tool.unavailable = status.note or "it cannot run here"
    return tool


# -- predictions from trajectories ---------------------------------------------------------
def gist(thought: str, limit: int = 120) -> str:
    """The first sentence of a thought, shortened: Agent-X's ``task`` of a step."""
    text = " ".join(thought.split())
    first = re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0]
    return first if len(first) <= limit else first[: limit - 1].rstrip() + "…"


def trajectory_prediction(trajectory: Trajectory) -> dict[str, Any]:
    """An episode in Agent-X's prediction shape."""
    steps: list[dict[str, Any]] = []
    last_thought = ""
    for step in trajectory.steps:
        if step.thought:
            last_thought = step.thought
        action = step.action
        if action is None or action.tool_call is None:
            continue
        output = step.observation.text if step.observation else ""
        if step.error is not None:
            output = f"{output}\nerror ({step.error.kind.value}): {step.error.message}".strip()
        steps.append(
            {
                "step": len(steps) + 1,
                "task": gist(step.thought),
                "tool": action.tool_call.name,
                "input": action.tool_call.arguments,
                "output": output,
                "thought": step.thought,
            }
        )
    return {
        "id": trajectory.metadata["agentx_id"],
        "reasoning_steps": steps,
        "final_answer": {"value": trajectory.final_answer or "", "justification": last_thought},
    }


# -- scoring -------------------------------------------------------------------------------
class _NoJudge(ChatModel):
    spec = "none"

    async def generate(
        self,
        messages: list[ChatMessage],
        *,
        n: int = 1,
        sampling: Sampling = Sampling(),  # noqa: B008  (frozen: safe to share)
        tools: list[dict[str, Any]] | None = None,
    ) -> Generation:
        raise AssertionError("the judge-free scorer never asks a judge")


class JudgeFreeScorer(AgentXScorer):
    """The Agent-X scorer without a judge: its judged metrics are dropped, so what is left
    (the metrics it computes without the judge) comes from the very same code."""

    def __init__(self) -> None:
        super().__init__(_NoJudge())

    async def _judge(  # type: ignore[override]
        self, template: str, semaphore: Any, *, n_steps: int | None = None, **_: Any
    ) -> JudgeResult:
        return JudgeResult(0.0 if n_steps is None else [0.0] * n_steps)

    async def ascore(
        self, gold: dict[str, AgentXTask], predictions: dict[str, tuple[str, AgentXPrediction]]
    ) -> ScoreReport:
        report = await super().ascore(gold, predictions)
        keep = set(report.details["deterministic_metrics"])
        report.metrics = {k: v for k, v in report.metrics.items() if k in keep}
        report.details["items_per_metric"] = {
            k: v for k, v in report.details["items_per_metric"].items() if k in keep
        }
        report.details["judge"] = None
        report.details["judged"] = False
        report.details.pop("judge_fallbacks", None)
        for item in report.items:
            item.scores = {
                k: v
                for k, v in item.scores.items()
                if k in keep or k in ("gold_steps", "predicted_steps")
            }
            item.details = {
                k: v
                for k, v in item.details.items()
                if k in ("generative", "query_type", "no_prediction")
            }
        return report


JUDGE_FREE_NOTE = (
    "no --judge given: only the judge-free metrics (tool_precision, toolset_accuracy) were "
    "computed; rerun with --judge SPEC for grounding, tool accuracy, faithfulness, context, "
    "factual precision, semantic accuracy and goal accuracy (the episodes are not rerun)"
)


# -- the run -------------------------------------------------------------------------------
class AgentXAdapter(BenchmarkAdapter[AgentXConfig]):
    """Agent-X: each query with its media and an Agent-X toolset, judged (or judge-free)."""

    config_model = AgentXConfig

    def __init__(self, config: AgentXConfig, judge: ChatModel | None = None) -> None:
        super().__init__(config)
        self.judge = judge

    def check(self) -> None:
        config = self.config
        data = self.data = agentx_data(config.data)
        gold = load_agentx_gold(data)
        self.raw = index_unique(read_records(data, "Agent-X gold"), "id", "task")
        ids = self.ids = list(gold)[: config.limit] if config.limit else list(gold)
        self.gold = {i: gold[i] for i in ids}
        self.media: dict[str, list[Path]] = {}
        problems: list[str] = []
        for i in ids:
            try:
                self.media[i] = record_media(self.raw[i][1], self.raw[i][0], media_roots(data))
            except EvalRunError as exc:
                problems.append(str(exc))
        if problems:
            shown = "\n  ".join(problems[:10])
            more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
            raise EvalRunError(
                f"{len(problems)} of {len(ids)} Agent-X queries cannot get their media, so none "
                f"was run:\n  {shown}{more}\nput Agent-X's files (its 'files' folder) beside "
                f"{data.name}, or give --data the folder that holds both"
            )
        self.offered = {i: query_tools(self.gold[i]) for i in ids}
        gold_tools = {i: {n for s in self.gold[i].steps if (n := tool_name(s))} for i in ids}
        names = self.names = (
            set().union(*self.offered.values(), *gold_tools.values()) if ids else set()
        )
        status = self.status = agentx_status(
            names, toolset_status(config.tool_options, tool_model=bool(config.tool_model))
        )
        affected = {
            i: sorted(n for n in gold_tools[i] if status[n].status == "unavailable") for i in ids
        }
        self.affected = {i: v for i, v in affected.items() if v}
        self.unknown = sorted(n for n in names if n not in AGENTX_TO_GTA)

    async def load_items(self, run: RunContext) -> Sequence[str]:
        ids, gold, media = self.ids, self.gold, self.media
        run.notify(
            "Agent-X toolset:\n"
            + "\n".join(
                f"  {n}: {s.status} ({s.backend}{'; ' + s.note if s.note else ''})"
                for n, s in self.status.items()
            )
        )
        if self.affected:
            run.notify(
                f"{len(self.affected)} of {len(ids)} queries need a tool that cannot run here; "
                "they are scored apart (see metrics.json 'affected_queries')"
            )
        if self.config.judge is None:
            run.notify(JUDGE_FREE_NOTE)
        self.tasks: dict[str, Task] = {}
        self.skipped: dict[str, str] = {}
        for i in ids:
            try:
                files = load_media(media[i], run.trajectories.assets)
            except MediaUnreadable as exc:
                self.skipped[i] = str(exc)
                continue
            self.tasks[i] = Task(
                id=f"agentx-{i}",
                query=gold[i].query,
                files=files,
                tools=list(self.offered[i]),
                provenance=Provenance(source="import:agentx"),
                metadata={
                    "agentx_id": i,
                    "query_type": gold[i].query_type,
                    "media": [f.name for f in media[i]],
                    **({"video_frames": VIDEO_FRAMES} if any(map(is_video, media[i])) else {}),
                },
            )
        if self.skipped:
            run.notify(
                f"{len(self.skipped)} of {len(ids)} queries skipped (scored as missing "
                "predictions):\n" + "\n".join(f"  {q}: {why}" for q, why in self.skipped.items())
            )
        write_json(run.root / "gold.json", {i: self.raw[i][1] for i in ids})
        return [i for i in ids if i not in self.skipped]

    def run_info(self) -> dict[str, Any]:
        return {
            "data": str(self.data),
            "toolset": {n: s.as_dict() for n, s in self.status.items()},
            "tool_names": {n: AGENTX_TO_GTA.get(n) for n in sorted(self.names)},
            "affected_queries": self.affected,
            "judge": self.config.judge,
        }

    def key(self, item: str, controller: str) -> str:
        return stable_id("agentx", item, controller, "json")

    def label(self, item: str) -> str:
        return f"agentx-{item}"

    def task(self, item: str) -> Task:
        return self.tasks[item]

    def tools(self, item: str) -> list[Any]:
        return [agentx_tool(n, m, self.status[n]) for n, m in self.offered[item].items()]

    def action_format(self, item: str) -> str:
        return "json"

    def annotate(self, item: str, trajectory: Trajectory) -> dict[str, Any]:
        trajectory.metadata["agentx_id"] = item
        return {"agentx_id": item, "prediction": trajectory_prediction(trajectory)}

    async def score(self, run: RunContext, items: Sequence[str], result: StageResult) -> Scored:
        config, gold, affected = self.config, self.gold, self.affected
        out = run.trajectories
        groups = trajectories_by(out, "agentx_id")
        rows, trajectory_of = [], {}
        for qid in self.ids:
            if qid in groups:
                rows.append(groups[qid][0].metadata["prediction"])
                trajectory_of[qid] = groups[qid][0].id
        predictions = run.root / "predictions.jsonl"
        write_jsonl(predictions, rows)
        loaded = load_agentx_predictions(predictions) if rows else {}

        judge_model: ChatModel | None = None
        if config.judge is not None:
            loaded_judge = self.judge or load_model(
                config.judge,
                config.backend.model_copy(
                    update={"base_url": config.judge_base_url or config.backend.base_url}
                ),
            )
            # Metered and cached in the run state: a rerun gets every judge reply from the
            # cache.
            judge_model = MeteredModel(loaded_judge, out.state, JUDGE_STAGE)
        scorer = AgentXScorer(judge_model) if judge_model is not None else JudgeFreeScorer()
        reports: dict[str, ScoreReport] = {}
        try:
            if affected:
                runnable = {q: g for q, g in gold.items() if q not in affected}
                report = await scorer.ascore(
                    runnable, {q: p for q, p in loaded.items() if q in runnable}
                )
                report.details["subset"] = "queries whose gold tools all run here"
                reports["agentx"] = report
                full = await scorer.ascore(gold, loaded)
                full.benchmark = "agentx/all-queries"
                full.details["subset"] = (
                    "all queries, including those needing a tool that cannot run here"
                )
                reports[full.benchmark] = full
            else:
                reports["agentx"] = await scorer.ascore(gold, loaded)
        finally:
            if judge_model is not None:
                await judge_model.aclose()
        status = self.status
        extra = {
            "judged": judge_model is not None,
            "judge": config.judge,
            "affected_queries": affected,
            "skipped_queries": self.skipped,
            "video_frames": VIDEO_FRAMES,
            "unknown_tools": self.unknown,
            "unavailable_tools": sorted(n for n, s in status.items() if s.status == "unavailable"),
            "approximate_tools": sorted(n for n, s in status.items() if s.status == "approximate"),
            "predictions": str(predictions),
        }
        if judge_model is None:
            extra["note"] = JUDGE_FREE_NOTE
        return Scored(reports, "agentx", trajectory_of, extra)


async def run_agentx(
    config: AgentXConfig,
    model: ChatModel | None = None,
    progress: bool = True,
    notify: Notify | None = None,
    judge: ChatModel | None = None,
) -> dict[str, Any]:
    """Run Agent-X; ``judge``: a loaded judge model (default: load ``config.judge``)."""
    from tracetune.evaluate.adapter import run_adapter

    return await run_adapter(config, model, progress, notify, AgentXAdapter(config, judge))


__all__ = [
    "AGENTX_TO_GTA",
    "AgentXAdapter",
    "AgentXConfig",
    "JudgeFreeScorer",
    "agentx_status",
    "agentx_tool",
    "metadata_tools",
    "media_names",
    "record_images",
    "record_media",
    "run_agentx",
    "video_frames",
    "trajectory_prediction",
]
