"""The render stage, and the whole engine (ingest -> rationale -> reflect -> render) in one run.

``tracetune mmat run CONFIG.yaml`` reads an ``MMATRunConfig``; each stage writes its own
resumable dataset under ``out``::

    OUT/tasks       normalized QA tasks            (ingest)
    OUT/rationale   RR dialogues from the teacher  (rationale)
    OUT/reflected   judged and repaired RR         (reflect)
    OUT/rr, OUT/orr the training renderings        (render; export with `tracetune export`)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tracetune.engine.common import stage_stats
from tracetune.engine.grammar import GrammarError
from tracetune.engine.ingest import IngestConfig, IngestOptions, run_ingest
from tracetune.engine.operators import OperatorConfig
from tracetune.engine.rationale import RationaleConfig, RationaleOptions, run_rationale
from tracetune.engine.reflect import ReflectConfig, ReflectOptions, run_reflect
from tracetune.engine.render import orr_from_rr, parse_rr
from tracetune.errors import ConfigError
from tracetune.models.base import ChatModel, ModelOptions
from tracetune.runner import Drop, StageResult, run_stage
from tracetune.schema import Dialogue
from tracetune.store import Dataset

Stage = Literal["ingest", "rationale", "reflect", "render"]
Format = Literal["rr", "orr"]
STAGES: tuple[Stage, ...] = ("ingest", "rationale", "reflect", "render")


def _both_formats() -> list[Format]:
    return ["rr", "orr"]


class RenderConfig(BaseModel):
    """Configuration of ``tracetune mmat render``."""

    model_config = ConfigDict(extra="forbid")

    dialogues: Path = Field(description="RR dialogues (from rationale or reflect).")
    out: Path = Field(description="Output root: OUT/rr and OUT/orr dialogue datasets.")
    formats: list[Format] = Field(default_factory=_both_formats, description="Renderings to write.")


async def run_render(config: RenderConfig, progress: bool = True) -> dict[str, StageResult]:
    """Write the RR dialogues that parse with the grammar, and their ORR derivations."""
    source = Dataset.open(config.dialogues, Dialogue)
    items = [d for d in source if d.format == "rr"]
    results: dict[str, StageResult] = {}
    for fmt in config.formats:
        out: Dataset[Dialogue] = Dataset.create(config.out / fmt, Dialogue)

        async def process(rr: Dialogue, fmt: str = fmt) -> Dialogue | Drop:
            try:
                parse_rr(rr)
                if fmt == "orr":
                    return orr_from_rr(rr)
            except GrammarError as exc:
                return Drop("grammar", {"error": str(exc)})
            return rr.model_copy(update={"metadata": {**rr.metadata, "stage": "render"}})

        stage = f"mmat-render-{fmt}"
        result = await run_stage(
            stage,
            items,
            key=_render_key(fmt),
            process=process,
            out=out,
            concurrency=1,
            sources=[source.assets],
            progress=progress,
            total=len(items),
        )
        stage_stats(out, stage, result)
        results[fmt] = result
    return results


def _render_key(fmt: str) -> Callable[[Dialogue], str]:
    return lambda d: f"{fmt}:{d.id}"


class MMATRunConfig(BaseModel):
    """Configuration of ``tracetune mmat run``: every stage, one output root."""

    model_config = ConfigDict(extra="forbid")

    out: Path = Field(description="Output root; each stage writes a dataset under it.")
    source: Path | None = Field(default=None, description="QA source for ingest.")
    stages: list[Stage] = Field(
        default_factory=lambda: list(STAGES), description="Stages to run, in pipeline order."
    )
    teacher: str | None = Field(
        default=None, description="Teacher (and, unless reflect.judge is set, judge) model."
    )
    backend: ModelOptions | None = Field(
        default=None, description="Backend options shared by every stage's models."
    )
    operators: OperatorConfig | None = Field(
        default=None, description="Operators shared by the stages (overrides rationale's)."
    )
    ingest: IngestOptions = Field(default_factory=IngestOptions, description="Ingest options.")
    rationale: RationaleOptions = Field(
        default_factory=RationaleOptions, description="Rationale options."
    )
    reflect: ReflectOptions = Field(default_factory=ReflectOptions, description="Reflect options.")
    formats: list[Format] = Field(default_factory=_both_formats, description="Renderings to write.")

    def paths(self) -> dict[str, Path]:
        return {
            "tasks": self.out / "tasks",
            "rationale": self.out / "rationale",
            "reflected": self.out / "reflected",
        }


def _shared(options: BaseModel, config: MMATRunConfig, model_field: str) -> dict[str, Any]:
    data = options.model_dump()
    explicit = options.model_fields_set
    if config.teacher and model_field not in explicit:
        data[model_field] = config.teacher
    if config.backend is not None and "backend" not in explicit:
        data["backend"] = config.backend.model_dump()
    return data


async def run_pipeline(
    config: MMATRunConfig,
    teacher: ChatModel | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the configured stages in order; returns each stage's summary."""
    order = [s for s in STAGES if s in config.stages]
    paths = config.paths()
    summary: dict[str, Any] = {}
    if "ingest" in order:
        if config.source is None:
            raise ConfigError("the ingest stage needs `source:` (a QA dataset path)")
        ingest_cfg = IngestConfig(
            source=config.source, out=paths["tasks"], **config.ingest.model_dump()
        )
        summary["ingest"] = (await run_ingest(ingest_cfg, progress))[0].summary()
    if "rationale" in order:
        data = _shared(config.rationale, config, "teacher")
        if config.operators is not None:
            data["operators"] = config.operators.model_dump()
        cfg = RationaleConfig(tasks=paths["tasks"], out=paths["rationale"], **data)
        summary["rationale"] = (await run_rationale(cfg, teacher, progress=progress))[0].summary()
    rr_source = paths["rationale"]
    if "reflect" in order:
        data = _shared(config.reflect, config, "judge")
        cfg_r = ReflectConfig(dialogues=paths["rationale"], out=paths["reflected"], **data)
        summary["reflect"] = (await run_reflect(cfg_r, teacher, progress=progress))[0].summary()
        rr_source = paths["reflected"]
    elif (paths["reflected"] / "manifest.json").exists():
        rr_source = paths["reflected"]
    if "render" in order:
        results = await run_render(
            RenderConfig(dialogues=rr_source, out=config.out, formats=config.formats), progress
        )
        summary["render"] = {fmt: r.summary() for fmt, r in results.items()}
    return summary
