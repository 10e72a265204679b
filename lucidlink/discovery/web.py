"""
The operator's HTTP side of discovery: ``/metrics`` and ``/health``.

It listens on its own endpoint (``metrics_listen``), apart from the TLS port
and its connection cap, so it keeps answering while that port sheds load.
Both pages are made synchronously from memory: no threads, no waiting.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from twisted.web.resource import Resource
from twisted.web.server import Site


class MetricsPage(Resource):
    """The Prometheus text exposition of one registry."""

    isLeaf = True

    def __init__(self, registry: CollectorRegistry) -> None:
        super().__init__()
        self.registry = registry

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode("ascii"))
        return generate_latest(self.registry)


class HealthPage(Resource):
    """200 and a small JSON object (``status`` and counts) while the process runs."""

    isLeaf = True

    def __init__(self, health: Callable[[], dict[str, Any]]) -> None:
        super().__init__()
        self.health = health

    def render_GET(self, request: Any) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(self.health(), sort_keys=True).encode("utf-8") + b"\n"


class _QuietSite(Site):
    """A Site that writes no access log line per scrape."""

    def log(self, request: Any) -> None:
        pass


def status_site(registry: CollectorRegistry, health: Callable[[], dict[str, Any]]) -> Site:
    """The factory serving ``/metrics`` from ``registry`` and ``/health`` from ``health()``."""
    root = Resource()
    root.putChild(b"metrics", MetricsPage(registry))
    root.putChild(b"health", HealthPage(health))
    site = _QuietSite(root)
    site.noisy = False
    return site
