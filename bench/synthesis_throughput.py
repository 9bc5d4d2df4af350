"""Synthesis throughput: M-TRACE query generation and filtering, MMAT ingest and engine stages.

Every model is the real ``openai:`` backend talking to a loopback ``ScriptedOpenAIServer``
(in a thread of this process, as the tests run it) that answers after ``--latency`` seconds:

1. M-TRACE queries: ``--batches`` generator calls of ``--per-batch`` candidates each (with
   injected near-copies of earlier queries, of seeds and of benchmark questions, invalid items
   and the odd unparsable reply), the ``queries.generate`` time, then ``queries.filter`` over
   the same candidates with each ``--embedders`` (minilm once cold, its model load included,
   and once warm), and the kept and dropped counts by reason.
2. MMAT ingest: a JSONL of ``--rows`` QA rows over ``--images`` small PNGs, rows/s, and the
   time of the resume rerun that finds every row done.
3. MMAT engine on the bundled sample (5 QA items): ingest, rationale (teacher + the real OCR,
   face detection, captions over HTTP and MiniLM retrieval), reflect and render, each stage's
   wall time and model calls, against the scripted teacher of tests/test_mmat_e2e.py; then a
   rerun of all four, which must call no model.

    python bench/synthesis_throughput.py                       # all parts, ~1 min on 2 cores
    python bench/synthesis_throughput.py --latency 0.5 --parts mtrace
    python bench/synthesis_throughput.py --batches 200 --rows 20000 --embedders hashing

Each part runs in a fresh child process (``--in-process``: all in this one), so the one-off
loads it pays are its own: MiniLM and the OCR engine are cached per process.

Stage times include each stage's one-off start-up (opening datasets, OCR engine, MiniLM).
Prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image, ImageDraw

from tracetune.cli.common import run_async
from tracetune.data import CORPUS, DATA_DIR
from tracetune.engine import IngestConfig, MMATRunConfig, OperatorConfig, run_ingest, run_pipeline
from tracetune.models.base import ModelOptions
from tracetune.runner import StageResult
from tracetune.synth.mtrace.config import QueriesConfig, SynthConfig
from tracetune.synth.mtrace.queries import filter_queries, generate_queries
from tracetune.testing import ScriptedOpenAIServer

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))  # the scripted responders the tests use, one copy of each
from mtrace_script import SEEDS, write_seeds  # noqa: E402
from test_mmat_e2e import teacher  # noqa: E402

T = TypeVar("T")
GTA = TESTS / "fixtures" / "gta_small" / "dataset.json"
TOOLS = ["ocr", "visual_qa", "inspect_file", "calculator", "face_detection"]
SAMPLE = DATA_DIR / "mmat" / "sample.jsonl"

# -- the scripted query generator -----------------------------------------------------------
# Slots of query templates: enough combinations that most candidates are new, as a good
# generator's are; the injected copies below are what the filter is for.
PLACES = [
    "farmers market",
    "train station",
    "museum",
    "hardware store",
    "school fair",
    "airport",
    "bakery",
    "library",
    "harbour",
    "ski resort",
    "pharmacy",
    "zoo",
]
DOCS = [
    "receipt",
    "parking sign",
    "menu board",
    "bus timetable",
    "price tag",
    "ticket",
    "nutrition label",
    "opening-hours sign",
    "invoice",
    "boarding pass",
]
MEASURES = [
    "total",
    "tax",
    "cheapest price",
    "closing time",
    "discount",
    "deposit",
    "calorie count",
    "departure time",
    "tip",
    "unit price",
]
THINGS = [
    "bicycles",
    "umbrellas",
    "red cars",
    "dogs",
    "lamp posts",
    "boats",
    "chairs",
    "windows",
    "flags",
    "trees",
]
SHEETS = [
    "sales spreadsheet",
    "expense sheet",
    "attendance log",
    "inventory workbook",
    "fuel log",
    "grades table",
    "rainfall table",
    "budget spreadsheet",
]
METRICS = ["revenue", "spending", "visitors", "stock", "mileage", "score", "rainfall", "hours"]
UNITS = ["month", "week", "quarter", "region", "team", "shop", "year", "day"]
OPENERS = [
    "",
    "Quick question: ",
    "For my notes, ",
    "My sister sent me this - ",
    "Before I pay anything, ",
    "Help me out: ",
    "I'm planning a trip, so ",
    "For a school project, ",
    "Settle a bet for us: ",
    "My manager asks ",
]
WHENS = [
    "last Monday",
    "this morning",
    "in March",
    "on my holiday",
    "yesterday",
    "at the weekend",
    "in 2023",
    "on Friday night",
    "during the storm",
    "after lunch",
]
CURRENCIES = ["euros", "yen", "pounds", "Swiss francs", "Canadian dollars", "pesos"]
BENCH_COPIES = [  # light rewordings of tests/fixtures/gta_small questions
    "How much do the two items on this receipt cost altogether, in US dollars?",
    "Is the cup to the left or to the right of the plate?",
    "How many apples are there on the table?",
    "Draw a box around the red car in the picture.",
]


def _query(rng: random.Random) -> dict[str, Any]:
    kind = rng.randrange(7)
    opener, when = rng.choice(OPENERS), rng.choice(WHENS)
    place, doc, measure = rng.choice(PLACES), rng.choice(DOCS), rng.choice(MEASURES)
    sheet, metric, unit = rng.choice(SHEETS), rng.choice(METRICS), rng.choice(UNITS)
    if kind == 0:
        query = f"what is the {measure} on the {doc} in the photo I took at the {place} {when}?"
        tools = ["ocr"]
    elif kind == 1:
        query = f"how many {rng.choice(THINGS)} can you count in my picture of the {place}, "
        query += f"taken {when}?"
        tools = ["visual_qa"]
    elif kind == 2:
        query = f"according to the {sheet} I attached, which {unit} had the highest {metric} "
        query += f"{when}?"
        tools = ["inspect_file"]
    elif kind == 3:
        query = f"add up the {metric} for every {unit} in my {sheet} from {when} and give "
        query += "the total."
        tools = ["inspect_file", "calculator"]
    elif kind == 4:
        query = f"does the chart of {metric} by {unit} in this screenshot from {when} match "
        query += f"the {sheet} I attached?"
        tools = ["visual_qa", "inspect_file"]
    elif kind == 5:
        query = f"how many people were standing by the {doc} at the {place} {when}, in this "
        query += "photo?"
        tools = ["face_detection"]
    else:
        query = f"read the {measure} on the {doc} from the {place} ({when}) and convert it to "
        query += f"{rng.choice(CURRENCIES)}."
        tools = ["ocr", "calculator"]
    query = opener + query
    return {"query": query[0].upper() + query[1:], "tools": tools}


def batch_items(index: int, per_batch: int) -> list[dict[str, Any]]:
    """Batch ``index``'s candidates: the same on every call, so a rerun sees the same."""
    items = [_query(random.Random(f"batch|{index}|{i}")) for i in range(per_batch)]
    if index % 5 == 1:  # repeats a query of the batch before, punctuation changed
        items[-1] = _query(random.Random(f"batch|{index - 1}|2"))  # never overwritten below
        items[-1]["query"] = items[-1]["query"].rstrip("?.") + "!"
    if index % 9 == 2:
        items[-2] = dict(SEEDS[index % len(SEEDS)])
    if index % 8 == 5:
        items[-3] = {"query": BENCH_COPIES[index % len(BENCH_COPIES)], "tools": ["visual_qa"]}
    if index % 7 == 3:
        items[0] = {"query": "How much is the tax on this receipt?"}  # no tools
    if index % 11 == 4:
        items[1] = {"query": "Who painted the picture in the photo?", "tools": ["teleport"]}
    return items


def injected(batches: int) -> str:
    """What ``batch_items`` and ``generator`` planted in ``batches`` calls, to read the drops by."""

    def count(mod: int, rest: int) -> int:
        return sum(1 for i in range(batches) if i % mod == rest and i % 25 != 24)

    cut = sum(1 for i in range(batches) if i % 25 == 24)
    return (
        f"Planted: {count(5, 1)} repeats of an earlier query, {count(9, 2)} seed copies, "
        f"{count(8, 5)} rewordings of benchmark questions, {count(7, 3) + count(11, 4)} invalid "
        f"items, {cut} cut-off replies (their candidates never reach the filter). The other "
        "drops are template queries that share most of their words: real near-duplicates."
    )


def generator(per_batch: int) -> Any:
    def respond(body: dict[str, Any]) -> str:
        prompt = body["messages"][0]["content"]
        index = int(re.search(r'on the topic "topic (\d+)"', prompt).group(1))  # type: ignore[union-attr]
        if index % 25 == 24:  # a reply cut off mid-list
            return '```json\n[{"query": "What is the total on the'
        return "```json\n" + json.dumps(batch_items(index, per_batch)) + "\n```"

    return respond


# -- helpers --------------------------------------------------------------------------------
def timed(coro: Coroutine[Any, Any, T]) -> tuple[T, float]:
    t0 = time.perf_counter()
    value = run_async(coro)
    return value, time.perf_counter() - t0


def reasons(result: StageResult) -> str:
    return ", ".join(f"{n} {r}" for r, n in sorted(result.drop_reasons.items())) or "-"


# -- 1. M-TRACE query generation and filtering ---------------------------------------------
def bench_mtrace(args: argparse.Namespace, root: Path) -> None:
    seeds = root / "seeds.jsonl"
    write_seeds(seeds)

    def config(out: Path, base_url: str, embedder: str) -> SynthConfig:
        return SynthConfig(
            out=out,
            generator="openai:test-model",
            embedder=embedder,
            concurrency=args.concurrency,
            backend=ModelOptions(base_url=base_url, max_retries=0),
            queries=QueriesConfig(
                seeds=seeds,
                tools=TOOLS,
                batches=args.batches,
                per_batch=args.per_batch,
                few_shot=3,
                topics=[f"topic {i}" for i in range(args.batches)],
                benchmarks=[GTA],
            ),
        )

    with ScriptedOpenAIServer(generator(args.per_batch), latency_s=args.latency) as server:
        generated = root / "mtrace-generated"
        # hashing for the seed-decontamination check generate runs, so MiniLM's load is
        # left for the first minilm filter below to pay.
        gen, took = timed(generate_queries(config(generated, server.base_url, "hashing"), False))
        calls = server.calls
    candidates = gen.written
    print(
        f"### M-TRACE queries ({args.batches} generator calls x {args.per_batch}, "
        f"concurrency {args.concurrency}, latency {args.latency:g} s)\n"
    )
    print(
        "| stage | embedder | model calls | candidates in | kept | dropped | seconds "
        "| candidates/s | drops by reason |"
    )
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    print(
        f"| generate | - | {calls} | - | {candidates} candidates | {gen.dropped} calls | "
        f"{took:.2f} | {candidates / took:.0f} | {reasons(gen)} |"
    )
    runs = [(e, "cold, incl. load" if e == "minilm" else "") for e in args.embedders]
    if "minilm" in args.embedders:
        runs.append(("minilm", "warm"))
    for i, (embedder, note) in enumerate(runs):
        run = root / f"mtrace-filter-{i}"
        shutil.copytree(generated / "candidates", run / "candidates")
        # No model is called: the filter reads candidates and embeds them.
        result, took = timed(filter_queries(config(run, "http://127.0.0.1:9", embedder), False))
        label = f"{embedder} ({note})" if note else embedder
        print(
            f"| filter | {label} | 0 | {candidates} | {result.written} | {result.dropped} | "
            f"{took:.2f} | {candidates / took:.0f} | {reasons(result)} |"
        )
    print(f"\n{injected(args.batches)}\n")


# -- 2. MMAT ingest ---------------------------------------------------------------------------
def write_qa(root: Path, rows: int, images: int) -> Path:
    (root / "images").mkdir(parents=True)
    for i in range(images):
        image = Image.new("RGB", (96, 96), (40 + 10 * i, 200 - 7 * i, 90 + 5 * i))
        ImageDraw.Draw(image).rectangle((10 + i, 10, 60, 40 + i), outline=(0, 0, 0), width=2)
        image.save(root / "images" / f"img-{i:02d}.png")
    source = root / "qa.jsonl"
    with source.open("w") as f:
        for n in range(rows):
            row: dict[str, Any] = {
                "id": f"row-{n:06d}",
                "image": f"images/img-{n % images:02d}.png",
            }
            kind = n % 4
            if kind == 0:
                row |= {"question": f"What number is written in box {n}?", "answer": str(n % 97)}
            elif kind == 1:
                row |= {"question": f"Is shape {n} taller than it is wide?", "answer": "yes"}
            elif kind == 2:
                row |= {
                    "question": f"Which colour is region {n}?",
                    "choices": ["red", "green", "blue", "grey"],
                    "answer": "green",
                }
            else:
                row |= {
                    "question": f"Describe the layout of picture {n}.",
                    "answer": "A coloured square with a black rectangle drawn near the top "
                    "left corner.",
                }
            f.write(json.dumps(row) + "\n")
    return source


def bench_ingest(args: argparse.Namespace, root: Path) -> None:
    source = write_qa(root / "qa", args.rows, args.images)
    out = root / "ingested"
    print(f"### MMAT ingest ({args.rows} JSONL rows over {args.images} PNGs)\n")
    print("| run | written | already done | dropped | seconds | rows/s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for run in ("first", "resume rerun"):
        (result, _), took = timed(run_ingest(IngestConfig(source=source, out=out), False))
        print(
            f"| {run} | {result.written} | {result.skipped} | {result.dropped} | {took:.2f} "
            f"| {args.rows / took:.0f} |"
        )
    stored = len(list((out / "assets").rglob("*.png")))
    print(f"\n{stored} images in the asset store (each stored once).\n")


# -- 3. MMAT engine on the bundled sample ----------------------------------------------------
def bench_mmat(args: argparse.Namespace, root: Path) -> None:
    out = root / "mmat"
    rows = []
    with ScriptedOpenAIServer(teacher, latency_s=args.latency) as server:

        def stage(names: list[Any], out: Path = out) -> tuple[dict[str, Any], float, int]:
            before = server.calls
            config = MMATRunConfig(
                out=out,
                source=SAMPLE,
                stages=names,
                teacher="openai:teacher",
                backend=ModelOptions(base_url=server.base_url, max_retries=0),
                operators=OperatorConfig(
                    operators=["image_caption", "ocr", "face_detection"], corpus=CORPUS
                ),
            )
            summary, took = timed(run_pipeline(config, progress=False))
            return summary, took, server.calls - before

        for name in ("ingest", "rationale", "reflect", "render"):
            summary, took, calls = stage([name])
            text = summary[name]
            if isinstance(text, dict):
                text = "; ".join(text.values())
            rows.append((name, took, calls, text))
        summary, took, calls = stage(["ingest", "rationale", "reflect", "render"])
        rows.append(("rerun (all four)", took, calls, "every item already done"))
        # Rationale again into a fresh output, with the tools already loaded in this process.
        warm = root / "mmat-warm"
        shutil.copytree(out / "tasks", warm / "tasks")
        summary, took, calls = stage(["rationale"], warm)
        rows.append(("rationale, warm tools (fresh output)", took, calls, summary["rationale"]))
    print(
        f"### MMAT engine on the bundled sample ({SAMPLE.name}, 5 items, "
        f"latency {args.latency:g} s)\n"
    )
    print("| stage | seconds | model calls | result |\n| --- | ---: | ---: | --- |")
    for name, took, calls, text in rows:
        print(f"| {name} | {took:.2f} | {calls} | {text} |")
    first = rows[:4]
    print(
        f"\nAll four stages, first run: {sum(r[1] for r in first):.1f} s, "
        f"{sum(r[2] for r in first)} model calls.\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument(
        "--parts",
        nargs="+",
        choices=["mtrace", "ingest", "mmat"],
        default=["mtrace", "ingest", "mmat"],
        help="Which measurements to run.",
    )
    parser.add_argument("--latency", type=float, default=0.0, help="Server latency per call (s).")
    parser.add_argument("--batches", type=int, default=100, help="M-TRACE generator calls.")
    parser.add_argument("--per-batch", type=int, default=10, help="Candidates per call.")
    parser.add_argument("--concurrency", type=int, default=4, help="Generator calls in flight.")
    parser.add_argument(
        "--embedders",
        nargs="+",
        choices=["hashing", "minilm"],
        default=["hashing", "minilm"],
        help="Embedders to filter with.",
    )
    parser.add_argument("--rows", type=int, default=5000, help="MMAT ingest rows.")
    parser.add_argument("--images", type=int, default=20, help="Distinct images those rows use.")
    parser.add_argument("--keep", type=Path, default=None, help="Keep the outputs here.")
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="Run every part in this process (later parts then find MiniLM and the tools "
        "loaded); by default each part runs in a fresh child process, so its loads count.",
    )
    parser.add_argument("--no-header", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.per_batch < 6:
        parser.error("--per-batch must be at least 6 (room for the planted copies)")
    root = args.keep or Path(tempfile.mkdtemp(prefix="tracetune-bench-"))
    if args.keep is not None:
        shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    if not args.no_header:
        load = os.getloadavg()  # other work on the machine skews these numbers
        print(
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load "
            f"average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} before the run; python "
            f"{platform.python_version()}\n",
            flush=True,
        )
    t0 = time.perf_counter()
    parts = {"mtrace": bench_mtrace, "ingest": bench_ingest, "mmat": bench_mmat}
    chosen = [p for p in parts if p in args.parts]
    if len(chosen) == 1 or args.in_process:
        for part in chosen:
            parts[part](args, root)
    else:
        for part in chosen:
            # A fresh process per part: MiniLM and the OCR engine are cached per process, so
            # a part run after another would not pay the loads it pays in a real run.
            command = [sys.executable, __file__, "--parts", part, "--no-header"]
            command += ["--latency", str(args.latency), "--batches", str(args.batches)]
            command += ["--per-batch", str(args.per_batch), "--concurrency", str(args.concurrency)]
            command += ["--embedders", *args.embedders, "--rows", str(args.rows)]
            command += ["--images", str(args.images), "--keep", str(root / part)]
            subprocess.run(command, check=True)
    if not args.no_header:
        print(
            f"Total {time.perf_counter() - t0:.0f} s; load average {os.getloadavg()[0]:.2f} after."
        )
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
