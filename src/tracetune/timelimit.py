"""Wall-clock budgets (``--max-time``) for training, rollouts and evaluation.

Step and item counts cannot be calibrated when a machine's speed varies tenfold with its
load; a time budget can. Both forms stop *cleanly*:

- :class:`TimedBudget` is a stage-runner budget: once the time is spent no new item starts,
  the items in flight finish and are saved, and a rerun of the same command resumes with
  the items not done yet.
- :func:`time_limit_callback` is a ``transformers`` trainer callback: once the time is
  spent, training stops after the current optimizer step, and the model is saved as at the
  end of a normal run (with the learning-rate schedule as planned for the full run).
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from tracetune.cliflag import CliFlag
from tracetune.errors import ConfigError
from tracetune.runner import Budget
from tracetune.schema import Usage

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h)?\s*$", re.I)


def parse_duration(text: str | float | int | None) -> float | None:
    """Seconds from ``90``, ``90s``, ``10m``, ``1.5h`` (None stays None)."""
    if text is None:
        return None
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        m = _DURATION.match(text)
        if not m:
            raise ConfigError(
                f"--max-time {text!r} is not a duration; write seconds (600), or 10m, 1.5h, 90s"
            )
        unit = (m.group(2) or "s").lower()
        seconds = float(m.group(1)) * {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}[unit]
    if seconds <= 0:
        raise ConfigError(f"--max-time must be positive, got {text!r}")
    return seconds


def seconds_from_text(value: Any) -> Any:
    """A duration's text (``10m``) as seconds, for a config field's validator; numbers are
    left to the field's own checks."""
    return parse_duration(value) if isinstance(value, str) else value


MaxTime = Annotated[
    float | None, CliFlag(text=True, metavar="DURATION"), BeforeValidator(seconds_from_text)
]
"""A config field's type for a time budget: seconds, or text such as ``600``, ``10m`` or
``1.5h`` (in YAML or from ``--max-time``)."""


def duration(text: str | None) -> float | None:
    """:func:`parse_duration` for command-line flags (a bad value is a usage error)."""
    try:
        return parse_duration(text)
    except ValueError as exc:
        import typer

        raise typer.BadParameter(str(exc), param_hint="--max-time") from exc


class TimedBudget(Budget):
    """A stage budget that also stops starting new items after ``max_seconds``."""

    max_seconds: float | None = Field(
        default=None, description="Start no new item after this many seconds."
    )
    started: float = Field(
        default_factory=time.monotonic,
        description="When the clock started (time.monotonic()); the stages of one command "
        "share it, so the limit is the whole command's.",
    )

    def exceeded(self, usage: Usage) -> str | None:
        why = super().exceeded(usage)
        if why is not None:
            return why
        if self.max_seconds is not None:
            elapsed = time.monotonic() - self.started
            if elapsed >= self.max_seconds:
                return (
                    f"time budget reached ({elapsed:.0f} s >= {self.max_seconds:.0f} s); rerun "
                    "the same command to continue"
                )
        return None

    @property
    def unlimited(self) -> bool:
        return super().unlimited and self.max_seconds is None


def time_limit_callback(max_seconds: float) -> Any:
    """A trainer callback that ends training after ``max_seconds`` of wall-clock time.

    Time counts from the start of training (model loading and data checks excluded). The
    trainer then saves the final model as usual.
    """
    from transformers import TrainerCallback

    class TimeLimit(TrainerCallback):
        def __init__(self) -> None:
            self.started: float | None = None
            self.stopped_at_step: int | None = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            self.started = time.monotonic()
            return control

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
            if self.started is not None and time.monotonic() - self.started >= max_seconds:
                control.should_training_stop = True
                self.stopped_at_step = int(state.global_step)
            return control

    return TimeLimit()


__all__ = ["TimedBudget", "duration", "parse_duration", "time_limit_callback"]
