"""``tracetune eval``: score benchmark predictions with the benchmarks' exact rules."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from tracetune.cli.common import fail as _fail

app = typer.Typer(no_args_is_help=True, add_completion=False)


def fail(message: str) -> None:
    from rich.markup import escape

    _fail(escape(message))  # messages quote JSON shapes, whose [...] rich would take as markup


class Bench(StrEnum):
    gta = "gta"
    gaia = "gaia"
    agentx = "agentx"
    dynvqa = "dynvqa"
    vqa = "vqa"


class GTAMode(StrEnum):
    step = "step"
    e2e = "e2e"


class GTAProtocol(StrEnum):
    official = "official"
    mat = "mat"


@app.command("score")
def score(
    bench: Annotated[Bench, typer.Argument(help="Benchmark whose rules to apply.")],
    gold: Annotated[
        Path,
        typer.Option(
            help="Gold file: GTA dataset.json, GAIA metadata.jsonl, Agent-X data.json, "
            "Dyn-VQA/VQA JSON or JSONL."
        ),
    ],
    predictions: Annotated[
        Path, typer.Option(help="Predictions, JSON lines in the benchmark's format.")
    ],
    mode: Annotated[
        GTAMode | None, typer.Option(help="GTA only: step (step-by-step) or e2e (end-to-end).")
    ] = None,
    protocol: Annotated[
        GTAProtocol | None,
        typer.Option(help="GTA only: official (GTA's scorer) or mat (MAT/MATRIX substring rule)."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write the metrics JSON here too.")] = None,
    records: Annotated[
        Path | None,
        typer.Option(help="Write one JSON line per item (an EvalRecord: item_id, scores)."),
    ] = None,
    judge: Annotated[
        str | None,
        typer.Option(help="Agent-X only: judge model spec, e.g. openai:gpt-4o."),
    ] = None,
    embedder: Annotated[
        str,
        typer.Option(
            help="GTA only: sentence embedder for subjective answers: auto (official "
            "all-mpnet-base-v2 if on disk, else the packaged MiniLM), packaged, or a path."
        ),
    ] = "auto",
    model: Annotated[
        str | None, typer.Option(help="Name of the model that made the predictions (for records).")
    ] = None,
    extract: Annotated[
        bool,
        typer.Option(help="GAIA only: score the text after the last 'FINAL ANSWER:' marker."),
    ] = True,
) -> None:
    """Score a predictions file against gold and print the metrics as JSON."""
    from tracetune.evaluate import ScoringInputError

    if bench is not Bench.gta and (mode is not None or protocol is not None):
        fail("--mode and --protocol apply to gta only")
    if bench is not Bench.agentx and judge is not None:
        fail("--judge applies to agentx only (the other scorers use no judge)")
    try:
        report = _score(bench, gold, predictions, mode, protocol, judge, embedder, extract)
    except (ScoringInputError, FileNotFoundError, ModuleNotFoundError) as exc:
        fail(str(exc))
        return
    summary = report.summary()
    text = json.dumps(summary, indent=2, ensure_ascii=False)
    typer.echo(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n", encoding="utf-8")
    if records is not None:
        report.write_records(records, model=model)


def _score(
    bench: Bench,
    gold: Path,
    predictions: Path,
    mode: GTAMode | None,
    protocol: GTAProtocol | None,
    judge: str | None,
    embedder: str,
    extract: bool,
) -> Any:
    if bench is Bench.gta:
        from tracetune.evaluate.gta import score_gta

        if mode is None:
            fail("gta needs --mode step (step-by-step) or --mode e2e (end-to-end)")
            return None
        return score_gta(
            gold, predictions, mode.value, (protocol or GTAProtocol.official).value, embedder
        )
    if bench is Bench.gaia:
        from tracetune.evaluate.gaia import score_gaia

        return score_gaia(gold, predictions, extract=extract)
    if bench is Bench.dynvqa:
        from tracetune.evaluate.dynvqa import score_dynvqa

        return score_dynvqa(gold, predictions)
    if bench is Bench.vqa:
        from tracetune.evaluate.vqa import score_vqa

        return score_vqa(gold, predictions)
    from tracetune.evaluate.agentx import score_agentx
    from tracetune.models.base import BackendError, load_model

    if judge is None:
        fail("agentx needs --judge SPEC, e.g. --judge openai:gpt-4o")
        return None
    try:
        judge_model = load_model(judge)
    except BackendError as exc:
        fail(f"cannot load judge {judge!r}: {exc}")
        return None
    try:
        return score_agentx(gold, predictions, judge_model)
    except BackendError as exc:  # a judge that fails for good fails the run: no silent zeros
        fail(f"judge {judge!r} failed: {exc}")
        return None
