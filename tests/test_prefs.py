"""Pref-X: isolated candidates, step verifiers (gold and LLM judges), pairs and their stats.

Policies are scripted (logic tests); tools, the sandbox and the judge's HTTP are real.
"""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from typer.testing import CliRunner

from tracetune.cli import app
from tracetune.models.base import ChatMessage, load_model
from tracetune.prefs import (
    BuildConfig,
    ExploreConfig,
    bleu,
    parse_judge_reply,
    prefs_stats,
    run_build,
    run_explore,
)
from tracetune.prefs.verifiers import JudgeReplyError
from tracetune.schema import FileRef, Task, Trajectory
from tracetune.store import Dataset
from tracetune.testing import ScriptedChatModel
from tracetune.testing.openai_server import ScriptedOpenAIServer


def code(source: str, thought: str = "next") -> str:
    return f"Thought: {thought}\nCode:\n```py\n{source.strip()}\n```"


def steps_so_far(messages: list[ChatMessage]) -> int:
    return sum(1 for m in messages if m["role"] == "assistant")


def last_text(messages: list[ChatMessage]) -> str:
    content = messages[-1]["content"]
    return content if isinstance(content, str) else content[-1]["text"]


def task_dir(root: Path, tasks: list[Task], images: dict[str, Image.Image]) -> Path:
    ds = Dataset.create(root, Task)
    refs = {name: ds.assets.put_image(img, name) for name, img in images.items()}
    ds.write_all([t.model_copy(update={"files": [refs[f.name] for f in t.files]}) for t in tasks])
    return root


# -- isolation: the reference's shared-interpreter bug cannot happen --------------------------
def test_each_of_k_candidates_runs_on_its_own_fork_of_the_prefix_state(tmp_path: Path) -> None:
    """K=4 code candidates mutate the same variables differently; each observation shows only
    its own change, the chosen branch's state carries on, and the judge saw everything."""
    photo = Image.new("RGB", (32, 32), "purple")
    ref = Dataset.create(tmp_path / "tmp", Task).assets.put_image(photo, "photo.png")
    counter = Task(
        id="counter", query="Bump the counter.", tools=["calculator", "image_crop"], files=[ref]
    )
    tasks = task_dir(tmp_path / "tasks", [counter], {"photo.png": photo})
    bumps = iter(range(1, 100))

    def policy(messages: list[ChatMessage]) -> str:
        step = steps_so_far(messages)
        if step == 0:
            return code(
                "counter = 10\nitems = []\nopen('log.txt', 'w').write('0')\n"
                "corner = image_crop(image='photo.png', box=[0, 0, 8, 8])\n"
                "print('ready', counter)",
                "set up",
            )
        if step == 1:
            d = next(bumps)
            return code(
                f"counter += {d}\nitems.append({d})\n"
                'doubled = calculator(expression=f"{counter} * 2")\n'
                f"with open('log.txt', 'a') as f:\n    f.write('{d}')\n"
                "print(counter, items, doubled, open('log.txt').read())",
                f"bump by {d}",
            )
        return code("final_answer(f\"{counter} {open('log.txt').read()}\")", "done")

    def judge(body: dict[str, Any]) -> str:
        text = json.dumps(body["messages"])
        k = text.count("## Candidate")
        if "bump by" in text:  # step 2: prefer the third candidate
            return json.dumps(
                {
                    "thought": "3 is best",
                    "ranking": [3, 1, 2, 4][:k] if k == 4 else list(range(1, k + 1)),
                    "reasons": ["r"] * k,
                }
            )
        return json.dumps({"thought": "any", "ranking": list(range(1, k + 1))})

    with ScriptedOpenAIServer(judge) as srv:
        config = ExploreConfig(
            tasks=tasks,
            out=tmp_path / "explored",
            policy="scripted",
            verifier="llm-rank",
            judge="openai:judge",
            k=4,
            action_format="code",
            max_steps=4,
        )
        result, explored = asyncio.run(
            run_explore(
                config,
                policy=ScriptedChatModel(policy),
                judge=load_model("openai:judge", base_url=srv.base_url),
                progress=False,
            )
        )
        requests = list(srv.requests)
    assert result.written == 1
    (trajectory,) = list(explored)
    first, second, last = trajectory.metadata["exploration"]
    assert first["candidates"][0]["step"]["observation"]["text"].startswith("ready 10\n[image")
    observed = [c["step"]["observation"]["text"] for c in second["candidates"]]
    # Each candidate started from counter=10, items=[] and log.txt holding "0": one shared
    # interpreter and directory would have printed 11, 13, 16, 20, growing lists and logs.
    assert observed == ["11 [1] 22 01", "12 [2] 24 02", "13 [3] 26 03", "14 [4] 28 04"]
    calls = [c["step"]["observation"]["data"]["tool_calls"] for c in second["candidates"]]
    assert [c[0]["arguments"]["expression"] for c in calls] == [
        f"{n} * 2" for n in (11, 12, 13, 14)
    ]
    # Temperatures follow the schedule: one low, K-1 high.
    assert [c["temperature"] for c in second["candidates"]] == [0.7, 1.2, 1.2, 1.2]
    # The judge's choice (candidate 3) was committed, and its state carried on.
    assert second["chosen"] == 2 and second["ranking"]["order"] == [2, 0, 1, 3]
    assert trajectory.final_answer == "13 03" and trajectory.status == "completed"
    assert "13 [3] 26 03" in trajectory.steps[1].observation.text
    # The judge saw the task image as an image, and all candidates with their observations.
    step2 = next(r for r in requests if "bump by" in json.dumps(r.messages))
    # ... and the prefix's crop: images as images, not names.
    assert len(step2.image_urls()) == 2 and step2.image_urls()[0].startswith("data:image/png")
    assert "(output of step 1)" in "\n".join(step2.texts())
    shown = "\n".join(step2.texts())
    assert all(o in shown for o in observed) and "ready 10" in shown
    assert trajectory.metadata["judge_prompt_hash"]


def test_json_candidates_saving_images_of_one_name_each_keep_their_own(tmp_path: Path) -> None:
    """JSON tools name saved images by tool and step only: two candidates' crops are both
    ``image_crop_step0_0.png``. The chosen candidate's next step must read its own crop,
    not the one the last-run candidate left in the shared directory."""
    photo = Image.new("RGB", (32, 16), "red")
    photo.paste(Image.new("RGB", (16, 16), "blue"), (16, 0))
    ref = Dataset.create(tmp_path / "tmp", Task).assets.put_image(photo, "photo.png")
    crop = Task(id="crop", query="Crop the left half.", tools=["image_crop"], files=[ref])
    tasks = task_dir(tmp_path / "tasks", [crop], {"photo.png": photo})
    boxes = iter([[0, 0, 16, 16], [16, 0, 32, 16]] * 5)  # left (red), right (blue)

    def policy(messages: list[ChatMessage]) -> str:
        step = steps_so_far(messages)
        if step == 0:
            return act("image_crop", "crop", image="photo.png", box=next(boxes))
        if step == 1:
            return act("image_crop", "corner", image="image_crop_step0_0.png", box=[0, 0, 4, 4])
        return act("final_answer", "done", answer="red")

    def judge(body: dict[str, Any]) -> str:  # keeps sampling order: candidate 1 (red) wins
        k = json.dumps(body["messages"]).count("## Candidate")
        return json.dumps({"thought": "t", "ranking": list(range(1, k + 1))})

    with ScriptedOpenAIServer(judge) as srv:
        config = ExploreConfig(
            tasks=tasks,
            out=tmp_path / "ex",
            policy="scripted",
            verifier="llm-rank",
            judge="openai:judge",
            k=2,
            max_steps=3,
        )
        _, explored = asyncio.run(
            run_explore(
                config,
                policy=ScriptedChatModel(policy),
                judge=load_model("openai:judge", base_url=srv.base_url),
                progress=False,
            )
        )
    (trajectory,) = list(explored)
    first = trajectory.metadata["exploration"][0]
    assert first["chosen"] == 0 and len(first["candidates"]) == 2
    colours = []
    for candidate in first["candidates"]:
        (image,) = candidate["step"]["observation"]["images"]
        colours.append(Image.open(explored.assets.path(FileRef(**image))).getpixel((1, 1)))
    assert colours == [(255, 0, 0), (0, 0, 255)]
    # The committed branch cropped its own (red) image at step 1, not candidate 2's blue one.
    (corner,) = trajectory.steps[1].observation.images
    assert Image.open(explored.assets.path(corner)).convert("RGB").getpixel((1, 1)) == (255, 0, 0)


def test_branches_of_one_task_run_one_at_a_time_even_when_started_together(
    tmp_path: Path,
) -> None:
    """The working-directory snapshots rely on one branch running at a time: that is
    enforced (a lock), so branches started concurrently still see only their own files."""
    from tracetune.agent.loop import Agent
    from tracetune.prefs.base import apply_step, close_branch, fork_episode, track_files
    from tracetune.tools import load_tools

    store = Dataset.create(tmp_path / "tasks", Task)
    task = Task(id="files", query="Write a file.", tools=["calculator"])
    listing = (
        "import os, time\nopen('{n}.txt', 'w').write('{n}')\ntime.sleep(0.3)\n"
        "print(sorted(f for f in os.listdir('.') if f.endswith('.txt')))"
    )

    async def main() -> list[str]:
        agent = Agent(ScriptedChatModel(["unused"]), load_tools(["calculator"]), "code")
        root = await agent.start(task, store.assets, store.assets)
        workspace = track_files(root)
        branches = [await fork_episode(root) for _ in range(3)]
        try:
            runs = [
                apply_step(b, code(listing.format(n=n)))
                for b, n in zip(branches, "abc", strict=True)
            ]
            steps = await asyncio.gather(*runs)
            # Each branch goes on from its own files.
            again = await apply_step(branches[0], code("print(open('a.txt').read())"))
            return [s.observation.text for s in steps] + [again.observation.text]
        finally:
            for branch in branches:
                await close_branch(branch)
            await root.close()
            workspace.cleanup()

    assert asyncio.run(main()) == ["['a.txt']", "['b.txt']", "['c.txt']", "a"]


def test_branch_snapshots_link_files_a_branch_left_alone_and_copy_what_it_changed(
    tmp_path: Path,
) -> None:
    """Hundreds of branches per task must not copy its files each time: an unchanged file
    is one inode across snapshots; one rewritten in place (same size) is the branch's own."""
    import os

    from tracetune.agent.loop import Agent
    from tracetune.prefs.base import (
        _SNAPSHOTS,
        apply_step,
        close_branch,
        fork_episode,
        track_files,
    )
    from tracetune.tools import load_tools

    store = Dataset.create(tmp_path / "tasks", Task)
    Image.new("RGB", (64, 64), "green").save(tmp_path / "photo.png")
    photo = store.assets.put_file(tmp_path / "photo.png", name="photo.png")
    task = Task(id="files", query="Edit the notes.", tools=["calculator"], files=[photo])
    read = code("print(open('notes.txt').read())")

    async def main() -> None:
        agent = Agent(ScriptedChatModel(["unused"]), load_tools(["calculator"]), "code")
        root = await agent.start(task, store.assets, store.assets)
        workspace = track_files(root)
        await apply_step(root, code("open('notes.txt', 'w').write('aaaa')\nprint('ok')"))
        edits, keeps = [await fork_episode(root) for _ in range(2)]
        try:
            edit = code("open('notes.txt', 'w').write('bbbb')\nprint('ok')")
            seen = [(await apply_step(edits, edit)).observation.text]
            seen += [(await apply_step(b, read)).observation.text for b in (keeps, edits)]
            assert seen == ["ok", "aaaa", "bbbb"]
            first, changed, untouched = (_SNAPSHOTS[e][1] for e in (root, edits, keeps))
            ino = {
                (s, n): os.stat(s / n).st_ino
                for s in (first, changed, untouched)
                for n in ("notes.txt", "photo.png")
            }
            assert len({ino[s, "photo.png"] for s in (first, changed, untouched)}) == 1
            assert ino[untouched, "notes.txt"] == ino[first, "notes.txt"]
            assert ino[changed, "notes.txt"] != ino[first, "notes.txt"]
            assert (changed / "notes.txt").read_text() == "bbbb"
            assert (first / "notes.txt").read_text() == "aaaa"
        finally:
            for branch in (edits, keeps):
                await close_branch(branch)
            await root.close()
            workspace.cleanup()

    asyncio.run(main())


# -- the judge's reply parsing ---------------------------------------------------------------
def test_judge_replies_are_parsed_or_rejected_with_the_reason() -> None:
    assert parse_judge_reply('{"best": 2}', "best", 3)[0] == [0.0, 1.0, 0.0]
    assert parse_judge_reply('ok {"ranking": [2, 3, 1]}', "rank", 3)[0] == [1.0, 3.0, 2.0]
    assert parse_judge_reply('{"scores": [1, 9.5]}', "score", 2)[0] == [1.0, 9.5]
    with pytest.raises(JudgeReplyError, match="from 1 to 3"):
        parse_judge_reply('{"best": 4}', "best", 3)
    with pytest.raises(JudgeReplyError, match="every candidate"):
        parse_judge_reply('{"ranking": [1, 1, 2]}', "rank", 3)
    with pytest.raises(JudgeReplyError, match="0 to 10"):
        parse_judge_reply('{"scores": [1, 11]}', "score", 2)
    with pytest.raises(JudgeReplyError, match="no JSON"):
        parse_judge_reply("candidate two", "best", 2)


def test_bleu_measures_text_overlap() -> None:
    a = 'Thought: read it\nAction: {"name": "ocr", "arguments": {"image": "receipt.png"}}'
    assert bleu(a, a) == pytest.approx(1.0)
    assert bleu("I think the answer is 7.", a) < 0.3 < bleu(a.replace("read it", "look"), a)


# -- the gold verifier on task programs -------------------------------------------------------
class SamplingPolicy(ScriptedChatModel):
    """Scripted candidates when sampling (temperature > 0), a scripted greedy policy at 0."""

    def __init__(self, candidates: Any, greedy: Any) -> None:
        super().__init__(greedy, spec="scripted-policy")
        self.candidates = candidates

    async def generate(self, messages, *, n=1, sampling=None, tools=None):  # type: ignore[no-untyped-def]
        from tracetune.models.base import Completion, Generation, Sampling

        sampling = sampling or Sampling()
        if sampling.temperature == 0:
            return await super().generate(messages, n=n, sampling=sampling, tools=tools)
        self.calls.append({"messages": messages, "n": n, "sampling": sampling})
        texts = [self.candidates(messages, sampling.temperature) for _ in range(n)]
        return Generation([Completion(t, "stop") for t in texts])


def act(name: str, thought: str = "next", **arguments: Any) -> str:
    return f"Thought: {thought}\nAction: " + json.dumps({"name": name, "arguments": arguments})


@pytest.fixture(scope="module")
def receipt_tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tracetune.cli.common import run_async
    from tracetune.synth.programs.generate import ProgramsConfig, generate_tasks

    out = tmp_path_factory.mktemp("programs") / "tasks"
    run_async(generate_tasks(ProgramsConfig(out=out, n=1, seed=3, families=["receipt"])))
    return out


def receipt_policy(task: Task) -> SamplingPolicy:
    """Step 0: the gold OCR call (4 times). Step 1: a correct, a wrong-tool, a wrong-argument
    and a premature-answer candidate. Step 2: the answer. Greedy: follows the gold chain."""
    ocr_call, calc_call = task.gold_chain
    gold_expr = calc_call.arguments["expression"]
    wrong_expr = gold_expr.replace("-", "+") if "-" in gold_expr else gold_expr + " + 1"
    step1 = iter(
        [
            act("calculator", "compute it", expression=gold_expr),
            act("ocr", "read it again", image=ocr_call.arguments["image"]),
            act("calculator", "compute it", expression=wrong_expr),
            act("final_answer", "I can tell already", answer=task.gold.value),
        ]
        * 10
    )

    def greedy(messages: list[ChatMessage]) -> str:
        previous = messages[-2]["content"] if len(messages) > 2 else ""
        if '"calculator"' in previous:
            number = re.findall(r"-?\d+(?:\.\d+)?", last_text(messages))[0]
            return act("final_answer", "that is it", answer=number)
        if '"ocr"' in previous:
            return act("calculator", "compute it", expression=gold_expr)
        return act("ocr", "read it", **ocr_call.arguments)

    def candidates(messages: list[ChatMessage], temperature: float) -> str:
        step = steps_so_far(messages)
        if step == 1:
            return next(step1)
        return greedy(messages)

    return SamplingPolicy(candidates, greedy)


@pytest.mark.slow  # real OCR on every candidate's fork (about 6 s)
def test_gold_verifier_ranks_the_correct_step_first_and_judge_agreement_is_reported(
    receipt_tasks: Path, tmp_path: Path
) -> None:
    (task,) = Dataset.open(receipt_tasks, Task).records()
    temperatures = [0.7, 1.2, 1.2, 1.2]
    gold_cfg = ExploreConfig(
        tasks=receipt_tasks,
        out=tmp_path / "gold",
        policy="scripted",
        verifier="gold",
        k=4,
        temperatures=temperatures,
        max_steps=4,
    )
    _, explored = asyncio.run(run_explore(gold_cfg, policy=receipt_policy(task), progress=False))
    (trajectory,) = list(explored)
    assert trajectory.status == "completed" and trajectory.final_answer is not None
    step1 = trajectory.metadata["exploration"][1]
    ranking = step1["ranking"]
    correct, wrong_tool, wrong_arg, premature = ranking["scores"]
    assert correct == 10.0 and correct > wrong_tool > wrong_arg > premature
    assert ranking["order"] == [0, 1, 2, 3] and step1["chosen"] == 0
    reasons = ranking["reasons"]
    assert "reaches the gold answer" in reasons[0]
    assert "calls ocr where the gold chain calls calculator" in reasons[1]
    assert "returned" in reasons[2] and "does not reach" in reasons[2]
    assert "answers before the gold chain is done" in reasons[3]
    checks = ranking["details"]["checks"]
    assert checks[1]["reaches_gold"] and not checks[2]["reaches_gold"]  # greedy completions
    # Same calls ran once: OCR x4 at step 0 (3 reused) and again by the wrong-tool candidate
    # (1); the gold calculator call first made by step 0's greedy completion (reused by the
    # correct candidate and the wrong-tool candidate's completion: 2).
    assert trajectory.metadata["tool_memo_hits"] == 6

    # Pairs: step 1 gives correct vs each of the three; steps 0 and 2 had identical samples.
    result, pairs = asyncio.run(
        run_build(BuildConfig(inputs=[tmp_path / "gold"], out=tmp_path / "pairs"), progress=False)
    )
    built = list(pairs)
    assert len(built) == 3 and all(p.step_index == 1 for p in built)
    assert {p.rejected.raw for p in built} == {
        step1["candidates"][i]["step"]["raw"] for i in (1, 2, 3)
    }
    for pair in built:
        assert pair.chosen.raw == step1["candidates"][0]["step"]["raw"]
        assert pair.chosen.observation is not None and pair.rejected.observation is not None
        assert len(pair.prefix) == 1 and pair.prefix[0].observation.text  # OCR text
        assert "margin" in pair.metadata["rejection"] and pair.reasons
        assert pair.task.files and pairs.assets.has(pair.task.files[0])
    stats = prefs_stats(tmp_path / "pairs")
    assert stats["per_step"] == {"1": 3} and stats["rejection_reasons"]["margin"] == 3
    # A rerun writes nothing twice.
    again, _ = asyncio.run(
        run_build(BuildConfig(inputs=[tmp_path / "gold"], out=tmp_path / "pairs"), progress=False)
    )
    assert again.written == 0 and len(Dataset.open(tmp_path / "pairs")) == 3

    # gold + judge: the judge breaks gold's ties and its agreement with gold is reported.
    def judge(body: dict[str, Any]) -> str:
        text = json.dumps(body["messages"])
        return json.dumps({"thought": "t", "best": 2 if "I can tell already" in text else 3})

    with ScriptedOpenAIServer(judge) as srv:
        combo = gold_cfg.model_copy(
            update={"out": tmp_path / "combo", "verifier": "gold+llm-best", "judge": "openai:judge"}
        )
        _, combined = asyncio.run(
            run_explore(
                combo,
                policy=receipt_policy(task),
                judge=load_model("openai:judge", base_url=srv.base_url),
                progress=False,
            )
        )
    (both,) = list(combined)
    entries = both.metadata["exploration"]
    assert entries[0]["chosen"] == 2  # all four tie on gold; the judge's pick (3) wins
    assert entries[1]["chosen"] == 0  # gold decides; the judge's wrong-tool pick does not
    report = prefs_stats(tmp_path / "combo")
    agreement = report["judge_agreement_with_gold"]
    assert agreement["steps"] == 3 and agreement["top1"] == pytest.approx(2 / 3, abs=1e-3)
    # Step 1: of the pairs both tell apart, the judge orders (wrong tool, wrong argument) and
    # (wrong tool, premature) as gold does, but (correct, wrong tool) the other way.
    assert agreement["pairwise"] == pytest.approx(2 / 3, abs=1e-3)
    # and the CLI prints it
    shown = CliRunner().invoke(app, ["prefs", "stats", str(tmp_path / "combo"), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output)[0]["judge_agreement_with_gold"]["top1"] == pytest.approx(
        2 / 3, abs=1e-3
    )


# -- judges over real HTTP: retries, the recorded default, the CLI, resume --------------------
def test_malformed_judge_replies_are_retried_then_a_recorded_default_is_used(
    tmp_path: Path,
) -> None:
    """Policy and judge are OpenAI-compatible endpoints (loopback); the policy's K samples
    come from one request with n; the judge never answers in shape."""
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(
        json.dumps({"id": "sum", "query": "What is 2 + 3?", "tools": ["calculator"], "answer": "5"})
        + "\n"
    )
    turns = iter(range(1000))

    def policy(body: dict[str, Any]) -> str:
        step = sum(1 for m in body["messages"] if m["role"] == "assistant")
        if step == 0:  # the first sample is malformed, the others call the calculator
            return "hmm" if next(turns) % 3 == 0 else act("calculator", expression="2 + 3")
        return act("final_answer", answer="5")

    judge_replies = ["no idea", '{"best": 9}', "still nothing"] * 10
    with ScriptedOpenAIServer(policy) as pol, ScriptedOpenAIServer(judge_replies) as jdg:
        args = [
            "prefs",
            "explore",
            "--tasks",
            str(tasks),
            "--policy",
            "openai:policy",
            "--base-url",
            pol.base_url,
            "--verifier",
            "llm-best",
            "--judge",
            "openai:judge",
            "--judge-base-url",
            jdg.base_url,
            "--k",
            "3",
            "--out",
            str(tmp_path / "ex"),
            "--max-steps",
            "3",
            "--quiet",
        ]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
        policy_requests = [r.body for r in pol.requests]
        judged = len(jdg.requests)
        # A rerun skips the explored task: no new requests.
        again = CliRunner().invoke(app, args)
        assert again.exit_code == 0 and len(pol.requests) == len(policy_requests)
        assert "0 written, 1 already done" in again.output
    assert [(b.get("n", 1), b["temperature"]) for b in policy_requests[:2]] == [(1, 0.7), (2, 1.2)]
    (trajectory,) = list(Dataset.open(tmp_path / "ex", Trajectory))
    first = trajectory.metadata["exploration"][0]
    ranking = first["ranking"]
    assert ranking["fallback"] and ranking["details"]["attempts"] == 3  # 1 + 2 retries
    assert ranking["details"]["problems"][1] == '"best" must be a candidate number from 1 to 3'
    assert judged == 3 * len(trajectory.metadata["exploration"])
    # The default: well-formed candidates first, in sampling order.
    assert first["candidates"][0]["fault"] == "format" and first["chosen"] == 1
    assert trajectory.final_answer == "5"
    stats = prefs_stats(tmp_path / "ex")
    assert stats["judge_fallbacks"] == len(trajectory.metadata["exploration"])
    assert stats["faults"] == {"format": 1}


def explored(
    tmp_path: Path, candidates: list[tuple[str, bool]], scores: list[float], graded: bool = True
) -> Path:
    """An explored trajectory with one step: candidate texts (and whether each parsed)."""
    from tracetune.schema import Action, ErrorKind, Observation, Step, StepError, ToolCall

    steps = []
    for i, (raw, ok) in enumerate(candidates):
        if ok:
            call = json.loads(raw.split("Action: ", 1)[1])
            steps.append(
                Step(
                    index=0,
                    raw=raw,
                    action=Action(
                        type="tool_call",
                        tool_call=ToolCall(name=call["name"], arguments=call["arguments"]),
                    ),
                    observation=Observation(text=f"out {i}"),
                )
            )
        else:
            steps.append(
                Step(index=0, raw=raw, error=StepError(kind=ErrorKind.PARSE, message="no action"))
            )
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    entry = {
        "index": 0,
        "chosen": order[0],
        "candidates": [
            {
                "step": s.model_dump(mode="json"),
                "temperature": 1.0,
                "fault": None if s.error is None else "format",
            }
            for s in steps
        ],
        "ranking": {
            "scores": scores,
            "order": order,
            "reasons": ["r"] * len(steps),
            "graded": graded,
        },
    }
    ds = Dataset.create(tmp_path / f"explored-{graded}", Trajectory)
    ds.write_all(
        [
            Trajectory(
                id="traj",
                task=Task(id="t", query="q", tools=["calculator"]),
                controller="x",
                tools=["calculator", "final_answer"],
                steps=[steps[order[0]]],
                metadata={"exploration": [entry], "verifier": "llm-score"},
            )
        ]
    )
    return tmp_path / f"explored-{graded}"


def test_pairs_follow_the_rejection_rules(tmp_path: Path) -> None:
    best = act("calculator", "add them", expression="2 + 3")
    texts = [
        (best, True),  # 0 chosen (score 9)
        (best, True),  # 1 same text: no pair
        (act("calculator", "add them", expression="2 + 4"), True),  # 2 close, 1 below: none
        (act("calculator", "add them", expression="3 + 3"), True),  # 3 close, 5 below: margin
        (act("ocr", "I would rather read the photo first", image="photo.png"), True),  # 4 dissim.
        ("no idea", False),  # 5 format fault
    ]
    path = explored(tmp_path, texts, [9, 9, 8, 4, 8.5, 0])
    _, pairs = asyncio.run(
        run_build(BuildConfig(inputs=[path], out=tmp_path / "p", margin=2), progress=False)
    )
    got = {p.metadata["rejected_candidate"]: p.metadata["rejection"] for p in pairs}
    assert got == {3: ["margin"], 4: ["dissimilar"], 5: ["format", "margin", "dissimilar"]}
    pair = next(p for p in pairs if p.metadata["rejected_candidate"] == 4)
    assert pair.chosen_score == 9 and pair.rejected_score == 8.5 and pair.chosen.raw == best
    assert pair.metadata["similarity"] < 0.3 and "bleu similarity" in pair.reasons[0]
    # A stricter measure or no faults change the set; the threshold 0 disables dissimilarity.
    _, strict = asyncio.run(
        run_build(
            BuildConfig(
                inputs=[path], out=tmp_path / "q", margin=2, threshold=0, include_faults=False
            ),
            progress=False,
        )
    )
    assert {p.metadata["rejected_candidate"] for p in strict} == {3}
    stats = prefs_stats(tmp_path / "p")
    assert stats["per_task"] == {"t": 3} and stats["rejection_reasons"]["margin"] == 2
    # A rank (llm-rank) says which is worse, not by how much: no margin rule, so the close
    # candidate 3 is no longer pushed down.
    ranked = explored(tmp_path, texts, [9, 9, 8, 4, 8.5, 0], graded=False)
    _, by_rank = asyncio.run(
        run_build(BuildConfig(inputs=[ranked], out=tmp_path / "r", margin=2), progress=False)
    )
    assert {p.metadata["rejected_candidate"] for p in by_rank} == {4, 5}


@pytest.mark.slow  # real OCR in the sandbox (about 3 s)
def test_gold_anchor_gives_a_weak_code_policy_pairs_and_reaches_the_gold_answer(
    receipt_tasks: Path, tmp_path: Path
) -> None:
    (task,) = Dataset.open(receipt_tasks, Task).records()
    weak = ScriptedChatModel(lambda messages: "I am not sure what to do.")
    config = ExploreConfig(
        tasks=receipt_tasks,
        out=tmp_path / "ex",
        policy="scripted",
        verifier="gold",
        k=2,
        action_format="code",
        gold_anchor=True,
        max_steps=4,
    )
    _, explored = asyncio.run(run_explore(config, policy=weak, progress=False))
    (trajectory,) = list(explored)
    # Every committed step is the anchor's; run as code in the sandbox, it reaches the answer.
    assert trajectory.status == "completed" and trajectory.action_format == "code"
    assert [s.action.type for s in trajectory.steps] == ["code"] * 3
    assert "ocr(" in trajectory.steps[0].action.code
    from tracetune.judge.answers import check_answer

    assert check_answer(trajectory.final_answer, task.gold).passed
    for entry in trajectory.metadata["exploration"]:
        assert [c["source"] for c in entry["candidates"]] == ["policy", "policy", "gold"]
        assert entry["chosen"] == 2
    _, pairs = asyncio.run(
        run_build(BuildConfig(inputs=[tmp_path / "ex"], out=tmp_path / "p"), progress=False)
    )
    # Both policy samples are one text: one pair per step (not two), against the fault.
    assert len(pairs) == 3 and all(p.metadata["rejection"][0] == "format" for p in pairs)
    assert prefs_stats(tmp_path / "ex")["chosen_from_gold_anchor"] == 3


def test_verifier_and_schedule_configs_say_what_is_wrong(tmp_path: Path) -> None:
    from tracetune.models.base import Sampling
    from tracetune.prefs import CombinedVerifier, GoldVerifier, JudgeVerifier, make_verifier

    policy, judge = ScriptedChatModel(["x"]), ScriptedChatModel(["y"])
    greedy = Sampling()
    assert isinstance(make_verifier("gold", policy, None, greedy, 4), GoldVerifier)
    audit = make_verifier("gold", policy, judge, greedy, 4)  # judged too, gold decides
    assert isinstance(audit, CombinedVerifier) and not audit.tie_break and audit.name == "gold"
    combo = make_verifier("gold+llm-score", policy, judge, greedy, 4)
    assert isinstance(combo, CombinedVerifier) and combo.judge.mode == "score"
    assert isinstance(make_verifier("llm-rank", policy, judge, greedy, 4), JudgeVerifier)
    with pytest.raises(ValueError, match="needs a judge model"):
        make_verifier("llm-best", policy, None, greedy, 4)
    with pytest.raises(ValueError, match="unknown step verifier"):
        make_verifier("vibes", policy, None, greedy, 4)
    base = {"tasks": tmp_path, "out": tmp_path / "o", "policy": "local:x"}
    assert ExploreConfig(**base, k=5).schedule() == [0.7, 1.2, 1.2, 1.2, 1.2]
    assert ExploreConfig(**base, k=2, low_samples=2, low_temperature=0.3).schedule() == [0.3, 0.3]
    with pytest.raises(ValueError, match="one temperature per candidate"):
        ExploreConfig(**base, k=3, temperatures=[0.5, 1.0])
    with pytest.raises(ValueError, match="needs a judge model"):
        ExploreConfig(**base, verifier="gold+llm-rank")
    result = CliRunner().invoke(
        app,
        [
            "prefs",
            "explore",
            "--tasks",
            str(tmp_path / "none"),
            "--policy",
            "local:x",
            "--out",
            str(tmp_path / "o2"),
        ],
    )
    assert result.exit_code == 2 and "no task dataset" in result.output
    assert not (tmp_path / "o2").exists()


def test_memoized_tools_render_alike_and_rerun_when_a_named_file_changed(tmp_path: Path) -> None:
    from tracetune.agent.formats import CodeFormat, JsonFormat
    from tracetune.prefs.memo import MemoTool, memoized
    from tracetune.tools import ToolContext, get_tool

    tools = [get_tool("image_crop"), get_tool("calculator"), get_tool("final_answer")]
    wrapped = memoized(tools, ["image_crop", "calculator"])
    assert [type(t) is MemoTool for t in wrapped] == [True, True, False]
    for fmt in (JsonFormat(), CodeFormat()):
        assert fmt.system_prompt(wrapped) == fmt.system_prompt(tools)
    crop = wrapped[0]
    assert isinstance(crop, MemoTool)
    ctx = ToolContext(workdir=tmp_path)
    Image.new("RGB", (20, 20), "red").save(tmp_path / "a.png")
    args = {"image": "a.png", "box": [0, 0, 10, 10]}
    first = asyncio.run(crop.acall(ctx, args))
    assert asyncio.run(crop.acall(ctx, dict(args))) is first and crop.hits == 1
    Image.new("RGB", (20, 20), "blue").save(tmp_path / "a.png")  # a candidate rewrote it
    fresh = asyncio.run(crop.acall(ctx, args))
    assert fresh is not first and fresh.images[0].getpixel((1, 1)) == (0, 0, 255)


def test_exploration_stops_cleanly_at_its_token_budget_and_resumes(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(
        "".join(
            json.dumps({"id": f"t{i}", "query": f"What is {i} + 1?", "tools": ["calculator"]})
            + "\n"
            for i in range(3)
        )
    )
    policy = ScriptedChatModel(lambda m: act("final_answer", "easy", answer="1"))
    judge = ScriptedChatModel(lambda m: '{"best": 1}')
    config = ExploreConfig(
        tasks=tasks,
        out=tmp_path / "ex",
        policy="scripted",
        verifier="llm-best",
        judge="scripted",
        k=2,
        concurrency=1,
        max_total_tokens=1,
    )
    result, explored = asyncio.run(run_explore(config, policy=policy, judge=judge, progress=False))
    assert result.written == 1 and result.stopped and "token budget" in result.stopped
    config = config.model_copy(update={"max_total_tokens": None})
    result, explored = asyncio.run(run_explore(config, policy=policy, judge=judge, progress=False))
    assert (result.written, result.skipped) == (2, 1) and len(explored) == 3
    assert len({t.id for t in explored}) == 3


def test_every_config_field_and_command_has_help() -> None:
    from tracetune.prefs.matrix import EvalOptions, MatrixConfig, ProgramSet

    for cls in (ExploreConfig, BuildConfig, MatrixConfig, ProgramSet, EvalOptions):
        assert not [n for n, f in cls.model_fields.items() if not f.description], cls
    for command in (
        ["prefs", "explore"],
        ["prefs", "build"],
        ["prefs", "stats"],
        ["run", "matrix"],
    ):
        shown = CliRunner().invoke(app, [*command, "--help"])
        assert shown.exit_code == 0 and "Usage" in shown.output


def test_an_endpoint_that_ignores_n_is_asked_again_until_k_candidates(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"id": "t", "query": "2 + 2?", "tools": ["calculator"]}) + "\n")
    answers = iter(str(i) for i in range(100))

    def policy(body: dict[str, Any]) -> str:
        return act("final_answer", "sure", answer=next(answers))

    with ScriptedOpenAIServer(policy, honour_n=False) as srv:
        config = ExploreConfig(
            tasks=tasks,
            out=tmp_path / "ex",
            policy="openai:p",
            verifier="llm-best",
            judge="scripted",
            k=3,
            max_steps=1,
        )
        _, explored = asyncio.run(
            run_explore(
                config,
                policy=load_model("openai:p", base_url=srv.base_url),
                judge=ScriptedChatModel(lambda m: '{"best": 2}'),
                progress=False,
            )
        )
        seeds = [r.body.get("seed") for r in srv.requests]
    (trajectory,) = list(explored)
    (entry,) = trajectory.metadata["exploration"]
    answers_seen = [c["step"]["action"]["answer"] for c in entry["candidates"]]
    assert len(answers_seen) == 3 and len(set(answers_seen)) == 3
    assert len(seeds) == 3 and len(set(seeds)) == 3  # the high-temperature pair, re-asked
    assert trajectory.final_answer == answers_seen[1]


def test_explicit_temperatures_are_each_candidates_own_in_their_order(tmp_path: Path) -> None:
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text(json.dumps({"id": "t", "query": "2 + 2?", "tools": ["calculator"]}) + "\n")
    policy = SamplingPolicy(
        lambda m, t: act("final_answer", "sure", answer=f"t={t}"), lambda m: "unused"
    )
    config = ExploreConfig(
        tasks=tasks,
        out=tmp_path / "ex",
        policy="scripted",
        verifier="llm-best",
        judge="scripted",
        k=4,
        temperatures=[1.2, 0.7, 1.2, 0.9],
        max_steps=1,
    )
    _, explored = asyncio.run(
        run_explore(
            config, policy=policy, judge=ScriptedChatModel(lambda m: '{"best": 2}'), progress=False
        )
    )
    (entry,) = list(explored)[0].metadata["exploration"]
    candidates = entry["candidates"]
    assert [c["temperature"] for c in candidates] == [1.2, 0.7, 1.2, 0.9]
    assert [c["step"]["action"]["answer"] for c in candidates] == [
        "t=1.2",
        "t=0.7",
        "t=1.2",
        "t=0.9",
    ]
    # One request per temperature, with n = that temperature's count.
    assert [(c["n"], c["sampling"].temperature) for c in policy.calls] == [
        (2, 1.2),
        (1, 0.7),
        (1, 0.9),
    ]
    assert list(explored)[0].final_answer == "t=0.7"


def test_gold_checks_arguments_where_a_gold_step_has_no_output_to_compare(
    tmp_path: Path,
) -> None:
    """A crop's output has no expected text: its box must overlap the gold box instead."""
    from tracetune.judge.arguments import arguments_match
    from tracetune.schema import GoldAnswer, ToolCall

    assert arguments_match({"box": [0, 0, 20, 20]}, {"box": [1, 1, 21, 21]})
    assert not arguments_match({"box": [0, 0, 20, 20]}, {"box": [20, 20, 40, 40]})
    assert arguments_match({"image": "image_crop_step0_0.png"}, {"image": "crop_f1a_step0_0.png"})
    assert not arguments_match({"image": "a.png"}, {"image": "b.png"})

    photo = Image.new("RGB", (40, 40), "red")
    task = Task(
        id="crop",
        query="Crop the top-left quarter; what colour is it?",
        tools=["image_crop"],
        files=[
            photo_ref := Dataset.create(tmp_path / "tmp", Task).assets.put_image(photo, "photo.png")
        ],
        gold=GoldAnswer(value="red"),
        gold_chain=[
            ToolCall(name="image_crop", arguments={"image": "photo.png", "box": [0, 0, 20, 20]})
        ],
        metadata={
            "answer_from": {"op": "given", "value": "red"},
            "gold_steps": [{"purpose": "crop it"}],
        },
    )
    assert photo_ref.name == "photo.png"
    tasks = task_dir(tmp_path / "tasks", [task], {"photo.png": photo})
    boxes = iter([[0, 0, 20, 20], [1, 1, 21, 21], [20, 20, 40, 40]] * 5)

    def candidates(messages: list[ChatMessage], temperature: float) -> str:
        if steps_so_far(messages) == 0:
            return act("image_crop", "crop", image="photo.png", box=next(boxes))
        return act("final_answer", "it is red", answer="red")

    policy = SamplingPolicy(candidates, lambda m: act("final_answer", "red", answer="red"))
    config = ExploreConfig(
        tasks=tasks,
        out=tmp_path / "ex",
        policy="scripted",
        verifier="gold",
        k=3,
        temperatures=[1.0] * 3,
        max_steps=3,
    )
    _, explored = asyncio.run(run_explore(config, policy=policy, progress=False))
    ranking = list(explored)[0].metadata["exploration"][0]["ranking"]
    assert ranking["scores"] == [10.0, 10.0, 7.0]
    assert "arguments differ from the gold call" in ranking["reasons"][2]
