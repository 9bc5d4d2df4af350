"""Sample assets bundled with tracetune: a receipt, a photograph with a face, a small corpus.

They let the tools, the agent loop and the tests run on real inputs with no download.
See README.md in this folder for where each file comes from.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from tracetune.errors import InputFileError

DATA_DIR = Path(__file__).resolve().parent

RECEIPT_IMAGE = DATA_DIR / "receipt.png"
RECEIPT_FACTS = DATA_DIR / "receipt.json"
FACE_PHOTO = DATA_DIR / "astronaut.png"  # one face (Eileen Collins; NASA, public domain)
CORPUS = DATA_DIR / "corpus.jsonl"


def sample_path(name: str) -> Path:
    """Path of a bundled file by name, e.g. ``sample_path('receipt.png')``."""
    path = DATA_DIR / name
    if not path.is_file():
        names = sorted(p.name for p in DATA_DIR.iterdir() if p.suffix not in (".py", ".pyc"))
        raise InputFileError(f"no bundled sample {name!r}; available: {', '.join(names)}")
    return path


@cache
def receipt_facts() -> dict[str, Any]:
    """What the bundled receipt says: store, items (name, price), subtotal, tax, total."""
    return json.loads(RECEIPT_FACTS.read_text())  # type: ignore[no-any-return]


def render_receipt(facts: dict[str, Any], width: int = 520) -> Image.Image:
    """Draw a shop receipt (black text on white, DejaVu Sans) from its facts.

    This is how ``receipt.png`` was made; task programs can call it to make receipts with
    known totals.
    """
    from tracetune.tools.builtin.support import font

    title_font, body_font = font(30), font(24)
    margin, line_h = 28, 40
    rows: list[tuple[str, str, Any]] = [("title", facts["store"], None)]
    rows.append(("left", facts.get("date", ""), None))
    rows.append(("rule", "", None))
    rows += [("item", item["name"], item["price"]) for item in facts["items"]]
    rows.append(("rule", "", None))
    rows.append(("item", "Subtotal", facts["subtotal"]))
    rows.append(("item", facts.get("tax_label", "Tax"), facts["tax"]))
    rows.append(("item", "TOTAL", facts["total"]))
    img = Image.new("RGB", (width, margin * 2 + line_h * len(rows) + 10), "white")
    draw = ImageDraw.Draw(img)
    y = margin
    for kind, text, amount in rows:
        if kind == "title":
            w = draw.textlength(text, font=title_font)
            draw.text(((width - w) / 2, y), text, fill="black", font=title_font)
        elif kind == "rule":
            draw.line((margin, y + line_h / 2, width - margin, y + line_h / 2), fill="black")
        else:
            draw.text((margin, y), text, fill="black", font=body_font)
            if amount is not None:
                price = f"{amount:.2f}"
                w = draw.textlength(price, font=body_font)
                draw.text((width - margin - w, y), price, fill="black", font=body_font)
        y += line_h
    return img
