"""MATRIX's data files in their upstream layouts import with their tools, images and pairs.

Layouts written here from mbzuai-oryx/MATRIX (and its TongAgent data pipeline):

- the trajectory verifier's output: ``{id, image, system-prompt, answer, conversations:
  [{role, content}]}``, images under ``image`` as ``{"<image_00>": path}`` with matching
  ``<image_00>`` placeholders in the user turn;
- the Qwen-VL-converted training file (``experiments/Qwen-VL/scripts/convert_dataset_v2.py``:
  ``turn_new["from"] = role``, ``turn_new["value"] = content`` with each image key replaced by
  ``Picture k: <img>path</img>``; every other field, ``system-prompt`` included, kept);
- a Pref-X DPO row as MATRIX's ``pref_data_generation`` reformatting writes it for
  LLaMA-Factory: ``{images, conversations, chosen, rejected, system}`` with the sharegpt tags
  ``human``/``gpt``/``observation`` and an ``observation`` on ``chosen`` and ``rejected``.

The system prompt lists the tools as ``- name: description`` then ``Takes inputs: {...}``
after "You only have access to those tools:", as in ``train_20241116_1628_subset.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from PIL import Image
from typer.testing import CliRunner

from tracetune.cli.io import app as io_app
from tracetune.formats import ImportOptions, import_file
from tracetune.schema import Dialogue, ErrorKind, PreferencePair, Trajectory
from tracetune.store import Dataset

SYSTEM = (
    "You are an expert assistant who can solve any task using code blobs.\n"
    "You only have access to those tools:\n\n"
    "- visualizer: A tool that can answer questions about attached images.\n"
    "    Takes inputs: {'question': {'description': 'the question', 'type': 'text'}, "
    "'image_path': {'description': 'The path to the image', 'type': 'text'}}\n\n"
    "- objectlocation: A tool that can localize objects in given images.\n"
    "    Takes inputs: {'object': {'description': 'the object', 'type': 'text'}, "
    "'image_path': {'description': 'The path to the image', 'type': 'text'}}\n\n"
    "- final_answer: Provides a final answer to the given problem.\n"
    "    Takes inputs: {'answer': {'type': 'text', 'description': 'The final answer'}}\n\n"
    "Now Begin!\n"
)
IMAGE = "data/tongagent/coco/train2017/000000190033.jpg"
STEP0 = (
    "Thought: I will locate the apples first.\n\nCode:\n```py\n"
    f'boxes = objectlocation(object="apple", image_path="{IMAGE}")\nprint(boxes)\n```<end_action>'
)
OBS0 = "[OUTPUT OF STEP 0] Observation:\n[[1, 2, 30, 40], [50, 60, 90, 99]]\n"
STEP1 = 'Thought: Two boxes.\n\nCode:\n```py\nfinal_answer("2")\n```<end_action>'


def _image(root: Path) -> None:
    (root / IMAGE).parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), "red").save(root / IMAGE)


def _records(path: Path, tmp_path: Path, **options: Any) -> list[Any]:
    fmt = options.pop("fmt", "mat")
    out = tmp_path / f"out-{path.stem}-{fmt}-{'-'.join(map(str, options.values()))}"
    import_file(fmt, path, out, ImportOptions(images_root=tmp_path, **options))
    return Dataset.open(out).records()


def test_verifier_output_imports_with_tools_from_system_prompt(tmp_path: Path) -> None:
    _image(tmp_path)
    row = {
        "id": "v-001",
        "image": {"<image_00>": IMAGE},
        "system-prompt": SYSTEM,
        "answer": "2",
        "conversations": [
            {
                "role": "user",
                "content": f"<image_00>\nTask: How many apples?\n Attachment: {IMAGE}; ",
            },
            {"role": "assistant", "content": STEP0},
            {"role": "user", "content": OBS0},
            {"role": "assistant", "content": STEP1},
        ],
    }  # fmt: skip
    path = tmp_path / "verified.json"
    path.write_text(json.dumps([row]))
    (traj,) = _records(path, tmp_path)
    assert isinstance(traj, Trajectory)
    assert traj.tools == ["visualizer", "objectlocation", "final_answer"]
    assert traj.task.tools == ["visualizer", "objectlocation"]
    assert traj.task.query == "How many apples?"
    assert [f.name for f in traj.task.files] == ["000000190033.jpg"]
    assert 'image_path="000000190033.jpg"' in traj.steps[0].action.code
    assert traj.final_answer == "2" and traj.status == "completed"
    # as a dialogue the system prompt leads and the image sits where <image_00> was
    (dialogue,) = _records(path, tmp_path, record_type="dialogue")
    assert isinstance(dialogue, Dialogue)
    assert dialogue.messages[0].role == "system" and "objectlocation" in dialogue.messages[0].text
    user = dialogue.messages[1].content
    assert [p.type for p in user] == ["image", "text"]


def test_qwen_vl_converted_file_reads_tools_from_system_prompt_field(tmp_path: Path) -> None:
    _image(tmp_path)
    row = {
        "id": "q-001",
        "image": {"<image_00>": IMAGE},
        "system-prompt": SYSTEM,
        "answer": "2",
        "conversations": [
            {"from": "user", "value": f"Picture 1: <img>{IMAGE}</img>\nTask: How many apples?\n"},
            {"from": "assistant", "value": STEP0},
            {"from": "user", "value": OBS0},
            {"from": "assistant", "value": STEP1},
        ],
    }  # fmt: skip
    path = tmp_path / "train_converted.json"
    path.write_text(json.dumps([row], indent=4))
    (traj,) = _records(path, tmp_path)
    assert traj.tools == ["visualizer", "objectlocation", "final_answer"]
    assert traj.task.query == "How many apples?" and len(traj.steps) == 2


def _dpo_row() -> dict[str, Any]:
    return {
        "images": [IMAGE],
        "system": SYSTEM,
        "conversations": [
            {"from": "human", "value": "<image>Task: How many apples?"},
            {"from": "gpt", "value": STEP0},
            {"from": "observation", "value": OBS0},
        ],
        "chosen": {
            "from": "gpt",
            "value": STEP1,
            "observation": "[OUTPUT OF STEP 1] Observation:\n2",
        },
        "rejected": {
            "from": "gpt",
            "value": "Thought: Count.\n\nCode:\n```py\nfinal_answer(cnt)\n```<end_action>",
            "observation": "[OUTPUT OF STEP 1] Error: NameError: name 'cnt' is not defined",
        },
    }


def test_prefx_dpo_row_imports_as_a_preference_pair(tmp_path: Path) -> None:
    _image(tmp_path)
    path = tmp_path / "prefx.json"
    path.write_text(json.dumps([_dpo_row(), {**_dpo_row(), "chosen": _dpo_row()["rejected"]}]))
    for fmt in ("mat-dpo", "mat"):  # named explicitly, or recognized by --format mat
        pairs = _records(path, tmp_path, fmt=fmt)
        assert len(pairs) == 2 and all(isinstance(p, PreferencePair) for p in pairs)
        pair = pairs[0]
        assert pair.action_format == "code"
        assert pair.tools == ["visualizer", "objectlocation", "final_answer"]
        assert pair.task.query == "How many apples?"
        assert [f.name for f in pair.task.files] == ["000000190033.jpg"]
        assert len(pair.prefix) == 1 and pair.prefix[0].observation.text.startswith("[[1, 2")
        assert pair.chosen.action.answer == "2" and pair.chosen.observation.text == "2"
        assert pair.chosen.index == pair.rejected.index == 1
        assert pair.rejected.error.kind == ErrorKind.CODE
        assert "NameError" in pair.rejected.error.message
        assert pair.rejected.action.answer is None  # it raised: it did not answer


def test_prefx_rows_through_the_cli_and_bad_rows(tmp_path: Path) -> None:
    _image(tmp_path)
    path = tmp_path / "prefx.jsonl"
    bad = {k: v for k, v in _dpo_row().items() if k != "rejected"}
    path.write_text(json.dumps(_dpo_row()) + "\n" + json.dumps(bad) + "\n")
    runner = CliRunner()
    args = ["import", "--format", "mat-dpo", "--in", str(path), "--images-root", str(tmp_path)]
    result = runner.invoke(io_app, [*args, "--out", str(tmp_path / "a")])
    assert result.exit_code != 0 and "row 1" in result.output and "'rejected'" in result.output
    result = runner.invoke(io_app, [*args, "--out", str(tmp_path / "b"), "--skip-invalid"])
    assert result.exit_code == 0, result.output
    assert len(Dataset.open(tmp_path / "b")) == 1
