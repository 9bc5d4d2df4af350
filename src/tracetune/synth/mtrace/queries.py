"""Query generation: seed examples and the tool catalogue in, new diverse queries out.

Two stages, both resumable:

* ``queries.generate`` (OUT/candidates): each generator call sees the tool catalogue and
  ``few_shot`` seed examples drawn at random for that call (seeded, so a rerun draws the
  same), and writes ``per_batch`` queries as a JSON list of ``{query, tools}``. A call whose
  output is not such a list is dropped with its reason; a list item with missing keys or
  unknown tools becomes a candidate marked ``invalid``, so the filter counts it.
* ``queries.filter`` (OUT/queries): candidates in generation order, one at a time, are
  dropped when malformed, too close to a benchmark question (decontamination), a near-copy
  of a seed or of a query already kept (embedding similarity), or over a tool/topic quota.
  Going in a fixed order makes the kept set the same however often the run was resumed.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from tracetune.inputs import read_text
from tracetune.models.base import Sampling
from tracetune.prompts import prompt_hash, render
from tracetune.runner import Drop, StageResult, run_stage
from tracetune.schema import Provenance, Record, Task
from tracetune.store import Dataset
from tracetune.synth.mtrace.common import (
    MalformedOutput,
    extract_json,
    run_synth_stage,
    stable_id,
    stage_model,
)
from tracetune.synth.mtrace.config import SynthConfig
from tracetune.synth.mtrace.embed import Embedder, load_embedder
from tracetune.synth.mtrace.neardup import NearestIndex, SearchMethod, single_blas_thread
from tracetune.tools import Tool, load_tools

GENERATE = "queries.generate"
FILTER = "queries.filter"
PROMPT = "mtrace/queries.jinja"


def read_seeds(path: Path, known_tools: set[str]) -> list[dict[str, Any]]:
    """Seed examples ``{query, tools}`` from JSONL; tools must be in the catalogue."""
    if not path.is_file():
        raise ValueError(f"seed file {path} does not exist (JSONL of {{query, tools}})")
    seeds = []
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("query"), str)
            or not isinstance(row.get("tools"), list)
        ):
            raise ValueError(
                f'{path}:{lineno}: each seed needs a "query" string and a "tools" list'
            )
        unknown = sorted(set(map(str, row["tools"])) - known_tools)
        if unknown:
            raise ValueError(
                f"{path}:{lineno}: seed uses tools {unknown} that are not in the catalogue "
                f"(queries.tools: {', '.join(sorted(known_tools))}); add them or fix the seed"
            )
        seeds.append({"query": row["query"], "tools": [str(t) for t in row["tools"]]})
    if not seeds:
        raise ValueError(f"seed file {path} has no examples")
    return seeds


# -- benchmark questions (decontamination) --------------------------------------------------
_QUESTION_KEYS = ("query", "question", "Question", "prompt", "instruction")


def _row_question(row: Any) -> str | None:
    if isinstance(row, str):
        return row
    if not isinstance(row, dict):
        return None
    for key in _QUESTION_KEYS:
        if isinstance(row.get(key), str):
            return str(row[key])
    dialogs = row.get("dialogs")  # GTA: the first user turn is the query
    if isinstance(dialogs, list):
        from tracetune.models.replies import content_text

        for message in dialogs:
            if isinstance(message, dict) and message.get("role") == "user":
                return content_text(message.get("content"))
    return None


def benchmark_questions(path: Path) -> list[str]:
    """Questions of a benchmark file: GTA dataset.json, GAIA metadata.jsonl, JSON/JSONL
    rows with a query/question field, or a text file with one question per line."""
    if path.is_dir():
        for name in ("dataset.json", "metadata.jsonl"):
            if (path / name).is_file():
                return benchmark_questions(path / name)
        raise ValueError(f"benchmark folder {path} has no dataset.json (GTA) or metadata.jsonl")
    if not path.is_file():
        raise ValueError(f"benchmark file {path} does not exist")
    text = read_text(path)  # names the file when it is not UTF-8
    rows: list[Any]
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"benchmark file {path} is not valid JSON ({exc.msg}, line {exc.lineno})"
            ) from None
        rows = list(data.values()) if isinstance(data, dict) else list(data)
    elif path.suffix.lower() in (".jsonl", ".ndjson"):
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    else:
        rows = [line for line in text.splitlines() if line.strip()]
    questions = [q for q in map(_row_question, rows) if q and q.strip()]
    if not questions:
        raise ValueError(
            f"found no questions in {path}: rows need one of {', '.join(_QUESTION_KEYS)} "
            "(or GTA dialogs)"
        )
    return questions


def normalized(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def max_similarity(vector: np.ndarray, index: NearestIndex) -> tuple[float, int]:
    """The best cosine similarity of ``vector`` in ``index`` and its position; (0.0, -1)
    when the index is empty. Exact or approximate, as the index was built."""
    return index.nearest(vector)


class BenchmarkIndex:
    """The questions of the benchmark files, to find what is too close to one of them."""

    def __init__(
        self,
        paths: list[Path],
        embedder: Embedder,
        threshold: float,
        search: SearchMethod = "auto",
    ) -> None:
        self.questions = [(str(p), q) for p in paths for q in benchmark_questions(p)]
        self.vectors = encode_in_batches(embedder, [q for _, q in self.questions])
        self.exact = {normalized(q): i for i, (_, q) in enumerate(self.questions)}
        self.threshold = threshold
        self.index = NearestIndex(self.vectors.shape[1] if len(self.vectors) else 1, search)
        self.index.add_many(self.vectors)

    def match(self, text: str, vector: np.ndarray) -> dict[str, Any] | None:
        """The benchmark question ``text`` copies (same words, or embedding similarity at or
        above the threshold), as ``{benchmark, question, similarity}``; None if none."""
        score, best = max_similarity(vector, self.index)
        index = self.exact.get(normalized(text))
        if index is None and (best < 0 or score < self.threshold):
            return None
        index = best if index is None else index
        file, question = self.questions[index]
        return {
            "benchmark": file,
            "question": question,
            "similarity": round(float(self.vectors[index] @ vector), 4),
        }


# -- generation -----------------------------------------------------------------------------
def _batch_seed(seed: int, batch: int) -> int:
    digest = hashlib.sha256(f"mtrace-queries|{seed}|{batch}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _validate_item(item: Any, known: set[str]) -> tuple[str, list[str], str | None]:
    """(query, tools, why it is invalid or None)."""
    if not isinstance(item, dict):
        return json.dumps(item, ensure_ascii=False)[:500], [], "not an object"
    missing = [k for k in ("query", "tools") if k not in item]
    if missing:
        return (
            json.dumps(item, ensure_ascii=False)[:500],
            [],
            f"missing key(s) {', '.join(missing)}",
        )
    query, tools = item["query"], item["tools"]
    if not isinstance(query, str) or not query.strip():
        return json.dumps(item, ensure_ascii=False)[:500], [], "query is not a non-empty string"
    if isinstance(tools, str):
        tools = [tools]
    if not isinstance(tools, list) or not tools:
        return query, [], "tools is not a non-empty list"
    names = [str(t) for t in tools]
    unknown = sorted(set(names) - known)
    if unknown:
        return query, [n for n in names if n in known], f"unknown tool(s) {', '.join(unknown)}"
    return query.strip(), list(dict.fromkeys(names)), None


async def generate_queries(config: SynthConfig, progress: bool = True) -> StageResult:
    """Stage ``queries.generate``: OUT/candidates."""
    qc = config.queries
    if qc.seeds is None:
        raise ValueError("synth queries needs seed examples: set queries.seeds (or --seeds)")
    spec = config.need("generator", "queries")
    tools: list[Tool] = load_tools(qc.tools)
    known = {t.name for t in tools}
    seeds = read_seeds(qc.seeds, known)
    if qc.decontaminate and qc.benchmarks:
        # Few-shot examples taken from a test set are the contamination decontamination is
        # for (the reference pipeline seeds with benchmark questions): refuse them up front.
        # A broken benchmark file also fails here, before any spend.
        embedder = load_embedder(config.embedder)
        index = BenchmarkIndex(qc.benchmarks, embedder, qc.decontam_threshold)
        vectors = embedder.encode([s["query"] for s in seeds])
        copies = [
            (n, hit)
            for n, (seed, vector) in enumerate(zip(seeds, vectors, strict=True), 1)
            if (hit := index.match(seed["query"], vector)) is not None
        ]
        if copies:
            shown = "; ".join(
                f"seed {n} {seeds[n - 1]['query']!r} ~ {hit['question']!r} "
                f"({hit['benchmark']}, similarity {hit['similarity']})"
                for n, hit in copies[:3]
            )
            raise ValueError(
                f"{len(copies)} seed example(s) in {qc.seeds} are benchmark questions: "
                f"{shown}. Remove them (or pass --no-decontaminate)"
            )
    out: Dataset[Task] = Dataset.create(config.dir("candidates"), Task)
    model = stage_model(spec, config.backend.for_stage(config.concurrency), out.state, GENERATE)
    template_hash = prompt_hash(PROMPT)

    async def process(batch: int) -> list[Record] | Drop:
        seed = _batch_seed(qc.seed, batch)
        rng = random.Random(seed)
        examples = rng.sample(seeds, min(qc.few_shot, len(seeds)))
        topic = qc.topics[batch % len(qc.topics)] if qc.topics else None
        prompt = render(
            PROMPT,
            tools=tools,
            n=qc.per_batch,
            topic=topic,
            examples=[json.dumps(e, ensure_ascii=False) for e in examples],
        )
        generation = await model.generate(
            [{"role": "user", "content": prompt}],
            sampling=Sampling(temperature=qc.temperature, max_tokens=qc.max_tokens, seed=seed),
        )
        try:
            items = extract_json(generation.text, list)
        except MalformedOutput as exc:
            return Drop(
                "malformed generator output", {"error": str(exc), "output": generation.text[:2000]}
            )
        if not items:
            return Drop("malformed generator output", {"error": "empty list"})
        records: list[Record] = []
        for position, item in enumerate(items):
            query, names, invalid = _validate_item(item, known)
            records.append(
                Task(
                    id=stable_id("cand", qc.seed, batch, position),
                    query=query,
                    tools=names,
                    provenance=Provenance(
                        source="mtrace:queries",
                        model=spec,
                        prompt_hash=template_hash,
                        seed=seed,
                        extra={"batch": batch, "position": position},
                    ),
                    metadata={
                        "batch": batch,
                        "position": position,
                        "topic": topic,
                        "invalid": invalid,
                    },
                )
            )
        return records

    try:
        return await run_synth_stage(
            config,
            GENERATE,
            range(qc.batches),
            lambda b: f"batch-{b:05d}",
            process,
            out,
            progress=progress,
        )
    finally:
        await model.aclose()


# -- filtering ------------------------------------------------------------------------------
async def filter_queries(config: SynthConfig, progress: bool = True) -> StageResult:
    """Stage ``queries.filter``: OUT/candidates -> OUT/queries."""
    qc = config.queries
    candidates: Dataset[Task] = Dataset.open(config.dir("candidates"), Task)
    out: Dataset[Task] = Dataset.create(config.dir("queries"), Task)
    ordered = sorted(
        candidates, key=lambda t: (t.metadata.get("batch", 0), t.metadata.get("position", 0), t.id)
    )
    embedder = load_embedder(config.embedder)
    existing = {t.id: t for t in out}

    bench = BenchmarkIndex(
        qc.benchmarks if qc.decontaminate else [],
        embedder,
        qc.decontam_threshold,
        qc.dedup_search,
    )
    seeds = read_seeds(qc.seeds, set(qc.tools)) if qc.seeds else []
    seed_vectors = encode_in_batches(embedder, [s["query"] for s in seeds])
    valid = [t for t in ordered if not t.metadata.get("invalid")]
    # Embedded a batch at a time as the filter reaches them: a million candidates' vectors
    # are never all in memory, only those of the queries kept (in the index).
    vectors = LazyVectors(embedder, [(t.id, t.query) for t in valid])
    width = vectors.dim
    seed_index = NearestIndex(width, qc.dedup_search)
    seed_index.add_many(seed_vectors)

    kept_ids: list[str] = [t.id for t in ordered if t.id in existing]
    # Rebuilt in generation order, so the index (and every later decision) is the one the
    # interrupted run had at this point.
    kept_index = NearestIndex(width, qc.dedup_search)
    for i in kept_ids:
        kept_index.add(vectors[i])
    tool_counts: Counter[str] = Counter(n for i in kept_ids for n in existing[i].tools)
    topic_counts: Counter[str] = Counter(str(existing[i].metadata.get("topic")) for i in kept_ids)
    kept_by_index = list(kept_ids)

    async def process(task: Task) -> Task | Drop:
        if task.id in existing:  # written before a kill, not yet marked done
            return existing[task.id]
        if task.metadata.get("invalid"):
            return Drop("malformed query", {"error": task.metadata["invalid"], "item": task.query})
        vector = vectors[task.id]
        copy = bench.match(task.query, vector)
        if copy is not None:
            return Drop("benchmark near-copy", {**copy, "query": task.query})
        score, best = max_similarity(vector, seed_index)
        if best >= 0 and score >= qc.dedup_threshold:
            return Drop(
                "near-duplicate of a seed",
                {"seed": seeds[best]["query"], "similarity": round(score, 4)},
            )
        score, best = max_similarity(vector, kept_index)
        if best >= 0 and score >= qc.dedup_threshold:
            return Drop(
                "near-duplicate",
                {"of": kept_by_index[best], "similarity": round(score, 4)},
            )
        if qc.tool_quota is not None:
            full = [n for n in task.tools if tool_counts[n] >= qc.tool_quota]
            if full:
                return Drop("tool quota reached", {"tools": full})
        topic = str(task.metadata.get("topic"))
        if qc.topic_quota is not None and topic_counts[topic] >= qc.topic_quota:
            return Drop("topic quota reached", {"topic": topic})
        kept_index.add(vector)
        kept_by_index.append(task.id)
        tool_counts.update(task.tools)
        topic_counts[topic] += 1
        return Task(
            id=task.id,
            query=task.query,
            tools=task.tools,
            provenance=task.provenance.model_copy(update={"parent_id": task.id}),
            metadata={"topic": task.metadata.get("topic"), "batch": task.metadata.get("batch")},
        )

    # One at a time, in generation order: whether a query is a near-duplicate depends on
    # what was kept before it, and that order must not depend on scheduling or resumes.
    with single_blas_thread():
        return await run_stage(
            FILTER,
            ordered,
            key=lambda t: t.id,
            process=process,
            out=out,
            concurrency=1,
            max_failures=config.max_failures,
            max_failure_rate=config.max_failure_rate,
            progress=progress,
            total=len(ordered),
        )


EMBED_BATCH = 1024


def encode_in_batches(embedder: Embedder, texts: list[str]) -> np.ndarray:
    """``embedder.encode`` a batch at a time (bounded memory for the model's activations)."""
    if not texts:
        return embedder.encode([])
    return np.concatenate(
        [embedder.encode(texts[i : i + EMBED_BATCH]) for i in range(0, len(texts), EMBED_BATCH)]
    )


class LazyVectors:
    """Embeddings of ``(id, text)`` pairs, computed a batch at a time on first access.

    The filter reads them in order, so only the batch in use is held."""

    def __init__(self, embedder: Embedder, items: list[tuple[str, str]]) -> None:
        self.embedder = embedder
        self.items = items
        self.position = {item_id: i for i, (item_id, _) in enumerate(items)}
        self._batch = -1
        self._vectors = np.zeros((0, 1), dtype=np.float32)
        self.dim = embedder.encode([items[0][1]]).shape[1] if items else 1

    def __getitem__(self, item_id: str) -> np.ndarray:
        i = self.position[item_id]
        batch = i // EMBED_BATCH
        if batch != self._batch:
            texts = [t for _, t in self.items[batch * EMBED_BATCH : (batch + 1) * EMBED_BATCH]]
            self._vectors = self.embedder.encode(texts)
            self._batch = batch
        vector: np.ndarray = self._vectors[i - batch * EMBED_BATCH]
        return vector
