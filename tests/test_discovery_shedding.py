"""
Load shedding: token buckets per source, the in-flight cap, the accept gate
that leaves connections over its limits in the listen backlog, and the
connection cap that refuses connections before any TLS work.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.test.proto_helpers import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from lucidlink import errors
from lucidlink.discovery.shedding import AcceptGate, ConnectionCap, InFlightLimit, SourceBuckets


class SourceBucketTests(SynchronousTestCase):
    """A token bucket per source address."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.buckets = SourceBuckets(self.clock, rate=10, burst=3, max_sources=2)

    def test_burst_then_busy_with_refill_time(self) -> None:
        """A source gets its burst; the next request is told when a token will be back."""
        self.assertEqual([self.buckets.take("a") for _ in range(3)], [0, 0, 0])
        self.assertEqual(self.buckets.take("a"), 100)  # one token per 100 ms at 10/s
        self.clock.advance(0.06)
        self.assertEqual(self.buckets.take("a"), 40)
        self.clock.advance(0.04)
        self.assertEqual(self.buckets.take("a"), 0)

    def test_admit_raises_busy(self) -> None:
        """admit() raises Busy carrying retry_after_ms."""
        for _ in range(3):
            self.buckets.admit("a")
        with self.assertRaises(errors.Busy) as caught:
            self.buckets.admit("a")
        self.assertEqual(caught.exception.retry_after_ms, 100)
        self.assertTrue(caught.exception.retryable)

    def test_sources_are_independent(self) -> None:
        """One busy source does not slow another."""
        for _ in range(4):
            self.buckets.take("a")
        self.assertEqual(self.buckets.take("b"), 0)

    def test_refill_is_capped_at_burst(self) -> None:
        """A long quiet period earns no more than the burst."""
        self.buckets.take("a")
        self.clock.advance(3600)
        self.assertEqual([self.buckets.take("a") for _ in range(4)], [0, 0, 0, 100])

    def test_sources_bounded_lru(self) -> None:
        """At most max_sources are remembered; the least recently seen goes first."""
        for source in ("a", "b", "a", "c"):
            self.buckets.take(source)
        self.assertEqual(len(self.buckets), 2)
        self.assertEqual(list(self.buckets._buckets), ["a", "c"])

    def test_rate_zero_disables(self) -> None:
        """A rate of 0 admits everything."""
        buckets = SourceBuckets(self.clock, rate=0, burst=0)
        self.assertEqual([buckets.take("a") for _ in range(1000)], [0] * 1000)
        self.assertEqual(len(buckets), 0)


class InFlightLimitTests(SynchronousTestCase):
    """A cap on requests answered at once."""

    def test_over_the_cap_is_busy(self) -> None:
        """The request over the limit gets Busy; a release makes room."""
        limit = InFlightLimit(2, retry_after_ms=75)
        limit.acquire()
        limit.acquire()
        with self.assertRaises(errors.Busy) as caught:
            limit.acquire()
        self.assertEqual(caught.exception.retry_after_ms, 75)
        limit.release()
        limit.acquire()
        self.assertEqual(limit.in_flight, 2)


class Counting(Factory):
    """Counts the protocols it builds (it stands for the TLS factory)."""

    def __init__(self) -> None:
        self.built = 0

    def buildProtocol(self, addr: Any) -> Protocol:
        self.built += 1
        return Protocol()


class ConnectionCapTests(SynchronousTestCase):
    """Over the cap, a connection is refused before the wrapped factory sees it."""

    def connect(self, cap: ConnectionCap) -> tuple[Any, StringTransport]:
        protocol = cap.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1000))
        transport = StringTransport()
        if protocol is not None:
            protocol.makeConnection(transport)
        return protocol, transport

    def test_refuses_over_the_cap(self) -> None:
        """The third connection of a cap of two gets no protocol, so the port closes it unserved."""
        wrapped = Counting()
        refused: list[None] = []
        cap = ConnectionCap(wrapped, 2, on_refused=lambda: refused.append(None))
        first, _ = self.connect(cap)
        self.connect(cap)
        third, _ = self.connect(cap)
        self.assertIsNone(third)
        self.assertEqual(wrapped.built, 2)
        self.assertEqual(cap.connections, 2)
        self.assertEqual((cap.refused, len(refused)), (1, 1))
        first.connectionLost(None)
        self.assertEqual(cap.connections, 1)
        fourth, _ = self.connect(cap)
        self.assertIsNotNone(fourth)
        self.assertEqual(wrapped.built, 3)


class FakePort:
    """A listening port as the gate sees it: reading or not, and its accept batch."""

    def __init__(self) -> None:
        self.reading = True
        self.connected = True
        self.numberAccepts = 100

    def stopReading(self) -> None:
        self.reading = False

    def startReading(self) -> None:
        self.reading = True


class Inner(Protocol):
    """Stands for the protocol inside TLS: its transport is the TLS layer, whose transport is the gate's wrapper."""


class AcceptGateTests(SynchronousTestCase):
    """At its limits the gate stops the ports from accepting instead of closing connections."""

    def setUp(self) -> None:
        self.wrapped = Counting()
        self.pauses: list[None] = []
        self.gate = AcceptGate(
            self.wrapped, max_connections=4, max_handshakes=2, on_pause=lambda: self.pauses.append(None)
        )
        self.ports = [FakePort(), FakePort()]
        for port in self.ports:
            self.gate.add_port(port)

    def accept(self) -> Any:
        wrapper = self.gate.buildProtocol(IPv4Address("TCP", "10.0.0.1", 1000))
        self.assertIsNotNone(wrapper)  # never refused: over a limit, nothing is accepted at all
        wrapper.makeConnection(StringTransport())
        return wrapper

    def handshake(self, wrapper: Any) -> None:
        """What discovery does when it answers Hello: it names the protocol two layers inside."""
        tls_layer = Protocol()
        tls_layer.transport = wrapper
        inner = Inner()
        inner.transport = tls_layer
        self.gate.handshake_done(inner)

    def reading(self) -> list[bool]:
        return [port.reading for port in self.ports]

    def test_handshake_limit_pauses_and_resumes(self) -> None:
        """Two handshakes in progress stop both ports; one finishing lets them accept again."""
        first = self.accept()
        self.assertEqual(self.reading(), [True, True])
        self.assertEqual([port.numberAccepts for port in self.ports], [1, 1])  # a batch is a share of the room
        second = self.accept()
        self.assertEqual(self.reading(), [False, False])
        self.assertEqual((self.gate.handshakes, self.gate.connections, len(self.pauses)), (2, 2, 1))
        self.handshake(first)
        self.assertEqual(self.reading(), [True, True])
        self.assertEqual(self.gate.handshakes, 1)
        second.connectionLost(None)
        self.assertEqual((self.gate.handshakes, self.gate.connections), (0, 1))
        self.assertEqual([port.numberAccepts for port in self.ports], [1, 1])

    def test_connection_limit_pauses(self) -> None:
        """Four open connections (their handshakes done) stop the ports until one ends."""
        wrappers = []
        for _ in range(4):
            wrappers.append(self.accept())
            self.handshake(wrappers[-1])
        self.assertEqual(self.reading(), [False, False])
        self.assertEqual(self.gate.handshakes, 0)
        wrappers[0].connectionLost(None)
        self.assertEqual(self.reading(), [True, True])
        self.assertEqual(self.wrapped.built, 4)
        self.assertEqual(len(self.pauses), 1)

    def test_port_added_while_paused_is_paused(self) -> None:
        """A port that starts listening while the gate is shut does not accept."""
        self.accept()
        self.accept()
        late = FakePort()
        self.gate.add_port(late)
        self.assertFalse(late.reading)

    def test_removed_or_closed_port_not_restarted(self) -> None:
        """A port taken away, or one that stopped listening, is not started again on resume."""
        self.gate.remove_port(self.ports[0])
        self.ports[1].connected = False
        first = self.accept()
        self.accept()
        self.assertEqual(self.reading(), [True, False])
        self.handshake(first)
        self.assertEqual(self.reading(), [True, False])

    def test_handshake_done_twice_or_unknown_is_harmless(self) -> None:
        """Telling the gate twice, or about a connection it never saw, changes nothing."""
        first = self.accept()
        self.handshake(first)
        self.handshake(first)
        self.gate.handshake_done(Inner())
        self.assertEqual((self.gate.handshakes, self.gate.connections), (0, 1))

    def test_limits_checked(self) -> None:
        """Limits below one are refused with the key named."""
        with self.assertRaises(errors.InvalidArgument) as caught:
            AcceptGate(Counting(), max_connections=1, max_handshakes=0)
        self.assertIn("max_handshakes", str(caught.exception))
        with self.assertRaises(errors.InvalidArgument):
            AcceptGate(Counting(), max_connections=0)
