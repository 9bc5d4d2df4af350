"""``tracetune export --format hf``: every record type as a Hugging Face dataset directory
(Parquet shards with ``Image`` features, a dataset card) that ``datasets.load_dataset`` opens
with PIL images.

The layout follows the Hub's documented conventions for a dataset repository
(huggingface/datasets, ``docs/source/repository_structure.mdx`` and ``dataset_card.mdx``):
``data/train-00000-of-00001.parquet`` shards, and a ``README.md`` whose YAML header holds
``configs`` (``data_files`` per split) and ``dataset_info.features``; Parquet files written
with the ``huggingface`` schema metadata restore ``Image`` features on load.
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from tracetune.cli.io import app as io_app
from tracetune.formats import export_dataset
from tracetune.schema import (
    RECORD_TYPES,
    Action,
    Dialogue,
    ErrorKind,
    EvalRecord,
    GoldAnswer,
    Message,
    Observation,
    PreferencePair,
    Step,
    StepError,
    Task,
    ToolCall,
    Trajectory,
    Verdict,
)
from tracetune.store import AssetStore, Dataset


def _task(assets: AssetStore, tid: str = "t1") -> Task:
    photo = assets.put_image(Image.new("RGB", (24, 16), "red"), "photo.png")
    sheet = assets.put_bytes(b"a,b\n1,2\n", "table.csv")
    return Task(
        id=tid,
        query="What colour is the photo?",
        files=[photo, sheet],
        tools=["ocr"],
        gold=GoldAnswer(value="red"),
    )


def _step(i: int, thought: str, call: ToolCall | None, answer: str | None = None) -> Step:
    action = (
        Action(type="tool_call", tool_call=call)
        if call
        else Action(type="final_answer", answer=answer)
    )
    body = json.dumps({"name": call.name, "arguments": call.arguments}) if call else answer
    return Step(index=i, raw=f"Thought: {thought}\nAction: {body}", thought=thought, action=action)


def _trajectory(assets: AssetStore, tid: str, status: str = "completed") -> Trajectory:
    task = _task(assets)
    crop = assets.put_image(Image.new("RGB", (8, 8), "red"), "crop.png")
    first = _step(0, "Read it.", ToolCall(name="ocr", arguments={"image": "photo.png"}))
    first.observation = Observation(text="nothing to read", images=[crop])
    last = _step(1, "It is red.", None, "red")
    steps = [first, last] if status == "completed" else [first]
    return Trajectory(
        id=tid,
        task=task,
        controller="scripted",
        tools=["ocr"],
        steps=steps,
        final_answer="red" if status == "completed" else None,
        status=status,  # type: ignore[arg-type]
    )


def _datasets(root: Path) -> dict[str, Path]:
    out = {}
    tasks = Dataset.create(root / "task", Task)
    tasks.write_all([_task(tasks.assets, "t1"), _task(tasks.assets, "t2")])
    trajs = Dataset.create(root / "trajectory", Trajectory)
    trajs.write_all(
        [_trajectory(trajs.assets, "ok"), _trajectory(trajs.assets, "bad", "max_steps")]
    )
    pairs = Dataset.create(root / "pair", PreferencePair)
    base = _trajectory(pairs.assets, "p")
    bad = _step(1, "Guess.", ToolCall(name="ocr", arguments={"image": "nope.png"}))
    bad.error = StepError(kind=ErrorKind.TOOL, message="no such file: nope.png")
    pairs.write_all(
        [
            PreferencePair(
                id="pair-1",
                task=base.task,
                tools=["ocr"],
                prefix=base.steps[:1],
                chosen=base.steps[1],
                rejected=bad,
                chosen_score=1.0,
                verifier="gold",
            )
        ]
    )
    dialogues = Dataset.create(root / "dialogue", Dialogue)
    task = _task(dialogues.assets)
    dialogues.write_all(
        [
            Dialogue(
                id="d1",
                task=task,
                format="chat",
                messages=[
                    Message.of("user", "What colour?", [task.files[0]]),
                    Message.of("assistant", "Red."),
                ],
            )
        ]
    )
    verdicts = Dataset.create(root / "verdict", Verdict)
    verdicts.write_all(
        [Verdict(id="v1", target_id="ok", judge="gold", passed=False, reasons=["wrong"])]
    )
    evals = Dataset.create(root / "eval", EvalRecord)
    evals.write_all(
        [EvalRecord(id="e1", benchmark="gta/e2e/official", item_id="0", scores={"answer_acc": 1.0})]
    )
    for kind in RECORD_TYPES:
        out[kind] = root / kind
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    sources = _datasets(root / "src")
    outs = {}
    for kind, path in sources.items():
        outs[kind] = root / "out" / kind
        export_dataset("hf", path, outs[kind])
    return outs


@pytest.mark.parametrize("kind", list(RECORD_TYPES))
def test_every_record_type_loads_with_pil_images(exported: dict[str, Path], kind: str) -> None:
    out = exported[kind]
    assert sorted(p.name for p in (out / "data").iterdir()) == ["train-00000-of-00001.parquet"]
    ds = datasets.load_dataset(str(out), split="train")
    assert isinstance(ds.features["images"].feature, datasets.Image)
    # every row keeps its record whole
    for row in ds:
        record = RECORD_TYPES[kind].model_validate_json(row["record"])
        assert record.id == row["id"]
    if kind in ("task", "trajectory", "pair", "dialogue"):
        images = ds[0]["images"]
        assert images and all(isinstance(im, Image.Image) for im in images)
        assert images[0].size == (24, 16)
    # the card: YAML header with configs and features, then schema and provenance
    text = (out / "README.md").read_text()
    header = yaml.safe_load(text.split("---")[1])
    assert header["configs"][0]["data_files"][0]["path"] == "data/train-*.parquet"
    names = [f["name"] for f in header["dataset_info"]["features"]]
    assert names == list(ds.features)
    assert header["dataset_info"]["splits"][0]["num_examples"] == len(ds)
    assert "## Schema" in text and "## Provenance" in text and "push_to_hub" in text
    assert all(f"`{col}`" in text for col in ds.features)


def test_episodes_are_trl_rows_and_failed_ones_are_left_out(exported: dict[str, Path]) -> None:
    ds = datasets.load_dataset(str(exported["trajectory"]), split="train")
    assert ds["id"] == ["ok"]  # the unfinished episode is left out, as `train sft` selects
    row = ds[0]
    roles = [m["role"] for m in row["messages"]]
    assert roles[0] == "system" and roles[-1] == "assistant"
    placeholders = sum(p["type"] == "image" for m in row["messages"] for p in m["content"])
    assert placeholders == len(row["images"]) == 2  # the task photo, the observed crop
    assert [f["name"] for f in row["files"]] == ["table.csv"]
    assert row["files"][0]["bytes"] == b"a,b\n1,2\n"
    assert json.loads(row["tools"])[0]["function"]["name"] == "ocr"
    manifest = json.loads((exported["trajectory"] / "export.json").read_text())
    assert manifest["format"] == "hf" and manifest["left_out"][0]["id"] == "bad"
    pair = datasets.load_dataset(str(exported["pair"]), split="train")[0]
    assert pair["chosen"][0]["role"] == pair["rejected"][0]["role"] == "assistant"
    assert pair["prompt"][-1]["role"] == "user" and pair["chosen_score"] == 1.0


def test_cli_export_hf_refuses_to_overwrite_and_lists_it(tmp_path: Path) -> None:
    sources = _datasets(tmp_path / "src")
    runner = CliRunner()
    args = [
        "export",
        "--format",
        "hf",
        "--in",
        str(sources["dialogue"]),
        "--out",
        str(tmp_path / "o"),
    ]
    result = runner.invoke(io_app, args)
    assert result.exit_code == 0, result.output
    assert "Hugging Face dataset" in result.output and "1 dialogue records" in result.output
    again = runner.invoke(io_app, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    assert runner.invoke(io_app, [*args, "--overwrite"]).exit_code == 0
    assert "hf" in runner.invoke(io_app, ["export", "--help"]).output
