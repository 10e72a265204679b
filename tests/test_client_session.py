"""
The client session: initialising a filespace, logging in, users, and keeping
a session through dropped connections and a server that stops for a while.
"""

from __future__ import annotations

import os
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred, fail
from twisted.trial.unittest import TestCase

from lucidlink import crypto, errors
from lucidlink.client.endpoint_cache import EndpointCache, Location
from lucidlink.client.filespace import Filespace
from lucidlink.client.resolver import Resolver
from lucidlink.client.session import initialise_filespace, open_session
from lucidlink.meta import bootstrap
from lucidlink.meta.service import MetadataResponder
from lucidlink.meta.store import MetadataStore
from lucidlink.protocol import messages as w
from lucidlink.protocol.messages import LockKind, LockType, NotifyKind, Role, ServerStatus
from tests.client_helpers import (
    ADMIN,
    ADMIN_PASSPHRASE,
    FILESPACE,
    ClientTestCase,
    InMemoryConnection,
    cheap_kdf,
    deferLater,
    fast_backoff,
    synchronous,
)


class LoginTests(ClientTestCase):
    """Initialising a filespace and logging in to it."""

    @defer.inlineCallbacks
    def test_initialise_and_log_in(self) -> Generator[Deferred[Any], Any, None]:
        """The admin logs in to the filespace it initialised: role, shape and keys come from the login."""
        session = yield self.login()
        self.assertEqual(session.role, Role.ADMIN)
        self.assertEqual(session.chunk_size, self.chunk_size)
        self.assertEqual(session.filespace_id, self.filespace_id)
        self.assertEqual(len(self.filespace_id), crypto.FILESPACE_ID_SIZE)
        self.assertEqual(session.root_inode, 1)
        self.assertEqual(session.keys.filespace_id, self.filespace_id)
        self.assertFalse(self.meta.token_path.exists())
        root = yield session.call(w.GetAttr(session.root_inode))
        self.assertEqual(root.attributes.inode, 1)

    @defer.inlineCallbacks
    def test_token_works_once(self) -> Generator[Deferred[Any], Any, None]:
        """A second initialisation is refused: the token is spent."""
        connection = yield self.meta.connect()
        self.addCleanup(connection.close)
        failure = yield self.assertFailure(
            initialise_filespace(reactor, connection=connection, token="spent", admin="x", passphrase="p" * 12,
                                 kdf=cheap_kdf()),
            errors.AuthenticationFailed,
        )
        self.assertIn("bootstrap token not valid", str(failure))

    @defer.inlineCallbacks
    def test_wrong_passphrase(self) -> Generator[Deferred[Any], Any, None]:
        """A wrong passphrase and an unknown user get the same message, naming the user."""
        wrong = yield self.assertFailure(self.login(passphrase="not the passphrase"), errors.AuthenticationFailed)
        self.assertEqual(str(wrong), "wrong passphrase for user 'admin' (or no such user)")
        unknown = yield self.assertFailure(self.login(user="nobody"), errors.AuthenticationFailed)
        self.assertEqual(str(unknown), "wrong passphrase for user 'nobody' (or no such user)")

    @defer.inlineCallbacks
    def test_weak_kdf_refused(self) -> Generator[Deferred[Any], Any, None]:
        """Argon2id parameters weaker than the client's minimum are refused before any derivation."""
        admin = yield self.login()
        weak = crypto.new_kdf_parameters(1, crypto.MINIMUM_MEMORY_KIB, 1)
        yield admin.add_user("weakling", Role.READER, "a passphrase", kdf=weak)
        refused = yield self.assertFailure(self.login("weakling", "a passphrase"), errors.AuthenticationFailed)
        self.assertIn("weaker than the minimum", str(refused))

    @defer.inlineCallbacks
    def test_unreachable_soft(self) -> Generator[Deferred[Any], Any, None]:
        """With a deadline and no server, logging in fails with Unavailable saying what failed."""
        yield self.meta.stop()
        started = time.monotonic()
        failure = yield self.assertFailure(self.login(deadline=2.0), errors.Unavailable)
        self.assertLess(time.monotonic() - started, 5)
        self.assertIn("refused", str(failure))


class UserTests(ClientTestCase):
    """Users are managed from an admin's client, which derives and wraps their credentials."""

    @defer.inlineCallbacks
    def test_add_list_passwd_remove(self) -> Generator[Deferred[Any], Any, None]:
        """Users come and go; a changed passphrase stops the old one working; a removed user cannot log in."""
        admin = yield self.login()
        yield admin.add_user("wendy", Role.WRITER, "wendy's first", kdf=cheap_kdf())
        yield admin.add_user("rita", Role.READER, "rita's only", kdf=cheap_kdf())
        users = yield admin.list_users()
        self.assertEqual([(user.name, user.role) for user in users],
                         [("admin", Role.ADMIN), ("rita", Role.READER), ("wendy", Role.WRITER)])
        taken = yield self.assertFailure(admin.add_user("wendy", Role.READER, "x" * 10, kdf=cheap_kdf()),
                                         errors.AlreadyExists)
        self.assertIn("wendy", str(taken))

        wendy = yield self.login("wendy", "wendy's first")
        self.assertEqual(wendy.role, Role.WRITER)
        self.assertEqual(wendy.filespace_id, admin.filespace_id)

        # An admin changes wendy's passphrase: the old one stops working.
        yield admin.change_passphrase("wendy", "wendy's second", kdf=cheap_kdf())
        yield self.assertFailure(self.login("wendy", "wendy's first"), errors.AuthenticationFailed)
        wendy = yield self.login("wendy", "wendy's second")
        # She changes her own; her session keeps working across a reconnect with the new secrets.
        yield wendy.change_passphrase("wendy", "wendy's third", kdf=cheap_kdf())
        self.meta.drop_connections()
        yield wendy.call(w.GetAttr(1))
        self.assertEqual(wendy.reconnects, 1)
        yield self.assertFailure(self.login("wendy", "wendy's second"), errors.AuthenticationFailed)

        # Others' passphrases and the user list are for admins.
        denied = yield self.assertFailure(wendy.change_passphrase("rita", "hijacked", kdf=cheap_kdf()),
                                          errors.AccessDenied)
        self.assertIn("admin role", str(denied))
        yield self.assertFailure(wendy.list_users(), errors.AccessDenied)

        yield admin.remove_user("wendy")
        yield self.assertFailure(self.login("wendy", "wendy's third"), errors.AuthenticationFailed)
        # Her open session ended; it cannot log in again.
        ended = yield self.assertFailure(wendy.call(w.GetAttr(1)), errors.AuthenticationFailed)
        self.assertIn("cannot log in to 'reels' again as 'wendy'", str(ended))
        yield self.assertFailure(admin.remove_user("wendy"), errors.NotFound)
        last = yield self.assertFailure(admin.remove_user("admin"), errors.NotPermitted)
        self.assertIn("last admin", str(last))

    @defer.inlineCallbacks
    def test_reader_cannot_write(self) -> Generator[Deferred[Any], Any, None]:
        """A reader reads; writing is refused with a message naming the role needed."""
        admin = yield self.filespace()
        yield admin.write_file("/notes", b"read me")
        yield admin.session.add_user("bob", Role.READER, "bob's passphrase", kdf=cheap_kdf())
        bob = yield self.filespace(user="bob", passphrase="bob's passphrase")
        self.assertEqual((yield bob.read_file("/notes")), b"read me")
        refused = yield self.assertFailure(bob.mkdir("/mine"), errors.AccessDenied)
        self.assertEqual(str(refused), "user 'bob' is a reader; writing needs the writer role")
        refused = yield self.assertFailure(bob.write_file("/notes", b"overwritten"), errors.AccessDenied)
        self.assertIn("user 'bob' is a reader", str(refused))
        self.assertEqual((yield admin.read_file("/notes")), b"read me")
        yield self.assertFailure(bob.session.add_user("eve", Role.ADMIN, "eve", kdf=cheap_kdf()), errors.AccessDenied)

    @defer.inlineCallbacks
    def test_export_key(self) -> Generator[Deferred[Any], Any, None]:
        """The exported key is the filespace's master key: it opens what the session sealed."""
        session = yield self.login()
        exported = crypto.import_key(session.export_key())
        self.assertEqual(exported.filespace_id, self.filespace_id)
        self.assertEqual(exported.filespace_name, FILESPACE)
        keys = crypto.FilespaceKeys(exported.master_key, exported.filespace_id)
        sealed = crypto.seal_name(session.keys, 1, b"a name")
        self.assertEqual(crypto.open_name(keys, 1, sealed), b"a name")


class ReconnectTests(ClientTestCase):
    """A session outlives its connection: it reconnects, logs in again and retries."""

    @defer.inlineCallbacks
    def test_dropped_connection(self) -> Generator[Deferred[Any], Any, None]:
        """The server drops the connection; the next call connects and logs in again, and succeeds."""
        session = yield self.login()
        reconnected: list[bool] = []
        lost: list[bool] = []
        session.on_reconnect(lambda: reconnected.append(True))
        session.on_connection_lost(lambda: lost.append(True))
        self.meta.drop_connections()
        yield deferLater(0.05)
        self.assertEqual((lost, reconnected), ([True], []), "the loss is told at once, before any call")
        answer = yield session.call(w.GetAttr(1))
        self.assertEqual(answer.attributes.inode, 1)
        self.assertEqual((session.reconnects, reconnected, lost), (1, [True], [True]))

    @defer.inlineCallbacks
    def test_open_handle_survives_reconnect(self) -> Generator[Deferred[Any], Any, None]:
        """Buffered writes of an open file are stored after a reconnect: the handle is opened again."""
        fs = yield self.filespace()
        handle = yield fs.open_path("/kept", os.O_RDWR | os.O_CREAT, 0o644)
        yield handle.write(0, b"before the outage")
        self.meta.drop_connections()
        yield handle.write(100, b"after")
        yield handle.close()
        data = yield fs.read_file("/kept")
        self.assertEqual(data, b"before the outage" + bytes(83) + b"after")
        self.assertEqual(fs.session.reconnects, 1)

    @defer.inlineCallbacks
    def test_kept_connected_retries_a_failed_reconnect(self) -> Generator[Deferred[Any], Any, None]:
        """A session kept connected (it holds locks) connects again by itself, even when an attempt fails.

        A restarting server closes connections it welcomed while it checked
        its database; the session must try again, not give up after one.
        """
        session = yield self.login(deadline=None)
        session.keep_connected(lambda: True)
        reconnected: list[bool] = []
        session.on_reconnect(lambda: reconnected.append(True))
        log_in, failures = session._log_in, []

        def failing_once(connection: Any) -> Deferred[Any]:
            if not failures:
                failures.append(True)
                return fail(errors.ConnectionClosed("peer closed the connection: the metadata server serves again"))
            return log_in(connection)

        session._log_in = failing_once
        self.meta.drop_connections()
        for _ in range(300):
            if reconnected:
                break
            yield deferLater(0.01)
        self.assertEqual((failures, reconnected), ([True], [True]))

    @defer.inlineCallbacks
    def test_hard_waits_for_the_server(self) -> Generator[Deferred[Any], Any, None]:
        """Without a deadline a call waits while the server is down and succeeds once it is back."""
        session = yield self.login(deadline=None)
        yield self.meta.stop()
        reactor.callLater(0.5, self.meta.start)
        started = time.monotonic()
        answer = yield session.call(w.GetAttr(1))
        self.assertGreater(time.monotonic() - started, 0.4)
        self.assertEqual(answer.attributes.inode, 1)
        self.assertEqual(session.reconnects, 1)

    @defer.inlineCallbacks
    def test_soft_gives_up(self) -> Generator[Deferred[Any], Any, None]:
        """With a deadline a call fails with Unavailable once the server has been away that long."""
        session = yield self.login(deadline=0.6)
        yield self.meta.stop()
        started = time.monotonic()
        failure = yield self.assertFailure(session.call(w.GetAttr(1)), errors.Unavailable)
        elapsed = time.monotonic() - started
        self.assertTrue(0.3 < elapsed < 5, elapsed)
        self.assertIn("the metadata server of 'reels' did not answer GetAttr within 0.6 s", str(failure))
        yield self.meta.start()
        answer = yield session.call(w.GetAttr(1))
        self.assertEqual(answer.attributes.inode, 1)

    @defer.inlineCallbacks
    def test_soft_gives_up_on_a_server_that_stopped_answering(self) -> Generator[Deferred[Any], Any, None]:
        """A server that keeps the connection but answers nothing (hung) costs a soft call its deadline, no more."""
        session = yield self.login(deadline=0.6)
        yield session.call(w.GetAttr(1))
        hung = [live.connection.transport for live in self.meta.responder.sessions.values()]
        for transport in hung:
            transport.pauseProducing()
        started = time.monotonic()
        try:
            failure = yield self.assertFailure(session.call(w.GetAttr(1)), errors.Unavailable)
        finally:
            for transport in hung:
                transport.resumeProducing()
        elapsed = time.monotonic() - started
        self.assertTrue(elapsed < 5, elapsed)
        self.assertIn("did not answer GetAttr within 0.6 s", str(failure))

    @defer.inlineCallbacks
    def test_soft_waits_for_a_lock_held_elsewhere(self) -> Generator[Deferred[Any], Any, None]:
        """A lock that waits for another client's waits past the deadline: the server is there, answering."""
        holder = yield self.filespace(deadline=None)
        waiter = yield self.filespace(deadline=0.6)
        yield holder.write_file("/locked", b"")
        inode = (yield holder.stat("/locked")).inode
        yield holder.inodes.lock(inode, 1, LockKind.FLOCK, LockType.WRITE)
        waiting = waiter.inodes.lock(inode, 2, LockKind.FLOCK, LockType.WRITE, wait=True)
        yield deferLater(1.5)
        self.assertFalse(waiting.called, "granted while the other client holds it")
        yield holder.inodes.lock(inode, 1, LockKind.FLOCK, LockType.UNLOCK)
        yield waiting

    @defer.inlineCallbacks
    def test_notifications(self) -> Generator[Deferred[Any], Any, None]:
        """Changes made by one session are pushed to another's listeners."""
        writer = yield self.filespace()
        watcher = yield self.login()
        heard: list[Any] = []
        stop = watcher.on_notify(heard.append)
        yield writer.mkdir("/new")
        for _ in range(100):
            if heard:
                break
            yield deferLater(0.01)
        kinds = {message.kind for message in heard}
        self.assertIn(NotifyKind.ENTRY_CHANGED, kinds)
        stop()
        count = len(heard)
        yield writer.mkdir("/newer")
        yield watcher.call(w.GetAttr(1))
        self.assertEqual(len(heard), count)


class _OnceLost(InMemoryConnection):
    """Answers one request of a kind, then loses the connection before the answer arrives."""

    def __init__(self, responder: MetadataResponder, lose_on: type, tripped: list[bool]) -> None:
        super().__init__(responder)
        self.lose_on = lose_on
        self.tripped = tripped

    def request(self, message: Any, timeout: float | None = None, request_id: int | None = None) -> Deferred[Any]:
        if isinstance(message, self.lose_on) and not self.tripped:
            self.tripped.append(True)
            super().request(message, timeout, request_id).addErrback(lambda _: None)  # its answer is lost
            self.close("lost after the server acted")
            return fail(errors.ConnectionClosed("connection ended before the answer"))
        return super().request(message, timeout, request_id)


class ExactlyOnceTests(TestCase):
    """A change sent again after its connection was lost is made once: the server answers it as it did."""

    @defer.inlineCallbacks
    def session_losing(self, lose_on: type, keeping: bool = True,
                       restarting: bool = False) -> Generator[Deferred[Any], Any, Any]:
        folder = Path(self.mktemp())
        folder.mkdir()
        store = MetadataStore(folder / "metadata.sqlite3", reactor)
        self.addCleanup(store.close)
        bootstrap.prepare_token(store, folder / "token")
        responder = MetadataResponder(store, reactor, FILESPACE)
        if not keeping:
            responder.replies.remember_count = 0
        restarted = MetadataResponder(store, reactor, FILESPACE)  # the same server after a restart: it kept nothing
        yield initialise_filespace(
            reactor, connection=InMemoryConnection(responder), token=bootstrap.read_token(folder / "token"),
            admin=ADMIN, passphrase=ADMIN_PASSPHRASE, chunk_size=4096, kdf=cheap_kdf(),
        )
        self.tripped: list[bool] = []
        cache = EndpointCache(folder / "state")
        cache.put(Location(FILESPACE, ("memory:",), "x", ServerStatus.SERVING, 1000, 0.0))
        session = yield open_session(
            reactor, filespace=FILESPACE, user=ADMIN, passphrase=ADMIN_PASSPHRASE,
            resolver=Resolver(reactor, ["tcp:127.0.0.1:1"], connect=lambda *_: fail(errors.Unavailable()),
                              cache=cache),
            connect=lambda endpoint, identity: defer.succeed(
                _OnceLost(restarted if restarting and self.tripped else responder, lose_on, self.tripped)
            ),
            backoff=fast_backoff(), deadline=60,  # a loaded machine must not make a retry give up
        )
        self.addCleanup(session.close)
        self.store = store
        return Filespace(session, None, offload=synchronous)

    @defer.inlineCallbacks
    def test_mkdir_made_once(self) -> Generator[Deferred[Any], Any, None]:
        """A MkDir made before the connection dropped is answered with its directory, not AlreadyExists."""
        fs = yield self.session_losing(w.MkDir)
        made = yield fs.mkdir("/once")
        self.assertEqual(self.tripped, [True], "the first attempt was made, and its answer lost")
        self.assertEqual(fs.session.reconnects, 1)
        attributes = yield fs.resolve("/once")
        self.assertEqual((attributes.inode, attributes.kind), (made.inode, w.FileKind.DIRECTORY))

    @defer.inlineCallbacks
    def test_create_made_once_and_its_file_open(self) -> Generator[Deferred[Any], Any, None]:
        """A Create sent again answers the file it made, opened on the new connection: writing it works."""
        fs = yield self.session_losing(w.Create)
        handle = yield fs.inodes.create(1, b"new.txt", 0o644, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        self.assertEqual(self.tripped, [True])
        yield handle.truncate(10)
        yield handle.close()
        attributes = yield fs.resolve("/new.txt")
        self.assertEqual((attributes.inode, attributes.size), (handle.inode, 10))

    @defer.inlineCallbacks
    def test_unlink_made_once(self) -> Generator[Deferred[Any], Any, None]:
        """An Unlink sent again is answered as done, not NotFound."""
        fs = yield self.session_losing(w.Unlink)
        yield fs.write_file("/gone.txt", b"")
        yield fs.remove("/gone.txt")
        self.assertEqual(self.tripped, [True])
        yield self.assertFailure(fs.resolve("/gone.txt"), errors.NotFound)

    @defer.inlineCallbacks
    def test_error_of_the_first_attempt_is_kept(self) -> Generator[Deferred[Any], Any, None]:
        """What the first attempt answered, an error too, is the answer to the second, without a note."""
        fs = yield self.session_losing(w.MkDir)
        yield fs.session.call(w.MkDir(1, fs.inodes._seal(1, b"taken"), 0o755, 0, 0))
        self.tripped.clear()
        failure = yield self.assertFailure(fs.mkdir("/taken"), errors.AlreadyExists)
        self.assertEqual(self.tripped, [True])
        self.assertNotIn("sent again", str(failure))

    @defer.inlineCallbacks
    def test_note_from_a_server_that_keeps_no_answers(self) -> Generator[Deferred[Any], Any, None]:
        """Where the server kept no answer, a MkDir sent again meets its own success; the error says so."""
        fs = yield self.session_losing(w.MkDir, keeping=False)
        failure = yield self.assertFailure(fs.mkdir("/once"), errors.AlreadyExists)
        self.assertIn("MkDir was sent again after the connection to the metadata server was lost", str(failure))
        attributes = yield fs.resolve("/once")
        self.assertEqual(attributes.kind, w.FileKind.DIRECTORY)

    @defer.inlineCallbacks
    def test_note_after_the_server_restarted(self) -> Generator[Deferred[Any], Any, None]:
        """Sent again to a server that started since (another boot id), an error may be the first attempt's."""
        fs = yield self.session_losing(w.MkDir, restarting=True)
        failure = yield self.assertFailure(fs.mkdir("/once"), errors.AlreadyExists)
        self.assertIn("the first attempt may have done it", str(failure))

    @defer.inlineCallbacks
    def test_first_login_lost_with_its_connection(self) -> Generator[Deferred[Any], Any, None]:
        """
        A first login whose answer was lost (the passphrase derived already) is a first login again on the next
        connection: the session unwraps its key there, and is not taken for one that was logged in before.
        """
        fs = yield self.session_losing(w.Login)
        self.assertEqual(self.tripped, [True])
        self.assertIsNotNone(fs.session.keys)
        self.assertEqual(fs.session.root_inode, 1)
        self.assertEqual(fs.session.reconnects, 0, "never logged in before")
        attributes = yield fs.resolve("/")
        self.assertEqual(attributes.inode, 1)

    @defer.inlineCallbacks
    def test_idempotent_requests_just_succeed(self) -> Generator[Deferred[Any], Any, None]:
        """A lookup that lost its connection is simply sent again."""
        fs = yield self.session_losing(w.GetAttr)
        attributes = yield fs.resolve("/")
        self.assertEqual(attributes.inode, 1)
        self.assertEqual(fs.session.reconnects, 1)
