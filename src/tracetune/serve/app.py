"""The OpenAI-compatible HTTP surface: ``/v1/models`` and ``/v1/chat/completions``.

Requests are checked and rendered here (bad input is a 400 for that request alone), then
queued on the :class:`~tracetune.serve.engine.BatchEngine`. Images come as ``image_url``
parts holding base64 data URLs; the server never fetches URLs or reads files named by a
client. Tool calls use the hermes ``<tool_call>`` format (see
:mod:`tracetune.models.toolcalls`) and come back as OpenAI ``tool_calls``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import time
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from PIL import Image

from tracetune.errors import TracetuneError
from tracetune.models.base import BackendError, Sampling
from tracetune.models.toolcalls import TOOL_CALL_OPEN, parse_tool_calls, validate_tools
from tracetune.serve.engine import BatchEngine, GenRequest, GenResult, safe_prefix_len

MAX_N = 64


class RequestError(TracetuneError, ValueError):
    """A request the client must fix (HTTP 400, or ``status``)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


def create_app(engine: BatchEngine, served_name: str, default_max_tokens: int = 512) -> FastAPI:
    """The FastAPI app serving ``engine``'s model under the name ``served_name``."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        await engine.start()
        try:
            yield
        finally:
            await engine.stop()

    app = FastAPI(title="tracetune serve", lifespan=lifespan)
    created = int(time.time())

    def error(status: int, message: str, param: str | None = None) -> JSONResponse:
        kind = "invalid_request_error" if status < 500 else "server_error"
        body = {"error": {"message": message, "type": kind, "param": param, "code": status}}
        return JSONResponse(body, status_code=status)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": served_name, "object": "model", "created": created, "owned_by": "tracetune"}
        return {"object": "list", "data": [card]}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        """Batching statistics (not part of the OpenAI API)."""
        return engine.stats.as_dict()

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Any:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return error(400, "the request body is not JSON")
        try:
            if not isinstance(body, dict):
                raise RequestError("the request body must be a JSON object")
            parsed = await asyncio.to_thread(
                _parse_request, body, engine, served_name, default_max_tokens
            )
        except RequestError as exc:
            return error(exc.status, str(exc), exc.param)
        gen, tools, stream, include_usage = parsed
        if stream:
            return StreamingResponse(
                _stream(engine, gen, tools, served_name, include_usage),
                media_type="text/event-stream",
            )
        try:
            result = await engine.submit(gen)
        except Exception as exc:
            return error(500, f"generation failed: {type(exc).__name__}: {exc}")
        return _response(result, tools, served_name)

    return app


# -- requests ---------------------------------------------------------------------------------
def _parse_request(
    body: dict[str, Any], engine: BatchEngine, served_name: str, default_max_tokens: int
) -> tuple[GenRequest, bool, bool, bool]:
    model = body.get("model")
    if model is not None and model != served_name:
        raise RequestError(
            f"the model {model!r} does not exist; this server serves {served_name!r}",
            "model",
            404,
        )
    for unsupported in ("logprobs", "top_logprobs"):
        if body.get(unsupported):
            raise RequestError(f"{unsupported!r} is not supported by tracetune serve", unsupported)
    n = _int("n", body.get("n"), 1, 1, MAX_N)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(key, body.get(key), default_max_tokens, 1, 1 << 20)
    temperature = _float(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _float(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise RequestError("'top_p' must be greater than 0", "top_p")
    seed = body.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise RequestError("'seed' must be an integer", "seed")
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= 16:
        stops = tuple(s for s in stop if s)
    else:
        raise RequestError("'stop' must be a string or a list of up to 16 strings", "stop")

    tools: list[dict[str, Any]] = []
    if body.get("tools"):
        try:
            tools = validate_tools(body["tools"])
        except ValueError as exc:
            raise RequestError(str(exc), "tools") from None
    if body.get("tool_choice") == "none":
        tools = []
    elif body.get("tool_choice") not in (None, "auto", "none", "required") and tools:
        raise RequestError(
            "tool_choice naming one function is not supported; use 'auto', 'required' or 'none'",
            "tool_choice",
        )

    messages = _messages(body.get("messages"))
    try:
        prompt, images = engine.model.render(messages, tools or None)
    except BackendError as exc:
        raise RequestError(str(exc), "messages") from None
    stream = bool(body.get("stream"))
    options = body.get("stream_options") or {}
    include_usage = bool(options.get("include_usage")) if isinstance(options, dict) else False
    sampling = Sampling(
        temperature=temperature, top_p=top_p, max_tokens=max_tokens, stop=stops, seed=seed
    )
    gen = GenRequest(
        prompt=prompt,
        images=images,
        n=n,
        sampling=sampling,
        holdback=(TOOL_CALL_OPEN,) if tools else (),
    )
    return gen, bool(tools), stream, include_usage


def _int(key: str, value: Any, default: int, low: int, high: int) -> int:
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise RequestError(f"{key!r} must be an integer from {low} to {high}", key)
    return value


def _float(body: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
        raise RequestError(f"{key!r} must be a number from {low} to {high}", key)
    return float(value)


def _messages(raw: Any) -> list[dict[str, Any]]:
    """Chat Completions messages as the local backend's messages (images decoded)."""
    if not isinstance(raw, list) or not raw:
        raise RequestError("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in (
            "system",
            "developer",
            "user",
            "assistant",
            "tool",
        ):
            raise RequestError(
                f"messages[{i}] needs a 'role' of system, developer, user, assistant or tool",
                "messages",
            )
        role = "system" if m["role"] == "developer" else m["role"]
        msg: dict[str, Any] = {"role": role, "content": _content(m.get("content"), i)}
        if role == "assistant" and m.get("tool_calls"):
            msg["tool_calls"] = [_assistant_call(c, i) for c in m["tool_calls"]]
        if role == "tool":
            for key in ("tool_call_id", "name"):
                if m.get(key):
                    msg[key] = m[key]
        out.append(msg)
    return out


def _content(content: Any, index: int) -> Any:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise RequestError(f"messages[{index}].content must be a string or a list of parts")
    parts: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            parts.append({"type": "image", "image": _decode_image(url, index)})
        else:
            raise RequestError(
                f"messages[{index}]: unsupported content part type {kind!r}; "
                "use 'text' or 'image_url' with a base64 data URL",
                "messages",
            )
    return parts


def _decode_image(url: Any, index: int) -> Image.Image:
    if not isinstance(url, str) or not url.startswith("data:"):
        raise RequestError(
            f"messages[{index}]: images must be base64 data URLs "
            "(data:image/png;base64,...); this server does not fetch URLs",
            "messages",
        )
    try:
        data = base64.b64decode(url.split(",", 1)[1], validate=False)
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            return img.convert("RGB")
    except (IndexError, binascii.Error, OSError, ValueError) as exc:
        raise RequestError(f"messages[{index}]: cannot read the image: {exc}", "messages") from None


def _assistant_call(call: Any, index: int) -> dict[str, Any]:
    fn = call.get("function") if isinstance(call, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise RequestError(f"messages[{index}].tool_calls entries need function.name", "messages")
    arguments = fn.get("arguments") or {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            raise RequestError(
                f"messages[{index}].tool_calls: arguments are not JSON", "messages"
            ) from None
    return {
        "id": call.get("id"),
        "type": "function",
        "function": {"name": fn["name"], "arguments": arguments},
    }


# -- responses --------------------------------------------------------------------------------
def _choice_message(text: str, finish: str, tools: bool) -> tuple[dict[str, Any], str]:
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if tools:
        parsed = parse_tool_calls(text)
        if parsed.calls:
            message["content"] = parsed.content or None
            message["tool_calls"] = [_openai_call(c) for c in parsed.calls]
            finish = "tool_calls"
    return message, finish


def _openai_call(call: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": call["id"],
        "type": "function",
        "function": {
            "name": call["name"],
            "arguments": json.dumps(call["arguments"], ensure_ascii=False),
        },
    }


def _usage(result: GenResult) -> dict[str, int]:
    completion = sum(c.completion_tokens for c in result.choices)
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": result.prompt_tokens + completion,
    }


def _response(result: GenResult, tools: bool, served_name: str) -> dict[str, Any]:
    choices = []
    for i, c in enumerate(result.choices):
        message, finish = _choice_message(c.text, c.finish_reason, tools)
        choices.append({"index": i, "message": message, "finish_reason": finish, "logprobs": None})
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": served_name,
        "choices": choices,
        "usage": _usage(result),
    }


async def _stream(
    engine: BatchEngine, gen: GenRequest, tools: bool, served_name: str, include_usage: bool
) -> Any:
    """Server-sent events: role, content deltas as they are generated, then the finish."""
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    gen.on_delta = lambda choice, delta: queue.put_nowait((choice, delta))
    base = {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": served_name,
    }

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        return f"data: {json.dumps({**base, 'choices': choices, **extra}, ensure_ascii=False)}\n\n"

    for i in range(gen.n):
        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}}])
    task = asyncio.ensure_future(engine.submit(gen))
    sent = [0] * gen.n
    try:
        while not task.done() or not queue.empty():
            getter = asyncio.ensure_future(queue.get())
            await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
            if not getter.done():
                getter.cancel()
                continue
            choice, piece = getter.result()
            sent[choice] += len(piece)
            yield chunk([{"index": choice, "delta": {"content": piece}, "finish_reason": None}])
        try:
            result = task.result()
        except Exception as exc:
            err = {"message": f"generation failed: {type(exc).__name__}: {exc}", "code": 500}
            yield f"data: {json.dumps({'error': err})}\n\n"
            yield "data: [DONE]\n\n"
            return
        for i, c in enumerate(result.choices):
            message, finish = _choice_message(c.text, c.finish_reason, tools)
            delta: dict[str, Any] = {}
            content = message.get("content") or ""
            if len(content) > sent[i]:
                delta["content"] = content[sent[i] :]
            if message.get("tool_calls"):
                delta["tool_calls"] = [
                    {"index": k, **call} for k, call in enumerate(message["tool_calls"])
                ]
            yield chunk([{"index": i, "delta": delta, "finish_reason": finish}])
        if include_usage:
            yield chunk([], usage=_usage(result))
        yield "data: [DONE]\n\n"
    finally:
        if not task.done():
            task.cancel()


__all__ = ["RequestError", "create_app", "safe_prefix_len"]
