"""The whole MATRIX loop in miniature, through its CLI, on a tiny random Qwen2-VL (CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tracetune.cli import app
from tracetune.prefs.matrix import MatrixConfig, miniature
from tracetune.schema import PreferencePair, Task, Trajectory
from tracetune.store import Dataset


@pytest.mark.slow  # gold rollouts with OCR, SFT, exploration, DPO and two evaluations (~60 s)
def test_miniature_matrix_loop_runs_end_to_end_and_its_pairs_pass_the_dpo_checks(
    tmp_path: Path,
) -> None:
    from tracetune.models.processors import load_processor
    from tracetune.train.data import DataReport, check_pair_rows, pair_rows
    from tracetune.train.model import RUN_FILE

    out = tmp_path / "loop"
    config = miniature(out, "tiny:qwen2_vl")
    path = tmp_path / "matrix.yaml"
    path.write_text(yaml.safe_dump(json.loads(config.model_dump_json())))

    result = CliRunner().invoke(app, ["run", "matrix", str(path), "--quiet", "--json"])
    assert result.exit_code == 0, result.output
    stages = json.loads((out / "report.json").read_text())["stages"]
    assert list(stages) == [
        "tasks",
        "gold_pass_rate",
        "gold",
        "sft",
        "explore",
        "pairs",
        "dpo",
        "eval",
    ]
    assert stages["tasks"] == {"train": 3, "heldout": 2, "elapsed_s": stages["tasks"]["elapsed_s"]}
    assert not Dataset.open(out / "tasks", Task).ids() & Dataset.open(out / "heldout", Task).ids()
    assert stages["sft"]["steps"] == 12 and stages["sft"]["last_loss"] < stages["sft"]["first_loss"]

    # Exploration ran with the SFT policy: K=3 policy samples (+ the gold anchor) per step.
    explored = list(Dataset.open(out / "explore", Trajectory))
    assert len(explored) == 2
    sft_record = json.loads((out / "sft" / RUN_FILE).read_text())
    for trajectory in explored:
        assert trajectory.controller == f"local:{out / 'sft'}" and not sft_record["adapter"]
        for entry in trajectory.metadata["exploration"]:
            sources = [c["source"] for c in entry["candidates"]]
            assert sources == ["policy"] * 3 + ["gold"]
            assert [c["temperature"] for c in entry["candidates"]] == [0.7, 1.2, 1.2, None]
    pairs = Dataset.open(out / "pairs", PreferencePair)
    assert len(pairs) == stages["pairs"]["pairs"] > 0
    assert sum(stages["pairs"]["per_step"].values()) == len(pairs)

    # The pairs pass the training issue's checks against the model DPO starts from.
    from transformers import AutoConfig

    report = DataReport()
    rows = pair_rows([out / "pairs"], report=report)
    kept = check_pair_rows(
        rows,
        load_processor(out / "sft"),
        AutoConfig.from_pretrained(out / "sft"),
        max_length=8192,
        report=report,
    )
    assert len(kept) == len(pairs) and report.images == len(pairs)  # each prompt: its image
    from tracetune.formats.registry import ExportOptions, export_dataset

    for name in ("trl-dpo", "llamafactory-dpo"):  # and the trainers' formats take them
        exported = export_dataset(name, out / "pairs", tmp_path / name, ExportOptions())
        assert exported.rows == len(pairs)
    dpo_record = json.loads((out / "dpo" / RUN_FILE).read_text())
    assert dpo_record["kind"] == "dpo" and dpo_record["steps"] == 4
    assert dpo_record["data"]["kept"] == len(pairs)
    assert (out / "dpo" / "adapter_config.json").is_file()

    accuracy = stages["eval"]["heldout_accuracy"]
    assert set(accuracy) == {"sft", "dpo"} and all(a["total"] == 2 for a in accuracy.values())
    # The held-out evaluation is the `programs` benchmark (tracetune eval run), on its own
    # split with the training tasks excluded, and every policy saw exactly that split.
    from tracetune.evaluate.programs_run import heldout_seed

    heldout_ids = Dataset.open(out / "heldout", Task).ids()
    assert all(t.metadata["split"] == "heldout" for t in Dataset.open(out / "heldout", Task))
    assert {t.provenance.seed for t in Dataset.open(out / "heldout", Task)} <= {
        heldout_seed(1_000_003, i) for i in range(20)
    }
    for name in ("sft", "dpo"):
        metrics = json.loads((out / "eval" / name / "metrics.json").read_text())
        assert metrics["benchmark"] == "programs" and metrics["reports"]["programs"]["n_items"] == 2
        run = json.loads((out / "eval" / name / "run.json").read_text())
        assert run["excluded_datasets"] == [str(out / "tasks")]
        evaluated = Dataset.open(out / "eval" / name / "trajectories", Trajectory)
        assert {t.task.id for t in evaluated} == heldout_ids
    assert accuracy["dpo"]["run"] == str(out / "eval" / "dpo")

    # A rerun resumes: nothing is explored, built or trained twice.
    again = CliRunner().invoke(app, ["run", "matrix", str(path), "--quiet"])
    assert again.exit_code == 0, again.output
    # The table says the chosen steps came from the gold anchor, not the policy.
    assert "explore.gold_anchor is on" in " ".join(again.output.split())
    rerun = json.loads((out / "report.json").read_text())["stages"]
    assert "reused" in rerun["sft"] and "reused" in rerun["dpo"]
    assert rerun["explore"]["summary"] == "explore: 0 written, 2 already done"
    assert len(Dataset.open(out / "pairs")) == len(pairs)


def test_matrix_config_fails_early_with_the_stage_and_field(tmp_path: Path) -> None:
    from tracetune.models.base import ModelOptions

    # A user's loop explores with the policy's own samples only: no gold anchor by default.
    plain = MatrixConfig(out=tmp_path, base="tiny:qwen2_vl")
    assert not plain.explore_config(tmp_path, "local:x", ModelOptions()).gold_anchor
    assert miniature(tmp_path, "b").explore_config(tmp_path, "local:x", ModelOptions()).gold_anchor
    with pytest.raises(ValueError, match="explore"):
        MatrixConfig(out=tmp_path, base="tiny:qwen2_vl", explore={"k": 0})
    with pytest.raises(ValueError, match="set by the loop itself"):
        MatrixConfig(out=tmp_path, base="tiny:qwen2_vl", sft={"data": ["x"]})
    with pytest.raises(ValueError, match="lora"):
        MatrixConfig(out=tmp_path, base="tiny:qwen2_vl", dpo={"lora": {"r": 0}})
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        yaml.safe_dump(
            {
                "out": str(tmp_path / "o"),
                "base": "tiny:qwen2_vl",
                "explore": {"verifier": "llm-best"},
            }
        )
    )
    result = CliRunner().invoke(app, ["run", "matrix", str(bad)])
    assert result.exit_code == 2 and "needs a judge model" in result.output


@pytest.mark.slow  # gold rollouts, SFT until killed, then the rest of the loop (~90 s)
def test_a_killed_training_stage_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    """`run matrix` is SIGKILLed while its SFT stage trains, once a checkpoint is on disk; the
    rerun continues that run from the checkpoint (the trainer says so) and finishes the loop."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from tracetune.train.model import RUN_FILE, last_complete_checkpoint

    out = tmp_path / "loop"
    sft = {"max_steps": 100_000, "save_steps": 2, "save_total_limit": 2, "logging_steps": 1}
    config = miniature(out, "tiny:qwen2_vl")
    sft = {**config.sft, **sft}
    path = tmp_path / "matrix.yaml"
    data = json.loads(config.model_dump_json())
    data["sft"] = sft
    path.write_text(yaml.safe_dump(data))
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "info"}
    command = [sys.executable, "-m", "tracetune.cli", "run", "matrix", str(path), "--quiet"]
    checkpoints = out / "sft" / "checkpoints"
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            last = last_complete_checkpoint(checkpoints)
            if last is not None and last.name != "checkpoint-2":  # a few steps in
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the loop ended before its SFT stage was killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert not (out / "sft" / RUN_FILE).exists()  # the stage really was cut short
    killed_at = last_complete_checkpoint(checkpoints)
    assert killed_at is not None
    step = int(killed_at.name.removeprefix("checkpoint-"))

    # The rerun asks for two more steps than the checkpoint holds.
    data["sft"] = {**sft, "max_steps": step + 2}
    path.write_text(yaml.safe_dump(data))
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "Resuming training from checkpoint" in rerun.stderr
    assert f"global step {step}" in rerun.stderr.split("Resuming training from checkpoint")[1]
    report = json.loads((out / "report.json").read_text())["stages"]
    assert report["sft"]["steps"] == step + 2
    assert (out / "dpo" / RUN_FILE).is_file() and "eval" in report


def test_a_checkpoint_cut_short_by_a_kill_is_not_resumed_from(tmp_path: Path) -> None:
    """The trainer writes trainer_state.json last: a checkpoint without it is skipped."""
    from tracetune.train.model import last_complete_checkpoint

    checkpoints = tmp_path / "checkpoints"
    (checkpoints / "checkpoint-4").mkdir(parents=True)
    (checkpoints / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (checkpoints / "checkpoint-6").mkdir()
    (checkpoints / "checkpoint-6" / "model.safetensors").write_text("")  # killed mid-save
    (checkpoints / "checkpoint-10.tmp").mkdir()
    assert last_complete_checkpoint(checkpoints) == checkpoints / "checkpoint-4"
    assert last_complete_checkpoint(tmp_path / "missing") is None
