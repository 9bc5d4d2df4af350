"""Prompt templates are data: Jinja files whose hash is recorded on what they produce."""

from __future__ import annotations

import hashlib
from functools import cache
from importlib import resources
from typing import Any

import jinja2

_ENV = jinja2.Environment(
    loader=jinja2.PackageLoader("tracetune", "prompts"),
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=False,
    undefined=jinja2.StrictUndefined,
    autoescape=False,
)


@cache
def template_source(name: str) -> str:
    return resources.files("tracetune.prompts").joinpath(name).read_text()


def prompt_hash(name: str) -> str:
    """Short hash of a template's source, recorded on every record it produced."""
    return hashlib.sha256(template_source(name).encode()).hexdigest()[:16]


def render(name: str, **context: Any) -> str:
    """Render the template ``name`` (a path under tracetune/prompts)."""
    return _ENV.get_template(name).render(**context).strip()
