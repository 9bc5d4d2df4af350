"""The Ray executor: a stage's items processed by Ray actors across a cluster.

The stage code is the one the in-process executor runs: the same process function, keys,
records, drops and :class:`~tracetune.runner.stage.StageCore`. What changes is where things
happen::

    driver (this process)                      actor i (any node)
    ---------------------                      ------------------
    skip set from DIR/state.sqlite             loads the stage's tools and models once
    shards the pending items by key into       a StageCore over DIR with its own
      a queue per actor (an idle actor takes     part files  DIR/data/part-00000-<tag>-*.parquet
      the tail of the longest one)               run state   DIR/workers/<tag>.sqlite
    sends batches, keeps 2 in flight/actor     an async HTTP client per model, bounded
    budget + failure threshold (its view)      marks an item done only once the chunk
    one progress bar, drops, tokens, cost        holding its records is on disk
    folds the workers' states into
      DIR/state.sqlite at the end

``DIR`` must be on a filesystem every node mounts at the same path (NFS, a cluster
filesystem): actors write there directly. The driver checks this before any item runs (a
file it writes must be visible to every actor, and theirs to it).

Exactly once: an actor's item is marked done in its own state after its records landed; a
killed actor (node lost, driver killed) leaves its state file and part files behind. The next
run folds every state file no live actor holds (each actor holds an exclusive lock on
``DIR/workers/<tag>.lock`` while it runs) into ``DIR/state.sqlite`` and skips what is done;
the items in flight are redone, and records already on disk are recognised by their ids, so
nothing is written twice and nothing is lost.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import fcntl
import hashlib
import io
import json
import os
import secrets
import socket
import sqlite3
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from tracetune.errors import BAD_INPUT_EXIT, TracetuneError
from tracetune.runner import outcome
from tracetune.runner.executor import ExecutorConfig
from tracetune.schema import RECORD_TYPES, Record, Usage
from tracetune.store import AssetStore, Dataset, DatasetWriter, RunState

if TYPE_CHECKING:
    from tracetune.runner.stage import Budget, Drop, StageResult

T = TypeVar("T")

WORKERS_DIR = "workers"
# Batches in flight per actor: one running, one queued behind it, so no actor waits on the
# driver between batches.
IN_FLIGHT_BATCHES = 2
# How often the driver checks that the actors' nodes are alive while it waits (seconds).
LIVENESS_INTERVAL_S = 2.0
# How long a rerun waits for the actors of a killed run to go before refusing (seconds).
STALE_WORKER_WAIT_S = 20.0
# How long the actors may take to put their last chunk on disk at the end (seconds).
FINISH_TIMEOUT_S = 120.0


class RayExecutorError(TracetuneError, RuntimeError):
    """The Ray executor cannot run or finish: a clear message with the fix.

    ``exit_code`` is 2 for settings to fix (address, output path), 3 when items were left
    unprocessed (a node died): a rerun continues where the run stopped."""

    def __init__(self, message: str, exit_code: int = BAD_INPUT_EXIT) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# -- connecting ----------------------------------------------------------------------------
def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise RayExecutorError(
            "--executor ray needs Ray, which is not installed: pip install 'tracetune[ray]'"
        ) from None
    return ray


def _host_port(address: str) -> tuple[str, int] | None:
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def connect(config: ExecutorConfig) -> Any:
    """The ``ray`` module, connected to the cluster ``config`` names (or a local instance)."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    address = config.address
    fix = (
        "start one there with `ray start --head`, check the host and port (the head's GCS "
        "port, 6379 by default; 10001 for ray://), or leave --ray-address unset to start a "
        "local Ray instance"
    )
    if address is not None and address != "auto":
        target = _host_port(address)
        if target is None:
            raise RayExecutorError(
                f"--ray-address {address!r} is not an address: write auto, HOST:PORT or "
                "ray://HOST:PORT"
            )
        try:
            with socket.create_connection(target, timeout=config.connect_timeout_s):
                pass
        except OSError as exc:
            raise RayExecutorError(
                f"cannot reach a Ray cluster at {address} ({exc.strerror or exc}): {fix}"
            ) from None
    kwargs: dict[str, Any] = {"log_to_driver": True, "configure_logging": False}
    try:
        if address is None:
            ray.init(
                include_dashboard=False,
                _node_ip_address="127.0.0.1",
                **kwargs,
            )
        else:
            ray.init(address=address, **kwargs)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
        with contextlib.suppress(Exception):
            ray.shutdown()
        where = address or "a local instance"
        raise RayExecutorError(f"cannot connect to Ray at {where}: {exc}; {fix}") from None
    atexit.register(ray.shutdown)
    return ray


# -- what actors share through a stage's process function ------------------------------------
class _ActorContext:
    """Per-actor-process settings that unpickling a stage's process function consults."""

    def __init__(self, root: Path, tag: str, shard: RunState) -> None:
        self.main_state = str(root / "state.sqlite")
        self.tag = tag
        self.shard = shard
        self.states: dict[str, RunState] = {}
        self.writers: list[DatasetWriter[Any]] = []
        self.models: dict[str, Any] = {}


_CTX: _ActorContext | None = None


def _actor_state(path: str) -> RunState:
    """A RunState where the stage's function sent one: the output directory's becomes this
    actor's own state file; another directory's is opened as such."""
    if _CTX is None:
        return RunState(path)
    if os.path.abspath(path) == os.path.abspath(_CTX.main_state):
        return _CTX.shard
    if path not in _CTX.states:
        _CTX.states[path] = RunState(path)
    return _CTX.states[path]


def _actor_writer(
    dataset: Dataset[Any], chunk_size: int | None, flush_interval_s: float, target_bytes: int
) -> DatasetWriter[Any]:
    """A writer the stage's function holds (e.g. for rejected records): in an actor, one
    writing this actor's own part files, flushed when the actor finishes."""
    if _CTX is None:
        return DatasetWriter(dataset, chunk_size, flush_interval_s, target_bytes)
    writer = _WorkerWriter(dataset, _CTX.tag, chunk_size, flush_interval_s, target_bytes)
    _CTX.writers.append(writer)
    return writer


def _actor_model(spec: str, options: str, cache: Any) -> Any:
    """A model built from its spec on the actor, once per actor (``local:`` weights load on
    the actor's GPU when it has one; HTTP backends get their own client)."""
    from tracetune.models.base import ModelOptions, load_model

    loaded = _CTX.models if _CTX is not None else {}
    k = f"{spec}\n{options}"
    if k not in loaded:
        loaded[k] = load_model(spec, ModelOptions.model_validate_json(options))
    model = loaded[k]
    if cache is not None:
        model.cache = cache
    return model


def _actor_tool(name: str, module: str) -> Any:
    """A registered tool, looked up on the actor (its models load there, once, on first
    use): tools holding loaded engines are not sent over the wire."""
    import importlib

    from tracetune.tools.spec import get_tool

    importlib.import_module(module)  # registers a user's tools
    return get_tool(name)


def _new_lock(kind: str) -> Any:
    import threading

    return threading.RLock() if kind == "rlock" else threading.Lock()


def _special_reduce(obj: Any) -> Any:
    import _thread

    from tracetune.models.base import ChatModel, ModelOptions
    from tracetune.runner.stage import MeteredModel
    from tracetune.tools.spec import Tool, registered_tools

    if isinstance(obj, RunState):
        return _actor_state, (str(obj.path),)
    if isinstance(obj, Tool) and registered_tools().get(obj.name) is obj:
        return _actor_tool, (obj.name, type(obj).__module__)
    if isinstance(obj, DatasetWriter):
        return _actor_writer, (obj.dataset, obj.chunk_size, obj.flush_interval_s, obj.target_bytes)
    if (
        isinstance(obj, ChatModel)
        and not isinstance(obj, MeteredModel)
        and ":" in (obj.spec or "")
        and isinstance(getattr(obj, "options", None), ModelOptions)
    ):
        options = getattr(obj, "options")  # noqa: B009  (checked just above)
        _NEEDED_ENV.add(options.api_key_env)
        return _actor_model, (obj.spec, options.model_dump_json(), obj.cache)
    if isinstance(obj, _thread.LockType):
        return _new_lock, ("lock",)
    if type(obj).__name__ == "RLock" and type(obj).__module__ in ("_thread", "threading"):
        return _new_lock, ("rlock",)
    return None


# Environment variables the actors' models read (API keys, endpoints): sent along with the
# actors (Ray's runtime_env), as a node's own environment need not have them.
_NEEDED_ENV: set[str] = set()
_FORWARDED_ENV = (
    "OPENAI_BASE_URL",
    "OPENAI_API_KEY",
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "TRACETUNE_MCP_SERVERS",  # MCP servers whose tools the actors load by name
)


def actor_env() -> dict[str, str]:
    """The environment variables to set in the actors (those the stage's models need)."""
    names = set(_FORWARDED_ENV) | _NEEDED_ENV
    return {name: os.environ[name] for name in sorted(names) if name in os.environ}


def dumps_for_workers(obj: Any) -> bytes:
    """``obj`` (a stage's key, process function and sources) pickled for Ray actors: run
    states, writers and models travel as what to open or load, not as open handles."""
    from ray import cloudpickle

    # ray's vendored cloudpickle carries no annotations: its calls are untyped.
    class _Pickler(cloudpickle.Pickler):
        def reducer_override(self, value: Any) -> Any:
            special = _special_reduce(value)
            if special is not None:
                return special
            return super().reducer_override(value)  # type: ignore[no-untyped-call]

    buf = io.BytesIO()
    _Pickler(buf, protocol=5).dump(obj)  # type: ignore[no-untyped-call]
    return buf.getvalue()


def _by_value(fn: Any) -> None:
    """Send the module of a process function defined outside installed packages (a script,
    a test) by value: the actors may not be able to import it."""
    from ray import cloudpickle

    module = sys.modules.get(getattr(fn, "__module__", "") or "")
    if module is None or module.__name__.startswith("tracetune") or module.__name__ == "__main__":
        return
    file = getattr(module, "__file__", None) or ""
    if "site-packages" in file:
        return
    with contextlib.suppress(ValueError):
        cloudpickle.register_pickle_by_value(module)


# -- the actors' view of the output directory -----------------------------------------------
def _chunk_name(tag: str, index: int) -> str:
    # "part-00000-" first: sorts among the single-process chunks without breaking how a
    # single-process writer numbers its next chunk.
    return f"part-00000-{tag}-{index:05d}.parquet"


class _WorkerWriter(DatasetWriter[Any]):
    """A writer of one actor's own part files (named by the actor's tag)."""

    def __init__(
        self,
        dataset: Dataset[Any],
        tag: str,
        chunk_size: int | None,
        flush_interval_s: float,
        target_bytes: int,
    ) -> None:
        super().__init__(dataset, chunk_size, flush_interval_s, target_bytes)
        self.tag = tag
        self._next_chunk = 0

    def _chunk_paths(self, index: int) -> tuple[Path, Path]:
        data_dir = self.dataset.root / "data"
        name = _chunk_name(self.tag, index)
        return data_dir / name, data_dir / f".w{name}.tmp"  # not .part-*: others clear those


class _WorkerState(RunState):
    """An actor's own run state; cached model answers are also read from the directory's."""

    def __init__(self, path: Path, main: Path) -> None:
        super().__init__(path)
        self._main_path = main
        self._main: sqlite3.Connection | None = None

    def cache_get(self, key: str) -> Any | None:
        hit = super().cache_get(key)
        if hit is not None or not self._main_path.exists():
            return hit
        with self._lock:
            if self._main is None:
                uri = f"file:{self._main_path}?mode=ro"
                self._main = sqlite3.connect(uri, uri=True, timeout=60, check_same_thread=False)
            rows = self._main.execute("SELECT value FROM cache WHERE key=?", (key,)).fetchall()
        return json.loads(rows[0][0]) if rows else None

    def close(self) -> None:
        with self._lock:
            if self._main is not None:
                self._main.close()
                self._main = None
        super().close()


class _WorkerDataset(Dataset[Any]):
    """``DIR`` as one actor writes it: its own part files and its own run state."""

    def __init__(self, root: Path, record_type: type[Record], shard: RunState, tag: str) -> None:
        super().__init__(root, record_type)
        self._state = shard
        self.tag = tag

    def writer(self, *args: Any, **kwargs: Any) -> DatasetWriter[Any]:
        chunk_size = kwargs.get("chunk_size", args[0] if args else None)
        flush = kwargs.get("flush_interval_s", args[1] if len(args) > 1 else 10.0)
        target = kwargs.get("target_bytes", args[2] if len(args) > 2 else 8 << 20)
        return _WorkerWriter(self, self.tag, chunk_size, flush, target)


# -- the actor ----------------------------------------------------------------------------
class StageWorker:
    """One Ray actor of a stage: its tools and models load once, in ``__init__``."""

    def __init__(
        self,
        payload: bytes,
        root: str,
        record_kind: str,
        stage: str,
        tag: str,
        probe: str,
        core_options: dict[str, Any],
        concurrency: int,
    ) -> None:
        global _CTX
        import ray

        from tracetune.runner.stage import Drop

        self._drop = Drop
        self.root = Path(root)
        self.tag = tag
        self.stage = stage
        self.concurrency = concurrency
        self.node = ray.get_runtime_context().get_node_id()
        self.host = socket.gethostname()
        self.error: str | None = None
        self.lock_fd: int | None = None
        workers = self.root / WORKERS_DIR
        if not (workers / probe).exists():
            self.error = "driver's probe file not visible"
            return
        # The lock first: a state file without a held lock is one a rerun may fold.
        self.lock_fd = os.open(workers / f"{tag}.lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.lock_fd, fcntl.LOCK_EX)
        (workers / f"{tag}.hello").write_text(json.dumps({"node": self.node, "host": self.host}))
        self.shard = _WorkerState(workers / f"{tag}.sqlite", self.root / "state.sqlite")
        _CTX = _ActorContext(self.root, tag, self.shard)
        from ray import cloudpickle

        from tracetune.runner.stage import StageCore

        key, self.process, sources = cloudpickle.loads(payload)
        view = _WorkerDataset(self.root, RECORD_TYPES[record_kind], self.shard, tag)
        self.core: StageCore[Any] = StageCore(
            stage,
            view,
            key=key,
            budget=None,  # the driver holds the budget and the failure threshold
            sources=sources,
            max_failures=sys.maxsize,
            max_failure_rate=1.0,
            progress=False,
            **core_options,
        )
        self._semaphore: asyncio.Semaphore | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.flush_interval_s = float(core_options["flush_interval_s"])

    def ready(self) -> dict[str, Any]:
        return {"node": self.node, "host": self.host, "pid": os.getpid(), "error": self.error}

    async def _flusher(self) -> None:
        # A slow stage's finished items reach disk within flush_interval_s of each other.
        while True:
            await asyncio.sleep(min(1.0, self.flush_interval_s))
            if self.core.writer.due():
                self.core.writer.flush()

    async def run_batch(self, batch: list[tuple[str, Any]]) -> dict[str, Any]:
        """Process ``batch`` (``(key, item)`` pairs); what became of it, and spend so far."""
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.concurrency)
            self._ticker = asyncio.ensure_future(self._flusher())
        semaphore = self._semaphore
        core = self.core
        report: dict[str, Any] = {"processed": 0, "written": 0, "dropped": {}, "failures": []}

        async def one(item_key: str, item: Any) -> None:
            async with semaphore:
                try:
                    produced = await self.process(item)
                except Exception as exc:  # recorded by the core, retried on the next run
                    core.fail_item(item_key, exc)
                    report["failures"].append((item_key, f"{type(exc).__name__}: {exc}"))
                else:
                    written = core.result.written
                    core.finish_item(item_key, produced)
                    report["written"] += core.result.written - written
                    if isinstance(produced, self._drop):
                        reason = produced.reason
                        report["dropped"][reason] = report["dropped"].get(reason, 0) + 1
                report["processed"] += 1

        await asyncio.gather(*(one(k, item) for k, item in batch))
        report["usage"] = self.shard.usage().model_dump()
        report["stage_usage"] = self.shard.usage(self.stage).model_dump()
        return report

    async def finish(self) -> dict[str, Any]:
        """Put the last chunk on disk, mark its items done, and let go of the state file."""
        if self._ticker is not None:
            self._ticker.cancel()
        if self.error is None:
            self.core.flush()
            for writer in _CTX.writers if _CTX is not None else []:
                writer.close()
            usage = self.shard.usage().model_dump()
            self.shard.close()
        else:
            usage = Usage().model_dump()
        if self.lock_fd is not None:
            os.close(self.lock_fd)  # releases the lock: the driver may fold the state now
            self.lock_fd = None
        return {"usage": usage}


# -- folding the workers' states into the directory's ---------------------------------------
def _try_lock(path: Path) -> int | None:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _fold_one(main: Path, shard: Path, tag: str) -> None:
    RunState(main).close()  # the directory's state, with its tables
    db = sqlite3.connect(main, timeout=60, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("CREATE TABLE IF NOT EXISTS folded_workers (tag TEXT PRIMARY KEY, at REAL)")
        if db.execute("SELECT 1 FROM folded_workers WHERE tag=?", (tag,)).fetchall():
            return  # folded before the files could be removed
        db.execute("ATTACH DATABASE ? AS w", (str(shard),))
        db.execute("BEGIN IMMEDIATE")
        db.execute(
            "INSERT INTO main.items SELECT * FROM w.items WHERE true "
            "ON CONFLICT(stage, key) DO UPDATE SET status=excluded.status, "
            "info=excluded.info, updated=excluded.updated WHERE excluded.updated >= updated"
        )
        db.execute("INSERT OR IGNORE INTO main.cache SELECT * FROM w.cache")
        db.execute(
            "INSERT INTO main.usage SELECT * FROM w.usage WHERE true "
            "ON CONFLICT(stage, model) DO UPDATE SET "
            "prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
            "completion_tokens = completion_tokens + excluded.completion_tokens, "
            "cost_usd = cost_usd + excluded.cost_usd, calls = calls + excluded.calls, "
            "cached_calls = cached_calls + excluded.cached_calls, "
            "retries = retries + excluded.retries"
        )
        db.execute("INSERT INTO main.folded_workers VALUES (?, ?)", (tag, time.time()))
        db.execute("COMMIT")
        db.execute("DETACH DATABASE w")
    finally:
        db.close()


def fold_worker_states(root: str | os.PathLike[str]) -> list[str]:
    """Fold the state files of Ray actors that are gone into ``root/state.sqlite``.

    Idempotent; safe while actors run (a state file whose actor still holds its lock is left
    alone). Returns the tags of the actors still running."""
    root = Path(root)
    workers = root / WORKERS_DIR
    if not workers.is_dir():
        return []
    live: list[str] = []
    for shard in sorted(workers.glob("*.sqlite")):
        tag = shard.stem
        lock = workers / f"{tag}.lock"
        fd = _try_lock(lock)
        if fd is None:
            live.append(tag)
            continue
        try:
            _fold_one(root / "state.sqlite", shard, tag)
            for suffix in (".sqlite", ".sqlite-wal", ".sqlite-shm", ".hello"):
                (workers / f"{tag}{suffix}").unlink(missing_ok=True)
            for stale in (root / "data").glob(f".wpart-00000-{tag}-*.tmp"):
                stale.unlink(missing_ok=True)  # a chunk in flight when the actor was killed
            lock.unlink(missing_ok=True)
        finally:
            os.close(fd)
    return live


def _fold_before_run(root: Path) -> None:
    deadline = time.monotonic() + STALE_WORKER_WAIT_S
    while live := fold_worker_states(root):
        if time.monotonic() > deadline:
            raise RayExecutorError(
                f"{root} is being written by other Ray actors (worker state "
                f"{', '.join(live[:3])} in {root / WORKERS_DIR} is locked): wait for that "
                "run to finish or stop it, then run again"
            )
        time.sleep(0.5)


# -- the driver ----------------------------------------------------------------------------
class _UsageView:
    """What the progress bar asks of a run state: the spend so far, this run's included."""

    def __init__(self, base: Usage, base_stage: Usage) -> None:
        self.base = base
        self.base_stage = base_stage
        self.actors: dict[int, tuple[Usage, Usage]] = {}

    def usage(self, stage: str | None = None) -> Usage:
        total = self.base_stage if stage else self.base
        for run_total, run_stage in self.actors.values():
            total = total.add(run_stage if stage else run_total)
        return total


def shard_of(item_key: str, n: int) -> int:
    """Which of ``n`` actors' queues the item with this key starts in (stable across runs;
    an idle actor may take it from there)."""
    digest = hashlib.blake2b(item_key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % n


def _default_workers(ray: Any, config: ExecutorConfig) -> int:
    resources = ray.cluster_resources()
    counts = []
    if config.num_cpus > 0:
        counts.append(int(resources.get("CPU", 1) // config.num_cpus))
    if config.num_gpus > 0:
        counts.append(int(resources.get("GPU", 0) // config.num_gpus))
        if counts[-1] == 0:
            raise RayExecutorError(
                f"executor.num_gpus is {config.num_gpus} but the Ray cluster has no GPUs: "
                "set num_gpus: 0 or join a cluster with GPU nodes"
            )
    return max(1, min(counts) if counts else 1)


async def _wait_ref(ref: Any) -> Any:
    return await asyncio.wrap_future(ref.future())


class _DriverState:
    """The directory's run state as the driver's core sees it: spend includes what the
    actors have spent so far (their own state files), for budgets and the progress bar."""

    def __init__(self, state: RunState, view: _UsageView) -> None:
        self._state = state
        self._view = view

    def usage(self, stage: str | None = None) -> Usage:
        return self._view.usage(stage)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._state, name)


async def run_stage_on_ray(
    config: ExecutorConfig,
    stage: str,
    items: Iterable[T],
    key: Callable[[T], str],
    process: Callable[[T], Awaitable[Record | list[Record] | Drop]],
    out: Dataset[Any],
    *,
    concurrency: int,
    budget: Budget | None,
    sources: Iterable[AssetStore],
    max_failures: int,
    max_failure_rate: float,
    chunk_size: int | None,
    chunk_bytes: int,
    flush_interval_s: float,
    progress: bool,
    total: int | None,
) -> StageResult:
    """:func:`~tracetune.runner.run_stage` with the items processed by Ray actors.

    The driver runs a :class:`~tracetune.runner.stage.StageCore` over the directory for what
    is shared with the in-process executor (skip set, budget, result, progress bar, the
    failure rule, the stage's recorded outcome); each actor runs one over its own part files
    and state file for the items it processes."""
    from tracetune.runner.stage import StageCore

    ray = connect(config)
    root = out.root.resolve()
    _fold_before_run(root)
    sources = list(sources)
    core: StageCore[T] = StageCore(
        stage,
        out,
        key=key,
        budget=budget,
        sources=sources,
        max_failures=max_failures,
        max_failure_rate=max_failure_rate,
        chunk_size=chunk_size,
        chunk_bytes=chunk_bytes,
        flush_interval_s=flush_interval_s,
        progress=progress,
        total=total,
    )
    view = _UsageView(core.state.usage(), core.state.usage(stage))
    core.state = core.bar.state = cast(RunState, _DriverState(core.state, view))
    todo = list(core.pending(items))
    if not todo:
        return core.close()
    fresh_for = getattr(outcome, "fresh_for", None)  # drops asked to be retried: no cache
    if fresh_for is not None:
        process = fresh_for(getattr(core, "retried", set()), key, process)

    per_actor = config.concurrency or concurrency
    n = min(config.workers or _default_workers(ray, config), len(todo))
    batch_size = config.batch_size or max(1, min(64, 2 * per_actor))
    run_id = secrets.token_hex(3)
    tags = [f"r{run_id}w{i:03d}" for i in range(n)]
    workers_dir = root / WORKERS_DIR
    workers_dir.mkdir(parents=True, exist_ok=True)
    probe = f".probe-{run_id}"
    (workers_dir / probe).write_text(socket.gethostname())
    _by_value(process)
    try:
        payload = dumps_for_workers((key, process, sources))
    except Exception as exc:
        raise RayExecutorError(
            f"{stage}: its process function cannot be sent to Ray actors "
            f"({type(exc).__name__}: {exc}); run it with the local executor"
        ) from exc
    core_options = {
        "chunk_size": chunk_size,
        "chunk_bytes": chunk_bytes,
        "flush_interval_s": config.flush_interval_s or flush_interval_s,
    }
    actor_class = ray.remote(StageWorker)
    actors = [
        actor_class.options(
            num_cpus=config.num_cpus,
            num_gpus=config.num_gpus,
            scheduling_strategy="SPREAD",
            max_restarts=0,
            max_concurrency=IN_FLIGHT_BATCHES + 2,
            runtime_env={"env_vars": actor_env()},
        ).remote(
            payload,
            str(root),
            out.record_type.kind,
            stage,
            tags[i],
            probe,
            core_options,
            per_actor,
        )
        for i in range(n)
    ]
    queues: list[deque[tuple[str, T]]] = [deque() for _ in range(n)]
    for item_key, item in todo:
        queues[shard_of(item_key, n)].append((item_key, item))

    result = core.result
    lost: str | None = None
    nodes: dict[int, dict[str, Any]] = {}
    try:
        nodes = await _start_actors(ray, actors, tags, root, workers_dir, config)
        pending: dict[asyncio.Future[Any], int] = {}

        def submit(i: int) -> None:
            batch = [queues[i].popleft() for _ in range(min(batch_size, len(queues[i])))]
            if not batch:
                batch = steal(i)
            if batch:
                future = asyncio.ensure_future(_wait_ref(actors[i].run_batch.remote(batch)))
                pending[future] = i

        def steal(i: int) -> list[tuple[str, T]]:
            # An actor whose own share is done takes from the tail of the longest queue: a
            # hash split is uneven by a few percent and items differ in cost, so without
            # this the last actor's remainder ran alone. Nothing queued was sent anywhere
            # yet, so moving it cannot do an item twice (and a rerun recognises records
            # by id, whichever actor wrote them).
            if lost is not None:
                return []
            victim = max(range(n), key=lambda j: len(queues[j]))
            take = min(batch_size, (len(queues[victim]) + 1) // 2)
            return [queues[victim].pop() for _ in range(take)][::-1]

        for i in range(n):
            for _ in range(IN_FLIGHT_BATCHES):
                submit(i)
        last_check = time.monotonic()
        with core.bar.progress:
            while pending:
                finished, _ = await asyncio.wait(
                    pending, timeout=LIVENESS_INTERVAL_S, return_when=asyncio.FIRST_COMPLETED
                )
                for future in finished:
                    i = pending.pop(future)
                    try:
                        report = future.result()
                    except ray.exceptions.RayActorError as exc:
                        lost = lost or _lost_message(nodes.get(i), exc)
                        continue
                    core.processed += report["processed"]
                    result.written += report["written"]
                    for reason, count in report["dropped"].items():
                        result.dropped += count
                        result.drop_reasons[reason] = result.drop_reasons.get(reason, 0) + count
                    result.failed += len(report["failures"])
                    result.failures.extend(tuple(f) for f in report["failures"])
                    view.actors[i] = (
                        Usage.model_validate(report["usage"]),
                        Usage.model_validate(report["stage_usage"]),
                    )
                    if (
                        core.stop is None
                        and result.failed > max_failures
                        and result.failed > max_failure_rate * core.processed
                    ):
                        core.stop = f"aborted: {result.failed} of {core.processed} items failed"
                    if core.stop is None and core.budget is not None:
                        core.stop = core.budget.exceeded(view.usage())
                    if core.stop is None and lost is None:
                        submit(i)
                    core.bar.update(result, force=True)
                if lost is None and time.monotonic() - last_check >= LIVENESS_INTERVAL_S:
                    last_check = time.monotonic()
                    lost = _check_nodes(ray, nodes)
                if lost is not None:
                    for future, i in list(pending.items()):
                        if not nodes.get(i, {}).get("alive", True):
                            future.cancel()
                            del pending[future]
                    for queue in queues:
                        queue.clear()
    finally:
        unfinished = await _finish_actors(ray, actors, nodes)
        lost = lost or unfinished
        with contextlib.suppress(OSError):
            (workers_dir / probe).unlink()
        fold_worker_states(root)
    if lost is not None:
        result.stopped = f"worker lost: {lost}"
        outcome.record(result)
        raise RayExecutorError(
            f"{stage}: {lost}. {result.written} record(s) written and {result.dropped} "
            "dropped in this run are kept; rerun the same command to process the rest on the "
            "nodes that are up (nothing finished is redone)",
            exit_code=outcome.ITEMS_FAILED_EXIT,
        )
    return core.close()


def _lost_message(node: dict[str, Any] | None, exc: BaseException) -> str:
    where = f"node {node['ip']} ({node['node'][:12]})" if node else "a node"
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"a Ray worker on {where} died ({first[:200]})"


def _check_nodes(ray: Any, nodes: dict[int, dict[str, Any]]) -> str | None:
    try:
        alive = {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}
    except Exception:  # the GCS itself is unreachable: the head node is gone
        return "the Ray head node is unreachable"
    lost = None
    for info in nodes.values():
        if info["node"] not in alive:
            info["alive"] = False
            lost = lost or f"Ray node {info['ip']} ({info['node'][:12]}) died"
    return lost


async def _start_actors(
    ray: Any,
    actors: list[Any],
    tags: list[str],
    root: Path,
    workers_dir: Path,
    config: ExecutorConfig,
) -> dict[int, dict[str, Any]]:
    """Wait for every actor to load its tools and models; check the output directory is
    shared between this machine and each actor's node."""
    refs = [a.ready.remote() for a in actors]
    try:
        infos = await asyncio.wait_for(
            asyncio.gather(*(_wait_ref(r) for r in refs)), timeout=config.start_timeout_s
        )
    except TimeoutError:
        raise RayExecutorError(
            f"the Ray actors did not start within {config.start_timeout_s:.0f} s (the cluster "
            f"may lack the resources asked for: num_cpus={config.num_cpus}, "
            f"num_gpus={config.num_gpus} per actor, {len(actors)} actors); lower "
            "executor.workers / num_cpus / num_gpus or add nodes"
        ) from None
    except ray.exceptions.RayActorError as exc:
        cause = str(exc).strip().splitlines()
        raise RayExecutorError(
            "a Ray actor failed to start (loading the stage's tools or models): "
            + " ".join(cause[-3:])[:800]
        ) from None
    nodes = {n["NodeID"]: n.get("NodeManagerAddress", "?") for n in ray.nodes() if n.get("Alive")}
    out: dict[int, dict[str, Any]] = {}
    for i, info in enumerate(infos):
        ip = nodes.get(info["node"], info["host"])
        out[i] = {"node": info["node"], "ip": ip, "alive": True}
        hello = workers_dir / f"{tags[i]}.hello"
        if info["error"] is not None or not hello.exists():
            raise RayExecutorError(
                f"the output directory {root} is not shared between this machine and Ray "
                f"node {ip} (host {info['host']}): a file written there by one is not "
                "visible to the other. Put the output on a filesystem every node mounts at "
                "the same path (NFS, a cluster filesystem), or run without --executor ray"
            )
    return out


async def _finish_actors(
    ray: Any, actors: list[Any], nodes: dict[int, dict[str, Any]]
) -> str | None:
    """Let the live actors put their last chunks on disk, then stop them all. Returns why
    an actor could not finish (its node died meanwhile), or None."""
    live = [i for i in range(len(actors)) if nodes.get(i, {}).get("alive", True)]
    waits = {i: asyncio.ensure_future(_wait_ref(actors[i].finish.remote())) for i in live}
    lost = None
    if waits:
        await asyncio.wait(list(waits.values()), timeout=FINISH_TIMEOUT_S)
        for i, wait in waits.items():
            if not wait.done():
                wait.cancel()
                lost = lost or f"a Ray worker did not finish within {FINISH_TIMEOUT_S:.0f} s"
            elif (exc := wait.exception()) is not None:
                # Its last chunk never reached disk: those items are not done (a rerun does
                # them); what it had marked is folded all the same.
                lost = lost or _lost_message(nodes.get(i), exc)
    for actor in actors:
        with contextlib.suppress(Exception):
            ray.kill(actor, no_restart=True)
    return lost
