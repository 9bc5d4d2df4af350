"""MCP servers' tools as tracetune tools, against a real MCP server (tests/mcp_server.py,
written with the official SDK's FastMCP) started over stdio and over streamable HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tracetune.agent import Agent
from tracetune.cli import app
from tracetune.schema import ErrorKind, Task, Trajectory
from tracetune.store import AssetStore, Dataset
from tracetune.testing import ScriptedChatModel
from tracetune.tools import ToolContext, ToolError, get_tool, load_tools, mcp, registered_tools
from tracetune.tools.spec import ToolTimeout

HERE = Path(__file__).parent
SERVER = HERE / "mcp_server.py"
COMMAND = f"{sys.executable} {SERVER}"

# A server that answers the handshake but describes its tool with a broken schema.
MALFORMED = r"""
import json, sys
for line in sys.stdin:
    msg = json.loads(line)
    if "id" not in msg:
        continue
    if msg["method"] == "initialize":
        result = {"protocolVersion": msg["params"]["protocolVersion"], "capabilities":
                  {"tools": {}}, "serverInfo": {"name": "broken", "version": "0"}}
    elif msg["method"] == "tools/list":
        result = {"tools": [{"name": "measure", "description": "Measure a thing.",
                             "inputSchema": SCHEMA}]}
    elif msg["method"] == "tools/call":  # echoes the arguments it got
        text = json.dumps(msg["params"]["arguments"], sort_keys=True)
        result = {"content": [{"type": "text", "text": text}], "isError": False}
    else:
        result = {}
    print(json.dumps({"jsonrpc": "2.0", "id": msg["id"], "result": result}), flush=True)
"""


def call(name: str, **arguments: object) -> str:
    return f"Thought: use {name}\nAction: {json.dumps({'name': name, 'arguments': arguments})}"


@pytest.fixture(scope="module", autouse=True)
def _stop_servers() -> Iterator[None]:
    yield
    mcp.close_all()


@pytest.fixture
def server() -> dict[str, Any]:
    """The test server's tools: started once, again only after a test stopped every server."""
    return {t.name: t for t in mcp.connect([COMMAND])}


@pytest.fixture
def stores(tmp_path: Path) -> tuple[AssetStore, AssetStore]:
    return AssetStore(tmp_path / "in"), AssetStore(tmp_path / "out")


def test_server_tools_join_the_registry_with_their_schemas(server: dict[str, Any]) -> None:
    assert set(server) == {"add_numbers", "lookup_word", "color_swatch", "slow", "server_pid"}
    assert registered_tools()["add_numbers"] is server["add_numbers"]
    assert get_tool("lookup_word").mcp_name == "lookup-word"  # renamed to an identifier
    schema = server["color_swatch"].openai_schema()["function"]
    assert schema["name"] == "color_swatch" and "square of one color" in schema["description"]
    assert schema["parameters"]["required"] == ["color"]
    assert schema["parameters"]["properties"]["size"]["default"] == 16
    assert server["add_numbers"].signature() == "add_numbers(a: float, b: float) -> float"
    # "mcp" in a tool list stands for every tool of the configured servers.
    assert {t.name for t in load_tools(["calculator", "mcp"])} == {"calculator", *server}


def test_calls_return_text_data_and_images(server: dict[str, Any], tmp_path: Path) -> None:
    ctx = ToolContext(workdir=tmp_path)
    result = server["add_numbers"](ctx, a=2, b="3.5")  # numbers given as text are coerced
    assert result.text == "5.5" and result.data == 5.5
    assert server["lookup_word"](ctx, word="Tiger").text == "a large striped cat"
    swatch = server["color_swatch"](ctx, color="blue", size=8)
    assert swatch.images[0].size == (8, 8) and swatch.images[0].getpixel((3, 3)) == (0, 0, 255)
    with pytest.raises(ToolError, match="no entry for 'zebra'"):
        server["lookup_word"](ctx, word="zebra")
    with pytest.raises(ToolError, match="unknown argument"):
        server["lookup_word"](ctx, word="apple", language="en")
    with pytest.raises(ToolError, match="should be of type integer"):
        server["color_swatch"](ctx, color="red", size="big")


def test_tools_are_callable_from_many_threads_and_loops(server: dict[str, Any], tmp_path: Path):
    ctx = ToolContext(workdir=tmp_path)
    results: list[str] = []

    def worker(i: int) -> None:
        results.append(server["add_numbers"](ctx, a=i, b=1).text)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results, key=float) == [str(float(i + 1)) for i in range(8)]


def test_json_episode_with_mcp_tools(server: dict[str, Any], stores: tuple) -> None:
    src, out = stores
    model = ScriptedChatModel(
        [
            call("lookup_word", word="tiger"),
            call("lookup_word", word="tiger", language="en"),
            call("color_swatch", color="red"),
            call("add_numbers", a=40, b=2),
            call("final_answer", answer="42"),
        ]
    )
    agent = Agent(model, load_tools(["mcp"]))
    traj = asyncio.run(agent.run(Task(id="t", query="Use the tools."), src, out))
    assert traj.status == "completed" and traj.final_answer == "42"
    assert traj.steps[0].observation.text == "a large striped cat"
    assert traj.steps[1].error.kind == ErrorKind.TOOL_ARGUMENTS
    assert "language" in traj.steps[1].error.message
    image = traj.steps[2].observation.images[0]  # saved to the asset store like any tool image
    assert out.open_image(image).getpixel((2, 2)) == (255, 0, 0)
    assert traj.steps[3].observation.text == "42.0"  # the server's own text
    prompt = model.calls[0]["messages"][0]["content"]
    assert "lookup_word(word: str) -> str" in str(prompt)
    assert "tiny dictionary" in str(prompt)
    # The image went back to the model as an image.
    shown = model.calls[3]["messages"][-1]["content"]
    assert any(p.get("type") == "image" for p in shown)


def test_tools_format_episode_with_mcp_tools(server: dict[str, Any], stores: tuple) -> None:
    from tracetune.models import load_model
    from tracetune.testing.openai_server import ScriptedOpenAIServer

    def native(name: str, **arguments: Any) -> dict[str, Any]:
        function = {"name": name, "arguments": json.dumps(arguments)}
        return {
            "content": "",
            "tool_calls": [{"id": name, "type": "function", "function": function}],
        }

    src, out = stores
    replies = [
        native("add_numbers", a=1.5, b=2),
        native("color_swatch", color="green", size=4),
        native("final_answer", answer="3.5"),
    ]
    with ScriptedOpenAIServer(replies=replies) as srv:
        model = load_model("openai:teacher", base_url=srv.base_url, api_key_env="NO_SUCH_KEY")
        agent = Agent(model, [server["add_numbers"], server["color_swatch"]], "tools")

        async def go() -> Trajectory:
            try:
                return await agent.run(Task(id="t", query="Add."), src, out)
            finally:
                await model.aclose()

        traj = asyncio.run(go())
        first = srv.requests[0].body
    assert traj.status == "completed" and traj.final_answer == "3.5"
    assert traj.steps[0].observation.text == "3.5"
    assert out.open_image(traj.steps[1].observation.images[0]).size == (4, 4)
    sent = {t["function"]["name"]: t["function"] for t in first["tools"]}
    assert sent["add_numbers"]["parameters"]["required"] == ["a", "b"]


def test_code_episode_calls_mcp_tools_from_the_sandbox(server: dict[str, Any], stores) -> None:
    src, out = stores
    code = (
        "total = add_numbers(a=20, b=22)\n"
        "name = color_swatch(color='blue')\n"
        "print(total, lookup_word(word='apple'), name)\n"
    )
    model = ScriptedChatModel(
        [
            f"Thought: compute\nCode:\n```py\n{code}```",
            "Thought: done\nCode:\n```py\nfinal_answer(str(total))\n```",
        ]
    )
    agent = Agent(model, load_tools(["mcp"]), action_format="code")
    traj = asyncio.run(agent.run(Task(id="t", query="Compute."), src, out))
    assert traj.status == "completed", traj.steps[0]
    assert traj.final_answer == "42.0"
    text = traj.steps[0].observation.text
    assert text.startswith("42.0 a round fruit color_swatch_step0_0.png")
    assert out.open_image(traj.steps[0].observation.images[0]).getpixel((1, 1)) == (0, 0, 255)


def test_call_timeout_is_a_typed_step_error(stores: tuple) -> None:
    spec = {"command": COMMAND, "prefix": "quick_", "tools": ["slow"], "timeout_s": 0.5}
    try:
        (slow,) = mcp.connect([spec])
        assert slow.name == "quick_slow"
        with pytest.raises(ToolTimeout):
            slow(ToolContext(workdir=Path(".")), seconds=5)
        model = ScriptedChatModel(
            [call("quick_slow", seconds=5), call("final_answer", answer="gave up")]
        )
        traj = asyncio.run(Agent(model, [slow]).run(Task(id="t", query="Wait."), *stores))
        assert traj.steps[0].error.kind == ErrorKind.TIMEOUT
        assert "timed out after 0.5 s" in traj.steps[0].error.message
        assert traj.final_answer == "gave up"
    finally:
        mcp.close_all()


def test_server_killed_mid_run_fails_its_item_and_a_rerun_succeeds(tmp_path: Path) -> None:
    from tracetune.agent.run import AgentRunConfig, run_agent

    spec = {"command": COMMAND, "prefix": "k_", "tools": ["slow", "server_pid"]}
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(
        json.dumps({"id": "a", "query": "first"})
        + "\n"
        + json.dumps({"id": "b", "query": "second"})
    )
    try:
        tools = {t.name: t for t in mcp.connect([spec])}
        pid = int(tools["k_server_pid"](ToolContext(workdir=tmp_path)).text)
        killed: list[int] = []

        def respond(messages: list[dict[str, Any]]) -> str:
            if any(m["role"] == "assistant" for m in messages):
                return call("final_answer", answer="done")
            if "first" in str(messages[1]["content"]) and not killed:
                killed.append(pid)  # kill the server while this call is in flight
                threading.Timer(1.0, os.kill, (pid, signal.SIGKILL)).start()
                return call("k_slow", seconds=5)
            return call("k_slow", seconds=0)

        config = AgentRunConfig(
            model="scripted", out=tmp_path / "out", tasks=tasks, tools=["k_slow"], concurrency=1
        )
        result, out = asyncio.run(run_agent(config, ScriptedChatModel(respond), progress=False))
        assert (result.written, result.failed) == (1, 1)
        ((key, error),) = result.failures
        assert error.startswith("McpServerLost") and "died during a call to slow" in error
        assert [t.task.id for t in out] == ["b"]  # the server came back for the next item
        result, out = asyncio.run(run_agent(config, ScriptedChatModel(respond), progress=False))
        assert (result.written, result.failed, result.skipped) == (1, 0, 1)
        assert sorted(t.task.id for t in out) == ["a", "b"]
        assert all(t.final_answer == "done" for t in out)
    finally:
        mcp.close_all()


def test_cli_tools_list_and_agent_run_with_the_server_tools(tmp_path: Path) -> None:
    out = tmp_path
    runner = CliRunner()
    try:
        result = runner.invoke(app, ["tools", "list", "--json", "--mcp", COMMAND])
        assert result.exit_code == 0, result.output
        names = {t["function"]["name"]: t for t in json.loads(result.output)}
        assert {"add_numbers", "lookup_word", "color_swatch", "calculator"} <= set(names)
        params = names["lookup_word"]["function"]["parameters"]
        assert params["properties"]["word"]["type"] == "string"
        result = runner.invoke(
            app, ["tools", "run", "add_numbers", "-a", "a=1", "-a", "b=2", "--mcp", COMMAND]
        )
        assert result.exit_code == 0, result.output
        assert result.output.strip() == "3.0"
        # An agent run with the server's tools, from the command line.
        from tracetune.testing.openai_server import ScriptedOpenAIServer

        replies = [call("lookup_word", word="mcp"), call("final_answer", answer="protocol")]
        with ScriptedOpenAIServer(replies=replies) as srv:
            result = runner.invoke(
                app,
                ["agent", "run", "--model", "openai:m", "--base-url", srv.base_url,
                 "--task", "What is MCP?", "--tools", "mcp", "--out", str(out / "run"),
                 "--mcp", COMMAND, "--quiet"],
            )  # fmt: skip
            prompt = str(srv.requests[0].body["messages"][0]["content"])
        assert result.exit_code == 0, result.output
        (traj,) = Dataset.open(out / "run", Trajectory).records()
        assert traj.steps[0].observation.text == "model context protocol"
        assert traj.final_answer == "protocol" and "lookup_word" in traj.tools
        assert "lookup_word(word: str) -> str" in prompt
        # Exporting (and training on) the run renders the MCP tool's schema and prompt.
        result = runner.invoke(
            app,
            ["export", "--format", "trl-sft", "--in", str(out / "run"), "--out",
             str(out / "sft"), "--mcp", COMMAND],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        (row,) = [json.loads(p.read_text()) for p in (out / "sft").rglob("*.jsonl")]
        tools = row["tools"] if isinstance(row["tools"], list) else json.loads(row["tools"])
        assert "lookup_word" in [t["function"]["name"] for t in tools]
        assert "tiny dictionary" in json.dumps(row["messages"][0])  # the system prompt
    finally:
        mcp.close_all()


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        (
            f'{sys.executable} -c \'import sys; print("no API key", file=sys.stderr); '
            "sys.exit(3)'",
            "failed to start: the connection closed before the MCP handshake finished",
        ),
        ("no-such-mcp-server --stdio", "command not found: no-such-mcp-server"),
        ("", "the MCP server command is empty"),
    ],
)
def test_a_server_that_fails_to_start_is_one_clear_error(command: str, expected: str) -> None:
    try:
        with pytest.raises((mcp.McpServerError, ValueError)) as info:
            mcp.connect([command])
        assert expected in str(info.value)
        if "no API key" in command:
            assert "its stderr ends with:\nno API key" in str(info.value)
        result = CliRunner().invoke(app, ["tools", "list", "--mcp", command])
        assert result.exit_code == 2
        assert "Traceback" not in result.output, result.output
        flat = " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())  # unwrap rich's box
        assert expected.split(":")[0] in flat
    finally:
        mcp.close_all()


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"type": "object", "properties": ["length"]}, "'properties' must map argument names"),
        ({"type": "object", "properties": {}, "required": ["x"]}, "required argument(s) x"),
        ({"type": "array", "items": {}}, "must have type 'object'"),
        ({"properties": {"n": {"type": "integr"}}}, "is not valid under any of the given"),
        ("oops", "malformed tool list (tools.0.inputSchema: Input should be a valid dictionary"),
    ],
)
def test_a_malformed_schema_is_one_clear_error(tmp_path: Path, schema: Any, expected: str):
    script = tmp_path / "broken_server.py"
    script.write_text(MALFORMED.replace("SCHEMA", repr(schema)))
    try:
        with pytest.raises(mcp.McpServerError) as info:
            mcp.connect([f"{sys.executable} {script}"])
        message = str(info.value)
        if schema != "oops":
            assert "malformed input schema for tool 'measure'" in message
        assert expected in message
        assert "measure" not in registered_tools()
        result = CliRunner().invoke(app, ["tools", "list", "--mcp", f"{sys.executable} {script}"])
        assert result.exit_code == 2 and "Traceback" not in result.output
    finally:
        mcp.close_all()


def test_a_name_clash_with_a_builtin_asks_for_a_prefix(tmp_path: Path) -> None:
    script = tmp_path / "clash.py"
    script.write_text(
        "from mcp.server.fastmcp import FastMCP\n"
        "s = FastMCP('clash')\n"
        "@s.tool()\n"
        "def calculator(expression: str) -> str:\n"
        "    '''Not the built-in.'''\n"
        "    return 'x'\n"
        "s.run()\n"
    )
    try:
        with pytest.raises(mcp.McpServerError, match="give the server a prefix"):
            mcp.connect([f"{sys.executable} {script}"])
        assert get_tool("calculator").__class__.__name__ != "McpTool"
        (tool,) = mcp.connect([{"command": f"{sys.executable} {script}", "prefix": "my_"}])
        assert tool.name == "my_calculator"
    finally:
        mcp.close_all()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_streamable_http_server_by_url(tmp_path: Path) -> None:
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, str(SERVER), "--http", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        (tool,) = mcp.connect(
            [{"url": f"http://127.0.0.1:{port}/mcp", "tools": ["add_numbers"], "prefix": "h_"}]
        )
        assert tool(ToolContext(workdir=tmp_path), a=4, b=5).data == 9
        proc.terminate()  # the server goes away: calls fail as lost, not as timeouts
        proc.wait(10)
        started = time.monotonic()
        with pytest.raises(mcp.McpServerLost):
            tool(ToolContext(workdir=tmp_path), a=1, b=1)
        assert time.monotonic() - started < 30
    finally:
        mcp.close_all()
        proc.terminate()
        proc.wait(10)


def test_yaml_mcp_servers_key(tmp_path: Path) -> None:
    from tracetune.agent.run import AgentRunConfig
    from tracetune.cli.common import build_config

    config = tmp_path / "agent.yaml"
    config.write_text(
        f"model: openai:x\nout: {tmp_path / 'o'}\ntask: hi\ntools: [y_add_numbers]\n"
        f"mcp_servers:\n  - command: {COMMAND}\n    prefix: y_\n    tools: [add_numbers]\n"
    )
    try:
        cfg = build_config(AgentRunConfig, config)
        assert cfg.tools == ["y_add_numbers"]
        assert load_tools(cfg.tools)[0](ToolContext(workdir=tmp_path), a=1, b=1).data == 2
    finally:
        mcp.close_all()


def test_mtrace_chain_with_an_mcp_tool_in_the_catalogue(tmp_path: Path) -> None:
    """Queries are generated with the MCP tool in the catalogue, the teacher's code calls it
    through the sandbox, and the verified trajectory records it."""
    from mtrace_script import Script, config_yaml, write_seeds

    from tracetune.synth.mtrace import PoolConfig, build_pool
    from tracetune.synth.mtrace.pool import BUNDLED_POOL_CAPTIONS, BUNDLED_POOL_IMAGES
    from tracetune.testing.openai_server import ScriptedOpenAIServer

    query = "What does the word tiger mean, according to the dictionary and my notes?"

    class WordScript(Script):
        def batch(self, text: str) -> str:
            return json.dumps([{"query": query, "tools": ["lookup_word"]}])

        def teacher(self, body: dict[str, Any]) -> str:
            if not any(m["role"] == "assistant" for m in body["messages"]):
                code = "print(lookup_word(word='tiger'))\n"
                return f"Thought: look it up.\nCode:\n```py\n{code}```"
            return "Thought: done.\nCode:\n```py\nfinal_answer('a large striped cat')\n```"

    pool = tmp_path / "pool"
    pool_config = PoolConfig(
        images=BUNDLED_POOL_IMAGES, captions=BUNDLED_POOL_CAPTIONS, out=pool, embedder="hashing"
    )
    asyncio.run(build_pool(pool_config, progress=False))
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds)
    script = WordScript()
    try:
        with ScriptedOpenAIServer(script) as srv:
            text = config_yaml(
                str(tmp_path / "run"), srv.base_url, str(pool), str(seeds), embedder="hashing"
            )
            text = text.replace("tools: [ocr,", "tools: [lookup_word, ocr,")
            text += f"mcp_servers: [{json.dumps(COMMAND)}]\n"
            (tmp_path / "synth.yaml").write_text(text)
            result = CliRunner().invoke(
                app, ["synth", "run", str(tmp_path / "synth.yaml"), "--quiet"]
            )
            assert result.exit_code == 0, result.output
            requests = list(srv.requests)
    finally:
        mcp.close_all()
    generator = next(r for r in requests if any("practice tasks" in t for t in r.texts()))
    assert "tiny dictionary" in "\n".join(generator.texts())  # the MCP tool's description
    (traj,) = Dataset.open(tmp_path / "run" / "final", Trajectory).records()
    assert traj.task.query == query and "lookup_word" in traj.task.tools
    assert "a large striped cat" in traj.steps[0].observation.text
    assert traj.final_answer == "a large striped cat"


def test_rollout_of_tasks_that_name_an_mcp_tool(tmp_path: Path) -> None:
    """A task's tool list names the MCP tool; the teacher calls it natively (tools format)."""
    from tracetune.testing.openai_server import ScriptedOpenAIServer

    def native(name: str, **arguments: Any) -> dict[str, Any]:
        function = {"name": name, "arguments": json.dumps(arguments)}
        return {
            "content": "",
            "tool_calls": [{"id": name, "type": "function", "function": function}],
        }

    tasks = tmp_path / "tasks.jsonl"
    row = {"id": "w", "query": "What is 20 + 22?", "answer": "42", "tools": ["add_numbers"]}
    tasks.write_text(json.dumps(row) + "\n")
    replies = [native("add_numbers", a=20, b=22), native("final_answer", answer="42")]
    try:
        with ScriptedOpenAIServer(replies=replies) as srv:
            result = CliRunner().invoke(
                app,
                ["rollout", "--tasks", str(tasks), "--out", str(tmp_path / "r"),
                 "--teacher", "openai:t", "--base-url", srv.base_url, "--action-format",
                 "tools", "--mcp", COMMAND, "--quiet"],
            )  # fmt: skip
            sent = srv.requests[0].body["tools"]
        assert result.exit_code == 0, result.output
    finally:
        mcp.close_all()
    assert [t["function"]["name"] for t in sent] == ["add_numbers", "final_answer"]
    (traj,) = Dataset.open(tmp_path / "r", Trajectory).records()
    assert traj.steps[0].observation.text == "42.0" and traj.final_answer == "42"


def test_argument_names_that_are_not_python_names_work_in_code_actions(
    tmp_path: Path, stores: tuple
) -> None:
    schema = {
        "type": "object",
        "properties": {
            "amount": {"type": "number"},
            "from": {"type": "string", "description": "currency to convert from"},
            "to-currency": {"type": "string"},
        },
        "required": ["amount", "from", "to-currency"],
    }
    script = tmp_path / "echo_server.py"
    script.write_text(MALFORMED.replace("SCHEMA", repr(schema)))
    try:
        (measure,) = mcp.connect([f"{sys.executable} {script}"])
        assert measure.signature() == (
            "measure(amount: float, from_: str, to_currency: str) -> str"
        )
        assert "from_: currency to convert from" in measure.describe()
        # the schema keeps the server's names, for JSON and native tool calls
        assert list(measure.openai_schema()["function"]["parameters"]["properties"]) == [
            "amount",
            "from",
            "to-currency",
        ]
        code = "print(measure(3, from_='USD', to_currency='EUR'))\n"
        model = ScriptedChatModel(
            [f"Thought: convert\nCode:\n```py\n{code}```", "Code:\n```py\nfinal_answer('ok')\n```"]
        )
        traj = asyncio.run(
            Agent(model, [measure], action_format="code").run(Task(id="t", query="?"), *stores)
        )
        echoed = json.loads(traj.steps[0].observation.text)
        assert echoed == {"amount": 3, "from": "USD", "to-currency": "EUR"}
        json_call = call("measure", amount=1, **{"from": "EUR", "to-currency": "USD"})
        model = ScriptedChatModel([json_call, call("final_answer", answer="ok")])
        traj = asyncio.run(Agent(model, [measure]).run(Task(id="t", query="?"), *stores))
        assert json.loads(traj.steps[0].observation.text)["from"] == "EUR"
    finally:
        mcp.close_all()


def test_prefs_exploration_with_an_mcp_tool(tmp_path: Path) -> None:
    """Step-wise exploration: K candidate steps call the MCP tool from forks of the episode."""
    from tracetune.models.base import load_model
    from tracetune.prefs import ExploreConfig, run_explore
    from tracetune.testing.openai_server import ScriptedOpenAIServer

    tasks = tmp_path / "tasks"
    task = Task(id="w", query="What is 2 + 3?", tools=["add_numbers"])
    Dataset.create(tasks, Task).write_all([task])
    words = iter(range(100))

    def policy(messages: list[dict[str, Any]]) -> str:
        if not any(m["role"] == "assistant" for m in messages):
            return f"Thought: add\nCode:\n```py\nprint(add_numbers(a=2, b={next(words)}))\n```"
        return "Thought: done\nCode:\n```py\nfinal_answer('5')\n```"

    def judge(body: dict[str, Any]) -> str:
        k = json.dumps(body["messages"]).count("## Candidate")
        return json.dumps({"thought": "any", "ranking": list(range(1, k + 1))})

    try:
        mcp.connect([COMMAND])
        with ScriptedOpenAIServer(judge) as srv:
            config = ExploreConfig(
                tasks=tasks,
                out=tmp_path / "explored",
                policy="scripted",
                verifier="llm-rank",
                judge="openai:judge",
                k=3,
                action_format="code",
                max_steps=3,
            )
            result, explored = asyncio.run(
                run_explore(
                    config,
                    policy=ScriptedChatModel(policy),
                    judge=load_model("openai:judge", base_url=srv.base_url),
                    progress=False,
                )
            )
    finally:
        mcp.close_all()
    assert result.written == 1
    (trajectory,) = list(explored)
    first = trajectory.metadata["exploration"][0]
    texts = sorted(c["step"]["observation"]["text"] for c in first["candidates"])
    assert texts == ["2.0", "3.0", "4.0"]  # each candidate's own call to the server
    assert trajectory.final_answer == "5"


def test_processes_started_from_this_one_load_the_tools_by_name(server: dict[str, Any]) -> None:
    """Ray actors get a tool as (name, module): importing the module there configures the
    same servers (from the environment), started on first use."""
    child = (
        "import importlib; from pathlib import Path\n"
        "from tracetune.tools import ToolContext, get_tool\n"
        "importlib.import_module('tracetune.tools.mcp')\n"
        "print(get_tool('add_numbers')(ToolContext(workdir=Path('.')), a=20, b=22).text)\n"
    )
    assert json.loads(os.environ[mcp.SERVERS_ENV])[0]["command"] == sys.executable
    out = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "42.0"


@pytest.mark.parametrize("action_format", ["json", "code"])
def test_a_server_killed_during_a_call_stops_the_episode(action_format: str, stores) -> None:
    """The model cannot recover from a dead server: the episode raises McpServerLost (its
    item fails) in every action format instead of going on without the tool."""
    spec = {"command": COMMAND, "prefix": "d_", "tools": ["slow", "server_pid"]}
    try:
        tools = {t.name: t for t in mcp.connect([spec])}
        pid = int(tools["d_server_pid"](ToolContext(workdir=Path("."))).text)
        reply = (
            call("d_slow", seconds=5)
            if action_format == "json"
            else "Thought: wait\nCode:\n```py\ntry:\n    d_slow(seconds=5)\n"
            "except Exception as e:\n    print('caught', e)\n```"
        )
        model = ScriptedChatModel([reply, call("final_answer", answer="never")])
        agent = Agent(model, [tools["d_slow"]], action_format=action_format)
        threading.Timer(1.0, os.kill, (pid, signal.SIGKILL)).start()
        with pytest.raises(mcp.McpServerLost, match="died during a call to slow"):
            asyncio.run(agent.run(Task(id="t", query="Wait."), *stores))
        assert len(model.calls) == 1  # the model was not asked again
    finally:
        mcp.close_all()
