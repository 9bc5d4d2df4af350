"""MCP tool calls through tracetune: server start-up, and calls/s one at a time and in flight.

The server is tests/mcp_server.py (the SDK's FastMCP over stdio); each call goes through the
tool's argument check, the process's background MCP event loop, the JSON-RPC round trip and
the result conversion, as an agent's tool call does.

Run: python bench/mcp_calls.py [--calls 200] [--in-flight 16]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

from tracetune.tools import ToolContext, mcp

SERVER = Path(__file__).resolve().parent.parent / "tests" / "mcp_server.py"


async def sequential(tool: object, ctx: ToolContext, n: int) -> None:
    for i in range(n):
        await tool.acall(ctx, {"a": i, "b": 1})  # type: ignore[attr-defined]


async def in_flight(tool: object, ctx: ToolContext, n: int, k: int) -> None:
    gate = asyncio.Semaphore(k)

    async def one(i: int) -> None:
        async with gate:
            await tool.acall(ctx, {"a": i, "b": 1})  # type: ignore[attr-defined]

    await asyncio.gather(*(one(i) for i in range(n)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--in-flight", type=int, default=16)
    args = parser.parse_args()
    print(f"load average: {open('/proc/loadavg').read().split()[:3]}")
    t0 = time.perf_counter()
    tools = {t.name: t for t in mcp.connect([f"{sys.executable} {SERVER}"])}
    print(f"server start + handshake + tool list: {time.perf_counter() - t0:.2f} s")
    tool, ctx = tools["add_numbers"], ToolContext(workdir=Path("."))
    for label, coro in (
        ("one at a time", sequential(tool, ctx, args.calls)),
        (f"{args.in_flight} in flight", in_flight(tool, ctx, args.calls, args.in_flight)),
    ):
        t0 = time.perf_counter()
        asyncio.run(coro)
        dt = time.perf_counter() - t0
        print(f"{label}: {args.calls / dt:.0f} calls/s ({1000 * dt / args.calls:.1f} ms/call)")
    mcp.close_all()


if __name__ == "__main__":
    main()
