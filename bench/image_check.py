"""Cost of the image check every image passes on its way into a dataset.

`tracetune.inputs.check_image` refuses decompression bombs (from the header), truncated and
corrupt images before anything uses them. This measures it per image, for PNG (chunk CRCs
via PIL's verify) and JPEG (end-of-image marker after the last scan), next to what a full
decode of the same bytes would cost, so the check's share of an ingest of millions of rows
is known.

    python bench/image_check.py
"""

from __future__ import annotations

import io
import os
import time

import numpy as np
from PIL import Image

from tracetune.inputs import check_image


def per_call_ms(fn, data: bytes, repeat: int) -> float:  # type: ignore[no-untyped-def]
    fn(data)
    start = time.perf_counter()
    for _ in range(repeat):
        fn(data)
    return (time.perf_counter() - start) / repeat * 1000


def full_decode(data: bytes) -> None:
    with Image.open(io.BytesIO(data)) as img:
        img.load()


def main() -> None:
    rng = np.random.default_rng(0)
    print(f"load average at start: {os.getloadavg()[0]:.2f}")
    print("| format | size | KiB | check ms | full decode ms |")
    print("|---|---|---:|---:|---:|")
    for fmt, (w, h), extra in [
        ("PNG", (512, 512), {}),
        ("JPEG", (448, 448), {}),
        ("JPEG", (1024, 768), {}),
        ("JPEG", (1024, 768), {"progressive": True}),
    ]:
        pixels = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format=fmt, **extra)
        data = buf.getvalue()
        check = per_call_ms(lambda d: check_image(d, "bench"), data, 100)
        decode = per_call_ms(full_decode, data, 30)
        name = fmt + (" progressive" if extra else "")
        print(f"| {name} | {w}x{h} | {len(data) // 1024} | {check:.2f} | {decode:.2f} |")
    print(f"load average at end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
