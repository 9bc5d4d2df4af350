"""What the stages of one command did, so the command can end with the right exit status.

Every :func:`~tracetune.runner.run_stage` call records its :class:`StageResult` here. The
command line resets the record when a command starts and, when it ends, prints the failed
items with their reasons and exits with :data:`ITEMS_FAILED_EXIT` if any item failed, so no
command that processes items can finish "successfully" while items failed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tracetune.runner.stage import StageResult

ITEMS_FAILED_EXIT = 3
"""Exit status of a command in which items failed (recorded as failed, retried on a rerun),
whether the command finished the other items or aborted because too many failed."""

_results: list[StageResult] = []


def record(result: StageResult) -> None:
    """Note a stage's result (called by the runner at the end of every stage run)."""
    _results.append(result)


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
