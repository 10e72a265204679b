"""
Cheap load shedding: say "busy, retry after N ms" at once instead of queueing.

Limits, each costing next to nothing to enforce:

- :class:`AcceptGate` wraps the listening factory (the TLS factory, so
  outside TLS) and bounds the connections open and the handshakes (TLS and
  Hello) in progress.  At either bound it does not close anything: the
  listening ports stop accepting, and the kernel's listen backlog holds the
  new connections, in order, until there is room.  A client waits in that
  queue instead of backing off blindly and paying another handshake; beyond
  the backlog the kernel drops its SYN and TCP retransmits it later.  (Give
  the listen endpoint a large backlog: ``tcp:7000:backlog=4096``.)
- :class:`ConnectionCap`, the cruder older form, closes a connection over
  the cap as soon as it is accepted, before any handshake work is spent on
  it, and gives no hint of when to come back.
- :class:`SourceBuckets`, a token bucket per source address (a bounded LRU
  of sources), for the requests of one address.
- :class:`InFlightLimit`, a cap on requests being answered at once, over all
  connections.

The last two answer :class:`~lucidlink.errors.Busy` with a ``retry_after_ms``
a client can honour: for a bucket, the time until it holds a token again.
"""

from __future__ import annotations

import math
import random
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.protocols.policies import ProtocolWrapper, WrappingFactory

from lucidlink.errors import Busy, InvalidArgument

DEFAULT_MAX_SOURCES = 65_536
DEFAULT_IN_FLIGHT_RETRY_MS = 100

# Reasons a request or connection is shed: metric labels.
SOURCE_RATE = "source_rate"
IN_FLIGHT = "in_flight"
CONNECTIONS = "connections"

DEFAULT_MAX_HANDSHAKES = 128

_log = Logger()


class SourceBuckets:
    """A token bucket per source: ``rate`` tokens a second, holding at most ``burst``.

    Sources are kept in least-recently-used order and at most ``max_sources``
    of them; a source pushed out starts again with a full bucket, which is
    the price of bounded memory under a flood of addresses.  A ``rate`` of 0
    turns the limit off.
    """

    def __init__(
        self, clock: IReactorTime, *, rate: float, burst: float, max_sources: int = DEFAULT_MAX_SOURCES
    ) -> None:
        if rate < 0:
            raise InvalidArgument(f"a source's rate cannot be negative ({rate})")
        if rate > 0 and burst < 1:
            raise InvalidArgument(f"a source's burst must allow at least one request, not {burst}")
        if max_sources < 1:
            raise InvalidArgument(f"max_sources must be at least 1, not {max_sources}")
        self.clock = clock
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        # source -> [tokens, time of the last refill]; lists are updated in place.
        self._buckets: OrderedDict[str, list[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, source: str) -> int:
        """Take a token for ``source``: 0 if it had one, else the milliseconds until it will."""
        if self.rate <= 0:
            return 0
        now = self.clock.seconds()
        bucket = self._buckets.get(source)
        if bucket is None:
            bucket = self._buckets[source] = [self.burst, now]
            if len(self._buckets) > self.max_sources:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(source)
            bucket[0] = min(self.burst, bucket[0] + max(0.0, now - bucket[1]) * self.rate)
            bucket[1] = now
        if bucket[0] >= 1:
            bucket[0] -= 1
            return 0
        return max(1, math.ceil((1 - bucket[0]) / self.rate * 1000))

    def admit(self, source: str) -> None:
        """Take a token for ``source`` or raise Busy saying when to come back."""
        wait_ms = self.take(source)
        if wait_ms:
            raise Busy(f"too many requests from {source}; retry in {wait_ms} ms", retry_after_ms=wait_ms)


class InFlightLimit:
    """At most ``limit`` requests answered at once; the one over it is told to come back."""

    def __init__(self, limit: int, retry_after_ms: int = DEFAULT_IN_FLIGHT_RETRY_MS) -> None:
        if limit < 1:
            raise InvalidArgument(f"max_in_flight must be at least 1, not {limit}")
        self.limit = limit
        self.retry_after_ms = retry_after_ms
        self.in_flight = 0

    def acquire(self) -> None:
        """Count one more request in flight, or raise Busy if that would pass the limit."""
        if self.in_flight >= self.limit:
            raise Busy(
                f"discovery is answering {self.in_flight} requests; retry in {self.retry_after_ms} ms",
                retry_after_ms=self.retry_after_ms,
            )
        self.in_flight += 1

    def release(self) -> None:
        """One request in flight has been answered."""
        self.in_flight -= 1


class ConnectionCap(WrappingFactory):
    """Wraps a listening factory; over ``limit`` connections, closes new ones unserved.

    Returning None from ``buildProtocol`` makes the port close the accepted
    socket at once, so the wrapped factory (the TLS one) never sees the
    connection and no handshake is made.  ``on_refused`` is called per
    refused connection; the first refusal and the return below the cap are
    logged, not every refusal.
    """

    protocol = ProtocolWrapper

    def __init__(self, wrapped: Any, limit: int, on_refused: Callable[[], object] | None = None) -> None:
        if limit < 1:
            raise InvalidArgument(f"max_connections must be at least 1, not {limit}")
        super().__init__(wrapped)
        self.limit = limit
        self.on_refused = on_refused
        self.refused = 0
        self._shedding = False

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self.protocols)

    def buildProtocol(self, addr: Any) -> Any:
        if len(self.protocols) >= self.limit:
            self.refused += 1
            if not self._shedding:
                self._shedding = True
                _log.warn("{limit} connections open: closing new connections until some end", limit=self.limit)
            if self.on_refused is not None:
                self.on_refused()
            return None
        return super().buildProtocol(addr)

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        if self._shedding and len(self.protocols) < self.limit:
            self._shedding = False
            _log.info("below {limit} connections again: accepting new connections", limit=self.limit)


class AcceptGate(WrappingFactory):
    """
    Wraps a listening factory; stops accepting while too much is in progress.

    A connection counts as *handshaking* from its accept until
    :meth:`handshake_done` is called for it (discovery calls it when the
    client's Hello is answered, so after TLS) or it ends.  While
    ``max_handshakes`` are handshaking, or ``max_connections`` are open,
    every port given to :meth:`add_port` stops reading; below both it reads
    again.  Since a port accepts a batch of connections per wake-up, each
    port's batch is kept to its share of the room left, and ports resume in
    a shuffled order so that none is starved: the limits are exact to within
    one batch.  The first pause of a run and the return are logged;
    ``on_pause`` is called for every pause.
    """

    protocol = ProtocolWrapper

    def __init__(
        self,
        wrapped: Any,
        *,
        max_connections: int,
        max_handshakes: int = DEFAULT_MAX_HANDSHAKES,
        on_pause: Callable[[], object] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        if max_connections < 1:
            raise InvalidArgument(f"max_connections must be at least 1, not {max_connections}")
        if max_handshakes < 1:
            raise InvalidArgument(f"max_handshakes must be at least 1, not {max_handshakes}")
        super().__init__(wrapped)
        self.max_connections = max_connections
        self.max_handshakes = max_handshakes
        self.on_pause = on_pause
        self.rng = rng if rng is not None else random.Random()
        self.ports: list[Any] = []
        self.paused = False
        self.pauses = 0
        self._handshaking: set[ProtocolWrapper] = set()

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self.protocols)

    @property
    def handshakes(self) -> int:
        """Connections accepted whose handshake is not done yet."""
        return len(self._handshaking)

    def add_port(self, port: Any) -> Any:
        """Gate ``port`` (a listening port that can ``stopReading``); returns it."""
        self.ports.append(port)
        if self.paused:
            port.stopReading()
        else:
            port.numberAccepts = self._share()
        return port

    def remove_port(self, port: Any) -> None:
        """Stop gating ``port`` (it is about to stop listening)."""
        if port in self.ports:
            self.ports.remove(port)

    def buildProtocol(self, addr: Any) -> Any:
        wrapper = super().buildProtocol(addr)
        if wrapper is not None:
            self._handshaking.add(wrapper)
        self._update()
        return wrapper

    def handshake_done(self, connection: Any) -> None:
        """``connection`` (the protocol inside TLS, or its wrapper) finished its handshake."""
        transport = connection
        for _ in range(4):  # ServerConnection -> TLS protocol -> this gate's wrapper
            if transport in self._handshaking:
                self._handshaking.discard(transport)
                self._update()
                return
            transport = getattr(transport, "transport", None)
            if transport is None:
                return

    def unregisterProtocol(self, p: Any) -> None:
        super().unregisterProtocol(p)
        self._handshaking.discard(p)
        self._update()

    def _room(self) -> int:
        return min(self.max_connections - len(self.protocols), self.max_handshakes - len(self._handshaking))

    def _share(self) -> int:
        return max(1, self._room() // max(1, len(self.ports)))

    def _update(self) -> None:
        if self._room() <= 0:
            if not self.paused:
                self.paused = True
                self.pauses += 1
                if self.pauses == 1 or self._quiet_since_log():
                    _log.warn(
                        "{handshakes} handshakes in progress and {connections} connections open (limits"
                        " {max_handshakes} and {max_connections}): new connections wait in the listen backlog",
                        handshakes=len(self._handshaking), connections=len(self.protocols),
                        max_handshakes=self.max_handshakes, max_connections=self.max_connections,
                    )
                for port in self.ports:
                    port.stopReading()
                if self.on_pause is not None:
                    self.on_pause()
            return
        share = self._share()
        resuming, self.paused = self.paused, False
        if resuming:
            self.rng.shuffle(self.ports)
        for port in self.ports:
            port.numberAccepts = share
            if resuming and getattr(port, "connected", True):
                port.startReading()

    def _quiet_since_log(self) -> bool:
        # One log line per 1,000 pauses: a storm pauses thousands of times.
        return self.pauses % 1000 == 0
