"""Per-call latency of each offline built-in tool on the bundled samples, as a markdown table.

    .venv/bin/python bench/tools_latency.py [--repeat 20] [--only ocr search]

Each case runs in a fresh Python process, so "first call" is what a new worker pays: the
tool's imports, its one-time setup (OCR engine, cascades, markitdown, the embedding model and
the corpus index) and the call itself. "Warm" is ``--repeat`` further calls with the same
arguments in that process (mean, median and 95th percentile). Inputs are the bundled
receipt (520x586) and astronaut photo (512x512), a generated xlsx and pdf, and the bundled
12-passage corpus.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CASES: dict[str, tuple[str, str]] = {
    # name: (tool, what it is run on)
    "ocr": ("ocr", "receipt.png, 11 text rows"),
    "face_detection": ("face_detection", "astronaut.png, 1 face"),
    "image_crop": ("image_crop", "astronaut.png, 93x93 box"),
    "image_zoom": ("image_zoom", "astronaut.png, 93x93 box x3"),
    "draw_box": ("draw_box", "astronaut.png, labelled box"),
    "add_text": ("add_text", "astronaut.png, one line"),
    "calculator": ("calculator", "sum of 6 prices"),
    "solver": ("solver", "2x2 linear system"),
    "inspect_file_xlsx": ("inspect_file", "xlsx, 1 sheet x 51 rows"),
    "inspect_file_pdf": ("inspect_file", "pdf, 1 page, 20 lines"),
    "search_hybrid": ("search", "bundled corpus, 12 passages, hybrid"),
    "search_bm25": ("search", "bundled corpus, 12 passages, bm25 only"),
}


def prepare(case: str, workdir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """Arguments and options for one case; files are put in ``workdir``."""
    from tracetune.data import CORPUS, FACE_PHOTO, RECEIPT_IMAGE

    shutil.copy(RECEIPT_IMAGE, workdir / "receipt.png")
    shutil.copy(FACE_PHOTO, workdir / "astronaut.png")
    face_box = [177, 67, 270, 160]
    if case == "inspect_file_xlsx":
        import openpyxl  # type: ignore[import-untyped]

        book = openpyxl.Workbook()
        sheet = book.active
        sheet.append(["item", "qty", "price"])
        for i in range(50):
            sheet.append([f"part-{i}", i % 7 + 1, round(1.5 * i + 0.25, 2)])
        book.save(workdir / "parts.xlsx")
    if case == "inspect_file_pdf":
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.backends.backend_pdf import PdfPages

        with PdfPages(workdir / "memo.pdf") as pdf:
            fig = plt.figure(figsize=(8.5, 11))
            for i in range(20):
                fig.text(
                    0.1,
                    0.95 - 0.04 * i,
                    f"Line {i}: the shipment of {i * 3} crates left the depot on schedule.",
                    fontsize=10,
                )
            pdf.savefig(fig)
            plt.close(fig)
    table: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
        "ocr": ({"image": "receipt.png"}, {}),
        "face_detection": ({"image": "astronaut.png"}, {}),
        "image_crop": ({"image": "astronaut.png", "box": face_box}, {}),
        "image_zoom": ({"image": "astronaut.png", "box": face_box, "factor": 3}, {}),
        "draw_box": ({"image": "astronaut.png", "box": face_box, "label": "face"}, {}),
        "add_text": ({"image": "astronaut.png", "text": "Commander Collins"}, {}),
        "calculator": ({"expression": "3.49 + 5.25 + 6.80 + 4.15 + 2.38 + 11.90"}, {}),
        "solver": ({"equations": ["2x + 3y = 7", "x - y = 1"]}, {}),
        "inspect_file_xlsx": ({"path": "parts.xlsx"}, {}),
        "inspect_file_pdf": ({"path": "memo.pdf"}, {}),
        "search_hybrid": (
            {"query": "how do bees tell each other where flowers are"},
            {"search": {"corpus": str(CORPUS)}},
        ),
        "search_bm25": (
            {"query": "waggle dance distance"},
            {"search": {"corpus": str(CORPUS), "mode": "bm25"}},
        ),
    }
    return table[case]


def measure(case: str, repeat: int) -> dict[str, Any]:
    """Run one case in this process: first call, then ``repeat`` warm calls."""
    from tracetune.tools import ToolContext, get_tool

    tool_name = CASES[case][0]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        arguments, options = prepare(case, workdir)
        ctx = ToolContext(workdir=workdir, options=options)
        tool = get_tool(tool_name)
        call: Callable[[], Any] = lambda: tool(ctx, **arguments)  # noqa: E731
        start = time.perf_counter()
        result = call()
        first = time.perf_counter() - start
        warm = []
        for _ in range(repeat):
            start = time.perf_counter()
            call()
            warm.append(time.perf_counter() - start)
    return {
        "case": case,
        "first_s": first,
        "warm_s": warm,
        "output": result.text.splitlines()[0][:60] if result.text else "",
    }


def run_isolated(case: str, repeat: int) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, __file__, "--case", case, "--repeat", str(repeat)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"case {case} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=20, help="Warm calls per tool.")
    parser.add_argument("--only", nargs="*", choices=sorted(CASES), help="Cases to run.")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case, JSON out
    args = parser.parse_args()
    if args.case:
        print(json.dumps(measure(args.case, args.repeat)))
        return
    cases = args.only or list(CASES)
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}; load average before: "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )
    print(f"warm calls per tool: {args.repeat}; each tool in a fresh process\n")
    print("| tool | input | first call (ms) | warm mean (ms) | warm p50 (ms) | warm p95 (ms) |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for case in cases:
        row = run_isolated(case, args.repeat)
        warm = [1000 * s for s in row["warm_s"]]
        p95 = sorted(warm)[max(0, round(0.95 * len(warm)) - 1)] if warm else float("nan")
        label = CASES[case][0] + (f" ({case.split('_')[-1]})" if case != CASES[case][0] else "")
        print(
            f"| {label} | {CASES[case][1]} | {1000 * row['first_s']:.0f} | "
            f"{statistics.fmean(warm):.1f} | {statistics.median(warm):.1f} | {p95:.1f} |",
            flush=True,
        )
    print(f"\nload average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
