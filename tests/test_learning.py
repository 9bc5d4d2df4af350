"""Learning from scratch: controllers built from config, learning metrics, time budgets.

The metrics are checked on a hand-made set of episodes whose numbers are known by hand;
the miniature of bench/learning.py trains a tiny controller on a few dozen trajectories and
checks that the share of valid actions rises after SFT.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tracetune.agent.formats import JsonFormat
from tracetune.agent.loop import Agent
from tracetune.cli.model import app as model_app
from tracetune.evaluate.learning import majority_baseline, step_mode_metrics
from tracetune.evaluate.programs_run import run_programs, score_programs
from tracetune.evaluate.runs import bench_config
from tracetune.formats.corpus import corpus_from_datasets
from tracetune.judge.arguments import arguments_match, value_matches
from tracetune.models.tiny import (
    SIZES,
    ModelShape,
    build_tokenizer,
    init_model,
    mrope_section,
)
from tracetune.schema import Action, GoldAnswer, Task, ToolCall, Trajectory, Usage
from tracetune.store import Dataset
from tracetune.testing.scripted import ScriptedChatModel
from tracetune.timelimit import TimedBudget, parse_duration
from tracetune.tools import load_tools
from tracetune.train.config import DPOConfig, SFTConfig, from_scratch

FMT = JsonFormat()


# -- metrics on a hand-made set -----------------------------------------------------------
def _gold(task_id: str, family: str, chain: list[tuple[str, dict[str, Any]]], answer: str):
    return {
        "id": task_id,
        "family": family,
        "gold": {"value": answer, "kind": "number"},
        "gold_tools": sorted({n for n, _ in chain}),
        "gold_chain": [{"name": n, "arguments": a} for n, a in chain],
    }


def _act(name: str | None, arguments: dict[str, Any] | None = None, valid: bool = True):
    return {"valid": valid, "name": name, "arguments": arguments}


def _pred(task_id: str, actions: list[dict[str, Any]], answer: str | None, tools: list[str]):
    return {
        "id": task_id,
        "prediction": answer,
        "status": "completed" if answer is not None else "max_errors",
        "called_tools": tools,
        "steps": list(range(len(actions))),
        "actions": actions,
    }


GOLD = [
    _gold(
        "r1", "receipt", [("ocr", {"image": "r.png"}), ("calculator", {"expression": "2 + 3"})], "5"
    ),
    _gold(
        "r2", "receipt", [("ocr", {"image": "r.png"}), ("calculator", {"expression": "4 * 2"})], "8"
    ),
    _gold(
        "r3", "receipt", [("ocr", {"image": "r.png"}), ("calculator", {"expression": "9 - 1"})], "8"
    ),
    _gold(
        "d1",
        "document",
        [("inspect_file", {"path": "a.pdf"}), ("calculator", {"expression": "1+1"})],
        "2",
    ),
]
PREDICTIONS = {
    # right tools, right arguments (spacing differs), right answer: 3 of 3 gold steps.
    "r1": _pred(
        "r1",
        [
            _act("ocr", {"image": "r.png"}),
            _act("calculator", {"expression": "2+3"}),
            _act("final_answer", {"answer": "5"}),
        ],
        "5",
        ["calculator", "ocr"],
    ),
    # right tools, wrong expression, wrong answer: tools 3/3, arguments 1/3.
    "r2": _pred(
        "r2",
        [
            _act("ocr", {"image": "r.png"}),
            _act("calculator", {"expression": "4 * 3"}),
            _act("final_answer", {"answer": "12"}),
        ],
        "12",
        ["calculator", "ocr"],
    ),
    # an unparsable step, then a wrong tool: 0 valid of 2 counted... (1 invalid, 1 valid)
    "r3": _pred(
        "r3",
        [_act(None, valid=False), _act("calculator", {"expression": "9-1"})],
        None,
        ["calculator"],
    ),
    # always-ocr behaviour on the document task: wrong first tool, no answer.
    "d1": _pred("d1", [_act("ocr", {"image": "a.pdf"})], None, ["ocr"]),
}


def test_learning_metrics_on_a_hand_made_set_have_the_known_values() -> None:
    report = score_programs(GOLD, PREDICTIONS)
    m = report.metrics
    # steps: 3 + 3 + 2 + 1 = 9, of which 8 valid.
    assert m["valid_actions"] == pytest.approx(100 * 8 / 9)
    # first tool right in r1, r2 (ocr); not r3 (invalid), not d1 (ocr instead of inspect_file).
    assert m["first_tool"] == pytest.approx(50.0)
    # per family: receipt 2/3, document 0/1 -> macro (66.7 + 0) / 2.
    assert m["first_tool_macro"] == pytest.approx((200 / 3) / 2)
    # always-ocr scores 3/4 micro, and (100 + 0) / 2 macro.
    assert m["majority_first_tool"] == pytest.approx(75.0)
    assert m["majority_first_tool_macro"] == pytest.approx(50.0)
    assert report.details["majority_tool"] == "ocr"
    # gold steps: 3 per task = 12. Tool hits: r1 3, r2 3, r3 0 (index 0 invalid, index 1 is
    # calculator vs gold calculator: hit), d1 0 -> 7. Argument hits: r1 3, r2 1, r3 1 -> 5.
    assert m["tool_accuracy"] == pytest.approx(100 * 7 / 12)
    assert m["argument_accuracy"] == pytest.approx(100 * 5 / 12)
    assert m["accuracy"] == pytest.approx(25.0)
    # r1 and r2 used every gold tool; one of them is right.
    assert m["accuracy_given_gold_tools"] == pytest.approx(50.0)
    assert m["completed"] == pytest.approx(50.0)
    assert m["accuracy/receipt"] == pytest.approx(100 / 3)
    assert m["first_tool/document"] == 0.0
    assert "valid_actions" in report.details["percent"]


def test_step_mode_metrics_on_a_hand_made_set() -> None:
    preds = {
        "r1": {
            "step_predictions": [
                _act("ocr", {"image": "r.png"}),
                _act("calculator", {"expression": "2 + 3"}),
                _act("final_answer", {"answer": "5.0"}),
            ]
        },
        "r2": {
            "step_predictions": [
                _act("ocr", {"image": "x.png"}),
                _act(None, valid=False),
                _act("final_answer", {"answer": "9"}),
            ]
        },
        # r3 missing entirely: 3 gold steps, all wrong.
        "d1": {
            "step_predictions": [
                _act("ocr", {"image": "a.pdf"}),
                _act("calculator", {"expression": "1 + 1"}),
                _act("final_answer", {"answer": "2"}),
            ]
        },
    }
    m, rows = step_mode_metrics(GOLD, preds)
    assert m["gold_steps"] == 12
    # valid: r1 3, r2 2, r3 0, d1 3 -> 8/12. tools: r1 3, r2 2, d1 2 -> 7/12.
    assert m["valid_actions"] == pytest.approx(100 * 8 / 12)
    assert m["tool_accuracy"] == pytest.approx(100 * 7 / 12)
    # arguments: r1 3 (5.0 == 5), r2 0 (x.png, wrong answer), d1 2 -> 5/12.
    assert m["argument_accuracy"] == pytest.approx(100 * 5 / 12)
    assert m["final_answer_accuracy"] == pytest.approx(50.0)  # r1 and d1 of 4
    assert m["first_tool"] == pytest.approx(50.0)
    assert m["tool_accuracy/document"] == pytest.approx(200 / 3)
    assert {r["id"] for r in rows} == {"r1", "r2", "r3", "d1"}


def test_a_gold_prefix_is_reused_only_for_the_very_same_task() -> None:
    """Step mode's --gold-prefixes: a replay of a task with the same id but other images
    (programs rendered by another version) is replayed again, not reused with files this
    run does not have."""
    from tracetune.evaluate.programs_run import usable_replay
    from tracetune.schema import FileRef, GoldAnswer, Task, ToolCall, Trajectory

    chart = FileRef(sha256="a" * 64, name="chart.png", mime="image/png")
    task = Task(
        id="prog-1",
        query="Which bar is tallest?",
        files=[chart],
        gold=GoldAnswer(value="Oslo"),
        gold_chain=[ToolCall(name="ocr", arguments={"image": "chart.png"})],
        metadata={"family": "chart"},
    )
    store = object()
    relabelled = task.model_copy(update={"metadata": {"family": "chart", "note": "x"}})
    same = Trajectory(id="t1", task=relabelled, controller="gold")
    assert usable_replay(task, (same, store)) == (same, store)  # metadata may differ
    redrawn = task.model_copy(update={"files": [chart.model_copy(update={"sha256": "b" * 64})]})
    assert (
        usable_replay(task, (Trajectory(id="t2", task=redrawn, controller="gold"), store)) is None
    )
    reworded = task.model_copy(update={"query": "Which bar is shortest?"})
    assert (
        usable_replay(task, (Trajectory(id="t3", task=reworded, controller="gold"), store)) is None
    )
    assert usable_replay(task, None) is None


def test_argument_matching_rules() -> None:
    """One rule for the learning metrics and the step-wise verifiers (gold value first)."""
    assert value_matches("12.5 * 3", "12.5 *3", "expression")
    assert not value_matches("12.5 * 3", "12.5 * 4", "expression")
    assert not value_matches("a b", "ab")  # only an expression drops its spaces
    assert value_matches("receipt.png", "Receipt.PNG")
    assert value_matches(1200, "1,200") and value_matches("42", 42)
    assert not value_matches(1200, 1201) and not value_matches("yes", True)
    # boxes by overlap: the same box, a shifted one (IoU 0.68), a disjoint one
    assert value_matches([0, 0, 10, 10], [0, 0, 10, 10.0])
    assert value_matches([0, 0, 20, 20], [1, 1, 21, 21])
    assert not value_matches([0, 0, 20, 20], [20, 20, 40, 40])
    assert not value_matches([0, 0, 10, 10], [0, 0, 10])
    assert value_matches(["a", "b", "c"], ["A", "b", "c"])
    assert not value_matches(["a", "b", "c"], ["a", "b"])
    # an image an earlier step produced: its real name is only known at run time
    assert value_matches("image_crop_step1_0.png", "crop_a.png")
    assert not value_matches("image_crop_step1_0.png", " ")
    assert not value_matches("a.png", "b.png")
    # every gold argument must be there; extra (optional) ones are allowed; dicts recurse
    assert arguments_match({"image": "a.png"}, {"image": "A.png", "lang": "en"})
    assert not arguments_match({"image": "a.png", "lang": "en"}, {"image": "a.png"})
    assert arguments_match({"opts": {"k": 3}}, {"opts": {"k": "3"}})
    assert not arguments_match({"opts": {"k": 3}}, {"opts": {"k": 4}})
    assert majority_baseline([]) == (None, 0.0, 0.0)


# -- controllers built from config ----------------------------------------------------------
def test_mrope_sections_sum_to_half_the_head() -> None:
    for head in (16, 32, 64, 128):
        assert sum(mrope_section(head)) == head // 2
    assert mrope_section(16) == [2, 3, 3]


def test_named_sizes_build_at_about_their_size(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    path = init_model("qwen2_vl", tmp_path / "m", "5m")
    info = json.loads((path / "tracetune_tiny.json").read_text())
    assert 3_000_000 < info["parameters"] < 8_000_000
    assert info["size"] == "5m" and info["shape"]["hidden_size"] == SIZES["5m"].hidden_size
    assert from_scratch(path)


def test_bad_shapes_are_refused_with_the_reason(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        model_app, ["init", "--arch", "qwen2_vl", "--heads", "5", "--out", str(tmp_path / "x")]
    )
    assert result.exit_code != 0
    assert "multiple of heads=5" in result.output
    with pytest.raises(ValueError, match="unknown size"):
        init_model("qwen2_vl", tmp_path / "y", "7m")
    with pytest.raises(ValueError, match="kv_heads"):
        ModelShape(hidden_size=64, heads=4, kv_heads=3).check()
    result = runner.invoke(
        model_app,
        [
            "init",
            "--arch",
            "llava",
            "--tokenizer-corpus",
            str(tmp_path),
            "--out",
            str(tmp_path / "z"),
        ],
    )
    said = " ".join(result.output.replace("│", " ").split())
    assert result.exit_code != 0 and "no manifest.json" in said


def test_digit_groups_make_every_short_digit_run_one_token() -> None:
    corpus = ["Observation: Coffee 12.50\nTotal 2152 on 2024-05-11\n"] * 4
    text = "Action: 12152 + 48.07 - 907 = 0.5"

    def pieces(group: int, vocab: int) -> list[str]:
        tok = build_tokenizer("qwen2_vl", vocab_size=vocab, corpus=corpus, digit_group=group)
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text  # lossless
        return [tok.decode([i]) for i in ids]

    digits = [p for p in pieces(1, 800) if p.isdigit()]
    assert digits == list("121524807907") + ["0", "5"]
    # Runs cut left to right; runs never seen in the corpus (907, 48) are single tokens too.
    assert [p for p in pieces(3, 2200) if p.isdigit()] == ["121", "52", "48", "07", "907", "0", "5"]
    assert [p for p in pieces(2, 1200) if p.isdigit()] == [
        "12",
        "15",
        "2",
        "48",
        "07",
        "90",
        "7",
        "0",
        "5",
    ]
    with pytest.raises(ValueError, match="at least 2124"):
        build_tokenizer("qwen2_vl", vocab_size=2048, corpus=corpus, digit_group=3)
    with pytest.raises(ValueError, match="need a tokenizer corpus"):
        build_tokenizer("qwen2_vl", vocab_size=4096, digit_group=2)
    with pytest.raises(ValueError, match="must be 1, 2 or 3"):
        build_tokenizer("qwen2_vl", vocab_size=2048, corpus=corpus, digit_group=4)


# -- a miniature of the learning bench ----------------------------------------------------
def _sum_task(i: int, a: int, b: int, photo: Any) -> Task:
    return Task(
        id=f"sum-{i}",
        query=f"What is {a} plus {b}?",
        files=[photo],
        tools=["calculator"],
        gold=GoldAnswer(value=str(a + b), kind="number"),
        gold_chain=[ToolCall(name="calculator", arguments={"expression": f"{a} + {b}"})],
        metadata={"family": "sum"},
    )


def _gold_replies(messages: list[dict[str, Any]]) -> str:
    """The gold policy: add the task's two numbers, then answer with the result."""
    user = messages[1]["content"][-1]["text"]
    words = user.split("?")[0].split()
    a, b = int(words[2]), int(words[4])
    if len(messages) == 2:
        call = ToolCall(name="calculator", arguments={"expression": f"{a} + {b}"})
        return FMT.render("I add the two numbers.", Action(type="tool_call", tool_call=call))
    return FMT.render("The sum is known.", Action(type="final_answer", answer=str(a + b)))


def _write_tasks(root: Path, pairs: list[tuple[int, int]], offset: int) -> Dataset[Task]:
    ds: Dataset[Task] = Dataset.create(root, Task)
    photo = ds.assets.put_image(Image.new("RGB", (56, 56), "white"), "note.png")
    ds.write_all([_sum_task(offset + i, a, b, photo) for i, (a, b) in enumerate(pairs)])
    return ds


def test_valid_actions_rise_after_sft_on_a_few_dozen_trajectories(tmp_path: Path) -> None:
    from tracetune.train.sft import train_sft

    train_pairs = [(a, b) for a in range(2, 8) for b in range(3, 9)][:36]
    tasks = _write_tasks(tmp_path / "tasks", train_pairs, 0)
    heldout = _write_tasks(tmp_path / "heldout", [(11, 4), (9, 12), (13, 5), (10, 10)], 100)
    # Gold trajectories through the real agent loop and calculator.
    gold: Dataset[Trajectory] = Dataset.create(tmp_path / "gold", Trajectory)
    agent = Agent(ScriptedChatModel(_gold_replies), load_tools(["calculator", "final_answer"]))

    async def roll() -> list[Trajectory]:
        return [await agent.run(t, tasks.assets, gold.assets, f"g-{t.id}") for t in tasks]

    trajectories = asyncio.run(roll())
    assert all(t.final_answer is not None for t in trajectories)
    gold.write_all(trajectories, sources=[tasks.assets])

    shape = ModelShape(hidden_size=64, layers=2, heads=4, kv_heads=2, intermediate_size=128)
    model = init_model(
        "qwen2_vl", tmp_path / "init", shape, image_size=56,
        corpus=corpus_from_datasets([gold.root]), vocab_size=600,
    )  # fmt: skip

    def evaluate(path: Path, name: str) -> dict[str, Any]:
        cfg = bench_config(
            "programs", model=f"local:{path}", out=tmp_path / name,
            data=heldout.root, max_tokens=12, max_steps=2, max_errors=2,
        )  # fmt: skip
        return asyncio.run(run_programs(cfg, progress=False))["reports"]["programs"]["metrics"]

    before = evaluate(model, "eval-untrained")
    torch.manual_seed(0)
    config = SFTConfig(
        base=str(model), data=[gold.root], out=tmp_path / "sft", full=True, epochs=10,
        batch_size=4, grad_accum=1, gradient_checkpointing=False, warmup=0, lr=5e-3,
        group_by_length=False, save_steps=10_000, logging_steps=5, max_time=300, threads=1,
    )  # fmt: skip
    result = train_sft(config)
    assert result.losses()[-1] < result.losses()[0]
    after = evaluate(result.out, "eval-sft")
    assert after["valid_actions"] >= before["valid_actions"] + 40, (before, after)
    assert after["first_tool"] > before["first_tool"]
    # Controllers built from config default to from-scratch learning rates, and DPO from
    # their SFT output too; pretrained checkpoints keep the fine-tuning ones.
    assert (
        SFTConfig(base=str(model), data=[gold.root], out=tmp_path / "o", full=True)
        .to_trl()
        .learning_rate
        == 1e-3
    )
    dpo = DPOConfig(base=str(result.out), pairs=[tmp_path], out=tmp_path / "dpo", full=True)
    assert dpo.to_trl().learning_rate == 5e-5
    assert (
        DPOConfig(base="Qwen/x", pairs=[tmp_path], out=tmp_path / "d", full=True)
        .to_trl()
        .learning_rate
        == 5e-7
    )


# -- time budgets ---------------------------------------------------------------------------
def test_durations_parse_and_bad_ones_say_how_to_write_them() -> None:
    assert parse_duration("90") == 90 and parse_duration("10m") == 600
    assert parse_duration("1.5h") == 5400 and parse_duration(None) is None
    with pytest.raises(ValueError, match="10m"):
        parse_duration("ten minutes")
    with pytest.raises(ValueError, match="positive"):
        parse_duration("0")


def test_timed_budget_stops_new_items_after_its_time() -> None:
    budget = TimedBudget(max_seconds=0.05)
    assert not budget.unlimited and budget.exceeded(Usage()) is None
    time.sleep(0.06)
    assert "time budget reached" in (budget.exceeded(Usage()) or "")
    assert TimedBudget().unlimited
