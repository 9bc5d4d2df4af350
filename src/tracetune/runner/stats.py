"""What a stage did, read back from a dataset's run state: counts, drop reasons, spend.

``stage_stats(DIR)`` works on any directory a ``run_stage`` wrote (it reads
``DIR/state.sqlite`` and counts ``DIR``'s records), so every pipeline can print the same
table::

    from tracetune.runner.stats import stage_stats, stats_table
    rows = stage_stats("runs/x/tasks")
    Console().print(stats_table(rows))
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracetune.schema import Usage
from tracetune.store import Dataset, RunState


@dataclass
class StageStats:
    """One stage of one directory: items in, what became of them, records out, cost."""

    stage: str
    directory: str
    done: int = 0
    dropped: int = 0
    failed: int = 0
    records: int = 0  # records in the directory (all stages writing it together)
    drop_reasons: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # first few error messages
    usage: Usage = field(default_factory=Usage)

    @property
    def items(self) -> int:
        return self.done + self.dropped + self.failed

    @property
    def kept_rate(self) -> float:
        """Share of the items processed that were kept (done)."""
        return self.done / self.items if self.items else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "directory": self.directory,
            "items": self.items,
            "done": self.done,
            "dropped": self.dropped,
            "failed": self.failed,
            "records": self.records,
            "kept_rate": round(self.kept_rate, 4),
            "drop_reasons": self.drop_reasons,
            "failures": self.failures,
            "usage": self.usage.model_dump(),
        }


def stage_stats(root: str | os.PathLike[str]) -> list[StageStats]:
    """Per-stage statistics of the dataset directory ``root`` (empty if it has no state)."""
    root = Path(root)
    if (root / "workers").is_dir():  # Ray actors' own states, left by a run that was killed
        from tracetune.runner.ray_executor import fold_worker_states

        fold_worker_states(root)
    if not (root / "state.sqlite").exists():
        return []
    state = RunState(root / "state.sqlite")
    try:
        records = len(Dataset.open(root)) if (root / "manifest.json").exists() else 0
        rows = []
        for stage in state.stages():
            row = StageStats(
                stage=stage, directory=str(root), records=records, usage=state.usage(stage)
            )
            reasons: Counter[str] = Counter()
            for _, status, info in state.items(stage):
                if status == "done":
                    row.done += 1
                elif status == "dropped":
                    row.dropped += 1
                    reasons[str(info.get("reason", "?"))] += 1
                elif status == "failed":
                    row.failed += 1
                    if len(row.failures) < 3:
                        row.failures.append(str(info.get("error", "?")))
            row.drop_reasons = dict(reasons.most_common())
            rows.append(row)
        return rows
    finally:
        state.close()


def stats_table(rows: list[StageStats], title: str | None = None) -> Any:
    """A rich table of ``rows``: items, kept, dropped (with reasons), failed, tokens, cost."""
    from rich.table import Column, Table

    # Cells never wrap (a stats row split over two lines is hard to read), and the table is
    # drawn without borders or double padding so that it fits 80 columns at
    # realistic counts; what still does not fit is cut at the numbers' end, never the
    # stage names, which are what tells the rows apart.
    table = Table(
        Column("stage", no_wrap=True, min_width=max((len(r.stage) for r in rows), default=5)),
        *(
            Column(h, no_wrap=True, justify="right")
            for h in ("items", "kept", "dropped", "failed", "records", "tokens", "cost")
        ),
        title=title,
        box=None,
        show_edge=False,
        pad_edge=False,
        padding=(0, 1),
        collapse_padding=True,
    )
    for r in rows:
        table.add_row(
            r.stage,
            str(r.items),
            f"{r.done} ({r.kept_rate:.0%})",
            str(r.dropped),
            str(r.failed),
            str(r.records),
            f"{r.usage.total_tokens:,}",
            f"${r.usage.cost_usd:.4f}",
        )
    return table


def stats_json(rows: list[StageStats]) -> str:
    return json.dumps([r.to_dict() for r in rows], indent=2)
