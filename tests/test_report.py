"""``eval report``: HTML and Markdown comparing runs, opened in a real headless browser."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tracetune.cli import app
from tracetune.evaluate.runs import bench_config, run_benchmark
from tracetune.models.base import ModelOptions
from tracetune.testing import ScriptedOpenAIServer
from tracetune.view.report import ReportError, build_report

FIXTURES = Path(__file__).parent / "fixtures"
GTA = FIXTURES / "gta_small"
GOLD = json.loads((GTA / "dataset.json").read_text())
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


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if p.get("type") == "text")


def gold_replay(body: dict[str, Any]) -> str:
    messages = body["messages"]
    user = _text(messages[1]["content"])
    qid = next(k for k, v in GOLD.items() if user.startswith(v["dialogs"][0]["content"]))
    turn = sum(1 for m in messages if m["role"] == "assistant")
    gold = [m for m in GOLD[qid]["dialogs"] if m["role"] == "assistant"][turn]
    if gold.get("tool_calls"):
        fn = gold["tool_calls"][0]["function"]
        call = {"name": fn["name"], "arguments": fn["arguments"]}
    else:
        call = {"name": "final_answer", "arguments": {"answer": gold["content"]}}
    return "Thought: replaying\nAction: " + json.dumps(call)


def always_wrong(body: dict[str, Any]) -> str:
    call = {"name": "final_answer", "arguments": {"answer": "I do not know <b>&</b>"}}
    return "Thought: guess\nAction: " + json.dumps(call)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    dirs = []
    for name, responder in (("replay", gold_replay), ("guess", always_wrong)):
        with ScriptedOpenAIServer(responder) as server:
            config = bench_config(
                "gta",
                model=f"openai:{name}",
                out=root / name,
                data=GTA,
                mode="step",
                embedder="packaged",
                backend=ModelOptions(base_url=server.base_url, api_key_env="PATH"),
            )
            asyncio.run(run_benchmark(config, progress=False))
        dirs.append(root / name)
    with ScriptedOpenAIServer(always_wrong) as server:
        config = bench_config(
            "programs",
            model="openai:guess",
            out=root / "programs",
            n=2,
            families=["receipt", "table"],
            backend=ModelOptions(base_url=server.base_url, api_key_env="PATH"),
        )
        asyncio.run(run_benchmark(config, progress=False))
    dirs.append(root / "programs")
    return dirs


def test_report_compares_runs_in_html_and_markdown(runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = CliRunner().invoke(
        app, ["eval", "report", *map(str, runs), "--out", str(out), "--failures", "3"]
    )
    assert result.exit_code == 0, result.output
    markdown = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    for text in (markdown, page):
        assert "gta/step/official" in text and "gta/step/mat" in text
        assert "replay (openai:replay)" in text and "guess (openai:guess)" in text
        assert "answer score by answer kind" in text
    # one column per run; guessing answers every turn, so only the 6 answer turns align
    assert "| inst_align | 113.33 | 40.00 |" in markdown
    assert "| objective | 100.00 | 0.00 |" in markdown
    assert "answer_acc 98.16" in markdown  # the headline in the overview
    # step mode: every gold tool turn of the replay names the tool, none of the guesses
    assert "| perception | 100.00 | 0.00 |" in markdown
    # the task programs run gets its own tables and a per-family breakdown
    assert "## programs" in markdown and "| receipt | 0.00 |" in markdown
    assert "<b>&</b>" not in page and "&lt;b&gt;&amp;&lt;/b&gt;" in page  # escaped
    plots = sorted((out / "plots").glob("*.png"))
    assert len(plots) >= 3
    assert all(f"plots/{p.name}" in page and f"plots/{p.name}" in markdown for p in plots)
    # the lowest-scoring items link to pages with their trajectories; the replay's only
    # imperfect item is its subjective answer (an embedding similarity below 1)
    pages = sorted((out / "items" / "guess").glob("*.html"))
    assert len(pages) == 3 and len(list((out / "items" / "programs").glob("*.html"))) == 2
    subjective = [q for q, v in GOLD.items() if isinstance(v["gt_answer"], list)]
    assert sorted(p.stem for p in (out / "items" / "replay").glob("*.html")) == subjective
    assert all(f"items/guess/{p.name}" in markdown for p in pages)
    item = pages[0].read_text()
    assert "trajectory <code>traj-" in item and "I do not know" in item


def test_report_opens_in_a_headless_browser_without_errors(
    runs: list[Path], tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), (
        f"{CHROMIUM} is missing: apt-get install -y chromium (.ci/run does this)"
    )
    result = build_report(runs, tmp_path / "report", max_failures=2)
    problems: list[str] = []
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"),  # a fresh profile
            executable_path=CHROMIUM,
            headless=True,
            args=BROWSER_ARGS,
        )
        try:
            page = context.new_page()
            page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
            page.on(
                "console",
                lambda msg: (
                    problems.append(f"console: {msg.text}") if msg.type == "error" else None
                ),
            )
            page.on("requestfailed", lambda req: problems.append(f"failed to load {req.url}"))
            response = page.goto(result.html.as_uri(), wait_until="load")
            assert response is not None and response.ok
            assert page.title() == "tracetune evaluation"
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => [e.getAttribute('src'), e.complete, e.naturalWidth])"
            )
            assert len(images) >= 3
            assert all(done and width > 0 for _, done, width in images), images
            tables = page.eval_on_selector_all("table", "els => els.length")
            assert tables >= 4
            # a failure example's link opens its trajectory page
            link = page.locator("a", has_text="trajectories").first
            link.click()
            page.wait_for_load_state("load")
            assert "item" in page.title()
            assert page.locator("h2", has_text="trajectory").count() >= 1
        finally:
            context.close()
    assert problems == []


def test_report_of_a_directory_that_is_no_run_says_so(tmp_path: Path) -> None:
    with pytest.raises(ReportError, match="eval run"):
        build_report([tmp_path], tmp_path / "out")


def test_report_copes_with_a_run_whose_trajectories_are_gone(
    runs: list[Path], tmp_path: Path
) -> None:
    copy = tmp_path / "guess"
    shutil.copytree(runs[1], copy)
    shutil.rmtree(copy / "trajectories")
    result = build_report([copy], tmp_path / "report", max_failures=1)
    (page,) = result.item_pages
    assert "no trajectory on disk" in page.read_text()
