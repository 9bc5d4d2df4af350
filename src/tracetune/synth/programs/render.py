"""Rendering helpers for task programs: fonts, paper, noise, and byte-stable file writers.

Every writer here is deterministic: the same inputs give the same bytes (no timestamps in
PNG, PDF, DOCX or XLSX files), so a seed always yields the same dataset.
"""

from __future__ import annotations

import datetime as _dt
import functools
import io
import random
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any
from xml.sax.saxutils import escape

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

FONT_FAMILIES = {"sans": "DejaVu Sans", "serif": "DejaVu Serif", "mono": "DejaVu Sans Mono"}


@functools.cache
def font_path(family: str, bold: bool = False) -> str:
    """Path of a TTF that ships with matplotlib (so no system fonts are needed)."""
    from matplotlib import font_manager

    props = font_manager.FontProperties(
        family=FONT_FAMILIES[family], weight="bold" if bold else "normal"
    )
    return str(font_manager.findfont(props, fallback_to_default=False))


@functools.cache
def font(family: str, size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(font_path(family, bold), size)


@dataclass(frozen=True)
class TextStyle:
    """A font choice: family, pixel size, weight."""

    family: str
    size: int
    bold: bool = False

    @property
    def font(self) -> ImageFont.FreeTypeFont:
        return font(self.family, self.size, self.bold)

    def larger(self, by: int, bold: bool | None = None) -> TextStyle:
        return TextStyle(self.family, self.size + by, self.bold if bold is None else bold)


def random_style(
    rng: random.Random,
    sizes: tuple[int, int] = (18, 24),
    families: Sequence[str] = ("sans", "serif", "mono"),
    bold_p: float = 0.25,
) -> TextStyle:
    return TextStyle(rng.choice(list(families)), rng.randint(*sizes), rng.random() < bold_p)


def paper(rng: random.Random) -> tuple[int, int, int]:
    """A light background: white, cream, cool grey or a faint tint."""
    base = rng.choice([(255, 255, 255), (250, 247, 238), (244, 246, 248), (248, 244, 250)])
    return tuple(max(225, c - rng.randint(0, 8)) for c in base)  # type: ignore[return-value]


def ink(rng: random.Random) -> tuple[int, int, int]:
    """A dark text colour with strong contrast on ``paper``."""
    return rng.choice([(20, 20, 20), (35, 35, 60), (10, 40, 80), (60, 25, 25), (0, 0, 0)])


def accent(rng: random.Random) -> tuple[int, int, int]:
    """A mid-dark colour for header bands and rules (white text stays readable on it)."""
    return rng.choice([(30, 70, 140), (20, 110, 80), (130, 40, 40), (70, 50, 120), (40, 40, 40)])


def np_rng(rng: random.Random) -> np.random.Generator:
    return np.random.default_rng(rng.getrandbits(64))


def finish(img: Image.Image, rng: random.Random, noise: float = 6.0,
           blur: float | None = None) -> Image.Image:
    """Scanner-like noise and an optional slight blur, drawn from ``rng``."""
    arr = np.asarray(img.convert("RGB"), dtype=np.int16)
    if noise > 0:
        arr = arr + np_rng(rng).normal(0.0, noise, arr.shape).round().astype(np.int16)
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if blur:
        out = out.filter(ImageFilter.GaussianBlur(blur))
    return out


def scribbles(draw: ImageDraw.ImageDraw, rng: random.Random, box: tuple[int, int, int, int],
              n: int, colour: tuple[int, int, int] = (190, 190, 190)) -> None:
    """Faint distractor marks (coffee rings, pen strokes) that are not text."""
    x1, y1, x2, y2 = box
    for _ in range(n):
        cx, cy = rng.randint(x1, x2), rng.randint(y1, y2)
        r = rng.randint(8, 30)
        if rng.random() < 0.5:
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=2)
        else:
            draw.line((cx, cy, cx + rng.randint(-40, 40), cy + rng.randint(-12, 12)),
                      fill=colour, width=2)


def text_width(text: str, style: TextStyle) -> int:
    return int(style.font.getlength(text))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(img: Image.Image, quality: int = 88) -> bytes:
    """JPEG for photo-like images (a tenth of the PNG's size); libjpeg output is stable."""
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def figure_png(fig: Any, dpi: int = 100) -> bytes:
    """A matplotlib Figure as PNG bytes, without the version stamp."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()


def pdf_bytes(figures: Sequence[Any]) -> bytes:
    """Pages (matplotlib Figures) as one PDF with embedded TrueType text (extractable)."""
    import matplotlib
    from matplotlib.backends.backend_pdf import PdfPages

    buf = io.BytesIO()
    with matplotlib.rc_context({"pdf.fonttype": 42}), PdfPages(
        buf, metadata={"CreationDate": None, "Creator": "tracetune", "Producer": "tracetune"}
    ) as pdf:
        for fig in figures:
            pdf.savefig(fig)
    return buf.getvalue()


_EPOCH = (1980, 1, 1, 0, 0, 0)


def zip_bytes(entries: Sequence[tuple[str, bytes | str]]) -> bytes:
    """A zip archive with fixed timestamps (Office files are zips)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, data)
    return buf.getvalue()


_W_NS = 'xmlns:w="http://schemas.openxmlformats.org/wordprocessingml/2006/main"'
_DOCX_TYPES = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
    '<Types xmlns="http://schemas.openxmlformats.org/package/2006/content-types">'
    '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.'
    'relationships+xml"/><Default Extension="xml" ContentType="application/xml"/>'
    '<Override PartName="/word/document.xml" ContentType="application/vnd.openxmlformats-'
    'officedocument.wordprocessingml.document.main+xml"/></Types>'
)
_DOCX_RELS = (
    '<?xml version="1.0" encoding="UTF-8" standalone="yes"?>'
    '<Relationships xmlns="http://schemas.openxmlformats.org/package/2006/relationships">'
    '<Relationship Id="rId1" Type="http://schemas.openxmlformats.org/officeDocument/2006/'
    'relationships/officeDocument" Target="word/document.xml"/></Relationships>'
)

DocBlock = tuple[str, Any]
"""("heading", text) | ("paragraph", text) | ("table", rows) | ("page_break", None)."""


def _para(text: str, style: str | None = None) -> str:
    ppr = f'<w:pPr><w:pStyle w:val="{style}"/></w:pPr>' if style else ""
    return f'<w:p>{ppr}<w:r><w:t xml:space="preserve">{escape(text)}</w:t></w:r></w:p>'


def docx_bytes(blocks: Sequence[DocBlock]) -> bytes:
    """A minimal Word document (headings, paragraphs, tables, page breaks)."""
    body = []
    for kind, value in blocks:
        if kind == "heading":
            body.append(_para(value, "Heading1"))
        elif kind == "paragraph":
            body.append(_para(value))
        elif kind == "table":
            rows = "".join(
                "<w:tr>" + "".join(f"<w:tc>{_para(str(c))}</w:tc>" for c in row) + "</w:tr>"
                for row in value
            )
            body.append(f"<w:tbl>{rows}</w:tbl>")
        elif kind == "page_break":
            body.append('<w:p><w:r><w:br w:type="page"/></w:r></w:p>')
        else:
            raise ValueError(f"unknown document block {kind!r}")
    document = (
        f'<?xml version="1.0" encoding="UTF-8" standalone="yes"?><w:document {_W_NS}>'
        f"<w:body>{''.join(body)}</w:body></w:document>"
    )
    return zip_bytes([
        ("[Content_Types].xml", _DOCX_TYPES),
        ("_rels/.rels", _DOCX_RELS),
        ("word/document.xml", document),
    ])


_MODIFIED = re.compile(rb"(<dcterms:modified[^>]*>)[^<]*(</dcterms:modified>)")


def xlsx_bytes(sheets: Sequence[tuple[str, Sequence[Sequence[Any]]]]) -> bytes:
    """A workbook with one sheet per (title, rows), normalized to be byte-stable."""
    import openpyxl  # type: ignore[import-untyped]

    workbook = openpyxl.Workbook()
    workbook.properties.creator = "tracetune"
    workbook.properties.created = _dt.datetime(2024, 1, 1)
    first = True
    for title, rows in sheets:
        sheet = workbook.active if first else workbook.create_sheet()
        assert sheet is not None
        sheet.title = title
        for row in rows:
            sheet.append(list(row))
        first = False
    buf = io.BytesIO()
    workbook.save(buf)
    # openpyxl stamps the save time into core.xml and every zip entry; pin both.
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as archive:
        entries = []
        for info in archive.infolist():
            data = archive.read(info.filename)
            if info.filename == "docProps/core.xml":
                data = _MODIFIED.sub(rb"\g<1>2024-01-01T00:00:00Z\g<2>", data)
            entries.append((info.filename, data))
    return zip_bytes(entries)


def round2(value: float | Decimal) -> Decimal:
    """Round half up to cents, as a receipt would."""
    return Decimal(str(value)).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def cents(value: Decimal | float) -> str:
    """'12.50' (always two decimals, no thousands separator)."""
    return f"{round2(value):.2f}"


def grouped(value: int | Decimal, decimals: int = 0) -> str:
    """'1,204' or '1,204.50': thousands separators, as reports print them."""
    return f"{Decimal(value):,.{decimals}f}"


CURRENCIES = [("$", "before"), ("€", "after"), ("£", "before"), ("", "none")]


def money(value: Decimal | float, symbol: str, where: str) -> str:
    text = cents(value)
    if where == "before":
        return f"{symbol}{text}"
    if where == "after":
        return f"{text} {symbol}"
    return text
