"""
Listening and connecting with TLS on Twisted endpoint strings.

Addresses are endpoint descriptions (``tcp:0:interface=127.0.0.1`` to
listen, ``tcp:127.0.0.1:7001`` to connect), never fixed ports.  TLS wraps
whatever endpoint is named, with the contexts :mod:`lucidlink.tls` makes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.endpoints import clientFromString, serverFromString, wrapClientTLS
from twisted.internet.interfaces import IListeningPort, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure

from lucidlink.errors import LucidError, Unavailable
from lucidlink.protocol.connection import ClientConnection
from lucidlink.tls import PrivateCAClientTLS, client_tls_options, explain_tls_failure


def listen_tls(
    reactor: Any, description: str, tls_options: Any, factory: Factory
) -> defer.Deferred[IListeningPort]:
    """Listen on the endpoint ``description`` and speak TLS to every connection."""
    endpoint = serverFromString(reactor, description)
    return endpoint.listen(TLSMemoryBIOFactory(tls_options, False, factory))


@functools.lru_cache(maxsize=4096)
def client_endpoint(reactor: Any, description: str) -> IStreamClientEndpoint:
    """The client endpoint ``description`` names, parsed once: parsing costs more than connecting.

    :raise ValueError: (or another error of Twisted's parser) if it names none.
    """
    return clientFromString(reactor, description)


class _ClientFactory(Factory):
    def __init__(self, reactor: Any, creator: PrivateCAClientTLS, options: dict[str, Any]) -> None:
        self.reactor = reactor
        self.creator = creator
        self.options = options

    def buildProtocol(self, addr: Any) -> ClientConnection:
        creator = self.creator
        connection = ClientConnection(
            self.reactor,
            explain_failure=lambda reason: explain_tls_failure(reason, creator),
            **self.options,
        )
        connection.factory = self
        return connection


@defer.inlineCallbacks
def connect_tls(
    reactor: Any,
    description: str,
    ca_file: Path,
    identity: str,
    *,
    connected: Callable[[], object] | None = None,
    **options: Any,
) -> Any:
    """Connect to ``description`` over TLS, expecting ``identity``, and finish the handshake.

    The server's certificate must chain to ``ca_file`` and name ``identity``.
    ``connected``, if given, is called once the TCP connection is made,
    before the handshake (a caller can tell a slow server from an absent one).

    Fires with a ready :class:`ClientConnection`, or fails with a
    :class:`~lucidlink.errors.LucidError` that says what went wrong
    (unreachable, certificate refused, version mismatch, ...).
    """
    # A creator per connection, so that a refused certificate is explained
    # with this connection's own verification result.
    tls_creator = client_tls_options(ca_file, identity)
    endpoint = wrapClientTLS(tls_creator, client_endpoint(reactor, description))
    try:
        connection = yield endpoint.connect(_ClientFactory(reactor, tls_creator, options))
    except Exception as error:
        raise Unavailable(f"cannot connect to {description}: {_describe(error)}") from None
    if connected is not None:
        connected()
    try:
        yield connection.ready
    except defer.CancelledError:
        # The caller gave up (a timeout) before the handshake finished: close
        # the connection, or it lingers, costing both ends until the server
        # times it out.
        connection.transport.abortConnection()
        raise
    except LucidError:
        raise
    except Exception as error:
        raise Unavailable(f"connection to {description} failed: {_describe(error)}") from None
    return connection


def _describe(error: Exception) -> str:
    return Failure(error).getErrorMessage() if not str(error) else str(error)
