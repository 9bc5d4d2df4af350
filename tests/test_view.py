"""``tracetune view`` on real pipeline outputs, driven in headless Chromium through Playwright.

One session-scoped fixture makes the data with the real commands: the quickstart in
miniature (tasks, gold trajectories with verdicts, an agent run, exploration, pairs, two
eval runs), document tasks (pdf/docx/xlsx), a model teacher that fails every task (drops,
failed verdicts, rejected trajectories), the MMAT engine (RR/ORR dialogues with operators,
RAG and reflection) and an oracle eval run to compare against. Screenshots of each page
type are kept under ``$TRACETUNE_VIEW_SCREENSHOTS`` (default: a pytest tmp folder).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import json
import os
import posixpath
import re
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from typer.testing import CliRunner

from tracetune.cli import app as cli_app
from tracetune.schema import Task
from tracetune.store import Dataset

CHROMIUM = "/usr/bin/chromium"
BROWSER_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Quickstart (tiny SFT + DPO), the MMAT engine and three scripted runs: ~1.5 min on 2 cores.
pytestmark = pytest.mark.slow


def _action(name: str, arguments: dict[str, Any]) -> str:
    return "Thought: answering\nAction: " + json.dumps({"name": name, "arguments": arguments})


def _user_text(body: dict[str, Any]) -> str:
    content = body["messages"][1]["content"]
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tracetune.cli.quickstart import quickstart
    from tracetune.engine import MMATRunConfig, OperatorConfig, run_pipeline
    from tracetune.evaluate.runs import bench_config, run_benchmark
    from tracetune.models.base import ModelOptions
    from tracetune.rollout import RolloutConfig, run_rollout
    from tracetune.synth.programs.generate import ProgramsConfig, generate_tasks
    from tracetune.testing import ScriptedOpenAIServer

    sys.path.insert(0, str(Path(__file__).parent))
    from test_mmat_e2e import CORPUS, SAMPLE, teacher

    # list indexes of big datasets are cached outside them; keep that cache in tmp too
    os.environ["TRACETUNE_VIEW_CACHE"] = str(tmp_path_factory.mktemp("view-cache"))
    reuse = os.environ.get("TRACETUNE_VIEW_TEST_DATA")  # a folder kept from an earlier run
    root = Path(reuse) if reuse else tmp_path_factory.mktemp("view")
    qs = root / "qs"
    layout = {
        "root": root,
        "qs": qs,
        "docs": root / "docs",
        "teacher": root / "teacher",
        "mmat": root / "mmat",
        "runs": root / "runs",
    }
    if reuse and (root / "mmat" / "orr" / "manifest.json").exists():
        return layout
    quickstart(out=qs, n=4, seed=0, matrix=True)
    asyncio.run(
        generate_tasks(ProgramsConfig(out=root / "docs", n=4, seed=3, families=["document"]))
    )

    def guess(body: dict[str, Any]) -> str:
        return _action("final_answer", {"answer": "I do not know <b>&</b>"})

    with ScriptedOpenAIServer(guess) as server:
        asyncio.run(
            run_rollout(
                RolloutConfig(
                    tasks=qs / "tasks",
                    out=root / "teacher",
                    teacher="openai:guess",
                    backend=ModelOptions(base_url=server.base_url, api_key_env="PATH"),
                ),
                progress=False,
            )
        )
    heldout = list(Dataset.open(qs / "matrix" / "heldout", Task))

    def oracle(body: dict[str, Any]) -> str:
        user = _user_text(body)
        task = next(t for t in heldout if t.query in user)
        assert task.gold is not None
        return _action("final_answer", {"answer": task.gold.value})

    with ScriptedOpenAIServer(oracle) as server:
        asyncio.run(
            run_benchmark(
                bench_config(
                    "programs",
                    model="openai:oracle",
                    out=root / "runs" / "oracle",
                    data=qs / "matrix" / "heldout",
                    backend=ModelOptions(base_url=server.base_url, api_key_env="PATH"),
                ),
                progress=False,
            )
        )
    with ScriptedOpenAIServer(teacher) as server:
        config = MMATRunConfig(
            out=root / "mmat",
            source=SAMPLE,
            teacher="openai:teacher",
            backend=ModelOptions(base_url=server.base_url, max_retries=0, api_key_env="PATH"),
            operators=OperatorConfig(
                operators=["image_caption", "ocr", "face_detection"],
                corpus=CORPUS,
                rag_mode="bm25",
            ),
        )
        asyncio.run(run_pipeline(config, progress=False))
    # The runs' run-state connections that are only reachable through reference cycles
    # close (and checkpoint their SQLite write-ahead logs into state.sqlite) whenever the
    # cyclic collector next runs: let that happen now, not while the viewer is being
    # checked for writing nothing.
    gc.collect()
    return layout


def _dirs(pipeline: dict[str, Path]) -> list[Path]:
    return [pipeline[k] for k in ("qs", "docs", "teacher", "mmat", "runs")]


def _snapshot(dirs: list[Path]) -> dict[str, tuple[int, int, str]]:
    """Every file under ``dirs``: size, mtime and content hash."""
    out = {}
    for d in dirs:
        for path in sorted(d.rglob("*")):
            if path.is_file():
                data = path.read_bytes()
                stat = path.stat()
                out[str(path)] = (stat.st_size, stat.st_mtime_ns, hashlib.sha256(data).hexdigest())
    return out


class ViewerServer:
    """The viewer's app on a free loopback port, in a background thread."""

    def __init__(self, dirs: list[Path]) -> None:
        import uvicorn

        from tracetune.view import build_app

        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.base = f"http://127.0.0.1:{sock.getsockname()[1]}"
        config = uvicorn.Config(
            build_app(dirs), log_level="warning", log_config=None, access_log=False
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "viewer did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def viewer(pipeline: dict[str, Path]) -> Iterator[ViewerServer]:
    server = ViewerServer(_dirs(pipeline))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Path:
    where = os.environ.get("TRACETUNE_VIEW_SCREENSHOTS")
    path = Path(where) if where else tmp_path_factory.mktemp("view-screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), (
        f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does this)"
    )
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("profile")),
            executable_path=CHROMIUM,
            headless=True,
            args=BROWSER_ARGS,
            viewport={"width": 1280, "height": 900},
        )
        try:
            yield context
        finally:
            context.close()


def page_kind(path: str) -> str:
    """What kind of page a viewer path is (one screenshot and a few visits per kind)."""
    parts = path.strip("/").split("/")
    if parts[0] == "index.html":
        return "home"
    if parts[0] == "compare":
        return "compare"
    slug = parts[1]
    if parts[2] == "r":
        return f"record:{slug}"
    if parts[2] == "m":
        return "messages"
    if parts[2] == "state.html":
        return f"state:{slug}"
    if parts[2] == "state":
        return "state-items"
    return f"list:{slug}"


class Visitor:
    """Opens pages in Chromium and records every console error, page error and failed
    request (status >= 400 included)."""

    def __init__(self, context: Any, base: str) -> None:
        self.base = base
        self.page = context.new_page()
        self.problems: list[str] = []
        self.page.on("pageerror", lambda exc: self.problems.append(f"page error: {exc}"))
        self.page.on(
            "console",
            lambda msg: (
                self.problems.append(f"console: {msg.text}") if msg.type == "error" else None
            ),
        )
        self.page.on(
            "requestfailed", lambda req: self.problems.append(f"request failed: {req.url}")
        )
        self.page.on(
            "response",
            lambda res: (
                self.problems.append(f"HTTP {res.status}: {res.url}") if res.status >= 400 else None
            ),
        )

    def open(self, path: str) -> Any:
        response = self.page.goto(self.base + path, wait_until="load")
        assert response is not None and response.status == 200, (path, response and response.status)
        return self.page

    def broken_images(self) -> list[str]:
        return self.page.evaluate(
            "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0))"
            ".map(i => i.src)"
        )


def _links(page: Any) -> list[str]:
    return page.evaluate("Array.from(document.querySelectorAll('a[href]')).map(a => a.href)")


def test_every_page_type_loads_without_errors_and_images_load(
    viewer: ViewerServer, browser: Any, shots: Path, pipeline: dict[str, Path]
) -> None:
    before = _snapshot(_dirs(pipeline))
    visitor = Visitor(browser, viewer.base)
    seen: set[str] = set()
    per_kind: dict[str, int] = {}
    shot_kinds: set[str] = set()
    images = 0
    queue = ["/index.html"]
    while queue:
        path = queue.pop(0)
        if path in seen:
            continue
        kind = page_kind(path)
        if per_kind.get(kind, 0) >= 2:  # two of each kind keeps the crawl short
            continue
        seen.add(path)
        per_kind[kind] = per_kind.get(kind, 0) + 1
        page = visitor.open(path)
        assert visitor.broken_images() == [], path
        images += page.evaluate("document.images.length")
        assert "Internal Server Error" not in page.content()
        general = kind  # one screenshot per page type and dataset name
        if ":" in kind:
            what, slug = kind.split(":", 1)
            general = f"{what}-{slug.split('~')[-1]}"
        if general not in shot_kinds and "No records" not in page.content():
            shot_kinds.add(general)
            name = re.sub(r"[^A-Za-z0-9_.-]+", "_", general)
            page.screenshot(path=str(shots / f"{name}.png"), full_page=True)
        for href in _links(page):
            url = urlsplit(href)
            if not href.startswith(viewer.base) or not url.path.endswith(".html"):
                continue
            target = url.path + (f"?{url.query}" if url.query else "")
            if target not in seen:
                queue.append(target)
    assert visitor.problems == []
    kinds = {page_kind(p).split(":")[0] for p in seen}
    assert {"home", "list", "record", "messages", "state", "state-items", "compare"} <= kinds
    assert images >= 10
    assert len(list(shots.glob("*.png"))) >= 8
    # read-only: not one byte or timestamp changed, no file appeared (no -shm/-wal either)
    assert _snapshot(_dirs(pipeline)) == before


def test_filters_narrow_the_list_and_text_search_finds_a_record(
    viewer: ViewerServer, browser: Any, shots: Path
) -> None:
    visitor = Visitor(browser, viewer.base)
    page = visitor.open("/d/qs~tasks/index.html")
    rows = page.locator("table.records tr").count() - 1
    assert rows == 4
    page.select_option("select[name=family]", "program:receipt")
    page.click("form.filters button[type=submit]")
    page.wait_for_load_state("load")
    assert "family=program%3Areceipt" in page.url
    assert page.locator("table.records tr").count() - 1 == 1
    assert "1 match" in page.content()
    # trajectories: verdict and status filters and a text search
    page = visitor.open("/d/teacher~rejected/index.html?verdict=failed")
    failed = page.locator("table.records tr").count() - 1
    assert failed == 4
    page = visitor.open("/d/teacher~rejected/index.html?dropped=did+not+use+the+tools")
    assert page.locator("table.records tr").count() - 1 == 4
    assert page.locator("select[name=dropped] option").count() == 2  # any, the one reason
    page = visitor.open("/d/qs~gold/index.html?dropped=did+not+use+the+tools")
    assert page.locator("table.records tr").count() - 1 == 0
    page = visitor.open("/d/teacher~rejected/index.html?verdict=passed")
    assert page.locator("table.records tr").count() - 1 == 0
    page = visitor.open("/d/qs~gold/index.html?q=receipt")
    assert page.locator("table.records tr").count() - 1 == 1
    page = visitor.open("/d/qs~agent/index.html?error=parse")
    assert page.locator("table.records tr").count() - 1 == 1
    page = visitor.open("/d/qs~gold/index.html?tool=ocr")
    assert page.locator("table.records tr").count() - 1 == 4
    page = visitor.open("/d/qs~gold/index.html?tool=no_such_tool")
    assert page.locator("table.records tr").count() - 1 == 0
    page.screenshot(path=str(shots / "filtered-list.png"), full_page=True)
    assert visitor.problems == []


def test_pair_page_shows_both_steps_and_the_shared_prefix_images(
    viewer: ViewerServer, browser: Any, pipeline: dict[str, Path]
) -> None:
    from tracetune.schema import PreferencePair

    pairs = list(Dataset.open(pipeline["qs"] / "matrix" / "pairs", PreferencePair))
    later = next(p for p in pairs if p.prefix)  # a fork after committed steps
    visitor = Visitor(browser, viewer.base)
    page = visitor.open(f"/d/qs~matrix~pairs/r/{later.id}.html")
    assert page.locator("#chosen section.step").count() == 1
    assert page.locator("#rejected section.step").count() == 1
    assert page.locator("#chosen").inner_text().count(f"step {later.step_index}") >= 1
    assert page.locator("section.task img").count() == len(later.task.images) >= 1
    assert visitor.broken_images() == []
    shown = page.locator("ul.reasons").inner_text()
    assert all(reason in shown for reason in later.reasons)
    # every candidate of the step, ranked, with this pair's two marked
    candidates = page.locator("details.candidates table").inner_text()
    assert "this pair's chosen" in candidates and "this pair's rejected" in candidates
    assert visitor.broken_images() == []
    # the explored trajectory lists every candidate of that step with its rank
    page.click("text=explored trajectory (every candidate)")
    page.wait_for_load_state("load")
    table = page.locator("details.candidates table").nth(later.step_index)
    assert table.locator("tr").count() - 1 >= 2  # K policy samples (+ the gold anchor)
    assert "chosen" in table.inner_text()
    ranks = [int(r) for r in table.locator("tr td:first-child").all_inner_texts()]
    assert ranks == sorted(ranks) and ranks[0] == 1
    assert visitor.problems == []


def test_compare_view_lists_the_items_that_changed(
    viewer: ViewerServer, browser: Any, pipeline: dict[str, Path]
) -> None:
    visitor = Visitor(browser, viewer.base)
    page = visitor.open("/index.html")
    assert "+ adapter" in page.locator("table.list").nth(1).inner_text()  # the DPO run
    assert "counting" not in page.locator("table.list").first.inner_text()  # small: counted
    link = page.locator("a", has_text="qs/matrix/eval/sft → runs/oracle")
    assert link.count() == 1
    link.click()
    page.wait_for_load_state("load")
    changes = page.locator("#changes tr.fixed")
    records = [
        json.loads(line)
        for line in (pipeline["runs"] / "oracle" / "records.jsonl").read_text().splitlines()
    ]
    assert changes.count() == len(records) == 2  # the tiny SFT model got both wrong
    assert "2 fixed" in page.content() and "0 broken" in page.content()
    # each changed item links to its item page, which shows the trajectory with its images
    changes.first.locator("a").last.click()
    page.wait_for_load_state("load")
    assert page.locator("section.step").count() >= 1
    assert page.locator("img").count() >= 1 and visitor.broken_images() == []
    assert visitor.problems == []


def test_a_programs_run_page_shows_the_learning_metrics(viewer: ViewerServer, browser: Any) -> None:
    """An eval run of task programs reports how a controller learns (valid actions, right
    first tool beside the majority-tool baseline, tool and argument accuracy): the run's
    page shows them with its accuracy."""
    visitor = Visitor(browser, viewer.base)
    page = visitor.open("/index.html")
    runs = [h for h in _links(page) if h.endswith("oracle/index.html")]
    assert runs, _links(page)
    page.goto(runs[0], wait_until="load")
    text = page.content()
    for metric in ("accuracy", "valid_actions", "first_tool_macro", "majority_first_tool_macro"):
        assert f">{metric}<" in text, metric
    assert visitor.problems == []


def test_run_state_links_drop_reasons_to_their_items(viewer: ViewerServer, browser: Any) -> None:
    visitor = Visitor(browser, viewer.base)
    page = visitor.open("/d/teacher/state.html")
    assert "dropped" in page.content()
    reason = page.locator("a", has_text="did not use the tools")
    assert reason.count() == 1
    reason.click()
    page.wait_for_load_state("load")
    rows = page.locator("table.records tr")
    assert rows.count() - 1 == 4
    # each dropped item links to its rejected trajectory and its verdict
    text = rows.nth(1).inner_text()
    assert "teacher/rejected: trajectory" in text and "teacher/verdicts: verdict" in text
    page.locator("table.records a", has_text="teacher/rejected").first.click()
    page.wait_for_load_state("load")
    assert "failed" in page.locator("table.verdicts").inner_text()
    assert (
        "dropped by its stage: did not use the tools" in page.locator(".error").first.inner_text()
    )
    assert "I do not know &lt;b&gt;&amp;&lt;/b&gt;" in page.content()  # escaped, not markup
    assert visitor.problems == []


def test_trajectory_page_shows_steps_errors_usage_and_the_messages_at_a_step(
    viewer: ViewerServer, browser: Any, pipeline: dict[str, Path]
) -> None:
    from tracetune.schema import Trajectory

    (agent,) = list(Dataset.open(pipeline["qs"] / "agent", Trajectory))
    visitor = Visitor(browser, viewer.base)
    page = visitor.open(f"/d/qs~agent/r/{agent.id}.html")
    assert page.locator("section.step.has-error").count() == sum(1 for s in agent.steps if s.error)
    assert "parse error" in page.content()
    first = agent.steps[0]
    assert f"{first.usage.prompt_tokens}+{first.usage.completion_tokens} tokens" in page.content()
    page.locator("a", has_text="messages the model saw").nth(1).click()
    page.wait_for_load_state("load")
    roles = page.locator(".msg-role").all_inner_texts()
    # system, the task (with its image), then step 0 and its observation
    assert [r.split(" ")[0] for r in roles] == ["system", "user", "assistant", "user"]
    assert page.locator(".msg img").count() == 1 and visitor.broken_images() == []
    assert "Error (parse)" in page.locator(".msg").nth(3).inner_text()
    assert visitor.problems == []


def test_documents_render_as_markdown_and_spreadsheets_as_tables(
    viewer: ViewerServer, browser: Any, pipeline: dict[str, Path], shots: Path
) -> None:
    tasks = list(Dataset.open(pipeline["docs"], Task))
    visitor = Visitor(browser, viewer.base)
    kinds = set()
    for task in tasks:
        page = visitor.open(f"/d/docs/r/{task.id}.html")
        name = task.files[0].name
        kinds.add(name.rsplit(".", 1)[1])
        if name.endswith(".xlsx"):
            assert page.locator(".doc.markdown table").count() >= 1
            page.screenshot(path=str(shots / "task-xlsx.png"), full_page=True)
        else:
            assert page.locator(".doc.markdown").inner_text().strip()
    assert kinds == {"xlsx", "pdf", "docx"}
    assert visitor.problems == []


def test_dialogue_page_marks_reflection_and_rag(
    viewer: ViewerServer, browser: Any, pipeline: dict[str, Path]
) -> None:
    from tracetune.schema import Dialogue

    rr = list(Dataset.open(pipeline["mmat"] / "rr", Dialogue))
    reflected = next(d for d in rr if "more is the total" in d.task.query)
    searched = next(d for d in rr if "which country" in d.task.query.lower())
    visitor = Visitor(browser, viewer.base)
    page = visitor.open(f"/d/mmat~rr/r/{reflected.id}.html")
    assert page.locator(".msg.reflection").count() == 3
    assert page.locator(".tag-operator").count() >= 2 and page.locator(".tag-result").count() >= 2
    assert "failed" in page.locator("table.verdicts").inner_text()  # the math check flagged it
    page = visitor.open(f"/d/mmat~rr/r/{searched.id}.html")
    assert page.locator(".msg.rag").count() == 2  # the <RAG> query and its results
    orr = list(Dataset.open(pipeline["mmat"] / "orr", Dialogue))
    page = visitor.open(f"/d/mmat~orr/r/{orr[0].id}.html")
    assert page.locator(".tag-api").count() >= 2
    assert visitor.broken_images() == []
    assert visitor.problems == []


def test_bad_inputs_get_a_clear_message_not_a_500(
    pipeline: dict[str, Path], tmp_path: Path, browser: Any
) -> None:
    from fastapi.testclient import TestClient

    from tracetune.view import build_app

    empty = tmp_path / "notes"
    empty.mkdir()
    (empty / "readme.txt").write_text("not a dataset")
    newer = tmp_path / "newer"
    shutil.copytree(pipeline["qs"] / "tasks", newer)
    manifest = json.loads((newer / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (newer / "manifest.json").write_text(json.dumps(manifest))
    damaged = tmp_path / "damaged"
    shutil.copytree(pipeline["qs"] / "gold", damaged)
    # every record's images are gone, so whichever record the listing shows first is damaged
    images = sorted((damaged / "assets").rglob("*.png"))
    assert images
    for image in images:
        image.unlink()
    gone = images[0]
    client = TestClient(build_app([empty, newer, damaged]))
    home = client.get("/index.html")
    assert home.status_code == 200
    assert "is not a tracetune dataset or run" in home.text
    assert "schema version 99, newer than this tracetune" in home.text
    page = client.get("/d/newer/index.html")
    assert page.status_code == 422 and "upgrade tracetune" in page.text
    page = client.get("/d/notes/index.html")
    assert (
        page.status_code == 422 and "point at a folder written by a tracetune command" in page.text
    )
    listing = client.get("/d/damaged/index.html")
    assert listing.status_code == 200
    first = re.search(r'href="\.\./\.\./d/damaged/r/([^"]+)\.html"', listing.text)
    assert first
    record = client.get(f"/d/damaged/r/{first.group(1)}.html")
    assert record.status_code == 200
    assert (
        "missing asset" in record.text and "was the dataset copied without assets/" in record.text
    )
    assert client.get(f"/d/damaged/assets/{gone.parent.name}/{gone.name}").status_code == 404
    assert client.get("/d/damaged/r/no-such-record.html").status_code == 404
    assert client.get("/d/nowhere/index.html").status_code == 404
    assert client.get("/d/damaged/assets/../manifest.json").status_code == 404
    # files from a dataset never run scripts in the viewer's origin
    assert "script-src 'none'" in home.headers["content-security-policy"]
    # a small dataset's first visit shows its count and filters at once
    fresh = TestClient(build_app([pipeline["qs"] / "tasks"], cache_dir=None))
    first_visit = fresh.get("/d/tasks/index.html")
    assert "4 records" in first_visit.text and 'name="family"' in first_visit.text
    # a damaged Parquet chunk is a message on the page too
    chunk = next((damaged / "data").glob("part-*.parquet"))
    chunk.write_bytes(b"not parquet")
    client = TestClient(build_app([damaged]))
    broken = client.get("/d/damaged/index.html")
    assert broken.status_code == 422 and "cannot read this Parquet chunk" in broken.text


def test_export_writes_the_same_pages_as_a_static_site(
    pipeline: dict[str, Path], tmp_path: Path, browser: Any, shots: Path
) -> None:
    out = tmp_path / "site"
    before = _snapshot(_dirs(pipeline))
    result = CliRunner().invoke(cli_app, ["view", *map(str, _dirs(pipeline)), "--export", str(out)])
    assert result.exit_code == 0, result.output
    assert _snapshot(_dirs(pipeline)) == before
    pages = list(out.rglob("*.html"))
    assert len(pages) > 50
    # every relative link and image of every page points at a file of the site
    missing = []
    for page in pages:
        for ref in re.findall(r'(?:href|src)="([^"#?]+)', page.read_text()):
            if ref.startswith(("http:", "https:", "data:")):
                continue
            target = posixpath.normpath(posixpath.join(page.parent.as_posix(), ref))
            if not Path(target).exists():
                missing.append(f"{page.relative_to(out)} -> {ref}")
    assert missing == []
    visitor_page = browser.new_page()
    problems: list[str] = []
    visitor_page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    pair = next((out / "d" / "qs~matrix~pairs" / "r").glob("*.html"))
    visitor_page.goto(pair.as_uri())
    assert visitor_page.locator("#chosen section.step").count() == 1
    broken = visitor_page.evaluate(
        "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).length"
    )
    assert broken == 0 and problems == []
    visitor_page.screenshot(path=str(shots / "export-pair.png"), full_page=True)
    # exporting into a dataset is refused
    inside = CliRunner().invoke(
        cli_app, ["view", str(pipeline["qs"]), "--export", str(pipeline["qs"] / "site")]
    )
    assert inside.exit_code != 0 and "never writes into a dataset" in inside.output


def test_eval_report_item_pages_show_the_images(pipeline: dict[str, Path], tmp_path: Path) -> None:
    from tracetune.view.report import build_report

    matrix = pipeline["qs"] / "matrix"
    result = build_report([matrix / "eval" / "sft", matrix / "eval" / "dpo"], tmp_path / "report")
    # the DPO run is the SFT model with the DPO adapter: its label says so, not just SFT's path
    label = r"dpo \(local:\S+/matrix/sft \+ adapter \S+/matrix/dpo\)"
    assert re.search(label, result.markdown.read_text())
    assert result.item_pages
    for page in result.item_pages:
        text = page.read_text()
        srcs = re.findall(r'<img src="([^"]+)"', text)
        assert srcs, page
        for src in srcs:
            assert (page.parent / src).resolve().is_file(), src


def test_run_state_shows_failures_with_their_error_while_a_writer_holds_the_wal(
    tmp_path: Path,
) -> None:
    """A stage still running (its WAL open) is read from a private copy: the page shows
    done/dropped/failed counts, errors and cost, and no file in the dataset changes."""
    from fastapi.testclient import TestClient

    from tracetune.schema import Usage
    from tracetune.view import build_app

    root = tmp_path / "run"
    dataset = Dataset.create(root, Task)
    state = dataset.state  # the writer's connection stays open: state.sqlite-wal exists
    state.mark("synth", "task-1", "done")
    state.mark("synth", "task-2", "failed", {"error": "RuntimeError: backend said 503"})
    state.mark("synth", "task-3", "dropped", {"reason": "leaks the answer", "detail": "x"})
    state.add_usage("synth", "openai:teacher", Usage(prompt_tokens=1200, cost_usd=0.25, calls=3))
    state.flush()  # usage is written in batches; what is on disk is what the viewer shows
    assert (root / "state.sqlite-wal").exists()
    before = _snapshot([root])
    client = TestClient(build_app([root], cache_dir=None))
    page = client.get("/d/run/state.html")
    assert page.status_code == 200
    text = re.sub(r"<[^>]+>", " ", page.text)
    assert "RuntimeError: backend said 503" in text and "leaks the answer" in text
    assert "openai:teacher" in text and "1200" in text and "0.2500" in text
    failed = re.search(r'href="([^"]*/failed/[^"]+\.html)"', page.text)
    assert failed
    items = client.get("/d/run/" + failed.group(1).split("d/run/", 1)[1])
    assert items.status_code == 200 and "task-2" in items.text and "traceback" not in items.text
    state.mark("synth", "task-4", "failed", {"error": "later"})  # the writer goes on
    assert _snapshot([root]).keys() == before.keys()
    state.close()


def test_a_list_picks_up_records_a_running_stage_adds(
    pipeline: dict[str, Path], tmp_path: Path
) -> None:
    from fastapi.testclient import TestClient

    from tracetune.view import build_app

    growing = tmp_path / "growing"
    shutil.copytree(pipeline["qs"] / "tasks", growing)
    client = TestClient(build_app([growing], cache_dir=None))
    assert "4 records" in client.get("/d/growing/index.html").text
    first = next(iter(Dataset.open(growing, Task)))
    writer = Dataset.open(growing, Task)
    writer.write_all([first.model_copy(update={"id": "task-added-later"})])
    assert client.get("/d/growing/r/task-added-later.html").status_code == 200  # a shared link
    writer.write_all([first.model_copy(update={"id": "task-added-last"})])
    page = client.get("/d/growing/index.html")
    assert "6 records" in page.text and "task-added-last" in page.text
