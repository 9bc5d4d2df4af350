"""Run state in an embedded SQLite file: item status, cached model responses, usage totals.

One file per output directory, no server. WAL mode lets several processes (e.g. Ray
workers on one machine) share it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
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


class RunState:
    """What a run has done, what its model calls returned, and what they cost."""

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

    def close(self) -> None:
        with self._lock:
            self._db.close()

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
            return
        now = time.time()
        args = [(stage, k, status, json.dumps(info or {}), now) for k, status, info in rows]
        with self._lock:
            self._db.executemany("INSERT OR REPLACE INTO items VALUES (?, ?, ?, ?, ?)", args)
            self._db.commit()

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
        return dict(rows)  # type: ignore[arg-type]

    # -- response cache ----------------------------------------------------------------
    def cache_get(self, key: str) -> Any | None:
        rows = self._run("SELECT value FROM cache WHERE key=?", (key,))
        return json.loads(rows[0][0]) if rows else None

    def cache_put(self, key: str, value: Any) -> None:
        self._run(
            "INSERT OR REPLACE INTO cache VALUES (?, ?, ?)",
            (key, json.dumps(value), time.time()),
        )

    # -- usage -------------------------------------------------------------------------
    def add_usage(self, stage: str, model: str, usage: Usage) -> None:
        self._usage_version += 1
        self._run(
            """INSERT INTO usage VALUES (?, ?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT(stage, model) DO UPDATE SET
              prompt_tokens = prompt_tokens + excluded.prompt_tokens,
              completion_tokens = completion_tokens + excluded.completion_tokens,
              cost_usd = cost_usd + excluded.cost_usd,
              calls = calls + excluded.calls,
              cached_calls = cached_calls + excluded.cached_calls,
              retries = retries + excluded.retries""",
            (
                stage,
                model,
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.cost_usd,
                usage.calls,
                usage.cached_calls,
                usage.retries,
            ),
        )

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
        rows = self._run(
            "SELECT COALESCE(SUM(prompt_tokens),0), COALESCE(SUM(completion_tokens),0), "
            "COALESCE(SUM(cost_usd),0), COALESCE(SUM(calls),0), COALESCE(SUM(cached_calls),0), "
            f"COALESCE(SUM(retries),0) FROM usage {where}",
            args,
        )
        p, c, cost, calls, cached, retries = rows[0]
        return Usage(
            prompt_tokens=p,
            completion_tokens=c,
            cost_usd=cost,
            calls=calls,
            cached_calls=cached,
            retries=retries,
        )
