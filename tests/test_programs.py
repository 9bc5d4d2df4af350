"""Task programs: generation, determinism, gold rollouts with the real tools, lazy teachers."""

from __future__ import annotations

import asyncio
import io
import json
import random
import re
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from tracetune.cli.rollout import rollout as rollout_command
from tracetune.cli.tasks import app as tasks_app
from tracetune.rollout import (
    GoldTeacher,
    RolloutConfig,
    Thoughts,
    code_for,
    find_value,
    rollout_summary,
    run_rollout,
)
from tracetune.schema import GoldAnswer, Task, ToolCall, Trajectory, Verdict
from tracetune.store import AssetStore, Dataset
from tracetune.synth.programs import (
    GoldStep,
    ProgramError,
    ProgramFile,
    TaskDraft,
    get_program,
    number_of,
    program,
    registered_programs,
)
from tracetune.synth.programs.generate import ProgramsConfig, generate_tasks
from tracetune.synth.programs.render import png_bytes
from tracetune.synth.programs.retrieval import corpus_documents, corpus_path
from tracetune.testing import ScriptedChatModel
from tracetune.tools import Tool, ToolContext, ToolResult, get_tool, register_tool, to_result

runner = CliRunner()
BUILTIN = ["chart", "compare", "document", "faces", "form", "receipt", "retrieval", "sign", "table"]
N = 2 * len(BUILTIN)  # two tasks per family (run 200 by hand: bench/programs_throughput.py)

rollout_app = typer.Typer()
rollout_app.command()(rollout_command)


def said(result: Any) -> str:
    """CLI output with rich's line wrapping undone."""
    return " ".join(result.output.split())


def generate(out: Path, n: int = N, seed: int = 7, *extra: str) -> Dataset[Task]:
    result = runner.invoke(
        tasks_app,
        [
            "programs",
            "--out",
            str(out),
            "--n",
            str(n),
            "--seed",
            str(seed),
            "--families",
            ",".join(BUILTIN),
            "--quiet",
            *extra,
        ],
    )
    assert result.exit_code == 0, result.output
    return Dataset.open(out, Task)


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("programs") / "tasks"
    generate(out)
    return out


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "state.sqlite" and not p.name.startswith("state.sqlite")
    }


# -- generation ----------------------------------------------------------------------------
def test_builtin_programs_are_registered() -> None:
    programs = registered_programs()
    assert set(BUILTIN) <= set(programs)
    for name in BUILTIN:
        assert programs[name].tools and programs[name].description


def test_tasks_cover_every_family_with_readable_files(tasks_dir: Path) -> None:
    dataset = Dataset.open(tasks_dir, Task)
    tasks = dataset.records()
    assert len(tasks) == N
    assert sorted({t.metadata["family"] for t in tasks}) == BUILTIN
    for task in tasks:
        family = task.metadata["family"]
        assert task.provenance.source == f"program:{family}"
        assert isinstance(task.provenance.seed, int)
        assert task.gold is not None and task.gold.value
        assert len(task.gold_chain) >= 1
        assert {c.name for c in task.gold_chain} <= set(task.tools)
        assert len(task.metadata["gold_steps"]) == len(task.gold_chain)
        assert task.metadata["answer_from"]["op"] in ("number", "text", "count", "argmax", "argmin")
        assert task.files
        for ref in task.files:
            data = dataset.assets.read_bytes(ref)
            assert len(data) == ref.size
            if ref.is_image:
                with Image.open(io.BytesIO(data)) as img:
                    img.load()
                    assert img.size == (ref.width, ref.height)
                    assert min(img.size) >= 200
            elif ref.name.endswith(".pdf"):
                assert data.startswith(b"%PDF") and b"%%EOF" in data[-32:]
            else:
                with zipfile.ZipFile(io.BytesIO(data)) as archive:
                    assert archive.testzip() is None
    # several tool calls across the set, and more than one kind of answer
    assert max(len(t.gold_chain) for t in tasks) >= 3
    assert {t.gold.kind for t in tasks if t.gold} >= {"number", "text"}


def test_same_seed_gives_the_same_records_and_asset_bytes_and_other_seeds_differ(
    tasks_dir: Path, tmp_path: Path
) -> None:
    again = generate(tmp_path / "again")
    # Every asset byte for byte, and the same records in the same order. (Where the Parquet
    # chunks split is not compared: chunks also close on a timer, so a loaded machine splits
    # the same records differently.)
    assets = {k: v for k, v in _files(tasks_dir).items() if k.startswith("assets/")}
    assert (
        assets
        and {k: v for k, v in _files(tmp_path / "again").items() if k.startswith("assets/")}
        == assets
    )
    assert again.records() == Dataset.open(tasks_dir, Task).records()
    other = generate(tmp_path / "other", N, 8)
    first = Dataset.open(tasks_dir, Task)
    assert not first.ids() & other.ids()
    hashes = {f.sha256 for t in first for f in t.files}
    assert not hashes & {f.sha256 for t in other for f in t.files}
    assert [t.query for t in first] != [t.query for t in other]


def test_generation_resumes_and_extends(tasks_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "tasks"
    generate(out, 5)
    result = runner.invoke(
        tasks_app,
        [
            "programs",
            "--out",
            str(out),
            "--n",
            "7",
            "--seed",
            "7",
            "--families",
            ",".join(BUILTIN),
            "--quiet",
        ],
    )
    assert result.exit_code == 0 and "2 written, 5 already done" in said(result)
    # The first seven tasks of a seed do not depend on how many were asked for.
    assert Dataset.open(out, Task).ids() <= Dataset.open(tasks_dir, Task).ids()


def test_workers_render_the_same_tasks(tasks_dir: Path, tmp_path: Path) -> None:
    parallel = generate(tmp_path / "parallel", N, 7, "--workers", "2")
    assert parallel.records() == Dataset.open(tasks_dir, Task).records()


def test_stats(tasks_dir: Path) -> None:
    result = runner.invoke(tasks_app, ["stats", str(tasks_dir), "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.output)
    assert stats["tasks"] == N
    assert stats["families"] == {f: 2 for f in BUILTIN}
    assert stats["gold_chain_tools"]["ocr"] >= 10
    assert stats["images"]["count"] >= N and stats["images"]["width"]["min"] >= 200
    assert sum(stats["gold_chain_length"].values()) == N
    table = runner.invoke(tasks_app, ["stats", str(tasks_dir)])
    assert table.exit_code == 0 and "families" in said(table) and "receipt" in said(table)


def test_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    result = runner.invoke(
        tasks_app,
        ["programs", "--out", str(tmp_path / "x"), "--n", "2", "--families", "receipt,unicorns"],
    )
    assert result.exit_code == 2 and "unknown task program(s) unicorns" in said(result)
    result = runner.invoke(tasks_app, ["stats", str(tmp_path)])
    assert result.exit_code == 2 and "not a tracetune dataset" in said(result)
    listing = runner.invoke(tasks_app, ["programs", "--list"])
    assert listing.exit_code == 0 and "retrieval" in said(listing)


def test_the_bundled_corpus_matches_its_generator() -> None:
    lines = corpus_path().read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == corpus_documents()


# -- user programs -------------------------------------------------------------------------
@pytest.fixture
def registry() -> Iterator[None]:
    """Programs a test registers are gone afterwards."""
    from tracetune.synth.programs import base

    saved = dict(base._REGISTRY)
    try:
        yield
    finally:
        base._REGISTRY.clear()
        base._REGISTRY.update(saved)


def test_users_register_their_own_programs(tmp_path: Path, registry: None) -> None:
    from PIL import ImageDraw

    from tracetune.synth.programs.render import font

    @program("sticky_note", tools=["ocr", "calculator"])
    def sticky_note(rng: random.Random) -> TaskDraft:
        """A sticky note with two numbers to multiply."""
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        img = Image.new("RGB", (320, 160), (250, 240, 120))
        ImageDraw.Draw(img).text((30, 50), f"{a} x {b}", font=font("sans", 40), fill=(0, 0, 0))
        return TaskDraft(
            query="Multiply the two numbers on the note.",
            files=[ProgramFile("note.png", png_bytes(img))],
            steps=[
                GoldStep("ocr", {"image": "note.png"}, "read the note", expect=[str(a), str(b)]),
                GoldStep(
                    "calculator", {"expression": f"{a} * {b}"}, "multiply", expect_number=a * b
                ),
            ],
            answer=GoldAnswer(value=str(a * b), kind="number"),
            answer_from=number_of(1),
        )

    result, dataset = asyncio.run(
        generate_tasks(
            ProgramsConfig(out=tmp_path / "notes", n=3, families=["sticky_note"]),
            progress=False,
        )
    )
    assert result.written == 3
    task = dataset.records()[0]
    assert task.metadata["family"] == "sticky_note" and task.id.startswith("prog-sticky_note-")
    assert [c.name for c in task.gold_chain] == ["ocr", "calculator"]
    assert task.metadata["gold_steps"][0]["expect"] == task.gold_chain[1].arguments[
        "expression"
    ].split(" * ")

    @program("broken", tools=["ocr"])
    def broken(rng: random.Random) -> TaskDraft:
        """Calls a tool it does not declare."""
        return sticky_note(rng)

    with pytest.raises(ProgramError, match="calls 'calculator', which is not in its tools"):
        get_program("broken").draft(1)
    with pytest.raises(ProgramError, match="must be lowercase"):
        program("Bad Name", tools=["ocr"])


# -- gold rollouts with the real tools -----------------------------------------------------
@pytest.fixture(scope="module")
def gold_out(tasks_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("gold") / "gold"
    result = runner.invoke(
        rollout_app,
        ["--tasks", str(tasks_dir), "--out", str(out), "--teacher", "gold", "--json", "--quiet"],
    )
    assert result.exit_code == 0, result.output
    return out, json.loads(result.output[result.output.index("{") :])


@pytest.mark.slow
def test_gold_rollouts_reach_the_gold_answer(gold_out: tuple[Path, dict]) -> None:
    out, summary = gold_out
    assert summary["total"] == N
    assert summary["pass_rate"] >= 0.9, summary["failures"]
    kept = Dataset.open(out, Trajectory).records()
    verdicts = Dataset.open(out / "verdicts", Verdict).records()
    assert len(verdicts) == N and len(kept) == summary["passed"]
    by_target = {v.target_id: v for v in verdicts}
    for verdict in verdicts:
        if not verdict.passed:  # every miss names the tool output that diverged
            assert re.match(r"step \d+ \(\w+\)", verdict.reasons[0]), verdict.reasons
    for trajectory in kept:
        assert by_target[trajectory.id].passed
        task = trajectory.task
        calls = [s.action.tool_call for s in trajectory.steps[:-1]]
        assert [c.name for c in calls] == [c.name for c in task.gold_chain]
        assert trajectory.steps[-1].action.type == "final_answer"
        assert all(s.error is None and s.thought for s in trajectory.steps)
        assert trajectory.controller == "gold" and trajectory.status == "completed"
        # the answer comes from the executed outputs: the calculator's number, say
        recipe = task.metadata["answer_from"]
        if recipe["op"] == "number":
            shown = trajectory.steps[recipe["step"]].observation.text
            assert trajectory.final_answer in shown.replace(",", "")
    # the crop of the faces task went back as an image and was then read by OCR
    faces = [t for t in kept if t.task.metadata.get("variant") == "caption"]
    for trajectory in faces:
        assert trajectory.steps[1].observation.images


@pytest.mark.slow
def test_gold_rollout_resumes(gold_out: tuple[Path, dict], tasks_dir: Path) -> None:
    out, summary = gold_out
    again = runner.invoke(rollout_app, ["--tasks", str(tasks_dir), "--out", str(out), "--quiet"])
    assert again.exit_code == 0, again.output
    assert f"0 written, {N} already done" in said(again)
    assert rollout_summary(Dataset.open(out, Trajectory))["total"] == N


def test_thoughts_vary_between_tasks_and_repeat_for_a_seed() -> None:
    call = ToolCall(name="ocr", arguments={"image": "receipt.png"})
    firsts = {Thoughts(0, f"task-{i}").step(0, call, "read the receipt", None) for i in range(40)}
    assert len(firsts) >= 4
    assert all("read the receipt" in t for t in firsts)
    assert Thoughts(3, "t").step(0, call, "x", None) == Thoughts(3, "t").step(0, call, "x", None)


def test_code_rendering_of_gold_calls() -> None:
    variables: dict[int, str] = {}
    crop = code_for(
        ToolCall(name="image_crop", arguments={"image": "c.jpg", "box": [1, 2, 3, 4]}), 1, variables
    )
    read = code_for(
        ToolCall(name="ocr", arguments={"image": "image_crop_step1_0.png"}), 2, variables
    )
    assert crop == 'crop_1 = image_crop(image="c.jpg", box=[1, 2, 3, 4])\nprint(crop_1)'
    assert read == "text_2 = ocr(image=crop_1)\nprint(text_2)"


def test_find_value_is_strict_about_digits() -> None:
    assert find_value("TOTAL $1,234.50 paid", "1,234.50") == "1234.50"
    assert find_value("TOTAL 1234.50", "1,234.50") == "1234.50"
    assert find_value("item 12.50", "2.50") is None
    assert find_value("item 12.505", "12.50") is None
    assert find_value("3  X   bagel", "3 x Bagel") == "3 X bagel"


# -- broken tools show ---------------------------------------------------------------------
class _Garbling(Tool):
    """Wraps a real tool and garbles its digits, as a broken OCR model would."""

    def __init__(self, inner: Tool, garble: Any) -> None:
        super().__init__()
        self.inner = inner
        self.garble = garble
        self.name = inner.name
        self.description = inner.description
        self.parameters = inner.parameters
        self.output_type = inner.output_type

    def forward(self, ctx: ToolContext, **kwargs: Any) -> ToolResult:
        self.inner.ensure_ready()
        result = to_result(self.inner.forward(ctx, **kwargs))
        return ToolResult(text=self.garble(result.text))


def _first(dataset: Dataset[Task], family: str) -> Task:
    return next(t for t in dataset if t.metadata["family"] == family)


@pytest.mark.slow
def test_a_broken_tool_is_named_in_the_verdict(tasks_dir: Path, tmp_path: Path) -> None:
    dataset = Dataset.open(tasks_dir, Task)
    task = _first(dataset, "receipt")
    misread = str.maketrans("0123456789", "OlZEASbTBg")
    ocr = _Garbling(get_tool("ocr"), lambda t: t.translate(misread))
    tools = [ocr, get_tool("calculator"), get_tool("final_answer")]
    teacher = GoldTeacher(tools, "json")
    out = AssetStore(tmp_path / "out")
    trajectory, verdict = asyncio.run(teacher.run(task, dataset.assets, out, {}, "traj-x"))
    assert not verdict.passed
    first = verdict.reasons[0]
    assert first.startswith("step 0 (ocr) output lacks") and "closest read" in first
    assert "receipt.png" in first

    def off_by_one(text: str) -> str:
        return str(float(text) + 1)

    calc = _Garbling(get_tool("calculator"), off_by_one)
    teacher = GoldTeacher([get_tool("ocr"), calc, get_tool("final_answer")], "json")
    trajectory, verdict = asyncio.run(teacher.run(task, dataset.assets, out, {}, "traj-y"))
    assert not verdict.passed
    assert any(r.startswith("step 1 (calculator) returned") for r in verdict.reasons)
    assert any("off by 1" in r for r in verdict.reasons)  # the answer came from the tool


@pytest.fixture
def broken_ocr() -> Iterator[None]:
    real = get_tool("ocr")
    register_tool(_Garbling(real, lambda t: re.sub(r"\d", "8", t)))
    try:
        yield
    finally:
        register_tool(real)


@pytest.mark.slow
def test_failed_gold_rollouts_are_not_kept(
    tasks_dir: Path, tmp_path: Path, broken_ocr: None
) -> None:
    small = tmp_path / "receipts"
    dataset = Dataset.open(tasks_dir, Task)
    Dataset.create(small, Task).write_all(
        [t for t in dataset if t.metadata["family"] == "receipt"], sources=[dataset.assets]
    )
    result, out = asyncio.run(
        run_rollout(RolloutConfig(tasks=small, out=tmp_path / "gold"), progress=False)
    )
    assert result.written == 0 and result.dropped == 2
    assert result.drop_reasons == {"tool output diverged (ocr)": 2}
    assert len(out) == 0
    assert len(Dataset.open(out.root / "rejected", Trajectory)) == 2
    verdicts = Dataset.open(out.root / "verdicts", Verdict).records()
    assert len(verdicts) == 2 and not any(v.passed for v in verdicts)
    assert all(v.details["family"] == "receipt" for v in verdicts)


# -- model teachers: lazy ones are rejected, a faithful one is kept -------------------------
def _task_of(messages: list[dict[str, Any]], tasks: list[Task]) -> Task:
    text = next(p["text"] for p in messages[1]["content"] if p["type"] == "text")
    return next(t for t in tasks if text.startswith(t.query))


def _replayer(tasks: list[Task], final: Any) -> Any:
    """A scripted teacher that makes the gold calls, then answers ``final(task, last_obs)``."""

    def respond(messages: list[dict[str, Any]]) -> str:
        task = _task_of(messages, tasks)
        done = sum(m["role"] == "assistant" for m in messages)
        if done < len(task.gold_chain):
            call = task.gold_chain[done]
            args = json.dumps({"name": call.name, "arguments": call.arguments})
            return f"Thought: step {done}\nAction: {args}"
        last = messages[-1]["content"][-1]["text"]
        answer = final(task, last)
        action = {"name": "final_answer", "arguments": {"answer": answer}}
        return f"Thought: done\nAction: {json.dumps(action)}"

    return respond


def _wrong(task: Task) -> str:
    assert task.gold is not None
    if task.gold.kind == "number":
        return f"{float(task.gold.value) + 1:g}"
    return "Nowhere"


@pytest.mark.parametrize("lazy", ["guess", "gold_without_tools", "wrong_number"])
def test_lazy_teachers_are_rejected_on_every_task(
    tasks_dir: Path, tmp_path: Path, lazy: str
) -> None:
    dataset = Dataset.open(tasks_dir, Task)
    tasks = dataset.records()
    if lazy == "wrong_number":  # uses the tools properly, then reports a wrong number
        tasks = [t for t in tasks if t.metadata["family"] in ("receipt", "sign")]
        responder = _replayer(tasks, lambda task, obs: _wrong(task))
        small = tmp_path / "subset"
        Dataset.create(small, Task).write_all(tasks, sources=[dataset.assets])
        source = small
    else:

        def responder(messages: list[dict[str, Any]]) -> str:
            task = _task_of(messages, tasks)
            answer = "42" if lazy == "guess" else task.gold.value  # type: ignore[union-attr]
            return "Thought: I can tell from a glance.\nAction: " + json.dumps(
                {"name": "final_answer", "arguments": {"answer": answer}}
            )

        source = tasks_dir
    model = ScriptedChatModel(responder, spec=f"scripted:{lazy}")
    # A guess and a wrong number must fail the answer check itself, without the tool rule.
    result, out = asyncio.run(
        run_rollout(
            RolloutConfig(
                tasks=source,
                out=tmp_path / "out",
                teacher="scripted",
                concurrency=1,
                require_tools=lazy == "gold_without_tools",
            ),
            model=model,
            progress=False,
        )
    )
    assert len(out) == 0 and result.written == 0
    verdicts = Dataset.open(out.root / "verdicts", Verdict).records()
    assert len(verdicts) == len(tasks) and not any(v.passed for v in verdicts)
    for verdict in verdicts:
        if lazy == "gold_without_tools":
            assert verdict.reasons[0].startswith("never called")
        elif lazy == "wrong_number":
            assert any("off by 1" in r or "does not match" in r for r in verdict.reasons)
        else:
            assert verdict.details["extracted"] == "42"
            assert "42" not in {v.details["gold"] for v in verdicts}


@pytest.mark.slow
def test_a_faithful_model_teacher_is_kept(tasks_dir: Path, tmp_path: Path) -> None:
    dataset = Dataset.open(tasks_dir, Task)
    tasks = [t for t in dataset if t.metadata["family"] in ("receipt", "document")]
    small = tmp_path / "subset"
    Dataset.create(small, Task).write_all(tasks, sources=[dataset.assets])

    def from_calculator(task: Task, observation: str) -> str:
        return observation.removeprefix("Observation:").strip()

    model = ScriptedChatModel(_replayer(tasks, from_calculator), spec="scripted:faithful")
    result, out = asyncio.run(
        run_rollout(
            RolloutConfig(tasks=small, out=tmp_path / "out", teacher="scripted", concurrency=1),
            model=model,
            progress=False,
        )
    )
    assert result.written == len(tasks) == len(out)
    for trajectory in out:
        assert trajectory.controller == "scripted:faithful"
        assert trajectory.metadata["verdict"]["passed"]


def test_rollout_rejects_tasks_it_cannot_check(tmp_path: Path) -> None:
    Dataset.create(tmp_path / "plain", Task).write_all([Task(id="t", query="hi")])
    result = runner.invoke(
        rollout_app, ["--tasks", str(tmp_path / "plain"), "--out", str(tmp_path / "o"), "--quiet"]
    )
    assert result.exit_code == 2 and "no tasks with a gold answer" in said(result)
    no_chain = Task(id="t2", query="hi", gold=GoldAnswer(value="1"))
    Dataset.create(tmp_path / "nochain", Task).write_all([no_chain])
    result = runner.invoke(
        rollout_app,
        ["--tasks", str(tmp_path / "nochain"), "--out", str(tmp_path / "o2"), "--quiet"],
    )
    assert result.exit_code == 2 and "no gold tool chain" in said(result)
