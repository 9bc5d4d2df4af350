"""The ``tools`` action format: native tool calls through a real OpenAI-compatible endpoint,
tool messages back, and the same turns rendered for training through the chat template."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tracetune.agent import Agent, ParseError, get_format
from tracetune.formats.chat import trajectory_chat
from tracetune.models import load_model
from tracetune.models.local import LocalVLM
from tracetune.models.tiny import init_tiny
from tracetune.schema import FileRef, Task
from tracetune.store import AssetStore
from tracetune.testing.openai_server import ScriptedOpenAIServer
from tracetune.tools import get_tool


def native(name: str, content: str = "", **arguments: Any) -> dict[str, Any]:
    call = {
        "id": f"srv_{name}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments)},
    }
    return {"content": content, "tool_calls": [call]}


@pytest.fixture
def stores(tmp_path: Path) -> tuple[AssetStore, AssetStore, FileRef]:
    src = AssetStore(tmp_path / "in")
    img = Image.new("RGB", (80, 40), "white")
    img.paste(Image.new("RGB", (40, 40), "red"), (40, 0))
    return src, AssetStore(tmp_path / "out"), src.put_image(img, "photo.png")


def _episode(stores: tuple, replies: list[Any]) -> tuple[Any, ScriptedOpenAIServer]:
    src, out, ref = stores
    with ScriptedOpenAIServer(replies=replies) as srv:
        model = load_model("openai:teacher", base_url=srv.base_url, api_key_env="NO_SUCH_KEY")
        agent = Agent(
            model, [get_tool("calculator"), get_tool("image_crop")], action_format="tools"
        )
        task = Task(id="t", query="Crop the right half, then compute (3+4)*2.", files=[ref])

        async def go() -> Any:
            try:
                return await agent.run(task, src, out)
            finally:
                await model.aclose()

        traj = asyncio.run(go())
    return traj, srv


def test_native_tool_calls_run_and_results_go_back_as_tool_messages(stores: tuple) -> None:
    traj, srv = _episode(
        stores,
        [
            native("image_crop", "Crop first.", image="photo.png", box=[40, 0, 80, 40]),
            native("calculator", expression="(3 + 4) * 2"),
            native("final_answer", answer="14"),
        ],
    )
    assert traj.status == "completed" and traj.final_answer == "14"
    assert traj.action_format == "tools"
    assert [s.action.type for s in traj.steps] == ["tool_call", "tool_call", "final_answer"]
    assert traj.steps[0].thought == "Crop first."
    assert traj.steps[1].observation.text == "14"
    assert "<tool_call>" in traj.steps[1].raw  # the step's text spells the call the hermes way

    first = srv.requests[0].body
    names = [t["function"]["name"] for t in first["tools"]]
    assert names == ["calculator", "image_crop", "final_answer"]
    assert first["tools"][0]["function"]["parameters"]["properties"]["expression"]
    # the system prompt does not list the tools again: they travel in `tools`
    assert "calculator" not in first["messages"][0]["content"]

    third = srv.requests[2].body["messages"]
    roles = [m["role"] for m in third]
    assert roles == ["system", "user", "assistant", "tool", "user", "assistant", "tool"]
    crop_call = third[2]["tool_calls"][0]
    assert crop_call["function"]["name"] == "image_crop"
    assert json.loads(crop_call["function"]["arguments"]) == {
        "image": "photo.png",
        "box": [40, 0, 80, 40],
    }
    assert third[3]["tool_call_id"] == crop_call["id"]
    # the cropped image follows the tool message as an image the model sees
    assert third[4]["content"][0]["type"] == "image_url"
    assert third[6]["tool_call_id"] == third[5]["tool_calls"][0]["id"]
    assert third[6]["content"] == "14"


def test_a_turn_without_a_call_is_a_parse_error_the_model_recovers_from(stores: tuple) -> None:
    traj, srv = _episode(stores, ["The answer is 14.", native("final_answer", answer="14")])
    assert traj.status == "completed"
    assert traj.steps[0].error is not None and traj.steps[0].error.kind.value == "parse"
    second = srv.requests[1].body["messages"]
    assert [m["role"] for m in second[-2:]] == ["assistant", "user"]
    assert "final_answer" in second[-1]["content"][0]["text"]


def test_tools_format_parses_hermes_text_and_renders_it_back() -> None:
    fmt = get_format("tools")
    parsed = fmt.parse(
        'Let me add.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+1"}}'
        "\n</tool_call>"
    )
    assert parsed.thought == "Let me add."
    assert parsed.action.tool_call is not None
    assert parsed.action.tool_call.arguments == {"expression": "1+1"}
    assert fmt.parse(fmt.render(parsed.thought, parsed.action)) == parsed
    final = fmt.parse('<tool_call>{"name": "final_answer", "arguments": {"answer": 3}}</tool_call>')
    assert final.action.type == "final_answer" and final.action.answer == "3"
    with pytest.raises(ParseError, match="no tool call"):
        fmt.parse("just text")
    with pytest.raises(ParseError, match="not valid JSON"):
        fmt.parse("<tool_call>{broken</tool_call>")


def test_training_renders_the_turns_through_the_chat_templates_tool_support(
    stores: tuple, tmp_path: Path
) -> None:
    traj, _ = _episode(
        stores,
        [
            native("calculator", "Compute it.", expression="(3 + 4) * 2"),
            native("final_answer", answer="14"),
        ],
    )
    chat = trajectory_chat(traj)
    messages = chat["messages"]
    roles = ["system", "user", "assistant", "tool", "assistant", "tool"]
    assert [m["role"] for m in messages] == roles
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == {"expression": "(3 + 4) * 2"}
    assert messages[3]["tool_call_id"] == messages[2]["tool_calls"][0]["id"]
    assert {t["function"]["name"] for t in chat["tools"]} >= {"calculator", "final_answer"}

    model_dir = init_tiny("qwen2_vl", tmp_path / "qwen")
    local = LocalVLM(str(model_dir))
    text = local.processor.apply_chat_template(messages, tools=chat["tools"], tokenize=False)
    assert '"name": "calculator"' in text.split("</tools>")[0]  # schemas in the system turn
    assert "<|im_start|>tool\n14<|im_end|>" in text
    # What the model learns to write is exactly what the server and the format read back.
    turn = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    parsed = get_format("tools").parse(turn)
    assert parsed.thought == "Compute it."
    assert parsed.action.tool_call is not None
    assert parsed.action.tool_call.name == "calculator"
    assert parsed.action.tool_call.arguments == {"expression": "(3 + 4) * 2"}


def test_templates_without_tool_support_get_the_schemas_in_the_system_turn(
    tmp_path: Path,
) -> None:
    model_dir = init_tiny("llava", tmp_path / "llava")
    # a chat template that knows nothing about tools, like many hub VLMs'
    (model_dir / "chat_template.jinja").write_text(
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}ASSISTANT:"
    )
    local = LocalVLM(str(model_dir))
    assert not local.supports_tools
    tools = [get_tool("calculator").openai_schema()]
    prompt, _ = local.render([{"role": "user", "content": "2+2?"}], tools)
    assert '"name": "calculator"' in prompt and "<tool_call>" in prompt
