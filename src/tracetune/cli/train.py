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

from tracetune.cli.common import App
from tracetune.errors import ConfigError

app = App(no_args_is_help=True)
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


# LoRA flags, as typer annotations.
LoraR = Annotated[int | None, typer.Option("--lora-r", help="LoRA rank.")]
LoraAlpha = Annotated[int | None, typer.Option("--lora-alpha", help="LoRA alpha.")]
LoraTargets = Annotated[
    str | None,
    typer.Option(
        "--lora-targets", help="attention, attention_mlp, all_linear, or comma-separated names."
    ),
]


def _lora(r: int | None, alpha: int | None, targets: str | None) -> dict[str, Any]:
    parsed: Any = targets
    if targets and targets not in ("attention", "attention_mlp", "all_linear"):
        parsed = [t.strip() for t in targets.split(",") if t.strip()]
    return {"r": r, "alpha": alpha, "targets": parsed}


def _seconds(text: str | None) -> float | None:
    from tracetune.timelimit import parse_duration

    return parse_duration(text)  # a ConfigError names the bad value


def _run(kind: str, cfg: Any) -> None:
    if kind == "sft":
        from tracetune.train.sft import train_sft

        result = train_sft(cfg)
    else:
        from tracetune.train.dpo import train_dpo

        result = train_dpo(cfg)
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


# LoRA settings are a nested section of the config: their flags are declared here, merged
# key by key into a YAML `lora:` section.
def _lora_options(
    lora_r: LoraR = None,
    lora_alpha: LoraAlpha = None,
    lora_targets: LoraTargets = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help="YAML file with these options (keys: the option names with underscores, "
            "LoRA under lora: {r, alpha, dropout, targets}); flags given override it."
        ),
    ] = None,
) -> None:
    """Carries the LoRA and --config options (never run)."""


def _train_command(kind: str, model: Any, doc: str) -> None:
    """Register ``train KIND``: its options generated from the config ``model`` (every
    field but the LoRA section and TRL pass-through, which YAML sets), plus the LoRA flags."""
    import inspect

    from tracetune.cli.options_from_config import command_function, config_params

    shared = inspect.signature(_lora_options, eval_str=True).parameters.values()
    params = [
        *config_params(model, skip={"lora", "trl"}, text={"max_time": "DURATION"}),
        *(p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in shared),
    ]

    def callback(**values: Any) -> None:
        from tracetune.cli.common import report_error
        from tracetune.cli.options_from_config import config_from_options
        from tracetune.errors import TracetuneError

        lora = _lora(values.pop("lora_r"), values.pop("lora_alpha"), values.pop("lora_targets"))
        config_file = values.pop("config")
        if values.get("max_time") is not None:
            values["max_time"] = _seconds(values["max_time"])
        try:
            cfg = config_from_options(
                model, values, config_file=config_file, extra={"lora": lora}, what=f"train {kind}"
            )
        except TracetuneError as exc:
            report_error(exc)
            return
        _run(kind, cfg)

    app.command(kind)(command_function(callback, params, doc))


def _sft_command() -> None:
    from tracetune.train.config import SFTConfig

    _train_command(
        "sft",
        SFTConfig,
        "Supervised fine-tuning on trajectories: loss on assistant turns only.\n\n"
        "--max-time takes seconds or 600, 10m, 1.5h.",
    )


_sft_command()


def _dpo_command() -> None:
    from tracetune.train.config import DPOConfig

    _train_command(
        "dpo",
        DPOConfig,
        "Step-wise DPO from an SFT output (an adapter is merged first) on preference pairs."
        "\n\n--max-time takes seconds or 600, 10m, 1.5h.",
    )


_dpo_command()


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
        raise ConfigError(
            f"unknown accelerate config {name!r}; choose {', '.join(ACCELERATE_CONFIGS)}"
        )
    ref = resources.files("tracetune").joinpath("data", "train_configs", ACCELERATE_CONFIGS[name])
    return Path(str(ref))
