"""Tables rendered as images: find rows and columns by name, then aggregate."""

from __future__ import annotations

import random
from decimal import Decimal

from PIL import Image, ImageDraw

from tracetune.schema import GoldAnswer
from tracetune.synth.programs.base import GoldStep, ProgramFile, TaskDraft, number_of, program
from tracetune.synth.programs.render import (
    TextStyle,
    accent,
    finish,
    grouped,
    ink,
    paper,
    png_bytes,
    random_style,
    text_width,
)
from tracetune.synth.programs.vocab import CITIES, DEPARTMENTS, MONTHS, PRODUCTS, QUARTERS

# (title, row noun, row pool, column pool, value range, decimals)
SCHEMES = [
    ("Monthly sales (units)", "city", CITIES, MONTHS, (40, 980), 0),
    ("Revenue by quarter (k$)", "product", PRODUCTS, QUARTERS, (12, 480), 1),
    (
        "Headcount by department",
        "department",
        DEPARTMENTS,
        ["2021", "2022", "2023", "2024"],
        (3, 140),
        0,
    ),
    ("Rainfall (mm)", "city", CITIES, MONTHS, (5, 260), 1),
    (
        "Orders per region",
        "product",
        PRODUCTS,
        ["North", "South", "East", "West", "Central"],
        (100, 4800),
        0,
    ),
]


def render_table(
    rng: random.Random, title: str, header: list[str], rows: list[list[str]], footnote: str
) -> Image.Image:
    style = random_style(rng, sizes=(17, 21), families=("sans", "serif"), bold_p=0.0)
    bold = TextStyle(style.family, style.size, True)
    title_style = TextStyle(style.family, style.size + rng.randint(4, 8), True)
    colour = ink(rng)
    pad = rng.randint(10, 16)
    widths = [
        max(text_width(str(r[c]), bold) for r in [header, *rows]) + 2 * pad
        for c in range(len(header))
    ]
    row_h = style.size + 2 * pad
    margin = rng.randint(24, 48)
    width = sum(widths) + 2 * margin
    height = margin * 2 + title_style.size + 24 + row_h * (len(rows) + 1) + style.size + 20
    img = Image.new("RGB", (width, height), paper(rng))
    draw = ImageDraw.Draw(img)
    draw.text((margin + rng.randint(0, 20), margin), title, font=title_style.font, fill=colour)
    top = margin + title_style.size + 24
    header_fill = accent(rng) if rng.random() < 0.5 else None
    zebra = rng.random() < 0.5
    grid = rng.random() < 0.6
    numbers_right = rng.random() < 0.7
    for r, row in enumerate([header, *rows]):
        y = top + r * row_h
        if r == 0 and header_fill is not None:
            draw.rectangle((margin, y, width - margin, y + row_h), fill=header_fill)
        elif zebra and r % 2 == 0:
            draw.rectangle((margin, y, width - margin, y + row_h), fill=(232, 236, 240))
        x = margin
        for c, cell in enumerate(row):
            st = bold if r == 0 or c == 0 else style
            fill = (255, 255, 255) if r == 0 and header_fill is not None else colour
            tx = x + pad
            if c > 0 and numbers_right:
                tx = x + widths[c] - pad - text_width(cell, st)
            draw.text((tx, y + pad - 2), cell, font=st.font, fill=fill)
            x += widths[c]
        if grid or r == 0:
            draw.line((margin, y + row_h, width - margin, y + row_h), fill=colour, width=1)
    if grid:
        x = margin
        for w in [0, *widths]:
            x += w
            draw.line((x, top, x, top + row_h * (len(rows) + 1)), fill=colour, width=1)
        draw.rectangle(
            (margin, top, width - margin, top + row_h * (len(rows) + 1)), outline=colour, width=1
        )
    small = TextStyle(style.family, max(15, style.size - 3))
    draw.text((margin, top + row_h * (len(rows) + 1) + 10), footnote, font=small.font, fill=colour)
    return finish(img, rng, noise=rng.uniform(1, 6))


QUERIES = {
    "lookup_sum": "In the table, what is the combined {col} value of {a} and {b}?",
    "diff": "According to the table, how much higher is the {col} value for {a} than for {b}?",
    "row_total": "What is the total of all {n} columns for the {noun} {a} in this table?",
    "column_mean": "What is the average {col} value across all rows of the table? Round to "
    "two decimals.",
}


@program("table", tools=["ocr", "calculator"])
def table_program(rng: random.Random) -> TaskDraft:
    """A table rendered as an image; look up cells by row and column and aggregate them."""
    title, noun, row_pool, col_pool, (lo, hi), decimals = rng.choice(SCHEMES)
    n_cols = rng.randint(3, min(5, len(col_pool)))
    start = rng.randint(0, len(col_pool) - n_cols)
    columns = col_pool[start : start + n_cols]
    names = rng.sample(row_pool, rng.randint(4, 7))
    scale = Decimal(10) ** -decimals
    values = [
        [Decimal(rng.randint(lo * 10**decimals, hi * 10**decimals)) * scale for _ in columns]
        for _ in names
    ]

    def cell(v: Decimal) -> str:
        return grouped(v, decimals)

    rows = [[name, *(cell(v) for v in vals)] for name, vals in zip(names, values, strict=True)]
    header = [noun.capitalize(), *columns]
    variant = rng.choice(list(QUERIES))
    c = rng.randrange(n_cols)
    i, j = rng.sample(range(len(names)), 2)
    if variant == "diff" and values[i][c] < values[j][c]:
        i, j = j, i
    if variant == "diff" and values[i][c] == values[j][c]:
        values[i][c] += scale
        rows[i][c + 1] = cell(values[i][c])
    plain = [[str(v) for v in vals] for vals in values]  # what goes into the calculator
    if variant == "lookup_sum":
        answer = values[i][c] + values[j][c]
        expression = f"{plain[i][c]} + {plain[j][c]}"
        expect = [names[i], rows[i][c + 1], names[j], rows[j][c + 1], columns[c]]
        purpose = "add the two cells"
    elif variant == "diff":
        answer = values[i][c] - values[j][c]
        expression = f"{plain[i][c]} - {plain[j][c]}"
        expect = [names[i], rows[i][c + 1], names[j], rows[j][c + 1], columns[c]]
        purpose = "subtract the second cell from the first"
    elif variant == "row_total":
        answer = sum(values[i], Decimal(0))
        expression = " + ".join(plain[i])
        expect = [names[i], *rows[i][1:]]
        purpose = f"add up the {names[i]} row"
    else:
        col = [v[c] for v in values]
        answer = (sum(col, Decimal(0)) / len(col)).quantize(Decimal("0.01"))
        expression = f"round(({' + '.join(p[c] for p in plain)}) / {len(col)}, 2)"
        expect = [columns[c], *(r[c + 1] for r in rows)]
        purpose = "average the column"
    query = QUERIES[variant].format(col=columns[c], a=names[i], b=names[j], n=n_cols, noun=noun)
    footnote = rng.choice(
        [
            f"Source: internal report {rng.randint(2019, 2024)}",
            f"Figures rounded; updated {rng.randint(1, 28)} {rng.choice(MONTHS)}",
            f"Page {rng.randint(2, 19)} of {rng.randint(20, 40)}",
        ]
    )
    image = render_table(rng, title, header, rows, footnote)
    tolerance = 0.01 if (decimals or variant == "column_mean") else None
    value = f"{answer:.2f}" if variant == "column_mean" else f"{answer:.{decimals}f}"
    return TaskDraft(
        query=query,
        files=[ProgramFile("table.png", png_bytes(image), f"a table: {title}")],
        steps=[
            GoldStep(
                "ocr",
                {"image": "table.png"},
                "read the table cells",
                expect=expect,
                expect_source="table.png",
            ),
            GoldStep(
                "calculator", {"expression": expression}, purpose, expect_number=float(answer)
            ),
        ],
        answer=GoldAnswer(value=value, kind="number", tolerance=tolerance),
        answer_from=number_of(1),
        variant=variant,
        difficulty=1 + (len(names) > 5) + (variant in ("row_total", "column_mean")),
        metadata={"rows": len(names), "columns": n_cols},
    )
