"""Stage runner: resume, bounded concurrency, budgets, failure threshold, progress."""

from tracetune.runner.stage import (
    Budget,
    Drop,
    MeteredModel,
    StageAborted,
    StageResult,
    run_stage,
)

__all__ = ["Budget", "Drop", "MeteredModel", "StageAborted", "StageResult", "run_stage"]
