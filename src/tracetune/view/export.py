"""``tracetune view DIR... --export OUT``: the viewer's pages written as a static site."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from tracetune.errors import ConfigError
from tracetune.view.render import css
from tracetune.view.site import NotFound, Page, Site
from tracetune.view.sources import Catalog, DatasetSource, RunSource, safe_key, slugify


@dataclass
class ExportResult:
    out: Path
    pages: int
    assets: int
    problems: list[str]


def export_site(dirs: list[Path], out: Path, page_size: int = 50) -> ExportResult:
    """Write every page (lists, records, step messages, runs, comparisons, run state) and
    the assets they show under ``out``; open ``out/index.html`` in a browser."""
    out = Path(out)
    catalog = Catalog([Path(d) for d in dirs])
    roots = [Path(d).resolve() for d in dirs] + [s.root.resolve() for s in catalog.sources.values()]
    for resolved in roots:
        if out.resolve() == resolved or resolved in out.resolve().parents:
            raise ConfigError(
                f"--export {out} is inside {resolved}: the viewer never writes into a "
                "dataset; choose a folder outside it"
            )
    site = Site(catalog, static=True, page_size=page_size)
    result = ExportResult(out, 0, 0, [])

    def write(rel: str, make: object) -> None:
        try:
            page: Page = make()  # type: ignore[operator]
        except NotFound as exc:
            result.problems.append(f"{rel}: {exc}")
            return
        target = out / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(page.html, encoding="utf-8")
        result.pages += 1

    try:
        (out / "static").mkdir(parents=True, exist_ok=True)
        (out / "static" / "view.css").write_text(css(), encoding="utf-8")
        write("index.html", site.home)
        for slug, source in catalog.sources.items():
            write(f"d/{slug}/index.html", lambda s=slug: site.source_page(s, 1))
            if isinstance(source, DatasetSource):
                _export_dataset(site, source, write, page_size)
                result.assets += _copy_assets(source, out / "d" / slug / "assets")
            elif isinstance(source, RunSource):
                items = source.headline_records()
                for n in range(2, (len(items) + page_size - 1) // page_size + 1):
                    write(f"d/{slug}/page/{n}.html", lambda s=slug, n=n: site.source_page(s, n))
                for record in items:
                    key = safe_key(record.item_id)
                    write(f"d/{slug}/r/{key}.html", lambda s=slug, k=key: site.record_page(s, k))
        for pair in site.compare_pairs():
            a, b = pair["a"], pair["b"]
            write(f"compare/{a}/{b}.html", lambda a=a, b=b: site.compare_page(a, b))
    finally:
        catalog.close()
    return result


def _export_dataset(site: Site, source: DatasetSource, write: object, page_size: int) -> None:
    emit = write  # a callable(rel, make)
    slug = source.slug
    n = len(source)
    for page in range(2, (n + page_size - 1) // page_size + 1):
        emit(f"d/{slug}/page/{page}.html", lambda p=page: site.source_page(slug, p))  # type: ignore[operator]
    ids = source.index.column("id").to_pylist()
    steps = (
        source.index.column("n_steps").to_pylist() if "n_steps" in source.index.column_names else []
    )
    for i, record_id in enumerate(ids):
        key = safe_key(str(record_id))
        emit(f"d/{slug}/r/{key}.html", lambda k=key: site.record_page(slug, k))  # type: ignore[operator]
        for s in range(steps[i] if steps else 0):
            emit(  # type: ignore[operator]
                f"d/{slug}/m/{key}/{s}.html", lambda k=key, s=s: site.messages_page(slug, k, s)
            )
    state = source.state
    if state is None:
        return
    emit(f"d/{slug}/state.html", lambda: site.state_page(slug))  # type: ignore[operator]
    for stage in state.stages():
        for status in ("dropped", "failed"):
            for why, count in state.reasons(stage, status):
                base = f"d/{slug}/state/{slugify(stage)}/{status}/{site.reason_slug(why)}"
                for page in range(1, (count + page_size - 1) // page_size + 1):
                    rel = f"{base}.html" if page == 1 else f"{base}/{page}.html"
                    emit(  # type: ignore[operator]
                        rel,
                        lambda st=stage, s=status, w=why, p=page: site.state_items_page(
                            slug, slugify(st), s, site.reason_slug(w), p
                        ),
                    )


def _copy_assets(source: DatasetSource, target: Path) -> int:
    """Copy a dataset's assets beside its pages (copies, not links: editing the export
    must never change the dataset); returns how many files."""
    assets = source.root / "assets"
    if not assets.is_dir():
        return 0
    count = 0
    for path in assets.rglob("*"):
        if not path.is_file() or path.name.startswith("."):
            continue
        dest = target / path.relative_to(assets)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if not dest.exists():
            shutil.copyfile(path, dest)
        count += 1
    return count
