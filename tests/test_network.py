"""
The protocol over real TLS on loopback: pipelining, timeouts, refused
certificates, and a misbehaving client that cannot disturb a good one.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol, wrapClientTLS
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactor
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from lucidlink import errors
from lucidlink.protocol.connection import IResponder, ServerConnection, ServerFactory
from lucidlink.protocol.messages import (
    PROTOCOL_VERSION,
    Hello,
    Lookup,
    Resolve,
    Resolved,
    ServerStatus,
    Welcome,
)
from lucidlink.protocol.network import client_endpoint, connect_tls, listen_tls
from lucidlink.tls import client_tls_options, init_ca, issue_certificate, server_tls_options

SERVER_NAME = "meta.test-filespace.lucid"


@implementer(IResponder)
class DelayingResponder:
    """Answers Resolve after the delay its name asks for; never answers Lookup."""

    def welcome(self, connection: ServerConnection, hello: Hello) -> Welcome:
        return Welcome(PROTOCOL_VERSION, "loopback", 1, 15000, ServerStatus.SERVING)

    def respond(self, connection: ServerConnection, message: Any) -> Any:
        if isinstance(message, Resolve):
            delay = float(message.filespace.split(":")[1])
            answer = Resolved(message.filespace, ["tcp:127.0.0.1:1"], SERVER_NAME, 1000, ServerStatus.SERVING)
            return _later(delay, answer)
        return defer.Deferred()  # Lookup: never answered

    def connection_ended(self, connection: ServerConnection, reason: errors.LucidError) -> None:
        pass


def _later(delay: float, value: Any) -> defer.Deferred[Any]:
    deferred: defer.Deferred[Any] = defer.Deferred()
    reactor.callLater(delay, deferred.callback, value)  # type: ignore[attr-defined]
    return deferred


class Raw(Protocol):
    """Sends bytes it is told to and notes when the connection ends."""

    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.ended: defer.Deferred[None] = defer.Deferred()

    def connectionMade(self) -> None:
        self.transport.write(self.payload)  # type: ignore[union-attr]

    def connectionLost(self, reason: Any = None) -> None:
        self.ended.callback(None)


class Mute(Protocol):
    """Accepts a connection and never answers: a server too busy to finish a handshake."""

    def __init__(self, made: defer.Deferred[None], ended: defer.Deferred[None]) -> None:
        self.made = made
        self.ended = ended

    def connectionMade(self) -> None:
        self.made.callback(None)

    def connectionLost(self, reason: Any = None) -> None:
        self.ended.callback(None)


class ClientEndpointTests(SynchronousTestCase):
    """Endpoint descriptions are parsed once per reactor and refused when they name nothing."""

    def test_parsed_once(self) -> None:
        reactor, other = MemoryReactor(), MemoryReactor()
        endpoint = client_endpoint(reactor, "tcp:127.0.0.1:7001")
        self.assertIsInstance(endpoint, TCP4ClientEndpoint)
        self.assertIs(client_endpoint(reactor, "tcp:127.0.0.1:7001"), endpoint)
        self.assertIsNot(client_endpoint(other, "tcp:127.0.0.1:7001"), endpoint)
        self.assertIsNot(client_endpoint(reactor, "tcp:127.0.0.1:7002"), endpoint)

    def test_nonsense_refused_every_time(self) -> None:
        for _ in range(2):
            with self.assertRaises(ValueError):
                client_endpoint(MemoryReactor(), "no-such-kind:whatever")


class LoopbackTLSTests(TestCase):
    """A real server on 127.0.0.1 with certificates from a private CA."""

    timeout = 30

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.base = Path(self.mktemp())
        self.ca_dir = self.base / "ca"
        init_ca(self.ca_dir)
        cert, key = issue_certificate(self.ca_dir, [SERVER_NAME, "127.0.0.1"], self.base / "server")
        self.log_events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.log_events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.log_events.append)
        self.port = yield self.listen(cert, key)

    @defer.inlineCallbacks
    def listen(self, cert: Path, key: Path) -> Any:
        factory = ServerFactory(DelayingResponder(), reactor, keepalive_interval=0, max_frame_length=64 * 1024)
        port = yield listen_tls(reactor, "tcp:0:interface=127.0.0.1", server_tls_options(cert, key), factory)
        self.addCleanup(port.stopListening)
        return port

    @property
    def address(self) -> str:
        return f"tcp:127.0.0.1:{self.port.getHost().port}"

    @defer.inlineCallbacks
    def connect(self, identity: str = SERVER_NAME, ca_file: Path | None = None, address: str | None = None) -> Any:
        connection = yield connect_tls(
            reactor, address or self.address, ca_file or self.ca_dir / "ca.pem", identity, peer_name="test"
        )
        self.addCleanup(self.close, connection)
        return connection

    @staticmethod
    def close(connection: Any) -> defer.Deferred[Any]:
        return connection.close("test over")

    @defer.inlineCallbacks
    def test_pipelined_out_of_order(self) -> Any:
        """Answers that come back in reverse order reach the right callers."""
        connection = yield self.connect()
        asked = [connection.request(Resolve(f"fs{n}:{0.3 - n * 0.1:.1f}")) for n in range(3)]
        order: list[int] = []
        for n, deferred in enumerate(asked):
            deferred.addCallback(lambda answer, n=n: order.append(n) or answer)
        answers = yield defer.gatherResults(asked)
        self.assertEqual([a.filespace.split(":")[0] for a in answers], ["fs0", "fs1", "fs2"])
        self.assertEqual(order, [2, 1, 0])

    @defer.inlineCallbacks
    def test_request_timeout(self) -> Any:
        """A request the server never answers fails after its timeout; the connection lives on."""
        connection = yield self.connect()
        with self.assertRaises(errors.RequestTimeout) as caught:
            yield connection.request(Lookup(1, b"x"), timeout=0.2)
        self.assertIn("no answer to Lookup", str(caught.exception))
        answer = yield connection.request(Resolve("after:0"))
        self.assertEqual(answer.filespace, "after:0")

    @defer.inlineCallbacks
    def test_tls_version_at_least_1_2(self) -> Any:
        """The negotiated protocol is TLS 1.3 (1.2 at the least)."""
        connection = yield self.connect()
        version = connection.transport.getHandle().get_protocol_version_name()
        self.assertIn(version, ("TLSv1.3", "TLSv1.2"))
        self.assertEqual(version, "TLSv1.3")

    @defer.inlineCallbacks
    def test_wrong_identity(self) -> Any:
        """A server whose certificate names someone else is refused, naming both."""
        with self.assertRaises(errors.TLSVerificationError) as caught:
            yield self.connect(identity="meta.other-filespace.lucid")
        self.assertIn("identity did not match", str(caught.exception))
        self.assertIn("meta.other-filespace.lucid", str(caught.exception))

    @defer.inlineCallbacks
    def test_untrusted_ca(self) -> Any:
        """A certificate from another CA is refused as not signed by ours."""
        other_ca = self.base / "other-ca"
        init_ca(other_ca)
        with self.assertRaises(errors.TLSVerificationError) as caught:
            yield self.connect(ca_file=other_ca / "ca.pem")
        self.assertIn("not signed by", str(caught.exception))

    @defer.inlineCallbacks
    def test_expired_certificate(self) -> Any:
        """An expired server certificate is refused as expired."""
        now = datetime.now(UTC)
        cert, key = issue_certificate(
            self.ca_dir, [SERVER_NAME], self.base / "expired",
            not_before=now - timedelta(days=30), not_after=now - timedelta(days=1),
        )
        port = yield self.listen(cert, key)
        with self.assertRaises(errors.TLSVerificationError) as caught:
            yield self.connect(address=f"tcp:127.0.0.1:{port.getHost().port}")
        self.assertIn("expired", str(caught.exception))

    @defer.inlineCallbacks
    def test_nobody_listening(self) -> Any:
        """No server at the address: Unavailable, naming the address."""
        port = yield self.listen(*issue_certificate(self.ca_dir, [SERVER_NAME], self.base / "gone"))
        address = f"tcp:127.0.0.1:{port.getHost().port}"
        yield port.stopListening()
        with self.assertRaises(errors.Unavailable) as caught:
            yield self.connect(address=address)
        self.assertIn(address, str(caught.exception))

    @defer.inlineCallbacks
    def test_cancel_during_handshake_closes_the_connection(self) -> Any:
        """Giving up on a connection whose handshake has not finished closes it.

        A client that times out an attempt must not leave the connection
        open: it would keep costing both ends, and hold one of the server's
        connection slots, until the server's own handshake timeout.
        """
        made: defer.Deferred[None] = defer.Deferred()
        ended: defer.Deferred[None] = defer.Deferred()
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(
            Factory.forProtocol(lambda: Mute(made, ended))
        )
        self.addCleanup(port.stopListening)
        attempt = connect_tls(reactor, f"tcp:127.0.0.1:{port.getHost().port}", self.ca_dir / "ca.pem", SERVER_NAME)
        attempt.addErrback(lambda failure: None)
        yield made
        yield _later(0.05, None)  # the ClientHello is out, the answer never comes
        attempt.cancel()
        yield ended.addTimeout(2.0, reactor)  # fails with TimeoutError if the connection stays open

    @defer.inlineCallbacks
    def _misbehave_while_another_works(self, payload: bytes, tls: bool) -> Any:
        good = yield self.connect()
        endpoint: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        if tls:
            endpoint = wrapClientTLS(client_tls_options(self.ca_dir / "ca.pem", SERVER_NAME), endpoint)
        bad = Raw(payload)
        yield connectProtocol(endpoint, bad)
        yield bad.ended
        answer = yield good.request(Resolve("still-working:0"))
        self.assertEqual(answer.filespace, "still-working:0")

    @defer.inlineCallbacks
    def test_garbage_inside_tls(self) -> Any:
        """Garbage sent over TLS closes that connection; another client carries on."""
        yield self._misbehave_while_another_works(b"\x00\x00\x00\x10garbage-garbage!", tls=True)
        reasons = [e.get("reason") for e in self.log_events if "closing connection" in e.get("log_format", "")]
        self.assertTrue(any("unknown message type" in str(r) or "protocol version" in str(r) for r in reasons), reasons)

    @defer.inlineCallbacks
    def test_oversized_frame(self) -> Any:
        """An oversized frame closes that connection; another client carries on."""
        yield self._misbehave_while_another_works((10**6).to_bytes(4, "big") + b"x" * 100, tls=True)
        reasons = [str(e.get("reason")) for e in self.log_events if "closing connection" in e.get("log_format", "")]
        self.assertTrue(any("over the limit" in r for r in reasons), reasons)

    @defer.inlineCallbacks
    def test_plaintext_garbage(self) -> Any:
        """Bytes that are not even TLS end that connection; another client carries on."""
        yield self._misbehave_while_another_works(b"GET / HTTP/1.0\r\n\r\n", tls=False)

    @defer.inlineCallbacks
    def test_graceful_close(self) -> Any:
        """Closing after a request waits for its answer."""
        connection = yield connect_tls(reactor, self.address, self.ca_dir / "ca.pem", SERVER_NAME)
        asked = connection.request(Resolve("last:0.1"))
        closed = connection.close("done")
        answer = yield asked
        self.assertEqual(answer.filespace, "last:0.1")
        reason = yield closed
        self.assertIn("done", str(reason))
