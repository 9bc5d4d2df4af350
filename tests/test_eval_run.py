"""Benchmark runs end to end: GTA (step and e2e), GAIA and held-out task programs, through
real backends (a tiny local VLM, scripted answers over loopback HTTP), real tools and the
exact scorers; reruns resume."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tracetune.cli import app
from tracetune.evaluate.gta_tools import GTA_TOOL_NAMES, GTA_TOOLS, toolset_status
from tracetune.evaluate.runs import EvalRunConfig, EvalRunError, run_benchmark
from tracetune.models.base import ModelOptions
from tracetune.schema import Task, Trajectory
from tracetune.store import Dataset
from tracetune.testing import ScriptedOpenAIServer
from tracetune.tools import ToolContext

FIXTURES = Path(__file__).parent / "fixtures"
GTA = FIXTURES / "gta_small"
GAIA = FIXTURES / "gaia_run"
GOLD = json.loads((GTA / "dataset.json").read_text())


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from tracetune.models.tiny import init_tiny

    return str(init_tiny("qwen2_vl", tmp_path_factory.mktemp("tiny") / "qwen2_vl"))


@pytest.fixture(autouse=True)
def _api_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "test")


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


def _action(name: str, arguments: dict[str, Any]) -> str:
    return "Thought: next step\nAction: " + json.dumps({"name": name, "arguments": arguments})


def gta_gold_replay(body: dict[str, Any]) -> str:
    """A controller that writes GTA's gold action for whatever turn it is asked about; tool
    models (no system prompt) get a fixed description."""
    messages = body["messages"]
    if messages[0]["role"] != "system":
        return "A calm lake at sunset with a small boat."
    user = _text(messages[1]["content"])
    qid = next(k for k, v in GOLD.items() if user.startswith(v["dialogs"][0]["content"]))
    turn = sum(1 for m in messages if m["role"] == "assistant")
    gold = [m for m in GOLD[qid]["dialogs"] if m["role"] == "assistant"][turn]
    if gold.get("tool_calls"):
        fn = gold["tool_calls"][0]["function"]
        return _action(fn["name"], fn["arguments"])
    return _action("final_answer", {"answer": gold["content"]})


def _run(config: EvalRunConfig, notes: list[str] | None = None) -> dict[str, Any]:
    return asyncio.run(
        run_benchmark(config, progress=False, notify=(notes.append if notes is not None else None))
    )


# -- GTA ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_gta_step_with_a_tiny_local_model_completes_and_scores(
    tiny_model: str, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "run",
            "gta",
            "--data",
            str(GTA),
            "--model",
            f"local:{tiny_model}",
            "--mode",
            "step",
            "--out",
            str(out),
            "--max-tokens",
            "24",
            "--embedder",
            "packaged",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout[: result.stdout.rindex("}") + 1])
    assert printed["benchmark"] == "gta/step/official"
    metrics = json.loads((out / "metrics.json").read_text())
    turns = sum(1 for q in GOLD.values() for m in q["dialogs"] if m["role"] == "assistant")
    assert metrics["run"]["trajectories"] == turns == metrics["run"]["model_calls"]
    official = metrics["reports"]["gta/step/official"]
    assert set(official["metrics"]) >= {
        "inst_align",
        "tool_acc",
        "arg_acc",
        "answer_acc",
        "tool_call",
        "tool_call_error",
    }
    assert official["n_items"] == len(GOLD) and official["details"]["missing_predictions"] == []
    assert "gta/step/mat" in metrics["reports"]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert {r["id"] for r in rows} == set(GOLD)
    for row in rows:  # one predicted assistant message per gold assistant turn
        gold_turns = [m for m in GOLD[row["id"]]["dialogs"] if m["role"] == "assistant"]
        assert len(row["steps"]) == len(gold_turns)
        assert all(m["role"] == "assistant" for m in row["steps"])
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    trajectories = {t.id for t in Dataset.open(out / "trajectories", Trajectory)}
    assert {r["trajectory_id"] for r in records} <= trajectories
    # `eval score` on the run's own files gives the same numbers
    again = CliRunner().invoke(
        app,
        [
            "eval",
            "score",
            "gta",
            "--gold",
            str(out / "gold.json"),
            "--predictions",
            str(out / "predictions.jsonl"),
            "--mode",
            "step",
            "--embedder",
            "packaged",
        ],
    )
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["metrics"] == official["metrics"]


def test_gta_step_gold_replay_scores_perfect_tools_and_resumes(tmp_path: Path) -> None:
    with ScriptedOpenAIServer(gta_gold_replay) as server:
        config = EvalRunConfig(
            bench="gta",
            model="openai:m",
            out=tmp_path / "run",
            data=GTA,
            mode="step",
            embedder="packaged",
            backend=ModelOptions(base_url=server.base_url),
        )
        metrics = _run(config)
        calls = server.calls
        again = _run(config)
        assert server.calls == calls  # nothing is asked twice
    official = metrics["reports"]["gta/step/official"]["metrics"]
    assert official["tool_acc"] == official["arg_acc"] == 100.0
    assert official["tool_call_error"] == 0 and official["tool_call"] == 11
    # GTA counts the answer turns of image-generation queries in InstAcc's numerator only
    assert official["inst_align"] == pytest.approx(100.0 * 17 / 15)
    assert metrics["reports"]["gta/step/mat"]["metrics"]["mat_answer_acc"] == 100.0
    assert again["run"]["written"] == 0 and again["run"]["already_done"] == 17
    assert again["reports"] == metrics["reports"]
    # the model saw the gold history: the second turn of query 0 carries the OCR output
    history = [r for r in server.requests if sum(m["role"] == "assistant" for m in r.messages)]
    assert any("Tea 12.5" in t for r in history for t in r.texts())
    final_turns = [r for r in server.requests if "final answer" in r.texts()[-1]]
    assert len(final_turns) == len(GOLD)  # asked for the answer without tools, once a query
    # a rerun with another controller into the same directory is refused
    other = config.model_copy(update={"model": "openai:other"})
    with pytest.raises(EvalRunError, match="other settings"):
        _run(other)


def test_gta_step_unparseable_and_unknown_tools_are_errors(tmp_path: Path) -> None:
    def bad(body: dict[str, Any]) -> str:
        turn = sum(1 for m in body["messages"] if m["role"] == "assistant")
        if turn == 1:
            return _action("Teleport", {"to": "mars"})
        return "I am not sure." if turn == 0 else "Thought: adding up\nThey cost 20 dollars."

    with ScriptedOpenAIServer(bad) as server:
        config = EvalRunConfig(
            bench="gta",
            model="openai:m",
            out=tmp_path / "run",
            data=GTA,
            mode="step",
            embedder="packaged",
            limit=1,
            backend=ModelOptions(base_url=server.base_url),
        )
        metrics = _run(config)
    official = metrics["reports"]["gta/step/official"]["metrics"]
    # only the final answer turn is aligned: the two tool turns failed
    assert official["inst_align"] == pytest.approx(100 / 3) and official["tool_acc"] == 0.0
    (row,) = [
        json.loads(x) for x in (tmp_path / "run/predictions.jsonl").read_text().split("\n") if x
    ]
    assert "no action found" in row["steps"][0]["error"]
    assert "no tool 'Teleport'" in row["steps"][1]["error"]
    # at the final turn a reply without an action is a plain answer, not an error
    assert row["steps"][2] == {"role": "assistant", "content": "adding up\nThey cost 20 dollars."}
    assert metrics["reports"]["gta/step/official"]["metrics"]["answer_acc"] == 100.0


def test_gta_e2e_runs_gta_tools_and_scores_affected_queries_apart(tmp_path: Path) -> None:
    notes: list[str] = []
    with ScriptedOpenAIServer(gta_gold_replay) as server:
        config = EvalRunConfig(
            bench="gta",
            model="openai:m",
            out=tmp_path / "run",
            data=GTA,
            mode="e2e",
            embedder="packaged",
            tool_model="openai:m",
            backend=ModelOptions(base_url=server.base_url),
        )
        metrics = _run(config, notes)
    # reported up front: no detector, no search corpus, no diffusion weights here
    assert "GTA toolset" in notes[0]
    assert metrics["unavailable_tools"] == [
        "CountGivenObject",
        "GoogleSearch",
        "ImageStylization",
        "TextToBbox",
        "TextToImage",
    ]
    assert metrics["approximate_tools"] == ["MathOCR"]
    assert metrics["affected_queries"] == {
        "1": ["TextToBbox"],
        "2": ["CountGivenObject"],
        "3": ["GoogleSearch"],
        "4": ["TextToBbox"],
        "5": ["TextToImage"],
    }
    runnable = metrics["reports"]["gta/e2e/official"]
    assert runnable["n_items"] == 1 and runnable["metrics"]["answer_acc"] == 100.0
    assert runnable["metrics"]["tool_call_error"] == 0
    everything = metrics["reports"]["gta/e2e/official/all-queries"]
    assert everything["n_items"] == len(GOLD)
    # the unavailable tools answered with why, as errors the controller could read
    assert everything["metrics"]["tool_call_error"] == 6
    dialogs = {
        json.loads(x)["id"]: json.loads(x)["dialog"]
        for x in (tmp_path / "run/predictions.jsonl").read_text().splitlines()
    }
    receipt = dialogs["0"]
    assert [m["role"] for m in receipt] == [
        "user",
        "assistant",
        "tool",
        "assistant",
        "tool",
        "assistant",
    ]
    assert "Tea" in receipt[2]["content"]["content"]  # real OCR on the bundled image
    assert receipt[4]["content"]["content"] == "20"  # the real calculator
    painting = dialogs["3"]  # ImageDescription asked the tool model
    assert painting[2]["content"]["content"] == "A calm lake at sunset with a small boat."
    assert "not available here" in painting[3]["error"]


# -- the GTA toolset ------------------------------------------------------------------------
def test_gta_toolset_has_gtas_fourteen_tools_with_their_signatures() -> None:
    assert list(GTA_TOOLS) == list(GTA_TOOL_NAMES) and len(GTA_TOOLS) == 14
    params = {n: list(t.parameters["properties"]) for n, t in GTA_TOOLS.items()}
    assert params["TextToBbox"] == ["image", "text", "top1"]
    assert params["AddText"] == ["image", "text", "position", "color"]
    assert params["DrawBox"] == ["image", "bbox", "annotation"]
    assert params["GoogleSearch"] == ["query", "k"]
    assert params["Solver"] == params["Plot"] == ["command"]
    assert params["ImageStylization"] == ["image", "instruction"]
    status = toolset_status({"search": {"corpus": str(GAIA / "corpus")}}, tool_model=True)
    assert status["GoogleSearch"].status == "available"
    assert status["ImageDescription"].status == "available"
    assert toolset_status({}, tool_model=False)["ImageDescription"].status == "unavailable"


def test_gta_tools_run_on_tracetune_tools(tmp_path: Path) -> None:
    from PIL import Image

    (tmp_path / "image").mkdir()
    Image.new("RGB", (120, 80), "white").save(tmp_path / "image" / "blank.png")
    ctx = ToolContext(workdir=tmp_path, options={"search": {"corpus": str(GAIA / "corpus")}})
    solved = GTA_TOOLS["Solver"](
        ctx,
        command=(
            "from sympy import symbols, solve\n"
            "def solution():\n    x = symbols('x')\n    return str(solve(x**2 - 9, x))\n"
        ),
    )
    assert solved.text == "[-3, 3]"
    plot = GTA_TOOLS["Plot"](
        ctx,
        command=(
            "import matplotlib.pyplot as plt\n"
            "def solution():\n    fig = plt.figure()\n    plt.plot([1, 2, 3], [2, 4, 1])\n"
            "    return fig\n"
        ),
    )
    assert plot.images and plot.images[0].width > 100
    boxed = GTA_TOOLS["DrawBox"](
        ctx, image="image/blank.png", bbox="(10, 10, 60, 40)", annotation="cup"
    )
    assert boxed.images[0].getpixel((10, 25)) != (255, 255, 255)
    texted = GTA_TOOLS["AddText"](ctx, image="image/blank.png", text="hi", position="rb")
    assert texted.data["position"][0] > 60  # right side
    assert GTA_TOOLS["Calculator"](ctx, expression="12.5+7.5").text == "20"
    found = GTA_TOOLS["GoogleSearch"](ctx, query="Lumen Bridge opened", k=1)
    assert "1911" in found.text


def test_solver_code_that_escapes_the_sandbox_is_a_tool_error(tmp_path: Path) -> None:
    from tracetune.tools import ToolError

    ctx = ToolContext(workdir=tmp_path)
    with pytest.raises(ToolError, match="solution"):
        GTA_TOOLS["Solver"](ctx, command="print(1)")
    with pytest.raises(ToolError):
        GTA_TOOLS["Solver"](ctx, command="import os\ndef solution():\n    return os.system('id')")


# -- GAIA ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_gaia_with_a_tiny_local_model_completes_and_scores(tiny_model: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "run",
            "gaia",
            "--data",
            str(GAIA / "metadata.jsonl"),
            "--model",
            f"local:{tiny_model}",
            "--corpus",
            str(GAIA / "corpus"),
            "--out",
            str(out),
            "--max-steps",
            "2",
            "--max-tokens",
            "24",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    report = metrics["reports"]["gaia"]
    assert report["n_items"] == 3 and set(report["metrics"]) == {"accuracy", "level_1", "level_2"}
    rows = [json.loads(x) for x in (out / "predictions.jsonl").read_text().splitlines()]
    assert {r["task_id"] for r in rows} == {"g1", "g2", "g3"}
    assert all("model_answer" in r for r in rows)
    trajectories = Dataset.open(out / "trajectories", Trajectory).records()
    attached = [t for t in trajectories if t.task.files]
    assert len(attached) == 2 and attached[0].task.files[0].name == "inventory.csv"
    assert "search" in trajectories[0].tools


def test_gaia_reads_the_attached_file_and_searches(tmp_path: Path) -> None:
    def agent(body: dict[str, Any]) -> str:
        messages = body["messages"]
        question = _text(messages[1]["content"])
        last = _text(messages[-1]["content"])
        turn = sum(1 for m in messages if m["role"] == "assistant")
        if "Lumen" in question:
            if turn == 0:
                return _action("search", {"query": "Lumen Bridge opened", "top_k": 1})
            year = "1911" if "1911" in last else "unknown"
            return _action("final_answer", {"answer": year})
        if turn == 0:
            return _action("inspect_file", {"path": "inventory.csv"})
        if "pears" in question.split("inventory")[-1] or "how many" in question.lower():
            return _action("final_answer", {"answer": "37" if "37" in last else "?"})
        return _action("final_answer", {"answer": "apples, pears"})

    with ScriptedOpenAIServer(agent) as server:
        config = EvalRunConfig(
            bench="gaia",
            model="openai:m",
            out=tmp_path / "run",
            data=GAIA / "metadata.jsonl",
            tool_options={"search": {"corpus": str(GAIA / "corpus")}},
            backend=ModelOptions(base_url=server.base_url),
        )
        metrics = _run(config)
    report = metrics["reports"]["gaia"]["metrics"]
    assert report == {"accuracy": 100.0, "level_1": 100.0, "level_2": 100.0}


def test_gaia_without_a_search_corpus_says_how_to_give_one(tmp_path: Path) -> None:
    config = EvalRunConfig(
        bench="gaia", model="openai:m", out=tmp_path / "run", data=GAIA / "metadata.jsonl"
    )
    with pytest.raises(EvalRunError, match="--corpus"):
        _run(config)


# -- task programs --------------------------------------------------------------------------
@pytest.mark.slow
def test_programs_heldout_split_with_a_tiny_local_model(tiny_model: str, tmp_path: Path) -> None:
    from tracetune.synth.programs.generate import ProgramsConfig, generate_tasks

    # the "training" tasks; none of them may enter the held-out split
    _, train = asyncio.run(
        generate_tasks(
            ProgramsConfig(out=tmp_path / "train", n=4, families=["receipt", "table"]),
            progress=False,
        )
    )
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "eval",
            "run",
            "programs",
            "--model",
            f"local:{tiny_model}",
            "--out",
            str(out),
            "--n",
            "2",
            "--family",
            "receipt",
            "--family",
            "table",
            "--exclude",
            str(tmp_path / "train"),
            "--max-steps",
            "2",
            "--max-tokens",
            "16",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    split = Dataset.open(out / "tasks", Task).records()
    assert len(split) == 2 and not {t.id for t in split} & train.ids()
    assert {t.metadata["family"] for t in split} == {"receipt", "table"}
    metrics = json.loads((out / "metrics.json").read_text())
    report = metrics["reports"]["programs"]
    assert report["n_items"] == 2
    assert {"accuracy", "used_gold_tools", "accuracy/receipt", "accuracy/table"} <= set(
        report["metrics"]
    )
    assert report["metrics"]["accuracy"] == 0.0  # random weights answer nothing right


def test_programs_gold_replay_is_exactly_right(tmp_path: Path) -> None:
    from tracetune.evaluate.programs_run import heldout_split

    config = EvalRunConfig(
        bench="programs", model="openai:m", out=tmp_path / "run", n=2, families=["receipt", "table"]
    )
    tasks = heldout_split(config, Dataset.create(tmp_path / "split", Task))
    by_query = {t.query: t for t in tasks}

    def replay(body: dict[str, Any]) -> str:
        messages = body["messages"]
        task = next(t for q, t in by_query.items() if _text(messages[1]["content"]).startswith(q))
        turn = sum(1 for m in messages if m["role"] == "assistant")
        if turn < len(task.gold_chain):
            call = task.gold_chain[turn]
            return _action(call.name, call.arguments)
        assert task.gold is not None
        return _action("final_answer", {"answer": task.gold.value})

    with ScriptedOpenAIServer(replay) as server:
        run = config.model_copy(
            update={"data": tmp_path / "split", "backend": ModelOptions(base_url=server.base_url)}
        )
        metrics = _run(run)
    report = metrics["reports"]["programs"]["metrics"]
    assert report["accuracy"] == 100.0 and report["used_gold_tools"] == 100.0
    # a wrong answer is caught by the same checker
    rows = [json.loads(x) for x in (tmp_path / "run/gold.jsonl").read_text().splitlines()]
    from tracetune.evaluate.programs_run import score_programs

    wrong = {r["id"]: {"prediction": "12345.67", "called_tools": r["gold_tools"]} for r in rows}
    assert score_programs(rows, wrong).metrics["accuracy"] == 0.0


def test_heldout_seeds_differ_from_training_seeds() -> None:
    from tracetune.evaluate.programs_run import heldout_seed
    from tracetune.synth.programs.base import task_seed

    training = {task_seed(s, i) for s in range(3) for i in range(200)}
    assert not training & {heldout_seed(s, i) for s in range(3) for i in range(200)}


@pytest.mark.slow
def test_killed_gta_run_resumes_without_duplicates_or_losses(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "run"
    env = {**os.environ, "OPENAI_API_KEY": "test"}
    with ScriptedOpenAIServer(gta_gold_replay, latency_s=0.2) as server:
        cmd = [
            sys.executable,
            "-m",
            "tracetune.cli",
            "eval",
            "run",
            "gta",
            "--data",
            str(GTA),
            "--model",
            "openai:m",
            "--base-url",
            server.base_url,
            "--mode",
            "step",
            "--out",
            str(out),
            "--limit",
            "3",
            "--concurrency",
            "1",
            "--quiet",
        ]
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while server.calls < 4 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, proc.stderr.read() if proc.stderr else ""
        done_before = len(Dataset.open(out / "trajectories", Trajectory))
        assert 0 < done_before < 8
        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr
    trajectories = Dataset.open(out / "trajectories", Trajectory).records()
    keys = [(t.metadata["gta_id"], t.metadata["turn"]) for t in trajectories]
    assert len(keys) == len(set(keys)) == 8  # the gold turns of queries 0, 1 and 2
    metrics = json.loads((out / "metrics.json").read_text())
    official = metrics["reports"]["gta/step/official"]["metrics"]
    assert official["tool_acc"] == official["arg_acc"] == 100.0
    assert metrics["run"]["already_done"] == done_before
