"""Receipts: OCR the lines, then compute totals, tax, counts or differences."""

from __future__ import annotations

import random
from dataclasses import dataclass
from decimal import Decimal

from PIL import Image, ImageDraw

from tracetune.schema import GoldAnswer
from tracetune.synth.programs.base import GoldStep, ProgramFile, TaskDraft, number_of, program
from tracetune.synth.programs.render import (
    CURRENCIES,
    TextStyle,
    cents,
    finish,
    ink,
    money,
    paper,
    png_bytes,
    random_style,
    round2,
    scribbles,
    text_width,
)
from tracetune.synth.programs.vocab import GOODS, STORES, STREETS


@dataclass
class Line:
    name: str
    qty: int
    unit: Decimal

    @property
    def total(self) -> Decimal:
        return round2(self.unit * self.qty)

    @property
    def label(self) -> str:
        return f"{self.qty} x {self.name}" if self.qty > 1 else self.name


@dataclass
class Receipt:
    store: str
    lines: list[Line]
    currency: tuple[str, str]
    tax_rate: int | None = None  # percent, printed with the subtotal
    show_total: bool = False

    @property
    def subtotal(self) -> Decimal:
        return sum((line.total for line in self.lines), Decimal("0"))

    def fmt(self, value: Decimal) -> str:
        return money(value, *self.currency)


def draw_receipt(
    rng: random.Random, n_lines: tuple[int, int] = (3, 6), store: str | None = None
) -> Receipt:
    goods = rng.sample(GOODS, rng.randint(*n_lines))
    lines = []
    for name, low, high in goods:
        unit = round2(Decimal(str(rng.uniform(low, high))))
        qty = rng.choice([1, 1, 1, 2, 2, 3, 4])
        lines.append(Line(name, qty, unit))
    return Receipt(store or rng.choice(STORES), lines, rng.choice(CURRENCIES))


def render_receipt(rng: random.Random, receipt: Receipt, torn: bool) -> Image.Image:
    """The receipt on a table top, with jittered layout, fonts and distractor lines."""
    style = random_style(rng, sizes=(18, 22), families=("sans", "mono", "serif"), bold_p=0.2)
    head = TextStyle(style.family, style.size + rng.randint(6, 10), True)
    small = TextStyle(style.family, max(16, style.size - 2), False)
    colour = ink(rng)
    width = max(400, max(text_width(ln.label, style) for ln in receipt.lines) + 190)
    margin = rng.randint(18, 30)
    spacing = style.size + rng.randint(10, 16)

    rows: list[tuple[str, str, TextStyle]] = []  # (left, right, style)
    rows.append((f"{rng.randint(10, 999)} {rng.choice(STREETS)}", "", small))
    rows.append(
        (
            f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
            f"{rng.randint(7, 21):02d}:{rng.randint(0, 59):02d}",
            small,
        )
    )
    rows.append((f"Receipt #{rng.randint(10000, 99999)}", "", small))
    rows.append(("-" * 40, "", small))
    for line in receipt.lines:
        rows.append((line.label, receipt.fmt(line.total), style))
        if line.qty > 1:
            rows.append((f"   @ {cents(line.unit)} each", "", small))
    rows.append(("-" * 40, "", small))
    if receipt.tax_rate is not None:
        rows.append(("SUBTOTAL", receipt.fmt(receipt.subtotal), style))
        rows.append((f"Tax rate {receipt.tax_rate}%", "", style))
    if receipt.show_total:
        rows.append(("TOTAL", receipt.fmt(receipt.subtotal), head))
    if not torn:
        distractors = [
            (f"Card **** {rng.randint(1000, 9999)}", "", small),
            (f"Loyalty points: {rng.randint(20, 900)}", "", small),
            ("Thank you for shopping!", "", small),
            (f"Tel 555-{rng.randint(1000, 9999)}", "", small),
        ]
        rows.extend(rng.sample(distractors, rng.randint(1, 3)))

    height = margin * 2 + head.size + 20 + sum(spacing for _ in rows) + (30 if torn else 0)
    paper_rgb = paper(rng)
    sheet = Image.new("RGB", (width, height), paper_rgb)
    draw = ImageDraw.Draw(sheet)
    title_w = text_width(receipt.store, head)
    draw.text(
        ((width - title_w) // 2 + rng.randint(-10, 10), margin),
        receipt.store,
        font=head.font,
        fill=colour,
    )
    y = margin + head.size + 20
    right = width - margin
    for left, value, st in rows:
        if left.startswith("---"):
            draw.line((margin, y + st.size // 2, right, y + st.size // 2), fill=colour, width=1)
        else:
            draw.text((margin, y), left, font=st.font, fill=colour)
        if value:
            draw.text((right - text_width(value, st), y), value, font=st.font, fill=colour)
        y += spacing
    if torn:  # a ragged lower edge: the rest of the receipt is missing
        points = [(0, height)]
        x = 0
        while x < width:
            x += rng.randint(8, 18)
            points.append((min(x, width), height - rng.randint(4, 22)))
        points.append((width, height))
    table = rng.choice([(92, 70, 52), (60, 64, 70), (120, 110, 96), (40, 52, 46)])
    pad_x, pad_y = rng.randint(20, 70), rng.randint(20, 60)
    canvas = Image.new("RGB", (width + 2 * pad_x, height + 2 * pad_y), table)
    if torn:
        mask = Image.new("L", sheet.size, 255)
        ImageDraw.Draw(mask).polygon(points, fill=0)
        canvas.paste(sheet, (pad_x + rng.randint(-10, 10), pad_y), mask)
    else:
        canvas.paste(sheet, (pad_x + rng.randint(-10, 10), pad_y))
    scribbles(ImageDraw.Draw(canvas), rng, (0, 0, 12, canvas.height - 1), rng.randint(0, 2))
    return finish(canvas, rng, noise=rng.uniform(2, 7), blur=rng.choice([None, None, 0.4]))


QUERIES = {
    "total": [
        "The bottom of this receipt is torn off. What was the total amount paid for all items?",
        "Add up every line on this receipt. What is the total?",
        "How much did this shopping trip cost in total, according to the receipt?",
    ],
    "tax": [
        "The receipt lists a subtotal and a tax rate, but the total is missing. What is the "
        "total including tax, rounded to cents?",
        "Using the subtotal and tax rate printed on the receipt, compute the amount due "
        "after tax (two decimals).",
    ],
    "count": [
        "How many units were bought in total on this receipt (sum of the quantities)?",
        "Count the articles on the receipt, taking quantities like '3 x' into account.",
    ],
    "diff": [
        "How much more does the most expensive line on the receipt cost than the cheapest line?",
        "What is the difference between the largest and the smallest line total on this receipt?",
    ],
}


@program("receipt", tools=["ocr", "calculator"])
def receipt_program(rng: random.Random) -> TaskDraft:
    """A shop receipt; OCR its lines, then compute a total, tax, count or difference."""
    variant = rng.choice(list(QUERIES))
    receipt = draw_receipt(rng)
    image_name = "receipt.png"
    read = "read the receipt"
    if variant == "tax":
        receipt.tax_rate = rng.choice([5, 6, 7, 8, 10, 12, 15, 20])
        sub = receipt.subtotal
        answer = round2(sub * (100 + receipt.tax_rate) / 100)
        expression = f"round({cents(sub)} * (1 + {receipt.tax_rate}/100), 2)"
        expect = [cents(sub), f"{receipt.tax_rate}%"]
        purpose = "apply the tax rate to the subtotal"
    elif variant == "count":
        answer = Decimal(sum(ln.qty for ln in receipt.lines))
        expression = " + ".join(str(ln.qty) for ln in receipt.lines)
        expect = [ln.label for ln in receipt.lines]
        purpose = "add up the quantities"
    elif variant == "diff":
        if len({ln.total for ln in receipt.lines}) < 2:
            receipt.lines[0].unit += Decimal("0.37")
        hi = max(receipt.lines, key=lambda ln: ln.total)
        lo = min(receipt.lines, key=lambda ln: ln.total)
        answer = hi.total - lo.total
        expression = f"{cents(hi.total)} - {cents(lo.total)}"
        expect = [cents(hi.total), cents(lo.total)]
        purpose = "subtract the cheapest line from the most expensive one"
    else:
        answer = receipt.subtotal
        expression = " + ".join(cents(ln.total) for ln in receipt.lines)
        expect = [cents(ln.total) for ln in receipt.lines]
        purpose = "add up the line totals"
    image = render_receipt(rng, receipt, torn=variant in ("total", "tax") or rng.random() < 0.5)
    numeric = variant != "count"
    return TaskDraft(
        query=rng.choice(QUERIES[variant]),
        files=[ProgramFile(image_name, png_bytes(image), "a photographed shop receipt")],
        steps=[
            GoldStep("ocr", {"image": image_name}, read, expect=expect, expect_source=image_name),
            GoldStep(
                "calculator", {"expression": expression}, purpose, expect_number=float(answer)
            ),
        ],
        answer=GoldAnswer(
            value=cents(answer) if numeric else str(answer),
            kind="number",
            tolerance=0.01 if numeric else None,
        ),
        answer_from=number_of(1),
        variant=variant,
        difficulty=1 + (len(receipt.lines) > 4) + (variant in ("tax", "diff")),
        metadata={"currency": receipt.currency[0] or None},
    )
