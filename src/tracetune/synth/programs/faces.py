"""Photo collages with a known number of faces: detect, count, crop and read captions.

The faces come from the bundled public-domain photograph (``tracetune.data.FACE_PHOTO``),
re-framed, mirrored and re-lit per tile; distractor tiles are parts of the same photo
without the face, painted scenes and text cards. The number of faces and where they are
is known by construction.
"""

from __future__ import annotations

import functools
import random
from decimal import Decimal

from PIL import Image, ImageDraw, ImageEnhance, ImageOps

from tracetune.schema import GoldAnswer
from tracetune.synth.programs.base import (
    GoldStep,
    ProgramFile,
    TaskDraft,
    count_of,
    number_of,
    program,
    text_in,
)
from tracetune.synth.programs.render import (
    TextStyle,
    cents,
    finish,
    ink,
    jpeg_bytes,
    paper,
    random_style,
    text_width,
)
from tracetune.synth.programs.vocab import CITIES, FIRST_NAMES, LAST_NAMES

# Where the face sits in the bundled photo (Haar box [178, 69, 270, 161]) and the region
# around it that a portrait tile shows: cascades need the head's context to fire.
FACE_BOX = (178, 69, 270, 161)
TILE = (540, 600)  # faces of ~105-125 px: the cascades find them reliably
CAPTION_H = 44
DISTRACTOR_CAPTIONS = [
    "Launch pad",
    "Mission patch",
    "Flag",
    "Harbour at dusk",
    "Old town",
    "Mountain trail",
    "Notice board",
    "Garden",
    "Skyline",
    "Workshop",
]


@functools.cache
def _photo() -> Image.Image:
    from tracetune.data import FACE_PHOTO

    with Image.open(FACE_PHOTO) as img:
        return img.convert("RGB")


def portrait(rng: random.Random, size: int) -> Image.Image:
    """A square tile showing the face, framed, mirrored and lit differently each time.

    The frame keeps the head and shoulders (the face is about a fifth of the tile): Haar
    cascades miss tightly cropped faces far more often.
    """
    fx1, fy1, fx2, fy2 = FACE_BOX
    photo = _photo()
    side = min((fx2 - fx1) / rng.uniform(0.185, 0.215), photo.width, photo.height)
    cx = (fx1 + fx2) / 2 + rng.uniform(-0.05, 0.05) * side
    cy = (fy1 + fy2) / 2 + rng.uniform(0.0, 0.06) * side
    x1 = min(max(0.0, cx - side / 2), photo.width - side)
    y1 = min(max(0.0, cy - side / 2), photo.height - side)
    box = (round(x1), round(y1), round(x1 + side), round(y1 + side))
    tile = photo.crop(box).resize((size, size), Image.Resampling.LANCZOS)
    if rng.random() < 0.5:
        tile = ImageOps.mirror(tile)
    # Brightening washes out the cheeks and the cascades start to miss; only darken.
    tile = ImageEnhance.Brightness(tile).enhance(rng.uniform(0.88, 1.0))
    return ImageEnhance.Color(tile).enhance(rng.uniform(0.6, 1.2))


def distractor(rng: random.Random, size: int) -> Image.Image:
    """A tile without a face: part of the photo below the face, a painted scene, or a card."""
    kind = rng.choice(["photo", "scene", "card", "shapes"])
    if kind == "photo":
        photo = _photo()
        side = rng.randint(180, 250)
        x = rng.randint(0, photo.width - side)
        y = rng.randint(260, photo.height - side)  # below the face: suit, flag, model ship
        return photo.crop((x, y, x + side, y + side)).resize((size, size))
    tile = Image.new("RGB", (size, size), paper(rng))
    draw = ImageDraw.Draw(tile)
    if kind == "scene":
        sky = rng.choice([(150, 190, 230), (240, 180, 140), (200, 210, 225)])
        draw.rectangle((0, 0, size, size), fill=sky)
        for _ in range(rng.randint(2, 3)):
            base = rng.randint(size // 2, size - size // 10)
            colour = rng.choice([(70, 110, 70), (90, 90, 110), (120, 100, 80)])
            peak = base - rng.randint(size // 6, size // 2)
            draw.polygon([(0, size), (rng.randint(0, size), peak), (size, size)], fill=colour)
        r = rng.randint(size // 16, size // 8)
        cx, cy = rng.randint(r, size - r), rng.randint(r, size // 3)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(250, 230, 120))
    elif kind == "card":
        style = random_style(rng, sizes=(size // 10, size // 7), bold_p=0.7)
        word = rng.choice(["OPEN", "EXIT", "SALE", "No. 7", "ROOM B", rng.choice(CITIES)])
        draw.text(
            ((size - text_width(word, style)) // 2, size // 2 - style.size),
            word,
            font=style.font,
            fill=ink(rng),
        )
    else:
        for _ in range(rng.randint(3, 7)):
            w = rng.randint(size // 10, size // 3)
            x, y = rng.randint(0, size - w), rng.randint(0, size - w)
            colour = (rng.randint(40, 220), rng.randint(40, 220), rng.randint(40, 220))
            if rng.random() < 0.5:
                draw.rectangle((x, y, x + w, y + w), fill=colour)
            else:
                draw.ellipse((x, y, x + w, y + w), fill=colour)
    return tile


def collage(
    rng: random.Random,
    faces: int,
    others: int,
    face_captions: list[str] | None = None,
    other_captions: list[str] | None = None,
) -> tuple[Image.Image, list[tuple[int, int, int, int]], list[bool]]:
    """Tiles on a grid in random order; returns the image, tile boxes and which hold faces.

    With captions, each face tile gets the next face caption and each other tile the next
    other caption, written under the tile.
    """
    n = faces + others
    cols = min(n, rng.choice([2, 3]) if n > 2 else n)
    rows = -(-n // cols)
    size = rng.randint(*TILE)
    gap = rng.randint(20, 48)
    captioned = face_captions is not None and other_captions is not None
    cap = CAPTION_H if captioned else 0
    margin = rng.randint(20, 50)
    width = margin * 2 + cols * size + (cols - 1) * gap
    height = margin * 2 + rows * (size + cap) + (rows - 1) * gap
    background = rng.choice([(245, 245, 245), (30, 32, 36), (232, 226, 214), (210, 222, 232)])
    canvas = Image.new("RGB", (width, height), background)
    is_face = [True] * faces + [False] * others
    rng.shuffle(is_face)
    draw = ImageDraw.Draw(canvas)
    style = TextStyle(rng.choice(["sans", "serif"]), rng.randint(22, 26), rng.random() < 0.5)
    text_fill = (240, 240, 240) if sum(background) < 300 else (25, 25, 25)
    face_text, other_text = iter(face_captions or []), iter(other_captions or [])
    boxes = []
    for i, face in enumerate(is_face):
        r, c = divmod(i, cols)
        jitter = rng.randint(-6, 6) if gap > 20 else 0
        x = margin + c * (size + gap) + jitter
        y = margin + r * (size + cap + gap)
        tile = portrait(rng, size) if face else distractor(rng, size)
        canvas.paste(tile, (x, y))
        boxes.append((x, y, x + size, y + size))
        if captioned:
            text = next(face_text) if face else next(other_text)
            draw.text(
                (x + (size - text_width(text, style)) // 2, y + size + 8),
                text,
                font=style.font,
                fill=text_fill,
            )
    return finish(canvas, rng, noise=rng.uniform(1, 4)), boxes, is_face


@program("faces", tools=["face_detection", "image_crop", "ocr", "calculator"])
def faces_program(rng: random.Random) -> TaskDraft:
    """A photo collage with a known number of faces: count them, price tickets, or crop the
    one portrait and read its caption."""
    variant = rng.choice(["count", "tickets", "caption"])
    name = "collage.jpg"
    if variant == "caption":
        others = rng.randint(2, 5)
        person = f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"
        labels = rng.sample(DISTRACTOR_CAPTIONS, others)
        image, boxes, is_face = collage(rng, 1, others, [person], labels)
        k = is_face.index(True)
        x1, y1, x2, y2 = boxes[k]
        crop = [x1 - 10, y2 + 1, x2 + 10, y2 + CAPTION_H + 10]  # margins help the OCR
        crop_name = "image_crop_step1_0.png"  # what the toolbox calls the crop of step 1
        steps = [
            GoldStep(
                "face_detection", {"image": name}, "find the tile with a face", expect_count=1
            ),
            GoldStep(
                "image_crop", {"image": name, "box": crop}, "crop the caption under that portrait"
            ),
            GoldStep(
                "ocr",
                {"image": crop_name},
                "read the caption",
                expect=[person],
                expect_source=f"the caption under the portrait in {name}",
            ),
        ]
        return TaskDraft(
            query="Only one tile of this collage shows a person's face. What name is written "
            "under that photo?",
            files=[ProgramFile(name, jpeg_bytes(image), "a collage of captioned photos")],
            steps=steps,
            answer=GoldAnswer(value=person, kind="text"),
            answer_from=text_in(2, person),
            variant=variant,
            difficulty=3,
            metadata={"faces": 1, "tiles": len(boxes)},
        )
    faces = rng.randint(1, 4)
    others = rng.randint(1, 3)
    image, boxes, is_face = collage(rng, faces, others)
    detect = GoldStep("face_detection", {"image": name}, "detect the faces", expect_count=faces)
    files = [ProgramFile(name, jpeg_bytes(image), "a photo collage")]
    meta = {"faces": faces, "tiles": len(boxes)}
    if variant == "count":
        return TaskDraft(
            query=rng.choice(
                [
                    "How many human faces appear in this collage?",
                    "Count the people whose faces are visible in this image.",
                ]
            ),
            files=files,
            steps=[detect],
            answer=GoldAnswer(value=str(faces), kind="number"),
            answer_from=count_of(0),
            variant=variant,
            difficulty=1 + (faces > 3),
            metadata=meta,
        )
    price = Decimal(rng.randint(450, 2400)) / 100
    answer = price * faces
    return TaskDraft(
        query=f"Everyone whose face is shown in this collage needs a ticket costing "
        f"{cents(price)}. What do the tickets cost in total?",
        files=files,
        steps=[
            detect,
            GoldStep(
                "calculator",
                {"expression": f"{faces} * {cents(price)}"},
                "multiply the number of people by the ticket price",
                expect_number=float(answer),
            ),
        ],
        answer=GoldAnswer(value=cents(answer), kind="number", tolerance=0.01),
        answer_from=number_of(1),
        variant=variant,
        difficulty=2 + (faces > 3),
        metadata=meta,
    )
