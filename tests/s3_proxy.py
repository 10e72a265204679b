"""
A fault-injecting HTTP proxy to put in front of an S3 server in tests.

:class:`FaultyS3Proxy` listens on 127.0.0.1 and forwards each request to the
upstream server, unless told to misbehave for the next requests::

    proxy.answer_next(2, 503, "SlowDown")   # an S3 error answer, upstream not asked
    proxy.reset_next()                      # the connection is reset, no answer
    proxy.stall_next()                      # no answer ever (until the proxy stops)
    proxy.truncate_next()                   # upstream's answer, cut short
    proxy.corrupt_next()                    # upstream's answer with a byte flipped
    proxy.lose_answer_next()                # upstream does it, the connection resets before the answer

It records every request it saw (``requests``: method and path), so a test
can count attempts.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from twisted.internet.defer import Deferred
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

_HOP_BY_HOP = {
    b"connection",
    b"keep-alive",
    b"transfer-encoding",
    b"content-length",
    b"date",
    b"server",
    b"host",
}


@dataclass
class _Fault:
    kind: str
    status: int = 0
    code: str = ""


class _Forward(Resource):
    isLeaf = True

    def __init__(self, proxy: FaultyS3Proxy) -> None:
        super().__init__()
        self.proxy = proxy

    def render(self, request: Request) -> Any:
        self.proxy.requests.append((request.method.decode(), request.uri.decode()))
        fault = self.proxy._faults.popleft() if self.proxy._faults else None
        if fault is not None and fault.kind == "answer":
            request.setResponseCode(fault.status)
            request.setHeader(b"content-type", b"application/xml")
            return (
                f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{fault.code}</Code>"
                f"<Message>injected {fault.code}</Message>"
                "<RequestTime>20261126T100000Z</RequestTime><ServerTime>2026-11-26T10:20:00Z</ServerTime>"
                "</Error>"
            ).encode()
        if fault is not None and fault.kind == "reset":
            request.transport.abortConnection()  # type: ignore[union-attr]
            return NOT_DONE_YET
        if fault is not None and fault.kind == "stall":
            self.proxy._stalled.append(request)
            return NOT_DONE_YET
        self.proxy._forward(request, fault.kind if fault else None)
        return NOT_DONE_YET


class FaultyS3Proxy:
    """An HTTP proxy on 127.0.0.1 in front of ``upstream`` that fails on request (see the module)."""

    def __init__(self, reactor: Any, upstream: str) -> None:
        self.reactor = reactor
        self.upstream = upstream.rstrip("/")
        self.requests: list[tuple[str, str]] = []
        self._faults: deque[_Fault] = deque()
        self._stalled: list[Request] = []
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._agent = Agent(reactor, pool=self._pool)
        self._port = reactor.listenTCP(0, Site(_Forward(self)), interface="127.0.0.1")
        self.endpoint = f"http://127.0.0.1:{self._port.getHost().port}"

    # Steering

    def answer_next(self, count: int, status: int, code: str) -> None:
        """Answer the next ``count`` requests with an S3 error of ``status`` and ``code``."""
        self._faults.extend(_Fault("answer", status, code) for _ in range(count))

    def reset_next(self, count: int = 1) -> None:
        """Reset the connection of the next ``count`` requests."""
        self._faults.extend(_Fault("reset") for _ in range(count))

    def stall_next(self, count: int = 1) -> None:
        """Never answer the next ``count`` requests."""
        self._faults.extend(_Fault("stall") for _ in range(count))

    def truncate_next(self, count: int = 1) -> None:
        """Send the next ``count`` answers with half their body, then reset the connection."""
        self._faults.extend(_Fault("truncate") for _ in range(count))

    def corrupt_next(self, count: int = 1) -> None:
        """Flip one byte of the body of the next ``count`` answers."""
        self._faults.extend(_Fault("corrupt") for _ in range(count))

    def lose_answer_next(self, count: int = 1) -> None:
        """Forward the next ``count`` requests, but reset the connection instead of answering."""
        self._faults.extend(_Fault("lose") for _ in range(count))

    def stop(self) -> Deferred[Any]:
        """Stop listening, drop stalled requests, close upstream connections."""
        for request in self._stalled:
            if request.transport is not None:
                request.transport.abortConnection()  # type: ignore[attr-defined]
        self._stalled.clear()
        stopped: Deferred[Any] = self._port.stopListening()
        return stopped.addCallback(lambda _: self._pool.closeCachedConnections())

    # Forwarding

    def _forward(self, request: Request, fault: str | None) -> None:
        headers = Headers()
        for name, values in request.requestHeaders.getAllRawHeaders():
            if name.lower() not in _HOP_BY_HOP:
                headers.setRawHeaders(name, values)
        headers.setRawHeaders(b"host", [request.getHeader(b"host") or b""])
        body = request.content.read() if request.content is not None else b""
        producer = FileBodyProducer(BytesIO(body)) if body or request.method in (b"PUT", b"POST") else None
        asked = self._agent.request(
            request.method, (self.upstream + request.uri.decode()).encode(), headers, producer
        )

        def answered(response: Any) -> Deferred[Any]:
            return readBody(response).addCallback(lambda content: (response, content))

        def relay(result: tuple[Any, bytes]) -> None:
            response, content = result
            if request.transport is None or request.finished:
                return
            request.setResponseCode(response.code)
            for name, values in response.headers.getAllRawHeaders():
                if name.lower() not in _HOP_BY_HOP:
                    request.responseHeaders.setRawHeaders(name, values)
            length = response.headers.getRawHeaders(b"content-length", [str(len(content)).encode()])[-1]
            request.responseHeaders.setRawHeaders(b"content-length", [length])
            if fault == "lose":
                request.transport.abortConnection()
                return
            if fault == "truncate" and content:
                request.write(content[: len(content) // 2])
                self.reactor.callLater(0.01, request.transport.abortConnection)
                return
            if fault == "corrupt" and content:
                altered = bytearray(content)
                altered[len(altered) // 2] ^= 0x01
                content = bytes(altered)
            if request.method != b"HEAD":
                request.write(content)
            request.finish()

        def failed(reason: Any) -> None:
            if request.transport is not None and not request.finished:
                request.setResponseCode(502)
                request.finish()

        asked.addCallback(answered).addCallback(relay).addErrback(failed)
