"""What the viewer reads: datasets, eval runs and run state, found under the given folders.

Everything here is read-only. Parquet chunks are opened with pyarrow; a dataset's list is
served from a small *index* (ids, statuses, tools, queries: a few light columns read once,
in parallel over the chunks), so a page of a 100K-record dataset never loads the records
it does not show. Full records are read only for the rows a page shows. SQLite run state is
opened immutable (or from a private copy while a writer's WAL is present), so viewing never
creates or changes a file inside a dataset.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import sqlite3
import tempfile
import threading
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tracetune.errors import TracetuneError
from tracetune.evaluate.results import run_model_label
from tracetune.schema import (
    RECORD_TYPES,
    SCHEMA_VERSION,
    STORAGE_CONTEXT,
    EvalRecord,
    Record,
    Trajectory,
    arrow_schema,
)

MANIFEST = "manifest.json"
RUN_FILES = ("run.json", "metrics.json", "records.jsonl")
SKIP_DIRS = {"data", "assets", "__pycache__", ".git", "node_modules"}
MAX_DEPTH = 5
INDEX_VERSION = "1"
SAFE_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,150}$")

# Light columns read into each dataset's index (parquet leaf paths), per record kind.
INDEX_COLUMNS: dict[str, list[str]] = {
    "task": [
        "id",
        "query",
        "provenance.source",
        "tools",
        "gold.value",
        "files.list.element.mime",
    ],
    "trajectory": [
        "id",
        "task.id",
        "task.query",
        "task.provenance.source",
        "task.gold.value",
        "controller",
        "status",
        "final_answer",
        "steps.list.element.action.tool_call.name",
        "steps.list.element.action.type",
        "steps.list.element.error.kind",
    ],
    "verdict": ["id", "target_id", "target_kind", "judge", "passed", "score", "reasons"],
    "pair": [
        "id",
        "task.id",
        "task.query",
        "task.provenance.source",
        "verifier",
        "chosen_score",
        "rejected_score",
        "prefix.list.element.index",
        "chosen.action.tool_call.name",
        "rejected.action.tool_call.name",
        "rejected.error.kind",
    ],
    "dialogue": ["id", "task.id", "task.query", "task.provenance.source", "format", "metadata"],
}


class SourceError(TracetuneError, ValueError):
    """A folder cannot be shown; the message says what is wrong and how to fix it."""


def safe_key(record_id: str) -> str:
    """The URL and file name of a record: its id when that is safe, else a readable hash."""
    if SAFE_ID.match(record_id):
        return record_id
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", record_id)[:60].strip("_.") or "record"
    return f"{cleaned}-{hashlib.sha1(record_id.encode()).hexdigest()[:10]}"


def slugify(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "_"


# -- run state -------------------------------------------------------------------------
class StateReader:
    """A dataset's ``state.sqlite``, read without touching it.

    With no ``-wal`` file beside it the database is complete and is opened ``immutable``
    (SQLite then creates no ``-shm``/``-wal`` files). While a writer holds a WAL, the
    database and its WAL are copied to a private temporary folder and read there.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        wal = path.with_name(path.name + "-wal")
        if wal.exists():
            self._tmp = tempfile.TemporaryDirectory(prefix="tracetune-view-")
            copy = Path(self._tmp.name) / path.name
            shutil.copyfile(path, copy)
            shutil.copyfile(wal, copy.with_name(copy.name + "-wal"))
            self._db = sqlite3.connect(copy, check_same_thread=False)
        else:
            uri = path.resolve().as_uri() + "?immutable=1"
            self._db = sqlite3.connect(uri, uri=True, check_same_thread=False)

    def _q(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            try:
                return self._db.execute(sql, args).fetchall()
            except sqlite3.DatabaseError as exc:
                raise SourceError(f"{self.path}: cannot read the run state ({exc})") from None

    def stages(self) -> list[str]:
        rows = self._q("SELECT stage FROM items GROUP BY stage ORDER BY MIN(updated)")
        used = {r[0] for r in self._q("SELECT DISTINCT stage FROM usage")}
        names = [r[0] for r in rows]
        return names + sorted(used - set(names))

    def counts(self, stage: str) -> dict[str, int]:
        rows = self._q("SELECT status, COUNT(*) FROM items WHERE stage=? GROUP BY status", (stage,))
        return {str(s): int(n) for s, n in rows}

    def reasons(self, stage: str, status: str) -> list[tuple[str, int]]:
        """Why items ended with ``status``: drop reasons, or the first line of errors."""
        if status == "dropped":
            expr = "COALESCE(json_extract(info, '$.reason'), '(no reason)')"
        else:
            expr = "COALESCE(json_extract(info, '$.error'), '(no error recorded)')"
        rows = self._q(
            f"SELECT {expr} AS why, COUNT(*) FROM items WHERE stage=? AND status=? "
            "GROUP BY why ORDER BY COUNT(*) DESC, why",
            (stage, status),
        )
        return [(str(w), int(n)) for w, n in rows]

    def items(
        self, stage: str, status: str, reason: str | None, offset: int, limit: int
    ) -> tuple[int, list[tuple[str, dict[str, Any]]]]:
        where = "stage=? AND status=?"
        args: list[Any] = [stage, status]
        if reason is not None:
            key = "$.reason" if status == "dropped" else "$.error"
            none = "(no reason)" if status == "dropped" else "(no error recorded)"
            where += f" AND COALESCE(json_extract(info, '{key}'), ?) = ?"
            args += [none, reason]
        total = int(self._q(f"SELECT COUNT(*) FROM items WHERE {where}", tuple(args))[0][0])
        rows = self._q(
            f"SELECT key, info FROM items WHERE {where} ORDER BY key LIMIT ? OFFSET ?",
            (*args, limit, offset),
        )
        out = []
        for key, info in rows:
            try:
                parsed = json.loads(info or "{}")
            except json.JSONDecodeError:
                parsed = {"info": info}
            out.append((str(key), parsed if isinstance(parsed, dict) else {"info": parsed}))
        return total, out

    def dropped(self) -> dict[str, str]:
        """Item key -> drop reason, over every stage of this state file."""
        rows = self._q(
            "SELECT key, COALESCE(json_extract(info, '$.reason'), '(no reason)') "
            "FROM items WHERE status='dropped'"
        )
        return {str(k): str(r) for k, r in rows}

    def usage(self) -> list[dict[str, Any]]:
        rows = self._q(
            "SELECT stage, model, prompt_tokens, completion_tokens, cost_usd, calls, "
            "cached_calls, retries FROM usage ORDER BY stage, model"
        )
        names = (
            "stage",
            "model",
            "prompt_tokens",
            "completion_tokens",
            "cost_usd",
            "calls",
            "cached_calls",
            "retries",
        )
        return [dict(zip(names, r, strict=True)) for r in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
        if self._tmp is not None:
            self._tmp.cleanup()


# -- sources ---------------------------------------------------------------------------
@dataclass
class Source:
    """One thing the viewer shows: a dataset, an eval run, or a folder it cannot read."""

    slug: str
    root: Path
    label: str
    kind: str  # a record kind, "run", or "error"
    error: str | None = None
    state_path: Path | None = None
    _state: StateReader | None = field(default=None, repr=False)

    @property
    def state(self) -> StateReader | None:
        if self.state_path is None:
            return None
        if self._state is None:
            self._state = StateReader(self.state_path)
        return self._state

    def close(self) -> None:
        if self._state is not None:
            self._state.close()


@dataclass
class DatasetSource(Source):
    """A dataset directory: manifest, Parquet chunks and assets."""

    record_type: type[Record] = Record
    files: list[Path] = field(default_factory=list)
    _index: pa.Table | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _keys: dict[str, str] | None = field(default=None, repr=False)
    _ready: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _error: Exception | None = field(default=None, repr=False)
    cache_dir: Path | None = field(default=None, repr=False)

    def refresh(self) -> bool:
        """Pick up chunks a running stage added since the index was built; True if any.

        Writers only add chunks (written under a temporary name, then renamed), so a new
        file list means new records. An index build in flight is left to finish first.
        """
        files = sorted((self.root / "data").glob("part-*.parquet"))
        with self._lock:
            if files == self.files or (self._thread is not None and not self._ready.is_set()):
                return False
            self.files = files
            self._index = None
            self._keys = None
            self._error = None
            self._thread = None
            self._ready = threading.Event()
        return True

    # The index: light columns of every record, plus where each record lives. It is built
    # in a background thread on first use (and cached outside the dataset, keyed by the
    # chunks' names, sizes and times), so the first page shows before it is done.
    def start_indexing(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._index_worker, name=f"index-{self.slug}", daemon=True
                )
                self._thread.start()

    def _index_worker(self) -> None:
        try:
            self._index = self._cached_index()
        except Exception as exc:  # shown on the page that needed the index
            self._error = exc
        finally:
            self._ready.set()

    @property
    def index_ready(self) -> bool:
        return self._ready.is_set()

    @property
    def index(self) -> pa.Table:
        self.start_indexing()
        self._ready.wait()
        if self._error is not None:
            if isinstance(self._error, SourceError):
                raise self._error
            raise SourceError(f"{self.root}: cannot index this dataset ({self._error})")
        assert self._index is not None
        return self._index

    def _cache_path(self) -> Path | None:
        if self.cache_dir is None:
            return None
        parts = [INDEX_VERSION, str(self.root.resolve()), self.kind]
        for path in self.files:
            st = path.stat()
            parts.append(f"{path.name}:{st.st_size}:{st.st_mtime_ns}")
        digest = hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]
        return self.cache_dir / f"{digest}.parquet"

    def _cached_index(self) -> pa.Table:
        cache = self._cache_path()
        if cache is not None and cache.is_file():
            try:
                return pq.read_table(cache).combine_chunks()
            except Exception:
                pass  # a damaged cache entry is rebuilt
        index = self._build_index()
        if cache is not None and len(self.files) > 8:
            try:
                cache.parent.mkdir(parents=True, exist_ok=True)
                tmp = cache.with_name(f".{cache.name}.{threading.get_ident()}.tmp")
                pq.write_table(index, tmp)
                tmp.replace(cache)
            except OSError:
                pass  # no cache where the cache cannot be written; the viewer still works
        return index

    def _read_light(self, i_path: tuple[int, Path]) -> pa.Table:
        i, path = i_path
        wanted = INDEX_COLUMNS[self.kind]
        try:
            pf = pq.ParquetFile(path)
            table = pf.read(columns=wanted)
        except Exception as exc:  # a chunk that does not parse is shown, not fatal
            raise SourceError(f"{path}: cannot read this Parquet chunk ({exc})") from None
        flat = _flatten(self.kind, table)
        n = flat.num_rows
        flat = flat.append_column("_file", pa.array([i] * n, pa.int32()))
        return flat.append_column("_row", pa.array(range(n), pa.int32()))

    def _build_index(self) -> pa.Table:
        if not self.files:
            return _flatten(self.kind, arrow_schema(self.record_type).empty_table())
        with ThreadPoolExecutor(max_workers=8) as pool:
            parts = list(pool.map(self._read_light, enumerate(self.files)))
        # One chunk per column: taking a page's rows from 1,500 chunks is far slower.
        return pa.concat_tables(parts).combine_chunks()

    def head(self, n: int) -> pa.Table:
        """Index rows of the first ``n`` records, read from the first chunks only."""
        if self.index_ready and self._error is None:
            return self.index.slice(0, n)
        parts: list[pa.Table] = []
        have = 0
        for i, path in enumerate(self.files):
            if have >= n:
                break
            part = self._read_light((i, path))
            parts.append(part)
            have += part.num_rows
        if not parts:
            return _flatten(self.kind, arrow_schema(self.record_type).empty_table())
        return pa.concat_tables(parts).slice(0, n)

    def rows_of(self, view: pa.Table) -> list[Record]:
        """Full records of index rows ``view`` (which carries _file/_row)."""
        return self._records(view.select(["_file", "_row"]).to_pylist())

    def __len__(self) -> int:
        return self.index.num_rows

    def position(self, key: str) -> int | None:
        """Index row of the record whose URL key is ``key`` (its id, if safe)."""
        ids = self.index.column("id")
        found = pc.index(ids, key).as_py()
        if found is not None and found >= 0:
            return int(found)
        if self._keys is None:
            self._keys = {safe_key(str(i)): str(i) for i in ids.to_pylist()}
        record_id = self._keys.get(key)
        if record_id is None:
            return None
        found = pc.index(ids, record_id).as_py()
        return int(found) if found is not None and found >= 0 else None

    def records_at(self, positions: list[int]) -> list[Record]:
        """Full records at index rows ``positions`` (in that order), reading only their chunks."""
        index = self.index
        where = index.select(["_file", "_row"]).take(pa.array(positions, pa.int64())).to_pylist()
        return self._records(where)

    def _records(self, where: list[dict[str, int]]) -> list[Record]:
        by_file: dict[int, list[int]] = defaultdict(list)
        for w in where:
            by_file[w["_file"]].append(w["_row"])
        rows: dict[tuple[int, int], dict[str, Any]] = {}
        for f, wanted in by_file.items():
            table = pq.ParquetFile(self.files[f]).read()
            taken = table.take(pa.array(wanted, pa.int64())).to_pylist()
            for r, row in zip(wanted, taken, strict=True):
                rows[(f, r)] = row
        return [
            self.record_type.model_validate(rows[(w["_file"], w["_row"])], context=STORAGE_CONTEXT)
            for w in where
        ]

    def record(self, key: str) -> Record | None:
        pos = self.position(key)
        return None if pos is None else self.records_at([pos])[0]

    def has_asset(self, asset_path: str) -> bool:
        return (self.root / asset_path).is_file()


@dataclass
class RunSource(Source):
    """An eval run directory (``tracetune eval run``): run.json, metrics.json, records."""

    run: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    records: list[EvalRecord] = field(default_factory=list)
    trajectories_slug: str | None = None

    @property
    def bench(self) -> str:
        return str(self.metrics.get("benchmark") or self.run.get("benchmark") or "?")

    @property
    def headline(self) -> str:
        return str(self.metrics.get("headline") or self.bench)

    @property
    def model(self) -> str:
        return run_model_label(self.run, self.metrics)

    def headline_records(self) -> list[EvalRecord]:
        return [r for r in self.records if r.benchmark == self.headline] or list(self.records)

    def record(self, key: str) -> EvalRecord | None:
        for r in self.records:
            if safe_key(r.item_id) == key or r.item_id == key:
                return r
        return None


def _list_of(values: pa.ListArray | pa.ChunkedArray, path: list[str]) -> pa.Array:
    """A list<struct<...>> column projected onto one nested field: list<leaf>."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    flat = values.flatten()
    for name in path:
        flat = pc.struct_field(flat, name)
    return pa.ListArray.from_arrays(values.offsets, flat, mask=values.is_null())


def _field(table: pa.Table, *path: str) -> pa.Array:
    col = table.column(path[0]).combine_chunks()
    for name in path[1:]:
        col = pc.struct_field(col, name)
    return col


def _flatten(kind: str, table: pa.Table) -> pa.Table:
    """Turn the nested light columns of one chunk into flat index columns."""
    cols: dict[str, pa.Array] = {}
    if kind == "task":
        cols = {
            "id": _field(table, "id"),
            "query": _field(table, "query"),
            "source": _field(table, "provenance", "source"),
            "tools": _field(table, "tools"),
            "gold": _field(table, "gold", "value"),
            "mimes": _field(table, "files"),
        }
        cols["mimes"] = _list_of(cols["mimes"], ["mime"])
    elif kind == "trajectory":
        steps = table.column("steps").combine_chunks()
        cols = {
            "id": _field(table, "id"),
            "task_id": _field(table, "task", "id"),
            "query": _field(table, "task", "query"),
            "source": _field(table, "task", "provenance", "source"),
            "gold": _field(table, "task", "gold", "value"),
            "controller": _field(table, "controller"),
            "status": _field(table, "status"),
            "final_answer": _field(table, "final_answer"),
            "used_tools": _list_of(steps, ["action", "tool_call", "name"]),
            "action_types": _list_of(steps, ["action", "type"]),
            "errors": _list_of(steps, ["error", "kind"]),
            "n_steps": pc.list_value_length(steps),
        }
    elif kind == "verdict":
        cols = {
            name: _field(table, name)
            for name in ("id", "target_id", "target_kind", "judge", "passed", "score", "reasons")
        }
    elif kind == "pair":
        cols = {
            "id": _field(table, "id"),
            "task_id": _field(table, "task", "id"),
            "query": _field(table, "task", "query"),
            "source": _field(table, "task", "provenance", "source"),
            "verifier": _field(table, "verifier"),
            "chosen_score": _field(table, "chosen_score"),
            "rejected_score": _field(table, "rejected_score"),
            "step_index": pc.list_value_length(table.column("prefix").combine_chunks()),
            "chosen_tool": _field(table, "chosen", "action", "tool_call", "name"),
            "rejected_tool": _field(table, "rejected", "action", "tool_call", "name"),
            "rejected_error": _field(table, "rejected", "error", "kind"),
        }
    elif kind == "dialogue":
        meta = _field(table, "metadata")
        cols = {
            "id": _field(table, "id"),
            "task_id": _field(table, "task", "id"),
            "query": _field(table, "task", "query"),
            "source": _field(table, "task", "provenance", "source"),
            "format": _field(table, "format"),
            "reflected": pc.or_(
                pc.match_substring(meta, '"reflected": true'),
                pc.match_substring(meta, '"reflection": {'),
            ),
        }
    return pa.table(cols)


# -- discovery -------------------------------------------------------------------------
def _manifest_problem(root: Path) -> tuple[str | None, str | None]:
    """(record kind, None) for a readable dataset, or (None, what is wrong)."""
    try:
        info = json.loads((root / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return None, f"{root / MANIFEST} cannot be read ({exc}); the dataset may be damaged"
    if not isinstance(info, dict):
        return None, f"{root / MANIFEST} is not a JSON object; the dataset may be damaged"
    kind = info.get("record_type")
    if kind not in RECORD_TYPES:
        return None, (
            f"{root} has an unknown record type {kind!r} in {MANIFEST}; it was written by "
            "another tool or a newer tracetune"
        )
    version = info.get("schema_version", 0)
    if not isinstance(version, int) or version > SCHEMA_VERSION:
        return None, (
            f"{root} was written with schema version {version}, newer than this tracetune "
            f"reads ({SCHEMA_VERSION}); upgrade tracetune (pip install -U tracetune) to view it"
        )
    if kind == "eval":
        return None, f"{root} holds eval records; open the eval run folder above it instead"
    return str(kind), None


def _walk(root: Path, depth: int = 0) -> Iterable[Path]:
    yield root
    if depth >= MAX_DEPTH:
        return
    # Datasets are searched inside datasets too: a stage's verdicts/ and rejected/ live there.
    try:
        children = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return
    for child in children:
        if child.name in SKIP_DIRS or child.name.startswith("."):
            continue
        yield from _walk(child, depth + 1)


class Catalog:
    """Every source found under the folders given to ``tracetune view``."""

    def __init__(self, dirs: list[Path], cache_dir: Path | None = None) -> None:
        self.cache_dir = cache_dir
        self._verdicts: tuple[pa.Array, pa.Array] | None = None
        self._drop_arrays: tuple[pa.Array, pa.Array] | None = None
        self._drops: dict[str, str] | None = None
        self._verdict_lock = threading.Lock()
        self.sources: dict[str, Source] = {}
        self.problems: list[Source] = []
        names: dict[str, int] = {}
        for given in dirs:
            given = Path(given)
            base = slugify(given.resolve().name or "root")
            names[base] = names.get(base, 0) + 1
            if names[base] > 1:
                base = f"{base}-{names[base]}"
            found = self._scan(given, base)
            if not found:
                if not given.is_dir():
                    why = f"{given} does not exist or is not a folder"
                else:
                    why = (
                        f"{given} is not a tracetune dataset or run: no {MANIFEST} (a dataset) "
                        "or run.json + metrics.json + records.jsonl (an eval run) in it or "
                        f"in its subfolders (up to {MAX_DEPTH} levels); point at a folder "
                        "written by a tracetune command"
                    )
                self._add(Source(base, given, str(given), "error", error=why))
        for source in self.sources.values():
            if isinstance(source, RunSource):
                traj = source.root / "trajectories"
                source.trajectories_slug = next(
                    (s.slug for s in self.sources.values() if s.root == traj), None
                )

    def _add(self, source: Source) -> None:
        slug = source.slug
        n = 1
        while slug in self.sources:
            n += 1
            slug = f"{source.slug}-{n}"
        source.slug = slug
        self.sources[slug] = source
        if source.kind == "error":
            self.problems.append(source)

    def _scan(self, given: Path, base: str) -> int:
        if not given.is_dir():
            return 0
        found = 0
        for path in _walk(given):
            rel = path.relative_to(given).parts
            slug = "~".join([base, *(slugify(p) for p in rel)])
            label = "/".join([given.name or str(given), *rel])
            state = path / "state.sqlite"
            state_path = state if state.is_file() else None
            if (path / MANIFEST).is_file():
                found += 1
                kind, problem = _manifest_problem(path)
                if problem is not None or kind is None:
                    self._add(Source(slug, path, label, "error", error=problem))
                    continue
                files = sorted((path / "data").glob("part-*.parquet"))
                self._add(
                    DatasetSource(
                        slug,
                        path,
                        label,
                        kind,
                        state_path=state_path,
                        record_type=RECORD_TYPES[kind],
                        files=files,
                        cache_dir=self.cache_dir,
                    )
                )
            elif all((path / n).is_file() for n in RUN_FILES):
                found += 1
                self._add(_load_run(slug, path, label))
        return found

    # -- lookups -----------------------------------------------------------------------
    def datasets(self, kind: str | None = None) -> list[DatasetSource]:
        return [
            s
            for s in self.sources.values()
            if isinstance(s, DatasetSource) and (kind is None or s.kind == kind)
        ]

    def runs(self) -> list[RunSource]:
        return [s for s in self.sources.values() if isinstance(s, RunSource)]

    def verdicts_for(self, target_ids: list[str]) -> dict[str, list[tuple[str, int]]]:
        """Verdict (source slug, index row) per target id, across every verdict dataset."""
        out: dict[str, list[tuple[str, int]]] = defaultdict(list)
        wanted = pa.array(target_ids, pa.string())
        for source in self.datasets("verdict"):
            index = source.index
            mask = pc.is_in(index.column("target_id"), value_set=wanted)
            rows = pc.indices_nonzero(mask).to_pylist()
            targets = index.column("target_id").take(pa.array(rows, pa.int64())).to_pylist()
            for row, target in zip(rows, targets, strict=True):
                out[target].append((source.slug, row))
        return out

    def verdicts_ready(self) -> bool:
        """Whether every verdict dataset's index is built (starting the builds if not)."""
        sources = self.datasets("verdict")
        for source in sources:
            source.start_indexing()
        return all(s.index_ready for s in sources)

    def _verdict_sets(self) -> tuple[pa.Array, pa.Array]:
        """(targets with a failing verdict, targets with a passing one), built once."""
        with self._verdict_lock:
            if self._verdicts is None:
                failed: list[pa.Array] = [pa.array([], pa.string())]
                passed: list[pa.Array] = [pa.array([], pa.string())]
                for source in self.datasets("verdict"):
                    index = source.index
                    ok = pc.fill_null(index.column("passed"), False)
                    targets = index.column("target_id")
                    failed.append(pc.filter(targets, pc.invert(ok)).combine_chunks())
                    passed.append(pc.filter(targets, ok).combine_chunks())
                self._verdicts = (
                    pc.unique(pa.concat_arrays(failed)),
                    pc.unique(pa.concat_arrays(passed)),
                )
            return self._verdicts

    def verdict_status(self, target_ids: pa.Array) -> pa.Array:
        """Per target: 'passed', 'failed' (any failing verdict) or None (never judged)."""
        failed, passed = self._verdict_sets()
        none = pa.nulls(len(target_ids), pa.string())
        is_passed = pc.is_in(target_ids, value_set=passed)
        return pc.if_else(
            pc.is_in(target_ids, value_set=failed),
            pa.scalar("failed"),
            pc.if_else(is_passed, pa.scalar("passed"), none),
        )

    def drop_column(self, ids: pa.Array) -> pa.Array:
        """Per id, the reason a stage dropped it (None if it was not dropped)."""
        drops = self.drop_reasons()
        if not drops:
            return pa.nulls(len(ids), pa.string())
        with self._verdict_lock:
            if self._drop_arrays is None:
                self._drop_arrays = (
                    pa.array(list(drops), pa.string()),
                    pa.array(list(drops.values()), pa.string()),
                )
            keys, reasons = self._drop_arrays
        return pc.take(reasons, pc.index_in(ids, value_set=keys))

    def forget_verdicts(self) -> None:
        """Drop the cached verdict sets (a verdict dataset grew)."""
        with self._verdict_lock:
            self._verdicts = None

    def drop_reasons(self) -> dict[str, str]:
        """Item key -> drop reason from every run state opened (e.g. a rejected trajectory's
        id -> why the rollout dropped it); built once."""
        with self._verdict_lock:
            if self._drops is None:
                drops: dict[str, str] = {}
                for source in self.sources.values():
                    try:
                        state = source.state
                        if state is not None:
                            drops.update(state.dropped())
                    except SourceError:
                        continue  # its own page says what is wrong
                self._drops = drops
            return self._drops

    def find(self, key: str) -> list[tuple[DatasetSource, int]]:
        """Records whose id, or whose task's id, is ``key`` (to link run-state items)."""
        hits = []
        for source in self.datasets():
            index = source.index
            for column in ("id", "task_id", "target_id"):
                if column in index.column_names:
                    pos = pc.index(index.column(column), key).as_py()
                    if pos is not None and pos >= 0:
                        hits.append((source, int(pos)))
                        break
        return hits

    def close(self) -> None:
        for source in self.sources.values():
            source.close()


def default_cache_dir() -> Path | None:
    """Where list indexes are cached: $TRACETUNE_VIEW_CACHE (empty: no cache), else
    ~/.cache/tracetune/view. Never inside a dataset."""
    import os

    where = os.environ.get("TRACETUNE_VIEW_CACHE")
    if where is not None:
        return Path(where) if where else None
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tracetune" / "view"


def _load_run(slug: str, root: Path, label: str) -> Source:
    try:
        run = json.loads((root / "run.json").read_text())
        metrics = json.loads((root / "metrics.json").read_text())
        records = [
            EvalRecord.model_validate_json(line)
            for line in (root / "records.jsonl").read_text().splitlines()
            if line.strip()
        ]
    except (OSError, ValueError) as exc:
        return Source(
            slug,
            root,
            label,
            "error",
            error=f"{root}: the eval run's files cannot be read ({exc}); rerun "
            "`tracetune eval run` with the same settings to rewrite them",
        )
    return RunSource(
        slug,
        root,
        label,
        "run",
        state_path=None,  # the run's state is its trajectories dataset's, shown there
        run=run,
        metrics=metrics,
        records=records,
    )


def run_trajectories(
    catalog: Catalog, run: RunSource, record: EvalRecord
) -> list[tuple[DatasetSource, Trajectory]]:
    """The trajectories behind one scored item of a run (all turns, in order)."""
    source = catalog.sources.get(run.trajectories_slug or "")
    if not isinstance(source, DatasetSource):
        return []
    positions: list[int] = []
    if record.trajectory_id:
        pos = source.position(record.trajectory_id)
        if pos is not None:
            positions.append(pos)
    if run.bench == "gta":  # step mode: one trajectory per turn, all on the item's task
        same = pc.equal(source.index.column("task_id"), f"gta-{record.item_id}")
        positions += pc.indices_nonzero(pc.fill_null(same, False)).to_pylist()
    found = source.records_at(sorted(set(positions))) if positions else []
    trajectories = [t for t in found if isinstance(t, Trajectory)]
    trajectories.sort(key=lambda t: int(t.metadata.get("turn", 0) or 0))
    return [(source, t) for t in trajectories]
