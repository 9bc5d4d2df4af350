"""Bar, line and pie charts drawn with matplotlib, values printed on the marks."""

from __future__ import annotations

import random
from decimal import Decimal
from typing import Any

from tracetune.schema import GoldAnswer
from tracetune.synth.programs.base import GoldStep, ProgramFile, TaskDraft, number_of, program
from tracetune.synth.programs.render import figure_png, grouped
from tracetune.synth.programs.vocab import CITIES, EXPENSES, FULL_MONTHS, PRODUCTS

# 160 dpi: at 120, OCR missed short isolated labels ("83" above a low bar) on ~4% of charts.
CHART_DPI = 160

PALETTES = [
    ["#4C72B0", "#55A868", "#C44E52", "#8172B2", "#CCB974", "#64B5CD", "#8C8C8C"],
    ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d"],
    ["#2a6f97", "#468faf", "#61a5c2", "#89c2d9", "#a9d6e5", "#01497c", "#013a63"],
    ["#7f5539", "#9c6644", "#b08968", "#ddb892", "#e6ccb2", "#a68a64", "#936639"],
]


def _figure(rng: random.Random) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(rng.uniform(6.0, 8.0), rng.uniform(4.2, 5.4)))
    fig.set_facecolor(rng.choice(["white", "#fbfaf5", "#f4f6f8"]))
    return fig


def bar_chart(
    rng: random.Random,
    title: str,
    labels: list[str],
    values: list[int],
    unit: str,
    horizontal: bool,
) -> bytes:
    fig = _figure(rng)
    if not horizontal:  # room for every category name side by side, none rotated
        fig.set_figwidth(max(fig.get_figwidth(), 1.35 * len(labels) + 1.0))
    ax = fig.add_subplot(1, 1, 1)
    colours = rng.choice(PALETTES)
    colour: Any = colours[: len(values)] if rng.random() < 0.5 else colours[0]
    size = rng.randint(11, 13)
    if horizontal:
        bars = ax.barh(labels, values, color=colour)
        ax.set_xlim(0, max(values) * 1.22)
        ax.invert_yaxis()
    else:
        bars = ax.bar(labels, values, color=colour, width=rng.uniform(0.5, 0.8))
        ax.set_ylim(0, max(values) * 1.18)
    ax.bar_label(bars, labels=[grouped(v) for v in values], padding=3, fontsize=size)
    ax.set_title(title, fontsize=size + 3, pad=12)
    (ax.set_xlabel if horizontal else ax.set_ylabel)(unit, fontsize=size)
    ax.tick_params(labelsize=size)
    # Category names sit clear of their tick marks: a tick touching the top of a centred
    # "l" was read as the dot of an "i" ("Malmo" as "Maimo").
    ax.tick_params(axis="y" if horizontal else "x", length=0, pad=6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if rng.random() < 0.5:
        ax.grid(axis="x" if horizontal else "y", alpha=0.3)
    fig.tight_layout()
    return figure_png(fig, dpi=CHART_DPI)


def line_chart(
    rng: random.Random, title: str, labels: list[str], values: list[int], unit: str
) -> bytes:
    fig = _figure(rng)
    ax = fig.add_subplot(1, 1, 1)
    size = rng.randint(11, 13)
    colour = rng.choice(rng.choice(PALETTES))
    ax.plot(
        labels,
        values,
        marker=rng.choice(["o", "s", "D"]),
        color=colour,
        linewidth=rng.uniform(1.5, 2.5),
    )
    span = max(values) - min(values)
    ax.set_ylim(min(values) - 0.25 * span - 1, max(values) + 0.3 * span + 1)
    # A white box keeps each value readable where it crosses the line.
    for x, v in enumerate(values):
        ax.annotate(
            grouped(v),
            (x, v),
            textcoords="offset points",
            xytext=(0, 11),
            ha="center",
            fontsize=size,
            bbox={"boxstyle": "square,pad=0.15", "fc": "white", "ec": "none"},
        )
    ax.set_title(title, fontsize=size + 3, pad=12)
    ax.set_ylabel(unit, fontsize=size)
    ax.tick_params(labelsize=size)
    ax.tick_params(axis="x", length=0, pad=6)  # labels clear of tick marks, as in bar_chart
    if rng.random() < 0.6:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return figure_png(fig, dpi=CHART_DPI)


def pie_chart(rng: random.Random, title: str, labels: list[str], shares: list[int]) -> bytes:
    fig = _figure(rng)
    ax = fig.add_subplot(1, 1, 1)
    size = rng.randint(11, 13)
    colours = rng.choice(PALETTES)[: len(shares)]
    ax.pie(
        shares,
        labels=[f"{name} {s}%" for name, s in zip(labels, shares, strict=True)],
        colors=colours,
        startangle=rng.randint(0, 359),
        counterclock=rng.random() < 0.5,
        textprops={"fontsize": size},
        labeldistance=1.12,
        wedgeprops={"linewidth": 1, "edgecolor": "white"},
    )
    ax.set_title(title, fontsize=size + 3, pad=18)
    ax.set_aspect("equal")
    fig.tight_layout()
    return figure_png(fig, dpi=CHART_DPI)


def shares_summing_to_100(rng: random.Random, n: int) -> list[int]:
    # At least 7% each so every label sits on its own slice and stays readable.
    cuts = sorted(rng.sample(range(1, 100 - 7 * n + n), n - 1))
    parts = [b - a for a, b in zip([0, *cuts], [*cuts, 100 - 7 * n + n], strict=True)]
    return [p + 6 for p in parts]


@program("chart", tools=["ocr", "calculator"])
def chart_program(rng: random.Random) -> TaskDraft:
    """A bar, line or pie chart; read the printed values and compare or combine them."""
    kind = rng.choice(["bar", "hbar", "line", "pie"])
    name = "chart.png"
    if kind == "pie":
        labels = rng.sample(EXPENSES, rng.randint(3, 6))
        shares = shares_summing_to_100(rng, len(labels))
        total = rng.randint(12, 240) * 1000
        title = rng.choice(["Annual budget", "Spending plan", "Cost breakdown"])
        title = f"{title}: {grouped(total)} EUR"
        data = pie_chart(rng, title, labels, shares)
        k = rng.randrange(len(labels))
        answer = Decimal(total) * shares[k] / 100
        query = (
            f"The chart's title gives the total. How many EUR go to {labels[k]}, "
            "according to its share?"
        )
        expression = f"{total} * {shares[k]} / 100"
        expect = [grouped(total), f"{labels[k]} {shares[k]}%"]
        purpose = f"take {shares[k]}% of the total"
        variant = "pie_share"
    else:
        if kind == "line":
            start = rng.randint(0, 12 - 7)
            # Full month names: OCR misread three-letter ones ("Jul") on the axis.
            labels = FULL_MONTHS[start : start + rng.randint(5, 7)]
            title, unit = rng.choice(
                [
                    ("Website visitors", "visitors"),
                    ("Orders received", "orders"),
                    ("Units shipped", "units"),
                ]
            )
        else:
            labels = rng.sample(rng.choice([CITIES, PRODUCTS]), rng.randint(4, 7))
            title, unit = rng.choice(
                [
                    ("Sales by store", "units sold"),
                    ("Support tickets", "tickets"),
                    ("Energy use", "kWh"),
                ]
            )
        values = rng.sample(
            range(rng.choice([20, 100, 600]), rng.choice([900, 2400, 9000])), len(labels)
        )
        data = (
            line_chart(rng, title, labels, values, unit)
            if kind == "line"
            else bar_chart(rng, title, labels, values, unit, horizontal=kind == "hbar")
        )
        variant = rng.choice(["diff", "sum", "range"])
        i, j = sorted(rng.sample(range(len(labels)), 2))
        if variant == "diff":
            if kind != "line" and values[i] < values[j]:
                i, j = j, i
            answer = (
                Decimal(values[j] - values[i]) if kind == "line" else Decimal(values[i] - values[j])
            )
            if kind == "line":
                query = (
                    f"By how much did the value change from {labels[i]} to {labels[j]}? "
                    "Give a negative number for a decrease."
                )
                expression = f"{values[j]} - {values[i]}"
            else:
                query = f"How much higher is the value for {labels[i]} than for {labels[j]}?"
                expression = f"{values[i]} - {values[j]}"
            expect = [labels[i], grouped(values[i]), labels[j], grouped(values[j])]
            purpose = "take the difference"
        elif variant == "sum":
            answer = Decimal(values[i] + values[j])
            query = f"What is the combined value of {labels[i]} and {labels[j]} in the chart?"
            expression = f"{values[i]} + {values[j]}"
            expect = [labels[i], grouped(values[i]), labels[j], grouped(values[j])]
            purpose = "add the two values"
        else:
            answer = Decimal(max(values) - min(values))
            query = "What is the difference between the highest and the lowest value shown?"
            expression = f"{max(values)} - {min(values)}"
            expect = [grouped(max(values)), grouped(min(values))]
            purpose = "subtract the lowest value from the highest"
        variant = f"{kind}_{variant}"
    numeric_value = f"{answer:.2f}".rstrip("0").rstrip(".")
    return TaskDraft(
        query=query,
        files=[ProgramFile(name, data, f"a {kind} chart")],
        steps=[
            GoldStep(
                "ocr",
                {"image": name},
                "read the values printed on the chart",
                expect=expect,
                expect_source=name,
            ),
            GoldStep(
                "calculator", {"expression": expression}, purpose, expect_number=float(answer)
            ),
        ],
        answer=GoldAnswer(value=numeric_value, kind="number", tolerance=0.01),
        answer_from=number_of(1),
        variant=variant,
        difficulty=2 if kind in ("pie", "line") else 1,
        metadata={"chart": kind},
    )
