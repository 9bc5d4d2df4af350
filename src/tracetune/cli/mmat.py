"""``tracetune mmat ...``: the MMAT data engine (ingest, rationale, reflect, render, infer, run).

Every command maps its flags onto the same pydantic config a ``--config`` YAML file fills
(flags win), runs on the shared stage runner (rerunning resumes), and prints a summary;
each stage writes ``OUT/stats.json``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from pydantic import BaseModel
from rich.console import Console

from tracetune.cli.common import App, RetryDroppedOpt, build_config, run_async, split_names

app = App(no_args_is_help=True)
out_console = Console(soft_wrap=True)
C = TypeVar("C", bound=BaseModel)

ConfigOpt = Annotated[Path | None, typer.Option(help="YAML file with these options.")]
QuietOpt = Annotated[bool, typer.Option(help="No progress bar.")]
BaseUrlOpt = Annotated[str | None, typer.Option(help="OpenAI-compatible endpoint URL.")]
OperatorsOpt = Annotated[
    str | None,
    typer.Option(help="Comma-separated operators: image_caption, label_bbox, ocr, face_detection."),
]
CorpusOpt = Annotated[Path | None, typer.Option(help="Local corpus for rag (folder or JSONL).")]
NoRagOpt = Annotated[bool, typer.Option("--no-rag", help="Offer no retrieval.")]
DetectorOpt = Annotated[
    str | None,
    typer.Option(
        help="label_bbox detector: hub id or local directory (OWL-ViT/OWLv2/Grounding DINO)."
    ),
]
CaptionOpt = Annotated[str | None, typer.Option(help="Model spec behind image_caption.")]


def _config(
    cls: type[C],
    config: Path | None,
    flags: dict[str, Any],
    nested: dict[str, dict[str, Any]] | None = None,
) -> C:
    """YAML file, then flags, then nested flags merged into their sections."""
    return build_config(cls, config, **flags, **(nested or {}))


def _operator_flags(
    operators: str | None,
    corpus: Path | None,
    no_rag: bool,
    detector: str | None,
    caption_model: str | None,
) -> dict[str, Any]:
    return {
        "operators": split_names(operators),
        "corpus": corpus,
        "rag": False if no_rag else None,
        "detector": detector,
        "caption_model": caption_model,
    }


def _backend(base_url: str | None) -> dict[str, Any]:
    return {"base_url": base_url}


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


@app.command("ingest")
def ingest(
    source: Annotated[
        Path | None, typer.Option(help="QA data: HF dataset dir, .parquet, .jsonl or .csv.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output task dataset (resumable).")] = None,
    format: Annotated[str | None, typer.Option(help="auto, hf, parquet, jsonl or csv.")] = None,
    image_col: Annotated[str | None, typer.Option(help="Image column (default image).")] = None,
    question_col: Annotated[str | None, typer.Option(help="Question column.")] = None,
    answer_col: Annotated[str | None, typer.Option(help="Answer column.")] = None,
    choices_col: Annotated[str | None, typer.Option(help="Choices column, if any.")] = None,
    id_col: Annotated[str | None, typer.Option(help="Stable item id column, if any.")] = None,
    split: Annotated[str | None, typer.Option(help="Split of an HF DatasetDict.")] = None,
    images_root: Annotated[
        Path | None, typer.Option(help="Folder relative image paths are relative to.")
    ] = None,
    no_style: Annotated[
        bool, typer.Option("--no-style", help="Do not append answer-style constraints.")
    ] = False,
    limit: Annotated[int | None, typer.Option(help="Only the first N rows.")] = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
    retry_dropped: RetryDroppedOpt = None,
) -> None:
    """Normalize a multimodal QA dataset into tasks: stable ids, images in the asset store,
    answer-style constraints on short answers; broken or missing images are reported and
    skipped."""
    from tracetune.engine.ingest import IngestConfig, run_ingest

    cfg = _config(
        IngestConfig,
        config,
        {
            "source": source,
            "out": out,
            "format": format,
            "split": split,
            "images_root": images_root,
            "answer_style": False if no_style else None,
            "limit": limit,
        },
        {
            "columns": {
                "image": image_col,
                "question": question_col,
                "answer": answer_col,
                "choices": choices_col,
                "id": id_col,
            }
        },
    )
    result, dataset = _run(run_ingest(cfg, progress=not quiet), retry_dropped)
    _report(result, dataset.root)


@app.command("rationale")
def rationale(
    tasks: Annotated[Path | None, typer.Option(help="Task dataset from `mmat ingest`.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output RR dialogues (resumable).")] = None,
    teacher: Annotated[str | None, typer.Option(help="Teacher model spec.")] = None,
    operators: OperatorsOpt = None,
    corpus: CorpusOpt = None,
    no_rag: NoRagOpt = False,
    detector: DetectorOpt = None,
    caption_model: CaptionOpt = None,
    max_steps: Annotated[int | None, typer.Option(help="Teacher steps per sample.")] = None,
    max_attempts: Annotated[
        int | None, typer.Option(help="Tries per sample when the leak check rejects one.")
    ] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(help="Model requests in flight, and samples run at once (default 4)."),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N tasks.")] = None,
    max_cost: Annotated[float | None, typer.Option(help="Stop after this many USD.")] = None,
    base_url: BaseUrlOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
    retry_dropped: RetryDroppedOpt = None,
) -> None:
    """A teacher reasons step by step toward each reference answer; the engine runs the
    operators and retrieval it asks for. Leaking samples are regenerated or dropped."""
    from tracetune.engine.rationale import RationaleConfig, run_rationale

    cfg = _config(
        RationaleConfig,
        config,
        {
            "tasks": tasks,
            "out": out,
            "teacher": teacher,
            "max_steps": max_steps,
            "max_attempts": max_attempts,
            "concurrency": concurrency,
            "limit": limit,
            "max_cost_usd": max_cost,
        },
        {
            "operators": _operator_flags(operators, corpus, no_rag, detector, caption_model),
            "backend": _backend(base_url),
        },
    )
    result, dataset = _run(run_rationale(cfg, progress=not quiet), retry_dropped)
    _report(result, dataset.root)


@app.command("reflect")
def reflect(
    dialogues: Annotated[
        Path | None, typer.Option(help="RR dialogues from `mmat rationale`.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output RR dialogues (resumable).")] = None,
    judge: Annotated[str | None, typer.Option(help="Judge model spec.")] = None,
    repairer: Annotated[str | None, typer.Option(help="Repair model (default: judge).")] = None,
    checks: Annotated[str | None, typer.Option(help="Comma-separated: unsupported, math.")] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(help="Model requests in flight, and samples run at once (default 4)."),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N dialogues.")] = None,
    max_cost: Annotated[float | None, typer.Option(help="Stop after this many USD.")] = None,
    base_url: BaseUrlOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
    retry_dropped: RetryDroppedOpt = None,
) -> None:
    """Judge each rationale for unsupported reasoning and skipped calculations; repair the
    flagged ones with reflection turns (OUT/verdicts keeps every judgement)."""
    from tracetune.engine.reflect import ReflectConfig, run_reflect

    cfg = _config(
        ReflectConfig,
        config,
        {
            "dialogues": dialogues,
            "out": out,
            "judge": judge,
            "repairer": repairer,
            "checks": split_names(checks),
            "concurrency": concurrency,
            "limit": limit,
            "max_cost_usd": max_cost,
        },
        {"backend": _backend(base_url)},
    )
    result, dataset = _run(run_reflect(cfg, progress=not quiet), retry_dropped)
    _report(result, dataset.root)
    stats = json.loads((dataset.root / "stats.json").read_text())
    out_console.print(f"flagged: {stats.get('flagged', {})}; repaired: {stats.get('repaired')}")


@app.command("render")
def render(
    dialogues: Annotated[
        Path | None, typer.Option(help="RR dialogues (rationale or reflect).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output root: OUT/rr and OUT/orr.")] = None,
    formats: Annotated[str | None, typer.Option(help="Comma-separated: rr, orr.")] = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
    retry_dropped: RetryDroppedOpt = None,
) -> None:
    """Write the RR training dialogues that parse with the grammar, and ORR derived from
    them; export either with `tracetune export --format trl-sft|llamafactory|swift`."""
    from tracetune.engine.pipeline import RenderConfig, run_render

    cfg = _config(
        RenderConfig, config, {"dialogues": dialogues, "out": out, "formats": split_names(formats)}
    )
    results = _run(run_render(cfg, progress=not quiet), retry_dropped)
    for fmt, result in results.items():
        _report(result, cfg.out / fmt)


@app.command("infer")
def infer(
    tasks: Annotated[
        Path | None, typer.Option(help="Task dataset (e.g. from `mmat ingest`).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output dialogues and predictions.")] = None,
    model: Annotated[
        str | None, typer.Option(help="Tuned model spec (local:DIR, openai:NAME).")
    ] = None,
    mode: Annotated[str | None, typer.Option(help="rr (multi-turn) or orr (one turn).")] = None,
    operators: OperatorsOpt = None,
    corpus: CorpusOpt = None,
    no_rag: NoRagOpt = False,
    detector: DetectorOpt = None,
    caption_model: CaptionOpt = None,
    max_turns: Annotated[int | None, typer.Option(help="RR: model steps per question.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Max new tokens per turn.")] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(help="Model requests in flight, and questions run at once (default 4)."),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N tasks.")] = None,
    base_url: BaseUrlOpt = None,
    config: ConfigOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Answer VQA tasks with a tuned model in RR or ORR mode; writes OUT/predictions.jsonl
    and OUT/gold.jsonl for `tracetune eval score vqa`."""
    from tracetune.engine.infer import InferConfig, run_infer
    from tracetune.evaluate.vqa import score_vqa

    cfg = _config(
        InferConfig,
        config,
        {
            "tasks": tasks,
            "out": out,
            "model": model,
            "mode": mode,
            "max_turns": max_turns,
            "max_tokens": max_tokens,
            "concurrency": concurrency,
            "limit": limit,
        },
        {
            "operators": _operator_flags(operators, corpus, no_rag, detector, caption_model),
            "backend": _backend(base_url),
        },
    )
    result, dataset = _run(run_infer(cfg, progress=not quiet))
    _report(result, dataset.root)
    gold = dataset.root / "gold.jsonl"
    if gold.read_text().strip():
        report = score_vqa(gold, dataset.root / "predictions.jsonl")
        out_console.print(
            f"accuracy: {report.metrics.get('accuracy', 0.0):.2f}% over {report.n_items} items"
        )


@app.command("run")
def run(
    config: Annotated[Path, typer.Argument(help="YAML file of an MMATRunConfig.")],
    stages: Annotated[
        str | None, typer.Option(help="Comma-separated subset: ingest, rationale, reflect, render.")
    ] = None,
    quiet: QuietOpt = False,
    retry_dropped: RetryDroppedOpt = None,
) -> None:
    """Run the engine's stages in order from one config (each stage resumes)."""
    from tracetune.engine.pipeline import MMATRunConfig, run_pipeline

    cfg = _config(MMATRunConfig, config, {"stages": split_names(stages)})
    summary = _run(run_pipeline(cfg, progress=not quiet), retry_dropped)
    for text in summary.values():
        # render reports one line per format (rr, orr); the other stages one line.
        for line in text.values() if isinstance(text, dict) else [text]:
            out_console.print(str(line), highlight=False)
    out_console.print(f"output: {cfg.out}")
