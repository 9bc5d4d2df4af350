"""Benchmark runs: a controller over a benchmark, resumably, then scored by the exact scorers.

``tracetune eval run BENCH --data PATH --model SPEC --out DIR`` writes::

    DIR/run.json            what ran: benchmark, mode, model, toolset, prompt hashes
    DIR/trajectories/       every episode (a Trajectory dataset; resumable by stable ids)
    DIR/gold.json[l]        the gold items this run covers (so ``eval score`` reproduces it)
    DIR/predictions.jsonl   predictions in the benchmark scorer's own format
    DIR/metrics.json        the scorers' reports (aggregate metrics and how they were computed)
    DIR/records.jsonl       one EvalRecord per scored item, linked to its trajectory

A killed run reruns without redoing finished episodes (the stage runner keys each episode
by a stable id); predictions, metrics and records are rebuilt from all trajectories on disk,
so they always describe the whole run.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from tracetune.agent.loop import EpisodeBackendError  # noqa: F401  (raised by the runs)
from tracetune.errors import ConfigError
from tracetune.evaluate.base import ScoreReport
from tracetune.models.base import ChatModel, Sampling, load_model
from tracetune.runner import Budget, MeteredModel, StageResult, run_stage
from tracetune.schema import EvalRecord, Trajectory
from tracetune.store import AssetStore, Dataset

if TYPE_CHECKING:
    from tracetune.evaluate.adapter import BenchConfig

RUN_BENCHMARKS = ("gta", "gaia", "programs", "vqa", "dynvqa", "agentx")
"""The benchmarks tracetune ships adapters for; every registered adapter (including one
added later) is in :data:`tracetune.evaluate.adapter.ADAPTERS`."""
STAGE = "eval"
T = TypeVar("T")
Notify = Callable[[str], None]


class EvalRunError(ConfigError):
    """A run cannot start as configured; the message says what to change."""


def check_backend(trajectory: Trajectory) -> Trajectory:
    """``trajectory``, unless the agent loop stopped it on a backend error."""
    if trajectory.status == "failed":
        why = trajectory.metadata.get("error") or "the backend failed"
        raise EpisodeBackendError(f"{trajectory.task.id}: {why}")
    return trajectory


def bench_config(bench: str, **options: Any) -> BenchConfig:
    """The config of benchmark ``bench`` (its adapter's model) from keyword options: the
    Python API's way to name a run, ``bench_config("gta", model=..., out=..., data=...)``.
    An option the benchmark does not take, or a bad value, is an :class:`EvalRunError` that
    lists what it takes."""
    from pydantic import ValidationError

    from tracetune.evaluate.adapter import adapter_class

    cls = adapter_class(bench).config_model
    takes = ", ".join(n for n in cls.model_fields if n != "bench")
    foreign = sorted(set(options) - set(cls.model_fields))
    if foreign:
        raise EvalRunError(
            f"{', '.join(foreign)}: not an option of {bench}", hint=f"{bench} takes: {takes}"
        )
    try:
        return cls.model_validate({**options, "bench": bench})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise EvalRunError(f"invalid options for {bench}: {problems}") from exc


def data_fingerprint(path: Path | None) -> str | None:
    """The sha256 of a benchmark's gold file (GTA's dataset.json, GAIA's metadata.jsonl),
    found in a folder too; for any other folder (a task dataset) its resolved path."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        for name in ("dataset.json", "metadata.jsonl", "data.json"):
            if (path / name).is_file():
                path = path / name
                break
        else:
            return str(path.resolve())
    if not path.is_file():
        return str(path)  # the runner says that it is missing
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return "sha256:" + digest.hexdigest()


def stable_id(*parts: Any) -> str:
    blob = json.dumps([str(p) for p in parts])
    return "traj-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically: a reader (or a killed writer) never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    os.replace(tmp, path)


class RunContext:
    """The run directory, its trajectory dataset, the metered controller and the sampling."""

    def __init__(self, config: BenchConfig, notify: Notify | None = None) -> None:
        self.config = config
        self.root = Path(config.out)
        self.notify: Notify = notify or (lambda _msg: None)
        self._check_rerun()
        self.trajectories: Dataset[Trajectory] = Dataset.create(
            self.root / "trajectories", Trajectory
        )
        self.model: ChatModel | None = None
        self.tool_model: ChatModel | None = None
        self.started = time.time()

    def _check_rerun(self) -> None:
        path = self.root / "run.json"
        if not path.exists():
            return
        previous = json.loads(path.read_text()).get("identity", {})
        now = json.loads(json.dumps(self.config.identity(), default=str))
        # A key an older run.json lacks was not recorded then: nothing to compare it with.
        changed = {
            k: (previous[k], v) for k, v in now.items() if k in previous and previous[k] != v
        }
        if changed:
            what = ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
            raise EvalRunError(
                f"{self.root} holds a run with other settings ({what}); rerun with the same "
                "settings to resume it, or choose a new --out"
            )

    def load_models(self, model: ChatModel | None = None) -> ChatModel:
        loaded = model or load_model(
            self.config.model, self.config.backend.for_stage(self.config.concurrency)
        )
        self.model = MeteredModel(loaded, self.trajectories.state, STAGE)
        if self.config.tool_model:
            tool = (
                loaded
                if self.config.tool_model == self.config.model
                else load_model(
                    self.config.tool_model, self.config.backend.for_stage(self.config.concurrency)
                )
            )
            self.tool_model = MeteredModel(tool, self.trajectories.state, STAGE + ":tools")
        return self.model

    async def close(self) -> None:
        if self.model is not None:
            await self.model.aclose()
        if self.tool_model is not None and self.config.tool_model != self.config.model:
            await self.tool_model.aclose()

    def sampling(self) -> Sampling:
        return Sampling(
            temperature=self.config.temperature,
            max_tokens=self.config.max_tokens,
            stop=("\nObservation:",),
        )

    def budget(self) -> Budget:
        return self.config.budget()

    async def run_items(
        self,
        items: Sequence[T],
        key: Callable[[T], str],
        process: Callable[[T], Awaitable[Trajectory]],
        *,
        progress: bool,
        sources: Iterable[AssetStore] = (),
        max_chunk: int = 16,
    ) -> StageResult:
        """Every benchmark item through ``process`` into the run's trajectories, on the
        stage runner (resumable; a failed item is retried on the next run)."""
        return await run_stage(
            STAGE,
            items,
            key=key,
            process=process,
            out=self.trajectories,
            concurrency=self.config.concurrency,
            budget=self.budget(),
            sources=sources,
            progress=progress,
            total=len(items),
            chunk_size=max(1, min(max_chunk, len(items) // 4)),
        )

    def write_run(self, extra: dict[str, Any]) -> None:
        config = self.config.model_dump(mode="json")
        config["backend"].pop("api_key_env", None)
        write_json(
            self.root / "run.json",
            {
                "benchmark": self.config.bench,
                "mode": self.config.run_mode(),
                "model": self.config.model,
                "identity": json.loads(json.dumps(self.config.identity(), default=str)),
                "config": config,
                "started_at": self.started,
                **extra,
            },
        )

    def finish(
        self,
        reports: dict[str, ScoreReport],
        headline: str,
        trajectory_of: dict[str, str],
        result: StageResult,
        extra: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Write metrics.json and records.jsonl; return the metrics document."""
        usage = self.trajectories.state.usage()
        metrics = {
            "benchmark": self.config.bench,
            "mode": self.config.run_mode(),
            "model": self.config.model,
            "headline": headline,
            "reports": {name: report.summary() for name, report in reports.items()},
            "run": {
                "written": result.written,
                "already_done": result.skipped,
                "failed": result.failed,
                "stopped": result.stopped,
                "trajectories": len(self.trajectories),
                "tokens": usage.total_tokens,
                "cost_usd": usage.cost_usd,
                "model_calls": usage.calls,
                "duration_s": round(time.time() - self.started, 3),
            },
            **(extra or {}),
        }
        if result.failed:
            self.notify(
                f"{result.failed} item(s) failed at the backend and count as missing "
                "predictions; rerun the same command to retry them"
            )
        write_json(self.root / "metrics.json", metrics)
        records: list[EvalRecord] = []
        for report in reports.values():
            for record in report.eval_records(self.config.model):
                record.trajectory_id = trajectory_of.get(record.item_id)
                records.append(record)
        write_jsonl(self.root / "records.jsonl", [r.model_dump(mode="json") for r in records])
        return metrics


def headline_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """What ``eval run`` prints: the headline report's metrics, what they cover, the run."""
    report = metrics["reports"][metrics["headline"]]
    summary: dict[str, Any] = {
        "benchmark": metrics["headline"],
        "metrics": report["metrics"],
        "n_items": report.get("n_items"),
    }
    subset = report.get("details", {}).get("subset")
    if subset:
        # e.g. GTA e2e without some tools: the headline leaves the affected queries out
        summary["subset"] = subset
        summary["other_reports"] = [n for n in metrics["reports"] if n != metrics["headline"]]
    summary["run"] = metrics["run"]
    return summary


def trajectories_by(dataset: Dataset[Trajectory], key: str) -> dict[str, list[Trajectory]]:
    """Trajectories grouped by ``metadata[key]`` (e.g. the benchmark item id)."""
    groups: dict[str, list[Trajectory]] = {}
    for trajectory in dataset:
        item = trajectory.metadata.get(key)
        if item is not None:
            groups.setdefault(str(item), []).append(trajectory)
    return groups


async def run_benchmark(
    config: BenchConfig,
    model: ChatModel | None = None,
    progress: bool = True,
    notify: Notify | None = None,
) -> dict[str, Any]:
    """Run ``config.bench`` through its adapter (:mod:`tracetune.evaluate.adapter`);
    returns the metrics document also written to metrics.json. ``config`` is the
    benchmark's own config (:func:`bench_config` builds one by name)."""
    from tracetune.evaluate.adapter import run_adapter

    return await run_adapter(config, model, progress, notify)
