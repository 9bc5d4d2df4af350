"""``tracetune mmat ...``: the MMAT data engine (ingest, rationale, reflect, render, infer, run).

Every command maps its flags onto the same pydantic config a ``--config`` YAML file fills
(flags win), runs on the shared stage runner (rerunning resumes), and prints a summary;
each stage writes ``OUT/stats.json``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console

from tracetune.cli.common import App, RetryDroppedOpt, run_async

app = App(no_args_is_help=True)
out_console = Console(soft_wrap=True)
C = TypeVar("C", bound=BaseModel)

ConfigOpt = Annotated[Path | None, typer.Option(help="YAML file with these options.")]
QuietOpt = Annotated[bool, typer.Option(help="No progress bar.")]
BaseUrlOpt = Annotated[str | None, typer.Option(help="OpenAI-compatible endpoint URL.")]


def _run(coro: Any, retry_dropped: list[str] | None = None) -> Any:
    from tracetune.runner.outcome import retrying_dropped

    with retrying_dropped(retry_dropped):
        return run_async(coro)


def _report(result: Any, out: Path) -> None:
    out_console.print(result.summary())
    for reason, count in sorted(result.drop_reasons.items(), key=lambda kv: -kv[1]):
        out_console.print(f"  dropped {count} x {reason}", highlight=False)
    from tracetune.runner.stats import stage_stats, stats_table

    out_console.print(stats_table(stage_stats(out)))
    out_console.print(f"output: {out} (stats: {out / 'stats.json'})")


def _command_options(
    base_url: BaseUrlOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
    retry_dropped: RetryDroppedOpt = None,
) -> None:
    """Carries the options that are not config fields (never run)."""


def _command(
    name: str,
    model: type[C],
    run: Callable[[C, bool, list[str] | None], None],
    doc: str,
    sections: tuple[str, ...] = (),
    skip: tuple[str, ...] = (),
    config_argument: bool = False,
) -> None:
    """Register ``tracetune mmat NAME``: one option per field of ``model`` and of its nested
    ``sections`` (YAML mappings under those keys), --base-url where the stage has a backend,
    --config (or a CONFIG argument), --quiet and --retry-dropped; then ``run(config, quiet,
    retry_dropped)``."""
    import inspect

    from tracetune.cli.options_from_config import (
        command_function,
        config_from_options,
        config_params,
        pop_section,
        section_params,
    )
    from tracetune.cli.options_from_config import (
        config_argument as with_config_argument,
    )

    has_backend = "backend" in model.model_fields
    shared = inspect.signature(_command_options, eval_str=True).parameters.values()
    params = [
        *config_params(model, skip={*sections, *skip, "backend"}),
        *(p for section in sections for p in section_params(model, section)),
        *(
            p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
            for p in shared
            if has_backend or p.name != "base_url"
        ),
    ]
    if config_argument:
        params = with_config_argument(params, f"YAML file of a {model.__name__}.")

    def callback(**values: Any) -> None:
        extra: dict[str, Any] = {s: pop_section(model, s, values) for s in sections}
        base_url = values.pop("base_url", None)
        if has_backend:
            extra["backend"] = {"base_url": base_url}
        config_file, quiet = values.pop("config"), bool(values.pop("quiet"))
        retry = values.pop("retry_dropped")
        cfg = config_from_options(
            model, values, config_file=config_file, extra=extra, what=f"mmat {name}"
        )
        run(cfg, quiet, retry)

    app.command(name)(command_function(callback, params, doc))


def _ingest(cfg: Any, quiet: bool, retry: list[str] | None) -> None:
    from tracetune.engine.ingest import run_ingest

    result, dataset = _run(run_ingest(cfg, progress=not quiet), retry)
    _report(result, dataset.root)


def _rationale(cfg: Any, quiet: bool, retry: list[str] | None) -> None:
    from tracetune.engine.rationale import run_rationale

    result, dataset = _run(run_rationale(cfg, progress=not quiet), retry)
    _report(result, dataset.root)


def _reflect(cfg: Any, quiet: bool, retry: list[str] | None) -> None:
    from tracetune.engine.reflect import run_reflect

    result, dataset = _run(run_reflect(cfg, progress=not quiet), retry)
    _report(result, dataset.root)
    stats = json.loads((dataset.root / "stats.json").read_text())
    out_console.print(f"flagged: {stats.get('flagged', {})}; repaired: {stats.get('repaired')}")


def _render(cfg: Any, quiet: bool, retry: list[str] | None) -> None:
    from tracetune.engine.pipeline import run_render

    results = _run(run_render(cfg, progress=not quiet), retry)
    for fmt, result in results.items():
        _report(result, cfg.out / fmt)


def _infer(cfg: Any, quiet: bool, retry: list[str] | None) -> None:
    from tracetune.engine.infer import run_infer
    from tracetune.evaluate.vqa import score_vqa

    result, dataset = _run(run_infer(cfg, progress=not quiet), retry)
    _report(result, dataset.root)
    gold = dataset.root / "gold.jsonl"
    if gold.read_text().strip():
        report = score_vqa(gold, dataset.root / "predictions.jsonl")
        out_console.print(
            f"accuracy: {report.metrics.get('accuracy', 0.0):.2f}% over {report.n_items} items"
        )


def _pipeline(cfg: Any, quiet: bool, retry: list[str] | None) -> None:
    from tracetune.engine.pipeline import run_pipeline

    summary = _run(run_pipeline(cfg, progress=not quiet), retry)
    for text in summary.values():
        # render reports one line per format (rr, orr); the other stages one line.
        for line in text.values() if isinstance(text, dict) else [text]:
            out_console.print(str(line), highlight=False)
    out_console.print(f"output: {cfg.out}")


def _register() -> None:
    from tracetune.engine.infer import InferConfig
    from tracetune.engine.ingest import IngestConfig
    from tracetune.engine.pipeline import MMATRunConfig, RenderConfig
    from tracetune.engine.rationale import RationaleConfig
    from tracetune.engine.reflect import ReflectConfig

    _command(
        "ingest",
        IngestConfig,
        _ingest,
        """Normalize a multimodal QA dataset into tasks: stable ids, images in the asset
        store, answer-style constraints on short answers; broken or missing images are
        reported and skipped.""",
        sections=("columns",),
    )
    _command(
        "rationale",
        RationaleConfig,
        _rationale,
        """A teacher reasons step by step toward each reference answer; the engine runs the
        operators and retrieval it asks for. Leaking samples are regenerated or dropped.""",
        sections=("operators",),
    )
    _command(
        "reflect",
        ReflectConfig,
        _reflect,
        """Judge each rationale for unsupported reasoning and skipped calculations; repair
        the flagged ones with reflection turns (OUT/verdicts keeps every judgement).""",
    )
    _command(
        "render",
        RenderConfig,
        _render,
        """Write the RR training dialogues that parse with the grammar, and ORR derived from
        them; export either with `tracetune export --format trl-sft|llamafactory|swift`.""",
    )
    _command(
        "infer",
        InferConfig,
        _infer,
        """Answer VQA tasks with a tuned model in RR or ORR mode; writes
        OUT/predictions.jsonl and OUT/gold.jsonl for `tracetune eval score vqa`.""",
        sections=("operators",),
    )
    _command(
        "run",
        MMATRunConfig,
        _pipeline,
        """Run the engine's stages in order from one config (each stage resumes). The
        stages' own options are YAML sections (ingest:, rationale:, reflect:, operators:,
        backend:).""",
        skip=("operators", "ingest", "rationale", "reflect"),
        config_argument=True,
    )


_register()
