"""HTML pieces shared by the viewer's pages and ``eval report``'s item pages.

Steps, files and chat messages are rendered by Jinja2 macros in ``templates/_parts.html``;
``step_html`` exposes the step macro to code that builds its pages by hand (``eval report``)
so a step, its observation images and its typed error look the same everywhere.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup, escape

from tracetune.schema import FileRef, Step

ImageSrc = Callable[[FileRef], str | None]
"""Where a page finds a file's bytes (a URL relative to the page), or None if missing."""

MAX_DOCUMENT_BYTES = 20 * 1024 * 1024
DOCUMENT_SUFFIXES = (".pdf", ".docx", ".xlsx", ".xls", ".pptx", ".csv", ".html", ".htm", ".json")
TEXT_SUFFIXES = (".txt", ".md", ".py", ".jsonl", ".yaml", ".yml", ".tsv", ".log")


@cache
def environment() -> Environment:
    env = Environment(
        loader=PackageLoader("tracetune.view", "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["pretty_json"] = pretty_json
    env.filters["fmt"] = fmt_number
    env.filters["markup_dialogue"] = markup_dialogue
    env.globals["markdown"] = markdown_html
    return env


def pretty_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, sort_keys=True, default=str)


def fmt_number(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


@cache
def _markdown() -> Any:
    from markdown_it import MarkdownIt

    # No raw HTML from documents: what a file holds is shown, never executed.
    return MarkdownIt("commonmark", {"html": False}).enable("table")


def markdown_html(text: str) -> Markup:
    return Markup(_markdown().render(text))


_DOC_CACHE: dict[str, tuple[str | None, str | None]] = {}
_DOC_LOCK = threading.Lock()


def document_markdown(path: Path, ref: FileRef) -> tuple[str | None, str | None]:
    """(markdown, None) for a document markitdown converts, or (None, why not)."""
    with _DOC_LOCK:
        if ref.sha256 in _DOC_CACHE:
            return _DOC_CACHE[ref.sha256]
    if ref.size > MAX_DOCUMENT_BYTES:
        result: tuple[str | None, str | None] = (
            None,
            f"{ref.name} is {ref.size} bytes; documents over {MAX_DOCUMENT_BYTES} bytes are "
            "not converted (download it instead)",
        )
    else:
        try:
            from markitdown import MarkItDown

            suffix = Path(ref.name).suffix.lower()
            text = MarkItDown().convert(str(path), file_extension=suffix or None).text_content
            result = (text, None)
        except Exception as exc:  # an unreadable document is reported on its page
            result = (None, f"{ref.name} could not be converted to markdown: {exc}")
    with _DOC_LOCK:
        _DOC_CACHE[ref.sha256] = result
    return result


def file_kind(ref: FileRef) -> str:
    """How a file is shown: image, document (markdown), text, or download."""
    name = ref.name.lower()
    if ref.is_image:
        return "image"
    if name.endswith(DOCUMENT_SUFFIXES):
        return "document"
    if name.endswith(TEXT_SUFFIXES) or ref.mime.startswith("text/"):
        return "text"
    return "download"


_TAGS = re.compile(
    r"(&lt;(/?)(THOUGHT|OPERATOR|RAG|SIGNAL|ANSWER)&gt;)"
    r"|(&lt;RESULT name=&#34;([^&]*)&#34;&gt;|&lt;/RESULT&gt;)"
    r"|(&lt;\|(begin|end)_(api_invoke|result_of_api)\|&gt;)"
)


def markup_dialogue(text: str) -> Markup:
    """Escape a dialogue turn and mark its MMAT tags (operators, RAG, results, signals)."""
    escaped = str(escape(text))

    def tag(m: re.Match[str]) -> str:
        if m.group(3):
            return f'<span class="tag tag-{m.group(3).lower()}">{m.group(1)}</span>'
        if m.group(4):
            name = (m.group(5) or "").lower()
            kind = "rag" if name in ("rag", "search", "retrieval") else "result"
            return f'<span class="tag tag-{kind}">{m.group(4)}</span>'
        return f'<span class="tag tag-api">{m.group(6)}</span>'

    return Markup(_TAGS.sub(tag, escaped))


def step_html(step: Step, image_src: ImageSrc, anchor: str = "") -> str:
    """One step (thought, action, observation with images, typed error, usage) as HTML."""
    macro = environment().get_template("_parts.html").module.step  # type: ignore[attr-defined]
    return str(macro(step, image_src, None, anchor))


def css() -> str:
    """The stylesheet every page uses (also inlined into ``eval report`` pages)."""
    return (Path(__file__).parent / "static" / "view.css").read_text()
