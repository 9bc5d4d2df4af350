"""Training configs: what a YAML file or the CLI flags fill, mapped onto TRL's configs.

Our fields are the decisions a user of these recipes makes (LoRA or full, rank, what to
freeze, sequence and image budgets); everything else TRL accepts can still be set through
``trl:``. The values TRL must not take for vision data (packing, padding-free, truncation
inside the collator, precomputed reference log-probs) are fixed here and rejected if set.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tracetune.errors import ConfigError
from tracetune.train.families import LoraTargets

Precision = Literal["auto", "bf16", "fp16", "fp32"]

# Forbidden for image data: each silently corrupts samples or crashes mid-run (ENVIRONMENT.md).
_FORBIDDEN_TRL = {
    "packing": "packing concatenates samples, and image features would go to the wrong sample",
    "padding_free": "padding-free batches are not supported for vision inputs",
    "max_length": "set max_length on our config: it drops or cuts samples at turn boundaries "
    "instead of cutting through image tokens",
    "truncation_mode": "samples are never truncated inside the collator",
    "precompute_ref_log_probs": "reference log-probs cannot be precomputed for image inputs",
    "assistant_only_loss": "loss is always on assistant turns only",
    "output_dir": "use out",
}


class LoraOptions(BaseModel):
    """LoRA adapter settings (ignored with ``full: true``)."""

    model_config = ConfigDict(extra="forbid")

    r: int = Field(default=16, ge=1, description="LoRA rank (MATRIX: 128 for Qwen2-VL-7B).")
    alpha: int = Field(default=32, ge=1, description="LoRA alpha; the update is scaled by alpha/r.")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    targets: LoraTargets | list[str] = Field(
        default="attention",
        description="Language-model layers that get adapters: 'attention' (q/k/v/o "
        "projections, the MATRIX recipe), 'attention_mlp' (plus gate/up/down), 'all_linear', "
        "or a list of layer names. The vision tower never gets adapters.",
    )


class TrainOptions(BaseModel):
    """Settings shared by SFT and DPO."""

    model_config = ConfigDict(extra="forbid")

    base: str = Field(
        description="Base model: a checkpoint directory or a hub id (hub ids need the weights "
        "in the local cache). For DPO, an SFT output directory (adapter or full)."
    )
    out: Path = Field(description="Output directory: adapter (or model) and processor.")
    full: bool = Field(default=False, description="Full fine-tuning instead of a LoRA adapter.")
    lora: LoraOptions = Field(default_factory=LoraOptions, description="LoRA settings.")
    freeze_vision: bool = Field(
        default=True,
        description="Keep the vision encoder frozen (with LoRA it never trains; this also "
        "freezes it under full fine-tuning). The projector trains under full fine-tuning.",
    )
    epochs: float = Field(default=3.0, gt=0, description="Passes over the data.")
    max_steps: int = Field(
        default=-1, description="Stop after this many optimizer steps (-1: run all epochs)."
    )
    lr: float | None = Field(
        default=None,
        gt=0,
        description="Peak learning rate (default: 1e-4 for LoRA SFT, 1e-5 full SFT; "
        "5e-6 LoRA DPO, 5e-7 full DPO; for a controller built from config by `tracetune "
        "model init` and trained from scratch: 1e-3 full SFT, 5e-5 full DPO).",
    )
    max_time: float | None = Field(
        default=None,
        gt=0,
        description="Stop training after this many seconds of training (after the step in "
        "flight) and save the model as at the end of a normal run.",
    )
    scheduler: str = Field(
        default="cosine", description="Learning-rate schedule (a transformers scheduler name)."
    )
    warmup: float = Field(
        default=0.01, ge=0, description="Warmup: a fraction of all steps if < 1, else steps."
    )
    weight_decay: float = Field(default=0.1, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(default=1, ge=1, description="Samples per device per step.")
    grad_accum: int = Field(default=8, ge=1, description="Gradient accumulation steps.")
    max_length: int = Field(
        default=8192,
        ge=16,
        description="Most tokens per sample, image tokens included; longer samples are "
        "reported and dropped (SFT: or cut at a turn boundary, see overlong).",
    )
    max_pixels: int | None = Field(
        default=None,
        description="Qwen-style processors: most pixels per image (tokens = pixels / 784). "
        "Bounds image tokens; e.g. 401408 (512 tokens) for 7B training.",
    )
    min_pixels: int | None = Field(
        default=None, description="Qwen-style processors: fewest pixels per image."
    )
    chat_template: Path | None = Field(
        default=None,
        description="A Jinja chat template file to train with (and save with the model), "
        "for checkpoints whose template has no {% generation %} markers and no TRL "
        "training template.",
    )
    gradient_checkpointing: bool = Field(
        default=True, description="Recompute activations in the backward pass to save memory."
    )
    precision: Precision = Field(
        default="auto", description="'auto': bf16 on GPUs that support it, else fp32."
    )
    group_by_length: bool = Field(
        default=True, description="Batch samples of similar length together (less padding)."
    )
    seed: int = Field(default=42, description="Seed for data order, dropout and LoRA init.")
    logging_steps: int = Field(default=10, ge=1, description="Log every this many steps.")
    save_steps: int = Field(default=500, ge=1, description="Checkpoint every this many steps.")
    save_total_limit: int | None = Field(
        default=2, description="Keep at most this many checkpoints (None: all)."
    )
    resume: bool = Field(
        default=False, description="Continue from the latest checkpoint in out/checkpoints."
    )
    report_to: list[str] = Field(
        default_factory=lambda: ["none"],
        description="Experiment trackers (e.g. ['wandb'], ['tensorboard']).",
    )
    num_workers: int = Field(default=0, ge=0, description="Data-loader worker processes.")
    threads: int | None = Field(
        default=None,
        ge=1,
        description="CPU threads for the model's arithmetic (torch intra-op threads; default: "
        "torch's choice). On a CPU shared with other work, 1 is often several times faster "
        "than more threads, which wait on each other at every operation.",
    )
    trust_remote_code: bool = Field(
        default=False, description="Run model code shipped with the checkpoint (MiniCPM-V)."
    )
    trl: dict[str, Any] = Field(
        default_factory=dict,
        description="Any other TRL/transformers training argument, passed through as is.",
    )

    @field_validator("trl")
    @classmethod
    def _check_trl(cls, value: dict[str, Any]) -> dict[str, Any]:
        for key in value:
            if key in _FORBIDDEN_TRL:
                raise ValueError(f"trl.{key} cannot be set: {_FORBIDDEN_TRL[key]}")
        return value

    @model_validator(mode="after")
    def _check_pixels(self) -> TrainOptions:
        if self.max_pixels is not None and self.min_pixels is not None:
            if self.min_pixels > self.max_pixels:
                raise ValueError("min_pixels must not exceed max_pixels")
        return self

    def precision_flags(self) -> tuple[bool, bool]:
        """(bf16, fp16) for this machine."""
        return _precision(self.precision)

    def trl_kwargs(self, default_lr: tuple[float, float]) -> dict[str, Any]:
        """Arguments shared by TRL's SFTConfig and DPOConfig."""
        bf16, fp16 = self.precision_flags()
        kwargs: dict[str, Any] = {
            "output_dir": str(self.out / "checkpoints"),
            "num_train_epochs": self.epochs,
            "max_steps": self.max_steps,
            "learning_rate": self.lr or (default_lr[1] if self.full else default_lr[0]),
            # A time budget ends a run early: the schedule still spans the planned steps.
            "lr_scheduler_type": self.scheduler,
            "warmup_steps": self.warmup,
            "weight_decay": self.weight_decay,
            "per_device_train_batch_size": self.batch_size,
            "gradient_accumulation_steps": self.grad_accum,
            "gradient_checkpointing": self.gradient_checkpointing,
            "bf16": bf16,
            "fp16": fp16,
            "seed": self.seed,
            "data_seed": self.seed,
            "logging_steps": self.logging_steps,
            "save_steps": self.save_steps,
            "save_total_limit": self.save_total_limit,
            "report_to": self.report_to,
            "dataloader_num_workers": self.num_workers,
            "remove_unused_columns": False,  # our collators read their own columns
            "max_length": None,  # our checks bound lengths; the collators never truncate
            "trust_remote_code": self.trust_remote_code,
        }
        if self.group_by_length:
            kwargs["train_sampling_strategy"] = "group_by_length"
            kwargs["length_column_name"] = "length"
        if self.gradient_checkpointing:
            kwargs["gradient_checkpointing_kwargs"] = {"use_reentrant": False}
        if not (bf16 or fp16) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            import torch

            if not torch.cuda.is_available():
                # Without it, transformers runs each CPU process on its own (world size 1).
                kwargs["ddp_backend"] = "gloo"
        return kwargs


class SFTConfig(TrainOptions):
    """Supervised fine-tuning on trajectories and dialogues (behavioural cloning)."""

    data: list[Path] = Field(
        min_length=1, description="Trajectory and/or dialogue dataset directories."
    )
    overlong: Literal["drop", "truncate"] = Field(
        default="drop",
        description="Samples over max_length: 'drop' them, or 'truncate' after the last "
        "assistant turn that fits (never inside an image).",
    )
    only_completed: bool = Field(
        default=True, description="Skip trajectories that did not reach a final answer."
    )
    mask_failed_steps: bool = Field(
        default=True,
        description="No loss on assistant turns whose step failed (parse or tool error); "
        "they stay in the context so the model learns to recover.",
    )

    def to_trl(self) -> Any:
        from trl import SFTConfig as TRLSFTConfig

        full = SCRATCH_LR["sft"] if self.full and from_scratch(self.base) else 1e-5
        kwargs = self.trl_kwargs(default_lr=(1e-4, full))
        kwargs.update(
            packing=False,
            padding_free=False,
            assistant_only_loss=True,
            dataset_kwargs={"skip_prepare_dataset": True},
        )
        return _build(TRLSFTConfig, kwargs, self.trl)


class DPOConfig(TrainOptions):
    """Step-wise DPO on preference pairs, starting from an SFT model."""

    pairs: list[Path] = Field(min_length=1, description="Preference-pair dataset directories.")
    beta: float = Field(
        default=0.1, gt=0, description="DPO beta: how far the policy may move from the reference."
    )
    loss: str = Field(
        default="sigmoid", description="TRL DPO loss type ('sigmoid' is the DPO paper's loss)."
    )
    epochs: float = Field(default=1.0, gt=0, description="Passes over the pairs.")

    def to_trl(self) -> Any:
        from trl import DPOConfig as TRLDPOConfig

        full = SCRATCH_LR["dpo"] if self.full and from_scratch(self.base) else 5e-7
        kwargs = self.trl_kwargs(default_lr=(5e-6, full))
        kwargs.update(
            beta=self.beta,
            loss_type=[self.loss],
            padding_free=False,
            precompute_ref_log_probs=False,
        )
        return _build(TRLDPOConfig, kwargs, self.trl)


SCRATCH_LR = {"sft": 1e-3, "dpo": 5e-5}
"""Full fine-tuning learning rates for controllers trained from scratch (random init)."""

SCRATCH_MARKER = "tracetune_tiny.json"
"""Written by ``tracetune model init`` / ``init-tiny`` and carried into training outputs."""


def from_scratch(base: str | Path) -> bool:
    """Whether ``base`` descends from a randomly initialized controller built from config.

    ``tracetune model init`` writes ``tracetune_tiny.json``; training outputs carry it on,
    so an SFT output of such a model counts too (as does a run's recorded base).
    """
    path = Path(str(base)).expanduser()
    for _ in range(4):
        if not path.is_dir():
            return False
        if (path / SCRATCH_MARKER).is_file():
            return True
        record = path / "tracetune_train.json"
        if not record.is_file():
            return False
        import json

        try:
            path = Path(str(json.loads(record.read_text()).get("base", "")))
        except (ValueError, OSError):
            return False
    return False


def _precision(precision: Precision) -> tuple[bool, bool]:
    import torch

    if precision == "auto":
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return bf16, False
    if precision in ("bf16", "fp16") and not torch.cuda.is_available():
        raise ConfigError(f"precision={precision} needs a CUDA GPU; use 'auto' or 'fp32' on CPU")
    return precision == "bf16", precision == "fp16"


def _build(cls: type, kwargs: dict[str, Any], extra: dict[str, Any]) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(extra) - known)
    if unknown:
        raise ConfigError(
            f"unknown trl option(s) {unknown} for {cls.__name__}; see its documentation"
        )
    return cls(**{**kwargs, **extra})
