"""
The metadata server's side of discovery: register, then heartbeat, with
every discovery instance.

An :class:`Announcer` keeps one TLS connection per discovery instance, each
kept up by a ``ClientService``.  On every new connection it sends a signed
:class:`~lucidlink.protocol.messages.Register`, then a ``Heartbeat`` every
interval that discovery's ``Registered`` answer asks for.  A Heartbeat
carries every field of a Register, so a discovery instance that restarted
learns the whole entry from the next heartbeat.

When an instance cannot be reached, refuses the handshake or refuses the
registration, the connection is dropped and tried again after a capped
exponential backoff with full jitter, counted over consecutive failures
(whatever their kind), and the failures are logged at a falling rate: the
1st, 2nd, 4th, 8th... of a run, and once when it ends.
``announce_now()`` sends a heartbeat at once, for a status change.
"""

from __future__ import annotations

import random
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.application.internet import ClientService
from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import clientFromString, wrapClientTLS
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from lucidlink.client.backoff import Backoff
from lucidlink.discovery.auth import sign
from lucidlink.errors import Busy, ConnectionClosed, LucidError, RequestTimeout
from lucidlink.protocol.connection import ClientConnection
from lucidlink.protocol.messages import Heartbeat, Register, Registered, ServerStatus
from lucidlink.tls import PrivateCAClientTLS, client_tls_options, explain_tls_failure

DEFAULT_HEARTBEAT_INTERVAL = 5.0
DEFAULT_RETRY_INITIAL = 0.5
DEFAULT_RETRY_MAX = 30.0
NONCE_BYTES = 16


class Announcer:
    """Registers ``filespace`` as served by ``server_id`` with every discovery instance.

    ``discovery`` are the instances' client endpoint strings; their
    certificates must chain to ``ca_file`` and name ``discovery_identity``.
    ``status()`` is asked for the status to announce each time one is sent.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        discovery: Sequence[str],
        ca_file: Path,
        discovery_identity: str,
        key_id: str,
        secret: bytes,
        *,
        filespace: str,
        server_id: str,
        endpoints: Sequence[str],
        identity: str,
        status: Callable[[], ServerStatus],
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        retry_initial: float = DEFAULT_RETRY_INITIAL,
        retry_max: float = DEFAULT_RETRY_MAX,
        rng: random.Random | None = None,
    ) -> None:
        self.reactor = reactor
        self.ca_file = ca_file
        self.discovery_identity = discovery_identity
        self.key_id = key_id
        self.secret = secret
        self.filespace = filespace
        self.server_id = server_id
        self.endpoints = list(endpoints)
        self.identity = identity
        self.status = status
        self.heartbeat_interval = heartbeat_interval
        self.backoff = Backoff(rng or random.Random(), initial=retry_initial, cap=retry_max).retry_policy()
        self.links = [_Link(self, description) for description in discovery]

    def start(self) -> None:
        """Connect to every instance and keep registering."""
        for link in self.links:
            link.start()

    def stop(self) -> defer.Deferred[Any]:
        """Stop heartbeating and close every connection; the entries then expire."""
        return defer.gatherResults([link.stop() for link in self.links], consumeErrors=True)

    def announce_now(self) -> defer.Deferred[Any]:
        """Heartbeat every connected instance now (say, after a status change)."""
        return defer.gatherResults([link.announce_now() for link in self.links], consumeErrors=True)

    @property
    def registered_with(self) -> list[str]:
        """The instances whose latest registration or heartbeat was accepted."""
        return [link.description for link in self.links if link.registered]

    def message(self, message_type: type[Register]) -> Register:
        """A freshly stamped and signed Register or Heartbeat."""
        unsigned = message_type(
            filespace=self.filespace,
            server_id=self.server_id,
            endpoints=list(self.endpoints),
            identity=self.identity,
            status=self.status(),
            timestamp_ms=int(self.reactor.seconds() * 1000),
            nonce=secrets.token_bytes(NONCE_BYTES),
            key_id=self.key_id,
            mac=b"",
        )
        return sign(unsigned, self.key_id, self.secret)


class AnnouncerService(Service):
    """Starts and stops an :class:`Announcer` with the service tree."""

    def __init__(self, announcer: Announcer) -> None:
        self.announcer = announcer

    def startService(self) -> None:
        super().startService()
        self.announcer.start()

    def stopService(self) -> defer.Deferred[Any]:
        super().stopService()
        return self.announcer.stop()


class _Link:
    """The connection to one discovery instance and its heartbeat.

    ``ClientService`` keeps the connection; its retry policy reads this
    link's run of failures, which a successful connection alone does not
    end (only an accepted registration does), so an instance that accepts
    TCP but refuses TLS or the registration is backed off from as well.
    """

    def __init__(self, announcer: Announcer, description: str) -> None:
        self.announcer = announcer
        self.description = description
        self.log = announcer.log
        self.failures = 0
        self.registered = False
        self.connection: Any = None
        self._heartbeat_interval = announcer.heartbeat_interval
        self._beat_call: Any = None
        self._await_call: Any = None
        self._stopping = False
        reactor = announcer.reactor
        tls = client_tls_options(announcer.ca_file, announcer.discovery_identity)
        endpoint = _ObservedEndpoint(wrapClientTLS(tls, clientFromString(reactor, description)), self._failed)
        self.service = ClientService(
            endpoint, _ConnectionFactory(reactor, tls, announcer.server_id),
            retryPolicy=lambda attempt: announcer.backoff(max(attempt, self.failures)),
            clock=reactor,
        )

    def start(self) -> None:
        self._stopping = False
        self.service.startService()
        self._await_connection()

    def stop(self) -> defer.Deferred[Any]:
        self._stopping = True
        self._cancel_beat()
        if self._await_call is not None and self._await_call.active():
            self._await_call.cancel()
        self.registered = False
        return self.service.stopService()

    def announce_now(self) -> defer.Deferred[Any]:
        if self.connection is None or self._stopping:
            return defer.succeed(None)
        self._cancel_beat()
        return self._send(Heartbeat)

    # -- the connection ---------------------------------------------------------

    def _await_connection(self) -> None:
        if not self._stopping:
            self.service.whenConnected().addCallbacks(self._connected, lambda _: None)

    def _connected(self, connection: ClientConnection) -> None:
        lost = connection.when_lost()
        if lost.called:  # gone before we heard of it; ClientService is retrying
            lost.addCallback(lambda _: self._await_next_connection())
            return
        lost.addCallback(self._lost, connection)
        connection.ready.addCallbacks(lambda _: self._registering(connection), self._handshake_failed)

    def _registering(self, connection: ClientConnection) -> None:
        self.connection = connection
        self._send(Register)

    def _handshake_failed(self, failure: Failure) -> None:
        self._failed(failure.value)  # the connection is already gone

    def _lost(self, reason: LucidError, connection: ClientConnection) -> None:
        if self.connection is connection:
            self.connection = None
            self.registered = False
            self._cancel_beat()
        self._await_next_connection()

    def _await_next_connection(self) -> None:
        # ClientService learns of the loss just after the protocol does; until
        # then whenConnected() would still offer the lost connection.
        if not self._stopping and (self._await_call is None or not self._await_call.active()):
            self._await_call = self.announcer.reactor.callLater(0, self._await_connection)

    # -- registering and heartbeating ------------------------------------------

    def _send(self, message_type: type[Register]) -> defer.Deferred[Any]:
        connection = self.connection
        message = self.announcer.message(message_type)
        asked = connection.request(message, timeout=max(1.0, self._heartbeat_interval))
        return asked.addCallbacks(self._accepted, self._refused, errbackArgs=(connection, message_type))

    def _accepted(self, answer: Any) -> None:
        if not isinstance(answer, Registered):
            self._close(self.connection, f"expected Registered, got {type(answer).__name__}")
            return
        if answer.heartbeat_ms > 0:
            self._heartbeat_interval = answer.heartbeat_ms / 1000
        if self.failures:
            self.log.info(
                "registered {filespace} with discovery at {discovery} again, after {failures} failures",
                filespace=self.announcer.filespace, discovery=self.description, failures=self.failures,
            )
        elif not self.registered:
            self.log.info(
                "registered {filespace} with discovery at {discovery}; heartbeat every {interval:g} s",
                filespace=self.announcer.filespace, discovery=self.description, interval=self._heartbeat_interval,
            )
        self.failures = 0
        self.registered = True
        self._schedule_beat(self._heartbeat_interval)

    def _refused(self, failure: Failure, connection: ClientConnection, message_type: type[Register]) -> None:
        error = failure.value
        if connection is not self.connection or self._stopping:
            return  # that connection is gone; a new one registers afresh
        self.registered = False
        self._failed(error)
        if isinstance(error, Busy):
            self._schedule_beat(min(self._heartbeat_interval, max(error.retry_after_ms, 1) / 1000))
        elif isinstance(error, ConnectionClosed):
            pass
        elif isinstance(error, RequestTimeout):
            connection.transport.abortConnection()
        else:
            self._close(connection, f"registration refused: {error}")

    def _schedule_beat(self, delay: float) -> None:
        self._cancel_beat()
        if not self._stopping:
            self._beat_call = self.announcer.reactor.callLater(delay, self._beat)

    def _beat(self) -> None:
        self._beat_call = None
        if self.connection is not None and not self._stopping:
            self._send(Heartbeat)

    def _cancel_beat(self) -> None:
        if self._beat_call is not None and self._beat_call.active():
            self._beat_call.cancel()
        self._beat_call = None

    def _close(self, connection: ClientConnection | None, why: str) -> None:
        if connection is not None:
            connection.close(why)

    def _failed(self, error: BaseException) -> None:
        """Count a failure; log the 1st, 2nd, 4th, 8th... of a run."""
        if self._stopping:
            return
        self.failures += 1
        if self.failures & (self.failures - 1) == 0:
            self.log.warn(
                "cannot register {filespace} with discovery at {discovery} ({failures} failures in a row): {error}",
                filespace=self.announcer.filespace, discovery=self.description,
                failures=self.failures, error=_describe(error),
            )


class _ObservedEndpoint:
    """A client endpoint that reports each failed connection attempt."""

    def __init__(self, endpoint: Any, on_failure: Callable[[BaseException], object]) -> None:
        self.endpoint = endpoint
        self.on_failure = on_failure

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        def failed(failure: Failure) -> Failure:
            self.on_failure(failure.value)
            return failure

        return self.endpoint.connect(factory).addErrback(failed)


class _ConnectionFactory(Factory):
    """Builds the :class:`ClientConnection` to one discovery instance."""

    def __init__(self, reactor: Any, tls: PrivateCAClientTLS, peer_name: str) -> None:
        self.reactor = reactor
        self.tls = tls
        self.peer_name = peer_name
        self.noisy = False

    def buildProtocol(self, addr: Any) -> ClientConnection:
        tls = self.tls
        connection = ClientConnection(
            self.reactor,
            peer_name=self.peer_name,
            keepalive_interval=0,  # heartbeats keep it busy
            explain_failure=lambda reason: explain_tls_failure(reason, tls),
        )
        connection.factory = self
        return connection


def _describe(error: BaseException) -> str:
    return str(error) or Failure(error).getErrorMessage() or type(error).__name__
