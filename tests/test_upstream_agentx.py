"""Agent-X in its released layout: ``eval run agentx`` reads ``file_path`` (one image, a
comma-separated list, or a video), and ``eval score agentx`` reads Agent-X's own prediction
file without a judge.

Layout written here from mbzuai-oryx/Agent-X: ``data.json`` maps each id to a one-element list
of ``{file_path, query, query_type, tool_metadata: {ToolName: {...}}, reasoning_steps: [{step,
task, tool, input, output, thought}], final_answer: {value, justification}}``, with the media
in ``files/`` (``scripts/closed_source_models/run_inference_gpt.py`` reads
``os.path.join(base_path, name)`` for each name of ``file_path.split(",")`` and treats .mp4,
.avi and .mov as videos). Its inference scripts save a JSON list of
``{key: {"query", "filename", "reasoning_steps", "final_answer"}}`` (``reasoning_steps`` is
``""`` when the model's reply did not parse), which ``evaluation/run_eval_gpt_as_judge.py``
reads with ``--pred_path``.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from tracetune.cli import app
from tracetune.evaluate.agentx_run import VIDEO_FRAMES, media_names
from tracetune.evaluate.runs import EvalRunError, bench_config, run_benchmark
from tracetune.models.base import ModelOptions
from tracetune.testing import ScriptedOpenAIServer

TOOLS = {"OCR": {"description": "Read the text in an image."}}


@pytest.fixture(autouse=True)
def _api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "test")


def _record(file_path: str, query: str) -> list[dict[str, Any]]:
    return [
        {
            "file_path": file_path,
            "query": query,
            "query_type": "objective",
            "tool_metadata": TOOLS,
            "reasoning_steps": [
                {
                    "step": 1,
                    "task": "Read it",
                    "tool": "OCR",
                    "input": {"image": "x"},
                    "output": "42",
                    "thought": "The text says 42.",
                }
            ],  # fmt: skip
            "final_answer": {"value": "42", "justification": "read"},
        }
    ]


def _video(path: Path, frames: int = 30) -> None:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (64, 48))
    for i in range(frames):
        writer.write(np.full((48, 64, 3), i * 8, np.uint8))
    writer.release()


def _agentx(root: Path) -> Path:
    files = root / "files"
    files.mkdir(parents=True)
    for name, shade in (("one.jpg", 40), ("left.png", 90), ("right.png", 160)):
        Image.new("RGB", (32, 32), (shade, shade, shade)).save(files / name)
    _video(files / "clip.mp4")
    (files / "broken.mp4").write_bytes(b"not a video at all" * 10)
    (files / "cut.jpg").write_bytes((files / "one.jpg").read_bytes()[:40])  # truncated
    data = {
        "0001": _record("one.jpg", "single image query"),
        "0002": _record("left.png, right.png", "two image query"),
        "0003": _record("clip.mp4", "video query"),
        "0004": _record("broken.mp4", "broken video query"),
        "0005": _record("cut.jpg", "truncated image query"),
    }
    (root / "data.json").write_text(json.dumps(data, indent=1))
    return root / "data.json"


def _images_in(body: dict[str, Any]) -> int:
    return sum(
        1
        for m in body["messages"]
        if isinstance(m.get("content"), list)
        for part in m["content"]
        if part.get("type") == "image_url"
    )


def test_media_names_reads_file_path_lists() -> None:
    assert media_names({"file_path": "a.jpg"}) == ["a.jpg"]
    assert media_names({"file_path": "a.jpg, b.jpg,c.jpg"}) == ["a.jpg", "b.jpg", "c.jpg"]
    assert media_names({"file_path": "v.mp4", "image": "v.mp4"}) == ["v.mp4"]
    assert media_names({"images": ["a.png", "b.png"]}) == ["a.png", "b.png"]


def test_run_reads_file_path_images_lists_and_video_frames(tmp_path: Path) -> None:
    data = _agentx(tmp_path / "AgentX")
    seen: dict[str, int] = {}

    def controller(body: dict[str, Any]) -> str:
        query = next(
            p["text"]
            for m in body["messages"]
            if m["role"] == "user" and isinstance(m["content"], list)
            for p in m["content"]
            if p.get("type") == "text"
        )
        for key in ("single image", "two image", "broken video", "truncated image", "video"):
            if key in query:
                seen[key] = _images_in(body)
                break
        return 'Thought: done.\nAction: {"name": "final_answer", "arguments": {"answer": "42"}}'

    notes: list[str] = []
    with ScriptedOpenAIServer(controller) as server:
        config = bench_config(
            "agentx",
            model="openai:m",
            out=tmp_path / "run",
            data=data.parent,
            backend=ModelOptions(base_url=server.base_url),
        )
        metrics = asyncio.run(run_benchmark(config, progress=False, notify=notes.append))
    # every query that ran had its media: 1 image, 2 images, 8 frames of the video
    assert seen == {"single image": 1, "two image": 2, "video": VIDEO_FRAMES}
    assert VIDEO_FRAMES == 8
    # the undecodable video and the truncated image are counted skips with their reasons,
    # never run without their media
    skipped = metrics["skipped_queries"]
    assert list(skipped) == ["0004", "0005"]
    assert "no frame" in skipped["0004"] or "cannot open" in skipped["0004"]
    assert "cut.jpg cannot be read" in skipped["0005"]
    assert any("2 of 5 queries skipped" in n for n in notes)
    report = metrics["reports"]["agentx"]
    assert report["n_items"] == 5
    assert report["details"]["missing_predictions"] == ["0004", "0005"]


def test_missing_media_stops_the_run_before_any_model_call(tmp_path: Path) -> None:
    data = _agentx(tmp_path / "AgentX")
    (data.parent / "files" / "right.png").unlink()
    raw = json.loads(data.read_text())
    raw["0005"] = _record("", "no media at all")
    data.write_text(json.dumps(raw))
    with ScriptedOpenAIServer(lambda body: "unused") as server:
        config = bench_config(
            "agentx",
            model="openai:m",
            out=tmp_path / "run",
            data=data,
            backend=ModelOptions(base_url=server.base_url),
        )
        with pytest.raises(EvalRunError) as err:
            asyncio.run(run_benchmark(config, progress=False))
        assert not server.requests
    message = str(err.value)
    assert "2 of 5 Agent-X queries cannot get their media" in message
    assert "'0002'" in message and "right.png" in message
    assert "'0005'" in message and "file_path" in message


def test_score_reads_agentx_prediction_file_without_a_judge(tmp_path: Path) -> None:
    data = _agentx(tmp_path / "AgentX")
    preds = [
        {"0001": {"query": "single image query", "filename": "one.jpg",
                  "reasoning_steps": [{"step": 1, "task": "Read", "tool": "OCR",
                                       "tool_output": "42", "thought": "ok"}],
                  "final_answer": {"value": "42", "justification": "read"}}},
        {"0002": {"query": "two image query", "filename": "left.png, right.png",
                  "reasoning_steps": [{"step": 1, "task": "Look", "tool_used": "SceneDescriber",
                                       "tool_output": "a wall", "thought": "hm"},
                                      {"step": 2, "task": "Read", "tool_used": "OCR",
                                       "tool_output": "42", "thought": "ok"}],
                  "final_answer": {"value": "42", "justification": "read"}}},
        {"0003": {"query": "video query", "filename": "clip.mp4", "reasoning_steps": "",
                  "final_answer": {"value": "", "justification": ""}}},
    ]  # fmt: skip
    pred_file = tmp_path / "gpt_final_results.json"
    pred_file.write_text(json.dumps(preds, indent=2))
    result = CliRunner().invoke(
        app, ["eval", "score", "agentx", "--gold", str(data), "--predictions", str(pred_file)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["metrics"]) == {"tool_precision", "toolset_accuracy"}
    assert report["details"]["judged"] is False and "--judge" in report["details"]["note"]
    # 0001: OCR=OCR -> 1; 0002: [SceneDescriber, OCR] vs gold [OCR] -> 0/2, F1 2/3;
    # 0003: unparsed reply -> no steps -> 0; 0004, 0005: no prediction -> 0
    assert report["metrics"]["tool_precision"] == pytest.approx((1 + 0 + 0 + 0 + 0) / 5)
    assert report["metrics"]["toolset_accuracy"] == pytest.approx((1 + 2 / 3 + 0 + 0 + 0) / 5)
    assert report["details"]["missing_predictions"] == ["0004", "0005"]
