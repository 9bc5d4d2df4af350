"""Open-vocabulary object localization and promptable segmentation with transformers models.

These load real hub models when the user has them (downloaded once, or a local directory):

* ``object_localization``: OWL-ViT / OWLv2 or Grounding DINO
  (``AutoModelForZeroShotObjectDetection``); default ``google/owlv2-base-patch16-ensemble``.
* ``segmentation``: SAM (``SamModel``); default ``facebook/sam-vit-base``.

Options (``ctx.options['object_localization']`` / ``['segmentation']``): ``model`` (hub id or
local directory), ``device`` (default: CUDA when available), ``threshold`` (detection score,
default 0.1 for OWL models and 0.3 for Grounding DINO), ``text_threshold`` (Grounding DINO,
default 0.25), ``max_detections`` (default 20). Models are loaded once per process and id.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
from PIL import Image

from tracetune.tools.builtin.support import (
    TypedTool,
    load_pretrained,
    pixel_box,
    rgb,
    tool_options,
    torch_device,
)
from tracetune.tools.spec import ToolContext, ToolError, ToolResult, register_tool

DEFAULT_DETECTOR = "google/owlv2-base-patch16-ensemble"
DEFAULT_SEGMENTER = "facebook/sam-vit-base"


def split_queries(text: str) -> list[str]:
    """'a red car, a person. dog' -> ['a red car', 'a person', 'dog']."""
    queries = [q.strip() for q in re.split(r"[,.;\n]", text) if q.strip()]
    if not queries:
        raise ToolError("text is empty: name what to find, e.g. 'a red car, a person'")
    return queries


def _from_pretrained(cls: Any, model_id: str) -> Any:
    return cls.from_pretrained(model_id)


def _clean_phrase(label: str, special: set[str]) -> str:
    """Grounding DINO labels are prompt spans: drop special tokens and the phrase periods."""
    words = [w.strip(".") for w in label.split() if w not in special]
    return " ".join(w for w in words if w) or label


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float = 0.5) -> list[int]:
    """Greedy non-maximum suppression; returns kept indices, best first."""
    order = list(np.argsort(-scores))
    keep: list[int] = []
    while order:
        i = order.pop(0)
        keep.append(int(i))
        rest = []
        for j in order:
            x1 = max(boxes[i, 0], boxes[j, 0])
            y1 = max(boxes[i, 1], boxes[j, 1])
            x2 = min(boxes[i, 2], boxes[j, 2])
            y2 = min(boxes[i, 3], boxes[j, 3])
            inter = max(0.0, x2 - x1) * max(0.0, y2 - y1)
            area_i = (boxes[i, 2] - boxes[i, 0]) * (boxes[i, 3] - boxes[i, 1])
            area_j = (boxes[j, 2] - boxes[j, 0]) * (boxes[j, 3] - boxes[j, 1])
            union = area_i + area_j - inter
            if union <= 0 or inter / union <= iou:
                rest.append(j)
        order = rest
    return keep


class ObjectLocalization(TypedTool):
    """Zero-shot detection with OWL-ViT/OWLv2 or Grounding DINO."""

    name = "object_localization"
    requires = ("torch", "transformers", "scipy")  # OWLv2's image processor pads with scipy
    extra = "detection"

    def model(self, model_id: str, device: str) -> tuple[Any, Any]:
        def load() -> tuple[Any, Any]:
            from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

            processor = load_pretrained(
                "processor", model_id, self.name, lambda: AutoProcessor.from_pretrained(model_id)
            )
            model = load_pretrained(
                "model",
                model_id,
                self.name,
                lambda: AutoModelForZeroShotObjectDetection.from_pretrained(model_id),
            )
            return processor, model.to(device).eval()

        return self.cached((model_id, device), load)

    def forward(self, ctx: ToolContext, image: str, text: str) -> ToolResult:  # type: ignore[override]
        """Find objects described in words and return their bounding boxes (open-vocabulary
        detection: any object name or short description works).

        Args:
            image: File name of the image in the working directory.
            text: What to find; several kinds of object separated by commas, e.g.
                'a red car, a person'.
        """
        import torch

        options = tool_options(ctx, self.name)
        model_id = str(options.get("model", DEFAULT_DETECTOR))
        device = torch_device(options)
        processor, model = self.model(model_id, device)
        img = rgb(ctx.image(image))
        queries = split_queries(text)
        family = model.config.model_type
        with torch.inference_mode():
            if family in ("grounding-dino", "mm-grounding-dino"):
                # Grounding DINO reads one lower-case prompt of period-terminated phrases.
                prompt = " ".join(f"{q.lower()}." for q in queries)
                inputs = processor(images=img, text=prompt, return_tensors="pt").to(device)
                outputs = model(**inputs)
                result = processor.post_process_grounded_object_detection(
                    outputs,
                    input_ids=inputs["input_ids"],
                    threshold=float(options.get("threshold", 0.3)),
                    text_threshold=float(options.get("text_threshold", 0.25)),
                    target_sizes=[(img.height, img.width)],
                )[0]
                special = set(processor.tokenizer.all_special_tokens)
                labels = [_clean_phrase(str(label), special) for label in result["text_labels"]]
            elif family in ("owlvit", "owlv2"):
                inputs = processor(text=[queries], images=img, return_tensors="pt").to(device)
                outputs = model(**inputs)
                # OWLv2 pads the image to a square before predicting: boxes are relative to
                # that square, so scale by the longer side and clip.
                side = max(img.size) if family == "owlv2" else None
                result = processor.post_process_grounded_object_detection(
                    outputs,
                    threshold=float(options.get("threshold", 0.1)),
                    target_sizes=[(side, side) if side else (img.height, img.width)],
                    text_labels=[queries],
                )[0]
                labels = [str(label) for label in result["text_labels"]]
            else:
                raise ToolError(
                    f"{model_id!r} is a {family!r} model; object_localization supports OWL-ViT, "
                    "OWLv2 and Grounding DINO checkpoints"
                )
        boxes = result["boxes"].float().cpu().numpy().reshape(-1, 4)
        scores = result["scores"].float().cpu().numpy().reshape(-1)
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, img.width)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, img.height)
        # With no box kept, Grounding DINO's post-processing still decodes one empty phrase.
        labels = labels[: len(scores)]
        found: list[dict[str, Any]] = []
        for label in dict.fromkeys(labels):
            idx = np.array([i for i, lab in enumerate(labels) if lab == label])
            for k in nms(boxes[idx], scores[idx]):
                i = int(idx[k])
                found.append(
                    {
                        "label": label,
                        "box": [round(float(v)) for v in boxes[i]],
                        "score": round(float(scores[i]), 4),
                    }
                )
        found.sort(key=lambda d: -d["score"])
        found = found[: int(options.get("max_detections", 20))]
        if found:
            text_out = "; ".join(
                f"{d['label']}: [{', '.join(map(str, d['box']))}] score {d['score']:.2f}"
                for d in found
            )
        else:
            text_out = f"nothing found for: {', '.join(queries)}"
        return ToolResult(text=text_out, data={"objects": found, "model": model_id})


class Segmentation(TypedTool):
    """Promptable segmentation with SAM: a box or a point in, a mask out."""

    name = "segmentation"
    output_type = "image"
    requires = ("torch", "transformers")

    def model(self, model_id: str, device: str) -> tuple[Any, Any]:
        def load() -> tuple[Any, Any]:
            from transformers import AutoProcessor, SamModel

            processor = load_pretrained(
                "processor", model_id, self.name, lambda: AutoProcessor.from_pretrained(model_id)
            )
            model = load_pretrained(
                "model", model_id, self.name, lambda: _from_pretrained(SamModel, model_id)
            )
            return processor, model.to(device).eval()

        return self.cached((model_id, device), load)

    def forward(  # type: ignore[override]
        self,
        ctx: ToolContext,
        image: str,
        box: list[float] | None = None,
        point: list[float] | None = None,
    ) -> ToolResult:
        """Segment one object, given a box around it or a point on it, and return its mask
        (white on black) and the image with the mask highlighted.

        Args:
            image: File name of the image in the working directory.
            box: Box around the object as [x1, y1, x2, y2] in pixels (or fractions if all <= 1).
            point: A point on the object as [x, y] in pixels (or fractions if both <= 1).
        """
        import torch

        if box is None and point is None:
            raise ToolError("give a box [x1, y1, x2, y2] around the object or a point [x, y] on it")
        options = tool_options(ctx, self.name)
        model_id = str(options.get("model", DEFAULT_SEGMENTER))
        device = torch_device(options)
        processor, model = self.model(model_id, device)
        img = rgb(ctx.image(image))
        prompts: dict[str, Any] = {}
        if box is not None:
            prompts["input_boxes"] = [[list(map(float, pixel_box(box, img.width, img.height)))]]
        if point is not None:
            if len(point) != 2:
                raise ToolError(f"point must be [x, y], got {point!r}")
            x, y = float(point[0]), float(point[1])
            if max(abs(x), abs(y)) <= 1.0:
                x, y = x * img.width, y * img.height
            if not (0 <= x < img.width and 0 <= y < img.height):
                raise ToolError(f"point {point!r} is outside the {img.width}x{img.height} image")
            prompts["input_points"] = [[[[x, y]]]]
            prompts["input_labels"] = [[[1]]]
        inputs = processor(images=img, return_tensors="pt", **prompts).to(device)
        # One point is ambiguous (part or whole?): ask for three masks and keep the best.
        multimask = box is None
        with torch.inference_mode():
            outputs = model(**inputs, multimask_output=multimask)
        masks = processor.image_processor.post_process_masks(
            outputs.pred_masks.cpu(),
            inputs["original_sizes"].cpu(),
            inputs["reshaped_input_sizes"].cpu(),
        )[0][0]  # (num_masks, H, W) for the first image and prompt
        ious = outputs.iou_scores[0, 0].float().cpu()
        best = int(torch.argmax(ious))
        mask = masks[best].numpy().astype(bool)
        area = int(mask.sum())
        ys, xs = np.nonzero(mask)
        bbox = (
            [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1] if area else None
        )
        mask_img = Image.fromarray((mask * 255).astype(np.uint8), mode="L")
        overlay = img.copy()
        tint = Image.new("RGB", img.size, (30, 144, 255))
        overlay.paste(Image.blend(img, tint, 0.5), mask=mask_img)
        share = area / (img.width * img.height)
        text = (
            f"mask covers {share:.1%} of the image"
            + (f", bounding box [{', '.join(map(str, bbox))}]" if bbox else " (empty mask)")
            + f", predicted IoU {float(ious[best]):.2f}"
        )
        return ToolResult(
            text=text,
            images=[overlay, mask_img],
            data={
                "area": area,
                "fraction": round(share, 6),
                "bbox": bbox,
                "score": round(float(ious[best]), 4),
                "model": model_id,
            },
        )


object_localization = register_tool(ObjectLocalization())
segmentation = register_tool(Segmentation())
