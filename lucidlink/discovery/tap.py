"""
``twistd lucid-discovery``: the options and the service tree.

:func:`makeService` reads the configuration (:mod:`lucidlink.discovery.config`)
and returns a :class:`DiscoveryService`, a ``MultiService`` of:

- one TLS listener per ``listen`` endpoint, behind the accept gate (it
  wraps the TLS factory and stops the listeners from accepting at
  ``max_handshakes`` or ``max_connections``, so the kernel's backlog holds
  the rest rather than discovery sharing one core among them all);
- the registry sweeper (a ``TimerService``);
- the ``/metrics`` and ``/health`` site on ``metrics_listen``, if set.
"""

from __future__ import annotations

import math
from typing import Any

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python import usage

from lucidlink.discovery.auth import RegistrationVerifier
from lucidlink.discovery.config import DiscoveryConfig, load_config, with_backlog
from lucidlink.discovery.metrics import DiscoveryMetrics
from lucidlink.discovery.registry import Registry
from lucidlink.discovery.service import DiscoveryResponder
from lucidlink.discovery.shedding import AcceptGate, InFlightLimit, SourceBuckets
from lucidlink.discovery.web import status_site
from lucidlink.listening import EndpointListener, ListenOption
from lucidlink.protocol.connection import ServerConnection, ServerFactory
from lucidlink.tls import server_tls_options

MAX_NONCE_CACHE = 1_000_000


class Options(ListenOption, usage.Options):
    """``twistd lucid-discovery --config PATH [--listen ENDPOINT]...``"""

    synopsis = "--config PATH [--listen ENDPOINT]..."
    longdesc = (
        "Answer which metadata server serves a filespace, from the registrations and "
        "heartbeats of metadata servers and an optional static map."
    )
    optParameters = [["config", "c", None, "The configuration file (see etc/lucid-discovery.ini)."]]

    def postOptions(self) -> None:
        if not self["config"]:
            raise usage.UsageError("--config PATH is required")
        self["discovery"] = load_config(self["config"], self["listen"])


def makeService(options: Any) -> DiscoveryService:
    """The discovery service tree for parsed ``options``."""
    from twisted.internet import reactor

    config = options.get("discovery") or load_config(options["config"], options.get("listen", ()))
    return DiscoveryService(config, reactor)


class DiscoveryService(MultiService):
    """Discovery assembled from a :class:`~lucidlink.discovery.config.DiscoveryConfig`.

    The parts are attributes (``registry``, ``responder``, ``metrics``,
    ``gate``, ``listeners``, ``status_listener``), so tests and
    operators' tools can look inside.
    """

    def __init__(self, config: DiscoveryConfig, reactor: Any, *, metrics: DiscoveryMetrics | None = None) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.metrics = metrics if metrics is not None else DiscoveryMetrics()
        self.registry = Registry(reactor, entry_ttl=config.entry_ttl, max_entries=config.max_entries)
        # One nonce per entry per heartbeat, kept twice the skew: enough for a
        # full registry, within a fixed bound (a full cache refuses, never forgets).
        heartbeats_kept = math.ceil(2 * config.max_clock_skew / config.heartbeat_interval) + 1
        self.verifier = RegistrationVerifier(
            config.keyring, reactor, max_skew=config.max_clock_skew,
            nonce_cache_size=min(MAX_NONCE_CACHE, config.max_entries * heartbeats_kept),
            on_refused=self.metrics.auth_failed,
        )
        self.responder = DiscoveryResponder(
            self.registry, self.verifier,
            heartbeat_interval=config.heartbeat_interval,
            static_map=config.static_map,
            buckets=SourceBuckets(
                reactor, rate=config.per_source_rate, burst=config.per_source_burst, max_sources=config.max_sources
            ),
            in_flight=InFlightLimit(config.max_in_flight),
            metrics=self.metrics,
            handshaken=lambda connection: self.gate.handshake_done(connection),
        )
        protocol_factory = ServerFactory(
            self.responder, reactor,
            keepalive_interval=0,  # idle clients are closed, not pinged
            handshake_timeout=config.handshake_timeout,
            idle_timeout=config.idle_timeout,
        )
        tls_factory = TLSMemoryBIOFactory(server_tls_options(config.certificate, config.private_key), False, protocol_factory)
        self.gate = AcceptGate(
            tls_factory, max_connections=config.max_connections, max_handshakes=config.max_handshakes,
            on_pause=self.metrics.accept_paused,
        )
        self.metrics.watch(lambda: len(self.registry), lambda: self.gate.connections, lambda: self.gate.handshakes)

        self.listeners = [
            EndpointListener(serverFromString(reactor, with_backlog(description)), self.gate, description)
            for description in config.listen
        ]
        for listener in self.listeners:
            listener.setServiceParent(self)
            listener.when_listening().addCallbacks(self.gate.add_port, lambda _: None)
        sweeper = TimerService(config.heartbeat_interval, self.registry.sweep)
        sweeper.clock = reactor
        sweeper.setServiceParent(self)
        self.status_listener: EndpointListener | None = None
        if config.metrics_listen:
            site = status_site(self.metrics.registry, self.health)
            self.status_listener = EndpointListener(
                serverFromString(reactor, config.metrics_listen), site, config.metrics_listen
            )
            self.status_listener.setServiceParent(self)

    def stopService(self) -> defer.Deferred[Any]:
        """Stop listening, then say goodbye to every open connection and wait for them to close."""
        for listener in self.listeners:
            if listener.port is not None:
                self.gate.remove_port(listener.port)
        stopped = super().stopService()
        closing = [connection.close("discovery is shutting down") for connection in self.open_connections()]
        return defer.gatherResults([stopped, *closing], consumeErrors=True)

    def open_connections(self) -> list[ServerConnection]:
        """The protocol connections behind the gate (and inside TLS) now open."""
        connections = []
        for wrapper in list(self.gate.protocols):
            connection = getattr(wrapper.wrappedProtocol, "wrappedProtocol", None)
            if isinstance(connection, ServerConnection):
                connections.append(connection)
        return connections

    def health(self) -> dict[str, Any]:
        """What ``/health`` says."""
        return {
            "status": "serving",
            "registry_entries": len(self.registry),
            "static_entries": len(self.config.static_map),
            "connections": self.gate.connections,
            "max_connections": self.gate.max_connections,
            "handshakes": self.gate.handshakes,
            "max_handshakes": self.gate.max_handshakes,
            "accepting": not self.gate.paused,
        }
