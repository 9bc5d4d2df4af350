"""Read tasks from a task dataset directory or a simple JSONL file."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

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
    files: Sequence[str | Path],
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


class TaskSource:
    """Tasks to run, built as they are reached: a million need not be in memory at once.

    ``len()`` is known up front (for progress bars); each iteration reads the source again.
    """

    def __init__(self, count: int, assets: AssetStore, tasks: Callable[[], Iterator[Task]]):
        self.count = count
        self.assets = assets
        self._tasks = tasks

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Task]:
        return self._tasks()


def task_source(path: str | Path, assets: AssetStore) -> TaskSource:
    """:func:`load_tasks`, streamed. A JSONL file is checked whole first (every line a JSON
    object with a "query" string, every file it names present), so bad input fails before
    any work; its files are hashed into ``assets`` as their tasks are reached."""
    path = Path(path)
    if path.is_dir():
        dataset = Dataset.open(path, Task)
        return TaskSource(len(dataset), dataset.assets, lambda: iter(dataset))
    if not path.is_file():
        raise InputFileError(f"no task dataset or JSONL file at {path}")
    count = 0
    for lineno, row in iter_jsonl(path):
        _files_of(path, lineno, row)
        count += 1
    if not count:
        raise InputError(
            f"task file {path} is empty: write one JSON object per line, e.g. "
            '{"query": "What is the total?", "images": ["receipt.png"]}'
        )

    def tasks() -> Iterator[Task]:
        for lineno, row in iter_jsonl(path):
            try:
                yield task_from_inputs(
                    row["query"],
                    _files_of(path, lineno, row),
                    assets,
                    tools=row.get("tools"),
                    answer=row.get("answer"),
                    task_id=row.get("id"),
                    source=f"jsonl:{path.name}",
                )
            except (FileNotFoundError, InputError) as exc:
                raise InputError(f"{path}:{lineno}: {exc}") from None

    return TaskSource(count, assets, tasks)


def _files_of(path: Path, lineno: int, row: Any) -> list[Path]:
    """The files a JSONL task row names (relative to the JSONL file), checked present."""
    if not isinstance(row, dict) or not isinstance(row.get("query"), str):
        raise InputError(f'{path}:{lineno}: each line needs a "query" string')
    names = [*row.get("images", []), *row.get("files", [])]
    files = [path.parent / str(name) for name in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise InputError(f"{path}:{lineno}: task file {missing[0]} does not exist")
    return files


def load_tasks(path: str | Path, assets: AssetStore) -> tuple[list[Task], AssetStore]:
    """Tasks from a task dataset, or a JSONL of ``{query, images|files, tools, answer, id}``.

    Returns the tasks and the asset store that holds their files. JSONL file paths are
    relative to the JSONL file; their bytes are stored in ``assets``.
    """
    source = task_source(path, assets)
    return list(source), source.assets
