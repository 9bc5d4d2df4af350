"""Commands whose options are generated from their config models: every field is an option
under its flag, --help shows its default, and flags layer over a --config YAML file."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click
import pytest
import typer
import yaml  # type: ignore[import-untyped]
from pydantic import BaseModel
from typer.testing import CliRunner

from tracetune.cli import app
from tracetune.cli.executor_options import executor_params
from tracetune.cli.options_from_config import _cli_meta, _default, field_flags


def _said(text: str) -> str:
    return " ".join(text.replace("│", " ").split())  # rich draws the help in a box


def _help(*args: str) -> str:
    result = CliRunner().invoke(app, [*args, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return _said(result.output)


def _command(*path: str) -> Any:
    command: Any = typer.main.get_command(app)
    ctx = click.Context(command)
    for name in path:  # get_command: `eval run`'s benchmarks are loaded when asked for
        command = command.get_command(ctx, name)
        ctx = click.Context(command, parent=ctx)
    return command


def _models() -> dict[tuple[str, ...], type[BaseModel]]:
    from tracetune.agent.run import AgentRunConfig
    from tracetune.prefs.explore import ExploreConfig
    from tracetune.prefs.pairs import BuildConfig
    from tracetune.rollout import RolloutConfig
    from tracetune.synth.programs.generate import ProgramsConfig

    return {
        ("prefs", "build"): BuildConfig,
        ("agent", "run"): AgentRunConfig,
        ("rollout",): RolloutConfig,
        ("prefs", "explore"): ExploreConfig,
        ("tasks", "programs"): ProgramsConfig,
    }


@pytest.mark.parametrize("path", list(_models()), ids=" ".join)
def test_every_field_is_an_option_showing_its_default(path: tuple[str, ...]) -> None:
    model = _models()[path]
    params = {p.name: p for p in _command(*path).params}
    shown = 0
    for name, info in model.model_fields.items():
        meta = _cli_meta(info)
        if meta is not None and meta.skip:
            assert name not in params, f"{name} is set another way, not by its own flag"
            continue
        param = params[name]
        assert field_flags(name, info)[0] in param.opts, name
        assert (info.description or "").split()[0] in (param.help or ""), name
        default = _default(info)
        if default is None:
            assert not param.show_default, name
            continue
        shown += 1
        assert param.show_default, name
        value = param.default
        value = [getattr(v, "value", v) for v in value] if isinstance(value, list) else value
        expected = [str(v) for v in default] if isinstance(default, list) else default
        got = [str(v) for v in value] if isinstance(value, list) else getattr(value, "value", value)
        assert got == (str(expected) if isinstance(expected, Path) else expected), name
    assert shown >= 3
    assert _help(*path).count("[default:") >= shown


def test_agent_run_help_names_its_flags_with_their_defaults() -> None:
    text = _help("agent", "run")
    for pattern in (
        r"--max-steps <int> Step budget per episode\. \[default: 8\]",
        r"--action-format <json\|code\|tools> How actions are written\. \[default: json\]",
        r"--tools <list\[str\]> .*\[default: calculator, image_crop\]",
        r"--concurrency <int> Model requests in flight, and episodes run at once\. "
        r"\[default: 4\]",
        r"--max-cost\S* <float> Stop after this much spend \(USD\)\.",
        r"--image <list\[Path\]> Image for --task",
        r"--base-url <str>",
        r"--no-stop",
        r"--executor",
    ):
        assert re.search(pattern, text), pattern


def test_agent_run_flags_lay_over_the_yaml_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import tracetune.agent.run as run_module

    seen: list[Any] = []

    async def fake_run(cfg: Any, progress: bool = True) -> Any:
        seen.append(cfg)
        raise SystemExit(0)

    monkeypatch.setattr(run_module, "run_agent", fake_run)
    config = tmp_path / "agent.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": "openai:from-yaml",
                "out": str(tmp_path / "out"),
                "max_steps": 5,
                "samples": 2,
                "max_cost_usd": 1.5,
                "backend": {"base_url": "http://127.0.0.1:9/v1", "timeout_s": 7},
            }
        )
    )
    image = tmp_path / "a.png"
    result = CliRunner().invoke(
        app,
        ["agent", "run", "--config", str(config), "--task", "q", "--image", str(image),
         "--tools", "calculator,image_crop", "--tools", "ocr", "--max-steps", "3",
         "--max-cost", "0.5", "--adapter", str(tmp_path / "lora"), "--no-stop", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (cfg,) = seen
    assert cfg.model == "openai:from-yaml" and cfg.out == tmp_path / "out"
    assert cfg.max_steps == 3 and cfg.samples == 2  # the flag wins; YAML fills the rest
    assert cfg.max_cost_usd == 0.5 and cfg.images == [image] and cfg.task == "q"
    assert cfg.tools == ["calculator", "image_crop", "ocr"]
    # --adapter / --no-stop merge into YAML's backend section key by key
    assert cfg.backend.base_url == "http://127.0.0.1:9/v1" and cfg.backend.timeout_s == 7
    assert cfg.backend.adapter == str(tmp_path / "lora") and cfg.backend.stop == "none"
    assert cfg.action_format == "json" and cfg.concurrency == 4  # unset: the model's default


def test_agent_run_bad_value_names_the_flag_and_yaml_key(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["agent", "run", "--model", "openai:m", "--out", str(tmp_path), "--task", "q",
         "--max-steps", "0"],
        terminal_width=200,
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    text = _said(result.output)
    assert "invalid options for agent run" in text
    assert "--max-steps (YAML key max_steps)" in text
    assert not (tmp_path / "state.sqlite").exists()


def test_rollout_flags_lay_over_the_yaml_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import tracetune.rollout as rollout_module

    seen: list[Any] = []

    async def fake_run(cfg: Any, progress: bool = True) -> Any:
        seen.append(cfg)
        raise SystemExit(0)

    monkeypatch.setattr(rollout_module, "run_rollout", fake_run)
    config = tmp_path / "rollout.yaml"
    config.write_text(
        yaml.safe_dump(
            {"tasks": str(tmp_path / "tasks"), "out": str(tmp_path / "out"), "max_time": "1h",
             "require_tools": False, "tool_modules": ["a.mod"], "backend": {"timeout_s": 9}}
        )
    )  # fmt: skip
    base = ["rollout", "--config", str(config), "--quiet"]
    result = CliRunner().invoke(
        app,
        [*base, "--teacher", "openai:t", "--tool-module", "b.mod", "--tool-modules", "c.mod",
         "--max-time", "10m", "--max-cost-usd", "2", "--no-keep-rejected",
         "--base-url", "http://127.0.0.1:9/v1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (cfg,) = seen
    assert cfg.tasks == tmp_path / "tasks" and cfg.teacher == "openai:t"
    assert cfg.tool_modules == ["b.mod", "c.mod"] and cfg.max_time == 600
    assert cfg.max_cost_usd == 2 and cfg.keep_rejected is False
    assert cfg.require_tools is False  # YAML's, no flag given
    assert cfg.backend.base_url == "http://127.0.0.1:9/v1" and cfg.backend.timeout_s == 9
    assert cfg.concurrency == 2 and cfg.seed == 0  # the model's defaults

    seen.clear()
    assert CliRunner().invoke(app, base).exit_code == 0
    assert seen[0].max_time == 3600 and seen[0].tool_modules == ["a.mod"]  # YAML alone

    bad = CliRunner().invoke(app, [*base, "--max-time", "soon"], terminal_width=200)
    assert bad.exit_code == 2, bad.output
    assert "--max-time (YAML key max_time): --max-time 'soon' is not a duration" in _said(
        bad.output
    )


def test_prefs_explore_flags_lay_over_the_yaml_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import tracetune.prefs.explore as explore_module

    seen: list[Any] = []

    async def fake_run(cfg: Any, progress: bool = True) -> Any:
        seen.append(cfg)
        raise SystemExit(0)

    monkeypatch.setattr(explore_module, "run_explore", fake_run)
    config = tmp_path / "explore.yaml"
    config.write_text(
        yaml.safe_dump(
            {"tasks": str(tmp_path / "tasks"), "out": str(tmp_path / "out"), "policy": "openai:p",
             "k": 3, "judge_backend": {"timeout_s": 5}}
        )
    )  # fmt: skip
    result = CliRunner().invoke(
        app,
        ["prefs", "explore", "--config", str(config), "--verifier", "llm-best", "--judge",
         "openai:j", "--judge-base-url", "http://127.0.0.1:9/v1", "--max-cost", "1",
         "--max-time", "1.5h", "--gold-anchor", "--temperatures", "0.5",
         "--temperatures", "1.0", "--temperatures", "1.2", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (cfg,) = seen
    assert cfg.policy == "openai:p" and cfg.k == 3 and cfg.verifier == "llm-best"
    assert cfg.max_cost_usd == 1 and cfg.max_time == 5400 and cfg.gold_anchor is True
    assert cfg.temperatures == [0.5, 1.0, 1.2]
    assert cfg.judge_backend.base_url == "http://127.0.0.1:9/v1"
    assert cfg.judge_backend.timeout_s == 5 and cfg.backend.base_url is None
    assert cfg.top_p == 0.8 and cfg.low_samples == 1  # the model's defaults

    bad = CliRunner().invoke(
        app, ["prefs", "explore", "--config", str(config), "--verifier", "coin"],
        terminal_width=200,
    )  # fmt: skip
    assert bad.exit_code == 2, bad.output
    assert "verifier must be one of" in _said(bad.output)


def test_tasks_programs_flags_lay_over_the_yaml_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import tracetune.synth.programs.generate as generate_module

    seen: list[Any] = []

    async def fake_generate(cfg: Any, progress: bool = True) -> Any:
        seen.append(cfg)
        raise SystemExit(0)

    monkeypatch.setattr(generate_module, "generate_tasks", fake_generate)
    config = tmp_path / "programs.yaml"
    config.write_text(yaml.safe_dump({"out": str(tmp_path / "out"), "n": 7, "seed": 3}))
    result = CliRunner().invoke(
        app,
        ["tasks", "programs", "--config", str(config), "--families", "chart,table",
         "--families", "map", "--programs-module", "a.mod", "--n", "9", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (cfg,) = seen
    assert cfg.n == 9 and cfg.seed == 3 and cfg.workers == 1
    assert cfg.families == ["chart", "table", "map"] and cfg.programs_modules == ["a.mod"]
    listed = CliRunner().invoke(app, ["tasks", "programs", "--list"])  # needs no --out
    assert listed.exit_code == 0 and "chart" in listed.output and not seen[1:]


def _stage_commands() -> dict[tuple[str, ...], type[BaseModel]]:
    from tracetune.evaluate.adapter import ADAPTERS, adapter_class

    commands = {
        path: model
        for path, model in _models().items()
        if path not in (("tasks", "programs"), ("prefs", "build"))
    }
    for bench in ADAPTERS:
        commands[("eval", "run", bench)] = adapter_class(bench).config_model
    return commands


def test_every_stage_shares_one_declaration_of_the_run_options() -> None:
    """out, concurrency, limit and the budgets are StageOptions' fields, so each command
    shows the same flags with the same help (a command may only redefine a default)."""
    from tracetune.stageoptions import StageOptions

    shared = {"--limit", "--max-cost", "--max-total-tokens", "--max-time", "--concurrency"}
    helps: dict[str, set[str]] = {}
    for path, model in _stage_commands().items():
        assert issubclass(model, StageOptions), path
        for param in _command(*path).params:
            flag = next((o for o in param.opts if o in shared), None)
            if flag is not None:
                helps.setdefault(flag, set()).add(str(param.help))
        text = _help(*path)
        assert re.search(r"--max-time DURATION Start no new item after this long", text), path
    assert set(helps) == shared
    assert all(len(h) == 1 for flag, h in helps.items() if flag != "--concurrency"), helps


def test_agent_run_stops_at_its_limit_and_budget(tmp_path: Path) -> None:
    from tracetune.agent.run import AgentRunConfig, run_agent
    from tracetune.cli.common import run_async
    from tracetune.testing import ScriptedChatModel

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(f'{{"query": "What is {i} + 1?"}}\n' for i in range(5)))
    answer = 'Thought: done.\nAction: {"name": "final_answer", "arguments": {"answer": "1"}}'
    model = ScriptedChatModel(lambda messages: answer, spec="scripted:a")
    config = AgentRunConfig(model="scripted:a", out=tmp_path / "a", tasks=tasks, limit=2)
    result, dataset = run_async(run_agent(config, model=model, progress=False))
    assert result.written == 2 and len(dataset) == 2
    # The rest run when the limit goes, and what was done is not done again.
    again = config.model_copy(update={"limit": None, "max_time": 1e-9})
    result, dataset = run_async(run_agent(again, model=model, progress=False))
    assert result.stopped and len(dataset) < 5, result.summary()
    rest = config.model_copy(update={"limit": None})
    result, dataset = run_async(run_agent(rest, model=model, progress=False))
    assert (result.skipped, result.written, len(dataset)) == (2, 3, 5), result.summary()


def _sectioned() -> dict[tuple[str, ...], tuple[type[BaseModel], tuple[str, ...], set[str]]]:
    """Commands whose options are a config's fields and one nested section's:
    path -> (config, sections with options, fields set only in YAML)."""
    from tracetune.engine.infer import InferConfig
    from tracetune.engine.ingest import IngestConfig
    from tracetune.engine.pipeline import MMATRunConfig, RenderConfig
    from tracetune.engine.rationale import RationaleConfig
    from tracetune.engine.reflect import ReflectConfig
    from tracetune.prefs.matrix import MatrixConfig
    from tracetune.synth.mtrace import SynthConfig

    synth_sections = {"queries", "files", "verify_tasks", "rollout", "verify_trajectories"}
    yaml_only = {"backend", *synth_sections}
    table: dict[tuple[str, ...], tuple[type[BaseModel], tuple[str, ...], set[str]]] = {
        ("synth", name.replace("_", "-")): (SynthConfig, (name,), yaml_only)
        for name in synth_sections
    }
    table[("synth", "run")] = (SynthConfig, (), yaml_only)
    table[("mmat", "ingest")] = (IngestConfig, ("columns",), set())
    table[("mmat", "rationale")] = (RationaleConfig, ("operators",), {"backend"})
    table[("mmat", "reflect")] = (ReflectConfig, (), {"backend"})
    table[("mmat", "render")] = (RenderConfig, (), set())
    table[("mmat", "infer")] = (InferConfig, ("operators",), {"backend"})
    table[("mmat", "run")] = (
        MMATRunConfig,
        (),
        {"backend", "operators", "ingest", "rationale", "reflect"},
    )
    table[("run", "matrix")] = (
        MatrixConfig,
        ("eval",),
        {"tasks", "heldout", "sft", "explore", "pairs", "dpo"},
    )
    return table


@pytest.mark.parametrize("path", list(_sectioned()), ids=" ".join)
def test_sectioned_commands_take_each_field_of_the_config_and_its_section(
    path: tuple[str, ...],
) -> None:
    model, sections, yaml_only = _sectioned()[path]
    params = {p.name: p for p in _command(*path).params}
    wanted = {(n, i) for n, i in model.model_fields.items() if n not in yaml_only | set(sections)}
    for section in sections:
        inner = model.model_fields[section].annotation
        assert isinstance(inner, type) and issubclass(inner, BaseModel)
        wanted |= {
            (n, i)
            for n, i in inner.model_fields.items()
            if (n == section or n not in model.model_fields)
            and not getattr(_cli_meta(i), "skip", False)
        }
    for name, info in wanted:
        assert field_flags(name, info)[0] in params[name].opts, (path, name)
        assert params[name].show_default == (_default(info) is not None), (path, name)
    others = set(params) - {n for n, _ in wanted} - {p.name for p in executor_params()}
    assert others <= {"base_url", "config", "quiet", "as_json", "retry_dropped", "mcp"}, others
    assert ("base_url" in others) == ("backend" in model.model_fields)


def test_run_matrix_options_lay_over_its_yaml(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import tracetune.prefs.matrix as matrix

    seen: list[Any] = []

    async def fake_run(cfg: Any, progress: bool = True) -> dict[str, Any]:
        seen.append(cfg)
        return {"stages": {}, "elapsed_s": 0}

    monkeypatch.setattr(matrix, "run_matrix", fake_run)
    config = tmp_path / "matrix.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "out": str(tmp_path / "m"),
                "base": "tiny:qwen2_vl",
                "tasks": {"n": 6},
                "eval": {"max_steps": 3, "max_tokens": 40},
            }
        )
    )
    result = CliRunner().invoke(
        app,
        ["run", "matrix", str(config), "--max-tokens", "24", "--action-format", "code",
         "--explore-tasks", "2", "--json", "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (cfg,) = seen
    assert cfg.action_format == "code" and cfg.explore_tasks == 2 and cfg.tasks.n == 6
    assert (cfg.eval.max_steps, cfg.eval.max_tokens) == (3, 24)  # the flag wins, YAML the rest
    bad = CliRunner().invoke(app, ["run", "matrix", str(config), "--max-steps", "0"])
    assert bad.exit_code == 2 and "--max-steps (YAML key eval.max_steps)" in _said(bad.output)


def test_synth_flags_lay_over_the_yaml_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import tracetune.cli.synth as synth_cli

    seen: list[Any] = []
    monkeypatch.setattr(synth_cli, "_run", lambda cfg, stages, *rest: seen.append((cfg, stages)))
    config = tmp_path / "synth.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "out": str(tmp_path / "run"),
                "generator": "openai:gen",
                "max_cost_usd": 2.0,
                "queries": {"batches": 3, "per_batch": 4, "max_tokens": 99},
                "backend": {"base_url": "http://127.0.0.1:9/v1", "timeout_s": 7},
            }
        )
    )
    bench = tmp_path / "gta.json"
    result = CliRunner().invoke(
        app,
        ["synth", "queries", "--config", str(config), "--per-batch", "6", "--max-cost", "0.5",
         "--tools", "ocr,calculator", "--benchmark", str(bench), "--no-decontaminate",
         "--max-total-tokens", "1000", "--max-time", "2m",
         "--base-url", "http://127.0.0.1:8/v1"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    ((cfg, stages),) = seen
    assert stages == ["queries.generate", "queries.filter"]
    assert cfg.generator == "openai:gen" and cfg.max_cost_usd == 0.5
    assert cfg.max_total_tokens == 1000 and cfg.max_time == 120
    q = cfg.queries
    assert (q.batches, q.per_batch, q.max_tokens) == (3, 6, 99)  # flag wins, YAML fills the rest
    assert q.tools == ["ocr", "calculator"] and q.benchmarks == [bench] and not q.decontaminate
    assert cfg.backend.base_url == "http://127.0.0.1:8/v1" and cfg.backend.timeout_s == 7
    # A bad value names its flag; a section option of another stage is not an option here.
    bad = CliRunner().invoke(app, ["synth", "files", "--config", str(config), "--max-files", "0"])
    assert bad.exit_code == 2 and "--max-files (YAML key files.max_files)" in _said(bad.output)
    other = CliRunner().invoke(app, ["synth", "files", "--config", str(config), "--batches", "2"])
    assert other.exit_code == 2 and "--batches" in other.output
    # --max-tokens is a stage's tokens per call, as in every command; the run's token budget
    # is --max-total-tokens (its older YAML key max_tokens still reads)
    seen.clear()
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({"out": str(tmp_path / "run"), "max_tokens": 500}))
    result = CliRunner().invoke(
        app, ["synth", "queries", "--config", str(old), "--max-tokens", "77"]
    )
    assert result.exit_code == 0, result.output
    ((cfg, _),) = seen
    assert cfg.queries.max_tokens == 77 and cfg.max_total_tokens == 500
