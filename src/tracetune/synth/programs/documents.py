"""Multi-page documents (PDF, DOCX, XLSX): find a figure in the right section, then compute."""

from __future__ import annotations

import random
from decimal import Decimal
from typing import Any

from tracetune.schema import GoldAnswer
from tracetune.synth.programs.base import GoldStep, ProgramFile, TaskDraft, number_of, program
from tracetune.synth.programs.render import docx_bytes, grouped, pdf_bytes, xlsx_bytes
from tracetune.synth.programs.vocab import CITIES, DEPARTMENTS, LAST_NAMES, QUARTERS

COMPANIES = [
    "Northwind Tools",
    "Bluepeak Foods",
    "Alder & Finch",
    "Corvid Systems",
    "Marlow Textiles",
    "Kestrel Freight",
    "Orchid Labs",
    "Tallow Energy",
]
METRICS = [
    ("revenue", "k EUR", (120, 2400)),
    ("orders", "orders", (300, 9000)),
    ("new customers", "customers", (20, 900)),
    ("returns", "returns", (5, 400)),
]
FILLER = [
    "This section summarises the figures reported by each branch.",
    "All amounts are unaudited and may be restated in the annual accounts.",
    "Branches that opened during the year report from their first full month.",
    "Questions about these figures go to the finance office.",
    "Seasonal effects were strongest in the third quarter.",
    "Figures for closed branches are excluded from the totals.",
]


def _section_tables(
    rng: random.Random,
    years: list[int],
    branches: list[str],
    metric: tuple[str, str, tuple[int, int]],
) -> dict[int, list[list[int]]]:
    lo, hi = metric[2]
    return {y: [[rng.randint(lo, hi) for _ in QUARTERS] for _ in branches] for y in years}


def _pdf(
    company: str,
    metric: tuple[str, str, Any],
    years: list[int],
    branches: list[str],
    tables: dict[int, list[list[int]]],
    rng: random.Random,
) -> bytes:
    from matplotlib.figure import Figure

    pages = []
    cover = Figure(figsize=(8.27, 11.69))
    cover.text(0.1, 0.85, f"{company}", fontsize=24, weight="bold")
    cover.text(0.1, 0.80, f"Branch report {years[0]}-{years[-1]}", fontsize=16)
    for k, line in enumerate(rng.sample(FILLER, 3)):
        cover.text(0.1, 0.70 - 0.04 * k, line, fontsize=11)
    cover.text(0.1, 0.1, f"Prepared by {rng.choice(LAST_NAMES)} - page 1", fontsize=9)
    pages.append(cover)
    columns = [0.1, 0.38, 0.52, 0.66, 0.80]
    for p, year in enumerate(years, start=2):
        page = Figure(figsize=(8.27, 11.69))
        page.text(
            0.1, 0.9, f"{year}: {metric[0]} by branch ({metric[1]})", fontsize=16, weight="bold"
        )
        page.text(0.1, 0.86, rng.choice(FILLER), fontsize=10)
        y = 0.8
        for x, head in zip(columns, ["Branch", *QUARTERS], strict=True):
            page.text(x, y, head, fontsize=12, weight="bold")
        for name, row in zip(branches, tables[year], strict=True):
            y -= 0.035
            for x, cell in zip(columns, [name, *(grouped(v) for v in row)], strict=True):
                page.text(x, y, cell, fontsize=12)
        page.text(0.1, 0.1, f"page {p}", fontsize=9)
        pages.append(page)
    return pdf_bytes(pages)


def _docx(
    company: str,
    metric: tuple[str, str, Any],
    years: list[int],
    branches: list[str],
    tables: dict[int, list[list[int]]],
    rng: random.Random,
) -> bytes:
    blocks: list[tuple[str, Any]] = [
        ("heading", f"{company} branch report"),
        ("paragraph", " ".join(rng.sample(FILLER, 2))),
    ]
    for year in years:
        blocks.append(("page_break", None))
        blocks.append(("heading", f"{year}: {metric[0]} by branch ({metric[1]})"))
        blocks.append(("paragraph", rng.choice(FILLER)))
        rows = [["Branch", *QUARTERS]] + [
            [name, *(grouped(v) for v in row)]
            for name, row in zip(branches, tables[year], strict=True)
        ]
        blocks.append(("table", rows))
    return docx_bytes(blocks)


def _xlsx(
    metric: tuple[str, str, Any],
    years: list[int],
    branches: list[str],
    tables: dict[int, list[list[int]]],
) -> bytes:
    sheets = []
    for year in years:
        rows: list[list[Any]] = [[f"{metric[0]} ({metric[1]})"], ["Branch", *QUARTERS]]
        rows += [[name, *row] for name, row in zip(branches, tables[year], strict=True)]
        sheets.append((str(year), rows))
    sheets.append(("Notes", [["Unaudited figures"], ["Contact: finance office"]]))
    return xlsx_bytes(sheets)


@program("document", tools=["inspect_file", "calculator"])
def document_program(rng: random.Random) -> TaskDraft:
    """A multi-page PDF, DOCX or XLSX report; find the right year and branch, then compute."""
    kind = rng.choice(["pdf", "docx", "xlsx", "staff"])
    if kind == "staff":
        return staff_sheet_task(rng)
    company = rng.choice(COMPANIES)
    metric = rng.choice(METRICS)
    years = sorted(rng.sample(range(2019, 2025), rng.randint(2, 3)))
    branches = rng.sample(CITIES, rng.randint(4, 7))
    tables = _section_tables(rng, years, branches, metric)
    year = rng.choice(years)
    b = rng.randrange(len(branches))
    row = tables[year][b]
    variant = rng.choice(["change", "year_total", "quarter_sum"])
    if variant == "change":
        q1, q2 = sorted(rng.sample(range(4), 2))
        answer = Decimal(row[q2] - row[q1])
        query = (
            f"In the attached {company} report, by how much did the {metric[0]} of the "
            f"{branches[b]} branch change from {QUARTERS[q1]} to {QUARTERS[q2]} {year}? "
            "Give a negative number for a decrease."
        )
        expression = f"{row[q2]} - {row[q1]}"
        cells = [row[q1], row[q2]]
        purpose = "take the difference between the two quarters"
    elif variant == "year_total":
        answer = Decimal(sum(row))
        query = (
            f"According to the attached report, what were the total {metric[0]} of the "
            f"{branches[b]} branch over all four quarters of {year}?"
        )
        expression = " + ".join(str(v) for v in row)
        cells = row
        purpose = "add the four quarters"
    else:
        q = rng.randrange(4)
        others = [i for i in range(len(branches)) if i != b]
        c = rng.choice(others)
        answer = Decimal(row[q] + tables[year][c][q])
        query = (
            f"Using the attached report, what were the combined {QUARTERS[q]} {year} "
            f"{metric[0]} of the {branches[b]} and {branches[c]} branches?"
        )
        expression = f"{row[q]} + {tables[year][c][q]}"
        cells = [row[q], tables[year][c][q]]
        purpose = "add the two branches"
    if kind == "pdf":
        data = _pdf(company, metric, years, branches, tables, rng)
    elif kind == "docx":
        data = _docx(company, metric, years, branches, tables, rng)
    else:
        data = _xlsx(metric, years, branches, tables)
    name = f"report.{kind}"
    # Spreadsheets hold plain numbers; documents print them with thousands separators.
    expect = [branches[b], str(year), *(str(v) if kind == "xlsx" else grouped(v) for v in cells)]
    return TaskDraft(
        query=query,
        files=[ProgramFile(name, data, f"a {len(years) + 1}-part {kind.upper()} report")],
        steps=[
            GoldStep(
                "inspect_file",
                {"path": name},
                f"read the {kind.upper()} report",
                expect=expect,
                expect_source=name,
            ),
            GoldStep(
                "calculator", {"expression": expression}, purpose, expect_number=float(answer)
            ),
        ],
        answer=GoldAnswer(value=str(answer), kind="number"),
        answer_from=number_of(1),
        variant=f"{kind}_{variant}",
        difficulty=1 + (len(years) > 2) + (variant != "change"),
        metadata={"file_type": kind, "pages": len(years) + 1},
    )


def staff_sheet_task(rng: random.Random) -> TaskDraft:
    """A staff spreadsheet with one sheet per department; sum one department's salaries."""
    depts = rng.sample(DEPARTMENTS, rng.randint(2, 4))
    sheets = []
    salaries: dict[str, list[int]] = {}
    for dept in depts:
        people = rng.sample(LAST_NAMES, rng.randint(3, 6))
        pay = [rng.randint(28, 95) * 1000 for _ in people]
        salaries[dept] = pay
        rows: list[list[Any]] = [["Name", "Role", "Salary"]]
        for person, amount in zip(people, pay, strict=True):
            rows.append([person, rng.choice(["Analyst", "Lead", "Engineer", "Clerk"]), amount])
        sheets.append((dept, rows))
    dept = rng.choice(depts)
    pay = salaries[dept]
    answer = Decimal(sum(pay))
    query = f"What is the total yearly salary of everyone on the {dept} sheet of staff.xlsx?"
    return TaskDraft(
        query=query,
        files=[ProgramFile("staff.xlsx", xlsx_bytes(sheets), "a staff spreadsheet")],
        steps=[
            GoldStep(
                "inspect_file",
                {"path": "staff.xlsx"},
                "read the spreadsheet",
                expect=[dept, *(str(v) for v in pay)],
                expect_source="staff.xlsx",
            ),
            GoldStep(
                "calculator",
                {"expression": " + ".join(str(v) for v in pay)},
                f"add the {dept} salaries",
                expect_number=float(answer),
            ),
        ],
        answer=GoldAnswer(value=str(answer), kind="number"),
        answer_from=number_of(1),
        variant="xlsx_staff_total",
        difficulty=1 + (len(depts) > 2),
        metadata={"file_type": "xlsx", "sheets": len(depts)},
    )
