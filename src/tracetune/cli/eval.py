"""``tracetune eval``: score benchmark predictions with the benchmarks' exact rules."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer

from tracetune.cli.common import fail, split_names

app = typer.Typer(no_args_is_help=True, add_completion=False)


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


class DynVQARule(StrEnum):
    official = "official"
    symmetric = "symmetric"


class DynVQALang(StrEnum):
    auto = "auto"
    en = "en"
    zh = "zh"


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
        Path,
        typer.Option(
            help="Predictions: JSON lines in the benchmark's format, or the benchmark's own "
            "prediction file (GTA's OpenCompass gta_bench.json, Agent-X's list of "
            "{id: {query, filename, reasoning_steps, final_answer}})."
        ),
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
        typer.Option(
            help="Agent-X only: judge model spec, e.g. openai:gpt-4o. Without it only the "
            "judge-free metrics (tool_precision, toolset_accuracy) are computed."
        ),
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
    rule: Annotated[
        DynVQARule,
        typer.Option(
            help="Dyn-VQA only: official (OmniSearch's evaluation: only the prediction is "
            "normalized; the default) or symmetric (both sides normalized; lenient, not "
            "comparable with published numbers)."
        ),
    ] = DynVQARule.official,
    lang: Annotated[
        DynVQALang,
        typer.Option(
            help="Dyn-VQA only: tokenization: en (NLTK), zh (jieba, the DynVQA_zh split) or "
            "auto (zh when most gold answers are Chinese)."
        ),
    ] = DynVQALang.auto,
) -> None:
    """Score a predictions file against gold and print the metrics as JSON."""
    from tracetune.evaluate import ScoringInputError

    if bench is not Bench.gta and (mode is not None or protocol is not None):
        fail("--mode and --protocol apply to gta only")
    if bench is not Bench.agentx and judge is not None:
        fail("--judge applies to agentx only (the other scorers use no judge)")
    if bench is not Bench.dynvqa and (
        rule is not DynVQARule.official or lang is not DynVQALang.auto
    ):
        fail("--rule and --lang apply to dynvqa only")
    try:
        report = _score(
            bench, gold, predictions, mode, protocol, judge, embedder, extract, rule, lang
        )
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
    rule: DynVQARule = DynVQARule.official,
    lang: DynVQALang = DynVQALang.auto,
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

        return score_dynvqa(gold, predictions, rule.value, lang.value)  # type: ignore[arg-type]
    if bench is Bench.vqa:
        from tracetune.evaluate.vqa import score_vqa

        return score_vqa(gold, predictions)
    from tracetune.evaluate.agentx import score_agentx
    from tracetune.models.base import BackendError, load_model

    if judge is None:
        from tracetune.evaluate.agentx_run import JUDGE_FREE_NOTE, JudgeFreeScorer

        report = JudgeFreeScorer().score_files(gold, predictions)
        report.details["note"] = JUDGE_FREE_NOTE.replace(" (the episodes are not rerun)", "")
        return report
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


class RunBench(StrEnum):
    gta = "gta"
    gaia = "gaia"
    programs = "programs"
    vqa = "vqa"
    dynvqa = "dynvqa"
    agentx = "agentx"


class AnswerMode(StrEnum):
    direct = "direct"
    rr = "rr"
    orr = "orr"


@app.command("run")
def run(
    bench: Annotated[
        RunBench,
        typer.Argument(help="Benchmark to run: gta, gaia, programs, vqa, dynvqa or agentx."),
    ],
    model: Annotated[
        str | None, typer.Option(help="Controller: openai:NAME or local:PATH (base or tuned).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory (rerun to resume).")] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            help="gta: folder of dataset.json and its files; gaia: metadata.jsonl (files "
            "beside it); programs: a task dataset (default: a held-out split drawn here); "
            "vqa/dynvqa: JSONL/JSON of {question_id, image, question, answer[, choices]}; "
            "agentx: Agent-X's data.json (media named by file_path, beside it or in files/)."
        ),
    ] = None,
    mode: Annotated[
        GTAMode | None,
        typer.Option(
            help="gta: step or e2e (default step); programs: e2e (default) or step (each gold "
            "step predicted from the gold prefix)."
        ),
    ] = None,
    answer_mode: Annotated[
        AnswerMode | None,
        typer.Option(
            help="vqa/dynvqa: direct (one turn), rr (MMAT multi-turn with operators) or orr "
            "(operator results first)."
        ),
    ] = None,
    action_format: Annotated[
        str | None, typer.Option(help="gaia/programs: json, code or tools actions.")
    ] = None,
    tool_model: Annotated[
        str | None,
        typer.Option(help="Model the vision tools ask (GTA ImageDescription, visual_qa)."),
    ] = None,
    tools: Annotated[
        str | None,
        typer.Option(
            help="gaia: comma-separated tools (default includes search); vqa/dynvqa rr/orr: "
            "the MMAT operators (default: all)."
        ),
    ] = None,
    option: Annotated[
        list[str] | None,
        typer.Option(help="Tool option TOOL.KEY=VALUE, e.g. object_localization.model=DIR."),
    ] = None,
    corpus: Annotated[
        Path | None,
        typer.Option(
            help="Local search corpus (GTA GoogleSearch, GAIA search, vqa/dynvqa rr/orr retrieval)."
        ),
    ] = None,
    embedder: Annotated[
        str | None, typer.Option(help="gta: embedder for subjective answers (auto/packaged/path).")
    ] = None,
    max_steps: Annotated[
        int | None, typer.Option(help="Step budget per episode (vqa/dynvqa rr: model turns).")
    ] = None,
    max_errors: Annotated[int | None, typer.Option(help="Failed steps allowed.")] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Max new tokens per step.")] = None,
    concurrency: Annotated[
        int | None,
        typer.Option(help="Model requests in flight, and episodes run at once (default 2)."),
    ] = None,
    limit: Annotated[int | None, typer.Option(help="Only the first N items.")] = None,
    n: Annotated[int | None, typer.Option(help="programs: size of the held-out split.")] = None,
    seed: Annotated[int | None, typer.Option(help="programs: held-out split seed.")] = None,
    family: Annotated[
        list[str] | None, typer.Option(help="programs: task family (repeatable; default all).")
    ] = None,
    exclude: Annotated[
        list[Path] | None,
        typer.Option(help="programs: task dataset whose tasks stay out of the split (repeatable)."),
    ] = None,
    base_url: Annotated[str | None, typer.Option(help="OpenAI-compatible endpoint URL.")] = None,
    adapter: Annotated[Path | None, typer.Option(help="LoRA adapter for local: models.")] = None,
    max_cost: Annotated[float | None, typer.Option(help="Stop after this many USD.")] = None,
    max_time: Annotated[
        str | None,
        typer.Option(help="Start no new item after this long (600, 10m, 1.5h); rerun resumes."),
    ] = None,
    gold_prefixes: Annotated[
        Path | None,
        typer.Option(
            help="programs --mode step: gold replays of the same tasks (a trajectory dataset, "
            "e.g. an earlier step run's OUT/trajectories) to reuse instead of replaying."
        ),
    ] = None,
    no_stop: Annotated[
        bool,
        typer.Option(
            "--no-stop",
            help="Send no stop strings (for servers that reject `stop`); replies are cut at "
            "them here instead. YAML: backend: {stop: none}.",
        ),
    ] = False,
    judge: Annotated[
        str | None,
        typer.Option(
            help="agentx: judge model spec for the judged metrics, e.g. openai:gpt-4o "
            "(without it only tool_precision and toolset_accuracy are computed)."
        ),
    ] = None,
    judge_base_url: Annotated[
        str | None, typer.Option(help="agentx: OpenAI-compatible endpoint of the judge.")
    ] = None,
    config: Annotated[Path | None, typer.Option(help="YAML file with these options.")] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Run a controller over a benchmark, resumably; write predictions, trajectories, metrics.

    Prints the headline report's metrics as JSON; OUT/metrics.json has every report.
    """
    from tracetune.cli.common import build_config, console, run_async
    from tracetune.cli.tools import _parse_options
    from tracetune.engine.operators import OperatorUnavailable
    from tracetune.evaluate.runs import (
        EvalRunConfig,
        EvalRunError,
        headline_summary,
        run_benchmark,
    )
    from tracetune.models.base import BackendError

    if bench not in (RunBench.gta, RunBench.programs) and mode is not None:
        fail("--mode applies to gta and programs only")
    if bench not in (RunBench.vqa, RunBench.dynvqa) and answer_mode is not None:
        fail("--answer-mode applies to vqa and dynvqa only")
    if bench is not RunBench.agentx and (judge is not None or judge_base_url is not None):
        fail("--judge and --judge-base-url apply to agentx only")
    # A dict, not ModelOptions: merged key by key into a YAML backend section.
    backend = {
        "base_url": base_url,
        "adapter": str(adapter) if adapter else None,
        "stop": "none" if no_stop else None,
    }
    options = _parse_options(option, corpus)
    from tracetune.timelimit import duration

    cfg = build_config(
        EvalRunConfig,
        config,
        bench=bench.value,
        model=model,
        out=out,
        data=data,
        mode=mode.value if mode else None,
        answer_mode=answer_mode.value if answer_mode else None,
        action_format=action_format,
        tool_model=tool_model,
        tools=split_names(tools),
        tool_options=options or None,
        embedder=embedder,
        max_steps=max_steps,
        max_errors=max_errors,
        temperature=temperature,
        max_tokens=max_tokens,
        concurrency=concurrency,
        limit=limit,
        n=n,
        seed=seed,
        families=family,
        exclude=exclude,
        max_cost_usd=max_cost,
        max_time=duration(max_time),
        gold_prefixes=gold_prefixes,
        backend=backend,
        judge=judge,
        judge_base_url=judge_base_url,
    )
    try:
        metrics = run_async(
            run_benchmark(cfg, progress=not quiet, notify=lambda m: console.print(m, markup=False))
        )
    except (
        EvalRunError,
        ValueError,
        FileNotFoundError,
        KeyError,
        BackendError,
        OperatorUnavailable,
    ) as exc:
        fail(str(exc).strip("'\""))
        return
    typer.echo(json.dumps(headline_summary(metrics), indent=2, ensure_ascii=False))
    console.print(
        f"run directory: {cfg.out} (metrics.json, predictions.jsonl, records.jsonl)", markup=False
    )


@app.command("report")
def report(
    runs: Annotated[
        list[Path], typer.Argument(help="Run directories written by `tracetune eval run`.")
    ],
    out: Annotated[Path, typer.Option(help="Report directory (report.html, report.md).")],
    failures: Annotated[int, typer.Option(help="Failure examples per run.")] = 5,
    title: Annotated[str, typer.Option(help="Report title.")] = "tracetune evaluation",
) -> None:
    """Compare runs in HTML and Markdown: metric tables, breakdowns, plots, failure examples."""
    from tracetune.view.report import ReportError, build_report

    try:
        result = build_report(list(runs), out, max_failures=failures, title=title)
    except ReportError as exc:
        fail(str(exc))
        return
    typer.echo(f"{result.html}\n{result.markdown}")
