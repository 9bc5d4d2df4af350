"""Throughput of the ``openai:`` backend against a loopback server with a fixed latency.

A ScriptedOpenAIServer answers every request after ``--latency`` seconds. For each concurrency
``c``, ``c`` closed-loop workers (each sends its next request as soon as the previous one
returns) share one ``OpenAIChatModel`` built with ``concurrency=c``. A perfect client would
complete ``c / latency`` calls per second; efficiency = achieved / ideal, and per-call overhead
= mean call latency seen by the caller - the server's latency (client, HTTP and server time).
CPU per call is this process's CPU time over the calls made: the client's cost of one call.

Completions are counted in a fixed window, after a warm-up call per worker that opens the
connection pool. Two ways to start the workers:

* ``steady``: workers start spread over one latency period and the window opens after one more
  period, so it measures sustained throughput when calls are not in lock-step (as in a real run,
  where every episode's latency differs).
* ``burst``: all workers start at the same instant. With a server whose latency never varies
  they stay in lock-step: every round, ``c`` responses arrive together and the client's
  per-call CPU time queues up behind the whole burst. The worst case.

    python bench/backend_throughput.py                          # both modes, c = 1, 16, 64
    python bench/backend_throughput.py --latency 0.5 --concurrency 1 64 128 --mode burst

Prints markdown tables. The server runs in a child process so its request handling does not
compete with the backend for this process's GIL (a real server runs elsewhere);
``--in-process`` serves from a thread of this process, as unit tests do.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import openai

from tracetune.models import load_model
from tracetune.models.base import ChatModel, Sampling
from tracetune.testing import ScriptedOpenAIServer

MESSAGES = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is the total on this receipt?"},
]
SAMPLING = Sampling(max_tokens=16)


@dataclass
class Row:
    mode: str
    concurrency: int
    completions: int
    achieved: float  # completions per second
    latencies_s: list[float]
    cpu_per_call_s: float  # CPU time of this process per call while the workers ran


async def run_level(
    model: ChatModel, concurrency: int, latency_s: float, window_s: float, mode: str
) -> Row:
    # One call per worker first, so the window sees warm connections, not TCP handshakes.
    await asyncio.gather(*(model.generate(MESSAGES, sampling=SAMPLING) for _ in range(concurrency)))
    # Per worker: (start, end, latency the model reported) of each call.
    calls: list[list[tuple[float, float, float]]] = [[] for _ in range(concurrency)]
    stop = asyncio.Event()
    start = time.perf_counter()
    cpu_start = time.process_time()

    async def worker(i: int) -> None:
        if mode == "steady":
            await asyncio.sleep(i * latency_s / concurrency)
        while not stop.is_set():
            t = time.perf_counter()
            generation = await model.generate(MESSAGES, sampling=SAMPLING)
            calls[i].append((t, time.perf_counter(), generation.latency_s))

    tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
    opens = start + (2 * latency_s if mode == "steady" else 0.0)
    closes = opens + window_s
    await asyncio.sleep(closes - time.perf_counter())
    stop.set()
    await asyncio.gather(*tasks)
    cpu_per_call = (time.process_time() - cpu_start) / max(1, sum(map(len, calls)))
    # A closed-loop worker's rate is its calls over the time they spanned; counting the
    # completions that fall in the window instead would be off by up to one call per worker.
    achieved, done, latencies = 0.0, 0, []
    for worker_calls in calls:
        inside = [c for c in worker_calls if c[0] >= opens and c[1] <= closes]
        if inside:
            achieved += len(inside) / (inside[-1][1] - inside[0][0])
            done += len(inside)
            latencies += [lat for _, _, lat in inside]
    return Row(mode, concurrency, done, achieved, latencies, cpu_per_call)


async def bench(
    base_url: str, levels: list[int], modes: list[str], latency_s: float, window_s: float
) -> list[Row]:
    rows = []
    for mode in modes:
        for concurrency in levels:
            model = load_model("openai:bench-model", base_url=base_url, concurrency=concurrency)
            try:
                rows.append(await run_level(model, concurrency, latency_s, window_s, mode))
            finally:
                await model.aclose()
    return rows


def table(rows: list[Row], latency_s: float) -> str:
    lines = [
        "| start | concurrency | completions | achieved (/s) | ideal (c/latency) | efficiency "
        "| mean call latency (ms) | p95 (ms) | per-call overhead (ms) | CPU per call (ms) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        ideal = r.concurrency / latency_s
        mean = statistics.fmean(r.latencies_s)
        p95 = statistics.quantiles(r.latencies_s, n=20)[-1] if len(r.latencies_s) > 1 else mean
        lines.append(
            f"| {r.mode} | {r.concurrency} | {r.completions} | {r.achieved:.1f} | {ideal:.1f} "
            f"| {r.achieved / ideal:.3f} | {mean * 1000:.1f} | {p95 * 1000:.1f} "
            f"| {(mean - latency_s) * 1000:.1f} | {r.cpu_per_call_s * 1000:.2f} |"
        )
    return "\n".join(lines)


def _serve(latency_s: float, conn: Connection) -> None:
    with ScriptedOpenAIServer(latency_s=latency_s) as server:
        conn.send(server.base_url)
        conn.recv()  # until the parent is done
        conn.send({"calls": server.calls, "max_in_flight": server.max_in_flight})


@contextmanager
def serving(latency_s: float, in_process: bool) -> Iterator[tuple[str, dict[str, int]]]:
    """Yield the server's base URL and, once the block is done, its request statistics."""
    stats: dict[str, int] = {}
    if in_process:
        with ScriptedOpenAIServer(latency_s=latency_s) as server:
            yield server.base_url, stats
            stats.update(calls=server.calls, max_in_flight=server.max_in_flight)
        return
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_serve, args=(latency_s, child), daemon=True)
    process.start()
    try:
        if not parent.poll(60):
            raise RuntimeError("the server process did not start within 60 s")
        yield parent.recv(), stats
        parent.send("stop")
        stats.update(parent.recv())
    finally:
        process.join(timeout=10)
        if process.is_alive():
            process.terminate()


def _run(coro: Any) -> Any:
    """Run on uvloop when it is installed, as tracetune's commands do."""
    from tracetune.cli.common import run_async

    return run_async(coro)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--latency", type=float, default=0.25, help="server latency (s)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--mode", choices=["steady", "burst", "both"], default="both")
    parser.add_argument("--window", type=float, default=3.0, help="measured seconds per row")
    parser.add_argument(
        "--in-process", action="store_true", help="serve from a thread of this process"
    )
    args = parser.parse_args()
    modes = ["steady", "burst"] if args.mode == "both" else [args.mode]

    load_before = os.getloadavg()[0]  # other work on the machine skews these numbers
    with serving(args.latency, args.in_process) as (base_url, stats):
        rows = _run(bench(base_url, args.concurrency, modes, args.latency, args.window))
    where = "a thread of this process" if args.in_process else "a child process"
    print(
        f"server latency {args.latency * 1000:.0f} ms in {where}; {args.window:g} s window "
        f"per row; {stats['calls']} requests served, at most {stats['max_in_flight']} in "
        f"flight; {os.cpu_count()} CPUs, load average {load_before:.1f} before the "
        f"run; python {platform.python_version()}, "
        f"openai {openai.__version__}\n"
    )
    print(table(rows, args.latency))
    target = [r for r in rows if r.mode == modes[0] and r.concurrency == max(args.concurrency)]
    return 0 if all(r.achieved / (r.concurrency / args.latency) >= 0.9 for r in target) else 1


if __name__ == "__main__":
    sys.exit(main())
