"""The whole M-TRACE chain against the real loopback OpenAI server with scripted answers."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from pathlib import Path

import pytest
from mtrace_script import RAIN_QUERY, RECEIPT_QUERY, Script, config_yaml, write_seeds
from typer.testing import CliRunner

from tracetune.cli import app
from tracetune.schema import Task, Trajectory, Verdict
from tracetune.store import Dataset
from tracetune.synth.mtrace import Pool, PoolConfig, build_pool
from tracetune.synth.mtrace.pool import BUNDLED_POOL_CAPTIONS, BUNDLED_POOL_IMAGES
from tracetune.testing.openai_server import ScriptedOpenAIServer

pytestmark = pytest.mark.slow  # ~15 s: the packaged MiniLM embedder loads once (~8 s)


@pytest.fixture(scope="module")
def bundled_pool(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pool")
    config = PoolConfig(images=BUNDLED_POOL_IMAGES, captions=BUNDLED_POOL_CAPTIONS, out=out)
    asyncio.run(build_pool(config, progress=False))
    return out


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_chain_produces_verified_trajectories_with_pool_images_xlsx_and_pdf(
    tmp_path: Path, bundled_pool: Path
) -> None:
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds)
    script = Script()
    runner = CliRunner()
    with ScriptedOpenAIServer(script) as srv:
        config = tmp_path / "synth.yaml"
        config.write_text(
            config_yaml(str(tmp_path / "run"), srv.base_url, str(bundled_pool), str(seeds))
        )
        result = runner.invoke(app, ["synth", "run", str(config), "--quiet"])
        assert result.exit_code == 0, result.output
        requests = list(srv.requests)

    run = tmp_path / "run"
    final: list[Trajectory] = sorted(Dataset.open(run / "final", Trajectory), key=lambda t: t.id)
    assert {t.task.query for t in final} == {RECEIPT_QUERY, RAIN_QUERY}

    bundled = {_sha(p): p.name for p in BUNDLED_POOL_IMAGES.iterdir()}
    by_query = {t.task.query: t for t in final}
    receipt, rain = by_query[RECEIPT_QUERY], by_query[RAIN_QUERY]
    # Images were retrieved by caption embedding, top-1, from the bundled pool.
    assert [bundled.get(f.sha256) for f in receipt.task.images] == ["receipt.png"]
    assert [bundled.get(f.sha256) for f in rain.task.images] == ["rainfall_chart.png"]
    # The other files were written by model code run in the sandbox: a real xlsx and pdf.
    assets = Dataset.open(run / "final", Trajectory).assets
    xlsx = next(f for f in receipt.task.files if f.name.endswith(".xlsx"))
    pdf = next(f for f in rain.task.files if f.name.endswith(".pdf"))
    assert "spreadsheetml" in xlsx.mime and pdf.mime == "application/pdf"
    import openpyxl
    from markitdown import MarkItDown

    sheet = openpyxl.load_workbook(io.BytesIO(assets.read_bytes(xlsx))).active
    assert [list(r) for r in sheet.iter_rows(values_only=True)][1] == ["groceries", 40]
    assert "January rainfall: 78 mm" in MarkItDown().convert(str(assets.path(pdf))).markdown
    assert assets.read_bytes(pdf).startswith(b"%PDF")

    # The teacher's code ran the real tools in the sandbox: the xlsx read back as markdown.
    assert receipt.action_format == "code"
    assert "groceries" in receipt.steps[0].observation.text  # type: ignore[union-attr]
    assert receipt.final_answer == "yes, 36.69 is within the 40 budget"
    # Verdicts are kept on the records and as records, with prompt hashes.
    verdict = Verdict.model_validate(receipt.metadata["verdicts"][-1])
    assert verdict.passed and verdict.prompt_hash and verdict.judge == "openai:test-model"
    assert len(Dataset.open(run / "final" / "verdicts", Verdict)) == 2
    task_verdicts = Dataset.open(run / "verified" / "verdicts", Verdict).records()
    assert len(task_verdicts) == 2 and all(v.target_kind == "task" for v in task_verdicts)
    tasks = Dataset.open(run / "tasks", Task).records()
    assert all(
        t.provenance.prompt_hash and t.provenance.extra["prompt_hashes"]["file_code"] for t in tasks
    )
    candidates = Dataset.open(run / "candidates", Task).records()
    assert all(c.provenance.prompt_hash for c in candidates)

    # Both judges saw the images as images, not as names.
    def images_in(marker: str) -> list[int]:
        return [len(r.image_urls()) for r in requests if any(marker in t for t in r.texts())]

    assert images_in("You are checking a task written") == [1, 1]
    # ... and the documents as markdown: the xlsx's cells and the pdf's text.
    shown = "\n".join(
        t for r in requests for t in r.texts() if "You are checking a task written" in t
    )
    assert "| groceries | 40 |" in shown and "January rainfall: 78 mm" in shown
    assert images_in("You are checking a worked example") == [1, 1]
    # The teacher saw the task's image too; the generator sampled at temperature 1.
    teacher = [r for r in requests if "calls tools" in str(r.messages[0].get("content"))]
    assert teacher and all(len(r.image_urls()) >= 1 for r in teacher)
    generator = next(r for r in requests if any("practice tasks" in t for t in r.texts()))
    assert generator.body["temperature"] == 1.0

    stats = runner.invoke(app, ["synth", "stats", str(run), "--json"])
    assert stats.exit_code == 0, stats.output
    rows = {r["stage"]: r for r in json.loads(stats.output)}
    assert list(rows) == [
        "queries.generate",
        "queries.filter",
        "files",
        "verify_tasks",
        "rollout",
        "verify_trajectories",
    ]
    assert rows["verify_trajectories"]["done"] == 2 and rows["files"]["records"] == 2
    assert rows["rollout"]["usage"]["calls"] >= 4
    text = runner.invoke(app, ["synth", "stats", str(run)])
    assert "verified trajectories: 2" in text.output


def test_pool_loads_and_ranks_by_caption(bundled_pool: Path) -> None:
    pool = Pool.load(bundled_pool)
    assert len(pool.entries) == 6 and pool.embeddings.shape == (6, 384)
    best, _ = pool.ranked("a street sign that forbids parking during the day")[0]
    assert best.source == "parking_sign.png"
    best, _ = pool.ranked("a photo of a person in a space suit")[0]
    assert best.source == "portrait.jpg"
