"""The Python API: `import tracetune` exposes the main entry points lazily, and every example
of docs/python.md runs as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tracetune

DOC = Path(__file__).resolve().parents[1] / "docs" / "python.md"


def test_every_exported_name_resolves_without_importing_torch_up_front() -> None:
    code = (
        "import sys, tracetune\n"
        "assert 'torch' not in sys.modules, 'import tracetune pulled in torch'\n"
        "names = [n for n in tracetune.__all__ if n != '__version__']\n"
        "missing = [n for n in names if getattr(tracetune, n, None) is None]\n"
        "assert not missing, missing\n"
        "print(len(names))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) == len(tracetune.__all__) - 1
    assert set(tracetune.__all__) - {"__version__"} == set(tracetune._EXPORTS)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tracetune.nope  # noqa: B018


@pytest.mark.slow  # task programs, gold rollouts with OCR, a tiny agent, two SFT steps
def test_the_python_guide_runs_as_written(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 5
    script = tmp_path / "guide.py"
    script.write_text("\n".join(blocks))
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert "2 steps, losses" in done.stdout
    assert (tmp_path / "work" / "sft" / "config.json").is_file()
