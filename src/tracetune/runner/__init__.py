"""Stage runner: resume, bounded concurrency, budgets, failure threshold, progress."""

from tracetune.runner.stage import (
    Budget,
    Drop,
    MeteredModel,
    StageAborted,
    StageCore,
    StageResult,
    run_stage,
)
from tracetune.runner.stats import StageStats, stage_stats

__all__ = [
    "Budget",
    "Drop",
    "MeteredModel",
    "StageAborted",
    "StageCore",
    "StageResult",
    "StageStats",
    "run_stage",
    "stage_stats",
]
