"""The SFT collator: TRL's vision collator with assistant-only loss, plus per-turn masks.

TRL renders each chat with the processor (images expanded into image tokens) and, with
``assistant_only_loss``, keeps labels only where the chat template's ``{% generation %}``
markers put assistant text. On top of that this collator removes the loss from assistant
turns flagged ``False`` in a row's ``train_turns`` (failed steps kept as context) and
counts padding, which the benchmark reports.

Each row is encoded once (chat template, image loading and preprocessing, the loss mask)
and kept: later epochs only pad and concatenate cached tensors, so the per-step cost is
the model's arithmetic rather than re-rendering and re-reading every image. The cache holds
at most ``cache_bytes`` of tensors (4 GiB by default); rows past it are encoded again each
epoch, so a dataset of millions of rows trains in bounded memory. Batches whose
image tensors cannot simply be concatenated (a variable number of images per sample in a
family that stacks them per sample, e.g. Idefics3) are encoded whole, as before.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from tracetune.train.data import TrainingDataError, mask_spans

IGNORE_INDEX = -100


@dataclass
class PaddingStats:
    """Padding tokens per batch, as a fraction of all token slots."""

    fractions: list[float] = field(default_factory=list)

    def add(self, attention_mask: Any) -> None:
        total = attention_mask.numel()
        self.fractions.append(1.0 - float(attention_mask.sum()) / total if total else 0.0)

    @property
    def mean(self) -> float:
        return sum(self.fractions) / len(self.fractions) if self.fractions else 0.0


_SEQUENCE_PAD = {"input_ids": None, "labels": IGNORE_INDEX}
"""Padding values of per-token tensors (None: the tokenizer's pad id; others pad with 0)."""
_CONCAT_KEYS = ("pixel_values", "image_grid_thw", "image_sizes")
"""Image tensors a batch holds as the concatenation of its samples' (Qwen-VL, LLaVA)."""


class AgentSFTCollator:
    """Batches SFT rows: pixel values, input ids, and labels on trained assistant turns."""

    def __init__(
        self,
        processor: Any,
        chat_template: str | None = None,
        cache: bool = True,
        cache_bytes: int = 4 << 30,
    ) -> None:
        from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

        self.base = DataCollatorForVisionLanguageModeling(
            processor=processor,
            max_length=None,  # rows were length-checked; truncation here could cut images
            assistant_only_loss=True,
            chat_template=chat_template,
        )
        self.padding = PaddingStats()
        tokenizer = getattr(processor, "tokenizer", processor)
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self.cache: dict[str, dict[str, Any]] | None = {} if cache else None
        self.cache_bytes = cache_bytes
        self.cached_bytes = 0
        self.encoded = 0  # rows encoded (a row once with the cache on, if it fits)

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        if self.cache is not None:
            encoded = [self._encode_cached(row) for row in rows]
            batch = self._combine(encoded)
            if batch is not None:
                self.padding.add(batch["attention_mask"])
                return batch
        batch = self._encode(rows)
        self.padding.add(batch["attention_mask"])
        return batch

    @staticmethod
    def _row_key(row: dict[str, Any]) -> str:
        """The row's content (not just its id: an edited row must be encoded again)."""
        blob = json.dumps(
            [row["messages"], row["images"], row.get("train_turns")], default=str, sort_keys=True
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def _encode_cached(self, row: dict[str, Any]) -> dict[str, Any]:
        assert self.cache is not None
        key = self._row_key(row)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        single = self._encode([row])
        tensors = {k: v for k, v in single.items() if hasattr(v, "shape")}
        size = sum(int(t.numel()) * t.element_size() for t in tensors.values())
        if self.cached_bytes + size <= self.cache_bytes:
            self.cache[key] = tensors
            self.cached_bytes += size
        return tensors

    def _combine(self, encoded: list[dict[str, Any]]) -> dict[str, Any] | None:
        """Pad per-token tensors and concatenate image tensors; None when they do not fit."""
        import torch

        keys = set(encoded[0])
        if any(set(e) != keys for e in encoded):
            return None
        longest = max(int(e["input_ids"].shape[1]) for e in encoded)
        batch: dict[str, Any] = {}
        for key in keys:
            tensors = [e[key] for e in encoded]
            if key in _CONCAT_KEYS:
                if any(t.shape[1:] != tensors[0].shape[1:] for t in tensors):
                    return None
                batch[key] = torch.cat(tensors, dim=0)
                continue
            per_token = all(
                t.dim() == 2 and t.shape[0] == 1 and t.shape[1] == e["input_ids"].shape[1]
                for t, e in zip(tensors, encoded, strict=True)
            )
            if not per_token:
                return None  # e.g. per-sample stacked images: encode the batch whole
            fill = _SEQUENCE_PAD.get(key, 0)
            value = self.pad_id if fill is None else fill
            out = torch.full((len(tensors), longest), value, dtype=tensors[0].dtype)
            for i, t in enumerate(tensors):
                out[i, : t.shape[1]] = t[0]  # right padding, as the processor pads
            batch[key] = out
        return batch

    def _encode(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        self.encoded += len(rows)
        examples = [{"messages": r["messages"], "images": list(r["images"])} for r in rows]
        batch = self.base(examples)
        labels = batch["labels"]
        for i, row in enumerate(rows):
            turns = row.get("train_turns")
            if not turns or all(turns):
                continue
            spans = mask_spans((labels[i] != IGNORE_INDEX).tolist())
            if len(spans) != len(turns):
                raise TrainingDataError(
                    f"record {row.get('id')}: {len(spans)} labelled spans for {len(turns)} "
                    "assistant turns; the chat template's generation markers are off"
                )
            for (start, end), train in zip(spans, turns, strict=True):
                if not train:
                    labels[i, start:end] = IGNORE_INDEX
        return dict(batch)
