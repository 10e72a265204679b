"""
A discovery stand-in for the client's tests, apart from the real discovery service.

:class:`StandInDiscovery` is an :class:`IResponder` that answers ``Resolve``
from a dict, can be told to answer ``Busy`` or to hang, answers
``UnknownFilespace`` for names it does not know, and counts requests.  It
runs in memory behind :class:`FakeNetwork` (a ``connect`` function for unit
tests on a ``task.Clock``) or on loopback over real TLS with
:class:`LoopbackDiscovery`.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Mapping
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from zope.interface import implementer

from lucidlink import errors
from lucidlink.protocol.connection import IResponder, ServerConnection, ServerFactory
from lucidlink.protocol.messages import PROTOCOL_VERSION, Hello, Resolve, Resolved, ServerStatus, Welcome
from lucidlink.protocol.network import listen_tls
from lucidlink.tls import issue_certificate, server_tls_options

DISCOVERY_IDENTITY = "discovery.lucid"


def resolved(
    filespace: str,
    endpoints: tuple[str, ...] = ("tcp:127.0.0.1:7100",),
    status: ServerStatus = ServerStatus.SERVING,
    ttl_ms: int = 30_000,
) -> Resolved:
    """The answer a discovery instance gives for a served filespace."""
    return Resolved(filespace, list(endpoints), f"meta.{filespace}.lucid", ttl_ms, status)


@implementer(IResponder)
class StandInDiscovery:
    """Answers Resolve from ``answers``; Busy while told to; counts every Resolve."""

    def __init__(self, answers: Mapping[str, Resolved] | None = None) -> None:
        self.answers = dict(answers or {})
        self.requests = 0
        self.busy: list[int] = []
        """retry_after_ms of the Busy answers to give next, one per request."""
        self.busy_always_ms: int | None = None
        self.silent = False
        """When true, requests are never answered."""

    def welcome(self, connection: ServerConnection, hello: Hello) -> Welcome:
        return Welcome(PROTOCOL_VERSION, "stand-in discovery", 1, 15_000, ServerStatus.SERVING)

    def respond(self, connection: ServerConnection | None, message: Any) -> Any:
        if not isinstance(message, Resolve):
            raise errors.NotSupported(f"{type(message).__name__} is not served here")
        self.requests += 1
        if self.silent:
            return defer.Deferred()
        if self.busy:
            raise errors.Busy("over capacity", retry_after_ms=self.busy.pop(0))
        if self.busy_always_ms is not None:
            raise errors.Busy("over capacity", retry_after_ms=self.busy_always_ms)
        answer = self.answers.get(message.filespace)
        if answer is None:
            raise errors.UnknownFilespace(f"{message.filespace!r} is not registered here")
        return answer

    def connection_ended(self, connection: ServerConnection, reason: errors.LucidError) -> None:
        pass


class FakeConnection:
    """What a connect function gives in unit tests: requests go straight to a responder."""

    def __init__(self, endpoint: str, identity: str, responder: Any = None) -> None:
        self.endpoint = endpoint
        self.identity = identity
        self.responder = responder
        self.closed = False

    def request(self, message: Any, timeout: float | None = None) -> defer.Deferred[Any]:
        return defer.maybeDeferred(self.responder.respond, None, message)

    def close(self, text: str = "closing", timeout: float = 5.0) -> defer.Deferred[Any]:
        self.closed = True
        return defer.succeed(errors.ConnectionClosed(text))


class FakeNetwork:
    """
    A ``connect(endpoint, identity)`` for unit tests, and what it was asked.

    Each endpoint is a responder (connections reach it), ``"up"`` (a
    connection with no responder: a metadata server), ``"hang"`` (the
    connection never completes), ``"slow"`` (the TCP connection is made, as
    ``connected`` is told, and the handshake waits in :attr:`slow` until a
    test fires it), an exception (the connection fails with it), or absent
    (the connection is refused, as connect_tls says it).
    """

    reports_connected = True

    def __init__(self) -> None:
        self.endpoints: dict[str, Any] = {}
        self.calls: list[tuple[str, str]] = []
        self.connections: list[FakeConnection] = []
        self.slow: list[tuple[str, defer.Deferred[Any]]] = []
        """(endpoint, the handshake's Deferred) of the "slow" connections, in order."""

    def connect(
        self, endpoint: str, identity: str, connected: Callable[[], object] | None = None
    ) -> defer.Deferred[Any]:
        self.calls.append((endpoint, identity))
        behaviour = self.endpoints.get(endpoint)
        if behaviour == "slow":
            if connected is not None:
                connected()
            handshake: defer.Deferred[Any] = defer.Deferred()
            self.slow.append((endpoint, handshake))
            return handshake
        if behaviour is None:
            return defer.fail(
                errors.Unavailable(
                    f"cannot connect to {endpoint}: Connection was refused by other side: 111: Connection refused."
                )
            )
        if behaviour == "hang":
            return defer.Deferred()
        if isinstance(behaviour, Exception):
            return defer.fail(behaviour)
        connection = FakeConnection(endpoint, identity, None if behaviour == "up" else behaviour)
        self.connections.append(connection)
        return defer.succeed(connection)

    def asked(self) -> list[str]:
        """The endpoints connected to, in order."""
        return [endpoint for endpoint, _ in self.calls]


class LoopbackDiscovery:
    """A stand-in discovery instance on 127.0.0.1, over real TLS with a private CA's certificate."""

    def __init__(self, responder: StandInDiscovery, port: Any, factory: Any) -> None:
        self.responder = responder
        self.port = port
        self.factory = factory
        self.stopped = False
        self.endpoint = f"tcp:127.0.0.1:{port.getHost().port}"
        """Where it listens (or listened, once stopped)."""

    @classmethod
    @defer.inlineCallbacks
    def start(
        cls,
        ca_dir: Path,
        responder: StandInDiscovery,
        names: tuple[str, ...] = (DISCOVERY_IDENTITY,),
        **certificate: Any,
    ) -> Generator[defer.Deferred[Any], Any, LoopbackDiscovery]:
        """Listen on a free loopback port with a certificate for ``names``."""
        prefix = ca_dir.parent / f"discovery-{id(responder)}-{len(names)}"
        cert, key = issue_certificate(ca_dir, list(names), prefix, force=True, **certificate)
        factory = _TrackingFactory(responder, reactor, keepalive_interval=0)
        port = yield listen_tls(reactor, "tcp:0:interface=127.0.0.1", server_tls_options(cert, key), factory)
        return cls(responder, port, factory)

    def stop(self) -> defer.Deferred[Any]:
        """Stop listening and drop every open connection, as a crashed instance would."""
        if self.stopped:
            return defer.succeed(None)
        self.stopped = True
        waiting = [defer.maybeDeferred(self.port.stopListening)]
        for connection in list(self.factory.connections):
            waiting.append(connection.when_lost())
            connection.transport.abortConnection()
        return defer.gatherResults(waiting)


class _TrackingFactory(ServerFactory):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.connections: set[ServerConnection] = set()

    def buildProtocol(self, addr: Any) -> ServerConnection:
        connection = super().buildProtocol(addr)
        self.connections.add(connection)
        connection.when_lost().addBoth(lambda _: self.connections.discard(connection))
        return connection
