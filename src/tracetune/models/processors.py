"""Load the right processor for a VLM directory or hub id, with sensible image budgets.

``AutoProcessor`` cannot build a Qwen2-VL / Qwen2.5-VL processor without torchvision (their
video processor needs it), and image-only agents never use video. :func:`load_processor`
therefore loads Qwen families through :class:`ImageOnlyQwen2VLProcessor` /
:class:`ImageOnlyQwen2_5_VLProcessor`, which leave the video processor out and read both
tracetune's tiny directories and standard hub checkpoints. Every other family goes through
``AutoProcessor`` (``trust_remote_code`` is opt-in for families such as MiniCPM-V whose code
lives in the checkpoint).

Image budgets matter more than anything else for memory and speed: a Qwen image costs one
token per 28x28 pixels, so an unbounded 4K screenshot is ~10K tokens. :data:`RECOMMENDED`
lists the settings we recommend for the models users load by hub id.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor

from tracetune.errors import ConfigError


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """``Qwen2VLProcessor`` without a video processor (which needs torchvision)."""

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(  # type: ignore[no-untyped-call]  # transformers leaves it unannotated
            image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs
        )

    def to_dict(self) -> dict[str, Any]:
        # Save as the standard class so AutoProcessor reads the directory where torchvision is.
        out: dict[str, Any] = super().to_dict()
        out["processor_class"] = Qwen2VLProcessor.__name__
        return out


class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
    """``Qwen2_5_VLProcessor`` without a video processor (which needs torchvision)."""

    def __init__(
        self,
        image_processor: Any = None,
        tokenizer: Any = None,
        chat_template: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(  # type: ignore[no-untyped-call]  # transformers leaves it unannotated
            image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = super().to_dict()
        out["processor_class"] = Qwen2_5_VLProcessor.__name__
        return out


_QWEN_PROCESSORS: dict[str, type[Any]] = {
    "qwen2_vl": ImageOnlyQwen2VLProcessor,
    "qwen2_5_vl": ImageOnlyQwen2_5_VLProcessor,
}

RECOMMENDED: dict[str, dict[str, Any]] = {
    # Qwen: pixels per image bound the image tokens (one per 28x28 px). 1280*28*28 (~1M px,
    # <=1280 tokens) is Qwen's own recommendation for documents; 512*28*28 is a good default
    # for agent trajectories with several images per episode on one 24-80 GB GPU.
    "Qwen/Qwen2-VL-2B-Instruct": {"min_pixels": 256 * 28 * 28, "max_pixels": 1280 * 28 * 28},
    "Qwen/Qwen2-VL-7B-Instruct": {
        "min_pixels": 256 * 28 * 28,
        "max_pixels": 1280 * 28 * 28,
        "train_max_pixels": 512 * 28 * 28,
    },
    "Qwen/Qwen2.5-VL-3B-Instruct": {
        "min_pixels": 256 * 28 * 28,
        "max_pixels": 1280 * 28 * 28,
        "train_max_pixels": 512 * 28 * 28,
    },
    "Qwen/Qwen2.5-VL-7B-Instruct": {
        "min_pixels": 256 * 28 * 28,
        "max_pixels": 1280 * 28 * 28,
        "train_max_pixels": 512 * 28 * 28,
    },
    # InternVL 3 ("-hf" checkpoints are native transformers): 448 px tiles, 256 tokens each;
    # cap the tiles per image to bound the sequence.
    "OpenGVLab/InternVL3-8B-hf": {"crop_to_patches": True, "max_patches": 6},
    # MiniCPM-V 2.6: remote code (trust_remote_code=True); slices images into up to 9 tiles of
    # 448 px, 64 tokens each. Its generate() API is custom: serve it with vLLM and use the
    # openai: backend rather than local:.
    "openbmb/MiniCPM-V-2_6": {"trust_remote_code": True, "max_slice_nums": 9},
    # SmolVLM (Idefics3): longest_edge is N*512; 4*512 splits into up to 16 tiles + a global
    # image at 64 tokens each (~1.1K tokens); lower N for multi-image agent episodes.
    "HuggingFaceTB/SmolVLM-Instruct": {"size": {"longest_edge": 4 * 384}},
    "HuggingFaceTB/SmolVLM2-2.2B-Instruct": {"size": {"longest_edge": 4 * 512}},
}
"""Processor settings we recommend per hub model (``train_max_pixels``: for training)."""


def model_type(path_or_id: str | Path) -> str | None:
    """The ``model_type`` in a local directory's ``config.json``, or from the hub cache."""
    local = Path(path_or_id)
    if local.is_dir():
        cfg = local / "config.json"
        if cfg.is_file():
            mt = json.loads(cfg.read_text()).get("model_type")
            return mt if isinstance(mt, str) else None
        adapter = local / "adapter_config.json"
        if adapter.is_file():
            # A LoRA adapter directory (as trainers save it) belongs to its base model's family.
            base = json.loads(adapter.read_text()).get("base_model_name_or_path")
            return model_type(base) if isinstance(base, str) and base else None
        return None
    try:
        from transformers import AutoConfig

        return str(AutoConfig.from_pretrained(str(path_or_id)).model_type)
    except (OSError, ValueError):
        return None


def load_processor(
    path_or_id: str | Path,
    max_pixels: int | None = None,
    *,
    min_pixels: int | None = None,
    trust_remote_code: bool = False,
) -> Any:
    """The processor for a model directory or hub id.

    Args:
        path_or_id: A local checkpoint directory (tiny or real) or a hub id.
        max_pixels: Cap on pixels per image for Qwen processors (image tokens = pixels/784).
            Ignored with a clear error for families that do not resize by pixel count.
        min_pixels: Floor on pixels per image for Qwen processors.
        trust_remote_code: Allow code shipped in the checkpoint (e.g. MiniCPM-V). Off by
            default: it runs code from the hub on this machine.
    """
    mt = model_type(path_or_id)
    if mt in _QWEN_PROCESSORS:
        processor = _QWEN_PROCESSORS[mt].from_pretrained(str(path_or_id))
    else:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(
            str(path_or_id), trust_remote_code=trust_remote_code
        )
    if max_pixels is not None or min_pixels is not None:
        set_pixel_budget(processor, max_pixels=max_pixels, min_pixels=min_pixels)
    return processor


def set_pixel_budget(
    processor: Any, *, max_pixels: int | None = None, min_pixels: int | None = None
) -> None:
    """Bound pixels per image on a Qwen-style image processor (in place)."""
    image_processor = getattr(processor, "image_processor", None)
    size = getattr(image_processor, "size", None)
    if image_processor is None or not hasattr(image_processor, "merge_size") or size is None:
        raise ConfigError(
            f"max_pixels/min_pixels apply to Qwen-style processors; "
            f"{type(processor).__name__} resizes differently (see RECOMMENDED in "
            "tracetune.models.processors for its settings): drop max_pixels for this model"
        )
    for name, value in (("max_pixels", max_pixels), ("min_pixels", min_pixels)):
        if value is not None and value < 28 * 28:
            raise ConfigError(f"{name}={value} is below one 28x28 patch (784 pixels)")
    new = dict(size.items()) if hasattr(size, "items") else dict(vars(size))
    if max_pixels is not None:
        new["longest_edge"] = max_pixels
        if min_pixels is None and (new.get("shortest_edge") or 0) > max_pixels:
            new["shortest_edge"] = max_pixels  # a lone cap below the checkpoint's floor wins
    if min_pixels is not None:
        new["shortest_edge"] = min_pixels
    if new.get("shortest_edge", 0) > new.get("longest_edge", float("inf")):
        raise ConfigError(
            f"min_pixels ({new['shortest_edge']}) exceeds max_pixels ({new['longest_edge']})"
        )
    image_processor.size = type(size)(**new) if not isinstance(size, dict) else new
    # Older image processors also read these attributes directly.
    if hasattr(image_processor, "max_pixels"):
        image_processor.max_pixels = new.get("longest_edge")
    if hasattr(image_processor, "min_pixels"):
        image_processor.min_pixels = new.get("shortest_edge")
