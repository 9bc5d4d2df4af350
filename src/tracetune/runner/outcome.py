"""What the stages of one command did, so the command can end with the right exit status.

Every :func:`~tracetune.runner.run_stage` call records its :class:`StageResult` here. The
command line resets the record when a command starts and, when it ends, prints the failed
items with their reasons and exits with :data:`ITEMS_FAILED_EXIT` if any item failed, so no
command that processes items can finish "successfully" while items failed.
"""

from __future__ import annotations

import errno
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import TYPE_CHECKING, TypeVar

from tracetune.errors import (  # ITEMS_FAILED_EXIT re-exported: defined once, in errors
    ITEMS_FAILED_EXIT,
    TracetuneError,
)
from tracetune.models.base import fresh_samples

if TYPE_CHECKING:
    from tracetune.runner.stage import StageResult
    from tracetune.store import RunState

T = TypeVar("T")
R = TypeVar("R")

_results: list[StageResult] = []


def record(result: StageResult) -> None:
    """Note a stage's result (called by the runner at the end of every stage run)."""
    _results.append(result)
    if len(_results) > 10_000:  # a long-lived Python process that never resets
        del _results[:-10_000]


def reset() -> None:
    """Forget the results of earlier commands (called when a command starts)."""
    _results.clear()


def results() -> list[StageResult]:
    """The stage results recorded since the last :func:`reset`."""
    return list(_results)


def failure_report(shown: int = 5) -> str | None:
    """A readable account of the items that failed since the last reset, or None if none."""
    failed = [r for r in _results if r.failed]
    if not failed:
        return None
    total = sum(r.failed for r in failed)
    per_stage = ", ".join(f"{r.stage}: {r.failed}" for r in failed)
    lines = [f"{total} item(s) failed ({per_stage}):"]
    reasons = [(r.stage, key, why) for r in failed for key, why in r.failures]
    for stage, key, why in reasons[:shown]:
        lines.append(f"  {stage} {key}: {why}")
    if total > min(shown, len(reasons)):
        lines.append(f"  ... and {total - min(shown, len(reasons))} more")
    lines.append(
        "They are recorded as failed, not done: fix the cause and rerun the same command to "
        "retry them (finished items are kept)."
    )
    return "\n".join(lines)


# -- a full disk ------------------------------------------------------------------------------
DISK_FULL_HINT = (
    "free space on that file system (or write the output elsewhere), then rerun the same "
    "command: the items finished before are kept, the others are redone"
)


class DiskFullError(TracetuneError, OSError):
    """The disk holding a run's output is full: the run stops (every further item would fail
    the same way); what was finished before is kept, and a rerun after freeing space resumes.

    An ``OSError`` with ``errno`` ENOSPC, so :func:`disk_full` recognizes it like any other."""

    hint = DISK_FULL_HINT

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.errno = errno.ENOSPC


def disk_full(exc: BaseException | None) -> str | None:
    """What says ``exc`` (or an exception it was raised from) is a full disk, or None.

    Covers ``OSError`` ENOSPC/EDQUOT (Python and Arrow writes) and SQLite's "database or
    disk is full" (the run state)."""
    seen = 0
    while exc is not None and seen < 20:
        text = exc.message if isinstance(exc, TracetuneError) else str(exc)  # not its hint
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return text
        if "No space left on device" in text or "database or disk is full" in text:
            return text
        if "Disk quota exceeded" in text:
            return text
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


# -- retrying drops -------------------------------------------------------------------------
_retry_dropped: ContextVar[tuple[str, ...]] = ContextVar("retry_dropped", default=())


@contextmanager
def retrying_dropped(reasons: Iterable[str] | None) -> Iterator[None]:
    """Within this block, stages process again the items they dropped for one of ``reasons``.

    A reason matches a drop when it equals the drop's reason or begins it, ignoring case
    (``malformed`` retries "malformed generator output" and "malformed scenario"). Their
    model calls are answered by the backend afresh, not from the response cache, or a
    malformed reply would only be read back again.
    """
    token = _retry_dropped.set(tuple(r.strip() for r in reasons or () if r.strip()))
    try:
        yield
    finally:
        _retry_dropped.reset(token)


def _matches(reason: str, wanted: tuple[str, ...]) -> bool:
    reason = reason.lower()
    return any(reason == w.lower() or reason.startswith(w.lower()) for w in wanted)


def dropped_to_retry(state: RunState, stage: str, quiet: bool = False) -> set[str]:
    """Keys of ``stage``'s dropped items to process again (see :func:`retrying_dropped`);
    unless ``quiet``, says how many (or which reasons there are when none matches)."""
    wanted = _retry_dropped.get()
    if not wanted:
        return set()
    keys: set[str] = set()
    reasons: Counter[str] = Counter()
    for key, status, info in state.items(stage):
        if status != "dropped":
            continue
        reason = str(info.get("reason", ""))
        reasons[reason] += 1
        if _matches(reason, wanted):
            keys.add(key)
    if quiet:
        return keys
    if keys:
        _say(f"{stage}: retrying {len(keys)} dropped item(s) (--retry-dropped)")
    elif reasons:
        known = ", ".join(f"{r!r} ({n})" for r, n in reasons.most_common())
        asked = " ".join(repr(w) for w in wanted)
        _say(
            f"{stage}: no dropped item matches --retry-dropped {asked}; this stage dropped "
            f"items for: {known}"
        )
    return keys


def _say(message: str) -> None:
    # Where the progress bars go (stderr), whatever the logging setup.
    from rich.console import Console

    Console(stderr=True, soft_wrap=True).print(message, markup=False, highlight=False)


def fresh_for(
    retried: set[str], key: Callable[[T], str], process: Callable[[T], Awaitable[R]]
) -> Callable[[T], Awaitable[R]]:
    """``process``, answering the model calls of ``retried`` items without the cache."""
    if not retried:
        return process

    async def fresh(item: T) -> R:
        if key(item) not in retried:
            return await process(item)
        token = fresh_samples.set(True)
        try:
            return await process(item)
        finally:
            fresh_samples.reset(token)

    return fresh


__all__ = [
    "DISK_FULL_HINT",
    "ITEMS_FAILED_EXIT",
    "DiskFullError",
    "disk_full",
    "dropped_to_retry",
    "failure_report",
    "fresh_for",
    "record",
    "reset",
    "results",
    "retrying_dropped",
]
