"""Built-in tools on real inputs they must get right, the extras on tiny random models, and
the ``tracetune tools`` CLI. No network: web search is only tested for its error paths and
against an in-process mock transport."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont
from typer.testing import CliRunner

from tracetune.data import CORPUS, FACE_PHOTO, RECEIPT_IMAGE, receipt_facts
from tracetune.testing.scripted import ScriptedChatModel
from tracetune.tools import (
    Tool,
    ToolContext,
    ToolError,
    ToolUnavailable,
    get_tool,
    registered_tools,
)
from tracetune.tools.builtin.detection import ObjectLocalization, Segmentation
from tracetune.tools.builtin.diffusion import ImageEdit, ImageGeneration
from tracetune.tools.builtin.files import truncate
from tracetune.tools.builtin.retrieval import reciprocal_rank_fusion, split_passages
from tracetune.tools.builtin.vision import reading_order
from tracetune.tools.builtin.websearch import web_search


def dejavu(size: int) -> ImageFont.FreeTypeFont:
    from matplotlib import font_manager

    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


@pytest.fixture
def ctx(tmp_path: Path) -> ToolContext:
    return ToolContext(workdir=tmp_path)


def put(ctx: ToolContext, name: str, img: Image.Image) -> str:
    img.save(ctx.workdir / name)
    return name


def copy_in(ctx: ToolContext, src: Path) -> str:
    (ctx.workdir / src.name).write_bytes(src.read_bytes())
    return src.name


def run(name: str, ctx: ToolContext, **arguments: Any) -> Any:
    return get_tool(name)(ctx, **arguments)


# -- registry -------------------------------------------------------------------------------
def test_every_tool_is_registered_with_a_documented_schema() -> None:
    tools = registered_tools()
    expected = {
        "ocr",
        "face_detection",
        "image_crop",
        "image_zoom",
        "draw_box",
        "add_text",
        "calculator",
        "solver",
        "inspect_file",
        "search",
        "visual_qa",
        "caption",
        "object_localization",
        "segmentation",
        "image_generation",
        "image_edit",
        "final_answer",
    }
    assert expected <= set(tools)
    for name in expected:
        schema = tools[name].openai_schema()["function"]
        assert schema["description"], name
        for prop, spec in schema["parameters"]["properties"].items():
            assert spec.get("description") and spec.get("type"), (name, prop)
    assert tools["segmentation"].parameters["required"] == ["image"]
    assert tools["solver"].parameters["properties"]["equations"]["items"] == {"type": "string"}


# -- OCR ------------------------------------------------------------------------------------
def test_ocr_reads_a_rendered_string_exactly(ctx: ToolContext) -> None:
    img = Image.new("RGB", (760, 190), "white")
    draw = ImageDraw.Draw(img)
    draw.text((24, 20), "Invoice 4521 total due 37.85 EUR", fill="black", font=dejavu(34))
    draw.text((24, 110), "Paid by card", fill="black", font=dejavu(34))
    draw.text((520, 112), "ref K7Q2", fill="black", font=dejavu(34))
    result = run("ocr", ctx, image=put(ctx, "doc.png", img))
    assert result.text == "Invoice 4521 total due 37.85 EUR\nPaid by card ref K7Q2"
    lines = result.data["lines"]
    assert [line["text"] for line in lines] == [
        "Invoice 4521 total due 37.85 EUR",
        "Paid by card",
        "ref K7Q2",
    ]
    x1, y1, x2, y2 = lines[0]["box"]
    assert 10 <= x1 <= 30 and 10 <= y1 <= 30 and 560 <= x2 <= 640 and y2 <= 70
    assert all(line["score"] > 0.9 for line in lines)


def test_ocr_finds_the_total_on_the_bundled_receipt(ctx: ToolContext) -> None:
    facts = receipt_facts()
    result = run("ocr", ctx, image=copy_in(ctx, RECEIPT_IMAGE))
    rows = result.text.splitlines()
    assert rows[0] == facts["store"]
    assert f"TOTAL {facts['total']:.2f}" in rows
    for item in facts["items"]:
        assert f"{item['name']} {item['price']:.2f}" in rows


def test_ocr_reads_short_numbers_upright(ctx: ToolContext) -> None:
    """PP-OCR's direction classifier turns a short crop such as "97" half a turn ("L6");
    the tool reads upright text unless asked to run it."""
    import random

    from tracetune.synth.programs.tables import render_table

    header = ["Department", "2021", "2022", "2023", "2024"]
    rows = [
        ["Logistics", "11", "111", "21", "13"],
        ["Marketing", "97", "45", "139", "113"],
        ["Design", "97", "75", "62", "63"],
        ["Finance", "56", "85", "137", "33"],
    ]
    image = render_table(random.Random(0), "Headcount by department", header, rows, "Rounded")
    name = put(ctx, "table.png", image)
    cells = {line["text"] for line in run("ocr", ctx, image=name).data["lines"]}
    assert {c for row in rows for c in row} <= cells
    ctx.options = {**ctx.options, "ocr": {"upright": False}}  # the classifier's own reading
    flipped = {line["text"] for line in run("ocr", ctx, image=name).data["lines"]}
    assert "97" not in flipped


def test_ocr_reads_a_cropped_caption_as_one_line(ctx: ToolContext) -> None:
    """A faces task's caption strip (its gold crop, ~54 px high): read at its own size the
    detector split the name into overlapping boxes ("Dmitri", "i Okafor")."""
    import io

    from tracetune.synth.programs import get_program

    draft = get_program("faces").draft(277037331682973104)  # type: ignore[attr-defined]
    collage = Image.open(io.BytesIO(draft.files[0].data)).convert("RGB")
    strip = collage.crop(tuple(draft.steps[1].arguments["box"]))
    result = run("ocr", ctx, image=put(ctx, "strip.png", strip))
    assert result.text == draft.steps[2].expect[0] == "Dmitri Okafor"
    (line,) = result.data["lines"]
    assert 0 <= line["box"][0] < line["box"][2] <= strip.width  # boxes in the strip's pixels


def test_ocr_on_a_blank_image_says_so(ctx: ToolContext) -> None:
    result = run("ocr", ctx, image=put(ctx, "blank.png", Image.new("RGB", (200, 100), "white")))
    assert result.text == "(no text found)" and result.data["lines"] == []


def test_ocr_and_faces_keep_to_the_processs_thread_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ray actor of num_cpus=1 gets OMP_NUM_THREADS=1; ONNX Runtime and OpenCV do not read
    it, so the tools pass it on (else two one-CPU actors each spin two threads per core)."""
    import cv2
    import rapidocr

    from tracetune.tools.builtin.vision import OCR, FaceDetection, cpu_threads

    for value, expected in (("", None), ("abc", None), ("0", None), ("3", 3)):
        monkeypatch.setenv("OMP_NUM_THREADS", value)
        assert cpu_threads() == expected
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert cpu_threads() is None

    made: list[dict[str, Any]] = []
    real = rapidocr.RapidOCR

    def recording(*args: Any, params: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        made.append(dict(params or {}))
        return real(*args, params=params, **kwargs)

    monkeypatch.setattr(rapidocr, "RapidOCR", recording)
    OCR().setup()  # no budget: the library's default
    assert not any("threads" in key for key in made[-1])
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    ocr = OCR()
    ocr.setup()
    assert made[-1]["EngineConfig.onnxruntime.intra_op_num_threads"] == 1
    assert made[-1]["EngineConfig.onnxruntime.inter_op_num_threads"] == 1
    assert ocr.engine(np.full((40, 120, 3), 255, np.uint8)).txts in (None, ())  # still reads

    before = cv2.getNumThreads()
    try:
        FaceDetection().setup()
        assert cv2.getNumThreads() == 1
    finally:
        cv2.setNumThreads(before)


def test_reading_order_groups_rows_then_columns() -> None:
    lines = [
        {"text": t, "box": b}
        for t, b in [
            ("3.49", [400, 102, 450, 128]),
            ("TOTAL", [10, 200, 90, 230]),
            ("Oat milk", [10, 100, 120, 130]),
            ("Header", [10, 10, 200, 40]),
            ("9.99", [400, 198, 450, 228]),
        ]
    ]
    rows = [[item["text"] for item in row] for row in reading_order(lines)]
    assert rows == [["Header"], ["Oat milk", "3.49"], ["TOTAL", "9.99"]]


# -- faces ----------------------------------------------------------------------------------
def test_face_detection_finds_the_face_in_the_bundled_photo(ctx: ToolContext) -> None:
    result = run("face_detection", ctx, image=copy_in(ctx, FACE_PHOTO))
    assert result.data["count"] == 1
    x1, y1, x2, y2 = result.data["faces"][0]["box"]
    # The face spans roughly x 180-270, y 70-160 in the 512x512 photo.
    assert 160 <= x1 <= 195 and 50 <= y1 <= 85 and 255 <= x2 <= 290 and 145 <= y2 <= 180
    assert result.text.startswith("1 face found")


def test_face_detection_counts_two_faces_and_none_in_blank_or_text(ctx: ToolContext) -> None:
    photo = Image.open(FACE_PHOTO).convert("RGB")
    pair = Image.new("RGB", (1024, 512))
    pair.paste(photo, (0, 0))
    pair.paste(photo.transpose(Image.Transpose.FLIP_LEFT_RIGHT), (512, 0))
    result = run("face_detection", ctx, image=put(ctx, "pair.png", pair))
    assert result.data["count"] == 2
    left, right = (f["box"] for f in result.data["faces"])
    assert left[2] < 512 <= right[0]
    blank = run(
        "face_detection", ctx, image=put(ctx, "blank.png", Image.new("RGB", (400, 300), "gray"))
    )
    assert blank.data["count"] == 0 and blank.text == "no faces found"
    receipt = run("face_detection", ctx, image=copy_in(ctx, RECEIPT_IMAGE))
    assert receipt.data["count"] == 0
    # A large photo is searched downscaled; boxes come back in its own pixels.
    big = run("face_detection", ctx, image=put(ctx, "big.png", pair.resize((3072, 1536))))
    assert big.data["count"] == 2
    assert [round(v / 3) for v in big.data["faces"][0]["box"]] == pytest.approx(left, abs=6)


def test_face_detection_finds_the_face_on_a_collage_of_light_cards(ctx: ToolContext) -> None:
    """A faces task whose collage is three text cards and one photo: equalizing contrast
    over the whole image flattened the face and neither cascade fired."""
    import io

    from tracetune.synth.programs import get_program

    draft = get_program("faces").draft(4284998744955836833)  # type: ignore[attr-defined]
    collage = Image.open(io.BytesIO(draft.files[0].data))
    result = run("face_detection", ctx, image=put(ctx, "collage.png", collage))
    assert result.data["count"] == draft.metadata["faces"] == 1


def test_face_detection_is_safe_from_several_threads_at_once(ctx: ToolContext) -> None:
    """Episodes run tools on threads; one shared OpenCV cascade used by two threads at once
    fails an assertion in its scale data, so calls on images of different sizes overlap."""
    from concurrent.futures import ThreadPoolExecutor

    photo = Image.open(FACE_PHOTO).convert("RGB")
    names = [put(ctx, f"face{i}.png", photo.resize((256 + 97 * i, 256 + 61 * i))) for i in range(6)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda n: run("face_detection", ctx, image=n), names * 3))
    assert [r.data["count"] for r in results] == [1] * len(results)


# -- image editing --------------------------------------------------------------------------
def test_image_zoom_enlarges_the_region(ctx: ToolContext) -> None:
    img = Image.new("RGB", (200, 100), "white")
    ImageDraw.Draw(img).rectangle((50, 20, 89, 49), fill=(255, 0, 0))
    result = run("image_zoom", ctx, image=put(ctx, "a.png", img), box=[50, 20, 90, 50], factor=3)
    (zoomed,) = result.images
    assert zoomed.size == (120, 90)
    pixels = np.asarray(zoomed.convert("RGB")).reshape(-1, 3)
    assert (np.abs(pixels - [255, 0, 0]).max(axis=1) < 10).mean() > 0.95
    fractional = run("image_zoom", ctx, image="a.png", box=[0, 0, 0.5, 0.5], factor=2)
    assert fractional.images[0].size == (200, 100)
    with pytest.raises(ToolError, match="factor"):
        run("image_zoom", ctx, image="a.png", box=[0, 0, 10, 10], factor=20)
    with pytest.raises(ToolError, match="empty"):
        run("image_zoom", ctx, image="a.png", box=[300, 300, 400, 400])


def test_draw_box_outlines_the_box_and_keeps_the_rest(ctx: ToolContext) -> None:
    img = Image.new("RGB", (300, 200), "white")
    result = run(
        "draw_box",
        ctx,
        image=put(ctx, "a.png", img),
        box=[100, 80, 200, 150],
        label="cup",
        color="#00ff00",
    )
    (out,) = result.images
    assert out.size == img.size
    arr = np.asarray(out)
    assert tuple(arr[115, 100]) == (0, 255, 0) and tuple(arr[150, 150]) == (0, 255, 0)
    assert tuple(arr[115, 150]) == (255, 255, 255)  # inside the box: untouched
    assert (arr[60:80, 100:140] != 255).any()  # the label sits above the box
    assert tuple(np.asarray(img)[115, 100]) == (255, 255, 255)  # the input is not modified
    with pytest.raises(ToolError, match="colour"):
        run("draw_box", ctx, image="a.png", box=[1, 1, 50, 50], color="notacolour")


def test_add_text_writes_where_asked(ctx: ToolContext) -> None:
    img = Image.new("RGB", (400, 300), (20, 40, 200))
    result = run("add_text", ctx, image=put(ctx, "a.png", img), text="SALE", anchor="bottom")
    (out,) = result.images
    assert out.size == img.size
    changed = (np.asarray(out).astype(int) - np.asarray(img).astype(int)).any(axis=2)
    rows, cols = np.nonzero(changed)
    assert rows.min() > 150 and 100 < cols.mean() < 300  # bottom centre
    placed = run("add_text", ctx, image="a.png", text="A", position=[10, 10], size=40)
    rows, cols = np.nonzero((np.asarray(placed.images[0]) != np.asarray(img)).any(axis=2))
    assert rows.min() >= 5 and cols.min() >= 5 and rows.max() < 70 and cols.max() < 60


# -- maths ----------------------------------------------------------------------------------
def test_solver_solves_systems_and_refuses_code() -> None:
    ctx = ToolContext(workdir=Path("."))
    result = run("solver", ctx, equations=["2x + 3y = 7", "x - y = 1"])
    assert result.data["solutions"] == [{"x": 2, "y": 1}]
    assert result.text == "solution: x = 2, y = 1"
    quadratic = run("solver", ctx, equations=["x^2 - 5x + 6"], variables=["x"])
    assert sorted(s["x"] for s in quadratic.data["solutions"]) == [2, 3]
    irrational = run("solver", ctx, equations=["x**2 = 2", "x > 0"][:1])
    assert sorted(round(s["x"], 6) for s in irrational.data["solutions"]) == [-1.414214, 1.414214]
    assert run("solver", ctx, equations=["x + 1 = x + 2"]).text == "no solution"
    for attack in [
        "__import__('os').system('echo hi') = 0",
        "x.__class__ = 1",
        "(lambda: 1)() = x",
        "x = Symbol.func",
    ]:
        with pytest.raises(ToolError):
            run("solver", ctx, equations=[attack])


# -- files ----------------------------------------------------------------------------------
def make_docx(path: Path, paragraphs: list[str]) -> None:
    """A minimal valid .docx (OOXML zip) written by hand, as Word would store plain text."""
    body = "".join(f"<w:p><w:r><w:t>{p}</w:t></w:r></w:p>" for p in paragraphs)
    ns = "http://schemas.openxmlformats.org"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(
            "[Content_Types].xml",
            (
                '<?xml version="1.0" encoding="UTF-8"?>'
                f'<Types xmlns="{ns}/package/2006/content-types">'
                '<Default Extension="rels" ContentType="application/vnd.openxmlformats-package.'
                'relationships+xml"/><Default Extension="xml" ContentType="application/xml"/>'
                '<Override PartName="/word/document.xml" ContentType="application/vnd.'
                'openxmlformats-officedocument.wordprocessingml.document.main+xml"/></Types>'
            ),
        )
        z.writestr(
            "_rels/.rels",
            (
                f'<?xml version="1.0" encoding="UTF-8"?><Relationships xmlns="{ns}/package/2006/'
                f'relationships"><Relationship Id="rId1" Type="{ns}/officeDocument/2006/'
                'relationships/officeDocument" Target="word/document.xml"/></Relationships>'
            ),
        )
        z.writestr(
            "word/document.xml",
            (
                f'<?xml version="1.0" encoding="UTF-8"?><w:document xmlns:w="{ns}/wordprocessingml/'
                f'2006/main"><w:body>{body}</w:body></w:document>'
            ),
        )


def make_pdf(path: Path, lines: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.backends.backend_pdf import PdfPages

    with PdfPages(path) as pdf:
        fig = plt.figure(figsize=(8.5, 11))
        for i, line in enumerate(lines):
            fig.text(0.1, 0.9 - 0.05 * i, line, fontsize=12)
        pdf.savefig(fig)
        plt.close(fig)


def test_inspect_file_reads_xlsx_pdf_docx_and_csv(ctx: ToolContext) -> None:
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "Budget"
    sheet.append(["item", "cost"])
    sheet.append(["lumber", 412.5])
    sheet.append(["paint", 87])
    book.save(ctx.workdir / "budget.xlsx")
    xlsx = run("inspect_file", ctx, path="budget.xlsx")
    assert "## Budget" in xlsx.text and "| lumber | 412.5 |" in xlsx.text

    make_pdf(
        ctx.workdir / "memo.pdf",
        ["The launch window opens on 14 March 2031.", "Fuel load: 212 tonnes."],
    )
    pdf = run("inspect_file", ctx, path="memo.pdf")
    assert "The launch window opens on 14 March 2031." in pdf.text
    assert "Fuel load: 212 tonnes." in pdf.text

    make_docx(ctx.workdir / "letter.docx", ["Dear Ada,", "The meeting moved to Room 7B."])
    assert "The meeting moved to Room 7B." in run("inspect_file", ctx, path="letter.docx").text

    (ctx.workdir / "t.csv").write_text("city,pop\nOslo,709000\n")
    assert "| Oslo | 709000 |" in run("inspect_file", ctx, path="t.csv").text
    with pytest.raises(ToolError, match="outside the working directory"):
        run("inspect_file", ctx, path="../secret.txt")
    with pytest.raises(ToolError, match="no file 'nope.pdf'"):
        run("inspect_file", ctx, path="nope.pdf")


def test_inspect_file_answers_with_the_model_and_truncates(tmp_path: Path) -> None:
    text = "alpha " * 50 + "\nThe vault code is 4471.\n" + "beta " * 2000
    (tmp_path / "notes.txt").write_text(text)
    model = ScriptedChatModel(["4471"])
    ctx = ToolContext(workdir=tmp_path, model=model, options={"inspect_file": {"max_chars": 600}})
    result = run("inspect_file", ctx, path="notes.txt", question="What is the vault code?")
    assert result.text == "4471"
    prompt = model.calls[0]["messages"][0]["content"]
    assert "The vault code is 4471." in prompt and "Question: What is the vault code?" in prompt
    assert "[... truncated: showing" in prompt and len(prompt) < 1200
    assert result.data["truncated"] is True and result.data["prompt_hash"]
    with pytest.raises(ToolError, match="no model is configured"):
        run("inspect_file", ToolContext(workdir=tmp_path), path="notes.txt", question="code?")
    # A JSON null for the optional question means "not given", not a type error.
    plain = run("inspect_file", ToolContext(workdir=tmp_path), path="notes.txt", question=None)
    assert plain.text.startswith("alpha")


def test_truncate_marks_the_cut() -> None:
    text, cut = truncate("line\n" * 100, 50)
    assert cut and len(text) < 120 and text.endswith("of 500 characters ...]")
    assert truncate("short", 50) == ("short", False)


# -- search ---------------------------------------------------------------------------------
@pytest.mark.slow
def test_search_ranks_the_relevant_passage_first(ctx: ToolContext, tmp_path: Path) -> None:
    ctx.options["search"] = {"corpus": str(CORPUS)}
    # Paraphrase with almost no word overlap: the dense half of the fusion finds it.
    bees = run(
        "search", ctx, query="how do insects tell their hive mates where the nectar is", top_k=3
    )
    assert bees.data["results"][0]["doc_id"] == "honeybees"
    assert bees.data["results"][0]["dense_rank"] == 1
    assert bees.text.startswith("[1] How honeybees share where food is (tracetune sample corpus")
    # A rare exact term: BM25 ranks it first.
    enzyme = run("search", ctx, query="RuBisCO", top_k=2)
    assert enzyme.data["results"][0]["doc_id"] == "photosynthesis"
    assert enzyme.data["results"][0]["bm25_rank"] == 1
    assert len(enzyme.data["results"]) == 2

    folder = tmp_path / "kb"
    folder.mkdir()
    (folder / "ships.md").write_text(
        "# Container ships\n\nThe largest container ships carry over 24,000 twenty-foot containers."
    )
    (folder / "tea.txt").write_text(
        "Green tea is steamed or pan-fired soon after picking to "
        "stop oxidation, which keeps the leaves green."
    )
    make_pdf(
        folder / "volcano.pdf",
        ["Mauna Loa on Hawaii is the largest active volcano", "on Earth by volume."],
    )
    ctx.options["search"] = {"corpus": str(folder), "cache_dir": str(tmp_path / "cache")}
    volcano = run("search", ctx, query="biggest active volcano", top_k=1)
    assert volcano.data["results"][0]["doc_id"] == "volcano.pdf"
    tea = run("search", ctx, query="why does green tea stay green", top_k=1)
    assert tea.data["results"][0]["doc_id"] == "tea.txt"
    assert list((tmp_path / "cache").glob("embeddings-*.npy"))  # persisted for next time
    ships = run("search", ctx, query="container ships", top_k=1)
    assert ships.data["results"][0]["title"] == "Container ships"


def test_search_errors_say_what_to_configure(
    ctx: ToolContext, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ToolError, match="no corpus configured"):
        run("search", ctx, query="anything")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"title": "no text"}\n')
    ctx.options["search"] = {"corpus": str(bad), "mode": "bm25"}
    with pytest.raises(ToolError, match=r"bad.jsonl:2 must be an object with a string 'text'"):
        run("search", ctx, query="anything")
    monkeypatch.delenv("SERPER_API_KEY", raising=False)
    ctx.options["search"] = {"backend": "serper"}
    with pytest.raises(ToolError, match="SERPER_API_KEY"):
        run("search", ctx, query="anything")
    ctx.options["search"] = {"backend": "bing"}
    with pytest.raises(ToolError, match="unknown search backend 'bing'"):
        run("search", ctx, query="anything")


def test_bm25_mode_needs_no_embedder(ctx: ToolContext) -> None:
    ctx.options["search"] = {"corpus": str(CORPUS), "mode": "bm25"}
    result = run("search", ctx, query="waggle dance distance", top_k=1)
    assert result.data["results"][0]["doc_id"] == "honeybees"
    assert result.data["results"][0]["dense_rank"] is None


def test_web_backends_parse_responses(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.url.host == "api.search.brave.com":
            return httpx.Response(
                200,
                json={
                    "web": {
                        "results": [
                            {
                                "title": "Mauna Loa",
                                "url": "https://example.org/ml",
                                "description": "volcano",
                            }
                        ]
                    }
                },
            )
        return httpx.Response(401, text="bad key")

    monkeypatch.setenv("BRAVE_API_KEY", "k-brave")
    transport = httpx.MockTransport(handler)
    hits = web_search("brave", "largest volcano", 3, {}, transport=transport)
    assert hits == [
        {
            "title": "Mauna Loa",
            "url": "https://example.org/ml",
            "source": "https://example.org/ml",
            "text": "volcano",
        }
    ]
    assert seen[0].headers["X-Subscription-Token"] == "k-brave"
    assert seen[0].url.params["q"] == "largest volcano"
    monkeypatch.setenv("SERPER_API_KEY", "k-serper")
    with pytest.raises(ToolError, match="HTTP 401 .check the API key.: bad key"):
        web_search("serper", "q", 3, {}, transport=transport)


def test_passages_and_fusion() -> None:
    text = "para one is short.\n\n" + " ".join(f"w{i}" for i in range(250))
    passages = split_passages(text, max_words=100, overlap=20)
    assert passages[0] == "para one is short."
    assert [len(p.split()) for p in passages[1:]] == [100, 100, 90]
    assert passages[2].split()[0] == "w80"  # windows overlap by 20 words
    fused = reciprocal_rank_fusion([[3, 1, 2], [1, 3]], k=60)
    assert max(fused, key=fused.__getitem__) in (1, 3) and fused[2] == pytest.approx(1 / 63)
    assert fused[1] == fused[3]


# -- VLM tools ------------------------------------------------------------------------------
def test_visual_qa_sends_the_image_as_an_image_part(tmp_path: Path) -> None:
    model = ScriptedChatModel(["two", "A red square on white."])
    ctx = ToolContext(workdir=tmp_path, model=model)
    img = Image.new("RGB", (64, 48), "white")
    ImageDraw.Draw(img).rectangle((10, 10, 30, 30), fill="red")
    put(ctx, "pic.png", img)
    result = run("visual_qa", ctx, image="pic.png", question="How many squares?")
    assert result.text == "two"
    (message,) = model.calls[0]["messages"]
    image_part, text_part = message["content"]
    assert image_part["type"] == "image" and isinstance(image_part["image"], Image.Image)
    assert np.array_equal(np.asarray(image_part["image"]), np.asarray(img))
    assert text_part == {"type": "text", "text": "How many squares?"}
    described = run("caption", ctx, image="pic.png")
    assert described.text == "A red square on white."
    assert model.calls[1]["messages"][0]["content"][0]["type"] == "image"
    with pytest.raises(ToolError, match="needs a vision-language model"):
        run("visual_qa", ToolContext(workdir=tmp_path), image="pic.png", question="What?")


def test_visual_qa_downscales_big_images(tmp_path: Path) -> None:
    model = ScriptedChatModel(["ok"])
    ctx = ToolContext(workdir=tmp_path, model=model, options={"visual_qa": {"max_side": 100}})
    put(ctx, "big.png", Image.new("RGB", (400, 200), "blue"))
    run("visual_qa", ctx, image="big.png", question="Colour?")
    assert model.calls[0]["messages"][0]["content"][0]["image"].size == (100, 50)


# -- tool spec fixes ------------------------------------------------------------------------
def test_setup_runs_once_off_the_event_loop(tmp_path: Path) -> None:
    class Slow(Tool):
        name = "slow_setup"
        description = "test tool"
        parameters = {"type": "object", "properties": {}, "required": []}

        def __init__(self) -> None:
            super().__init__()
            self.setups: list[int] = []

        def setup(self) -> None:
            time.sleep(0.2)
            self.setups.append(threading.get_ident())

        def forward(self, ctx: ToolContext) -> str:
            return "done"

    slow = Slow()

    async def main() -> tuple[list[Any], float]:
        loop_thread = threading.get_ident()
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            for _ in range(10):
                await asyncio.sleep(0.01)
                ticks += 1

        results = await asyncio.gather(
            *(slow.acall(ToolContext(tmp_path), {}) for _ in range(4)), ticker()
        )
        assert loop_thread not in slow.setups
        return list(results[:4]), ticks

    results, ticks = asyncio.run(main())
    assert [r.text for r in results] == ["done"] * 4
    assert len(slow.setups) == 1
    assert ticks == 10  # the loop kept running while setup slept


# -- extras on tiny random models -----------------------------------------------------------
def clip_tokenizer(max_length: int = 16) -> Any:
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for char in ByteLevel.alphabet():
        vocab[char] = len(vocab)
        vocab[char + "</w>"] = len(vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab[special] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def clip_text_config(tok: Any, hidden: int) -> dict[str, Any]:
    return dict(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=16,
        bos_token_id=tok.convert_tokens_to_ids("<|startoftext|>"),
        eos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
        pad_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
    )


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Tiny random OWLv2, Grounding DINO, SAM and Stable Diffusion (text-to-image and
    InstructPix2Pix) checkpoints saved like hub models, so the tools load them for real."""
    import torch
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionInstructPix2PixPipeline,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import (
        BertTokenizer,
        CLIPTextConfig,
        CLIPTextModel,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoProcessor,
        Owlv2Config,
        Owlv2ForObjectDetection,
        Owlv2ImageProcessorPil,
        Owlv2Processor,
        SamConfig,
        SamImageProcessorPil,
        SamModel,
        SamProcessor,
    )
    from transformers.models.grounding_dino import GroundingDinoImageProcessorPil

    root = tmp_path_factory.mktemp("tiny-models")
    torch.manual_seed(0)
    paths: dict[str, str] = {}

    tok = clip_tokenizer()
    owl = Owlv2ForObjectDetection(
        Owlv2Config(
            text_config=clip_text_config(tok, 32),
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=1,
                num_attention_heads=2,
                image_size=32,
                patch_size=8,
            ),
            projection_dim=32,
        )
    )
    paths["owlv2"] = str(root / "owlv2")
    owl.save_pretrained(paths["owlv2"])
    Owlv2Processor(
        image_processor=Owlv2ImageProcessorPil(size={"height": 32, "width": 32}), tokenizer=tok
    ).save_pretrained(paths["owlv2"])

    paths["gdino"] = str(root / "gdino")
    Path(paths["gdino"]).mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "a", "cat", "dog", "red", "car"]
    (Path(paths["gdino"]) / "vocab.txt").write_text("\n".join(words) + "\n")
    bert_tok = BertTokenizer(str(Path(paths["gdino"]) / "vocab.txt"))
    gdino = GroundingDinoForObjectDetection(
        GroundingDinoConfig(
            backbone_config=dict(
                model_type="swin",
                embed_dim=8,
                depths=[1, 1],
                num_heads=[1, 1],
                window_size=2,
                image_size=32,
                patch_size=4,
                out_features=["stage1", "stage2"],
            ),
            text_config=dict(
                model_type="bert",
                vocab_size=len(words),
                hidden_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                intermediate_size=32,
                max_position_embeddings=64,
            ),
            d_model=32,
            encoder_layers=1,
            decoder_layers=2,
            encoder_ffn_dim=32,
            decoder_ffn_dim=32,
            encoder_attention_heads=2,
            decoder_attention_heads=2,
            num_queries=10,
            num_feature_levels=2,
            encoder_n_points=2,
            decoder_n_points=2,
            max_text_len=32,
            use_timm_backbone=False,
            backbone=None,
            use_pretrained_backbone=False,
        )
    )
    gdino.save_pretrained(paths["gdino"])
    GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(
            size={"shortest_edge": 32, "longest_edge": 64}
        ),
        tokenizer=bert_tok,
    ).save_pretrained(paths["gdino"])

    sam = SamModel(
        SamConfig(
            vision_config=dict(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=64,
                patch_size=8,
                output_channels=16,
                window_size=4,
                global_attn_indexes=[1],
                mlp_dim=64,
                num_pos_feats=8,
            ),
            prompt_encoder_config=dict(
                hidden_size=16, image_size=64, patch_size=8, mask_input_channels=4
            ),
            mask_decoder_config=dict(
                hidden_size=16,
                mlp_dim=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                iou_head_hidden_dim=16,
            ),
        )
    )
    paths["sam"] = str(root / "sam")
    sam.save_pretrained(paths["sam"])
    SamProcessor(
        image_processor=SamImageProcessorPil(
            size={"longest_edge": 64}, pad_size={"height": 64, "width": 64}
        )
    ).save_pretrained(paths["sam"])

    def sd_parts(in_channels: int) -> dict[str, Any]:
        return dict(
            unet=UNet2DConditionModel(
                block_out_channels=(8, 16),
                layers_per_block=1,
                sample_size=8,
                in_channels=in_channels,
                out_channels=4,
                cross_attention_dim=16,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                norm_num_groups=4,
                attention_head_dim=2,
            ),
            vae=AutoencoderKL(
                block_out_channels=[8, 16],
                in_channels=3,
                out_channels=3,
                latent_channels=4,
                down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2,
                norm_num_groups=4,
                sample_size=16,
            ),
            text_encoder=CLIPTextModel(CLIPTextConfig(**clip_text_config(tok, 16))),
            tokenizer=tok,
            scheduler=EulerDiscreteScheduler(steps_offset=1),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    paths["sd"] = str(root / "sd")
    StableDiffusionPipeline(**sd_parts(4)).save_pretrained(paths["sd"])
    paths["pix2pix"] = str(root / "pix2pix")
    StableDiffusionInstructPix2PixPipeline(**sd_parts(8)).save_pretrained(paths["pix2pix"])
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("family", ["owlv2", "gdino"])
def test_object_localization_runs_a_real_detector(
    tiny_models: dict[str, str], tmp_path: Path, family: str
) -> None:
    tool = ObjectLocalization()
    ctx = ToolContext(
        workdir=tmp_path,
        options={
            "object_localization": {
                "model": tiny_models[family],
                "device": "cpu",
                "threshold": 0.0,
                "text_threshold": 0.0,
                "max_detections": 5,
            }
        },
    )
    put(ctx, "street.png", Image.new("RGB", (96, 64), "gray"))
    result = tool(ctx, image="street.png", text="a red car, a dog")
    objects = result.data["objects"]
    assert 1 <= len(objects) <= 5
    for obj in objects:
        x1, y1, x2, y2 = obj["box"]
        assert 0 <= x1 <= x2 <= 96 and 0 <= y1 <= y2 <= 64
        assert 0.0 <= obj["score"] <= 1.0
        if family == "owlv2":  # OWL labels are the queries themselves
            assert obj["label"] in ("a red car", "a dog")
        else:  # Grounding DINO labels are spans of the prompt
            assert obj["label"] and set(obj["label"].split()) <= {"a", "red", "car", "dog"}
    assert [o["score"] for o in objects] == sorted((o["score"] for o in objects), reverse=True)
    assert result.text.count("score") == len(objects)
    strict = ToolContext(
        workdir=tmp_path,
        options={
            "object_localization": {
                "model": tiny_models[family],
                "threshold": 1.01,
                "text_threshold": 1.01,
            }
        },
    )
    assert tool(strict, image="street.png", text="a dog").text == "nothing found for: a dog"


@pytest.mark.slow
def test_segmentation_runs_sam_with_a_box_and_a_point(
    tiny_models: dict[str, str], tmp_path: Path
) -> None:
    tool = Segmentation()
    ctx = ToolContext(workdir=tmp_path, options={"segmentation": {"model": tiny_models["sam"]}})
    img = Image.new("RGB", (80, 60), "white")
    ImageDraw.Draw(img).ellipse((20, 15, 60, 45), fill="blue")
    put(ctx, "blob.png", img)
    boxed = tool(ctx, image="blob.png", box=[20, 15, 60, 45])
    overlay, mask = boxed.images
    assert overlay.size == (80, 60) and mask.size == (80, 60) and mask.mode == "L"
    assert set(np.unique(np.asarray(mask))) <= {0, 255}
    assert boxed.data["area"] == int((np.asarray(mask) > 0).sum())
    assert 0.0 <= boxed.data["fraction"] <= 1.0
    pointed = tool(ctx, image="blob.png", point=[0.5, 0.5])
    assert pointed.images[1].size == (80, 60) and "mask covers" in pointed.text
    with pytest.raises(ToolError, match="give a box"):
        tool(ctx, image="blob.png")
    with pytest.raises(ToolError, match="outside"):
        tool(ctx, image="blob.png", point=[500, 5])


@pytest.mark.slow
def test_image_generation_and_edit_run_diffusers_pipelines(
    tiny_models: dict[str, str], tmp_path: Path
) -> None:
    ctx = ToolContext(
        workdir=tmp_path,
        options={
            "image_generation": {"model": tiny_models["sd"], "steps": 2, "width": 32, "height": 24},
            "image_edit": {"model": tiny_models["pix2pix"], "steps": 2, "max_side": 32},
        },
    )
    generator = ImageGeneration()
    first = generator(ctx, prompt="a red cube on a table")
    assert first.images[0].size == (32, 24)
    again = generator(ctx, prompt="a red cube on a table")  # seeded: reproducible
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(again.images[0]))
    put(ctx, "photo.png", Image.new("RGB", (50, 30), "green"))
    edited = ImageEdit()(ctx, image="photo.png", instruction="make it snow")
    assert edited.images[0].size == (50, 30)
    assert not np.array_equal(
        np.asarray(edited.images[0]), np.asarray(Image.new("RGB", (50, 30), "green"))
    )
    with pytest.raises(ToolError, match="could not load pipeline"):
        ImageGeneration()(
            ToolContext(
                workdir=tmp_path, options={"image_generation": {"model": str(tmp_path / "missing")}}
            ),
            prompt="x",
        )


@pytest.mark.parametrize(
    ("factory", "missing", "hint"),
    [
        (ImageGeneration, "diffusers", "pip install 'tracetune[diffusion]'"),
        (ImageEdit, "diffusers", "pip install 'tracetune[diffusion]'"),
        (ObjectLocalization, "scipy", "pip install 'tracetune[detection]'"),
        (Segmentation, "transformers", "pip install transformers"),
    ],
)
def test_missing_extra_names_what_to_install(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, factory: type[Tool], missing: str, hint: str
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a)
    )
    tool = factory()
    ok, why = tool.available()
    assert not ok and missing in why and hint in why
    put(ToolContext(tmp_path), "x.png", Image.new("RGB", (8, 8)))
    args = {"image": "x.png", "text": "a", "instruction": "b", "prompt": "c", "box": [1, 1, 5, 5]}
    wanted = {k: v for k, v in args.items() if k in tool.parameters["properties"]}
    with pytest.raises(ToolUnavailable, match=hint.replace("[", r"\[").replace("]", r"\]")):
        tool(ToolContext(tmp_path), **wanted)


# -- CLI ------------------------------------------------------------------------------------
def test_cli_lists_tools_and_runs_one(tmp_path: Path) -> None:
    from tracetune.cli.tools import app

    runner = CliRunner()
    listed = runner.invoke(app, ["list", "--json"])
    assert listed.exit_code == 0, listed.output
    names = {entry["function"]["name"] for entry in json.loads(listed.output)}
    assert {"ocr", "search", "image_edit", "final_answer"} <= names
    table = runner.invoke(app, ["list"])
    assert table.exit_code == 0 and "face_detection" in table.output

    ran = runner.invoke(
        app,
        [
            "run",
            "draw_box",
            "--image",
            str(FACE_PHOTO),
            "--workdir",
            str(tmp_path),
            "--arg",
            "box=177,67,270,160",
            "--arg",
            "label=face",
        ],
    )
    assert ran.exit_code == 0, ran.output
    assert "drew box [177, 67, 270, 160]" in ran.output
    saved = tmp_path / "draw_box.png"
    assert f"saved image: {saved}" in ran.output and Image.open(saved).size == (512, 512)
    assert (tmp_path / FACE_PHOTO.name).exists()  # the input was copied into the workdir

    solved = runner.invoke(
        app, ["run", "solver", "-a", "equations=x + y = 10; x - y = 2", "--json"]
    )
    assert solved.exit_code == 0, solved.output
    assert json.loads(solved.output)["data"]["solutions"] == [{"x": 6, "y": 4}]

    no_corpus = runner.invoke(app, ["run", "search", "-a", "query=bees"])
    assert no_corpus.exit_code == 2 and "no corpus configured" in no_corpus.output
    unknown = runner.invoke(app, ["run", "teleport"])
    assert unknown.exit_code == 2 and "unknown tool 'teleport'" in unknown.output
    bad_arg = runner.invoke(app, ["run", "calculator", "-a", "expr=1+1"])
    assert bad_arg.exit_code == 2 and "takes: expression" in bad_arg.output
    bm25 = runner.invoke(
        app,
        [
            "run",
            "search",
            "-a",
            "query=waggle dance",
            "--corpus",
            str(CORPUS),
            "--option",
            "search.mode=bm25",
            "-a",
            "top_k=1",
        ],
    )
    assert bm25.exit_code == 0, bm25.output
    assert bm25.output.startswith("[1] How honeybees share where food is")


def test_cli_asks_a_real_openai_compatible_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tracetune.cli.tools import app
    from tracetune.testing import ScriptedOpenAIServer

    monkeypatch.setenv("OPENAI_API_KEY", "test-key")
    with ScriptedOpenAIServer(replies=["She is an astronaut."]) as server:
        result = CliRunner().invoke(
            app,
            [
                "run",
                "visual_qa",
                "--image",
                str(FACE_PHOTO),
                "--workdir",
                str(tmp_path),
                "--model",
                "openai:test-vlm",
                "--base-url",
                server.base_url,
                "-a",
                "question=What is her job?",
            ],
        )
        assert result.exit_code == 0, result.output
        assert result.output.strip() == "She is an astronaut."
        (request,) = server.requests
        assert request.image_urls()[0].startswith("data:image/png;base64,")
        assert "What is her job?" in json.dumps(request.body["messages"])
