"""One interface for every chat backend: messages with text and images in, n completions out.

Messages use the shape transformers chat templates and TRL use::

    {"role": "user", "content": [{"type": "image", "image": <PIL.Image | bytes | path>},
                                 {"type": "text", "text": "What is the total?"}]}

``content`` may also be a plain string. Backends are registered by scheme and built from a
spec string: ``openai:gpt-4o-mini``, ``local:/path/or/hub-id``.
"""

from __future__ import annotations

import abc
import asyncio
import base64
import hashlib
import io
import json
import os
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tracetune.errors import TracetuneError
from tracetune.schema import Usage

ChatMessage = dict[str, Any]


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters shared by every backend."""

    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 512
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def for_sample(self, index: int) -> Sampling:
        """The sampling of the ``index``-th of several samples of one prompt.

        Sample 0 is these parameters unchanged; later ones get their own seed, so they are
        neither answered from the response cache as copies of sample 0 nor (where the
        backend honours seeds) drawn identically.
        """
        if index == 0:
            return self
        return replace(self, seed=(self.seed or 0) + index)

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies (~50 us), and this runs on every call.
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["stop"] = list(self.stop)
        return d


@dataclass
class Completion:
    """One completion: its text and, when the endpoint answered with native tool calls,
    those calls as ``{"id", "name", "arguments"}`` (arguments parsed from JSON when they
    parse, else the string the model wrote)."""

    text: str
    finish_reason: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


@dataclass
class Generation:
    """The result of one ``generate`` call: n completions and what they cost."""

    completions: list[Completion]
    usage: Usage = field(default_factory=Usage)
    latency_s: float = 0.0
    cached: bool = False

    @property
    def text(self) -> str:
        return self.completions[0].text if self.completions else ""

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.completions]


class BackendError(TracetuneError, RuntimeError):
    """A backend failed for good (after retries), or was configured wrongly."""


fresh_samples: ContextVar[bool] = ContextVar("fresh_samples", default=False)
"""True while the calls made must be answered by the model, not the response cache (a
retried drop: its cached reply is what was dropped). The new answer replaces the cached one."""


# Requests in flight for a backend loaded outside any stage, with no concurrency set.
DEFAULT_REQUESTS_IN_FLIGHT = 16


class ModelOptions(BaseModel):
    """Options any backend may use; each ignores what does not apply to it."""

    model_config = ConfigDict(extra="forbid")

    base_url: str | None = Field(
        default=None, description="OpenAI-compatible endpoint; default $OPENAI_BASE_URL."
    )
    api_key_env: str = Field(
        default="OPENAI_API_KEY", description="Environment variable holding the API key."
    )
    concurrency: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Max requests in flight. Unset: the stage's --concurrency when a command loads "
            f"the model, {DEFAULT_REQUESTS_IN_FLIGHT} when the model is used on its own."
        ),
    )
    max_retries: int = Field(default=6, ge=0, description="Retries on 429/5xx/timeouts.")
    timeout_s: float = Field(default=120.0, gt=0, description="Per-request timeout.")
    price_input_per_mtok: float | None = Field(
        default=None, description="USD per million prompt tokens (overrides the built-in table)."
    )
    price_output_per_mtok: float | None = Field(
        default=None, description="USD per million completion tokens."
    )
    adapter: str | None = Field(default=None, description="LoRA adapter directory (local:).")
    device: str | None = Field(default=None, description="torch device for local: (auto).")
    dtype: str = Field(default="auto", description="torch dtype for local: (auto/bf16/fp32).")
    trust_remote_code: bool = Field(
        default=False, description="Allow a hub model's own code to run (local:; opt-in)."
    )
    max_pixels: int | None = Field(
        default=None, description="Cap on image pixels for local: processors (e.g. 1003520)."
    )
    stop: Literal["default", "none"] | list[str] = Field(
        default="default",
        description="Stop strings sent to the server: default (the caller's, e.g. the agent's "
        "'\\nObservation:'), none (send no `stop`, for servers that reject it: replies are "
        "cut at the caller's stop strings on arrival instead), or a list to send instead.",
    )

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_none(cls, value: Any) -> Any:
        # YAML `stop: none`, `stop: null`, `stop: false` and `stop: []` all mean "send none".
        if (
            value is None
            or value is False
            or value == []
            or (isinstance(value, str) and value.strip().lower() in ("none", "null", "off", ""))
        ):
            return "none"
        if isinstance(value, str) and value != "default":
            return [value]
        return value

    def stop_strings(self, requested: tuple[str, ...]) -> tuple[str, ...]:
        """The stop strings to send for a request whose caller asked for ``requested``."""
        if self.stop == "default":
            return requested
        if self.stop == "none":
            return ()
        return tuple(self.stop)

    @property
    def requests_in_flight(self) -> int:
        """The bound on concurrent requests: ``concurrency``, or the standalone default."""
        return self.concurrency if self.concurrency is not None else DEFAULT_REQUESTS_IN_FLIGHT

    def for_stage(self, concurrency: int) -> ModelOptions:
        """These options for a model that a stage with ``concurrency`` calls: the stage's
        setting becomes the requests in flight, unless ``concurrency`` was set here."""
        if self.concurrency is not None:
            return self
        return self.model_copy(update={"concurrency": concurrency})


class ChatModel(abc.ABC):
    """A chat backend. ``generate`` is async so many episodes can share one backend."""

    spec: str = ""

    def __init__(self) -> None:
        self.cache: Any = None  # a tracetune.store.RunState, set by the runner

    @abc.abstractmethod
    async def generate(
        self,
        messages: list[ChatMessage],
        *,
        n: int = 1,
        sampling: Sampling = Sampling(),
        tools: list[dict[str, Any]] | None = None,
    ) -> Generation:
        """Return ``n`` completions of the conversation."""

    async def cached(self, key: str | None) -> Generation | None:
        """The cached answer for ``key`` (from ``cache_key``), or None; no cache, no hit."""
        if key is None or self.cache is None or fresh_samples.get():
            return None
        if getattr(self.cache, "fast_cache", False):  # a lookup cheaper than a thread hop
            hit = self.cache.cache_get(key)
        else:
            hit = await asyncio.to_thread(self.cache.cache_get, key)
        if hit is None:
            return None
        return Generation(
            [
                Completion(c["text"], c.get("finish_reason"), c.get("tool_calls"))
                for c in hit["completions"]
            ],
            usage=Usage(calls=1, cached_calls=1),
            cached=True,
        )

    async def store(self, key: str | None, completions: list[Completion]) -> None:
        """Cache successful completions under ``key`` so a rerun costs nothing."""
        if key is None or self.cache is None:
            return
        value = {
            "completions": [
                {"text": c.text, "finish_reason": c.finish_reason}
                | ({"tool_calls": c.tool_calls} if c.tool_calls else {})
                for c in completions
            ]
        }
        if getattr(self.cache, "fast_cache", False):
            self.cache.cache_put(key, value)
        else:
            await asyncio.to_thread(self.cache.cache_put, key, value)

    async def aclose(self) -> None:  # noqa: B027  (optional hook; most backends hold nothing)
        """Release connections, models or servers."""


# -- helpers for messages ----------------------------------------------------------------
def text_message(role: str, text: str, images: list[Any] | None = None) -> ChatMessage:
    """A message with images first, then text (the order VLM chat templates expect)."""
    if not images:
        return {"role": role, "content": text}
    parts: list[dict[str, Any]] = [{"type": "image", "image": img} for img in images]
    parts.append({"type": "text", "text": text})
    return {"role": role, "content": parts}


def image_bytes(image: Any) -> bytes:
    """PNG/JPEG bytes of an image given as PIL image, bytes, or a path."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, str | os.PathLike):
        return Path(image).read_bytes()
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return buf.getvalue()
    raise TypeError(f"unsupported image type {type(image).__name__}")


def load_image(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    with Image.open(io.BytesIO(image_bytes(image))) as img:
        img.load()
        return img.convert("RGB")


def data_url(image: Any) -> str:
    data = image_bytes(image)
    mime = "image/jpeg" if data[:3] == b"\xff\xd8\xff" else "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def message_images(messages: list[ChatMessage]) -> list[Any]:
    return [
        p["image"]
        for m in messages
        if isinstance(m.get("content"), list)
        for p in m["content"]
        if p.get("type") == "image"
    ]


def canonical_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Messages with images replaced by their SHA-256, for cache keys."""
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            content = [
                {"type": "image", "sha256": hashlib.sha256(image_bytes(p["image"])).hexdigest()}
                if p.get("type") == "image"
                else p
                for p in content
            ]
        out.append({**m, "content": content})
    return out


def cache_key(
    model: str,
    endpoint: str,
    messages: list[ChatMessage],
    n: int,
    sampling: Sampling,
    tools: list[dict[str, Any]] | None,
) -> str:
    """Key of a response in the cache: (model, endpoint, messages, sampling, tools)."""
    payload = {
        "model": model,
        "endpoint": endpoint,
        "messages": canonical_messages(messages),
        "n": n,
        "sampling": sampling.to_dict(),
        "tools": tools,
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


# -- registry of backends ------------------------------------------------------------------
BackendFactory = Callable[[str, ModelOptions], ChatModel]
_BACKENDS: dict[str, BackendFactory] = {}


def register_backend(scheme: str) -> Callable[[BackendFactory], BackendFactory]:
    def wrap(factory: BackendFactory) -> BackendFactory:
        _BACKENDS[scheme] = factory
        return factory

    return wrap


def load_model(spec: str, options: ModelOptions | None = None, **overrides: Any) -> ChatModel:
    """Build a backend from ``scheme:name`` (``openai:gpt-4o-mini``, ``local:DIR``)."""
    import tracetune.models.local  # noqa: F401  (registers 'local')
    import tracetune.models.openai_backend  # noqa: F401  (registers 'openai')

    if ":" not in spec:
        raise BackendError(
            f"model spec {spec!r} has no backend; write 'openai:{spec}' for an "
            f"OpenAI-compatible endpoint or 'local:{spec}' for a transformers model"
        )
    scheme, name = spec.split(":", 1)
    if scheme not in _BACKENDS:
        raise BackendError(
            f"unknown backend {scheme!r} in {spec!r}; known: {', '.join(sorted(_BACKENDS))}"
        )
    opts = (options or ModelOptions()).model_copy(update=overrides)
    model = _BACKENDS[scheme](name, opts)
    model.spec = spec
    return model
