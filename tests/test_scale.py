"""Scale: one concurrency knob, batched state, `data check`, sub-quadratic dedup, the bench."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tracetune.cli import app
from tracetune.runner import run_stage
from tracetune.schema import Task
from tracetune.store import Dataset
from tracetune.store.check import check_dataset
from tracetune.testing import ScriptedOpenAIServer

ANSWER = 'Thought: easy\nAction: {"name": "final_answer", "arguments": {"answer": "ok"}}'


def _tasks_file(tmp_path: Path, n: int) -> Path:
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join(json.dumps({"query": f"Compute {i}+1"}) for i in range(n)))
    return path


def _agent_run(tmp_path: Path, server: ScriptedOpenAIServer, *extra: str) -> None:
    args = ["agent", "run", "--model", "openai:test-model", "--base-url", server.base_url]
    args += ["--tasks", str(tmp_path / "tasks.jsonl"), "--quiet", *extra]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("flag", "yaml_text", "expected"),
    [
        (["--concurrency", "24"], None, 24),  # the flag: requests in flight, uncapped
        ([], "concurrency: 12\n", 12),  # the same key in YAML
        ([], None, 4),  # the documented default
        (["--concurrency", "24"], "backend:\n  concurrency: 6\n", 6),  # asked for: honoured
    ],
)
def test_concurrency_sets_requests_in_flight_at_the_server(
    tmp_path: Path, flag: list[str], yaml_text: str | None, expected: int
) -> None:
    _tasks_file(tmp_path, 48)
    extra = [*flag, "--out", str(tmp_path / "out")]
    if yaml_text is not None:
        (tmp_path / "run.yaml").write_text(yaml_text)
        extra += ["--config", str(tmp_path / "run.yaml")]
    with ScriptedOpenAIServer(lambda body: ANSWER, latency_s=0.25) as server:
        _agent_run(tmp_path, server, *extra)
        assert server.calls == 48
        assert server.max_in_flight == expected


def test_help_shows_the_concurrency_default() -> None:
    result = CliRunner().invoke(app, ["agent", "run", "--help"])
    text = " ".join(result.output.replace("│", " ").split())  # rich wraps help in a box
    assert "--concurrency" in text
    assert "Model requests in flight, and episodes run at once. [default: 4]" in text


async def _upper(task: Task) -> Task:
    return task.model_copy(update={"query": task.query.upper()})


def _stage(out: Dataset[Task], n: int) -> tuple[int, int]:
    tasks = [Task(id=f"t{i}", query=f"q{i}") for i in range(n)]
    result = asyncio.run(
        run_stage("s", tasks, lambda t: t.id, _upper, out, progress=False, chunk_size=10)
    )
    return result.written, result.skipped


def test_data_check_finds_and_repairs_a_deleted_chunk(tmp_path: Path) -> None:
    out = Dataset.create(tmp_path / "out", Task)
    assert _stage(out, 50) == (50, 0)
    chunks = out.chunk_files()
    assert len(chunks) == 5
    assert check_dataset(out.root).ok
    lost = set(pq.read_table(chunks[2], columns=["id"]).column("id").to_pylist())
    chunks[2].unlink()
    # Another chunk is damaged: unreadable files are set aside, their items redone too.
    chunks[4].write_bytes(b"not parquet")
    dry = CliRunner().invoke(app, ["data", "check", str(out.root), "--dry-run"])
    assert dry.exit_code == 1 and "20 with records missing" in dry.output
    assert out.state.counts("s") == {"done": 50}  # a dry run changes nothing
    fixed = CliRunner().invoke(app, ["data", "check", str(out.root)])
    assert fixed.exit_code == 0, fixed.output
    assert out.state.counts("s") == {"done": 30}
    assert (chunks[4].parent / (chunks[4].name + ".unreadable")).exists()
    # The rerun redoes exactly the lost items, and nothing is duplicated.
    assert _stage(Dataset.open(out.root, Task), 50) == (20, 30)
    ids = [t.id for t in Dataset.open(out.root, Task)]
    assert sorted(ids) == sorted(f"t{i}" for i in range(50)) and len(ids) == 50
    assert lost <= set(ids)
    assert check_dataset(out.root).ok


KILLED_STAGE = """
import asyncio, sys
from tracetune.runner import run_stage
from tracetune.schema import Task
from tracetune.store import Dataset

async def process(task):
    await asyncio.sleep(0.005)
    return [task, task.model_copy(update={"id": task.id + "-b"})]

out = Dataset.create(sys.argv[1], Task)
tasks = [Task(id=f"t{i}", query=f"q{i}") for i in range(int(sys.argv[2]))]
r = asyncio.run(run_stage("s", tasks, lambda t: t.id, process, out, concurrency=8,
                          progress=False, chunk_size=37, flush_interval_s=0.05))
print(r.written, r.skipped)
"""


def test_sigkill_at_random_moments_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    import random
    import signal
    import subprocess
    import sys
    import time

    n = 3000
    cmd = [sys.executable, "-c", KILLED_STAGE, str(tmp_path / "out"), str(n)]
    rng = random.Random(13)
    data = tmp_path / "out" / "data"
    for round_ in range(3):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        # Killed a random moment after this run wrote something (whatever the machine's load).
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if len(list(data.glob("part-*.parquet"))) > 10 * (round_ + 1):
                break
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        report = check_dataset(tmp_path / "out", repair=False)
        assert report.ok, report.summary()  # every item marked done has its records
    final = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert final.returncode == 0, final.stderr
    ids = [t.id for t in Dataset.open(tmp_path / "out", Task)]
    assert len(ids) == len(set(ids)) == 2 * n
    out = Dataset.open(tmp_path / "out", Task)
    assert out.state.counts("s") == {"done": n}
    assert check_dataset(out.root, repair=False).ok


def _filter_outcome(config: object) -> tuple[list[str], list[tuple[str, str, str]]]:
    from tracetune.store import RunState

    root = config.dir("queries")  # type: ignore[attr-defined]
    kept = sorted(t.id for t in Dataset.open(root, Task))
    state = RunState(root / "state.sqlite")
    drops = sorted(
        (k, str(i["reason"]), str(i.get("of", i.get("seed"))))
        for k, s, i in state.items("queries.filter")
        if s == "dropped"
    )
    state.close()
    return kept, drops


def test_ann_query_filter_keeps_what_the_exact_filter_keeps(tmp_path: Path) -> None:
    from tracetune.synth.mtrace.queries import filter_queries
    from tracetune.testing.scale_data import filter_run, planted_queries

    outcomes = {}
    for search in ("exact", "ann", "auto"):
        config = filter_run(tmp_path / search, 1500, search)
        asyncio.run(filter_queries(config, progress=False))
        outcomes[search] = _filter_outcome(config)
    assert outcomes["ann"] == outcomes["exact"] == outcomes["auto"]
    # ...and both drop exactly the planted duplicates (plus the two seeds' copies).
    planted = planted_queries(1500)
    kept, drops = outcomes["exact"]
    duplicates = {f"cand-{i:07d}" for i, q in enumerate(planted) if q["duplicate_of"] is not None}
    assert {k for k, reason, _ in drops if reason == "near-duplicate"} <= duplicates
    assert len(kept) + len(drops) == 1500 and not duplicates & set(kept)


def test_ann_index_moves_from_exact_search_at_its_limit_and_answers_alike() -> None:
    import numpy as np

    from tracetune.synth.mtrace.neardup import NearestIndex

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((600, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    auto, exact = NearestIndex(32, "auto", exact_limit=100), NearestIndex(32, "exact")
    for i, vector in enumerate(vectors):
        if i:  # a noisy copy of an earlier vector: both find that one, with its similarity
            j = int(rng.integers(0, i))
            noisy = vectors[j] + 0.05 * rng.standard_normal(32).astype(np.float32)
            noisy /= np.linalg.norm(noisy)
            (score_a, found_a), (score_e, found_e) = auto.nearest(noisy), exact.nearest(noisy)
            assert found_a == found_e == j
            assert abs(score_a - score_e) < 2e-3  # the graph stores float16
        auto.add(vector)
        exact.add(vector)
    assert auto.approximate and not exact.approximate


def test_ann_index_in_the_background_answers_as_one_rebuilt_from_the_same_batches(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch is searched exactly by the first search after it and then goes into the
    graph (in a child process): an index searched once between batches, as the query filter
    does, answers as one rebuilt from the same batches without searches (a resumed filter),
    empty batches included; and it finds planted copies in every batch."""
    import numpy as np

    from tracetune.synth.mtrace import neardup

    monkeypatch.setattr(neardup, "PENDING_ROWS", 40)  # batches above this go in at once
    rng = np.random.default_rng(3)
    dim = 96  # above ANN_DIM: the graph holds projections

    def unit(rows: np.ndarray) -> np.ndarray:
        return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)

    sizes = [30, 0, 25, 60, 0, 0, 12, 40, 1, 35, 0, 20]
    batches = [unit(rng.standard_normal((n, dim))) for n in sizes]
    everything = np.concatenate(batches)
    queries = unit(rng.standard_normal((50, dim)))  # no clear nearest: the graph decides
    with neardup.NearestIndex(dim, "ann", background=True) as searched:
        seen = 0
        for done, batch in enumerate(batches):
            if seen:  # noisy copies of earlier vectors (the latest batch's among them)
                picks = rng.integers(0, seen, 20)
                noisy = unit(everything[picks] + 0.03 * rng.standard_normal((20, dim)))
                sims, found = searched.nearest_many(np.concatenate([noisy, queries]))
                assert (found[:20] == picks).all()
                assert np.allclose(sims[:20], np.sum(noisy * everything[picks], axis=1), atol=2e-3)
                if done in (2, 6, len(batches) - 1):  # after an empty batch, and at the end
                    with neardup.NearestIndex(dim, "ann", background=True) as rebuilt:
                        for earlier in batches[:done]:
                            rebuilt.add_many(earlier)
                        theirs = rebuilt.nearest_many(queries)
                    assert (found[20:] == theirs[1]).all(), done
                    assert np.allclose(sims[20:], theirs[0], atol=1e-6)
            searched.add_many(batch)
            seen += len(batch)
        # The graph's process killed under it: a clear error, not a hang.
        searched._graph._process.kill()  # type: ignore[union-attr]
        with pytest.raises(RuntimeError, match="ended unexpectedly.*rerun"):
            searched.nearest_many(queries)


def _graph_processes(cwd: Path) -> list[int]:
    """Graph processes started from ``cwd`` (they inherit their parent's)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes()
            where = os.readlink(entry / "cwd")
        except OSError:
            continue
        if entry.name.isdigit() and b"serve_graph" in cmdline and where == str(cwd):
            found.append(int(entry.name))
    return found


FILTER_SCRIPT = """
import asyncio, sys
from tracetune.synth.mtrace.queries import filter_queries
from tracetune.testing.scale_data import filter_run
config = filter_run(sys.argv[1], int(sys.argv[2]), "ann")
asyncio.run(filter_queries(config, progress=False))
"""


def test_ann_filter_killed_at_random_moments_and_resumed_keeps_the_same_set(
    tmp_path: Path,
) -> None:
    import random
    import signal
    import subprocess
    import sys
    import time

    from tracetune.synth.mtrace.queries import filter_queries
    from tracetune.testing.scale_data import filter_run

    n = 4000
    reference = filter_run(tmp_path / "ref", n, "ann")
    asyncio.run(filter_queries(reference, progress=False))
    # The resumed run starts from the same inputs.
    filter_run(tmp_path / "killed", n, "ann")
    cmd = [sys.executable, "-c", FILTER_SCRIPT, str(tmp_path / "killed"), str(n)]
    rng = random.Random(7)
    data = tmp_path / "killed" / "run" / "queries" / "data"
    partial = []
    for round_ in range(3):
        proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path
        )
        # Killed a random moment after the run has written more than before (whatever the
        # machine's load), so each kill lands mid-run with work on disk and in flight.
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            if len(list(data.glob("part-*.parquet"))) > round_:
                break
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        partial.append(len(Dataset.open(data.parent, Task)))
    final = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert final.returncode == 0, final.stderr
    assert _filter_outcome(filter_run(tmp_path / "killed", n, "ann")) == _filter_outcome(reference)
    assert any(0 < p < len(_filter_outcome(reference)[0]) for p in partial), partial
    # The graph processes of the killed runs ended with them (their stdin closed).
    deadline = time.monotonic() + 10
    while _graph_processes(tmp_path) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _graph_processes(tmp_path) == []


@pytest.mark.parametrize("bits", [4, 16, 20])
def test_hash_index_answers_as_a_full_scan_with_planted_copies(bits: int) -> None:
    from tracetune.synth.mtrace.neardup import HashIndex
    from tracetune.testing.scale_data import planted_hashes

    index: HashIndex[int] = HashIndex(bits)
    kept: list[int] = []
    for code in planted_hashes(1500, seed=bits):
        near = next((c for c in kept if (c ^ code).bit_count() <= bits), None)
        assert index.find(code) == near
        if near is None:
            index.add(code, code)
            kept.append(code)


def test_file_ref_walk_skips_only_fields_that_cannot_hold_refs() -> None:
    from pydantic import BaseModel

    from tracetune.schema import (
        ContentPart,
        Dialogue,
        FileRef,
        Message,
        Observation,
        PreferencePair,
        Step,
        Trajectory,
    )
    from tracetune.store.assets import iter_file_refs

    def full_walk(obj: object) -> list[FileRef]:  # every field, as before the shortcut
        if isinstance(obj, FileRef):
            return [obj]
        if isinstance(obj, BaseModel):
            return [r for name in type(obj).model_fields for r in full_walk(getattr(obj, name))]
        if isinstance(obj, list | tuple):
            return [r for item in obj for r in full_walk(item)]
        return []

    def ref(i: int) -> FileRef:
        return FileRef(sha256=f"{i:064x}", name=f"f{i}.png", mime="image/png")

    task = Task(id="t", query="q", files=[ref(1), ref(2)])
    step = Step(index=0, raw="r", observation=Observation(text="o", images=[ref(3)]))
    records = [
        task,
        Trajectory(id="j", task=task, controller="c", steps=[step]),
        PreferencePair(
            id="p", task=task, prefix=[step], chosen=step, rejected=Step(index=1, raw="x")
        ),
        Dialogue(
            id="d",
            task=task,
            format="chat",
            messages=[
                Message(role="user", content=[ContentPart(type="image", image=ref(4))]),
                Message.of("assistant", "ok", [ref(5)]),
            ],
        ),
    ]
    for record in records:
        found = list(iter_file_refs(record))
        assert found == full_walk(record) and found


def test_scale_bench_runs_at_1k(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """bench/scale.py at 1K, in this process: it must keep working as the code changes."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "bench" / "scale.py"
    spec = importlib.util.spec_from_file_location("scale_bench", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "scale.json"
    assert bench.main(["--sizes", "300", "1000", "--in-process", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    parts = {(r["part"], r["n"]) for r in data["growth"]}
    for name in ("runner", "rerun", "agent", "store write", "store read", "filter", "pool dedup"):
        assert {(name, 300), (name, 1000)} <= parts
    assert {f["part"] for f in data["fits"]} >= {"runner", "filter", "pool dedup"}
    assert "growth exponent" in capsys.readouterr().out
    # The side-by-side run, small: a real CLI stage against the loopback server.
    assert (
        bench.main(
            ["--side-by-side", "--generations", "40", "--latency", "0.05", "--concurrency", "16"]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert "(c) CLI `agent run`" in text and "| 16 |" in text  # 16 in flight at the server


def test_batched_usage_and_cache_are_seen_by_other_readers_and_survive_exit(
    tmp_path: Path,
) -> None:
    import subprocess
    import sys

    from tracetune.schema import Usage
    from tracetune.store import RunState

    path = tmp_path / "state.sqlite"
    writer = RunState(path)
    writer.add_usage("s", "m", Usage(prompt_tokens=3, completion_tokens=4, calls=1))
    writer.cache_put("k", {"v": 1})
    assert writer.usage("s").total_tokens == 7  # counted at once, though not yet written
    reader = RunState(path)  # another object on the same file, in this process
    assert reader.usage().total_tokens == 7 and reader.cache_get("k") == {"v": 1}
    writer.add_usage("s", "m", Usage(prompt_tokens=1, calls=1))
    assert reader.usage("s").calls == 2
    # A process that exits without closing its state still writes what it kept in memory.
    code = (
        "import sys; from tracetune.store import RunState; from tracetune.schema import Usage\n"
        "s = RunState(sys.argv[1]); s.add_usage('t', 'm', Usage(completion_tokens=5, calls=1))\n"
        "s.cache_put('k2', [2])\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path)], check=True, timeout=60)
    fresh = RunState(path)
    assert fresh.usage("t").completion_tokens == 5 and fresh.cache_get("k2") == [2]
    for state in (writer, reader, fresh):
        state.close()


def test_agent_run_streams_its_tasks_and_checks_the_file_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A task file is checked whole before any episode (a bad line fails the run with nothing
    done), then its tasks are built as the run reaches them, not all up front."""
    from tracetune.agent.run import AgentRunConfig, run_agent
    from tracetune.errors import TracetuneError
    from tracetune.store import tasks as tasks_mod
    from tracetune.testing import ScriptedChatModel

    n = 300
    rows = [{"query": f"What is {i} + 1?"} for i in range(n)]
    tasks_file = tmp_path / "tasks.jsonl"
    bad = [*rows[:250], {"query": "Read this.", "images": ["missing.png"]}, *rows[250:]]
    tasks_file.write_text("".join(json.dumps(r) + "\n" for r in bad))
    config = AgentRunConfig(
        model="scripted:instant",
        out=tmp_path / "agent",
        tasks=tasks_file,
        tools=["calculator"],
        max_steps=1,
        concurrency=4,
    )
    answer = 'Thought: done.\nAction: {"name": "final_answer", "arguments": {"answer": "1"}}'
    with pytest.raises(TracetuneError, match=r"tasks.jsonl:251: task file .*missing.png"):
        asyncio.run(run_agent(config, model=ScriptedChatModel(lambda m: answer), progress=False))
    assert not Dataset.open(tmp_path / "agent").chunk_files()

    tasks_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    built: list[int] = []
    seen_at_first_call: list[int] = []
    real = tasks_mod.task_from_inputs

    def counting(*args: object, **kwargs: object) -> object:
        built.append(1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    def reply(messages: object) -> str:
        if not seen_at_first_call:
            seen_at_first_call.append(len(built))
        return answer

    monkeypatch.setattr(tasks_mod, "task_from_inputs", counting)
    result, _ = asyncio.run(
        run_agent(config, model=ScriptedChatModel(reply, spec="scripted:instant"), progress=False)
    )
    assert result.written == n and len(built) == n
    assert seen_at_first_call[0] <= 2 * config.concurrency  # not all 300 before the first
