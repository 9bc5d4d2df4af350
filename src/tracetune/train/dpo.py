"""Step-wise DPO of an SFT controller on preference pairs (TRL DPOTrainer + PEFT LoRA).

Each pair is the episode so far (system prompt, task with its images, committed steps and
their observations) as the prompt, and two candidate next steps. With LoRA, the reference
model is the policy with its adapter disabled, so it costs no second copy of the weights;
for that reference to be the SFT model, an SFT *adapter* is first merged into its base
(saved to ``out/sft_merged``, which the DPO adapter then applies to).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from tracetune.train.collate import PaddingStats
from tracetune.train.config import DPOConfig
from tracetune.train.data import DataReport, TrainingDataError, check_pair_rows, pair_rows
from tracetune.train.families import freeze_vision
from tracetune.train.lm_head import score_labelled_only_in
from tracetune.train.model import (
    TrainResult,
    adapter_base,
    is_adapter_dir,
    load_for_training,
    local_or_id,
    lora_config,
    resume_checkpoint,
    save_outputs,
    with_time_limit,
)

log = logging.getLogger(__name__)

MERGED_DIR = "sft_merged"


class PreferenceCollator:
    """TRL's vision preference collator, fed only the columns it knows, counting padding."""

    def __init__(self, processor: Any) -> None:
        from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

        # max_length=None: pairs were length-checked; cutting here could cut image tokens.
        self.base = DataCollatorForVisionPreference(processor=processor, max_length=None)
        self.padding = PaddingStats()

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        examples = [{k: r[k] for k in ("prompt", "chosen", "rejected", "images")} for r in rows]
        batch = self.base(examples)
        self.padding.add(batch["attention_mask"])
        return dict(batch)


def policy_start(config: DPOConfig) -> str:
    """The model DPO starts from (and, with LoRA, its reference): SFT adapters get merged.

    The merged model is written to ``out/sft_merged`` (the DPO adapter's base) once, and
    reused when the run is resumed.
    """
    if not is_adapter_dir(config.base):
        return local_or_id(config.base)
    from accelerate import PartialState  # type: ignore[import-untyped]

    # Under `accelerate launch` the main process merges; the others then reuse its output.
    with PartialState().main_process_first():
        return _merge_sft_adapter(config)


def _merge_sft_adapter(config: DPOConfig) -> str:
    merged = config.out / MERGED_DIR
    if (merged / "config.json").is_file():
        log.info("reusing the merged SFT model in %s", merged)
        return str(merged.resolve())
    from peft import PeftModel

    base = adapter_base(config.base)
    log.info("merging SFT adapter %s into %s -> %s", config.base, base, merged)
    # The processor comes from the base with this run's settings, as the SFT run loaded it.
    model, processor = load_for_training(config, path=base)
    model = PeftModel.from_pretrained(model, str(config.base)).merge_and_unload()
    merged.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(merged))
    processor.save_pretrained(str(merged))
    del model
    return str(merged.resolve())


def build_dpo_trainer(
    config: DPOConfig, callbacks: list[Any] | None = None
) -> tuple[Any, Any, DataReport, str]:
    """Pairs checked against the model, then a ready ``DPOTrainer``, its processor and base."""
    from datasets import Dataset as HFDataset  # type: ignore[import-untyped]
    from transformers import set_seed
    from trl import DPOTrainer

    set_seed(config.seed)
    report = DataReport()
    rows = pair_rows(config.pairs, report=report)
    if not rows:
        raise TrainingDataError(f"no pairs in {', '.join(map(str, config.pairs))}")
    start = policy_start(config)
    model, processor = load_for_training(config, path=start)
    rows = check_pair_rows(
        rows, processor, model.config, max_length=config.max_length, report=report
    )
    if not rows:
        raise TrainingDataError(
            f"every pair is longer than max_length={config.max_length}; raise max_length or "
            "lower max_pixels"
        )
    log.info("DPO data: %s", report.summary())
    peft_config = None
    if config.full:
        if config.freeze_vision:
            freeze_vision(model)
    else:
        peft_config = lora_config(config, model)
    trainer = DPOTrainer(
        model=model,
        args=config.to_trl(),
        train_dataset=HFDataset.from_list(rows),
        processing_class=processor,
        data_collator=PreferenceCollator(processor),
        peft_config=peft_config,
        callbacks=callbacks,
    )
    score_labelled_only_in(trainer)
    return trainer, processor, report, start


def train_dpo(config: DPOConfig, callbacks: list[Any] | None = None) -> TrainResult:
    """Train with DPO, then save the adapter (or model) and processor to ``config.out``."""
    started = time.time()
    resume = resume_checkpoint(config)
    trainer, processor, report, start = build_dpo_trainer(
        config, with_time_limit(config, callbacks)
    )
    trainer.train(resume_from_checkpoint=resume)
    extra = {"sft_base": str(config.base)} if start != local_or_id(config.base) else {}
    return save_outputs(trainer, processor, config, "dpo", start, report, started, extra)


def preference_margins(
    model: Any, processor: Any, rows: list[dict[str, Any]], batch_size: int = 4
) -> list[float]:
    """log p(chosen | prompt) - log p(rejected | prompt) per pair, summed over step tokens.

    Rows are DPO rows (:func:`tracetune.train.data.pair_rows`). Use it on held-out pairs
    to see whether training moved the policy toward the verifier's choices.
    """
    import torch

    collator = PreferenceCollator(processor)
    device = next(model.parameters()).device
    margins: list[float] = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            chunk = rows[i : i + batch_size]
            batch = collator(chunk)
            mask = batch.pop("completion_mask")[:, 1:].to(device)
            inputs = {k: v.to(device) for k, v in batch.items()}
            logits = model(**inputs).logits[:, :-1].float()
            targets = inputs["input_ids"][:, 1:]
            logps = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            totals = (logps * mask).sum(dim=1)
            n = len(chunk)
            margins.extend((totals[:n] - totals[n:]).tolist())
    return margins


def load_policy(path: str | Path, adapter: str | Path | None = None) -> tuple[Any, Any]:
    """A trained model (and processor) for evaluation: ``path`` plus an optional adapter."""
    from transformers import AutoModelForImageTextToText

    from tracetune.models.processors import load_processor

    model: Any = AutoModelForImageTextToText.from_pretrained(str(path))
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter))
    return model, load_processor(path)
