"""What training needs to know about a VLM family: where its vision tower is, which linear
layers LoRA targets, and how many image tokens its model expects for a processed image.

The image-token count is computed from the *model's* config, not the processor's, because
the classic failure ("Image features and image tokens do not match") is a processor whose
settings disagree with the model it feeds, or a text that happens to contain the literal
image token. Checking every sample against the model's arithmetic before training turns a
crash at step 3,000 into an error naming the record at step 0.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Literal

from tracetune.errors import ConfigError

VISION_MODULES = (
    "visual",
    "vision_tower",
    "vision_model",
    "vision_encoder",
    "vpm",
    "image_encoder",
)
"""Attribute names under which families keep their vision encoder (Qwen, LLaVA/InternVL,
Idefics3/SmolVLM, generic, MiniCPM-V, others)."""

PROJECTOR_MODULES = ("multi_modal_projector", "connector", "merger", "mlp1", "resampler")
"""Attribute names of the vision-to-language projector."""

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")

LoraTargets = Literal["attention", "attention_mlp", "all_linear"]


def is_vision_module(name: str) -> bool:
    """Whether a dotted module/parameter name lies inside the vision encoder.

    Projectors nested in the vision module (Qwen's ``visual.merger``) do not count: they map
    image features into the language model and train with it under full fine-tuning.
    """
    parts = name.split(".")
    return any(p in VISION_MODULES for p in parts) and not any(
        p in PROJECTOR_MODULES for p in parts
    )


def lora_target_regex(model: Any, targets: LoraTargets | list[str]) -> str:
    """A PEFT ``target_modules`` regex over the language model's linear layers.

    Vision towers are excluded by name: CLIP/SigLIP towers also call their attention
    projections ``q_proj``/``k_proj``/``v_proj``, and a plain suffix list would put LoRA on
    them too (the recipes keep the vision tower frozen).
    """
    import torch

    linear = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not is_vision_module(name)
    ]
    if targets == "all_linear":
        leaves = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n in linear
                if "lm_head" not in n and not any(p in n.split(".") for p in PROJECTOR_MODULES)
            }
        )
    elif targets == "attention":
        leaves = list(_ATTENTION)
    elif targets == "attention_mlp":
        leaves = [*_ATTENTION, *_MLP]
    else:
        leaves = list(targets)
    vision = "|".join(VISION_MODULES)
    regex = rf"^(?!(?:.*\.)?(?:{vision})\.)(?:.*\.)?(?:{'|'.join(map(re.escape, leaves))})$"
    if not any(re.fullmatch(regex, n) for n in linear):
        sample = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in linear})[:20])
        raise ConfigError(
            f"LoRA targets {targets!r} match no linear layer of the language model "
            f"({type(model).__name__}); its linear layers are named: {sample}. Pass "
            "lora.targets as a list of those names"
        )
    return regex


def freeze_vision(model: Any) -> int:
    """Stop gradients into the vision encoder; return how many parameters were frozen."""
    frozen = 0
    for name, param in model.named_parameters():
        if is_vision_module(name) and param.requires_grad:
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


# -- image tokens the model expects -------------------------------------------------------
ImageTokenCounter = Callable[[Any, dict[str, Any]], int]


def _qwen_tokens(config: Any, inputs: dict[str, Any]) -> int:
    grid = inputs.get("image_grid_thw")
    if grid is None:
        return 0
    merge = int(config.vision_config.spatial_merge_size)
    return int(grid.prod(-1).sum().item()) // (merge * merge)


def _llava_tokens(config: Any, inputs: dict[str, Any]) -> int:
    pixels = inputs.get("pixel_values")
    if pixels is None:
        return 0
    vision = config.vision_config
    per_image = (int(vision.image_size) // int(vision.patch_size)) ** 2
    if getattr(config, "vision_feature_select_strategy", "default") == "full":
        per_image += 1  # the CLS token is kept
    return int(pixels.shape[0]) * per_image


def _idefics3_tokens(config: Any, inputs: dict[str, Any]) -> int:
    pixels = inputs.get("pixel_values")
    if pixels is None:
        return 0
    # Batches pad the tile list with all-zero images, which the model drops: count real tiles.
    tiles = pixels.reshape(-1, *pixels.shape[-3:])
    real = int(((tiles == 0).flatten(1).all(dim=1) == 0).sum().item())
    vision = config.vision_config
    patches = (int(vision.image_size) // int(vision.patch_size)) ** 2
    return real * patches // (int(config.scale_factor) ** 2)


IMAGE_TOKEN_COUNTERS: dict[str, ImageTokenCounter] = {
    "qwen2_vl": _qwen_tokens,
    "qwen2_5_vl": _qwen_tokens,
    "qwen3_vl": _qwen_tokens,
    "llava": _llava_tokens,
    "idefics3": _idefics3_tokens,
    "smolvlm": _idefics3_tokens,
}
"""Per ``model_type``: image tokens the model will fill from the processed pixel inputs."""


def image_token_id(model_config: Any, processor: Any) -> int | None:
    for attr in ("image_token_id", "image_token_index"):
        value = getattr(model_config, attr, None)
        if isinstance(value, int):
            return value
    token = getattr(processor, "image_token", None)
    if token:
        tid = processor.tokenizer.convert_tokens_to_ids(token)
        return tid if isinstance(tid, int) else None
    return None


def image_token_strings(processor: Any) -> list[str]:
    """Special tokens that mean 'image here' to the processor; they must not occur in text."""
    tokens = []
    for attr in ("image_token", "video_token", "fake_image_token", "global_image_token"):
        value = getattr(processor, attr, None)
        if isinstance(value, str) and value:
            tokens.append(value)
    tok = getattr(processor, "tokenizer", None)
    for name in ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"):
        if tok is not None and name in tok.get_vocab() and name not in tokens:
            tokens.append(name)
    return tokens
