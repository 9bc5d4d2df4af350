"""Synthetic inputs of any size for scale tests and benchmarks: queries with planted
near-duplicates, and images with planted near-copies (as 64-bit difference hashes)."""

from __future__ import annotations

import random
from typing import Any

from tracetune.schema import Provenance, Task

SYLLABLES = [
    "ka", "lo", "mi", "ter", "san", "vo", "ril", "po", "dun", "ex",
    "ba", "qui", "nor", "fe", "lan", "tis", "gor", "u", "wen", "yal",
]  # fmt: skip
TOOLS = ["ocr", "visual_qa", "calculator"]


def _word(rng: random.Random) -> str:
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 3)))


def planted_queries(n: int, seed: int = 0, duplicate_rate: float = 0.2) -> list[dict[str, Any]]:
    """``n`` queries ``{query, tools, duplicate_of}``: random sentences, and (at
    ``duplicate_rate``) light rewordings of an earlier one (case, punctuation, "please")."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    originals: list[int] = []
    for i in range(n):
        if originals and rng.random() < duplicate_rate:
            j = rng.choice(originals)
            text = str(out[j]["query"])
            edit = rng.randrange(3)
            if edit == 0:
                text = text.rstrip("?") + "!"
            elif edit == 1:
                text = "Please " + text[0].lower() + text[1:]
            else:
                text = text.upper()
            out.append({"query": text, "tools": out[j]["tools"], "duplicate_of": j})
        else:
            words = [_word(rng) for _ in range(rng.randint(9, 13))]
            text = f"Which {' '.join(words)}?"
            tools = [rng.choice(TOOLS)]
            out.append({"query": text, "tools": tools, "duplicate_of": None})
            originals.append(i)
    return out


def candidate_tasks(queries: list[dict[str, Any]], per_batch: int = 8) -> list[Task]:
    """The queries as ``queries.generate`` candidates, in generation order."""
    return [
        Task(
            id=f"cand-{i:07d}",
            query=q["query"],
            tools=q["tools"],
            provenance=Provenance(source="mtrace:queries"),
            metadata={
                "batch": i // per_batch,
                "position": i % per_batch,
                "topic": f"topic {i % 7}",
                "invalid": None,
            },
        )
        for i, q in enumerate(queries)
    ]


def planted_hashes(n: int, seed: int = 0, duplicate_rate: float = 0.2) -> list[int]:
    """``n`` 64-bit image hashes: random ones, and (at ``duplicate_rate``) copies of an
    earlier one with 0-3 bits flipped, as recompression and resizing flip dHash bits."""
    rng = random.Random(seed)
    codes: list[int] = []
    for _ in range(n):
        if codes and rng.random() < duplicate_rate:
            code = rng.choice(codes)
            for _ in range(rng.randint(0, 3)):
                code ^= 1 << rng.randrange(64)
        else:
            code = rng.getrandbits(64)
        codes.append(code)
    return codes


def filter_run(root: Any, n: int, search: str = "auto", seed: int = 0) -> Any:
    """A ``queries.filter`` run over ``n`` planted candidates (hashing embedder) in ``root``:
    writes the candidates and three seeds (two of them copies of candidates) unless already
    there, and returns its ``SynthConfig``."""
    import json
    from pathlib import Path

    from tracetune.store import Dataset
    from tracetune.synth.mtrace import SynthConfig

    root = Path(root)
    queries = planted_queries(n, seed)
    seeds = root / "seeds.jsonl"
    if not seeds.exists():
        root.mkdir(parents=True, exist_ok=True)
        picked = [queries[0], queries[min(5, n - 1)]]
        rows = [{"query": q["query"] + "!", "tools": q["tools"]} for q in picked]
        rows.append({"query": "Count the red circles in the drawing.", "tools": ["visual_qa"]})
        seeds.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = SynthConfig(
        out=root / "run",
        embedder="hashing",
        queries={  # type: ignore[arg-type]
            "seeds": seeds,
            "tools": TOOLS,
            "dedup_search": search,
        },
    )
    candidates = config.dir("candidates")
    if not (candidates / "manifest.json").exists():
        Dataset.create(candidates, Task).write_all(candidate_tasks(queries))
    return config
