"""Build, load and generate times of the tiny VLMs through the ``local:`` backend.

Run by hand: ``.venv/bin/python bench/tiny_local.py [--repeats 5] [--max-tokens 32]``.
Prints one row per family: parameters, build seconds (in process; the first row also pays
for lazy imports), load seconds, and for a greedy (n=1) and a sampled (n=4) image+text
generation the median seconds per call and milliseconds per decoding step (approximate for
n=4: completion tokens / n).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from PIL import Image

from tracetune.models import Sampling, load_model
from tracetune.models.tiny import TINY_ARCHS, count_parameters, init_tiny


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()

    import torch

    print(f"torch threads: {torch.get_num_threads()}")
    chat = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": Image.new("RGB", (112, 112), (10, 120, 240))},
                {"type": "text", "text": "What is the total on the receipt?"},
            ],
        }
    ]
    print(
        f"{'arch':<11} {'params':>8} {'build s':>8} {'load s':>7} {'greedy s':>9} "
        f"{'ms/tok':>8} {'n=4 s':>7} {'ms/tok':>8}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for arch in TINY_ARCHS:
            start = time.perf_counter()
            path = init_tiny(arch, Path(tmp) / arch)
            build_s = time.perf_counter() - start
            start = time.perf_counter()
            model = load_model(f"local:{path}")
            load_s = time.perf_counter() - start
            params = count_parameters(model.model)  # type: ignore[attr-defined]

            warm = Sampling(max_tokens=4)
            asyncio.run(model.generate(chat, sampling=warm))
            greedy = _timed(model, chat, Sampling(max_tokens=args.max_tokens), 1, args.repeats)
            sampling = Sampling(temperature=1.0, max_tokens=args.max_tokens, seed=0)
            sampled = _timed(model, chat, sampling, 4, args.repeats)
            print(
                f"{arch:<11} {params:>8,} {build_s:>8.2f} {load_s:>7.2f} "
                f"{greedy[0]:>9.3f} {greedy[1]:>8.1f} {sampled[0]:>7.3f} {sampled[1]:>8.1f}"
            )


def _timed(
    model: Any, chat: list[dict[str, Any]], sampling: Sampling, n: int, repeats: int
) -> tuple[float, float]:
    """Median seconds per call and median milliseconds per generated token."""
    seconds, per_token = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        gen = asyncio.run(model.generate(chat, n=n, sampling=sampling))
        elapsed = time.perf_counter() - start
        seconds.append(elapsed)
        # Rows are decoded in lockstep: a call takes as many steps as its longest row.
        steps = max(1, gen.usage.completion_tokens // max(1, n))
        per_token.append(1000 * elapsed / steps)
    return statistics.median(seconds), statistics.median(per_token)


if __name__ == "__main__":
    main()
