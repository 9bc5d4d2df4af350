"""The FastAPI app behind ``tracetune view``: read-only routes over :class:`Site`'s pages."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, HTMLResponse, PlainTextResponse, RedirectResponse

from tracetune.view.render import css
from tracetune.view.site import NotFound, Page, Site
from tracetune.view.sources import Catalog, DatasetSource, SourceError, default_cache_dir

ASSET_NAME = re.compile(r"^[0-9a-f]{64}(\.[A-Za-z0-9]{1,10})?$")


def build_app(
    dirs: list[Path], page_size: int = 50, cache_dir: Path | None | Literal["default"] = "default"
) -> FastAPI:
    """An app that shows every dataset and eval run found under ``dirs``.

    ``cache_dir`` keeps the list indexes of large datasets between runs (default:
    ``$TRACETUNE_VIEW_CACHE`` or ``~/.cache/tracetune/view``; None: no cache).
    """
    # pyarrow imports pandas (~0.6 s) on its first Python-to-Arrow conversion: pay it at
    # start-up, not on the first page someone opens.
    pa.array([0])
    cache = default_cache_dir() if cache_dir == "default" else cache_dir
    catalog = Catalog([Path(d) for d in dirs], cache_dir=cache)
    site = Site(catalog, static=False, page_size=page_size)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        catalog.close()

    app = FastAPI(
        title="tracetune view",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        lifespan=lifespan,
    )
    app.state.site = site

    @app.middleware("http")
    async def no_scripts(request: Request, call_next: Any) -> Any:
        # The pages use no JavaScript; files from a dataset (an .html or .svg attachment)
        # must not run any in the viewer's origin either.
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; script-src 'none'; object-src 'none'; "
            "img-src 'self' data:; style-src 'self'; frame-ancestors 'none'"
        )
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    def respond(make: Callable[[], Page], depth: int) -> HTMLResponse:
        try:
            page = make()
        except NotFound as exc:
            page = site.problem("Not found", str(exc), depth, 404)
        except SourceError as exc:
            page = site.problem("Cannot read this", str(exc), depth, 422)
        except FileNotFoundError as exc:
            page = site.problem("Missing file", str(exc), depth, 422)
        return HTMLResponse(page.html, status_code=page.status)

    def params(request: Request) -> dict[str, str]:
        return {k: v for k, v in request.query_params.items() if k != "page"}

    @app.get("/", include_in_schema=False)
    def root() -> RedirectResponse:
        return RedirectResponse("/index.html")

    @app.get("/index.html", response_class=HTMLResponse)
    def home() -> HTMLResponse:
        return respond(site.home, 0)

    @app.get("/static/view.css")
    def stylesheet() -> PlainTextResponse:
        return PlainTextResponse(css(), media_type="text/css")

    @app.get("/d/{slug}/index.html", response_class=HTMLResponse)
    def source(slug: str, request: Request) -> HTMLResponse:
        return respond(lambda: site.source_page(slug, 1, params(request)), 2)

    @app.get("/d/{slug}/", include_in_schema=False)
    def source_dir(slug: str) -> RedirectResponse:
        return RedirectResponse(f"/d/{slug}/index.html")

    @app.get("/d/{slug}/page/{n}.html", response_class=HTMLResponse)
    def source_paged(slug: str, n: int, request: Request) -> HTMLResponse:
        return respond(lambda: site.source_page(slug, max(1, n), params(request)), 3)

    @app.get("/d/{slug}/r/{key}.html", response_class=HTMLResponse)
    def record(slug: str, key: str) -> HTMLResponse:
        return respond(lambda: site.record_page(slug, key), 3)

    @app.get("/d/{slug}/m/{key}/{n}.html", response_class=HTMLResponse)
    def messages(slug: str, key: str, n: int) -> HTMLResponse:
        return respond(lambda: site.messages_page(slug, key, n), 4)

    @app.get("/d/{slug}/state.html", response_class=HTMLResponse)
    def state(slug: str) -> HTMLResponse:
        return respond(lambda: site.state_page(slug), 2)

    @app.get("/d/{slug}/state/{stage}/{status}/{reason}.html", response_class=HTMLResponse)
    def state_items(slug: str, stage: str, status: str, reason: str) -> HTMLResponse:
        return respond(lambda: site.state_items_page(slug, stage, status, reason), 5)

    @app.get("/d/{slug}/state/{stage}/{status}/{reason}/{n}.html", response_class=HTMLResponse)
    def state_items_paged(slug: str, stage: str, status: str, reason: str, n: int) -> HTMLResponse:
        return respond(lambda: site.state_items_page(slug, stage, status, reason, max(1, n)), 6)

    @app.get("/compare/{a}/{b}.html", response_class=HTMLResponse)
    def compare(a: str, b: str) -> HTMLResponse:
        return respond(lambda: site.compare_page(a, b), 2)

    @app.get("/d/{slug}/assets/{prefix}/{name}", response_model=None)
    def asset(slug: str, prefix: str, name: str) -> FileResponse | HTMLResponse:
        source = catalog.sources.get(slug)
        if not isinstance(source, DatasetSource) or not ASSET_NAME.match(name):
            return respond(lambda: _raise(NotFound(f"no asset {name!r} in {slug!r}")), 4)
        if prefix != name[:2]:
            return respond(lambda: _raise(NotFound(f"no asset {prefix}/{name}")), 4)
        path = source.root / "assets" / prefix / name
        if not path.is_file():
            return respond(
                lambda: _raise(
                    NotFound(
                        f"asset {name} is missing from {source.root / 'assets'}; was the "
                        "dataset copied without its assets/ folder?"
                    )
                ),
                4,
            )
        return FileResponse(path)

    return app


def _raise(exc: Exception) -> Page:
    raise exc
