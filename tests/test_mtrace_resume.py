"""Killing ``tracetune synth run`` (SIGKILL, random moments) and resuming changes nothing."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from mtrace_script import Script, config_yaml, write_seeds

from tracetune.store import Dataset
from tracetune.synth.mtrace import PoolConfig, SynthConfig, build_pool, run_chain
from tracetune.synth.mtrace.config import LAYOUT
from tracetune.synth.mtrace.pool import BUNDLED_POOL_CAPTIONS, BUNDLED_POOL_IMAGES
from tracetune.testing.openai_server import ScriptedOpenAIServer

pytestmark = pytest.mark.slow

# Three batches of two distinct queries; three need a receipt, and the reuse cap of 2 sends
# the third to another image, which must be the same one after any resume.
PLAN = [
    [
        {
            "query": "According to the receipt in the photo and my budget spreadsheet, did I stay "
            "within the grocery budget?",
            "tools": ["visual_qa", "inspect_file"],
        },
        {
            "query": "Does the rainfall chart agree with the figure for January given in the "
            "weather report PDF?",
            "tools": ["inspect_file", "visual_qa"],
        },
    ],
    [
        {
            "query": "My flatmate pays half of this receipt: check our shared spreadsheet and say "
            "if we went over on groceries.",
            "tools": ["visual_qa", "inspect_file"],
        },
        {
            "query": "Using the attached PDF and the rainfall bar chart, was January the wettest "
            "month?",
            "tools": ["inspect_file", "visual_qa"],
        },
    ],
    [
        {
            "query": "Compare the total of this receipt with the budget sheet I attached: am I "
            "under or over?",
            "tools": ["visual_qa", "inspect_file"],
        },
        {
            "query": "Is a short note about tomorrow's picnic plan attached, and what does it say?",
            "tools": ["inspect_file"],
        },
    ],
]
VOLATILE = {"started_at", "duration_s", "latency_s", "exec_s", "usage", "created_at"}


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def snapshot(run: Path) -> dict[str, dict[str, Any]]:
    """Every stage directory's records by id, without timings and usage (cache hits differ)."""
    out: dict[str, dict[str, Any]] = {}
    for name, _ in [*LAYOUT, ("verified/verdicts", ""), ("final/verdicts", "")]:
        if not (run / name / "manifest.json").exists():
            out[name] = {}
            continue
        rows = [r.model_dump(mode="json") for r in Dataset.open(run / name)]
        ids = [r["id"] for r in rows]
        assert len(ids) == len(set(ids)), f"duplicates in {name}"
        out[name] = {r["id"]: _strip(r) for r in rows}
    return out


def progress(run: Path) -> int:
    """Items finished (done or dropped) over every stage directory of a run."""
    return sum(progress_of(run, name) for name, _ in LAYOUT)


def progress_of(run: Path, name: str) -> int:
    """Items finished (done or dropped) in one stage directory of a run."""
    path = run / name / "state.sqlite"
    if not path.exists():
        return 0
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    try:
        return int(
            db.execute("SELECT COUNT(*) FROM items WHERE status IN ('done', 'dropped')").fetchone()[
                0
            ]
        )
    except sqlite3.OperationalError:  # tables not created yet
        return 0
    finally:
        db.close()


def test_killed_and_resumed_run_equals_uninterrupted_run(tmp_path: Path) -> None:
    pool = tmp_path / "pool"
    asyncio.run(
        build_pool(
            PoolConfig(
                images=BUNDLED_POOL_IMAGES,
                captions=BUNDLED_POOL_CAPTIONS,
                out=pool,
                embedder="hashing",
            ),
            progress=False,
        )
    )
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds)
    # Slow answers stretch the run so that kills land inside every stage.
    with ScriptedOpenAIServer(Script(queries=PLAN), latency_s=0.02) as srv:  # type: ignore[arg-type]

        def config(name: str) -> Path:
            path = tmp_path / f"{name}.yaml"
            path.write_text(
                config_yaml(
                    str(tmp_path / name),
                    srv.base_url,
                    str(pool),
                    str(seeds),
                    batches=3,
                    embedder="hashing",
                )
            )
            return path

        reference_config = SynthConfig.model_validate(yaml.safe_load(config("ref").read_text()))
        asyncio.run(run_chain(reference_config, progress=False))
        reference = snapshot(tmp_path / "ref")
        assert len(reference["final"]) == 6
        receipts = [
            t["task"]["files"][0]["name"]
            for t in reference["final"].values()
            if "receipt" in t["task"]["query"]
        ]
        assert sorted(receipts).count("receipt.png") == 2  # the reuse cap held

        cmd = [
            sys.executable,
            "-m",
            "tracetune.cli",
            "synth",
            "run",
            str(config("killed")),
            "--quiet",
        ]
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # Kill at five random points of the chain's progress (items finished, over all
        # stages), each plus a random sliver of time so that kills also land mid-item.
        # A stage marks its items done a chunk at a time (at its end, for a run this small),
        # so progress shows in steps: a target is seen only when its stage ends, and the kill
        # lands (after a random sliver) in the stage that follows. Targets are drawn before
        # the last two stages, so that following stage is never the end of the run.
        rng = random.Random(5)
        total = progress(tmp_path / "ref")
        tail = sum(progress_of(tmp_path / "ref", name) for name, _ in LAYOUT[-2:])
        targets = sorted(rng.sample(range(1, total - tail), 5))
        kills = []
        for target in targets:
            proc = subprocess.Popen(
                cmd,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            deadline = time.monotonic() + 60
            while proc.poll() is None and progress(tmp_path / "killed") < target:
                assert time.monotonic() < deadline, "the killed run makes no progress"
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.3))
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)  # the CLI and its sandbox workers
                kills.append(progress(tmp_path / "killed"))
            proc.wait(timeout=30)
            snapshot(tmp_path / "killed")  # no duplicates at any point
        final = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert final.returncode == 0, final.stderr[-3000:]
    assert len(kills) == 5 and sum(k < total for k in kills) >= 4, kills  # all mid-run
    assert snapshot(tmp_path / "killed") == reference

    stats = subprocess.run(
        [
            sys.executable,
            "-m",
            "tracetune.cli",
            "synth",
            "stats",
            str(tmp_path / "killed"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    rows = {r["stage"]: r for r in json.loads(stats.stdout)}
    assert rows["verify_trajectories"]["done"] == 6
    assert rows["queries.filter"]["failed"] == 0
