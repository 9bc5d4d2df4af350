"""Dynamic batching: concurrent chat requests answered by one ``generate`` call per batch.

Requests are rendered to prompts by the caller and queued. One batcher task takes everything
waiting (after ``max_wait_s`` for stragglers to join), groups what can share a generation
config, and runs each group as one left-padded batch in a worker thread. While a batch runs,
new requests queue up and form the next batch, so throughput grows with the number of
requests in flight instead of serializing them behind a lock.

What can share one call: greedy requests with the same stop strings (greedy decoding does not
depend on the batch), and unseeded sampling requests with the same temperature, top_p and stop
strings. A seeded sampling request gets a batch of its own, so a seed gives the same samples
whatever else is in flight. ``max_tokens`` may differ within a batch: the batch runs to the
largest and each row is cut to its own request's limit.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tracetune.errors import ConfigError
from tracetune.models.base import Sampling
from tracetune.models.local import LocalVLM, cut_at_stop, token_id_set

EventSink = Callable[[int, str], None]
"""Called with (choice index, text delta) as streamed text becomes safe to send."""


@dataclass
class Choice:
    text: str
    finish_reason: str
    completion_tokens: int


@dataclass
class GenResult:
    choices: list[Choice]
    prompt_tokens: int


@dataclass
class GenRequest:
    """One rendered chat request waiting for its batch."""

    prompt: str
    images: list[Any]
    n: int
    sampling: Sampling
    on_delta: EventSink | None = None  # set for streaming requests
    holdback: tuple[str, ...] = ()  # markers whose text must not be streamed (tool calls)
    future: asyncio.Future[GenResult] | None = None
    loop: asyncio.AbstractEventLoop | None = None

    @property
    def greedy(self) -> bool:
        return self.sampling.temperature <= 0

    @property
    def rows(self) -> int:
        return 1 if self.greedy else self.n

    def group_key(self) -> tuple[Any, ...]:
        s = self.sampling
        if self.greedy:
            return ("greedy", s.stop)
        if s.seed is not None:
            return ("seeded", id(self))
        return ("sample", s.temperature, s.top_p, s.stop)


@dataclass
class BatchStats:
    """What the batcher did: how many generate calls, of how many requests and rows."""

    batches: int = 0
    requests: int = 0
    rows: int = 0
    max_batch_requests: int = 0
    generate_s: float = 0.0
    batch_requests: collections.Counter[int] = field(default_factory=collections.Counter)

    def as_dict(self) -> dict[str, Any]:
        return {
            "batches": self.batches,
            "requests": self.requests,
            "rows": self.rows,
            "max_batch_requests": self.max_batch_requests,
            "mean_batch_requests": self.requests / self.batches if self.batches else 0.0,
            "generate_s": round(self.generate_s, 4),
            "batch_requests_histogram": {str(k): v for k, v in sorted(self.batch_requests.items())},
        }


class BatchEngine:
    """Batches concurrent requests for one :class:`LocalVLM`.

    Args:
        model: The loaded model (with its adapter, if any).
        max_batch_rows: Most sequences in one ``generate`` call (a request with ``n`` samples
            counts ``n``; a request larger than this still runs, alone).
        max_wait_s: How long the batcher waits after the first request for others to join.
    """

    def __init__(self, model: LocalVLM, max_batch_rows: int = 32, max_wait_s: float = 0.002):
        if max_batch_rows < 1:
            raise ConfigError("max_batch_rows must be at least 1")
        self.model = model
        self.max_batch_rows = max_batch_rows
        self.max_wait_s = max_wait_s
        self.stats = BatchStats()
        self._queue: asyncio.Queue[GenRequest] | None = None
        self._task: asyncio.Task[None] | None = None
        self._lock = threading.Lock()

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run(), name="tracetune-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def submit(self, request: GenRequest) -> GenResult:
        if self._queue is None:
            raise RuntimeError("BatchEngine.start() was not awaited")
        loop = asyncio.get_running_loop()
        request.loop = loop
        request.future = loop.create_future()
        await self._queue.put(request)
        return await request.future

    # -- the batcher ----------------------------------------------------------------------
    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            pending = [await self._queue.get()]
            if self.max_wait_s > 0:
                await asyncio.sleep(self.max_wait_s)
            while not self._queue.empty():
                pending.append(self._queue.get_nowait())
            for batch in self._batches(pending):
                live = [r for r in batch if r.future is not None and not r.future.done()]
                if not live:
                    continue  # every client went away while waiting
                try:
                    results = await asyncio.to_thread(self._generate, live)
                except Exception as exc:  # the whole batch failed: tell each request why
                    for r in live:
                        if r.future is not None and not r.future.done():
                            r.future.set_exception(exc)
                    continue
                for r, res in zip(live, results, strict=True):
                    if r.future is not None and not r.future.done():
                        r.future.set_result(res)

    def _batches(self, pending: list[GenRequest]) -> list[list[GenRequest]]:
        groups: dict[tuple[Any, ...], list[GenRequest]] = {}
        for r in pending:
            groups.setdefault(r.group_key(), []).append(r)
        batches: list[list[GenRequest]] = []
        for group in groups.values():
            batch: list[GenRequest] = []
            rows = 0
            for r in group:
                if batch and rows + r.rows > self.max_batch_rows:
                    batches.append(batch)
                    batch, rows = [], 0
                batch.append(r)
                rows += r.rows
            batches.append(batch)
        return batches

    # -- one generate call (worker thread) --------------------------------------------------
    def _generate(self, batch: list[GenRequest]) -> list[GenResult]:
        import torch
        from transformers import set_seed

        model = self.model
        if model.model is None:
            raise RuntimeError("the model was closed")
        rows = [(r, i) for r in batch for i in range(r.rows)]
        prompts = [r.prompt for r, _ in rows]
        images = [img for r, _ in rows for img in r.images]
        first = batch[0].sampling
        sampling = Sampling(
            temperature=first.temperature,
            top_p=first.top_p,
            max_tokens=max(r.sampling.max_tokens for r in batch),
            stop=first.stop,
            seed=first.seed,
        )
        tokenizer = model.tokenizer
        bos = getattr(tokenizer, "bos_token", None)
        config = model._generation_config(sampling, 1)
        eos_ids = token_id_set(config.eos_token_id)
        pad = config.pad_token_id
        streamer = (
            _BatchStreamer(rows, tokenizer, eos_ids) if any(r.on_delta for r in batch) else None
        )
        started = time.perf_counter()
        # One model, one generate at a time; the lock also guards the tokenizer's state.
        with self._lock:
            inputs = model.processor(
                text=prompts,
                images=images or None,
                return_tensors="pt",
                padding=True,
                padding_side="left",
                add_special_tokens=not (bos and prompts[0].startswith(bos)),
            ).to(model.device)
            if "pixel_values" in inputs and model.dtype != torch.float32:
                inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            if sampling.seed is not None and sampling.temperature > 0:
                set_seed(sampling.seed)
            with torch.inference_mode():
                out = model.model.generate(
                    **inputs,
                    generation_config=config,
                    tokenizer=tokenizer if sampling.stop else None,
                    streamer=streamer,
                )
        elapsed = time.perf_counter() - started
        prompt_len = int(inputs["input_ids"].shape[1])
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        new_tokens = out[:, prompt_len:].tolist()

        results: dict[int, GenResult] = {}
        for row_index, ((request, _), row) in enumerate(zip(rows, new_tokens, strict=True)):
            choice = _finish_row(row, request.sampling, eos_ids, pad, tokenizer)
            res = results.setdefault(id(request), GenResult([], int(prompt_tokens[row_index])))
            res.choices.append(choice)
        ordered = []
        for r in batch:
            res = results[id(r)]
            if r.greedy and r.n > 1:  # greedy has one answer: the n choices are copies
                res.choices = [res.choices[0]] * r.n
            ordered.append(res)
        with self._lock:
            s = self.stats
            s.batches += 1
            s.requests += len(batch)
            s.rows += len(rows)
            s.max_batch_requests = max(s.max_batch_requests, len(batch))
            s.batch_requests[len(batch)] += 1
            s.generate_s += elapsed
        return ordered


def _finish_row(
    row: list[int], sampling: Sampling, eos_ids: set[int], pad: int | None, tokenizer: Any
) -> Choice:
    length = next((i + 1 for i, t in enumerate(row) if t in eos_ids), len(row))
    while length and row[length - 1] == pad and pad not in eos_ids:
        length -= 1  # rows that stopped early are padded up to the longest one
    capped = length > sampling.max_tokens
    length = min(length, sampling.max_tokens)
    text = tokenizer.decode(row[:length], skip_special_tokens=True)
    text, stopped = cut_at_stop(text, sampling.stop)
    hit_eos = not capped and length > 0 and row[length - 1] in eos_ids
    finish = "stop" if stopped or hit_eos else "length"
    return Choice(text, finish, length)


def safe_prefix_len(text: str, markers: tuple[str, ...]) -> int:
    """How much of ``text`` can be streamed without sending part of a marker (or past one)."""
    safe = len(text)
    for marker in markers:
        if not marker:
            continue
        at = text.find(marker)
        if at >= 0:
            safe = min(safe, at)
            continue
        for k in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:k]):
                safe = min(safe, len(text) - k)
                break
    while safe and text[safe - 1] == "\ufffd":  # a multi-byte character not complete yet
        safe -= 1
    return safe


class _BatchStreamer:
    """A transformers streamer for a whole batch: sends each row's new text as it is safe.

    Text that may still turn out to be a stop string or a tool call is held back; the caller
    sends the rest of the final text once the request's result is in.
    """

    def __init__(
        self, rows: list[tuple[GenRequest, int]], tokenizer: Any, eos_ids: set[int]
    ) -> None:
        self.rows = rows
        self.tokenizer = tokenizer
        self.eos_ids = eos_ids
        self.tokens: list[list[int]] = [[] for _ in rows]
        self.done = [r.on_delta is None for r, _ in rows]
        self.sent = [0] * len(rows)
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt ids
            self._prompt_seen = True
            return
        ids = value.reshape(-1).tolist()
        for i, token in enumerate(ids):
            if self.done[i]:
                continue
            request, choice = self.rows[i]
            if token in self.eos_ids:
                self.done[i] = True
                continue
            self.tokens[i].append(token)
            if len(self.tokens[i]) >= request.sampling.max_tokens:
                self.done[i] = True
            text = self.tokenizer.decode(self.tokens[i], skip_special_tokens=True)
            markers = request.sampling.stop + request.holdback
            safe = safe_prefix_len(text, markers)
            if safe > self.sent[i]:
                self._send(request, choice, text[self.sent[i] : safe])
                self.sent[i] = safe

    def end(self) -> None:
        pass

    @staticmethod
    def _send(request: GenRequest, choice: int, delta: str) -> None:
        if request.on_delta is not None and request.loop is not None:
            request.loop.call_soon_threadsafe(request.on_delta, choice, delta)
