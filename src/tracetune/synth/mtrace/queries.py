"""Query generation: seed examples and the tool catalogue in, new diverse queries out.

Two stages, both resumable:

* ``queries.generate`` (OUT/candidates): each generator call sees the tool catalogue and
  ``few_shot`` seed examples drawn at random for that call (seeded, so a rerun draws the
  same), and writes ``per_batch`` queries as a JSON list of ``{query, tools}``. A call whose
  output is not such a list is dropped with its reason; a list item with missing keys or
  unknown tools becomes a candidate marked ``invalid``, so the filter counts it.
* ``queries.filter`` (OUT/queries): candidates in generation order are dropped when
  malformed, too close to a benchmark question (decontamination), a near-copy of a seed or
  of a query already kept (embedding similarity), or over a tool/topic quota. They are
  embedded and searched a block at a time, then decided one by one against what was kept
  before them. Going in a fixed order, with blocks at fixed positions, makes the kept set the
  same however often the run was resumed.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tracetune.errors import ConfigError
from tracetune.inputs import InputError, read_text
from tracetune.models.base import Sampling
from tracetune.prompts import prompt_hash, render
from tracetune.runner import Drop, StageResult, outcome, run_stage
from tracetune.runner.executor import use_executor
from tracetune.schema import STORAGE_CONTEXT, Provenance, Record, Task
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
from tracetune.timelimit import TimedBudget
from tracetune.tools import Tool, load_tools

GENERATE = "queries.generate"
FILTER = "queries.filter"
PROMPT = "mtrace/queries.jinja"


def read_seeds(path: Path, known_tools: set[str]) -> list[dict[str, Any]]:
    """Seed examples ``{query, tools}`` from JSONL; tools must be in the catalogue."""
    if not path.is_file():
        raise InputError(f"seed file {path} does not exist (JSONL of {{query, tools}})")
    seeds = []
    for lineno, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if (
            not isinstance(row, dict)
            or not isinstance(row.get("query"), str)
            or not isinstance(row.get("tools"), list)
        ):
            raise InputError(
                f'{path}:{lineno}: each seed needs a "query" string and a "tools" list'
            )
        unknown = sorted(set(map(str, row["tools"])) - known_tools)
        if unknown:
            raise InputError(
                f"{path}:{lineno}: seed uses tools {unknown} that are not in the catalogue "
                f"(queries.tools: {', '.join(sorted(known_tools))}); add them or fix the seed"
            )
        seeds.append({"query": row["query"], "tools": [str(t) for t in row["tools"]]})
    if not seeds:
        raise InputError(f"seed file {path} has no examples")
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
        raise InputError(f"benchmark folder {path} has no dataset.json (GTA) or metadata.jsonl")
    if not path.is_file():
        raise InputError(f"benchmark file {path} does not exist")
    text = read_text(path)  # names the file when it is not UTF-8
    rows: list[Any]
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(
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
                    raise InputError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    else:
        rows = [line for line in text.splitlines() if line.strip()]
    questions = [q for q in map(_row_question, rows) if q and q.strip()]
    if not questions:
        raise InputError(
            f"found no questions in {path}: rows need one of {', '.join(_QUESTION_KEYS)} "
            "(or GTA dialogs)"
        )
    return questions


def normalized(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


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
        return self.match_many([text], np.asarray(vector).reshape(1, -1))[0]

    def match_many(self, texts: list[str], vectors: np.ndarray) -> list[dict[str, Any] | None]:
        """:meth:`match` for each text and its vector (one batched search)."""
        if not self.questions:
            return [None] * len(texts)
        scores, bests = self.index.nearest_many(vectors)
        found: list[dict[str, Any] | None] = []
        for text, vector, score, best in zip(texts, vectors, scores, bests, strict=True):
            index = self.exact.get(normalized(text))
            if index is None and (best < 0 or score < self.threshold):
                found.append(None)
                continue
            index = int(best) if index is None else index
            file, question = self.questions[index]
            found.append(
                {
                    "benchmark": file,
                    "question": question,
                    "similarity": round(float(self.vectors[index] @ vector), 4),
                }
            )
        return found


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
        raise ConfigError("synth queries needs seed examples: set queries.seeds (or --seeds)")
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
            raise InputError(
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
# Candidates are decided a block at a time: one batched embedding and one batched search of
# each index per block, then each candidate in order, against the index and (exactly) the
# block's earlier keepers. Blocks start at fixed positions of the generation order, so a
# resumed run searches the same index states and decides alike.
FILTER_BLOCK = 256


class CandidateOrder:
    """OUT/candidates in generation order: held as one Arrow table (a few hundred bytes a
    candidate, not a record object each) and turned into records a block at a time."""

    def __init__(self, dataset: Dataset[Task]) -> None:
        self.table = dataset.table().combine_chunks()  # one chunk: cheap takes
        ids = self.table.column("id").to_pylist()
        keys = []
        for item_id, meta in zip(ids, self.table.column("metadata").to_pylist(), strict=True):
            info = json.loads(meta) if meta else {}
            keys.append((info.get("batch", 0), info.get("position", 0), item_id))
        self.order = np.array(sorted(range(len(keys)), key=keys.__getitem__), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.order)

    def blocks(self, size: int) -> Iterator[list[Task]]:
        for start in range(0, len(self.order), size):
            rows = self.table.take(self.order[start : start + size]).to_pylist()
            yield [Task.model_validate(row, context=STORAGE_CONTEXT) for row in rows]


class QueryFilter:
    """The filter's decisions and what it has kept so far (index, ids, quota counts)."""

    def __init__(self, config: SynthConfig, embedder: Embedder) -> None:
        qc = self.qc = config.queries
        self.embedder = embedder
        self.bench = BenchmarkIndex(
            qc.benchmarks if qc.decontaminate else [],
            embedder,
            qc.decontam_threshold,
            qc.dedup_search,
        )
        self.seeds = read_seeds(qc.seeds, set(qc.tools)) if qc.seeds else []
        width = embedder.encode(["."]).shape[1]
        self.seed_index = NearestIndex(width, qc.dedup_search)
        self.seed_index.add_many(encode_in_batches(embedder, [s["query"] for s in self.seeds]))
        # It grows as it is searched: its graph's inserts run in a process of their own.
        self.kept_index = NearestIndex(width, qc.dedup_search, background=True)
        self.kept_ids: list[str] = []  # by position in kept_index
        self.tool_counts: Counter[str] = Counter()
        self.topic_counts: Counter[str] = Counter()

    def close(self) -> None:
        self.kept_index.close()

    def _encode(self, tasks: list[Task]) -> np.ndarray:
        return self.embedder.encode([t.query for t in tasks])

    def _keep(self, tasks: list[Task], vectors: np.ndarray) -> None:
        self.kept_index.add_many(vectors)
        self.kept_ids.extend(t.id for t in tasks)
        for task in tasks:
            self.tool_counts.update(task.tools)
            self.topic_counts[str(task.metadata.get("topic"))] += 1

    def absorb(self, kept: list[Task]) -> None:
        """Take in the kept queries of a block decided by an earlier run (none kept is
        taken in too: the index answers as it did when it saw the same blocks)."""
        vectors = self._encode(kept) if kept else np.zeros((0, self.kept_index.dim), np.float32)
        self._keep(kept, vectors)

    def decide(self, block: list[Task]) -> Iterator[tuple[Task, Task | Drop]]:
        """Each candidate of ``block`` (in order) with its outcome, decided as it is asked
        for; the block's keepers join the index once the last one is decided."""
        valid = [t for t in block if not t.metadata.get("invalid")]
        vectors = self._encode(valid)
        searched = _BlockSearch(
            vectors=vectors,
            copies=self.bench.match_many([t.query for t in valid], vectors),
            seed=self.seed_index.nearest_many(vectors),
            kept=self.kept_index.nearest_many(vectors),
            within=vectors @ vectors.T,
        )
        rows = iter(range(len(valid)))
        for task in block:
            row = -1 if task.metadata.get("invalid") else next(rows)
            yield task, self.decide_one(task, row, searched)
        self._keep([valid[r] for r in searched.kept_rows], vectors[searched.kept_rows])

    def decide_one(self, task: Task, row: int, searched: _BlockSearch) -> Task | Drop:
        """One candidate's outcome, given the block's searches (``row``: its row in them)."""
        qc = self.qc
        if row < 0:
            return Drop("malformed query", {"error": task.metadata["invalid"], "item": task.query})
        if (copy := searched.copies[row]) is not None:
            return Drop("benchmark near-copy", {**copy, "query": task.query})
        score, best = float(searched.seed[0][row]), int(searched.seed[1][row])
        if best >= 0 and score >= qc.dedup_threshold:
            return Drop(
                "near-duplicate of a seed",
                {"seed": self.seeds[best]["query"], "similarity": round(score, 4)},
            )
        score, best = float(searched.kept[0][row]), int(searched.kept[1][row])
        of = self.kept_ids[best] if best >= 0 else None
        if searched.kept_rows:  # the block's earlier keepers (the index wins a tie: earlier)
            sims = searched.within[row, searched.kept_rows]
            inner = int(sims.argmax())
            if of is None or float(sims[inner]) > score:
                score, of = float(sims[inner]), searched.kept_ids[inner]
        if of is not None and score >= qc.dedup_threshold:
            return Drop("near-duplicate", {"of": of, "similarity": round(score, 4)})
        if qc.tool_quota is not None:
            full = [n for n in task.tools if self.tool_counts[n] >= qc.tool_quota]
            if full:
                return Drop("tool quota reached", {"tools": full})
        topic = str(task.metadata.get("topic"))
        if qc.topic_quota is not None and self.topic_counts[topic] >= qc.topic_quota:
            return Drop("topic quota reached", {"topic": topic})
        searched.kept_rows.append(row)
        searched.kept_ids.append(task.id)
        self.tool_counts.update(task.tools)
        self.topic_counts[topic] += 1
        return Task(
            id=task.id,
            query=task.query,
            tools=task.tools,
            provenance=task.provenance.model_copy(update={"parent_id": task.id}),
            metadata={"topic": task.metadata.get("topic"), "batch": task.metadata.get("batch")},
        )


@dataclass
class _BlockSearch:
    """One block's batched searches, and its keepers so far (rows and ids)."""

    vectors: np.ndarray
    copies: list[dict[str, Any] | None]
    seed: tuple[np.ndarray, np.ndarray]
    kept: tuple[np.ndarray, np.ndarray]
    within: np.ndarray
    kept_rows: list[int] = field(default_factory=list)
    kept_ids: list[str] = field(default_factory=list)


async def filter_queries(config: SynthConfig, progress: bool = True) -> StageResult:
    """Stage ``queries.filter``: OUT/candidates -> OUT/queries."""
    candidates: Dataset[Task] = Dataset.open(config.dir("candidates"), Task)
    out: Dataset[Task] = Dataset.create(config.dir("queries"), Task)
    order = CandidateOrder(candidates)
    query_filter = QueryFilter(config, load_embedder(config.embedder))
    state = out.state
    finished = state.keys(FILTER, "done") | state.keys(FILTER, "dropped")
    finished -= outcome.dropped_to_retry(state, FILTER, quiet=True)
    written = out.ids()

    def decided() -> Iterator[tuple[Task, Task | Drop | None]]:
        for block in order.blocks(FILTER_BLOCK):
            if all(t.id in finished for t in block):  # a resumed run passes over it
                query_filter.absorb([t for t in block if t.id in written])
                yield from ((t, None) for t in block)  # skipped as done, never processed
            else:
                yield from query_filter.decide(block)

    async def process(item: tuple[Task, Task | Drop | None]) -> Task | Drop:
        task, decision = item
        if decision is None:
            raise RuntimeError(f"{task.id} was taken as finished by the filter but not the run")
        return decision  # a keeper already on disk is recognised by its id, not duplicated

    # One block after another, in generation order, in this process: whether a query is a
    # near-duplicate depends on what was kept before it, and that must not depend on
    # scheduling, executors or resumes. One BLAS thread: the same sums every run.
    with single_blas_thread(), use_executor("local"), closing(query_filter):
        return await run_stage(
            FILTER,
            decided(),
            key=lambda item: item[0].id,
            process=process,
            out=out,
            concurrency=1,
            # the filter spends nothing: of the run's budgets only its clock applies here
            budget=TimedBudget(max_seconds=config.max_time, started=config.budget().started),
            max_failures=config.max_failures,
            max_failure_rate=config.max_failure_rate,
            progress=progress,
            total=len(order),
        )


EMBED_BATCH = 1024


def encode_in_batches(embedder: Embedder, texts: list[str]) -> np.ndarray:
    """``embedder.encode`` a batch at a time (bounded memory for the model's activations)."""
    if not texts:
        return embedder.encode([])
    return np.concatenate(
        [embedder.encode(texts[i : i + EMBED_BATCH]) for i in range(0, len(texts), EMBED_BATCH)]
    )
