"""The viewer's pages, as functions of a path: served by the app, written by ``--export``.

Every link is relative to the page it is on (``root`` is ``../`` repeated to the site's top),
and every page lives at a path ending in ``.html``, so the same pages work from the server
and as files of a static site. Filters are query parameters, which only the server reads.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tracetune.schema import (
    Dialogue,
    EvalRecord,
    FileRef,
    PreferencePair,
    Step,
    Task,
    Trajectory,
    Verdict,
)
from tracetune.view.render import document_markdown, environment, file_kind
from tracetune.view.sources import (
    Catalog,
    DatasetSource,
    RunSource,
    Source,
    SourceError,
    run_trajectories,
    safe_key,
    slugify,
)

PAGE_SIZE = 50
PLURAL = {
    "task": "tasks",
    "trajectory": "trajectories",
    "verdict": "verdicts",
    "pair": "preference pairs",
    "dialogue": "dialogues",
}


@dataclass
class Page:
    status: int
    html: str


class NotFound(LookupError):
    """No page at this path; the message says what was looked for."""


def _short(text: Any, n: int = 140) -> str:
    s = "" if text is None else str(text)
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 1] + "…"


def _cell(text: Any, url: str | None = None, cls: str | None = None) -> dict[str, Any]:
    return {
        "text": text if isinstance(text, str) else ("-" if text is None else str(text)),
        "url": url,
        "cls": cls,
    }


class Site:
    """Renders every page of the viewer from a :class:`Catalog`."""

    def __init__(self, catalog: Catalog, static: bool = False, page_size: int = PAGE_SIZE) -> None:
        self.catalog = catalog
        self.static = static
        self.page_size = page_size
        self.env = environment()
        self._facets: dict[tuple[str, str], list[str]] = {}
        self._columns: dict[tuple[str, str], pa.Array] = {}
        self._warming: set[str] = set()

    # -- helpers -----------------------------------------------------------------------
    def _render(self, template: str, depth: int, code: int = 200, **ctx: Any) -> Page:
        root = "../" * depth
        html = self.env.get_template(template).render(root=root, static=self.static, **ctx)
        return Page(code, html)

    def problem(self, title: str, message: str, depth: int, status: int) -> Page:
        return self._render("problem.html", depth, status, title=title, problem=message)

    def source(self, slug: str) -> Source:
        source = self.catalog.sources.get(slug)
        if source is None:
            raise NotFound(
                f"no dataset or run called {slug!r} was opened; the home page lists them all"
            )
        return source

    def dataset(self, slug: str) -> DatasetSource:
        source = self.source(slug)
        if not isinstance(source, DatasetSource):
            raise NotFound(f"{slug!r} is not a dataset")
        return source

    def image_src(self, source: DatasetSource, depth: int) -> Any:
        root = "../" * depth

        def src(ref: FileRef) -> str | None:
            if not source.has_asset(ref.asset_path):
                return None
            return f"{root}d/{source.slug}/{ref.asset_path}"

        return src

    def documents(self, source: DatasetSource, files: list[FileRef]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for ref in files:
            kind = file_kind(ref)
            path = source.root / ref.asset_path
            if kind in ("image", "download") or not path.is_file():
                continue
            if kind == "text":
                text = path.read_bytes()[:200_000].decode("utf-8", errors="replace")
                out[ref.sha256] = {"text": text, "error": None, "markdown": None}
                continue
            markdown, error = document_markdown(path, ref)
            out[ref.sha256] = {"text": None, "error": error, "markdown": markdown}
        return out

    def record_url(self, slug: str, record_id: str, depth: int) -> str:
        return f"{'../' * depth}d/{slug}/r/{safe_key(record_id)}.html"

    # -- home --------------------------------------------------------------------------
    def home(self) -> Page:
        datasets = []
        for d in self.catalog.datasets():
            d.start_indexing()
        for d in self.catalog.datasets():
            try:
                # small datasets are counted at once; big ones while their index builds
                count: Any = len(d) if d.index_ready or len(d.files) <= 16 else "counting…"
            except SourceError as exc:
                count = f"unreadable: {exc}"
            datasets.append(
                {
                    "slug": d.slug,
                    "label": d.label,
                    "count": count,
                    "kind": d.kind,
                    "state": d.state_path is not None,
                }
            )
        runs = []
        for r in self.catalog.runs():
            main = self._score_name(r)
            headline = r.metrics.get("reports", {}).get(r.headline, {}).get("metrics", {})
            runs.append(
                {
                    "slug": r.slug,
                    "label": r.label,
                    "headline": r.headline,
                    "model": r.model,
                    "n": len(r.headline_records()),
                    "main": f"{main} {headline.get(main, '-')}",
                }
            )
        return self._render(
            "index.html",
            0,
            title="Datasets and runs",
            datasets=datasets,
            runs=runs,
            compares=self.compare_pairs(),
            problems=self.catalog.problems,
        )

    def compare_pairs(self) -> list[dict[str, str]]:
        runs = self.catalog.runs()
        out = []
        for i, a in enumerate(runs):
            for b in runs[i + 1 :]:
                if a.headline == b.headline:
                    out.append({"a": a.slug, "b": b.slug, "a_label": a.label, "b_label": b.label})
        return out

    # -- lists -------------------------------------------------------------------------
    def source_page(self, slug: str, page: int = 1, params: dict[str, str] | None = None) -> Page:
        params = {k: v for k, v in (params or {}).items() if v}
        depth = 2 if page == 1 else 3
        source = self.source(slug)
        crumbs = [(source.label, f"{'../' * depth}d/{slug}/index.html")]
        if source.kind == "error":
            return self._render(
                "problem.html", depth, 422, title=source.label, problem=source.error, crumbs=crumbs
            )
        if isinstance(source, RunSource):
            return self.run_page(source, page, params, depth, crumbs)
        assert isinstance(source, DatasetSource)
        try:
            return self.list_page(source, page, params, depth, crumbs)
        except SourceError as exc:
            return self._render(
                "problem.html", depth, 422, title=source.label, problem=str(exc), crumbs=crumbs
            )

    def _page_url(self, slug: str, depth: int, params: dict[str, str]) -> Any:
        root = "../" * depth
        query = ("?" + urlencode(params)) if params and not self.static else ""

        def url(n: int) -> str:
            if n == 1:
                return f"{root}d/{slug}/index.html{query}"
            return f"{root}d/{slug}/page/{n}.html{query}"

        return url

    def _refresh(self, source: DatasetSource) -> None:
        """A list shows what is on disk now: new chunks of a running stage (and of the
        verdicts it joins) are indexed again."""
        if source.refresh():
            self._forget(source.slug)
        if source.kind == "trajectory":
            grown = [v for v in self.catalog.datasets("verdict") if v.refresh()]
            if grown:
                self.catalog.forget_verdicts()
                for slug, column in list(self._columns):
                    if column == "_verdict":
                        self._forget(slug)

    def _forget(self, slug: str) -> None:
        for cache in (self._columns, self._facets):
            for key in [k for k in cache if k[0] == slug]:
                cache.pop(key, None)
        self._warming.discard(slug)

    def _warm(self, source: DatasetSource) -> None:
        """Once the index is built, compute the filter options in the background too, so
        the first filtered page does not pay for them."""
        if source.slug in self._warming:
            return
        self._warming.add(source.slug)

        def warm() -> None:
            try:
                source.index  # noqa: B018  (waits for the index)
                if source.kind == "trajectory":
                    self.catalog.verdicts_ready()  # starts their builds
                    for verdicts in self.catalog.datasets("verdict"):
                        verdicts.index  # noqa: B018
                for _, column, _ in self.facets(source):
                    self.facet_values(source, column)
            except Exception:  # the page that needs them reports what is wrong
                pass

        threading.Thread(target=warm, name=f"warm-{source.slug}", daemon=True).start()

    def facets(self, source: DatasetSource) -> list[tuple[str, str, str]]:
        """(parameter, index column, label) of each filter of a dataset's list."""
        return {
            "task": [("family", "source", "family"), ("tool", "tools", "tool")],
            "trajectory": [
                ("status", "status", "status"),
                ("verdict", "_verdict", "verdict"),
                ("dropped", "_drop", "drop reason"),
                ("tool", "used_tools", "tool used"),
                ("error", "errors", "step error"),
                ("family", "source", "family"),
                ("controller", "controller", "controller"),
            ],
            "verdict": [("passed", "passed", "verdict"), ("judge", "judge", "judge")],
            "pair": [
                ("verifier", "verifier", "verifier"),
                ("tool", "chosen_tool", "chosen tool"),
                ("error", "rejected_error", "rejected error"),
                ("family", "source", "family"),
            ],
            "dialogue": [
                ("format", "format", "format"),
                ("reflected", "reflected", "reflection"),
                ("family", "source", "family"),
            ],
        }.get(source.kind, [])

    def _column(self, source: DatasetSource, index: pa.Table, column: str) -> pa.Array:
        key = (source.slug, column)
        if key not in self._columns:
            if column == "_verdict":
                col = pc.fill_null(
                    self.catalog.verdict_status(index.column("id").combine_chunks()),
                    "not judged",
                )
            elif column == "_drop":
                col = self.catalog.drop_column(index.column("id").combine_chunks())
            else:
                col = index.column(column).combine_chunks()
                if pa.types.is_boolean(col.type):
                    col = pc.cast(col, pa.string())
            self._columns[key] = col
        return self._columns[key]

    def filtered(self, source: DatasetSource, params: dict[str, str]) -> pa.Array:
        """Index rows matching the filters, in dataset order."""
        index = source.index
        mask = pa.array([True] * index.num_rows, pa.bool_()) if index.num_rows else None
        if mask is None:
            return pa.array([], pa.int64())
        for name, column, _ in self.facets(source):
            value = params.get(name)
            if not value:
                continue
            col = self._column(source, index, column)
            if pa.types.is_list(col.type):
                hit = _list_contains(col, value)
            else:
                hit = pc.fill_null(pc.equal(col, value), False)
            mask = pc.and_(mask, hit)
        text = params.get("q", "").strip()
        if text:
            any_hit = None
            for column in ("id", "query", "final_answer", "gold", "target_id", "task_id"):
                if column not in index.column_names:
                    continue
                col = index.column(column).combine_chunks()
                hit = pc.fill_null(pc.match_substring(col, text, ignore_case=True), False)
                any_hit = hit if any_hit is None else pc.or_(any_hit, hit)
            if "reasons" in index.column_names:
                reasons = index.column("reasons").combine_chunks()
                joined = pc.binary_join(pc.fill_null(reasons, pa.scalar([], reasons.type)), " ")
                hit = pc.fill_null(pc.match_substring(joined, text, ignore_case=True), False)
                any_hit = hit if any_hit is None else pc.or_(any_hit, hit)
            if any_hit is not None:
                mask = pc.and_(mask, any_hit)
        return pc.indices_nonzero(mask)

    def facet_values(self, source: DatasetSource, column: str) -> list[str]:
        key = (source.slug, column)
        if key not in self._facets:
            col = self._column(source, source.index, column)
            if pa.types.is_list(col.type):
                col = pc.list_flatten(col)
            values = [v for v in pc.unique(pc.drop_null(col)).to_pylist() if v is not None]
            self._facets[key] = sorted(str(v) for v in values)[:200]
        return self._facets[key]

    def list_page(
        self,
        source: DatasetSource,
        page: int,
        params: dict[str, str],
        depth: int,
        crumbs: list[tuple[str, str]],
    ) -> Page:
        self._refresh(source)
        if page == 1 and not params and not source.index_ready and len(source.files) > 16:
            # The first page of a large dataset (over 16 chunks) shows at once, read from its
            # first chunks; counts, filters and later pages use the index, built in the
            # background from here on (started after this read, so the two do not compete).
            view = source.head(self.page_size)
            source.start_indexing()
            self._warm(source)
            total: int | None = None
            shown_total: int | None = None
            pages = 2 if view.num_rows >= self.page_size else 1
        else:
            index = source.index
            total = index.num_rows
            rows_at = self.filtered(source, params)
            shown_total = len(rows_at)
            pages = max(1, math.ceil(shown_total / self.page_size))
            if page > pages and shown_total:
                raise NotFound(f"{source.label} has {pages} pages with these filters, not {page}")
            start = (page - 1) * self.page_size
            if shown_total == total:  # no filter: the page is a slice
                view = index.slice(start, self.page_size)
            else:
                view = index.take(rows_at[start : start + self.page_size])
        header, rows = self._rows(source, view, depth)
        facets = [
            {
                "name": name,
                "label": label,
                "options": self.facet_values(source, column) if total is not None else [],
                "selected": params.get(name, ""),
            }
            for name, column, label in self.facets(source)
            if total is not None and (column != "_verdict" or self.catalog.verdicts_ready())
        ]
        return self._render(
            "list.html",
            depth,
            title=f"{source.label} ({PLURAL.get(source.kind, source.kind)})",
            crumbs=crumbs,
            source=source,
            total=total,
            shown_total=shown_total,
            header=header,
            rows=rows,
            facets=[f for f in facets if f["options"]],
            q=params.get("q", ""),
            page=page,
            pages=pages,
            page_url=self._page_url(source.slug, depth, params),
            has_state=source.state_path is not None,
        )

    def _rows(
        self, source: DatasetSource, view: pa.Table, depth: int
    ) -> tuple[list[str], list[list[dict[str, Any]]]]:
        data = view.to_pylist()
        url = lambda r: self.record_url(source.slug, r["id"], depth)  # noqa: E731
        if source.kind == "task":
            header = ["task", "family", "query", "files", "tools", "gold"]
            rows = [
                [
                    _cell(r["id"], url(r)),
                    _cell(r["source"]),
                    _cell(_short(r["query"])),
                    _cell(", ".join(m.split("/")[-1] for m in r["mimes"] or []) or "-"),
                    _cell(", ".join(r["tools"] or [])),
                    _cell(r["gold"], cls="gold"),
                ]
                for r in data
            ]
        elif source.kind == "trajectory":
            ids = pa.array([r["id"] for r in data], pa.string())
            if self.catalog.verdicts_ready():
                verdicts = self.catalog.verdict_status(ids)
            else:  # judged soon: the verdict datasets are still being indexed
                verdicts = pa.array(["indexing…"] * len(ids), pa.string())
            header = [
                "trajectory",
                "query",
                "status",
                "steps",
                "tools used",
                "errors",
                "final",
                "gold",
                "verdict",
            ]
            rows = []
            for r, verdict in zip(data, verdicts.to_pylist(), strict=True):
                errors = [e for e in r["errors"] or [] if e]
                rows.append(
                    [
                        _cell(r["id"], url(r)),
                        _cell(_short(r["query"], 110)),
                        _cell(r["status"], cls=f"status-{r['status']}"),
                        _cell(str(r["n_steps"]), cls="num"),
                        _cell(", ".join(t for t in r["used_tools"] or [] if t) or "-"),
                        _cell(", ".join(errors) or "-", cls="fail" if errors else None),
                        _cell(_short(r["final_answer"], 60), cls="answer"),
                        _cell(_short(r["gold"], 60), cls="gold"),
                        _cell(
                            verdict or "-",
                            cls={"passed": "pass", "failed": "fail"}.get(verdict or ""),
                        ),
                    ]
                )
        elif source.kind == "verdict":
            header = ["verdict", "target", "judge", "passed", "score", "reasons"]
            rows = []
            for r in data:
                hits = self.catalog.find(r["target_id"])
                target_url = (
                    self.record_url(hits[0][0].slug, r["target_id"], depth)
                    if hits and hits[0][0].kind != "verdict"
                    else None
                )
                rows.append(
                    [
                        _cell(r["id"], url(r)),
                        _cell(r["target_id"], target_url),
                        _cell(r["judge"]),
                        _cell(
                            "passed" if r["passed"] else "failed",
                            cls="pass" if r["passed"] else "fail",
                        ),
                        _cell("-" if r["score"] is None else f"{r['score']:.2f}", cls="num"),
                        _cell(_short("; ".join(r["reasons"] or []), 200)),
                    ]
                )
        elif source.kind == "pair":
            header = ["pair", "step", "query", "chosen", "rejected", "scores", "verifier"]
            rows = [
                [
                    _cell(r["id"], url(r)),
                    _cell(str(r["step_index"]), cls="num"),
                    _cell(_short(r["query"], 110)),
                    _cell(r["chosen_tool"] or "(answer or code)"),
                    _cell(
                        r["rejected_error"]
                        and f"{r['rejected_error']} error"
                        or r["rejected_tool"]
                        or "(answer or code)"
                    ),
                    _cell(f"{_num(r['chosen_score'])} vs {_num(r['rejected_score'])}"),
                    _cell(r["verifier"]),
                ]
                for r in data
            ]
        else:
            header = ["dialogue", "format", "query", "reflection", "task"]
            rows = [
                [
                    _cell(r["id"], url(r)),
                    _cell(str(r["format"]).upper()),
                    _cell(_short(r["query"], 120)),
                    _cell("reflected" if r["reflected"] else "-"),
                    _cell(r["task_id"]),
                ]
                for r in data
            ]
        return header, rows

    # -- records -----------------------------------------------------------------------
    def record_page(self, slug: str, key: str) -> Page:
        depth = 3
        source = self.source(slug)
        crumbs = [(source.label, f"../../../d/{slug}/index.html")]
        if source.kind == "error":
            return self._render(
                "problem.html", depth, 422, title=source.label, problem=source.error, crumbs=crumbs
            )
        if isinstance(source, RunSource):
            return self.item_page(source, key, crumbs)
        assert isinstance(source, DatasetSource)
        try:
            record = source.record(key)
            if record is None and source.refresh():  # written since the index was built
                self._forget(source.slug)
                record = source.record(key)
        except SourceError as exc:
            return self._render(
                "problem.html", depth, 422, title=source.label, problem=str(exc), crumbs=crumbs
            )
        if record is None:
            raise NotFound(f"{source.label} has no record {key!r}")
        ctx: dict[str, Any] = {
            "title": f"{source.kind} {record.id}",
            "crumbs": crumbs,
            "source": source,
            "record": record,
            "image_src": self.image_src(source, depth),
        }
        if isinstance(record, Task):
            ctx["documents"] = self.documents(source, record.files)
            ctx["related"] = self._related(record.id, exclude=source.slug, depth=depth)
            return self._render("task.html", depth, **ctx)
        if isinstance(record, Trajectory):
            return self._trajectory(source, record, ctx, depth)
        if isinstance(record, Verdict):
            hits = [h for h in self.catalog.find(record.target_id) if h[0].kind != "verdict"]
            ctx["target_url"] = (
                self.record_url(hits[0][0].slug, record.target_id, depth) if hits else None
            )
            return self._render("verdict.html", depth, **ctx)
        if isinstance(record, PreferencePair):
            ctx["documents"] = self.documents(source, record.task.files)
            tid = record.metadata.get("trajectory_id")
            ctx["trajectory_url"] = None
            ctx["explored"] = None
            ctx["pair_marks"] = {
                "chosen": record.metadata.get("chosen_candidate"),
                "rejected": record.metadata.get("rejected_candidate"),
            }
            if tid:
                for d in self.catalog.datasets("trajectory"):
                    pos = d.position(str(tid))
                    if pos is not None:
                        ctx["trajectory_url"] = (
                            self.record_url(d.slug, str(tid), depth) + f"#step-{record.step_index}"
                        )
                        (explored,) = d.records_at([pos])
                        if isinstance(explored, Trajectory):
                            # the explored trajectory's assets are its dataset's
                            ctx["explored"] = exploration_view(explored).get(record.step_index)
                            ctx["image_src"] = _either(
                                self.image_src(source, depth), self.image_src(d, depth)
                            )
                        break
            return self._render("pair.html", depth, **ctx)
        assert isinstance(record, Dialogue)
        ctx["verdicts"] = self._verdicts(record.id, depth)
        ctx["marks"] = dialogue_marks(record)
        ctx["operators"] = record.metadata.get("operator_calls") or record.metadata.get("operators")
        return self._render("dialogue.html", depth, **ctx)

    def _related(self, task_id: str, exclude: str, depth: int) -> list[dict[str, str]]:
        out = []
        for d in self.catalog.datasets():
            if d.slug == exclude or "task_id" not in d.index.column_names:
                continue
            mask = pc.fill_null(pc.equal(d.index.column("task_id"), task_id), False)
            ids = pc.filter(d.index.column("id"), mask).to_pylist()[:20]
            out += [
                {"url": self.record_url(d.slug, i, depth), "text": f"{d.label}: {d.kind} {i}"}
                for i in ids
            ]
        return out

    def _verdicts(self, target_id: str, depth: int) -> list[dict[str, Any]]:
        out = []
        for slug, row in self.catalog.verdicts_for([target_id]).get(target_id, []):
            vs = self.catalog.sources[slug]
            assert isinstance(vs, DatasetSource)
            (verdict,) = vs.records_at([row])
            out.append({"record": verdict, "url": self.record_url(slug, verdict.id, depth)})
        return out

    def _trajectory(
        self, source: DatasetSource, record: Trajectory, ctx: dict[str, Any], depth: int
    ) -> Page:
        key = safe_key(record.id)
        ctx["documents"] = self.documents(source, record.task.files)
        ctx["verdicts"] = self._verdicts(record.id, depth)
        ctx["dropped"] = self.catalog.drop_reasons().get(record.id)
        ctx["messages_url"] = lambda n: f"../m/{key}/{n}.html"
        ctx["exploration"] = exploration_view(record)
        ctx["metadata"] = {k: v for k, v in record.metadata.items() if k != "exploration"}
        return self._render("trajectory.html", depth, **ctx)

    def messages_page(self, slug: str, key: str, n: int) -> Page:
        from tracetune.agent.render import episode_messages
        from tracetune.formats.chat import steps_with_raw, system_prompt

        depth = 4
        source = self.dataset(slug)
        record = source.record(key)
        if not isinstance(record, Trajectory):
            raise NotFound(f"{source.label} has no trajectory {key!r}")
        if not 0 <= n < len(record.steps):
            raise NotFound(f"trajectory {record.id} has {len(record.steps)} steps, no step {n}")
        tools = record.tools or record.task.tools
        problem = None
        try:
            prompt = system_prompt(record.action_format, tools)
        except Exception as exc:  # a tool this install does not register
            prompt = "(system prompt not available)"
            problem = (
                f"The system prompt cannot be rebuilt here: {exc}. Install or import the "
                "module that registers these tools to see it."
            )
        try:
            steps = steps_with_raw(record.steps[:n], record.action_format)
        except Exception:
            steps = record.steps[:n]
        messages = episode_messages(prompt, record.task, steps, lambda ref: ref)
        return self._render(
            "messages.html",
            depth,
            title=f"step {n} of {record.id}: the messages the model saw",
            crumbs=[
                (source.label, f"../../../../d/{slug}/index.html"),
                (record.id, f"../../r/{key}.html#step-{n}"),
            ],
            messages=messages,
            n=n,
            output=record.steps[n].raw,
            back_url=f"../../r/{key}.html#step-{n}",
            prompt_problem=problem,
            image_src=self.image_src(source, depth),
        )

    # -- eval runs ---------------------------------------------------------------------
    def _score_name(self, run: RunSource) -> str:
        from tracetune.evaluate.results import HEADLINE_SCORE

        names = HEADLINE_SCORE.get(run.bench, ("accuracy",))
        for record in run.headline_records():
            for n in names:
                if record.scores.get(n) is not None:
                    return n
        return names[0]

    def _score(self, run: RunSource, record: EvalRecord) -> float | None:
        from tracetune.evaluate.results import HEADLINE_SCORE

        for n in HEADLINE_SCORE.get(run.bench, ("accuracy",)):
            value = record.scores.get(n)
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
        return None

    @staticmethod
    def _category(record: EvalRecord) -> str:
        m = record.metadata
        for key in ("family", "level", "answer_kind", "category", "query_type"):
            if m.get(key) is not None:
                return str(m[key])
        return "-"

    def _traj_url(self, run: RunSource, record: EvalRecord, depth: int) -> str | None:
        if not record.trajectory_id or not run.trajectories_slug:
            return None
        source = self.catalog.sources.get(run.trajectories_slug)
        if not isinstance(source, DatasetSource) or source.position(record.trajectory_id) is None:
            return None
        return self.record_url(source.slug, record.trajectory_id, depth)

    def run_page(
        self,
        run: RunSource,
        page: int,
        params: dict[str, str],
        depth: int,
        crumbs: list[tuple[str, str]],
    ) -> Page:
        from tracetune.evaluate.results import RunData, breakdowns

        reports = [
            (
                name,
                {
                    "n_items": rep.get("n_items"),
                    "metrics": [
                        (m, v) for m, v in rep.get("metrics", {}).items() if not isinstance(v, dict)
                    ],
                },
            )
            for name, rep in run.metrics.get("reports", {}).items()
        ]
        data = RunData(run.root, run.label, run.run, run.metrics, run.records)
        try:
            bds = [(name, list(values.items())) for name, values in breakdowns(data).items()]
        except Exception:  # a breakdown of an unusual run must not hide the run
            bds = []
        items = run.headline_records()
        rows = []
        for record in items:
            score = self._score(run, record)
            result = "unscored" if score is None else ("correct" if score >= 1.0 else "wrong")
            rows.append((record, score, result, self._category(record)))
        categories = sorted({r[3] for r in rows if r[3] != "-"})
        result = params.get("result", "")
        category = params.get("category", "")
        q = params.get("q", "").strip().lower()
        if result:
            rows = [r for r in rows if r[2] == result]
        if category:
            rows = [r for r in rows if r[3] == category]
        if q:
            rows = [
                r
                for r in rows
                if q in r[0].item_id.lower()
                or q in str(r[0].prediction or "").lower()
                or q in str(r[0].metadata.get("gold", "")).lower()
            ]
        pages = max(1, math.ceil(len(rows) / self.page_size))
        if page > pages and rows:
            raise NotFound(f"{run.label} has {pages} pages of items, not {page}")
        shown = rows[(page - 1) * self.page_size : page * self.page_size]
        view = [
            {
                "item": r.item_id,
                "url": self.record_url(run.slug, r.item_id, depth),
                "score": score,
                "cls": res,
                "category": cat,
                "prediction": _short(r.prediction, 80),
                "gold": _short(r.metadata.get("gold"), 80),
                "traj_id": r.trajectory_id,
                "traj_url": self._traj_url(run, r, depth),
            }
            for r, score, res, cat in shown
        ]
        compare_links = [
            {
                "url": f"{'../' * depth}compare/{c['a']}/{c['b']}.html",
                "label": c["b_label"] if c["a"] == run.slug else c["a_label"],
            }
            for c in self.compare_pairs()
            if run.slug in (c["a"], c["b"])
        ]
        traj_url = (
            f"{'../' * depth}d/{run.trajectories_slug}/index.html"
            if run.trajectories_slug
            else None
        )
        return self._render(
            "run.html",
            depth,
            title=f"eval run {run.label}",
            crumbs=crumbs,
            source=run,
            reports=reports,
            run_info=run.metrics.get("run"),
            breakdowns=bds,
            rows=view,
            total=len(items),
            shown_total=len(rows),
            categories=categories,
            result=result,
            category=category,
            q=params.get("q", ""),
            score_name=self._score_name(run),
            compare_links=compare_links,
            traj_url=traj_url,
            page=page,
            pages=pages,
            page_url=self._page_url(run.slug, depth, params),
        )

    def item_page(self, run: RunSource, key: str, crumbs: list[tuple[str, str]]) -> Page:
        depth = 3
        record = run.record(key)
        if record is None:
            raise NotFound(f"{run.label} has no scored item {key!r}")
        found = run_trajectories(self.catalog, run, record)
        trajectories = []
        for i, (source, t) in enumerate(found):
            turn = t.metadata.get("turn")
            trajectories.append(
                {
                    "record": t,
                    "source": source,
                    "label": f"turn {turn}" if turn is not None else "episode",
                    "url": self.record_url(source.slug, t.id, depth),
                    "first": i == 0,
                }
            )
        scores = [(k, v) for k, v in record.scores.items() if v is not None]
        return self._render(
            "item.html",
            depth,
            title=f"{record.benchmark} item {record.item_id}",
            crumbs=crumbs,
            source=run,
            record=record,
            scores=scores,
            gold=record.metadata.get("gold"),
            reasons=record.metadata.get("reasons") or [],
            trajectories=trajectories,
            image_src_for=lambda s: self.image_src(s, depth),
        )

    def compare_page(self, a_slug: str, b_slug: str) -> Page:
        depth = 2
        a, b = self.source(a_slug), self.source(b_slug)
        if not isinstance(a, RunSource) or not isinstance(b, RunSource):
            raise NotFound("compare takes two eval runs")
        score_name = self._score_name(a)
        a_items = {r.item_id: r for r in a.headline_records()}
        b_items = {r.item_id: r for r in b.headline_records()}
        rows = []
        counts = {"fixed": 0, "broken": 0, "changed": 0, "same": 0, "only": 0}
        unchanged = []
        for item in list(dict.fromkeys([*a_items, *b_items])):
            ra, rb = a_items.get(item), b_items.get(item)
            sa = self._score(a, ra) if ra else None
            sb = self._score(b, rb) if rb else None
            if ra is None or rb is None:
                change = "only in A" if rb is None else "only in B"
                counts["only"] += 1
            elif sa == sb and (ra.prediction or "") == (rb.prediction or ""):
                counts["same"] += 1
                unchanged.append(item)
                continue
            elif (sa or 0.0) < 1.0 <= (sb or 0.0) or (sb or 0.0) > (sa or 0.0):
                change = "fixed"
            elif (sb or 0.0) < 1.0 <= (sa or 0.0) or (sa or 0.0) > (sb or 0.0):
                change = "broken"
            else:
                change = "changed"
            if change in counts:
                counts[change] += 1
            either = ra if ra is not None else rb
            rows.append(
                {
                    "change": change,
                    "item": item,
                    "a_score": sa,
                    "b_score": sb,
                    "a_url": self.record_url(a.slug, item, depth) if ra else None,
                    "b_url": self.record_url(b.slug, item, depth) if rb else None,
                    "a_pred": _short(ra.prediction if ra else None, 60),
                    "b_pred": _short(rb.prediction if rb else None, 60),
                    "gold": _short(either.metadata.get("gold") if either else None, 60),
                }
            )
        order = {"fixed": 0, "broken": 1, "changed": 2}
        rows.sort(key=lambda r: (order.get(str(r["change"]), 3), str(r["item"])))
        return self._render(
            "compare.html",
            depth,
            title=f"{a.label} vs {b.label}",
            crumbs=[(a.label, f"../../d/{a.slug}/index.html")],
            a=a,
            b=b,
            rows=rows,
            counts=counts,
            unchanged=unchanged,
            score_name=score_name,
        )

    # -- run state ---------------------------------------------------------------------
    def state_page(self, slug: str) -> Page:
        depth = 2
        source = self.dataset(slug)
        state = source.state
        crumbs = [(source.label, f"../../d/{slug}/index.html")]
        if state is None:
            raise NotFound(f"{source.label} has no state.sqlite")
        try:
            stages = []
            for stage in state.stages():
                counts = state.counts(stage)
                reasons = []
                for status in ("dropped", "failed"):
                    if counts.get(status):
                        reasons.append(
                            (
                                status,
                                [
                                    {
                                        "why": why,
                                        "n": n,
                                        "url": self.reason_url(slug, stage, status, why, depth),
                                    }
                                    for why, n in state.reasons(stage, status)
                                ],
                            )
                        )
                stages.append(
                    {
                        "name": stage,
                        "counts": sorted(counts.items()),
                        "total": sum(counts.values()),
                        "reasons": reasons,
                    }
                )
            usage = state.usage()
        except SourceError as exc:
            return self._render(
                "problem.html", depth, 422, title=source.label, problem=str(exc), crumbs=crumbs
            )
        return self._render(
            "state.html",
            depth,
            title=f"run state of {source.label}",
            crumbs=crumbs,
            source=source,
            stages=stages,
            usage=usage,
        )

    @staticmethod
    def reason_slug(why: str) -> str:
        import hashlib

        return f"{slugify(why)[:50]}-{hashlib.sha1(why.encode()).hexdigest()[:8]}"

    def reason_url(self, slug: str, stage: str, status: str, why: str, depth: int) -> str:
        return (
            f"{'../' * depth}d/{slug}/state/{slugify(stage)}/{status}/{self.reason_slug(why)}.html"
        )

    def state_items_page(
        self, slug: str, stage_slug: str, status: str, reason_slug: str, page: int = 1
    ) -> Page:
        depth = 5 if page == 1 else 6
        source = self.dataset(slug)
        state = source.state
        if state is None or status not in ("dropped", "failed"):
            raise NotFound(f"{source.label} has no such run-state list")
        stage = next((s for s in state.stages() if slugify(s) == stage_slug), None)
        if stage is None:
            raise NotFound(f"{source.label} has no stage {stage_slug!r}")
        why = next(
            (w for w, _ in state.reasons(stage, status) if self.reason_slug(w) == reason_slug),
            None,
        )
        if why is None:
            raise NotFound(f"stage {stage} has no {status} items for that reason")
        total, found = state.items(stage, status, why, (page - 1) * self.page_size, self.page_size)
        items = []
        for key, info in found:
            links = [
                {
                    "url": self.record_url(s.slug, _id_at(s, pos), depth),
                    "text": f"{s.label}: {s.kind}",
                }
                for s, pos in self.catalog.find(key)
            ]
            summary = _short(info.get("error") or info.get("reason") or "info", 100)
            items.append({"key": key, "links": links, "info": info, "summary": summary})
        pages = max(1, math.ceil(total / self.page_size))
        base = f"{'../' * depth}d/{slug}/state/{stage_slug}/{status}/{reason_slug}"

        def page_url(n: int) -> str:
            return f"{base}.html" if n == 1 else f"{base}/{n}.html"

        return self._render(
            "state_items.html",
            depth,
            title=f"{stage}: {status} — {_short(why, 80)}",
            crumbs=[
                (source.label, f"{'../' * depth}d/{slug}/index.html"),
                ("run state", f"{'../' * depth}d/{slug}/state.html"),
            ],
            source=source,
            stage=stage,
            status=status,
            why=why,
            total=total,
            items=items,
            page=page,
            pages=pages,
            page_url=page_url,
        )


def _either(first: Any, second: Any) -> Any:
    """An image source trying ``first`` then ``second`` (two datasets' assets)."""

    def src(ref: FileRef) -> str | None:
        return first(ref) or second(ref)

    return src


def _num(value: Any) -> str:
    return "-" if value is None else f"{float(value):g}"


def _id_at(source: DatasetSource, pos: int) -> str:
    return str(source.index.column("id")[pos].as_py())


def _list_contains(col: pa.Array, value: str) -> pa.Array:
    """Per row of a list column: does its list hold ``value``."""
    flat = pc.list_flatten(col)
    parents = pc.list_parent_indices(col)
    hit_parents = pc.filter(parents, pc.fill_null(pc.equal(flat, value), False))
    return pc.is_in(
        pa.array(np.arange(len(col), dtype=np.int64)), value_set=hit_parents.cast(pa.int64())
    )


def exploration_view(record: Trajectory) -> dict[int, dict[str, Any]]:
    """Per explored step: every candidate with its rank, score and the verifier's reason."""
    out: dict[int, dict[str, Any]] = {}
    for entry in record.metadata.get("exploration") or []:
        if not isinstance(entry, dict):
            continue
        ranking = entry.get("ranking") or {}
        order = list(ranking.get("order") or [])
        scores = list(ranking.get("scores") or [])
        reasons = list(ranking.get("reasons") or [])
        candidates = []
        for i, c in enumerate(entry.get("candidates") or []):
            try:
                step = Step.model_validate(c.get("step") or {})
            except ValueError:
                continue
            a = step.action
            if step.error is not None:
                summary = f"{step.error.kind.value} error"
            elif a is not None and a.tool_call is not None:
                summary = a.tool_call.name
            elif a is not None:
                summary = a.type if a.type != "final_answer" else f"answer {a.answer!r}"
            else:
                summary = "-"
            candidates.append(
                {
                    "i": i,
                    "step": step,
                    "rank": order.index(i) + 1 if i in order else None,
                    "score": scores[i] if i < len(scores) else None,
                    "reason": reasons[i] if i < len(reasons) else "",
                    "temperature": c.get("temperature"),
                    "source": c.get("source") or "policy",
                    "chosen": i == entry.get("chosen"),
                    "summary": summary,
                }
            )
        candidates.sort(key=lambda c: (c["rank"] is None, c["rank"] or 0))
        out[int(entry.get("index", len(out)))] = {
            "candidates": candidates,
            "verifier": ranking.get("verifier", "?"),
            "fallback": ranking.get("fallback", False),
        }
    return out


def dialogue_marks(dialogue: Dialogue) -> list[str]:
    """A CSS class per message: reflection turns, and turns that carry RAG."""
    marks = []
    in_reflection = False
    for m in dialogue.messages:
        text = m.text
        cls = []
        if m.role == "assistant" and "<SIGNAL>reflection</SIGNAL>" in text.replace(" ", ""):
            in_reflection = True
            cls.append("reflection")
        elif in_reflection:
            cls.append("reflection")
            if m.role == "assistant":
                in_reflection = False
        if m.role != "system" and ("<RAG>" in text or '<result name="rag"' in text.lower()):
            cls.append("rag")
        marks.append(" ".join(cls))
    return marks
