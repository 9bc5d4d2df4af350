"""Image generation and instruction-based editing with diffusers pipelines.

Needs the ``diffusion`` extra (``pip install 'tracetune[diffusion]'``). Real hub models are
loaded when the user has them (downloaded once, or a local ``save_pretrained`` directory):

* ``image_generation``: any text-to-image pipeline (``AutoPipelineForText2Image``);
  default ``stabilityai/sd-turbo`` (one step, no guidance). SDXL, SDXL-Turbo, SD 1.5 work too.
* ``image_edit``: an image+instruction pipeline; default ``timbrooks/instruct-pix2pix``.

Options (``ctx.options['image_generation']`` / ``['image_edit']``): ``model``, ``device``
(default: CUDA when available), ``dtype`` (default float16 on CUDA, float32 on CPU),
``steps``, ``guidance_scale``, ``image_guidance_scale`` (edit), ``width`` / ``height``
(generation), ``max_side`` (edit input, default 512), ``seed`` (default 0, so a call is
reproducible). Pipelines are loaded once per process and id.
"""

from __future__ import annotations

import inspect
from typing import Any

from PIL import Image

from tracetune.tools.builtin.support import (
    TypedTool,
    load_pretrained,
    rgb,
    tool_options,
    torch_device,
)
from tracetune.tools.spec import ToolContext, ToolError, ToolResult, register_tool

DEFAULT_GENERATOR = "stabilityai/sd-turbo"
DEFAULT_EDITOR = "timbrooks/instruct-pix2pix"


def _dtype(options: dict[str, Any], device: str) -> Any:
    import torch

    name = str(options.get("dtype", "float16" if device.startswith("cuda") else "float32"))
    dtype = getattr(torch, name.replace("fp16", "float16").replace("bf16", "bfloat16"), None)
    if not isinstance(dtype, torch.dtype):
        raise ToolError(f"unknown dtype {name!r}; use float32, float16 or bfloat16")
    return dtype


def _is_distilled(model_id: str) -> bool:
    """Turbo/lightning checkpoints are distilled for 1-4 steps without guidance."""
    return any(tag in model_id.lower() for tag in ("turbo", "lightning", "lcm", "schnell"))


class _DiffusionTool(TypedTool):
    requires = ("torch", "diffusers", "transformers")
    extra = "diffusion"
    default_model = ""

    def _load(self, model_id: str, dtype: Any) -> Any:
        raise NotImplementedError

    def pipeline(self, options: dict[str, Any]) -> tuple[Any, str, str]:
        model_id = str(options.get("model", self.default_model))
        device = torch_device(options)
        dtype = _dtype(options, device)

        def load() -> Any:
            pipe = load_pretrained(
                "pipeline", model_id, self.name, lambda: self._load(model_id, dtype)
            )
            pipe.set_progress_bar_config(disable=True)
            return pipe.to(device)

        return self.cached((model_id, device, str(dtype)), load), model_id, device

    @staticmethod
    def generator(options: dict[str, Any], device: str) -> Any:
        import torch

        seed = int(options.get("seed", 0))
        return torch.Generator(device="cpu" if device == "mps" else device).manual_seed(seed)


class ImageGeneration(_DiffusionTool):
    name = "image_generation"
    output_type = "image"
    default_model = DEFAULT_GENERATOR

    def _load(self, model_id: str, dtype: Any) -> Any:
        from diffusers import AutoPipelineForText2Image

        return AutoPipelineForText2Image.from_pretrained(model_id, dtype=dtype)

    def forward(self, ctx: ToolContext, prompt: str) -> ToolResult:  # type: ignore[override]
        """Generate a new image from a text description.

        Args:
            prompt: What the image should show: subject, style, composition, colours.
        """
        if not prompt.strip():
            raise ToolError("prompt is empty: describe the image to generate")
        options = tool_options(ctx, self.name)
        pipe, model_id, device = self.pipeline(options)
        distilled = _is_distilled(model_id)
        kwargs: dict[str, Any] = {
            "num_inference_steps": int(options.get("steps", 1 if distilled else 30)),
            "guidance_scale": float(options.get("guidance_scale", 0.0 if distilled else 7.0)),
            "generator": self.generator(options, device),
        }
        for key in ("width", "height"):
            if options.get(key):
                kwargs[key] = int(options[key])
        image = pipe(prompt.strip(), **kwargs).images[0]
        return ToolResult(
            text=f"generated a {image.width}x{image.height} image",
            images=[image],
            data={
                "model": model_id,
                "size": [image.width, image.height],
                "steps": kwargs["num_inference_steps"],
                "seed": int(options.get("seed", 0)),
            },
        )


class ImageEdit(_DiffusionTool):
    name = "image_edit"
    output_type = "image"
    default_model = DEFAULT_EDITOR

    def _load(self, model_id: str, dtype: Any) -> Any:
        from diffusers import DiffusionPipeline

        pipe = DiffusionPipeline.from_pretrained(model_id, dtype=dtype)
        if "image" not in inspect.signature(pipe.__call__).parameters:
            raise ToolError(
                f"{model_id!r} loads a {type(pipe).__name__}, which takes no input image; "
                "image_edit needs an image-editing pipeline such as InstructPix2Pix"
            )
        return pipe

    def forward(self, ctx: ToolContext, image: str, instruction: str) -> ToolResult:  # type: ignore[override]
        """Edit an image by following an instruction, e.g. 'make the sky stormy' or
        'turn the car red'; returns the edited image at the original size.

        Args:
            image: File name of the image in the working directory.
            instruction: The change to make, as an imperative sentence.
        """
        if not instruction.strip():
            raise ToolError("instruction is empty: say what to change")
        options = tool_options(ctx, self.name)
        src = rgb(ctx.image(image))
        pipe, model_id, device = self.pipeline(options)
        # The VAE works on multiples of its downsampling factor; big inputs cost quadratic
        # memory, so the longer side is capped.
        factor = int(getattr(pipe, "vae_scale_factor", 8))
        max_side = int(options.get("max_side", 512))
        scale = min(1.0, max_side / max(src.size))
        w, h = (max(factor, round(v * scale / factor) * factor) for v in src.size)
        size = (w, h)
        work = src.resize(size, Image.Resampling.LANCZOS) if size != src.size else src
        kwargs: dict[str, Any] = {
            "image": work,
            "num_inference_steps": int(options.get("steps", 20)),
            "guidance_scale": float(options.get("guidance_scale", 7.5)),
            "generator": self.generator(options, device),
        }
        if "image_guidance_scale" in inspect.signature(pipe.__call__).parameters:
            kwargs["image_guidance_scale"] = float(options.get("image_guidance_scale", 1.5))
        edited = pipe(instruction.strip(), **kwargs).images[0]
        if edited.size != src.size:
            edited = edited.resize(src.size, Image.Resampling.LANCZOS)
        return ToolResult(
            text=f"edited the image ({instruction.strip()!r})",
            images=[edited],
            data={
                "model": model_id,
                "size": [edited.width, edited.height],
                "steps": kwargs["num_inference_steps"],
                "seed": int(options.get("seed", 0)),
            },
        )


image_generation = register_tool(ImageGeneration())
image_edit = register_tool(ImageEdit())
