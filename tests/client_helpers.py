"""
Shared pieces of the client core's tests: a real metadata server in this
process (on loopback TLS, or answering in memory), an in-memory object
store, and cheap Argon2id parameters.

:class:`LoopbackMeta` is a metadata server as ``lucid-meta`` runs it — a
:class:`~lucidlink.meta.store.MetadataStore` and a
:class:`~lucidlink.meta.service.MetadataResponder` behind TLS — that a test
can stop (stop listening, drop every connection) and start again on the same
port.  :class:`InMemoryConnection` hands requests straight to a responder,
so that, with :class:`MemoryObjectStore` and a synchronous ``offload``, every
Deferred of the client core fires at once and property tests can drive it
without a reactor turn.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred, fail, succeed
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from lucidlink import crypto, errors
from lucidlink.client.backoff import Backoff
from lucidlink.client.endpoint_cache import EndpointCache, Location
from lucidlink.client.filespace import Filespace
from lucidlink.client.resolver import Resolver
from lucidlink.client.session import FilespaceSession, initialise_filespace, open_session
from lucidlink.meta import bootstrap
from lucidlink.meta.config import identity_for
from lucidlink.meta.service import MetadataResponder
from lucidlink.meta.store import MetadataStore
from lucidlink.objectstore.interface import IObjectStore, ObjectInfo, check_key
from lucidlink.objectstore.local import LocalObjectStore
from lucidlink.protocol.connection import ServerFactory
from lucidlink.protocol.messages import PROTOCOL_VERSION, Hello, ServerStatus
from lucidlink.protocol.network import connect_tls, listen_tls
from lucidlink.tls import init_ca, issue_certificate, server_tls_options

FILESPACE = "reels"
ADMIN = "admin"
ADMIN_PASSPHRASE = "correct horse battery staple"
SMALL_CHUNK = 64 * 1024


def cheap_kdf() -> crypto.KdfParameters:
    """The weakest Argon2id parameters a client accepts, with a fresh salt: fast tests."""
    return crypto.new_kdf_parameters(crypto.MINIMUM_TIME_COST, crypto.MINIMUM_MEMORY_KIB, 1)


def fast_backoff() -> Backoff:
    """Retries within tenths of a second."""
    return Backoff(initial=0.02, cap=0.1)


def synchronous(function: Any, *arguments: Any) -> Deferred[Any]:
    """An ``offload`` that runs the work at once."""
    return defer.maybeDeferred(function, *arguments)


@implementer(IObjectStore)
class MemoryObjectStore:
    """Objects in a dict; every Deferred has fired when returned.  Counts gets, ranged gets and puts.

    ``clock``, if given, dates each object (``ObjectInfo.modified``); else every object is dated 0.
    """

    def __init__(self, clock: Any = None) -> None:
        self.objects: dict[str, bytes] = {}
        self.modified: dict[str, float] = {}
        self.clock = clock
        self.gets = 0
        self.puts = 0

    def get(self, key: str) -> Deferred[bytes]:
        self.gets += 1
        if check_key(key) not in self.objects:
            return fail(errors.NotFound(f"no object {key!r}"))
        return succeed(self.objects[key])

    def get_range(self, key: str, start: int, length: int) -> Deferred[bytes]:
        self.gets += 1
        if start < 0 or length < 0:
            return fail(errors.InvalidArgument("negative range"))
        if check_key(key) not in self.objects:
            return fail(errors.NotFound(f"no object {key!r}"))
        return succeed(self.objects[key][start : start + length])

    def put(self, key: str, data: bytes, create_only: bool = False) -> Deferred[None]:
        self.puts += 1
        if create_only and check_key(key) in self.objects:
            return fail(errors.AlreadyExists(f"object {key!r} exists"))
        self.objects[check_key(key)] = bytes(data)
        if self.clock is not None:
            self.modified[key] = self.clock.seconds()
        return succeed(None)

    def delete(self, key: str) -> Deferred[None]:
        self.objects.pop(check_key(key), None)
        self.modified.pop(key, None)
        return succeed(None)

    def head(self, key: str) -> Deferred[ObjectInfo]:
        if check_key(key) not in self.objects:
            return fail(errors.NotFound(f"no object {key!r}"))
        return succeed(ObjectInfo(key, len(self.objects[key]), self.modified.get(key, 0.0)))

    def list(self, prefix: str = "") -> Deferred[list[ObjectInfo]]:
        return succeed([ObjectInfo(key, len(value), self.modified.get(key, 0.0))
                        for key, value in sorted(self.objects.items()) if key.startswith(prefix)])

    def close(self) -> Deferred[None]:
        return succeed(None)


class InMemoryConnection:
    """Both ends of a metadata connection in one object: requests go straight to ``responder``."""

    def __init__(self, responder: MetadataResponder, filespace: str = FILESPACE) -> None:
        self.responder = responder
        self.session: Any = None
        self.on_push: Any = None
        self.keepalive_interval = 0.0
        self.transport = None
        self.lost = False
        self._waiters: list[Deferred[Any]] = []
        self._request_ids = itertools.count(1)
        self.request_id: int | None = None
        self.welcome = responder.welcome(self, Hello(PROTOCOL_VERSION, "test", filespace))  # type: ignore[arg-type]

    def request(self, message: Any, timeout: float | None = None, request_id: int | None = None) -> Deferred[Any]:
        if self.lost:
            return fail(errors.ConnectionClosed(f"cannot send {type(message).__name__}: connection closed"))
        self.request_id = request_id if request_id is not None else next(self._request_ids)
        return defer.maybeDeferred(self.responder.respond, self, message)  # type: ignore[arg-type]

    def push(self, message: Any) -> None:
        if self.on_push is not None and not self.lost:
            self.on_push(message)

    def close(self, text: str = "closing", timeout: float = 0) -> Deferred[Any]:
        if not self.lost:
            self.lost = True
            reason = errors.ConnectionClosed(text)
            self.responder.connection_ended(self, reason)  # type: ignore[arg-type]
            waiters, self._waiters = self._waiters, []
            for waiter in waiters:
                waiter.callback(reason)
        return succeed(None)

    def when_lost(self) -> Deferred[Any]:
        if self.lost:
            return succeed(errors.ConnectionClosed("closed"))
        waiter: Deferred[Any] = Deferred()
        self._waiters.append(waiter)
        return waiter


def make_certificates(directory: Path, filespace: str = FILESPACE) -> Path:
    """A CA and a metadata server certificate for ``filespace``; returns the CA certificate."""
    init_ca(directory / "ca")
    issue_certificate(directory / "ca", [identity_for(filespace), "127.0.0.1"], directory / "meta")
    return directory / "ca" / "ca.pem"


class LoopbackMeta:
    """A metadata server in this process, on loopback TLS, that can be stopped and started on its port."""

    def __init__(self, directory: Path, filespace: str = FILESPACE) -> None:
        self.directory = directory
        self.filespace = filespace
        directory.mkdir(parents=True, exist_ok=True)
        self.ca_file = make_certificates(directory, filespace)
        self.token_path = directory / bootstrap.TOKEN_FILE_NAME
        self.store = MetadataStore(directory / "metadata.sqlite3", reactor)
        bootstrap.prepare_token(self.store, self.token_path)
        self.responder = MetadataResponder(self.store, reactor, filespace, token_path=self.token_path)
        self.tls = server_tls_options(directory / "meta.pem", directory / "meta.key")
        self.port_number = 0
        self.port: Any = None

    @property
    def address(self) -> str:
        return f"tcp:127.0.0.1:{self.port_number}"

    @defer.inlineCallbacks
    def start(self) -> Generator[Deferred[Any], Any, None]:
        """Listen (on the port of the last start, if there was one)."""
        factory = ServerFactory(self.responder, reactor)
        self.port = yield listen_tls(reactor, f"tcp:{self.port_number}:interface=127.0.0.1", self.tls, factory)
        self.port_number = self.port.getHost().port

    def drop_connections(self) -> None:
        """Close the server's side of every connection at once, without a goodbye."""
        for session in list(self.responder.sessions.values()):
            session.connection.transport.abortConnection()

    @defer.inlineCallbacks
    def stop(self) -> Generator[Deferred[Any], Any, None]:
        """Stop listening and drop every connection."""
        if self.port is not None:
            port, self.port = self.port, None
            yield port.stopListening()
        self.drop_connections()

    @defer.inlineCallbacks
    def shut_down(self) -> Generator[Deferred[Any], Any, None]:
        yield self.stop()
        for _ in range(50):
            if not self.responder.sessions:
                break
            yield deferLater(0.01)
        self.store.close()

    @defer.inlineCallbacks
    def connect(self) -> Generator[Deferred[Any], Any, Any]:
        """A raw, ready client connection."""
        connection = yield connect_tls(
            reactor, self.address, self.ca_file, identity_for(self.filespace),
            filespace=self.filespace, keepalive_interval=0,
        )
        return connection


def deferLater(seconds: float) -> Deferred[None]:
    from twisted.internet import task

    return task.deferLater(reactor, seconds, lambda: None)


class ClientTestCase(TestCase):
    """A real metadata server on loopback, initialised; local object store; helpers to log in."""

    timeout = 60
    chunk_size = SMALL_CHUNK

    @defer.inlineCallbacks
    def setUp(self) -> Generator[Deferred[Any], Any, None]:
        self.base = Path(self.mktemp()).absolute()
        self.meta = LoopbackMeta(self.base / "meta")
        yield self.meta.start()
        self.addCleanup(self.meta.shut_down)
        objects = self.base / "objects"
        self.objects = LocalObjectStore(objects, reactor, create=True)
        self.addCleanup(self.objects.close)
        self.state_dir = self.base / "state"
        self.filespace_id = yield self.initialise()

    @defer.inlineCallbacks
    def initialise(self) -> Generator[Deferred[Any], Any, bytes]:
        connection = yield self.meta.connect()
        try:
            filespace_id = yield initialise_filespace(
                reactor, connection=connection, token=bootstrap.read_token(self.meta.token_path),
                admin=ADMIN, passphrase=ADMIN_PASSPHRASE, chunk_size=self.chunk_size, kdf=cheap_kdf(),
            )
        finally:
            yield connection.close("initialised")
        return filespace_id

    def resolver(self) -> Resolver:
        """A resolver whose endpoint cache already knows the server; discovery is nowhere."""
        cache = EndpointCache(self.state_dir)
        cache.put(Location(
            FILESPACE, (self.meta.address,), identity_for(FILESPACE), ServerStatus.SERVING, 30_000,
            reactor.seconds(), "test",
        ))
        resolver = Resolver(
            reactor, ["tcp:127.0.0.1:1"], self.meta.ca_file, cache=cache, backoff=fast_backoff(),
            attempt_timeout=2.0,
        )
        self.addCleanup(resolver.close)
        return resolver

    @defer.inlineCallbacks
    def login(
        self, user: str = ADMIN, passphrase: str = ADMIN_PASSPHRASE, deadline: float | None = 10.0
    ) -> Generator[Deferred[Any], Any, FilespaceSession]:
        session = yield open_session(
            reactor, filespace=FILESPACE, user=user, passphrase=passphrase, resolver=self.resolver(),
            ca_file=self.meta.ca_file, deadline=deadline, backoff=fast_backoff(),
        )
        self.addCleanup(session.close)
        return session

    @defer.inlineCallbacks
    def filespace(self, **login: Any) -> Generator[Deferred[Any], Any, Filespace]:
        session = yield self.login(**login)
        return Filespace(session, self.objects, uid=os.getuid(), gid=os.getgid())


def memory_resolver(folder: Path) -> Resolver:
    """A resolver whose cache points at an in-memory server (any endpoint string will do)."""
    cache = EndpointCache(folder)
    cache.put(Location(FILESPACE, ("memory:",), identity_for(FILESPACE), ServerStatus.SERVING, 30_000, 0.0))
    return Resolver(reactor, ["tcp:127.0.0.1:1"], connect=lambda *_: fail(errors.Unavailable("no discovery")),
                    cache=cache, backoff=fast_backoff())


class MemoryFilespaceCase(TestCase):
    """
    A real metadata store and responder answering in memory, and an in-memory object store.

    Every Deferred of the client core fires at once, so tests (property tests
    above all) use ``successResultOf`` and ``failureResultOf``.
    """

    chunk_size = 128 * 1024

    @defer.inlineCallbacks
    def setUp(self) -> Generator[Deferred[Any], Any, None]:
        self.folder = Path(self.mktemp()).absolute()
        self.folder.mkdir(parents=True)
        self.meta_store = MetadataStore(self.folder / "metadata.sqlite3", reactor)
        self.addCleanup(self.meta_store.close)
        token_path = self.folder / "token"
        bootstrap.prepare_token(self.meta_store, token_path)
        # No group commit: every change is answered at once, so every Deferred fires at once.
        self.responder = MetadataResponder(self.meta_store, reactor, FILESPACE, group_window=None)
        yield initialise_filespace(
            reactor, connection=InMemoryConnection(self.responder), token=bootstrap.read_token(token_path),
            admin=ADMIN, passphrase=ADMIN_PASSPHRASE, chunk_size=self.chunk_size, kdf=cheap_kdf(),
        )
        self.objects = MemoryObjectStore()
        self.fs = yield self.memory_filespace()

    @defer.inlineCallbacks
    def memory_filespace(self, **options: Any) -> Generator[Deferred[Any], Any, Filespace]:
        """Another logged-in session of the admin, as a Filespace."""
        session = yield open_session(
            reactor, filespace=FILESPACE, user=ADMIN, passphrase=ADMIN_PASSPHRASE,
            resolver=memory_resolver(self.folder / "state"),
            connect=lambda endpoint, identity: succeed(InMemoryConnection(self.responder)),
            backoff=fast_backoff(), deadline=5,
        )
        self.addCleanup(session.close)
        options.setdefault("offload", synchronous)
        return Filespace(session, self.objects, uid=1000, gid=1000, **options)

    def now(self, deferred: Deferred[Any]) -> Any:
        """The result of a Deferred that has fired."""
        return self.successResultOf(deferred)


class CacheFolderCase(ClientTestCase):
    """Clients with a cache folder (journals, chunk cache) that every client of the test shares, and that die."""

    @defer.inlineCallbacks
    def client(self, store: Any = None, **options: Any) -> Generator[Deferred[Any], Any, Filespace]:
        """A client with the cache folder every client of this test shares (one machine, run after run)."""
        session = yield self.login()
        fs = Filespace(session, store or self.objects, cache_dir=self.base / "cache", **options)
        self.addCleanup(fs.close)
        return fs

    @defer.inlineCallbacks
    def crash(self, fs: Filespace) -> Generator[Deferred[Any], Any, None]:
        """The client dies: its session ends, its handles are never closed, its memory is gone."""
        for handle in fs.inodes.open_handles():
            if handle.file._journal is not None:
                handle.file._journal.close()
        yield fs.close()
        yield fs.session.close()
