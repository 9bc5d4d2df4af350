"""Chat backend for any OpenAI-compatible endpoint: OpenAI, Azure, vLLM, SGLang, Ollama, TGI.

``openai:NAME`` talks to ``options.base_url`` (else ``$OPENAI_BASE_URL``, else OpenAI's API);
``azure:DEPLOYMENT`` talks to Azure OpenAI. Both use the official async ``openai`` client with
its own retries switched off: this module retries itself (exponential backoff with jitter,
``Retry-After`` honoured) so that every retry is counted in ``Usage.retries`` and a request that
is waiting to retry does not hold one of the ``options.concurrency`` slots (a command's
``--concurrency`` unless the backend section sets its own).

Completions are the assistant's text plus, when the server answers with native tool calls
(requests that carry ``tools``), those calls in ``Completion.tool_calls``. The agent's action
formats read them: the ``tools`` format executes them, the ``json`` format reads a call as its
``Action:`` line.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import math
import os
import random
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import replace
from typing import Any
from urllib.parse import urlsplit

import openai

from tracetune.models.base import (
    BackendError,
    ChatMessage,
    ChatModel,
    Completion,
    Generation,
    ModelOptions,
    Sampling,
    cache_key,
    data_url,
    register_backend,
)
from tracetune.schema import Usage

logger = logging.getLogger(__name__)

OPENAI_API_URL = "https://api.openai.com/v1"
# Servers such as vLLM and Ollama accept any key, but the client refuses to start without one.
PLACEHOLDER_API_KEY = "not-needed"

# USD per million (prompt, completion) tokens: OpenAI's list prices for the standard tier
# (2025). Dated snapshots ("gpt-4o-2024-08-06") use their family's price. Anything else costs
# 0 unless options.price_input_per_mtok / price_output_per_mtok say otherwise.
PRICES_PER_MTOK: dict[str, tuple[float, float]] = {
    "gpt-4o": (2.50, 10.00),
    "gpt-4o-mini": (0.15, 0.60),
    "gpt-4.1": (2.00, 8.00),
    "gpt-4.1-mini": (0.40, 1.60),
    "gpt-4.1-nano": (0.10, 0.40),
    "gpt-5": (1.25, 10.00),
    "gpt-5-mini": (0.25, 2.00),
    "gpt-5-nano": (0.05, 0.40),
    "o3": (2.00, 8.00),
    "o3-mini": (1.10, 4.40),
    "o4-mini": (1.10, 4.40),
}


def builtin_price(model: str) -> tuple[float, float] | None:
    """The built-in (input, output) USD per million tokens for ``model``, if known."""
    best = max(
        (k for k in PRICES_PER_MTOK if model == k or model.startswith(k + "-2")),
        key=len,
        default=None,
    )
    return PRICES_PER_MTOK[best] if best else None


_CLOSED = object()
# Connections per HTTP client (see OpenAIChatModel._shard).
SHARD_CONNECTIONS = 32


def is_retryable_status(status: int) -> bool:
    # 408 is the server timing the request out: a timeout like any other.
    return status in (408, 429) or status >= 500


class OpenAIChatModel(ChatModel):
    """A chat model behind an OpenAI-compatible Chat Completions endpoint.

    Build it with ``load_model("openai:gpt-4o-mini")`` (or ``"openai:NAME"`` with
    ``base_url=...`` for vLLM, SGLang, Ollama or TGI). Set ``model.cache`` to a
    :class:`tracetune.store.RunState` to answer repeated calls from its response cache.
    """

    # Backoff schedule when the server gives no Retry-After: base * 2**attempt seconds,
    # capped, times a random factor in [0.5, 1] so that many clients do not retry in step.
    retry_base_s: float = 0.5
    retry_max_s: float = 30.0
    # A Retry-After longer than this is the server's problem, not a wait worth honouring.
    retry_after_cap_s: float = 120.0

    def __init__(
        self,
        name: str,
        options: ModelOptions,
        make_client: Callable[..., openai.AsyncOpenAI],
        endpoint: str,
        *,
        openai_api: bool = False,
    ) -> None:
        super().__init__()
        if not name:
            raise BackendError("empty model name: write e.g. 'openai:gpt-4o-mini'")
        self.name = name
        self.options = options
        self.endpoint = endpoint
        self._openai_api = openai_api
        self._make_client = make_client
        # Built now so configuration errors surface before any request; rebuilt when used
        # from another event loop (connections and semaphores belong to one loop).
        # Requests are spread over several clients of at most SHARD_CONNECTIONS connections
        # each: httpx's pool checks every idle connection of its pool on each request, so one
        # pool of hundreds costs O(connections) per request (most of the client's CPU at 256
        # in flight, bench/scale.py). Shards beyond the first are opened as load needs them.
        self._shards = max(1, math.ceil(options.requests_in_flight / SHARD_CONNECTIONS))
        self._shard_connections = math.ceil(options.requests_in_flight / self._shards) + 4
        self._client: openai.AsyncOpenAI = self._new_client()
        self._clients = [self._client]
        self._busy = [0]  # requests in flight on each client
        self._loop: object = None  # the event loop the client's connections belong to
        self._semaphore = asyncio.Semaphore(options.requests_in_flight)
        self._warned_identical = False
        self._identical_pairs = 0
        self._samples_seen: dict[str, tuple[int | None, str]] = {}
        price = builtin_price(name) or (0.0, 0.0)
        self.price_input_per_mtok = (
            options.price_input_per_mtok if options.price_input_per_mtok is not None else price[0]
        )
        self.price_output_per_mtok = (
            options.price_output_per_mtok if options.price_output_per_mtok is not None else price[1]
        )

    def __repr__(self) -> str:
        return f"OpenAIChatModel({self.name!r}, endpoint={self.endpoint!r})"

    # -- the ChatModel interface ------------------------------------------------------
    async def generate(
        self,
        messages: list[ChatMessage],
        *,
        n: int = 1,
        sampling: Sampling = Sampling(),  # noqa: B008  (frozen: safe to share)
        tools: list[dict[str, Any]] | None = None,
    ) -> Generation:
        if n < 1:
            raise BackendError(f"n must be >= 1, got {n}")
        start = time.perf_counter()
        key = None
        if self.cache is not None:
            key = cache_key(self.name, self.endpoint, messages, n, sampling, tools)
        if (hit := await self.cached(key)) is not None:
            hit.latency_s = time.perf_counter() - start
            return hit

        params = self._params(to_openai_messages(messages), sampling, tools)
        completions: list[Completion] = []
        prompt_tokens = completion_tokens = calls = retries = 0

        def take(response: dict[str, Any], attempts: int) -> None:
            nonlocal prompt_tokens, completion_tokens, calls, retries
            choices = response.get("choices")
            if not choices or not isinstance(choices, list):
                raise BackendError(f"{self.endpoint} returned no choices for model {self.name!r}")
            # Cut at the caller's stop strings here too: the server was not sent them
            # (options.stop: none) or may ignore them.
            completions.extend(_cut_at_stop(_completion(c), sampling.stop) for c in choices)
            usage = response.get("usage") or {}
            prompt_tokens += usage.get("prompt_tokens") or 0
            completion_tokens += usage.get("completion_tokens") or 0
            calls += 1
            retries += attempts

        take(*await self._request({**params, "n": n} if n > 1 else params))
        # Servers that ignore n (Ollama) or cap it return fewer choices: ask again, all at
        # once, varying the seed so the extra samples are not copies of each other.
        rounds = 0
        while len(completions) < n:
            rounds += 1
            if rounds > n:
                raise BackendError(
                    f"{self.endpoint} keeps returning fewer than n={n} choices for {self.name!r}"
                )
            per_request = max(1, len(completions) // calls)
            missing = n - len(completions)
            extra = []
            for i in range(math.ceil(missing / per_request)):
                p = dict(params)
                if missing > 1:
                    p["n"] = missing
                if sampling.seed is not None:
                    p["seed"] = sampling.seed + calls + i
                extra.append(asyncio.ensure_future(self._request(p)))
            try:
                results = await asyncio.gather(*extra)
            except BaseException:
                for task in extra:  # one failed for good: the others are wasted spend
                    task.cancel()
                raise
            for response, attempts in results:
                take(response, attempts)
        completions = completions[:n]
        if rounds and n > 1:
            self._check_varied(sampling, [c.text for c in completions], seed_varied=True)
        elif sampling.temperature > 0:
            self._check_varied(sampling, [c.text for c in completions], messages=messages)

        await self.store(key, completions)
        cost = (
            prompt_tokens * self.price_input_per_mtok
            + completion_tokens * self.price_output_per_mtok
        ) / 1e6
        usage = Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            cost_usd=cost,
            calls=calls,
            retries=retries,
        )
        return Generation(completions, usage=usage, latency_s=time.perf_counter() - start)

    async def aclose(self) -> None:
        # Connections opened under an event loop that has since finished went with it.
        if self._loop is None or self._loop is asyncio.get_running_loop():
            for client in self._clients:
                await client.close()
        self._loop = _CLOSED  # a later call builds a fresh client

    # -- requests ------------------------------------------------------------------------
    def _params(
        self,
        messages: list[dict[str, Any]],
        sampling: Sampling,
        tools: list[dict[str, Any]] | None,
    ) -> dict[str, Any]:
        params: dict[str, Any] = {
            "model": self.name,
            "messages": messages,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
        }
        # OpenAI deprecated max_tokens (its reasoning models reject it); most other servers
        # only know max_tokens.
        params["max_completion_tokens" if self._openai_api else "max_tokens"] = sampling.max_tokens
        if stop := self.options.stop_strings(sampling.stop):
            params["stop"] = list(stop)
        if sampling.seed is not None:
            params["seed"] = sampling.seed
        if tools:
            params["tools"] = tools
        return params

    def _check_varied(
        self,
        sampling: Sampling,
        texts: list[str],
        *,
        seed_varied: bool = False,
        messages: list[ChatMessage] | None = None,
    ) -> None:
        """Warn once when samples that should differ come back identical.

        A server that ignores ``n`` is re-asked with varied seeds; one that also ignores
        ``seed`` (e.g. ``transformers serve``) answers each re-ask with the same text at any
        temperature, so "n samples" are copies. Across calls, the same prompt sampled at
        temperature > 0 under different seeds that keeps coming back identical says the same.
        """
        if self._warned_identical or sampling.temperature <= 0:
            return
        identical = False
        if seed_varied:
            identical = len(texts) > 1 and len(set(texts)) == 1
        elif messages is not None and texts:
            unseeded = replace(sampling, seed=None)
            prompt = cache_key(self.name, self.endpoint, messages, 1, unseeded, None)
            seen = self._samples_seen.get(prompt)
            if seen is None:
                if len(self._samples_seen) >= 4096:  # bounded: the oldest prompt goes
                    self._samples_seen.pop(next(iter(self._samples_seen)))
                self._samples_seen[prompt] = (sampling.seed, texts[0])
            elif seen[0] != sampling.seed and seen[1] == texts[0]:
                self._identical_pairs += 1
                identical = self._identical_pairs >= 2  # one coincidence is not a pattern
        if identical:
            self._warned_identical = True
            logger.warning(
                "%s seems to ignore `n` and `seed`: samples asked at temperature %s with "
                "different seeds came back identical, so several samples of one prompt are "
                "copies. Use a server that honours seed (vLLM, SGLang) or n, or sample once.",
                self.endpoint,
                sampling.temperature,
            )

    def _new_client(self) -> openai.AsyncOpenAI:
        if self._shards == 1:
            return self._make_client()
        return self._make_client(connections=self._shard_connections)

    @contextlib.asynccontextmanager
    async def _shard(self) -> AsyncIterator[openai.AsyncOpenAI]:
        """The least busy client (a new one while every open one is full)."""
        i = min(range(len(self._clients)), key=self._busy.__getitem__)
        if self._busy[i] >= self._shard_connections - 4 and len(self._clients) < self._shards:
            self._clients.append(self._new_client())
            self._busy.append(0)
            i = len(self._clients) - 1
        self._busy[i] += 1
        try:
            yield self._clients[i]
        finally:
            self._busy[i] -= 1

    def _bind_loop(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is loop:
            return
        if self._loop is not None:
            # Closed, or the previous loop is gone (e.g. a second asyncio.run): its pooled
            # connections can be neither reused nor closed from here.
            self._client = self._new_client()
            self._clients, self._busy = [self._client], [0]
            self._semaphore = asyncio.Semaphore(self.options.requests_in_flight)
        self._loop = loop

    async def _request(self, params: dict[str, Any]) -> tuple[dict[str, Any], int]:
        """One completion request with retries; returns the JSON response and retries spent."""
        self._bind_loop()
        attempt = 0
        while True:
            try:
                async with self._semaphore, self._shard() as client:
                    # post() rather than chat.completions.create(): create() walks the params
                    # through its TypedDict transform (~0.4 ms per call on a 2-message chat,
                    # more on long ones) and builds pydantic models of the response (~0.15 ms),
                    # pure overhead on JSON we build and read ourselves, and the bottleneck at
                    # 64 calls in flight (bench/backend_throughput.py). The client still does
                    # auth, URLs (Azure deployments too), timeouts and errors.
                    response = await client.post("/chat/completions", body=params, cast_to=object)
                if not isinstance(response, dict):
                    raise BackendError(
                        f"{self.endpoint} did not answer with a JSON chat completion for "
                        f"{self.name!r}: {str(response)[:200]!r}"
                    )
                return response, attempt
            except openai.APIStatusError as e:
                if not is_retryable_status(e.status_code):
                    raise BackendError(self._status_message(e)) from None
                reason = f"HTTP {e.status_code}: {_server_message(e)}"
                delay = _retry_after(e.response.headers)
            except openai.APIConnectionError as e:  # includes APITimeoutError
                reason = f"{type(e).__name__}: {e}"
                if _cut_off(e):
                    reason = f"the endpoint's reply was cut off before its end ({reason})"
                delay = None
            except json.JSONDecodeError as e:
                # A 2xx whose JSON ends early: the server or a proxy dropped the rest.
                reason = (
                    f"the endpoint's reply was cut off or is not JSON ({e.msg} at character "
                    f"{e.pos} of {len(e.doc)})"
                )
                delay = None
            if attempt >= self.options.max_retries:
                raise BackendError(
                    f"{self.endpoint} failed for model {self.name!r} after "
                    f"{attempt} retries; last error: {reason}"
                ) from None
            if delay is None:
                delay = min(self.retry_max_s, self.retry_base_s * 2**attempt)
                delay *= random.uniform(0.5, 1.0)
            delay = min(delay, self.retry_after_cap_s)
            attempt += 1
            logger.info(
                "%s %s: retry %d/%d in %.2fs",
                self.name,
                reason,
                attempt,
                self.options.max_retries,
                delay,
            )
            await asyncio.sleep(delay)

    def _status_message(self, e: openai.APIStatusError) -> str:
        hint = {
            401: f" (check the API key in ${self.options.api_key_env})",
            403: f" (check the API key in ${self.options.api_key_env} and its permissions)",
            404: " (check the model name and the base_url)",
        }.get(e.status_code, "")
        return (
            f"{self.endpoint} answered HTTP {e.status_code} for model {self.name!r}: "
            f"{_server_message(e)}{hint}"
        )


# -- message conversion ---------------------------------------------------------------------
def to_openai_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Our transformers-style messages as Chat Completions messages.

    Image parts (PIL image, bytes or path) become base64 ``image_url`` data URLs; string
    contents stay strings. Assistant tool calls get ids and JSON-string arguments, and tool
    results without a ``tool_call_id`` are paired with the calls in order, as the API needs.
    """
    out: list[dict[str, Any]] = []
    pending_ids: deque[str] = deque()
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message:
            raise BackendError(f"message {i} is not a dict with a 'role': {message!r:.200}")
        converted = dict(message)
        content = message.get("content")
        if isinstance(content, list):
            converted["content"] = [_content_part(part, i) for part in content]
        elif content is not None and not isinstance(content, str):
            raise BackendError(
                f"message {i}: content must be a string or a list of parts, "
                f"got {type(content).__name__}"
            )
        if message.get("tool_calls"):
            calls = []
            for j, call in enumerate(message["tool_calls"]):
                function = dict(call.get("function", call))
                if not isinstance(function.get("arguments"), str):
                    function["arguments"] = json.dumps(function.get("arguments") or {})
                call_id = call.get("id") or f"call_{i}_{j}"
                pending_ids.append(call_id)
                calls.append({"id": call_id, "type": "function", "function": function})
            converted["tool_calls"] = calls
        if message["role"] == "tool" and "tool_call_id" not in converted and pending_ids:
            converted["tool_call_id"] = pending_ids.popleft()
        out.append(converted)
    return out


def _content_part(part: Any, index: int) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, Mapping) else None
    if kind == "text":
        return {"type": "text", "text": str(part.get("text", ""))}
    if kind == "image_url":
        return dict(part)
    if kind == "image":
        image = part.get("image", part.get("url", part.get("path")))
        if isinstance(image, str) and image.startswith(("http://", "https://", "data:")):
            return {"type": "image_url", "image_url": {"url": image}}
        try:
            return {"type": "image_url", "image_url": {"url": data_url(image)}}
        except (OSError, TypeError) as e:
            raise BackendError(f"message {index}: cannot read image part: {e}") from e
    raise BackendError(
        f"message {index}: unsupported content part {part!r:.120}; "
        "use {'type': 'text', 'text': ...} or {'type': 'image', 'image': PIL|bytes|path}"
    )


def _cut_off(error: BaseException) -> bool:
    """Whether a connection error is a reply that ended early (a body shorter than announced,
    a connection closed mid-reply)."""
    seen: BaseException | None = error
    while seen is not None:
        if type(seen).__name__ in ("RemoteProtocolError", "ReadError", "IncompleteRead"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _cut_at_stop(completion: Completion, stop: tuple[str, ...]) -> Completion:
    cut = min((i for s in stop if s and (i := completion.text.find(s)) >= 0), default=-1)
    if cut < 0:
        return completion
    return Completion(completion.text[:cut], "stop")


def _completion(choice: Mapping[str, Any]) -> Completion:
    message = choice.get("message") or {}
    text = message.get("content") or ""
    calls = []
    for i, call in enumerate(message.get("tool_calls") or []):
        function = call.get("function") or {}
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except (json.JSONDecodeError, TypeError):
            arguments = function.get("arguments")  # what the model wrote; the parser reports it
        calls.append(
            {
                "id": call.get("id") or f"call_{i}",
                "name": function.get("name"),
                "arguments": arguments,
            }
        )
    return Completion(text, choice.get("finish_reason"), calls or None)


def _server_message(e: openai.APIStatusError) -> str:
    body = e.body
    if isinstance(body, Mapping):
        error = body.get("error", body)
        if isinstance(error, Mapping) and error.get("message"):
            return str(error["message"])
        if isinstance(error, str):
            return error
    return e.message


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds the server asked us to wait (``retry-after-ms`` or ``Retry-After``)."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# -- construction ---------------------------------------------------------------------------
def _http_client(options: ModelOptions, connections: int | None = None) -> Any:
    # openai's default pool keeps only 100 idle connections; size it to the concurrency so
    # that at high concurrency every request reuses a warm connection instead of reconnecting.
    limits_type = type(openai.DEFAULT_CONNECTION_LIMITS)  # httpx.Limits or httpx2.Limits
    size = connections if connections is not None else options.requests_in_flight + 8
    limits = limits_type(max_connections=size, max_keepalive_connections=size)
    return openai.DefaultAsyncHttpxClient(limits=limits, timeout=options.timeout_s)


@register_backend("openai")
def openai_backend(name: str, options: ModelOptions) -> ChatModel:
    """``openai:NAME``: any OpenAI-compatible Chat Completions endpoint."""
    base_url = (options.base_url or os.environ.get("OPENAI_BASE_URL") or OPENAI_API_URL).rstrip("/")
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise BackendError(
            f"base_url {base_url!r} is not an http(s) URL; give the server's /v1 root, "
            "e.g. http://localhost:8000/v1"
        )
    openai_api = parts.hostname == "api.openai.com"
    if openai_api and not os.environ.get(options.api_key_env):
        raise BackendError(
            f"no API key for {base_url}: set the environment variable {options.api_key_env} "
            f"(export {options.api_key_env}=sk-...), or point base_url / OPENAI_BASE_URL at "
            "your own OpenAI-compatible server"
        )

    def make_client(connections: int | None = None) -> openai.AsyncOpenAI:
        # Read at each (re)build and handed to the client only: the key is never kept on the
        # model nor written to logs, caches or records.
        return openai.AsyncOpenAI(
            api_key=os.environ.get(options.api_key_env) or PLACEHOLDER_API_KEY,
            base_url=base_url,
            max_retries=0,
            timeout=options.timeout_s,
            http_client=_http_client(options, connections),
        )

    return OpenAIChatModel(name, options, make_client, base_url, openai_api=openai_api)


@register_backend("azure")
def azure_backend(name: str, options: ModelOptions) -> ChatModel:
    """``azure:DEPLOYMENT``: Azure OpenAI, configured by AZURE_OPENAI_ENDPOINT (or base_url),
    AZURE_OPENAI_API_KEY (or the variable named by api_key_env) and OPENAI_API_VERSION."""
    key_env = (
        "AZURE_OPENAI_API_KEY" if options.api_key_env == "OPENAI_API_KEY" else options.api_key_env
    )
    endpoint = (options.base_url or os.environ.get("AZURE_OPENAI_ENDPOINT") or "").rstrip("/")
    missing = [
        what
        for what, value in (
            ("AZURE_OPENAI_ENDPOINT (or base_url)", endpoint),
            (key_env, os.environ.get(key_env)),
            ("OPENAI_API_VERSION", os.environ.get("OPENAI_API_VERSION")),
        )
        if not value
    ]
    if missing:
        raise BackendError(
            f"azure:{name} needs {', '.join(missing)}; e.g. export "
            "AZURE_OPENAI_ENDPOINT=https://RESOURCE.openai.azure.com "
            "AZURE_OPENAI_API_KEY=... OPENAI_API_VERSION=2024-10-21"
        )

    def make_client(connections: int | None = None) -> openai.AsyncOpenAI:
        return openai.AsyncAzureOpenAI(
            azure_endpoint=endpoint,
            api_key=os.environ.get(key_env),
            api_version=os.environ.get("OPENAI_API_VERSION"),
            max_retries=0,
            timeout=options.timeout_s,
            http_client=_http_client(options, connections),
        )

    return OpenAIChatModel(name, options, make_client, f"{endpoint}/openai")


__all__ = [
    "OPENAI_API_URL",
    "PRICES_PER_MTOK",
    "OpenAIChatModel",
    "azure_backend",
    "builtin_price",
    "openai_backend",
    "to_openai_messages",
]
