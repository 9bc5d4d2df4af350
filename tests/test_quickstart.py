"""The README's quickstart runs offline end to end (a smaller run of the same command)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from tracetune.cli import app
from tracetune.schema import PreferencePair, Task, Trajectory
from tracetune.store import Dataset


@pytest.mark.slow
def test_quickstart_runs_the_offline_pipeline(tmp_path: Path) -> None:
    out = tmp_path / "qs"
    result = CliRunner().invoke(app, ["quickstart", "--out", str(out), "--n", "6"])
    assert result.exit_code == 0, result.output
    assert len(Dataset.open(out / "tasks", Task)) == 6
    gold = Dataset.open(out / "gold", Trajectory)
    assert len(gold) >= 5 and all(t.status == "completed" for t in gold)
    assert (out / "sft-trl" / "train.jsonl").read_text().count("\n") == len(gold)
    (agent_run,) = list(Dataset.open(out / "agent", Trajectory))
    assert agent_run.controller.startswith("local:") and agent_run.steps
    # the MATRIX loop in miniature: exploration with the SFT policy, pairs, DPO, held-out eval
    matrix = out / "matrix"
    explored = list(Dataset.open(matrix / "explore", Trajectory))
    assert len(explored) == 2 and all(t.controller == f"local:{matrix / 'sft'}" for t in explored)
    pairs = Dataset.open(matrix / "pairs", PreferencePair)
    assert len(pairs) > 0
    assert (matrix / "dpo" / "adapter_config.json").is_file()
    report = json.loads((matrix / "report.json").read_text())
    assert set(report["stages"]["eval"]["heldout_accuracy"]) == {"sft", "dpo"}
    assert "preference pairs" in result.output
    # ... and it says plainly that the chosen steps are the gold anchor's, not the policy's
    shown = " ".join(result.output.split())
    anchored = report["stages"]["explore"]["chosen_from_gold_anchor"]
    assert anchored > 0 and f"gold_anchor on: {anchored} chosen steps" in shown
    assert report["config"]["explore"]["gold_anchor"] is True
    # rerunning skips everything already done
    again = CliRunner().invoke(app, ["quickstart", "--out", str(out), "--n", "6"])
    assert again.exit_code == 0, again.output
    assert len(Dataset.open(out / "gold", Trajectory)) == len(gold)
    assert len(Dataset.open(matrix / "pairs")) == len(pairs)
