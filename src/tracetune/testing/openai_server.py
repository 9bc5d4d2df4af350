"""A real OpenAI-compatible HTTP server on loopback that answers from a script.

It speaks the parts of the Chat Completions API that tracetune's ``openai:`` backend uses
(``GET /v1/models``, non-streaming ``POST /v1/chat/completions`` with ``n`` and ``usage``, and
the same under Azure's ``/openai/deployments/{name}/chat/completions``), so tests and
benchmarks exercise the real client, real HTTP and real retries without a network::

    with ScriptedOpenAIServer(replies=["Thought: ...", "Action: ..."]) as srv:
        model = load_model("openai:test-model", base_url=srv.base_url)
        ...
        assert srv.requests[0].image_urls()[0].startswith("data:image/png;base64,")

The server runs uvicorn in a background thread with its own event loop, so the same object
works from plain sync tests (``with``) and from async code (``with`` or ``async with``).

Token counts in ``usage`` are deterministic word counts (plus ``IMAGE_TOKENS`` per image), so
tests can check accounting without a tokenizer.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import math
import socket
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

# A scripted reply: the assistant's text, or a whole assistant message
# ({"content": ..., "tool_calls": [...]}) to script native tool calls.
Reply = str | dict[str, Any]
# Called once per request with its JSON body; a str or message is one choice (the responder is
# called again for each of the n choices), a list is exactly the choices of that response.
Responder = Callable[[dict[str, Any]], Reply | list[Reply]]
# An injected failure: a status code, or (status code, error message).
Failure = int | tuple[int, str]

IMAGE_TOKENS = 85  # what a low-detail image costs on OpenAI's API; any fixed number works


@dataclass
class RecordedRequest:
    """One request the server received, and what it answered."""

    body: dict[str, Any]
    headers: dict[str, str]
    path: str = ""  # with the query string, e.g. "/v1/chat/completions"
    status: int = 0
    response: dict[str, Any] = field(default_factory=dict)
    received_at: float = 0.0

    @property
    def messages(self) -> list[dict[str, Any]]:
        return list(self.body.get("messages", []))

    def image_urls(self) -> list[str]:
        """The ``image_url.url`` of every image part, in message order."""
        return [
            part["image_url"]["url"]
            for m in self.messages
            if isinstance(m.get("content"), list)
            for part in m["content"]
            if part.get("type") == "image_url"
        ]

    def texts(self) -> list[str]:
        """Every text in the conversation (string contents and text parts), in order."""
        return list(_texts(self.messages))


class ScriptedOpenAIServer:
    """An OpenAI-compatible chat server on ``127.0.0.1`` that answers from a script.

    Args:
        replies: the assistant replies, consumed in order, one per choice; or a responder
            ``callable(request_json) -> reply | list[reply]``. ``None`` answers ``"ok"`` forever.
            When a list runs out, the server answers HTTP 400 saying so (not retried).
        latency_s: seconds every chat request waits before answering (an ``asyncio.sleep``,
            so concurrent requests overlap as they would on a real server).
        failures: status codes (or ``(status, message)``) returned, in order, by the first
            requests before any real answer, e.g. ``[429, 500]``. More can be queued while
            running with :meth:`fail_next`.
        retry_after_s: the ``Retry-After`` a 429 carries (also sent as ``retry-after-ms``).
        honour_n: when False the server ignores ``n`` and returns one choice, like Ollama.
        model: the id listed by ``/v1/models``.

    Attributes:
        requests: every chat request received (failed ones included), in arrival order.
        max_in_flight: the most chat requests the server was handling at the same time.
    """

    def __init__(
        self,
        replies: Sequence[Reply] | Responder | None = None,
        *,
        latency_s: float = 0.0,
        failures: Iterable[Failure] = (),
        retry_after_s: float = 0.0,
        honour_n: bool = True,
        model: str = "test-model",
    ) -> None:
        if latency_s < 0 or retry_after_s < 0:
            raise ValueError("latency_s and retry_after_s must be >= 0")
        if isinstance(replies, str | dict):
            raise TypeError("replies is a list of replies (or a callable): wrap it as [reply]")
        self._responder: Responder | None = replies if callable(replies) else None
        self._replies: collections.deque[Reply] | None = (
            collections.deque(replies) if replies is not None and not callable(replies) else None
        )
        self.latency_s = latency_s
        self.retry_after_s = retry_after_s
        self.honour_n = honour_n
        self.model = model
        self._failures: collections.deque[Failure] = collections.deque(failures)
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._ids = itertools.count(1)
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._port: int | None = None

    # -- the public surface ------------------------------------------------------------
    @property
    def base_url(self) -> str:
        """The ``/v1`` root to give an OpenAI client (``http://127.0.0.1:PORT/v1``)."""
        return f"{self.root_url}/v1"

    @property
    def root_url(self) -> str:
        """``http://127.0.0.1:PORT``: what an Azure client takes as its endpoint."""
        if self._port is None:
            raise RuntimeError("ScriptedOpenAIServer is not running; use it as `with ... as srv`")
        return f"http://127.0.0.1:{self._port}"

    @property
    def calls(self) -> int:
        """How many chat requests arrived (failed ones included)."""
        return len(self.requests)

    def fail_next(self, *failures: Failure) -> None:
        """Queue failures that the next requests get before any real answer."""
        self._failures.extend(failures)

    def reset(self) -> None:
        """Forget recorded requests and the in-flight high-water mark."""
        self.requests.clear()
        self.max_in_flight = self.in_flight

    def start(self) -> ScriptedOpenAIServer:
        """Bind a free port and serve in a background thread; returns once it accepts."""
        if self._thread is not None:
            raise RuntimeError("ScriptedOpenAIServer is already running")
        import uvicorn

        # proto must be IPPROTO_TCP, not 0: asyncio only sets TCP_NODELAY on sockets that say
        # so, and without it every keep-alive response waits ~40 ms for a delayed ACK.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self._port = sock.getsockname()[1]
        config = uvicorn.Config(
            self._build_app(),
            log_level="warning",
            log_config=None,  # leave the process's logging setup alone; errors still propagate
            access_log=False,
            lifespan="off",
            # Benchmarks open hundreds of keep-alive connections at once.
            backlog=4096,
            timeout_keep_alive=30,
            timeout_graceful_shutdown=2,
        )
        server = uvicorn.Server(config)
        thread = threading.Thread(
            target=server.run, kwargs={"sockets": [sock]}, name="scripted-openai", daemon=True
        )
        thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                sock.close()
                raise RuntimeError("ScriptedOpenAIServer failed to start (see the log above)")
            time.sleep(0.005)
        self._server, self._thread = server, thread
        return self

    def stop(self) -> None:
        """Stop serving and join the thread (in-flight requests may finish, up to 2 s)."""
        if self._server is None or self._thread is None:
            return
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._server, self._thread = None, None

    def __enter__(self) -> ScriptedOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> ScriptedOpenAIServer:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)

    # -- the app -------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        from fastapi import FastAPI
        from fastapi.responses import JSONResponse

        app = FastAPI(title="ScriptedOpenAIServer", docs_url=None, redoc_url=None)

        async def list_models(request: Request) -> JSONResponse:
            model = {"id": self.model, "object": "model", "created": 0, "owned_by": "tracetune"}
            return JSONResponse({"object": "list", "data": [model]})

        async def chat_completions(request: Request) -> JSONResponse:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                return await self._answer(request)
            finally:
                self.in_flight -= 1

        # Plain Starlette routes: the handlers read raw JSON, so FastAPI's request
        # validation would only add per-request cost.
        app.router.add_route("/v1/models", list_models, methods=["GET"])
        app.router.add_route("/v1/chat/completions", chat_completions, methods=["POST"])
        # Azure OpenAI's layout, so the azure: backend can be tested for real too.
        app.router.add_route(
            "/openai/deployments/{deployment}/chat/completions", chat_completions, methods=["POST"]
        )
        return app

    async def _answer(self, request: Request) -> JSONResponse:
        from fastapi.responses import JSONResponse

        try:
            body = json.loads(await request.body())
        except json.JSONDecodeError as e:
            return self._error(self._record({}, request), 400, f"request body is not JSON: {e}")
        record = self._record(body, request)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if self._failures:
            failure = self._failures.popleft()
            status, message = failure if isinstance(failure, tuple) else (failure, "")
            return self._error(record, status, message or f"scripted failure {status}")
        if not isinstance(body.get("messages"), list) or not body["messages"]:
            return self._error(record, 400, "'messages' must be a non-empty list")
        n = int(body.get("n") or 1) if self.honour_n else 1
        try:
            choices = self._choices(body, n)
        except LookupError as e:
            return self._error(record, 400, str(e))
        payload = self._completion(body, choices)
        record.status, record.response = 200, payload
        return JSONResponse(payload)

    def _record(self, body: dict[str, Any], request: Request) -> RecordedRequest:
        path = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        record = RecordedRequest(
            body=body, headers=dict(request.headers), path=path, received_at=time.monotonic()
        )
        self.requests.append(record)
        return record

    def _error(self, record: RecordedRequest, status: int, message: str) -> JSONResponse:
        from fastapi.responses import JSONResponse

        kind = {429: "rate_limit_exceeded", 400: "invalid_request_error"}.get(status, "api_error")
        payload = {"error": {"message": message, "type": kind, "param": None, "code": None}}
        headers = {}
        if status == 429:
            headers = {
                "retry-after": str(math.ceil(self.retry_after_s)),
                "retry-after-ms": str(int(self.retry_after_s * 1000)),
            }
        record.status, record.response = status, payload
        return JSONResponse(payload, status_code=status, headers=headers)

    def _choices(self, body: dict[str, Any], n: int) -> list[Reply]:
        if self._responder is not None:
            first = self._responder(body)
            if isinstance(first, list):
                return first
            return [first, *(_single(self._responder(body)) for _ in range(n - 1))]
        if self._replies is None:
            return ["ok"] * n
        if len(self._replies) < n:
            used = sum(len(r.response.get("choices", [])) for r in self.requests)
            raise LookupError(
                f"ScriptedOpenAIServer ran out of scripted replies ({used} used, "
                f"{len(self._replies)} left, {n} asked for): script more replies"
            )
        return [self._replies.popleft() for _ in range(n)]

    def _completion(self, body: dict[str, Any], choices: list[Reply]) -> dict[str, Any]:
        messages = body["messages"]
        prompt_tokens = sum(len(t.split()) for t in _texts(messages)) + IMAGE_TOKENS * sum(
            1
            for m in messages
            if isinstance(m.get("content"), list)
            for p in m["content"]
            if p.get("type") == "image_url"
        )
        out = []
        completion_tokens = 0
        for i, reply in enumerate(choices):
            message: dict[str, Any] = (
                {"role": "assistant", "content": reply}
                if isinstance(reply, str)
                else {"role": "assistant", "content": None, **reply}
            )
            completion_tokens += len((message.get("content") or "").split())
            finish = "tool_calls" if message.get("tool_calls") else "stop"
            out.append({"index": i, "message": message, "finish_reason": finish, "logprobs": None})
        return {
            "id": f"chatcmpl-{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model", self.model),
            "choices": out,
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }


def _single(reply: Reply | list[Reply]) -> Reply:
    if isinstance(reply, list):
        raise TypeError("a responder returns either one reply per call or the list of choices")
    return reply


def _texts(messages: list[dict[str, Any]]) -> Iterable[str]:
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            yield content
        elif isinstance(content, list):
            for part in content:
                if part.get("type") == "text":
                    yield str(part.get("text", ""))
