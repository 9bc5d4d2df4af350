"""Check that a dataset directory's run state matches the records on disk, and repair it.

Each item a stage marked done lists the ids of the records it produced. An item whose
records are not all on disk (a chunk deleted, or set aside here because it cannot be read)
is put back to pending, so the next run of the same command processes it again instead of
answering "already done". Records on disk that no done item claims (a run killed between
writing a chunk and marking its items) are counted, and left alone: the rerun recognises
their ids and does not write them twice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq

from tracetune.store.dataset import Dataset


@dataclass
class StageCheck:
    stage: str
    done: int = 0  # items marked done whose records could be checked
    unchecked: int = 0  # items marked done without a list of their records (older runs)
    missing: list[str] = field(default_factory=list)  # done items with records missing


@dataclass
class CheckReport:
    root: Path
    records: int = 0
    chunks: int = 0
    unreadable: list[str] = field(default_factory=list)  # chunk files set aside
    stages: list[StageCheck] = field(default_factory=list)
    unclaimed: int = 0  # records on disk that no done item lists
    repaired: bool = False

    @property
    def ok(self) -> bool:
        return not self.unreadable and not any(s.missing for s in self.stages)

    def summary(self) -> str:
        lines = [f"{self.root}: {self.records} records in {self.chunks} chunks"]
        for name in self.unreadable:
            lines.append(f"  unreadable chunk {name} (set aside as {name}.unreadable)")
        for s in self.stages:
            line = f"  {s.stage}: {s.done} done items checked"
            if s.unchecked:
                line += f", {s.unchecked} without a record list (not checked)"
            if s.missing:
                verb = "put back to pending" if self.repaired else "would be put back to pending"
                shown = ", ".join(s.missing[:5]) + (" ..." if len(s.missing) > 5 else "")
                line += f", {len(s.missing)} with records missing ({verb}: {shown})"
            lines.append(line)
        if self.unclaimed:
            lines.append(
                f"  {self.unclaimed} records on disk belong to no done item (from a run stopped "
                "between writing and marking; a rerun keeps them and does not duplicate them)"
            )
        if self.ok:
            lines.append("  OK: every done item has its records on disk")
        elif self.repaired:
            lines.append("  repaired: rerun the command that wrote this directory to redo them")
        else:
            lines.append("  run without --dry-run to put those items back to pending")
        return "\n".join(lines)


def check_dataset(root: str | os.PathLike[str], *, repair: bool = True) -> CheckReport:
    """Check every done item of every stage recorded in ``root``'s run state.

    With ``repair``, unreadable chunks are renamed aside (``*.unreadable``, no longer read)
    and done items with missing records are put back to pending.
    """
    dataset = Dataset.open(root)
    report = CheckReport(Path(root), repaired=repair)
    on_disk: set[str] = set()
    for path in dataset.chunk_files():
        try:
            ids = pq.read_table(path, columns=["id"]).column("id").to_pylist()
        except Exception:  # any unreadable file: truncated, not Parquet, wrong schema
            report.unreadable.append(path.name)
            if repair:
                os.replace(path, path.with_name(path.name + ".unreadable"))
            continue
        report.chunks += 1
        on_disk.update(ids)
    report.records = len(on_disk)
    state = dataset.state
    claimed: set[str] = set()
    for stage in state.stages():
        check = StageCheck(stage)
        for item_key, _, info in state.iter_items(stage, "done"):
            ids = info.get("records")
            if not isinstance(ids, list):
                check.unchecked += 1
                continue
            check.done += 1
            claimed.update(ids)
            if not all(i in on_disk for i in ids):
                check.missing.append(item_key)
        check.missing.sort()
        if repair and check.missing:
            state.forget(stage, check.missing)
        report.stages.append(check)
    report.unclaimed = len(on_disk - claimed) if any(s.done for s in report.stages) else 0
    return report
