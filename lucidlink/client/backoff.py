"""
How long to wait before trying again, and when to say so in the log.

Every retry of the client — to a discovery instance, to a metadata server —
waits a capped exponential backoff with *full jitter*: the delay before retry
``attempt`` (0 for the first retry) is drawn uniformly from
``[0, min(cap, initial * factor ** attempt)]``.  Full jitter spreads a crowd
of clients that failed at the same moment (a server restart, a network
blip) over the whole window instead of bringing them back in lockstep.

A server that sheds load says how long to stay away (``retry_after_ms`` on
:class:`~lucidlink.errors.Busy` and other retryable errors); a delay is never
shorter than that.  A client that waits out a ``Busy`` on the connection it
was told on (:meth:`Backoff.after_busy`) draws its delay from
``[retry_after, 2 * retry_after]``: a crowd told the same hint at the same
moment comes back spread over a window as wide as the hint, not all at once.

:class:`Backoff` is the policy; :meth:`Backoff.retry_policy` adapts it to
Twisted's ``ClientService`` (``retryPolicy=``), and the adapter can be told
about a server's ``retry_after`` between attempts.  :class:`FallingRateLog`
decides which failures of a long run (a ``--hard`` mount waiting out an
outage) are worth a log line.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

from twisted.internet.interfaces import IReactorTime

from lucidlink.errors import InvalidArgument

DEFAULT_INITIAL = 0.25
DEFAULT_FACTOR = 2.0
DEFAULT_CAP = 30.0


@dataclass
class Backoff:
    """Capped exponential backoff with full jitter, drawn from an injected random source."""

    rng: random.Random = field(default_factory=random.Random)
    initial: float = DEFAULT_INITIAL
    factor: float = DEFAULT_FACTOR
    cap: float = DEFAULT_CAP

    def __post_init__(self) -> None:
        if not (self.initial > 0 and self.cap >= self.initial and self.factor >= 1):
            raise InvalidArgument(
                f"backoff needs 0 < initial <= cap and factor >= 1, not initial={self.initial},"
                f" factor={self.factor}, cap={self.cap}"
            )

    def ceiling(self, attempt: int) -> float:
        """The largest delay retry ``attempt`` (0 for the first) may wait: ``min(cap, initial * factor**attempt)``."""
        if attempt <= 0:
            return self.initial
        if self.factor == 1:
            return self.initial
        # Compare exponents rather than computing factor**attempt, which
        # overflows a float long before a --hard mount stops retrying.
        if attempt >= math.log(self.cap / self.initial, self.factor):
            return self.cap
        return min(self.cap, self.initial * self.factor**attempt)

    def delay(self, attempt: int, retry_after: float = 0.0) -> float:
        """
        Seconds to wait before retry ``attempt`` (0 for the first).

        Drawn uniformly from ``[0, ceiling(attempt)]``, but never less than
        ``retry_after`` seconds, which is what a server asked for.
        """
        return max(retry_after, self.rng.uniform(0.0, self.ceiling(attempt)))

    def after_busy(self, retry_after: float) -> float:
        """
        Seconds to wait before asking again on the connection that answered ``Busy``.

        Drawn uniformly from ``[retry_after, retry_after + min(retry_after, cap)]``;
        a hint of 0 gets ``[0, initial]``.
        """
        spread = min(retry_after, self.cap) if retry_after > 0 else self.initial
        return retry_after + self.rng.uniform(0.0, spread)

    def retry_policy(self) -> RetryPolicy:
        """A ``retryPolicy`` for ``twisted.application.internet.ClientService``."""
        return RetryPolicy(self)


class RetryPolicy:
    """
    ``ClientService``'s ``retryPolicy``: failed attempts in a row → seconds to wait.

    ``ClientService`` calls it with 1 after the first failure, so that
    waits :meth:`Backoff.delay` for attempt 0.  A server's ``retry_after``
    reaches it through :meth:`honour` (from the code that saw the error,
    such as a ``prepareConnection`` or the session that was told
    :class:`~lucidlink.errors.Busy`); the next delay is at least that long.
    """

    def __init__(self, backoff: Backoff) -> None:
        self.backoff = backoff
        self._retry_after = 0.0

    def honour(self, retry_after: float) -> None:
        """Wait at least ``retry_after`` seconds before the next attempt."""
        self._retry_after = max(self._retry_after, retry_after)

    def __call__(self, failed_attempts: int) -> float:
        retry_after, self._retry_after = self._retry_after, 0.0
        return self.backoff.delay(max(0, failed_attempts - 1), retry_after)


def retry_after_seconds(error: BaseException) -> float:
    """The ``retry_after_ms`` an error carries, in seconds (0 when it has none)."""
    return max(0, getattr(error, "retry_after_ms", 0) or 0) / 1000.0


class FallingRateLog:
    """
    Which failures of a run are worth logging: the 1st, 2nd, 4th, 8th, ...

    A run of failures that lasts (a ``--hard`` mount waiting for a server
    to come back) is logged at a falling rate so that it does not flood the
    log, yet never goes quiet for longer than ``interval`` seconds: a
    failure is logged when its number in the run is a power of two, or when
    the last logged one is at least ``interval`` seconds old.
    :meth:`reset` starts a new run (after a success).
    """

    def __init__(self, clock: IReactorTime, interval: float = 300.0) -> None:
        self.clock = clock
        self.interval = interval
        self.failures = 0
        self._last_logged: float | None = None

    def failure(self) -> bool:
        """Count one more failure; true when this one should be logged."""
        self.failures += 1
        now = self.clock.seconds()
        power_of_two = self.failures & (self.failures - 1) == 0
        overdue = self._last_logged is not None and now - self._last_logged >= self.interval
        if power_of_two or overdue:
            self._last_logged = now
            return True
        return False

    def reset(self) -> None:
        """The run is over: the next failure is the first of a new run."""
        self.failures = 0
        self._last_logged = None
