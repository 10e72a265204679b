"""
The resolver: failover between discovery instances in a random order, Busy and
retry_after honoured, deadlines, the endpoint cache first when reconnecting.

Unit tests run on a ``task.Clock`` with an in-memory ``connect``; the loopback
tests run stand-in discovery instances over real TLS with a private CA.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lucidlink import errors
from lucidlink.client.backoff import Backoff
from lucidlink.client.endpoint_cache import EndpointCache, Location
from lucidlink.client.resolver import Resolver, connect_to_filespace, describe_failure
from lucidlink.protocol.messages import ServerStatus
from lucidlink.tls import init_ca
from tests.discovery_standin import (
    DISCOVERY_IDENTITY,
    FakeConnection,
    FakeNetwork,
    LoopbackDiscovery,
    StandInDiscovery,
    resolved,
)

A, B, C, D = (f"tcp:discovery-{name}.test:7000" for name in "abcd")
META_OLD, META_NEW = "tcp:meta-old.test:7100", "tcp:meta-new.test:7100"


class InOrder(random.Random):
    """A seeded random source that leaves the instances in the order they were configured."""

    def __init__(self) -> None:
        super().__init__(0)

    def shuffle(self, x: Any, *args: Any) -> None:
        pass


def wrong_identity() -> errors.TLSVerificationError:
    return errors.TLSVerificationError(
        "the server's identity did not match: expected 'discovery.lucid', but its certificate carries evil.example"
    )


class ClockedTestCase(SynchronousTestCase):
    """In-memory discovery stand-ins and a task.Clock; no tests of its own."""

    def setUp(self) -> None:
        self.clock = task.Clock()
        self.network = FakeNetwork()
        self.state_dir = Path(self.mktemp())
        self.warnings: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_level") is not None and event["log_level"].name == "warn":
                self.warnings.append(event.get("log_format", ""))

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def resolver(self, endpoints: tuple[str, ...], rng: random.Random | None = None, **options: Any) -> Resolver:
        rng = rng if rng is not None else InOrder()
        options.setdefault("backoff", Backoff(rng, initial=1.0, cap=10.0))
        options.setdefault("cache", EndpointCache(self.state_dir))
        return Resolver(self.clock, endpoints, connect=self.network.connect, rng=rng, attempt_timeout=2.0, **options)

    def serve(self, endpoint: str, *filespaces: str) -> StandInDiscovery:
        standin = StandInDiscovery({name: resolved(name) for name in filespaces})
        self.network.endpoints[endpoint] = standin
        return standin


class ResolverTests(ClockedTestCase):
    """The resolver against in-memory stand-ins on a task.Clock."""

    def test_answer_returned_and_cached(self) -> None:
        """An answer comes back as a Location, is stored in the cache, and the connection is closed."""
        self.serve(A, "demo")
        resolver = self.resolver((A,))
        location = self.successResultOf(resolver.resolve("demo"))
        self.assertEqual(location.endpoints, ("tcp:127.0.0.1:7100",))
        self.assertEqual(location.identity, "meta.demo.lucid")
        self.assertEqual(location.status, ServerStatus.SERVING)
        self.assertEqual(location.source, A)
        self.assertEqual(EndpointCache(self.state_dir).get("demo"), location)
        self.assertEqual(resolver.discovery_requests, 1)
        self.assertTrue(all(c.closed for c in self.network.connections))
        self.assertEqual(self.network.calls, [(A, DISCOVERY_IDENTITY)])

    def test_random_order_varies_with_seed(self) -> None:
        """The instance asked first depends on the seed, and on the call; a seed repeats itself."""
        for endpoint in (A, B, C, D):
            self.serve(endpoint, "demo")

        def first_asked(seed: int, calls: int) -> list[str]:
            self.network.calls.clear()
            resolver = self.resolver((A, B, C, D), rng=random.Random(seed), cache=None)
            firsts = []
            for _ in range(calls):
                self.network.calls.clear()
                self.successResultOf(resolver.resolve("demo"))
                firsts.append(self.network.asked()[0])
            return firsts

        by_seed = {first_asked(seed, 1)[0] for seed in range(30)}
        self.assertEqual(by_seed, {A, B, C, D})
        self.assertGreater(len(set(first_asked(1, 20))), 1)
        self.assertEqual(first_asked(5, 10), first_asked(5, 10))
        self.assertNotEqual(first_asked(5, 10), first_asked(6, 10))

    def test_busy_waited_out_on_the_same_connection(self) -> None:
        """A Busy answer is waited out (its retry_after, plus jitter) on the connection it came on: no new handshake."""
        standin = self.serve(A, "demo")
        standin.busy = [300, 300]
        resolver = self.resolver((A,), backoff=Backoff(random.Random(2)))
        answer = resolver.resolve("demo")
        self.clock.advance(0.299)
        self.assertNoResult(answer)
        self.assertEqual(standin.requests, 1)
        self.clock.pump([0.01] * 130)
        location = self.successResultOf(answer)
        self.assertEqual(location.source, A)
        self.assertEqual(self.network.asked(), [A])  # one connection
        self.assertEqual((standin.requests, resolver.discovery_requests), (3, 3))
        self.assertGreaterEqual(self.clock.seconds(), 0.6)
        self.assertTrue(all(c.closed for c in self.network.connections))

    def test_busy_beyond_patience_moves_on_to_next(self) -> None:
        """An instance that keeps saying Busy is left, its connection closed, once the waits pass busy_patience."""
        self.serve(A, "demo").busy_always_ms = 400
        self.serve(B, "demo")
        resolver = self.resolver((A, B), busy_patience=1.0)
        answer = resolver.resolve("demo")
        self.clock.pump([0.05] * 40)
        location = self.successResultOf(answer)
        self.assertEqual(location.source, B)
        self.assertEqual(self.network.asked(), [A, B])
        self.assertIn(self.network.endpoints[A].requests, (2, 3))
        self.assertTrue(all(c.closed for c in self.network.connections))

    def test_busy_hint_longer_than_patience_moves_on_at_once(self) -> None:
        """A hint longer than busy_patience is not waited for: the next instance is asked at once."""
        self.serve(A, "demo").busy_always_ms = 20_000
        self.serve(B, "demo")
        location = self.successResultOf(self.resolver((A, B)).resolve("demo"))
        self.assertEqual(location.source, B)
        self.assertEqual(self.network.asked(), [A, B])
        self.assertEqual(self.clock.seconds(), 0)

    def test_busy_retry_after_honoured(self) -> None:
        """After a round of Busy answers, the next round waits at least the largest retry_after."""
        self.serve(A, "demo").busy = [5000]
        self.serve(B, "demo").busy = [2000]
        resolver = self.resolver((A, B), backoff=Backoff(InOrder(), initial=0.1, cap=1.0), busy_patience=1.0)
        answer = resolver.resolve("demo")
        self.assertNoResult(answer)
        self.assertEqual(len(self.network.calls), 2)
        self.clock.advance(4.99)
        self.assertNoResult(answer)
        self.assertEqual(len(self.network.calls), 2)
        self.clock.advance(0.02)
        self.assertEqual(self.successResultOf(answer).source, A)
        self.assertEqual(len(self.network.calls), 3)

    def test_unknown_filespace_at_once(self) -> None:
        """UnknownFilespace is definitive: raised at once, no other instance asked, no retry."""
        self.serve(A)
        self.serve(B, "ghost")
        failure = self.failureResultOf(self.resolver((A, B)).resolve("ghost"), errors.UnknownFilespace)
        self.assertEqual(str(failure.value), "no filespace named 'ghost' is registered with discovery")
        self.assertEqual(self.network.asked(), [A])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_deadline_names_every_instance(self) -> None:
        """At the deadline, Unavailable says what went wrong at each instance."""
        self.network.endpoints[B] = "hang"
        self.network.endpoints[C] = wrong_identity()
        self.serve(D, "demo").busy_always_ms = 100
        resolver = self.resolver((A, B, C, D), busy_patience=0.5)
        answer = resolver.resolve("demo", deadline=10.0)
        for _ in range(40):
            self.clock.advance(0.5)
        failure = self.failureResultOf(answer, errors.Unavailable)
        message = str(failure.value)
        self.assertTrue(message.startswith("no discovery instance answered for 'demo' ("), message)
        self.assertIn(f"{A} refused the connection", message)
        self.assertIn(f"{B} did not answer within", message)
        self.assertIn(f"{C}: the server's identity did not match", message)
        self.assertIn(f"{D} is busy (asked to retry after 100 ms)", message)
        self.assertGreater(len(self.network.calls), 4)  # more than one round
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_gives_up_by_the_deadline(self) -> None:
        """The failure comes no later than the deadline, whatever the backoff draws."""
        for seed in range(20):
            clock = self.clock = task.Clock()
            rng = random.Random(seed)
            resolver = self.resolver((A,), rng=rng, backoff=Backoff(rng, initial=1.0, cap=100.0))
            answer = resolver.resolve("demo", deadline=5.0)
            while not answer.called:
                clock.advance(0.01)
            self.failureResultOf(answer, errors.Unavailable)
            self.assertLessEqual(clock.seconds(), 5.0)

    def test_retry_after_beyond_the_deadline(self) -> None:
        """An instance that asks for more time than is left ends the wait at once."""
        self.serve(A, "demo").busy_always_ms = 60_000
        failure = self.failureResultOf(self.resolver((A,)).resolve("demo", deadline=5.0), errors.Unavailable)
        self.assertIn("1 round in 0.0 s", str(failure.value))
        self.assertEqual(failure.value.retry_after_ms, 60_000)

    def test_hard_mode_keeps_trying_and_logs_at_a_falling_rate(self) -> None:
        """Without a deadline it tries for ever, logging now and then; it succeeds once an instance is back."""
        resolver = self.resolver((A, B), backoff=Backoff(random.Random(3), initial=1.0, cap=30.0))
        answer = resolver.resolve("demo")
        self.clock.pump([1.0] * 3600)
        self.assertNoResult(answer)
        rounds = resolver.discovery_requests // 2
        self.assertGreater(rounds, 100)
        logged = [w for w in self.warnings if "no discovery instance answered" in w]
        self.assertGreater(len(logged), 5)
        self.assertLess(len(logged), rounds / 4)
        self.serve(B, "demo")
        self.clock.pump([1.0] * 60)
        self.assertEqual(self.successResultOf(answer).source, B)

    def test_attempt_timeout_moves_on(self) -> None:
        """An instance that does not answer within the attempt timeout is passed over."""
        self.network.endpoints[A] = "hang"
        self.serve(B, "demo")
        answer = self.resolver((A, B)).resolve("demo")
        self.assertNoResult(answer)
        self.clock.advance(2.0)
        self.assertEqual(self.successResultOf(answer).source, B)

    def test_instance_that_accepted_is_waited_for(self) -> None:
        """An instance that accepted the TCP connection (its backlog is being served) has handshake_patience."""
        standin = StandInDiscovery({"demo": resolved("demo")})
        self.network.endpoints[A] = "slow"
        self.serve(B, "demo")
        resolver = self.resolver((A, B), handshake_patience=30.0)
        answer = resolver.resolve("demo")
        self.clock.advance(29.0)
        self.assertNoResult(answer)
        (_, handshake), = self.network.slow
        handshake.callback(FakeConnection(A, DISCOVERY_IDENTITY, standin))
        self.assertEqual(self.successResultOf(answer).source, A)
        self.assertEqual(self.network.asked(), [A])
        self.assertEqual(resolver.discovery_requests, 1)

    def test_instance_slower_than_its_patience_is_passed_over(self) -> None:
        """Past handshake_patience the attempt is abandoned and the next instance asked."""
        self.network.endpoints[A] = "slow"
        self.serve(B, "demo")
        resolver = self.resolver((A, B), handshake_patience=30.0)
        answer = resolver.resolve("demo")
        self.clock.advance(30.0)
        self.assertEqual(self.successResultOf(answer).source, B)
        self.assertTrue(self.network.slow[0][1].called)  # cancelled, so the connection is closed

    def test_answer_about_another_filespace_is_a_failure(self) -> None:
        """An instance that answers about the wrong filespace is not believed."""
        liar = self.serve(A, "demo")
        liar.answers["demo"] = resolved("other")
        self.serve(B, "demo")
        location = self.successResultOf(self.resolver((A, B)).resolve("demo"))
        self.assertEqual((location.filespace, location.source), ("demo", B))

    def test_fail_fast_on_refused_certificates(self) -> None:
        """With fail_fast, a round in which every certificate was refused ends the wait at once."""
        self.network.endpoints[A] = wrong_identity()
        self.network.endpoints[B] = wrong_identity()
        failure = self.failureResultOf(self.resolver((A, B), fail_fast=True).resolve("demo"), errors.Unavailable)
        self.assertIn("identity did not match", str(failure.value))
        self.assertEqual(len(self.network.calls), 2)

    def test_cancel(self) -> None:
        """Cancelling a resolve stops it, while it waits and while it asks."""
        self.network.endpoints[A] = "hang"
        resolver = self.resolver((A,))
        asking = resolver.resolve("demo")
        asking.cancel()
        self.failureResultOf(asking, defer.CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        del self.network.endpoints[A]
        waiting = resolver.resolve("demo")
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)  # the backoff
        waiting.cancel()
        self.failureResultOf(waiting, defer.CancelledError)
        self.clock.advance(100)
        self.assertEqual(len(self.network.calls), 2)

    def test_resolve_once(self) -> None:
        """One round, no waiting; its Unavailable carries the largest retry_after."""
        self.serve(A, "demo").busy = [700]
        self.serve(B, "demo").busy = [300]
        failure = self.failureResultOf(self.resolver((A, B), busy_patience=0.1).resolve_once("demo"), errors.Unavailable)
        self.assertEqual(failure.value.retry_after_ms, 700)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_locate_uses_cache_after_restart(self) -> None:
        """After a restart of the client, locate answers from the cache with no discovery request."""
        self.serve(A, "demo")
        first = self.successResultOf(self.resolver((A,)).resolve("demo"))
        self.network.calls.clear()
        restarted = self.resolver((A,), cache=EndpointCache(self.state_dir))
        self.assertEqual(self.successResultOf(restarted.locate("demo")), first)
        self.assertEqual(restarted.discovery_requests, 0)
        self.assertEqual(self.network.calls, [])

    def test_forget_and_moved(self) -> None:
        """forget() makes locate ask again but keeps the entry on disk; moved() drops it."""
        self.serve(A, "demo")
        resolver = self.resolver((A,))
        self.successResultOf(resolver.locate("demo"))
        self.successResultOf(resolver.locate("demo"))
        self.assertEqual(resolver.discovery_requests, 1)
        resolver.forget("demo")
        self.assertIsNone(resolver.cached("demo"))
        self.assertIsNotNone(EndpointCache(self.state_dir).get("demo"))
        self.successResultOf(resolver.locate("demo"))
        self.assertEqual(resolver.discovery_requests, 2)
        self.successResultOf(resolver.locate("demo"))
        self.assertEqual(resolver.discovery_requests, 2)
        resolver.moved("demo")
        self.assertIsNone(EndpointCache(self.state_dir).get("demo"))
        self.successResultOf(resolver.locate("demo"))
        self.assertEqual(resolver.discovery_requests, 3)

    def test_no_discovery_endpoints(self) -> None:
        """A resolver needs at least one instance, and a CA when it connects itself."""
        self.assertRaises(errors.InvalidArgument, Resolver, self.clock, ())
        self.assertRaises(errors.InvalidArgument, Resolver, self.clock, (A,))
        self.assertRaises(errors.NotFound, Resolver, reactor, (A,), Path("/nonexistent/ca.pem"))

    def test_describe_failure(self) -> None:
        """Failures name the instance once, in words."""
        refused = errors.Unavailable(f"cannot connect to {A}: Connection was refused by other side: 111: Connection refused.")
        self.assertEqual(describe_failure(A, refused), f"{A} refused the connection")
        dns = errors.Unavailable(f"cannot connect to {A}: DNS lookup failed: no such host")
        self.assertEqual(describe_failure(A, dns), f"{A}: DNS lookup failed: no such host")


class ConnectToFilespaceTests(ClockedTestCase):
    """Reconnecting: the cached endpoint first, discovery only when it fails."""

    def remember(self, endpoint: str) -> Location:
        location = Location("demo", (endpoint,), "meta.demo.lucid", ServerStatus.SERVING, 30_000, 0.0, A)
        EndpointCache(self.state_dir).put(location)
        return location

    def test_cached_endpoint_first(self) -> None:
        """A cached endpoint that works means no discovery request at all."""
        self.remember(META_OLD)
        self.network.endpoints[META_OLD] = "up"
        resolver = self.resolver((A, B))
        connection = self.successResultOf(connect_to_filespace(resolver, "demo", self.network.connect))
        self.assertEqual((connection.endpoint, connection.identity), (META_OLD, "meta.demo.lucid"))
        self.assertEqual(resolver.discovery_requests, 0)

    def test_cached_endpoint_failed_asks_discovery(self) -> None:
        """When the cached endpoint keeps failing past the patience, discovery is asked and its answer tried at once."""
        self.remember(META_OLD)
        self.serve(A, "demo").answers["demo"] = resolved("demo", (META_NEW,))
        self.network.endpoints[META_NEW] = "up"
        resolver = self.resolver((A,))
        connecting = connect_to_filespace(resolver, "demo", self.network.connect)
        self.clock.pump([0.5] * int(resolver.cache_patience * 2 + 60))
        connection = self.successResultOf(connecting)
        self.assertEqual(connection.endpoint, META_NEW)
        asked = self.network.asked()
        self.assertEqual(asked[-2:], [A, META_NEW])
        self.assertEqual(set(asked[:-2]), {META_OLD})
        self.assertEqual(resolver.discovery_requests, 1)
        cached = EndpointCache(self.state_dir).get("demo")
        assert cached is not None
        self.assertEqual(cached.endpoints, (META_NEW,))

    def test_server_restarting_at_its_address_needs_no_discovery(self) -> None:
        """A metadata server back at its address within the patience is found without discovery."""
        self.remember(META_OLD)
        self.serve(A, "demo").answers["demo"] = resolved("demo", (META_NEW,))
        resolver = self.resolver((A,))
        connecting = connect_to_filespace(resolver, "demo", self.network.connect)
        self.clock.pump([0.25] * 12)
        self.assertNoResult(connecting)
        self.network.endpoints[META_OLD] = "up"
        self.clock.pump([0.25] * int(resolver.cache_patience * 4))
        self.assertEqual(self.successResultOf(connecting).endpoint, META_OLD)
        self.assertEqual(resolver.discovery_requests, 0)

    def test_moved_filespace_asks_discovery_at_once(self) -> None:
        """A server at the cached address that no longer serves the filespace ends the patience."""
        self.remember(META_OLD)
        self.network.endpoints[META_OLD] = errors.UnknownFilespace("not served here")
        self.serve(A, "demo").answers["demo"] = resolved("demo", (META_NEW,))
        self.network.endpoints[META_NEW] = "up"
        resolver = self.resolver((A,))
        connection = self.successResultOf(connect_to_filespace(resolver, "demo", self.network.connect))
        self.assertEqual(connection.endpoint, META_NEW)
        self.assertEqual(self.network.asked(), [META_OLD, A, META_NEW])

    def test_waits_out_an_outage(self) -> None:
        """With discovery and the server both down, it backs off until the server is back."""
        self.remember(META_OLD)
        resolver = self.resolver((A,), backoff=Backoff(random.Random(1), initial=1.0, cap=10.0))
        connecting = connect_to_filespace(resolver, "demo", self.network.connect)
        self.clock.pump([1.0] * 120)
        self.assertNoResult(connecting)
        attempts = len(self.network.calls)
        self.assertGreater(attempts, 10)
        self.assertLess(attempts, 2 * 120)  # backed off, not hammering
        self.network.endpoints[META_OLD] = "up"
        self.clock.pump([1.0] * 15)
        self.assertEqual(self.successResultOf(connecting).endpoint, META_OLD)

    def test_deadline(self) -> None:
        """At the deadline it says what failed at the server and at discovery."""
        self.remember(META_OLD)
        resolver = self.resolver((A,))
        connecting = connect_to_filespace(resolver, "demo", self.network.connect, deadline=20.0)
        self.clock.pump([0.5] * 60)
        message = str(self.failureResultOf(connecting, errors.Unavailable).value)
        self.assertIn("cannot reach the metadata server of 'demo'", message)
        self.assertIn(f"{META_OLD} refused the connection", message)
        self.assertIn(f"{A} refused the connection", message)

    def test_server_says_not_here(self) -> None:
        """A server that does not serve the filespace any more drops the cached entry."""
        self.remember(META_OLD)
        self.network.endpoints[META_OLD] = errors.UnknownFilespace("'demo' is not served here")
        self.serve(A, "demo").answers["demo"] = resolved("demo", (META_NEW,))
        resolver = self.resolver((A,))
        connecting = connect_to_filespace(resolver, "demo", self.network.connect, deadline=1.0)
        self.assertEqual(self.network.asked(), [META_OLD, A, META_NEW])
        cached = EndpointCache(self.state_dir).get("demo")
        assert cached is not None
        self.assertEqual(cached.endpoints, (META_NEW,))
        self.clock.advance(2)
        self.failureResultOf(connecting, errors.Unavailable)

    def test_discovery_confirming_the_endpoint_is_asked_once_per_ttl(self) -> None:
        """Past the patience discovery is asked once; naming the same endpoint, it is not asked again until its TTL is out."""
        self.remember(META_OLD)
        self.serve(A, "demo").answers["demo"] = resolved("demo", (META_OLD,), ttl_ms=30_000)
        resolver = self.resolver((A,), backoff=Backoff(random.Random(4), initial=0.5, cap=2.0))
        connecting = connect_to_filespace(resolver, "demo", self.network.connect)
        self.clock.pump([0.25] * int(resolver.cache_patience * 4 + 4))  # patience + 1 s
        self.assertEqual(resolver.discovery_requests, 1)
        asked_at = self.clock.seconds()
        while self.clock.seconds() < asked_at + 29:
            self.clock.advance(0.25)
        self.assertEqual(resolver.discovery_requests, 1)
        tries = self.network.asked().count(META_OLD)
        self.assertGreater(tries, 15)  # it kept trying the server all along
        self.clock.pump([0.25] * 16)
        self.assertEqual(resolver.discovery_requests, 2)
        self.network.endpoints[META_OLD] = "up"
        self.clock.pump([0.25] * 12)
        self.assertEqual(self.successResultOf(connecting).endpoint, META_OLD)
        self.assertEqual(resolver.discovery_requests, 2)

    def test_ttl_shorter_than_patience_is_not_hammering(self) -> None:
        """An answer with no TTL still keeps the client from asking again for a patience."""
        self.remember(META_OLD)
        self.serve(A, "demo").answers["demo"] = resolved("demo", (META_OLD,), ttl_ms=0)
        resolver = self.resolver((A,), backoff=Backoff(random.Random(4), initial=0.5, cap=2.0))
        connecting = connect_to_filespace(resolver, "demo", self.network.connect)
        self.clock.pump([0.25] * int(resolver.cache_patience * 4 * 3))  # three patiences
        self.assertIn(resolver.discovery_requests, (2, 3))
        connecting.cancel()
        self.failureResultOf(connecting, defer.CancelledError)

    def test_slow_handshake_is_not_a_failure(self) -> None:
        """A server that accepted the TCP connection has handshake_patience, not attempt_timeout, to finish."""
        self.remember(META_OLD)
        self.network.endpoints[META_OLD] = "slow"
        self.serve(A, "demo").answers["demo"] = resolved("demo", (META_NEW,))
        resolver = self.resolver((A,), handshake_patience=45.0)
        connecting = connect_to_filespace(resolver, "demo", self.network.connect)
        self.clock.advance(44.9)
        self.assertNoResult(connecting)
        (endpoint, handshake), = self.network.slow
        handshake.callback(FakeConnection(META_OLD, "meta.demo.lucid"))
        self.assertEqual(self.successResultOf(connecting).endpoint, META_OLD)
        self.assertEqual(resolver.discovery_requests, 0)
        self.assertEqual(self.network.asked(), [META_OLD])
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_server_that_accepts_keeps_the_patience(self) -> None:
        """A server that accepts connections but drops the handshakes (overloaded) is waited for, up to handshake_patience."""
        self.remember(META_OLD)
        self.network.endpoints[META_OLD] = "slow"
        self.serve(A, "demo").answers["demo"] = resolved("demo", (META_OLD,))
        resolver = self.resolver((A,), handshake_patience=40.0)
        connecting = connect_to_filespace(resolver, "demo", self.network.connect)

        def drop_handshakes() -> None:
            for _, handshake in self.network.slow:
                if not handshake.called:
                    handshake.errback(errors.ConnectionClosed("peer closed the connection: no Hello within 10 s"))

        while self.clock.seconds() < 39.5:
            drop_handshakes()
            self.clock.advance(0.5)
        self.assertEqual(resolver.discovery_requests, 0)
        self.assertGreater(len(self.network.slow), 5)  # it kept trying, backing off
        while self.clock.seconds() < 45:
            drop_handshakes()
            self.clock.advance(0.5)
        self.assertEqual(resolver.discovery_requests, 1)
        connecting.cancel()
        self.failureResultOf(connecting, defer.CancelledError)

    def test_slow_handshake_bounded_by_its_patience(self) -> None:
        """A handshake that does not finish within handshake_patience is abandoned and the next round begins."""
        self.remember(META_OLD)
        self.network.endpoints[META_OLD] = "slow"
        self.serve(A, "demo").answers["demo"] = resolved("demo", (META_NEW,))
        self.network.endpoints[META_NEW] = "up"
        resolver = self.resolver((A,), handshake_patience=12.0)
        connecting = connect_to_filespace(resolver, "demo", self.network.connect)
        self.clock.advance(12.0)
        self.assertEqual(self.successResultOf(connecting).endpoint, META_NEW)
        self.assertEqual(self.network.asked(), [META_OLD, A, META_NEW])
        self.assertTrue(self.network.slow[0][1].called)  # cancelled: the connection is not left behind

    def test_slow_handshake_bounded_by_the_deadline(self) -> None:
        """The deadline bounds a slow handshake too, and the failure says what was slow."""
        self.remember(META_OLD)
        self.network.endpoints[META_OLD] = "slow"
        resolver = self.resolver((A,))
        connecting = connect_to_filespace(resolver, "demo", self.network.connect, deadline=7.0)
        self.clock.advance(7.0)
        message = str(self.failureResultOf(connecting, errors.Unavailable).value)
        self.assertIn(f"{META_OLD} accepted the connection but did not finish the handshake within 7 s", message)

    def test_connect_that_cannot_report_keeps_the_attempt_timeout(self) -> None:
        """A connect without reports_connected is bounded by attempt_timeout, as before."""
        self.remember(META_OLD)
        calls: list[str] = []

        def hanging(endpoint: str, identity: str) -> defer.Deferred[Any]:
            calls.append(endpoint)
            return defer.Deferred()

        resolver = self.resolver((A,))
        connecting = connect_to_filespace(resolver, "demo", hanging, deadline=30.0)
        self.clock.advance(resolver.attempt_timeout - 0.01)
        self.assertEqual(len(calls), 1)
        self.clock.pump([0.01, 1.0])  # the time-out, then at most the first backoff (initial 1 s)
        self.assertEqual(len(calls), 2)
        self.clock.pump([0.5] * 60)
        self.failureResultOf(connecting, errors.Unavailable)
        self.assertGreater(len(calls), 3)

    def test_unknown_filespace(self) -> None:
        """Discovery saying there is no such filespace ends the attempt."""
        self.serve(A)
        resolver = self.resolver((A,))
        connecting = connect_to_filespace(resolver, "ghost", self.network.connect)
        self.failureResultOf(connecting, errors.UnknownFilespace)

    def test_unregistered_server_of_a_filespace_known_to_exist(self) -> None:
        """Connecting again, "not registered" is a server away (a hung one loses its registration): tried again."""
        self.serve(A)
        resolver = self.resolver((A,))
        connecting = connect_to_filespace(resolver, "demo", self.network.connect, deadline=20.0, known_to_exist=True)
        self.clock.pump([0.5] * 10)
        self.assertNoResult(connecting)
        self.clock.pump([0.5] * 40)
        failure = self.failureResultOf(connecting, errors.Unavailable)
        self.assertIn("no filespace named 'demo' is registered with discovery (its server is away)", str(failure.value))


class LoopbackResolverTests(TestCase):
    """Stand-in discovery instances on 127.0.0.1 over real TLS."""

    timeout = 20

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.base = Path(self.mktemp()).absolute()
        self.ca_dir = self.base / "ca"
        init_ca(self.ca_dir)
        self.one = yield self.start(StandInDiscovery({"demo": resolved("demo")}))
        self.two = yield self.start(StandInDiscovery({"demo": resolved("demo")}))

    @defer.inlineCallbacks
    def start(self, responder: StandInDiscovery, **options: Any) -> Any:
        instance = yield LoopbackDiscovery.start(self.ca_dir, responder, **options)
        self.addCleanup(instance.stop)
        return instance

    def resolver(self, endpoints: list[str], seed: int = 0, **options: Any) -> Resolver:
        rng = random.Random(seed)
        resolver = Resolver(
            reactor,
            endpoints,
            self.ca_dir / "ca.pem",
            cache=EndpointCache(self.base / "state"),
            rng=rng,
            backoff=Backoff(rng, initial=0.02, cap=0.1),
            **options,
        )
        self.addCleanup(resolver.close)
        return resolver

    @defer.inlineCallbacks
    def test_failover_when_an_instance_stops(self) -> Any:
        """Both instances serve; once one stops, every resolve is answered by the other."""
        resolver = self.resolver([self.one.endpoint, self.two.endpoint], seed=11)
        for _ in range(6):
            location = yield resolver.resolve("demo", deadline=reactor.seconds() + 5)
            self.assertEqual(location.identity, "meta.demo.lucid")
        self.assertEqual(self.one.responder.requests + self.two.responder.requests, 6)
        self.assertGreater(self.one.responder.requests, 0)
        self.assertGreater(self.two.responder.requests, 0)

        yield self.one.stop()
        before = (self.one.responder.requests, self.two.responder.requests, resolver.discovery_requests)
        for _ in range(6):
            location = yield resolver.resolve("demo", deadline=reactor.seconds() + 5)
            self.assertEqual(location.source, self.two.endpoint)
        self.assertEqual(self.one.responder.requests, before[0])
        self.assertEqual(self.two.responder.requests, before[1] + 6)
        self.assertGreater(resolver.discovery_requests - before[2], 6)  # some tried the stopped one first

    @defer.inlineCallbacks
    def test_every_failure_named(self) -> Any:
        """Refused, wrong identity and expired certificate: each instance named with its own failure."""
        yield self.one.stop()
        impostor = yield self.start(StandInDiscovery({"demo": resolved("demo")}), names=("evil.example",))
        expired = yield self.start(
            StandInDiscovery({"demo": resolved("demo")}),
            not_before=datetime.now(UTC) - timedelta(days=30),
            not_after=datetime.now(UTC) - timedelta(days=1),
        )
        endpoints = [self.one.endpoint, impostor.endpoint, expired.endpoint]
        resolver = self.resolver(endpoints)
        # Long enough for three TLS handshakes on a loaded machine.
        with self.assertRaises(errors.Unavailable) as caught:
            yield resolver.resolve("demo", deadline=reactor.seconds() + 2.0)
        message = str(caught.exception)
        self.assertIn(f"{self.one.endpoint} refused the connection", message)
        self.assertIn(f"{impostor.endpoint}: the server's identity did not match", message)
        self.assertIn(f"{expired.endpoint}: the certificate of the server", message)
        self.assertIn("has expired", message)
        self.assertEqual(impostor.responder.requests + expired.responder.requests, 0)

    @defer.inlineCallbacks
    def test_busy_over_tls(self) -> Any:
        """A Busy answer over the wire carries retry_after, and the next round waits for it."""
        self.one.responder.busy = [300]
        resolver = self.resolver([self.one.endpoint])
        started = reactor.seconds()
        location = yield resolver.resolve("demo", deadline=started + 5)
        self.assertGreaterEqual(reactor.seconds() - started, 0.3)
        self.assertEqual(location.source, self.one.endpoint)
        self.assertEqual(self.one.responder.requests, 2)

    @defer.inlineCallbacks
    def test_not_registered(self) -> Any:
        """A name discovery does not know is UnknownFilespace, over the wire too."""
        resolver = self.resolver([self.one.endpoint, self.two.endpoint])
        with self.assertRaises(errors.UnknownFilespace):
            yield resolver.resolve("ghost", deadline=reactor.seconds() + 5)
        self.assertEqual(resolver.discovery_requests, 1)
