"""
Creates and unlinks made at once under a directory lease (:mod:`lucidlink.client.leased_changes`).

A real metadata store and responder in memory; the connection can hold the
server's answers back (:class:`_HeldConnection`), so a test sees what the
client did before the server answered.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.defer import Deferred

from lucidlink import errors
from lucidlink.client.filespace import Filespace
from lucidlink.client.leased_changes import ChangeRefused
from lucidlink.client.session import open_session
from lucidlink.meta import mutations as m
from lucidlink.meta.inode_blocks import InodeBlocks
from lucidlink.meta.service import MetadataResponder
from lucidlink.protocol import messages as w
from tests.client_helpers import (
    ADMIN,
    ADMIN_PASSPHRASE,
    FILESPACE,
    InMemoryConnection,
    MemoryFilespaceCase,
    fast_backoff,
    memory_resolver,
    synchronous,
)


class _HeldConnection(InMemoryConnection):
    """The server acts on each request at once; while ``holding``, its answers wait for :meth:`answer_all`."""

    def __init__(self, *arguments: Any) -> None:
        super().__init__(*arguments)
        self.holding = False
        self.deaf = False
        """Requests are lost on the way (the server never sees them) until the connection closes."""
        self.held: list[tuple[Deferred[Any], Deferred[Any]]] = []
        self.sent: list[Any] = []
        self.unanswered: list[Deferred[Any]] = []

    def request(self, message: Any, timeout: float | None = None, request_id: int | None = None) -> Deferred[Any]:
        self.sent.append(message)
        if self.deaf:
            self.unanswered.append(Deferred())
            return self.unanswered[-1]
        answer = super().request(message, timeout, request_id)
        if not self.holding:
            return answer
        waiting: Deferred[Any] = Deferred()
        self.held.append((answer, waiting))
        return waiting

    def close(self, text: str = "closing", timeout: float = 0) -> Deferred[Any]:
        closed = super().close(text, timeout)
        waiting = [waiter for _, waiter in self.held] + self.unanswered
        self.held, self.unanswered = [], []
        for waiter in waiting:
            waiter.errback(errors.ConnectionClosed(text))
        return closed

    def answer_all(self) -> None:
        self.holding = False
        held, self.held = self.held, []
        for answer, waiting in held:
            answer.chainDeferred(waiting)


class LeasedChangesTests(MemoryFilespaceCase):
    """One client with leases; another that meets them."""

    timeout = 20

    @defer.inlineCallbacks
    def leased_filespace(self) -> Generator[Deferred[Any], Any, Filespace]:
        """A session of the admin that uses leases, on a connection that can hold answers back."""
        connections: list[_HeldConnection] = []

        def connect(endpoint: Any, identity: Any) -> Deferred[Any]:
            connections.append(_HeldConnection(self.responder))
            return defer.succeed(connections[-1])

        session = yield open_session(
            reactor, filespace=FILESPACE, user=ADMIN, passphrase=ADMIN_PASSPHRASE,
            resolver=memory_resolver(self.folder / "leased"), connect=connect, backoff=fast_backoff(), deadline=5,
        )
        self.addCleanup(session.close)
        self.connections = connections
        fs = Filespace(session, self.objects, uid=1000, gid=1000, offload=synchronous, leases=True)
        self.addCleanup(fs.close)
        return fs

    @property
    def connection(self) -> _HeldConnection:
        return self.connections[-1]

    @defer.inlineCallbacks
    def leased_folder(self, fs: Filespace, name: str = "/work") -> Generator[Deferred[Any], Any, int]:
        attributes = yield fs.mkdir(name)
        self.assertTrue(fs.inodes.at_once.leases.usable(attributes.inode), "a folder made here is leased")
        return attributes.inode  # type: ignore[no-any-return]

    def creates_sent(self) -> list[w.Create]:
        return [message for message in self.connection.sent if isinstance(message, w.Create)]

    @defer.inlineCallbacks
    def test_create_and_unlink_answer_before_the_server(self) -> Generator[Deferred[Any], Any, None]:
        fs = yield self.leased_filespace()
        folder = yield self.leased_folder(fs)
        self.connection.holding = True
        handle = yield fs.inodes.create(folder, b"a", 0o640, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 1000, 1000)
        self.assertEqual(len(self.connection.held), 1, "the create was sent, and not waited for")
        attributes = handle.opened
        self.assertEqual((attributes.mode & 0o7777, attributes.nlink, attributes.size), (0o640, 1, 0))
        self.assertEqual(fs.inodes.lookup_cached(folder, b"a"), attributes)
        closing = handle.close()
        self.assertNoResult(closing)  # its Release names the server's handle id, which comes with the answer
        yield fs.inodes.unlink(folder, b"a")
        with self.assertRaises(errors.NotFound):
            fs.inodes.lookup_cached(folder, b"a")
        syncing = fs.inodes.sync_changes()
        self.assertNoResult(syncing)
        self.connection.answer_all()
        yield closing
        yield syncing
        self.assertEqual(self.meta_store.readdir(folder, b"", 10)[0], [])
        self.assertEqual(fs.session._handles, set(), "the released handle is not opened again after a reconnect")
        [create] = self.creates_sent()
        self.assertEqual(create.inode, attributes.inode, "the inode id is one reserved for this client")
        self.assertEqual(create.time_ns, attributes.ctime_ns)

    @defer.inlineCallbacks
    def test_the_server_keeps_what_the_client_answered(self) -> Generator[Deferred[Any], Any, None]:
        fs = yield self.leased_filespace()
        folder = yield self.leased_folder(fs)
        handle = yield fs.inodes.create(folder, b"a", 0o600, os.O_RDWR | os.O_CREAT, 1000, 1000)
        yield handle.close()
        self.assertEqual(self.meta_store.getattr(handle.inode), handle.opened)
        here = fs.inodes.getattr_cached(folder)
        self.assertEqual(self.meta_store.getattr(folder), here, "the folder's times too")
        yield fs.inodes.unlink(folder, b"a")
        self.assertEqual(self.meta_store.getattr(folder), fs.inodes.getattr_cached(folder))
        self.assertEqual(len(self.creates_sent()), 1)

    @defer.inlineCallbacks
    def test_a_set_group_id_folder_gives_its_group(self) -> Generator[Deferred[Any], Any, None]:
        fs = yield self.leased_filespace()
        folder = yield self.leased_folder(fs)
        yield fs.inodes.setattr(folder, mode=0o2775, gid=4242)
        yield fs.inodes.readdir(folder)  # the set-attributes answer is known; the listing was forgotten with it
        handle = yield fs.inodes.create(folder, b"a", 0o644, os.O_WRONLY | os.O_CREAT, 1000, 1000)
        yield handle.close()
        self.assertEqual(handle.opened.gid, 4242)
        self.assertEqual(self.meta_store.getattr(handle.inode), handle.opened)

    @defer.inlineCallbacks
    def test_data_written_to_a_file_made_at_once_is_committed(self) -> Generator[Deferred[Any], Any, None]:
        fs = yield self.leased_filespace()
        yield self.leased_folder(fs)
        yield fs.write_file("/work/clip", b"frames" * 1000)
        self.assertIn(w.Create, [type(message) for message in self.connection.sent])
        other = yield self.memory_filespace()
        content = yield other.read_file("/work/clip")
        self.assertEqual(content, b"frames" * 1000)

    @defer.inlineCallbacks
    def test_a_file_unlinked_while_open_stays_readable(self) -> Generator[Deferred[Any], Any, None]:
        fs = yield self.leased_filespace()
        folder = yield self.leased_folder(fs)
        handle = yield fs.inodes.create(folder, b"a", 0o644, os.O_RDWR | os.O_CREAT, 1000, 1000)
        yield handle.write(0, b"still here")
        yield fs.inodes.unlink(folder, b"a")
        yield handle.fsync()
        content = yield handle.read(0, 100)
        self.assertEqual(content, b"still here")
        attributes = yield fs.inodes.getattr(handle.inode)
        self.assertEqual(attributes.nlink, 0)
        yield handle.close()

    @defer.inlineCallbacks
    def test_a_folder_changed_here_is_leased(self) -> Generator[Deferred[Any], Any, None]:
        """A folder made elsewhere: its lease is asked for after a change made here the usual way."""
        other = yield self.memory_filespace()
        shared = yield other.mkdir("/shared")
        fs = yield self.leased_filespace()
        first = yield fs.open_path("/shared/a", os.O_WRONLY | os.O_CREAT)
        yield first.close()
        self.assertTrue(fs.inodes.at_once.leases.usable(shared.inode))
        with self.assertRaises(errors.NotFound):
            yield fs.inodes.lookup(shared.inode, b"b")  # as the kernel does before a create
        self.connection.holding = True
        second = yield fs.inodes.create(shared.inode, b"b", 0o644, os.O_WRONLY | os.O_CREAT, 1000, 1000)
        self.assertEqual(len(self.connection.held), 1, "made at once")
        self.connection.answer_all()
        yield second.close()

    @defer.inlineCallbacks
    def test_a_folder_asked_for_at_once_fetches_its_attributes_once(self) -> Generator[Deferred[Any], Any, None]:
        """Creates made the usual way, side by side, while the lease is asked for: one GetAttr of the folder."""
        other = yield self.memory_filespace()
        shared = yield other.mkdir("/shared")
        fs = yield self.leased_filespace()
        self.connection.holding = True
        for _ in range(3):  # as each create made the usual way ends
            fs.inodes.at_once.ask_for_lease(shared.inode)
        fetched = [message for message in self.connection.sent if isinstance(message, w.GetAttr)]
        self.assertEqual(fetched, [w.GetAttr(shared.inode)])
        asked = [message for message in self.connection.sent if isinstance(message, w.LeaseDirectory)]
        self.assertEqual(asked, [w.LeaseDirectory(shared.inode)])
        self.connection.answer_all()
        yield fs.inodes.sync_changes()
        self.assertIsNotNone(fs.inodes.known.attributes(shared.inode))

    @defer.inlineCallbacks
    def test_what_is_not_made_at_once(self) -> Generator[Deferred[Any], Any, None]:
        fs = yield self.leased_filespace()
        folder = yield self.leased_folder(fs)
        yield fs.write_file("/work/a", b"x")
        yield fs.link("/work/a", "/work/b")
        yield fs.stat("/work/a")  # two links, known here
        self.connection.sent.clear()
        self.connection.holding = True
        removing = fs.inodes.unlink(folder, b"a")  # two links: the other's attributes would lag
        self.assertNoResult(removing)
        self.connection.answer_all()
        yield removing
        unleased = yield fs.mkdir("/elsewhere")
        fs.inodes.at_once.leases.drop_all()
        self.connection.holding = True
        creating = fs.inodes.create(unleased.inode, b"c", 0o644, os.O_WRONLY | os.O_CREAT, 1000, 1000)
        self.assertNoResult(creating)
        self.connection.answer_all()
        handle = yield creating
        yield handle.close()
        self.assertEqual(handle.inode, self.meta_store.lookup(unleased.inode, fs.inodes._seal(unleased.inode, b"c")).inode)

    @defer.inlineCallbacks
    def test_a_refused_create_is_reported_at_the_next_sync(self) -> Generator[Deferred[Any], Any, None]:
        fs = yield self.leased_filespace()
        folder = yield self.leased_folder(fs)
        self.responder.inode_blocks = InodeBlocks(reactor)  # the server forgot the ids it reserved
        changed: list[tuple[int, int, bytes | None]] = []
        fs.inodes.on_change(lambda inode, parent, name: changed.append((inode, parent, name)))
        handle = yield fs.inodes.create(folder, b"a", 0o644, os.O_WRONLY | os.O_CREAT, 1000, 1000)
        failure = yield self.assertFailure(fs.inodes.sync_changes(), ChangeRefused)
        self.assertIn(f"creating inode {handle.inode} in directory {folder}", str(failure))
        self.assertIn((handle.inode, folder, b"a"), changed, "the kernel is told to forget the entry")
        yield fs.inodes.sync_changes()  # reported once
        listing = yield fs.inodes.readdir(folder)
        self.assertEqual(listing, [], "the folder is read again from the server")
        yield self.assertFailure(handle.write(0, b"data"), ChangeRefused)
        yield handle.close()

    @defer.inlineCallbacks
    def test_a_refused_unlink_is_reported_at_the_next_fsync(self) -> Generator[Deferred[Any], Any, None]:
        fs = yield self.leased_filespace()
        folder = yield self.leased_folder(fs)
        yield fs.write_file("/work/a", b"x")
        kept = yield fs.open_path("/work/kept", os.O_RDWR | os.O_CREAT)
        apply = self.responder._apply

        def full_for_unlinks(session: Any, record: Any) -> Any:
            if isinstance(record, m.Unlink):
                raise errors.NoSpace("the metadata disk is full")
            return apply(session, record)

        self.patch(self.responder, "_apply", full_for_unlinks)
        yield fs.inodes.unlink(folder, b"a")
        self.assertEqual(fs.inodes.lookup_cached(folder, b"kept"), None, "the folder is to be read again")
        yield self.assertFailure(kept.fsync(), ChangeRefused)
        yield kept.close()

    @defer.inlineCallbacks
    def test_an_unlink_of_what_is_gone_already_is_done(self) -> Generator[Deferred[Any], Any, None]:
        """(A restarted server, which made the unlink and then lost its answer, says the name is gone.)"""
        fs = yield self.leased_filespace()
        folder = yield self.leased_folder(fs)
        yield fs.write_file("/work/a", b"x")
        self.behind_the_leases_back(m.Unlink(folder, fs.inodes._seal(folder, b"a")))
        yield fs.inodes.unlink(folder, b"a")
        yield fs.inodes.sync_changes()

    def behind_the_leases_back(self, *records: Any) -> None:
        with self.meta_store.group():
            for record in records:
                self.meta_store.apply(record)

    @defer.inlineCallbacks
    def test_changes_in_flight_survive_a_restart_of_the_server(self) -> Generator[Deferred[Any], Any, None]:
        """Made and unanswered, or never seen: sent again to the restarted server, each is made once."""
        fs = yield self.leased_filespace()
        folder = yield self.leased_folder(fs)
        yield fs.write_file("/work/old", b"x")
        self.connection.holding = True
        made = yield fs.inodes.create(folder, b"made", 0o644, os.O_WRONLY | os.O_CREAT, 1000, 1000)
        yield fs.inodes.unlink(folder, b"old")
        self.connection.deaf = True
        lost = yield fs.inodes.create(folder, b"lost", 0o644, os.O_WRONLY | os.O_CREAT, 1000, 1000)
        self.responder = MetadataResponder(self.meta_store, reactor, FILESPACE, group_window=None)
        self.connection.close("the server restarted")
        yield fs.inodes.sync_changes()
        for handle in (made, lost):
            yield handle.write(0, b"kept")
            yield handle.close()
        other = yield self.memory_filespace()
        names = yield other.listdir("/work")
        self.assertEqual(sorted(name for name, _ in names), ["lost", "made"])
        content = yield other.read_file("/work/lost")
        self.assertEqual(content, b"kept")

    @defer.inlineCallbacks
    def test_another_client_recalls_the_lease_and_sees_every_change(self) -> Generator[Deferred[Any], Any, None]:
        fs = yield self.leased_filespace()
        folder = yield self.leased_folder(fs)
        self.connection.holding = True
        for number in range(5):
            handle = yield fs.inodes.create(folder, b"f%d" % number, 0o644, os.O_WRONLY | os.O_CREAT, 1000, 1000)
            handle.close()
        yield fs.inodes.unlink(folder, b"f0")
        self.assertEqual(len(self.connection.held), 6)
        other = yield self.memory_filespace()
        listing = other.listdir("/work")  # Busy while the lease is recalled; the holder gives it back after its changes
        reactor.callLater(0.05, self.connection.answer_all)
        names = yield listing
        self.assertEqual(sorted(name for name, _ in names), ["f1", "f2", "f3", "f4"])
        self.assertFalse(fs.inodes.at_once.leases.usable(folder), "given back")
        self.connection.sent.clear()
        yield fs.inodes.unlink(folder, b"f1")
        self.assertIn(w.Unlink, [type(message) for message in self.connection.sent])
        self.assertEqual(len(fs.session.pipeline), 0, "made the usual way, answered before it returned")

    @defer.inlineCallbacks
    def test_a_lease_ends_with_the_connection_and_with_its_time(self) -> Generator[Deferred[Any], Any, None]:
        fs = yield self.leased_filespace()
        folder = yield self.leased_folder(fs)
        self.connection.close("dropped")
        self.assertFalse(fs.inodes.at_once.leases.usable(folder))
        yield fs.mkdir("/again")  # connects again
        self.responder.leases.lease_seconds = 2.2  # usable for 0.2 s (the last 2 s are not used)
        short = yield self.leased_folder(fs, "/short")
        yield task.deferLater(reactor, 0.3, lambda: None)
        self.assertFalse(fs.inodes.at_once.leases.usable(short))

    @defer.inlineCallbacks
    def test_closing_waits_for_changes_on_their_way(self) -> Generator[Deferred[Any], Any, None]:
        fs = yield self.leased_filespace()
        folder = yield self.leased_folder(fs)
        self.connection.holding = True
        handle = yield fs.inodes.create(folder, b"a", 0o644, os.O_WRONLY | os.O_CREAT, 1000, 1000)
        handle.close()
        closing = fs.close()
        self.assertNoResult(closing)
        self.connection.answer_all()
        yield closing
        self.assertEqual(len(self.meta_store.readdir(folder, b"", 10)[0]), 1)

    @defer.inlineCallbacks
    def test_the_folders_times_are_the_servers_when_it_did_not_keep_the_holders(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        """A change that reached the server after its lease ended was made at the server's time: not the one here."""
        fs = yield self.leased_filespace()
        folder = yield self.leased_folder(fs)
        self.responder.leases._leases.clear()  # the server's lease ended; the client has not heard yet
        handle = yield fs.inodes.create(folder, b"a", 0o644, os.O_WRONLY | os.O_CREAT, 1000, 1000)
        yield fs.inodes.sync_changes()
        self.assertNotEqual(self.meta_store.getattr(handle.inode).ctime_ns, handle.opened.ctime_ns)
        self.assertIn(fs.inodes.getattr_cached(folder), (None, self.meta_store.getattr(folder)))
        yield handle.close()
        yield fs.inodes.getattr(folder)
        yield fs.inodes.lookup(folder, b"a")
        fs.inodes.at_once.leases._held[folder].until = reactor.seconds() + 5  # still usable here
        yield fs.inodes.unlink(folder, b"a")
        yield fs.inodes.sync_changes()
        self.assertIn(fs.inodes.getattr_cached(folder), (None, self.meta_store.getattr(folder)))

    def drop_connection(self) -> None:
        """The connection is lost with the server's answers held back: the server made the changes, unheard."""
        connection = self.connection
        held, connection.held = connection.held, []
        connection.holding = False
        connection.close("dropped")
        for answer, waiting in held:
            answer.addErrback(lambda _: None)
            waiting.errback(errors.ConnectionClosed("dropped"))

    @defer.inlineCallbacks
    def test_a_create_whose_answer_was_lost_is_answered_on_the_next_connection(
        self,
    ) -> Generator[Deferred[Any], Any, None]:
        fs = yield self.leased_filespace()
        folder = yield self.leased_folder(fs)
        self.connection.holding = True
        handle = yield fs.inodes.create(folder, b"a", 0o644, os.O_WRONLY | os.O_CREAT, 1000, 1000)
        first = self.connection
        self.drop_connection()
        yield fs.inodes.sync_changes()
        self.assertIsNot(self.connection, first, "connected again")
        yield handle.write(0, b"kept")
        yield handle.close()
        self.assertEqual(fs.session._handles, set())
        [server_session] = [s for s in self.responder.sessions.values() if s.connection is self.connection]
        self.assertEqual(dict(server_session.handles), {}, "the handle opened again was released")
        other = yield self.memory_filespace()
        content = yield other.read_file("/work/a")
        self.assertEqual(content, b"kept")

    @defer.inlineCallbacks
    def test_a_change_whose_fate_is_unknown_says_so(self) -> Generator[Deferred[Any], Any, None]:
        """The session closes with a create unanswered: not "refused", but not known either."""
        fs = yield self.leased_filespace()
        folder = yield self.leased_folder(fs)
        self.connection.deaf = True
        yield fs.inodes.create(folder, b"a", 0o644, os.O_WRONLY | os.O_CREAT, 1000, 1000)
        fs.session.pipeline.fail_all(errors.Unavailable("the metadata server did not answer within 5 s"))
        failure = yield self.assertFailure(fs.inodes.sync_changes(), ChangeRefused)
        self.assertIn("got no answer from the metadata server (it may have been made or not)", str(failure))
        self.connection.deaf = False

    @defer.inlineCallbacks
    def test_an_unlink_sent_again_removes_only_what_it_meant(self) -> Generator[Deferred[Any], Any, None]:
        """Unseen by the old server; meanwhile another client made the name anew on the new one: it stays."""
        fs = yield self.leased_filespace()
        folder = yield self.leased_folder(fs)
        yield fs.write_file("/work/a", b"mine")
        self.connection.deaf = True
        yield fs.inodes.unlink(folder, b"a")
        self.connection.deaf = False
        self.responder = MetadataResponder(self.meta_store, reactor, FILESPACE, group_window=None)
        other = yield self.memory_filespace()
        yield other.remove("/work/a")
        yield other.write_file("/work/a", b"theirs")
        self.drop_connection()
        yield fs.inodes.sync_changes()
        content = yield other.read_file("/work/a")
        self.assertEqual(content, b"theirs")

    def restart_the_server(self) -> None:
        """The metadata server restarts on the same store: it remembers no answer and no lease."""
        self.responder = MetadataResponder(self.meta_store, reactor, FILESPACE, group_window=None)
        self.drop_connection()  # it connects again at once, to the new one

    @defer.inlineCallbacks
    def check_made_across_a_restart(self, made_before: bool) -> Generator[Deferred[Any], Any, None]:
        fs = yield self.leased_filespace()
        folder = yield self.leased_folder(fs)
        if made_before:
            self.connection.holding = True
        else:
            self.connection.deaf = True
        handle = yield fs.inodes.create(folder, b"a", 0o644, os.O_WRONLY | os.O_CREAT, 1000, 1000)
        self.connection.deaf = False
        self.restart_the_server()
        yield fs.inodes.sync_changes()  # no ChangeRefused
        self.assertEqual(self.meta_store.lookup(folder, fs.inodes._seal(folder, b"a")).inode, handle.inode,
                         "made under the id the program was told")
        yield handle.write(0, b"kept")
        yield handle.close()
        self.assertEqual(fs.session._handles, set())
        other = yield self.memory_filespace()
        content = yield other.read_file("/work/a")
        self.assertEqual(content, b"kept")
        again = yield fs.inodes.create(folder, b"b", 0o644, os.O_WRONLY | os.O_CREAT, 1000, 1000)
        yield again.close()
        yield fs.inodes.sync_changes()

    def test_a_create_not_made_before_the_server_restarted_is_made_after(self) -> Deferred[None]:
        return self.check_made_across_a_restart(made_before=False)

    def test_a_create_made_before_the_server_restarted_is_answered_after(self) -> Deferred[None]:
        return self.check_made_across_a_restart(made_before=True)
