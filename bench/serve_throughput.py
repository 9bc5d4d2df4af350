"""Throughput of ``tracetune serve`` on a tiny VLM: dynamic batching vs one request at a time.

For each number of requests in flight (1, 8, 32) the official async ``openai`` client sends
``--requests`` greedy chat requests (half with an image) to a server on loopback, once with
dynamic batching (``--max-batch-size 32``) and once with batches of one (every request its
own ``generate`` call, as a lock around the model would do). Prints requests/s, the mean
batch the server formed, and the speed-up.

    python bench/serve_throughput.py [--requests 64] [--max-tokens 16] [--arch qwen2_vl]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import tempfile
import time
from pathlib import Path
from typing import Any

import openai
from PIL import Image

from tracetune.models.tiny import init_tiny
from tracetune.serve import ServeConfig, ServerThread, load_engine


def _image_url() -> str:
    buf = io.BytesIO()
    Image.new("RGB", (96, 64), "orange").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


async def _drive(base_url: str, name: str, requests: int, in_flight: int, max_tokens: int) -> float:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
    url = _image_url()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)

    async def worker() -> None:
        while not queue.empty():
            i = queue.get_nowait()
            content: Any = f"Question {i}: what is the total on the receipt?"
            if i % 2:
                content = [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": content},
                ]
            await client.chat.completions.create(
                model=name,
                messages=[{"role": "user", "content": content}],
                max_tokens=max_tokens,
                temperature=0,
            )

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    elapsed = time.perf_counter() - start
    await client.close()
    return requests / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--arch", default="qwen2_vl")
    parser.add_argument("--in-flight", default="1,8,32")
    args = parser.parse_args()
    levels = [int(x) for x in args.in_flight.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = init_tiny(args.arch, Path(tmp) / "model", seed=0)
        print(f"load {Path('/proc/loadavg').read_text().split()[:3]}")
        print("| in flight | batched req/s | mean batch | one-at-a-time req/s | speed-up |")
        print("|---:|---:|---:|---:|---:|")
        for in_flight in levels:
            rates = {}
            batch = 0.0
            for rows in (32, 1):
                engine = load_engine(
                    ServeConfig(model=str(model_dir), served_name="tiny", max_batch_rows=rows)
                )
                with ServerThread(engine, "tiny") as srv:
                    # warm-up: first calls pay one-off costs (allocations, kernels)
                    asyncio.run(_drive(srv.base_url, "tiny", 4, 2, args.max_tokens))
                    before = engine.stats.batches, engine.stats.requests
                    rates[rows] = asyncio.run(
                        _drive(srv.base_url, "tiny", args.requests, in_flight, args.max_tokens)
                    )
                    if rows > 1:
                        batches = engine.stats.batches - before[0]
                        batch = (engine.stats.requests - before[1]) / max(batches, 1)
            print(
                f"| {in_flight} | {rates[32]:.1f} | {batch:.1f} | {rates[1]:.1f} | "
                f"{rates[32] / rates[1]:.2f}x |"
            )
        print(f"load {Path('/proc/loadavg').read_text().split()[:3]}")


if __name__ == "__main__":
    main()
