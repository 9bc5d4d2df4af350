"""``tracetune view``: a read-only browser viewer for datasets, trajectories, pairs and runs."""

from tracetune.view.app import build_app
from tracetune.view.export import ExportResult, export_site
from tracetune.view.render import step_html
from tracetune.view.sources import Catalog, SourceError

__all__ = ["Catalog", "ExportResult", "SourceError", "build_app", "export_site", "step_html"]
