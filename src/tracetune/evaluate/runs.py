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
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from tracetune.agent.loop import EpisodeBackendError  # noqa: F401  (raised by the runs)
from tracetune.errors import ConfigError
from tracetune.evaluate.base import ScoreReport
from tracetune.models.base import ChatModel, ModelOptions, Sampling, load_model
from tracetune.runner import Budget, MeteredModel, StageResult, run_stage
from tracetune.schema import EvalRecord, Trajectory
from tracetune.store import AssetStore, Dataset

if TYPE_CHECKING:
    from tracetune.evaluate.adapter import BenchConfig

RUN_BENCHMARKS = ("gta", "gaia", "programs", "vqa", "dynvqa", "agentx")
"""The benchmarks of the flat :class:`EvalRunConfig`; every registered adapter (including one
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


class EvalRunConfig(BaseModel):
    """Every benchmark's options in one flat model (the Python API's ``run_benchmark``).

    Each benchmark has a config model of its own (``adapter_class(bench).config_model``,
    which ``tracetune eval run BENCH`` takes its options from); :meth:`for_bench` turns this
    one into it, refusing options set here that the benchmark does not take.
    """

    model_config = ConfigDict(extra="forbid")

    bench: Literal["gta", "gaia", "programs", "vqa", "dynvqa", "agentx"] = Field(
        description="Benchmark to run."
    )
    model: str = Field(description="Controller spec: 'openai:NAME' or 'local:PATH_OR_HUB_ID'.")
    out: Path = Field(description="Run directory (resumable; rerun to finish a killed run).")
    data: Path | None = Field(
        default=None,
        description="gta: the folder of dataset.json and its files; gaia: metadata.jsonl (its "
        "attached files beside it); programs: a task dataset (default: a held-out split drawn "
        "here); vqa/dynvqa: a JSONL/JSON file of {question_id, image, question, answer"
        "[, choices]} rows, images beside it; agentx: Agent-X's data.json (or its folder), "
        "images beside it.",
    )
    mode: Literal["step", "e2e"] = Field(
        default="step",
        description="gta: step (step-by-step, gold history) or e2e (end-to-end); programs: "
        "e2e unless step is set explicitly (each gold step predicted from the gold prefix).",
    )
    answer_mode: Literal["direct", "rr", "orr"] = Field(
        default="direct",
        description="vqa/dynvqa: answer directly in one turn, or the MMAT way: rr (multi-turn "
        "with operators) or orr (operator results first, one turn).",
    )
    action_format: Literal["json", "code", "tools"] = Field(
        default="json", description="gaia/programs: how actions are written (gta: json)."
    )
    tool_model: str | None = Field(
        default=None,
        description="Model that vision tools ask (GTA ImageDescription, RegionAttribute"
        "Description; visual_qa); none: those tools are reported unavailable.",
    )
    judge: str | None = Field(
        default=None,
        description="agentx: judge model spec for the judged metrics; none: only the "
        "judge-free metrics (tool_precision, toolset_accuracy) are computed.",
    )
    judge_base_url: str | None = Field(
        default=None,
        description="agentx: OpenAI-compatible endpoint of the judge (default: the backend's).",
    )
    tools: list[str] = Field(
        default_factory=list,
        description="gaia: the agent's tools (default: search, inspect_file, ocr, calculator, "
        "image_crop, plus visual_qa with a tool model); vqa/dynvqa in rr/orr mode: the MMAT "
        "operators (default: all).",
    )
    tool_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict,
        description="Per-tool settings, e.g. {'search': {'corpus': DIR}} (CLI: --option).",
    )
    embedder: str = Field(
        default="auto",
        description="gta: sentence embedder for subjective answers (auto, packaged or a path).",
    )
    max_steps: int = Field(default=10, ge=1, description="Step budget per episode.")
    max_errors: int = Field(default=3, ge=1, description="Failed steps allowed per episode.")
    temperature: float = Field(default=0.0, ge=0, description="Sampling temperature.")
    max_tokens: int = Field(default=512, ge=1, description="Max new tokens per step.")
    concurrency: int = Field(
        default=2, ge=1, description="Model requests in flight, and episodes run at once."
    )
    limit: int | None = Field(default=None, ge=1, description="Only the first N items.")
    max_cost_usd: float | None = Field(default=None, description="Stop after this much spend.")
    max_time: float | None = Field(
        default=None,
        gt=0,
        description="Start no new item after this many seconds; the items in flight finish "
        "and are saved, and a rerun continues (CLI: --max-time 10m).",
    )
    gold_prefixes: Path | None = Field(
        default=None,
        description="programs, step mode: a trajectory dataset holding gold replays of the "
        "same tasks (e.g. OUT/trajectories of an earlier step-mode run, or gold rollouts) to "
        "take the gold prefixes from instead of replaying the gold chains again.",
    )
    n: int = Field(default=40, ge=1, description="programs: size of the held-out split.")
    seed: int = Field(default=0, description="programs: seed of the held-out split.")
    families: list[str] = Field(
        default_factory=list, description="programs: task families (default: all)."
    )
    exclude: list[Path] = Field(
        default_factory=list,
        description="programs: task datasets (e.g. the training tasks) whose tasks never "
        "enter the held-out split.",
    )
    backend: ModelOptions = Field(default_factory=ModelOptions, description="Backend options.")

    def for_bench(self) -> BenchConfig:
        """The benchmark's own config with these values; an option set here that the
        benchmark does not take (to a value other than its default) is an error."""
        from tracetune.evaluate.adapter import adapter_class

        cls = adapter_class(self.bench).config_model
        values: dict[str, Any] = {}
        foreign: list[str] = []
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            if name in cls.model_fields:
                values[name] = value
            elif value != info.get_default(call_default_factory=True):
                foreign.append(name)
        if self.bench == "programs" and "mode" not in self.model_fields_set:
            values["mode"] = "e2e"  # programs run whole episodes unless step is asked for
        if foreign:
            takes = ", ".join(n for n in cls.model_fields if n != "bench")
            raise EvalRunError(
                f"{', '.join(foreign)}: not an option of {self.bench}",
                hint=f"{self.bench} takes: {takes}",
            )
        try:
            return cls.model_validate(values)
        except ValueError as exc:
            raise EvalRunError(f"invalid options for {self.bench}: {exc}") from exc

    def identity(self) -> dict[str, Any]:
        """What must not change between a run and its rerun (else the results would mix).

        Episodes are keyed by item id and controller, so everything else that shapes an
        episode is here: the data (by content, so a moved folder still resumes), the tools
        and their settings, the budgets and the held-out split's recipe.
        """
        keys = (
            "bench",
            "model",
            "mode",
            "answer_mode",
            "action_format",
            "tool_model",
            "temperature",
            "max_tokens",
            "max_steps",
            "max_errors",
            "seed",
            "n",
            "tools",
            "tool_options",
            "families",
        )
        identity = {k: getattr(self, k) for k in keys}
        identity["data"] = data_fingerprint(self.data)
        identity["exclude"] = [data_fingerprint(p) for p in self.exclude]
        return identity


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
    config: EvalRunConfig | BenchConfig,
    model: ChatModel | None = None,
    progress: bool = True,
    notify: Notify | None = None,
) -> dict[str, Any]:
    """Run ``config.bench`` through its adapter (:mod:`tracetune.evaluate.adapter`);
    returns the metrics document also written to metrics.json. ``config`` is the
    benchmark's own config, or the flat :class:`EvalRunConfig`."""
    from tracetune.evaluate.adapter import run_adapter

    bench = config.for_bench() if isinstance(config, EvalRunConfig) else config
    return await run_adapter(bench, model, progress, notify)
