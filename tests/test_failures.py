"""Failures are never hidden: a failing endpoint makes failed items (printed, retried on the
next run, exit status 3), and stages can retry what they dropped for a sampling reason.

Every endpoint here is real HTTP on loopback: a scripted OpenAI-compatible server answering
503 or a 400 "context length exceeded", a port nobody listens on, and a healthy server.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tracetune.cli import app
from tracetune.runner.outcome import ITEMS_FAILED_EXIT
from tracetune.schema import Trajectory
from tracetune.store import Dataset, RunState
from tracetune.testing import ScriptedOpenAIServer

ANSWER = 'Thought: easy\nAction: {"name": "final_answer", "arguments": {"answer": "ok"}}'
CONTEXT_EXCEEDED = (
    400,
    "This model's maximum context length is 4096 tokens. However, your messages resulted in "
    "5120 tokens. Please reduce the length of the messages.",
)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _agent_run(tmp_path: Path, base_url: str, tasks: int = 1, *extra: str) -> Any:
    """``tracetune agent run`` on ``tasks`` one-line tasks, no retries (fast failures)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    task_file = tmp_path / "tasks.jsonl"
    task_file.write_text(
        "\n".join(json.dumps({"id": f"t{i}", "query": f"Say ok {i}"}) for i in range(tasks))
    )
    config = tmp_path / "agent.yaml"
    config.write_text("backend: {max_retries: 0, timeout_s: 5}\n")
    return CliRunner().invoke(
        app,
        [
            "agent", "run", "--model", "openai:test-model", "--tasks", str(task_file),
            "--out", str(tmp_path / "out"), "--base-url", base_url, "--concurrency", "1",
            "--config", str(config), "--quiet", *extra,
        ],
    )  # fmt: skip


def _states(out: Path) -> dict[str, str]:
    state = RunState(out / "state.sqlite")
    try:
        return {key: status for key, status, _ in state.items("agent")}
    finally:
        state.close()


@pytest.mark.parametrize(
    ("failure", "said"),
    [
        ((503, "model is loading"), "HTTP 503: model is loading"),
        (CONTEXT_EXCEEDED, "maximum context length is 4096 tokens"),
    ],
    ids=["503", "400-context-exceeded"],
)
def test_endpoint_failure_is_a_failed_item_retried_by_the_rerun(
    tmp_path: Path, failure: tuple[int, str], said: str
) -> None:
    with ScriptedOpenAIServer(lambda body: ANSWER, failures=[failure]) as server:
        # Two tasks, one at a time: the first meets the failure, the second is answered.
        first = _agent_run(tmp_path, server.base_url, tasks=2)
        text = " ".join(first.output.split())
        assert first.exit_code == ITEMS_FAILED_EXIT, first.output
        assert "1 written" in text and "1 failed" in text  # the summary line
        assert said in text and "rerun the same command" in text  # the reason, and what to do
        assert "Traceback" not in text
        # Only the answered task is on disk; the failed one is marked failed, not done.
        (written,) = list(Dataset.open(tmp_path / "out", Trajectory))
        assert written.status == "completed"
        assert sorted(_states(tmp_path / "out").values()) == ["done", "failed"]

        # The endpoint is healthy now: the rerun retries the failed task, and only it.
        calls = server.calls
        second = _agent_run(tmp_path, server.base_url, tasks=2)
        assert second.exit_code == 0, second.output
        assert "1 written, 1 already done" in second.output
        assert server.calls == calls + 1
    ids = sorted(t.task.id for t in Dataset.open(tmp_path / "out", Trajectory))
    assert ids == ["t0", "t1"]
    assert sorted(_states(tmp_path / "out").values()) == ["done", "done"]


def test_unreachable_endpoint_fails_the_item_then_a_live_one_completes_it(
    tmp_path: Path,
) -> None:
    dead = f"http://127.0.0.1:{_closed_port()}/v1"
    first = _agent_run(tmp_path, dead)
    text = " ".join(first.output.split())
    assert first.exit_code == ITEMS_FAILED_EXIT
    assert "Connection error" in text and "t0" in text and "Traceback" not in text
    assert _states(tmp_path / "out") and set(_states(tmp_path / "out").values()) == {"failed"}
    assert len(Dataset.open(tmp_path / "out", Trajectory)) == 0

    with ScriptedOpenAIServer(lambda body: ANSWER) as server:
        second = _agent_run(tmp_path, server.base_url)
    assert second.exit_code == 0, second.output
    assert "1 written, 0 already done" in second.output
    (trajectory,) = list(Dataset.open(tmp_path / "out", Trajectory))
    assert trajectory.status == "completed" and trajectory.final_answer == "ok"


# -- server compatibility: optional stop strings, servers that ignore n and seed ------------
def _rejects_stop(body: dict[str, Any]) -> str:
    """Like `transformers serve` with a VLM: any request carrying `stop` is a server error."""
    if "stop" in body:
        raise RuntimeError("processor has no get_vocab")
    # Servers that were sent no stop string run on past it; the client must cut there.
    return ANSWER + "\nObservation: a line the model made up"


def test_stop_strings_are_optional_per_backend(tmp_path: Path) -> None:
    with ScriptedOpenAIServer(_rejects_stop) as server:
        refused = _agent_run(tmp_path / "default", server.base_url)
        assert refused.exit_code == ITEMS_FAILED_EXIT and "HTTP 500" in refused.output
        assert server.requests[-1].body["stop"] == ["\nObservation:"]

        flag = _agent_run(tmp_path / "flag", server.base_url, 1, "--no-stop")
        assert flag.exit_code == 0, flag.output
        assert "stop" not in server.requests[-1].body

        # The same from the backend config: `stop: none`.
        (tmp_path / "yaml").mkdir()
        task_file = tmp_path / "yaml" / "tasks.jsonl"
        task_file.write_text(json.dumps({"id": "t0", "query": "Say ok"}))
        config = tmp_path / "yaml" / "agent.yaml"
        config.write_text(
            f"model: openai:test-model\ntasks: {task_file}\nout: {tmp_path / 'yaml' / 'out'}\n"
            f"backend: {{base_url: '{server.base_url}', max_retries: 0, stop: none}}\n"
        )
        from_yaml = CliRunner().invoke(app, ["agent", "run", "--config", str(config), "--quiet"])
        assert from_yaml.exit_code == 0, from_yaml.output
        assert "stop" not in server.requests[-1].body

    for out in (tmp_path / "flag" / "out", tmp_path / "yaml" / "out"):
        (trajectory,) = list(Dataset.open(out, Trajectory))
        assert trajectory.status == "completed" and trajectory.final_answer == "ok"
        assert "made up" not in trajectory.steps[0].raw  # cut at the stop string on arrival


def test_a_server_ignoring_n_and_seed_is_warned_about_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import asyncio

    from tracetune.models.base import Sampling, load_model

    async def sample(base_url: str) -> list[list[str]]:
        model = load_model("openai:test-model", base_url=base_url, max_retries=0)
        sampling = Sampling(temperature=0.8, seed=7)
        try:
            return [
                (
                    await model.generate([{"role": "user", "content": q}], n=3, sampling=sampling)
                ).texts
                for q in ("first", "second")
            ]
        finally:
            await model.aclose()

    def same_every_time(body: dict[str, Any]) -> str:
        return "always this"

    def by_seed(body: dict[str, Any]) -> str:
        return f"sample for seed {body.get('seed')}"

    logger = "tracetune.models.openai_backend"
    with ScriptedOpenAIServer(same_every_time, honour_n=False) as server:
        with caplog.at_level("WARNING", logger=logger):
            texts = asyncio.run(sample(server.base_url))
    assert texts == [["always this"] * 3] * 2
    warnings = [r for r in caplog.records if "ignore `n` and `seed`" in r.getMessage()]
    assert len(warnings) == 1 and server.base_url in warnings[0].getMessage()

    caplog.clear()
    with ScriptedOpenAIServer(by_seed, honour_n=False) as server:
        with caplog.at_level("WARNING", logger=logger):
            texts = asyncio.run(sample(server.base_url))
    assert len(set(texts[0])) == 3
    assert not [r for r in caplog.records if "ignore `n`" in r.getMessage()]


# -- retrying drops of a sampling kind --------------------------------------------------------
def test_retry_dropped_asks_the_model_again_for_drops_of_that_reason(tmp_path: Path) -> None:
    """A malformed generator reply is dropped ("malformed generator output"); a plain rerun
    keeps the drop, `--retry-dropped` processes the item again with a fresh model call (not the
    cached malformed reply) and keeps what the model now writes."""
    from mtrace_script import write_seeds

    from tracetune.schema import Task

    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds)
    replies = iter(
        [
            'Sure! Here are the tasks: [{"query": "broken',
            json.dumps(
                [{"query": "Read the total on the receipt in the photo.", "tools": ["ocr"]}]
            ),
        ]
    )
    run = tmp_path / "run"

    def queries(server: ScriptedOpenAIServer, *extra: str) -> Any:
        return CliRunner().invoke(
            app,
            ["synth", "queries", "--out", str(run), "--seeds", str(seeds),
             "--generator", "openai:test-model", "--base-url", server.base_url,
             "--batches", "1", "--tools", "ocr,visual_qa,inspect_file,calculator,face_detection",
             "--embedder", "hashing",
             "--quiet", *extra],
        )  # fmt: skip

    with ScriptedOpenAIServer(lambda body: next(replies)) as server:
        first = queries(server)
        assert first.exit_code == 0, first.output
        assert "malformed generator output" in first.output
        assert server.calls == 1

        again = queries(server)  # a drop is final by default: nothing is asked
        assert again.exit_code == 0 and server.calls == 1

        unmatched = queries(server, "--retry-dropped", "near-duplicate")
        assert unmatched.exit_code == 0 and server.calls == 1
        assert "no dropped item matches" in unmatched.output
        assert "'malformed generator output' (1)" in unmatched.output

        retried = queries(server, "--retry-dropped", "Malformed")
        assert retried.exit_code == 0, retried.output
        assert server.calls == 2  # asked afresh, not answered from the cache
        assert "retrying 1 dropped item" in retried.output

    kept = [t.query for t in Dataset.open(run / "queries", Task)]
    assert kept == ["Read the total on the receipt in the photo."]
    state = RunState(run / "candidates" / "state.sqlite")
    try:
        assert {s for _, s, _ in state.items("queries.generate")} == {"done"}
    finally:
        state.close()


def test_a_tool_whose_model_is_down_fails_the_item_instead_of_the_step(tmp_path: Path) -> None:
    """visual_qa asks a VLM: when that endpoint is down the episode is not written as a run
    of tool errors (it would look like a model that cannot use the tool); the item fails."""
    import asyncio

    from PIL import Image

    from tracetune.agent import Agent
    from tracetune.models.base import BackendError, load_model
    from tracetune.schema import Task
    from tracetune.store import AssetStore
    from tracetune.testing import ScriptedChatModel
    from tracetune.tools import get_tool

    assets = AssetStore(tmp_path / "ds")
    photo = assets.put_image(Image.new("RGB", (32, 32), "red"), "photo.png")
    call = 'Thought: look\nAction: {"name": "visual_qa", "arguments": {"image": "photo.png", "question": "Colour?"}}'  # noqa: E501
    controller = ScriptedChatModel([call, ANSWER])
    dead = load_model(
        "openai:tool-model", base_url=f"http://127.0.0.1:{_closed_port()}/v1", max_retries=0
    )
    agent = Agent(controller, [get_tool("visual_qa")], tool_model=dead)
    task = Task(id="t", query="What colour is the photo?", files=[photo])
    with pytest.raises(BackendError, match="Connection error"):
        asyncio.run(agent.run(task, assets, assets))


def test_agent_samples_that_a_server_returns_identical_are_warned_about(tmp_path: Path) -> None:
    """`agent run --samples 3` at temperature > 0 asks with seeds None, 1, 2; a server that
    ignores the seed answers the same every time, and the run says so once."""
    import logging

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("tracetune.models.openai_backend")
    handler = Keep(level=logging.WARNING)
    logger.addHandler(handler)
    try:
        with ScriptedOpenAIServer(lambda body: ANSWER) as server:
            result = _agent_run(
                tmp_path, server.base_url, 1, "--samples", "3", "--temperature", "0.9"
            )
    finally:
        logger.removeHandler(handler)
    assert result.exit_code == 0, result.output
    warned = [r for r in records if "ignore `n` and `seed`" in r.getMessage()]
    assert len(warned) == 1
