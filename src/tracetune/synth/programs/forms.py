"""Filled-in forms and signs: read the fields, then reason about them."""

from __future__ import annotations

import datetime as dt
import random
from decimal import Decimal

from PIL import Image, ImageDraw

from tracetune.schema import GoldAnswer
from tracetune.synth.programs.base import GoldStep, ProgramFile, TaskDraft, number_of, program
from tracetune.synth.programs.render import (
    TextStyle,
    accent,
    cents,
    finish,
    ink,
    paper,
    png_bytes,
    random_style,
    round2,
    scribbles,
    text_width,
)
from tracetune.synth.programs.vocab import CITIES, DRINKS, FIRST_NAMES, LAST_NAMES, STREETS

PEN = [(20, 40, 140), (10, 10, 10), (30, 30, 90)]


def render_form(rng: random.Random, title: str, fields: list[tuple[str, str]]) -> Image.Image:
    """A printed form: labelled boxes, each filled in with a pen-coloured value."""
    label = random_style(rng, sizes=(15, 17), families=("sans", "serif"), bold_p=0.0)
    value = random_style(rng, sizes=(20, 24), families=("sans", "serif", "mono"), bold_p=0.3)
    head = TextStyle(label.family, label.size + rng.randint(8, 12), True)
    colour, pen = ink(rng), rng.choice(PEN)
    margin = rng.randint(24, 40)
    box_h = label.size + value.size + 26
    two_columns = rng.random() < 0.5 and len(fields) >= 4
    col_w = max(max(text_width(v, value), text_width(k, label)) for k, v in fields) + 60
    width = margin * 2 + col_w * (2 if two_columns else 1) + (20 if two_columns else 0)
    rows = (len(fields) + 1) // 2 if two_columns else len(fields)
    height = margin * 2 + head.size + 30 + rows * (box_h + 12) + 40
    img = Image.new("RGB", (max(width, text_width(title, head) + 2 * margin), height), paper(rng))
    draw = ImageDraw.Draw(img)
    band = accent(rng)
    if rng.random() < 0.5:
        draw.rectangle((0, 0, img.width, margin + head.size + 12), fill=band)
        draw.text((margin, margin // 2 + 4), title, font=head.font, fill=(255, 255, 255))
    else:
        draw.text((margin, margin // 2 + 4), title, font=head.font, fill=colour)
    top = margin + head.size + 30
    for n, (key, val) in enumerate(fields):
        col, row = (n % 2, n // 2) if two_columns else (0, n)
        x = margin + col * (col_w + 20)
        y = top + row * (box_h + 12)
        draw.rectangle((x, y, x + col_w, y + box_h), outline=colour, width=1)
        draw.text((x + 8, y + 5), key.upper(), font=label.font, fill=colour)
        draw.text(
            (x + 14 + rng.randint(0, 12), y + label.size + 12), val, font=value.font, fill=pen
        )
    draw.text(
        (margin, height - margin - 4),
        f"Form {rng.randint(100, 999)}-{rng.choice('ABC')}",
        font=label.font,
        fill=colour,
    )
    scribbles(draw, rng, (0, 0, img.width - 1, img.height - 1), rng.randint(0, 2))
    return finish(img, rng, noise=rng.uniform(2, 6))


def _person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}"


def _date(d: dt.date, style: str) -> str:
    return d.strftime({"iso": "%Y-%m-%d", "eu": "%d/%m/%Y", "long": "%d %b %Y"}[style])


@program("form", tools=["ocr", "calculator"])
def form_program(rng: random.Random) -> TaskDraft:
    """A filled-in form (timesheet, registration, shipping); read fields and reason."""
    variant = rng.choice(["timesheet", "age", "shipping"])
    name = "form.png"
    if variant == "timesheet":
        hours = Decimal(rng.randint(30, 90)) / 2
        rate = round2(Decimal(rng.randint(1250, 4200)) / 100)
        fields = [
            ("Employee", _person(rng)),
            (
                "Week ending",
                _date(dt.date(2024, 1, 5) + dt.timedelta(weeks=rng.randint(0, 50)), "iso"),
            ),
            ("Hours worked", f"{hours}"),
            ("Hourly rate", cents(rate)),
            ("Department", rng.choice(["Kitchen", "Front desk", "Warehouse", "Cleaning"])),
        ]
        answer = round2(hours * rate)
        query = "What is the gross pay for the week on this timesheet (hours times rate)?"
        expression = f"{hours} * {cents(rate)}"
        expect = [str(hours), cents(rate)]
        purpose = "multiply the hours by the rate"
        title = "Weekly Timesheet"
        value = cents(answer)
    elif variant == "age":
        born = dt.date(rng.randint(1950, 2004), rng.randint(1, 12), rng.randint(1, 28))
        signed = dt.date(rng.randint(2021, 2024), rng.randint(1, 12), rng.randint(1, 28))
        style = rng.choice(["iso", "eu", "long"])
        fields = [
            ("Full name", _person(rng)),
            ("Date of birth", _date(born, style)),
            ("City", rng.choice(CITIES)),
            ("Date signed", _date(signed, style)),
            ("Member no.", str(rng.randint(10000, 99999))),
        ]
        had_birthday = (signed.month, signed.day) >= (born.month, born.day)
        answer = Decimal(signed.year - born.year - (0 if had_birthday else 1))
        query = "How old was the applicant, in whole years, on the date the form was signed?"
        expression = f"{signed.year} - {born.year}" + ("" if had_birthday else " - 1")
        expect = [_date(born, style), _date(signed, style)]
        purpose = (
            "subtract the birth year"
            if had_birthday
            else "subtract the birth year, minus one because the birthday had not come yet"
        )
        title = rng.choice(["Membership Application", "Library Card Registration"])
        value = str(answer)
    else:
        weight = Decimal(rng.randint(5, 240)) / 10
        rate = round2(Decimal(rng.randint(150, 900)) / 100)
        fee = round2(Decimal(rng.randint(100, 600)) / 100)
        fields = [
            ("Sender", _person(rng)),
            ("Destination", rng.choice(CITIES)),
            ("Weight (kg)", f"{weight}"),
            ("Rate per kg", cents(rate)),
            ("Handling fee", cents(fee)),
            ("Street", rng.choice(STREETS)),
        ]
        answer = round2(weight * rate + fee)
        query = (
            "What is the shipping cost on this form: weight times the rate per kg, plus "
            "the handling fee?"
        )
        expression = f"{weight} * {cents(rate)} + {cents(fee)}"
        expect = [str(weight), cents(rate), cents(fee)]
        purpose = "multiply weight by rate and add the fee"
        title = "Parcel Shipping Form"
        value = cents(answer)
    image = render_form(rng, title, fields)
    return TaskDraft(
        query=query,
        files=[ProgramFile(name, png_bytes(image), f"a filled-in {title.lower()}")],
        steps=[
            GoldStep(
                "ocr",
                {"image": name},
                "read the filled-in fields",
                expect=expect,
                expect_source=name,
            ),
            GoldStep(
                "calculator", {"expression": expression}, purpose, expect_number=float(answer)
            ),
        ],
        answer=GoldAnswer(value=value, kind="number", tolerance=None if variant == "age" else 0.01),
        answer_from=number_of(1),
        variant=variant,
        difficulty=2 if variant == "age" else 1 + (variant == "shipping"),
    )


# -- signs ---------------------------------------------------------------------------------
SIGN_THEMES = [  # (background, text, border)
    ((22, 110, 60), (255, 255, 255), (255, 255, 255)),  # road sign green
    ((25, 60, 140), (255, 255, 255), (255, 255, 255)),  # motorway blue
    ((40, 44, 48), (245, 240, 220), (160, 130, 90)),  # chalkboard
    ((255, 255, 255), (20, 20, 20), (200, 30, 30)),  # white with red border
    ((250, 210, 60), (20, 20, 20), (20, 20, 20)),  # yellow
]


def render_sign(rng: random.Random, title: str, rows: list[tuple[str, str]]) -> Image.Image:
    style = random_style(rng, sizes=(24, 32), families=("sans", "serif"), bold_p=0.6)
    head = TextStyle(style.family, style.size + rng.randint(6, 12), True)
    bg, fg, border = rng.choice(SIGN_THEMES)
    gap = rng.randint(36, 80)
    left_w = max(text_width(k, style) for k, _ in rows)
    right_w = max(text_width(v, style) for _, v in rows)
    pad = rng.randint(30, 50)
    width = max(pad * 2 + left_w + gap + right_w, pad * 2 + text_width(title, head))
    line_h = style.size + rng.randint(14, 22)
    height = pad * 2 + head.size + 24 + line_h * len(rows)
    sign = Image.new("RGB", (width, height), bg)
    draw = ImageDraw.Draw(sign)
    draw.rounded_rectangle((6, 6, width - 7, height - 7), radius=18, outline=border, width=5)
    draw.text(((width - text_width(title, head)) // 2, pad), title, font=head.font, fill=fg)
    y = pad + head.size + 24
    for key, val in rows:
        draw.text((pad, y), key, font=style.font, fill=fg)
        draw.text((width - pad - text_width(val, style), y), val, font=style.font, fill=fg)
        y += line_h
    # The sign hangs on a wall or pole: a textured backdrop with the sign off-centre.
    backdrop = rng.choice([(170, 165, 155), (120, 140, 160), (95, 110, 90), (200, 190, 170)])
    canvas = Image.new(
        "RGB", (width + rng.randint(60, 160), height + rng.randint(60, 140)), backdrop
    )
    canvas.paste(
        sign,
        (rng.randint(10, canvas.width - width - 10), rng.randint(10, canvas.height - height - 10)),
    )
    return finish(canvas, rng, noise=rng.uniform(3, 8), blur=rng.choice([None, 0.5]))


def _clock(hours: Decimal) -> str:
    whole = int(hours)
    return f"{whole}:{int((hours - whole) * 60):02d}"


@program("sign", tools=["ocr", "calculator"])
def sign_program(rng: random.Random) -> TaskDraft:
    """A shop, road or café sign; read it and compute hours, distances or an order's cost."""
    variant = rng.choice(["hours", "distance", "menu"])
    name = "sign.png"
    if variant == "hours":
        opens = Decimal(rng.choice([7, 8, 9, 10])) + Decimal(rng.choice([0, 0, 30])) / 60
        closes = Decimal(rng.choice([16, 17, 18, 19, 20])) + Decimal(rng.choice([0, 30])) / 60
        sat_open = Decimal(rng.choice([9, 10]))
        sat_close = sat_open + rng.choice([3, 4, 5, 6])
        sunday = rng.random() < 0.5
        rows = [
            ("Mon - Fri", f"{_clock(opens)} - {_clock(closes)}"),
            ("Saturday", f"{_clock(sat_open)} - {_clock(sat_close)}"),
            ("Sunday", f"{_clock(sat_open)} - {_clock(sat_close)}" if sunday else "Closed"),
        ]
        days_weekend = 2 if sunday else 1
        answer = (closes - opens) * 5 + (sat_close - sat_open) * days_weekend
        query = "According to the sign, how many hours per week is this place open?"
        weekday = f"({_hours(closes)} - {_hours(opens)}) * 5"
        weekend = f"({_hours(sat_close)} - {_hours(sat_open)})" + (" * 2" if sunday else "")
        expression = f"{weekday} + {weekend}"
        expect = [r[1] for r in rows]
        purpose = "add up the opening hours of the week"
        title = rng.choice(["OPENING HOURS", "Store Hours", "We are open"])
        unit = "hours"
    elif variant == "distance":
        places = rng.sample(CITIES, rng.randint(3, 4))
        kms = sorted(rng.sample(range(4, 420), len(places)))
        rows = [(p, f"{k} km") for p, k in zip(places, kms, strict=True)]
        i, j = sorted(rng.sample(range(len(places)), 2))
        answer = Decimal(kms[j] - kms[i])
        query = (
            f"This road sign lists places along the same road. How far is it from "
            f"{places[i]} to {places[j]}, in km?"
        )
        expression = f"{kms[j]} - {kms[i]}"
        expect = [places[i], f"{kms[i]} km", places[j], f"{kms[j]} km"]
        purpose = "subtract the nearer distance from the farther one"
        title = rng.choice(["ROUTE 7", "A12 NORTH", "Motorway"])
        unit = "km"
    else:
        drinks = rng.sample(DRINKS, rng.randint(4, 6))
        prices = [round2(Decimal(rng.randint(180, 620)) / 100) for _ in drinks]
        rows = [(d, cents(p)) for d, p in zip(drinks, prices, strict=True)]
        a, b = rng.sample(range(len(drinks)), 2)
        qa, qb = rng.randint(2, 4), rng.randint(1, 3)
        answer = qa * prices[a] + qb * prices[b]
        query = (
            f"Using the prices on the menu board, what do {qa} {drinks[a]} and {qb} "
            f"{drinks[b]} cost together?"
        )
        expression = f"{qa} * {cents(prices[a])} + {qb} * {cents(prices[b])}"
        expect = [drinks[a], cents(prices[a]), drinks[b], cents(prices[b])]
        purpose = "multiply each price by its quantity and add"
        title = rng.choice(["CAFE MENU", "Drinks", "Today's Prices"])
        unit = None
    image = render_sign(rng, title, rows)
    value = f"{answer:.2f}".rstrip("0").rstrip(".") if variant != "menu" else cents(answer)
    return TaskDraft(
        query=query,
        files=[ProgramFile(name, png_bytes(image), f"a photo of a sign ({variant})")],
        steps=[
            GoldStep("ocr", {"image": name}, "read the sign", expect=expect, expect_source=name),
            GoldStep(
                "calculator", {"expression": expression}, purpose, expect_number=float(answer)
            ),
        ],
        answer=GoldAnswer(value=value, kind="number", tolerance=0.01, unit=unit),
        answer_from=number_of(1),
        variant=variant,
        difficulty=2 if variant == "hours" else 1,
    )


def _hours(value: Decimal) -> str:
    return f"{value:.2f}".rstrip("0").rstrip(".")
