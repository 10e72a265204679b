"""
The Twisted protocol layer in memory: handshake, request matching, timeouts,
keepalive, pushes and close, driven by iosim and a task.Clock.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.test.proto_helpers import StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from lucidlink import errors
from lucidlink.protocol.codec import FrameDecoder, encode_frame
from lucidlink.protocol.connection import OWN_REQUEST_ID_LIMIT, ClientConnection, IResponder, ServerConnection
from lucidlink.protocol.messages import (
    PROTOCOL_VERSION,
    Flags,
    GetAttr,
    Goodbye,
    Hello,
    Lookup,
    Notify,
    NotifyKind,
    Ok,
    Resolve,
    Resolved,
    ServerStatus,
    StatFs,
    Welcome,
)


@implementer(IResponder)
class ScriptedResponder:
    """Answers each request with whatever the test decides, when it decides."""

    def __init__(self) -> None:
        self.requests: list[tuple[Any, defer.Deferred[Any]]] = []
        self.ended: list[errors.LucidError] = []
        self.refuse_with: errors.LucidError | None = None
        self.answer_at_once: Any = None

    def welcome(self, connection: ServerConnection, hello: Hello) -> Welcome:
        if self.refuse_with is not None:
            raise self.refuse_with
        return Welcome(PROTOCOL_VERSION, "test-server", 42, 15000, ServerStatus.SERVING)

    def respond(self, connection: ServerConnection, message: Any) -> Any:
        if isinstance(message, StatFs):
            raise errors.AccessDenied("no statfs for you")
        if isinstance(message, GetAttr):
            raise RuntimeError("a bug in the server")
        if self.answer_at_once is not None:
            return self.answer_at_once
        waiting: defer.Deferred[Any] = defer.Deferred()
        self.requests.append((message, waiting))
        return waiting

    def connection_ended(self, connection: ServerConnection, reason: errors.LucidError) -> None:
        self.ended.append(reason)


class ConnectionTestCase(SynchronousTestCase):
    """A client and a server connected in memory."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.responder = ScriptedResponder()
        self.pushed: list[Any] = []
        self.client = ClientConnection(
            self.clock, peer_name="test-client", request_timeout=10, keepalive_interval=15, on_push=self.pushed.append
        )
        self.server = ServerConnection(self.clock, self.responder, keepalive_interval=0, max_in_flight=4)
        self.pump = iosim.connect(
            self.server, iosim.makeFakeServer(self.server), self.client, iosim.makeFakeClient(self.client), clock=self.clock
        )

    def answer(self, index: int, message: Any) -> None:
        self.responder.requests[index][1].callback(message)
        self.pump.flush()


class HandshakeTests(ConnectionTestCase):
    """The version handshake."""

    def test_ready_after_welcome(self) -> None:
        """The client is ready with the server's Welcome."""
        welcome = self.successResultOf(self.client.ready)
        self.assertEqual(welcome.server_name, "test-server")
        self.assertEqual(self.server.hello.peer_name, "test-client")

    def test_responder_provides_interface(self) -> None:
        """The test responder is a faithful IResponder."""
        self.assertTrue(verifyObject(IResponder, self.responder))


class RefusedHandshakeTests(SynchronousTestCase):
    """Handshakes that fail say why, on both sides."""

    def connect(self, client: ClientConnection, responder: ScriptedResponder | None = None) -> ServerConnection:
        server = ServerConnection(self.clock, responder or ScriptedResponder(), keepalive_interval=0)
        self.pump = iosim.connect(server, iosim.makeFakeServer(server), client, iosim.makeFakeClient(client), clock=self.clock)
        return server

    def setUp(self) -> None:
        self.clock = Clock()

    def test_version_mismatch(self) -> None:
        """A client of another version learns which versions each side speaks."""
        client = ClientConnection(self.clock, peer_name="future-client", version=PROTOCOL_VERSION + 1)
        self.connect(client)
        failure = self.failureResultOf(client.ready, errors.VersionMismatch)
        self.assertIn(f"speaks protocol version {PROTOCOL_VERSION + 1}", str(failure.value))
        self.assertIn(f"this server speaks version {PROTOCOL_VERSION}", str(failure.value))
        self.assertTrue(client._lost)

    def test_refused_by_responder(self) -> None:
        """The responder's error reaches the client as its own class."""
        responder = ScriptedResponder()
        responder.refuse_with = errors.UnknownFilespace("no filespace 'x' here")
        client = ClientConnection(self.clock, filespace="x")
        self.connect(client, responder)
        failure = self.failureResultOf(client.ready, errors.UnknownFilespace)
        self.assertEqual(str(failure.value), "no filespace 'x' here")

    def test_handshake_timeout(self) -> None:
        """A server closes a connection that never says Hello."""
        server = ServerConnection(self.clock, ScriptedResponder(), keepalive_interval=0, handshake_timeout=5)
        transport = StringTransport()
        server.makeConnection(transport)
        self.clock.advance(5)
        self.assertTrue(transport.disconnecting)
        self.assertIn("no Hello within 5 s", str(server.close_reason))


class RequestTests(ConnectionTestCase):
    """Requests, answers, errors and timeouts."""

    def test_pipelined_answers_out_of_order(self) -> None:
        """Answers given in reverse order reach the callers that asked."""
        self.successResultOf(self.client.ready)
        asked = [self.client.request(Lookup(1, bytes([n]))) for n in range(3)]
        self.pump.flush()
        self.assertEqual([m.name for m, _ in self.responder.requests], [b"\x00", b"\x01", b"\x02"])
        for index in (2, 0, 1):
            self.answer(index, Resolved(f"answer-{index}", [], "", 0, ServerStatus.SERVING))
        self.assertEqual([self.successResultOf(d).filespace for d in asked], ["answer-0", "answer-1", "answer-2"])

    def test_request_under_a_given_id(self) -> None:
        """A caller may give a request its id, from OWN_REQUEST_ID_LIMIT up; the server sees it while it answers."""
        self.successResultOf(self.client.ready)
        seen: list[int | None] = []
        respond = self.responder.respond
        self.patch(self.responder, "respond", lambda connection, message: (
            seen.append(connection.request_id), respond(connection, message))[1])
        given = self.client.request(Lookup(1, b"a"), request_id=OWN_REQUEST_ID_LIMIT + 7)
        own = self.client.request(Lookup(1, b"b"))
        self.pump.flush()
        self.assertEqual(seen[0], OWN_REQUEST_ID_LIMIT + 7)
        self.assertLess(seen[1], OWN_REQUEST_ID_LIMIT)  # type: ignore[operator]
        self.failureResultOf(self.client.request(Lookup(1, b"c"), request_id=OWN_REQUEST_ID_LIMIT + 7),
                             errors.InvalidArgument)  # in flight
        self.failureResultOf(self.client.request(Lookup(1, b"c"), request_id=5), errors.InvalidArgument)
        self.failureResultOf(self.client.request(Lookup(1, b"c"), request_id=2**32), errors.InvalidArgument)
        self.answer(0, Resolved("given", [], "", 0, ServerStatus.SERVING))
        self.answer(1, Resolved("own", [], "", 0, ServerStatus.SERVING))
        self.assertEqual((self.successResultOf(given).filespace, self.successResultOf(own).filespace), ("given", "own"))

    def test_requests_before_welcome_are_queued(self) -> None:
        """A request made before the handshake finishes goes out after it."""
        client = ClientConnection(self.clock)
        server = ServerConnection(self.clock, self.responder, keepalive_interval=0)
        client_transport = iosim.makeFakeClient(client)
        pump = iosim.connect(server, iosim.makeFakeServer(server), client, client_transport, clock=self.clock, greet=False)
        asked = client.request(Resolve("early"))
        pump.flush()
        self.responder.requests[-1][1].callback(Ok())
        pump.flush()
        self.assertEqual(self.successResultOf(asked), Ok())

    def test_error_classes_cross_the_wire(self) -> None:
        """A LucidError raised by the responder arrives as the same class and words."""
        failure = self.failureResultOf(self._ask(StatFs()), errors.AccessDenied)
        self.assertEqual(str(failure.value), "no statfs for you")

    def test_unexpected_exception_becomes_internal_error(self) -> None:
        """A bug in the server is an InternalError to the client, logged on the server."""
        failure = self.failureResultOf(self._ask(GetAttr(1)), errors.InternalError)
        self.assertIn("internal error answering GetAttr", str(failure.value))
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_request_timeout(self) -> None:
        """A request with no answer fails after its timeout, naming the request."""
        asked = self._ask(Lookup(1, b"slow"), timeout=3)
        self.clock.advance(2.9)
        self.assertNoResult(asked)
        self.clock.advance(0.2)
        failure = self.failureResultOf(asked, errors.RequestTimeout)
        self.assertIn("no answer to Lookup", str(failure.value))
        self.assertIn("within 3 s", str(failure.value))
        self.answer(0, Ok())  # a late answer is dropped quietly

    def test_in_flight_limit_answers_busy(self) -> None:
        """Over its in-flight limit the server answers Busy at once, with a retry hint."""
        asked = [self._ask(Lookup(1, b"x")) for _ in range(5)]
        failure = self.failureResultOf(asked[4], errors.Busy)
        self.assertGreater(failure.value.retry_after_ms, 0)
        for d in asked[:4]:
            self.assertNoResult(d)

    def test_push_reaches_handler(self) -> None:
        """A notification pushed by the server reaches the client's handler."""
        self.successResultOf(self.client.ready)
        self.server.push(Notify(NotifyKind.INODE_CHANGED, 5, 1, b""))
        self.pump.flush()
        self.assertEqual(self.pushed, [Notify(NotifyKind.INODE_CHANGED, 5, 1, b"")])

    def test_answer_returned_at_once(self) -> None:
        """A responder may return the answer itself instead of a Deferred."""
        self.responder.answer_at_once = Resolved("now", [], "", 0, ServerStatus.SERVING)
        self.assertEqual(self.successResultOf(self._ask(Resolve("x"))).filespace, "now")
        self.assertEqual(self.server._in_flight, 0)

    def test_error_returned_at_once(self) -> None:
        """A LucidError returned, not raised, is an error answer too."""
        self.responder.answer_at_once = errors.NotFound("returned, not raised")
        failure = self.failureResultOf(self._ask(Resolve("x")), errors.NotFound)
        self.assertEqual(str(failure.value), "returned, not raised")

    def test_shorter_timeout_after_longer_one(self) -> None:
        """A request with a nearer deadline than those in flight still times out on time."""
        patient = self._ask(Lookup(1, b"patient"), timeout=30)
        hasty = self._ask(Lookup(1, b"hasty"), timeout=2)
        self.clock.advance(2)
        self.failureResultOf(hasty, errors.RequestTimeout)
        self.assertNoResult(patient)
        self.answer(0, Ok())
        self.assertEqual(self.successResultOf(patient), Ok())

    def test_timeouts_after_the_timer_has_fired(self) -> None:
        """Once every request has expired, the next one arms the timer again."""
        for name in (b"first", b"second"):
            asked = self._ask(Lookup(1, name), timeout=1)
            self.clock.advance(1)
            self.failureResultOf(asked, errors.RequestTimeout)

    def test_request_asked_from_an_answer_expires_on_time(self) -> None:
        """A request made while answers are handled, and one made long after, each get their whole timeout."""
        self.responder.answer_at_once = Ok()
        chained: list[defer.Deferred[Any]] = []
        first = self._ask(Lookup(1, b"first"))
        self.responder.answer_at_once = None
        first.addCallback(lambda _: chained.append(self.client.request(Lookup(1, b"from the answer"), timeout=2)))
        self.pump.flush()
        self.assertEqual(len(chained), 1)
        self.clock.advance(100)
        self.failureResultOf(chained[0], errors.RequestTimeout)
        later = self._ask(Lookup(1, b"later"), timeout=2)
        self.clock.advance(1.9)
        self.assertNoResult(later)
        self.clock.advance(0.2)
        self.failureResultOf(later, errors.RequestTimeout)

    def test_message_that_cannot_be_encoded_is_refused_at_once(self) -> None:
        """A request the codec cannot encode raises ProtocolError and leaves nothing waiting."""
        self.successResultOf(self.client.ready)
        with self.assertRaises(errors.ProtocolError) as raised:
            self.client.request(Lookup(1, "a str, not bytes"))  # type: ignore[arg-type]
        self.assertIn("cannot encode Lookup", str(raised.exception))
        self.assertEqual(self.client._pending, {})

    def test_message_that_cannot_be_encoded_before_the_welcome(self) -> None:
        """Before the handshake is done, a bad request is refused at once too, not when the Welcome comes."""
        client = ClientConnection(self.clock)
        client.makeConnection(StringTransport())
        with self.assertRaises(errors.ProtocolError):
            client.request(Lookup(1, "a str, not bytes"))  # type: ignore[arg-type]
        self.assertEqual([request_id for request_id in client._pending], [1], "only the Hello waits")

    def test_answer_that_cannot_be_encoded_closes_the_connection(self) -> None:
        """A responder answering what the codec cannot encode gets the connection closed, with the reason logged."""
        self.responder.answer_at_once = Resolved(12345, [], "", 0, ServerStatus.SERVING)  # type: ignore[arg-type]
        failure = self.failureResultOf(self._ask(Resolve("x")), errors.LucidError)
        self.assertIn("cannot encode Resolved", str(failure.value))

    def _ask(self, message: Any, timeout: float | None = None) -> defer.Deferred[Any]:
        asked = self.client.request(message, timeout=timeout)
        self.pump.flush()
        return asked


class NoDelayTests(SynchronousTestCase):
    """Small requests and answers leave at once: Nagle's algorithm is off on TCP connections."""

    def test_no_delay_on_tcp(self) -> None:
        """Both sides turn TCP_NODELAY on where the transport is TCP, and carry on where it is not."""
        clock = Clock()

        class TcpTransport(StringTransport):
            no_delay = False

            def setTcpNoDelay(self, enabled: bool) -> None:
                self.no_delay = enabled

        class PipeTransport(StringTransport):
            def setTcpNoDelay(self, enabled: bool) -> None:
                raise OSError(95, "not a socket option of this transport")

        for connection in (ClientConnection(clock, keepalive_interval=0),
                           ServerConnection(clock, ScriptedResponder(), keepalive_interval=0)):
            tcp = TcpTransport()
            connection.makeConnection(tcp)
            self.assertTrue(tcp.no_delay)
        pipe = PipeTransport()
        client = ClientConnection(clock, keepalive_interval=0)
        client.makeConnection(pipe)
        self.assertNotEqual(pipe.value(), b"", "the Hello went out all the same")


class KeepaliveTests(ConnectionTestCase):
    """Idle connections are pinged; a silent peer is dropped."""

    def test_ping_answered(self) -> None:
        """An idle client pings; the server answers; the connection stays."""
        self.successResultOf(self.client.ready)
        self.clock.advance(15)
        self.pump.flush()
        self.clock.advance(15)
        self.pump.flush()
        self.assertFalse(self.client._lost)

    def test_silent_peer_dropped(self) -> None:
        """A peer that stops answering is disconnected, with a reason naming the ping."""
        client = ClientConnection(self.clock, keepalive_interval=15)
        transport = StringTransport()
        client.makeConnection(transport)
        self.clock.advance(15)
        self.clock.advance(15)
        self.assertTrue(transport.disconnecting)
        self.assertIn("did not answer a keepalive ping within 15 s", str(client.close_reason))
        self.failureResultOf(client.ready, errors.RequestTimeout)


class IdleTimeoutTests(SynchronousTestCase):
    """A server closes connections that stop asking."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.responder = ScriptedResponder()
        self.client = ClientConnection(self.clock, keepalive_interval=4, request_timeout=10)
        self.server = ServerConnection(self.clock, self.responder, keepalive_interval=0, idle_timeout=10)
        self.pump = iosim.connect(
            self.server, iosim.makeFakeServer(self.server), self.client, iosim.makeFakeClient(self.client), clock=self.clock
        )
        self.successResultOf(self.client.ready)

    def advance(self, seconds: float) -> None:
        for _ in range(int(seconds)):
            self.clock.advance(1)
            self.pump.flush()

    def test_idle_connection_closed(self) -> None:
        """No request for the idle timeout: the server says goodbye and closes, though pings flow."""
        self.advance(9)
        self.assertFalse(self.client._lost)
        self.advance(2)
        self.assertTrue(self.client._lost)
        self.assertIn("idle for 10 s", self.client.peer_goodbye or "")

    def test_requests_keep_it_open(self) -> None:
        """Each request restarts the idle clock."""
        for _ in range(3):
            self.advance(8)
            asked = self.client.request(Lookup(1, b"x"))
            self.pump.flush()
            self.responder.requests[-1][1].callback(Ok())
            self.pump.flush()
            self.successResultOf(asked)
        self.assertFalse(self.client._lost)
        self.advance(11)
        self.assertTrue(self.client._lost)

    def test_request_in_flight_is_not_idle(self) -> None:
        """A request still being answered keeps the connection open past the timeout."""
        asked = self.client.request(Lookup(1, b"slow"), timeout=60)
        self.pump.flush()
        self.advance(25)
        self.assertFalse(self.client._lost)
        self.responder.requests[0][1].callback(Ok())
        self.pump.flush()
        self.successResultOf(asked)
        self.advance(11)
        self.assertTrue(self.client._lost)


class CloseTests(ConnectionTestCase):
    """Closing is graceful: answers in flight still arrive."""

    def test_graceful_close_waits_for_answers(self) -> None:
        """The server's close waits for the answer it owes, then ends the connection."""
        asked = self.client.request(Lookup(1, b"x"))
        self.pump.flush()
        closed = self.server.close("server shutting down")
        self.pump.flush()
        self.assertNoResult(closed)
        self.failureResultOf(self.client.request(Lookup(1, b"y")), errors.ConnectionClosed)
        self.answer(0, Ok())
        self.assertEqual(self.successResultOf(asked), Ok())
        self.successResultOf(closed)
        self.assertTrue(self.client._lost)
        self.assertEqual(len(self.responder.ended), 1)

    def test_pending_requests_fail_when_connection_drops(self) -> None:
        """Requests in flight fail with ConnectionClosed naming the request."""
        asked = self.client.request(Lookup(1, b"x"))
        self.pump.flush()
        self.server.transport.loseConnection()
        self.pump.flush()
        failure = self.failureResultOf(asked, errors.ConnectionClosed)
        self.assertIn("before Lookup was answered", str(failure.value))


class BadInputTests(SynchronousTestCase):
    """Malformed input closes only the connection that sent it, with a reason."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.responder = ScriptedResponder()
        self.server = ServerConnection(self.clock, self.responder, keepalive_interval=0, max_frame_length=1024)
        self.transport = StringTransport()
        self.server.makeConnection(self.transport)

    def said_goodbye(self) -> Goodbye:
        frames = FrameDecoder().feed(self.transport.value())
        goodbyes = [frame.message for frame in frames if isinstance(frame.message, Goodbye)]
        self.assertEqual(len(goodbyes), 1)
        return goodbyes[0]

    def test_garbage_before_handshake(self) -> None:
        """Bytes that are no frame close the connection and say so."""
        self.server.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertTrue(self.transport.disconnecting)
        self.assertIn("over the limit", self.said_goodbye().text)

    def test_request_before_hello(self) -> None:
        """A well-formed request before Hello is a protocol error."""
        self.server.dataReceived(encode_frame(Lookup(1, b"x"), 1))
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.said_goodbye().text, "expected Hello first, got Lookup")

    def test_oversized_frame(self) -> None:
        """A frame over the configured limit is refused from its length prefix."""
        self.server.dataReceived(encode_frame(Hello(PROTOCOL_VERSION, "c", ""), 1))
        self.server.dataReceived((5000).to_bytes(4, "big"))
        self.assertTrue(self.transport.disconnecting)
        self.assertIn("frame of 5000 bytes is over the limit of 1024 bytes", self.said_goodbye().text)
        self.assertEqual(self.responder.requests, [])

    def test_data_after_error_ignored(self) -> None:
        """Once broken, the connection ignores whatever else arrives."""
        self.server.dataReceived(b"\xff" * 8)
        self.transport.clear()
        self.server.dataReceived(encode_frame(Hello(PROTOCOL_VERSION, "c", ""), 1))
        self.assertEqual(self.transport.value(), b"")

    def test_hello_and_requests_in_one_read(self) -> None:
        """Requests that arrive with the Hello, in the same read, are served after the Welcome."""
        self.responder.answer_at_once = Ok()
        self.server.dataReceived(
            encode_frame(Hello(PROTOCOL_VERSION, "c", ""), 1)
            + encode_frame(Lookup(1, b"x"), 2)
            + encode_frame(Lookup(1, b"y"), 3)
        )
        frames = FrameDecoder().feed(self.transport.value())
        self.assertEqual(
            [(type(f.message), f.request_id, f.flags) for f in frames],
            [(Welcome, 1, Flags.RESPONSE), (Ok, 2, Flags.RESPONSE), (Ok, 3, Flags.RESPONSE)],
        )
        self.assertFalse(self.transport.disconnecting)

    def test_request_while_welcome_is_pending(self) -> None:
        """A request after Hello but before the responder has welcomed is refused."""
        waiting: defer.Deferred[Welcome] = defer.Deferred()
        self.responder.welcome = lambda connection, hello: waiting  # type: ignore[method-assign]
        self.server.dataReceived(encode_frame(Hello(PROTOCOL_VERSION, "c", ""), 1) + encode_frame(Lookup(1, b"x"), 2))
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.said_goodbye().text, "Lookup sent before the handshake finished")

    def test_response_flag_from_client_before_hello(self) -> None:
        """A Hello sent as a response is not a handshake."""
        self.server.dataReceived(encode_frame(Hello(PROTOCOL_VERSION, "c", ""), 1, Flags.RESPONSE))
        self.assertTrue(self.transport.disconnecting)
