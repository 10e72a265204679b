"""
The Twisted side of the wire protocol: one TLS connection per session.

:class:`LucidConnection` feeds bytes to the sans-IO
:class:`~lucidlink.protocol.codec.FrameDecoder` and adds what needs a clock
and a transport: requests matched to answers by id (pipelined, answered in
any order), per-request timeouts, keepalive pings, pushed notifications and a
graceful close.  :class:`ClientConnection` opens with the version handshake;
:class:`ServerConnection` waits for it and hands every request to an
:class:`IResponder`, the business logic, which never sees bytes.
"""

from __future__ import annotations

import itertools
import math
import secrets
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface

from lucidlink.errors import (
    Busy,
    ConnectionClosed,
    InternalError,
    InvalidArgument,
    LucidError,
    NotSupported,
    ProtocolError,
    RequestTimeout,
    VersionMismatch,
    error_from_wire,
)
from lucidlink.protocol.codec import FrameDecoder, encode_frame, frame_encoders
from lucidlink.protocol.messages import (
    DEFAULT_MAX_FRAME_LENGTH,
    MESSAGE_CLASSES,
    PROTOCOL_VERSION,
    Error,
    Flags,
    Goodbye,
    Hello,
    Ping,
    Pong,
    Welcome,
)

DEFAULT_REQUEST_TIMEOUT = 30.0
DEFAULT_KEEPALIVE_INTERVAL = 15.0
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
DEFAULT_CLOSE_TIMEOUT = 5.0
DEFAULT_MAX_IN_FLIGHT = 256
_REQUEST_ID_LIMIT = 2**32
OWN_REQUEST_ID_LIMIT = 2**31
"""A connection numbers its requests below this; ids from here up are its caller's to give."""
_RESPONSE = int(Flags.RESPONSE)
_PUSH = int(Flags.PUSH)
_MESSAGE_TYPES = frozenset(MESSAGE_CLASSES.values())


class IResponder(Interface):
    """The business logic behind a server connection."""

    def welcome(connection: ServerConnection, hello: Hello) -> Any:  # type: ignore[misc]
        """Accept a handshake: return a Welcome (or a Deferred of one), or raise LucidError."""

    def respond(connection: ServerConnection, message: Any) -> Any:  # type: ignore[misc]
        """Answer one request with a message (or a Deferred of one), or raise LucidError."""

    def connection_ended(connection: ServerConnection, reason: LucidError) -> None:  # type: ignore[misc]
        """The session is over; release what it held."""


class LucidConnection(Protocol):
    """Framing, request matching, keepalive and close, shared by both ends."""

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        *,
        request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
        keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL,
        max_frame_length: int = DEFAULT_MAX_FRAME_LENGTH,
        on_push: Callable[[Any], None] | None = None,
    ) -> None:
        self.clock = clock
        self.version = PROTOCOL_VERSION  # of the frames this end sends
        self.request_timeout = request_timeout
        self.keepalive_interval = keepalive_interval
        self.on_push = on_push
        self.decoder = FrameDecoder(max_frame_length)
        self.handshaken = False
        self.closing = False
        self.close_reason: LucidError | None = None
        self.peer_goodbye: str | None = None
        # request id -> (Deferred, message class, deadline, timeout)
        self._pending: dict[int, tuple[defer.Deferred[Any], type, float, float]] = {}
        self._timeout_call: Any = None
        self._timeout_at = math.inf  # when _timeout_call fires; inf when there is none
        self._request_ids = itertools.count(1)
        self._last_received = clock.seconds()
        self._batch_time: float | None = None  # when the batch of frames being handled arrived
        self._keepalive_call: Any = None
        self._close_deadline: Any = None
        self._lost = False
        self._lost_waiters: list[defer.Deferred[LucidError]] = []
        self._in_flight = 0
        self._broken = False
        self._corked: list[bytes] | None = None
        # Frames of requests waiting for the handshake to finish (a client's), or None.
        self._held: list[tuple[bytes, int]] | None = None
        # What the decoder calls with each frame; a server swaps it after the handshake.
        self._on_frame: Callable[[int, int, Any, int], None] = self._frame_received

    # -- what callers use -------------------------------------------------

    @property
    def peer(self) -> str:
        """The peer's address, for log lines."""
        try:
            address = self.transport.getPeer()  # type: ignore[union-attr]
        except Exception:
            return "unknown peer"
        host = getattr(address, "host", None)
        port = getattr(address, "port", None)
        return f"{host}:{port}" if host is not None else str(address)

    def request(self, message: Any, timeout: float | None = None, request_id: int | None = None) -> defer.Deferred[Any]:
        """
        Send ``message``; the Deferred fires with the answer or fails with a LucidError.

        ``request_id``: the id to send it under (from ``OWN_REQUEST_ID_LIMIT``
        up, not in flight), for a request sent again as itself; else the
        connection numbers it.
        """
        if self._lost or self.closing or self.peer_goodbye is not None:
            return defer.fail(self._closed_error(f"cannot send {type(message).__name__}"))
        pending = self._pending
        if request_id is not None:
            if not OWN_REQUEST_ID_LIMIT <= request_id < _REQUEST_ID_LIMIT or request_id in pending:
                return defer.fail(InvalidArgument(f"request id {request_id} is not free on this connection"))
        else:
            request_id = next(self._request_ids)
            if request_id >= OWN_REQUEST_ID_LIMIT or request_id in pending:
                request_id = self._next_request_id()
        try:
            frame = frame_encoders[type(message)](message, request_id, 0, self.version)
        except Exception:
            frame = encode_frame(message, request_id, 0, self.version)  # raises the error that names the problem
        deferred: defer.Deferred[Any] = Deferred()
        if timeout is None:
            timeout = self.request_timeout
        # Requests made while a batch of answers is handled take the batch's time: one clock call a batch.
        now = self._batch_time
        deadline = (self.clock.seconds() if now is None else now) + timeout
        pending[request_id] = (deferred, type(message), deadline, timeout)
        if deadline < self._timeout_at:  # one timer serves all; later requests expire later
            self._arm_request_timer(deadline, timeout)
        if self._held is not None:
            self._held.append((frame, request_id))
        elif self._corked is not None:
            self._corked.append(frame)
        else:
            self.transport.write(frame)  # type: ignore[union-attr]
        return deferred

    def push(self, message: Any) -> None:
        """Send ``message`` unasked (a notification)."""
        if not self._lost:
            self._write(message, 0, _PUSH)

    def cork(self) -> bool:
        """Hold back what is written from now on until :meth:`uncork`; False if already corked."""
        if self._corked is not None:
            return False
        self._corked = []
        return True

    def uncork(self) -> None:
        """Send everything written since :meth:`cork` in one write."""
        self._flush()

    def close(self, text: str = "closing", timeout: float = DEFAULT_CLOSE_TIMEOUT) -> defer.Deferred[LucidError]:
        """Say goodbye, let answers in flight finish, then close; fires when closed."""
        waiter = self.when_lost()
        if self._lost or self.closing:
            return waiter
        self.closing = True
        self.close_reason = ConnectionClosed(text)
        self.push(Goodbye(0, text))
        self._close_deadline = self.clock.callLater(timeout, self._abort, f"{text} (timed out)")
        self._close_if_idle()
        return waiter

    def when_lost(self) -> defer.Deferred[LucidError]:
        """A Deferred that fires with the reason once the connection is gone."""
        if self._lost:
            return defer.succeed(self.close_reason or ConnectionClosed("connection closed"))
        waiter: defer.Deferred[LucidError] = defer.Deferred()
        self._lost_waiters.append(waiter)
        return waiter

    def fail_connection(self, error: LucidError) -> None:
        """Close at once after telling the peer why (protocol violations)."""
        if self._lost:
            return
        self.log.warn("closing connection with {peer}: {reason}", peer=self.peer, reason=error)
        self._broken = True
        self.close_reason = error
        self.closing = True
        self._write(Goodbye(error.code, str(error)), 0, _PUSH)
        self._flush()
        self.transport.loseConnection()  # type: ignore[union-attr]
        self._close_deadline = self.clock.callLater(DEFAULT_CLOSE_TIMEOUT, self._abort, str(error))

    # -- Protocol ---------------------------------------------------------

    def connectionMade(self) -> None:
        self._last_received = self.clock.seconds()
        self._schedule_keepalive()
        # A request sent while an earlier one is unanswered must leave at once, not wait for an ACK (Nagle).
        no_delay = getattr(self.transport, "setTcpNoDelay", None)
        if no_delay is not None:
            try:
                no_delay(True)
            except OSError:
                pass  # not TCP

    def dataReceived(self, data: bytes) -> None:
        if self._lost or self._broken:
            return
        self._last_received = self._batch_time = self.clock.seconds()
        # Everything written while handling these frames leaves in one write,
        # so a batch of pipelined answers costs one TLS record, not one each.
        corked = self.cork()
        try:
            self.decoder.feed_each(data, self._on_frame)
        except ProtocolError as error:
            self.fail_connection(error)
        finally:
            self._batch_time = None
            if corked:
                self._flush()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self._lost = True
        for call in (self._keepalive_call, self._close_deadline, self._timeout_call):
            if call is not None and call.active():
                call.cancel()
        error = self.close_reason or self._explain_loss(reason)
        self.close_reason = error
        pending, self._pending = self._pending, {}
        for deferred, message_type, _, _ in pending.values():
            if isinstance(error, ConnectionClosed):
                deferred.errback(
                    ConnectionClosed(f"connection ended before {message_type.__name__} was answered: {error}")
                )
            else:
                deferred.errback(error)
        self.connection_ended(error)
        waiters, self._lost_waiters = self._lost_waiters, []
        for waiter in waiters:
            waiter.callback(error)

    # -- hooks for the two ends ---------------------------------------------

    def request_received(self, request_id: int, message: Any) -> None:
        """A request other than Ping arrived."""
        self._answer(request_id, NotSupported(f"{type(message).__name__} is not served here"))

    def connection_ended(self, reason: LucidError) -> None:
        """The connection is gone."""

    def _explain_loss(self, reason: Failure) -> LucidError:
        if self.peer_goodbye is not None:
            return ConnectionClosed(f"peer closed the connection: {self.peer_goodbye}")
        if reason.check(LucidError):
            return reason.value  # type: ignore[return-value]
        return ConnectionClosed(f"connection lost: {reason.getErrorMessage()}")

    # -- internals ------------------------------------------------------------

    def _frame_received(self, request_id: int, flags: int, message: Any, version: int) -> None:
        if self._lost or self._broken:
            return
        if flags & _RESPONSE:
            entry = self._pending.pop(request_id, None)
            if entry is None:
                self.log.debug("answer to unknown or timed-out request {id} from {peer}", id=request_id, peer=self.peer)
            elif type(message) is Error:
                entry[0].errback(error_from_wire(message.code, message.text, message.retry_after_ms))
            else:
                entry[0].callback(message)
            if self.closing:
                self._close_if_idle()
        elif flags & _PUSH:
            self._push_received(message)
        elif type(message) is Ping:
            self._write(Pong(message.nonce), request_id, _RESPONSE)
        else:
            self.request_received(request_id, message)

    def _push_received(self, message: Any) -> None:
        if isinstance(message, Goodbye):
            self.peer_goodbye = message.text or "goodbye"
            if message.code:
                self.close_reason = error_from_wire(message.code, message.text)
            return
        if self.on_push is not None:
            try:
                self.on_push(message)
            except Exception:
                self.log.failure("push handler failed on {message}", message=type(message).__name__)

    def _answer(self, request_id: int, result: Any) -> None:
        """Send ``result`` (a message or an exception) as the answer to ``request_id``."""
        if self._lost:
            return
        if isinstance(result, LucidError):
            result = Error(result.code, result.retry_after_ms, str(result))
        self._write(result, request_id, _RESPONSE)

    def _write(self, message: Any, request_id: int, flags: int) -> None:
        frame = encode_frame(message, request_id, flags, self.version)
        corked = self._corked
        if corked is not None:
            corked.append(frame)
        else:
            self.transport.write(frame)  # type: ignore[union-attr]

    def _flush(self) -> None:
        corked, self._corked = self._corked, None
        if corked and not self._lost:
            self.transport.write(b"".join(corked))  # type: ignore[union-attr]

    def _next_request_id(self) -> int:
        """The next id not in use, wrapping around before ``OWN_REQUEST_ID_LIMIT``."""
        request_id = next(self._request_ids)
        while request_id >= OWN_REQUEST_ID_LIMIT or request_id in self._pending:
            if request_id >= OWN_REQUEST_ID_LIMIT:
                self._request_ids = itertools.count(1)
            request_id = next(self._request_ids)
        return request_id

    def _arm_request_timer(self, deadline: float, delay: float) -> None:
        """Make the one request timer fire at ``deadline``, ``delay`` seconds from now."""
        if self._timeout_call is not None:
            # Not reset(): moving a timer sooner makes the reactor search all
            # its timers, which in a process with thousands of connections
            # costs more than the request.
            self._timeout_call.cancel()
        self._timeout_call = self.clock.callLater(delay, self._expire_requests)
        self._timeout_at = deadline

    def _expire_requests(self) -> None:
        self._timeout_call = None
        self._timeout_at = math.inf
        now = self.clock.seconds()
        expired = [(rid, entry) for rid, entry in self._pending.items() if entry[2] <= now]
        for request_id, (deferred, message_type, _, timeout) in expired:
            del self._pending[request_id]
            deferred.errback(
                RequestTimeout(f"no answer to {message_type.__name__} from {self.peer} within {timeout:g} s")
            )
        if self._pending and not self._lost:
            next_deadline = min(entry[2] for entry in self._pending.values())
            self._arm_request_timer(next_deadline, max(0.0, next_deadline - now))
        self._close_if_idle()

    def _schedule_keepalive(self) -> None:
        if self.keepalive_interval > 0 and not self._lost:
            self._keepalive_call = self.clock.callLater(self.keepalive_interval, self._keepalive)

    def _keepalive(self) -> None:
        self._keepalive_call = None
        if self._lost or self.closing:
            return
        idle = self.clock.seconds() - self._last_received
        if idle >= self.keepalive_interval:
            ping = self.request(Ping(secrets.randbits(64)), timeout=self.keepalive_interval)
            ping.addErrback(self._keepalive_failed)
        self._schedule_keepalive()

    def _keepalive_failed(self, failure: Failure) -> None:
        if failure.check(RequestTimeout) and not self._lost:
            self.close_reason = ConnectionClosed(
                f"{self.peer} did not answer a keepalive ping within {self.keepalive_interval:g} s"
            )
            self._abort(str(self.close_reason))

    def _close_if_idle(self) -> None:
        if self.closing and not self._pending and self._in_flight == 0 and not self._lost:
            self._flush()
            self.transport.loseConnection()  # type: ignore[union-attr]

    def _abort(self, why: str) -> None:
        if not self._lost:
            self.log.info("aborting connection with {peer}: {why}", peer=self.peer, why=why)
            self.transport.abortConnection()  # type: ignore[union-attr]

    def _closed_error(self, what: str) -> ConnectionClosed:
        why = self.peer_goodbye or (str(self.close_reason) if self.close_reason else "connection closed")
        return ConnectionClosed(f"{what}: {why}")


class ClientConnection(LucidConnection):
    """The client end: says Hello first; ``ready`` fires with the server's Welcome."""

    def __init__(
        self,
        clock: IReactorTime,
        *,
        peer_name: str = "lucid",
        filespace: str = "",
        explain_failure: Callable[[Failure], LucidError | None] | None = None,
        version: int = PROTOCOL_VERSION,
        **options: Any,
    ) -> None:
        super().__init__(clock, **options)
        self.peer_name = peer_name
        self.filespace = filespace
        self.version = version
        self.explain_failure = explain_failure
        self.welcome: Welcome | None = None
        self.ready: defer.Deferred[Welcome] = defer.Deferred()
        self._held = []  # requests wait for the Welcome

    def connectionMade(self) -> None:
        super().connectionMade()
        held, self._held = self._held, None  # the Hello itself goes out at once
        welcomed = self.request(Hello(self.version, self.peer_name, self.filespace))
        self._held = held
        welcomed.addCallbacks(self._welcomed, self._refused)

    def _welcomed(self, welcome: Any) -> None:
        if not isinstance(welcome, Welcome):
            self.fail_connection(ProtocolError(f"expected Welcome, got {type(welcome).__name__}"))
            return
        self.welcome = welcome
        self.handshaken = True
        held, self._held = self._held or [], None
        frames = [frame for frame, request_id in held if request_id in self._pending]
        if self._corked is not None:
            self._corked.extend(frames)
        elif frames:
            self.transport.write(b"".join(frames))  # type: ignore[union-attr]
        self.ready.callback(welcome)

    def _refused(self, failure: Failure) -> None:
        if not self._lost:
            self._flush()
            self.transport.loseConnection()  # type: ignore[union-attr]
        if not self.ready.called:
            self.ready.errback(failure)

    def _explain_loss(self, reason: Failure) -> LucidError:
        if self.explain_failure is not None and self.close_reason is None:
            explained = self.explain_failure(reason)
            if explained is not None:
                return explained
        return super()._explain_loss(reason)

    def connection_ended(self, reason: LucidError) -> None:
        if not self.ready.called:
            self.ready.errback(reason)


class ServerConnection(LucidConnection):
    """The server end: waits for Hello, then hands requests to the responder.

    ``handshake_timeout`` closes a connection that does not say Hello in
    time; ``idle_timeout`` (seconds, 0 for never) closes one, gracefully,
    once no request has arrived for that long.  Keepalive pings are not
    requests: they keep a connection alive, not busy.
    """

    def __init__(
        self,
        clock: IReactorTime,
        responder: IResponder,
        *,
        handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT,
        idle_timeout: float = 0.0,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        **options: Any,
    ) -> None:
        super().__init__(clock, **options)
        self.responder = responder
        self.handshake_timeout = handshake_timeout
        self.idle_timeout = idle_timeout
        self.max_in_flight = max_in_flight
        self.request_id: int | None = None
        """The id of the request being answered, while the responder's ``respond`` runs."""
        self.hello: Hello | None = None
        self.session: Any = None
        self._handshake_call: Any = None
        self._idle_call: Any = None
        self._last_request = 0.0
        self._on_frame = self._frame_before_handshake

    def connectionMade(self) -> None:
        super().connectionMade()
        self._handshake_call = self.clock.callLater(self.handshake_timeout, self._handshake_timed_out)

    def _handshake_timed_out(self) -> None:
        self._handshake_call = None
        if not self.handshaken and not self._lost:
            self.close_reason = ProtocolError(f"no Hello within {self.handshake_timeout:g} s")
            self._abort(str(self.close_reason))

    def _start_idle_timer(self) -> None:
        self._last_request = self.clock.seconds()
        if self.idle_timeout > 0 and not self._lost:
            self._idle_call = self.clock.callLater(self.idle_timeout, self._idle_check)

    def _idle_check(self) -> None:
        # One timer per connection that re-arms itself, rather than a reset per
        # request: requests stay as cheap as they are without an idle timeout.
        self._idle_call = None
        if self._lost or self.closing:
            return
        now = self.clock.seconds()
        remaining = self._last_request + self.idle_timeout - now
        if remaining <= 0 and self._in_flight == 0:
            self.log.info(
                "closing connection with {peer}: no request for {timeout:g} s",
                peer=self.peer, timeout=self.idle_timeout,
            )
            self.close(f"idle for {self.idle_timeout:g} s")
            return
        self._idle_call = self.clock.callLater(max(remaining, self.idle_timeout / 10), self._idle_check)

    def _frame_before_handshake(self, request_id: int, flags: int, message: Any, version: int) -> None:
        if self.handshaken:  # the Welcome went out while this batch of frames was read
            self._frame_received(request_id, flags, message, version)
        elif self._lost or self._broken:
            return
        elif self.hello is None:
            self._hello_received(request_id, flags, message, version)
        else:
            raise ProtocolError(f"{type(message).__name__} sent before the handshake finished")

    def _hello_received(self, request_id: int, flags: int, message: Any, version: int) -> None:
        if not isinstance(message, Hello) or flags:
            raise ProtocolError(f"expected Hello first, got {type(message).__name__}")
        self.hello = message
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()
        if message.version != PROTOCOL_VERSION or version != PROTOCOL_VERSION:
            error = VersionMismatch(
                f"client {message.peer_name!r} speaks protocol version {message.version}; "
                f"this server speaks version {PROTOCOL_VERSION}"
            )
            self.log.warn("refusing {peer}: {error}", peer=self.peer, error=error)
            self._answer(request_id, error)
            self.close(str(error))
            return
        self._in_flight += 1
        result = defer.maybeDeferred(self.responder.welcome, self, message)
        result.addCallbacks(self._welcome_sent, self._answer_failure, callbackArgs=(request_id,), errbackArgs=(request_id, message))

    def _welcome_sent(self, welcome: Welcome, request_id: int) -> None:
        self._in_flight -= 1
        self.handshaken = True
        self._on_frame = self._frame_received
        self._answer(request_id, welcome)
        self._start_idle_timer()

    def _frame_received(self, request_id: int, flags: int, message: Any, version: int) -> None:
        """Requests are served here; answers, pushes and pings as on any connection."""
        if flags or self._lost or self._broken or type(message) is Ping:
            super()._frame_received(request_id, flags, message, version)
            return
        self._last_request = self._last_received  # when this batch of frames arrived
        if self.closing:
            self._answer(request_id, ConnectionClosed("server is closing this connection"))
            return
        if self._in_flight >= self.max_in_flight:
            self._answer(request_id, Busy(f"more than {self.max_in_flight} requests in flight", retry_after_ms=50))
            return
        self.request_id = request_id
        try:
            result = self.responder.respond(self, message)
        except Exception:
            self._in_flight += 1
            self._answer_failure(Failure(), request_id, message)
            return
        if type(result) in _MESSAGE_TYPES and not self._lost:  # answered at once: the usual case
            corked = self._corked
            if corked is None:
                self._write(result, request_id, _RESPONSE)
            else:
                try:
                    corked.append(frame_encoders[type(result)](result, request_id, _RESPONSE, self.version))
                except Exception:
                    self._write(result, request_id, _RESPONSE)  # raises the error that names the problem
        elif isinstance(result, Deferred):  # an ABC check, slower than the one above
            self._in_flight += 1
            result.addCallbacks(
                self._answered, self._answer_failure, callbackArgs=(request_id,), errbackArgs=(request_id, message)
            )
        else:
            self._answer(request_id, result)

    def _answered(self, answer: Any, request_id: int) -> None:
        self._in_flight -= 1
        self._answer(request_id, answer)
        self._close_if_idle()

    def _answer_failure(self, failure: Failure, request_id: int, message: Any) -> None:
        self._in_flight -= 1
        if failure.check(LucidError):
            self._answer(request_id, failure.value)
        else:
            self.log.failure("failed to answer {message} from {peer}", failure, message=type(message).__name__, peer=self.peer)
            self._answer(request_id, InternalError(f"internal error answering {type(message).__name__}; see the server log"))
        if isinstance(message, Hello):
            self.close("handshake refused")
        self._close_if_idle()

    def connection_ended(self, reason: LucidError) -> None:
        for call in (self._handshake_call, self._idle_call):
            if call is not None and call.active():
                call.cancel()
        try:
            self.responder.connection_ended(self, reason)
        except Exception:
            self.log.failure("responder failed to end the session of {peer}", peer=self.peer)


class ServerFactory(Factory):
    """Builds a :class:`ServerConnection` per accepted connection."""

    def __init__(self, responder: IResponder, clock: IReactorTime, **options: Any) -> None:
        self.responder = responder
        self.clock = clock
        self.options = options

    def buildProtocol(self, addr: Any) -> ServerConnection:
        connection = ServerConnection(self.clock, self.responder, **self.options)
        connection.factory = self
        return connection
