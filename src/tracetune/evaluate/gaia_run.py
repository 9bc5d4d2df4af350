"""Run a controller on GAIA: each question with its attached file and the search tool.

``--data`` is GAIA's ``metadata.jsonl``, with the files it names (``file_name``) beside it.
The question is shown with GAIA's answer-format rules in our words
(``prompts/eval/gaia_question.jinja``); the controller's ``final_answer`` becomes the
submission line ``{"task_id", "model_answer"}`` (a question left without an answer is
submitted as ``null``, which GAIA's scorer reads as "None"), scored by ``score_gaia``.

Search runs on a local corpus (``--corpus``) or a web backend
(``--option search.backend=...``); a run without either must say so by leaving ``search``
out of ``--tools``, so no run quietly lacks the tool the benchmark assumes.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from tracetune.evaluate.adapter import BenchConfig, BenchmarkAdapter, Scored
from tracetune.evaluate.base import read_jsonl, require
from tracetune.evaluate.gaia import score_gaia
from tracetune.evaluate.runs import (
    EvalRunError,
    Notify,
    RunContext,
    stable_id,
    trajectories_by,
    write_jsonl,
)
from tracetune.models.base import ChatModel
from tracetune.prompts import prompt_hash, render
from tracetune.runner import StageResult
from tracetune.schema import Provenance, Task, Trajectory
from tracetune.tools import load_tools

QUESTION_PROMPT = "eval/gaia_question.jinja"
DEFAULT_TOOLS = ["search", "inspect_file", "ocr", "calculator", "image_crop"]


class GAIAConfig(BenchConfig):
    """Options of ``tracetune eval run gaia``."""

    bench: Literal["gaia"] = "gaia"
    data: Path | None = Field(
        default=None,
        description="GAIA's metadata.jsonl (or its folder), the attached files beside it.",
    )
    action_format: Literal["json", "code", "tools"] = Field(
        default="json", description="How actions are written."
    )
    tools: list[str] = Field(
        default_factory=list,
        description="The agent's tools (default: search, inspect_file, ocr, calculator, "
        "image_crop, plus visual_qa with a tool model).",
    )


def gaia_tools(config: GAIAConfig) -> list[str]:
    names = list(config.tools) or list(DEFAULT_TOOLS)
    if not config.tools and config.tool_model:
        names.append("visual_qa")
    if "search" in names:
        search = config.tool_options.get("search") or {}
        if search.get("backend", "local") == "local" and not search.get("corpus"):
            raise EvalRunError(
                "gaia runs with the search tool, which has no corpus or backend here: pass "
                "--corpus PATH (a local corpus), --option search.backend=serper|google|brave|"
                "searxng (web, keys from the environment), or --tools without search to run "
                "without it"
            )
    if "visual_qa" in names and not config.tool_model:
        raise EvalRunError("the visual_qa tool needs --tool-model SPEC to answer its questions")
    return names


def gaia_metadata(data: Path | None) -> Path:
    if data is None:
        raise EvalRunError("gaia needs --data: GAIA's metadata.jsonl (files beside it)")
    path = Path(data)
    if path.is_dir():
        path = path / "metadata.jsonl"
    if not path.is_file():
        raise EvalRunError(f"{path} does not exist; --data is GAIA's metadata.jsonl")
    return path


class GAIAAdapter(BenchmarkAdapter[GAIAConfig]):
    """GAIA: each question with its attached file, the agent's tools, GAIA's scorer."""

    config_model = GAIAConfig

    def check(self) -> None:
        self.metadata = gaia_metadata(self.config.data)
        self.names = gaia_tools(self.config)

    async def load_items(self, run: RunContext) -> Sequence[Task]:
        rows = read_jsonl(self.metadata, "GAIA metadata")
        if self.config.limit:
            rows = rows[: self.config.limit]
        tasks: list[Task] = []
        for lineno, row in rows:
            where = f"{self.metadata}:{lineno}"
            task_id = str(require(row, "task_id", where))
            question = str(require(row, "Question", where))
            require(row, "Final answer", where, "the test split has no public answers to score")
            files = []
            if row.get("file_name"):
                file = self.metadata.parent / str(row["file_name"])
                if not file.is_file():
                    raise EvalRunError(
                        f"{where}: attached file {row['file_name']!r} is not at {file}; GAIA's "
                        "files sit beside metadata.jsonl"
                    )
                files.append(run.trajectories.assets.put_file(file, name=file.name))
            tasks.append(
                Task(
                    id=f"gaia-{task_id}",
                    query=render(QUESTION_PROMPT, question=question),
                    files=files,
                    tools=self.names,
                    provenance=Provenance(
                        source="import:gaia", prompt_hash=prompt_hash(QUESTION_PROMPT)
                    ),
                    metadata={"gaia_task_id": task_id, "level": str(row.get("Level"))},
                )
            )
        write_jsonl(run.root / "gold.jsonl", [row for _, row in rows])
        names = self.names
        self._tools = load_tools(
            [*names, "final_answer"] if self.config.action_format == "json" else names
        )
        run.notify(f"GAIA: {len(tasks)} questions, tools: {', '.join(names)}")
        return tasks

    def run_info(self) -> dict[str, Any]:
        return {
            "data": str(self.metadata),
            "tools": self.names,
            "prompt_hashes": {"question": prompt_hash(QUESTION_PROMPT)},
        }

    def key(self, item: Task, controller: str) -> str:
        return stable_id("gaia", item.id, controller, self.config.action_format)

    def tools(self, item: Task) -> list[Any]:
        return list(self._tools)

    def annotate(self, item: Task, trajectory: Trajectory) -> dict[str, Any]:
        return {"gaia_task_id": item.metadata["gaia_task_id"], "level": item.metadata["level"]}

    async def score(self, run: RunContext, items: Sequence[Task], result: StageResult) -> Scored:
        groups = trajectories_by(run.trajectories, "gaia_task_id")
        predictions = []
        trajectory_of: dict[str, str] = {}
        for task in items:
            task_id = task.metadata["gaia_task_id"]
            if task_id not in groups:
                continue
            trajectory = groups[task_id][0]
            trajectory_of[task_id] = trajectory.id
            predictions.append(
                {
                    "task_id": task_id,
                    "model_answer": trajectory.final_answer,
                    "reasoning_trace": [s.thought for s in trajectory.steps if s.thought],
                }
            )
        path = run.root / "predictions.jsonl"
        write_jsonl(path, predictions)
        report = score_gaia(run.root / "gold.jsonl", path)
        return Scored(
            {"gaia": report}, "gaia", trajectory_of, {"tools": self.names, "predictions": str(path)}
        )


async def run_gaia(
    config: GAIAConfig,
    model: ChatModel | None = None,
    progress: bool = True,
    notify: Notify | None = None,
) -> dict[str, Any]:
    from tracetune.evaluate.runs import run_benchmark

    return await run_benchmark(config, model, progress, notify)


__all__ = ["GAIAAdapter", "GAIAConfig", "run_gaia"]
