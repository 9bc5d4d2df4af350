"""Ask the configured vision-language model about an image: visual QA and captions.

The model is ``ctx.model`` (any tracetune ``ChatModel``: an OpenAI-compatible endpoint or a
local transformers VLM). Options (``ctx.options['visual_qa']`` / ``['caption']``):
``max_tokens`` (default 256) and ``max_side`` (default 1024: larger images are downscaled
before sending, which keeps API costs and local memory bounded).
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from tracetune.tools.builtin.support import rgb, tool_options
from tracetune.tools.spec import ToolContext, ToolError, ToolResult, tool

CAPTION_PROMPT = "tools/caption.jinja"  # under tracetune/prompts


def _require_model(ctx: ToolContext, tool_name: str) -> Any:
    if ctx.model is None:
        raise ToolError(
            f"{tool_name} needs a vision-language model and none is configured: pass one to "
            "the agent (e.g. `--model openai:gpt-4o-mini` or `--model local:DIR`)"
        )
    return ctx.model


def _fit(img: Image.Image, max_side: int) -> Image.Image:
    img = rgb(img)
    if max(img.size) <= max_side:
        return img
    scale = max_side / max(img.size)
    return img.resize(
        (max(1, round(img.width * scale)), max(1, round(img.height * scale))),
        Image.Resampling.LANCZOS,
    )


async def ask_about_image(ctx: ToolContext, tool_name: str, image: str, prompt: str) -> str:
    """Send one image and a prompt to ``ctx.model`` and return its reply."""
    from tracetune.models.base import Sampling

    model = _require_model(ctx, tool_name)
    options = tool_options(ctx, tool_name)
    img = _fit(ctx.image(image), int(options.get("max_side", 1024)))
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": img},
                {"type": "text", "text": prompt},
            ],
        }
    ]
    generation = await model.generate(
        messages, sampling=Sampling(temperature=0.0, max_tokens=int(options.get("max_tokens", 256)))
    )
    answer: str = generation.text.strip()
    if not answer:
        raise ToolError(f"{tool_name}: the model returned an empty answer")
    return answer


@tool
async def visual_qa(ctx: ToolContext, image: str, question: str) -> ToolResult:
    """Answer a question about an image by asking a vision-language model (counting, colours,
    what something is, relations between objects, reading a chart).

    Args:
        image: File name of the image in the working directory.
        question: The question about the image, self-contained.
    """
    if not question.strip():
        raise ToolError("question is empty: ask something about the image")
    answer = await ask_about_image(ctx, "visual_qa", image, question.strip())
    return ToolResult(text=answer, data={"question": question, "answer": answer})


@tool
async def caption(ctx: ToolContext, image: str) -> ToolResult:
    """Describe an image in a few sentences (a vision-language model writes the caption).

    Args:
        image: File name of the image in the working directory.
    """
    from tracetune.prompts import prompt_hash, render

    text = await ask_about_image(ctx, "caption", image, render(CAPTION_PROMPT))
    return ToolResult(text=text, data={"caption": text, "prompt_hash": prompt_hash(CAPTION_PROMPT)})
