"""
The S3 store's HTTP plumbing, without a server: large socket reads and a
low-water mark only while a body streams, request bodies written after their headers, and
IP addresses connected to without a name lookup.
"""

from __future__ import annotations

import errno
import socket
from typing import Any

from twisted.internet.defer import CancelledError
from twisted.internet.endpoints import HostnameEndpoint, TCP4ClientEndpoint, TCP6ClientEndpoint
from twisted.internet.error import ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactor
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.client import URI, ResponseDone

from lucidlink.objectstore.http import (
    BODY_READ_SIZE,
    LATE_WRITE_SIZE,
    WAKE_MARGIN,
    BodyReader,
    BytesProducer,
    Endpoints,
)

MiB = 1024 * 1024


class Socket:
    """Records the low-water marks (``SO_RCVLOWAT``) set on it; a closed one refuses them."""

    def __init__(self, closed: bool = False) -> None:
        self.closed = closed
        self.low_water: list[int] = []

    def setsockopt(self, level: int, option: int, value: int) -> None:
        if self.closed:
            raise OSError(errno.EBADF, "Bad file descriptor")
        if (level, option) == (socket.SOL_SOCKET, socket.SO_RCVLOWAT):
            self.low_water.append(value)


class SocketTransport:
    """Stands for a TCP transport: it has a socket and reads ``bufferSize`` bytes at a time."""

    bufferSize = 65536
    aborted = False

    def __init__(self, closed: bool = False) -> None:
        self.socket = Socket(closed)

    def abortConnection(self) -> None:
        self.aborted = True


class TLSLayer:
    """Stands for TLSMemoryBIOProtocol: no socket of its own, the TCP transport under it."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport


class BodyTransport:
    """Stands for twisted.web's TransportProxyProducer, the transport a body protocol is given."""

    def __init__(self, producer: Any) -> None:
        self._producer = producer


class BodyReaderTests(SynchronousTestCase):
    """A body's socket reads grow while it streams and shrink back after; its pieces come as they arrived."""

    def read(self, length: int | None, transport: Any) -> BodyReader:
        reader = BodyReader(length)
        reader.makeConnection(BodyTransport(transport))  # type: ignore[arg-type]
        return reader

    def test_large_body_reads_larger(self) -> None:
        tcp = SocketTransport()
        reader = self.read(4 * MiB, tcp)
        self.assertEqual(tcp.bufferSize, BODY_READ_SIZE)
        reader.dataReceived(b"abc")
        reader.dataReceived(b"def")
        reader.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.successResultOf(reader.done), [b"abc", b"def"])
        self.assertEqual(reader.size, 6)
        self.assertNotIn("bufferSize", vars(tcp))
        self.assertEqual(tcp.bufferSize, SocketTransport.bufferSize)

    def test_low_water_below_what_is_to_come(self) -> None:
        """The reactor wakes for a read's worth of body, never for more than is still to come; 1 after."""
        tcp = SocketTransport()
        reader = self.read(4 * MiB, tcp)
        self.assertEqual(tcp.socket.low_water, [BODY_READ_SIZE])
        reader.dataReceived(b"x" * (2 * MiB))
        self.assertEqual(tcp.socket.low_water[-1], 2 * MiB - WAKE_MARGIN)
        reader.dataReceived(b"x" * (2 * MiB - WAKE_MARGIN - 10))
        self.assertEqual(tcp.socket.low_water[-1], 10)
        reader.dataReceived(b"x" * 10)
        self.assertEqual(tcp.socket.low_water[-1], 1)
        reader.dataReceived(b"x" * 5)
        reader.dataReceived(b"x" * (WAKE_MARGIN - 5))
        reader.connectionLost(Failure(ResponseDone()))
        self.assertEqual(reader.size, 4 * MiB)
        self.assertEqual(
            tcp.socket.low_water, [BODY_READ_SIZE, 2 * MiB - WAKE_MARGIN, 10, 1]
        )  # set on change

    def test_low_water_back_to_one_when_cut_short(self) -> None:
        """A body cut short leaves the connection's socket waking for any byte again."""
        tcp = SocketTransport()
        reader = self.read(4 * MiB, tcp)
        reader.dataReceived(b"x" * 1000)
        reader.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(reader.done, ConnectionLost)
        self.assertEqual(tcp.socket.low_water, [BODY_READ_SIZE, 1])

    def test_low_water_refused(self) -> None:
        """A socket that refuses a low-water mark is read as before."""
        tcp = SocketTransport(closed=True)
        reader = self.read(4 * MiB, tcp)
        reader.dataReceived(b"abc")
        reader.connectionLost(Failure(ResponseDone()))
        self.assertEqual(self.successResultOf(reader.done), [b"abc"])
        self.assertEqual(tcp.socket.low_water, [])

    def test_socket_gone_when_lost(self) -> None:
        """A lost TCP connection drops its socket before the body hears of it: the body still ends."""
        tcp = SocketTransport()
        reader = self.read(4 * MiB, tcp)
        del tcp.socket
        reader.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(reader.done, ConnectionLost)

    def test_read_size_bounded_by_length(self) -> None:
        tcp = SocketTransport()
        self.read(100_000, tcp)
        self.assertEqual(tcp.bufferSize, 100_000)
        self.assertEqual(tcp.socket.low_water, [100_000 - WAKE_MARGIN])

    def test_small_or_unknown_length_unchanged(self) -> None:
        for length in (None, 0, 1000):
            tcp = SocketTransport()
            reader = self.read(length, tcp)
            self.assertNotIn("bufferSize", vars(tcp), length)
            reader.connectionLost(Failure(ResponseDone()))
            self.assertEqual(self.successResultOf(reader.done), [])
            self.assertEqual(reader.size, 0)
            self.assertEqual(tcp.socket.low_water, [])

    def test_under_tls(self) -> None:
        """Under TLS it is the TCP transport's reads that grow."""
        tcp = SocketTransport()
        reader = self.read(4 * MiB, TLSLayer(tcp))
        self.assertEqual(tcp.bufferSize, BODY_READ_SIZE)
        self.assertEqual(tcp.socket.low_water, [BODY_READ_SIZE])
        reader.connectionLost(Failure(ConnectionLost()))
        self.failureResultOf(reader.done, ConnectionLost)
        self.assertNotIn("bufferSize", vars(tcp))
        self.assertEqual(tcp.socket.low_water, [BODY_READ_SIZE, 1])

    def test_cancel_aborts(self) -> None:
        tcp = SocketTransport()
        reader = self.read(10, tcp)
        reader.done.cancel()
        self.assertTrue(tcp.aborted)
        self.failureResultOf(reader.done, CancelledError)


class Consumer:
    """Records what a producer writes."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)


class ReactorTurns:
    """Stands for the reactor's delayed calls: what is scheduled during a turn runs in the next one."""

    def __init__(self) -> None:
        self.calls: list[ScheduledCall] = []

    def callLater(self, delay: float, function: Any) -> ScheduledCall:
        call = ScheduledCall(function)
        self.calls.append(call)
        return call

    def turn(self) -> None:
        calls, self.calls = self.calls, []
        for call in calls:
            if call.active():
                call.run()


class ScheduledCall:
    def __init__(self, function: Any) -> None:
        self.function = function
        self.done = False

    def active(self) -> bool:
        return not self.done

    def cancel(self) -> None:
        self.done = True

    def run(self) -> None:
        self.done = True
        self.function()


class BytesProducerTests(SynchronousTestCase):
    """The body goes to the consumer whole, two reactor turns after the request starts."""

    def test_written_after_two_turns(self) -> None:
        turns, consumer = ReactorTurns(), Consumer()
        body = b"x" * LATE_WRITE_SIZE
        producer = BytesProducer(body, turns)
        self.assertEqual(producer.length, LATE_WRITE_SIZE)
        finished = producer.startProducing(consumer)
        self.assertNoResult(finished)
        turns.turn()  # the reactor writes the request's headers to the socket in this turn
        self.assertEqual(consumer.written, [])
        turns.turn()
        self.assertEqual(len(consumer.written), 1)
        self.assertIs(consumer.written[0], body)  # the caller's bytes, not a copy
        self.assertIsNone(self.successResultOf(finished))
        self.assertEqual(turns.calls, [])

    def test_with_a_clock(self) -> None:
        """On a task.Clock (which runs what it schedules at once) the body is written when time advances."""
        clock, consumer = Clock(), Consumer()
        body = b"y" * LATE_WRITE_SIZE
        finished = BytesProducer(body, clock).startProducing(consumer)
        self.assertEqual(consumer.written, [])
        clock.advance(0)
        self.assertEqual(consumer.written, [body])
        self.successResultOf(finished)

    def test_stopped_before_writing(self) -> None:
        """A request abandoned before its body went out writes nothing, and its Deferred never fires."""
        for before in (0, 1):
            turns, consumer = ReactorTurns(), Consumer()
            producer = BytesProducer(b"z" * LATE_WRITE_SIZE, turns)
            finished = producer.startProducing(consumer)
            for _ in range(before):
                turns.turn()
            producer.stopProducing()
            turns.turn()
            turns.turn()
            self.assertEqual(consumer.written, [])
            self.assertNoResult(finished)

    def test_small_body_at_once(self) -> None:
        """A small body (a journal segment, a manifest) costs little to copy and is written without delay."""
        for body in (b"", b"segment", b"s" * (LATE_WRITE_SIZE - 1)):
            consumer = Consumer()
            self.successResultOf(BytesProducer(body, ReactorTurns()).startProducing(consumer))
            self.assertEqual(consumer.written, [body])


class EndpointsTests(SynchronousTestCase):
    """IP addresses are connected to directly; names through HostnameEndpoint; HTTPS wrapped in TLS."""

    def endpoint(self, url: bytes, reactor: Any = None) -> Any:
        return Endpoints(reactor or MemoryReactor(), connect_timeout=5).endpointForURI(URI.fromBytes(url))

    def test_addresses_connect_directly(self) -> None:
        reactor = MemoryReactor()
        endpoint = self.endpoint(b"http://127.0.0.1:9000/bucket/key", reactor)
        self.assertIsInstance(endpoint, TCP4ClientEndpoint)
        endpoint.connect(Factory.forProtocol(Protocol))
        self.assertEqual(reactor.tcpClients[0][:2], ("127.0.0.1", 9000))
        self.assertEqual(reactor.tcpClients[0][3], 5)
        self.assertIsInstance(self.endpoint(b"http://[::1]:9000/bucket/key"), TCP6ClientEndpoint)

    def test_names_are_looked_up(self) -> None:
        self.assertIsInstance(self.endpoint(b"http://localhost:9000/"), HostnameEndpoint)

    def test_https_wrapped(self) -> None:
        for url in (b"https://127.0.0.1:9000/", b"https://s3.eu-west-1.amazonaws.com/"):
            endpoint = self.endpoint(url)
            self.assertNotIsInstance(endpoint, TCP4ClientEndpoint | HostnameEndpoint)
            self.assertIsInstance(endpoint._wrappedEndpoint, TCP4ClientEndpoint | HostnameEndpoint)

    def test_other_schemes_refused(self) -> None:
        self.assertRaises(ValueError, self.endpoint, b"ftp://127.0.0.1:21/")
