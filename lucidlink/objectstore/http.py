"""
HTTP plumbing of the S3 store, tuned for multi-megabyte bodies.

Twisted's HTTP client handles any body size, but its defaults cost CPU on
the reactor's one thread when every body is a 4 MiB chunk:

- :class:`BodyReader` collects a response body, reading the socket in
  :data:`BODY_READ_SIZE` pieces while the body streams (instead of 64 KiB),
  and asking the kernel (``SO_RCVLOWAT``) to wake the reactor for the
  socket only once that much has arrived, so a 4 MiB body takes four or
  five reactor turns, not sixty-four, and the kernel sends fewer window
  updates.  The larger reads start only once the headers are
  parsed: Twisted's header parser copies the rest of its buffer for every
  header line.  It hands over the pieces as they came, unjoined, so that
  the caller can join a large body in a thread (``bytes.join`` lets go of
  the GIL for large results) rather than on the reactor's thread.
- :class:`BytesProducer` hands a large request body to the connection
  after the request's headers have gone out, so the transport sends the
  body from the caller's own ``bytes`` instead of first joining it with
  the headers into one new buffer.
- :class:`Endpoints` connects straight to an IP address (a test server, a
  MinIO on loopback), without a name lookup in the reactor's thread pool
  for every new connection; host names go through ``HostnameEndpoint``.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.endpoints import (
    HostnameEndpoint,
    TCP4ClientEndpoint,
    TCP6ClientEndpoint,
    wrapClientTLS,
)
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import URI, BrowserLikePolicyForHTTPS, ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import IAgentEndpointFactory, IBodyProducer, IPolicyForHTTPS
from zope.interface import implementer

BODY_READ_SIZE = 2 * 1024 * 1024
"""Bytes asked of the socket per read while a response body streams, and how many wake the reactor."""
WAKE_MARGIN = 64 * 1024
"""The last bytes of a body wake the reactor as they come (under TLS, fewer than the body's may be on the wire)."""
_SO_RCVLOWAT = getattr(socket, "SO_RCVLOWAT", None)
LATE_WRITE_SIZE = 128 * 1024
"""Request bodies at least this large wait for the headers to go out (smaller ones are cheap to copy)."""


def _socket_transport(transport: Any) -> Any:
    """The transport that reads the socket, under any TLS layer and the body's proxy of it."""
    transport = getattr(transport, "_producer", transport)  # twisted.web's TransportProxyProducer
    while not hasattr(transport, "socket") and getattr(transport, "transport", None) is not None:
        transport = transport.transport  # TLS: TLSMemoryBIOProtocol over TCP
    return transport if hasattr(transport, "socket") else None


class BodyReader(Protocol):
    """
    Collects a response body; ``done`` fires with its pieces or fails with why it stopped.

    The pieces are the body's ``bytes`` in the order they arrived (none
    for an empty body); ``size`` counts them.  ``length`` (the
    Content-Length, if known) bounds the socket reads made for it, and
    the socket's low-water mark, which stays below the bytes still to
    come and is back to 1 when the body ends.  Cancelling ``done``
    aborts the connection.
    """

    def __init__(self, length: int | None = None) -> None:
        self.length = length
        self.pieces: list[bytes] = []
        self.size = 0
        self.done: Deferred[list[bytes]] = Deferred(self._cancel)
        self._reader: Any = None
        self._low_water = 1

    def connectionMade(self) -> None:
        reader = _socket_transport(self.transport)
        if reader is not None and self.length is not None and self.length > reader.bufferSize:
            reader.bufferSize = min(self.length, BODY_READ_SIZE)
            self._reader = reader
            self._lower_water()

    def _lower_water(self) -> None:
        """Set the socket's low-water mark for the bytes still to come (only when it changes)."""
        assert self.length is not None
        mark = max(1, min(BODY_READ_SIZE, self.length - self.size - WAKE_MARGIN))
        if mark != self._low_water:
            self._set_low_water(mark)

    def _set_low_water(self, mark: int) -> None:
        connection = getattr(self._reader, "socket", None)  # none once the connection is lost
        if _SO_RCVLOWAT is None or connection is None:
            return
        try:
            connection.setsockopt(socket.SOL_SOCKET, _SO_RCVLOWAT, mark)
        except OSError:  # a closed socket, a platform without the option: reads go on as before
            return
        self._low_water = mark

    def _cancel(self, _: Deferred[list[bytes]]) -> None:
        producer = getattr(self.transport, "_producer", None)
        abort = getattr(producer, "abortConnection", None)
        if abort is not None:
            abort()
        elif self.transport is not None:
            self.transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        self.pieces.append(data)
        self.size += len(data)
        if self._low_water > 1:
            self._lower_water()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self._reader is not None:
            del self._reader.bufferSize  # back to the class's size, for the next answer's headers
            if self._low_water != 1:
                self._set_low_water(1)
            self._reader = None
        if self.done.called:
            return
        if reason.check(ResponseDone, PotentialDataLoss):
            self.done.callback(self.pieces)
        else:
            self.done.errback(reason)


@implementer(IBodyProducer)
class BytesProducer:
    """
    A request body already in memory, written to the connection in one piece.

    A body of :data:`LATE_WRITE_SIZE` bytes or more is written two reactor
    turns after the request starts: by then the reactor has written the
    request's headers to the socket, so the transport's buffer holds the
    body alone and sends it without copying.  Should the headers still be
    waiting, the body is only copied once, as it would have been anyway.
    A smaller body is written at once, adding no latency.
    """

    def __init__(self, body: bytes, clock: Any) -> None:
        self.body = body
        self.length = len(body)
        self._clock = clock
        self._pending: IDelayedCall | None = None

    def startProducing(self, consumer: Any) -> Deferred[None]:
        finished: Deferred[None] = Deferred()

        def write() -> None:
            self._pending = None
            consumer.write(self.body)
            finished.callback(None)

        def after_one_turn() -> None:
            self._pending = self._clock.callLater(0, write)

        if len(self.body) < LATE_WRITE_SIZE:
            consumer.write(self.body)
            finished.callback(None)
        else:
            self._pending = self._clock.callLater(0, after_one_turn)
        return finished

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        """The request was abandoned: write nothing (``startProducing``'s Deferred never fires)."""
        if self._pending is not None and self._pending.active():
            self._pending.cancel()
        self._pending = None


@implementer(IAgentEndpointFactory)
class Endpoints:
    """Where an ``Agent`` connects for a URI: IP addresses directly, host names after a lookup."""

    def __init__(
        self,
        reactor: Any,
        connect_timeout: float,
        tls_policy: IPolicyForHTTPS | None = None,
    ) -> None:
        self._reactor = reactor
        self._timeout = connect_timeout
        self._tls_policy = tls_policy or BrowserLikePolicyForHTTPS()

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        host = uri.host.decode("ascii").strip("[]")
        endpoint: IStreamClientEndpoint
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            endpoint = HostnameEndpoint(self._reactor, host, uri.port, timeout=self._timeout)
        else:
            tcp = TCP6ClientEndpoint if address.version == 6 else TCP4ClientEndpoint
            endpoint = tcp(self._reactor, host, uri.port, timeout=self._timeout)
        if uri.scheme == b"https":
            return wrapClientTLS(self._tls_policy.creatorForNetloc(uri.host, uri.port), endpoint)
        if uri.scheme == b"http":
            return endpoint
        raise ValueError(
            f"the object store speaks http or https, not {uri.scheme.decode('ascii', 'replace')}"
        )
