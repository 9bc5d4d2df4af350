"""GTA's 14 tools, under GTA's names and signatures, implemented on tracetune's own tools.

A controller tuned on tracetune data is evaluated end to end with the tools GTA's queries
were written for. Each GTA tool keeps GTA's argument names and output conventions (boxes as
``(x1, y1, x2, y2)`` text, OCR lines prefixed with their box, images returned as files) and
delegates the work to the tracetune tool that does the same job:

=========================== =============================================================
GTA tool                    implemented with
=========================== =============================================================
OCR                         ``ocr`` (RapidOCR, models in the wheel)
ImageDescription            ``caption`` (asks the tool VLM)
RegionAttributeDescription  crop of the region, then the tool VLM is asked about it
TextToBbox                  ``object_localization`` (OWLv2 / Grounding DINO weights)
DrawBox                     ``draw_box``
AddText                     ``add_text`` (GTA's ``lt``..``rb`` positions or ``x,y``)
GoogleSearch                ``search`` (a local corpus, or a configured web backend)
Calculator                  ``calculator`` (arithmetic by syntax-tree walk)
Solver                      GTA's ``solution()`` sympy code, run in ``tracetune.sandbox``
Plot                        GTA's ``solution()`` matplotlib code, run in the sandbox
MathOCR                     ``ocr``: plain text, no LaTeX (GTA uses a math OCR service),
                            so it is reported as *approximate*
CountGivenObject            ``object_localization``: the number of boxes found (inside
                            the crop when GTA's optional ``bbox`` is given)
TextToImage                 ``image_generation`` (diffusers weights)
ImageStylization            ``image_edit`` (diffusers weights)
=========================== =============================================================

``toolset_status`` says, before anything runs, which of these can run here (weights on
disk, a tool VLM configured, a search corpus or backend set) and why not, so a run can
report them up front and count the queries that need them apart.
"""

from __future__ import annotations

import copy
import inspect
import io
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from PIL import Image

from tracetune.evaluate.base import ScoringInputError
from tracetune.safefs import read_beneath
from tracetune.tools import Tool, ToolContext, ToolError, ToolResult, ToolUnavailable, get_tool
from tracetune.tools.builtin.support import font, tool_options
from tracetune.tools.spec import UnknownToolError

Status = Literal["available", "approximate", "unavailable"]

GTA_TOOL_NAMES: tuple[str, ...] = (
    "OCR",
    "ImageDescription",
    "RegionAttributeDescription",
    "TextToBbox",
    "DrawBox",
    "AddText",
    "GoogleSearch",
    "Calculator",
    "Solver",
    "Plot",
    "MathOCR",
    "CountGivenObject",
    "TextToImage",
    "ImageStylization",
)

# GTA's input types -> JSON schema types.
_META_TYPES = {
    "image": "string",
    "text": "string",
    "str": "string",
    "string": "string",
    "bool": "boolean",
    "boolean": "boolean",
    "int": "integer",
    "integer": "integer",
    "float": "number",
    "number": "number",
}


@dataclass(frozen=True)
class ToolStatus:
    """Whether a GTA tool can run here, and if not, what would make it run."""

    name: str
    status: Status
    backend: str
    note: str = ""

    def as_dict(self) -> dict[str, str]:
        return {"status": self.status, "backend": self.backend, "note": self.note}


def _arg(kind: str, description: str, default: Any = None) -> dict[str, Any]:
    prop: dict[str, Any] = {"type": kind, "description": description}
    if default is not None:
        prop["default"] = default
    return prop


def parse_box(value: Any) -> list[float]:
    """A GTA box, ``"(x1, y1, x2, y2)"`` text (or a list), as four numbers."""
    if isinstance(value, list | tuple) and len(value) == 4:
        try:
            return [float(v) for v in value]
        except (TypeError, ValueError):
            pass
    numbers = re.findall(r"-?\d+(?:\.\d+)?", str(value))
    if len(numbers) < 4:
        raise ToolError(f"bbox must be four numbers like '(10, 20, 110, 80)', got {value!r}")
    return [float(n) for n in numbers[:4]]


def format_box(box: list[float] | list[int]) -> str:
    return "(" + ", ".join(str(round(float(v))) for v in box) + ")"


class GTATool(Tool):
    """A GTA tool: GTA's name and arguments, a tracetune tool underneath.

    ``forward`` must take every argument the tool's schema (or a GTA query's metadata) shows
    the model: a shown argument it cannot take would pass validation and then fail every call
    that uses it. ``check_signature`` enforces this for the schema at import and for a query's
    metadata before a run starts.
    """

    backend: str = ""
    approximate: str = ""  # why the implementation only approximates GTA's tool, if it does
    unavailable: str = ""  # set on an episode's copy when the tool cannot run here

    async def acall(self, ctx: ToolContext, arguments: dict[str, Any]) -> ToolResult:
        if self.unavailable:
            raise ToolUnavailable(f"{self.name} is not available here: {self.unavailable}")
        return await super().acall(ctx, arguments)

    async def use(self, name: str, ctx: ToolContext, arguments: dict[str, Any]) -> ToolResult:
        """Call the tracetune tool ``name`` (its setup runs once, off the event loop)."""
        return await get_tool(name).acall(ctx, arguments)

    def status(self, options: dict[str, Any], tool_model: bool) -> ToolStatus:
        ok, why = self.available()
        if not ok:
            return ToolStatus(self.name, "unavailable", self.backend, why)
        if self.approximate:
            return ToolStatus(self.name, "approximate", self.backend, self.approximate)
        return ToolStatus(self.name, "available", self.backend)

    def forward_arguments(self) -> set[str] | None:
        """The argument names ``forward`` takes (None: it takes any, via ``**kwargs``)."""
        params = list(inspect.signature(self.forward).parameters.values())[1:]  # after ctx
        if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
            return None
        return {p.name for p in params}

    def check_signature(self, names: Any = None, where: str = "its schema") -> None:
        """Raise ValueError when ``forward`` cannot take an argument named in ``names``
        (default: the schema's properties), or misses a required one's default: a
        :class:`ScoringInputError` when ``names`` come from a query's tool metadata (the
        data is wrong), a plain ValueError for the tool's own schema (the code is)."""
        error = ValueError if names is None else ScoringInputError
        taken = self.forward_arguments()
        shown = set(names if names is not None else self.parameters.get("properties", {}))
        if taken is not None and not shown <= taken:
            missing = ", ".join(sorted(shown - taken))
            raise error(
                f"GTA tool {self.name}: {where} shows argument(s) {missing} that tracetune's "
                f"wrapper cannot take (it takes {', '.join(sorted(taken))})"
            )
        params = list(inspect.signature(self.forward).parameters.values())[1:]
        required = set(self.parameters.get("required", [])) if names is None else set()
        for p in params:
            if p.default is inspect.Parameter.empty and p.kind is not p.VAR_KEYWORD:
                if names is None and p.name not in required:
                    raise ValueError(
                        f"GTA tool {self.name}: argument {p.name} has no default but the "
                        "schema does not require it"
                    )

    def with_meta(self, meta: dict[str, Any]) -> GTATool:
        """This tool as a GTA query's ``tools`` entry shows it: GTA's description and inputs.

        The prompt then carries exactly what GTA's own evaluation shows the model.
        """
        view = copy.copy(self)
        if meta.get("description"):
            view.description = str(meta["description"])
        inputs = meta.get("inputs")
        if isinstance(inputs, list) and inputs:
            props: dict[str, Any] = {}
            required: list[str] = []
            for item in inputs:
                if not isinstance(item, dict) or not item.get("name"):
                    continue
                prop: dict[str, Any] = {"type": _META_TYPES.get(str(item.get("type")), "string")}
                if item.get("description"):
                    prop["description"] = str(item["description"])
                if item.get("optional"):
                    if item.get("default") is not None:
                        prop["default"] = item["default"]
                else:
                    required.append(str(item["name"]))
                props[str(item["name"])] = prop
            if props:
                self.check_signature(props, f"the query's tool metadata for {self.name}")
                view.parameters = {"type": "object", "properties": props, "required": required}
        return view


class _VLMTool(GTATool):
    def status(self, options: dict[str, Any], tool_model: bool) -> ToolStatus:
        if not tool_model:
            return ToolStatus(
                self.name,
                "unavailable",
                self.backend,
                "needs a vision-language model to answer: pass --tool-model SPEC",
            )
        return super().status(options, tool_model)


def _weights(tool: str, default: str, options: dict[str, Any], marker: str) -> tuple[bool, str]:
    """Whether the weights a tool loads are on disk (a local directory or the hub cache)."""
    model = str(tool_options_of(options, tool).get("model", default))
    path = Path(model).expanduser()
    if path.is_dir():
        return True, str(path)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model, marker)
    except Exception:  # an id that is not a hub id at all
        cached = None
    if isinstance(cached, str):
        return True, model
    return False, (
        f"needs the weights of {model!r}: download them once with `hf download {model}`, "
        f"or point to a local copy with --option {tool}.model=DIR"
    )


def tool_options_of(options: dict[str, Any], name: str) -> dict[str, Any]:
    value = options.get(name) or {}
    return value if isinstance(value, dict) else {}


class _WeightsTool(GTATool):
    weights_tool = ""
    weights_default = ""
    weights_marker = "config.json"

    def status(self, options: dict[str, Any], tool_model: bool) -> ToolStatus:
        base = super().status(options, tool_model)
        if base.status == "unavailable":
            return base
        inner_ok, inner_why = get_tool(self.weights_tool).available()
        if not inner_ok:
            return ToolStatus(self.name, "unavailable", self.backend, inner_why)
        ok, where = _weights(self.weights_tool, self.weights_default, options, self.weights_marker)
        if not ok:
            return ToolStatus(self.name, "unavailable", self.backend, where)
        return ToolStatus(self.name, base.status, self.backend, f"weights: {where}")


# -- perception ----------------------------------------------------------------------------
class GTAOCR(GTATool):
    name = "OCR"
    backend = "ocr"
    description = "Recognize the text in an image; each line is prefixed with its box."
    parameters = {
        "type": "object",
        "properties": {"image": _arg("string", "File name of the image.")},
        "required": ["image"],
    }
    requires = ("rapidocr", "onnxruntime")

    async def forward(self, ctx: ToolContext, image: str) -> ToolResult:  # type: ignore[override]
        result = await self.use("ocr", ctx, {"image": image})
        lines = (result.data or {}).get("lines", []) if isinstance(result.data, dict) else []
        text = "\n".join(f"{format_box(line['box'])} {line['text']}" for line in lines)
        return ToolResult(text=text or "(no text found)", data=result.data)


class GTAMathOCR(GTAOCR):
    name = "MathOCR"
    description = "Recognize a math expression in an image and return it as text."
    approximate = "plain OCR text (RapidOCR), not LaTeX: GTA's MathOCR calls a math OCR service"

    async def forward(self, ctx: ToolContext, image: str) -> ToolResult:  # type: ignore[override]
        result = await self.use("ocr", ctx, {"image": image})
        text = result.data.get("text", "") if isinstance(result.data, dict) else result.text
        return ToolResult(text=text or "(no text found)", data=result.data)


class GTAImageDescription(_VLMTool):
    name = "ImageDescription"
    backend = "caption"
    description = "Describe the content of an image in a few sentences."
    parameters = {
        "type": "object",
        "properties": {"image": _arg("string", "File name of the image.")},
        "required": ["image"],
    }

    async def forward(self, ctx: ToolContext, image: str) -> ToolResult:  # type: ignore[override]
        return await self.use("caption", ctx, {"image": image})


REGION_PROMPT = "eval/gta_region_attribute.jinja"


def crop_region(ctx: ToolContext, image: str, bbox: Any) -> tuple[str, tuple[int, int, int, int]]:
    """Crop ``bbox`` (GTA's ``"(x1, y1, x2, y2)"`` pixels) out of ``image`` into a hidden
    folder of the episode; returns the crop's file name (tools read it like any file) and the
    pixel box."""
    from tracetune.tools.builtin.support import pixel_box

    img = ctx.image(image)
    x1, y1, x2, y2 = pixel_box(parse_box(bbox), img.width, img.height)
    if x2 <= x1 or y2 <= y1:
        raise ToolError(f"bbox {bbox!r} is empty inside the {img.width}x{img.height} image")
    crops = ctx.workdir / ".gta"
    if not crops.is_symlink():
        crops.mkdir(exist_ok=True)
    buffer = io.BytesIO()
    img.crop((x1, y1, x2, y2)).save(buffer, format="PNG")
    # Created beneath the workdir's fd, never through a link the code planted.
    name = ctx.write_file(f".gta/region_{x1}_{y1}_{x2}_{y2}.png", buffer.getvalue())
    return name, (x1, y1, x2, y2)


class GTARegionAttributeDescription(_VLMTool):
    name = "RegionAttributeDescription"
    backend = "visual_qa on the cropped region"
    description = "Describe an attribute (colour, material, text, ...) of a region of an image."
    parameters = {
        "type": "object",
        "properties": {
            "image": _arg("string", "File name of the image."),
            "bbox": _arg("string", "The region as '(x1, y1, x2, y2)' in pixels."),
            "attribute": _arg("string", "The attribute to describe, e.g. 'colour'."),
        },
        "required": ["image", "bbox", "attribute"],
    }

    async def forward(  # type: ignore[override]
        self, ctx: ToolContext, image: str, bbox: str, attribute: str
    ) -> ToolResult:
        from tracetune.prompts import prompt_hash, render
        from tracetune.tools.builtin.vlm import ask_about_image

        crop_name, (x1, y1, x2, y2) = crop_region(ctx, image, bbox)
        prompt = render(REGION_PROMPT, attribute=attribute)
        answer = await ask_about_image(ctx, "visual_qa", crop_name, prompt)
        return ToolResult(
            text=answer,
            data={
                "box": [x1, y1, x2, y2],
                "attribute": attribute,
                "answer": answer,
                "prompt_hash": prompt_hash(REGION_PROMPT),
            },
        )


class GTATextToBbox(_WeightsTool):
    name = "TextToBbox"
    backend = "object_localization"
    weights_tool = "object_localization"
    weights_default = "google/owlv2-base-patch16-ensemble"
    description = "Find the object described by a text in an image and return its box."
    parameters = {
        "type": "object",
        "properties": {
            "image": _arg("string", "File name of the image."),
            "text": _arg("string", "The object to find."),
            "top1": _arg("boolean", "Return only the best box.", True),
        },
        "required": ["image", "text"],
    }

    async def forward(  # type: ignore[override]
        self, ctx: ToolContext, image: str, text: str, top1: bool = True
    ) -> ToolResult:
        result = await self.use("object_localization", ctx, {"image": image, "text": text})
        found = result.data.get("objects", []) if isinstance(result.data, dict) else []
        if top1:
            found = found[:1]
        if not found:
            return ToolResult(text=f"no {text} found", data={"objects": []})
        lines = [f"{format_box(o['box'])}, score {o['score']:.2f}" for o in found]
        return ToolResult(text="\n".join(lines), data={"objects": found})


class GTACountGivenObject(GTATextToBbox):
    name = "CountGivenObject"
    description = "Count the objects of a given kind in an image (or in a region of it)."
    parameters = {
        "type": "object",
        "properties": {
            "image": _arg("string", "File name of the image."),
            "text": _arg("string", "The kind of object to count."),
            "bbox": _arg(
                "string", "Only count inside this region, as '(x1, y1, x2, y2)' in pixels."
            ),
        },
        "required": ["image", "text"],
    }

    async def forward(  # type: ignore[override]
        self, ctx: ToolContext, image: str, text: str, bbox: str | None = None
    ) -> ToolResult:
        # GTA's tool counts inside the crop when a bbox is given (its gold calls pass one).
        region = None
        if bbox is not None and str(bbox).strip():
            image, region = crop_region(ctx, image, bbox)
        result = await self.use("object_localization", ctx, {"image": image, "text": text})
        found = result.data.get("objects", []) if isinstance(result.data, dict) else []
        data: dict[str, Any] = {"count": len(found), "objects": found}
        if region is not None:
            data["region"] = list(region)
        return ToolResult(text=str(len(found)), data=data)


# -- operation -----------------------------------------------------------------------------
class GTADrawBox(GTATool):
    name = "DrawBox"
    backend = "draw_box"
    description = "Draw a box (and an optional label) on an image; returns the new image."
    parameters = {
        "type": "object",
        "properties": {
            "image": _arg("string", "File name of the image."),
            "bbox": _arg("string", "The box as '(x1, y1, x2, y2)' in pixels."),
            "annotation": _arg("string", "A label written above the box."),
        },
        "required": ["image", "bbox"],
    }

    async def forward(  # type: ignore[override]
        self, ctx: ToolContext, image: str, bbox: str, annotation: str | None = None
    ) -> ToolResult:
        args: dict[str, Any] = {"image": image, "box": parse_box(bbox)}
        if annotation:
            args["label"] = annotation
        return await self.use("draw_box", ctx, args)


# GTA's AddText positions: horizontal l/m/r, then vertical t/m/b.
_H = {"l": "left", "m": "middle", "r": "right"}
_V = {"t": "top", "m": "middle", "b": "bottom"}


class GTAAddText(GTATool):
    name = "AddText"
    backend = "add_text"
    description = "Write text on an image at a position; returns the new image."
    parameters = {
        "type": "object",
        "properties": {
            "image": _arg("string", "File name of the image."),
            "text": _arg("string", "The text to write."),
            "position": _arg(
                "string",
                "Where: 'lt', 'lm', 'lb', 'mt', 'mm', 'mb', 'rt', 'rm', 'rb' (horizontal "
                "left/middle/right, then vertical top/middle/bottom) or pixel coordinates 'x, y'.",
            ),
            "color": _arg("string", "Text colour.", "red"),
        },
        "required": ["image", "text", "position"],
    }

    async def forward(  # type: ignore[override]
        self, ctx: ToolContext, image: str, text: str, position: str, color: str = "red"
    ) -> ToolResult:
        args: dict[str, Any] = {"image": image, "text": text, "color": color}
        code = str(position).strip().lower()
        if len(code) == 2 and code[0] in _H and code[1] in _V:
            img = ctx.image(image)
            size = max(12, round(min(img.size) / 12))
            args["size"] = size
            args["position"] = _anchored(img, text, size, _H[code[0]], _V[code[1]])
        else:
            numbers = re.findall(r"-?\d+(?:\.\d+)?", code)
            if len(numbers) != 2:
                raise ToolError(
                    f"position must be one of lt, lm, lb, mt, mm, mb, rt, rm, rb or 'x, y' "
                    f"pixel coordinates, got {position!r}"
                )
            args["position"] = [float(numbers[0]), float(numbers[1])]
        return await self.use("add_text", ctx, args)


def _anchored(img: Image.Image, text: str, size: int, h: str, v: str) -> list[float]:
    """Top-left pixel of ``text`` placed at one of nine anchor points, with a margin."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=font(size))
    tw, th = right - left, bottom - top
    margin = round(min(img.size) / 40)
    x = {"left": margin, "middle": (img.width - tw) / 2, "right": img.width - tw - margin}[h]
    y = {"top": margin, "middle": (img.height - th) / 2, "bottom": img.height - th - margin}[v]
    # Values <= 1 would be read as fractions of the image: keep pixel positions above 1.
    return [float(max(x, 1.5)), float(max(y, 1.5))]


class GTAGoogleSearch(GTATool):
    name = "GoogleSearch"
    backend = "search"
    description = "Search the web and return the best results."
    parameters = {
        "type": "object",
        "properties": {
            "query": _arg("string", "What to search for."),
            "k": _arg("integer", "How many results to return.", 10),
        },
        "required": ["query"],
    }
    requires = ("bm25s",)

    def status(self, options: dict[str, Any], tool_model: bool) -> ToolStatus:
        search = tool_options_of(options, "search")
        backend = search.get("backend", "local")
        if backend == "local" and not search.get("corpus"):
            return ToolStatus(
                self.name,
                "unavailable",
                self.backend,
                "no search corpus or web backend: pass --corpus PATH (offline) or "
                "--option search.backend=serper|google|brave|searxng",
            )
        base = super().status(options, tool_model)
        where = f"local corpus {search['corpus']}" if backend == "local" else f"web: {backend}"
        return ToolStatus(self.name, base.status, f"search ({where})", base.note)

    async def forward(self, ctx: ToolContext, query: str, k: int = 10) -> ToolResult:  # type: ignore[override]
        return await self.use("search", ctx, {"query": query, "top_k": max(1, min(int(k), 20))})


# -- logic ---------------------------------------------------------------------------------
class GTACalculator(GTATool):
    name = "Calculator"
    backend = "calculator"
    description = "Evaluate a math expression, e.g. 'round(12.5 * 3 + 5, 2)'."
    parameters = {
        "type": "object",
        "properties": {"expression": _arg("string", "The expression to evaluate.")},
        "required": ["expression"],
    }

    async def forward(self, ctx: ToolContext, expression: str) -> ToolResult:  # type: ignore[override]
        return await self.use("calculator", ctx, {"expression": expression})


_SOLUTION = re.compile(r"^\s*def\s+solution\s*\(", re.M)


class _SandboxedCode(GTATool):
    """GTA's code tools: the model writes ``def solution(): ...``; it runs in the sandbox."""

    epilogue = ""

    async def run_code(self, ctx: ToolContext, command: str) -> tuple[str, Path]:
        from tracetune.sandbox import Sandbox, SandboxLimits, ToolReply

        if not _SOLUTION.search(command or ""):
            raise ToolError(
                f"{self.name} needs Python code defining a function named solution(), e.g.\n"
                "def solution():\n    ...\n    return ..."
            )
        options = tool_options(ctx, self.name)
        workdir = Path(tempfile.mkdtemp(prefix="tracetune-gta-"))

        async def no_tools(name: str, arguments: dict[str, Any]) -> ToolReply:
            raise ToolError(f"{self.name} code cannot call tools")

        limits = SandboxLimits(timeout_s=float(options.get("timeout_s", 30.0)))
        try:
            async with await Sandbox.start(workdir, [], no_tools, limits) as sandbox:
                result = await sandbox.execute(command + "\n" + self.epilogue)
        except BaseException:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        if result.error is not None:
            shutil.rmtree(workdir, ignore_errors=True)
            raise ToolError(f"{result.error.kind.value}: {result.error.message}")
        return result.stdout, workdir


class GTASolver(_SandboxedCode):
    name = "Solver"
    backend = "sympy code in tracetune.sandbox"
    description = (
        "Solve equations with sympy: write Python that defines solution() and returns the "
        "answer as a string."
    )
    parameters = {
        "type": "object",
        "properties": {"command": _arg("string", "Python code defining solution(), using sympy.")},
        "required": ["command"],
    }
    requires = ("sympy",)
    epilogue = "print(solution())"

    async def forward(self, ctx: ToolContext, command: str) -> ToolResult:  # type: ignore[override]
        stdout, workdir = await self.run_code(ctx, command)
        shutil.rmtree(workdir, ignore_errors=True)
        return ToolResult(text=stdout.strip() or "(no output)")


class GTAPlot(_SandboxedCode):
    name = "Plot"
    backend = "matplotlib code in tracetune.sandbox"
    description = (
        "Draw a chart with matplotlib: write Python that defines solution() and returns the figure."
    )
    parameters = {
        "type": "object",
        "properties": {
            "command": _arg("string", "Python code defining solution(), returning a figure.")
        },
        "required": ["command"],
    }
    requires = ("matplotlib",)
    epilogue = (
        "import matplotlib.pyplot as _plt\n"
        "_fig = solution()\n"
        "(_fig if hasattr(_fig, 'savefig') else _plt.gcf()).savefig('plot.png')\n"
    )

    async def forward(self, ctx: ToolContext, command: str) -> ToolResult:  # type: ignore[override]
        _, workdir = await self.run_code(ctx, command)
        try:
            # Read by fd after the sandbox stopped, never through a link the code left.
            data = read_beneath(workdir, "plot.png", 64 * 1024 * 1024)
            with Image.open(io.BytesIO(data)) as img:
                img.load()
                figure = img.convert("RGB")
        except OSError as exc:
            raise ToolError(f"Plot: the code produced no figure ({exc})") from exc
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        return ToolResult(text="", images=[figure])


# -- creativity ----------------------------------------------------------------------------
class GTATextToImage(_WeightsTool):
    name = "TextToImage"
    backend = "image_generation"
    weights_tool = "image_generation"
    weights_default = "stabilityai/sd-turbo"
    weights_marker = "model_index.json"
    description = "Generate an image from keywords."
    parameters = {
        "type": "object",
        "properties": {"keywords": _arg("string", "What the image shows, as keywords.")},
        "required": ["keywords"],
    }

    async def forward(self, ctx: ToolContext, keywords: str) -> ToolResult:  # type: ignore[override]
        return await self.use("image_generation", ctx, {"prompt": keywords})


class GTAImageStylization(_WeightsTool):
    name = "ImageStylization"
    backend = "image_edit"
    weights_tool = "image_edit"
    weights_default = "timbrooks/instruct-pix2pix"
    weights_marker = "model_index.json"
    description = "Change the style of an image by following an instruction."
    parameters = {
        "type": "object",
        "properties": {
            "image": _arg("string", "File name of the image."),
            "instruction": _arg("string", "The change to make, e.g. 'turn it into a sketch'."),
        },
        "required": ["image", "instruction"],
    }

    async def forward(  # type: ignore[override]
        self, ctx: ToolContext, image: str, instruction: str
    ) -> ToolResult:
        return await self.use("image_edit", ctx, {"image": image, "instruction": instruction})


GTA_TOOLS: dict[str, GTATool] = {
    t.name: t
    for t in (
        GTAOCR(),
        GTAImageDescription(),
        GTARegionAttributeDescription(),
        GTATextToBbox(),
        GTADrawBox(),
        GTAAddText(),
        GTAGoogleSearch(),
        GTACalculator(),
        GTASolver(),
        GTAPlot(),
        GTAMathOCR(),
        GTACountGivenObject(),
        GTATextToImage(),
        GTAImageStylization(),
    )
}
assert tuple(GTA_TOOLS) == GTA_TOOL_NAMES
for _tool in GTA_TOOLS.values():
    _tool.check_signature()


def gta_tool(name: str, meta: dict[str, Any] | None = None) -> GTATool:
    """The GTA tool ``name``, shown with a query's tool metadata when given."""
    if name not in GTA_TOOLS:
        raise UnknownToolError(
            f"{name!r} is not a GTA tool; GTA's tools: {', '.join(GTA_TOOL_NAMES)}"
        )
    tool = GTA_TOOLS[name]
    return tool.with_meta(meta) if meta else tool


def episode_tools(metas: list[dict[str, Any]], status: dict[str, ToolStatus]) -> list[GTATool]:
    """The tools of one GTA query, as its metadata shows them; those that cannot run here
    answer every call with why (the model sees it, as with any tool error)."""
    tools = []
    for meta in metas:
        name = str(meta.get("name", ""))
        tool = copy.copy(gta_tool(name, meta))
        if status[name].status == "unavailable":
            tool.unavailable = status[name].note
        tools.append(tool)
    return tools


def toolset_status(options: dict[str, Any], tool_model: bool) -> dict[str, ToolStatus]:
    """What each GTA tool runs on here, and which cannot run (with the fix)."""
    return {name: tool.status(options, tool_model) for name, tool in GTA_TOOLS.items()}
