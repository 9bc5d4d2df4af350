"""Scale: how the runner, the dataset store, the query filter and the pool dedup grow with n,
and 1000 generations side by side through the raw openai client, the ``openai:`` backend and
a real CLI stage.

Growth (``--sizes``, default 1K 10K 100K): each measurement runs in a fresh child process
(``--in-process``: all in this one), which reports its wall time and its peak resident memory:

* ``runner``: ``run_stage`` over n items with a trivial process function (each item one small
  record), then ``rerun``: the same stage again, every item already done.
* ``agent``: ``agent run`` (``run_agent``, the CLI's code) over n one-step episodes whose model
  answers at once (a scripted model, no HTTP): the runner's and the agent loop's own CPU per
  item, everything but the model call.
* ``store``: ``Dataset.write_all`` of n small records (records/s), then reading them all back.
* ``filter``: ``queries.filter`` over n planted candidates (20 % light rewordings of earlier
  ones) with the hashing embedder and ``dedup_search: auto`` (exact while small, then HNSW).
* ``pool``: the pool's dHash near-duplicate index over n planted 64-bit hashes (20 % copies
  with 0-3 bits flipped), ``dedup_bits`` 4: the part of a pool build that grew quadratically.

For each part: a log-log fit of time against n gives the growth exponent, and the largest
measured size is extrapolated to 1M with it.

Side by side (``--side-by-side``): one ScriptedOpenAIServer in a child process answers every
request after ``--latency`` seconds; ``--generations`` requests with ``--concurrency`` in flight
go through (a) the raw ``openai.AsyncOpenAI`` client, (b) the ``openai:`` backend from Python,
(c) ``tracetune agent run`` as a subprocess (one-step episodes ending in ``final_answer``).
Reported: wall time of each from the first request to the last answer (as the server saw
them), the most requests the server had in flight, and for (c) also the whole process's wall
time (Python start-up and imports included) and its CPU time per generation.

    python bench/scale.py                                   # growth at 1K/10K/100K
    python bench/scale.py --sizes 1000 10000 100000 1000000 --parts runner store pool
    python bench/scale.py --side-by-side --generations 1000 --latency 0.5 --concurrency 256

Prints markdown tables; ``--json PATH`` also writes the raw numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import multiprocessing
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

PARTS = ("runner", "agent", "store", "filter", "pool")
ANSWER = 'Thought: done\nAction: {"name": "final_answer", "arguments": {"answer": "42"}}'


def _tree_rss_kib(pid: int) -> int:
    """Resident memory of a process and its descendants (Linux /proc), in KiB."""
    total = 0
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                total += _tree_rss_kib(int(child))
    except OSError:  # the process ended meanwhile
        pass
    return total


class _PeakRss:
    """The most this process and its children (the query filter's graph process) held at
    once, sampled every 0.2 s; at least this process's own peak. A child's ru_maxrss can't
    be added: a child started by vfork+exec is charged its parent's peak until then."""

    def __init__(self) -> None:
        self.peak_kib = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.peak_kib = max(self.peak_kib, _tree_rss_kib(os.getpid()))

    def __enter__(self) -> _PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def mb(self) -> float:
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        return max(own, self.peak_kib) / 1024


def _cpu_s() -> float:
    """CPU seconds of this process (all threads) and of its finished children."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


# -- one measurement ------------------------------------------------------------------------
def measure(part: str, n: int, workdir: Path) -> list[dict[str, Any]]:
    """Run one part at size n in ``workdir``; returns rows {part, n, seconds, peak_rss_mb,
    ...}."""
    with _PeakRss() as peak:
        rows = _measure(part, n, workdir)
    for r in rows:
        r["peak_rss_mb"] = round(peak.mb)
    return rows


def _measure(part: str, n: int, workdir: Path) -> list[dict[str, Any]]:
    from tracetune.cli.common import run_async
    from tracetune.runner import run_stage
    from tracetune.schema import Task
    from tracetune.store import Dataset

    rows: list[dict[str, Any]] = []

    def row(name: str, seconds: float, **extra: Any) -> None:
        rows.append({"part": name, "n": n, "seconds": seconds, **extra})

    if part == "runner":

        async def process(task: Task) -> Task:
            return task

        tasks = [Task(id=f"t{i:07d}", query=f"q{i}") for i in range(n)]
        out = Dataset.create(workdir / "runner", Task)
        t = time.perf_counter()
        result = run_async(
            run_stage("s", tasks, lambda x: x.id, process, out, concurrency=8, progress=False)
        )
        first = time.perf_counter() - t
        assert result.written == n, result.summary()
        chunks = len(out.chunk_files())
        row("runner", first, per_s=n / first, chunks=chunks)
        out.state.close()
        out = Dataset.open(workdir / "runner", Task)
        t = time.perf_counter()
        again = run_async(
            run_stage("s", tasks, lambda x: x.id, process, out, concurrency=8, progress=False)
        )
        row("rerun", time.perf_counter() - t)
        assert again.skipped == n and again.written == 0, again.summary()
    elif part == "agent":
        from tracetune.agent.run import AgentRunConfig, run_agent
        from tracetune.testing import ScriptedChatModel

        tasks_file = workdir / "tasks.jsonl"
        tasks_file.write_text(
            "".join(json.dumps({"query": f"What is {i} + 1?"}) + "\n" for i in range(n))
        )
        config = AgentRunConfig(
            model="scripted:instant",
            out=workdir / "agent",
            tasks=tasks_file,
            tools=["calculator"],
            max_steps=1,
            concurrency=256,
        )
        model = ScriptedChatModel(lambda messages: ANSWER, spec="scripted:instant")
        t, cpu = time.perf_counter(), time.process_time()
        result, _ = run_async(run_agent(config, model=model, progress=False))
        seconds, cpu = time.perf_counter() - t, time.process_time() - cpu
        assert result.written == n, result.summary()
        row("agent", seconds, per_s=n / seconds, cpu_ms_per_item=round(cpu / n * 1000, 3))
    elif part == "store":
        records = [Task(id=f"r{i:07d}", query=f"question number {i}") for i in range(n)]
        out = Dataset.create(workdir / "store", Task)
        t = time.perf_counter()
        written = out.write_all(records)
        seconds = time.perf_counter() - t
        assert written == n
        row("store write", seconds, per_s=n / seconds, chunks=len(out.chunk_files()))
        del records
        t = time.perf_counter()
        count = sum(1 for _ in Dataset.open(workdir / "store", Task))
        seconds = time.perf_counter() - t
        assert count == n
        row("store read", seconds, per_s=n / seconds)
    elif part == "filter":
        from tracetune.synth.mtrace.queries import filter_queries
        from tracetune.testing.scale_data import filter_run

        config = filter_run(workdir / "filter", n, "auto")
        t, cpu = time.perf_counter(), _cpu_s()
        result = run_async(filter_queries(config, progress=False))
        seconds = time.perf_counter() - t
        row(
            "filter",
            seconds,
            per_s=n / seconds,
            kept=result.written,
            dropped=result.dropped,
            cpu_s=round(_cpu_s() - cpu, 1),  # all threads and processes: the load-free cost
        )
    elif part == "pool":
        from tracetune.synth.mtrace.neardup import HashIndex
        from tracetune.testing.scale_data import planted_hashes

        codes = planted_hashes(n)
        t = time.perf_counter()
        index: HashIndex[int] = HashIndex(4)
        merged = 0
        for code in codes:
            if index.find(code) is None:
                index.add(code, code)
            else:
                merged += 1
        seconds = time.perf_counter() - t
        row("pool dedup", seconds, per_s=n / seconds, merged=merged)
    else:
        raise ValueError(f"unknown part {part!r}; choose from {PARTS}")
    return rows


def _child(part: str, n: int, workdir: str, conn: Connection) -> None:
    try:
        conn.send(measure(part, n, Path(workdir)))
    except BaseException as exc:  # reported by the parent
        conn.send({"error": f"{type(exc).__name__}: {exc}"})


def run_growth(
    parts: list[str], sizes: list[int], in_process: bool, timeout_s: float
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    context = multiprocessing.get_context("spawn")
    for part in parts:
        for n in sizes:
            workdir = Path(tempfile.mkdtemp(prefix=f"scale-{part}-"))
            try:
                if in_process:
                    rows += measure(part, n, workdir)
                    continue
                parent, child = context.Pipe()
                proc = context.Process(target=_child, args=(part, n, str(workdir), child))
                proc.start()
                if not parent.poll(timeout_s):
                    proc.kill()
                    rows.append({"part": part, "n": n, "error": f"over {timeout_s:g} s"})
                    break  # larger sizes only take longer
                got = parent.recv()
                proc.join()
                if isinstance(got, dict):
                    rows.append({"part": part, "n": n, **got})
                    break
                rows += got
            finally:
                shutil.rmtree(workdir, ignore_errors=True)
    return rows


def fit(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per part: growth exponent b of seconds ~ n^b (least squares in log-log) and 1M estimate."""
    fits = []
    for name in dict.fromkeys(r["part"] for r in rows):
        pts = [(r["n"], r["seconds"]) for r in rows if r["part"] == name and "seconds" in r]
        pts = [(n, s) for n, s in pts if s > 0]
        if len(pts) < 2:
            continue
        xs = [math.log(n) for n, _ in pts]
        ys = [math.log(s) for _, s in pts]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
            (x - mx) ** 2 for x in xs
        )
        n_max, s_max = max(pts)
        mem = [r["peak_rss_mb"] for r in rows if r["part"] == name and r["n"] == n_max]
        fits.append(
            {
                "part": name,
                "exponent": b,
                "largest_n": n_max,
                "at_1m_s": s_max * (1_000_000 / n_max) ** b,
                "peak_rss_mb_at_largest": mem[0] if mem else None,
            }
        )
    return fits


def growth_tables(rows: list[dict[str, Any]], fits: list[dict[str, Any]]) -> str:
    lines = [
        "| part | n | seconds | per second | peak RSS (MB) | notes |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['part']} | {r['n']:,} | - | - | - | {r['error']} |")
            continue
        notes = ", ".join(
            f"{k.replace('_', ' ')} {v:,}"
            for k, v in r.items()
            if k in ("chunks", "kept", "dropped", "merged", "cpu_ms_per_item", "cpu_s")
        )
        per_s = f"{r['per_s']:,.0f}" if "per_s" in r else "-"
        lines.append(
            f"| {r['part']} | {r['n']:,} | {r['seconds']:.3f} | {per_s} "
            f"| {r['peak_rss_mb']:,} | {notes} |"
        )
    lines += [
        "",
        "| part | growth exponent (time ~ n^b) | from n | 1M extrapolated (s) |",
        "|---|---:|---:|---:|",
    ]
    for f in fits:
        lines.append(
            f"| {f['part']} | {f['exponent']:.2f} | {f['largest_n']:,} | {f['at_1m_s']:,.1f} |"
        )
    return "\n".join(lines)


# -- side by side -----------------------------------------------------------------------------
def serve(latency_s: float) -> None:
    """``--serve``: the loopback server, driven over stdin/stdout (one JSON line per command)."""
    from tracetune.testing import ScriptedOpenAIServer

    with ScriptedOpenAIServer(lambda body: ANSWER, latency_s=latency_s) as server:
        print(server.base_url, flush=True)
        for line in sys.stdin:
            if line.strip() != "reset":
                return
            # First arrival to last answer (the last arrival plus the latency) of the requests
            # since the last reset.
            times = [r.received_at for r in server.requests]
            stats = {
                "calls": server.calls,
                "max_in_flight": server.max_in_flight,
                "first": min(times) if times else 0.0,
                "last_answer": (max(times) if times else 0.0) + latency_s,
            }
            server.reset()
            print(json.dumps(stats), flush=True)


@contextmanager
def serving(latency_s: float) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """The server in a child process (its request handling does not compete with the client
    for this process's GIL, as a real server would not)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--serve", str(latency_s)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().strip()
        if not url.startswith("http"):
            raise RuntimeError("the server process did not start")
        yield url, proc
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _server_stats(proc: subprocess.Popen[str]) -> dict[str, Any]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write("reset\n")
    proc.stdin.flush()
    stats: dict[str, Any] = json.loads(proc.stdout.readline())
    stats["span_s"] = stats["last_answer"] - stats["first"]
    return stats


async def _raw_client(base_url: str, n: int, concurrency: int) -> None:
    import openai

    limits_type = type(openai.DEFAULT_CONNECTION_LIMITS)
    http = openai.DefaultAsyncHttpxClient(
        limits=limits_type(
            max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8
        )
    )
    client = openai.AsyncOpenAI(
        api_key="not-needed", base_url=base_url, max_retries=0, http_client=http
    )
    limit = asyncio.Semaphore(concurrency)
    messages: Any = [{"role": "user", "content": "What is 6 + 8?"}]

    async def one() -> None:
        async with limit:
            await client.chat.completions.create(model="m", messages=messages, max_tokens=64)

    await asyncio.gather(*(one() for _ in range(n)))
    await client.close()


async def _backend(base_url: str, n: int, concurrency: int) -> None:
    from tracetune.models import load_model
    from tracetune.models.base import Sampling

    model = load_model("openai:m", base_url=base_url, concurrency=concurrency)
    messages = [{"role": "user", "content": "What is 6 + 8?"}]
    await asyncio.gather(
        *(model.generate(messages, sampling=Sampling(max_tokens=64)) for _ in range(n))
    )
    await model.aclose()


def side_by_side(n: int, latency_s: float, concurrency: int) -> list[dict[str, Any]]:
    from tracetune.cli.common import run_async

    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="scale-sbs-"))
    tasks = workdir / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"query": f"What is {i} + 1?"}) + "\n" for i in range(n)))
    try:
        with serving(latency_s) as (base_url, conn):
            for name, coro in (
                ("(a) raw openai client", _raw_client(base_url, n, concurrency)),
                ("(b) openai: backend", _backend(base_url, n, concurrency)),
            ):
                t, cpu = time.perf_counter(), time.process_time()
                run_async(coro)
                wall, cpu = time.perf_counter() - t, time.process_time() - cpu
                stats = _server_stats(conn)
                rows.append(
                    {"path": name, "wall_s": wall, "cpu_per_gen_ms": cpu / n * 1000, **stats}
                )
            cmd = [
                sys.executable, "-m", "tracetune.cli", "agent", "run",
                "--model", "openai:m", "--base-url", base_url, "--tasks", str(tasks),
                "--out", str(workdir / "out"), "--concurrency", str(concurrency),
                "--max-steps", "1", "--tools", "calculator", "--quiet",
            ]  # fmt: skip
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            wall = time.perf_counter() - t
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            if done.returncode != 0:
                raise RuntimeError(f"agent run failed: {done.stderr[-2000:]}")
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            stats = _server_stats(conn)
            rows.append(
                {
                    "path": "(c) CLI `agent run`",
                    "wall_s": wall,
                    "cpu_per_gen_ms": cpu / n * 1000,
                    **stats,
                }
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return rows


def side_by_side_table(rows: list[dict[str, Any]], n: int, latency_s: float, c: int) -> str:
    ideal = math.ceil(n / c) * latency_s
    raw = rows[0]["span_s"]
    lines = [
        f"{n} generations, server latency {latency_s:g} s, {c} in flight: ideal {ideal:.2f} s",
        "",
        "| path | first request to last answer (s) | x raw client | process wall (s) "
        "| CPU per generation (ms) | max in flight at server |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['path']} | {r['span_s']:.2f} | {r['span_s'] / raw:.2f} | {r['wall_s']:.2f} "
            f"| {r['cpu_per_gen_ms']:.2f} | {r['max_in_flight']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10_000, 100_000])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--in-process", action="store_true", help="no child process per size")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds per measurement")
    parser.add_argument("--side-by-side", action="store_true", help="only the side-by-side run")
    parser.add_argument("--generations", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--concurrency", type=int, default=256)
    parser.add_argument("--json", type=Path, help="also write the raw numbers here")
    parser.add_argument("--serve", type=float, help=argparse.SUPPRESS)  # the child server
    args = parser.parse_args(argv)
    if args.serve is not None:
        serve(args.serve)
        return 0

    load = os.getloadavg()
    print(
        f"{os.cpu_count()} CPUs, load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} "
        f"before the run; python {platform.python_version()}\n"
    )
    result: dict[str, Any] = {"loadavg_before": load}
    if args.side_by_side:
        rows = side_by_side(args.generations, args.latency, args.concurrency)
        print(side_by_side_table(rows, args.generations, args.latency, args.concurrency))
        result["side_by_side"] = rows
    else:
        rows = run_growth(args.parts, args.sizes, args.in_process, args.timeout)
        fits = fit(rows)
        print(growth_tables(rows, fits))
        result.update(growth=rows, fits=fits)
    load = os.getloadavg()
    print(f"\nload average after: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    result["loadavg_after"] = load
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
