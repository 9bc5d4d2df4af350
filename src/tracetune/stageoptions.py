"""The options every item stage shares, declared once: where it writes, how much runs at
once, the backend it calls, and when it stops (items, spend, tokens, time).

A stage's config subclasses :class:`StageOptions` (or :class:`RunOptions`, for a section
that a pipeline gives its output directory; or :class:`RunBudgets`, for a chain of stages
where "the first N items" has no single meaning) and adds its own fields; it may redeclare
a shared one to say what it means there (``out``'s description, a different default
``concurrency``). The command line gets one option per field from the config
(``tracetune.cli.options_from_config``), so ``--max-cost``, ``--max-time`` and the rest read
the same in every command, and a YAML ``--config`` uses the field names as keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from tracetune.cliflag import CliFlag
from tracetune.models.base import ModelOptions
from tracetune.timelimit import MaxTime, TimedBudget


class RunBudgets(BaseModel):
    """How a run's stages run: how much at once, until which budget, on which backend (YAML
    keys are these field names)."""

    model_config = ConfigDict(extra="forbid")

    concurrency: int = Field(
        default=2, ge=1, description="Model requests in flight, and items run at once."
    )
    max_cost_usd: Annotated[float | None, CliFlag("--max-cost", "--max-cost-usd")] = Field(
        default=None, ge=0, description="Stop after this much spend (USD)."
    )
    max_total_tokens: int | None = Field(
        default=None, ge=1, description="Stop after this many tokens (prompts and completions)."
    )
    max_time: MaxTime = Field(
        default=None,
        gt=0,
        description="Start no new item after this long (seconds, or 600, 10m, 1.5h); the items "
        "in flight finish and are saved, and a rerun continues.",
    )
    backend: Annotated[ModelOptions, CliFlag(skip=True)] = Field(
        default_factory=ModelOptions,
        description="Backend options, a YAML section (CLI: --base-url, and --adapter and "
        "--no-stop where the command has them).",
    )

    def budget(self) -> TimedBudget:
        """The stage runner's budget from ``max_cost_usd``, ``max_total_tokens`` and
        ``max_time``: once one is spent no new item starts, and a rerun continues."""
        return TimedBudget(
            max_cost_usd=self.max_cost_usd,
            max_tokens=self.max_total_tokens,
            max_seconds=self.max_time,
        )


class RunOptions(RunBudgets):
    """:class:`RunBudgets` and how many items: how an item stage runs. A section of a
    pipeline's config uses it without ``out``, which the pipeline sets."""

    limit: int | None = Field(default=None, ge=1, description="Only the first N items.")


class StageOptions(RunOptions):
    """:class:`RunOptions` and where the stage writes."""

    out: Path = Field(description="Output directory (resumable: rerun to finish a killed run).")


__all__ = ["RunBudgets", "RunOptions", "StageOptions"]
