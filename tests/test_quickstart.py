"""The README's quickstart runs offline end to end (a smaller run of the same command)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from tracetune.cli import app
from tracetune.schema import Task, Trajectory
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
    # rerunning skips everything already done
    again = CliRunner().invoke(app, ["quickstart", "--out", str(out), "--n", "6"])
    assert again.exit_code == 0, again.output
    assert len(Dataset.open(out / "gold", Trajectory)) == len(gold)
