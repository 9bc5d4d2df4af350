"""Exporters and importers for TRL, LLaMA-Factory, ms-swift and MAT / M-TRACE data."""

from __future__ import annotations

import asyncio
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import datasets
import pytest
from PIL import Image
from typer.testing import CliRunner

from tracetune.agent import Agent, get_format
from tracetune.cli.io import app as io_app
from tracetune.formats import (
    ExportOptions,
    FormatError,
    ImportOptions,
    dialogue_chat,
    export_dataset,
    export_formats,
    import_file,
    import_formats,
    load_trl_dataset,
    pair_chat,
    trajectory_chat,
)
from tracetune.formats.llamafactory import check_llamafactory_row
from tracetune.formats.mat import mat_tools, parse_mat_step
from tracetune.schema import (
    Action,
    Dialogue,
    ErrorKind,
    Message,
    Observation,
    PreferencePair,
    Step,
    StepError,
    Task,
    Trajectory,
)
from tracetune.store import AssetStore, Dataset
from tracetune.testing import ScriptedChatModel
from tracetune.tools import get_tool

FIXTURES = Path(__file__).parent / "fixtures"
MAT_SAMPLE = FIXTURES / "mat_sft_sample.json"
SFT_FORMATS = ["trl-sft", "llamafactory", "swift"]
PAIR_FORMATS = ["trl-dpo", "llamafactory-dpo", "swift"]
TOOL_TURNS = ["structured", "text"]


def act(name: str, **arguments: object) -> str:
    """A JSON-action step as the agent prompt asks for it (the canonical spelling)."""
    return f"Thought: use {name}\nAction: {json.dumps({'name': name, 'arguments': arguments})}"


def picture(color: str, size: tuple[int, int] = (56, 56)) -> Image.Image:
    img = Image.new("RGB", size, "white")
    img.paste(Image.new("RGB", (size[0] // 2, size[1]), color), (size[0] // 2, 0))
    return img


# -- records ----------------------------------------------------------------------------------
def json_episode(assets: AssetStore) -> Trajectory:
    """A real agent run: an image observation, a parse error, a tool call, a final answer."""
    photo = assets.put_image(picture("red"), "photo.png")
    notes = assets.put_bytes(b"total: 14\n", "notes.txt")
    model = ScriptedChatModel(
        [
            act("image_crop", image="photo.png", box=[28, 0, 56, 56]),
            "I am not sure what to do",
            act("calculator", expression="(3 + 4) * 2"),
            act("final_answer", answer="14"),
        ]
    )
    agent = Agent(model, [get_tool("calculator"), get_tool("image_crop")])
    task = Task(
        id="json-task", query="Crop the red half, then compute (3+4)*2.", files=[photo, notes]
    )
    return asyncio.run(agent.run(task, assets, assets, trajectory_id="json-episode"))


def code_episode(assets: AssetStore) -> Trajectory:
    """A code-action episode with two images of the same name, a failing step and an answer."""
    fmt = get_format("code")
    first = assets.put_image(picture("blue"), "photo.png")
    second = assets.put_image(picture("green"), "photo.png")
    crop = assets.put_image(picture("blue", (28, 28)), "crop.png")
    look = Action(type="code", code='print(image_crop(image="photo.png", box=[0, 0, 28, 28]))')
    fail = Action(type="code", code="ratio = 1 / 0")
    done = Action(type="code", code='final_answer("blue")', answer="blue")
    steps = [
        Step(
            index=0,
            raw=fmt.render("Look at the first picture.", look),
            thought="Look at the first picture.",
            action=look,
            observation=Observation(text="crop.png", images=[crop]),
        ),
        Step(
            index=1,
            raw="Thought: compute a ratio\nCode:\n```py\nratio = 1 / 0\n```",
            thought="compute a ratio",
            action=fail,
            error=StepError(kind=ErrorKind.CODE, message="ZeroDivisionError: division by zero"),
        ),
        Step(
            index=2,
            raw=fmt.render("It is blue.", done),
            thought="It is blue.",
            action=done,
            observation=Observation(text="blue"),
        ),
    ]
    task = Task(
        id="code-task",
        query="Which colour is the left half of the first picture?",
        files=[first, second],
    )
    return Trajectory(
        id="code-episode",
        task=task,
        controller="scripted",
        action_format="code",
        tools=["image_crop"],
        steps=steps,
        final_answer="blue",
    )


def dialogue(assets: AssetStore) -> Dialogue:
    image = assets.put_image(picture("yellow"), "square.png")
    task = Task(id="rr-task", query="What colour is the right half?", files=[image])
    return Dialogue(
        id="rr-dialogue",
        task=task,
        format="rr",
        messages=[
            Message.of("system", "Reason step by step; call operators when needed."),
            Message.of("user", "What colour is the right half?", [image]),
            Message.of(
                "assistant",
                "<THOUGHT>Check the colours.</THOUGHT><OPERATOR>caption"
                "</OPERATOR><SIGNAL>continue</SIGNAL>",
            ),
            Message.of("user", "Results of caption: a yellow half and a white half."),
            Message.of("assistant", "The answer is: yellow"),
        ],
    )


def pairs(traj: Trajectory, code: Trajectory) -> list[PreferencePair]:
    """Pairs forking after the first step: chosen is the committed step, rejected a bad one."""
    bad_json = Step(index=1, raw="The answer is probably 12")
    parsed = get_format("json").parse(act("calculator", expression="3 + 4 * 2"))
    bad_call = Step(
        index=1,
        raw=act("calculator", expression="3 + 4 * 2"),
        thought=parsed.thought,
        action=parsed.action,
    )
    bad_code = Step(
        index=1,
        raw='Thought: guess\nCode:\n```py\nfinal_answer("red")\n```',
        thought="guess",
        action=Action(type="code", code='final_answer("red")'),
    )
    common = {
        "task": traj.task,
        "action_format": "json",
        "tools": traj.tools,
        "prefix": traj.steps[:1],
    }
    return [
        PreferencePair(id="pair-malformed", chosen=traj.steps[2], rejected=bad_json, **common),
        PreferencePair(id="pair-two-calls", chosen=traj.steps[2], rejected=bad_call, **common),
        PreferencePair(
            id="pair-code",
            task=code.task,
            action_format="code",
            tools=code.tools,
            prefix=code.steps[:1],
            chosen=code.steps[2],
            rejected=bad_code,
        ),
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Datasets of trajectories, dialogues and pairs, written and read back like real ones."""
    root = tmp_path_factory.mktemp("records")
    trajs = Dataset.create(root / "trajectories", Trajectory)
    json_traj, code_traj = json_episode(trajs.assets), code_episode(trajs.assets)
    trajs.write_all([json_traj, code_traj])
    dialogues = Dataset.create(root / "dialogues", Dialogue)
    dialogues.write_all([dialogue(dialogues.assets)])
    pair_ds = Dataset.create(root / "pairs", PreferencePair)
    stored = {t.id: t for t in trajs}
    pair_ds.write_all(pairs(stored["json-episode"], stored["code-episode"]), sources=[trajs.assets])
    return {
        "trajectory": root / "trajectories",
        "dialogue": root / "dialogues",
        "pair": root / "pairs",
    }


def trimmed(chat: dict[str, Any]) -> tuple[list[Any], list[str]]:
    """A chat up to its last assistant turn (exports drop the final answer's echo)."""
    messages, images = chat["messages"], chat["images"]
    end = max(i for i, m in enumerate(messages) if m["role"] == "assistant") + 1
    kept = sum(1 for m in messages[:end] for p in m["content"] if p["type"] == "image")
    return messages[:end], [ref.sha256 for ref in images[:kept]]


def by_id(path: Path) -> dict[str, Any]:
    return {r.id: r for r in Dataset.open(path)}


# -- round trips ------------------------------------------------------------------------------
@pytest.mark.parametrize("tool_turns", TOOL_TURNS)
@pytest.mark.parametrize("fmt", SFT_FORMATS)
def test_trajectories_round_trip(
    fmt: str, tool_turns: str, data: dict[str, Path], tmp_path: Path
) -> None:
    # The episodes hold a failed step on purpose: exported as they are, they come back whole.
    options = ExportOptions(tool_turns=tool_turns, include_failed=True)
    report = export_dataset(fmt, data["trajectory"], tmp_path / "out", options)
    assert report.rows == 2 and not report.skipped
    imported = import_file(fmt, tmp_path / "out", tmp_path / "back")
    assert imported.record_type == "trajectory" and imported.imported == 2

    originals, back = by_id(data["trajectory"]), by_id(tmp_path / "back")
    assert set(back) == set(originals)
    for rid, original in originals.items():
        again = back[rid]
        assert trimmed(trajectory_chat(again)) == trimmed(trajectory_chat(original))
        assert again.action_format == original.action_format
        assert [s.action.type if s.action else None for s in again.steps] == [
            s.action.type if s.action else None for s in original.steps
        ]
        assert [s.error.kind if s.error else None for s in again.steps] == [
            s.error.kind if s.error else None for s in original.steps
        ]
        assert again.final_answer == original.final_answer
        # Attachments come back with their names and bytes, images with their content.
        assert [(f.name, f.sha256, f.mime) for f in again.task.files] == [
            (f.name, f.sha256, f.mime) for f in original.task.files
        ] or rid == "code-episode"
    # Same-named images were listed under unique names; they come back under those names.
    assert [f.name for f in back["code-episode"].task.files] == ["photo.png", "photo_2.png"]
    notes = back["json-episode"].task.files[1]
    assert Dataset.open(tmp_path / "back").assets.read_bytes(notes) == b"total: 14\n"


@pytest.mark.parametrize("fmt", SFT_FORMATS)
def test_dialogues_round_trip_as_dialogues(fmt: str, data: dict[str, Path], tmp_path: Path) -> None:
    export_dataset(fmt, data["dialogue"], tmp_path / "out")
    report = import_file(fmt, tmp_path / "out", tmp_path / "back")
    # Its system prompt is not the agent's: auto import keeps it as a plain chat.
    assert report.record_type == "dialogue" and report.imported == 1
    original = next(iter(Dataset.open(data["dialogue"])))
    again = next(iter(Dataset.open(tmp_path / "back")))
    assert trimmed(dialogue_chat(again)) == trimmed(dialogue_chat(original))
    assert again.task.query == original.task.query


@pytest.mark.parametrize("tool_turns", TOOL_TURNS)
@pytest.mark.parametrize("fmt", PAIR_FORMATS)
def test_pairs_round_trip(fmt: str, tool_turns: str, data: dict[str, Path], tmp_path: Path) -> None:
    export_dataset(fmt, data["pair"], tmp_path / "out", ExportOptions(tool_turns=tool_turns))
    report = import_file(fmt, tmp_path / "out", tmp_path / "back")
    assert report.record_type == "pair" and report.imported == 3
    originals, back = by_id(data["pair"]), by_id(tmp_path / "back")
    for rid, original in originals.items():
        a, b = pair_chat(original), pair_chat(back[rid])
        assert b["prompt"] == a["prompt"] and b["chosen"] == a["chosen"]
        assert b["rejected"] == a["rejected"]
        assert [r.sha256 for r in b["images"]] == [r.sha256 for r in a["images"]]
        assert back[rid].step_index == original.step_index == 1


def test_swift_pairs_use_one_rejected_column_per_file(
    data: dict[str, Path], tmp_path: Path
) -> None:
    export_dataset("swift", data["pair"], tmp_path / "s")
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "s/train.jsonl").open())}
    # Structured steps span two messages, so every row carries the rejected conversation.
    assert all("rejected_messages" in r and "rejected_response" not in r for r in rows.values())
    assert rows["pair-malformed"]["messages"][-1]["role"] == "tool_call"
    assert rows["pair-malformed"]["rejected_messages"][-1] == {
        "role": "assistant",
        "content": "The answer is probably 12",
    }
    assert rows["pair-two-calls"]["rejected_messages"][-1]["role"] == "tool_call"
    assert rows["pair-code"]["rejected_messages"][-1]["content"].startswith("Thought: guess")
    assert rows["pair-code"]["rejected_images"] == rows["pair-code"]["images"]
    assert rows["pair-code"]["messages"][:-1] == rows["pair-code"]["rejected_messages"][:-1]
    export_dataset("swift", data["pair"], tmp_path / "t", ExportOptions(tool_turns="text"))
    rows = {r["id"]: r for r in map(json.loads, (tmp_path / "t/train.jsonl").open())}
    assert all("rejected_response" in r and "rejected_messages" not in r for r in rows.values())
    assert all("tools" not in r for r in rows.values())
    assert rows["pair-malformed"]["rejected_response"] == "The answer is probably 12"


def test_structured_turns_normalize_the_step_text(data: dict[str, Path], tmp_path: Path) -> None:
    """A structured call keeps the thought and the call; the text around them is rebuilt."""
    src = Dataset.open(data["trajectory"])
    traj = next(t for t in src if t.id == "json-episode")
    step = traj.steps[2]
    sloppy = (
        'Thought:   use calculator  \n\nAction:{"name": "calculator", '
        '"arguments": {"expression": "(3 + 4) * 2"}}'
    )
    traj.steps[2] = step.model_copy(update={"raw": sloppy})
    ds = Dataset.create(tmp_path / "sloppy", Trajectory)
    ds.write_all([traj], sources=[src.assets])
    for turns, expected in (
        ("structured", act("calculator", expression="(3 + 4) * 2")),
        ("text", sloppy),
    ):
        options = ExportOptions(tool_turns=turns, include_failed=True)
        export_dataset("llamafactory", ds.root, tmp_path / turns, options)
        import_file("llamafactory", tmp_path / turns, tmp_path / f"{turns}-back")
        again = next(iter(Dataset.open(tmp_path / f"{turns}-back")))
        assert again.steps[2].raw == expected
        assert again.steps[2].action.tool_call.arguments == {"expression": "(3 + 4) * 2"}


# -- the trainers' own checks -----------------------------------------------------------------
def test_llamafactory_rows_follow_its_rules_and_load(data: dict[str, Path], tmp_path: Path) -> None:
    export_dataset(
        "llamafactory", data["trajectory"], tmp_path / "sft", ExportOptions(include_failed=True)
    )
    export_dataset(
        "llamafactory-dpo", data["pair"], tmp_path / "dpo", ExportOptions(name="agent_pairs")
    )
    for name, ranking, count in (("sft", False, 2), ("dpo", True, 3)):
        out = tmp_path / name
        info = json.loads((out / "dataset_info.json").read_text())
        ((key, entry),) = info.items()
        assert entry["file_name"] == "train.jsonl" and entry["formatting"] == "sharegpt"
        assert entry.get("ranking", False) is ranking
        assert entry["columns"]["messages"] == "conversations"
        assert (
            entry["columns"]["images"] == "images"
            and entry["tags"]["function_tag"] == "function_call"
        )
        ds = datasets.load_dataset("json", data_files=str(out / entry["file_name"]), split="train")
        assert len(ds) == count
        for row in ds:
            check_llamafactory_row(row, row["id"])
            assert all((out / p).is_file() for p in row["images"])
            assert json.loads(row["tools"])[0]["type"] == "function"
    assert key == "agent_pairs"
    sft = {r["id"]: r for r in map(json.loads, (tmp_path / "sft/train.jsonl").open())}
    turns = [t["from"] for t in sft["json-episode"]["conversations"]]
    assert turns == [
        "human",
        "function_call",
        "observation",
        "gpt",
        "human",
        "function_call",
        "observation",
        "function_call",
    ]
    assert sft["json-episode"]["conversations"][2]["value"].startswith("<image>cropped")
    assert [t["from"] for t in sft["code-episode"]["conversations"]] == ["human", "gpt"] * 3
    # Plain-text steps: no tools column, or LLaMA-Factory would add its own tool-call syntax.
    export_dataset(
        "llamafactory",
        data["trajectory"],
        tmp_path / "text",
        ExportOptions(tool_turns="text", include_failed=True),
    )
    entry = json.loads((tmp_path / "text/dataset_info.json").read_text())["text"]
    assert "tools" not in entry["columns"]
    text_rows = list(map(json.loads, (tmp_path / "text/train.jsonl").open()))
    assert all(
        "tools" not in r and {t["from"] for t in r["conversations"]} == {"human", "gpt"}
        for r in text_rows
    )


def test_image_placeholder_count_is_checked_and_names_the_record(
    data: dict[str, Path], tmp_path: Path
) -> None:
    src = Dataset.open(data["trajectory"])
    bad = next(t for t in src if t.id == "code-episode")
    bad = bad.model_copy(update={"id": "mentions-image"})
    bad.task = bad.task.model_copy(update={"query": "Describe <image> and its colour."})
    ds = Dataset.create(tmp_path / "bad", Trajectory)
    ds.write_all([*src, bad], sources=[src.assets])
    for fmt in ("llamafactory", "swift"):
        with pytest.raises(
            FormatError, match=r"mentions-image: 4 <image> placeholders but 3 images"
        ):
            export_dataset(fmt, ds.root, tmp_path / fmt)
        assert not (tmp_path / fmt / "train.jsonl").exists()
        report = export_dataset(fmt, ds.root, tmp_path / fmt, ExportOptions(skip_invalid=True))
        assert report.rows == 2 and [rid for rid, _ in report.skipped] == ["mentions-image"]
        manifest = json.loads((tmp_path / fmt / "export.json").read_text())
        assert manifest["skipped"][0]["id"] == "mentions-image"
    with pytest.raises(FormatError, match="turn 2 is 'human'"):
        check_llamafactory_row(
            {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},
            "x",
        )
    with pytest.raises(FormatError, match="chosen must be exactly one"):
        check_llamafactory_row(
            {
                "conversations": [{"from": "human", "value": "a"}],
                "chosen": [{"from": "gpt", "value": "b"}],
                "rejected": {"from": "gpt", "value": "c"},
            },
            "x",
        )


@pytest.fixture(scope="module")
def qwen_processor(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from tracetune.models.processors import load_processor
    from tracetune.models.tiny import init_tiny

    return load_processor(init_tiny("qwen2_vl", tmp_path_factory.mktemp("qwen") / "model"))


@pytest.mark.slow  # builds a tiny Qwen2-VL (~4 s)
def test_trl_sft_rows_run_through_trls_vision_collator(
    data: dict[str, Path], tmp_path: Path, qwen_processor: Any
) -> None:
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    export_dataset("trl-sft", data["trajectory"], tmp_path / "sft")
    ds = load_trl_dataset(tmp_path / "sft")
    assert isinstance(ds[0]["images"][0], Image.Image)
    rows = [ds[i] for i in range(len(ds))]
    expected_assistant = [
        "".join(
            p["text"] + "<|im_end|>"
            for m in r["messages"]
            if m["role"] == "assistant"
            for p in m["content"]
        )
        for r in rows
    ]
    n_images = sum(len(r["images"]) for r in rows)
    batch = DataCollatorForVisionLanguageModeling(qwen_processor, assistant_only_loss=True)(rows)

    grid = batch["image_grid_thw"]
    assert grid.shape[0] == n_images == 5  # 2 task + 1 tool image, and 2 task images
    assert batch["pixel_values"].shape[0] == int(grid.prod(dim=1).sum())
    pad = qwen_processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert int((batch["input_ids"] == pad).sum()) == int(grid.prod(dim=1).sum()) // 4
    tok = qwen_processor.tokenizer
    for i, want in enumerate(expected_assistant):
        trained = batch["input_ids"][i][batch["labels"][i] != -100]
        # Loss falls on the assistant turns exactly: no system, task or observation tokens.
        assert tok.decode(trained) == want


@pytest.mark.slow
def test_trl_dpo_rows_run_through_trls_vision_preference_collator(
    data: dict[str, Path], tmp_path: Path, qwen_processor: Any
) -> None:
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    export_dataset("trl-dpo", data["pair"], tmp_path / "dpo")
    ds = load_trl_dataset(tmp_path / "dpo")
    rows = [ds[i] for i in range(len(ds))]
    chosen = [r["chosen"][0]["content"][0]["text"] for r in rows]
    rejected = [r["rejected"][0]["content"][0]["text"] for r in rows]
    batch = DataCollatorForVisionPreference(qwen_processor)(rows)
    n = len(rows)
    assert batch["input_ids"].shape[0] == 2 * n
    assert batch["image_grid_thw"].shape[0] == 2 * sum(len(r["images"]) for r in rows)
    tok = qwen_processor.tokenizer
    for i in range(n):
        assert tok.decode(batch["input_ids"][i][batch["completion_mask"][i] == 1]).startswith(
            chosen[i]
        )
        assert tok.decode(
            batch["input_ids"][n + i][batch["completion_mask"][n + i] == 1]
        ).startswith(rejected[i])


def test_swift_rows_load_and_mark_images(data: dict[str, Path], tmp_path: Path) -> None:
    options = ExportOptions(absolute_paths=True, include_failed=True)
    export_dataset("swift", data["trajectory"], tmp_path / "s", options)
    ds = datasets.load_dataset("json", data_files=str(tmp_path / "s/train.jsonl"), split="train")
    roles = {r["id"]: [m["role"] for m in r["messages"]] for r in ds}
    assert roles["json-episode"] == [
        "system",
        "user",
        "assistant",
        "tool_call",
        "tool_response",
        "assistant",
        "user",
        "assistant",
        "tool_call",
        "tool_response",
        "assistant",
        "tool_call",
    ]
    for row in ds:
        assert sum(m["content"].count("<image>") for m in row["messages"]) == len(row["images"])
        assert all(Path(p).is_absolute() and Path(p).is_file() for p in row["images"])


# -- export options and errors ----------------------------------------------------------------
def test_images_are_self_contained_and_can_be_hard_linked(
    data: dict[str, Path], tmp_path: Path
) -> None:
    export_dataset("trl-sft", data["trajectory"], tmp_path / "copy")
    export_dataset("trl-sft", data["trajectory"], tmp_path / "link", ExportOptions(images="link"))
    assets = Dataset.open(data["trajectory"]).assets
    row = json.loads((tmp_path / "link/train.jsonl").read_text().splitlines()[0])
    linked = tmp_path / "link" / row["images"][0]
    copied = tmp_path / "copy" / row["images"][0]
    original = next(assets.root.glob(f"assets/*/{linked.stem}*"))
    assert linked.stat().st_ino == original.stat().st_ino
    assert copied.stat().st_ino != original.stat().st_ino
    assert copied.read_bytes() == original.read_bytes()
    # The export stands alone: moved elsewhere, it still imports.
    moved = tmp_path / "moved"
    shutil.move(tmp_path / "copy", moved)
    assert import_file("trl-sft", moved, tmp_path / "back").imported == 2
    with pytest.raises(FormatError, match="already holds an export"):
        export_dataset("trl-sft", data["trajectory"], tmp_path / "link")
    (tmp_path / "link/images/stale.png").write_bytes(b"old")
    export_dataset("trl-sft", data["trajectory"], tmp_path / "link", ExportOptions(overwrite=True))
    assert not (tmp_path / "link/images/stale.png").exists() and linked.exists()


def test_wrong_record_type_and_unknown_format_are_clear_errors(
    data: dict[str, Path], tmp_path: Path
) -> None:
    with pytest.raises(
        FormatError, match="trl-dpo exports pair datasets.*holds trajectory records"
    ):
        export_dataset("trl-dpo", data["trajectory"], tmp_path / "a")
    with pytest.raises(FormatError, match="llamafactory exports trajectory or dialogue.*pair"):
        export_dataset("llamafactory", data["pair"], tmp_path / "b")
    with pytest.raises(FormatError, match="unknown export format 'axolotl'.*trl-sft"):
        export_dataset("axolotl", data["trajectory"], tmp_path / "c")
    export_dataset("trl-sft", data["trajectory"], tmp_path / "sft")
    with pytest.raises(FormatError, match="needs prompt, chosen and rejected"):
        import_file("trl-dpo", tmp_path / "sft", tmp_path / "d")


def test_foreign_chats_import_as_dialogues_not_trajectories(tmp_path: Path) -> None:
    """LLaMA-Factory tool-calling data from elsewhere: a plain chat, structured calls kept."""
    (tmp_path / "img.png").write_bytes(b"")
    picture("red").save(tmp_path / "img.png")
    rows = [
        {
            "conversations": [
                {"from": "human", "value": "<image>How many red pixels?"},
                {
                    "from": "function_call",
                    "value": '{"name": "count", "arguments": {"colour": "red"}}',
                },
                {"from": "observation", "value": "1568"},
                {"from": "gpt", "value": "1568 red pixels."},
            ],
            "system": "You are a helpful assistant.",
            "tools": '[{"name": "count", "description": "Count pixels.", "parameters": {}}]',
            "images": ["img.png"],
        }
    ]
    (tmp_path / "data.json").write_text(json.dumps(rows))
    with pytest.raises(FormatError, match="row 0 .* is not an agent episode.*--as dialogue"):
        import_file(
            "llamafactory",
            tmp_path / "data.json",
            tmp_path / "t",
            ImportOptions(record_type="trajectory"),
        )
    report = import_file("llamafactory", tmp_path / "data.json", tmp_path / "d")
    assert report.record_type == "dialogue"
    dialog = next(iter(Dataset.open(tmp_path / "d")))
    chat = dialogue_chat(dialog)
    assert [m["role"] for m in chat["messages"]] == [
        "system",
        "user",
        "assistant",
        "tool",
        "assistant",
    ]
    assert '"name": "count"' in chat["messages"][2]["content"][0]["text"]
    assert dialog.task.query == "How many red pixels?" and len(chat["images"]) == 1


def test_tool_names_from_data_never_import_code(data: dict[str, Path], tmp_path: Path) -> None:
    """A 'module:attr' tool name (which tracetune's registry would import) is refused."""
    export_dataset("trl-sft", data["trajectory"], tmp_path / "sft")
    rows = list(map(json.loads, (tmp_path / "sft/train.jsonl").open()))
    rows[0]["tools"] = json.dumps([{"name": "antigravity:fly"}])
    (tmp_path / "sft/train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(FormatError, match=r"\['antigravity:fly'\] are not registered tool names"):
        import_file(
            "trl-sft", tmp_path / "sft", tmp_path / "t", ImportOptions(record_type="trajectory")
        )
    assert "antigravity" not in sys.modules


def test_llamafactory_import_follows_its_dataset_info_mapping(tmp_path: Path) -> None:
    """Columns and tags come from the dataset_info.json entry beside the data file."""
    picture("blue").save(tmp_path / "blue.png")
    rows = [
        {
            "msgs": [
                {"role": "user", "content": "Which colour? <image>"},
                {"role": "assistant", "content": "Blue."},
            ],
            "pics": ["blue.png"],
        }
    ]
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    info = {
        "chat": {
            "file_name": "chat.jsonl",
            "formatting": "sharegpt",
            "columns": {"messages": "msgs", "images": "pics"},
            "tags": {
                "role_tag": "role",
                "content_tag": "content",
                "user_tag": "user",
                "assistant_tag": "assistant",
            },
        }
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    report = import_file("llamafactory", tmp_path, tmp_path / "out")
    assert report.record_type == "dialogue" and report.imported == 1
    chat = dialogue_chat(next(iter(Dataset.open(tmp_path / "out"))))
    assert chat["messages"][0]["content"] == [
        {"type": "text", "text": "Which colour? "},
        {"type": "image"},
    ]
    assert chat["images"][0].width == 56


# -- MAT / M-TRACE ----------------------------------------------------------------------------
def mat_image_paths() -> dict[str, list[str]]:
    out = {}
    for rec in json.loads(MAT_SAMPLE.read_text()):
        image = rec["image"]
        out[rec["id"]] = (
            [image]
            if isinstance(image, str) and image
            else ([image[k] for k in sorted(image)] if isinstance(image, dict) else [])
        )
    return out


def make_images(root: Path, paths: list[str]) -> None:
    for i, p in enumerate(paths):
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        picture(["red", "blue", "green"][i % 3]).save(root / p)


def test_mat_step_parsing() -> None:
    thought, code = parse_mat_step(
        "Preamble first.\n\n**Thought:** Look at it.\n\n**Code:**\n```py\nx = visualizer()\n"
        "print(x)\n```<end_action>"
    )
    assert thought == "Preamble first.\n\nLook at it." and code == "x = visualizer()\nprint(x)"
    assert parse_mat_step("Thought: no code here") == ("no code here", None)


def test_mat_fixture_imports_as_code_trajectories(tmp_path: Path) -> None:
    images = mat_image_paths()
    make_images(tmp_path / "root", [p for ps in images.values() for p in ps])
    report = import_file(
        "mat",
        MAT_SAMPLE,
        tmp_path / "out",
        ImportOptions(images_root=tmp_path / "root", tasks_out=tmp_path / "tasks"),
    )
    assert report.imported == 5 and not report.skipped
    trajs = by_id(tmp_path / "out")
    raw = {r["id"]: r for r in json.loads(MAT_SAMPLE.read_text())}
    for rid, traj in trajs.items():
        n_assistant = sum(t["from"] == "assistant" for t in raw[rid]["conversations"])
        assert len(traj.steps) == n_assistant
        assert traj.action_format == "code" and traj.status == "completed"
        assert all(s.action is not None and s.action.type == "code" for s in traj.steps)
        assert "final_answer(" in traj.steps[-1].action.code
        assert traj.final_answer == raw[rid]["answer"]
        assert [f.is_image for f in traj.task.files] == [True] * len(images[rid])
        assert all(s.thought and "Thought:" not in s.thought for s in traj.steps)
    assert [len(t.steps) for t in trajs.values()] == [2, 4, 5, 3, 2]
    avocado = trajs["FQ8cj0s_"]
    assert avocado.task.query.startswith("How many calories are in 200 grams of avocados?")
    assert avocado.tools == mat_tools(raw["FQ8cj0s_"]["conversations"][0]["value"])
    assert "ask_search_agent" in avocado.tools and "final_answer" in avocado.tools
    assert avocado.steps[0].observation.text.startswith("Calories per 100g of avocado:")
    assert avocado.steps[0].action.code.startswith("calories_per_100g = ask_search_agent(")
    flowers = trajs["eUhXIcXJ"]
    assert flowers.steps[1].error.kind == ErrorKind.CODE
    assert "cannot select an axis" in flowers.steps[1].error.message
    # File paths in code point at the file names the agent's working directory uses.
    assert 'image_path = "000133870.jpg"' in flowers.steps[1].action.code
    assert flowers.task.metadata["source_paths"]["000133870.jpg"].endswith("00013/000133870.jpg")
    recipes = trajs["whD3h3j5"]
    assert recipes.steps[0].thought.startswith("To determine how many unique recipes")
    assert "I will analyze both provided images" in recipes.steps[0].thought
    assert [f.name for f in recipes.task.files] == ["000179790.jpg", "000000190033.jpg"]
    assert len(Dataset.open(tmp_path / "tasks")) == 5


def test_mat_missing_images_error_or_skip(tmp_path: Path) -> None:
    images = mat_image_paths()
    with pytest.raises(FormatError, match=r"row 1 \(id AJzONG1Y\): missing file .*000218055\.jpg"):
        import_file("mat", MAT_SAMPLE, tmp_path / "a")
    # Images for two of the four records that have some: the other two are skipped, by id.
    make_images(tmp_path / "root", images["AJzONG1Y"] + images["whD3h3j5"])
    report = import_file(
        "mat",
        MAT_SAMPLE,
        tmp_path / "b",
        ImportOptions(images_root=tmp_path / "root", on_missing="skip"),
    )
    assert report.imported == 3
    assert sorted(rid for rid, _ in report.skipped) == ["eUhXIcXJ", "v7xej1k3"]
    assert all("missing file" in why for _, why in report.skipped)
    assert set(by_id(tmp_path / "b")) == {"FQ8cj0s_", "AJzONG1Y", "whD3h3j5"}


def test_mat_as_dialogue_keeps_the_conversation_verbatim(tmp_path: Path) -> None:
    images = mat_image_paths()
    make_images(tmp_path, [p for ps in images.values() for p in ps])
    import_file(
        "mat",
        MAT_SAMPLE,
        tmp_path / "d",
        ImportOptions(record_type="dialogue", images_root=tmp_path),
    )
    raw = {r["id"]: r for r in json.loads(MAT_SAMPLE.read_text())}
    for rid, dialog in by_id(tmp_path / "d").items():
        chat = dialogue_chat(dialog)
        assert len(chat["messages"]) == len(raw[rid]["conversations"])
        assert len(chat["images"]) == len(images[rid])
        assert chat["messages"][-1]["content"][0]["text"] == raw[rid]["conversations"][-1]["value"]
    user = dialogue_chat(by_id(tmp_path / "d")["whD3h3j5"])["messages"][1]["content"]
    assert [p["type"] for p in user] == ["text", "image", "text", "image", "text"]


# -- command line -----------------------------------------------------------------------------
def test_cli_export_and_import(data: dict[str, Path], tmp_path: Path) -> None:
    runner = CliRunner()
    help_text = runner.invoke(io_app, ["export", "--help"]).output
    assert all(name in help_text for name in export_formats())
    assert all(
        name in runner.invoke(io_app, ["import", "--help"]).output for name in import_formats()
    )
    result = runner.invoke(
        io_app,
        [
            "export",
            "--format",
            "llamafactory",
            "--in",
            str(data["trajectory"]),
            "--out",
            str(tmp_path / "lf"),
            "--images",
            "link",
            "--tool-turns",
            "text",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "2 trajectory records" in result.output
    result = runner.invoke(
        io_app,
        [
            "import",
            "--format",
            "llamafactory",
            "--in",
            str(tmp_path / "lf"),
            "--out",
            str(tmp_path / "back"),
        ],
    )
    assert result.exit_code == 0 and "2 trajectory records" in result.output
    again = runner.invoke(
        io_app,
        [
            "import",
            "--format",
            "llamafactory",
            "--in",
            str(tmp_path / "lf"),
            "--out",
            str(tmp_path / "back"),
        ],
    )
    assert "2 already there" in again.output
    wrong = runner.invoke(
        io_app,
        [
            "export",
            "--format",
            "trl-dpo",
            "--in",
            str(data["trajectory"]),
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert wrong.exit_code == 2 and "holds trajectory records" in wrong.output
    bad = runner.invoke(
        io_app,
        [
            "export",
            "--format",
            "swift",
            "--in",
            str(data["trajectory"]),
            "--out",
            str(tmp_path / "y"),
            "--images",
            "symlink",
        ],
    )
    assert bad.exit_code == 2 and "--images: expected 'copy' or 'link'" in bad.output
    missing = runner.invoke(
        io_app, ["import", "--format", "mat", "--in", str(MAT_SAMPLE), "--out", str(tmp_path / "m")]
    )
    assert (
        missing.exit_code == 2
        and "AJzONG1Y" in missing.output
        and "--images-root" in missing.output
    )
