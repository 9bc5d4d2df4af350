"""Exports of an agent run train on what ``train sft`` trains on, never on failures.

The trajectories come from a real ``agent run`` against a loopback OpenAI-compatible server:
one episode recovers from an unparsable reply, one never produces a valid action and ends
with status ``max_errors``, and a third finished but was rejected by its verifier.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tracetune.agent.run import AgentRunConfig, run_agent
from tracetune.cli import app
from tracetune.models.base import ModelOptions
from tracetune.schema import Trajectory
from tracetune.store import Dataset
from tracetune.testing import ScriptedOpenAIServer
from tracetune.train.data import DataReport, sft_rows

GARBAGE = "I am not sure what to do here"
CALC = 'Thought: add\nAction: {"name": "calculator", "arguments": {"expression": "6 + 8"}}'
ANSWER = 'Thought: done\nAction: {"name": "final_answer", "arguments": {"answer": "14"}}'


def _reply(body: dict[str, Any]) -> str:
    texts = json.dumps(body["messages"])
    if "never answers" in texts:
        return GARBAGE
    turns = sum(1 for m in body["messages"] if m["role"] == "assistant")
    return [GARBAGE, CALC, ANSWER][min(turns, 2)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("run")
    tasks = tmp / "tasks.jsonl"
    tasks.write_text(
        json.dumps({"id": "recovers", "query": "What is 6 + 8?"})
        + "\n"
        + json.dumps({"id": "broken", "query": "This one never answers."})
        + "\n"
    )
    with ScriptedOpenAIServer(_reply) as server:
        config = AgentRunConfig(
            model="openai:test-model",
            out=tmp / "out",
            tasks=tasks,
            tools=["calculator"],
            max_errors=2,
            backend=ModelOptions(base_url=server.base_url),
        )
        asyncio.run(run_agent(config, progress=False))
    out: Dataset[Trajectory] = Dataset.open(tmp / "out", Trajectory)
    by_task = {t.task.id: t for t in out}
    assert by_task["broken"].status == "max_errors"
    assert by_task["recovers"].status == "completed" and by_task["recovers"].steps[0].error
    # A finished episode that a verifier rejected (as `rollout` and `synth` record it).
    rejected = by_task["recovers"].model_copy(
        update={
            "id": "rejected-episode",
            "metadata": {"verdict": {"passed": False, "reasons": ["answer 14 != gold 15"]}},
        }
    )
    out.write_all([rejected], sources=[out.assets])
    return tmp / "out"


@pytest.mark.parametrize("fmt", ["trl-sft", "llamafactory", "swift"])
def test_export_keeps_what_train_sft_keeps_and_says_what_it_left_out(
    fmt: str, run_dir: Path, tmp_path: Path
) -> None:
    result = CliRunner().invoke(
        app, ["export", "--format", fmt, "--in", str(run_dir), "--out", str(tmp_path / "x")]
    )
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "1 trajectory records" in said
    assert "left out 2 trajectory records not fit to train on" in said
    assert "status max_errors" in said and "verdict failed: answer 14 != gold 15" in said
    assert "left out 1 failed steps" in said and "--include-failed" in said

    rows = [json.loads(line) for line in (tmp_path / "x" / "train.jsonl").open()]
    assert len(rows) == 1
    text = json.dumps(rows[0])
    assert GARBAGE not in text  # the unparsable step is no training target
    assert "Error (parse)" not in text and "no action found" not in text  # nor its error
    assert "14" in text and "6 + 8" in text  # the recovered steps are all there

    manifest = json.loads((tmp_path / "x" / "export.json").read_text())
    assert {e["reason"].split(":")[0] for e in manifest["left_out"]} == {
        "status max_errors",
        "verdict failed",
    }
    assert list(manifest["failed_steps_left_out"].values()) == [1]

    # The same selection as `train sft`: the same records kept, for the same reasons.
    report = DataReport()
    kept = sft_rows([run_dir], report=report)
    assert [r["id"] for r in kept] == [r["id"] for r in rows]
    assert sorted(why for _, why in report.skipped) == sorted(
        e["reason"] for e in manifest["left_out"]
    )


def test_include_failed_exports_everything_as_it_is(run_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["export", "-f", "trl-sft", "--in", str(run_dir), "--out", str(tmp_path / "all"),
         "--include-failed"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "left out" not in result.output
    rows = [json.loads(line) for line in (tmp_path / "all" / "train.jsonl").open()]
    assert len(rows) == 3
    assert sum(json.dumps(r).count(GARBAGE) for r in rows) >= 3
    assert "Error (parse): no action found" in json.dumps(rows)
