"""The error contract: user errors are TracetuneErrors shown as message + hint with exit
status 2; anything else is a bug and keeps its traceback (exit status 1)."""

from __future__ import annotations

import importlib
import inspect
import pickle
import pkgutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import tracetune
from tracetune.errors import (
    BAD_INPUT_EXIT,
    CRASH_EXIT,
    ITEMS_FAILED_EXIT,
    OK_EXIT,
    ConfigError,
    InputFileError,
    TracetuneError,
)

# Exception classes that are not user errors: they steer control flow inside a run and are
# caught where they are raised (or are answered to a model or an HTTP client), never shown
# as a command's error. Each with why.
CONTROL_FLOW = {
    "tracetune.tools.spec.ToolInterrupted": "BaseException raised into a cancelled tool's "
    "thread to unwind the call",
    "tracetune.engine.ingest.BadImage": "ingest's signal to drop one unreadable image, "
    "counted as a drop reason",
    "tracetune.evaluate.agentx_run.MediaUnreadable": "skips one Agent-X query whose media "
    "cannot be read, with the reason recorded",
    "tracetune.evaluate.agentx_run.VideoUnreadable": "the video case of MediaUnreadable",
    "tracetune.formats.turns.NotAnEpisode": "tells the importer to keep a chat as a dialogue",
    "tracetune.view.site.NotFound": "the viewer's HTTP 404 answer",
    "tracetune.sandbox._worker.SandboxViolation": "raised into the model's own code inside "
    "the sandbox; the model reads it",
    "tracetune.safefs.UnsafePath": "a refused name in an episode's working directory, "
    "answered to the model as a tool error",
}


def _run_cli(script: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """Run ``script`` (which ends by calling the real ``tracetune`` entry point) in a fresh
    interpreter, so what the user sees on stderr, traceback or not, is what is checked."""
    path = tmp_path / "run_cli.py"
    path.write_text(textwrap.dedent(script))
    return subprocess.run(
        [sys.executable, str(path)], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )


# -- the class itself --------------------------------------------------------------------------
def test_a_tracetune_error_shows_its_message_and_hint_and_keeps_its_builtin_base() -> None:
    exc = ConfigError("concurrency must be at least 1", hint="pass --concurrency 4")
    assert exc.message == "concurrency must be at least 1"
    assert exc.hint == "pass --concurrency 4"
    assert str(exc) == "concurrency must be at least 1\nhint: pass --concurrency 4"
    assert isinstance(exc, ValueError) and exc.exit_code == BAD_INPUT_EXIT
    assert str(ConfigError("no hint")) == "no hint"
    with pytest.raises(ValueError, match="at least 1"):  # old `except ValueError` callers
        raise exc
    missing = InputFileError("no file x.jsonl", hint="check the path")
    assert isinstance(missing, FileNotFoundError) and isinstance(missing, TracetuneError)
    # errors cross process boundaries (the Ray executor, rendering workers) with their hint
    again = pickle.loads(pickle.dumps(missing))
    assert type(again) is InputFileError and str(again) == str(missing)


def test_errors_with_their_own_arguments_survive_pickling() -> None:
    """Ray workers and rendering processes send errors back pickled: a subclass whose
    __init__ takes other arguments keeps its message, fields, hint and errno."""
    import errno

    from tracetune.formats.registry import MissingMediaError
    from tracetune.inputs import ImageError
    from tracetune.runner.outcome import DiskFullError, disk_full
    from tracetune.runner.ray_executor import RayExecutorError

    image = pickle.loads(pickle.dumps(ImageError("broken_image", "a.png is corrupt")))
    assert (image.reason, str(image)) == ("broken_image", "a.png is corrupt")
    media = pickle.loads(pickle.dumps(MissingMediaError(Path("a.png"), " (copy images/)")))
    assert (media.path, str(media)) == (Path("a.png"), "missing file a.png (copy images/)")
    ray = pickle.loads(pickle.dumps(RayExecutorError("a node died", exit_code=3)))
    assert (ray.exit_code, ray.message) == (3, "a node died")
    full = pickle.loads(pickle.dumps(DiskFullError("disk full while writing t1")))
    assert full.errno == errno.ENOSPC and disk_full(full) == "disk full while writing t1"
    assert full.hint and "free space" in str(full)


def test_exit_codes_and_the_public_name() -> None:
    assert (OK_EXIT, CRASH_EXIT, BAD_INPUT_EXIT, ITEMS_FAILED_EXIT) == (0, 1, 2, 3)
    assert tracetune.TracetuneError is TracetuneError
    from tracetune.runner import StageAborted, outcome

    assert outcome.ITEMS_FAILED_EXIT == ITEMS_FAILED_EXIT
    assert StageAborted("x").exit_code == ITEMS_FAILED_EXIT


def test_one_judge_reply_error_for_both_judges() -> None:
    from tracetune.evaluate import agentx
    from tracetune.models.replies import JudgeReplyError, MalformedOutput
    from tracetune.prefs import verifiers

    assert agentx.JudgeReplyError is verifiers.JudgeReplyError is JudgeReplyError
    assert issubclass(JudgeReplyError, MalformedOutput)
    with pytest.raises(JudgeReplyError, match="no JSON"):
        verifiers.parse_judge_reply("no object here", "best", 2)


# -- every error class --------------------------------------------------------------------------
def _exception_classes() -> list[type[BaseException]]:
    found: dict[str, type[BaseException]] = {}
    for info in pkgutil.walk_packages(tracetune.__path__, "tracetune."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, obj in vars(module).items():
            if (
                inspect.isclass(obj)
                and issubclass(obj, BaseException)
                and obj.__module__ == info.name  # defined here, not imported
                and not name.startswith("_")
            ):
                found[f"{info.name}.{name}"] = obj
    return list(found.values())


def test_every_public_error_class_is_a_tracetune_error_but_control_flow() -> None:
    classes = _exception_classes()
    names = {f"{c.__module__}.{c.__qualname__}" for c in classes}
    assert "tracetune.store.dataset.DatasetError" in names  # the walk did find the package
    assert len(classes) > 30
    stray = sorted(
        f"{c.__module__}.{c.__qualname__}"
        for c in classes
        if not issubclass(c, TracetuneError)
        and f"{c.__module__}.{c.__qualname__}" not in CONTROL_FLOW
    )
    assert not stray, (
        f"{stray} do not derive from tracetune.errors.TracetuneError: give them that base "
        "(keeping their builtin one), or add them to CONTROL_FLOW with the reason"
    )
    # the allow-list names control flow only: nothing on it is also a user error
    assert not [c for c in classes if issubclass(c, TracetuneError) and c.__name__ in {
        n.rsplit(".", 1)[1] for n in CONTROL_FLOW}]  # fmt: skip


def test_a_bad_tools_list_is_a_user_error_with_the_expected_shape_as_hint() -> None:
    from tracetune.models.toolcalls import validate_tools

    for tools, words in [
        ("calculator", "must be a list"),
        ([{"type": "function", "function": {"name": ""}}], r"tools\[0\]\.function needs"),
        ([{"type": "function", "function": {"name": "f", "parameters": []}}], "JSON schema"),
    ]:
        with pytest.raises(TracetuneError, match=words) as caught:
            validate_tools(tools)
        assert isinstance(caught.value, ValueError)  # callers catching ValueError still do
        assert caught.value.hint and "'parameters'" in caught.value.hint
    assert validate_tools([{"function": {"name": "f"}}])[0]["function"]["parameters"] == {
        "type": "object",
        "properties": {},
    }


# -- the command line ---------------------------------------------------------------------------
def test_a_user_error_prints_message_and_hint_and_exits_2_without_a_traceback(
    tmp_path: Path,
) -> None:
    done = _run_cli(
        """
        import sys
        import tracetune.synth.programs as programs
        from tracetune.errors import ConfigError

        def listed():
            raise ConfigError("family 'chartz' is unknown", hint="run tasks programs --list")

        programs.registered_programs = listed
        sys.argv = ["tracetune", "tasks", "programs", "--list"]
        from tracetune.cli import main
        main()
        """,
        tmp_path,
    )
    assert done.returncode == BAD_INPUT_EXIT, done.stderr
    lines = done.stderr.strip().splitlines()
    assert lines == ["error: family 'chartz' is unknown", "hint: run tasks programs --list"]
    assert "Traceback" not in done.stderr


def test_a_real_bad_input_exits_2_with_one_message(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    done = subprocess.run(
        [sys.executable, "-m", "tracetune.cli", "tasks", "stats", str(missing)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == BAD_INPUT_EXIT, done.stderr
    assert done.stderr.startswith("error: ") and str(missing) in done.stderr
    assert "Traceback" not in done.stderr


def test_a_bug_exits_1_with_its_traceback_not_as_a_user_error(tmp_path: Path) -> None:
    done = _run_cli(
        """
        import sys
        import tracetune.synth.programs as programs

        def listed():
            return {}["x"]  # a KeyError inside our own code: a bug

        programs.registered_programs = listed
        sys.argv = ["tracetune", "tasks", "programs", "--list"]
        from tracetune.cli import main
        main()
        """,
        tmp_path,
    )
    assert done.returncode == CRASH_EXIT, done.stderr
    assert "Traceback" in done.stderr and "KeyError" in done.stderr
    assert "error: 'x'" not in done.stderr


def test_an_aborted_stage_exits_3_with_its_hint(tmp_path: Path) -> None:
    done = _run_cli(
        """
        import sys
        import tracetune.synth.programs as programs
        from tracetune.runner import StageAborted

        def listed():
            raise StageAborted("programs aborted: 4 of 4 items failed")

        programs.registered_programs = listed
        sys.argv = ["tracetune", "tasks", "programs", "--list"]
        from tracetune.cli import main
        main()
        """,
        tmp_path,
    )
    assert done.returncode == ITEMS_FAILED_EXIT, done.stderr
    assert done.stderr.startswith("error: programs aborted: 4 of 4 items failed\nhint: ")
    assert "rerun" in done.stderr and "Traceback" not in done.stderr


def _bad_inputs(tmp_path: Path) -> dict[str, list[str]]:
    from tracetune.schema import Task
    from tracetune.store import Dataset

    plain = tmp_path / "plain"
    Dataset.create(plain, Task).write_all([Task(id="t", query="no gold answer")])
    missing, out = str(tmp_path / "missing.jsonl"), str(tmp_path / "out")
    return {
        "agent run": ["agent", "run", "--model", "openai:x", "--tasks", missing, "--out", out],
        "rollout": ["rollout", "--tasks", str(plain), "--out", out],
        "tools run": ["tools", "run", "teleport"],
        "model init-tiny": [
            "model",
            "init-tiny",
            "--arch",
            "llava",
            "--out",
            out,
            "--image-size",
            "30",
        ],  # fmt: skip
        "prefs stats": ["prefs", "stats", str(plain)],
        "data check": ["data", "check", str(tmp_path / "nowhere")],
        "tasks stats": ["tasks", "stats", str(tmp_path / "nowhere")],
    }


@pytest.mark.parametrize(
    "command",
    [
        "agent run",
        "rollout",
        "tools run",
        "model init-tiny",
        "prefs stats",
        "data check",
        "tasks stats",
    ],  # fmt: skip
)
def test_bad_input_to_each_command_group_is_one_error_line_and_exit_2(
    command: str, tmp_path: Path
) -> None:
    from typer.testing import CliRunner

    from tracetune.cli import app

    result = CliRunner().invoke(app, _bad_inputs(tmp_path)[command])
    assert result.exit_code == BAD_INPUT_EXIT, result.output
    assert isinstance(result.exception, SystemExit)  # not an exception escaping the command
    assert result.output.startswith("error: ") and "Traceback" not in result.output
