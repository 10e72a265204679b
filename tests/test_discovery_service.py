"""
Discovery's answers over the real protocol in memory (iosim, task.Clock):
registration, heartbeat and expiry, refusals, the static map, identical
answers for unknown names, shedding, and the metrics that count it all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from lucidlink import errors
from lucidlink.discovery.auth import Keyring, RegistrationKey, RegistrationVerifier, sign
from lucidlink.discovery.metrics import DiscoveryMetrics
from lucidlink.discovery.registry import Location, Registry
from lucidlink.discovery.service import UNKNOWN_FILESPACE_MESSAGE, DiscoveryResponder
from lucidlink.discovery.shedding import InFlightLimit, SourceBuckets
from lucidlink.discovery.static_map import StaticMap
from lucidlink.protocol.connection import ClientConnection, IResponder, ServerConnection
from lucidlink.protocol.messages import (
    Heartbeat,
    Lookup,
    Register,
    Registered,
    Resolve,
    Resolved,
    ServerStatus,
)

NOW = 1_800_000_000.0
KEY = RegistrationKey("k1", b"s" * 32)
STATIC = StaticMap({
    "static-fs": Location("static-fs", ("tcp:10.1.1.1:7001",), "meta.static-fs.lucid", 300_000, ServerStatus.SERVING),
})


class DiscoveryTestCase(SynchronousTestCase):
    """A discovery responder and clients connected to it in memory."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.metrics = DiscoveryMetrics()
        self.registry = Registry(self.clock, entry_ttl=15, max_entries=100)
        self.in_flight = InFlightLimit(10)
        self.responder = DiscoveryResponder(
            self.registry,
            RegistrationVerifier(Keyring(KEY), self.clock, on_refused=self.metrics.auth_failed),
            heartbeat_interval=5,
            static_map=STATIC,
            buckets=SourceBuckets(self.clock, rate=2, burst=3),
            in_flight=self.in_flight,
            metrics=self.metrics,
            timer=lambda: 0.0,
        )
        self.nonces = iter(range(1, 10**6))

    def connect(self, host: str = "10.0.0.1") -> tuple[ClientConnection, iosim.IOPump]:
        client = ClientConnection(self.clock, keepalive_interval=0)
        server = ServerConnection(self.clock, self.responder, keepalive_interval=0)
        server_transport = iosim.FakeTransport(server, isServer=True, peerAddress=IPv4Address("TCP", host, 40000))
        pump = iosim.connect(server, server_transport, client, iosim.makeFakeClient(client), clock=self.clock)
        self.successResultOf(client.ready)
        return client, pump

    def ask(self, message: Any, host: str = "10.0.0.1") -> defer.Deferred[Any]:
        client, pump = self.connect(host)
        asked = client.request(message)
        pump.flush()
        return asked

    def signed(self, cls: type[Register] = Register, *, filespace: str = "fs", server: str = "meta-1",
               status: ServerStatus = ServerStatus.SERVING, endpoint: str = "tcp:10.0.0.5:7001",
               key: RegistrationKey = KEY) -> Register:
        message = cls(filespace, server, [endpoint], f"meta.{filespace}.lucid", status,
                      int(self.clock.seconds() * 1000), next(self.nonces).to_bytes(16, "big"), "", b"")
        return sign(message, key.key_id, key.secret)

    def resolve(self, filespace: str, host: str = "10.0.0.1") -> defer.Deferred[Any]:
        return self.ask(Resolve(filespace), host)

    def count(self, request_type: str, outcome: str) -> float:
        return self.metrics.value("lucid_discovery_requests_total", type=request_type, outcome=outcome)


class RegistrationTests(DiscoveryTestCase):
    """Register, heartbeat and expiry as a client sees them."""

    def test_responder_provides_interface(self) -> None:
        """The responder is a faithful IResponder."""
        self.assertTrue(verifyObject(IResponder, self.responder))

    def test_register_then_resolve(self) -> None:
        """A registration answers Registered with TTL and interval, and resolve finds it."""
        registered = self.successResultOf(self.ask(self.signed()))
        self.assertEqual(registered, Registered(15_000, 5_000))
        resolved = self.successResultOf(self.resolve("fs"))
        self.assertEqual(resolved, Resolved("fs", ["tcp:10.0.0.5:7001"], "meta.fs.lucid", 15_000, ServerStatus.SERVING))

    def test_heartbeats_then_expiry(self) -> None:
        """Heartbeats on one connection keep the entry; once they stop it expires."""
        client, pump = self.connect("10.0.0.5")
        for _ in range(6):
            asked = client.request(self.signed(Heartbeat))
            pump.flush()
            self.successResultOf(asked)
            self.clock.advance(5)
        self.successResultOf(self.resolve("fs"))
        self.clock.advance(10)
        self.failureResultOf(self.resolve("fs"), errors.UnknownFilespace)

    def test_heartbeat_alone_registers(self) -> None:
        """A restarted discovery learns the whole entry from a heartbeat."""
        self.successResultOf(self.ask(self.signed(Heartbeat)))
        self.assertEqual(self.successResultOf(self.resolve("fs")).endpoints, ["tcp:10.0.0.5:7001"])

    def test_preference_over_the_wire(self) -> None:
        """A SERVING server is answered over a RESTORING one registered later."""
        self.successResultOf(self.ask(self.signed(server="a", endpoint="tcp:a:1")))
        self.clock.advance(1)
        self.successResultOf(self.ask(self.signed(server="b", endpoint="tcp:b:1", status=ServerStatus.RESTORING)))
        resolved = self.successResultOf(self.resolve("fs"))
        self.assertEqual((resolved.endpoints, resolved.status), (["tcp:a:1"], ServerStatus.SERVING))

    def test_refused_registration(self) -> None:
        """A forged registration is refused, counted by reason, and changes nothing."""
        forged = self.signed(key=RegistrationKey("k1", b"x" * 32))
        failure = self.failureResultOf(self.ask(forged), errors.AuthenticationFailed)
        self.assertEqual(str(failure.value), "registration refused: authentication failed")
        self.failureResultOf(self.resolve("fs"), errors.UnknownFilespace)
        self.assertEqual(self.metrics.value("lucid_discovery_auth_failures_total", reason="bad_mac"), 1)
        self.assertEqual(self.count("register", "refused"), 1)

    def test_invalid_registration(self) -> None:
        """A signed registration with a malformed endpoint is InvalidArgument."""
        self.failureResultOf(self.ask(self.signed(endpoint="nonsense")), errors.InvalidArgument)
        self.assertEqual(self.count("register", "invalid"), 1)

    def test_other_requests_not_supported(self) -> None:
        """Discovery answers nothing but its own messages."""
        self.failureResultOf(self.ask(Lookup(1, b"x")), errors.NotSupported)


class StaticMapTests(DiscoveryTestCase):
    """The static map answers until a registration overrides it."""

    def test_static_entry_answers(self) -> None:
        """A statically mapped filespace resolves with its configured TTL."""
        resolved = self.successResultOf(self.resolve("static-fs"))
        self.assertEqual(
            resolved, Resolved("static-fs", ["tcp:10.1.1.1:7001"], "meta.static-fs.lucid", 300_000, ServerStatus.SERVING)
        )

    def test_registration_overrides_static(self) -> None:
        """A live registration wins over the static entry; when it expires the static entry is back."""
        self.successResultOf(self.ask(self.signed(filespace="static-fs", endpoint="tcp:10.2.2.2:7001")))
        self.assertEqual(self.successResultOf(self.resolve("static-fs")).endpoints, ["tcp:10.2.2.2:7001"])
        self.clock.advance(15)
        self.assertEqual(self.successResultOf(self.resolve("static-fs")).endpoints, ["tcp:10.1.1.1:7001"])


class UnknownFilespaceTests(DiscoveryTestCase):
    """An unknown name gets one answer, however it came to be unknown."""

    def test_never_known_and_expired_are_identical(self) -> None:
        """Expired and never-seen names fail with the same class, code, message and retry hint."""
        self.successResultOf(self.ask(self.signed(filespace="gone")))
        self.clock.advance(15)  # expired, not yet swept
        expired = self.failureResultOf(self.resolve("gone"), errors.UnknownFilespace).value
        self.registry.sweep()
        swept = self.failureResultOf(self.resolve("gone"), errors.UnknownFilespace).value
        never = self.failureResultOf(self.resolve("never-was"), errors.UnknownFilespace).value
        answers = {(type(e), e.code, str(e), e.retry_after_ms) for e in (expired, swept, never)}
        self.assertEqual(answers, {(errors.UnknownFilespace, errors.UnknownFilespace.code, UNKNOWN_FILESPACE_MESSAGE, 0)})
        self.assertEqual(self.count("resolve", "unknown_filespace"), 3)


class SheddingTests(DiscoveryTestCase):
    """Over capacity, requests are answered Busy at once."""

    def test_source_bucket_sheds_with_retry_after(self) -> None:
        """A source over its burst gets Busy with the time to its next token; others are unaffected."""
        client, pump = self.connect("10.0.0.9")
        asked = [client.request(Resolve("static-fs")) for _ in range(4)]
        pump.flush()
        for answer in asked[:3]:
            self.successResultOf(answer)
        busy = self.failureResultOf(asked[3], errors.Busy).value
        self.assertEqual(busy.retry_after_ms, 500)  # 2 tokens a second
        self.successResultOf(self.resolve("static-fs", host="10.0.0.10"))
        self.clock.advance(0.5)
        self.successResultOf(self.resolve("static-fs", host="10.0.0.9"))
        self.assertEqual(self.metrics.value("lucid_discovery_shed_total", reason="source_rate"), 1)
        self.assertEqual(self.count("resolve", "busy"), 1)

    def test_registrations_not_charged_to_source(self) -> None:
        """One host heartbeating many filespaces is not rate limited per source."""
        client, pump = self.connect("10.0.0.5")
        asked = [client.request(self.signed(filespace=f"fs{n}")) for n in range(20)]
        pump.flush()
        for answer in asked:
            self.successResultOf(answer)

    def test_busy_leaves_the_connection_open(self) -> None:
        """A Busy answer does not end the connection: the client asks again on it once told to."""
        client, pump = self.connect("10.0.0.11")
        asked = [client.request(Resolve("static-fs")) for _ in range(4)]
        pump.flush()
        busy = self.failureResultOf(asked[3], errors.Busy).value
        self.clock.advance(busy.retry_after_ms / 1000)
        again = client.request(Resolve("static-fs"))
        pump.flush()
        self.assertEqual(self.successResultOf(again).filespace, "static-fs")

    def test_handshake_reported(self) -> None:
        """The connection is named to ``handshaken`` when its Hello is answered, so the gate can count it done."""
        seen: list[Any] = []
        self.responder.handshaken = seen.append
        client, _ = self.connect()
        self.assertEqual(len(seen), 1)
        self.assertIsInstance(seen[0], ServerConnection)
        self.assertEqual(seen[0].session, "10.0.0.1")

    def test_in_flight_cap(self) -> None:
        """With the in-flight cap reached, a request is Busy at once with a retry hint."""
        for _ in range(self.in_flight.limit):
            self.in_flight.acquire()
        busy = self.failureResultOf(self.resolve("static-fs"), errors.Busy).value
        self.assertGreater(busy.retry_after_ms, 0)
        self.assertEqual(self.metrics.value("lucid_discovery_shed_total", reason="in_flight"), 1)
        self.in_flight.release()
        self.successResultOf(self.resolve("static-fs"))
        self.assertEqual(self.in_flight.in_flight, self.in_flight.limit - 1)


class MetricsTests(DiscoveryTestCase):
    """The counters move with the requests."""

    def test_requests_latency_and_registry_size(self) -> None:
        """Requests are counted by type and outcome, timed, and the registry size is read live."""
        self.metrics.watch(lambda: len(self.registry), lambda: 7)
        self.successResultOf(self.ask(self.signed()))
        self.successResultOf(self.ask(self.signed(Heartbeat)))
        self.successResultOf(self.resolve("fs"))
        self.failureResultOf(self.resolve("nope"), errors.UnknownFilespace)
        self.assertEqual(self.count("register", "ok"), 1)
        self.assertEqual(self.count("heartbeat", "ok"), 1)
        self.assertEqual(self.count("resolve", "ok"), 1)
        self.assertEqual(self.count("resolve", "unknown_filespace"), 1)
        self.assertEqual(self.metrics.value("lucid_discovery_request_seconds_count", type="resolve"), 2)
        self.assertEqual(self.metrics.value("lucid_discovery_registry_entries"), 1)
        self.assertEqual(self.metrics.value("lucid_discovery_connections"), 7)

    def test_registries_are_separate(self) -> None:
        """Two metrics objects do not share counters (and neither touches the global registry)."""
        other = DiscoveryMetrics()
        self.successResultOf(self.resolve("static-fs"))
        self.assertEqual(other.value("lucid_discovery_requests_total", type="resolve", outcome="ok"), 0)


class StaticMapFileTests(SynchronousTestCase):
    """Reading a static map file, and what is wrong with a bad one."""

    def write(self, text: str) -> Path:
        path = Path(self.mktemp())
        path.write_text(text)
        return path

    def test_loads_sections(self) -> None:
        """Sections become locations; endpoints one per line; TTL in seconds."""
        static = StaticMap.load(self.write(
            "[filespace a]\nendpoints = tcp:h1:1\n    tcp:h2:1\nidentity = meta.a\nttl = 2.5\n"
            "[filespace b]\nendpoints = tcp:h3:1\nidentity = meta.b\n"
        ))
        self.assertEqual(static.lookup("a"), Location("a", ("tcp:h1:1", "tcp:h2:1"), "meta.a", 2500, ServerStatus.SERVING))
        self.assertEqual(static.lookup("b").ttl_ms, 60_000)  # type: ignore[union-attr]
        self.assertIsNone(static.lookup("c"))

    def test_errors_name_file_section_and_key(self) -> None:
        """Each problem names the file, the section and the key."""
        cases = {
            "[filespace a]\nidentity = x\n": "[filespace a] endpoints: missing",
            "[filespace a]\nendpoints = tcp:h:1\n": "[filespace a] identity: missing",
            "[filespace a]\nendpoints = tcp:h:1\nidentity = x\nttl = soon\n": "[filespace a] ttl: 'soon' is not a number",
            "[filespace a]\nendpoints = nonsense\nidentity = x\n": "[filespace a] endpoints: 'nonsense'",
            "[filespace a]\nendpoints = tcp:h:1\nidentity = x\ncolour = red\n": "[filespace a] colour: unknown key",
            "[a]\nendpoints = tcp:h:1\n": "section [a] should be [filespace NAME]",
        }
        for text, expected in cases.items():
            path = self.write(text)
            with self.assertRaises(errors.InvalidArgument) as caught:
                StaticMap.load(path)
            self.assertIn(str(path), str(caught.exception))
            self.assertIn(expected, str(caught.exception))
