"""The Ray executor on a real two-node Ray cluster on loopback.

The cluster tests need a network namespace whose only interface is loopback, so that Ray
binds nothing but 127.0.0.1: CI runs the suite in one (`.ci/run`). Run anywhere else, each
cluster test runs itself again in a fresh namespace (`unshare -n`, root or user namespaces);
where no namespace can be made it is skipped, saying so.

What they show: a stage with real tools (gold rollouts that OCR task programs' images) and a
stage calling a model on the loopback OpenAI-compatible server run across both nodes, give
the same records as the in-process executor; killing the driver, or a worker node, mid-run
and running again gives the same records, with no item done twice and none lost.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tracetune.agent.run import trajectory_id
from tracetune.models.base import ModelOptions
from tracetune.rollout import RolloutConfig, run_rollout
from tracetune.runner import executor as executor_mod
from tracetune.runner.executor import ExecutorConfig, use_executor
from tracetune.runner.ray_executor import RayExecutorError, fold_worker_states
from tracetune.schema import Task
from tracetune.store import Dataset, RunState
from tracetune.synth.programs.generate import ProgramsConfig, generate_tasks
from tracetune.testing.openai_server import ScriptedOpenAIServer
from tracetune.testing.ray_cluster import LoopbackCluster, loopback_up, only_loopback

IN_NAMESPACE = only_loopback() and loopback_up()
REPO = Path(__file__).resolve().parents[1]
TASKS = 8
SAMPLES = 4  # samples per task in the model stage: 32 items, long enough to be killed mid-run


def rerun_in_namespace(request: pytest.FixtureRequest) -> None:
    """Run the calling test again inside a fresh network namespace with only loopback."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("a Ray cluster on loopback needs unshare and ip (util-linux, iproute2)")
    for flags in (["-n"], ["-rn"]):
        if subprocess.run(["unshare", *flags, "true"], capture_output=True).returncode == 0:
            break
    else:
        pytest.skip("no network namespace can be made here (unshare -n / -rn refused)")
    script = 'ip link set lo up && exec "$0" -m pytest -x -q -p no:cacheprovider "$1"'
    done = subprocess.run(
        ["unshare", *flags, "sh", "-c", script, sys.executable, request.node.nodeid],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LoopbackCluster]:
    with LoopbackCluster(nodes=2, num_cpus=1, tmp=tmp_path_factory.mktemp("ray")) as c:
        yield c


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tasks") / "tasks"
    config = ProgramsConfig(out=root, n=TASKS, seed=11, families=["receipt", "table"])
    asyncio.run(generate_tasks(config, progress=False))
    return root


def records(root: Path) -> list[str]:
    """Every record id on disk, duplicates included."""
    return [r.id for r in Dataset.open(root)]


def statuses(root: Path, stage: str) -> dict[str, str]:
    state = RunState(root / "state.sqlite")
    try:
        return {k: s for k, s, _ in state.items(stage)}
    finally:
        state.close()


def on_ray(cluster: LoopbackCluster, **kwargs: Any) -> Any:
    return use_executor(ExecutorConfig(kind="ray", address=cluster.address, **kwargs))


def wait_for(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def worker_parts(root: Path) -> list[Path]:
    return sorted((root / "data").glob("part-00000-r*.parquet"))


def marked_by_actors(root: Path) -> int:
    """Items the running actors have marked done so far (their own state files)."""
    total = 0
    for shard in (root / "workers").glob("*.sqlite"):
        try:
            db = sqlite3.connect(f"file:{shard}?mode=ro", uri=True, timeout=5)
            try:
                total += db.execute("SELECT COUNT(*) FROM items WHERE status='done'").fetchone()[0]
            finally:
                db.close()
        except sqlite3.Error:
            continue  # being created
    return total


# -- no cluster needed -------------------------------------------------------------------------
def test_executor_settings_from_yaml_and_flags() -> None:
    executor_mod.reset_command()
    try:
        executor_mod.apply_yaml("ray")
        assert executor_mod.active_executor().kind == "ray"
        executor_mod.apply_yaml({"kind": "ray", "address": "auto", "num_gpus": 1})
        executor_mod.set_flag("address", "ray://head:10001")  # the flag wins over the YAML
        active = executor_mod.active_executor()
        assert (active.kind, active.address, active.num_gpus) == ("ray", "ray://head:10001", 1)
        with pytest.raises(ValueError, match="executor.adress"):
            executor_mod.apply_yaml({"kind": "ray", "adress": "auto"})
        executor_mod.reset_command()
        executor_mod.set_flag("workers", 3)  # a --ray-* flag alone means the Ray executor
        assert executor_mod.active_executor().kind == "ray"
    finally:
        executor_mod.reset_command()
    assert executor_mod.active_executor().kind == "local"


def test_cli_gives_every_item_command_the_executor_options() -> None:
    import typer.main

    from tracetune.cli import app

    root = typer.main.get_command(app)
    have = {
        f"{group} {name}".strip()
        for group, command in root.commands.items()
        for name, sub in (getattr(command, "commands", None) or {"": command}).items()
        if any(p.name == "executor" for p in sub.params)
    }
    # `eval run` is a group with a subcommand per benchmark, built when it is asked for
    runs = root.commands["eval"].commands["run"]  # type: ignore[attr-defined]
    for bench in runs.list_commands(None):
        if any(p.name == "executor" for p in runs.get_command(None, bench).params):
            have.add(f"eval run {bench}")
    for wanted in [
        "rollout",
        "agent run",
        "eval run gta",
        "eval run gaia",
        "eval run agentx",
        "eval run vqa",
        "eval run dynvqa",
        "eval run programs",
        "prefs explore",
        "tasks programs",
        "synth queries",
        "synth files",
        "synth rollout",
        "synth run",
        "mmat ingest",
        "mmat rationale",
        "mmat run",
    ]:
        assert wanted in have, wanted
    assert "synth stats" not in have and "prefs stats" not in have


def test_unreachable_address_is_one_clear_error(tasks: Path, tmp_path: Path) -> None:
    import socket

    from typer.testing import CliRunner

    from tracetune.cli import app

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out"
    result = CliRunner().invoke(
        app,
        ["rollout", "--tasks", str(tasks), "--out", str(out), "--quiet"]
        + ["--ray-address", f"127.0.0.1:{port}"],
    )
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert f"cannot reach a Ray cluster at 127.0.0.1:{port}" in text
    assert "ray start --head" in text
    result = CliRunner().invoke(
        app, ["rollout", "--tasks", str(tasks), "--out", str(out), "--ray-address", "nohost"]
    )
    assert result.exit_code == 2 and "is not an address" in " ".join(result.output.split())


def test_worker_states_fold_once_and_never_while_locked(tmp_path: Path) -> None:
    import fcntl

    root = tmp_path / "d"
    (root / "workers").mkdir(parents=True)
    main = RunState(root / "state.sqlite")
    main.mark("s", "a", "failed", {"error": "x"})
    main.close()
    for tag, keys in (("r1w000", ["a", "b"]), ("r1w001", ["c"])):
        shard = RunState(root / "workers" / f"{tag}.sqlite")
        for k in keys:
            shard.mark("s", k, "done")
        from tracetune.schema import Usage

        shard.add_usage("s", "m", Usage(prompt_tokens=10, completion_tokens=5, calls=1))
        shard.close()
    held = os.open(root / "workers" / "r1w001.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(held, fcntl.LOCK_EX)  # a live actor's state: left alone
    try:
        assert fold_worker_states(root) == ["r1w001"]
    finally:
        os.close(held)
    assert statuses(root, "s") == {"a": "done", "b": "done"}  # the newer outcome wins
    assert fold_worker_states(root) == []
    assert fold_worker_states(root) == []  # idempotent: nothing counted twice
    assert statuses(root, "s") == {"a": "done", "b": "done", "c": "done"}
    state = RunState(root / "state.sqlite")
    assert state.usage("s").total_tokens == 30
    state.close()
    assert list((root / "workers").iterdir()) == []


def test_stats_read_what_killed_actors_left(tmp_path: Path) -> None:
    """`synth stats` / `prefs stats` (stage_stats) count the items and spend of actors
    whose run was killed before their states were folded, and the records of every part."""
    from tracetune.runner.stats import stage_stats
    from tracetune.schema import Task, Usage

    root = tmp_path / "d"
    dataset = Dataset.create(root, Task)
    dataset.write_all([Task(id="t1", query="q1")])
    dataset.state.mark("s", "k1", "done")
    dataset.state.close()
    (root / "workers").mkdir()
    shard = RunState(root / "workers" / "r9w000.sqlite")
    shard.mark_many("s", [("k2", "done", None), ("k3", "dropped", {"reason": "too small"})])
    shard.add_usage("s", "openai:m", Usage(prompt_tokens=7, completion_tokens=3, calls=1))
    shard.close()
    from tracetune.runner.ray_executor import _WorkerWriter

    with _WorkerWriter(Dataset.open(root), "r9w000", None, 10.0, 8 << 20) as writer:
        writer.write(Task(id="t2", query="q2"))  # an actor's own part file
    (row,) = stage_stats(root)
    assert (row.done, row.dropped, row.drop_reasons) == (2, 1, {"too small": 1})
    assert row.usage.total_tokens == 10 and row.records == 2
    assert sorted(r.id for r in Dataset.open(root)) == ["t1", "t2"]


# -- on a cluster ------------------------------------------------------------------------------
def test_tool_stage_across_two_nodes_and_a_killed_driver(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> None:
    if not IN_NAMESPACE:
        return rerun_in_namespace(request)
    cluster = request.getfixturevalue("cluster")
    tasks = request.getfixturevalue("tasks")
    tmp = tmp_path_factory.mktemp("tools")
    assert cluster.startup_s < 60, cluster.startup_s

    local, _ = asyncio.run(
        run_rollout(RolloutConfig(tasks=tasks, out=tmp / "local"), progress=False)
    )
    assert local.written + local.dropped == TASKS

    # Both nodes work: each actor writes its own part files.
    with on_ray(cluster, workers=2):
        on, _ = asyncio.run(
            run_rollout(RolloutConfig(tasks=tasks, out=tmp / "ray"), progress=False)
        )
    assert (on.written, on.dropped) == (local.written, local.dropped)
    tags = {p.name.split("-")[2] for p in worker_parts(tmp / "ray")}
    assert len(tags) == 2, tags
    assert sorted(records(tmp / "ray")) == sorted(records(tmp / "local"))
    assert statuses(tmp / "ray", "rollout") == statuses(tmp / "local", "rollout")
    assert not list((tmp / "ray" / "workers").glob("*.sqlite"))  # folded into state.sqlite

    # The driver is SIGKILLed mid-run; the rerun finishes without redoing or losing items.
    out = tmp / "killed"
    driver = textwrap.dedent(
        f"""
        import asyncio
        from tracetune.rollout import RolloutConfig, run_rollout
        from tracetune.runner.executor import ExecutorConfig, use_executor
        with use_executor(ExecutorConfig(kind="ray", address={cluster.address!r}, workers=2,
                                         batch_size=1, concurrency=1, flush_interval_s=0.2)):
            asyncio.run(run_rollout(RolloutConfig(tasks={str(tasks)!r}, out={str(out)!r}),
                                    progress=False))
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", driver])
    try:
        wait_for(lambda: marked_by_actors(out) >= 2, 300, "items done in the killed run")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    wait_for(lambda: not fold_worker_states(out), 60, "the killed run's actors to go")
    done_before = {k for k, s in statuses(out, "rollout").items() if s in ("done", "dropped")}
    assert 2 <= len(done_before) < TASKS
    with on_ray(cluster, workers=2):
        again, _ = asyncio.run(run_rollout(RolloutConfig(tasks=tasks, out=out), progress=False))
    assert again.skipped == len(done_before)  # nothing finished is redone
    ids = records(out)
    assert len(ids) == len(set(ids))  # no duplicates
    assert sorted(ids) == sorted(records(tmp / "local"))  # no loss
    assert statuses(out, "rollout") == statuses(tmp / "local", "rollout")


async def _slow_task(item: str) -> Task:
    await asyncio.sleep(0.05)
    return Task(id=f"t-{item}", query=item)


def test_an_idle_actor_takes_work_from_the_longest_queue(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """Every key hashes to the first actor's queue; the second takes from its tail, so both
    work, and every item is still done once."""
    if not IN_NAMESPACE:
        return rerun_in_namespace(request)
    from tracetune.runner import run_stage
    from tracetune.runner.ray_executor import shard_of

    cluster = request.getfixturevalue("cluster")
    keys = [k for k in (f"k{i}" for i in range(200)) if shard_of(k, 2) == 0][:24]
    out = Dataset.create(tmp_path / "d", Task)
    with on_ray(cluster, workers=2, batch_size=2):
        result = asyncio.run(
            run_stage("slow", keys, key=str, process=_slow_task, out=out, progress=False)
        )
    assert result.written == len(keys)
    ids = records(tmp_path / "d")
    assert sorted(ids) == sorted(f"t-{k}" for k in keys)  # each once
    tags = {p.name.split("-")[2] for p in worker_parts(tmp_path / "d")}
    assert len(tags) == 2, tags  # both actors wrote


def _questions(tasks: Path) -> dict[str, str]:
    return {t.query: t.gold.value for t in Dataset.open(tasks) if t.gold is not None}


def test_model_stage_across_two_nodes_and_a_killed_worker_node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> None:
    if not IN_NAMESPACE:
        return rerun_in_namespace(request)
    cluster = request.getfixturevalue("cluster")
    tasks = request.getfixturevalue("tasks")
    tmp = tmp_path_factory.mktemp("model")
    gold = _questions(tasks)
    by_query = {t.query: t for t in Dataset.open(tasks)}

    def item_of(body: dict[str, Any]) -> str:
        """The key of the rollout item a request belongs to: its task and sample (seed)."""
        text = json.dumps(body["messages"])
        task = next(t for q, t in by_query.items() if json.dumps(q)[1:-1] in text)
        return trajectory_id(task, "openai:test-model", "json", int(body.get("seed") or 0))

    def answer(body: dict[str, Any]) -> str:
        text = " ".join(
            m["content"]
            if isinstance(m["content"], str)
            else " ".join(p.get("text", "") for p in m["content"])
            for m in body["messages"]
        )
        value = next(v for q, v in gold.items() if q in text)
        action = {"name": "final_answer", "arguments": {"answer": value}}
        return f"Thought: done\nAction: {json.dumps(action)}"

    os.environ.setdefault("OPENAI_API_KEY", "test-key")
    with ScriptedOpenAIServer(answer, latency_s=0.4) as srv:

        def config(out: Path) -> RolloutConfig:
            return RolloutConfig(
                tasks=tasks,
                out=out,
                teacher="openai:test-model",
                backend=ModelOptions(base_url=srv.base_url, max_retries=0),
                require_tools=False,
                samples=SAMPLES,
                concurrency=2,
            )

        local, _ = asyncio.run(run_rollout(config(tmp / "local"), progress=False))
        assert local.written == SAMPLES * TASKS
        calls_local = srv.calls

        with on_ray(cluster, workers=2):
            on, _ = asyncio.run(run_rollout(config(tmp / "ray"), progress=False))
        assert on.written == local.written and srv.calls == 2 * calls_local
        assert sorted(records(tmp / "ray")) == sorted(records(tmp / "local"))
        assert len({p.name.split("-")[2] for p in worker_parts(tmp / "ray")}) == 2
        usage = RunState(tmp / "ray" / "state.sqlite").usage()
        assert usage.calls == calls_local  # each actor's spend folded into the directory's

        # Node 1 is SIGKILLed mid-run: one clear error, what was finished is kept.
        out = tmp / "node-killed"
        srv.latency_s = 1.0  # slow enough that the kill lands mid-run on a loaded machine
        with on_ray(cluster, workers=2, batch_size=1, concurrency=1):

            async def run_and_kill() -> None:
                task = asyncio.ensure_future(run_rollout(config(out), progress=False))
                while not marked_by_actors(out):
                    if task.done():
                        raise AssertionError(f"the run ended before the kill: {task.result()}")
                    await asyncio.sleep(0.05)
                await asyncio.to_thread(cluster.kill_node, 1)
                await task

            with pytest.raises(RayExecutorError, match="died") as lost:
                asyncio.run(asyncio.wait_for(run_and_kill(), 180))
        assert "rerun the same command" in str(lost.value)
        done_before = {k for k, s in statuses(out, "rollout").items() if s == "done"}
        assert done_before and len(done_before) < SAMPLES * TASKS
        assert set(records(out)) >= set()  # readable, one dataset

        cluster.restart_node(1)
        srv.latency_s = 0.4
        seen = len(srv.requests)
        with on_ray(cluster, workers=2):
            again, _ = asyncio.run(run_rollout(config(out), progress=False))
        assert again.skipped == len(done_before)  # nothing finished is redone
        asked = [item_of(r.body) for r in srv.requests[seen:]]
        assert len(asked) == len(set(asked))
        assert not set(asked) & done_before  # no finished item's model call made again
        # (items answered in the killed run but not yet done are answered from the cache)
        ids = records(out)
        assert len(ids) == len(set(ids))
        assert sorted(ids) == sorted(records(tmp / "local"))
        assert statuses(out, "rollout") == statuses(tmp / "local", "rollout")


def test_output_dir_not_shared_is_detected(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A node that sees another filesystem at the output path (its own mount) is refused
    before any item runs."""
    if not IN_NAMESPACE:
        return rerun_in_namespace(request)
    cluster = request.getfixturevalue("cluster")
    tasks = request.getfixturevalue("tasks")
    tmp = tmp_path_factory.mktemp("private")
    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("mount namespaces are not permitted here")
    cluster.restart_node(1, private_mount=tmp)
    try:
        with on_ray(cluster, workers=2), pytest.raises(RayExecutorError, match="not shared"):
            asyncio.run(run_rollout(RolloutConfig(tasks=tasks, out=tmp / "out"), progress=False))
        assert not records(tmp / "out")
    finally:
        cluster.restart_node(1)


def test_task_programs_with_workers_on_ray_draw_what_one_process_draws(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """``tasks programs --workers N`` on Ray: the actors draw (no process pool is built on
    the driver) and the tasks, their ids and their files are those of an in-process run."""
    if not IN_NAMESPACE:
        return rerun_in_namespace(request)
    cluster = request.getfixturevalue("cluster")
    tmp = tmp_path_factory.mktemp("programs")

    def drawn(root: Path) -> dict[str, tuple[str, list[str]]]:
        return {t.id: (t.query, [f.sha256 for f in t.files]) for t in Dataset.open(root, Task)}

    config = ProgramsConfig(out=tmp / "local", n=6, seed=5, families=["receipt", "sign"])
    asyncio.run(generate_tasks(config, progress=False))
    with on_ray(cluster, workers=2):
        ray_config = config.model_copy(update={"out": tmp / "ray", "workers": 2})
        result, _ = asyncio.run(generate_tasks(ray_config, progress=False))
    assert result.written == 6
    assert drawn(tmp / "ray") == drawn(tmp / "local")
    assert len(records(tmp / "ray")) == 6
