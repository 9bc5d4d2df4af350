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

import copy
from pathlib import Path
from typing import Any

from tracetune.agent.loop import Agent
from tracetune.evaluate.base import read_jsonl, require
from tracetune.evaluate.gaia import score_gaia
from tracetune.evaluate.runs import (
    EvalRunConfig,
    EvalRunError,
    Notify,
    RunContext,
    check_backend,
    stable_id,
    trajectories_by,
    write_jsonl,
)
from tracetune.models.base import ChatModel
from tracetune.prompts import prompt_hash, render
from tracetune.schema import Provenance, Task, Trajectory
from tracetune.tools import load_tools

QUESTION_PROMPT = "eval/gaia_question.jinja"
DEFAULT_TOOLS = ["search", "inspect_file", "ocr", "calculator", "image_crop"]


def gaia_tools(config: EvalRunConfig) -> list[str]:
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


async def run_gaia(
    config: EvalRunConfig,
    model: ChatModel | None = None,
    progress: bool = True,
    notify: Notify | None = None,
) -> dict[str, Any]:
    metadata = gaia_metadata(config.data)
    names = gaia_tools(config)
    rows = read_jsonl(metadata, "GAIA metadata")
    if config.limit:
        rows = rows[: config.limit]
    ctx = RunContext(config, notify)
    out = ctx.trajectories
    tasks: list[Task] = []
    for lineno, row in rows:
        where = f"{metadata}:{lineno}"
        task_id = str(require(row, "task_id", where))
        question = str(require(row, "Question", where))
        require(row, "Final answer", where, "the test split has no public answers to score")
        files = []
        if row.get("file_name"):
            file = metadata.parent / str(row["file_name"])
            if not file.is_file():
                raise EvalRunError(
                    f"{where}: attached file {row['file_name']!r} is not at {file}; GAIA's "
                    "files sit beside metadata.jsonl"
                )
            files.append(out.assets.put_file(file, name=file.name))
        tasks.append(
            Task(
                id=f"gaia-{task_id}",
                query=render(QUESTION_PROMPT, question=question),
                files=files,
                tools=names,
                provenance=Provenance(
                    source="import:gaia", prompt_hash=prompt_hash(QUESTION_PROMPT)
                ),
                metadata={"gaia_task_id": task_id, "level": str(row.get("Level"))},
            )
        )
    write_jsonl(ctx.root / "gold.jsonl", [row for _, row in rows])
    tools = load_tools([*names, "final_answer"] if config.action_format == "json" else names)
    ctx.notify(f"GAIA: {len(tasks)} questions, tools: {', '.join(names)}")
    ctx.write_run(
        {
            "data": str(metadata),
            "tools": names,
            "prompt_hashes": {"question": prompt_hash(QUESTION_PROMPT)},
        }
    )
    controller = ctx.load_models(model)
    agent = Agent(
        controller,
        tools,
        config.action_format,
        config.max_steps,
        config.max_errors,
        ctx.sampling(),
        tool_options=copy.deepcopy(config.tool_options),
        tool_model=ctx.tool_model,
    )

    def key(task: Task) -> str:
        return stable_id("gaia", task.id, controller.spec, config.action_format)

    async def process(task: Task) -> Trajectory:
        trajectory = check_backend(await agent.run(task, out.assets, out.assets, key(task)))
        trajectory.metadata.update(
            {
                "bench": "gaia",
                "gaia_task_id": task.metadata["gaia_task_id"],
                "level": task.metadata["level"],
            }
        )
        return trajectory

    try:
        result = await ctx.run_items(tasks, key, process, progress=progress)
    finally:
        await ctx.close()
    groups = trajectories_by(out, "gaia_task_id")
    predictions = []
    trajectory_of: dict[str, str] = {}
    for task in tasks:
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
    write_jsonl(ctx.root / "predictions.jsonl", predictions)
    report = score_gaia(ctx.root / "gold.jsonl", ctx.root / "predictions.jsonl")
    return ctx.finish(
        {"gaia": report},
        "gaia",
        trajectory_of,
        result,
        {"tools": names, "predictions": str(ctx.root / "predictions.jsonl")},
    )


__all__ = ["run_gaia"]
