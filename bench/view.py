"""How fast ``tracetune view`` opens and pages a 100K-record trajectory dataset.

    .venv/bin/python bench/view.py [--records 100000] [--chunk 64 1024] [--pages 20]

Generates a trajectory dataset of ``--records`` records (3-step episodes with tool calls,
observations, some typed step errors; statuses, families and tools varied) in the on-disk
layout the stage writers produce (Parquet chunks of ``--chunk`` records written with the
record type's Arrow schema, a manifest), plus one verdict per trajectory in ``verdicts/``,
then measures through the real app (HTTP through FastAPI's test client, HTML rendered):

- open: a fresh app on the folder, then its first list page (the index of light columns is
  built on that first request) -- the target is under 2 s;
- page: a list page of 50 at random page numbers, plain and with filters/search (the target
  is under 300 ms), and a record page (the full record read from its chunk only).

Each chunk layout runs in a fresh process so no cache carries over.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from tracetune.schema import (
    SCHEMA_VERSION,
    STORAGE_CONTEXT,
    Action,
    ErrorKind,
    FileRef,
    GoldAnswer,
    Observation,
    Provenance,
    Step,
    StepError,
    Task,
    ToolCall,
    Trajectory,
    Usage,
    Verdict,
    arrow_schema,
)

FAMILIES = ["receipt", "table", "chart", "form", "document", "compare"]
TOOLS = ["ocr", "calculator", "image_crop", "inspect_file", "search"]


def _trajectory(i: int, rng: random.Random) -> Trajectory:
    family = FAMILIES[i % len(FAMILIES)]
    image = FileRef(
        sha256=f"{i % 997:064x}",
        name="receipt.png",
        mime="image/png",
        size=1000,
        width=400,
        height=300,
    )
    task = Task(
        id=f"task-{i:08d}",
        query=f"What is the total on receipt number {i} from the {family} family?",
        files=[image],
        tools=["ocr", "calculator"],
        gold=GoldAnswer(value=str(i % 1000), kind="number"),
        gold_chain=[ToolCall(name="ocr", arguments={"image": "receipt.png"})],
        provenance=Provenance(source=f"program:{family}"),
        metadata={"family": family},
    )
    steps = []
    for s in range(3):
        tool = TOOLS[(i + s) % len(TOOLS)]
        error = None
        if rng.random() < 0.1:
            error = StepError(kind=ErrorKind.TOOL, message="the tool raised ValueError")
        final = s == 2
        steps.append(
            Step(
                index=s,
                raw=f"Thought: step {s}\nAction: ...",
                thought=f"I will call {tool} now to read the numbers on receipt {i}.",
                action=Action(type="final_answer", answer=str(i % 1000))
                if final
                else Action(type="tool_call", tool_call=ToolCall(name=tool, arguments={"x": s})),
                observation=None
                if final
                else Observation(text=f"TOTAL {i % 1000}.00\nSubtotal {i % 900}.00 " * 5),
                error=error,
                usage=Usage(prompt_tokens=600 + s * 80, completion_tokens=40, calls=1),
                latency_s=0.4,
            )
        )
    return Trajectory(
        id=f"traj-{i:012d}",
        task=task,
        controller="openai:teacher",
        tools=["ocr", "calculator", "final_answer"],
        steps=steps,
        final_answer=str(i % 1000),
        status="completed" if rng.random() < 0.8 else "max_steps",
        usage=Usage(prompt_tokens=2000, completion_tokens=120, calls=3),
    )


def _write(root: Path, kind: str, table: pa.Table, chunk: int) -> None:
    (root / "data").mkdir(parents=True)
    manifest = {"record_type": kind, "schema_version": SCHEMA_VERSION, "tracetune_version": "bench"}
    (root / "manifest.json").write_text(json.dumps(manifest))
    for n, start in enumerate(range(0, table.num_rows, chunk)):
        pq.write_table(table.slice(start, chunk), root / "data" / f"part-{n:05d}.parquet")


def generate(root: Path, records: int, chunk: int) -> None:
    """The dataset, built from real records (dumped exactly as the writer dumps them)."""
    rng = random.Random(0)
    # Dumping 100K pydantic records takes minutes: dump a pool of real records, repeat it
    # in Arrow, and give every row its own id, task id and query.
    pool = [
        _trajectory(i, rng).model_dump(mode="json", context=STORAGE_CONTEXT) for i in range(500)
    ]
    base = pa.Table.from_pylist(pool, schema=arrow_schema(Trajectory))
    table = base.take(pa.array([i % len(pool) for i in range(records)], pa.int64()))
    ids = [f"traj-{i:012d}" for i in range(records)]
    task = table.column("task").combine_chunks()
    fields = {f.name: task.field(f.name) for f in task.type}
    fields["id"] = pa.array([f"task-{i:08d}" for i in range(records)])
    fields["query"] = pa.array(
        [
            f"What is the total on receipt number {i} from the {FAMILIES[i % 6]} family?"
            for i in range(records)
        ]
    )
    table = table.set_column(table.schema.get_field_index("id"), "id", pa.array(ids))
    table = table.set_column(
        table.schema.get_field_index("task"),
        "task",
        pa.StructArray.from_arrays(list(fields.values()), fields=list(task.type)),
    )
    verdict = Verdict(
        id="v",
        target_id="t",
        judge="gold",
        passed=True,
        score=1.0,
        reasons=["matches the gold answer"],
    )
    vrow = verdict.model_dump(mode="json", context=STORAGE_CONTEXT)
    vtable = pa.Table.from_pylist([vrow] * records, schema=arrow_schema(Verdict))
    vtable = vtable.set_column(
        vtable.schema.get_field_index("id"),
        "id",
        pa.array([f"verdict-{i:012d}" for i in range(records)]),
    )
    vtable = vtable.set_column(
        vtable.schema.get_field_index("target_id"), "target_id", pa.array(ids)
    )
    vtable = vtable.set_column(
        vtable.schema.get_field_index("passed"),
        "passed",
        pa.array([i % 3 != 0 for i in range(records)]),
    )
    _write(root, "trajectory", table, chunk)
    _write(root / "verdicts", "verdict", vtable, chunk)


def measure(root: Path, pages: int, cache: Path | None) -> dict[str, object]:
    from fastapi.testclient import TestClient

    from tracetune.view import build_app

    t0 = time.perf_counter()
    client = TestClient(build_app([root], cache_dir=cache))
    start_s = time.perf_counter() - t0
    slug = root.name
    t1 = time.perf_counter()
    first = client.get(f"/d/{slug}/index.html")
    open_s = time.perf_counter() - t1
    assert first.status_code == 200, first.text[:500]
    site = client.app.state.site  # type: ignore[attr-defined]
    source = site.catalog.sources[slug]
    source.index  # noqa: B018  (wait for the background index)
    for verdicts in site.catalog.datasets("verdict"):
        verdicts.index  # noqa: B018
    index_s = time.perf_counter() - t0
    t = time.perf_counter()
    assert client.get(f"/d/{slug}/page/2.html").status_code == 200
    first_indexed_s = time.perf_counter() - t
    n = len(source.files)
    total = len(source)
    rng = random.Random(1)
    last = max(1, total // 50)

    def timed(url: str) -> float:
        t = time.perf_counter()
        r = client.get(url)
        assert r.status_code == 200, (url, r.status_code, r.text[:300])
        return time.perf_counter() - t

    out: dict[str, object] = {
        "records": total,
        "chunks": n,
        "start_s": start_s,
        "open_s": open_s,
        "index_s": index_s,
        "first_indexed_page_s": first_indexed_s,
    }
    cases = {
        "page": lambda: f"/d/{slug}/page/{rng.randint(2, last)}.html",
        "page, status+tool filter": lambda: (
            f"/d/{slug}/page/{rng.randint(2, 50)}.html?status=completed&tool=ocr"
        ),
        "page, verdict filter": lambda: f"/d/{slug}/page/{rng.randint(2, 50)}.html?verdict=failed",
        "page, text search": lambda: f"/d/{slug}/index.html?q=number%20{rng.randint(0, total)}",
        "record": lambda: f"/d/{slug}/r/traj-{rng.randint(0, total - 1):012d}.html",
    }
    for name, url in cases.items():
        times = sorted(timed(url()) for _ in range(pages))
        out[name] = {
            "median_ms": 1000 * statistics.median(times),
            "max_ms": 1000 * times[-1],
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--chunk", type=int, nargs="+", default=[64, 1024])
    parser.add_argument("--pages", type=int, default=20, help="Requests per case.")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # measure one, in-process
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(args.one, args.pages, args.cache)))
        return
    print(f"load average before: {Path('/proc/loadavg').read_text().split()[:3]}")
    with tempfile.TemporaryDirectory() as tmp:
        for chunk in args.chunk:
            root = Path(tmp) / f"traj{chunk}"
            t = time.perf_counter()
            generate(root, args.records, chunk)
            print(
                f"generated {args.records} trajectories in chunks of {chunk}: "
                f"{time.perf_counter() - t:.1f} s"
            )
            cache = Path(tmp) / f"cache{chunk}"
            for run in ("cold", "cached index"):
                done = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--one",
                        str(root),
                        "--pages",
                        str(args.pages),
                        "--cache",
                        str(cache),
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                )
                r = json.loads(done.stdout.strip().splitlines()[-1])
                print(
                    f"\n{r['records']} records in {r['chunks']} chunks of {chunk}, {run}: app "
                    f"start {r['start_s']:.2f} s, then the first page {r['open_s']:.2f} s; "
                    "index (and the verdicts') ready "
                    f"{r['index_s']:.2f} s after start; first indexed page "
                    f"{1000 * r['first_indexed_page_s']:.0f} ms"
                )
                print("| request | median ms | max ms |\n|---|---|---|")
                for name, value in r.items():
                    if isinstance(value, dict):
                        print(f"| {name} | {value['median_ms']:.0f} | {value['max_ms']:.0f} |")
    print(f"\nload average after: {Path('/proc/loadavg').read_text().split()[:3]}")


if __name__ == "__main__":
    main()
