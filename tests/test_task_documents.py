"""Task programs' documents are complete files that the real converters read.

A .docx holding only ``[Content_Types].xml``, ``_rels/.rels`` and ``word/document.xml`` is a
valid OPC package in theory, but markitdown's DOCX converter (mammoth) rejected it in
practice, and 7% of gold rollouts were dropped as "tool output diverged (inspect_file)".
Documents are now written by python-docx (styles, settings, fonts, core properties: what Word
writes, per ECMA-376 Part 2's package layout and python-docx's default template), and every
document kind the programs draw (pdf, docx, xlsx) is converted here by the real
``inspect_file`` tool, which must show every value the gold step expects.
"""

from __future__ import annotations

import io
import random
import zipfile
from collections import Counter
from pathlib import Path

import docx

from tracetune.rollout import find_value
from tracetune.synth.programs import get_program
from tracetune.synth.programs.render import docx_bytes
from tracetune.tools import get_tool

BLOCKS = [
    ("heading", "Harbor Foods: revenue"),
    ("paragraph", "Quarterly revenue by branch, in dollars."),
    ("table", [["Branch", "Q1", "Q2"], ["Lisbon", "12,400", "13,050"]]),
    ("page_break", None),
    ("paragraph", "Prepared for the board."),
]


def test_docx_is_a_complete_package_and_byte_stable() -> None:
    data = docx_bytes(BLOCKS)
    assert data == docx_bytes(BLOCKS)  # same blocks, same bytes (dates and zip times pinned)
    names = set(zipfile.ZipFile(io.BytesIO(data)).namelist())
    assert {
        "[Content_Types].xml",
        "_rels/.rels",
        "word/document.xml",
        "word/_rels/document.xml.rels",
        "word/styles.xml",
        "word/settings.xml",
        "docProps/core.xml",
    } <= names
    reopened = docx.Document(io.BytesIO(data))
    texts = [p.text for p in reopened.paragraphs if p.text]
    assert texts[0] == "Harbor Foods: revenue" and "Prepared for the board." in texts
    assert reopened.paragraphs[0].style.name == "Heading 1"
    assert reopened.tables[0].cell(1, 2).text == "13,050"
    assert reopened.core_properties.modified.year == 2024


def test_markitdown_reads_the_docx() -> None:
    tool = get_tool("inspect_file")
    tool.ensure_ready()
    markdown = tool.to_markdown(Path("report.docx"), docx_bytes(BLOCKS))  # type: ignore[attr-defined]
    assert markdown.startswith("# Harbor Foods: revenue")
    assert "| Lisbon | 12,400 | 13,050 |" in markdown


def test_the_xml_parser_markitdown_needs_keeps_namespaces() -> None:
    # lxml 6.2 makes BeautifulSoup's "xml" parser drop namespace prefixes, and markitdown's
    # .docx pre-processing then writes a document mammoth cannot read: pinned lxml<6.2.
    from bs4 import BeautifulSoup

    xml = '<w:document xmlns:w="urn:w"><w:body><w:p/></w:body></w:document>'
    assert "<w:body>" in str(BeautifulSoup(xml, features="xml"))


def test_every_document_kind_shows_what_the_gold_step_expects() -> None:
    """Seeds of the document program covering pdf, docx and xlsx reports and staff sheets,
    each read by the real inspect_file, must contain every value the gold step checks (the
    50-task gold rollout of every family in test_task_families.py covers the rest)."""
    program = get_program("document")
    tool = get_tool("inspect_file")
    tool.ensure_ready()
    kinds: Counter[str] = Counter()
    for seed in range(12):
        draft = program.fn(random.Random(seed))  # type: ignore[attr-defined]
        step = draft.steps[0]
        file = next(f for f in draft.files if f.name == step.arguments["path"])
        markdown = tool.to_markdown(Path(file.name), file.data)  # type: ignore[attr-defined]
        missing = [e for e in step.expect if find_value(markdown, e) is None]
        assert not missing, (seed, file.name, missing, markdown[:400])
        kinds[Path(file.name).suffix] += 1
    assert set(kinds) == {".pdf", ".docx", ".xlsx"}, kinds
