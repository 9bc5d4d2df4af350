"""The openai: and azure: backends against a real OpenAI-compatible server on loopback."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from PIL import Image

from tracetune.models import (
    BackendError,
    ChatModel,
    Generation,
    Sampling,
    load_model,
    text_message,
)
from tracetune.models.openai_backend import OpenAIChatModel, builtin_price
from tracetune.store import RunState
from tracetune.testing import ScriptedOpenAIServer

HELLO = [text_message("user", "one two three")]


def ask(model: ChatModel, *args: Any, **kwargs: Any) -> Generation:
    """One generate call in its own event loop, closing the client's connections after."""

    async def call() -> Generation:
        try:
            return await model.generate(*args, **kwargs)
        finally:
            await model.aclose()

    return asyncio.run(call())


def openai_model(
    srv: ScriptedOpenAIServer, name: str = "test-model", **options: Any
) -> OpenAIChatModel:
    model = load_model(f"openai:{name}", base_url=srv.base_url, **options)
    assert isinstance(model, OpenAIChatModel)
    model.retry_base_s = 0.001  # keep backoff out of test time; Retry-After is still honoured
    return model


@pytest.fixture(autouse=True)
def _no_ambient_openai_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in (
        "OPENAI_API_KEY",
        "OPENAI_BASE_URL",
        "AZURE_OPENAI_API_KEY",
        "AZURE_OPENAI_ENDPOINT",
        "AZURE_OPENAI_AD_TOKEN",
        "OPENAI_API_VERSION",
    ):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def srv() -> Iterator[ScriptedOpenAIServer]:
    with ScriptedOpenAIServer(replies=["four five"] * 20) as server:
        yield server


# -- messages ------------------------------------------------------------------------------
def test_text_and_image_message_arrives_with_a_data_url_image(
    srv: ScriptedOpenAIServer, tmp_path: Path
) -> None:
    red = Image.new("RGB", (6, 4), (255, 0, 0))
    blue_path = tmp_path / "blue.png"
    Image.new("RGB", (3, 3), (0, 0, 255)).save(blue_path)
    messages = [
        {"role": "system", "content": "Be brief."},
        text_message("user", "What colours are these?", images=[red, blue_path]),
    ]
    generation = ask(openai_model(srv), messages)

    assert generation.text == "four five"
    sent = srv.requests[0].messages
    assert sent[0] == {"role": "system", "content": "Be brief."}
    parts = sent[1]["content"]
    assert [p["type"] for p in parts] == ["image_url", "image_url", "text"]
    assert parts[2]["text"] == "What colours are these?"
    urls = srv.requests[0].image_urls()
    assert all(u.startswith("data:image/png;base64,") for u in urls)
    decoded = [Image.open(io.BytesIO(base64.b64decode(u.split(",", 1)[1]))) for u in urls]
    assert decoded[0].size == (6, 4) and decoded[0].getpixel((0, 0)) == (255, 0, 0)
    assert decoded[1].size == (3, 3) and decoded[1].getpixel((1, 1)) == (0, 0, 255)
    # Usage is what the server reported.
    reported = srv.requests[0].response["usage"]
    assert generation.usage.prompt_tokens == reported["prompt_tokens"] > 0
    assert generation.usage.completion_tokens == reported["completion_tokens"] == 2
    assert generation.usage.calls == 1 and generation.usage.retries == 0


def test_sampling_and_tools_are_sent_as_the_api_names_them(srv: ScriptedOpenAIServer) -> None:
    tools = [{"type": "function", "function": {"name": "calculator", "parameters": {}}}]
    sampling = Sampling(temperature=0.7, top_p=0.9, max_tokens=33, stop=("END",), seed=5)
    ask(openai_model(srv), HELLO, sampling=sampling, tools=tools)
    body = srv.requests[0].body
    assert body["model"] == "test-model"
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.7, 0.9, 33)
    assert body["stop"] == ["END"] and body["seed"] == 5
    assert body["tools"] == tools
    assert "n" not in body


def test_native_tool_calls_come_back_as_tool_calls() -> None:
    from tracetune.agent.formats import get_format

    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "calculator", "arguments": json.dumps({"expression": "2+2"})},
    }
    with ScriptedOpenAIServer(replies=[{"content": "Adding.", "tool_calls": [call]}]) as srv:
        generation = ask(openai_model(srv), HELLO)
    completion = generation.completions[0]
    assert completion.text == "Adding."  # not flattened into the text
    assert completion.tool_calls == [
        {"id": "call_1", "name": "calculator", "arguments": {"expression": "2+2"}}
    ]
    assert completion.finish_reason == "tool_calls"
    # the json action format reads a native call as its Action line
    assert get_format("json").raw(completion) == (
        'Adding.\nAction: {"name": "calculator", "arguments": {"expression": "2+2"}}'
    )


def test_assistant_tool_calls_and_tool_results_are_paired_for_the_api(
    srv: ScriptedOpenAIServer,
) -> None:
    messages = [
        text_message("user", "2+2?"),
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "type": "function",
                    "function": {"name": "calculator", "arguments": {"expression": "2+2"}},
                }
            ],
        },
        {"role": "tool", "name": "calculator", "content": "4"},
    ]
    ask(openai_model(srv), messages)
    sent = srv.requests[0].messages
    call = sent[1]["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == {"expression": "2+2"}
    assert call["id"] and sent[2]["tool_call_id"] == call["id"]


def test_bad_content_part_is_rejected_before_any_request(srv: ScriptedOpenAIServer) -> None:
    model = openai_model(srv)
    with pytest.raises(BackendError, match="message 0: unsupported content part"):
        ask(model, [{"role": "user", "content": [{"type": "audio"}]}])
    with pytest.raises(BackendError, match="cannot read image"):
        ask(model, [text_message("user", "x", images=["/no/such.png"])])
    assert srv.calls == 0


# -- retries and errors --------------------------------------------------------------------
def test_429_then_500_are_retried_and_counted() -> None:
    with ScriptedOpenAIServer(replies=["fine"], failures=[429, 500]) as srv:
        generation = ask(openai_model(srv), HELLO)
    assert generation.text == "fine"
    assert generation.usage.retries == 2
    assert generation.usage.calls == 1
    assert [r.status for r in srv.requests] == [429, 500, 200]


def test_retry_after_is_honoured() -> None:
    with ScriptedOpenAIServer(replies=["fine"], failures=[429], retry_after_s=0.4) as srv:
        generation = ask(openai_model(srv), HELLO)
        gap = srv.requests[1].received_at - srv.requests[0].received_at
    assert generation.usage.retries == 1
    # Backoff alone would wait ~1 ms (retry_base_s); the server asked for 400 ms.
    assert gap >= 0.4
    assert generation.latency_s >= 0.4


def test_retries_stop_at_max_retries_with_the_last_error() -> None:
    with ScriptedOpenAIServer(replies=["never"], failures=[503, 503, 503, 503]) as srv:
        model = openai_model(srv, max_retries=2)
        with pytest.raises(BackendError, match=r"after 2 retries.*HTTP 503"):
            ask(model, HELLO)
        assert srv.calls == 3


def test_400_fails_at_once_with_the_server_message() -> None:
    failure = (400, "messages[0]: image too large")
    with ScriptedOpenAIServer(replies=["never"], failures=[failure]) as srv:
        with pytest.raises(BackendError) as info:
            ask(openai_model(srv), HELLO)
        assert srv.calls == 1  # not retried
    message = str(info.value)
    assert "HTTP 400" in message and "messages[0]: image too large" in message
    assert "test-model" in message and srv.base_url in message


def test_401_says_which_variable_holds_the_key() -> None:
    with ScriptedOpenAIServer(failures=[(401, "Incorrect API key provided")]) as srv:
        with pytest.raises(BackendError, match=r"HTTP 401.*Incorrect API key.*\$MY_KEY"):
            ask(openai_model(srv, api_key_env="MY_KEY"), HELLO)


def test_timeouts_are_retried() -> None:
    with ScriptedOpenAIServer(replies=["late"] * 3, latency_s=0.5) as srv:
        model = openai_model(srv, timeout_s=0.1, max_retries=1)
        with pytest.raises(BackendError, match=r"after 1 retries.*Timeout"):
            ask(model, HELLO)
        assert srv.calls == 2


def test_connection_errors_are_retried() -> None:
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    model = load_model("openai:m", base_url=f"http://127.0.0.1:{port}/v1", max_retries=2)
    model.retry_base_s = 0.001  # type: ignore[attr-defined]
    with pytest.raises(BackendError, match=r"after 2 retries.*APIConnectionError"):
        ask(model, HELLO)


def test_running_out_of_scripted_replies_is_a_clear_error() -> None:
    with ScriptedOpenAIServer(replies=["only one"]) as srv:
        model = openai_model(srv)
        ask(model, HELLO)
        with pytest.raises(BackendError, match="ran out of scripted replies"):
            ask(model, HELLO)


# -- cache -----------------------------------------------------------------------------------
def test_cache_answers_repeats_without_http(srv: ScriptedOpenAIServer, tmp_path: Path) -> None:
    state = RunState(tmp_path / "state.sqlite")
    model = openai_model(srv)
    model.cache = state
    image = Image.new("RGB", (4, 4), (0, 255, 0))
    messages = [text_message("user", "colour?", images=[image])]

    async def run() -> tuple[Any, Any, Any]:
        first = await model.generate(messages)
        again = await model.generate(messages)
        other = await model.generate(messages, sampling=Sampling(temperature=1.0))
        await model.aclose()
        return first, again, other

    first, again, other = asyncio.run(run())
    assert not first.cached and first.usage.prompt_tokens > 0
    assert again.cached and again.texts == first.texts
    assert again.usage.calls == 1 and again.usage.cached_calls == 1
    assert again.usage.total_tokens == 0 and again.usage.cost_usd == 0
    assert not other.cached  # different sampling, different key
    assert srv.calls == 2

    # The cache lives in the run state: a new backend (a resumed run) reuses it.
    fresh = openai_model(srv)
    fresh.cache = RunState(tmp_path / "state.sqlite")
    assert ask(fresh, messages).cached
    assert srv.calls == 2


def test_failures_are_not_cached(tmp_path: Path) -> None:
    with ScriptedOpenAIServer(replies=["after all"], failures=[(400, "bad")]) as srv:
        model = openai_model(srv)
        model.cache = RunState(tmp_path / "state.sqlite")
        with pytest.raises(BackendError):
            ask(model, HELLO)
        generation = ask(model, HELLO)
        assert not generation.cached and generation.text == "after all"
        assert srv.calls == 2


# -- concurrency and n -----------------------------------------------------------------------
def test_concurrency_is_bounded() -> None:
    with ScriptedOpenAIServer(latency_s=0.15) as srv:
        model = openai_model(srv, concurrency=3)

        async def many() -> list[Generation]:
            try:
                return list(await asyncio.gather(*(model.generate(HELLO) for _ in range(12))))
            finally:
                await model.aclose()

        start = time.perf_counter()
        results = asyncio.run(many())
        elapsed = time.perf_counter() - start
    assert len(results) == 12 and srv.calls == 12
    assert srv.max_in_flight == 3
    assert elapsed >= 4 * 0.15  # 12 calls, 3 at a time


def test_n_is_passed_to_servers_that_honour_it(srv: ScriptedOpenAIServer) -> None:
    generation = ask(openai_model(srv), HELLO, n=3)
    assert len(generation.completions) == 3
    assert srv.calls == 1 and srv.requests[0].body["n"] == 3


def test_n_is_filled_up_when_the_server_ignores_it() -> None:
    with ScriptedOpenAIServer(replies=["a", "b", "c"], honour_n=False) as srv:
        generation = ask(openai_model(srv), HELLO, n=3, sampling=Sampling(temperature=1, seed=7))
        seeds = sorted(r.body["seed"] for r in srv.requests)
    assert sorted(generation.texts) == ["a", "b", "c"]
    assert srv.calls == 3 and generation.usage.calls == 3
    assert generation.usage.completion_tokens == 3
    assert seeds == [7, 8, 9]  # extra samples are not copies of the first


def test_one_model_serves_several_event_loops(srv: ScriptedOpenAIServer) -> None:
    model = openai_model(srv, concurrency=2)
    for _ in range(3):  # e.g. a CLI that calls asyncio.run per batch, never closing
        texts = asyncio.run(model.generate(HELLO)).texts
        assert texts == ["four five"]
    asyncio.run(model.aclose())


def test_server_works_inside_async_code() -> None:
    async def main() -> list[Generation]:
        async with ScriptedOpenAIServer(replies=["x", "y"]) as srv:
            model = openai_model(srv)
            results = await asyncio.gather(model.generate(HELLO), model.generate(HELLO))
            await model.aclose()
        return list(results)

    assert sorted(g.text for g in asyncio.run(main())) == ["x", "y"]


# -- cost and keys ---------------------------------------------------------------------------
def test_cost_uses_explicit_prices(srv: ScriptedOpenAIServer) -> None:
    model = openai_model(srv, price_input_per_mtok=2.0, price_output_per_mtok=8.0)
    usage = ask(model, HELLO).usage
    # "one two three" -> 3 prompt tokens, "four five" -> 2 completion tokens on this server.
    assert (usage.prompt_tokens, usage.completion_tokens) == (3, 2)
    assert usage.cost_usd == pytest.approx((3 * 2.0 + 2 * 8.0) / 1e6)


def test_cost_uses_the_builtin_table_and_zero_for_unknown_models(
    srv: ScriptedOpenAIServer,
) -> None:
    known = ask(openai_model(srv, name="gpt-4o-mini"), HELLO).usage
    assert known.cost_usd == pytest.approx((3 * 0.15 + 2 * 0.60) / 1e6)
    unknown = ask(openai_model(srv, name="my-finetune"), HELLO).usage
    assert unknown.cost_usd == 0 and unknown.total_tokens == 5
    assert builtin_price("gpt-4o-2024-08-06") == builtin_price("gpt-4o") == (2.50, 10.00)
    assert builtin_price("gpt-4o-mini-2024-07-18") == (0.15, 0.60)
    assert builtin_price("gpt-4o-audio-preview") is None


def test_missing_key_for_openai_fails_before_any_request(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_client(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a client was built: the key check came too late")

    monkeypatch.setattr(openai, "AsyncOpenAI", no_client)
    with pytest.raises(BackendError, match=r"set the environment variable OPENAI_API_KEY"):
        load_model("openai:gpt-4o-mini")
    with pytest.raises(BackendError, match=r"TEAM_OPENAI_KEY"):
        load_model("openai:gpt-4o-mini", api_key_env="TEAM_OPENAI_KEY")


def test_key_is_sent_but_never_shown(
    srv: ScriptedOpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-secret-123")
    model = openai_model(srv)
    ask(model, HELLO)
    assert srv.requests[0].headers["authorization"] == "Bearer sk-secret-123"
    assert "sk-secret" not in repr(model) and "sk-secret" not in str(vars(model))
    srv.fail_next((400, "nope"))
    with pytest.raises(BackendError) as info:
        ask(model, HELLO)
    assert "sk-secret" not in str(info.value)


def test_local_servers_get_a_placeholder_key(srv: ScriptedOpenAIServer) -> None:
    ask(openai_model(srv), HELLO)
    assert srv.requests[0].headers["authorization"].startswith("Bearer ")


def test_base_url_must_be_http() -> None:
    with pytest.raises(BackendError, match="not an http"):
        load_model("openai:m", base_url="localhost:8000/v1")


# -- azure -----------------------------------------------------------------------------------
def test_azure_says_what_is_missing() -> None:
    with pytest.raises(BackendError) as info:
        load_model("azure:my-deployment")
    for name in ("AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_API_KEY", "OPENAI_API_VERSION"):
        assert name in str(info.value)


def test_azure_talks_to_the_deployment(monkeypatch: pytest.MonkeyPatch) -> None:
    with ScriptedOpenAIServer(replies=["from azure"]) as srv:
        monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", srv.root_url)
        monkeypatch.setenv("AZURE_OPENAI_API_KEY", "az-key")
        monkeypatch.setenv("OPENAI_API_VERSION", "2024-10-21")
        generation = ask(load_model("azure:my-deployment"), HELLO)
    assert generation.text == "from azure"
    request = srv.requests[0]
    assert (
        request.path == "/openai/deployments/my-deployment/chat/completions?api-version=2024-10-21"
    )
    assert request.headers["api-key"] == "az-key"
