"""Rendering helpers for task programs: fonts, paper, noise, and byte-stable file writers.

Every writer here is deterministic: the same inputs give the same bytes (no timestamps in
PNG, PDF, DOCX or XLSX files), so a seed always yields the same dataset.
"""

from __future__ import annotations

import datetime as _dt
import functools
import io
import posixpath
import random
import re
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

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


def finish(
    img: Image.Image, rng: random.Random, noise: float = 6.0, blur: float | None = None
) -> Image.Image:
    """Scanner-like noise and an optional slight blur, drawn from ``rng``."""
    arr = np.asarray(img.convert("RGB"), dtype=np.int16)
    if noise > 0:
        arr = arr + np_rng(rng).normal(0.0, noise, arr.shape).round().astype(np.int16)
    out = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")
    if blur:
        out = out.filter(ImageFilter.GaussianBlur(blur))
    return out


def scribbles(
    draw: ImageDraw.ImageDraw,
    rng: random.Random,
    box: tuple[int, int, int, int],
    n: int,
    colour: tuple[int, int, int] = (190, 190, 190),
) -> None:
    """Faint distractor marks (coffee rings, pen strokes) that are not text."""
    x1, y1, x2, y2 = box
    for _ in range(n):
        cx, cy = rng.randint(x1, x2), rng.randint(y1, y2)
        r = rng.randint(8, 30)
        if rng.random() < 0.5:
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), outline=colour, width=2)
        else:
            draw.line(
                (cx, cy, cx + rng.randint(-40, 40), cy + rng.randint(-12, 12)), fill=colour, width=2
            )


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
    with (
        matplotlib.rc_context({"pdf.fonttype": 42}),
        PdfPages(
            buf, metadata={"CreationDate": None, "Creator": "tracetune", "Producer": "tracetune"}
        ) as pdf,
    ):
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


DocBlock = tuple[str, Any]
"""("heading", text) | ("paragraph", text) | ("table", rows) | ("page_break", None)."""

_FIXED_TIME = _dt.datetime(2024, 1, 1)


def docx_bytes(blocks: Sequence[DocBlock]) -> bytes:
    """A Word document (headings, paragraphs, tables, page breaks), written by python-docx as
    a complete package (styles, settings, fonts, core properties) so that Word, LibreOffice
    and markitdown's converter all read it; byte-stable: dates and zip times are pinned."""
    import docx

    document = docx.Document()
    props = document.core_properties
    props.author = props.last_modified_by = "tracetune"
    props.created = props.modified = props.last_printed = _FIXED_TIME
    props.revision = 1
    for kind, value in blocks:
        if kind == "heading":
            document.add_heading(str(value), level=1)
        elif kind == "paragraph":
            document.add_paragraph(str(value))
        elif kind == "table":
            rows = [list(r) for r in value]
            width = max((len(r) for r in rows), default=0)
            if not rows or not width:
                continue
            table = document.add_table(rows=len(rows), cols=width)
            table.style = "Table Grid"
            for r, row in enumerate(rows):
                for c, cell in enumerate(row):
                    table.cell(r, c).text = str(cell)
        elif kind == "page_break":
            document.add_page_break()
        else:
            raise ValueError(f"unknown document block {kind!r}")
    buf = io.BytesIO()
    document.save(buf)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as archive:
        entries = [(info.filename, archive.read(info.filename)) for info in archive.infolist()]
    return zip_bytes(_lean_docx(entries))


# Parts of python-docx's template that no reader needs (Word 2010 style effects, a thumbnail,
# a custom XML item): dropped, with the relationships and content types that name them.
_DOCX_EXTRAS = ("word/stylesWithEffects.xml", "docProps/thumbnail.jpeg", "customXml/")
_W = "{http://schemas.openxmlformats.org/wordprocessingml/2006/main}"


def _lean_docx(entries: list[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """python-docx's package without its template's unused weight: styles.xml keeps the
    styles the document uses (and what they derive from) and the defaults; the converters
    parse a 20 KB package instead of an 840 KB one."""
    from lxml import etree

    def extra(name: str) -> bool:
        return any(name == e or (e.endswith("/") and name.startswith(e)) for e in _DOCX_EXTRAS)

    parts = dict(entries)
    document = etree.fromstring(parts["word/document.xml"])
    used = {
        el.get(_W + "val")
        for tag in ("pStyle", "rStyle", "tblStyle")
        for el in document.iter(_W + tag)
    }
    styles = etree.fromstring(parts["word/styles.xml"])
    by_id = {s.get(_W + "styleId"): s for s in styles.iter(_W + "style")}
    keep = {i for i, s in by_id.items() if s.get(_W + "default") == "1"}
    todo = list(used | keep)
    while todo:
        sid = todo.pop()
        style = by_id.get(sid)
        if style is None:
            continue
        keep.add(sid)
        for tag in ("basedOn", "link", "next"):
            ref = style.find(_W + tag)
            if ref is not None and ref.get(_W + "val") not in keep:
                todo.append(ref.get(_W + "val"))
    for sid, style in by_id.items():
        if sid not in keep:
            styles.remove(style)
    for latent in styles.findall(_W + "latentStyles"):
        styles.remove(latent)
    parts["word/styles.xml"] = etree.tostring(
        styles, xml_declaration=True, encoding="UTF-8", standalone=True
    )
    out = []
    for name, data in entries:
        if extra(name):
            continue
        data = parts[name]
        if name.endswith(".rels") or name == "[Content_Types].xml":
            root = etree.fromstring(data)
            for el in list(root):
                target = el.get("Target") or el.get("PartName") or ""
                if target and name == "word/_rels/document.xml.rels":
                    target = posixpath.normpath("word/" + target)
                if target and extra(target.lstrip("/")):
                    root.remove(el)
            data = etree.tostring(root, xml_declaration=True, encoding="UTF-8", standalone=True)
        out.append((name, data))
    return out


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
