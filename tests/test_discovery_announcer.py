"""
The metadata server's announcer against a real discovery on loopback:
it registers, heartbeats, announces a status change at once, is seen by a
resolving client, and its entry expires once it stops.  Short TTLs keep
each test well under a few seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import TestCase

from lucidlink import errors
from lucidlink.discovery.announcer import Announcer
from lucidlink.discovery.config import load_config
from lucidlink.discovery.tap import DiscoveryService
from lucidlink.protocol.messages import Resolve, ServerStatus
from lucidlink.protocol.network import connect_tls
from tests.discovery_fixtures import DISCOVERY_IDENTITY, KEY_ID, SECRET, write_config


def sleep(seconds: float) -> defer.Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


class AnnouncerTests(TestCase):
    """An announcer and a discovery instance on loopback."""

    timeout = 20

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.directory = Path(self.mktemp())
        config = load_config(write_config(
            self.directory, entry_ttl="0.6", heartbeat_interval="0.1", metrics_listen="",
        ))
        self.discovery = DiscoveryService(config, reactor)
        self.discovery.startService()
        self.addCleanup(self.discovery.stopService)
        port = yield self.discovery.listeners[0].when_listening()
        self.address = f"tcp:127.0.0.1:{port.getHost().port}"
        self.ca_file = self.directory / "ca" / "ca.pem"
        self.status = ServerStatus.SERVING
        self.log_events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.log_events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.log_events.append)

    def announcer(self, secret: bytes = SECRET, **options: Any) -> Announcer:
        announcer = Announcer(
            reactor, [self.address], self.ca_file, DISCOVERY_IDENTITY, KEY_ID, secret,
            filespace="media", server_id="meta-1", endpoints=["tcp:127.0.0.1:7001"],
            identity="meta.media.lucid", status=lambda: self.status, **options,
        )
        announcer.start()
        self.addCleanup(announcer.stop)
        return announcer

    @defer.inlineCallbacks
    def resolve(self, filespace: str = "media") -> Any:
        connection = yield connect_tls(reactor, self.address, self.ca_file, DISCOVERY_IDENTITY, keepalive_interval=0)
        try:
            answer = yield connection.request(Resolve(filespace))
        finally:
            yield connection.close("done")
        return answer

    @defer.inlineCallbacks
    def wait_for(self, condition: Any, limit: float = 3.0) -> Any:
        waited = 0.0
        while not condition():
            if waited >= limit:
                self.fail("condition not met in time")
            yield sleep(0.02)
            waited += 0.02

    def count(self, request_type: str, outcome: str = "ok") -> float:
        return self.discovery.metrics.value("lucid_discovery_requests_total", type=request_type, outcome=outcome)

    @defer.inlineCallbacks
    def test_registers_heartbeats_and_expires(self) -> Any:
        """Registered and heartbeating, it resolves; stopped, the entry expires."""
        announcer = self.announcer()
        yield self.wait_for(lambda: announcer.registered_with == [self.address])
        answer = yield self.resolve()
        self.assertEqual((answer.endpoints, answer.identity, answer.status),
                         (["tcp:127.0.0.1:7001"], "meta.media.lucid", ServerStatus.SERVING))
        self.assertEqual(self.count("register"), 1)
        yield self.wait_for(lambda: self.count("heartbeat") >= 3)
        # The interval comes from discovery's answer (0.1 s), not the announcer's default (5 s).
        yield announcer.stop()
        yield sleep(0.7)
        with self.assertRaises(errors.UnknownFilespace):
            yield self.resolve()

    @defer.inlineCallbacks
    def test_announce_now(self) -> Any:
        """A status change announced now is what the next resolve says."""
        announcer = self.announcer(heartbeat_interval=5.0)
        yield self.wait_for(lambda: announcer.registered_with == [self.address])
        self.status = ServerStatus.RESTORING
        yield announcer.announce_now()
        answer = yield self.resolve()
        self.assertEqual(answer.status, ServerStatus.RESTORING)

    @defer.inlineCallbacks
    def test_wrong_secret_backs_off_and_logs_less_and_less(self) -> Any:
        """A refused registration is retried with backoff, and logged on the 1st, 2nd, 4th... failure."""
        announcer = self.announcer(secret=b"\x01" * 32, retry_initial=0.02, retry_max=0.05)
        link = announcer.links[0]
        yield self.wait_for(lambda: link.failures >= 5)
        self.assertEqual(announcer.registered_with, [])
        warnings = [e for e in self.log_events if "cannot register" in e.get("log_format", "")]
        self.assertEqual([e["failures"] for e in warnings][:3], [1, 2, 4])
        self.assertIn("authentication failed", warnings[0]["error"])
        with self.assertRaises(errors.UnknownFilespace):
            yield self.resolve()
        self.assertGreaterEqual(
            self.discovery.metrics.value("lucid_discovery_auth_failures_total", reason="bad_mac"), 5
        )

    @defer.inlineCallbacks
    def test_reregisters_after_discovery_restarts(self) -> Any:
        """When discovery drops every connection (a restart), the announcer reconnects and registers again."""
        announcer = self.announcer(retry_initial=0.02, retry_max=0.05)
        yield self.wait_for(lambda: announcer.registered_with == [self.address])
        for connection in self.discovery.open_connections():
            connection.transport.abortConnection()
        yield self.wait_for(lambda: self.count("register") >= 2)
        yield self.wait_for(lambda: announcer.registered_with == [self.address])
        answer = yield self.resolve()
        self.assertEqual(answer.status, ServerStatus.SERVING)
