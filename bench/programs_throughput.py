"""Task programs: tasks generated per second, and gold rollouts per second with the real tools.

Generates ``--n`` tasks across every built-in family (one run per ``--workers`` value), then
replays their gold chains (json action format, and code when the sandboxed code executor is
installed) at each ``--concurrency``, and reports the gold pass rate per family: the check
that every program renders inputs the real tools read correctly.

    python bench/programs_throughput.py                     # n=200, workers 1 2, concurrency 1 2
    python bench/programs_throughput.py --n 50 --workers 1 --concurrency 2

Rollout timing includes the one-off tool start-up (OCR engine ~1.5 s, the search embedder
~7 s): a long run amortises it. Prints markdown tables.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

from tracetune.rollout import RolloutConfig, rollout_summary, run_rollout
from tracetune.synth.programs.generate import ProgramsConfig, generate_tasks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="Tasks to generate.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--formats", nargs="+", default=["json", "code"])
    parser.add_argument("--keep", type=Path, default=None, help="Keep the outputs here.")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="tracetune-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; n={args.n}\n")

    print("| workers | tasks | seconds | tasks/s |\n| --- | --- | --- | --- |")
    tasks_dir = None
    for workers in args.workers:
        out = root / f"tasks-w{workers}"
        shutil.rmtree(out, ignore_errors=True)
        t0 = time.perf_counter()
        result, dataset = asyncio.run(
            generate_tasks(
                ProgramsConfig(out=out, n=args.n, seed=args.seed, workers=workers), progress=False
            )
        )
        took = time.perf_counter() - t0
        print(f"| {workers} | {result.written} | {took:.1f} | {result.written / took:.1f} |")
        tasks_dir = tasks_dir or out
    assert tasks_dir is not None

    formats = [
        f
        for f in args.formats
        if f == "json" or importlib.util.find_spec("tracetune.agent.code") is not None
    ]
    skipped = sorted(set(args.formats) - set(formats))
    print("\n| format | concurrency | trajectories | seconds | rollouts/s | gold pass rate |")
    print("| --- | --- | --- | --- | --- | --- |")
    summaries = {}
    for fmt in formats:
        for concurrency in args.concurrency:
            out = root / f"gold-{fmt}-c{concurrency}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            result, dataset = asyncio.run(
                run_rollout(
                    RolloutConfig(
                        tasks=tasks_dir, out=out, action_format=fmt, concurrency=concurrency
                    ),
                    progress=False,
                )
            )
            took = time.perf_counter() - t0
            summary = rollout_summary(dataset)
            summaries[(fmt, concurrency)] = summary
            done = result.written + result.dropped
            print(
                f"| {fmt} | {concurrency} | {done} | {took:.1f} | {done / took:.2f} | "
                f"{summary['pass_rate']:.1%} |"
            )
    if skipped:
        print(f"\n(skipped {', '.join(skipped)}: tracetune.agent.code is not installed)")

    fmt, concurrency = next(iter(summaries))
    summary = summaries[(fmt, concurrency)]
    print(f"\nGold pass rate by family ({fmt}, concurrency {concurrency}):\n")
    print("| family | passed | total | rate |\n| --- | --- | --- | --- |")
    for family, row in summary["by_family"].items():
        print(f"| {family} | {row['passed']} | {row['total']} | {row['pass_rate']:.1%} |")
    if summary["failures"]:
        print("\nFailures:\n" + "\n".join(f"- {k} ({v}x)" for k, v in summary["failures"].items()))
    (root / "summary.json").write_text(
        json.dumps({f"{k[0]}-c{k[1]}": v for k, v in summaries.items()}, indent=2)
    )
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
