"""Texts to train a tokenizer on, rendered from datasets exactly as a model is shown them.

``tracetune model init --tokenizer-corpus DIR`` trains a new model's tokenizer on these, so
that the system prompt, tool names and the JSON of an action become few tokens.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from tracetune.errors import ConfigError
from tracetune.formats.chat import dialogue_chat, trajectory_chat
from tracetune.schema import Dialogue, Trajectory
from tracetune.store import Dataset


def corpus_from_datasets(paths: Iterable[str | Path], limit: int | None = None) -> list[str]:
    """Texts to train a tokenizer on: each trajectory or dialogue rendered as the model sees it.

    Trajectories are rendered exactly as training and inference render them (the agent's
    system prompt, the task, every step and observation); dialogues give their messages'
    text. ``paths`` are dataset directories (trajectories or dialogues).
    """
    texts: list[str] = []
    for path in paths:
        path = Path(path)
        if not (path / "manifest.json").is_file():
            raise ConfigError(
                f"--tokenizer-corpus {path} is not a tracetune dataset directory (no "
                "manifest.json); pass a trajectory or dialogue dataset, e.g. the output of "
                "`tracetune rollout`"
            )
        kind = json.loads((path / "manifest.json").read_text()).get("kind", "trajectory")
        if kind == "dialogue":
            chats = (dialogue_chat(d) for d in Dataset.open(path, Dialogue))
        elif kind == "trajectory":
            chats = (trajectory_chat(t) for t in Dataset.open(path, Trajectory))
        else:
            raise ConfigError(
                f"--tokenizer-corpus {path} holds {kind} records; pass trajectories or dialogues"
            )
        for chat in chats:
            parts = []
            for message in chat["messages"]:
                content = message["content"]
                if isinstance(content, str):
                    parts.append(content)
                    continue
                parts.extend(p.get("text") or "" for p in content if p.get("type") == "text")
            texts.append("\n".join(parts))
            if limit is not None and len(texts) >= limit:
                return texts
    if not texts:
        raise ConfigError(
            f"--tokenizer-corpus: no trajectories or dialogues in {', '.join(map(str, paths))}"
        )
    return texts
