"""Whole episodes through real backends: HTTP on loopback, a tiny local VLM, and the CLI
killed mid-run and resumed."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tracetune.agent.run import AgentRunConfig, run_agent
from tracetune.models.base import ModelOptions
from tracetune.schema import Trajectory
from tracetune.store import Dataset
from tracetune.testing import ScriptedOpenAIServer


def _last_text(body: dict[str, Any]) -> str:
    content = body["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


def calculator_then_answer(body: dict[str, Any]) -> str:
    """Call the calculator once, then answer with what it returned."""
    last = _last_text(body)
    if last.startswith("Observation:"):
        value = last.split(":", 1)[1].strip()
        action = {"name": "final_answer", "arguments": {"answer": value}}
        return f"Thought: done\nAction: {json.dumps(action)}"
    return 'Thought: add\nAction: {"name": "calculator", "arguments": {"expression": "6 + 8"}}'


def test_episode_over_http_with_injected_429_and_500(tmp_path: Path) -> None:
    image = tmp_path / "note.png"
    Image.new("RGB", (64, 32), "white").save(image)
    with ScriptedOpenAIServer(calculator_then_answer, failures=[429, 500]) as server:
        config = AgentRunConfig(
            model="openai:test-model",
            out=tmp_path / "out",
            task="What is 6 + 8?",
            images=[image],
            tools=["calculator"],
            backend=ModelOptions(base_url=server.base_url),
        )
        result, dataset = asyncio.run(run_agent(config, progress=False))
        statuses = [r.status for r in server.requests]
        # a rerun finds the trajectory done and asks nothing of the server
        calls = server.calls
        again, _ = asyncio.run(run_agent(config, progress=False))
        assert server.calls == calls and again.skipped == 1 and again.written == 0

    assert statuses == [429, 500, 200, 200]
    assert result.written == 1
    (trajectory,) = list(dataset)
    assert trajectory.status == "completed" and trajectory.final_answer == "14"
    assert trajectory.usage.retries == 2 and trajectory.steps[0].usage.retries == 2
    assert trajectory.steps[0].latency_s > 0
    assert len(dataset) == 1
    assert server.requests[0].image_urls()[0].startswith("data:image/png;base64,")
    assert dataset.state.usage("agent").retries == 2


@pytest.mark.slow
def test_tiny_local_qwen2_vl_runs_to_the_step_budget(tmp_path: Path) -> None:
    from tracetune.models.tiny import init_tiny

    init_tiny("qwen2_vl", tmp_path / "model")
    image = tmp_path / "img.png"
    Image.new("RGB", (112, 112), "gray").save(image)
    config = AgentRunConfig(
        model=f"local:{tmp_path / 'model'}",
        out=tmp_path / "out",
        task="Describe it.",
        images=[image],
        max_steps=3,
        max_errors=10,
        max_tokens=16,
    )
    _, dataset = asyncio.run(run_agent(config, progress=False))
    (trajectory,) = list(dataset)
    assert trajectory.status == "max_steps"
    assert [s.index for s in trajectory.steps] == [0, 1, 2]
    assert all(s.raw and s.usage.completion_tokens > 0 for s in trajectory.steps)
    assert all(s.error is not None for s in trajectory.steps)  # an untrained model cannot act


def test_killed_agent_run_resumes_with_each_task_once(tmp_path: Path) -> None:
    n = 24
    (tmp_path / "tasks.jsonl").write_text(
        "\n".join(json.dumps({"id": f"task-{i}", "query": f"Compute {i}+1"}) for i in range(n))
    )

    def answer(body: dict[str, Any]) -> str:
        return 'Thought: easy\nAction: {"name": "final_answer", "arguments": {"answer": "ok"}}'

    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "tracetune.cli",
        "agent",
        "run",
        "--model",
        "openai:test-model",
        "--tasks",
        str(tmp_path / "tasks.jsonl"),
        "--out",
        str(out),
        "--concurrency",
        "2",
        "--quiet",
    ]
    env = {**os.environ, "OPENAI_API_KEY": "test"}
    with ScriptedOpenAIServer(answer, latency_s=0.15) as server:
        cmd += ["--base-url", server.base_url]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while server.calls < n // 2 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
        partial = len(Dataset.open(out, Trajectory)) if (out / "manifest.json").exists() else 0
        assert partial < n
        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr

    ids = [t.task.id for t in Dataset.open(out, Trajectory)]
    assert sorted(ids) == sorted(f"task-{i}" for i in range(n))
    assert len(ids) == len(set(ids))


def test_samples_of_one_task_are_drawn_apart_not_copied_from_the_cache(tmp_path: Path) -> None:
    with ScriptedOpenAIServer(calculator_then_answer) as server:
        config = AgentRunConfig(
            model="openai:test-model",
            out=tmp_path / "out",
            task="What is 6 + 8?",
            tools=["calculator"],
            samples=3,
            temperature=1.0,
            backend=ModelOptions(base_url=server.base_url),
        )
        result, dataset = asyncio.run(run_agent(config, progress=False))
        # three episodes of two steps each: every one reached the server
        assert result.written == 3 and server.calls == 6
        first_steps = [r.body for r in server.requests if len(r.body["messages"]) == 2]
        assert sorted(str(b.get("seed")) for b in first_steps) == ["1", "2", "None"]
        assert sorted(str(t.sampling.get("seed")) for t in dataset) == ["1", "2", "None"]
        calls = server.calls
        again, _ = asyncio.run(run_agent(config, progress=False))
        assert again.skipped == 3 and server.calls == calls
