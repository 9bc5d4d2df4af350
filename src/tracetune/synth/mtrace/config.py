"""Configuration of the M-TRACE synthesis chain (``tracetune synth ...``; YAML keys = fields).

One ``SynthConfig`` drives every stage: ``tracetune synth run CONFIG.yaml`` runs them all,
and each ``tracetune synth STAGE`` command runs one, with flags overriding the YAML.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, PrivateAttr

from tracetune.cliflag import CliFlag
from tracetune.errors import ConfigError
from tracetune.stageoptions import RunBudgets
from tracetune.synth.mtrace.embed import EMBEDDERS
from tracetune.timelimit import TimedBudget

DEFAULT_TOOLS = [
    "ocr",
    "visual_qa",
    "caption",
    "inspect_file",
    "calculator",
    "search",
    "face_detection",
    "image_crop",
]

# Sub-directories of a run, in chain order, with the stage each one's records come from.
LAYOUT: list[tuple[str, str]] = [
    ("candidates", "queries.generate"),
    ("queries", "queries.filter"),
    ("tasks", "files"),
    ("verified", "verify_tasks"),
    ("trajectories", "rollout"),
    ("final", "verify_trajectories"),
]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class QueriesConfig(_Section):
    """Query generation and filtering."""

    seeds: Path | None = Field(
        default=None, description='Seed examples: JSONL of {"query": ..., "tools": [...]}.'
    )
    tools: list[str] = Field(
        default_factory=lambda: list(DEFAULT_TOOLS),
        description="The tool catalogue shown to the generator (registered tool names).",
    )
    batches: int = Field(default=10, ge=1, description="Generator calls.")
    per_batch: int = Field(default=10, ge=1, description="Queries asked for per call.")
    few_shot: int = Field(default=20, ge=1, description="Seed examples drawn for each call.")
    temperature: float = Field(default=1.0, ge=0, description="Generator temperature.")
    max_tokens: int = Field(default=2048, ge=16, description="Max tokens per generator call.")
    topics: list[str] = Field(
        default_factory=list, description="Topics assigned to the calls in turn (diversity)."
    )
    tool_quota: int | None = Field(
        default=None, ge=1, description="Keep at most this many queries needing each tool."
    )
    topic_quota: int | None = Field(
        default=None, ge=1, description="Keep at most this many queries per topic."
    )
    dedup_threshold: float = Field(
        default=0.92,
        gt=0,
        le=1,
        description="Drop a query whose embedding similarity to a kept query or a seed is >= this.",
    )
    dedup_search: Literal["auto", "exact", "ann"] = Field(
        default="auto",
        description="Near-duplicate search: exact, ann (an HNSW index, sub-linear per query), "
        "or auto (exact while the kept set is small, then ann).",
    )
    benchmarks: Annotated[list[Path], CliFlag("--benchmark", "--benchmarks")] = Field(
        default_factory=list,
        description="Benchmark files to decontaminate against: GTA dataset.json, GAIA "
        "metadata.jsonl, or a JSONL/JSON/TXT of questions.",
    )
    decontaminate: bool = Field(
        default=True, description="Drop queries too close to a benchmark question (when given)."
    )
    decontam_threshold: float = Field(
        default=0.85, gt=0, le=1, description="Similarity to a benchmark question that drops."
    )
    seed: int = Field(default=0, description="Seed of the few-shot draws and sampling.")


class FilesConfig(_Section):
    """File association: solving scenarios, pool retrieval, files made by sandboxed code."""

    pool: Path | None = Field(default=None, description="Image pool (tracetune pool build).")
    max_files: int = Field(default=4, ge=1, description="Most files a task may have.")
    image_reuse_cap: int = Field(
        default=3, ge=1, description="Most tasks that may use the same pool image."
    )
    min_image_similarity: float | None = Field(
        default=None, description="Drop a task whose best free pool image scores below this."
    )
    code_retries: int = Field(
        default=1, ge=0, description="Times a file's code is rewritten after it fails."
    )
    code_timeout_s: float = Field(default=60.0, gt=0, description="Time limit per code run.")
    temperature: float = Field(default=0.0, ge=0, description="Generator temperature.")
    max_tokens: int = Field(default=2048, ge=16, description="Max tokens per generator call.")


class VerifyTasksConfig(_Section):
    """The query-file verifier."""

    repair: bool = Field(
        default=True, description="Re-verify a rejected task once with the judge's rewrite."
    )
    max_doc_chars: int = Field(default=6000, ge=200, description="Markdown shown per document.")
    max_tokens: int = Field(default=1024, ge=16, description="Max tokens per judge call.")


class TeacherConfig(_Section):
    """Teacher rollouts."""

    teacher: str | None = Field(default=None, description="Teacher model spec (any backend).")
    tool_model: str | None = Field(
        default=None,
        description="VLM that visual_qa/caption/inspect_file questions ask (default: teacher).",
    )
    action_format: Literal["json", "code", "tools"] = Field(
        default="code", description="json, code or tools (native tool calls)."
    )
    samples: int = Field(default=1, ge=1, description="Trajectories per task.")
    temperature: float = Field(default=0.7, ge=0, description="Teacher temperature.")
    max_steps: int = Field(default=8, ge=1, description="Step budget per episode.")
    max_errors: int = Field(default=3, ge=1, description="Failed steps allowed per episode.")
    max_tokens: int = Field(default=1024, ge=16, description="Max new tokens per step.")
    corpus: Path | None = Field(default=None, description="Search corpus for the search tool.")


class VerifyTrajectoriesConfig(_Section):
    """The trajectory verifier."""

    max_observation_chars: int = Field(
        default=2000, ge=100, description="Characters of each observation shown to the judge."
    )
    max_images: int = Field(default=8, ge=0, description="Most images shown to the judge.")
    max_tokens: int = Field(default=1024, ge=16, description="Max tokens per judge call.")


class SynthConfig(RunBudgets):
    """The whole M-TRACE chain: queries -> files -> verified tasks -> trajectories -> final.

    The budgets (``max_cost_usd``, ``max_total_tokens``, ``max_time``) are the whole run's:
    the spend of every stage's directory counts, and the clock starts with the command."""

    out: Path = Field(description="Run directory; each stage writes a sub-directory of it.")
    generator: str | None = Field(
        default=None, description="Model spec writing queries, scenarios and file code."
    )
    judge: str | None = Field(default=None, description="Model spec of both verifiers.")
    embedder: str = Field(default="minilm", description=f"Embedder: {', '.join(EMBEDDERS)}.")
    concurrency: int = Field(
        default=4, ge=1, description="Model requests in flight, and items run at once, per stage."
    )
    # The run's token budget, --max-total-tokens as in every command (--max-tokens is a
    # stage's tokens per call). ``max_tokens``, its YAML key before that, still reads.
    max_total_tokens: int | None = Field(
        default=None,
        ge=1,
        validation_alias=AliasChoices("max_total_tokens", "max_tokens"),
        description="Stop the run after this many tokens (prompts and completions, all stages).",
    )
    max_failures: int = Field(
        default=10, ge=0, description="Failed items (exceptions) a stage tolerates..."
    )
    max_failure_rate: float = Field(
        default=0.5, ge=0, le=1, description="...once they are also more than this share."
    )
    queries: QueriesConfig = Field(default_factory=QueriesConfig)
    files: FilesConfig = Field(default_factory=FilesConfig)
    verify_tasks: VerifyTasksConfig = Field(default_factory=VerifyTasksConfig)
    rollout: TeacherConfig = Field(default_factory=TeacherConfig)
    verify_trajectories: VerifyTrajectoriesConfig = Field(default_factory=VerifyTrajectoriesConfig)

    _started: float = PrivateAttr(default_factory=time.monotonic)

    def budget(self) -> TimedBudget:
        """The budget's limits, on a clock that started with this config (the command)."""
        return TimedBudget(
            max_cost_usd=self.max_cost_usd,
            max_tokens=self.max_total_tokens,
            max_seconds=self.max_time,
            started=self._started,
        )

    def dir(self, name: str) -> Path:
        return self.out / name

    def need(self, field: str, stage: str) -> str:
        value = getattr(self, field) if field != "teacher" else self.rollout.teacher
        if not value:
            key = "rollout.teacher" if field == "teacher" else field
            raise ConfigError(
                f"synth {stage} needs a {field} model: set `{key}: openai:NAME` in the config "
                f"(or --{field} on the command line)"
            )
        return str(value)
