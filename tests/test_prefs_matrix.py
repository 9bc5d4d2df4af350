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


def test_a_killed_training_stage_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    from tracetune.prefs.matrix import _resumable

    config = miniature(tmp_path / "loop", "tiny:qwen2_vl")
    sft = config.sft_config(tmp_path / "gold", "base")
    assert not _resumable(sft).resume  # a fresh run starts fresh
    checkpoint = sft.out / "checkpoints" / "checkpoint-4"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text("{}")
    assert _resumable(sft).resume
