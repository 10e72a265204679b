"""Changes sent without waiting (:mod:`lucidlink.client.pipeline`): in order, each made once, through drops."""

from __future__ import annotations

from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import TestCase

from lucidlink import errors
from lucidlink.client.endpoint_cache import EndpointCache, Location
from lucidlink.client.resolver import Resolver
from lucidlink.client.session import FilespaceSession, initialise_filespace, open_session
from lucidlink.meta import bootstrap
from lucidlink.meta.service import MetadataResponder
from lucidlink.meta.store import ROOT_INODE, MetadataStore
from lucidlink.protocol import messages as w
from lucidlink.protocol.messages import ServerStatus
from tests.client_helpers import (
    ADMIN,
    ADMIN_PASSPHRASE,
    FILESPACE,
    InMemoryConnection,
    cheap_kdf,
    fast_backoff,
)


class _Faulty(InMemoryConnection):
    """Answers as the server does, except that ``faults`` (message class: what to do, once) happen first."""

    def __init__(self, responder: MetadataResponder, faults: dict[type, str]) -> None:
        super().__init__(responder)
        self.faults = faults

    def request(self, message: Any, timeout: float | None = None, request_id: int | None = None) -> Deferred[Any]:
        fault = self.faults.pop(type(message), None)
        if fault == "lost after the server acted":
            super().request(message, timeout, request_id).addErrback(lambda _: None)
            self.close(fault)
            return fail(errors.ConnectionClosed(fault))
        if fault == "closed before the answer":
            self.close(fault)
            return fail(errors.ConnectionClosed(fault))
        if fault == "restoring":
            return fail(errors.Restoring("restoring", retry_after_ms=10))
        return super().request(message, timeout, request_id)


class PipelineTests(TestCase):
    """A session's changes posted one after the other, none waited for."""

    @defer.inlineCallbacks
    def session(self, **faults: str) -> Generator[Deferred[Any], Any, FilespaceSession]:
        folder = Path(self.mktemp())
        folder.mkdir()
        self.store = MetadataStore(folder / "metadata.sqlite3", reactor)
        self.addCleanup(self.store.close)
        bootstrap.prepare_token(self.store, folder / "token")
        responder = MetadataResponder(self.store, reactor, FILESPACE)
        yield initialise_filespace(
            reactor, connection=InMemoryConnection(responder), token=bootstrap.read_token(folder / "token"),
            admin=ADMIN, passphrase=ADMIN_PASSPHRASE, chunk_size=4096, kdf=cheap_kdf(),
        )
        cache = EndpointCache(folder / "state")
        cache.put(Location(FILESPACE, ("memory:",), "x", ServerStatus.SERVING, 1000, 0.0))
        pending = self.faults = {getattr(w, name): fault for name, fault in faults.items()}
        session = yield open_session(
            reactor, filespace=FILESPACE, user=ADMIN, passphrase=ADMIN_PASSPHRASE,
            resolver=Resolver(reactor, ["tcp:127.0.0.1:1"], connect=lambda *_: fail(errors.Unavailable()),
                              cache=cache),
            connect=lambda endpoint, identity: defer.succeed(_Faulty(responder, pending)),
            backoff=fast_backoff(), deadline=60,  # a loaded machine must not make a retry give up
        )
        self.addCleanup(session.close)
        return session  # type: ignore[no-any-return]

    def names(self) -> list[bytes]:
        return sorted(name for name, _ in self.store.readdir(ROOT_INODE, b"", 100)[0])

    def changes(self) -> list[Any]:
        """Changes whose result depends on their order: made out of order, one of them fails."""
        return [
            w.MkDir(ROOT_INODE, b"x", 0o755, 0, 0),
            w.Rename(ROOT_INODE, b"x", ROOT_INODE, b"y", 0),
            w.MkDir(ROOT_INODE, b"x", 0o755, 0, 0),
            w.RmDir(ROOT_INODE, b"y"),
        ]

    @defer.inlineCallbacks
    def test_in_order_without_waiting(self) -> Generator[Deferred[Any], Any, None]:
        session = yield self.session()
        posted = [session.pipeline.post(change) for change in self.changes()]
        self.assertNoResult(posted[0])
        self.assertEqual(len(session.pipeline), 4)
        yield session.pipeline.settled()
        yield defer.gatherResults(posted)
        self.assertEqual(self.names(), [b"x"])

    @defer.inlineCallbacks
    def test_sent_again_in_order_after_a_drop(self) -> Generator[Deferred[Any], Any, None]:
        """The connection drops after the server made the rename: everything is answered, each made once."""
        session = yield self.session(Rename="lost after the server acted")
        posted = [session.pipeline.post(change) for change in self.changes()]
        yield defer.gatherResults(posted)
        self.assertEqual(session.reconnects, 1)
        self.assertEqual(self.names(), [b"x"])

    @defer.inlineCallbacks
    def test_connecting_again_is_retried(self) -> Generator[Deferred[Any], Any, None]:
        """A server that closes the next connection before the login (restarting) is tried again, not given up."""
        session = yield self.session(Rename="lost after the server acted")
        self.faults[w.Login] = "closed before the answer"
        posted = [session.pipeline.post(change) for change in self.changes()]
        yield defer.gatherResults(posted)
        self.assertEqual(self.names(), [b"x"])

    @defer.inlineCallbacks
    def test_try_again_then_sent_again(self) -> Generator[Deferred[Any], Any, None]:
        """A change answered Restoring is sent again after a pause, and answered."""
        session = yield self.session(MkDir="restoring")
        made = session.pipeline.post(w.MkDir(ROOT_INODE, b"a", 0o755, 0, 0))
        entry = yield made
        self.assertEqual(self.store.lookup(ROOT_INODE, b"a"), entry.attributes)

    @defer.inlineCallbacks
    def test_own_error(self) -> Generator[Deferred[Any], Any, None]:
        """A change refused fails alone; those around it are made."""
        session = yield self.session()
        first = session.pipeline.post(w.MkDir(ROOT_INODE, b"a", 0o755, 0, 0))
        again = session.pipeline.post(w.MkDir(ROOT_INODE, b"a", 0o755, 0, 0))
        after = session.pipeline.post(w.MkDir(ROOT_INODE, b"b", 0o755, 0, 0))
        yield first
        yield self.assertFailure(again, errors.AlreadyExists)
        yield after
        self.assertEqual(self.names(), [b"a", b"b"])

    @defer.inlineCallbacks
    def test_room(self) -> Generator[Deferred[Any], Any, None]:
        """With ``limit`` changes in flight there is no room until one is answered."""
        session = yield self.session()
        session.pipeline.limit = 2
        self.successResultOf(session.pipeline.room())
        posted = [session.pipeline.post(w.MkDir(ROOT_INODE, b"d%d" % n, 0o755, 0, 0)) for n in range(2)]
        room = session.pipeline.room()
        self.assertNoResult(room)
        yield room
        yield defer.gatherResults(posted)

    @defer.inlineCallbacks
    def test_at_most_limit_in_flight(self) -> Generator[Deferred[Any], Any, None]:
        """Beyond ``limit`` changes wait, in order, until answers make room: a server refuses too many in flight."""
        session = yield self.session()
        session.pipeline.limit = 2
        sent: list[Any] = []
        connection = session._live.connection  # type: ignore[union-attr]
        request = connection.request
        self.patch(connection, "request", lambda message, *a, **k: (sent.append(message), request(message, *a, **k))[1])
        posted = [session.pipeline.post(w.MkDir(ROOT_INODE, b"d%d" % n, 0o755, 0, 0)) for n in range(5)]
        self.assertEqual(len(sent), 2)
        yield defer.gatherResults(posted)
        self.assertEqual([message.name for message in sent], [b"d%d" % n for n in range(5)])
        self.assertEqual(self.names(), [b"d%d" % n for n in range(5)])

    @defer.inlineCallbacks
    def test_settled_waits_for_what_was_posted_before(self) -> Generator[Deferred[Any], Any, None]:
        """``settled`` fires once the changes posted before it are answered, whatever is posted after."""
        session = yield self.session()
        session.pipeline.limit = 1
        first = session.pipeline.post(w.MkDir(ROOT_INODE, b"a", 0o755, 0, 0))
        settled = session.pipeline.settled()
        later = session.pipeline.post(w.MkDir(ROOT_INODE, b"b", 0o755, 0, 0))
        self.assertNoResult(settled)
        yield settled
        self.assertEqual((first.called, later.called), (True, False))
        yield later
        self.successResultOf(session.pipeline.settled())

    @defer.inlineCallbacks
    def test_a_call_goes_after_the_changes_posted_before_it(self) -> Generator[Deferred[Any], Any, None]:
        """A request outside the pipeline is sent once the changes posted before it are answered: it sees them."""
        session = yield self.session()
        session.pipeline.limit = 1
        session.pipeline.post(w.MkDir(ROOT_INODE, b"a", 0o755, 0, 0))
        session.pipeline.post(w.MkDir(ROOT_INODE, b"b", 0o755, 0, 0))  # waits for room: not sent yet
        found = yield session.call(w.Lookup(ROOT_INODE, b"b"))
        self.assertEqual(found.attributes, self.store.lookup(ROOT_INODE, b"b"))

    @defer.inlineCallbacks
    def test_the_connection_that_answered(self) -> Generator[Deferred[Any], Any, None]:
        """``post_noting_connection`` tells which connection answered (a handle opened belongs to it)."""
        session = yield self.session(MkDir="lost after the server acted")
        answer, generation = yield session.pipeline.post_noting_connection(w.MkDir(ROOT_INODE, b"a", 0o755, 0, 0))
        self.assertEqual(generation, session._live.generation)  # type: ignore[union-attr]
        self.assertEqual(generation, 2)
        self.assertEqual(answer.attributes, self.store.lookup(ROOT_INODE, b"a"))

    @defer.inlineCallbacks
    def test_closing_hears_the_answers_in_flight(self) -> Generator[Deferred[Any], Any, None]:
        """A change sent before the session closed is made (the server applies what it got): its answer says so."""
        session = yield self.session()
        posted = session.pipeline.post(w.MkDir(ROOT_INODE, b"a", 0o755, 0, 0))
        yield session.close()
        entry = yield posted
        self.assertEqual(self.store.lookup(ROOT_INODE, b"a"), entry.attributes)

    @defer.inlineCallbacks
    def test_closed_session_sends_nothing(self) -> Generator[Deferred[Any], Any, None]:
        """A change posted once the session is closed fails, and is not made."""
        session = yield self.session()
        yield session.close()
        late = session.pipeline.post(w.MkDir(ROOT_INODE, b"late", 0o755, 0, 0))
        yield self.assertFailure(late, errors.ConnectionClosed)
        self.assertEqual(self.names(), [])
