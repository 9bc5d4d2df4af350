"""Code actions through the real agent loop and sandbox: tools as functions, state, forks."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from PIL import Image

from tracetune.agent import Agent
from tracetune.agent.code import CodeExecutor
from tracetune.agent.toolbox import ToolBox
from tracetune.data import RECEIPT_IMAGE, receipt_facts
from tracetune.schema import Action, ErrorKind, Task, Trajectory
from tracetune.store import AssetStore
from tracetune.testing import ScriptedChatModel
from tracetune.tools import get_tool


def code(source: str, thought: str = "next step") -> str:
    return f"Thought: {thought}\nCode:\n```py\n{source.strip()}\n```"


def run(agent: Agent, task: Task, source: AssetStore, out: AssetStore) -> Trajectory:
    return asyncio.run(agent.run(task, source, out))


@pytest.fixture
def stores(tmp_path: Path) -> tuple[AssetStore, AssetStore]:
    return AssetStore(tmp_path / "in"), AssetStore(tmp_path / "out")


@pytest.mark.slow  # RapidOCR loads its ONNX models (about 4 s)
def test_receipt_total_with_ocr_and_calculator_in_code(stores) -> None:
    source, out = stores
    ref = source.put_file(RECEIPT_IMAGE, name="receipt.png")
    parse_and_add = """
rows = lines["text"].splitlines()
items, tax = [], None
for row in rows:
    label, _, amount = row.rpartition(" ")
    if label.startswith("Tax"):
        tax = amount
    elif label not in ("Subtotal", "TOTAL") and amount.replace(".", "").isdigit() and "." in amount:
        items.append(amount)
expression = " + ".join(items + [tax])
total = calculator(expression=expression)
print(expression, "=", total)
"""
    model = ScriptedChatModel(
        [
            code('lines = ocr(image="receipt.png")\nprint(lines["text"])', "read the receipt"),
            code(parse_and_add, "add the item prices and the tax"),
            code("final_answer(round(total, 2))", "done"),
        ]
    )
    agent = Agent(model, [get_tool("ocr"), get_tool("calculator")], action_format="code")
    task = Task(id="receipt", query="What is the receipt's total?", files=[ref])
    traj = run(agent, task, source, out)

    assert traj.status == "completed", [s.error for s in traj.steps]
    assert traj.action_format == "code"
    assert float(traj.final_answer) == pytest.approx(receipt_facts()["total"])
    assert traj.final_answer == "36.69"
    first, second, last = traj.steps
    assert "Coffee beans 250g 11.90" in first.observation.text
    assert first.observation.data == {
        "tool_calls": [{"name": "ocr", "arguments": {"image": "receipt.png"}}]
    }
    # The calculator got the six prices and the tax that the code parsed out of the OCR data.
    (call,) = second.observation.data["tool_calls"]
    assert call["name"] == "calculator"
    assert call["arguments"]["expression"] == "3.49 + 5.25 + 6.80 + 4.15 + 2.38 + 11.90 + 2.72"
    assert last.action.type == "code" and last.action.answer == "36.69"
    # The model saw the printed OCR text as its next observation.
    assert "TOTAL 36.69" in model.calls[1]["messages"][-1]["content"][-1]["text"]


def test_state_persists_errors_are_typed_and_image_tools_return_file_names(
    stores, tmp_path: Path
) -> None:
    source, out = stores
    img = Image.new("RGB", (80, 40), "white")
    img.paste(Image.new("RGB", (40, 40), "red"), (40, 0))
    ref = source.put_image(img, "photo.png")
    model = ScriptedChatModel(
        [
            code("x = 20\nprint('set')"),
            code("print(undefined_name)"),
            code(
                'right = image_crop(image="photo.png", box=[40, 0, 80, 40])\n'
                "corner = image_crop(image=right, box=[0, 0, 10, 10])\n"
                "print(type(right).__name__, right, corner)"
            ),
            code("final_answer(x + calculator(expression='1 + 1'))"),
        ]
    )
    agent = Agent(model, [get_tool("calculator"), get_tool("image_crop")], action_format="code")
    traj = run(agent, Task(id="t", query="crop and count", files=[ref]), source, out)

    assert traj.status == "completed" and traj.final_answer == "22"  # x survived 3 steps
    assert traj.steps[0].error is None and traj.steps[0].observation.text == "set"
    error = traj.steps[1].error
    assert error is not None and error.kind == ErrorKind.CODE
    assert "NameError" in error.message and "undefined_name" in error.message
    # The model read the error and went on.
    assert model.calls[2]["messages"][-1]["content"][-1]["text"].startswith("Error (code)")

    crop_step = traj.steps[2]
    assert crop_step.error is None
    images = crop_step.observation.images
    assert [i.name for i in images] == ["image_crop_step2_0.png", "image_crop-2_step2_0.png"]
    assert crop_step.observation.text.startswith("str image_crop_step2_0.png image_crop-2_step2_0")
    assert "[image saved as image_crop_step2_0.png, image_crop-2_step2_0.png]" in (
        crop_step.observation.text
    )
    # The second crop read the first one's file: red all over, 10x10.
    assert (images[0].width, images[0].height) == (40, 40)
    assert (images[1].width, images[1].height) == (10, 10)
    assert out.open_image(images[1]).getpixel((5, 5)) == (255, 0, 0)
    assert [c["name"] for c in crop_step.observation.data["tool_calls"]] == [
        "image_crop",
        "image_crop",
    ]
    # The crops reached the model as images with the next prompt.
    shown = model.calls[3]["messages"][-1]["content"]
    assert [p["type"] for p in shown] == ["image", "image", "text"]


def test_tool_errors_are_raised_in_the_code_and_can_be_caught(stores) -> None:
    source, out = stores
    model = ScriptedChatModel(
        [
            code(
                "try:\n    calculator(expression='1/0')\nexcept Exception as exc:\n"
                "    print('caught', type(exc).__name__, exc)"
            ),
            code("calculator(expression='2 +')"),
            code("final_answer('ok')"),
        ]
    )
    agent = Agent(model, [get_tool("calculator")], action_format="code")
    traj = run(agent, Task(id="t", query="q"), source, out)
    first = traj.steps[0]
    assert first.error is None
    assert first.observation.text.startswith("caught ToolError calculator:")
    assert "division by zero" in first.observation.text
    assert "error" in first.observation.data["tool_calls"][0]
    assert traj.steps[1].error is not None and traj.steps[1].error.kind == ErrorKind.TOOL
    assert traj.status == "completed" and traj.final_answer == "ok"


def test_forks_keep_their_own_state(tmp_path: Path) -> None:
    async def scenario() -> None:
        toolbox = ToolBox(
            [get_tool("calculator"), get_tool("image_crop")],
            tmp_path / "work",
            AssetStore(tmp_path / "out"),
        )
        toolbox.workdir.mkdir()
        Image.new("RGB", (20, 20), "blue").save(toolbox.workdir / "a.png")
        root = await CodeExecutor.start(toolbox)
        try:
            await root.execute(Action(type="code", code="n = 1"), 0)
            left, right = await root.fork(), await root.fork()
            crop = 'c = image_crop(image="a.png", box=[0, 0, 5, 5])'
            a = await left.execute(Action(type="code", code=f"n += 10\n{crop}\nprint(n, c)"), 1)
            b = await right.execute(Action(type="code", code=f"n += 100\n{crop}\nprint(n, c)"), 1)
            assert a.error is None and b.error is None
            left_n, left_file = a.observation.text.splitlines()[0].split()
            right_n, right_file = b.observation.text.splitlines()[0].split()
            assert (left_n, right_n) == ("11", "101")
            # Same tool at the same step in two forks: two files, neither overwritten.
            assert left_file != right_file
            assert [i.name for i in a.observation.images] == [left_file]
            assert [i.name for i in b.observation.images] == [right_file]
            assert (toolbox.workdir / left_file).exists() and (
                toolbox.workdir / right_file
            ).exists()
            again = await left.execute(Action(type="code", code="print(n)"), 2)
            assert again.observation.text == "11"
            base = await root.execute(Action(type="code", code="print(n)"), 1)
            assert base.observation.text == "1"
        finally:
            await root.close()
        assert not toolbox.workdir.exists()
        assert left.sandbox is not None and left.sandbox.pid is None  # forks closed too

    asyncio.run(scenario())


def test_code_that_prints_nothing_says_so(stores) -> None:
    source, out = stores
    model = ScriptedChatModel([code("y = 3"), code("final_answer(y)")])
    traj = run(
        Agent(model, [get_tool("calculator")], action_format="code"),
        Task(id="t", query="q"),
        source,
        out,
    )
    assert "printed nothing" in traj.steps[0].observation.text
    assert traj.final_answer == "3"
