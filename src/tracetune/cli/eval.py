"""``tracetune eval``: score benchmark predictions with the benchmarks' exact rules."""

from __future__ import annotations

import json
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperCommand

from tracetune.cli.common import App, ReportingGroup, fail

app = App(no_args_is_help=True, add_completion=False)


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
    if bench is not Bench.gta and (mode is not None or protocol is not None):
        fail("--mode and --protocol apply to gta only")
    if bench is not Bench.agentx and judge is not None:
        fail("--judge applies to agentx only (the other scorers use no judge)")
    if bench is not Bench.dynvqa and (
        rule is not DynVQARule.official or lang is not DynVQALang.auto
    ):
        fail("--rule and --lang apply to dynvqa only")
    report = _score(bench, gold, predictions, mode, protocol, judge, embedder, extract, rule, lang)
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
        fail(f"cannot load judge {judge!r}: {exc.message}", hint=exc.hint)
        return None
    try:
        return score_agentx(gold, predictions, judge_model)
    except BackendError as exc:  # a judge that fails for good fails the run: no silent zeros
        fail(f"judge {judge!r} failed: {exc.message}", hint=exc.hint)
        return None


# -- eval run NAME: one subcommand per benchmark adapter, options from its config model ----
# Options every `eval run` subcommand has beside its config's fields: they build a field
# (backend, tool_options) or steer the command.
def _shared(
    option: Annotated[
        list[str] | None,
        typer.Option(
            help="Tool option TOOL.KEY=VALUE (repeatable), e.g. object_localization.model=DIR."
        ),
    ] = None,
    corpus: Annotated[
        Path | None,
        typer.Option(help="Local search corpus (the search tool; vqa/dynvqa rr/orr retrieval)."),
    ] = None,
    base_url: Annotated[str | None, typer.Option(help="OpenAI-compatible endpoint URL.")] = None,
    adapter: Annotated[Path | None, typer.Option(help="LoRA adapter for local: models.")] = None,
    no_stop: Annotated[
        bool,
        typer.Option(
            "--no-stop",
            help="Send no stop strings (for servers that reject `stop`); replies are cut at "
            "them here instead. YAML: backend: {stop: none}.",
        ),
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option(
            help="YAML file with these options (keys: the option names with underscores); "
            "flags given override it."
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress bar.")] = False,
) -> None:
    """Carries the shared options (never run)."""


try:  # typer >= 0.20 carries its own copy of click
    from typer._click.exceptions import NoSuchOption, UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import NoSuchOption, UsageError  # type: ignore[assignment]


class BenchCommand(TyperCommand):
    """``eval run NAME``: an option of another benchmark is refused, naming whose it is."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, args)
        except NoSuchOption as exc:
            owners = _option_owners(exc.option_name)
            if owners:
                raise UsageError(
                    f"{exc.option_name} does not apply to `eval run {self.name}`: it is an "
                    f"option of {', '.join(owners)} only (see `tracetune eval run "
                    f"{owners[0]} --help`)",
                    ctx,
                ) from None
            raise


def _option_owners(flag: str) -> list[str]:
    """The benchmarks that have the option ``flag`` (``--judge``) or YAML key (``judge``)."""
    from tracetune.cli.options_from_config import field_flags
    from tracetune.evaluate.adapter import ADAPTERS, adapter_class

    owners = []
    for name in ADAPTERS:
        fields = adapter_class(name).config_model.model_fields
        if flag in fields or any(flag in field_flags(f, info) for f, info in fields.items()):
            owners.append(name)
    return owners


def _whose(key: str) -> str | None:
    owners = _option_owners(key)
    return f"an option of {', '.join(owners)} only" if owners else None


def _first_paragraph(text: str | None) -> str:
    return " ".join((text or "").strip().split("\n\n")[0].split())


def bench_command(name: str) -> Any:
    """The ``eval run NAME`` command of the adapter registered as ``name``: its options
    generated from the adapter's config model, plus the shared ones."""
    import inspect

    from tracetune.cli.executor_options import executor_params
    from tracetune.cli.mcp_options import mcp_params
    from tracetune.cli.options_from_config import command_function, config_params
    from tracetune.evaluate.adapter import adapter_class

    adapter = adapter_class(name)
    shared = list(inspect.signature(_shared, eval_str=True).parameters.values())
    params = [
        *config_params(adapter.config_model, skip={"bench"}),
        *(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in shared),
    ]
    summary = _first_paragraph(adapter.__doc__)
    doc = (
        f"{summary}\n\nRun a controller over {name}, resumably; write predictions, "
        "trajectories and metrics (OUT/metrics.json has every report), and print the "
        "headline report's metrics as JSON."
    )

    def callback(**values: Any) -> None:
        _run_bench(name, values)

    holder = typer.Typer(add_completion=False)
    holder.command(name, cls=BenchCommand, short_help=summary)(
        command_function(callback, params, doc)
    )
    command = typer.main.get_command(holder)
    command.name = name
    command.params.extend([*executor_params(), *mcp_params()])
    return command


class EvalRunGroup(ReportingGroup):
    """``eval run``: one subcommand per registered benchmark, built when it is used."""

    def list_commands(self, ctx: Any) -> list[str]:
        from tracetune.evaluate.adapter import ADAPTERS

        return list(ADAPTERS)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        from tracetune.evaluate.adapter import ADAPTERS

        if cmd_name not in ADAPTERS:
            return None
        if cmd_name not in self.commands:
            self.commands[cmd_name] = bench_command(cmd_name)
        return self.commands[cmd_name]


run_app = typer.Typer(cls=EvalRunGroup, no_args_is_help=True, add_completion=False)
app.add_typer(
    run_app,
    name="run",
    help="Run a controller over a benchmark (one subcommand each), resumably; write "
    "predictions, trajectories, metrics.",
)


def _run_bench(name: str, values: dict[str, Any]) -> None:
    from tracetune.cli.common import console, run_async
    from tracetune.cli.options_from_config import config_from_options
    from tracetune.cli.tools import parse_options
    from tracetune.evaluate.adapter import adapter_class
    from tracetune.evaluate.runs import headline_summary, run_benchmark

    model = adapter_class(name).config_model
    adapter_dir = values.pop("adapter")
    # A dict, not ModelOptions: merged key by key into a YAML backend section.
    backend = {
        "base_url": values.pop("base_url"),
        "adapter": str(adapter_dir) if adapter_dir else None,
        "stop": "none" if values.pop("no_stop") else None,
    }
    options = parse_options(values.pop("option"), values.pop("corpus"))
    config_file, quiet = values.pop("config"), values.pop("quiet")
    # Bad options or data raise TracetuneErrors, which the command group reports (message
    # and hint, exit 2); an episode whose backend fails is a failed item (exit 3, retried on
    # a rerun); anything else is a bug and keeps its traceback.
    cfg = config_from_options(
        model,
        values,
        config_file=config_file,
        extra={"bench": name, "backend": backend, "tool_options": options or None},
        what=f"eval run {name}",
        unknown=_whose,
    )
    metrics = run_async(
        run_benchmark(cfg, progress=not quiet, notify=lambda m: console.print(m, markup=False))
    )
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
    from tracetune.view.report import build_report

    result = build_report(list(runs), out, max_failures=failures, title=title)
    typer.echo(f"{result.html}\n{result.markdown}")
