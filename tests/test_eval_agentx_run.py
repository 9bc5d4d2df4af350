"""`eval run agentx`: a scripted controller and a scripted judge over loopback HTTP, the real
OCR and calculator tools, Agent-X's scorer; reruns ask neither model again."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tracetune.cli import app
from tracetune.evaluate.adapter import BenchConfig
from tracetune.evaluate.agentx_run import AGENTX_TO_GTA, metadata_tools
from tracetune.evaluate.runs import EvalRunError, bench_config, headline_summary, run_benchmark
from tracetune.models.base import ModelOptions
from tracetune.testing import ScriptedOpenAIServer
from tracetune.view.report import build_report

DATA = Path(__file__).parent / "fixtures" / "agentx_small"


@pytest.fixture(autouse=True)
def _api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "test")


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


def _action(thought: str, name: str, arguments: dict[str, Any]) -> str:
    return f"Thought: {thought}\nAction: " + json.dumps({"name": name, "arguments": arguments})


def controller(body: dict[str, Any]) -> str:
    """Reads the receipt with OCR, adds what it read with the calculator; tries the counter
    on the street (unavailable here) and answers; reads the sign and answers."""
    messages = body["messages"]
    query = _text(messages[1]["content"])
    last = _text(messages[-1]["content"])
    turn = sum(1 for m in messages if m["role"] == "assistant")
    if "receipt" in query:
        if turn == 0:
            return _action("I need the prices. Then I add them.", "OCR", {"image": "receipt.png"})
        if turn == 1:
            prices = re.findall(r"\b\d+\.\d\d\b", last)
            return _action("Add the two prices.", "Calculator", {"expression": " + ".join(prices)})
        return _action(
            "The calculator gave the total.",
            "final_answer",
            {"answer": last.removeprefix("Observation:").strip()},
        )
    if "street" in query:
        if turn == 0:
            return _action(
                "Count the cars.", "ObjectCounter", {"image": "street.png", "text": "car"}
            )
        return _action("No counter here; I judge by eye.", "final_answer", {"answer": "quiet"})
    if turn == 0:
        return _action("Read the sign first.", "OCR", {"image": "sign.png"})
    return _action("It says STOP.", "final_answer", {"answer": "STOP" if "STOP" in last else "?"})


JUDGE_SCORES = {
    "grounding": 1.0,
    "use of context": 0.5,
    "tool accuracy": 0.75,
    "faithfulness of the plan": 0.8,
    "factual precision": 0.9,
    "semantic accuracy": 0.6,
    "goal accuracy": 0.0,
}


def judge(body: dict[str, Any]) -> str:
    prompt = _text(body["messages"][1]["content"])
    found = re.search(r"What to grade: ([a-z ]+)", prompt)
    assert found is not None, prompt[:300]
    score = JUDGE_SCORES[found.group(1).strip()]
    steps = re.search(r"exactly (\d+) numbers", prompt)
    if steps:
        return json.dumps({"step_scores": [score] * int(steps.group(1))})
    return json.dumps({"score": score, "justification": "scripted"})


def _config(tmp_path: Path, server: ScriptedOpenAIServer, **kw: Any) -> BenchConfig:
    return bench_config(
        "agentx",
        model="openai:m",
        out=tmp_path / "run",
        data=kw.pop("data", DATA),
        backend=ModelOptions(base_url=server.base_url),
        **kw,
    )


def _run(config: BenchConfig, notes: list[str] | None = None) -> dict[str, Any]:
    return asyncio.run(
        run_benchmark(config, progress=False, notify=(notes.append if notes is not None else None))
    )


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_agentx_run_with_a_judge_scores_and_reruns_without_calls(tmp_path: Path) -> None:
    notes: list[str] = []
    with ScriptedOpenAIServer(controller) as agent, ScriptedOpenAIServer(judge) as jury:
        config = _config(tmp_path, agent, judge="openai:judge", judge_base_url=jury.base_url)
        metrics = _run(config, notes)
        agent_calls, judge_calls = len(agent.requests), len(jury.requests)
        # up front: the toolset, Agent-X names on GTA wrappers, and what cannot run
        assert "Agent-X toolset" in notes[0] and "OCR: available" in notes[0]
        assert "Translator: unavailable" in notes[0] and "ObjectCounter: unavailable" in notes[0]
        assert metrics["unknown_tools"] == ["Translator"]
        assert metrics["affected_queries"] == {
            "ax-sign": ["Translator"],
            "ax-street": ["ObjectCounter", "SceneDescriber"],
        }
        # predictions in Agent-X's shape, from real OCR and the real calculator
        preds = {p["id"]: p for p in _lines(tmp_path / "run/predictions.jsonl")}
        receipt = preds["ax-receipt"]
        assert [s["tool"] for s in receipt["reasoning_steps"]] == ["OCR", "Calculator"]
        first, second = receipt["reasoning_steps"]
        assert first["step"] == 1 and first["input"] == {"image": "receipt.png"}
        assert "Coffee 4.50" in first["output"] and "Bagel 3.25" in first["output"]
        assert first["task"] == "I need the prices." and first["thought"].endswith("add them.")
        assert second == {
            "step": 2,
            "task": "Add the two prices.",
            "tool": "Calculator",
            "input": {"expression": "4.50 + 3.25"},
            "output": "7.75",
            "thought": "Add the two prices.",
        }
        assert receipt["final_answer"] == {
            "value": "7.75",
            "justification": "The calculator gave the total.",
        }
        street = preds["ax-street"]["reasoning_steps"]
        assert [s["tool"] for s in street] == ["ObjectCounter"]
        assert "not available here" in street[0]["output"]

        # headline: the receipt alone (its tools all run); judged metrics from the judge
        head = metrics["reports"]["agentx"]
        assert head["n_items"] == 1 and "gold tools all run here" in head["details"]["subset"]
        m = head["metrics"]
        assert m["tool_precision"] == 1.0 and m["toolset_accuracy"] == 1.0
        assert m["grounding"] == pytest.approx(1.0) and m["context"] == pytest.approx(0.5)
        assert m["tool_accuracy"] == pytest.approx(0.75)
        assert m["faithfulness"] == pytest.approx(0.8)
        assert m["factual_precision"] == pytest.approx(0.9)
        assert m["semantic_accuracy"] == pytest.approx(0.6)
        assert m["goal_accuracy"] == 1.0  # "7.75" == gold "7.75": no judge needed
        everything = metrics["reports"]["agentx/all-queries"]["metrics"]
        # street: gold [SceneDescriber, ObjectCounter] vs [ObjectCounter]: 0/2, F1 2/3;
        # sign: gold [OCR, Translator] vs [OCR]: 1/2, F1 2/3
        assert everything["tool_precision"] == pytest.approx((1 + 0 + 0.5) / 3)
        assert everything["toolset_accuracy"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
        # grounding: one judged pair of two steps on street and sign: 1/2 each
        assert everything["grounding"] == pytest.approx((1 + 0.5 + 0.5) / 3)
        # goal: street (subjective) judged 0; sign "STOP" vs "ARRET" judged 0
        assert everything["goal_accuracy"] == pytest.approx(1 / 3)
        assert metrics["judged"] is True and "note" not in metrics
        assert judge_calls > 0 and agent_calls == 7

        records = _lines(tmp_path / "run/records.jsonl")
        assert {r["benchmark"] for r in records} == {"agentx", "agentx/all-queries"}
        assert all(r["trajectory_id"] for r in records)
        printed = headline_summary(metrics)
        assert printed["n_items"] == 1 and printed["other_reports"] == ["agentx/all-queries"]

        # `eval report` shows the run: both reports and a plot on Agent-X's 0-1 scale
        report = build_report([tmp_path / "run"], tmp_path / "report")
        html = report.html.read_text()
        assert "agentx/all-queries" in html and "tool_precision" in html
        assert list((tmp_path / "report/plots").glob("agentx*.png"))
        # failures come from the headline (the receipt alone, answered right)
        assert "No failed items" in report.markdown.read_text()

        # rerun: nothing asked again, same numbers
        again = _run(config)
        assert len(agent.requests) == agent_calls and len(jury.requests) == judge_calls
        assert again["reports"] == metrics["reports"]
        assert again["run"]["already_done"] == 3 and again["run"]["written"] == 0


def test_agentx_run_without_a_judge_computes_the_judge_free_metrics(tmp_path: Path) -> None:
    with ScriptedOpenAIServer(controller) as agent, ScriptedOpenAIServer(judge) as jury:
        metrics = _run(_config(tmp_path, agent))
        calls = len(agent.requests)
        # a judge added later scores the same episodes: the controller is not asked again
        judged = _run(_config(tmp_path, agent, judge="openai:judge", judge_base_url=jury.base_url))
        assert len(agent.requests) == calls and jury.requests
    assert judged["judged"] is True
    assert judged["reports"]["agentx"]["metrics"]["tool_accuracy"] == pytest.approx(0.75)
    assert metrics["judged"] is False and "only the judge-free metrics" in metrics["note"]
    head = metrics["reports"]["agentx"]
    assert head["metrics"] == {"tool_precision": 1.0, "toolset_accuracy": 1.0}
    assert head["details"]["judge"] is None
    full = metrics["reports"]["agentx/all-queries"]["metrics"]
    assert set(full) == {"tool_precision", "toolset_accuracy"}
    assert full["tool_precision"] == pytest.approx(0.5)
    assert full["toolset_accuracy"] == pytest.approx(7 / 9)
    # the run keeps the gold it covers, for `eval score agentx`
    gold = json.loads((tmp_path / "run/gold.json").read_text())
    assert set(gold) == {"ax-receipt", "ax-street", "ax-sign"}


def test_agentx_missing_image_names_the_record(tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(DATA, data)
    (data / "street.png").unlink()
    with ScriptedOpenAIServer(controller) as agent:
        with pytest.raises(EvalRunError, match=r"ax-street.*media 'street.png' is at neither"):
            _run(_config(tmp_path, agent, data=data))
        assert not agent.requests
    with pytest.raises(EvalRunError, match="data.json does not exist"):
        _run(bench_config("agentx", model="openai:m", out=tmp_path / "r", data=tmp_path))


def test_agentx_cli_and_tool_names(tmp_path: Path) -> None:
    assert AGENTX_TO_GTA["ObjectCounter"] == "CountGivenObject"
    assert AGENTX_TO_GTA["LocateObjectByText"] == "TextToBbox"
    assert AGENTX_TO_GTA["OCR"] == "OCR"
    assert metadata_tools(["OCR", {"name": "Calculator"}]) == {
        "OCR": {},
        "Calculator": {"name": "Calculator"},
    }
    assert metadata_tools({"OCR": "reads"}) == {"OCR": {"description": "reads"}}
    with ScriptedOpenAIServer(controller) as agent, ScriptedOpenAIServer(judge) as jury:
        result = CliRunner().invoke(
            app,
            [
                "eval",
                "run",
                "agentx",
                "--model",
                "openai:m",
                "--data",
                str(DATA / "data.json"),
                "--out",
                str(tmp_path / "run"),
                "--base-url",
                agent.base_url,
                "--judge",
                "openai:judge",
                "--judge-base-url",
                jury.base_url,
                "--quiet",
            ],
        )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output[result.output.index("{") : result.output.rindex("}") + 1])
    assert printed["benchmark"] == "agentx" and printed["metrics"]["goal_accuracy"] == 1.0
    bad = CliRunner().invoke(
        app,
        [
            "eval",
            "run",
            "gaia",
            "--model",
            "openai:m",
            "--out",
            str(tmp_path / "g"),
            "--judge",
            "openai:j",
        ],
    )
    # each benchmark's subcommand has its own options: another's is refused, naming whose
    said = re.sub(r"[\s│]+", " ", bad.output)
    assert bad.exit_code == 2 and "--judge does not apply to `eval run gaia`" in said
    assert "option of agentx only" in said
