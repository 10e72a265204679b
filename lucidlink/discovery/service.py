"""
Discovery's answers: the :class:`~lucidlink.protocol.connection.IResponder`
behind every discovery connection.

- ``Register`` / ``Heartbeat``: the MAC, key, timestamp and nonce are checked
  (:mod:`lucidlink.discovery.auth`), then the registry entry is created or
  renewed; the answer is ``Registered`` with the entry's TTL and the
  heartbeat interval the server should keep.
- ``Resolve``: the source's token bucket is charged, then the registry is
  asked, then the static map; the answer is ``Resolved``, or
  :class:`~lucidlink.errors.UnknownFilespace` with one fixed message,
  whether the name expired, was never seen, or is malformed.

Every request is counted in the metrics by type, outcome and time taken.
Every answer is computed at once (nothing here waits on I/O), so the
in-flight limit is only reached if an answer ever comes to wait; until then
the connection cap and the per-source buckets are what shed load.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from lucidlink.discovery.auth import RegistrationVerifier
from lucidlink.discovery.metrics import DiscoveryMetrics
from lucidlink.discovery.registry import Location, Registry
from lucidlink.discovery.shedding import IN_FLIGHT, SOURCE_RATE, InFlightLimit, SourceBuckets
from lucidlink.discovery.static_map import StaticMap
from lucidlink.errors import (
    AuthenticationFailed,
    Busy,
    InvalidArgument,
    LucidError,
    NoSpace,
    NotSupported,
    UnknownFilespace,
)
from lucidlink.protocol.connection import IResponder, ServerConnection
from lucidlink.protocol.messages import (
    PROTOCOL_VERSION,
    Heartbeat,
    Hello,
    Register,
    Registered,
    Resolve,
    Resolved,
    ServerStatus,
    Welcome,
)

UNKNOWN_FILESPACE_MESSAGE = "discovery knows no filespace by that name"

_OUTCOMES: tuple[tuple[type[LucidError], str], ...] = (
    (Busy, "busy"),
    (UnknownFilespace, "unknown_filespace"),
    (AuthenticationFailed, "refused"),
    (InvalidArgument, "invalid"),
    (NoSpace, "full"),
)


@implementer(IResponder)
class DiscoveryResponder:
    """Registrations in, locations out; see the module docstring.

    ``timer`` measures how long answers take (a monotonic clock, apart from
    the registry's wall clock).  ``handshaken`` is told of every connection
    whose Hello is answered (its TLS handshake is done by then): the accept
    gate's :meth:`~lucidlink.discovery.shedding.AcceptGate.handshake_done`.
    """

    log = Logger()

    def __init__(
        self,
        registry: Registry,
        verifier: RegistrationVerifier,
        *,
        heartbeat_interval: float,
        static_map: StaticMap | None = None,
        buckets: SourceBuckets | None = None,
        in_flight: InFlightLimit | None = None,
        metrics: DiscoveryMetrics | None = None,
        server_name: str = "lucid-discovery",
        timer: Callable[[], float] = time.perf_counter,
        handshaken: Callable[[ServerConnection], object] | None = None,
    ) -> None:
        self.registry = registry
        self.verifier = verifier
        self.heartbeat_interval = heartbeat_interval
        self.static_map = static_map if static_map is not None else StaticMap()
        self.buckets = buckets
        self.in_flight = in_flight
        self.metrics = metrics if metrics is not None else DiscoveryMetrics()
        self.server_name = server_name
        self.timer = timer
        self.handshaken = handshaken
        self._sessions = itertools.count(1)
        self._registered = Registered(int(registry.entry_ttl * 1000), int(heartbeat_interval * 1000))

    # -- IResponder -----------------------------------------------------------

    def welcome(self, connection: ServerConnection, hello: Hello) -> Welcome:
        """Every client is welcome; note its address for its token bucket."""
        connection.session = _source_of(connection)
        if self.handshaken is not None:
            self.handshaken(connection)
        return Welcome(PROTOCOL_VERSION, self.server_name, next(self._sessions), 0, ServerStatus.SERVING)

    def respond(self, connection: ServerConnection, message: Any) -> Any:
        """Answer one request; see the module docstring."""
        kind = type(message)
        if kind is Resolve:
            request_type, answer = "resolve", self._resolve
        elif kind is Heartbeat:
            request_type, answer = "heartbeat", self._register
        elif kind is Register:
            request_type, answer = "register", self._register
        else:
            raise NotSupported(f"discovery does not answer {kind.__name__}")
        started = self.timer()
        outcome = "error"
        try:
            result = self._within_limit(answer, connection.session or "unknown", message)
            outcome = "ok"
            return result
        except LucidError as error:
            outcome = _outcome_of(error)
            raise
        finally:
            self.metrics.request_done(request_type, outcome, self.timer() - started)

    def connection_ended(self, connection: ServerConnection, reason: LucidError) -> None:
        """Nothing is held per connection."""

    # -- the answers ----------------------------------------------------------

    def _within_limit(self, answer: Callable[[str, Any], Any], source: str, message: Any) -> Any:
        """``answer(source, message)``, counted against the in-flight limit."""
        if self.in_flight is None:
            return answer(source, message)
        try:
            self.in_flight.acquire()
        except Busy:
            self.metrics.shed_one(IN_FLIGHT)
            raise
        try:
            return answer(source, message)
        finally:
            self.in_flight.release()

    def _resolve(self, source: str, message: Resolve) -> Resolved:
        if self.buckets is not None:
            try:
                self.buckets.admit(source)
            except Busy:
                self.metrics.shed_one(SOURCE_RATE)
                raise
        location = self.locate(message.filespace)
        if location is None:
            raise UnknownFilespace(UNKNOWN_FILESPACE_MESSAGE)
        return Resolved(
            location.filespace, list(location.endpoints), location.identity, location.ttl_ms, location.status
        )

    def locate(self, filespace: str) -> Location | None:
        """A live registration for ``filespace``, else its static entry, else None."""
        location = self.registry.resolve(filespace)
        if location is None:
            location = self.static_map.lookup(filespace)
        return location

    def _register(self, source: str, message: Register) -> Registered:
        self.verifier.verify(message, source)
        before = self.registry.get(message.filespace, message.server_id)
        entry = self.registry.register(
            message.filespace, message.server_id, message.endpoints, message.identity, message.status
        )
        if before is None or before.status != entry.status or before.endpoints != entry.endpoints:
            self.log.info(
                "filespace {filespace}: server {server_id} at {endpoints} is {status} (from {source})",
                filespace=entry.filespace, server_id=entry.server_id, endpoints=", ".join(entry.endpoints),
                status=entry.status.name, source=source,
            )
        return self._registered


def _outcome_of(error: LucidError) -> str:
    for cls, outcome in _OUTCOMES:
        if isinstance(error, cls):
            return outcome
    return "error"


def _source_of(connection: ServerConnection) -> str:
    """The peer's host (its port differs per connection, so it is left out)."""
    try:
        address = connection.transport.getPeer()  # type: ignore[union-attr]
    except Exception:
        return "unknown"
    host = getattr(address, "host", None) or getattr(address, "name", None)
    return str(host) if host else str(address)
