"""``eval run vqa|dynvqa``: a controller answers a VQA file directly or the MMAT way (RR/ORR
through ``tracetune.engine.infer``), over real HTTP with scripted replies, real OCR, the
exact scorers; reruns resume."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tracetune.cli import app
from tracetune.evaluate.adapter import BenchConfig
from tracetune.evaluate.runs import EvalRunError, bench_config, run_benchmark
from tracetune.models.base import ModelOptions
from tracetune.schema import Trajectory
from tracetune.store import Dataset
from tracetune.testing import ScriptedOpenAIServer
from tracetune.view.report import build_report

VQA = Path(__file__).parent / "fixtures" / "vqa_small"


@pytest.fixture(autouse=True)
def _api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "test")


def _run(config: BenchConfig) -> dict[str, Any]:
    return asyncio.run(run_benchmark(config, progress=False))


def _texts(body: dict[str, Any]) -> list[str]:
    out = []
    for m in body["messages"]:
        content = m["content"]
        if isinstance(content, str):
            out.append(content)
        else:
            out += [p["text"] for p in content if p.get("type") == "text"]
    return out


def direct(body: dict[str, Any]) -> str:
    question = _texts(body)[-1]
    if "tea" in question:
        return "The answer is: 12.5"
    if "apples" in question:
        return "4"
    return "(A) Tea"


def test_vqa_direct_scores_every_kind_and_resumes(tmp_path: Path) -> None:
    with ScriptedOpenAIServer(direct) as server:
        config = bench_config(
            "vqa",
            model="openai:m",
            out=tmp_path / "run",
            data=VQA / "vqa.jsonl",
            backend=ModelOptions(base_url=server.base_url),
        )
        metrics = _run(config)
        requests = list(server.requests)
        again = _run(config)
        assert server.calls == len(requests) == 3  # nothing asked twice
        # the same directory in another answer mode would mix two protocols: refused
        with pytest.raises(EvalRunError, match="answer_mode"):
            _run(config.model_copy(update={"answer_mode": "rr"}))
    report = metrics["reports"]["vqa"]
    # v2 has ten human answers, seven "4": VQAv2 consensus gives 1
    assert report["metrics"] == {"vqa_accuracy": 100.0, "mc_accuracy": 100.0, "accuracy": 100.0}
    assert again["run"]["written"] == 0 and again["reports"] == metrics["reports"]
    # one turn each, with the image, the choices and ingest's answer-style line
    assert all(len(r.image_urls()) == 1 and len(r.messages) == 1 for r in requests)
    choice = next(r for r in requests if "costs more" in r.texts()[-1]).texts()[-1]
    assert "A. Tea\nB. Cake" in choice and "option's letter" in choice
    gold = [json.loads(x) for x in (tmp_path / "run/gold.jsonl").read_text().splitlines()]
    assert gold[1] == {
        "id": "v2",
        "answers": json.loads((VQA / "vqa.jsonl").read_text().splitlines()[1])["answer"],
    }
    records = [json.loads(x) for x in (tmp_path / "run/records.jsonl").read_text().splitlines()]
    episodes = {t.id: t for t in Dataset.open(tmp_path / "run/trajectories", Trajectory)}
    assert {r["item_id"] for r in records} == {"v1", "v2", "v3"}
    assert all(episodes[r["trajectory_id"]].steps[0].raw == r["prediction"] for r in records)


def rr(body: dict[str, Any]) -> str:
    texts = _texts(body)
    turn = sum(1 for m in body["messages"] if m["role"] == "assistant")
    if turn == 0:
        return (
            "<THOUGHT>I read the receipt.</THOUGHT><OPERATOR>ocr</OPERATOR>"
            "<SIGNAL>continue</SIGNAL>"
        )
    if turn == 1:
        return "<THOUGHT>The line reads Tea 12.5.</THOUGHT><SIGNAL>end</SIGNAL>"
    return "12.5" if any("Tea 12.5" in t for t in texts) else "unknown"


def test_vqa_rr_runs_the_mmat_loop_with_real_ocr(tmp_path: Path) -> None:
    with ScriptedOpenAIServer(rr) as server:
        config = bench_config(
            "vqa",
            model="openai:tuned",
            out=tmp_path / "run",
            data=VQA / "vqa.jsonl",
            answer_mode="rr",
            tools=["ocr"],
            limit=1,
            backend=ModelOptions(base_url=server.base_url),
        )
        metrics = _run(config)
        system = server.requests[0].messages[0]["content"]
    assert "<OPERATOR>" in system  # the RR grammar, as in training
    assert metrics["reports"]["vqa"]["metrics"]["vqa_accuracy"] == 100.0
    (episode,) = Dataset.open(tmp_path / "run/trajectories", Trajectory).records()
    assert [s.action is not None for s in episode.steps] == [False, False, True]
    assert "Tea 12.5" in (episode.steps[0].observation.text if episode.steps[0].observation else "")
    assert episode.final_answer == "12.5" and episode.metadata["operator_calls"] == ["ocr"]
    assert episode.status == "completed" and episode.prompt_hash


def orr(body: dict[str, Any]) -> str:
    user = _texts(body)[-1]
    answer = "tea" if "Tea" in user else "red fruit"
    return f"<THOUGHT>From the operator results.</THOUGHT><ANSWER>The answer is: {answer}</ANSWER>"


def test_dynvqa_orr_token_recall_from_the_cli_and_its_report(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with ScriptedOpenAIServer(orr) as server:
        result = CliRunner().invoke(
            app,
            [
                "eval",
                "run",
                "dynvqa",
                "--data",
                str(VQA / "dynvqa.json"),
                "--model",
                "openai:tuned",
                "--base-url",
                server.base_url,
                "--answer-mode",
                "orr",
                "--tools",
                "ocr",
                "--out",
                str(out),
                "--quiet",
            ],
        )
        requests = list(server.requests)
    assert result.exit_code == 0, result.output
    assert len(requests) == 2 and all(len(r.messages) == 2 for r in requests)  # one turn each
    drink = next(r for r in requests if "drink" in r.texts()[-1])
    assert "Tea 12.5" in drink.texts()[-1]  # ORR: the OCR ran before the model
    # d1 "tea" covers the alias "tea" (1); d2 "red fruit" covers half of "red apples" (1/2)
    report = json.loads((out / "metrics.json").read_text())["reports"]["dynvqa"]
    assert report["metrics"]["token_recall"] == pytest.approx(75.0, abs=1e-9)
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["question_id"] for r in rows] == ["d1", "d2"]
    page = build_report([out], tmp_path / "report")
    (item,) = page.item_pages
    assert item.name == "d2.html" and "trajectory <code>traj-" in item.read_text()
    assert "| token_recall | 75.00 |" in page.markdown.read_text()


def test_vqa_wrong_layouts_say_what_rows_look_like(tmp_path: Path) -> None:
    def config(data: Path, name: str) -> BenchConfig:
        return bench_config("dynvqa", model="openai:m", out=tmp_path / name, data=data)

    web = tmp_path / "web.jsonl"
    row = {"question_id": "q", "image_url": "https://x/y.jpg", "question": "?", "answer": ["a"]}
    web.write_text(json.dumps(row) + "\n")
    with pytest.raises(EvalRunError, match="image_url are web addresses"):
        _run(config(web, "a"))
    missing = tmp_path / "missing.jsonl"
    row = {"question_id": "q", "image": "nowhere.png", "question": "?", "answer": ["a"]}
    missing.write_text(json.dumps(row) + "\n")
    with pytest.raises(EvalRunError, match="missing_image.*relative to the data file"):
        _run(config(missing, "b"))
    gta = Path(__file__).parent / "fixtures" / "gta_small" / "dataset.json"
    with pytest.raises(EvalRunError, match="must hold a JSON list of rows"):
        _run(config(gta, "e"))
    with pytest.raises(EvalRunError, match="not a .jsonl or .json file"):
        _run(config(VQA, "c"))
    with pytest.raises(EvalRunError, match="--data"):
        _run(bench_config("vqa", model="openai:m", out=tmp_path / "d"))
