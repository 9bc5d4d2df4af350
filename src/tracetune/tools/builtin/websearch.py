"""Opt-in web search backends for the ``search`` tool: SearXNG, Serper, Google CSE, Brave.

Chosen with ``options['search']['backend']``. Keys come from environment variables (never
from configs, which get shared); a missing key is a ToolError that names the variable.
Override a variable name with ``options['search']['api_key_env']``, the SearXNG address with
``options['search']['base_url']`` (default ``$SEARXNG_URL``), and the timeout with
``timeout_s`` (default 20).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import httpx

from tracetune.tools.spec import ToolError

Hit = dict[str, Any]


def _env(options: dict[str, Any], default: str, what: str, backend: str) -> str:
    name = str(options.get("api_key_env") or default)
    value = os.environ.get(name, "").strip()
    if not value:
        raise ToolError(
            f"search backend {backend!r} needs {what} in the environment variable {name}; "
            f"export {name}=... (or set options['search']['api_key_env'] to the variable "
            "that holds it), or use the offline local corpus (backend 'local')"
        )
    return value


def _hits(items: list[dict[str, Any]], title: str, url: str, text: str, top_k: int) -> list[Hit]:
    return [
        {
            "title": str(item.get(title) or ""),
            "url": str(item.get(url) or ""),
            "source": str(item.get(url) or ""),
            "text": str(item.get(text) or ""),
        }
        for item in items[:top_k]
        if isinstance(item, dict)
    ]


def _searxng(client: httpx.Client, query: str, top_k: int, options: dict[str, Any]) -> list[Hit]:
    base = str(options.get("base_url") or os.environ.get("SEARXNG_URL", "")).rstrip("/")
    if not base:
        raise ToolError(
            "search backend 'searxng' needs the instance address: export SEARXNG_URL=http://... "
            "or set options['search']['base_url'] (the instance must allow format=json)"
        )
    response = client.get(f"{base}/search", params={"q": query, "format": "json"})
    response.raise_for_status()
    return _hits(response.json().get("results", []), "title", "url", "content", top_k)


def _serper(client: httpx.Client, query: str, top_k: int, options: dict[str, Any]) -> list[Hit]:
    key = _env(options, "SERPER_API_KEY", "an API key", "serper")
    response = client.post(
        "https://google.serper.dev/search",
        headers={"X-API-KEY": key, "Content-Type": "application/json"},
        json={"q": query, "num": top_k},
    )
    response.raise_for_status()
    return _hits(response.json().get("organic", []), "title", "link", "snippet", top_k)


def _google(client: httpx.Client, query: str, top_k: int, options: dict[str, Any]) -> list[Hit]:
    key = _env(options, "GOOGLE_API_KEY", "an API key", "google")
    engine = _env(
        {"api_key_env": options.get("cse_id_env")},
        "GOOGLE_CSE_ID",
        "a Programmable Search Engine id (cx)",
        "google",
    )
    response = client.get(
        "https://www.googleapis.com/customsearch/v1",
        params={"key": key, "cx": engine, "q": query, "num": min(top_k, 10)},
    )
    response.raise_for_status()
    return _hits(response.json().get("items", []), "title", "link", "snippet", top_k)


def _brave(client: httpx.Client, query: str, top_k: int, options: dict[str, Any]) -> list[Hit]:
    key = _env(options, "BRAVE_API_KEY", "an API key", "brave")
    response = client.get(
        "https://api.search.brave.com/res/v1/web/search",
        headers={"X-Subscription-Token": key, "Accept": "application/json"},
        params={"q": query, "count": min(top_k, 20)},
    )
    response.raise_for_status()
    return _hits(
        response.json().get("web", {}).get("results", []), "title", "url", "description", top_k
    )


BACKENDS: dict[str, Callable[[httpx.Client, str, int, dict[str, Any]], list[Hit]]] = {
    "searxng": _searxng,
    "serper": _serper,
    "google": _google,
    "brave": _brave,
}


def web_search(
    backend: str,
    query: str,
    top_k: int,
    options: dict[str, Any],
    transport: httpx.BaseTransport | None = None,
) -> list[Hit]:
    """Query one web backend and return ``[{title, url, source, text}]``."""
    if backend not in BACKENDS:
        raise ToolError(f"unknown search backend {backend!r}; choose local, {', '.join(BACKENDS)}")
    timeout = float(options.get("timeout_s", 20.0))
    try:
        with httpx.Client(timeout=timeout, transport=transport, follow_redirects=True) as client:
            return BACKENDS[backend](client, query, top_k, options)
    except httpx.HTTPStatusError as exc:
        body = exc.response.text[:200].replace("\n", " ")
        hint = " (check the API key)" if exc.response.status_code in (401, 403) else ""
        raise ToolError(
            f"search backend {backend!r} answered HTTP {exc.response.status_code}{hint}: {body}"
        ) from exc
    except httpx.HTTPError as exc:
        raise ToolError(f"search backend {backend!r} could not be reached: {exc!r}") from exc
    except ValueError as exc:  # a non-JSON body
        raise ToolError(f"search backend {backend!r} returned a body that is not JSON") from exc
