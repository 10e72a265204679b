"""
The metadata responder over in-memory connections (iosim) on a task.Clock:
bootstrap, login, roles, notifications, handles and locks between sessions.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from lucidlink import errors
from lucidlink.meta import bootstrap
from lucidlink.meta.service import MetadataResponder
from lucidlink.meta.sessions import Handle, LoginLimiter, Rate, Session
from lucidlink.meta.store import ROOT_INODE, MetadataStore
from lucidlink.protocol.connection import ClientConnection, IResponder, ServerConnection
from lucidlink.protocol.messages import (
    Bootstrap,
    ChunkMapCommit,
    ChunkMapCommitted,
    ChunkMapRead,
    ChunkRef,
    ClientId,
    Create,
    Entry,
    FileKind,
    FsStats,
    GetAttr,
    Lock,
    LockKind,
    LockState,
    LockTest,
    LockType,
    Login,
    LoginChallenge,
    LoginOk,
    LoginStart,
    Lookup,
    MkDir,
    Notify,
    NotifyKind,
    Ok,
    Open,
    Opened,
    ReadDir,
    Release,
    Rename,
    RmDir,
    Role,
    ServerStatus,
    SetAttr,
    SetAttrField,
    StatFs,
    StatusChanged,
    Unlink,
    UserAdd,
    UserInfo,
    UserList,
    UserListing,
    UserPasswd,
    UserRemove,
)
from tests.meta_helpers import CHUNK_SIZE, FILESPACE_ID, START_TIME, credentials
from tests.test_meta_store import _FailingCommit

FILESPACE = "films"
O_RDONLY, O_WRONLY, O_RDWR = 0, 1, 2
_ports = iter(range(40000, 60000))


class Peer:
    """A client connected in memory, with the pushes it received."""

    def __init__(self, test: ServiceTestCase, host: str, filespace: str) -> None:
        self.test = test
        self.pushes: list[Any] = []
        self.client = ClientConnection(
            test.clock, peer_name="test", filespace=filespace, keepalive_interval=0, on_push=self.pushes.append
        )
        self.server = ServerConnection(test.clock, test.responder, keepalive_interval=0)
        server_transport = iosim.FakeTransport(
            self.server, True, peerAddress=IPv4Address("TCP", host, next(_ports))
        )
        self.pump = iosim.connect(
            self.server, server_transport, self.client, iosim.makeFakeClient(self.client), clock=test.clock
        )

    def ask(self, message: Any) -> defer.Deferred[Any]:
        asked = self.client.request(message, timeout=3600)
        self.test.flush()
        return asked

    def answer(self, message: Any) -> Any:
        return self.test.successResultOf(self.ask(message))

    def refused(self, message: Any, error: type[errors.LucidError]) -> errors.LucidError:
        return self.test.failureResultOf(self.ask(message), error).value  # type: ignore[return-value]

    def login(self, user: str) -> LoginOk:
        return self.answer(Login(user, credentials(user).login_secret))

    def notes(self) -> list[Notify]:
        notes = list(self.pushes)
        self.pushes.clear()
        return notes

    def disconnect(self) -> None:
        self.client.transport.loseConnection()  # type: ignore[union-attr]
        self.test.flush()


class ServiceTestCase(SynchronousTestCase):
    """A responder on a fresh store, waiting for its bootstrap."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START_TIME)
        self.folder = Path(self.mktemp())
        self.folder.mkdir()
        self.store = self.open_store()
        self.token_path = self.folder / bootstrap.TOKEN_FILE_NAME
        bootstrap.prepare_token(self.store, self.token_path)
        self.responder = self.make_responder()
        self.peers: list[Peer] = []

    def open_store(self) -> MetadataStore:
        store = MetadataStore(self.folder / "metadata.sqlite3", self.clock)
        self.addCleanup(store.close)
        return store

    def make_responder(self, **options: Any) -> MetadataResponder:
        return MetadataResponder(self.store, self.clock, FILESPACE, token_path=self.token_path, **options)

    def connect(self, host: str = "192.0.2.1", filespace: str = FILESPACE) -> Peer:
        peer = Peer(self, host, filespace)
        self.peers.append(peer)
        return peer

    def flush(self) -> None:
        for _ in range(3):
            for peer in self.peers:
                peer.pump.flush()

    def bootstrap_message(self, token: bytes | None = None) -> Bootstrap:
        token = bootstrap.read_token(self.token_path) if token is None else token
        return Bootstrap(token, "admin", credentials("admin"), CHUNK_SIZE, FILESPACE_ID, b"")


class InitialisedTestCase(ServiceTestCase):
    """Bootstrapped, with users of every role: admin, wendy (writer), rita (reader)."""

    def setUp(self) -> None:
        super().setUp()
        admin = self.connect()
        admin.answer(self.bootstrap_message())
        admin.login("admin")
        admin.answer(UserAdd("wendy", Role.WRITER, credentials("wendy")))
        admin.answer(UserAdd("rita", Role.READER, credentials("rita")))
        self.admin = admin

    def logged_in(self, user: str, host: str = "192.0.2.1") -> Peer:
        peer = self.connect(host)
        peer.login(user)
        return peer


class HandshakeTests(ServiceTestCase):
    """Hello and Welcome."""

    def test_provides_interface(self) -> None:
        """The responder is a faithful IResponder."""
        self.assertTrue(verifyObject(IResponder, self.responder))

    def test_wrong_filespace(self) -> None:
        """A client asking for another filespace is told which one this server serves."""
        peer = self.connect(filespace="music")
        failure = self.failureResultOf(peer.client.ready, errors.UnknownFilespace)
        self.assertIn("'films', not 'music'", str(failure.value))

    def test_uninitialised_then_serving(self) -> None:
        """Before the bootstrap the server welcomes as UNINITIALIZED, after it as SERVING."""
        first = self.connect()
        self.assertEqual(self.successResultOf(first.client.ready).status, ServerStatus.UNINITIALIZED)
        first.answer(self.bootstrap_message())
        self.assertEqual(self.successResultOf(self.connect().client.ready).status, ServerStatus.SERVING)

    def test_connection_limit(self) -> None:
        """Over max_connections the handshake is refused as Busy with a retry hint."""
        self.responder.max_connections = 1
        self.connect()
        failure = self.failureResultOf(self.connect().client.ready, errors.Busy)
        self.assertGreater(failure.value.retry_after_ms, 0)


class BootstrapTests(ServiceTestCase):
    """The one-time bootstrap token."""

    def test_token_file_is_private(self) -> None:
        """The token file is readable by its owner only."""
        self.assertEqual(stat.S_IMODE(self.token_path.stat().st_mode), 0o600)

    def test_token_survives_restart(self) -> None:
        """Preparing again (a restart) keeps the token the operator may already have copied."""
        token = bootstrap.read_token(self.token_path)
        self.assertTrue(bootstrap.prepare_token(self.store, self.token_path))
        self.assertEqual(bootstrap.read_token(self.token_path), token)

    def test_bootstrap(self) -> None:
        """The right token initialises the filespace, makes the admin, and deletes the file."""
        peer = self.connect()
        self.assertEqual(peer.answer(self.bootstrap_message()), Ok())
        self.assertFalse(self.token_path.exists())
        self.assertTrue(self.store.initialised)
        self.assertEqual(self.store.chunk_size, CHUNK_SIZE)
        ok = peer.login("admin")
        self.assertEqual((ok.role, ok.root_inode, ok.chunk_size, ok.filespace_id),
                         (Role.ADMIN, ROOT_INODE, CHUNK_SIZE, FILESPACE_ID))
        self.assertEqual(ok.wrapped_key, credentials("admin").wrapped_key)
        self.assertFalse(bootstrap.prepare_token(self.store, self.token_path))

    def test_token_reused(self) -> None:
        """A used token is refused, with a hint that it was used."""
        peer = self.connect()
        token = bootstrap.read_token(self.token_path)
        peer.answer(self.bootstrap_message())
        error = peer.refused(self.bootstrap_message(token), errors.AuthenticationFailed)
        self.assertEqual(str(error), "bootstrap token not valid (already used?)")

    def test_wrong_token(self) -> None:
        """A wrong token is refused the same way and leaves the server uninitialised."""
        peer = self.connect()
        error = peer.refused(self.bootstrap_message(b"guess"), errors.AuthenticationFailed)
        self.assertEqual(str(error), "bootstrap token not valid (already used?)")
        self.assertFalse(self.store.initialised)
        self.assertTrue(self.token_path.exists())

    def test_others_told_status(self) -> None:
        """Other connections hear that the server now serves."""
        waiting = self.connect()
        self.connect().answer(self.bootstrap_message())
        self.assertEqual([type(note) for note in waiting.notes()], [StatusChanged])

    def test_login_before_bootstrap(self) -> None:
        """Logging in to an uninitialised filespace says so."""
        peer = self.connect()
        peer.refused(LoginStart("admin"), errors.NotInitialized)
        peer.refused(GetAttr(1), errors.NotInitialized)


class LoginTests(InitialisedTestCase):
    """Login challenges, logins and their rate limits."""

    def test_challenge_of_known_user(self) -> None:
        """A known user gets their own salt and parameters."""
        challenge = self.connect().answer(LoginStart("wendy"))
        self.assertEqual(challenge, LoginChallenge(credentials("wendy").kdf))

    def test_fake_salt_is_stable(self) -> None:
        """An unknown user gets the same fake salt every time, even after a restart, and another per name."""
        peer = self.connect()
        first = peer.answer(LoginStart("mallory")).kdf
        self.assertEqual(peer.answer(LoginStart("mallory")).kdf, first)
        self.assertNotEqual(peer.answer(LoginStart("trudy")).kdf.salt, first.salt)
        self.assertEqual(len(first.salt), len(credentials("wendy").kdf.salt))
        self.assertEqual(
            (first.time_cost, first.memory_kib, first.parallelism), (3, 65536, 1), "looks like a real user's"
        )
        self.store.close()
        self.store = self.open_store()
        self.responder = self.make_responder()
        self.assertEqual(self.connect().answer(LoginStart("mallory")).kdf, first)

    def test_login_ok(self) -> None:
        """The right login secret opens a session with the user's role and wrapped key."""
        ok = self.connect().login("rita")
        self.assertEqual((ok.role, ok.wrapped_key), (Role.READER, credentials("rita").wrapped_key))

    def test_wrong_secret_and_unknown_user_alike(self) -> None:
        """A wrong secret and an unknown user get the same answer."""
        peer = self.connect()
        wrong = peer.refused(Login("rita", b"x" * 32), errors.AuthenticationFailed)
        unknown = peer.refused(Login("nobody", b"x" * 32), errors.AuthenticationFailed)
        self.assertEqual(str(wrong), str(unknown))

    def test_requests_need_login(self) -> None:
        """Everything but login needs a logged-in session."""
        error = self.connect().refused(GetAttr(ROOT_INODE), errors.AccessDenied)
        self.assertEqual(str(error), "log in first")

    def test_login_once(self) -> None:
        """A logged-in connection cannot log in again."""
        self.assertIsInstance(self.admin.refused(Login("rita", b"x"), errors.InvalidArgument), errors.InvalidArgument)

    def test_per_user_limit(self) -> None:
        """After a burst of failures for a user, logins as that user are Busy until the bucket refills."""
        self.responder.limiter = LoginLimiter(self.clock, per_user=Rate(3, 0.5), per_source=Rate(100, 10))
        for host in range(3):
            self.connect(f"198.51.100.{host}").refused(Login("rita", b"x" * 32), errors.AuthenticationFailed)
        busy = self.connect("198.51.100.9").refused(Login("rita", credentials("rita").login_secret), errors.Busy)
        self.assertEqual(busy.retry_after_ms, 2000)
        self.assertIn("user 'rita'", str(busy))
        self.connect("198.51.100.9").login("wendy")  # another user is not affected
        self.clock.advance(2)
        self.connect("198.51.100.9").login("rita")

    def test_per_source_limit(self) -> None:
        """Guessing many names from one address is Busy too."""
        self.responder.limiter = LoginLimiter(self.clock, per_user=Rate(100, 10), per_source=Rate(4, 1))
        peer = self.connect("203.0.113.5")
        for index in range(4):
            peer.refused(Login(f"guess{index}", b"x" * 32), errors.AuthenticationFailed)
        busy = peer.refused(Login("wendy", credentials("wendy").login_secret), errors.Busy)
        self.assertIn("address 203.0.113.5", str(busy))
        self.connect("203.0.113.6").login("wendy")  # another address is not affected

    def test_bootstrap_after_init(self) -> None:
        """Bootstrap on a serving server is refused like a used token."""
        self.connect().refused(self.bootstrap_message(b"whatever"), errors.AuthenticationFailed)


class RoleTests(InitialisedTestCase):
    """Readers read, writers write, admins manage users."""

    def test_reader_cannot_write(self) -> None:
        """A reader making a directory is told which role writing needs."""
        error = self.logged_in("rita").refused(MkDir(ROOT_INODE, b"d", 0o755, 0, 0), errors.AccessDenied)
        self.assertEqual(str(error), "user 'rita' is a reader; writing needs the writer role")

    def test_reader_reads(self) -> None:
        """A reader may look around and take shared locks, but not exclusive ones."""
        self.logged_in("wendy").answer(MkDir(ROOT_INODE, b"d", 0o755, 0, 0))
        rita = self.logged_in("rita")
        self.assertEqual(rita.answer(Lookup(ROOT_INODE, b"d")).attributes.kind, FileKind.DIRECTORY)
        self.assertIsInstance(rita.answer(StatFs()), FsStats)
        rita.answer(Lock(ROOT_INODE, 1, LockKind.FLOCK, LockType.READ, 0, 0, False))
        error = rita.refused(Lock(ROOT_INODE, 1, LockKind.FLOCK, LockType.WRITE, 0, 0, False), errors.AccessDenied)
        self.assertIn("needs the writer role", str(error))

    def test_reader_cannot_open_for_writing(self) -> None:
        """Opening for writing needs the writer role."""
        wendy = self.logged_in("wendy")
        opened = wendy.answer(Create(ROOT_INODE, b"f", 0o644, 0, 0, True, O_WRONLY))
        rita = self.logged_in("rita")
        rita.answer(Open(opened.attributes.inode, O_RDONLY))
        error = rita.refused(Open(opened.attributes.inode, O_RDWR), errors.AccessDenied)
        self.assertIn("user 'rita' is a reader", str(error))

    def test_writer_cannot_manage_users(self) -> None:
        """A writer adding a user is told that needs the admin role."""
        wendy = self.logged_in("wendy")
        error = wendy.refused(UserAdd("eve", Role.READER, credentials("eve")), errors.AccessDenied)
        self.assertEqual(str(error), "user 'wendy' is a writer; adding users needs the admin role")
        wendy.refused(UserList(), errors.AccessDenied)
        wendy.refused(UserRemove("rita"), errors.AccessDenied)

    def test_own_passphrase(self) -> None:
        """Anyone may change their own passphrase, not another's."""
        rita = self.logged_in("rita")
        rita.answer(UserPasswd("rita", credentials("rita", b"n" * 32)))
        error = rita.refused(UserPasswd("wendy", credentials("wendy", b"n" * 32)), errors.AccessDenied)
        self.assertIn("changing another user's passphrase needs the admin role", str(error))
        self.connect().refused(Login("rita", credentials("rita").login_secret), errors.AuthenticationFailed)
        self.connect().answer(Login("rita", b"n" * 32))

    def test_admin_manages_users(self) -> None:
        """An admin lists, adds and removes users; removed users' sessions end."""
        rita = self.logged_in("rita")
        listing = self.admin.answer(UserList())
        self.assertEqual(listing, UserListing([
            UserInfo("admin", Role.ADMIN), UserInfo("rita", Role.READER), UserInfo("wendy", Role.WRITER),
        ]))
        self.admin.answer(UserRemove("rita"))
        self.clock.advance(0)
        self.flush()
        self.assertTrue(rita.client._lost)
        self.assertIn("'rita' was removed", rita.client.peer_goodbye or "")

    def test_last_admin(self) -> None:
        """The last admin cannot remove themself."""
        self.admin.refused(UserRemove("admin"), errors.NotPermitted)

    def test_bad_credentials(self) -> None:
        """Credentials with a short salt are InvalidArgument."""
        bad = credentials("eve")
        bad.kdf.salt = b"short"
        self.admin.refused(UserAdd("eve", Role.READER, bad), errors.InvalidArgument)


class TreeTests(InitialisedTestCase):
    """Requests reach the store and answer with its results."""

    def test_mkdir_lookup_readdir(self) -> None:
        """A directory made is found and listed."""
        wendy = self.logged_in("wendy")
        made = wendy.answer(MkDir(ROOT_INODE, b"sealed", 0o700, 5, 6))
        self.assertIsInstance(made, Entry)
        self.assertEqual(wendy.answer(Lookup(ROOT_INODE, b"sealed")), made)
        page = wendy.answer(ReadDir(ROOT_INODE, b"", 100))
        self.assertEqual([(entry.name, entry.attributes.inode) for entry in page.entries],
                         [(b"sealed", made.attributes.inode)])
        self.assertTrue(page.done)

    def test_errors_cross_the_wire(self) -> None:
        """Store refusals reach the client as their own classes."""
        wendy = self.logged_in("wendy")
        wendy.refused(Lookup(ROOT_INODE, b"absent"), errors.NotFound)
        wendy.refused(GetAttr(424242), errors.NotFound)
        wendy.refused(MkDir(ROOT_INODE, b"n" * 1025, 0o755, 0, 0), errors.NameTooLong)

    def test_setattr(self) -> None:
        """SetAttr answers with the new attributes."""
        wendy = self.logged_in("wendy")
        entry = wendy.answer(SetAttr(ROOT_INODE, SetAttrField.MODE, 0o700, 0, 0, 0, 0, 0))
        self.assertEqual(entry.attributes.mode, stat.S_IFDIR | 0o700)


class NotificationTests(InitialisedTestCase):
    """Changes are pushed to the other sessions, not to their author."""

    def test_other_session_hears(self) -> None:
        """A mkdir by one session reaches the other as ENTRY_CHANGED and INODE_CHANGED."""
        wendy = self.logged_in("wendy")
        rita = self.logged_in("rita")
        self.admin.notes()
        made = wendy.answer(MkDir(ROOT_INODE, b"new", 0o755, 0, 0))
        notes = rita.notes()
        self.assertIn(Notify(NotifyKind.ENTRY_CHANGED, made.attributes.inode, ROOT_INODE, b"new"), notes)
        self.assertIn(Notify(NotifyKind.INODE_CHANGED, ROOT_INODE, 0, b""), notes)
        self.assertEqual(self.admin.notes(), notes)
        self.assertEqual(wendy.notes(), [])

    def test_sessions_not_logged_in_hear_nothing(self) -> None:
        """A connection that has not logged in is told nothing."""
        stranger = self.connect()
        self.logged_in("wendy").answer(MkDir(ROOT_INODE, b"new", 0o755, 0, 0))
        self.assertEqual(stranger.notes(), [])

    def test_rename_and_unlink(self) -> None:
        """Renames and unlinks name the entries that changed."""
        wendy = self.logged_in("wendy")
        rita = self.logged_in("rita")
        inode = wendy.answer(Create(ROOT_INODE, b"a", 0o644, 0, 0, True, O_WRONLY)).attributes.inode
        rita.notes()
        wendy.answer(Rename(ROOT_INODE, b"a", ROOT_INODE, b"b", 0))
        entries = {(n.parent, n.name) for n in rita.notes() if n.kind == NotifyKind.ENTRY_CHANGED}
        self.assertEqual(entries, {(ROOT_INODE, b"a"), (ROOT_INODE, b"b")})
        removed = wendy.answer(Unlink(ROOT_INODE, b"b"))
        self.assertIn(Notify(NotifyKind.ENTRY_CHANGED, inode, ROOT_INODE, b"b"), rita.notes())
        self.assertEqual(removed.attributes, wendy.answer(GetAttr(ROOT_INODE)).attributes, "the directory's, as it is now")

    def test_removals_answer_the_directory(self) -> None:
        """Unlink and RmDir answer with the directory's new times and links, so a client need not ask."""
        wendy = self.logged_in("wendy")
        before = wendy.answer(GetAttr(ROOT_INODE)).attributes
        made = wendy.answer(MkDir(ROOT_INODE, b"d", 0o755, 0, 0)).attributes
        wendy.answer(Create(made.inode, b"f", 0o644, 0, 0, True, O_WRONLY))
        removed = wendy.answer(Unlink(made.inode, b"f")).attributes
        self.assertEqual(removed, wendy.answer(GetAttr(made.inode)).attributes)
        self.assertEqual(removed.nlink, 2)
        removed = wendy.answer(RmDir(ROOT_INODE, b"d")).attributes
        self.assertEqual(removed, wendy.answer(GetAttr(ROOT_INODE)).attributes)
        self.assertEqual(removed.nlink, before.nlink)
        self.assertGreaterEqual(removed.mtime_ns, made.ctime_ns)


class OpenFileTests(InitialisedTestCase):
    """Handles, chunk maps, and files unlinked while open."""

    def test_unlinked_open_file_readable_until_release(self) -> None:
        """A file another session unlinks stays readable through a handle until it is released."""
        wendy = self.logged_in("wendy")
        opened = wendy.answer(Create(ROOT_INODE, b"movie", 0o644, 0, 0, True, O_RDWR))
        inode = opened.attributes.inode
        committed = wendy.answer(ChunkMapCommit(inode, opened.handle, 1, 100, [ChunkRef(0, b"obj", 100, 100)], 0))
        self.assertIsInstance(committed, ChunkMapCommitted)
        self.admin.answer(Unlink(ROOT_INODE, b"movie"))
        self.admin.refused(Lookup(ROOT_INODE, b"movie"), errors.NotFound)
        self.assertEqual(wendy.answer(GetAttr(inode)).attributes.nlink, 0)
        chunk_map = wendy.answer(ChunkMapRead(inode, 0, 10))
        self.assertEqual((chunk_map.size, chunk_map.chunks), (100, [ChunkRef(0, b"obj", 100, 100)]))
        wendy.answer(Release(opened.handle))
        wendy.refused(GetAttr(inode), errors.NotFound)
        self.assertEqual(self.store.garbage(), [b"obj"])

    def test_unlink_of_the_inode_it_means(self) -> None:
        """An ``Unlink`` that names an inode removes the entry only while the entry names that inode."""
        first = self.admin.answer(Create(ROOT_INODE, b"f", 0o644, 0, 0, True, O_RDWR)).attributes.inode
        self.admin.answer(Unlink(ROOT_INODE, b"f"))
        again = self.admin.answer(Create(ROOT_INODE, b"f", 0o644, 0, 0, True, O_RDWR)).attributes.inode
        self.admin.refused(Unlink(ROOT_INODE, b"f", 0, first), errors.NotFound)
        self.assertEqual(self.admin.answer(Lookup(ROOT_INODE, b"f")).attributes.inode, again)
        self.admin.answer(Unlink(ROOT_INODE, b"f", 0, again))
        self.admin.refused(Lookup(ROOT_INODE, b"f"), errors.NotFound)

    def test_handles_end_with_connection(self) -> None:
        """A session's handles go with its connection, and so does an unlinked file they held."""
        wendy = self.logged_in("wendy")
        inode = wendy.answer(Create(ROOT_INODE, b"f", 0o644, 0, 0, True, O_RDWR)).attributes.inode
        self.admin.answer(Unlink(ROOT_INODE, b"f"))
        wendy.disconnect()
        self.admin.refused(GetAttr(inode), errors.NotFound)

    def test_handle_of_another_session(self) -> None:
        """A handle is good only in the session that opened it."""
        wendy = self.logged_in("wendy")
        opened = wendy.answer(Create(ROOT_INODE, b"f", 0o644, 0, 0, True, O_RDWR))
        other = self.logged_in("wendy")
        other.refused(Release(opened.handle), errors.BadFileHandle)
        other.refused(ChunkMapCommit(opened.attributes.inode, opened.handle, 0, 1, [], 0), errors.BadFileHandle)

    def test_read_only_handle_cannot_commit(self) -> None:
        """A commit through a handle opened read-only is BadFileHandle."""
        wendy = self.logged_in("wendy")
        inode = wendy.answer(Create(ROOT_INODE, b"f", 0o644, 0, 0, True, O_RDWR)).attributes.inode
        handle = wendy.answer(Open(inode, O_RDONLY)).handle
        error = wendy.refused(ChunkMapCommit(inode, handle, 0, 1, [], 0), errors.BadFileHandle)
        self.assertIn("read-only", str(error))

    def test_commit_conflict(self) -> None:
        """Two writers at the same version: the second is told to read the map again."""
        wendy = self.logged_in("wendy")
        opened = wendy.answer(Create(ROOT_INODE, b"f", 0o644, 0, 0, True, O_RDWR))
        inode = opened.attributes.inode
        other = self.logged_in("wendy")
        handle = other.answer(Open(inode, O_RDWR)).handle
        wendy.answer(ChunkMapCommit(inode, opened.handle, 1, 10, [ChunkRef(0, b"mine", 10, 10)], 0))
        other.refused(ChunkMapCommit(inode, handle, 1, 10, [ChunkRef(0, b"theirs", 10, 10)], 0), errors.Conflict)

    def test_open_kinds(self) -> None:
        """Directories open read-only; symbolic links do not open; removed inodes are NotFound."""
        wendy = self.logged_in("wendy")
        self.assertIsInstance(wendy.answer(Open(ROOT_INODE, O_RDONLY)), Opened)
        wendy.refused(Open(ROOT_INODE, O_WRONLY), errors.IsADirectory)
        wendy.refused(Open(99999, O_RDONLY), errors.NotFound)


class GroupCommitServiceTests(InitialisedTestCase):
    """Changes that arrive together are committed together, answered only after the commit."""

    def setUp(self) -> None:
        super().setUp()
        self.wendy = self.logged_in("wendy")
        self.other = self.logged_in("wendy")
        self.rita = self.logged_in("rita")
        for peer in self.peers:
            peer.notes()

    def send(self, peer: Peer, message: Any) -> Any:
        """``message`` handed to the responder as its connection would, without running the clock."""
        return self.responder.respond(peer.server, message)

    def test_changes_of_one_turn_share_a_commit(self) -> None:
        """Changes from two sessions wait, unseen, for one commit; then each gets its answer."""
        groups = self.responder.groups
        first = self.send(self.wendy, MkDir(ROOT_INODE, b"a", 0o755, 0, 0))
        second = self.send(self.other, Create(ROOT_INODE, b"b", 0o644, 0, 0, True, O_WRONLY))
        self.assertNoResult(first)
        self.assertNoResult(second)
        self.assertRaises(errors.NotFound, self.send, self.rita, Lookup(ROOT_INODE, b"a"))
        self.assertEqual(self.rita.notes(), [])
        self.clock.advance(0)
        self.assertEqual(self.responder.groups, groups + 1)
        self.assertEqual(self.successResultOf(first).attributes, self.store.lookup(ROOT_INODE, b"a"))
        self.assertEqual(self.successResultOf(second).attributes, self.store.lookup(ROOT_INODE, b"b"))

    def test_refused_change_gets_its_own_error(self) -> None:
        """A refused change in a group fails alone; the changes around it are made."""
        made = self.send(self.wendy, MkDir(ROOT_INODE, b"a", 0o755, 0, 0))
        again = self.send(self.other, MkDir(ROOT_INODE, b"a", 0o755, 0, 0))
        after = self.send(self.other, MkDir(ROOT_INODE, b"c", 0o755, 0, 0))
        self.clock.advance(0)
        self.successResultOf(made)
        self.failureResultOf(again, errors.AlreadyExists)
        self.successResultOf(after)
        self.assertEqual(self.wendy.answer(ReadDir(ROOT_INODE, b"", 0)).done, True)
        self.assertEqual([entry.name for entry in self.wendy.answer(ReadDir(ROOT_INODE, b"", 0)).entries],
                         [b"a", b"c"])

    def test_a_session_sees_its_own_changes_in_order(self) -> None:
        """Behind a queued change, the session's next requests wait their turn and see it; others do not wait."""
        made = self.send(self.wendy, MkDir(ROOT_INODE, b"a", 0o755, 0, 0))
        seen = self.send(self.wendy, Lookup(ROOT_INODE, b"a"))
        moved = self.send(self.wendy, Rename(ROOT_INODE, b"a", ROOT_INODE, b"z", 0))
        gone = self.send(self.wendy, Lookup(ROOT_INODE, b"a"))
        self.assertRaises(errors.NotFound, self.send, self.rita, Lookup(ROOT_INODE, b"a"))
        self.assertNoResult(seen)
        groups = self.responder.groups
        self.clock.advance(0)
        self.assertEqual(self.responder.groups, groups + 1)
        self.assertEqual(self.successResultOf(made).attributes, self.successResultOf(seen).attributes)
        self.successResultOf(moved)
        self.failureResultOf(gone, errors.NotFound)
        pipelined = [self.wendy.client.request(MkDir(ROOT_INODE, b"b", 0o755, 0, 0)),
                     self.wendy.client.request(Lookup(ROOT_INODE, b"b"))]
        self.flush()
        made, seen = (self.successResultOf(answer) for answer in pipelined)
        self.assertEqual(made.attributes, seen.attributes)

    def test_notifications_once_per_group(self) -> None:
        """Others hear each change of a group once, in one write; authors hear only the others' changes."""
        writes: list[bytes] = []
        transport = self.rita.server.transport
        real_write = transport.write  # type: ignore[union-attr]
        transport.write = lambda data: (writes.append(data), real_write(data))  # type: ignore[union-attr]
        first = self.send(self.wendy, MkDir(ROOT_INODE, b"a", 0o755, 0, 0))
        second = self.send(self.other, MkDir(ROOT_INODE, b"b", 0o755, 0, 0))
        self.clock.advance(0)
        self.assertEqual(len(writes), 1)
        self.flush()
        a, b = self.successResultOf(first).attributes.inode, self.successResultOf(second).attributes.inode
        root_changed = Notify(NotifyKind.INODE_CHANGED, ROOT_INODE, 0, b"")
        self.assertEqual(self.rita.notes(), [
            root_changed, Notify(NotifyKind.ENTRY_CHANGED, a, ROOT_INODE, b"a"),
            Notify(NotifyKind.ENTRY_CHANGED, b, ROOT_INODE, b"b"),
        ])
        self.assertEqual(self.wendy.notes(), [root_changed, Notify(NotifyKind.ENTRY_CHANGED, b, ROOT_INODE, b"b")])

    def test_failed_commit_fails_every_change(self) -> None:
        """A full disk at the commit: every change of the group is refused, undone, and told to nobody."""
        before = self.store.dump()
        real = self.store._db
        self.store._db = _FailingCommit(real)  # type: ignore[assignment]
        try:
            created = self.send(self.wendy, Create(ROOT_INODE, b"f", 0o644, 0, 0, True, O_WRONLY))
            seen = self.send(self.wendy, Lookup(ROOT_INODE, b"f"))
            opened = self.send(self.wendy, Open(ROOT_INODE, O_RDONLY))
            refused = self.send(self.other, Unlink(ROOT_INODE, b"absent"))
            self.clock.advance(0)
        finally:
            self.store._db = real
        self.failureResultOf(created, errors.NoSpace)
        self.failureResultOf(seen, errors.NoSpace)  # it was answered from the group's rolled-back state
        self.failureResultOf(opened, errors.NoSpace)
        self.failureResultOf(refused, errors.NotFound)
        self.assertEqual(self.store.dump(), before)
        self.assertEqual(self.wendy.server.session.handles, {})  # type: ignore[union-attr]
        self.assertEqual(self.store._holds, {})
        self.flush()
        self.assertEqual(self.rita.notes(), [])

    def test_session_end_applies_what_it_sent(self) -> None:
        """Changes queued by a session that then disconnects are applied before its handles close."""
        self.send(self.wendy, Create(ROOT_INODE, b"f", 0o644, 0, 0, True, O_WRONLY))
        self.wendy.disconnect()
        inode = self.store.lookup(ROOT_INODE, b"f").inode
        self.assertFalse(self.store.held(inode))

    def test_without_group_commit(self) -> None:
        """With no group window a change is committed and answered at once."""
        self.responder.group_window = None
        made = self.send(self.wendy, MkDir(ROOT_INODE, b"a", 0o755, 0, 0))
        self.assertEqual(made.attributes, self.store.lookup(ROOT_INODE, b"a"))
        self.assertEqual(self.responder.groups, 0)

    def test_close_all_commits_first(self) -> None:
        """Stopping the server commits what is queued before the connections close."""
        made = self.send(self.wendy, MkDir(ROOT_INODE, b"a", 0o755, 0, 0))
        self.responder.close_all("stopping")
        self.successResultOf(made)
        self.store.lookup(ROOT_INODE, b"a")


class KeptAnswerTests(InitialisedTestCase):
    """A named client's change sent again under its request id is answered as the first time, not made twice."""

    CLIENT = b"client-of-wendy!"

    def setUp(self) -> None:
        super().setUp()
        self.wendy = self.named("wendy")

    def named(self, user: str, client: bytes = CLIENT) -> Peer:
        peer = self.logged_in(user)
        known = peer.answer(ClientId(client))
        self.assertEqual(known.boot_id, self.responder.replies.boot_id)
        return peer

    def send(self, peer: Peer, message: Any, request_id: int) -> Any:
        """``message`` handed to the responder as its connection would, under ``request_id``."""
        peer.server.request_id = request_id
        return self.responder.respond(peer.server, message)

    def test_sent_again_on_a_new_connection(self) -> None:
        """MkDir, Create and Unlink sent again on another connection: each made once, answered as before."""
        made = self.send(self.wendy, MkDir(ROOT_INODE, b"a", 0o755, 0, 0), 2**31 + 1)
        created = self.send(self.wendy, Create(ROOT_INODE, b"f", 0o644, 0, 0, True, O_WRONLY), 2**31 + 2)
        self.clock.advance(0)
        self.wendy.disconnect()
        again = self.named("wendy")
        self.assertEqual(self.successResultOf(self.send(again, MkDir(ROOT_INODE, b"a", 0o755, 0, 0), 2**31 + 1)),
                         self.successResultOf(made))
        reopened = self.successResultOf(
            self.send(again, Create(ROOT_INODE, b"f", 0o644, 0, 0, True, O_WRONLY), 2**31 + 2))
        first = self.successResultOf(created)
        self.assertEqual(reopened.attributes, first.attributes)
        self.assertIn(reopened.handle, again.server.session.handles, "the file is open in the new session")
        removed = self.send(again, Unlink(ROOT_INODE, b"f"), 2**31 + 3)
        self.clock.advance(0)
        self.successResultOf(removed)
        self.successResultOf(self.send(again, Unlink(ROOT_INODE, b"f"), 2**31 + 3))
        self.assertEqual([entry.name for entry in again.answer(ReadDir(ROOT_INODE, b"", 0)).entries], [b"a"])

    def test_sent_again_before_the_first_is_answered(self) -> None:
        """A change sent again while the first attempt still waits for its commit gets the same answer then."""
        other = self.named("wendy")
        first = self.send(self.wendy, MkDir(ROOT_INODE, b"a", 0o755, 0, 0), 2**31 + 1)
        second = self.send(other, MkDir(ROOT_INODE, b"a", 0o755, 0, 0), 2**31 + 1)
        self.assertNoResult(second)
        self.clock.advance(0)
        self.assertEqual(self.successResultOf(second), self.successResultOf(first))

    def test_requests_after_a_change_sent_again_wait_for_it(self) -> None:
        """Sent again while its first attempt still waits for its commit, a change holds back the session's next."""
        other = self.named("wendy")
        first = self.send(self.wendy, MkDir(ROOT_INODE, b"a", 0o755, 0, 0), 2**31 + 1)
        again = self.send(other, MkDir(ROOT_INODE, b"a", 0o755, 0, 0), 2**31 + 1)
        seen = self.send(other, Lookup(ROOT_INODE, b"a"), 7)
        self.clock.advance(0)
        made = self.successResultOf(first)
        self.assertEqual(self.successResultOf(again), made)
        self.assertEqual(self.successResultOf(seen).attributes, made.attributes)

    def test_an_error_is_kept_too(self) -> None:
        """A change that failed fails the same way when sent again."""
        self.send(self.wendy, MkDir(ROOT_INODE, b"a", 0o755, 0, 0), 2**31 + 1)
        self.clock.advance(0)
        failed = self.send(self.wendy, MkDir(ROOT_INODE, b"a", 0o755, 0, 0), 2**31 + 2)
        self.clock.advance(0)
        self.failureResultOf(failed, errors.AlreadyExists)
        self.failureResultOf(self.send(self.wendy, MkDir(ROOT_INODE, b"a", 0o755, 0, 0), 2**31 + 2),
                             errors.AlreadyExists)

    def test_try_again_is_not_kept(self) -> None:
        """A change answered "try again" (Busy, Restoring, Unavailable) is made when sent again."""
        self.patch(self.responder, "_answer_in_turn", lambda *_, **__: (_ for _ in ()).throw(errors.Unavailable("x")))
        self.assertRaises(errors.Unavailable, self.send, self.wendy, MkDir(ROOT_INODE, b"a", 0o755, 0, 0), 2**31 + 1)
        self.assertIsNone(self.responder.replies.get(self.CLIENT, 2**31 + 1))

    def test_another_kind_under_the_same_id_is_refused(self) -> None:
        self.send(self.wendy, MkDir(ROOT_INODE, b"a", 0o755, 0, 0), 2**31 + 1)
        self.clock.advance(0)
        self.assertRaises(errors.InvalidArgument, self.send, self.wendy, Unlink(ROOT_INODE, b"a"), 2**31 + 1)

    def test_a_client_id_is_its_users(self) -> None:
        """Another user cannot take a client's id, nor its answers; a bad id is refused."""
        rita = self.logged_in("rita")
        self.assertIsInstance(rita.refused(ClientId(self.CLIENT), errors.AccessDenied), errors.AccessDenied)
        rita.refused(ClientId(b"short"), errors.InvalidArgument)
        stranger = self.connect()
        stranger.refused(ClientId(b"client-of-nobody"), errors.AccessDenied)

    def test_ids_a_connection_numbers_keep_nothing(self) -> None:
        """A change under an id its connection numbered (below 2**31) is made; each connection counts from 1 again."""
        made = self.wendy.answer(MkDir(ROOT_INODE, b"a", 0o755, 0, 0))
        self.wendy.disconnect()
        again = self.named("wendy")
        other = again.answer(MkDir(ROOT_INODE, b"b", 0o755, 0, 0))
        self.assertNotEqual(other.attributes.inode, made.attributes.inode)
        self.assertEqual(sorted(entry.name for entry in again.answer(ReadDir(ROOT_INODE, b"", 0)).entries),
                         [b"a", b"b"])
        self.assertEqual(len(self.responder.replies), 0)

    def test_unnamed_sessions_keep_nothing(self) -> None:
        """Without a client id, a change is made each time it is sent."""
        plain = self.logged_in("wendy")
        first = self.send(plain, MkDir(ROOT_INODE, b"a", 0o755, 0, 0), 2**31 + 1)
        self.clock.advance(0)
        self.successResultOf(first)
        again = self.send(plain, MkDir(ROOT_INODE, b"a", 0o755, 0, 0), 2**31 + 1)
        self.clock.advance(0)
        self.failureResultOf(again, errors.AlreadyExists)
        self.assertEqual(len(self.responder.replies), 0)


class SessionHandleTests(SynchronousTestCase):
    """A session counts its handles per inode."""

    def test_holds(self) -> None:
        """holds() is true while any handle on the inode is open."""
        session = Session(1, None, "here")
        first, second, other = Handle(1, 7, False), Handle(2, 7, True), Handle(3, 8, False)
        for handle in (first, second, other):
            session.opened(handle)
        session.closed(first)
        self.assertTrue(session.holds(7))
        session.closed(second)
        self.assertFalse(session.holds(7))
        self.assertTrue(session.holds(8))
        self.assertEqual(session.handles, {3: other})


class LockServiceTests(InitialisedTestCase):
    """Locks contend between sessions and end with them."""

    def setUp(self) -> None:
        super().setUp()
        self.wendy = self.logged_in("wendy")
        self.other = self.logged_in("wendy")
        opened = self.wendy.answer(Create(ROOT_INODE, b"f", 0o644, 0, 0, True, O_RDWR))
        self.inode, self.handle = opened.attributes.inode, opened.handle

    def lock(self, lock_type: LockType, wait: bool = False, owner: int = 1) -> Lock:
        return Lock(self.inode, owner, LockKind.POSIX, lock_type, 0, 2**64 - 1, wait)

    def test_contention_and_release_on_disconnect(self) -> None:
        """A held lock refuses another session; a waiting one is granted when the holder's connection ends."""
        self.wendy.answer(self.lock(LockType.WRITE))
        self.other.refused(self.lock(LockType.WRITE), errors.Locked)
        state = self.other.answer(LockTest(self.inode, 1, LockKind.POSIX, LockType.READ, 0, 10))
        self.assertEqual(state, LockState(LockType.WRITE, 0, 2**64 - 1, 1))
        waiting = self.other.ask(self.lock(LockType.WRITE, wait=True))
        self.assertNoResult(waiting)
        self.other.notes()
        self.wendy.disconnect()
        self.assertEqual(self.successResultOf(waiting), Ok())
        self.assertIn(Notify(NotifyKind.LOCK_RELEASED, self.inode, 0, b""), self.other.notes())

    def test_release_of_last_handle_drops_locks(self) -> None:
        """Releasing the session's last handle on the file releases its locks there."""
        self.wendy.answer(self.lock(LockType.WRITE))
        self.other.refused(self.lock(LockType.READ), errors.Locked)
        self.wendy.answer(Release(self.handle))
        self.assertIn(Notify(NotifyKind.LOCK_RELEASED, self.inode, 0, b""), self.other.notes())
        self.other.answer(self.lock(LockType.READ))

    def test_unlock(self) -> None:
        """An explicit unlock lets the other session in."""
        self.wendy.answer(self.lock(LockType.WRITE))
        self.wendy.answer(self.lock(LockType.UNLOCK))
        self.other.answer(self.lock(LockType.WRITE))

    def test_lock_on_unknown_inode(self) -> None:
        """Locking an inode that does not exist is NotFound."""
        self.wendy.refused(Lock(424242, 1, LockKind.FLOCK, LockType.READ, 0, 0, False), errors.NotFound)


class CoverageTests(SynchronousTestCase):
    """Every metadata request the protocol declares has an answer here."""

    def test_every_request_is_served(self) -> None:
        """Each 0x02xx message a client sends is dispatched; answers and pushes are not requests."""
        from lucidlink.meta.service import _ANSWERS
        from lucidlink.protocol import messages

        answers_and_pushes = {
            messages.LoginChallenge, messages.LoginOk, messages.UserListing, messages.Entry, messages.DirPage,
            messages.LinkTarget, messages.XattrValue, messages.XattrNames, messages.FsStats, messages.Opened,
            messages.ChunkMap, messages.ChunkMapCommitted, messages.LockState, messages.Notify,
            messages.StatusChanged, messages.ClientKnown, messages.Lease, messages.LeaseRecall, messages.InodeBlock,
        }
        requests = {
            cls for number, cls in messages.MESSAGE_CLASSES.items() if number >> 8 == 0x02
        } - answers_and_pushes
        self.assertEqual(requests - set(_ANSWERS), set())
        self.assertEqual(set(_ANSWERS) - requests, set())

    def test_clients_know_which_answers_are_kept(self) -> None:
        """The changes a client counts on the server to keep answers of are the ones that wait for a group commit."""
        from lucidlink.client.session import CHANGES_KEPT
        from lucidlink.meta.service import _ANSWERS

        self.assertEqual(CHANGES_KEPT, {kind for kind, (_, _, _, grouped) in _ANSWERS.items() if grouped})
