"""A small MCP server for the tests, written with the official SDK's FastMCP, over stdio.

Tools: ``add_numbers`` and ``lookup_word`` (deterministic), ``color_swatch`` (returns an
image), ``slow`` (sleeps, for timeouts), ``fail`` (reports a tool error) and ``server_pid``
(so a test can kill the server mid-run).

Run: ``python tests/mcp_server.py`` (stdio) or ``python tests/mcp_server.py --http PORT``.
"""

from __future__ import annotations

import io
import os
import sys
import time

from mcp.server.fastmcp import FastMCP, Image
from PIL import Image as PILImage

WORDS = {"apple": "a round fruit", "tiger": "a large striped cat", "mcp": "model context protocol"}

server = FastMCP("tracetune-test")


@server.tool()
def add_numbers(a: float, b: float) -> float:
    """Add two numbers and return the sum."""
    return a + b


@server.tool(name="lookup-word")
def lookup_word(word: str) -> str:
    """Look up the meaning of an English word in a tiny dictionary."""
    if word.lower() not in WORDS:
        raise ValueError(f"no entry for {word!r}")
    return WORDS[word.lower()]


@server.tool()
def color_swatch(color: str, size: int = 16) -> Image:
    """Draw a square of one color (red, green or blue) and return it as a PNG image."""
    rgb = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}[color]
    buffer = io.BytesIO()
    PILImage.new("RGB", (size, size), rgb).save(buffer, format="PNG")
    return Image(data=buffer.getvalue(), format="png")


@server.tool()
def slow(seconds: float) -> str:
    """Sleep for some seconds, then say so."""
    time.sleep(seconds)
    return f"slept {seconds}"


@server.tool()
def server_pid() -> int:
    """The server's process id."""
    return os.getpid()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--http":
        server.settings.port = int(sys.argv[2])
        server.settings.host = "127.0.0.1"
        server.run(transport="streamable-http")
    else:
        server.run()
