"""Shared pieces of the built-in tools: class-form schemas, options, boxes, fonts, devices."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from PIL import Image, ImageFont

from tracetune.tools.spec import FunctionTool, OutputType, Tool, ToolContext, ToolError

T = TypeVar("T")


class TypedTool(Tool):
    """A class-form tool whose model-facing schema comes from ``forward``'s type hints and
    Google docstring, exactly as ``@tool`` builds one from a function.

    Subclasses set ``name`` (and ``output_type`` when the annotation does not say it), load
    heavy resources in ``setup`` and keep per-process caches on the instance.
    """

    def __init__(self) -> None:
        super().__init__()
        output_type: OutputType | None = type(self).__dict__.get("output_type")
        spec = FunctionTool(self.forward, self.name, output_type, (), None)
        self.description = spec.description
        self.parameters = spec.parameters
        self.output_type = spec.output_type
        self._cache: dict[Any, Any] = {}
        self._key_locks: dict[Any, threading.Lock] = {}
        self._guard = threading.Lock()

    def cached(self, key: Any, build: Callable[[], T]) -> T:
        """Build a resource once per key (model id, corpus) and share it between threads.

        Each key has its own lock, so building one resource (which may itself need another,
        e.g. an index needs the embedder) never waits on an unrelated build.
        """
        if key in self._cache:
            return self._cache[key]  # type: ignore[no-any-return]
        with self._guard:
            lock = self._key_locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._cache:
                self._cache[key] = build()
        return self._cache[key]  # type: ignore[no-any-return]


def tool_options(ctx: ToolContext, name: str) -> dict[str, Any]:
    """The settings block for one tool: ``ctx.options[name]`` (a dict, possibly empty)."""
    value = ctx.options.get(name, {}) if ctx.options else {}
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ToolError(
            f"options for tool {name!r} must be a mapping such as {{'model': ...}}, got {value!r}"
        )
    return value


def pixel_box(box: list[float], width: int, height: int) -> tuple[int, int, int, int]:
    """``[x1, y1, x2, y2]`` in pixels (or fractions when every value is <= 1), clipped to the
    image and ordered; an empty or malformed box is a ToolError the model can act on."""
    if not isinstance(box, list | tuple) or len(box) != 4:
        raise ToolError(f"box must have 4 numbers [x1, y1, x2, y2], got {box!r}")
    try:
        x1, y1, x2, y2 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ToolError(f"box must have 4 numbers [x1, y1, x2, y2], got {box!r}") from None
    if max(abs(x1), abs(y1), abs(x2), abs(y2)) <= 1.0:
        x1, x2, y1, y2 = x1 * width, x2 * width, y1 * height, y2 * height
    x1, x2 = sorted((min(max(0.0, x1), width), min(max(0.0, x2), width)))
    y1, y2 = sorted((min(max(0.0, y1), height), min(max(0.0, y2), height)))
    if x2 - x1 < 1 or y2 - y1 < 1:
        raise ToolError(f"box {box!r} is empty inside a {width}x{height} image")
    return round(x1), round(y1), round(x2), round(y2)


@functools.cache
def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu Sans from matplotlib (a core dependency), else Pillow's built-in font."""
    try:
        from matplotlib import font_manager

        path = font_manager.findfont("DejaVu Sans", fallback_to_default=True)
        return ImageFont.truetype(path, size)
    except (ImportError, OSError, ValueError):
        return ImageFont.load_default(size)


def rgb(img: Image.Image) -> Image.Image:
    return img if img.mode == "RGB" else img.convert("RGB")


def torch_device(options: dict[str, Any]) -> str:
    """``options['device']`` if set, else the first CUDA device when there is one."""
    if options.get("device"):
        return str(options["device"])
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pretrained(kind: str, model_id: str, tool: str, load: Callable[[], T]) -> T:
    """Run a ``from_pretrained`` and turn "not found / not downloaded" into an error that
    says how to get the weights or point the tool at a local copy."""
    try:
        return load()
    except (OSError, ValueError) as exc:
        raise ToolError(
            f"{tool}: could not load {kind} {model_id!r} ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Download it once with "
            f"`hf download {model_id}` on a machine with internet, or point the tool at a "
            f"local directory saved with save_pretrained(): options['{tool}']['model'] "
            f"(CLI: --option {tool}.model=DIR)."
        ) from exc
