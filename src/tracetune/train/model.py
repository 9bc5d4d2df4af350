"""Loading models for training, choosing the training chat template, and writing outputs."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tracetune.errors import ConfigError
from tracetune.train.config import TrainOptions
from tracetune.train.data import DataReport

log = logging.getLogger(__name__)

RUN_FILE = "tracetune_train.json"


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def adapter_base(adapter: str | Path) -> str:
    """The base model an adapter directory was trained on (from its adapter_config.json)."""
    cfg = json.loads((Path(adapter) / "adapter_config.json").read_text())
    base = cfg.get("base_model_name_or_path")
    if not base:
        raise ConfigError(
            f"{adapter}/adapter_config.json does not name its base model; merge it with "
            "`tracetune model merge --base BASE --adapter DIR --out MERGED` and pass MERGED"
        )
    return str(base)


def local_or_id(name: str) -> str:
    """A model name as an absolute path when it is a local directory, else as given."""
    path = Path(name).expanduser()
    # Absolute paths end up in adapter_config.json, so `local:` finds the base from anywhere.
    return str(path.resolve()) if path.exists() else name


def load_for_training(options: TrainOptions, path: str | None = None) -> tuple[Any, Any]:
    """The model (fp32, or bf16 when training in bf16) and its processor."""
    import torch
    from transformers import AutoModelForImageTextToText

    from tracetune.models.processors import load_processor

    name = local_or_id(path or options.base)
    bf16 = options.precision_flags()[0]
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            name,
            dtype=torch.bfloat16 if bf16 else torch.float32,
            trust_remote_code=options.trust_remote_code,
        )
        processor = load_processor(
            name,
            max_pixels=options.max_pixels,
            min_pixels=options.min_pixels,
            trust_remote_code=options.trust_remote_code,
        )
    except OSError as exc:
        raise ConfigError(
            f"cannot load {name}: {exc}\n(pass a checkpoint directory, or a hub id whose "
            "weights are in the local cache)"
        ) from exc
    if options.chat_template is not None:
        if not options.chat_template.is_file():
            raise ConfigError(f"chat_template {options.chat_template} does not exist")
        processor.chat_template = options.chat_template.read_text()
    tokenizer = getattr(processor, "tokenizer", processor)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The model must agree with the collator on padding (TRL mirrors this only for its own
    # collator).
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


def training_chat_template(processor: Any) -> str | None:
    """The template to train with: None when the processor's has generation markers.

    Hub templates (Qwen2.5-VL, SmolVLM, LLaVA-NeXT, ...) have no ``{% generation %}``
    markers; TRL ships marked copies that render the same text. Others need ``chat_template``.
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    template = processor.chat_template
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise ConfigError(
            "the processor has no chat template; pass chat_template: a Jinja file with "
            "{% generation %} markers around assistant turns"
        )
    if has_generation_markers(template):
        return None
    try:
        return get_training_chat_template(processor)
    except ValueError as exc:
        raise ConfigError(
            "the model's chat template has no {% generation %} markers and TRL has no "
            "training version of it, so assistant turns cannot be told apart from the rest; "
            "pass chat_template: a copy of the template with {% generation %} ... "
            "{% endgeneration %} around each assistant message's content and end-of-turn token"
        ) from exc


def lora_config(options: TrainOptions, model: Any) -> Any:
    from peft import LoraConfig

    from tracetune.train.families import lora_target_regex

    return LoraConfig(
        r=options.lora.r,
        lora_alpha=options.lora.alpha,
        lora_dropout=options.lora.dropout,
        target_modules=lora_target_regex(model, options.lora.targets),
        task_type="CAUSAL_LM",
    )


def last_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint that was written to the end, or None.

    The trainer writes a checkpoint's files one by one and its ``trainer_state.json`` last, so
    a run killed while saving leaves a directory without it; resuming from that one would
    fail. Such a partial checkpoint is skipped (and logged): the previous one is complete.
    """
    import re

    if not ckpt_dir.is_dir():
        return None
    numbered = []
    for child in ckpt_dir.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", child.name)
        if match and child.is_dir():
            numbered.append((int(match.group(1)), child))
    for _, path in sorted(numbered, reverse=True):
        if (path / "trainer_state.json").is_file():
            return path
        log.warning("skipping %s: it was not written to the end (the run was killed)", path)
    return None


def resume_checkpoint(options: TrainOptions) -> str | None:
    """The checkpoint to resume from; refuses to silently mix two runs in one directory."""
    ckpt_dir = options.out / "checkpoints"
    last = last_complete_checkpoint(ckpt_dir)
    if options.resume:
        if last is None:
            raise ConfigError(
                f"resume: no checkpoint in {ckpt_dir}; drop --resume to start a new run"
            )
        log.info("resuming from %s", last)
        return str(last)
    if last is not None:
        raise ConfigError(
            f"{ckpt_dir} already holds {Path(last).name}; pass --resume to continue that run "
            "or choose another --out"
        )
    return None


@dataclass
class TrainResult:
    """Where the trained weights are and how the run went."""

    out: Path
    base: str
    adapter: bool
    steps: int
    metrics: dict[str, float]
    log_history: list[dict[str, Any]]
    report: DataReport
    padding_fraction: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def model_spec(self) -> str:
        """The ``local:`` spec of the trained model (pair it with ``adapter=out`` for LoRA)."""
        return f"local:{self.base}" if self.adapter else f"local:{self.out}"

    def losses(self) -> list[float]:
        return [float(e["loss"]) for e in self.log_history if "loss" in e]

    def usage_hint(self) -> str:
        if self.adapter:
            return (
                f"load with --model {self.model_spec} and the adapter {self.out} "
                f"(ModelOptions(adapter=...)); merge with `tracetune model merge --base "
                f"{self.base} --adapter {self.out} --out MERGED`"
            )
        return f"load with --model {self.model_spec}"


def with_time_limit(config: Any, callbacks: list[Any] | None) -> list[Any] | None:
    """``callbacks`` plus a wall-clock limit when the config sets ``max_time``."""
    if config.max_time is None:
        return callbacks
    from tracetune.timelimit import time_limit_callback

    return [*(callbacks or []), time_limit_callback(config.max_time)]


def _carry_scratch_marker(base: str, out: Path) -> None:
    """Keep a from-scratch controller's marker with its trained weights (see from_scratch)."""
    import shutil

    from tracetune.train.config import SCRATCH_MARKER, from_scratch

    source = Path(local_or_id(base))
    if from_scratch(source) and not (out / SCRATCH_MARKER).exists():
        found = source / SCRATCH_MARKER
        if found.is_file():
            shutil.copy(found, out / SCRATCH_MARKER)


def save_outputs(
    trainer: Any,
    processor: Any,
    options: TrainOptions,
    kind: str,
    base: str,
    report: DataReport,
    started: float,
    extra: dict[str, Any] | None = None,
) -> TrainResult:
    """Adapter (or full model) + processor in ``out``, plus a record of the run."""
    import peft
    import transformers
    import trl

    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    trainer.save_model(str(out))
    if trainer.accelerator.is_main_process:
        processor.save_pretrained(str(out))
        _carry_scratch_marker(options.base, out)
    history = list(trainer.state.log_history)
    metrics = {k: v for e in history for k, v in e.items() if k.startswith("train_")}
    collator = trainer.data_collator
    padding = getattr(getattr(collator, "padding", None), "mean", None)
    result = TrainResult(
        out=out,
        base=base,
        adapter=not options.full,
        steps=int(trainer.state.global_step),
        metrics=metrics,
        log_history=history,
        report=report,
        padding_fraction=padding,
        extra=extra or {},
    )
    stopped = next(
        (
            c.stopped_at_step
            for c in trainer.callback_handler.callbacks
            if getattr(c, "stopped_at_step", None) is not None
        ),
        None,
    )
    if stopped is not None:
        result.extra["stopped"] = f"time budget reached after step {stopped}"
    if trainer.accelerator.is_main_process:
        record = {
            "kind": kind,
            "base": base,
            "adapter": result.adapter,
            "config": json.loads(options.model_dump_json()),
            "data": report.to_dict(),
            "steps": result.steps,
            "metrics": metrics,
            "padding_fraction": padding,
            "seconds": round(time.time() - started, 1),
            "versions": {
                "transformers": transformers.__version__,
                "trl": trl.__version__,
                "peft": peft.__version__,
            },
            **result.extra,
        }
        (out / RUN_FILE).write_text(json.dumps(record, indent=2, default=str) + "\n")
    return result
