"""The SFT collator: TRL's vision collator with assistant-only loss, plus per-turn masks.

TRL renders each chat with the processor (images expanded into image tokens) and, with
``assistant_only_loss``, keeps labels only where the chat template's ``{% generation %}``
markers put assistant text. On top of that this collator removes the loss from assistant
turns flagged ``False`` in a row's ``train_turns`` (failed steps kept as context) and
counts padding, which the benchmark reports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tracetune.train.data import TrainingDataError, _spans

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


class AgentSFTCollator:
    """Batches SFT rows: pixel values, input ids, and labels on trained assistant turns."""

    def __init__(self, processor: Any, chat_template: str | None = None) -> None:
        from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

        self.base = DataCollatorForVisionLanguageModeling(
            processor=processor,
            max_length=None,  # rows were length-checked; truncation here could cut images
            assistant_only_loss=True,
            chat_template=chat_template,
        )
        self.padding = PaddingStats()

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        examples = [{"messages": r["messages"], "images": r["images"]} for r in rows]
        batch = self.base(examples)
        labels = batch["labels"]
        for i, row in enumerate(rows):
            turns = row.get("train_turns")
            if not turns or all(turns):
                continue
            spans = _spans((labels[i] != IGNORE_INDEX).tolist())
            if len(spans) != len(turns):
                raise TrainingDataError(
                    f"record {row.get('id')}: {len(spans)} labelled spans for {len(turns)} "
                    "assistant turns; the chat template's generation markers are off"
                )
            for (start, end), train in zip(spans, turns, strict=True):
                if not train:
                    labels[i, start:end] = IGNORE_INDEX
        self.padding.add(batch["attention_mask"])
        return dict(batch)
