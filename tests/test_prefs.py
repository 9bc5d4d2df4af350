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
