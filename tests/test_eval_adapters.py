"""Benchmarks as adapters: one run skeleton, per-benchmark `eval run` subcommands whose options
are generated from each adapter's config model.

A tiny benchmark defined in this file (one adapter class, one registry entry) runs end to end
through the real skeleton, the real stage runner and a scripted OpenAI-compatible server over
loopback HTTP, from the command line and resumably: a new benchmark is one file.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

import pytest
import typer
import yaml
from pydantic import BaseModel, Field
from typer.testing import CliRunner

from tracetune.cli import app
from tracetune.cli.options_from_config import (
    OptionsError,
    command_function,
    config_from_options,
    config_params,
)
from tracetune.errors import ConfigError, TracetuneError
from tracetune.evaluate.adapter import (
    ADAPTERS,
    BenchConfig,
    BenchmarkAdapter,
    CliFlag,
    Scored,
    adapter_class,
)
from tracetune.evaluate.base import ItemScore, ScoreReport, percent
from tracetune.evaluate.runs import EvalRunError, bench_config, stable_id, write_jsonl
from tracetune.runner import StageResult
from tracetune.schema import Task, Trajectory
from tracetune.store import Dataset
from tracetune.testing import ScriptedOpenAIServer
from tracetune.tools import load_tools


def _said(output: str) -> str:
    """CLI output with rich's box drawing and line wrapping flattened."""
    return re.sub(r"[\s│╭╮╰╯─]+", " ", output)


# -- a whole benchmark in a few lines -----------------------------------------------------
class SumsConfig(BenchConfig):
    """Options of the `sums` benchmark."""

    bench: Literal["sums"] = "sums"
    n_items: int = Field(default=3, ge=1, description="How many sums to ask.")
    start: int = Field(default=1, description="The first addend.")


class SumsAdapter(BenchmarkAdapter[SumsConfig]):
    """Sums: the agent adds two numbers with the calculator; exact-match accuracy."""

    config_model = SumsConfig

    async def load_items(self, run: Any) -> Sequence[Task]:
        first = self.config.start
        tasks = [
            Task(id=f"sum-{i}", query=f"What is {first + i} + {i}?", tools=["calculator"])
            for i in range(self.config.n_items)
        ]
        write_jsonl(run.root / "gold.jsonl", [{"id": t.id, "answer": t.query} for t in tasks])
        return tasks[: self.config.limit] if self.config.limit else tasks

    def key(self, item: Task, controller: str) -> str:
        return stable_id("sums", item.id, controller)

    def tools(self, item: Task) -> list[Any]:
        return load_tools(["calculator", "final_answer"])

    def annotate(self, item: Task, trajectory: Trajectory) -> dict[str, Any]:
        return {"item": item.id}

    async def score(self, run: Any, items: Sequence[Task], result: StageResult) -> Scored:
        done = {t.metadata["item"]: t for t in run.trajectories}
        scored = []
        for task in items:
            a, b = (int(x) for x in re.findall(r"\d+", task.query))
            got = done[task.id].final_answer if task.id in done else None
            ok = got is not None and float(got) == a + b
            scored.append(ItemScore(id=task.id, scores={"accuracy": float(ok)}, prediction=got))
        report = ScoreReport(
            benchmark="sums",
            metrics={
                "accuracy": percent(
                    sum(float(i.scores["accuracy"] or 0) for i in scored), len(scored)
                )
            },
            n_items=len(scored),
            items=scored,
        )
        of = {t: done[t].id for t in done}
        return Scored({"sums": report}, "sums", of, {"asked": len(items)})


@pytest.fixture()
def sums_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(ADAPTERS, "sums", f"{__name__}:SumsAdapter")
    monkeypatch.setenv("OPENAI_API_KEY", "test")


def _calculator_agent(body: dict[str, Any]) -> str:
    """Calls the calculator on the question's numbers, then answers with its result."""
    messages = body["messages"]
    user = messages[1]["content"]
    text = user if isinstance(user, str) else "".join(p.get("text", "") for p in user)
    a, b = re.findall(r"What is (\d+) \+ (\d+)", text)[0]
    if not any(m["role"] == "assistant" for m in messages):
        call = {"name": "calculator", "arguments": {"expression": f"{a} + {b}"}}
        return "Thought: add them\nAction: " + json.dumps(call)
    last = messages[-1]["content"]
    seen = last if isinstance(last, str) else "".join(p.get("text", "") for p in last)
    result = re.findall(r"-?\d+(?:\.\d+)?", seen)[-1]
    return "Thought: done\nAction: " + json.dumps(
        {"name": "final_answer", "arguments": {"answer": result}}
    )


def test_a_new_benchmark_is_one_adapter_and_runs_from_the_command_line(
    sums_registered: None, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    with ScriptedOpenAIServer(_calculator_agent) as server:
        args = ["eval", "run", "sums", "--model", "openai:m", "--base-url", server.base_url]
        args += ["--out", str(out), "--n-items", "4", "--start", "10", "--quiet"]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        calls = server.calls
        assert calls == 8  # two model turns per item: the calculator, then the answer
        again = CliRunner().invoke(app, args)
        assert again.exit_code == 0, again.output
        assert server.calls == calls  # resumed: nothing asked twice
    printed = json.loads(result.stdout[result.stdout.index("{") : result.stdout.rindex("}") + 1])
    assert printed["benchmark"] == "sums" and printed["metrics"] == {"accuracy": 100.0}
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run"]["written"] == 0 and metrics["run"]["already_done"] == 4
    assert metrics["asked"] == 4
    run = json.loads((out / "run.json").read_text())
    assert run["benchmark"] == "sums" and run["config"]["n_items"] == 4
    assert run["identity"]["start"] == 10 and "concurrency" not in run["identity"]
    trajectories = Dataset.open(out / "trajectories", Trajectory).records()
    assert sorted(t.metadata["item"] for t in trajectories) == [f"sum-{i}" for i in range(4)]
    assert all(t.metadata["bench"] == "sums" for t in trajectories)
    assert all(t.steps[0].action and t.steps[0].action.tool_call for t in trajectories)
    records = (out / "records.jsonl").read_text().splitlines()
    assert len(records) == 4
    # another --start is another benchmark identity: the rerun is refused, not mixed
    changed = CliRunner().invoke(app, [*args[:-3], "--start", "11", "--quiet"])
    assert changed.exit_code == 2 and "start: 10 -> 11" in _said(changed.output)


def test_a_backend_failure_is_a_failed_item_retried_on_rerun(
    sums_registered: None, tmp_path: Path
) -> None:
    import asyncio

    from tracetune.evaluate.adapter import run_adapter
    from tracetune.models.base import ModelOptions

    with ScriptedOpenAIServer(_calculator_agent, failures=[503]) as server:
        config = SumsConfig(
            model="openai:m",
            out=tmp_path / "run",
            n_items=2,
            concurrency=1,
            backend=ModelOptions(base_url=server.base_url, max_retries=0),
        )
        first = asyncio.run(run_adapter(config, progress=False))
        assert first["run"]["failed"] == 1 and first["run"]["written"] == 1
        assert first["reports"]["sums"]["metrics"]["accuracy"] == 50.0  # missing, not wrong
        again = asyncio.run(run_adapter(config, progress=False))
    assert again["run"]["written"] == 1 and again["run"]["already_done"] == 1
    assert again["reports"]["sums"]["metrics"]["accuracy"] == 100.0


# -- the generated options ------------------------------------------------------------------
def _help(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return _said(result.output)


def test_generated_options_show_their_defaults_and_only_their_benchmark() -> None:
    programs = _help("eval", "run", "programs")
    assert re.search(r"--n <int> Size of the held-out split\. \[default: \(?40\)?\]", programs)
    assert re.search(r"--mode <e2e\|step> .*\[default: \(?e2e\)?\]", programs)
    assert re.search(r"--max-steps <int> Step budget per episode\. \[default: \(?10\)?\]", programs)
    gta = _help("eval", "run", "gta")
    assert re.search(r"--mode <step\|e2e> .*\[default: \(?step\)?\]", gta)
    assert "--embedder" in gta and "--n " not in gta and "--judge" not in gta
    agentx = _help("eval", "run", "agentx")
    assert "--judge " in agentx and "--judge-base-url" in agentx and "--mode " not in agentx
    # shared options and the attached executor options are on every subcommand
    for text in (programs, gta, agentx):
        assert "--concurrency" in text and "--base-url" in text and "--executor" in text
        assert "--install-completion" not in text
    listing = _help("eval", "run")
    for name in ("gta", "gaia", "agentx", "vqa", "dynvqa", "programs"):
        assert name in listing


@pytest.mark.parametrize(
    ("bench", "flag", "value", "owner"),
    [
        ("gaia", "--judge", "openai:j", "agentx"),
        ("gta", "--n", "3", "programs"),
        ("programs", "--answer-mode", "rr", "vqa, dynvqa"),
        ("agentx", "--embedder", "packaged", "gta"),
    ],
)
def test_another_benchmarks_option_is_refused_naming_whose_it_is(
    bench: str, flag: str, value: str, owner: str, tmp_path: Path
) -> None:
    args = ["eval", "run", bench, "--model", "openai:m", "--out", str(tmp_path), flag, value]
    result = CliRunner().invoke(app, args)
    said = _said(result.output)
    assert result.exit_code == 2
    assert f"{flag} does not apply to `eval run {bench}`" in said
    assert f"option of {owner} only" in said
    assert not (tmp_path / "run.json").exists()


def test_invalid_values_name_the_flag_and_yaml_fills_what_flags_leave(tmp_path: Path) -> None:
    bad = CliRunner().invoke(
        app,
        ["eval", "run", "gta", "--model", "openai:m", "--out", str(tmp_path / "r"),
         "--max-steps", "0", "--max-time", "soon"],
    )  # fmt: skip
    said = _said(bad.output)
    assert bad.exit_code == 2
    assert "--max-steps (YAML key max_steps): Input should be greater than or equal to 1" in said
    assert "--max-time (YAML key max_time): --max-time 'soon' is not a duration" in said
    # a YAML config, with the flags given laid over it
    config = tmp_path / "gaia.yaml"
    config.write_text(yaml.safe_dump({"model": "openai:m", "out": str(tmp_path / "g"),
                                      "tools": ["calculator"], "max_steps": 4}))  # fmt: skip
    from tracetune.evaluate.gaia_run import GAIAConfig

    built = config_from_options(
        GAIAConfig, {"max_steps": 7, "tools": ("ocr,calculator",)}, config_file=config,
        extra={"bench": "gaia"},
    )  # fmt: skip
    assert built.max_steps == 7 and built.tools == ["ocr", "calculator"]
    assert built.model == "openai:m" and built.max_time is None
    # from the command line: a YAML value the flags leave unset is not hidden by a default
    config.write_text(yaml.safe_dump({"max_steps": 0}))
    from_yaml = CliRunner().invoke(
        app, ["eval", "run", "gaia", "--model", "m", "--out", str(tmp_path / "g2"),
              "--config", str(config)],
    )  # fmt: skip
    assert from_yaml.exit_code == 2
    assert "--max-steps (YAML key max_steps)" in _said(from_yaml.output)
    # a key of another benchmark in the YAML is refused too, naming whose it is
    config.write_text(yaml.safe_dump({"model": "m", "out": "o", "mode": "e2e"}))
    with pytest.raises(OptionsError, match="mode: not an option of GAIAConfig") as info:
        config_from_options(GAIAConfig, {}, config_file=config, extra={"bench": "gaia"})
    assert isinstance(info.value, TracetuneError) and info.value.hint
    config.write_text(yaml.safe_dump({"judge": "openai:j"}))
    foreign = CliRunner().invoke(
        app, ["eval", "run", "gaia", "--model", "m", "--out", str(tmp_path / "g3"),
              "--config", str(config)],
    )  # fmt: skip
    assert foreign.exit_code == 2
    assert "judge: not an option of eval run gaia (an option of agentx only)" in _said(
        foreign.output
    )


# -- the helper on a config of its own ------------------------------------------------------
class Colour(StrEnum):
    red = "red"
    blue = "blue"


class Demo(BaseModel):
    name: str = Field(description="A name.")
    size: int = Field(default=3, ge=1, description="How many.")
    ratio: float | None = Field(default=None, description="A ratio.")
    verbose: bool = Field(default=False, description="Say more.")
    kind: Literal["a", "b"] = Field(default="a", description="Which kind.")
    colour: Colour = Field(default=Colour.blue, description="A colour.")
    tags: Annotated[list[str], CliFlag("--tag", "--tags")] = Field(
        default_factory=list, description="Tags."
    )
    where: Path | None = Field(default=None, description="A path.")
    nested: Annotated[dict[str, Any], CliFlag(skip=True)] = Field(default_factory=dict)


def _demo_app(seen: list[Demo]) -> typer.Typer:
    demo = typer.Typer(add_completion=False)

    def callback(**values: Any) -> None:
        seen.append(config_from_options(Demo, values))

    demo.command()(command_function(callback, config_params(Demo), "Demo command."))
    return demo


def test_options_from_a_config_model_round_trip_to_a_validated_config(tmp_path: Path) -> None:
    seen: list[Demo] = []
    demo = _demo_app(seen)
    result = CliRunner().invoke(
        demo,
        ["--name", "x", "--size", "5", "--ratio", "0.5", "--verbose", "--kind", "b",
         "--colour", "red", "--tag", "p,q", "--tags", "r", "--where", str(tmp_path)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert seen[-1] == Demo(
        name="x", size=5, ratio=0.5, verbose=True, kind="b", colour=Colour.red,
        tags=["p", "q", "r"], where=tmp_path,
    )  # fmt: skip
    # unset options keep the model's defaults
    assert CliRunner().invoke(demo, ["--name", "y"]).exit_code == 0
    assert seen[-1] == Demo(name="y")
    # a choice outside the Literal is a usage error; a field the CLI cannot take has no option
    wrong = CliRunner().invoke(demo, ["--name", "y", "--kind", "c"])
    assert wrong.exit_code == 2 and "--kind" in _said(wrong.output)
    helped = _said(CliRunner().invoke(demo, ["--help"], terminal_width=200).output)
    assert "--nested" not in helped and "--no-verbose" in helped
    assert re.search(r"--size <int> How many\. \[default: \(?3\)?\]", helped)
    # validation errors name the flag
    with pytest.raises(OptionsError, match=r"--size \(YAML key size\)"):
        config_from_options(Demo, {"name": "z", "size": 0})
    assert issubclass(OptionsError, ConfigError)


def test_a_field_the_command_line_cannot_take_must_say_so() -> None:
    class Bad(BaseModel):
        table: dict[str, int] = Field(default_factory=dict)

    with pytest.raises(TypeError, match="CliFlag\\(skip=True\\)"):
        config_params(Bad)


# -- configs by benchmark name (the Python API) ---------------------------------------------
def test_bench_config_builds_the_benchmarks_own_and_refuses_foreign_options(
    tmp_path: Path,
) -> None:
    gta = bench_config("gta", model="m", out=tmp_path, mode="e2e")
    assert type(gta).__name__ == "GTAConfig" and gta.mode == "e2e"  # type: ignore[attr-defined]
    programs = bench_config("programs", model="m", out=tmp_path)
    assert programs.mode == "e2e"  # type: ignore[attr-defined]  # whole episodes by default
    stepped = bench_config("programs", model="m", out=tmp_path, mode="step")
    assert stepped.mode == "step"  # type: ignore[attr-defined]
    with pytest.raises(EvalRunError, match="judge: not an option of gaia") as foreign:
        bench_config("gaia", model="m", out=tmp_path, judge="openai:j")
    takes = str(foreign.value.hint).removeprefix("gaia takes: ").split(", ")
    assert {"model", "out", "data", "tools", "action_format"} <= set(takes)
    assert "judge" not in takes and "bench" not in takes
    with pytest.raises(EvalRunError, match="action_format: not an option of gta"):
        bench_config("gta", model="m", out=tmp_path, action_format="code")
    with pytest.raises(EvalRunError, match="invalid options for gta: max_steps"):
        bench_config("gta", model="m", out=tmp_path, max_steps=0)
    with pytest.raises(ConfigError, match="no benchmark named 'nope'"):
        adapter_class("nope")


# -- train sft / train dpo: the same helper ------------------------------------------------
def test_train_options_come_from_the_training_configs(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import tracetune.cli.train as train_cli
    from tracetune.train.config import DPOConfig, SFTConfig

    sft_help = _help("train", "sft")
    for pattern in (
        r"--epochs <float> Passes over the data\. \[default: \(?3\.0\)?\]",
        r"--grad-accum <int> Gradient accumulation steps\. \[default: \(?8\)?\]",
        r"--overlong <drop\|truncate> .*\[default: \(?drop\)?\]",
        r"--lora-r <int> LoRA rank\.",
    ):
        assert re.search(pattern, sft_help), pattern
    dpo_help = _help("train", "dpo")
    assert re.search(r"--epochs <float> Passes over the pairs\. \[default: \(?1\.0\)?\]", dpo_help)
    assert re.search(r"--beta <float> .*\[default: \(?0\.1\)?\]", dpo_help)
    assert "--overlong" not in dpo_help and "--beta" not in sft_help

    seen: list[Any] = []
    monkeypatch.setattr(train_cli, "_run", lambda kind, cfg: seen.append((kind, cfg)))
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump({"epochs": 2, "lora": {"r": 8, "dropout": 0.2}}))
    args = ["train", "sft", "--base", "b", "--data", "d1", "--data", "d2", "--out", str(tmp_path)]
    result = CliRunner().invoke(
        app,
        [*args, "--lora-r", "4", "--max-time", "10m", "--config", str(config), "--no-resume",
         "--report-to", "none,tensorboard"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    kind, cfg = seen[-1]
    assert kind == "sft" and isinstance(cfg, SFTConfig)
    assert cfg.data == [Path("d1"), Path("d2")] and cfg.epochs == 2 and cfg.max_time == 600
    # the LoRA flag is laid over the YAML section key by key
    assert cfg.lora.r == 4 and cfg.lora.dropout == 0.2 and cfg.report_to == ["none", "tensorboard"]
    bad = CliRunner().invoke(app, [*args, "--grad-accum", "0"])
    assert bad.exit_code == 2
    assert "--grad-accum (YAML key grad_accum)" in _said(bad.output)
    pairs = ["train", "dpo", "--base", "b", "--pairs", "p", "--out", str(tmp_path)]
    assert CliRunner().invoke(app, [*pairs, "--beta", "0.3"]).exit_code == 0
    kind, cfg = seen[-1]
    assert kind == "dpo" and isinstance(cfg, DPOConfig) and cfg.beta == 0.3 and cfg.epochs == 1.0
