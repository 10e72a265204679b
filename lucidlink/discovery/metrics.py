"""
What discovery counts, as Prometheus metrics in a registry of its own.

Each :class:`DiscoveryMetrics` owns a ``CollectorRegistry`` (never the
global one), so several instances can live in one process, as in tests.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from lucidlink.discovery import auth, shedding

REQUEST_TYPES = ("register", "heartbeat", "resolve")
OUTCOMES = ("ok", "busy", "unknown_filespace", "refused", "invalid", "full", "error")
LATENCY_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)


class DiscoveryMetrics:
    """Requests by type and outcome, sheds, auth failures, latency, registry size, connections."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.requests = Counter(
            "lucid_discovery_requests", "Requests answered, by type and outcome.",
            ["type", "outcome"], registry=self.registry,
        )
        self.shed = Counter(
            "lucid_discovery_shed", "Requests and connections refused for load, by reason.",
            ["reason"], registry=self.registry,
        )
        self.auth_failures = Counter(
            "lucid_discovery_auth_failures", "Registrations refused by authentication, by reason.",
            ["reason"], registry=self.registry,
        )
        self.latency = Histogram(
            "lucid_discovery_request_seconds", "Time to answer a request, by type.",
            ["type"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.registry_entries = Gauge(
            "lucid_discovery_registry_entries", "Live and not yet swept registrations.", registry=self.registry,
        )
        self.connections = Gauge(
            "lucid_discovery_connections", "Client and server connections open.", registry=self.registry,
        )
        self.handshakes = Gauge(
            "lucid_discovery_handshakes", "Connections accepted whose TLS and Hello are not done yet.",
            registry=self.registry,
        )
        self.accept_pauses = Counter(
            "lucid_discovery_accept_pauses",
            "Times the listeners stopped accepting (at max_handshakes or max_connections), leaving"
            " new connections in the listen backlog.",
            registry=self.registry,
        )
        # Every label combination exists from the start (so a rate query sees
        # zeros, not gaps), and the hot path finds its child in a dict.
        self._requests = {(t, o): self.requests.labels(t, o) for t in REQUEST_TYPES for o in OUTCOMES}
        self._latency = {t: self.latency.labels(t) for t in REQUEST_TYPES}
        self._shed = {r: self.shed.labels(r) for r in (shedding.SOURCE_RATE, shedding.IN_FLIGHT, shedding.CONNECTIONS)}
        for reason in auth.REASONS:
            self.auth_failures.labels(reason)

    def watch(
        self,
        registry_size: Callable[[], int],
        connections: Callable[[], int],
        handshakes: Callable[[], int] | None = None,
    ) -> None:
        """Read the registry size and the connection and handshake counts whenever metrics are collected."""
        self.registry_entries.set_function(registry_size)
        self.connections.set_function(connections)
        if handshakes is not None:
            self.handshakes.set_function(handshakes)

    def accept_paused(self) -> None:
        """Count one pause of the listeners."""
        self.accept_pauses.inc()

    def request_done(self, request_type: str, outcome: str, seconds: float) -> None:
        """Count one answered request."""
        self._requests[request_type, outcome].inc()
        self._latency[request_type].observe(seconds)

    def shed_one(self, reason: str) -> None:
        """Count one request or connection shed for ``reason``."""
        self._shed[reason].inc()

    def auth_failed(self, reason: str) -> None:
        """Count one registration refused for ``reason``."""
        self.auth_failures.labels(reason).inc()

    def value(self, name: str, **labels: str) -> float:
        """A sample's current value (0 if absent): for tests and the health page."""
        return self.registry.get_sample_value(name, labels) or 0.0
