"""``tracetune train ...``: SFT and step-wise DPO of a VLM controller.

Multi-GPU: ``accelerate launch --config_file $(tracetune train accelerate-config zero2)
-m tracetune.train sft ...`` (see docs/training.md).
"""

from __future__ import annotations

import enum
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml  # type: ignore[import-untyped]
from rich.console import Console

from tracetune.cli.common import build_config, fail

app = typer.Typer(no_args_is_help=True)
out_console = Console()

ACCELERATE_CONFIGS = {
    "ddp": "multi_gpu.yaml",
    "zero2": "deepspeed_zero2.yaml",
    "zero3": "deepspeed_zero3.yaml",
    "fsdp": "fsdp.yaml",
}


class Launch(enum.StrEnum):
    ddp = "ddp"
    zero2 = "zero2"
    zero3 = "zero3"
    fsdp = "fsdp"


def _options(config: Path | None, lora: dict[str, Any], **flags: Any) -> dict[str, Any]:
    """YAML values overlaid with the flags that were set (LoRA flags merged, not replaced)."""
    data: dict[str, Any] = {}
    if config is not None:
        if not config.is_file():
            fail(f"config file {config} does not exist")
        loaded = yaml.safe_load(config.read_text()) or {}
        if not isinstance(loaded, dict):
            fail(f"{config} must hold a mapping of option names to values")
        data.update(loaded)
    set_lora = {k: v for k, v in lora.items() if v is not None}
    if set_lora:
        data["lora"] = {**(data.get("lora") or {}), **set_lora}
    data.update({k: v for k, v in flags.items() if v is not None and v != []})
    return data


# Options common to both commands, as typer annotations.
Base = Annotated[str | None, typer.Option(help="Base model dir or hub id (DPO: the SFT output).")]
Out = Annotated[Path | None, typer.Option(help="Output directory (adapter + processor).")]
LoraR = Annotated[int | None, typer.Option("--lora-r", help="LoRA rank.")]
LoraAlpha = Annotated[int | None, typer.Option("--lora-alpha", help="LoRA alpha.")]
LoraTargets = Annotated[
    str | None,
    typer.Option(
        "--lora-targets", help="attention, attention_mlp, all_linear, or comma-separated names."
    ),
]
Full = Annotated[bool | None, typer.Option("--full", help="Full fine-tuning instead of LoRA.")]
Epochs = Annotated[float | None, typer.Option(help="Passes over the data.")]
Lr = Annotated[float | None, typer.Option(help="Peak learning rate.")]
MaxSteps = Annotated[int | None, typer.Option(help="Stop after this many optimizer steps.")]
BatchSize = Annotated[int | None, typer.Option(help="Samples per device per step.")]
GradAccum = Annotated[int | None, typer.Option(help="Gradient accumulation steps.")]
MaxLength = Annotated[int | None, typer.Option(help="Most tokens per sample (images included).")]
MaxPixels = Annotated[int | None, typer.Option(help="Qwen processors: most pixels per image.")]
GradCkpt = Annotated[
    bool | None,
    typer.Option(
        "--gradient-checkpointing/--no-gradient-checkpointing", help="Recompute activations."
    ),
]
Precision = Annotated[str | None, typer.Option(help="auto, bf16, fp16 or fp32.")]
Resume = Annotated[bool | None, typer.Option("--resume", help="Continue from the last checkpoint.")]
Threads = Annotated[
    int | None,
    typer.Option(help="CPU threads for the arithmetic (1 is fastest on a busy machine)."),
]
MaxTime = Annotated[
    str | None,
    typer.Option(
        help="Stop training after this long (600, 10m, 1.5h) and save the model as at the end."
    ),
]
Config = Annotated[Path | None, typer.Option(help="YAML file with these options (flags win).")]


def _lora(r: int | None, alpha: int | None, targets: str | None) -> dict[str, Any]:
    parsed: Any = targets
    if targets and targets not in ("attention", "attention_mlp", "all_linear"):
        parsed = [t.strip() for t in targets.split(",") if t.strip()]
    return {"r": r, "alpha": alpha, "targets": parsed}


def _seconds(text: str | None) -> float | None:
    from tracetune.timelimit import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        fail(str(exc))
        return None


def _run(kind: str, cfg: Any) -> None:
    from tracetune.train.data import TrainingDataError

    try:
        if kind == "sft":
            from tracetune.train.sft import train_sft

            result = train_sft(cfg)
        else:
            from tracetune.train.dpo import train_dpo

            result = train_dpo(cfg)
    except (TrainingDataError, ValueError, FileNotFoundError) as exc:
        fail(str(exc))
        return
    from accelerate import PartialState  # type: ignore[import-untyped]

    if not PartialState().is_main_process:  # one report under `accelerate launch`
        return
    losses = result.losses()
    loss = f"loss {losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "no loss logged"
    out_console.print(f"data: {result.report.summary()}", highlight=False)
    stopped = f" ({result.extra['stopped']})" if result.extra.get("stopped") else ""
    out_console.print(
        f"{kind}: {result.steps} steps{stopped}, {loss}; saved to {result.out}", highlight=False
    )
    out_console.print(result.usage_hint(), highlight=False)


@app.command("sft")
def sft(
    base: Base = None,
    data: Annotated[
        list[Path] | None, typer.Option(help="Trajectory/dialogue dataset dir (repeatable).")
    ] = None,
    out: Out = None,
    lora_r: LoraR = None,
    lora_alpha: LoraAlpha = None,
    lora_targets: LoraTargets = None,
    full: Full = None,
    epochs: Epochs = None,
    lr: Lr = None,
    max_steps: MaxSteps = None,
    batch_size: BatchSize = None,
    grad_accum: GradAccum = None,
    max_length: MaxLength = None,
    max_pixels: MaxPixels = None,
    overlong: Annotated[str | None, typer.Option(help="drop or truncate (at a turn).")] = None,
    gradient_checkpointing: GradCkpt = None,
    precision: Precision = None,
    resume: Resume = None,
    max_time: MaxTime = None,
    threads: Threads = None,
    config: Config = None,
) -> None:
    """Supervised fine-tuning on trajectories: loss on assistant turns only."""
    from tracetune.train.config import SFTConfig

    options = _options(
        config,
        _lora(lora_r, lora_alpha, lora_targets),
        base=base,
        data=[str(d) for d in data] if data else None,
        out=out,
        full=full,
        epochs=epochs,
        lr=lr,
        max_steps=max_steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_length=max_length,
        max_pixels=max_pixels,
        overlong=overlong,
        gradient_checkpointing=gradient_checkpointing,
        precision=precision,
        resume=resume,
        max_time=_seconds(max_time),
        threads=threads,
    )
    _run("sft", build_config(SFTConfig, None, **options))


@app.command("dpo")
def dpo(
    base: Base = None,
    pairs: Annotated[
        list[Path] | None, typer.Option(help="Preference-pair dataset dir (repeatable).")
    ] = None,
    out: Out = None,
    beta: Annotated[float | None, typer.Option(help="DPO beta.")] = None,
    lora_r: LoraR = None,
    lora_alpha: LoraAlpha = None,
    lora_targets: LoraTargets = None,
    full: Full = None,
    epochs: Epochs = None,
    lr: Lr = None,
    max_steps: MaxSteps = None,
    batch_size: BatchSize = None,
    grad_accum: GradAccum = None,
    max_length: MaxLength = None,
    max_pixels: MaxPixels = None,
    gradient_checkpointing: GradCkpt = None,
    precision: Precision = None,
    resume: Resume = None,
    max_time: MaxTime = None,
    threads: Threads = None,
    config: Config = None,
) -> None:
    """Step-wise DPO from an SFT output (an adapter is merged first) on preference pairs."""
    from tracetune.train.config import DPOConfig

    options = _options(
        config,
        _lora(lora_r, lora_alpha, lora_targets),
        base=base,
        pairs=[str(p) for p in pairs] if pairs else None,
        out=out,
        beta=beta,
        full=full,
        epochs=epochs,
        lr=lr,
        max_steps=max_steps,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_length=max_length,
        max_pixels=max_pixels,
        gradient_checkpointing=gradient_checkpointing,
        precision=precision,
        resume=resume,
        max_time=_seconds(max_time),
        threads=threads,
    )
    _run("dpo", build_config(DPOConfig, None, **options))


@app.command("accelerate-config")
def accelerate_config(
    name: Annotated[Launch, typer.Argument(help="ddp, zero2, zero3 or fsdp.")],
    num_processes: Annotated[
        int | None, typer.Option(help="GPUs to use (writes a copy with this count).")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Write the copy here.")] = None,
) -> None:
    """Print the path of a bundled accelerate config (or write an edited copy)."""
    path = accelerate_config_path(name.value)
    if num_processes is None and out is None:
        typer.echo(str(path))
        return
    data = yaml.safe_load(path.read_text())
    if num_processes is not None:
        data["num_processes"] = num_processes
    target = out or Path(path.name)
    target.write_text(yaml.safe_dump(data, sort_keys=False))
    typer.echo(str(target))


def accelerate_config_path(name: str) -> Path:
    """Path of a bundled accelerate config: ddp, zero2, zero3 or fsdp."""
    from importlib import resources

    if name not in ACCELERATE_CONFIGS:
        raise ValueError(
            f"unknown accelerate config {name!r}; choose {', '.join(ACCELERATE_CONFIGS)}"
        )
    ref = resources.files("tracetune").joinpath("data", "train_configs", ACCELERATE_CONFIGS[name])
    return Path(str(ref))
