"""Multi-image comparisons: two receipts or two charts, read separately, then compared."""

from __future__ import annotations

import random
from decimal import Decimal

from tracetune.schema import GoldAnswer
from tracetune.synth.programs.base import (
    GoldStep,
    ProgramFile,
    TaskDraft,
    label_of_max,
    number_of,
    program,
)
from tracetune.synth.programs.charts import bar_chart
from tracetune.synth.programs.receipts import draw_receipt, render_receipt
from tracetune.synth.programs.render import cents, grouped, png_bytes
from tracetune.synth.programs.vocab import CITIES, PRODUCTS, STORES


def _receipts(rng: random.Random) -> TaskDraft:
    store_a, store_b = rng.sample(STORES, 2)
    a = draw_receipt(rng, (2, 4), store=store_a)
    b = draw_receipt(rng, (2, 4), store=store_b)
    b.currency = a.currency
    if a.subtotal == b.subtotal:
        b.lines[0].unit += Decimal("0.25")
    printed = rng.random() < 0.5  # totals printed, or only the lines
    a.show_total = b.show_total = printed
    files = [
        ProgramFile("receipt_a.png", png_bytes(render_receipt(rng, a, torn=not printed))),
        ProgramFile("receipt_b.png", png_bytes(render_receipt(rng, b, torn=not printed))),
    ]
    steps = []
    for name, r in (("receipt_a.png", a), ("receipt_b.png", b)):
        expect = [cents(r.subtotal)] if printed else [cents(ln.total) for ln in r.lines]
        steps.append(
            GoldStep("ocr", {"image": name}, f"read {name}", expect=expect, expect_source=name)
        )
    if not printed:
        for label, r in (("a", a), ("b", b)):
            steps.append(
                GoldStep(
                    "calculator",
                    {"expression": " + ".join(cents(ln.total) for ln in r.lines)},
                    f"add up the lines of receipt {label}",
                    expect_number=float(r.subtotal),
                )
            )
    variant = rng.choice(["which", "difference"])
    if variant == "which" and not printed:
        query = (
            "Two receipts are attached, neither with its total. Which store was paid "
            "more? Answer with the store name."
        )
        answer = GoldAnswer(value=a.store if a.subtotal > b.subtotal else b.store, kind="choice")
        recipe = label_of_max([2, 3], [a.store, b.store])
        return TaskDraft(
            query,
            files,
            steps,
            answer,
            recipe,
            variant="receipts_which",
            difficulty=3,
            metadata={"choices": [a.store, b.store]},
        )
    hi, lo = (a, b) if a.subtotal > b.subtotal else (b, a)
    diff = hi.subtotal - lo.subtotal
    steps.append(
        GoldStep(
            "calculator",
            {"expression": f"{cents(hi.subtotal)} - {cents(lo.subtotal)}"},
            "subtract the smaller total from the larger",
            expect_number=float(diff),
        )
    )
    return TaskDraft(
        query="Compare the two receipts. By how much does the larger total exceed the smaller one?",
        files=files,
        steps=steps,
        answer=GoldAnswer(value=cents(diff), kind="number", tolerance=0.01),
        answer_from=number_of(len(steps) - 1),
        variant="receipts_difference",
        difficulty=2 if printed else 3,
    )


def _charts(rng: random.Random) -> TaskDraft:
    labels = rng.sample(rng.choice([CITIES, PRODUCTS]), rng.randint(4, 6))
    year = rng.randint(2019, 2023)
    title, unit = rng.choice([("Sales", "units"), ("Visitors", "visitors"), ("Orders", "orders")])
    first = rng.sample(range(100, 2000), len(labels))
    second = [max(50, v + rng.randint(-400, 600)) for v in first]
    k = rng.randrange(len(labels))
    if second[k] == first[k]:
        second[k] += 37
    files = [
        ProgramFile(
            f"chart_{year}.png",
            bar_chart(rng, f"{title} {year}", labels, first, unit, horizontal=rng.random() < 0.5),
        ),
        ProgramFile(
            f"chart_{year + 1}.png",
            bar_chart(
                rng, f"{title} {year + 1}", labels, second, unit, horizontal=rng.random() < 0.5
            ),
        ),
    ]
    change = Decimal(second[k] - first[k])
    steps = [
        GoldStep(
            "ocr",
            {"image": files[0].name},
            f"read the {year} chart",
            expect=[labels[k], grouped(first[k])],
            expect_source=files[0].name,
        ),
        GoldStep(
            "ocr",
            {"image": files[1].name},
            f"read the {year + 1} chart",
            expect=[labels[k], grouped(second[k])],
            expect_source=files[1].name,
        ),
        GoldStep(
            "calculator",
            {"expression": f"{second[k]} - {first[k]}"},
            f"subtract the {year} value from the {year + 1} value",
            expect_number=float(change),
        ),
    ]
    return TaskDraft(
        query=f"The two charts show {title.lower()} in {year} and {year + 1}. By how much did "
        f"the value for {labels[k]} change from {year} to {year + 1}? Give a negative "
        "number for a decrease.",
        files=files,
        steps=steps,
        answer=GoldAnswer(value=str(change), kind="number"),
        answer_from=number_of(2),
        variant="charts_change",
        difficulty=2,
    )


@program("compare", tools=["ocr", "calculator"])
def compare_program(rng: random.Random) -> TaskDraft:
    """Two receipts or two charts: read each, then compare them."""
    return _receipts(rng) if rng.random() < 0.6 else _charts(rng)
