"""Stage behaviour: malformed scenarios and failing file code are drops with reasons, the
query-file verifier repairs once, the trajectory verifier rejects with reasons, budgets stop
cleanly, and the image pool merges near-duplicates and captions with a VLM."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from mtrace_script import RECEIPT_QUERY, Script, config_yaml, write_seeds
from PIL import Image
from typer.testing import CliRunner

from tracetune.cli import app
from tracetune.schema import Task, Trajectory, Verdict
from tracetune.store import Dataset, RunState
from tracetune.synth.mtrace import Pool, PoolConfig, SynthConfig, build_pool, run_chain
from tracetune.synth.mtrace.common import Turns
from tracetune.synth.mtrace.pipeline import chain_stats
from tracetune.synth.mtrace.pool import BUNDLED_POOL_CAPTIONS, BUNDLED_POOL_IMAGES
from tracetune.testing.openai_server import ScriptedOpenAIServer

BROKEN = "Summarise the trip notes in the attached file."
RAISES = "What does the note about the garden say?"
REPAIR = "What is the total of the invoice in the picture?"
REPAIRED = "What is the total on the receipt in the photo?"
WRONG = "Tell me what the note about the picnic says."


class Judging(Script):
    """Rejects and repairs some tasks and trajectories, answers others malformed."""

    def route(self, text: str, body: dict[str, Any]) -> tuple[str, str]:
        if "You are checking a task written" in text and REPAIR in text:
            return "verify_task", json.dumps(
                {
                    "thought": "The image is a receipt, not an invoice.",
                    "relevant": "no",
                    "useful": "yes",
                    "obtainable": "yes",
                    "correct": "no",
                    "updated_query": REPAIRED,
                }
            )
        if "You are checking a task written" in text and "banana" in text:
            return "verify_task", "The task looks fine to me."  # no JSON verdict
        if "You are checking a worked example" in text and WRONG in text:
            return "verify_trajectory", json.dumps(
                {
                    "thought": "The answer does not come from the note.",
                    "correct": "no",
                    "problems": ["wrong_answer"],
                }
            )
        return super().route(text, body)


def _pool(tmp_path: Path) -> Path:
    out = tmp_path / "pool"
    asyncio.run(
        build_pool(
            PoolConfig(
                images=BUNDLED_POOL_IMAGES,
                captions=BUNDLED_POOL_CAPTIONS,
                out=out,
                embedder="hashing",
            ),
            progress=False,
        )
    )
    return out


def _config(tmp_path: Path, base_url: str, **extra: Any) -> SynthConfig:
    seeds = tmp_path / "seeds.jsonl"
    write_seeds(seeds)
    data = yaml.safe_load(
        config_yaml(
            str(tmp_path / "run"), base_url, str(_pool(tmp_path)), str(seeds), embedder="hashing"
        )
    )
    for key, value in extra.items():
        if isinstance(value, dict):
            data.setdefault(key, {}).update(value)
        else:
            data[key] = value
    return SynthConfig.model_validate(data)


def _reasons(run: Path) -> dict[str, dict[str, int]]:
    return {r.stage: r.drop_reasons for r in chain_stats(run)}


def test_malformed_files_and_verdicts_drop_with_reasons_and_never_stop_the_run(
    tmp_path: Path,
) -> None:
    plan = [
        [
            {"query": RECEIPT_QUERY, "tools": ["visual_qa", "inspect_file"]},
            {"query": BROKEN, "tools": ["inspect_file"]},
            {"query": RAISES, "tools": ["inspect_file"]},
            {"query": REPAIR, "tools": ["visual_qa"]},
            {
                "query": "How many bananas are listed in the attached note?",
                "tools": ["inspect_file"],
            },
            {"query": WRONG, "tools": ["inspect_file"]},
        ]
    ]
    script = Judging(queries=plan, broken_scenario_for=(BROKEN,))  # type: ignore[arg-type]
    with ScriptedOpenAIServer(script) as srv:
        config = _config(tmp_path, srv.base_url)
        results = asyncio.run(run_chain(config, progress=False))
    assert [r.stopped for r in results] == [None] * 6
    run = tmp_path / "run"
    reasons = _reasons(run)
    assert reasons["files"] == {"malformed scenario": 1}
    assert reasons["verify_tasks"] == {"malformed verdict": 1}
    assert reasons["verify_trajectories"] == {"trajectory verifier: wrong_answer": 1}
    files_state = RunState(run / "tasks" / "state.sqlite")
    (info,) = [i for _, s, i in files_state.items("files") if s == "dropped"]
    assert "expected a JSON object" in info["error"] and info["output"].startswith("{")

    # The repaired task went on with the judge's rewrite; both verdicts are records.
    verified = {t.query: t for t in Dataset.open(run / "verified", Task)}
    assert REPAIR not in verified and REPAIRED in verified
    assert verified[REPAIRED].metadata["original_query"] == REPAIR
    rounds = [v["details"]["round"] for v in verified[REPAIRED].metadata["verdicts"]]
    assert rounds == [1, 2]
    verdicts = Dataset.open(run / "verified" / "verdicts", Verdict).records()
    first = next(v for v in verdicts if v.details["query"] == REPAIR)
    assert not first.passed and first.reasons == ["The image is a receipt, not an invoice."]
    # The rejected trajectory's verdict is a record with the judge's reasons.
    rejected = [v for v in Dataset.open(run / "final" / "verdicts", Verdict) if not v.passed]
    assert [v.reasons[0] for v in rejected] == ["wrong_answer"]
    final = Dataset.open(run / "final", Trajectory).records()
    assert sorted(t.task.query for t in final) == sorted([RECEIPT_QUERY, RAISES, REPAIRED])


def test_file_code_that_raises_is_retried_then_dropped(tmp_path: Path) -> None:
    plan = [
        [
            {"query": RAISES, "tools": ["inspect_file"]},
            {"query": RECEIPT_QUERY, "tools": ["visual_qa", "inspect_file"]},
        ]
    ]
    script = Script(queries=plan, raising_code_for=("notes.txt",))  # type: ignore[arg-type]
    with ScriptedOpenAIServer(script) as srv:
        config = _config(tmp_path, srv.base_url)
        results = asyncio.run(run_chain(config, progress=False))
        code_requests = [
            r for r in srv.requests if any("creates the file `notes.txt`" in t for t in r.texts())
        ]
    assert results[-1].written == 1
    run = tmp_path / "run"
    assert _reasons(run)["files"] == {"file code failed": 1}
    (info,) = [
        i for _, s, i in RunState(run / "tasks" / "state.sqlite").items("files") if s == "dropped"
    ]
    assert info["file"] == "notes.txt" and "RuntimeError: cannot draw this file" in info["error"]
    # The retry showed the model its error.
    assert len(code_requests) == 2
    assert any("Your previous script failed" in t for t in code_requests[1].texts())


class WrongFiles(Script):
    """File code that writes the wrong thing: text named .xlsx (fixed on the rewrite), and a
    PDF put in a sub-folder instead of the current directory (every time)."""

    def code(self, text: str) -> str:
        if "budget.xlsx" in text and "Your previous script failed" not in text:
            return "```python\nopen('budget.xlsx', 'w').write('groceries,40')\n```"
        if "weather_report.pdf" in text:
            return (
                "```python\nimport os\nos.makedirs('reports', exist_ok=True)\n"
                "open('reports/weather_report.pdf', 'wb').write(b'%PDF-1.4')\n```"
            )
        return super().code(text)


def test_file_of_the_wrong_type_or_place_is_refused_with_its_reason(tmp_path: Path) -> None:
    with ScriptedOpenAIServer(WrongFiles()) as srv:
        config = _config(tmp_path, srv.base_url)
        results = asyncio.run(run_chain(config, progress=False))
        xlsx_requests = [
            r for r in srv.requests if any("creates the file `budget.xlsx`" in t for t in r.texts())
        ]
    assert results[2].written == 1 and results[2].drop_reasons == {"file code failed": 1}
    # The text file named .xlsx was refused, and the rewrite was shown why.
    assert len(xlsx_requests) == 2
    assert any("budget.xlsx is not a xlsx file" in t for t in xlsx_requests[1].texts())
    (task,) = Dataset.open(tmp_path / "run" / "tasks", Task).records()
    xlsx = next(f for f in task.files if f.name == "budget.xlsx")
    assert Dataset.open(tmp_path / "run" / "tasks", Task).assets.read_bytes(xlsx)[:2] == b"PK"
    (info,) = [
        i
        for _, s, i in RunState(tmp_path / "run" / "tasks" / "state.sqlite").items("files")
        if s == "dropped"
    ]
    assert info["file"] == "weather_report.pdf"
    assert info["error"] == (
        "the script ran but did not create weather_report.pdf in the current directory "
        "(it created: reports/weather_report.pdf)"
    )


def test_check_file_refuses_links_and_wrong_contents(tmp_path: Path) -> None:
    from tracetune.synth.mtrace.files import check_file

    work = tmp_path / "work"
    work.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("host data")

    def made(name: str, data: bytes) -> Path:
        (work / name).write_bytes(data)
        return work / name

    (work / "link.txt").symlink_to(secret)
    assert "is a link" in str(check_file(work / "link.txt", "txt", work))
    import os

    os.link(secret, work / "hard.txt")
    assert "hard link" in str(check_file(work / "hard.txt", "txt", work))
    assert "empty" in str(check_file(made("e.csv", b""), "csv", work))
    assert "not a PDF" in str(check_file(made("a.pdf", b"hello"), "pdf", work))
    assert "not a PNG" in str(check_file(made("c.png", b"GIF89a"), "chart", work))
    assert "not valid JSON" in str(check_file(made("d.json", b"{'a': 1}"), "json", work))
    assert "not UTF-8" in str(check_file(made("t.txt", b"\xff\xfe\x00"), "txt", work))
    import zipfile

    with zipfile.ZipFile(work / "w.docx", "w") as z:
        z.writestr("[Content_Types].xml", "<Types/>")
        z.writestr("xl/workbook.xml", "<workbook/>")
    assert "lacks" in str(check_file(work / "w.docx", "docx", work))
    assert check_file(work / "w.docx", "xlsx", work) is None
    assert check_file(made("ok.json", b'{"a": 1}'), "json", work) is None
    assert check_file(made("ok.pdf", b"%PDF-1.7\n"), "pdf", work) is None


def test_budget_stops_the_chain_cleanly_and_a_rerun_goes_on(tmp_path: Path) -> None:
    with ScriptedOpenAIServer(Script()) as srv:
        config = _config(tmp_path, srv.base_url, max_total_tokens=600)
        results = asyncio.run(run_chain(config, progress=False))
        assert results[-1].stopped and "token budget reached" in results[-1].stopped
        assert len(results) < 6
        # The stop reports the run's spend against the run's limit, not one stage's share.
        spent = re.search(r"\((\d+) >= (\d+)\)", results[-1].stopped)
        assert spent and spent.group(2) == "600" and int(spent.group(1)) >= 600
        assert int(spent.group(1)) <= sum(
            r.usage.total_tokens for r in chain_stats(tmp_path / "run")
        )
        # The same budget again: nothing more is spent, and it says why.
        calls = srv.calls
        again = asyncio.run(run_chain(config, progress=False))
        assert srv.calls == calls and "token budget reached" in str(again[-1].stopped)
        resumed = config.model_copy(update={"max_total_tokens": None})
        results = asyncio.run(run_chain(resumed, progress=False))
    assert [r.stopped for r in results] == [None] * 6
    assert len(Dataset.open(tmp_path / "run" / "final", Trajectory)) == 2


def test_time_budget_is_the_whole_commands(tmp_path: Path) -> None:
    """--max-time counts from the command's start (the config), not from each stage's."""
    with ScriptedOpenAIServer(Script()) as srv:
        config = _config(tmp_path, srv.base_url, max_time=0.2)
        time.sleep(0.3)  # spent before the chain starts: no stage may start an item
        results = asyncio.run(run_chain(config, progress=False))
        assert len(results) == 1 and "time budget reached" in str(results[0].stopped)
        assert srv.calls == 0 and results[0].written == 0
        fresh = _config(tmp_path, srv.base_url, max_time="10m")
        results = asyncio.run(run_chain(fresh, progress=False))
    assert [r.stopped for r in results] == [None] * 6
    assert len(Dataset.open(tmp_path / "run" / "final", Trajectory)) == 2


def test_pool_merges_near_duplicates_and_captions_with_a_vlm(tmp_path: Path) -> None:
    images = tmp_path / "images"
    shutil.copytree(BUNDLED_POOL_IMAGES, images)
    with Image.open(images / "receipt.png") as img:  # a resized, recompressed copy
        img.convert("RGB").resize((img.width // 2, img.height // 2)).save(
            images / "receipt_copy.jpg", quality=70
        )
    Image.new("RGB", (64, 48), "#3a7d44").save(images / "green.png")  # no caption given
    runner = CliRunner()
    missing = runner.invoke(
        app,
        [
            "pool",
            "build",
            "--images",
            str(images),
            "--captions",
            str(BUNDLED_POOL_CAPTIONS),
            "--out",
            str(tmp_path / "p0"),
            "--embedder",
            "hashing",
            "--quiet",
        ],
    )
    assert missing.exit_code == 2 and "green.png" in missing.output
    assert "--captioner" in missing.output
    with ScriptedOpenAIServer(lambda body: "A plain green rectangle.") as srv:
        built = runner.invoke(
            app,
            [
                "pool",
                "build",
                "--images",
                str(images),
                "--captions",
                str(BUNDLED_POOL_CAPTIONS),
                "--out",
                str(tmp_path / "pool"),
                "--captioner",
                "openai:test-model",
                "--base-url",
                srv.base_url,
                "--embedder",
                "hashing",
                "--quiet",
            ],
        )
        assert built.exit_code == 0, built.output
        assert srv.calls == 1 and len(srv.requests[0].image_urls()) == 1
        # A rebuild answers the caption from the pool's response cache: no new request.
        again = runner.invoke(
            app,
            [
                "pool",
                "build",
                "--images",
                str(images),
                "--captions",
                str(BUNDLED_POOL_CAPTIONS),
                "--out",
                str(tmp_path / "pool"),
                "--captioner",
                "openai:test-model",
                "--base-url",
                srv.base_url,
                "--embedder",
                "hashing",
                "--quiet",
            ],
        )
        assert again.exit_code == 0 and srv.calls == 1
    said = " ".join(built.output.split())
    assert "7 images" in said and "1 near-duplicates merged" in said
    pool = Pool.load(tmp_path / "pool")
    by_source = {e.source: e for e in pool.entries}
    assert by_source["receipt.png"].merged == ["receipt_copy.jpg"]
    assert by_source["green.png"].caption == "A plain green rectangle."
    assert pool.embeddings.shape == (7, 1024)
    assert pool.ranked("a plain green rectangle")[0][0].source == "green.png"


def test_pool_build_reports_unreadable_and_foreign_files_and_goes_on(tmp_path: Path) -> None:
    images = tmp_path / "images"
    shutil.copytree(BUNDLED_POOL_IMAGES, images)
    (images / "broken.png").write_text("not an image")
    (images / "notes.xyz").write_text("hello")
    (images / "scan.pdf").write_bytes(bytes(range(256)) * 8)  # no PDF inside
    result = CliRunner().invoke(
        app,
        [
            "pool",
            "build",
            "--images",
            str(images),
            "--captions",
            str(BUNDLED_POOL_CAPTIONS),
            "--out",
            str(tmp_path / "pool"),
            "--embedder",
            "hashing",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "6 images, 0 documents" in said and "skipped 3 file(s)" in said
    assert "broken.png: not a readable image" in said
    assert "notes.xyz: not an image or a supported document (.xyz)" in said
    assert "scan.pdf: not a readable document" in said
    pool = Pool.load(tmp_path / "pool")
    assert len(pool.entries) == 6
    assert [s.source for s in pool.skipped] == ["broken.png", "notes.xyz", "scan.pdf"]
    (tmp_path / "only").mkdir()
    (tmp_path / "only" / "a.png").write_text("x")
    nothing = CliRunner().invoke(
        app, ["pool", "build", "--images", str(tmp_path / "only"), "--out", str(tmp_path / "p2")]
    )
    assert nothing.exit_code == 2 and "no file of" in nothing.output


def test_turns_release_items_in_order() -> None:
    async def main() -> list[str]:
        turns = Turns(["a", "b", "c"])
        seen: list[str] = []

        async def item(key: str, delay: float) -> None:
            await asyncio.sleep(delay)
            await turns.wait(key)
            seen.append(key)
            await turns.done(key)

        await asyncio.gather(item("c", 0.0), item("b", 0.01), item("a", 0.03))
        return seen

    assert asyncio.run(main()) == ["a", "b", "c"]


def test_missing_pool_and_models_are_clear_errors(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"out: {tmp_path / 'run'}\ngenerator: openai:x\n")
    result = CliRunner().invoke(app, ["synth", "run", str(config), "--quiet"])
    assert result.exit_code == 2 and "needs a judge model" in " ".join(result.output.split())
    config.write_text(
        f"out: {tmp_path / 'run'}\ngenerator: openai:x\njudge: openai:x\n"
        "rollout: {teacher: openai:x}\nqueries: {seeds: s.jsonl}\n"
        f"files: {{pool: {tmp_path / 'nopool'}}}\n"
    )
    result = CliRunner().invoke(app, ["synth", "run", str(config), "--quiet"])
    assert result.exit_code == 2 and "is not an image pool" in " ".join(result.output.split())
    config.write_text(f"out: {tmp_path / 'run'}\nqueries: {{batchez: 3}}\n")
    result = CliRunner().invoke(app, ["synth", "run", str(config)])
    assert result.exit_code == 2 and "batchez" in result.output
    config.write_text(f"out: {tmp_path / 'run'}\nqueries: [\n")
    result = CliRunner().invoke(app, ["synth", "run", str(config)])
    assert result.exit_code == 2 and "is not valid YAML" in " ".join(result.output.split())


def test_rollout_stage_json_actions_with_samples(tmp_path: Path) -> None:
    with ScriptedOpenAIServer(Script()) as srv:
        config = _config(
            tmp_path,
            srv.base_url,
            rollout={"action_format": "json", "samples": 2, "temperature": 0.9},
        )
        results = asyncio.run(run_chain(config, progress=False))
        seeds = sorted(
            {
                r.body.get("seed")
                for r in srv.requests
                if "one call per turn" in str(r.messages[0].get("content"))
            }
        )
    assert [r.stopped for r in results] == [None] * 6
    final = Dataset.open(tmp_path / "run" / "final", Trajectory).records()
    assert len(final) == 4 and {t.action_format for t in final} == {"json"}
    assert sorted(t.metadata["sample"] for t in final) == [0, 0, 1, 1]
    assert seeds == [0, 1]  # each sample its own request (and cache entry)
    assert {t.steps[0].action.tool_call.name for t in final} == {"inspect_file"}  # type: ignore[union-attr]
    assert {t.sampling["temperature"] for t in final} == {0.9}


def test_every_synth_and_pool_command_has_help() -> None:
    runner = CliRunner()
    for command in [
        ["synth", "queries"],
        ["synth", "files"],
        ["synth", "verify-tasks"],
        ["synth", "rollout"],
        ["synth", "verify-trajectories"],
        ["synth", "run"],
        ["synth", "stats"],
        ["pool", "build"],
    ]:
        result = runner.invoke(app, [*command, "--help"])
        assert result.exit_code == 0, (command, result.output)
        assert "Usage" in result.output and len(result.output) > 300


@pytest.mark.parametrize("bits", [0, 4, 7, 9])
def test_hash_index_finds_what_a_full_scan_finds(bits: int) -> None:
    import random

    from tracetune.synth.mtrace.pool import _HashIndex

    rng = random.Random(bits)
    index, codes = _HashIndex(bits), []
    for _ in range(800):
        code = rng.choice(codes) if codes and rng.random() < 0.4 else rng.getrandbits(64)
        for _ in range(rng.randint(0, 10)):
            code ^= 1 << rng.randrange(64)
        near = next((c for c in codes if bin(c ^ code).count("1") <= bits), None)
        found = index.find(code)
        assert (found["code"] if found else None) == near
        if found is None:
            index.add(code, {"code": code})
            codes.append(code)


def test_stage_commands_one_by_one_and_rerun_skips_done_work(tmp_path: Path) -> None:
    runner = CliRunner()
    with ScriptedOpenAIServer(Script()) as srv:
        config = _config(tmp_path, srv.base_url)
        path = tmp_path / "synth.yaml"
        path.write_text(yaml.safe_dump(json.loads(config.model_dump_json())))
        for command in (
            ["queries"],
            ["files"],
            ["verify-tasks"],
            ["rollout"],
            ["verify-trajectories"],
        ):
            result = runner.invoke(app, ["synth", *command, "--config", str(path), "--quiet"])
            assert result.exit_code == 0, (command, result.output)
        calls = srv.calls
        again = runner.invoke(app, ["synth", "files", "--config", str(path), "--quiet"])
        assert again.exit_code == 0 and "0 written, 2 already done" in again.output
        assert srv.calls == calls  # nothing asked again
    assert len(Dataset.open(tmp_path / "run" / "final", Trajectory)) == 2


def test_trajectory_verifier_checks_gold_answers_exactly(tmp_path: Path) -> None:
    from tracetune.schema import Action, GoldAnswer, Observation, Step
    from tracetune.synth.mtrace.verify import verify_trajectories

    trajectories: Dataset[Trajectory] = Dataset.create(
        tmp_path / "run" / "trajectories", Trajectory
    )
    image = trajectories.assets.put_file(BUNDLED_POOL_IMAGES / "receipt.png")
    task = Task(
        id="task-gold",
        query="What is the receipt's total?",
        files=[image],
        tools=["ocr"],
        gold=GoldAnswer(value="36.69", kind="number"),
    )
    rows = []
    for answer in ("36.69", "35.00", None):
        steps = [
            Step(
                index=0,
                raw="...",
                thought="Read it.",
                action=Action(type="code", code="print(ocr(image='receipt.png'))"),
                observation=Observation(text="TOTAL 36.69"),
            )
        ]
        if answer is not None:
            steps.append(
                Step(
                    index=1,
                    raw="...",
                    thought="Done.",
                    action=Action(type="code", code=f"final_answer({answer!r})", answer=answer),
                    observation=Observation(),
                )
            )
        rows.append(
            Trajectory(
                id=f"traj-{answer}",
                task=task,
                controller="openai:t",
                action_format="code",
                tools=["ocr", "final_answer"],
                steps=steps,
                final_answer=answer,
                status="completed" if answer else "max_steps",
            )
        )
    trajectories.write_all(rows)
    with ScriptedOpenAIServer(Script()) as srv:
        config = SynthConfig(
            out=tmp_path / "run", judge="openai:test-model", backend={"base_url": srv.base_url}
        )  # type: ignore[arg-type]
        asyncio.run(verify_trajectories(config, progress=False))
        judged = [r for r in srv.requests if any("worked example" in t for t in r.texts())]
    assert [t.id for t in Dataset.open(tmp_path / "run" / "final", Trajectory)] == ["traj-36.69"]
    assert len(judged) == 1 and len(judged[0].image_urls()) == 1  # only the gold-correct one
    assert _reasons(tmp_path / "run")["verify_trajectories"] == {
        "wrong answer (gold check)": 1,
        "no final answer": 1,
    }
    verdicts = {
        v.target_id: v for v in Dataset.open(tmp_path / "run" / "final" / "verdicts", Verdict)
    }
    assert verdicts["traj-35.00"].judge == "gold" and not verdicts["traj-35.00"].passed
    assert verdicts["traj-None"].judge == "rules"


def test_query_file_verdict_needs_all_three_checks_to_pass(tmp_path: Path) -> None:
    from tracetune.judge.query_files import verify_task
    from tracetune.store import AssetStore
    from tracetune.testing.scripted import ScriptedChatModel

    assets = AssetStore(tmp_path)
    task = Task(
        id="t",
        query="What is the total?",
        files=[assets.put_file(BUNDLED_POOL_IMAGES / "receipt.png")],
        tools=["ocr"],
    )

    def judged(**fields: str) -> Verdict:
        answer = {"thought": "Looks fine.", "correct": "yes", "updated_query": "", **fields}
        model = ScriptedChatModel([json.dumps(answer)])
        return asyncio.run(verify_task(task, task.query, assets, model, verdict_id="v"))

    assert judged(relevant="yes", useful="yes", obtainable="yes").passed
    inconsistent = judged(relevant="no", useful="yes", obtainable="yes")
    assert not inconsistent.passed and inconsistent.details["relevant"] is False
    assert inconsistent.reasons == ["Looks fine.", "judged correct, but not relevant"]


def test_stats_table_keeps_stage_names_whole_on_an_80_column_terminal() -> None:
    from rich.console import Console

    from tracetune.runner.stats import StageStats, stats_table
    from tracetune.schema import Usage

    names = ["queries.generate", "queries.filter", "files", "verify_tasks", "verify_trajectories"]
    rows = [
        StageStats(
            stage=n,
            directory="d",
            done=1834,
            dropped=166,
            records=1834,
            usage=Usage(prompt_tokens=1_000_000, completion_tokens=234_567, cost_usd=12.3456),
        )
        for n in names
    ]
    console = Console(width=80, record=True)
    console.print(stats_table(rows, title="runs/mtrace"))
    text = console.export_text()
    assert "…" not in text
    lines = text.splitlines()
    for name in names:
        (line,) = [ln for ln in lines if ln.startswith(name + " ")]
        assert "1834 (92%)" in line and "1,234,567" in line and "$12.3456" in line


@pytest.mark.parametrize("repair", [True, False])
def test_rejected_task_is_repaired_once_then_dropped_with_both_verdicts(
    tmp_path: Path, repair: bool
) -> None:
    from tracetune.synth.mtrace.verify import verify_tasks

    tasks: Dataset[Task] = Dataset.create(tmp_path / "run" / "tasks", Task)
    image = tasks.assets.put_file(BUNDLED_POOL_IMAGES / "receipt.png")
    tasks.write_all([Task(id="t1", query="What is the invoice number?", files=[image])])

    def judge(body: dict[str, Any]) -> str:  # every query is rejected, with a rewrite
        from mtrace_script import text_of

        query = re.search(r"Query: (.*)", text_of(body)).group(1)  # type: ignore[union-attr]
        return json.dumps(
            {
                "thought": f"No invoice number is visible for: {query}",
                "correct": "no",
                "updated_query": query + " (on the receipt)",
            }
        )

    with ScriptedOpenAIServer(judge) as srv:
        config = SynthConfig(
            out=tmp_path / "run",
            judge="openai:test-model",
            backend={"base_url": srv.base_url},  # type: ignore[arg-type]
            verify_tasks={"repair": repair},  # type: ignore[arg-type]
        )
        result = asyncio.run(verify_tasks(config, progress=False))
        asked = srv.calls
    reason = "rejected after repair" if repair else "rejected by query-file verifier"
    assert result.drop_reasons == {reason: 1} and asked == (2 if repair else 1)
    assert len(Dataset.open(tmp_path / "run" / "verified", Task)) == 0
    verdicts = sorted(
        Dataset.open(tmp_path / "run" / "verified" / "verdicts", Verdict),
        key=lambda v: v.details["round"],
    )
    expected = ["What is the invoice number?"]
    if repair:
        expected.append("What is the invoice number? (on the receipt)")
    assert [v.details["query"] for v in verdicts] == expected
    assert all(not v.passed and v.reasons[0].startswith("No invoice number") for v in verdicts)
    (info,) = [
        i
        for _, s, i in RunState(tmp_path / "run" / "verified" / "state.sqlite").items(
            "verify_tasks"
        )
        if s == "dropped"
    ]
    assert info["why"] == verdicts[-1].reasons


def test_failure_threshold_aborts_a_stage_with_the_first_errors(tmp_path: Path) -> None:
    verified: Dataset[Task] = Dataset.create(tmp_path / "run" / "verified", Task)
    image = verified.assets.put_file(BUNDLED_POOL_IMAGES / "receipt.png")
    verified.write_all(
        [
            Task(id=f"t{i}", query=f"What is line {i} of the receipt?", files=[image])
            for i in range(3)
        ]
    )
    config = tmp_path / "c.yaml"
    config.write_text(
        f"out: {tmp_path / 'run'}\nmax_failures: 1\nmax_failure_rate: 0.5\n"
        "backend: {base_url: 'http://127.0.0.1:9/v1', max_retries: 0}\n"
        "rollout: {teacher: 'openai:test-model'}\nqueries: {tools: [ocr]}\n"
    )
    result = CliRunner().invoke(
        app, ["synth", "rollout", "--config", str(config), "--concurrency", "1", "--quiet"]
    )
    said = " ".join(result.output.split())
    assert result.exit_code == 3 and "rollout aborted: 2 of 2 items failed" in said
    assert "BackendError" in said and "Connection error" in said
    # The failures are in the run state, for `synth stats` (a rerun retries them).
    (row,) = chain_stats(tmp_path / "run")
    assert row.failed == 2 and row.done == 0 and len(row.failures) == 2


def test_trajectory_judge_sees_the_images_steps_returned_after_the_tasks(tmp_path: Path) -> None:

    from tracetune.judge.trajectory import verify_trajectory
    from tracetune.schema import Action, Observation, Step, ToolCall
    from tracetune.testing import ScriptedChatModel
    from tracetune.tools import get_tool

    trajectories: Dataset[Trajectory] = Dataset.create(tmp_path / "t", Trajectory)
    photo = trajectories.assets.put_image(Image.new("RGB", (40, 20), "white"), "photo.png")
    crop = trajectories.assets.put_image(Image.new("RGB", (10, 10), "red"), "crop.png")
    task = Task(id="t", query="What colour is the corner?", files=[photo], tools=["image_crop"])
    call = ToolCall(name="image_crop", arguments={"image": "photo.png", "box": [0, 0, 10, 10]})
    steps = [
        Step(
            index=0,
            action=Action(type="tool_call", tool_call=call),
            observation=Observation(text="cropped", images=[crop]),
        ),
        Step(index=1, action=Action(type="final_answer", answer="red")),
    ]
    trajectory = Trajectory(
        id="traj", task=task, controller="x", steps=steps, final_answer="red", tools=["image_crop"]
    )
    seen: list[list[dict[str, Any]]] = []

    def judge(messages: list[dict[str, Any]]) -> str:
        seen.append(messages[0]["content"])
        return '{"thought": "the crop is red", "correct": "yes", "problems": []}'

    verdict = asyncio.run(
        verify_trajectory(
            trajectory,
            [get_tool("image_crop")],
            [trajectories.assets],
            ScriptedChatModel(judge),
            verdict_id="v",
        )
    )
    assert verdict.passed
    (content,) = seen
    images = [part["image"] for part in content if part["type"] == "image"]
    assert images == [trajectories.assets.path(photo), trajectories.assets.path(crop)]
    assert (
        "Images this step returned (shown after the task's images, in this order): crop.png"
        in (content[-1]["text"])
    )
    # the cap counts every image: with one allowed, only the task's reaches the judge
    seen.clear()
    asyncio.run(
        verify_trajectory(
            trajectory,
            [],
            [trajectories.assets],
            ScriptedChatModel(judge),
            verdict_id="v",
            max_images=1,
        )
    )
    assert sum(part["type"] == "image" for part in seen[0]) == 1
    assert "crop.png" not in seen[0][-1]["text"]


def test_python_docx_file_code_runs_in_the_sandbox_and_reads_back(tmp_path: Path) -> None:
    """The file-code prompt asks for python-docx for .docx files: such code must run in the
    file sandbox, pass the file checks, and read back through the real inspect_file (a
    hand-built package of three parts did not: markitdown found no body element)."""
    from tracetune.prompts import render
    from tracetune.sandbox import Sandbox, SandboxLimits, ToolReply
    from tracetune.synth.mtrace.files import CODE_PRELUDE, check_bytes, normalize_file
    from tracetune.tools import get_tool

    prompt = render(
        "mtrace/file_code.jinja",
        file_name="memo.docx",
        file_type="docx",
        file_content="a memo",
        error=None,
    )
    assert "python-docx" in prompt and "zipfile" not in prompt
    code = (
        "import docx\n"
        "d = docx.Document()\n"
        "d.add_heading('Budget memo', level=1)\n"
        "d.add_paragraph('Groceries: 40 dollars.')\n"
        "d.save('memo.docx')\n"
    )

    async def no_tools(name: str, arguments: dict[str, object]) -> ToolReply:
        return ToolReply(error="no tools")

    async def make() -> bytes:
        workdir = tmp_path / "work"
        workdir.mkdir()
        limits = SandboxLimits(timeout_s=60.0)
        async with await Sandbox.start(workdir, [], no_tools, limits) as sandbox:
            result = await sandbox.execute(CODE_PRELUDE + code)
        assert result.error is None, result.error
        return (workdir / "memo.docx").read_bytes()

    data = normalize_file(asyncio.run(make()))
    assert check_bytes("memo.docx", data, "docx") is None
    tool = get_tool("inspect_file")
    tool.ensure_ready()
    markdown = tool.to_markdown(Path("memo.docx"), data)  # type: ignore[attr-defined]
    assert "# Budget memo" in markdown and "Groceries: 40 dollars." in markdown
