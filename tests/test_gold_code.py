"""Gold chains replayed as code actions through the sandbox reach the gold answers."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tracetune.rollout import RolloutConfig, rollout_summary, run_rollout
from tracetune.synth.programs.generate import ProgramsConfig, generate_tasks


def test_gold_rollouts_in_code_format(tmp_path: Path) -> None:
    asyncio.run(
        generate_tasks(
            ProgramsConfig(
                out=tmp_path / "tasks", n=3, seed=5, families=["receipt", "table", "form"]
            ),
            progress=False,
        )
    )
    _, gold = asyncio.run(
        run_rollout(
            RolloutConfig(tasks=tmp_path / "tasks", out=tmp_path / "gold", action_format="code"),
            progress=False,
        )
    )
    summary = rollout_summary(gold)
    assert summary["passed"] == summary["total"] == 3
    for trajectory in gold:
        assert trajectory.action_format == "code"
        assert all(s.action is not None and s.action.type == "code" for s in trajectory.steps)
        assert trajectory.steps[-1].action.answer == trajectory.final_answer
        # the tool calls really ran inside the sandbox and were recorded on the step
        assert (
            trajectory.steps[0].observation.data["tool_calls"][0]["name"] in trajectory.task.tools
        )
