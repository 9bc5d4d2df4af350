"""Reuse a deterministic tool's result when several candidates of one task make the same call.

At every step the K candidates often make the same call (the same OCR of the same image);
running it K times (and again in the verifier's completions) costs K times the tool time and
changes nothing. A call is the same when the tool, its validated arguments and the bytes of
every working-directory file an argument names are the same, so a candidate that rewrote a
file gets a fresh call. Only tools listed in ``ExploreConfig.memo_tools`` are memoized:
tools that sample (image generation) or call live services must run every time.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from tracetune.tools import Tool, ToolContext, ToolError, ToolResult

DETERMINISTIC = ["calculator", "ocr", "face_detection", "image_crop", "image_zoom", "search"]


class MemoTool(Tool):
    """``inner`` with its results remembered in ``memo`` (one dict per explored task)."""

    def __init__(self, inner: Tool, memo: dict[str, ToolResult]) -> None:
        super().__init__()
        self.inner = inner
        self.memo = memo
        # The same name, schema and text: prompts render exactly as for the inner tool.
        self.name = inner.name
        self.description = inner.description
        self.parameters = inner.parameters
        self.output_type = inner.output_type
        self.requires = inner.requires
        self.extra = inner.extra
        self._ready = True  # the inner tool sets itself up on its first call
        self.hits = 0

    def available(self) -> tuple[bool, str]:
        return self.inner.available()

    def validate_arguments(self, arguments: dict[str, Any]) -> dict[str, Any]:
        return self.inner.validate_arguments(arguments)

    def key(self, ctx: ToolContext, arguments: dict[str, Any]) -> str:
        files = {}
        for name, value in arguments.items():
            if isinstance(value, str) and value and len(value) < 512:
                try:  # by fd, never through a link the code planted
                    files[name] = hashlib.sha256(ctx.read_bytes(value)).hexdigest()
                except (ToolError, OSError):
                    pass
        blob = json.dumps(
            [self.name, arguments, files, ctx.options.get(self.name)], sort_keys=True, default=str
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    async def acall(self, ctx: ToolContext, arguments: dict[str, Any]) -> ToolResult:
        validated = self.inner.validate_arguments(arguments)
        key = self.key(ctx, validated)
        if key in self.memo:
            self.hits += 1
            return self.memo[key]
        result = await self.inner.acall(ctx, arguments)  # failures raise and are not kept
        self.memo[key] = result
        return result


def memoized(tools: list[Tool], names: list[str]) -> list[Tool]:
    """The tools, those named in ``names`` wrapped with one shared memo."""
    memo: dict[str, ToolResult] = {}
    return [MemoTool(t, memo) if t.name in names else t for t in tools]
