"""CLI plumbing shared by every command: YAML configs with flags laid over them."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from pydantic import BaseModel, Field

from tracetune.cli.common import build_config, split_names


class Section(BaseModel):
    a: int = 1
    b: str = "x"


class Config(BaseModel):
    out: str
    n: int = 3
    tools: list[str] = Field(default_factory=list)
    section: Section = Field(default_factory=Section)


def test_flags_override_yaml_and_nested_flags_merge_into_their_section(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("out: from-yaml\nn: 5\nsection:\n  a: 7\n  b: kept\n")
    cfg = build_config(Config, path, out="from-flag", n=None, tools=[], section={"a": 9, "b": None})
    assert cfg.out == "from-flag" and cfg.n == 5 and cfg.tools == []
    assert cfg.section == Section(a=9, b="kept")  # one nested flag keeps the section's rest
    assert build_config(Config, None, out="o", section={"a": None}).section == Section()


def test_bad_config_files_fail_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(typer.Exit):
        build_config(Config, tmp_path / "missing.yaml", out="o")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(typer.Exit):
        build_config(Config, tmp_path / "list.yaml", out="o")
    with pytest.raises(typer.Exit):
        build_config(Config, None, n="many")  # no out, and n is not an int


def test_split_names() -> None:
    assert split_names(" ocr, calculator ,,") == ["ocr", "calculator"]
    assert split_names(None) is None and split_names("") is None


def test_an_error_of_the_whole_config_is_printed_without_an_empty_field_name(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from pydantic import model_validator

    class Pair(BaseModel):
        low: int
        high: int

        @model_validator(mode="after")
        def ordered(self) -> Pair:
            if self.low > self.high:
                raise ValueError("low must not exceed high")
            return self

    with pytest.raises(typer.Exit):
        build_config(Pair, None, low=3, high=1)
    printed = " ".join(capsys.readouterr().err.split())
    assert "invalid Pair: low must not exceed high" in printed and " : " not in printed


def test_an_aborted_stage_exits_3_with_its_reason_and_no_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import tracetune.cli as cli
    import tracetune.synth.programs as programs
    from tracetune.runner import StageAborted

    def aborted(*args: object, **kwargs: object) -> None:
        raise StageAborted("agent aborted: 3 of 3 items failed. First failures: t0: down")

    # raised inside a real command, so it passes through the root group like a stage's abort
    monkeypatch.setattr(programs, "registered_programs", aborted)
    monkeypatch.setattr("sys.argv", ["tracetune", "tasks", "programs", "--list"])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    err = " ".join(capsys.readouterr().err.split())
    assert exit_.value.code == 3
    assert "3 of 3 items failed" in err and "rerun" in err and "Traceback" not in err
