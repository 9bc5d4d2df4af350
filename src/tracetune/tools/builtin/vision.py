"""Perception and image-editing tools that run offline: OCR, face detection, zoom, drawing.

OCR uses RapidOCR, whose ONNX models ship in its wheel; face detection uses the Haar
cascades that ship in the opencv-python-headless wheel. Both load once per process, and
both use at most :func:`cpu_threads` threads for their native code.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw

from tracetune.tools.builtin.support import TypedTool, font, pixel_box, rgb, tool_options
from tracetune.tools.spec import ToolContext, ToolError, ToolResult, register_tool, tool


def cpu_threads() -> int | None:
    """The threads this process may give a tool's native code: ``OMP_NUM_THREADS``, which
    Ray sets in an actor to its ``num_cpus`` and a user may set for a run (None: unset, the
    library's own default, one thread per core).

    ONNX Runtime and OpenCV do not read that variable themselves. Without the cap, each of
    two one-CPU Ray actors on a 2-core machine ran OCR on two spinning threads, and two
    actors took 221 s for what one did in 164 s.
    """
    try:
        threads = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return threads if threads >= 1 else None


# -- OCR ------------------------------------------------------------------------------------
def reading_order(lines: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Group text boxes into rows (top to bottom), each row left to right.

    Two boxes share a row when their vertical extents overlap by more than half of the
    shorter one: this keeps a receipt's item name and its right-aligned price together.
    """
    rows: list[list[dict[str, Any]]] = []
    for line in sorted(lines, key=lambda item: (item["box"][1] + item["box"][3]) / 2):
        y1, y2 = line["box"][1], line["box"][3]
        if rows:
            row = rows[-1]
            ry1 = min(item["box"][1] for item in row)
            ry2 = max(item["box"][3] for item in row)
            overlap = min(y2, ry2) - max(y1, ry1)
            if overlap > 0.5 * min(y2 - y1, ry2 - ry1):
                row.append(line)
                continue
        rows.append([line])
    return [sorted(row, key=lambda item: item["box"][0]) for row in rows]


# Images whose shorter side is below this many pixels are read enlarged (see OCR.forward).
SMALL_SIDE = 96


class OCR(TypedTool):
    """RapidOCR (PP-OCR ONNX models from the wheel), one engine per process.

    Text is read upright by default: PP-OCR's direction classifier turns short crops such as
    a table cell's "97" half a turn and reads "L6" (on task-program tables it misread 1 in
    50 renders, every one a short number). Set ``options['ocr']['upright']`` to false for
    photos that hold upside-down text, to run the classifier.
    """

    name = "ocr"
    requires = ("rapidocr", "onnxruntime")

    def setup(self) -> None:
        from rapidocr import RapidOCR

        params: dict[str, Any] = {"Global.log_level": "error"}
        threads = cpu_threads()
        if threads is not None:
            params["EngineConfig.onnxruntime.intra_op_num_threads"] = threads
            params["EngineConfig.onnxruntime.inter_op_num_threads"] = 1
        self.engine = RapidOCR(params=params)
        # RapidOCR loads its three ONNX models on first use; do it here, where setup runs
        # once and off the event loop, instead of inside the first episode's tool call.
        warm = Image.new("RGB", (160, 48), "white")
        ImageDraw.Draw(warm).text((8, 12), "warm up", fill="black", font=font(20))
        self.engine(np.asarray(warm))

    def forward(self, ctx: ToolContext, image: str) -> ToolResult:  # type: ignore[override]
        """Read the text in an image (printed or typed text, documents, signs, receipts).

        Returns the text row by row, top to bottom and left to right; the boxes and
        confidence of every text line are in the structured result.

        Args:
            image: File name of the image in the working directory.
        """
        options = tool_options(ctx, "ocr")
        img = rgb(ctx.image(image))
        upright = bool(options.get("upright", True))
        # A thin strip (one cropped line of text) is read at twice its size: at ~50 px high
        # the detector split "Dmitri Okafor" into overlapping boxes read "Dmitri" and
        # "i Okafor"; doubled, it reads one line.
        zoom = 2 if min(img.size) < SMALL_SIDE and max(img.size) <= 2048 else 1
        if zoom > 1:
            img_in = img.resize((img.width * zoom, img.height * zoom), Image.Resampling.LANCZOS)
        else:
            img_in = img
        out: Any = self.engine(np.asarray(img_in), use_cls=not upright)
        lines: list[dict[str, Any]] = []
        if out.boxes is not None and out.txts:
            for poly, text, score in zip(out.boxes, out.txts, out.scores, strict=True):
                xs = [float(p[0]) / zoom for p in poly]
                ys = [float(p[1]) / zoom for p in poly]
                lines.append(
                    {
                        "text": str(text),
                        "box": [round(min(xs)), round(min(ys)), round(max(xs)), round(max(ys))],
                        "score": round(float(score), 4),
                    }
                )
        min_score = float(options.get("min_score", 0.5))
        lines = [line for line in lines if line["score"] >= min_score]
        rows = reading_order(lines)
        ordered = [line for row in rows for line in row]
        text = "\n".join(" ".join(item["text"] for item in row) for row in rows)
        return ToolResult(
            text=text or "(no text found)",
            data={"text": text, "lines": ordered, "width": img.width, "height": img.height},
        )


ocr = register_tool(OCR())


# -- faces ----------------------------------------------------------------------------------
def _iou(a: list[int], b: list[int]) -> float:
    iw = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    ih = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = iw * ih
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union else 0.0


class FaceDetection(TypedTool):
    """Frontal faces with OpenCV's Haar cascades.

    The ``alt2`` cascade proposes faces and, unless ``options['face_detection']['confirm']``
    is false, the ``default`` cascade must agree (IoU > 0.3). Measured on scikit-image's
    sample images, alt2 alone found one false face (in a cell micrograph) which agreement
    removed; on its 100 LFW face crops (upscaled, padded) recall went from 88 to 85, and
    none of its 100 non-face crops was taken for a face either way. Contrast is evened out
    locally (CLAHE) rather than over the whole image: on those 100 LFW crops (upscaled to
    200 px, on a 320 px grey canvas) recall with agreement went from 92 to 95, still with no
    false face; on a collage of light cards global equalization had hidden the one face.
    Images larger than ``max_side`` (default 1280) are searched downscaled: Haar cost grows
    with the pixels.
    """

    name = "face_detection"
    requires = ("cv2",)

    def setup(self) -> None:
        import cv2

        if not hasattr(cv2, "CascadeClassifier"):
            raise ToolError(
                "this OpenCV build has no CascadeClassifier (OpenCV 5 removed it): "
                "pip install 'opencv-python-headless>=4.14,<5'"
            )
        threads = cpu_threads()
        if threads is not None:
            cv2.setNumThreads(threads)  # process-wide, like the cap it follows
        root = cv2.data.haarcascades  # type: ignore[attr-defined]
        self.primary = cv2.CascadeClassifier(root + "haarcascade_frontalface_alt2.xml")
        self.confirmer = cv2.CascadeClassifier(root + "haarcascade_frontalface_default.xml")
        if self.primary.empty() or self.confirmer.empty():
            raise ToolError(f"OpenCV's face cascades are missing from {root}")
        # A CascadeClassifier keeps per-call scratch state (its scale data): two threads in
        # detectMultiScale at once fail OpenCV's "scaleIdx < scaleData->size()" assertion.
        self._cascade_lock = threading.Lock()

    def forward(self, ctx: ToolContext, image: str) -> ToolResult:  # type: ignore[override]
        """Find human faces in an image and return their bounding boxes.

        Args:
            image: File name of the image in the working directory.
        """
        import cv2

        options = tool_options(ctx, "face_detection")
        img = ctx.image(image).convert("L")
        shrink = min(1.0, int(options.get("max_side", 1280)) / max(img.size))
        if shrink < 1.0:
            img = img.resize(
                (round(img.width * shrink), round(img.height * shrink)), Image.Resampling.BILINEAR
            )
        # Contrast evened out locally (CLAHE), not over the whole image: on a collage that is
        # mostly light cards, global equalization flattened the one photo's face and neither
        # cascade found it.
        gray = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8)).apply(np.asarray(img))
        min_side = max(20, round(float(options.get("min_size", 0.05)) * min(gray.shape)))
        scale = float(options.get("scale_factor", 1.1))

        def detect(cascade: Any, neighbors: int) -> list[list[int]]:
            with self._cascade_lock:
                found = cascade.detectMultiScale(
                    gray, scaleFactor=scale, minNeighbors=neighbors, minSize=(min_side, min_side)
                )
            return [[int(x), int(y), int(x + w), int(y + h)] for x, y, w, h in found]

        faces = detect(self.primary, int(options.get("min_neighbors", 5)))
        if options.get("confirm", True) and faces:
            # A second full pass, not one near each candidate: in tests on scikit-image's
            # samples only the full pass rejected a false face in a micrograph.
            second = detect(self.confirmer, 3)
            faces = [f for f in faces if any(_iou(f, s) > 0.3 for s in second)]
        faces = [[round(v / shrink) for v in f] for f in faces]
        faces.sort(key=lambda b: (b[0], b[1]))
        if not faces:
            text = "no faces found"
        else:
            listed = "; ".join(f"[{', '.join(map(str, b))}]" for b in faces)
            text = f"{len(faces)} face{'s' if len(faces) != 1 else ''} found: {listed}"
        return ToolResult(
            text=text, data={"faces": [{"box": b} for b in faces], "count": len(faces)}
        )


face_detection = register_tool(FaceDetection())


# -- image editing --------------------------------------------------------------------------
@tool(output_type="image")
def image_zoom(ctx: ToolContext, image: str, box: list[float], factor: float = 2.0) -> ToolResult:
    """Zoom into a region of an image: crop it and enlarge it so small details are readable.

    Args:
        image: File name of the image in the working directory.
        box: Region as [x1, y1, x2, y2] in pixels (or fractions of width/height if all <= 1).
        factor: How much to enlarge the region, between 1 and 8.
    """
    if not 1.0 <= factor <= 8.0:
        raise ToolError(f"factor must be between 1 and 8, got {factor}")
    img = ctx.image(image)
    x1, y1, x2, y2 = pixel_box(box, img.width, img.height)
    region = img.crop((x1, y1, x2, y2))
    size = (max(1, round(region.width * factor)), max(1, round(region.height * factor)))
    zoomed = region.resize(size, Image.Resampling.LANCZOS)
    return ToolResult(
        text=f"zoomed region [{x1}, {y1}, {x2}, {y2}] by {factor:g}x to {size[0]}x{size[1]}",
        images=[zoomed],
        data={"box": [x1, y1, x2, y2], "size": list(size)},
    )


@tool(output_type="image")
def draw_box(
    ctx: ToolContext, image: str, box: list[float], label: str = "", color: str = "red"
) -> ToolResult:
    """Draw a rectangle (and an optional label) on a copy of an image, e.g. to mark an object.

    Args:
        image: File name of the image in the working directory.
        box: Rectangle as [x1, y1, x2, y2] in pixels (or fractions of width/height if all <= 1).
        label: Text written just above the rectangle.
        color: Colour name or hex code, such as 'red' or '#00ff00'.
    """
    img = rgb(ctx.image(image)).copy()
    x1, y1, x2, y2 = pixel_box(box, img.width, img.height)
    draw = ImageDraw.Draw(img)
    width = max(2, round(min(img.size) / 150))
    try:
        draw.rectangle((x1, y1, x2, y2), outline=color, width=width)
    except ValueError:
        raise ToolError(f"unknown colour {color!r}; use a name like 'red' or a hex code") from None
    if label:
        face = font(max(12, round(min(img.size) / 30)))
        left, top, right, bottom = draw.textbbox((0, 0), label, font=face)
        tw, th = right - left, bottom - top
        # Above the box when there is room, else just inside its bottom edge.
        ty = y1 - th - 2 * width
        if ty < 0:
            ty = min(y2, img.height - th - 2 * width)
        draw.rectangle((x1, ty, x1 + tw + 2 * width, ty + th + 2 * width), fill=color)
        draw.text((x1 + width - left, ty + width - top), label, fill="white", font=face)
    return ToolResult(
        text=f"drew box [{x1}, {y1}, {x2}, {y2}]" + (f" labelled {label!r}" if label else ""),
        images=[img],
        data={"box": [x1, y1, x2, y2]},
    )


_ANCHORS = Literal[
    "top-left", "top", "top-right", "center", "bottom-left", "bottom", "bottom-right"
]


@tool(output_type="image")
def add_text(
    ctx: ToolContext,
    image: str,
    text: str,
    position: list[float] | None = None,
    anchor: _ANCHORS = "top-left",
    size: int = 0,
    color: str = "white",
) -> ToolResult:
    """Write text onto a copy of an image, with a dark outline so it reads on any background.

    Args:
        image: File name of the image in the working directory.
        text: The text to write (may contain newlines).
        position: Where to put it as [x, y] in pixels (or fractions if both <= 1); if not
            given, the anchor alone decides (with a small margin).
        anchor: Which point of the image the text is placed at when no position is given.
        size: Font size in pixels; 0 picks one from the image size.
        color: Colour name or hex code.
    """
    if not text:
        raise ToolError("text is empty: pass the words to write")
    img = rgb(ctx.image(image)).copy()
    draw = ImageDraw.Draw(img)
    face = font(size if size > 0 else max(12, round(min(img.size) / 12)))
    left, top, right, bottom = draw.multiline_textbbox((0, 0), text, font=face)
    tw, th = right - left, bottom - top
    margin = round(min(img.size) / 40)
    if position is not None:
        if len(position) != 2:
            raise ToolError(f"position must be [x, y], got {position!r}")
        x, y = float(position[0]), float(position[1])
        if max(abs(x), abs(y)) <= 1.0:
            x, y = x * img.width, y * img.height
    else:
        horizontal = {"left": margin, "right": img.width - tw - margin}
        vertical = {"top": margin, "bottom": img.height - th - margin}
        parts = anchor.split("-")
        x = next((horizontal[p] for p in parts if p in horizontal), (img.width - tw) / 2)
        y = next((vertical[p] for p in parts if p in vertical), (img.height - th) / 2)
    stroke = max(1, round(face.size / 15)) if hasattr(face, "size") else 1
    try:
        draw.multiline_text(
            (x, y - top), text, fill=color, font=face, stroke_width=stroke, stroke_fill="black"
        )
    except ValueError:
        raise ToolError(f"unknown colour {color!r}; use a name like 'red' or a hex code") from None
    return ToolResult(
        text=f"wrote {text!r} at [{round(x)}, {round(y)}]",
        images=[img],
        data={"position": [round(x), round(y)], "size": [tw, th]},
    )
