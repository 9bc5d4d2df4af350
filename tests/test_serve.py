"""``tracetune serve`` against real clients: the official ``openai`` client and tracetune's
own ``openai:`` backend, over real HTTP on loopback, answering with a tiny Qwen2-VL."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from tracetune.cli import app as cli_app
from tracetune.models import Sampling, load_model
from tracetune.models.local import LocalVLM
from tracetune.models.tiny import init_tiny
from tracetune.serve import ServeConfig, ServeError, ServerThread, bind, load_engine
from tracetune.serve.app import _response
from tracetune.serve.engine import Choice, GenResult, safe_prefix_len

NAME = "tiny-qwen"


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return init_tiny("qwen2_vl", tmp_path_factory.mktemp("serve") / "qwen2_vl", seed=0)


@pytest.fixture(scope="module")
def server(tiny_dir: Path) -> Any:
    engine = load_engine(ServeConfig(model=str(tiny_dir), served_name=NAME, batch_wait_ms=5))
    with ServerThread(engine, NAME) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server: ServerThread) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def _data_url(color: str, size: tuple[int, int] = (64, 48)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _image_chat(color: str = "red") -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": _data_url(color)}},
                {"type": "text", "text": "What is in the image?"},
            ],
        }
    ]


# -- the official client ------------------------------------------------------------------
def test_models_lists_the_served_name(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [NAME]


def test_image_chat_greedy_matches_the_local_backend(
    client: openai.OpenAI, server: ServerThread
) -> None:
    r = client.chat.completions.create(
        model=NAME,
        messages=_image_chat(),
        max_tokens=8,
        temperature=0,  # type: ignore[arg-type]
    )
    local = server.engine.model
    png = base64.b64decode(_data_url("red").split(",", 1)[1])
    chat = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": png},
                {"type": "text", "text": "What is in the image?"},
            ],
        }
    ]
    expected = local.generate_blocking(chat, sampling=Sampling(max_tokens=8))
    assert r.choices[0].message.content == expected.text
    assert r.usage is not None
    # The image costs 16 tokens on this model; usage counts it.
    assert r.usage.prompt_tokens == expected.usage.prompt_tokens > 16
    assert r.usage.completion_tokens == expected.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_n_samples_are_distinct_and_reproducible_under_a_seed(client: openai.OpenAI) -> None:
    def ask(seed: int) -> Any:
        return client.chat.completions.create(
            model=NAME,
            messages=_image_chat("blue"),  # type: ignore[arg-type]
            n=3,
            max_tokens=6,
            temperature=1.0,
            seed=seed,
        )

    first, again, other = ask(7), ask(7), ask(8)
    texts = [c.message.content for c in first.choices]
    assert len(texts) == 3 and len(set(texts)) == 3
    assert [c.message.content for c in again.choices] == texts
    assert [c.message.content for c in other.choices] != texts
    assert [c.index for c in first.choices] == [0, 1, 2]
    # usage: the prompt once, the completion tokens of all three choices
    assert first.usage is not None
    lengths = [6 if c.finish_reason == "length" else None for c in first.choices]
    if None not in lengths:
        assert first.usage.completion_tokens == 18


def test_stop_cuts_the_completion(client: openai.OpenAI) -> None:
    messages: Any = [{"role": "user", "content": "Describe the chart."}]
    full = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=16, temperature=0
    )
    text = full.choices[0].message.content or ""
    stop = text[4:7]
    assert len(stop) == 3 and text.find(stop) >= 1
    cut = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=16, temperature=0, stop=[stop, "never seen"]
    )
    assert cut.choices[0].message.content == text[: text.find(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert full.choices[0].finish_reason == "length"


def test_streaming_sends_the_same_text_in_pieces(client: openai.OpenAI) -> None:
    messages: Any = _image_chat("green")
    whole = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=12, temperature=0
    )
    stream = client.chat.completions.create(
        model=NAME,
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert len(pieces) > 2  # streamed as generated, not in one piece at the end
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and whole.usage is not None
    assert usage.completion_tokens == whole.usage.completion_tokens


def test_tools_and_tool_turns_reach_the_template(client: openai.OpenAI) -> None:
    tools: Any = [
        {
            "type": "function",
            "function": {
                "name": "calculator",
                "description": "Evaluate math.",
                "parameters": {"type": "object", "properties": {"expression": {"type": "string"}}},
            },
        }
    ]
    messages: Any = [
        {"role": "user", "content": "What is 2+2?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "calculator", "arguments": '{"expression": "2+2"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "4"},
    ]
    with_tools = client.chat.completions.create(
        model=NAME, messages=messages, tools=tools, max_tokens=4, temperature=0
    )
    without = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=4, temperature=0
    )
    assert with_tools.usage is not None and without.usage is not None
    # the tool schemas are in the prompt only when sent
    assert with_tools.usage.prompt_tokens > without.usage.prompt_tokens + 20


def test_tool_call_text_comes_back_as_openai_tool_calls() -> None:
    text = (
        'Let me compute.\n<tool_call>\n{"name": "calculator", "arguments": '
        '{"expression": "2+2"}}\n</tool_call>'
    )
    body = _response(GenResult([Choice(text, "stop", 20)], 10), True, NAME)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me compute."
    (call,) = choice["message"]["tool_calls"]
    assert call["function"]["name"] == "calculator"
    assert json.loads(call["function"]["arguments"]) == {"expression": "2+2"}
    # the openai client parses it
    parsed = openai.types.chat.ChatCompletion.model_validate(body)
    assert parsed.choices[0].message.tool_calls is not None
    # without tools in the request, the text stays text
    plain = _response(GenResult([Choice(text, "stop", 20)], 10), False, NAME)
    assert plain["choices"][0]["message"]["content"] == text
    # a malformed block is not a call
    bad = _response(GenResult([Choice("<tool_call>{oops</tool_call>", "stop", 5)], 10), True, NAME)
    assert "tool_calls" not in bad["choices"][0]["message"]


def test_stream_holdback_never_sends_part_of_a_marker() -> None:
    assert safe_prefix_len("abc <tool_", ("<tool_call>",)) == 4
    assert safe_prefix_len("abc <tool_call> {", ("<tool_call>",)) == 4
    assert safe_prefix_len("abc\nObs", ("\nObservation:",)) == 3
    assert safe_prefix_len("abc", ()) == 3
    assert safe_prefix_len("ab\ufffd", ()) == 2


def test_bad_requests_get_a_400_naming_the_problem(server: ServerThread) -> None:
    url = server.base_url + "/chat/completions"
    cases = [
        ({"model": NAME, "messages": []}, "messages"),
        ({"model": NAME, "messages": [{"role": "robot", "content": "x"}]}, "role"),
        ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "n": 0}, "'n'"),
        (
            {
                "model": NAME,
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}],
                    }
                ],
            },
            "data URL",
        ),
        ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "tools": [{}]}, "tools"),
    ]
    for body, words in cases:
        r = httpx.post(url, json=body, timeout=30)
        assert r.status_code == 400, (body, r.text)
        assert words in r.json()["error"]["message"], r.text
    r = httpx.post(url, json={"model": "gpt-4o", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and NAME in r.json()["error"]["message"]


# -- tracetune's own openai: backend, and batching ---------------------------------------------
def test_openai_backend_images_n_and_usage(server: ServerThread) -> None:
    model = load_model(f"openai:{NAME}", base_url=server.base_url)
    png = base64.b64decode(_data_url("red").split(",", 1)[1])
    chat = [
        {
            "role": "user",
            "content": [{"type": "image", "image": png}, {"type": "text", "text": "Read it."}],
        }
    ]

    async def go() -> Any:
        try:
            a = await model.generate(
                chat, n=3, sampling=Sampling(temperature=1.0, max_tokens=5, seed=3)
            )
            b = await model.generate(chat, sampling=Sampling(max_tokens=5))
            return a, b
        finally:
            await model.aclose()

    a, b = asyncio.run(go())
    assert len(a.texts) == 3 and len(set(a.texts)) == 3
    assert a.usage.calls == 1 and a.usage.prompt_tokens > 16
    assert a.usage.completion_tokens <= 15 and b.usage.completion_tokens <= 5
    total = a.usage.add(b.usage)
    assert total.prompt_tokens == a.usage.prompt_tokens + b.usage.prompt_tokens
    assert total.completion_tokens == a.usage.completion_tokens + b.usage.completion_tokens
    assert total.calls == 2


def test_concurrent_requests_are_batched(server: ServerThread) -> None:
    engine = server.engine
    model = load_model(f"openai:{NAME}", base_url=server.base_url, concurrency=16)
    questions = [f"How many people are there in picture {i}?" for i in range(16)]
    expected = [
        engine.model.generate_blocking(
            [{"role": "user", "content": q}], sampling=Sampling(max_tokens=8)
        ).text
        for q in questions
    ]
    before = engine.stats.batches, engine.stats.requests

    async def go() -> list[str]:
        try:
            gens = await asyncio.gather(
                *(
                    model.generate(
                        [{"role": "user", "content": q}], sampling=Sampling(max_tokens=8)
                    )
                    for q in questions
                )
            )
            return [g.text for g in gens]
        finally:
            await model.aclose()

    texts = asyncio.run(go())
    batches = engine.stats.batches - before[0]
    requests = engine.stats.requests - before[1]
    assert requests == 16
    # 16 requests in flight share generate calls: far fewer calls than requests
    assert batches <= 8, engine.stats.as_dict()
    assert engine.stats.max_batch_requests >= 4
    # and batching (left padding) does not change what greedy decoding answers
    assert texts == expected
    stats = httpx.get(server.base_url.removesuffix("/v1") + "/stats").json()
    assert stats["requests"] >= 16 and stats["max_batch_requests"] >= 4


# -- eval through the server equals eval in process ----------------------------------------------
@pytest.mark.slow
def test_eval_programs_through_the_server_equals_local(
    tiny_dir: Path, server: ServerThread, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "unused")
    common = ["--n", "2", "--family", "receipt", "--family", "table", "--max-steps", "2"]
    common += ["--max-tokens", "12", "--temperature", "0", "--quiet"]
    runs = {}
    for label, spec, extra in (
        ("local", f"local:{tiny_dir}", []),
        ("served", f"openai:{NAME}", ["--base-url", server.base_url]),
    ):
        out = tmp_path / label
        result = CliRunner().invoke(
            cli_app,
            ["eval", "run", "programs", "--model", spec, "--out", str(out), *common, *extra],
        )
        assert result.exit_code == 0, result.output
        runs[label] = out
    local_rows = _episode_steps(runs["local"])
    served_rows = _episode_steps(runs["served"])
    assert local_rows and served_rows == local_rows
    local_metrics = json.loads((runs["local"] / "metrics.json").read_text())
    served_metrics = json.loads((runs["served"] / "metrics.json").read_text())
    assert (
        local_metrics["reports"]["programs"]["metrics"]
        == served_metrics["reports"]["programs"]["metrics"]
    )


def _episode_steps(run_dir: Path) -> dict[str, list[str]]:
    from tracetune.schema import Trajectory
    from tracetune.store import Dataset

    rows = {}
    for folder in sorted(p for p in run_dir.rglob("*") if p.is_dir()):
        try:
            records = Dataset.open(folder, Trajectory).records()
        except Exception:  # noqa: S112  (not a trajectory dataset)
            continue
        for t in records:
            rows[t.task.id] = [s.raw for s in t.steps] + [str(t.final_answer), t.status]
    return rows


# -- bad input at start-up ---------------------------------------------------------------------
def test_a_port_in_use_is_one_clear_error(tiny_dir: Path) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        with pytest.raises(ServeError, match=f"port {port} on 127.0.0.1 is already in use"):
            bind("127.0.0.1", port)
        result = CliRunner().invoke(cli_app, ["serve", str(tiny_dir), "--port", str(port)])
        assert result.exit_code == 2
        flat = "".join(result.output.split())
        assert "alreadyinuse" in flat and "--port" in flat
    finally:
        taken.close()


def test_an_adapter_for_another_base_is_one_clear_error(tiny_dir: Path, tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    lora.save_pretrained(tmp_path / "adapter")
    llava = init_tiny("llava", tmp_path / "llava")
    with pytest.raises(ServeError, match="does not fit this model: it was trained on"):
        load_engine(ServeConfig(model=str(llava), adapter=str(tmp_path / "adapter")))
    result = CliRunner().invoke(
        cli_app, ["serve", str(llava), "--adapter", str(tmp_path / "adapter"), "--port", "0"]
    )
    assert result.exit_code == 2 and "doesnotfitthismodel" in "".join(result.output.split())


def test_merge_reads_the_base_from_the_adapter_and_writes_a_standard_checkpoint(
    tiny_dir: Path, tmp_path: Path
) -> None:
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    base = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    lora.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "merged"
    result = CliRunner().invoke(
        cli_app, ["model", "merge", "--adapter", str(tmp_path / "adapter"), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if "lora" in k or k.startswith("base_model")]
    reference = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    ref_keys = set(safe_open(str(tiny_dir / "model.safetensors"), "pt").keys())
    assert set(keys) == ref_keys  # the same (hub) weight names as the base checkpoint
    merged = LocalVLM(str(out))
    adapted = LocalVLM(str(tiny_dir))
    adapted.model = lora.eval()
    inputs = merged.encode([{"role": "user", "content": "hello"}])
    with torch.no_grad():
        torch.testing.assert_close(
            merged.model(**inputs).logits, adapted.model(**inputs).logits, atol=1e-4, rtol=1e-4
        )
        assert not torch.allclose(merged.model(**inputs).logits, reference(**inputs).logits)
