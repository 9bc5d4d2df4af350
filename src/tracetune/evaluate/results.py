"""A finished ``eval run`` read back: its records and metrics, the headline score of each
benchmark, breakdowns by category or level, and the failure examples.

``tracetune view`` shows these on a run's page and ``tracetune eval report`` compares runs
with them (:mod:`tracetune.view.report`). Breakdowns: GTA by answer kind (objective /
subjective / image generation) and, end to end, by tool category (P/O/L/C F1); GAIA by level;
task programs by family. Failure examples are the lowest-scoring items of a run on its
headline answer metric.
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracetune.errors import TracetuneError
from tracetune.evaluate.gta import CATEGORY_OF
from tracetune.schema import EvalRecord, Trajectory
from tracetune.store import Dataset

HEADLINE_SCORE = {
    "gta": ("answer_acc", "answer_acc_w_imggen"),
    "gaia": ("accuracy",),
    "programs": ("accuracy",),
    "vqa": ("vqa_accuracy", "mc_accuracy"),
    "dynvqa": ("token_recall",),
    "agentx": ("goal_accuracy", "goal_accuracy_generative"),
}


class ReportError(TracetuneError, ValueError):
    """A run directory cannot be reported on; the message says what is missing."""


@dataclass
class RunData:
    """One run directory, read back."""

    root: Path
    label: str
    run: dict[str, Any]
    metrics: dict[str, Any]
    records: list[EvalRecord]
    slug: str = ""
    trajectories: dict[str, list[Trajectory]] = field(default_factory=dict)

    @property
    def bench(self) -> str:
        return str(self.metrics.get("benchmark") or self.run.get("benchmark"))

    @property
    def headline(self) -> str:
        return str(self.metrics.get("headline", ""))

    def report(self, name: str) -> dict[str, Any]:
        return dict(self.metrics.get("reports", {}).get(name, {}))


def load_run(root: Path) -> RunData:
    root = Path(root)
    for name in ("run.json", "metrics.json", "records.jsonl"):
        if not (root / name).is_file():
            raise ReportError(
                f"{root} has no {name}: point at a directory written by `tracetune eval run` "
                "(a run killed before scoring writes it when rerun)"
            )
    run = json.loads((root / "run.json").read_text())
    metrics = json.loads((root / "metrics.json").read_text())
    records = [
        EvalRecord.model_validate_json(line)
        for line in (root / "records.jsonl").read_text().splitlines()
        if line.strip()
    ]
    model = run_model_label(run, metrics)
    return RunData(root, f"{root.name} ({model})", run, metrics, records)


def run_model_label(run: dict[str, Any], metrics: dict[str, Any]) -> str:
    """The model an eval run evaluated: its spec, plus the adapter loaded on it (a DPO
    policy is the SFT model's spec with the DPO adapter; the spec alone would name SFT)."""
    model = str(run.get("model") or metrics.get("model") or "?")
    backend = (run.get("config") or {}).get("backend") or {}
    adapter = backend.get("adapter") if isinstance(backend, dict) else None
    return f"{model} + adapter {adapter}" if adapter else model


def load_trajectories(run: RunData, wanted: set[str]) -> None:
    """Read the trajectories behind the items ``wanted`` into ``run.trajectories``."""
    path = run.root / "trajectories"
    if not wanted or not (path / "manifest.json").exists():
        return
    item_key = {
        "gta": "gta_id",
        "gaia": "gaia_task_id",
        "programs": "task_id",
        "vqa": "item_id",
        "dynvqa": "item_id",
        "agentx": "agentx_id",
    }.get(run.bench)
    for trajectory in Dataset.open(path, Trajectory):
        item = str(trajectory.metadata.get(item_key or "", trajectory.task.id))
        if item in wanted:
            run.trajectories.setdefault(item, []).append(trajectory)
    for found in run.trajectories.values():
        found.sort(key=lambda t: int(t.metadata.get("turn", 0)))


def percent_metrics(summary: dict[str, Any]) -> dict[str, float]:
    """The metrics of a report that are percentages (counts and means left out)."""
    metrics = summary.get("metrics", {})
    declared = summary.get("details", {}).get("percent")
    if declared:
        names = [m for m in declared if m in metrics]
        names += [m for m in metrics if "/" in m and m not in names]  # per-family accuracies
    else:
        names = [
            m
            for m, v in metrics.items()
            if isinstance(v, float)
            and not m.startswith("mean_")
            and not m.endswith(("_precision", "_recall"))
        ]
    return {m: float(metrics[m]) for m in names}


def breakdowns(run: RunData) -> dict[str, dict[str, float]]:
    """Per-category/per-level numbers of a run: {breakdown name: {category: value}}."""
    out: dict[str, dict[str, float]] = {}
    headline = run.report(run.headline)
    metrics = headline.get("metrics", {})
    if run.bench == "gta":
        sums: dict[str, list[float]] = defaultdict(list)
        for record in run.records:
            if record.benchmark != run.headline:
                continue
            kind = str(record.metadata.get("answer_kind", "?"))
            value = record.scores.get("answer_acc")
            if value is None:
                value = record.scores.get("answer_acc_w_imggen")
            if value is not None:
                sums[kind].append(float(value))
        if sums:
            out["answer score by answer kind (%)"] = {
                k: 100.0 * sum(v) / len(v) for k, v in sorted(sums.items())
            }
        tool_steps = _step_tool_accuracy(run)
        if tool_steps:
            out["tool accuracy by category, step mode (%)"] = tool_steps
        f1 = {
            name: float(metrics[f"{p}_f1"])
            for p, name in (
                ("p", "perception"),
                ("o", "operation"),
                ("l", "logic"),
                ("c", "creativity"),
            )
            if f"{p}_f1" in metrics
        }
        if f1:
            out["tool F1 by category (%)"] = f1
    elif run.bench == "gaia":
        levels = {
            k.removeprefix("level_"): float(v) for k, v in metrics.items() if k.startswith("level_")
        }
        if levels:
            out["accuracy by level (%)"] = levels
    elif run.bench == "programs":
        families = {
            k.split("/", 1)[1]: float(v) for k, v in metrics.items() if k.startswith("accuracy/")
        }
        if families:
            out["accuracy by family (%)"] = families
    return out


def _step_tool_accuracy(run: RunData) -> dict[str, float]:
    """Step mode: the share of gold tool turns, per GTA tool category, that named the tool."""
    hits: dict[str, list[int]] = defaultdict(list)
    for record in run.records:
        if record.benchmark != run.headline:
            continue
        for step in record.metadata.get("steps") or []:
            gold = step.get("gold") if isinstance(step, dict) else None
            if not isinstance(gold, str) or not gold.startswith("tool:"):
                continue
            category = CATEGORY_OF.get(gold.removeprefix("tool:"))
            if category is not None:
                hits[category].append(int(step.get("pred") == gold))
    order = ("perception", "operation", "logic", "creativity")
    return {c: 100.0 * sum(hits[c]) / len(hits[c]) for c in order if hits.get(c)}


def failures(run: RunData, limit: int) -> list[EvalRecord]:
    """The lowest-scoring items on the headline answer metric (score below 1)."""
    keys = HEADLINE_SCORE.get(run.bench, ("accuracy",))
    scored = []
    for record in run.records:
        if record.benchmark != run.headline:
            continue
        value = next((record.scores[k] for k in keys if record.scores.get(k) is not None), None)
        if value is not None and float(value) < 1.0:
            scored.append((float(value), record.item_id, record))
    scored.sort(key=lambda t: (t[0], t[1]))
    return [r for _, _, r in scored[:limit]]
