"""Re-render the bundled image pool: ``python -m tracetune.data.pool.render_pool``.

Every image here is drawn by tracetune (PIL and matplotlib, DejaVu fonts that ship with
matplotlib), except ``portrait.jpg``, a 160 px thumbnail of the bundled ``astronaut.png``
(NASA, public domain). Captions are in ``captions.jsonl``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from PIL import Image, ImageDraw

HERE = Path(__file__).resolve().parent / "images"


def _font(size: int):  # noqa: ANN202  (PIL font types differ by build)
    from tracetune.tools.builtin.support import font

    return font(size)


def render_chart(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun"]
    rain = [78, 64, 55, 41, 30, 12]
    fig, ax = plt.subplots(figsize=(4, 3), dpi=80)
    ax.bar(months, rain, color="#4a7ab5")
    ax.set_title("Monthly rainfall in Lisbon (mm)")
    ax.set_ylabel("mm")
    for x, y in enumerate(rain):  # bar positions of categorical x are 0, 1, ...
        ax.text(x, y + 1, str(y), ha="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def render_menu(path: Path) -> None:
    img = Image.new("RGB", (360, 260), "#2b2b2b")
    draw = ImageDraw.Draw(img)
    draw.text((20, 14), "CAFE ALMA - MENU", fill="white", font=_font(26))
    rows = [
        ("Espresso", "1.80"),
        ("Cappuccino", "2.90"),
        ("Croissant", "2.20"),
        ("Orange juice", "3.50"),
        ("Toast with jam", "3.10"),
    ]
    for i, (name, price) in enumerate(rows):
        y = 64 + i * 38
        draw.text((24, y), name, fill="white", font=_font(22))
        draw.text((270, y), price, fill="#ffd54a", font=_font(22))
    img.save(path, optimize=True)


def render_shapes(path: Path) -> None:
    img = Image.new("RGB", (320, 220), "white")
    draw = ImageDraw.Draw(img)
    for x, y in [(30, 30), (140, 40), (240, 120)]:
        draw.ellipse((x, y, x + 50, y + 50), fill="#d62828")
    for x, y in [(60, 130), (170, 140)]:
        draw.rectangle((x, y, x + 45, y + 45), fill="#1d4ed8")
    img.save(path, optimize=True)


def render_sign(path: Path) -> None:
    img = Image.new("RGB", (240, 300), "#dfe6ea")
    draw = ImageDraw.Draw(img)
    draw.rectangle((30, 20, 210, 280), fill="white", outline="#c1121f", width=8)
    draw.text((58, 50), "NO", fill="#c1121f", font=_font(48))
    draw.text((52, 110), "PARKING", fill="#c1121f", font=_font(30))
    draw.text((54, 170), "8 AM - 6 PM", fill="black", font=_font(24))
    draw.text((62, 215), "MON - SAT", fill="black", font=_font(24))
    img.save(path, optimize=True)


def main() -> None:
    from tracetune.data import FACE_PHOTO, RECEIPT_IMAGE

    shutil.copyfile(RECEIPT_IMAGE, HERE / "receipt.png")
    render_chart(HERE / "rainfall_chart.png")
    render_menu(HERE / "cafe_menu.png")
    render_shapes(HERE / "shapes.png")
    render_sign(HERE / "parking_sign.png")
    with Image.open(FACE_PHOTO) as photo:
        photo.convert("RGB").resize((160, 160), Image.Resampling.LANCZOS).save(
            HERE / "portrait.jpg", quality=85
        )


if __name__ == "__main__":
    main()
