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
from tracetune.schema import PreferencePair, Task, Trajectory
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
    placeholder = Task(id="counter", query="Bump the counter.", tools=["calculator"],
                       files=[Dataset.create(tmp_path / "tmp", Task).assets.put_image(photo,
                                                                                   "photo.png")])
    tasks = task_dir(tmp_path / "tasks", [placeholder], {"photo.png": photo})
    bumps = iter(range(1, 100))

    def policy(messages: list[ChatMessage]) -> str:
        step = steps_so_far(messages)
        if step == 0:
            return code("counter = 10\nitems = []\nprint('ready', counter)", "set up")
        if step == 1:
            d = next(bumps)
            return code(
                f"counter += {d}\nitems.append({d})\n"
                'doubled = calculator(expression=f"{counter} * 2")\n'
                "print(counter, items, doubled)",
                f"bump by {d}",
            )
        return code("final_answer(counter)", "done")

    def judge(body: dict[str, Any]) -> str:
        text = json.dumps(body["messages"])
        k = text.count("## Candidate")
        if "bump by" in text:  # step 2: prefer the third candidate
            return json.dumps({"thought": "3 is best", "ranking": [3, 1, 2, 4][:k] if k == 4
                               else list(range(1, k + 1)), "reasons": ["r"] * k})
        return json.dumps({"thought": "any", "ranking": list(range(1, k + 1))})

    with ScriptedOpenAIServer(judge) as srv:
        config = ExploreConfig(tasks=tasks, out=tmp_path / "explored", policy="scripted",
                               verifier="llm-rank", judge="openai:judge", k=4,
                               action_format="code", max_steps=4)
        result, explored = asyncio.run(run_explore(
            config, policy=ScriptedChatModel(policy),
            judge=load_model("openai:judge", base_url=srv.base_url), progress=False))
        requests = list(srv.requests)
    assert result.written == 1
    (trajectory,) = list(explored)
    first, second, last = trajectory.metadata["exploration"]
    assert first["candidates"][0]["step"]["observation"]["text"] == "ready 10"
    observed = [c["step"]["observation"]["text"] for c in second["candidates"]]
    # Each candidate started from counter=10, items=[]: one shared interpreter would have
    # printed 11, 13, 16, 20 and lists that grow.
    assert observed == ["11 [1] 22", "12 [2] 24", "13 [3] 26", "14 [4] 28"]
    calls = [c["step"]["observation"]["data"]["tool_calls"] for c in second["candidates"]]
    assert [c[0]["arguments"]["expression"] for c in calls] == [f"{n} * 2" for n in (11, 12, 13,
                                                                                     14)]
    # Temperatures follow the schedule: one low, K-1 high.
    assert [c["temperature"] for c in second["candidates"]] == [0.7, 1.2, 1.2, 1.2]
    # The judge's choice (candidate 3) was committed, and its state carried on.
    assert second["chosen"] == 2 and second["ranking"]["order"] == [2, 0, 1, 3]
    assert trajectory.final_answer == "13" and trajectory.status == "completed"
    assert "13 [3] 26" in trajectory.steps[1].observation.text
    # The judge saw the task image as an image, and all candidates with their observations.
    step2 = next(r for r in requests if "bump by" in json.dumps(r.messages))
    assert len(step2.image_urls()) == 1 and step2.image_urls()[0].startswith("data:image/png")
    shown = "\n".join(step2.texts())
    assert all(o in shown for o in observed) and "ready 10" in shown
    assert trajectory.metadata["judge_prompt_hash"]


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
    step1 = iter([
        act("calculator", "compute it", expression=gold_expr),
        act("ocr", "read it again", image=ocr_call.arguments["image"]),
        act("calculator", "compute it", expression=wrong_expr),
        act("final_answer", "I can tell already", answer=task.gold.value),
    ] * 10)

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
    gold_cfg = ExploreConfig(tasks=receipt_tasks, out=tmp_path / "gold", policy="scripted",
                             verifier="gold", k=4, temperatures=temperatures, max_steps=4)
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

    # Pairs: step 1 gives correct vs each of the three; steps 0 and 2 had identical samples.
    result, pairs = asyncio.run(run_build(
        BuildConfig(inputs=[tmp_path / "gold"], out=tmp_path / "pairs"), progress=False))
    built = list(pairs)
    assert len(built) == 3 and all(p.step_index == 1 for p in built)
    assert {p.rejected.raw for p in built} == {step1["candidates"][i]["step"]["raw"]
                                               for i in (1, 2, 3)}
    for pair in built:
        assert pair.chosen.raw == step1["candidates"][0]["step"]["raw"]
        assert pair.chosen.observation is not None and pair.rejected.observation is not None
        assert len(pair.prefix) == 1 and pair.prefix[0].observation.text  # OCR text
        assert "margin" in pair.metadata["rejection"] and pair.reasons
        assert pair.task.files and pairs.assets.has(pair.task.files[0])
    stats = prefs_stats(tmp_path / "pairs")
    assert stats["per_step"] == {"1": 3} and stats["rejection_reasons"]["margin"] == 3
    # A rerun writes nothing twice.
    again, _ = asyncio.run(run_build(
        BuildConfig(inputs=[tmp_path / "gold"], out=tmp_path / "pairs"), progress=False))
    assert again.written == 0 and len(Dataset.open(tmp_path / "pairs")) == 3

    # gold + judge: the judge breaks gold's ties and its agreement with gold is reported.
    def judge(body: dict[str, Any]) -> str:
        text = json.dumps(body["messages"])
        return json.dumps({"thought": "t", "best": 2 if "I can tell already" in text else 3})

    with ScriptedOpenAIServer(judge) as srv:
        combo = gold_cfg.model_copy(update={"out": tmp_path / "combo", "verifier": "gold+llm-best",
                                            "judge": "openai:judge"})
        _, combined = asyncio.run(run_explore(
            combo, policy=receipt_policy(task),
            judge=load_model("openai:judge", base_url=srv.base_url), progress=False))
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
        2 / 3, abs=1e-3)
