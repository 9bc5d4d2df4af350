"""``tracetune eval report RUN_DIR... --out DIR``: compare benchmark runs in HTML and Markdown.

Reads what ``eval run`` wrote (``run.json``, ``metrics.json``, ``records.jsonl`` and the
trajectories, through :mod:`tracetune.evaluate.results`) and writes::

    OUT/report.html       metric tables, breakdowns, plots, failure examples
    OUT/report.md         the same tables and links, for a pull request or a wiki
    OUT/plots/*.png       matplotlib charts (linked from both)
    OUT/items/RUN/*.html  one page per failure example: every trajectory behind that item

Item pages render steps with the viewer's own templates (:func:`tracetune.view.render.step_html`),
so a step looks the same in the report and in ``tracetune view``.
"""

from __future__ import annotations

import html
import os
import re
import shutil
import textwrap
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tracetune.evaluate.results import (
    HEADLINE_SCORE,
    ReportError,
    RunData,
    breakdowns,
    failures,
    load_run,
    load_trajectories,
    percent_metrics,
    run_model_label,
)
from tracetune.schema import EvalRecord, FileRef
from tracetune.view.render import css, step_html


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


# -- numbers -------------------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


# -- plots ---------------------------------------------------------------------------------
def bar_chart(path: Path, title: str, groups: dict[str, dict[str, float]], ylabel: str) -> Path:
    """Grouped bars: one group per category, one bar per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = sorted(
        {c for values in groups.values() for c in values},
        key=lambda c: next(list(v).index(c) for v in groups.values() if c in v),
    )
    runs = list(groups)
    width = 0.8 / max(1, len(runs))
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(categories) + 2), 3.2), dpi=100)
    for i, run in enumerate(runs):
        xs = [j + (i - (len(runs) - 1) / 2) * width for j in range(len(categories))]
        ys = [groups[run].get(c, 0.0) for c in categories]
        # Run labels carry model paths (and adapters): wrap them so the legend fits.
        ax.bar(xs, ys, width=width, label=textwrap.fill(run, 60))
    ax.set_xticks(range(len(categories)))
    ax.set_xticklabels(categories, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    top = max([v for g in groups.values() for v in g.values()] + [1.0])
    ax.set_ylim(0, max(100.0, top * 1.05))
    if len(runs) > 1:
        # Below the axes, so it never hides a bar.
        ax.legend(
            fontsize=7,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.3),
            ncol=min(3, len(runs)),
            frameon=False,
        )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


# -- pages ---------------------------------------------------------------------------------
_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
pre { background: #f7f7f7; padding: 6px; white-space: pre-wrap; max-height: 24em; overflow: auto; }
.err { color: #a00; }
img { max-width: 100%; border: 1px solid #ddd; }
"""


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _html_table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = []
    for row in rows:
        cells = []
        for cell in row:
            if isinstance(cell, Raw):
                cells.append(f"<td>{cell.html}</td>")
            elif isinstance(cell, int | float) and not isinstance(cell, bool):
                cells.append(f'<td class="num">{_e(_fmt(cell))}</td>')
            else:
                cells.append(f"<td>{_e(_fmt(cell))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _md_cell(cell: Any) -> str:
    if isinstance(cell, Raw):
        return cell.markdown
    return _fmt(cell).replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Raw:
    """A table cell with its own HTML and Markdown (a link)."""

    html: str
    markdown: str


def _page(title: str, body: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{_e(title)}</h1>{body}</body></html>\n"
    )


def asset_copier(run: RunData, out: Path, page_dir: Path) -> Callable[[FileRef], str | None]:
    """An image source for item pages: copies each image of the run's trajectories into
    ``out/assets/`` (once) and returns its path relative to ``page_dir``; None if missing."""
    store = run.root / "trajectories"
    prefix = Path(os.path.relpath(out, page_dir)).as_posix()

    def src(ref: FileRef) -> str | None:
        source = store / ref.asset_path
        if not source.is_file():
            return None
        dest = out / ref.asset_path
        if not dest.exists():
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, dest)
        return f"{prefix}/{ref.asset_path}"

    return src


def item_page(
    run: RunData, record: EvalRecord, image_src: Callable[[FileRef], str | None] | None = None
) -> str:
    """Every trajectory behind one scored item, with the item's scores; with ``image_src``
    the task's and the observations' images are shown (as ``tracetune view`` shows them)."""
    images = image_src or (lambda ref: None)
    scores = {k: v for k, v in record.scores.items() if v is not None}
    body = [
        f"<p>run <b>{_e(run.label)}</b>, benchmark <code>{_e(record.benchmark)}</code></p>",
        _html_table(["metric", "score"], [[k, v] for k, v in scores.items()]),
    ]
    body.append(f"<p><b>prediction</b> {_e(record.prediction or '(none)')}</p>")
    gold = record.metadata.get("gold")
    if gold is not None:
        body.append(f"<p><b>gold</b> {_e(gold)}</p>")
    for reason in record.metadata.get("reasons") or []:
        body.append(f"<p><b>check</b> {_e(reason)}</p>")
    steps = record.metadata.get("steps")
    if isinstance(steps, list) and steps and isinstance(steps[0], dict):
        rows = [
            [i, s.get("gold"), s.get("pred"), s.get("arguments_equal", "")]
            for i, s in enumerate(steps)
        ]
        body.append("<h3>turns: gold vs predicted</h3>")
        body.append(_html_table(["turn", "gold", "predicted", "arguments equal"], rows))
    trajectories = run.trajectories.get(record.item_id, [])
    if not trajectories:
        body.append("<p>(no trajectory on disk for this item)</p>")
    for trajectory in trajectories:
        turn = trajectory.metadata.get("turn")
        label = f"turn {turn}" if turn is not None else "episode"
        body.append(f"<h2>{_e(label)}: trajectory <code>{_e(trajectory.id)}</code></h2>")
        body.append(
            f"<p>status {_e(trajectory.status)}, {len(trajectory.steps)} step(s), "
            f"{trajectory.usage.total_tokens} tokens</p>"
        )
        if turn is None or turn == 0:
            body.append(f"<p><b>task</b></p><pre>{_e(trajectory.task.query)}</pre>")
            for ref in trajectory.task.images:
                src = images(ref)
                if src is None:
                    body.append(f'<p class="missing">missing image {_e(ref.name)}</p>')
                else:
                    body.append(
                        f'<figure><img src="{_e(src)}" alt="{_e(ref.name)}">'
                        f"<figcaption>{_e(ref.name)}</figcaption></figure>"
                    )
        body.extend(step_html(step, images) for step in trajectory.steps)
    page = _page(f"{record.benchmark} item {record.item_id}", "\n".join(body))
    return page.replace("</style>", css() + "</style>", 1)


# -- the report ----------------------------------------------------------------------------
@dataclass
class ReportResult:
    html: Path
    markdown: Path
    plots: list[Path]
    item_pages: list[Path]


def build_report(
    run_dirs: list[Path], out: Path, max_failures: int = 5, title: str = "tracetune evaluation"
) -> ReportResult:
    """Write report.html, report.md, plots and failure pages comparing ``run_dirs``."""
    if not run_dirs:
        raise ReportError("give at least one run directory (written by `tracetune eval run`)")
    runs = [load_run(Path(d)) for d in run_dirs]
    seen: dict[str, int] = {}
    for run in runs:
        slug = _slug(run.root.name)
        seen[slug] = seen.get(slug, 0) + 1
        run.slug = slug if seen[slug] == 1 else f"{slug}-{seen[slug]}"
        if seen[slug] > 1:
            run.label = f"{run.label} #{seen[slug]}"
    out = Path(out)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    html_parts: list[str] = []
    md_parts: list[str] = [f"# {title}", ""]
    plots: list[Path] = []

    # Overview.
    header = [
        "run",
        "benchmark",
        "model",
        "headline",
        "items",
        "trajectories",
        "tokens",
        "cost (USD)",
        "failed episodes",
    ]
    rows = []
    for run in runs:
        headline = run.report(run.headline)
        info = run.metrics.get("run", {})
        shown = percent_metrics(headline)
        main = next(
            ((m, shown[m]) for m in ("answer_acc", "accuracy", "mat_answer_acc") if m in shown),
            next(iter(shown.items()), ("-", None)),
        )
        rows.append(
            [
                run.label,
                run.headline,
                run_model_label(run.run, run.metrics),
                f"{main[0]} {_fmt(main[1])}",
                headline.get("n_items"),
                info.get("trajectories"),
                info.get("tokens"),
                info.get("cost_usd"),
                info.get("failed"),
            ]
        )
    html_parts += ["<h2>Runs</h2>", _html_table(header, rows)]
    md_parts += ["## Runs", "", _md_table(header, rows), ""]

    # Metric tables and a plot per scored report (benchmark/mode/protocol).
    names = list(dict.fromkeys(n for run in runs for n in run.metrics.get("reports", {})))
    for name in names:
        having = [r for r in runs if name in r.metrics.get("reports", {})]
        metric_names = list(
            dict.fromkeys(m for r in having for m in r.report(name).get("metrics", {}))
        )
        header = ["metric", *[r.label for r in having]]
        rows = [[m, *[r.report(name)["metrics"].get(m) for r in having]] for m in metric_names]
        html_parts += [f"<h2>{_e(name)}</h2>", _html_table(header, rows)]
        md_parts += [f"## {name}", "", _md_table(header, rows), ""]
        notes = []
        if name.startswith("gta/step/official"):
            notes.append(
                "inst_align can exceed 100, as in GTA's evaluator: answer turns of "
                "image-generation queries count in its numerator but not its denominator"
            )
        for r in having:
            details = r.report(name).get("details", {})
            if details.get("subset"):
                notes.append(f"{r.label}: {details['subset']}")
            embedder = details.get("embedder")
            if isinstance(embedder, dict):
                notes.append(
                    f"{r.label}: subjective answers embedded with {embedder.get('model')}"
                    f"{' (official)' if embedder.get('official') else ' (not the official model)'}"
                )
            if details.get("missing_predictions"):
                notes.append(
                    f"{r.label}: {len(details['missing_predictions'])} item(s) without a "
                    "prediction (scored as wrong)"
                )
        for note in notes:
            html_parts.append(f"<p><i>{_e(note)}</i></p>")
            md_parts.append(f"*{note}*\n")
        # Agent-X reports fractions in [0, 1] (its own scale), not percentages.
        fractions = all(
            str(r.report(name).get("details", {}).get("scale", "")).startswith("0-1")
            for r in having
        )
        if fractions:
            groups = {
                r.label: {
                    m: float(v)
                    for m, v in r.report(name).get("metrics", {}).items()
                    if isinstance(v, float)
                }
                for r in having
            }
        else:
            groups = {r.label: percent_metrics(r.report(name)) for r in having}
        if any(groups.values()):
            ylabel = "score (0-1)" if fractions else "%"
            plot = bar_chart(out / "plots" / f"{_slug(name)}.png", name, groups, ylabel)
            plots.append(plot)
            rel = plot.relative_to(out).as_posix()
            html_parts.append(f'<p><img src="{_e(rel)}" alt="{_e(name)} metrics"></p>')
            md_parts += [f"![{name} metrics]({rel})", ""]

    # Breakdowns.
    by_name: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
    for run in runs:
        for breakdown, values in breakdowns(run).items():
            by_name[f"{run.bench}: {breakdown}"][run.label] = values
    if by_name:
        html_parts.append("<h2>Breakdowns</h2>")
        md_parts += ["## Breakdowns", ""]
    for breakdown, groups in by_name.items():
        categories = list(dict.fromkeys(c for v in groups.values() for c in v))
        header = ["category", *groups]
        rows = [[c, *[groups[label].get(c) for label in groups]] for c in categories]
        html_parts += [f"<h3>{_e(breakdown)}</h3>", _html_table(header, rows)]
        md_parts += [f"### {breakdown}", "", _md_table(header, rows), ""]
        plot = bar_chart(
            out / "plots" / f"breakdown_{_slug(breakdown)}.png", breakdown, groups, "%"
        )
        plots.append(plot)
        rel = plot.relative_to(out).as_posix()
        html_parts.append(f'<p><img src="{_e(rel)}" alt="{_e(breakdown)}"></p>')
        md_parts += [f"![{breakdown}]({rel})", ""]

    # Failure examples, each linked to a page with its trajectories.
    pages: list[Path] = []
    html_parts.append("<h2>Failure examples</h2>")
    md_parts += ["## Failure examples", ""]
    for run in runs:
        chosen = failures(run, max_failures)
        load_trajectories(run, {r.item_id for r in chosen})
        html_parts.append(f"<h3>{_e(run.label)}</h3>")
        md_parts += [f"### {run.label}", ""]
        if not chosen:
            html_parts.append("<p>No failed items.</p>")
            md_parts += ["No failed items.", ""]
            continue
        rows = []
        for record in chosen:
            page = out / "items" / run.slug / f"{_slug(record.item_id)}.html"
            page.parent.mkdir(parents=True, exist_ok=True)
            copier = asset_copier(run, out, page.parent)
            page.write_text(item_page(run, record, copier), encoding="utf-8")
            pages.append(page)
            rel = page.relative_to(out).as_posix()
            keys = HEADLINE_SCORE.get(run.bench, ("accuracy",))
            score = next((record.scores[k] for k in keys if record.scores.get(k) is not None), None)
            gold = record.metadata.get("gold", "")
            link = Raw(f'<a href="{_e(rel)}">trajectories</a>', f"[trajectories]({rel})")
            rows.append(
                [
                    record.item_id,
                    score,
                    (record.prediction or "(none)")[:200],
                    str(gold)[:200],
                    link,
                ]
            )
        header = ["item", "score", "prediction", "gold", "details"]
        html_parts.append(_html_table(header, rows))
        md_parts += [_md_table(header, rows), ""]

    html_path = out / "report.html"
    html_path.write_text(_page(title, "\n".join(html_parts)), encoding="utf-8")
    md_path = out / "report.md"
    md_path.write_text("\n".join(md_parts).rstrip() + "\n", encoding="utf-8")
    return ReportResult(html_path, md_path, plots, pages)


__all__ = ["ReportError", "ReportResult", "build_report"]
