"""
``twistd lucid-discovery`` assembled from a configuration file and run on
loopback with the real reactor: a TLS client resolves, the accept gate
leaves connections over its limits in the listen backlog, and /metrics and
/health answer throughout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import treq
from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import TestCase

from lucidlink import errors
from lucidlink.discovery.tap import DiscoveryService, Options, makeService
from lucidlink.protocol.messages import Resolve, Resolved, ServerStatus
from lucidlink.protocol.network import connect_tls
from tests.discovery_fixtures import DISCOVERY_IDENTITY, write_config


class Raw(Protocol):
    """A plain TCP client that notes what it receives and when it is closed."""

    def __init__(self) -> None:
        self.received = b""
        self.ended: defer.Deferred[None] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Any = None) -> None:
        self.ended.callback(None)


class DiscoveryTapTests(TestCase):
    """The service tree from a config file, on loopback."""

    timeout = 20

    @defer.inlineCallbacks
    def start(self, **overrides: Any) -> Any:
        self.directory = Path(self.mktemp())
        options = Options()
        options.parseOptions(["--config", str(write_config(self.directory, **overrides))])
        service = makeService(options)
        self.assertIsInstance(service, DiscoveryService)
        service.startService()
        self.addCleanup(service.stopService)
        self.service = service
        port = yield service.listeners[0].when_listening()
        self.address = f"tcp:127.0.0.1:{port.getHost().port}"
        self.port_number = port.getHost().port
        if service.status_listener is not None:
            status_port = yield service.status_listener.when_listening()
            self.status_url = f"http://127.0.0.1:{status_port.getHost().port}"
        return service

    @defer.inlineCallbacks
    def connect(self) -> Any:
        connection = yield connect_tls(
            reactor, self.address, self.directory / "ca" / "ca.pem", DISCOVERY_IDENTITY, keepalive_interval=0
        )
        self.addCleanup(connection.close, "test over")
        return connection

    @defer.inlineCallbacks
    def get(self, path: str) -> Any:
        response = yield treq.get(self.status_url + path, persistent=False)
        body = yield treq.content(response)
        return response.code, response.headers, body

    @defer.inlineCallbacks
    def test_resolves_static_filespace_over_tls(self) -> Any:
        """A real TLS client resolves a statically mapped filespace; an unknown name is UnknownFilespace."""
        yield self.start()
        connection = yield self.connect()
        self.assertEqual(connection.welcome.status, ServerStatus.SERVING)
        answer = yield connection.request(Resolve("static-fs"))
        self.assertEqual(
            answer, Resolved("static-fs", ["tcp:127.0.0.1:7999"], "meta.static-fs.lucid", 120_000, ServerStatus.SERVING)
        )
        with self.assertRaises(errors.UnknownFilespace):
            yield connection.request(Resolve("nobody"))

    @defer.inlineCallbacks
    def test_health_and_metrics(self) -> Any:
        """/health says serving with counts; /metrics shows the requests made."""
        yield self.start()
        connection = yield self.connect()
        yield connection.request(Resolve("static-fs"))
        code, headers, body = yield self.get("/health")
        self.assertEqual(code, 200)
        self.assertEqual(headers.getRawHeaders(b"content-type"), [b"application/json"])
        health = json.loads(body)
        self.assertEqual(health["status"], "serving")
        self.assertEqual(health["connections"], 1)
        self.assertEqual(health["static_entries"], 1)
        self.assertEqual(health["registry_entries"], 0)
        code, _, body = yield self.get("/metrics")
        self.assertEqual(code, 200)
        self.assertIn(b'lucid_discovery_requests_total{outcome="ok",type="resolve"} 1.0', body)
        self.assertIn(b"lucid_discovery_connections 1.0", body)
        self.assertIn(b"lucid_discovery_request_seconds_bucket", body)

    @defer.inlineCallbacks
    def test_gate_keeps_connections_waiting_in_the_backlog(self) -> Any:
        """At max_handshakes a new connection is not accepted (nor closed): it is served once the slot frees."""
        yield self.start(max_handshakes="1")
        raw = Raw()
        yield connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", self.port_number), raw)
        while self.service.gate.handshakes < 1:  # accepted, says no Hello: holds the one slot
            yield task.deferLater(reactor, 0.01, lambda: None)
        connecting = self.connect()
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(connecting.called)
        self.assertEqual(self.service.gate.connections, 1)  # the second one waits in the kernel, unaccepted
        code, _, body = yield self.get("/health")
        self.assertEqual(code, 200)
        health = json.loads(body)
        self.assertEqual((health["handshakes"], health["accepting"]), (1, False))
        self.assertEqual(self.service.metrics.value("lucid_discovery_accept_pauses_total"), 1)
        raw.transport.loseConnection()
        connection = yield connecting
        answer = yield connection.request(Resolve("static-fs"))
        self.assertEqual(answer.filespace, "static-fs")
        self.assertEqual(raw.received, b"")
        self.assertEqual(self.service.gate.handshakes, 0)
        self.assertFalse(self.service.gate.paused)

    @defer.inlineCallbacks
    def test_idle_connection_closed(self) -> Any:
        """A connection that asks nothing for idle_timeout is closed with a goodbye."""
        yield self.start(idle_timeout="0.2", heartbeat_interval="0.1")
        connection = yield self.connect()
        reason = yield connection.when_lost()
        self.assertIn("idle for 0.2 s", str(reason))

    @defer.inlineCallbacks
    def test_stop_says_goodbye(self) -> Any:
        """Stopping the service closes open connections with a reason."""
        service = yield self.start(metrics_listen="")
        self.assertIsNone(service.status_listener)
        connection = yield self.connect()
        yield service.stopService()
        reason = yield connection.when_lost()
        self.assertIn("discovery is shutting down", str(reason))

    @defer.inlineCallbacks
    def test_port_in_use_fails_at_start(self) -> Any:
        """A listen endpoint already in use stops the start with the endpoint named."""
        taken = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(Factory.forProtocol(Protocol))
        self.addCleanup(taken.stopListening)
        description = f"tcp:{taken.getHost().port}:interface=127.0.0.1"
        options = Options()
        options.parseOptions(["--config", str(write_config(Path(self.mktemp()), listen=description, metrics_listen=""))])
        service = makeService(options)
        with self.assertRaises(errors.Unavailable) as caught:
            service.privilegedStartService()
        self.assertIn(description, str(caught.exception))
        self.flushLoggedErrors()
