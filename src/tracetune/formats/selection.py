"""Which records and steps are fit to train on: one rule for ``train sft`` and the exports.

A trajectory is trained on only when it ended in a final answer (status ``completed``) and,
when a verifier judged it (``metadata["verdict"]``), the verdict passed. Inside a kept
trajectory, a step whose action failed (no parsable action, unknown tool, bad arguments, a
raising tool) is never a training target: ``train sft`` keeps it in the context without
loss, so the model learns to recover from the error but not to make it; an export, whose
trainer has no per-turn loss switch, leaves the step and its error out.
"""

from __future__ import annotations

from typing import Any

from tracetune.schema import Step, Trajectory


def failed_step(step: Step) -> bool:
    """Whether a step's action failed (its error is what the model read next)."""
    return step.error is not None


def skip_reason(record: Any, *, only_completed: bool = True) -> str | None:
    """Why ``record`` is not trained on, or None when it is fit to train on.

    Dialogues and pairs always pass; trajectories must have ``status == "completed"`` and no
    failed verdict (``only_completed=False`` keeps every trajectory).
    """
    if not isinstance(record, Trajectory) or not only_completed:
        return None
    if record.status != "completed":
        return f"status {record.status}"
    verdict = record.metadata.get("verdict")
    if isinstance(verdict, dict) and verdict.get("passed") is False:
        reasons = verdict.get("reasons") or []
        detail = f": {reasons[0]}" if reasons and isinstance(reasons[0], str) else ""
        return f"verdict failed{detail}"
    return None


def trained_steps(trajectory: Trajectory, *, mask_failed_steps: bool = True) -> list[bool]:
    """One flag per step: whether its assistant turn is a training target."""
    return [not (mask_failed_steps and failed_step(s)) for s in trajectory.steps]


def without_failed_steps(trajectory: Trajectory) -> tuple[Trajectory, int]:
    """``trajectory`` with its failed steps left out (renumbered), and how many there were."""
    kept = [s for s in trajectory.steps if not failed_step(s)]
    dropped = len(trajectory.steps) - len(kept)
    if not dropped:
        return trajectory, 0
    steps = [s.model_copy(update={"index": i}) for i, s in enumerate(kept)]
    return trajectory.model_copy(update={"steps": steps}), dropped


NOTHING_TO_TRAIN = "no assistant turn to train on"
