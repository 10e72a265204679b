"""
Backoff: full jitter within its bounds, capped, honouring a server's retry_after;
a ClientService driven by it; and logging a long run of failures at a falling rate.
"""

from __future__ import annotations

import random
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.application.internet import ClientService
from twisted.internet import defer, task
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.protocol import Factory, Protocol
from twisted.trial.unittest import SynchronousTestCase

from lucidlink import errors
from lucidlink.client.backoff import Backoff, FallingRateLog, retry_after_seconds

seeds = st.integers(0, 2**32 - 1)
initials = st.floats(0.001, 10.0)
factors = st.floats(1.0, 4.0)


class BackoffTests(SynchronousTestCase):
    """Delays are drawn from [0, min(cap, initial * factor**attempt)] and never undercut retry_after."""

    @given(seeds, initials, factors, st.floats(0.0, 100.0), st.lists(st.integers(0, 10_000), min_size=1, max_size=50))
    def test_delays_within_bounds(self, seed: int, initial: float, factor: float, extra: float, attempts: list[int]) -> None:
        """Every delay lies between 0 and the capped exponential ceiling."""
        backoff = Backoff(random.Random(seed), initial=initial, factor=factor, cap=initial + extra)
        for attempt in attempts:
            try:
                ceiling = min(backoff.cap, initial * factor**attempt)
            except OverflowError:
                ceiling = backoff.cap
            delay = backoff.delay(attempt)
            self.assertGreaterEqual(delay, 0.0)
            self.assertLessEqual(delay, ceiling * (1 + 1e-9))
            self.assertLessEqual(delay, backoff.cap)

    @given(seeds, st.integers(0, 10**9), st.floats(0.0, 120.0))
    def test_retry_after_honoured(self, seed: int, attempt: int, retry_after: float) -> None:
        """A delay is never shorter than the server asked for, even above the cap."""
        backoff = Backoff(random.Random(seed), initial=0.1, cap=30.0)
        delay = backoff.delay(attempt, retry_after)
        self.assertGreaterEqual(delay, retry_after)
        self.assertLessEqual(delay, max(retry_after, 30.0))

    @given(seeds, st.floats(0.0, 120.0))
    def test_after_busy_within_bounds(self, seed: int, retry_after: float) -> None:
        """Waiting out a Busy: at least the hint, at most the hint plus min(hint, cap); a zero hint waits up to initial."""
        backoff = Backoff(random.Random(seed), initial=0.1, cap=30.0)
        delay = backoff.after_busy(retry_after)
        self.assertGreaterEqual(delay, retry_after)
        upper = retry_after + (min(retry_after, 30.0) if retry_after > 0 else 0.1)
        self.assertLessEqual(delay, upper * (1 + 1e-9))

    def test_after_busy_spreads_a_crowd(self) -> None:
        """A thousand clients told "retry after 1 s" come back over the whole second after it."""
        backoff = Backoff(random.Random(7))
        delays = sorted(backoff.after_busy(1.0) for _ in range(1000))
        self.assertLess(delays[0], 1.05)
        self.assertGreater(delays[-1], 1.95)
        self.assertTrue(1.4 < delays[500] < 1.6)

    def test_capped_without_overflow(self) -> None:
        """A --hard mount's millionth retry still waits at most the cap."""
        backoff = Backoff(random.Random(1), initial=0.25, factor=2.0, cap=30.0)
        self.assertEqual(backoff.ceiling(10**6), 30.0)
        self.assertEqual(backoff.ceiling(0), 0.25)
        self.assertEqual(backoff.ceiling(3), 2.0)
        self.assertLessEqual(backoff.delay(10**9), 30.0)

    def test_full_jitter_spreads(self) -> None:
        """At the cap, draws cover the whole window rather than clustering near it."""
        backoff = Backoff(random.Random(7), initial=1.0, cap=10.0)
        draws = [backoff.delay(20) for _ in range(2000)]
        self.assertLess(min(draws), 0.5)
        self.assertGreater(max(draws), 9.5)
        self.assertLess(abs(sum(draws) / len(draws) - 5.0), 0.5)

    def test_deterministic_for_a_seed(self) -> None:
        """The same seed draws the same delays; another seed draws others."""
        first = [Backoff(random.Random(3)).delay(n) for n in range(10)]
        again = [Backoff(random.Random(3)).delay(n) for n in range(10)]
        other = [Backoff(random.Random(4)).delay(n) for n in range(10)]
        self.assertEqual(first, again)
        self.assertNotEqual(first, other)

    def test_nonsense_refused(self) -> None:
        """A cap below the initial delay, or a shrinking factor, is refused."""
        self.assertRaises(errors.InvalidArgument, Backoff, initial=5.0, cap=1.0)
        self.assertRaises(errors.InvalidArgument, Backoff, factor=0.5)
        self.assertRaises(errors.InvalidArgument, Backoff, initial=0.0)

    def test_retry_after_seconds(self) -> None:
        """retry_after_ms of an error, in seconds; 0 for errors without one."""
        self.assertEqual(retry_after_seconds(errors.Busy("busy", retry_after_ms=1500)), 1.5)
        self.assertEqual(retry_after_seconds(errors.Unavailable("down")), 0.0)
        self.assertEqual(retry_after_seconds(ValueError("x")), 0.0)


class RetryPolicyTests(SynchronousTestCase):
    """The policy speaks ClientService's retryPolicy and can be told about retry_after."""

    def test_client_service_waits_within_bounds(self) -> None:
        """A ClientService retrying a refused endpoint waits delays drawn by the policy."""
        clock = task.Clock()
        attempts: list[float] = []

        class Refusing:
            def connect(self, factory: Any) -> defer.Deferred[Any]:
                attempts.append(clock.seconds())
                return defer.fail(ConnectionRefusedError())

        backoff = Backoff(random.Random(5), initial=1.0, factor=2.0, cap=8.0)
        service = ClientService(Refusing(), Factory.forProtocol(Protocol), retryPolicy=backoff.retry_policy(), clock=clock)
        service.startService()
        self.addCleanup(service.stopService)
        clock.pump([0.05] * 4000)  # 200 seconds
        gaps = [later - earlier for earlier, later in zip(attempts, attempts[1:])]
        self.assertGreater(len(gaps), 20)
        for number, gap in enumerate(gaps):
            self.assertLessEqual(gap, min(8.0, 2.0**number) + 0.05 + 1e-9)
        self.assertGreater(max(gaps[5:]), 4.0)  # grew towards the cap

    def test_honour_retry_after_once(self) -> None:
        """A retry_after told to the policy stretches the next delay only."""
        policy = Backoff(random.Random(2), initial=0.1, cap=1.0).retry_policy()
        policy.honour(5.0)
        policy.honour(3.0)  # the larger one wins
        self.assertGreaterEqual(policy(1), 5.0)
        self.assertLessEqual(policy(2), 1.0)

    def test_first_failure_is_attempt_zero(self) -> None:
        """ClientService's first failure (1) waits at most the initial delay."""
        policy = Backoff(random.Random(9), initial=0.5, cap=60.0).retry_policy()
        self.assertTrue(all(policy(1) <= 0.5 for _ in range(100)))


class FallingRateLogTests(SynchronousTestCase):
    """The 1st, 2nd, 4th, 8th ... failure is logged, and never less than once per interval."""

    def test_powers_of_two(self) -> None:
        """Failures arriving quickly are logged at their power-of-two counts."""
        clock = task.Clock()
        run = FallingRateLog(clock, interval=1000.0)
        logged = [n for n in range(1, 200) if run.failure()]
        self.assertEqual(logged, [1, 2, 4, 8, 16, 32, 64, 128])

    def test_at_least_once_per_interval(self) -> None:
        """A long run is still logged once every interval."""
        clock = task.Clock()
        run = FallingRateLog(clock, interval=60.0)
        logged_at = []
        for _ in range(1000):
            if run.failure():
                logged_at.append(clock.seconds())
            clock.advance(30.0)
        gaps = [b - a for a, b in zip(logged_at, logged_at[1:])]
        self.assertLessEqual(max(gaps), 60.0)
        self.assertLess(len(logged_at), 1000 / 2 + 10)  # not every failure

    def test_reset(self) -> None:
        """After a success, the next failure is the first of a new run."""
        run = FallingRateLog(task.Clock())
        for _ in range(5):
            run.failure()
        run.reset()
        self.assertTrue(run.failure())
        self.assertEqual(run.failures, 1)
