"""
Load shedding: token buckets per source, the in-flight cap, and the
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
from lucidlink.discovery.shedding import ConnectionCap, InFlightLimit, SourceBuckets


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
