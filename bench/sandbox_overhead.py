"""Per-step overhead of the code sandbox, printed as a markdown table.

    .venv/bin/python bench/sandbox_overhead.py [--repeat 200] [--without LAYER ...]

``--without seccomp cgroup workdir_cap`` switches those layers off, to see what each costs.
To compare with an older tree, run this script with ``PYTHONPATH=<old checkout>/src``
(options it does not know are then not passed).

Measures, on this machine and with whatever isolation layers it supports (printed first):
worker start (spawn to ready, all layers applied), an empty step, a step that calls a
trivial tool (one host round trip), a step that calls it ten times, and forking a state that
holds a 50 MB object (written, so its pages are real) until the fork is ready, plus the
first step in that fork.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from tracetune.sandbox import Sandbox, SandboxLimits, ToolReply, ToolStub

TOOLS = [ToolStub("add", ["a", "b"], ["a", "b"], description="Add two numbers.")]


async def add(name: str, arguments: dict[str, Any]) -> ToolReply:
    return ToolReply(value=arguments["a"] + arguments["b"])


async def timed(n: int, fn: Callable[[], Awaitable[Any]]) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        await fn()
        times.append((time.perf_counter() - t0) * 1000)
    return times


def row(name: str, times: list[float]) -> str:
    times = sorted(times)
    p90 = times[min(len(times) - 1, int(0.9 * len(times)))]
    return f"| {name} | {len(times)} | {statistics.median(times):.2f} | {p90:.2f} |"


async def main(repeat: int, without: list[str]) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="sandbox-bench-"))
    off = {"seccomp": {"seccomp": False}, "cgroup": {"cgroup": False}}
    off["workdir_cap"] = {"workdir_mb": None}
    settings: dict[str, Any] = {"timeout_s": 60}
    for layer in without:
        settings.update(off[layer])
    limits = SandboxLimits(**settings)
    rows = []

    starts = []
    for _ in range(max(5, repeat // 10)):
        t0 = time.perf_counter()
        sb = await Sandbox.start(workdir, TOOLS, add, limits)
        starts.append((time.perf_counter() - t0) * 1000)
        await sb.close()
    rows.append(row("worker start (spawn + isolation, to ready)", starts))

    async with await Sandbox.start(workdir, TOOLS, add, limits) as sb:
        layers = {
            k: v
            for k, v in sb.isolation.items()
            if k not in ("workdir", "notes") and not k.endswith("_detail")
        }
        await sb.execute("pass")
        rows.append(row("empty step (`pass`)", await timed(repeat, lambda: sb.execute("pass"))))
        one = await timed(repeat, lambda: sb.execute("add(1, 2)"))
        rows.append(row("step calling a trivial tool once", one))
        ten = await timed(repeat, lambda: sb.execute("for i in range(10):\n    add(i, 1)"))
        rows.append(row("step calling it 10 times", ten))

        await sb.execute("x = bytearray(b'x' * 50_000_000)")
        forks, firsts = [], []
        for _ in range(max(5, repeat // 10)):
            t0 = time.perf_counter()
            child = await sb.fork()
            forks.append((time.perf_counter() - t0) * 1000)
            t1 = time.perf_counter()
            result = await child.execute("x[0] = 1\nlen(x)")
            firsts.append((time.perf_counter() - t1) * 1000)
            assert result.stdout == "50000000\n", result
            await child.close()
        rows.append(row("fork of a state holding 50 MB, to ready", forks))
        rows.append(row("first step in that fork (writes one page)", firsts))

    print(f"isolation: {layers}\n")
    print("| operation | n | median ms | p90 ms |")
    print("|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=200, help="steps timed per row")
    parser.add_argument(
        "--without",
        nargs="*",
        default=[],
        choices=["seccomp", "cgroup", "workdir_cap"],
        help="isolation layers to switch off",
    )
    args = parser.parse_args()
    asyncio.run(main(args.repeat, args.without))
