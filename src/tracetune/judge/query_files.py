"""The query-file verifier: does a task's query fit its files?

The judge model sees the query with the files (images as images, documents converted to
markdown) and answers whether the files are relevant, useful, and whether what is missing
is obtainable with the tools; it may propose a rewritten query. The answer becomes a
``Verdict`` with the judge's reasoning as its reason and the prompt's hash on it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from tracetune.models.base import ChatModel, Sampling
from tracetune.models.replies import MalformedOutput
from tracetune.prompts import prompt_hash, render
from tracetune.schema import Task, Verdict
from tracetune.store import AssetStore

PROMPT = "mtrace/verify_task.jinja"


class MalformedVerdict(MalformedOutput):
    """The judge's answer could not be read as a verdict (a model reply that is not what
    was asked for, like every :class:`~tracetune.models.replies.MalformedOutput`)."""


def yes(value: Any, field: str) -> bool:
    """A judge's yes/no (or true/false) field."""
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("yes", "true", "y"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("no", "false", "n"):
        return False
    raise MalformedVerdict(f"{field!r} should be yes or no, got {value!r}")


def document_markdown(path: Any, max_chars: int) -> str:
    from markitdown import MarkItDown

    from tracetune.tools.builtin.files import truncate

    try:
        text = MarkItDown(enable_plugins=False).convert(str(path)).markdown or ""
    except Exception as exc:  # noqa: BLE001 - an unreadable file is something the judge should see
        return f"(could not be converted to text: {type(exc).__name__}: {exc})"
    return truncate(text.strip() or "(no text)", max_chars)[0]


async def verify_task(
    task: Task,
    query: str,
    assets: AssetStore,
    model: ChatModel,
    *,
    verdict_id: str,
    max_doc_chars: int = 6000,
    max_tokens: int = 1024,
) -> Verdict:
    """Judge ``query`` (the task's, or a rewrite of it) against the task's files."""
    from tracetune.judge.trajectory import read_verdict_json

    files = []
    for ref in task.files:
        markdown = ""
        if not ref.is_image:
            markdown = await asyncio.to_thread(document_markdown, assets.path(ref), max_doc_chars)
        files.append(
            {"name": ref.name, "is_image": ref.is_image, "mime": ref.mime, "markdown": markdown}
        )
    images = [assets.path(ref) for ref in task.images]
    text = render(PROMPT, query=query, files=files, images=bool(images), tools=task.tools)
    content: list[dict[str, Any]] = [{"type": "image", "image": p} for p in images]
    content.append({"type": "text", "text": text})
    generation = await model.generate(
        [{"role": "user", "content": content}],
        sampling=Sampling(temperature=0.0, max_tokens=max_tokens),
    )
    answer = read_verdict_json(generation.text)
    passed = yes(answer.get("correct"), "correct")
    details: dict[str, Any] = {
        "query": query,
        "updated_query": str(answer.get("updated_query") or "").strip(),
    }
    for field in ("relevant", "useful", "obtainable"):
        if field in answer:
            details[field] = yes(answer[field], field)
    # The prompt defines "correct" as all three holding; a judge that says "correct" while
    # answering no to one of them has not passed the task.
    failed = [f for f in ("relevant", "useful", "obtainable") if details.get(f) is False]
    reasons = [str(answer.get("thought") or "")]
    if passed and failed:
        passed = False
        reasons.append(f"judged correct, but not {', '.join(failed)}")
    return Verdict(
        id=verdict_id,
        target_id=task.id,
        target_kind="task",
        judge=model.spec,
        passed=passed,
        score=1.0 if passed else 0.0,
        reasons=reasons,
        prompt_hash=prompt_hash(PROMPT),
        details=details,
        usage=generation.usage,
    )
