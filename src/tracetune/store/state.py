"""Run state in an embedded SQLite file: item status, cached model responses, usage totals.

One file per output directory, no server. WAL mode lets several processes (e.g. Ray
workers on one machine) share it.

Usage and cached responses are written in batches: they are kept in memory (and counted by
``usage()`` and answered by ``cache_get()`` at once) and written together at most
``WRITE_DELAY_S`` after the first of them, when items are marked in bulk, on ``flush()``,
on ``close()`` and at interpreter exit. A killed process loses at most that fraction of a
second of usage accounting and cached replies; item status is never delayed.
"""

from __future__ import annotations

import atexit
import json
import os
import sqlite3
import threading
import time
import weakref
from pathlib import Path
from typing import Any

from tracetune.schema import Usage

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    stage TEXT NOT NULL, key TEXT NOT NULL, status TEXT NOT NULL, info TEXT,
    updated REAL NOT NULL, PRIMARY KEY (stage, key));
CREATE TABLE IF NOT EXISTS cache (
    key TEXT PRIMARY KEY, value TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS usage (
    stage TEXT NOT NULL, model TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0, completion_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0, calls INTEGER NOT NULL DEFAULT 0,
    cached_calls INTEGER NOT NULL DEFAULT 0, retries INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (stage, model));
"""


# How long usage() may answer from its cache when this process added no usage meanwhile.
USAGE_TTL_S = 0.5
# Usage and cache writes wait at most this long to be written together.
WRITE_DELAY_S = 0.25

_USAGE_UPSERT = """INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?)
    ON CONFLICT(stage, model) DO UPDATE SET
      prompt_tokens = prompt_tokens + excluded.prompt_tokens,
      completion_tokens = completion_tokens + excluded.completion_tokens,
      cost_usd = cost_usd + excluded.cost_usd,
      calls = calls + excluded.calls,
      cached_calls = cached_calls + excluded.cached_calls,
      retries = retries + excluded.retries"""

_OPEN: weakref.WeakSet[RunState] = weakref.WeakSet()


@atexit.register
def _flush_all() -> None:
    for state in list(_OPEN):
        try:
            state.flush()
        except sqlite3.Error:  # closed or gone: nothing to keep
            pass


class RunState:
    """What a run has done, what its model calls returned, and what they cost."""

    # cache_get / cache_put return in microseconds (writes are batched; reads are one indexed
    # lookup): backends call them directly instead of through a worker thread.
    fast_cache = True

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._db.commit()
        # usage() totals, reused until this connection adds usage or USAGE_TTL_S passes (other
        # processes sharing the file show up within that time): budget checks and progress
        # read them once per item.
        self._usage_cache: dict[str | None, tuple[int, float, Usage]] = {}
        self._usage_version = 0
        # Writes waiting to be batched (see the module docstring).
        self._pending_usage: dict[tuple[str, str], Usage] = {}
        self._pending_cache: dict[str, str] = {}
        self._pending_since: float | None = None
        self._file = self.path.resolve()
        self._flush_others()  # another object on this file in this process: see its writes
        _OPEN.add(self)

    def _flush_others(self) -> None:
        for other in list(_OPEN):
            if other is not self and other._pending_since is not None and other._file == self._file:
                other.flush()

    def close(self) -> None:
        with self._lock:
            self._flush_locked()
            self._db.close()
        _OPEN.discard(self)

    def __del__(self) -> None:
        # A state dropped without close() (a dataset object going out of scope) must not take
        # its batched writes with it: _OPEN holds it weakly, so nothing else would flush them.
        try:
            if self._pending_since is not None:
                self.flush()
        except Exception:  # closed, or the interpreter is shutting down
            pass

    def flush(self) -> None:
        """Write the usage and cached replies kept in memory."""
        with self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        if self._pending_since is None:
            return
        usage = [(s, m, *_usage_row(u)) for (s, m), u in self._pending_usage.items()]
        now = time.time()
        cache = [(k, v, now) for k, v in self._pending_cache.items()]
        self._db.executemany(_USAGE_UPSERT, usage)
        self._db.executemany("INSERT OR REPLACE INTO cache VALUES (?, ?, ?)", cache)
        self._db.commit()
        self._pending_usage.clear()
        self._pending_cache.clear()
        self._pending_since = None

    def _pending_locked(self) -> None:
        now = time.monotonic()
        if self._pending_since is None:
            self._pending_since = now
        elif now - self._pending_since >= WRITE_DELAY_S:
            self._flush_locked()

    def _run(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            rows = self._db.execute(sql, args).fetchall()
            self._db.commit()
            return rows

    # -- items -------------------------------------------------------------------------
    def mark(self, stage: str, key: str, status: str, info: dict[str, Any] | None = None) -> None:
        """Record the outcome of one item of a stage ('done', 'dropped', 'failed', ...)."""
        self._run(
            "INSERT OR REPLACE INTO items VALUES (?, ?, ?, ?, ?)",
            (stage, key, status, json.dumps(info or {}), time.time()),
        )

    def mark_many(self, stage: str, rows: list[tuple[str, str, dict[str, Any] | None]]) -> None:
        """Record many outcomes of a stage, ``(key, status, info)`` each, in one transaction."""
        if not rows:
            self.flush()
            return
        now = time.time()
        args = [(stage, k, status, json.dumps(info or {}), now) for k, status, info in rows]
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO items VALUES (?, ?, ?, ?, ?)", args)
            self._db.commit()
            self._flush_locked()

    def forget(self, stage: str, keys: list[str]) -> None:
        """Put ``keys`` back to pending: the next run of ``stage`` processes them again."""
        with self._lock:
            self._db.executemany(
                "DELETE FROM items WHERE stage=? AND key=?", [(stage, k) for k in keys]
            )
            self._db.commit()

    def iter_items(
        self, stage: str, status: str | None = None
    ) -> list[tuple[str, str, dict[str, Any]]]:
        """Like :meth:`items`, optionally of one status only, in no particular order."""
        if status is None:
            rows = self._run("SELECT key, status, info FROM items WHERE stage=?", (stage,))
        else:
            rows = self._run(
                "SELECT key, status, info FROM items WHERE stage=? AND status=?", (stage, status)
            )
        return [(k, s, json.loads(i or "{}")) for k, s, i in rows]

    def status(self, stage: str, key: str) -> str | None:
        rows = self._run("SELECT status FROM items WHERE stage=? AND key=?", (stage, key))
        return rows[0][0] if rows else None

    def keys(self, stage: str, status: str | None = None) -> set[str]:
        if status is None:
            rows = self._run("SELECT key FROM items WHERE stage=?", (stage,))
        else:
            rows = self._run("SELECT key FROM items WHERE stage=? AND status=?", (stage, status))
        return {r[0] for r in rows}

    def items(self, stage: str) -> list[tuple[str, str, dict[str, Any]]]:
        rows = self._run("SELECT key, status, info FROM items WHERE stage=? ORDER BY key", (stage,))
        return [(k, s, json.loads(i or "{}")) for k, s, i in rows]

    def stages(self) -> list[str]:
        """Names of the stages that have recorded items here, in first-seen order."""
        rows = self._run("SELECT stage FROM items GROUP BY stage ORDER BY MIN(updated)")
        return [r[0] for r in rows]

    def counts(self, stage: str) -> dict[str, int]:
        rows = self._run(
            "SELECT status, COUNT(*) FROM items WHERE stage=? GROUP BY status", (stage,)
        )
        return dict(rows)

    # -- response cache ----------------------------------------------------------------
    def cache_get(self, key: str) -> Any | None:
        self._flush_others()
        with self._lock:
            pending = self._pending_cache.get(key)
            if pending is None:
                rows = self._db.execute("SELECT value FROM cache WHERE key=?", (key,)).fetchall()
                pending = rows[0][0] if rows else None
        return json.loads(pending) if pending is not None else None

    def cache_put(self, key: str, value: Any) -> None:
        text = json.dumps(value)
        with self._lock:
            self._pending_cache[key] = text
            self._pending_locked()

    # -- usage -------------------------------------------------------------------------
    def add_usage(self, stage: str, model: str, usage: Usage) -> None:
        with self._lock:
            self._usage_version += 1
            before = self._pending_usage.get((stage, model))
            self._pending_usage[stage, model] = usage if before is None else before.add(usage)
            self._pending_locked()

    def usage(self, stage: str | None = None) -> Usage:
        """Total usage (of ``stage``, or of all stages)."""
        cached = self._usage_cache.get(stage)
        now = time.monotonic()
        if (
            cached is not None
            and cached[0] == self._usage_version
            and now - cached[1] < USAGE_TTL_S
        ):
            return cached[2]
        usage = self._read_usage(stage)
        self._usage_cache[stage] = (self._usage_version, now, usage)
        return usage

    def _read_usage(self, stage: str | None) -> Usage:
        where, args = ("WHERE stage=?", (stage,)) if stage else ("", ())
        self._flush_others()
        with self._lock:
            pending = [u for (s, _), u in self._pending_usage.items() if stage in (None, s)]
        rows = self._run(
            "SELECT COALESCE(SUM(prompt_tokens),0), COALESCE(SUM(completion_tokens),0), "
            "COALESCE(SUM(cost_usd),0), COALESCE(SUM(calls),0), COALESCE(SUM(cached_calls),0), "
            f"COALESCE(SUM(retries),0) FROM usage {where}",
            args,
        )
        p, c, cost, calls, cached, retries = rows[0]
        total = Usage(
            prompt_tokens=p,
            completion_tokens=c,
            cost_usd=cost,
            calls=calls,
            cached_calls=cached,
            retries=retries,
        )
        for usage in pending:
            total = total.add(usage)
        return total


def _usage_row(u: Usage) -> tuple[int, int, float, int, int, int]:
    return (u.prompt_tokens, u.completion_tokens, u.cost_usd, u.calls, u.cached_calls, u.retries)
