"""Supervised fine-tuning of a VLM controller on trajectories (TRL SFTTrainer + PEFT LoRA)."""

from __future__ import annotations

import logging
import time
from typing import Any

from tracetune.train.collate import AgentSFTCollator
from tracetune.train.config import SFTConfig
from tracetune.train.data import DataReport, TrainingDataError, check_sft_rows, sft_rows
from tracetune.train.families import freeze_vision
from tracetune.train.lm_head import score_labelled_only_in
from tracetune.train.model import (
    TrainResult,
    load_for_training,
    local_or_id,
    lora_config,
    resume_checkpoint,
    save_outputs,
    training_chat_template,
    with_time_limit,
)

log = logging.getLogger(__name__)


def build_sft_trainer(
    config: SFTConfig, callbacks: list[Any] | None = None
) -> tuple[Any, Any, DataReport]:
    """Rows checked against the model, then a ready ``SFTTrainer`` (and the processor).

    Every check runs here, before any training step: bad records raise
    :class:`~tracetune.train.data.TrainingDataError` naming them.
    """
    from datasets import Dataset as HFDataset  # type: ignore[import-untyped]
    from transformers import set_seed
    from trl import SFTTrainer

    set_seed(config.seed)
    report = DataReport()
    rows = sft_rows(
        config.data,
        only_completed=config.only_completed,
        mask_failed_steps=config.mask_failed_steps,
        report=report,
    )
    if not rows:
        raise TrainingDataError(
            f"no trainable records in {', '.join(map(str, config.data))} "
            f"({report.records} records, {len(report.skipped)} skipped)"
        )
    model, processor = load_for_training(config)
    template = training_chat_template(processor)
    rows = check_sft_rows(
        rows,
        processor,
        model.config,
        max_length=config.max_length,
        overlong=config.overlong,
        chat_template=template,
        report=report,
    )
    if not rows:
        raise TrainingDataError(
            f"every sample is longer than max_length={config.max_length}; raise max_length, "
            "lower max_pixels, or use overlong: truncate"
        )
    log.info("SFT data: %s", report.summary())
    peft_config = None
    if config.full:
        if config.freeze_vision:
            log.info("froze %d vision-encoder parameters", freeze_vision(model))
    else:
        peft_config = lora_config(config, model)
    trainer = SFTTrainer(
        model=model,
        args=config.to_trl(),
        train_dataset=HFDataset.from_list(rows),
        processing_class=processor,
        data_collator=AgentSFTCollator(processor, template),
        peft_config=peft_config,
        callbacks=callbacks,
    )
    score_labelled_only_in(trainer)
    return trainer, processor, report


def train_sft(config: SFTConfig, callbacks: list[Any] | None = None) -> TrainResult:
    """Train, then save the adapter (or model) and processor to ``config.out``.

    The result loads back with ``local:`` (``TrainResult.usage_hint`` says how).
    """
    started = time.time()
    resume = resume_checkpoint(config)
    trainer, processor, report = build_sft_trainer(config, with_time_limit(config, callbacks))
    trainer.train(resume_from_checkpoint=resume)
    return save_outputs(
        trainer, processor, config, "sft", local_or_id(config.base), report, started
    )
