"""Every task-program family makes tasks that its own tools solve.

A task program knows its answer by construction; the gold teacher replays the program's
tool chain with the real tools (OCR, face detection, file conversion, retrieval) and the
task passes only when every step's output shows the values the program expects and the
final answer matches. A family whose renders the tools misread drops tasks silently in
``rollout``, so each family is rolled out here on 50 tasks (task seeds drawn from run seed
1) and every one must pass. Slow: OCR dominates (see bench/RESULTS.md for timings).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tracetune.rollout import RolloutConfig, run_rollout
from tracetune.schema import Verdict
from tracetune.store import Dataset
from tracetune.synth.programs import registered_programs
from tracetune.synth.programs.generate import ProgramsConfig, generate_tasks

TASKS_PER_FAMILY = 50


def test_chart_category_names_read_clear_of_their_ticks() -> None:
    """A tick mark touching a centred "l" made OCR read "Malmo" as "Maimo" (the chart of
    task seed 6 below, drawn before category ticks were dropped)."""
    import io
    import random

    import numpy as np
    from PIL import Image

    from tracetune.synth.programs.charts import bar_chart
    from tracetune.tools import get_tool

    labels = ["Madrid", "Dublin", "Malmo", "Verona", "Bergen", "Nantes", "Vienna"]
    png = bar_chart(
        random.Random(6), "Energy use", labels, [623, 849, 789, 840, 653, 812, 709], "kWh", False
    )
    ocr = get_tool("ocr")
    ocr.ensure_ready()
    image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    read = " ".join(ocr.engine(image, use_cls=False).txts)  # type: ignore[attr-defined]
    assert [name for name in labels if name not in read] == []


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(registered_programs()))
def test_family_gold_rollout_passes_on_50_seeds(family: str, tmp_path: Path) -> None:
    tasks, out = tmp_path / "tasks", tmp_path / "gold"
    config = ProgramsConfig(out=tasks, n=TASKS_PER_FAMILY, seed=1, families=[family])
    asyncio.run(generate_tasks(config, progress=False))
    asyncio.run(run_rollout(RolloutConfig(tasks=tasks, out=out, concurrency=2), progress=False))
    verdicts = Dataset.open(out / "verdicts", Verdict).records()
    assert len(verdicts) == TASKS_PER_FAMILY
    failed = {v.target_id: v.reasons for v in verdicts if not v.passed}
    assert not failed, failed
