"""The trajectory verifier: is a teacher's worked example right, step by step?

The judge model sees the tools, the task, its file descriptions and its images (as
images), every step with its thought, action and observation (images a step returned
included, after the task's), and the final answer; it
rejects for the reasons M-TRACE lists (``PROBLEMS``). Tasks with a gold answer are also
checked exactly (``tracetune.judge.answers``), and that check decides on its own.
"""

from __future__ import annotations

import json
from typing import Any

from tracetune.models.base import ChatModel, Sampling
from tracetune.prompts import prompt_hash, render
from tracetune.schema import Trajectory, Verdict
from tracetune.store import AssetStore
from tracetune.tools import Tool

PROMPT = "mtrace/verify_trajectory.jinja"
PROBLEMS = (
    "tool_misused",
    "tool_not_used",
    "wrong_arguments",
    "wrong_summary",
    "wrong_answer",
    "irrelevant_answer",
    "inconsistent_with_files",
)


def read_verdict_json(text: str) -> dict[str, Any]:
    from tracetune.judge.query_files import MalformedVerdict
    from tracetune.models.replies import MalformedOutput, extract_json

    try:
        answer: dict[str, Any] = extract_json(text, dict)
    except MalformedOutput as exc:
        raise MalformedVerdict(str(exc)) from None
    if "correct" not in answer:
        raise MalformedVerdict(f"the verdict has no 'correct' field: {json.dumps(answer)[:200]}")
    return answer


def _action_text(step: Any) -> str:
    action = step.action
    if action is None:
        return f"(unparsable output) {step.raw[:300]}"
    if action.type == "code":
        return f"code:\n{action.code}"
    if action.type == "tool_call" and action.tool_call is not None:
        return json.dumps(
            {"name": action.tool_call.name, "arguments": action.tool_call.arguments},
            ensure_ascii=False,
        )
    return f"final_answer({action.answer!r})"


def _observation_text(step: Any, limit: int) -> str:
    text = step.observation.text if step.observation else ""
    if step.error is not None:
        text = f"{text}\nError ({step.error.kind.value}): {step.error.message}".strip()
    text = text or "(nothing)"
    return text if len(text) <= limit else text[:limit] + " [...]"


async def verify_trajectory(
    trajectory: Trajectory,
    tools: list[Tool],
    assets: list[AssetStore],
    model: ChatModel,
    *,
    verdict_id: str,
    max_observation_chars: int = 2000,
    max_images: int = 8,
    max_tokens: int = 1024,
) -> Verdict:
    """The judge model's verdict on one trajectory (raises MalformedVerdict if unreadable)."""
    from tracetune.judge.query_files import yes

    task = trajectory.task

    def path(ref: Any) -> Any:
        for store in assets:
            if store.has(ref):
                return store.path(ref)
        raise FileNotFoundError(f"image {ref.name} is in none of the asset stores")

    # The task's images first, then what the steps returned (a crop, a drawn box), so the
    # judge can check a step that reads an image against that image; both within max_images.
    images = task.images[:max_images]
    steps = []
    for s in trajectory.steps:
        returned = (s.observation.images if s.observation else [])[: max_images - len(images)]
        images = [*images, *returned]
        steps.append(
            {
                "index": s.index,
                "thought": s.thought or "",
                "action": _action_text(s),
                "observation": _observation_text(s, max_observation_chars),
                "images": [r.name for r in returned],
            }
        )
    text = render(
        PROMPT,
        tools=tools,
        query=task.query,
        files=task.files,
        steps=steps,
        answer=trajectory.final_answer,
        images=bool(task.images[:max_images]),
        problems=PROBLEMS,
    )
    content: list[dict[str, Any]] = [{"type": "image", "image": path(r)} for r in images]
    content.append({"type": "text", "text": text})
    generation = await model.generate(
        [{"role": "user", "content": content}],
        sampling=Sampling(temperature=0.0, max_tokens=max_tokens),
    )
    answer = read_verdict_json(generation.text)
    passed = yes(answer["correct"], "correct")
    problems = answer.get("problems") or []
    if isinstance(problems, str):
        problems = [problems]
    problems = [str(p) for p in problems]
    reasons = [str(answer.get("thought") or "")]
    if not passed:
        reasons = [*(p for p in problems), *reasons] if problems else reasons
    return Verdict(
        id=verdict_id,
        target_id=trajectory.id,
        target_kind="trajectory",
        judge=model.spec,
        passed=passed,
        score=1.0 if passed else 0.0,
        reasons=reasons,
        prompt_hash=prompt_hash(PROMPT),
        details={
            "task_id": task.id,
            "problems": problems,
            "known_problems": [p for p in problems if p in PROBLEMS],
        },
        usage=generation.usage,
    )
