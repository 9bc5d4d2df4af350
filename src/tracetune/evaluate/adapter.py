"""One skeleton for every benchmark run; a benchmark is a small adapter over it.

:func:`run_adapter` owns what every run does the same way: the run directory and its
resume check (``run.json``'s identity), the metered controller, each item's stable key, the
stage runner (resume, concurrency, budgets, failed items retried on the next run), the
``Agent`` call, backend failures counted as failed items (never as wrong answers), and the
files a run leaves (``trajectories/``, ``predictions.jsonl``, ``metrics.json``,
``records.jsonl``; see :mod:`tracetune.evaluate.runs`).

A :class:`BenchmarkAdapter` says only what differs:

- ``config_model``: a pydantic model of the benchmark's own options, on top of the shared
  :class:`BenchConfig` (model, out, data, backend, concurrency, budgets, tools). The command
  line generates ``tracetune eval run NAME``'s options from it, so an option is declared once;
- ``check`` / ``load_items``: read the data (failing before any model call, with the fix);
- ``tools`` / ``task`` / ``episode``: what an item's episode gets (the default runs
  ``Agent`` on ``task(item)`` with ``tools(item)``);
- ``annotate``: what an episode records beside its trajectory (the prediction);
- ``score``: predictions in the benchmark's own format, scored by its exact scorer.

Adding a benchmark is one module holding its adapter and one line in :data:`ADAPTERS`
(``name -> "module:Class"``; modules are imported only when their benchmark is used).
"""

from __future__ import annotations

import copy
import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Generic, TypeVar

from pydantic import Field

from tracetune.agent.loop import Agent, EpisodeBackendError
from tracetune.cliflag import CliFlag
from tracetune.errors import ConfigError
from tracetune.evaluate.base import ScoreReport
from tracetune.inputs import InputError
from tracetune.models.base import BackendError, ChatModel
from tracetune.runner import StageResult
from tracetune.schema import Task, Trajectory
from tracetune.stageoptions import StageOptions
from tracetune.store import AssetStore

if TYPE_CHECKING:
    from tracetune.evaluate.runs import RunContext

# Benchmark name -> "module:AdapterClass". One line per benchmark.
ADAPTERS: dict[str, str] = {
    "gta": "tracetune.evaluate.gta_run:GTAAdapter",
    "gaia": "tracetune.evaluate.gaia_run:GAIAAdapter",
    "agentx": "tracetune.evaluate.agentx_run:AgentXAdapter",
    "vqa": "tracetune.evaluate.vqa_run:VQAAdapter",
    "dynvqa": "tracetune.evaluate.vqa_run:DynVQAAdapter",
    "programs": "tracetune.evaluate.programs_run:ProgramsAdapter",
}


class UnknownBenchmark(ConfigError, KeyError):
    """A benchmark name with no adapter."""

    def __str__(self) -> str:  # KeyError would quote the message
        return ConfigError.__str__(self)


class BenchConfig(StageOptions):
    """The options every benchmark run shares (YAML keys are these field names)."""

    # Fields that may change between a run and its rerun: where and how fast it runs, and
    # how much of it runs now. Every other field is part of the run's identity.
    # A benchmark's config adds its own (``VOLATILE = BenchConfig.VOLATILE | {...}``).
    VOLATILE: ClassVar[frozenset[str]] = frozenset(
        {"out", "concurrency", "limit", "max_cost_usd", "max_total_tokens", "max_time", "backend"}
    )

    bench: Annotated[str, CliFlag(skip=True)] = Field(description="Benchmark to run.")
    model: str = Field(
        description="Controller spec: 'openai:NAME' or 'local:PATH_OR_HUB_ID' (base or tuned)."
    )
    data: Path | None = Field(default=None, description="The benchmark's data.")
    tool_model: str | None = Field(
        default=None,
        description="Model that vision tools ask (e.g. an image description tool); none: "
        "those tools are reported unavailable.",
    )
    tool_options: Annotated[dict[str, dict[str, Any]], CliFlag(skip=True)] = Field(
        default_factory=dict,
        description="Per-tool settings, e.g. {'search': {'corpus': DIR}} (CLI: --option "
        "TOOL.KEY=VALUE, --corpus DIR).",
    )
    max_steps: int = Field(default=10, ge=1, description="Step budget per episode.")
    max_errors: int = Field(default=3, ge=1, description="Failed steps allowed per episode.")
    temperature: float = Field(default=0.0, ge=0, description="Sampling temperature.")
    max_tokens: int = Field(default=512, ge=1, description="Max new tokens per step.")

    def run_mode(self) -> str | None:
        """The mode run.json and metrics.json name beside the benchmark (GTA's protocol)."""
        return None

    def identity(self) -> dict[str, Any]:
        """What must not change between a run and its rerun (else the results would mix).

        Episodes are keyed by item id and controller, so everything else that shapes an
        episode is here: the data (by content, so a moved folder still resumes), the tools
        and their settings, the budgets of an episode.
        """
        from tracetune.evaluate.runs import data_fingerprint

        identity: dict[str, Any] = {}
        for name in type(self).model_fields:
            if name in self.VOLATILE:
                continue
            value = getattr(self, name)
            if isinstance(value, Path):
                value = data_fingerprint(value)
            elif isinstance(value, list) and value and all(isinstance(v, Path) for v in value):
                value = [data_fingerprint(v) for v in value]
            identity[name] = value
        return identity


C = TypeVar("C", bound=BenchConfig)


@dataclass
class Scored:
    """What an adapter's scoring gives the skeleton: the reports by name, which one is the
    headline, each scored item's trajectory id, and extra keys for metrics.json."""

    reports: dict[str, ScoreReport]
    headline: str
    trajectory_of: dict[str, str]
    extra: dict[str, Any] = field(default_factory=dict)


class BenchmarkAdapter(ABC, Generic[C]):
    """A benchmark as :func:`run_adapter` runs it (see the module docstring)."""

    config_model: ClassVar[type[BenchConfig]]
    # The agent loop an episode runs on (an adapter may subclass it, e.g. to lay out files).
    agent_class: ClassVar[type[Agent]] = Agent
    # Items per chunk of the trajectory dataset, at most.
    max_chunk: int = 16

    def __init__(self, config: C) -> None:
        self.config = config

    # -- before the run directory ----------------------------------------------------------
    def check(self) -> None:  # noqa: B027  (optional)
        """Fail early (``EvalRunError``, saying what to change) on data or options that
        cannot run; nothing is written yet."""

    # -- items -----------------------------------------------------------------------------
    @abstractmethod
    async def load_items(self, run: RunContext) -> Sequence[Any]:
        """The items to run (the ``limit`` applied), their gold written into the run
        directory; ``run`` is the :class:`~tracetune.evaluate.runs.RunContext`."""

    def run_info(self) -> dict[str, Any]:
        """Extra keys for run.json (the data, the toolset, prompt hashes, ...)."""
        return {}

    @abstractmethod
    def key(self, item: Any, controller: str) -> str:
        """The item's stable trajectory id (``stable_id(...)``) for this controller."""

    def label(self, item: Any) -> str:
        """How failures name the item."""
        return str(getattr(item, "id", item))

    def sources(self, run: RunContext) -> list[AssetStore]:
        """Asset stores the episodes read their inputs from (beside the run's own)."""
        return []

    async def start(self, run: RunContext, controller: ChatModel) -> None:  # noqa: B027
        """Set up what the episodes share (an inference engine, operators); once."""

    async def stop(self) -> None:  # noqa: B027
        """Release what ``start`` set up."""

    # -- one episode -----------------------------------------------------------------------
    def task(self, item: Any) -> Task:
        """The task an episode runs (default: the item itself)."""
        assert isinstance(item, Task)
        return item

    def tools(self, item: Any) -> list[Any]:
        """The tools an episode gets (an adapter that runs ``Agent`` episodes defines it)."""
        raise TypeError(f"{type(self).__name__} defines no tools(): it runs no agent episodes")

    def action_format(self, item: Any) -> str:
        return str(getattr(self.config, "action_format", "json"))

    def tool_options(self, item: Any) -> dict[str, Any]:
        return copy.deepcopy(self.config.tool_options)

    def source(self, run: RunContext, item: Any) -> AssetStore:
        """Where the task's files are stored (default: the run's own assets)."""
        return run.trajectories.assets

    async def episode(self, run: RunContext, item: Any, trajectory_id: str) -> Trajectory:
        """One item's trajectory: by default an ``Agent`` episode on ``task(item)``; a
        backend failure raises (the item is retried on the next run)."""
        from tracetune.evaluate.runs import check_backend

        assert run.model is not None  # loaded before the first episode
        agent = self.agent_class(
            run.model,
            list(self.tools(item)),
            self.action_format(item),
            self.config.max_steps,
            self.config.max_errors,
            run.sampling(),
            tool_options=self.tool_options(item),
            tool_model=run.tool_model,
        )
        task = self.task(item)
        trajectory = await agent.run(
            task, self.source(run, item), run.trajectories.assets, trajectory_id
        )
        return check_backend(trajectory)

    def annotate(self, item: Any, trajectory: Trajectory) -> dict[str, Any]:
        """Metadata the trajectory keeps for scoring (ids, the prediction); ``bench`` is
        added by the skeleton."""
        return {}

    # -- scoring ---------------------------------------------------------------------------
    @abstractmethod
    async def score(self, run: RunContext, items: Sequence[Any], result: StageResult) -> Scored:
        """Write predictions.jsonl in the benchmark's format and score every trajectory on
        disk (a rerun's report covers the whole run)."""


def adapter_class(name: str) -> type[BenchmarkAdapter[Any]]:
    """The adapter class registered under ``name``."""
    target = ADAPTERS.get(name)
    if target is None:
        raise UnknownBenchmark(
            f"no benchmark named {name!r}",
            hint=f"choose one of: {', '.join(ADAPTERS)}",
        )
    module, _, attr = target.partition(":")
    cls = getattr(importlib.import_module(module), attr)
    return cls  # type: ignore[no-any-return]


def bench_config(name: str, **values: Any) -> BenchConfig:
    """The validated config of benchmark ``name`` from field values."""
    return adapter_class(name).config_model.model_validate({"bench": name, **values})


async def run_adapter(
    config: BenchConfig,
    model: ChatModel | None = None,
    progress: bool = True,
    notify: Callable[[str], None] | None = None,
    adapter: BenchmarkAdapter[Any] | None = None,
) -> dict[str, Any]:
    """Run ``config.bench`` through its adapter; returns the metrics document (also
    written to metrics.json). ``model``: a loaded controller (default: load
    ``config.model``)."""
    from tracetune.evaluate.runs import RunContext

    if adapter is None:
        adapter = adapter_class(config.bench)(config)
    adapter.check()
    run = RunContext(config, notify)
    items = list(await adapter.load_items(run))
    if not items:  # a run over nothing would report 0 written and exit 0
        raise InputError(
            f"{config.data} holds no {config.bench} items to run",
            hint=f"point --data at the benchmark's data in the layout `eval run {config.bench}`"
            " reads (see `--help`)",
        )
    run.write_run(adapter.run_info())
    controller = run.load_models(model)
    spec = controller.spec

    def key(item: Any) -> str:
        return adapter.key(item, spec)

    async def process(item: Any) -> Trajectory:
        try:
            trajectory = await adapter.episode(run, item, key(item))
        except BackendError as exc:  # retried on the next run, never scored as wrong
            raise EpisodeBackendError(f"{adapter.label(item)}: {exc}") from exc
        trajectory.metadata.update({"bench": config.bench, **adapter.annotate(item, trajectory)})
        return trajectory

    try:
        await adapter.start(run, controller)
        result = await run.run_items(
            items,
            key,
            process,
            progress=progress,
            sources=adapter.sources(run),
            max_chunk=adapter.max_chunk,
        )
    finally:
        try:
            await adapter.stop()
        finally:
            await run.close()
    try:
        scored = await adapter.score(run, items, result)
        return run.finish(
            scored.reports, scored.headline, scored.trajectory_of, result, scored.extra
        )
    finally:
        # The run's state file is complete now: closed here, not whenever the garbage
        # collector drops it (which would rewrite the file later, under a reader).
        run.trajectories.state.close()


__all__ = [
    "ADAPTERS",
    "BenchConfig",
    "BenchmarkAdapter",
    "CliFlag",
    "Scored",
    "UnknownBenchmark",
    "adapter_class",
    "bench_config",
    "run_adapter",
]
