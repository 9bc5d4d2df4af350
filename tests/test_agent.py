"""The controller loop with a scripted model: parsing, tools, typed errors, budgets."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from PIL import Image

from tracetune.agent import Agent, JsonFormat, ParseError, get_format
from tracetune.agent.render import file_names
from tracetune.models.base import BackendError
from tracetune.schema import ErrorKind, FileRef, Task
from tracetune.store import AssetStore
from tracetune.testing import ScriptedChatModel
from tracetune.tools import get_tool


def call(name: str, **arguments: object) -> str:
    return f"Thought: use {name}\nAction: {json.dumps({'name': name, 'arguments': arguments})}"


@pytest.fixture
def stores(tmp_path: Path) -> tuple[AssetStore, AssetStore, FileRef]:
    src = AssetStore(tmp_path / "in")
    img = Image.new("RGB", (80, 40), "white")
    img.paste(Image.new("RGB", (40, 40), "red"), (40, 0))
    return src, AssetStore(tmp_path / "out"), src.put_image(img, "photo.png")


def run(agent: Agent, task: Task, stores: tuple) -> object:
    src, out, _ = stores
    return asyncio.run(agent.run(task, src, out))


def test_episode_with_tool_image_observation_and_answer(stores) -> None:
    ref = stores[2]
    model = ScriptedChatModel(
        [
            call("image_crop", image="photo.png", box=[40, 0, 80, 40]),
            call("calculator", expression="(3 + 4) * 2"),
            call("final_answer", answer="14"),
        ]
    )
    agent = Agent(model, [get_tool("calculator"), get_tool("image_crop")])
    task = Task(id="t", query="Crop the right half, then compute (3+4)*2.", files=[ref])
    traj = run(agent, task, stores)

    assert traj.status == "completed" and traj.final_answer == "14"
    assert [s.action.type for s in traj.steps] == ["tool_call", "tool_call", "final_answer"]
    crop = traj.steps[0].observation.images[0]
    assert (crop.width, crop.height) == (40, 40)
    assert stores[1].open_image(crop).getpixel((5, 5)) == (255, 0, 0)
    assert traj.steps[1].observation.text == "14"
    # The cropped image went back to the model as an image, not only as text.
    second_prompt = model.calls[1]["messages"]
    last = second_prompt[-1]["content"]
    assert last[0]["type"] == "image" and Path(last[0]["image"]).exists()
    assert "image_crop_step0_0.png" in last[1]["text"]
    # The first prompt shows the task image and lists the file by name.
    first_user = model.calls[0]["messages"][1]["content"]
    assert first_user[0]["type"] == "image" and "photo.png (image)" in first_user[1]["text"]
    assert "calculator(expression: str)" in model.calls[0]["messages"][0]["content"]


def test_errors_are_typed_and_the_model_recovers(stores) -> None:
    model = ScriptedChatModel(
        [
            "I think the answer is 5",  # no action
            call("magnifier", image="photo.png"),  # unknown tool
            call("calculator", formula="1+1"),  # wrong argument
            call("calculator", expression="1/0"),  # tool error
            call("image_crop", image="../../etc/passwd", box=[0, 0, 1, 1]),  # outside workdir
            call("final_answer", answer="2"),
        ]
    )
    agent = Agent(model, [get_tool("calculator"), get_tool("image_crop")], max_errors=10)
    traj = run(agent, Task(id="t", query="1+1?"), stores)
    kinds = [s.error.kind if s.error else None for s in traj.steps]
    assert kinds == [
        ErrorKind.PARSE,
        ErrorKind.UNKNOWN_TOOL,
        ErrorKind.TOOL_ARGUMENTS,
        ErrorKind.TOOL,
        ErrorKind.TOOL,
        None,
    ]
    assert "division by zero" in traj.steps[3].error.message
    assert "outside the working directory" in traj.steps[4].error.message
    # each error reached the model as its next observation
    assert model.calls[1]["messages"][-1]["content"][-1]["text"].startswith("Error (parse)")
    assert traj.status == "completed" and traj.final_answer == "2"


def test_step_and_error_budgets(stores) -> None:
    looping = ScriptedChatModel(lambda messages: call("calculator", expression="1+1"))
    traj = run(
        Agent(looping, [get_tool("calculator")], max_steps=4), Task(id="a", query="q"), stores
    )
    assert traj.status == "max_steps" and len(traj.steps) == 4 and traj.final_answer is None

    broken = ScriptedChatModel(lambda messages: "no idea")
    traj = run(
        Agent(broken, [get_tool("calculator")], max_errors=2), Task(id="b", query="q"), stores
    )
    assert traj.status == "max_errors" and len(traj.steps) == 2


def test_backend_failure_raises_instead_of_writing_an_episode(stores) -> None:
    """An outage is not an episode: it is raised (typed) so the runner retries the item."""
    from tracetune.agent import EpisodeBackendError

    class Down(ScriptedChatModel):
        async def generate(self, *a, **k):  # type: ignore[override]
            raise BackendError("endpoint unreachable after 6 retries")

    with pytest.raises(EpisodeBackendError, match="task t, step 0: endpoint unreachable"):
        run(Agent(Down([]), [get_tool("calculator")]), Task(id="t", query="q"), stores)


def test_task_needing_missing_tool_is_refused(stores) -> None:
    agent = Agent(ScriptedChatModel([]), [get_tool("calculator")])
    with pytest.raises(ValueError, match="ocr"):
        run(agent, Task(id="t", query="q", tools=["ocr"]), stores)


@pytest.mark.parametrize(
    "text,name,args",
    [
        (
            'Thought: x\nAction: {"name": "ocr", "arguments": {"image": "a.png"}}',
            "ocr",
            {"image": "a.png"},
        ),
        ('Thought: x\nAction:\n```json\n{"name": "ocr", "arguments": {}}\n```', "ocr", {}),
        (
            '{"name": "calculator", "arguments": "{\\"expression\\": \\"1\\"}"}',
            "calculator",
            {"expression": "1"},
        ),
        (
            'Thought: {not json} then\nAction: {"tool": "ocr", "args": {"image": "b"}}',
            "ocr",
            {"image": "b"},
        ),
    ],
)
def test_json_format_parses_tool_calls(text: str, name: str, args: dict) -> None:
    parsed = JsonFormat().parse(text)
    assert parsed.action.tool_call.name == name and parsed.action.tool_call.arguments == args
    assert parsed.thought in ("x", "", "{not json} then")


@pytest.mark.parametrize(
    "text", ["no json here", 'Action: {"arguments": {}}', 'Action: {"name": "x", "arguments": [1]}']
)
def test_json_format_rejects_malformed_actions(text: str) -> None:
    with pytest.raises(ParseError):
        JsonFormat().parse(text)


def test_formats_render_what_they_parse() -> None:
    for fmt_name in ("json", "code"):
        fmt = get_format(fmt_name)
        from tracetune.schema import Action

        action = Action(type="final_answer", answer='say "hi"')
        parsed = fmt.parse(fmt.render("done", action))
        assert parsed.thought == "done"
        if fmt_name == "json":
            assert parsed.action.answer == 'say "hi"'
        else:
            assert parsed.action.code == 'final_answer("say \\"hi\\"")'


def test_duplicate_file_names_are_made_unique() -> None:
    ref = FileRef(sha256="0" * 64, name="img.png", mime="image/png")
    assert file_names([ref, ref, ref.model_copy(update={"name": "x"})]) == [
        "img.png",
        "img_2.png",
        "x",
    ]


def test_missing_tasks_path_fails_before_creating_the_output(tmp_path: Path) -> None:
    from tracetune.agent.run import AgentRunConfig, run_agent

    config = AgentRunConfig(
        model="scripted", out=tmp_path / "out", tasks=tmp_path / "no-such-tasks.jsonl"
    )
    with pytest.raises(FileNotFoundError, match="no-such-tasks.jsonl"):
        asyncio.run(run_agent(config, model=ScriptedChatModel([]), progress=False))
    assert not (tmp_path / "out").exists()
