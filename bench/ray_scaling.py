"""The Ray executor: scaling from 1 to 2 workers, and the overhead it adds per item.

Three measurements on a two-node Ray cluster on loopback (started by this script, one CPU
per node, dashboard off):

* tool-bound: gold rollouts over ``--tasks`` task programs (receipt and table families), whose
  chains run real OCR and table tools, with 1 and 2 workers (and in-process for reference);
* latency-bound: ``--generations`` model calls against a loopback OpenAI-compatible server
  answering after ``--latency`` seconds, 1 and 2 workers, ``--concurrency`` calls in flight
  per worker;
* overhead: a stage whose process function does nothing but return a record, ``--items``
  items, in-process and on 1 Ray worker: (Ray time - in-process time) / items, the actor's
  start-up included (an upper bound; a one-item run's time is reported as the start-up).

Ray binds a node to the machine's network address unless it runs in a network namespace
with only loopback: run as root (or with user namespaces), the script re-runs itself inside
``unshare -n`` when it is not in one already.

    python bench/ray_scaling.py                               # 400 tasks, 1000 generations
    python bench/ray_scaling.py --tasks 40 --generations 200 --items 2000

Prints a markdown table; each row carries the load average at its start.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from tracetune.testing.ray_cluster import LoopbackCluster, loopback_up, only_loopback


def load() -> str:
    return Path("/proc/loadavg").read_text().split()[0]


def ensure_namespace() -> None:
    if only_loopback() and loopback_up():
        return
    if shutil.which("unshare") is None:
        sys.exit("needs unshare (util-linux) to run Ray on loopback only")
    script = 'ip link set lo up && exec "$0" "$@"'
    args = ["unshare", "-n", "sh", "-c", script, sys.executable, *sys.argv]
    sys.exit(subprocess.call(args))


def on_ray(address: str, workers: int, **kwargs: Any) -> Any:
    from tracetune.runner.executor import ExecutorConfig, use_executor

    return use_executor(ExecutorConfig(kind="ray", address=address, workers=workers, **kwargs))


def tool_bound(tmp: Path, address: str, n_tasks: int, rows: list[dict[str, Any]]) -> None:
    from contextlib import nullcontext

    from tracetune.rollout import RolloutConfig, run_rollout
    from tracetune.synth.programs.generate import ProgramsConfig, generate_tasks

    tasks = tmp / "tasks"
    config = ProgramsConfig(out=tasks, n=n_tasks, seed=3, families=["receipt", "table"])
    asyncio.run(generate_tasks(config, progress=False))
    for workers in (1, 2, 0):
        where = on_ray(address, workers) if workers else nullcontext()
        before = load()
        t0 = time.perf_counter()
        with where:
            result, _ = asyncio.run(
                run_rollout(
                    RolloutConfig(tasks=tasks, out=tmp / f"gold-{workers}", concurrency=1),
                    progress=False,
                )
            )
        seconds = time.perf_counter() - t0
        rows.append(
            {
                "stage": f"tool-bound: gold rollouts (OCR), {n_tasks} tasks",
                "executor": f"ray, {workers} worker(s)" if workers else "in-process",
                "items": result.written + result.dropped,
                "seconds": seconds,
                "load": before,
            }
        )
        print(json.dumps(rows[-1]), flush=True)


def latency_bound(
    tmp: Path, address: str, n: int, latency: float, concurrency: int, rows: list[dict[str, Any]]
) -> None:
    from tracetune.models.base import ModelOptions
    from tracetune.rollout import RolloutConfig, run_rollout
    from tracetune.store import Dataset
    from tracetune.synth.programs.generate import ProgramsConfig, generate_tasks
    from tracetune.testing.openai_server import ScriptedOpenAIServer

    tasks = tmp / "gen-tasks"
    asyncio.run(generate_tasks(ProgramsConfig(out=tasks, n=10, seed=4), progress=False))
    gold = {t.query: t.gold.value for t in Dataset.open(tasks) if t.gold is not None}

    def answer(body: dict[str, Any]) -> str:
        text = json.dumps(body["messages"])
        value = next((v for q, v in gold.items() if json.dumps(q)[1:-1] in text), "?")
        action = {"name": "final_answer", "arguments": {"answer": value}}
        return f"Thought: done\nAction: {json.dumps(action)}"

    os.environ.setdefault("OPENAI_API_KEY", "bench")
    with ScriptedOpenAIServer(answer, latency_s=latency) as srv:
        for workers in (1, 2):
            config = RolloutConfig(
                tasks=tasks,
                out=tmp / f"gen-{workers}",
                teacher="openai:bench-model",
                backend=ModelOptions(base_url=srv.base_url),
                require_tools=False,
                samples=n // len(gold),
                concurrency=concurrency,
            )
            before = load()
            calls = srv.calls
            t0 = time.perf_counter()
            with on_ray(address, workers):
                result, _ = asyncio.run(run_rollout(config, progress=False))
            seconds = time.perf_counter() - t0
            rows.append(
                {
                    "stage": f"latency-bound: {srv.calls - calls} generations at {latency} s",
                    "executor": f"ray, {workers} worker(s), {concurrency} in flight each",
                    "items": result.written + result.dropped + result.failed,
                    "seconds": seconds,
                    "load": before,
                }
            )
            print(json.dumps(rows[-1]), flush=True)


async def _noop(item: int) -> Any:
    from tracetune.schema import Task

    return Task(id=f"noop-{item:07d}", query="q")


def _noop_stage(out: Path, n: int) -> float:
    from tracetune.runner import run_stage
    from tracetune.schema import Task
    from tracetune.store import Dataset

    dataset = Dataset.create(out, Task)
    t0 = time.perf_counter()
    asyncio.run(
        run_stage(
            "noop", range(n), key=str, process=_noop, out=dataset, concurrency=16, progress=False
        )
    )
    return time.perf_counter() - t0


def overhead(tmp: Path, address: str, n: int, rows: list[dict[str, Any]]) -> None:
    before = load()
    local = _noop_stage(tmp / "noop-local", n)
    with on_ray(address, 1):
        startup = _noop_stage(tmp / "noop-ray-1", 1)  # actor start-up and one item
        on_ray_s = _noop_stage(tmp / "noop-ray", n)
    # An upper bound: the Ray run's start-up is counted in (subtracting a separate one-item
    # run's time is noisier than the difference itself on a loaded machine).
    per_item_ms = 1000 * (on_ray_s - local) / n
    rows.append(
        {
            "stage": f"overhead: no-op stage, {n} items",
            "executor": f"in-process {local:.2f} s; ray 1 worker {on_ray_s:.2f} s "
            f"(of which start-up {startup:.2f} s)",
            "items": n,
            "seconds": on_ray_s,
            "load": before,
            "per_item_ms": per_item_ms,
        }
    )
    print(json.dumps(rows[-1]), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=400)
    parser.add_argument("--generations", type=int, default=1000)
    parser.add_argument("--latency", type=float, default=0.5)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--only", choices=["tools", "latency", "overhead"], action="append")
    args = parser.parse_args()
    ensure_namespace()
    only = set(args.only or ["tools", "latency", "overhead"])
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        t0 = time.perf_counter()
        with LoopbackCluster(nodes=2, num_cpus=1, tmp=tmp) as cluster:
            print(f"cluster of 2 nodes up in {cluster.startup_s:.1f} s (load {load()})")
            del t0
            if "overhead" in only:
                overhead(tmp, cluster.address, args.items, rows)
            if "latency" in only:
                latency_bound(
                    tmp, cluster.address, args.generations, args.latency, args.concurrency, rows
                )
            if "tools" in only:
                tool_bound(tmp, cluster.address, args.tasks, rows)
    print("\n| stage | executor | items | seconds | items/s | load |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        extra = f" (at most {r['per_item_ms']:.2f} ms/item added)" if "per_item_ms" in r else ""
        print(
            f"| {r['stage']} | {r['executor']}{extra} | {r['items']} | {r['seconds']:.1f} | "
            f"{r['items'] / r['seconds']:.1f} | {r['load']} |"
        )


if __name__ == "__main__":
    main()
