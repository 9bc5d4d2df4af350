"""Read tasks from a task dataset directory or a simple JSONL file."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tracetune.errors import InputFileError
from tracetune.inputs import InputError, iter_jsonl
from tracetune.schema import GoldAnswer, Provenance, Task
from tracetune.store.assets import AssetStore
from tracetune.store.dataset import Dataset


def stable_task_id(query: str, file_hashes: list[str]) -> str:
    blob = json.dumps([query, file_hashes])
    return "task-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def task_from_inputs(
    query: str,
    files: list[str | Path],
    assets: AssetStore,
    tools: list[str] | None = None,
    answer: str | None = None,
    task_id: str | None = None,
    source: str = "cli",
) -> Task:
    """A task from a query and local file paths; the files are stored in ``assets``."""
    refs = []
    for path in files:
        path = Path(path)
        if not path.is_file():
            raise InputFileError(f"task file {path} does not exist")
        refs.append(assets.put_file(path))
    return Task(
        id=task_id or stable_task_id(query, [r.sha256 for r in refs]),
        query=query,
        files=refs,
        tools=tools or [],
        gold=GoldAnswer(value=str(answer)) if answer is not None else None,
        provenance=Provenance(source=source),
    )


def load_tasks(path: str | Path, assets: AssetStore) -> tuple[list[Task], AssetStore]:
    """Tasks from a task dataset, or a JSONL of ``{query, images|files, tools, answer, id}``.

    Returns the tasks and the asset store that holds their files. JSONL file paths are
    relative to the JSONL file; their bytes are stored in ``assets``.
    """
    path = Path(path)
    if path.is_dir():
        dataset = Dataset.open(path, Task)
        return dataset.records(), dataset.assets
    if not path.is_file():
        raise InputFileError(f"no task dataset or JSONL file at {path}")
    tasks = []
    for lineno, row in iter_jsonl(path):
        if not isinstance(row, dict) or not isinstance(row.get("query"), str):
            raise InputError(f'{path}:{lineno}: each line needs a "query" string')
        files = [path.parent / f for f in row.get("images", []) + row.get("files", [])]
        try:
            tasks.append(
                task_from_inputs(
                    row["query"],
                    files,
                    assets,
                    tools=row.get("tools"),
                    answer=row.get("answer"),
                    task_id=row.get("id"),
                    source=f"jsonl:{path.name}",
                )
            )
        except (FileNotFoundError, InputError) as exc:
            raise InputError(f"{path}:{lineno}: {exc}") from None
    if not tasks:
        raise InputError(
            f"task file {path} is empty: write one JSON object per line, e.g. "
            '{"query": "What is the total?", "images": ["receipt.png"]}'
        )
    return tasks, assets
