"""MMAT engine end to end: the bundled QA sample through every stage against a scripted
teacher on a real loopback HTTP server, with the real offline tools producing every
operator output (OCR, face detection, BM25 + MiniLM retrieval; captions over HTTP)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tracetune.cli import app
from tracetune.data import CORPUS, DATA_DIR
from tracetune.engine import (
    MMATRunConfig,
    OperatorConfig,
    orr_from_rr,
    parse_rr,
    run_pipeline,
)
from tracetune.engine.grammar import API_INVOKE, parse_orr_assistant, parse_orr_user
from tracetune.formats import export_dataset
from tracetune.models.base import ModelOptions
from tracetune.schema import Dialogue, Task, Verdict
from tracetune.store import Dataset
from tracetune.testing import ScriptedOpenAIServer

SAMPLE = DATA_DIR / "mmat" / "sample.jsonl"
# Loads OCR, face cascades and MiniLM and runs 5 samples through 4 stages: ~25 s on 2 cores.
pytestmark = pytest.mark.slow

SCRIPTS: dict[str, list[Any]] = {
    "total amount": [
        {
            "thought": "The question asks for the amount paid, so I need to read the receipt.",
            "operators": ["ocr"],
            "rag": {"needed": False, "query": ""},
            "next_action": "continue",
        },
        {
            "thought": "The OCR output has the line 'TOTAL 36.69', which is the amount paid.",
            "operators": [],
            "rag": {"needed": False, "query": ""},
            "next_action": "final_answer",
        },
        "36.69",
    ],
    "most expensive": [
        {
            "thought": "I need the item prices, which are printed text.",
            "operators": ["ocr"],
            "next_action": "continue",
        },
        {
            "thought": "The prices read are 3.49, 5.25, 6.80, 4.15, 2.38 and 11.90; the highest "
            "is Coffee beans 250g at 11.90, which is option B.",
            "operators": [],
            "next_action": "final_answer",
        },
        "B",
    ],
    "more is the total": [
        {
            "thought": "I need the subtotal and the total from the receipt.",
            "operators": ["ocr"],
            "next_action": "continue",
        },
        {
            "thought": "The receipt shows subtotal 33.97 and tax 2.72, so the difference is 2.72.",
            "operators": [],
            "next_action": "final_answer",
        },
        "2.72",
    ],
    "faces": [
        {
            "thought": "This is about people in the photo: I will detect faces and get an "
            "overall description.",
            "operators": ["face_detection", "image_caption"],
            "next_action": "continue",
        },
        {
            "thought": "Face detection found exactly one face, and the caption describes a "
            "single person.",
            "operators": [],
            "next_action": "final_answer",
        },
        "1",
    ],
    "which country": [
        {
            "thought": "The sign has text; I will read it.",
            "operators": ["ocr"],
            "next_action": "continue",
        },
        {
            "thought": "The sign names the Great Barrier Reef. Where it lies is not written on "
            "the sign, so I will look it up.",
            "operators": [],
            "rag": {"needed": True, "query": "where is the Great Barrier Reef"},
            "next_action": "continue",
        },
        {
            "thought": "The passage says the reef lies off the coast of Queensland, Australia.",
            "operators": [],
            "next_action": "final_answer",
        },
        "Australia",
    ],
}
CAPTION = "A smiling woman in an orange flight suit stands in front of a flag."


def texts(body: dict[str, Any]) -> list[str]:
    out = []
    for m in body.get("messages", []):
        content = m.get("content")
        if isinstance(content, str):
            out.append(content)
        elif isinstance(content, list):
            out += [p["text"] for p in content if p.get("type") == "text"]
    return out


def teacher(body: dict[str, Any], scripts: dict[str, list[Any]] | None = None) -> str:
    scripts = scripts or SCRIPTS
    messages = body["messages"]
    first = texts({"messages": messages[:1]})[0]
    if "worked, step-by-step solution" in first:
        user = texts({"messages": messages[1:2]})[0]
        script = next(v for k, v in scripts.items() if k in user)
        reply = script[sum(1 for m in messages if m["role"] == "assistant")]
        return json.dumps(reply) if isinstance(reply, dict) else str(reply)
    if "skips calculation steps" in first:
        flagged = "more is the total" in first
        return json.dumps(
            {
                "flagged": flagged,
                "reason": "the difference is stated without computing it"
                if flagged
                else "every number is read or computed",
            }
        )
    if "without support" in first:
        return json.dumps({"flagged": False, "reason": "every claim rests on a tool output"})
    if "Repair it" in first:
        return json.dumps(
            {
                "critique": "I named the difference without doing the subtraction.",
                "derivation": "The total is 36.69 and the subtotal is 33.97, so the difference "
                "is 36.69 - 33.97 = 2.72.",
            }
        )
    return CAPTION


def _run_config(out: Path, base_url: str) -> MMATRunConfig:
    return MMATRunConfig(
        out=out,
        source=SAMPLE,
        teacher="openai:teacher",
        backend=ModelOptions(base_url=base_url, max_retries=0),
        operators=OperatorConfig(
            operators=["image_caption", "ocr", "face_detection"], corpus=CORPUS
        ),
    )


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("mmat") / "run"
    with ScriptedOpenAIServer(teacher) as server:
        summary = asyncio.run(run_pipeline(_run_config(out, server.base_url), progress=False))
        requests = list(server.requests)
        # A rerun of every stage finds all the work done and asks the teacher nothing.
        again = asyncio.run(run_pipeline(_run_config(out, server.base_url), progress=False))
        rerun_calls = server.calls - len(requests)
    return {
        "out": out,
        "summary": summary,
        "again": again,
        "requests": requests,
        "rerun_calls": rerun_calls,
    }


def _by_question(dataset: Dataset[Any], words: str) -> Any:
    (found,) = [d for d in dataset if words in d.task.query]
    return found


def test_bundled_sample_yields_rr_and_orr_that_parse_back(engine_run: dict[str, Any]) -> None:
    out = engine_run["out"]
    assert engine_run["summary"]["ingest"] == "mmat-ingest: 5 written, 0 already done"
    assert engine_run["summary"]["rationale"] == "mmat-rationale: 5 written, 0 already done"
    rr = Dataset.open(out / "rr", Dialogue)
    orr = Dataset.open(out / "orr", Dialogue)
    assert len(rr) == 5 and len(orr) == 5
    assert {d.format for d in rr} == {"rr"} and {d.format for d in orr} == {"orr"}
    for dialogue in rr:
        parsed = parse_rr(dialogue)
        assert parsed.answer == dialogue.task.gold.value  # answers unchanged
        assert parsed.steps[-1].step.signal == "end"
        assert parsed.images == dialogue.task.images and len(parsed.images) == 1
        assert dialogue.provenance.prompt_hash and dialogue.provenance.model == "openai:teacher"
    for dialogue in orr:
        system, user, assistant = dialogue.messages
        question, calls = parse_orr_user(user.text)
        thought, answer = parse_orr_assistant(assistant.text)
        assert question == dialogue.task.query and thought
        assert answer == dialogue.task.gold.value
        assert calls and all(name != "rag" for name, _ in calls)
    # Resume: nothing is redone and no model is called again.
    assert engine_run["rerun_calls"] == 0
    assert engine_run["again"]["rationale"] == "mmat-rationale: 0 written, 5 already done"


def test_operator_outputs_come_from_the_real_tools(engine_run: dict[str, Any]) -> None:
    rr = Dataset.open(engine_run["out"] / "rr", Dialogue)
    total = parse_rr(_by_question(rr, "total amount"))
    ((name, ocr_text),) = total.steps[0].results
    # RapidOCR read the bundled receipt; the scripted server never says these lines.
    assert name == "ocr" and "TOTAL 36.69" in ocr_text and "Subtotal 33.97" in ocr_text
    faces = parse_rr(_by_question(rr, "faces"))
    results = dict(faces.steps[0].results)
    assert results["face_detection"].startswith("1 face found: [")  # OpenCV's cascades
    assert results["image_caption"] == CAPTION  # the caption tool asked the VLM over HTTP
    caption_requests = [
        r
        for r in engine_run["requests"]
        if "worked, step-by-step" not in (r.texts() or [""])[0]
        and not (r.texts() or [""])[0].startswith(("You review", "A step-by-step solution"))
        and r.image_urls()
        and len(r.messages) == 1
    ]
    assert caption_requests and caption_requests[0].image_urls()[0].startswith("data:image/png")
    # The reflection judges (and the repair) see the image too.
    judge_requests = [r for r in engine_run["requests"] if r.texts()[0].startswith("You review")]
    assert len(judge_requests) == 10 and all(r.image_urls() for r in judge_requests)
    reef = parse_rr(_by_question(rr, "which country"))
    assert dict(reef.steps[0].results)["ocr"].splitlines() == [
        "WELCOME TO THE",
        "GREAT BARRIER REEF",
        "VISITOR CENTRE",
    ]
    assert reef.steps[1].step.rag == "where is the Great Barrier Reef"
    rag_text = dict(reef.steps[1].results)["rag"]
    assert rag_text.startswith("[1] The Great Barrier Reef") and "Queensland" in rag_text
    teacher_turns = [r for r in engine_run["requests"] if "worked, step-by-step" in r.texts()[0]]
    assert all(r.image_urls() for r in teacher_turns)  # the teacher sees the image every turn
    # The teacher was told the reference answer; the training dialogue never says so.
    assert "Correct answer" in teacher_turns[0].texts()[1]
    assert all("Correct answer" not in m.text for d in rr for m in d.messages)


def test_orr_leaves_rag_results_out_and_keeps_operator_calls(engine_run: dict[str, Any]) -> None:
    orr = Dataset.open(engine_run["out"] / "orr", Dialogue)
    reef = _by_question(orr, "which country")
    user = reef.messages[1].text
    assert user.count(API_INVOKE[0]) == 1 and "GREAT BARRIER REEF" in user
    assert "coral polyps" not in user and "Queensland" not in user  # the passage is left out
    assert reef.metadata["rag_results_left_out"] == 1
    faces = _by_question(orr, "faces")
    _, calls = parse_orr_user(faces.messages[1].text)
    assert [n for n, _ in calls] == ["face_detection", "image_caption"]


def test_reflection_repairs_the_flagged_sample_and_counts_it(engine_run: dict[str, Any]) -> None:
    out = engine_run["out"]
    stats = json.loads((out / "reflected" / "stats.json").read_text())
    assert stats["flagged"] == {"math": 1} and stats["repaired"] == 1 and stats["judged"] == 5
    verdicts = Dataset.open(out / "reflected" / "verdicts", Verdict).records()
    assert len(verdicts) == 5 and sum(not v.passed for v in verdicts) == 1
    rr = Dataset.open(out / "rr", Dialogue)
    tax = parse_rr(_by_question(rr, "more is the total"))
    assert [s.step.signal for s in tax.steps] == ["continue", "reflection", "end"]
    assert "without doing the subtraction" in tax.steps[1].step.thought
    assert "36.69 - 33.97 = 2.72" in tax.steps[2].step.thought
    orr = Dataset.open(out / "orr", Dialogue)
    thought, _ = parse_orr_assistant(_by_question(orr, "more is the total").messages[2].text)
    assert (
        thought.index("subtotal 33.97 and tax")
        < thought.index("without doing the")
        < thought.index("36.69 - 33.97")
    )


def test_rendered_dialogues_export_through_the_trainers_formats(
    engine_run: dict[str, Any], tmp_path: Path
) -> None:
    out = engine_run["out"]
    for fmt in ("rr", "orr"):
        for exporter in ("trl-sft", "llamafactory", "swift"):
            report = export_dataset(exporter, out / fmt, tmp_path / f"{fmt}-{exporter}")
            assert report.rows == 5, (fmt, exporter)
        rows = [
            json.loads(line)
            for line in (tmp_path / f"{fmt}-trl-sft" / "train.jsonl").read_text().splitlines()
        ]
        assert all(len(r["images"]) == 1 for r in rows)
        assert all(r["messages"][-1]["role"] == "assistant" for r in rows)
        lf_rows = (tmp_path / f"{fmt}-llamafactory" / "train.jsonl").read_text().splitlines()
        for row in map(json.loads, lf_rows):  # LLaMA-Factory pairs markers and images 1:1
            markers = sum(t["value"].count("<image>") for t in row["conversations"])
            assert markers == len(row["images"]) == 1
    # ORR from the stored RR records is the stored ORR record, byte for byte.
    stored_orr = {d.id: d.model_dump_json() for d in Dataset.open(out / "orr", Dialogue)}
    for rr in Dataset.open(out / "rr", Dialogue):
        derived = orr_from_rr(rr)
        assert stored_orr[derived.id] == derived.model_dump_json()


def test_cli_runs_the_engine_from_one_config(tmp_path: Path) -> None:
    out = tmp_path / "cli-run"
    with ScriptedOpenAIServer(teacher) as server:
        config = tmp_path / "mmat.yaml"
        config.write_text(
            f"out: {out}\nsource: {SAMPLE}\nteacher: openai:teacher\n"
            f"backend: {{base_url: '{server.base_url}'}}\n"
            "operators: {operators: [ocr, face_detection], rag: false}\n"
            "ingest: {limit: 2}\n"
        )
        result = CliRunner().invoke(app, ["mmat", "run", str(config), "--quiet"])
    assert result.exit_code == 0, result.output
    assert "mmat-rationale: 2 written" in result.output
    assert "\nmmat-render-rr: 2 written" in result.output
    assert "\nmmat-render-orr: 2 written" in result.output and "{'rr'" not in result.output
    assert len(Dataset.open(out / "tasks", Task)) == 2
    assert len(Dataset.open(out / "orr", Dialogue)) == 2


def test_each_stage_command_chains_on_the_previous_output(tmp_path: Path) -> None:
    rows = [json.loads(line) for line in SAMPLE.read_text().splitlines()]
    faces = [dict(r, image=str(SAMPLE.parent / r["image"])) for r in rows if "faces" in r["id"]]
    source = tmp_path / "faces.jsonl"
    source.write_text(json.dumps(faces[0]) + "\n")
    runner = CliRunner()
    with ScriptedOpenAIServer(teacher) as server:
        url = server.base_url
        steps = [
            ["ingest", "--source", str(source), "--out", str(tmp_path / "tasks")],
            [
                "rationale",
                "--tasks",
                str(tmp_path / "tasks"),
                "--out",
                str(tmp_path / "rat"),
                "--teacher",
                "openai:teacher",
                "--operators",
                "face_detection,image_caption",
                "--no-rag",
                "--base-url",
                url,
            ],
            [
                "reflect",
                "--dialogues",
                str(tmp_path / "rat"),
                "--out",
                str(tmp_path / "refl"),
                "--judge",
                "openai:teacher",
                "--base-url",
                url,
            ],
            ["render", "--dialogues", str(tmp_path / "refl"), "--out", str(tmp_path / "final")],
        ]
        outputs = []
        for args in steps:
            result = runner.invoke(app, ["mmat", *args, "--quiet"])
            assert result.exit_code == 0, (args[0], result.output)
            outputs.append(result.output)
    assert "1 written" in outputs[1] and "flagged: {}; repaired: 0" in outputs[2]
    (rr,) = Dataset.open(tmp_path / "final" / "rr", Dialogue).records()
    (orr,) = Dataset.open(tmp_path / "final" / "orr", Dialogue).records()
    assert orr_from_rr(rr).model_dump_json() == orr.model_dump_json()
    assert dict(parse_rr(rr).steps[0].results)["face_detection"].startswith("1 face found")


def test_killed_rationale_run_resumes_without_duplicates_or_losses(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    tasks = tmp_path / "tasks"
    asyncio.run(run_pipeline(MMATRunConfig(out=tmp_path, source=SAMPLE, stages=["ingest"])))
    out = tmp_path / "rationale"
    cmd = [
        sys.executable,
        "-m",
        "tracetune.cli",
        "mmat",
        "rationale",
        "--tasks",
        str(tasks),
        "--out",
        str(out),
        "--teacher",
        "openai:teacher",
        "--operators",
        "ocr,face_detection,image_caption",
        "--no-rag",
        "--concurrency",
        "1",
        "--quiet",
    ]
    env = {**os.environ, "OPENAI_API_KEY": "test"}
    with ScriptedOpenAIServer(teacher, latency_s=0.2) as server:
        cmd += ["--base-url", server.base_url]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while server.calls < 4 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
        partial = len(Dataset.open(out, Dialogue)) if (out / "manifest.json").exists() else 0
        assert partial < 4  # killed mid-run
        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr
    dataset = Dataset.open(out, Dialogue)
    ids = [d.id for d in dataset]
    dropped = dataset.state.keys("mmat-rationale", "dropped")
    assert len(ids) == 4 and len(set(ids)) == 4 and not dropped & set(ids)
    assert {i.removeprefix("rr-") for i in [*ids, *dropped]} == {
        t.id for t in Dataset.open(tasks, Task)
    }
    # Without retrieval the reef answer has no supporting output: the leak check drops it.
    assert [
        info["reason"] for _, s, info in dataset.state.items("mmat-rationale") if s == "dropped"
    ] == ["answer_leak"]
