"""
Fault tests of the metadata server with real processes: ``twistd lucid-meta``
on loopback TLS with a ``file://`` object store, two clients writing through
the client core.  tests/test_s3_system.py runs them on S3 too, through the
store hooks of :class:`FaultTestCase`.

Each test damages what a real outage damages — the process (``kill -9``),
its database file (random 4 KiB blocks overwritten, truncated), its whole
data folder, the object store (gone for a while), a journal segment in the
store — and checks that the server notices, restores and serves by itself,
that every acknowledged operation is still there, and that a full logical
dump (:func:`tests.filespace_dump.dump_filespace`) of the filespace is what
it was.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import shutil
import signal
import sqlite3
import time
import zlib
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lucidlink import crypto, errors
from lucidlink.client.endpoint_cache import EndpointCache, Location
from lucidlink.client.filespace import Filespace
from lucidlink.client.resolver import Resolver
from lucidlink.client.session import initialise_filespace, open_session
from lucidlink.errors import IntegrityError
from lucidlink.meta import bootstrap, snapshots
from lucidlink.meta import mutations as m
from lucidlink.meta.config import identity_for
from lucidlink.meta.guardian import DATABASE_NAME, Gate, Guardian, State, check_database
from lucidlink.meta.segments import parse_segment_key
from lucidlink.meta.shipper import Shipper
from lucidlink.meta.store import ROOT_INODE, MetadataStore
from lucidlink.objectstore import IObjectStore
from lucidlink.objectstore.local import LocalObjectStore
from lucidlink.objectstore.pack import FolderPack
from lucidlink.protocol import messages as w
from lucidlink.protocol.messages import ServerStatus
from lucidlink.protocol.network import connect_tls
from lucidlink.supervise import SupervisedProcess, twistd_command
from tests.client_helpers import (
    ADMIN,
    ADMIN_PASSPHRASE,
    FILESPACE,
    SMALL_CHUNK,
    MemoryObjectStore,
    cheap_kdf,
    fast_backoff,
    make_certificates,
)
from tests.filespace_dump import dump_filespace
from tests.meta_helpers import initialise_record
from tests.processes import ServiceProcess, free_port, wait_for_port

CHECK_INTERVAL = 0.3
SHIP_INTERVAL = 0.5
BLOCK = 4096


def sleep(seconds: float) -> Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


class MetaProcess:
    """A ``twistd lucid-meta`` process of one filespace that a test can kill, damage and start again."""

    def __init__(self, test: TestCase, base: Path, store: str, **keys: str) -> None:
        self.test = test
        self.base = base
        self.port = free_port()
        self.ca_file = make_certificates(base, FILESPACE)
        self.data_dir = base / "data"
        self.objects = base / "objects"
        self.objects.mkdir(parents=True, exist_ok=True)
        settings = {
            "data_dir": "data", "listen": f"tcp:{self.port}:interface=127.0.0.1",
            "certificate": "meta.pem", "private_key": "meta.key", "store": store,
            "durability": "sync", "ship_interval": "0.5", "snapshot_interval": "3600",
            "check_interval": str(CHECK_INTERVAL), **keys,
        }
        self.config = base / "lucid-meta.ini"
        self.config.write_text("[meta]\n" + "".join(f"{key} = {value}\n" for key, value in settings.items()))
        self.log = base / "meta.log"
        self.process: ServiceProcess | None = None
        test.addCleanup(self.stop)

    @property
    def address(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    @property
    def database(self) -> Path:
        return self.data_dir / DATABASE_NAME

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def count(self, text: str) -> int:
        return self.log_text().count(text)

    @defer.inlineCallbacks
    def start(self, status: tuple[ServerStatus, ...] = (ServerStatus.SERVING,)) -> Any:
        """Start the process and fire once a new connection is welcomed with one of ``status``."""
        self.process = ServiceProcess(["lucid-meta", "--filespace", FILESPACE, "--config", str(self.config)],
                                      self.log)
        yield wait_for_port(self.port, self.process)
        yield self.wait_status(status)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None:
            process, self.process = self.process, None
            process.stop(sig)

    def kill(self) -> None:
        """``kill -9``: no goodbye, no last shipment, no last snapshot."""
        self.stop(signal.SIGKILL)

    @defer.inlineCallbacks
    def wait_status(self, status: tuple[ServerStatus, ...], timeout: float = 20.0) -> Any:
        """Fire once a new connection is welcomed with one of ``status``; fail if this test's process dies."""
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.process.poll() is not None:
                raise AssertionError(f"lucid-meta exited with {self.process.process.returncode}:\n{self.log_text()}")
            try:
                connection = yield connect_tls(reactor, self.address, self.ca_file, identity_for(FILESPACE),
                                               filespace=FILESPACE, keepalive_interval=0)
            except errors.LucidError:
                connection = None
            if connection is not None:
                seen = connection.welcome.status
                yield connection.close("probe")
                if seen in status:
                    return seen
            yield sleep(0.1)
        raise AssertionError(f"the server never said {status} (last {seen}):\n{self.log_text()[-4000:]}")

    @defer.inlineCallbacks
    def wait_log(self, text: str, count: int = 1, timeout: float = 20.0) -> Any:
        """Fire once the log holds ``text`` at least ``count`` times."""
        deadline = time.monotonic() + timeout
        while self.count(text) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"the log never said {text!r} {count} times:\n{self.log_text()[-4000:]}")
            yield sleep(0.05)

    # -- damage --------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Move every page from the write-ahead log into the database file (as SQLite does every 1000 pages)."""
        db = sqlite3.connect(self.database)
        try:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            db.close()

    def overwrite_blocks(self, rng: random.Random) -> list[int]:
        """Random bytes over a quarter of the database's 4 KiB blocks (at least three, the first among them).

        The write-ahead log is checkpointed first: newer copies of the same pages in the log would otherwise
        shadow the damage (and heal it at the next checkpoint).
        """
        if self.database.with_name(DATABASE_NAME + "-wal").exists():
            self.checkpoint()
        blocks = max(1, self.database.stat().st_size // BLOCK)
        chosen = sorted({0, *rng.sample(range(blocks), min(blocks, max(3, blocks // 4)))})
        with open(self.database, "r+b") as file:
            for block in chosen:
                file.seek(block * BLOCK)
                file.write(rng.randbytes(BLOCK))
            file.flush()
            os.fsync(file.fileno())
        return chosen

    def truncate(self) -> None:
        """Cut the database to a third of its length (not a whole number of pages)."""
        size = self.database.stat().st_size
        os.truncate(self.database, size // 3 + 100)

    def delete_data(self) -> None:
        """Delete the data folder; a running server may write a file into it meanwhile, so try again."""
        for _ in range(20):
            try:
                shutil.rmtree(self.data_dir)
                return
            except OSError as error:
                if error.errno != errno.ENOTEMPTY:
                    raise
        raise AssertionError(f"{self.data_dir} could not be deleted: the server keeps writing into it")

    def copy_database(self, target: Path) -> None:
        """A consistent copy of the database as it is now (SQLite's online backup)."""
        source, copy = sqlite3.connect(self.database), sqlite3.connect(target)
        try:
            source.backup(copy)
        finally:
            source.close()
            copy.close()

    def put_back(self, old: Path) -> None:
        """An old copy of the database put back in its place (an old disk image restored by mistake)."""
        for suffix in ("-wal", "-shm"):
            Path(f"{self.database}{suffix}").unlink(missing_ok=True)
        shutil.copyfile(old, self.database)


class Writer:
    """One client writing: directories, files, symlinks, renames and xattrs; what was acknowledged."""

    def __init__(self, fs: Filespace, name: str, rng: random.Random) -> None:
        self.fs = fs
        self.name = name
        self.rng = rng
        self.top = f"/{name}"
        self.rounds = 0
        self.acknowledged: dict[str, tuple[str, Any]] = {}
        self.uncertain: set[str] = set()
        self.failures: list[str] = []
        self.acknowledged_at: dict[str, float] = {}

    @defer.inlineCallbacks
    def _do(self, path: str, action: Callable[[], Deferred[Any]], outcome: Callable[[], None]) -> Any:
        try:
            yield action()
        except errors.LucidError as error:
            self.uncertain.add(path)
            self.failures.append(f"{path}: {error}")
            return False
        outcome()
        self.acknowledged_at[path] = time.monotonic()
        return True

    @defer.inlineCallbacks
    def write(self, rounds: int, stop: Callable[[], bool] = lambda: False) -> Any:
        """``rounds`` rounds of changes (fewer if ``stop`` says so); each acknowledged one goes in the model."""
        if self.top not in self.acknowledged and self.top not in self.uncertain:
            yield self._do(self.top, lambda: self.fs.mkdir(self.top),
                           lambda: self.acknowledged.__setitem__(self.top, ("dir", None)))
        for _ in range(rounds):
            if stop():
                return
            self.rounds += 1
            yield self._round(f"{self.top}/d{self.rounds}")

    @defer.inlineCallbacks
    def _round(self, folder: str) -> Any:
        made = yield self._do(folder, lambda: self.fs.mkdir(folder),
                              lambda: self.acknowledged.__setitem__(folder, ("dir", None)))
        if not made:
            return
        data = self.rng.randbytes(self.rng.choice([0, 700, 5000, SMALL_CHUNK + 3000]))
        first, final, link = f"{folder}/f", f"{folder}/g", f"{folder}/l"
        wrote = yield self._do(first, lambda: self.fs.write_file(first, data),
                               lambda: self.acknowledged.__setitem__(first, ("file", data)))
        yield self._do(link, lambda: self.fs.symlink("g", link),
                       lambda: self.acknowledged.__setitem__(link, ("link", "g")))
        if wrote:
            renamed = yield self._do(final, lambda: self.fs.rename(first, final),
                                     lambda: self.acknowledged.__setitem__(final, self.acknowledged.pop(first)))
            if not renamed:
                self.uncertain.add(first)
        yield self._do(folder + "#xattr", lambda: self._tag(folder),
                       lambda: self.acknowledged.__setitem__(folder + "#xattr", ("xattr", folder.encode())))

    @defer.inlineCallbacks
    def _tag(self, folder: str) -> Any:
        attributes = yield self.fs.resolve(folder)
        yield self.fs.inodes.setxattr(attributes.inode, b"user.folder", folder.encode())

    @defer.inlineCallbacks
    def missing(self, fs: Filespace, before: float | None = None) -> Any:
        """The acknowledged changes (made before ``before``, if given) that ``fs`` does not show."""
        missing = []
        for path, (kind, value) in sorted(self.acknowledged.items()):
            if path in self.uncertain:
                continue
            if before is not None and self.acknowledged_at.get(path, 0) > before:
                continue
            try:
                if kind == "xattr":
                    attributes = yield fs.resolve(path.removesuffix("#xattr"))
                    found = yield fs.inodes.getxattr(attributes.inode, b"user.folder")
                    ok = bytes(found) == value
                elif kind == "dir":
                    attributes = yield fs.resolve(path)
                    ok = attributes.kind == w.FileKind.DIRECTORY
                elif kind == "file":
                    ok = (yield fs.read_file(path)) == value
                else:
                    ok = (yield fs.readlink(path)) == value
            except errors.LucidError as error:
                ok, kind = False, f"{kind} ({error})"
            if not ok:
                missing.append(f"{path} [{kind}]")
        return missing


class FaultTestCase(TestCase):
    """A real lucid-meta process, an initialised filespace and two logged-in clients."""

    timeout = 120
    keys: dict[str, str] = {}

    @defer.inlineCallbacks
    def setUp(self) -> Generator[Deferred[Any], Any, None]:
        self.base = Path(self.mktemp()).absolute()
        self.base.mkdir(parents=True)
        self.rng = random.Random(self.id())
        self.meta = MetaProcess(self, self.base, self.store_url(), **self.keys)
        yield self.meta.start((ServerStatus.UNINITIALIZED,))
        connection = yield connect_tls(reactor, self.meta.address, self.meta.ca_file, identity_for(FILESPACE),
                                       filespace=FILESPACE, keepalive_interval=0)
        try:
            yield initialise_filespace(
                reactor, connection=connection, token=bootstrap.read_token(self.meta.data_dir / "bootstrap-token"),
                admin=ADMIN, passphrase=ADMIN_PASSPHRASE, chunk_size=SMALL_CHUNK, kdf=cheap_kdf(),
            )
        finally:
            yield connection.close("initialised")
        self.chunks = self.chunk_store()
        self.addCleanup(self.chunks.close)
        self.pushed: list[Any] = []
        self.writers = []
        for name in ("alice", "bob"):
            fs = yield self.client(name)
            self.writers.append(Writer(fs, name, random.Random(f"{self.id()}-{name}")))
        self.reader = self.writers[0].fs

    # The object stores; tests/test_s3_system.py runs these tests on S3.

    def store_url(self) -> str:
        """The metadata server's object store: the folder ``base/objects``."""
        return f"file://{self.base / 'objects'}"

    def chunk_store(self) -> IObjectStore:
        """Where the clients put their chunks."""
        return LocalObjectStore(self.base / "chunks", reactor, create=True)  # type: ignore[return-value]

    @contextmanager
    def store_away(self) -> Iterator[None]:
        """The metadata server's object store cannot be reached within this block."""
        away = self.meta.objects.with_name("objects-away")
        self.meta.objects.rename(away)
        try:
            yield
        finally:
            away.rename(self.meta.objects)

    def journal_segments(self) -> list[str]:
        """The keys of the journal segments in the store (files, and packed ones)."""
        journal = self.meta.objects / FILESPACE / "journal"
        names = {path.name for path in journal.iterdir() if path.is_file()} | set(FolderPack(journal).objects())
        return [f"{FILESPACE}/journal/{name}" for name in sorted(names)]

    def damage_object(self, key: str) -> None:
        """Flip one byte in the middle of the object ``key`` in the store, wherever it is kept."""
        store = LocalObjectStore(self.meta.objects, reactor)
        try:
            path, offset, size = store.locate(key)
        finally:
            store.close()
        os.chmod(path, 0o644)
        with open(path, "r+b") as file:
            file.seek(offset + size // 2)
            byte = file.read(1)[0]
            file.seek(offset + size // 2)
            file.write(bytes([byte ^ 0xFF]))

    @defer.inlineCallbacks
    def client(self, name: str, deadline: float = 60.0) -> Generator[Deferred[Any], Any, Filespace]:
        cache = EndpointCache(self.base / f"state-{name}")
        cache.put(Location(FILESPACE, (self.meta.address,), identity_for(FILESPACE), ServerStatus.SERVING, 30_000,
                           reactor.seconds(), "test"))
        resolver = Resolver(reactor, ["tcp:127.0.0.1:1"], self.meta.ca_file, cache=cache, backoff=fast_backoff(),
                            attempt_timeout=2.0)
        self.addCleanup(resolver.close)
        session = yield open_session(reactor, filespace=FILESPACE, user=ADMIN, passphrase=ADMIN_PASSPHRASE,
                                     resolver=resolver, ca_file=self.meta.ca_file, deadline=deadline,
                                     backoff=fast_backoff())
        self.addCleanup(session.close)
        session.on_notify(self.pushed.append)
        fs = Filespace(session, self.chunks)
        self.addCleanup(fs.close)
        return fs

    @defer.inlineCallbacks
    def raw_login(self) -> Generator[Deferred[Any], Any, Any]:
        """A logged-in connection without the session's retries: it shows the server's first answer."""
        connection = yield connect_tls(reactor, self.meta.address, self.meta.ca_file, identity_for(FILESPACE),
                                       filespace=FILESPACE, keepalive_interval=0)
        self.addCleanup(connection.close, "test over")
        challenge = yield connection.request(w.LoginStart(ADMIN))
        secrets = crypto.derive_user_secrets(ADMIN_PASSPHRASE, challenge.kdf)
        yield connection.request(w.Login(ADMIN, secrets.login_secret))
        return connection

    def write(self, rounds: int, stop: Callable[[], bool] = lambda: False) -> Deferred[Any]:
        """Both clients write at once."""
        return defer.gatherResults([writer.write(rounds, stop) for writer in self.writers], consumeErrors=True)

    @defer.inlineCallbacks
    def assert_nothing_lost(self, before: float | None = None) -> Any:
        for writer in self.writers:
            missing = yield writer.missing(self.reader, before)
            self.assertEqual(missing, [], f"acknowledged by {writer.name} and lost; log:\n{self.meta.log_text()[-3000:]}")

    def restoring_pushed(self) -> bool:
        return any(isinstance(message, w.StatusChanged) and message.status == ServerStatus.RESTORING
                   for message in self.pushed)


class KillTests(FaultTestCase):
    """``kill -9`` under a write load from two clients."""

    @defer.inlineCallbacks
    def test_kill_under_load(self) -> Any:
        """Killed mid-load and started again (as its supervisor would), it still holds every acknowledged change."""
        load = self.write(25)
        yield sleep(1.0)
        self.meta.kill()
        yield sleep(0.3)
        yield self.meta.start()
        yield load
        self.assertGreater(sum(len(writer.acknowledged) for writer in self.writers), 20)
        yield self.assert_nothing_lost()
        # Everything it serves is in the store too: a lost disk now loses nothing.
        before = yield dump_filespace(self.reader)
        self.meta.kill()
        self.meta.delete_data()
        yield self.meta.start()
        after = yield dump_filespace(self.reader)
        self.assertEqual(after, before)


class SupervisedTests(FaultTestCase):
    """Under a supervisor, as the demo runs it (pid file and log in the data folder): no one restarts it by hand."""

    @defer.inlineCallbacks
    def test_supervisor_brings_it_back(self) -> Any:
        """Killed with its data folder gone, the supervisor restarts it and it restores by itself."""
        self.meta.stop()
        data = self.meta.data_dir
        supervisor = SupervisedProcess(
            reactor, "lucid-meta",
            twistd_command("-n", f"--pidfile={data / 'twistd.pid'}", "lucid-meta", "--filespace", FILESPACE,
                           "--config", str(self.meta.config)),
            data / "meta.log",
        )
        supervisor.start()
        self.addCleanup(supervisor.stop)
        yield self.meta.wait_status((ServerStatus.SERVING,))
        yield self.write(3)
        before = yield dump_filespace(self.reader)
        for damage in (self.meta.delete_data, self.meta.truncate):
            pid = supervisor.pid
            assert pid is not None
            damage()
            os.kill(pid, signal.SIGKILL)
            while supervisor.pid in (None, pid):
                yield sleep(0.05)
            yield self.meta.wait_status((ServerStatus.SERVING,))
            self.assertEqual((yield dump_filespace(self.reader)), before)
        self.assertEqual(supervisor.restarts, 2)
        self.assertIn("serving again", (data / "meta.log").read_text())


class SyncDamageTests(FaultTestCase):
    """durability=sync: the database damaged while the server runs, and while it is stopped."""

    @defer.inlineCallbacks
    def damaged_while_running(self, damage: Callable[[], object], restores: int) -> Any:
        yield self.write(3)
        before = yield dump_filespace(self.reader)
        damage()
        yield self.meta.wait_log("serving again", restores)
        after = yield dump_filespace(self.reader)
        self.assertEqual(after, before)
        yield self.write(2)  # and it takes changes again
        yield self.assert_nothing_lost()

    @defer.inlineCallbacks
    def test_damage_while_running(self) -> Any:
        """Blocks overwritten, truncated, the folder deleted under a running server: each time it restores."""
        yield self.damaged_while_running(lambda: self.meta.overwrite_blocks(self.rng), 1)
        self.assertTrue(self.restoring_pushed(), "connected clients were told the server is restoring")
        kept = list(self.meta.data_dir.glob(f"{DATABASE_NAME}.before-restore-*"))
        self.assertTrue(kept, "the damaged database is kept beside the restored one")
        yield self.damaged_while_running(self.meta.truncate, 2)
        yield self.damaged_while_running(self.meta.delete_data, 3)
        log = self.meta.log_text()
        self.assertIn("DATABASE DAMAGED", log)
        self.assertIn("no acknowledged record was lost", log)
        self.assertNotIn("acknowledged records were lost", log)

    @defer.inlineCallbacks
    def test_damage_while_stopped(self) -> Any:
        """Blocks overwritten, truncated, the folder deleted while stopped: it restores.

        An old but sound copy put back (what a power cut leaves under
        ``synchronous=NORMAL``: the last commits gone) is not restored whole:
        the records after its head are replayed onto it from the store.
        """
        old = self.base / "old.sqlite3"
        self.meta.copy_database(old)
        for number, damage in enumerate(
            [lambda: self.meta.overwrite_blocks(self.rng), self.meta.truncate, self.meta.delete_data], start=1
        ):
            yield self.write(2)
            before = yield dump_filespace(self.reader)
            self.meta.kill()
            damage()
            yield self.meta.start()
            self.assertEqual(self.meta.count("serving again"), number)
            after = yield dump_filespace(self.reader)
            self.assertEqual(after, before)
        yield self.write(2)
        before = yield dump_filespace(self.reader)
        self.meta.kill()
        self.meta.put_back(old)
        yield self.meta.start()
        self.assertEqual(self.meta.count("serving again"), 3)
        self.assertRegex(self.meta.log_text(), r"replayed seq \d+ to \d+ from the object store")
        after = yield dump_filespace(self.reader)
        self.assertEqual(after, before)
        yield self.assert_nothing_lost()
        self.assertIn("acknowledged records are missing from the disk", self.meta.log_text())


class AsyncDamageTests(FaultTestCase):
    """durability=async: what a damaged disk may lose is bounded by ship_interval, and the log says it."""

    keys = {"durability": "async", "ship_interval": str(SHIP_INTERVAL)}

    @defer.inlineCallbacks
    def test_damage_while_running(self) -> Any:
        """Damage under a running server loses at most the changes of the last ship_interval, and says how many."""
        yield self.write(3)
        before = yield dump_filespace(self.reader)
        damaged = time.monotonic()
        self.meta.overwrite_blocks(self.rng)
        yield self.meta.wait_log("serving again", 1)
        yield self.assert_nothing_lost(before=damaged - SHIP_INTERVAL - 0.3)
        log = self.meta.log_text()
        lost = re.search(r"(\d+) acknowledged records were lost \(durability=async\): the damaged database had "
                         r"reached seq (\d+), the object store held them up to seq (\d+)", log)
        if lost is None:
            self.assertIn("no acknowledged record was lost", log)
            self.assertEqual((yield dump_filespace(self.reader)), before)
        else:
            count, reached, held = (int(group) for group in lost.groups())
            self.assertEqual(count, reached - held)

    @defer.inlineCallbacks
    def test_killed_and_disk_lost(self) -> Any:
        """Killed under load and its data folder gone: only changes of the last ship_interval may be lost."""
        load = self.write(30)
        yield sleep(1.5)
        self.meta.kill()
        killed = time.monotonic()
        self.meta.delete_data()
        yield self.meta.start()
        yield load
        yield self.assert_nothing_lost(before=killed - SHIP_INTERVAL - 0.3)

    @defer.inlineCallbacks
    def test_loss_is_logged(self) -> Any:
        """Changes that never reached the store (it was away) and a lost disk: the log counts the loss."""
        yield self.write(2)
        yield sleep(1.0)  # shipped
        with self.store_away():
            yield self.write(2)
            self.meta.delete_data()
            yield self.meta.wait_log("DATABASE DAMAGED")
            yield self.meta.wait_log("the restore failed")
        yield self.meta.wait_log("serving again")
        found = re.search(r"(\d+) acknowledged records were lost \(durability=async\)", self.meta.log_text())
        self.assertIsNotNone(found, self.meta.log_text()[-3000:])
        assert found is not None
        self.assertGreater(int(found.group(1)), 0)


class StoreOutageTests(FaultTestCase):
    """durability=sync and the object store gone for a while."""

    @defer.inlineCallbacks
    def test_store_goes_away(self) -> Any:
        """Writes fail retryably (reads work), nothing acknowledged is lost, and service resumes by itself."""
        yield self.write(2)
        raw = yield self.raw_login()
        with self.store_away():
            # chmod of the root: the first answer a client gets is the retryable Unavailable.
            failure = yield self.assertFailure(
                raw.request(w.SetAttr(1, w.SetAttrField.MODE, 0o750, 0, 0, 0, 0, 0)), errors.Unavailable)
            self.assertTrue(failure.retryable)
            self.assertIn("object store", str(failure))
            listing = yield self.reader.listdir("/")
            self.assertIn("alice", [name for name, _ in listing])
            load = self.write(2)
            yield sleep(1.0)
        yield load
        yield self.write(1)
        yield self.assert_nothing_lost()
        # What was answered during the outage reached the store once it came back: a lost disk loses none of it.
        before = yield dump_filespace(self.reader)
        self.assertEqual(before["/"]["attributes"]["mode"] & 0o7777, 0o750)
        # The disk lost while the store is away too: it waits for the store rather than start a new filespace.
        self.meta.kill()
        self.meta.delete_data()
        with self.store_away():
            yield self.meta.start((ServerStatus.RESTORING,))
            yield self.meta.wait_log("the object store cannot be listed")
        yield self.meta.wait_status((ServerStatus.SERVING,))
        self.assertEqual((yield dump_filespace(self.reader)), before)


class CorruptSegmentTests(FaultTestCase):
    """A damaged journal segment in the store."""

    keys = {"ship_interval": "0.2"}

    @defer.inlineCallbacks
    def test_restore_stops_at_last_good_record(self) -> Any:
        """The restore stops at the last good record, says which, and the server waits for an operator."""
        for _ in range(3):
            yield self.write(1)
        self.meta.kill()  # no last snapshot: the restore must read every segment
        spans = sorted((parse_segment_key(FILESPACE, key), key) for key in self.journal_segments())
        (first, last), victim = spans[len(spans) // 2]
        self.damage_object(victim)
        self.meta.delete_data()
        yield self.meta.start((ServerStatus.RESTORING,))
        yield self.meta.wait_log("NOT SERVING")
        found = re.search(r"restored to seq (\d+) from an empty database; stopped there: (.*)", self.meta.log_text())
        self.assertIsNotNone(found, self.meta.log_text()[-3000:])
        assert found is not None
        reached = int(found.group(1))
        self.assertTrue(first - 1 <= reached <= last, (first, last, reached))  # the damage may spare every record
        self.assertIn(victim.rsplit("/", 1)[1], found.group(2))
        self.assertEqual(check_database(self.meta.database).head, reached)
        # Clients are told to wait, not refused.
        connection = yield connect_tls(reactor, self.meta.address, self.meta.ca_file, identity_for(FILESPACE),
                                       filespace=FILESPACE, keepalive_interval=0)
        self.addCleanup(connection.close, "test over")
        self.assertEqual(connection.welcome.status, ServerStatus.RESTORING)
        yield self.assertFailure(connection.request(w.LoginStart(ADMIN)), errors.Restoring)


class NoAutoRestoreTests(FaultTestCase):
    """auto_restore = false: damage is found and reported, and an operator restores."""

    keys = {"auto_restore": "false"}

    @defer.inlineCallbacks
    def test_waits_for_operator(self) -> Any:
        yield self.write(1)
        self.meta.kill()
        self.meta.truncate()
        yield self.meta.start((ServerStatus.RESTORING,))
        yield self.meta.wait_log("auto_restore is off")
        self.assertIn(f"lucid-meta restore --filespace {FILESPACE} --config {self.meta.config}", self.meta.log_text())
        self.assertFalse(check_database(self.meta.database).ok, "nothing was restored without an operator")


class GateTests(SynchronousTestCase):
    """The responder every connection talks to, without sockets."""

    class Connection:
        keepalive_interval = 0.0

        def __init__(self) -> None:
            self.closed: list[str] = []
            self.session = None

        def close(self, text: str = "") -> None:
            self.closed.append(text)

    class Responder:
        def __init__(self, answer: Callable[[], Any]) -> None:
            self.answer = answer
            self.ended: list[Any] = []

        def welcome(self, connection: Any, hello: Any) -> str:
            return "welcome"

        def respond(self, connection: Any, message: Any) -> Any:
            return self.answer()

        def connection_ended(self, connection: Any, reason: Any) -> None:
            self.ended.append(connection)

    def setUp(self) -> None:
        self.errors: list[Exception] = []
        self.gate = Gate(FILESPACE, "test", self.errors.append)
        self.hello = w.Hello(w.PROTOCOL_VERSION, "test", FILESPACE)

    def test_restoring_until_served(self) -> None:
        """Welcomed while restoring: told RESTORING, every request answered Restoring; closed once serving."""
        connection = self.Connection()
        welcome = self.gate.welcome(connection, self.hello)
        self.assertEqual(welcome.status, ServerStatus.RESTORING)
        self.assertRaises(errors.Restoring, self.gate.respond, connection, w.LoginStart(ADMIN))
        self.gate.serve(self.Responder(lambda: "answer"))
        self.assertEqual(len(connection.closed), 1)

    def test_other_filespace_refused(self) -> None:
        self.assertRaises(errors.UnknownFilespace, self.gate.welcome, self.Connection(),
                          w.Hello(w.PROTOCOL_VERSION, "test", "other"))

    def test_database_error_answers_restoring_and_checks(self) -> None:
        """An SQLite error from a request is answered Restoring and reported, not passed on as garbage."""

        def broken() -> Any:
            raise sqlite3.DatabaseError("file is not a database")

        responder = self.Responder(broken)
        self.gate.serve(responder)
        connection = self.Connection()
        self.assertEqual(self.gate.welcome(connection, self.hello), "welcome")
        self.assertRaises(errors.Restoring, self.gate.respond, connection, w.GetAttr(1))
        self.assertEqual(len(self.errors), 1)

    def test_database_error_later(self) -> None:
        """The same for an answer that fails later (a write waiting for its shipment)."""
        later: Deferred[Any] = Deferred()
        self.gate.serve(self.Responder(lambda: later))
        connection = self.Connection()
        self.gate.welcome(connection, self.hello)
        answer = self.gate.respond(connection, w.GetAttr(1))
        later.errback(sqlite3.DatabaseError("database disk image is malformed"))
        self.failureResultOf(answer, errors.Restoring)
        self.assertEqual(len(self.errors), 1)

    def test_connection_ended_reaches_owner(self) -> None:
        responder = self.Responder(lambda: "answer")
        self.gate.serve(responder)
        connection = self.Connection()
        self.gate.welcome(connection, self.hello)
        self.gate.connection_ended(connection, errors.ConnectionClosed("bye"))
        self.assertEqual(responder.ended, [connection])


class GuardianTests(TestCase):
    """The guardian's decisions at start, with a stand-in server and an object store in memory."""

    class Owner:
        def __init__(self) -> None:
            self.opened = 0
            self.closed: list[tuple[str, bool]] = []

        def open_database(self) -> str:
            self.opened += 1
            return "responder"

        def close_database(self, reason: str, damaged: bool) -> None:
            self.closed.append((reason, damaged))

    def guardian(self, objects: Any = None, **options: Any) -> Guardian:
        self.folder = Path(self.mktemp()).absolute()
        self.owner = self.Owner()
        self.gate = Gate(FILESPACE, "test", lambda error: None)
        guardian = Guardian(self.owner, self.gate, reactor, filespace=FILESPACE, data_dir=self.folder,
                            open_object_store=(lambda: objects) if objects is not None else None,
                            check_interval=3600, **options)
        self.addCleanup(guardian.stop)
        return guardian

    @defer.inlineCallbacks
    def test_new_filespace(self) -> Any:
        """No database and nothing in the store: a new filespace, served."""
        guardian = self.guardian(MemoryObjectStore())
        yield self.started(guardian)
        self.assertEqual((guardian.state, self.owner.opened, self.gate.serving), (State.SERVING, 1, "responder"))

    @defer.inlineCallbacks
    def test_damaged_with_empty_store(self) -> Any:
        """A damaged database and a store without its journal: nothing is served, and the log says why."""
        guardian = self.guardian(MemoryObjectStore())
        self.damage()
        yield self.started(guardian)
        self.assertEqual((guardian.state, self.owner.opened), (State.HALTED, 0))
        self.assertIn("nothing to restore from", guardian.problem)
        self.assertIsNone(self.gate.serving)
        self.assertFalse(check_database(self.folder / DATABASE_NAME).ok, "the damaged database is left in place")

    @defer.inlineCallbacks
    def test_damaged_without_store(self) -> Any:
        guardian = self.guardian(None)
        self.damage()
        yield self.started(guardian)
        self.assertEqual(guardian.state, State.HALTED)
        self.assertIn("no object store", guardian.problem)
        self.assertTrue(self.folder.joinpath(DATABASE_NAME).exists(), "the damaged database is left for a person")

    def damage(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.joinpath(DATABASE_NAME).write_bytes(os.urandom(3 * BLOCK))

    def started(self, guardian: Guardian) -> Deferred[None]:
        guardian.start()
        return guardian.idle()


class DamagedSnapshotTests(SynchronousTestCase):
    """A snapshot taken of a database already damaged on disk: its checksum is right, its pages are not."""

    def test_restore_skips_it(self) -> None:
        """The restore falls back to the journal instead of rebuilding on a snapshot that fails quick_check."""
        clock = Clock()
        folder = Path(self.mktemp())
        folder.mkdir()
        store = MetadataStore(folder / "original.sqlite3", clock)
        self.addCleanup(store.close)
        objects = MemoryObjectStore()
        shipper = Shipper(store, objects, clock, filespace=FILESPACE, durability="async")
        self.successResultOf(shipper.start())
        self.addCleanup(shipper.stop)
        store.apply(initialise_record())
        for n in range(40):
            store.apply(m.MakeDirectory(ROOT_INODE, b"d%d" % n, 0o755, n, 0))
        while shipper.pending():
            clock.advance(shipper.ship_interval)
        database = snapshots.database_bytes(store)
        head = snapshots._head_of(database)
        damaged = None
        for page in range(1, len(database) // BLOCK):
            candidate = bytearray(database)
            candidate[page * BLOCK:(page + 1) * BLOCK] = bytes(BLOCK)
            if snapshots._head_of(bytes(candidate)) == head and snapshots.check_serialized(bytes(candidate)) != "ok":
                damaged = bytes(candidate)
                break
        assert damaged is not None, "no page whose damage quick_check sees"
        data = zlib.compress(damaged)
        manifest = snapshots.Manifest(FILESPACE, head[0], head[1], hashlib.sha256(data).digest(), len(data),
                                      len(damaged), 0)
        objects.objects[snapshots.snapshot_key(FILESPACE, head[0])] = data
        objects.objects[snapshots.manifest_key(FILESPACE, head[0])] = manifest.to_bytes()
        result = self.successResultOf(snapshots.restore(objects, FILESPACE, folder / "restored.sqlite3"))
        self.assertIsNone(result.snapshot_seq, "the damaged snapshot was not used")
        self.assertEqual((result.seq, result.complete), (head[0], True))
        restored = MetadataStore(folder / "restored.sqlite3", clock)
        self.addCleanup(restored.close)
        self.assertEqual(restored.dump(), store.dump())


    def test_none_taken_of_a_damaged_database(self) -> None:
        """The snapshotter refuses to store a snapshot of a database that fails quick_check."""
        clock = Clock()
        path = Path(self.mktemp())
        path.parent.mkdir(parents=True, exist_ok=True)
        store = MetadataStore(path, clock)
        store.apply(initialise_record())
        for n in range(60):
            store.apply(m.MakeDirectory(ROOT_INODE, b"d%d" % n, 0o755, n, 0))
        store.close()
        size = path.stat().st_size
        with open(path, "r+b") as file:
            for page in range(2, size // BLOCK):
                file.seek(page * BLOCK)
                file.write(bytes(BLOCK))
        store = MetadataStore(path, clock)
        self.addCleanup(store.close)
        objects = MemoryObjectStore()
        failure = self.failureResultOf(snapshots.take_snapshot(store, objects, FILESPACE, clock), IntegrityError)
        self.assertIn("fails quick_check", str(failure.value))
        self.assertEqual(objects.objects, {})


class HealthCheckTests(SynchronousTestCase):
    """What :func:`check_database` finds, on files made here."""

    def setUp(self) -> None:
        self.folder = Path(self.mktemp())
        self.folder.mkdir()
        self.path = self.folder / DATABASE_NAME
        db = sqlite3.connect(self.path)
        db.execute("CREATE TABLE journal (seq INTEGER PRIMARY KEY, hash BLOB)")
        db.execute("CREATE TABLE filler (data BLOB)")
        db.executemany("INSERT INTO journal VALUES (?, ?)", [(seq, b"h") for seq in range(1, 8)])
        db.executemany("INSERT INTO filler VALUES (?)", [(os.urandom(3000),) for _ in range(40)])
        db.commit()
        db.close()

    def test_healthy(self) -> None:
        self.assertEqual(check_database(self.path).problem, "")
        self.assertEqual(check_database(self.path).head, 7)

    def test_missing(self) -> None:
        health = check_database(self.folder / "nothing")
        self.assertTrue(health.missing)
        self.assertIn("no database", health.problem)

    def test_empty(self) -> None:
        self.path.write_bytes(b"")
        self.assertIn("empty", check_database(self.path).problem)

    def test_not_sqlite(self) -> None:
        self.path.write_bytes(os.urandom(8192))
        self.assertIn("not a database", check_database(self.path).problem)

    def test_truncated(self) -> None:
        os.truncate(self.path, self.path.stat().st_size // 2 + 10)
        self.assertIn("truncated", check_database(self.path).problem)

    def test_overwritten_pages(self) -> None:
        with open(self.path, "r+b") as file:
            for page in (2, 3, 5, 8, 13):
                file.seek(page * BLOCK)
                file.write(os.urandom(BLOCK))
        self.assertFalse(check_database(self.path).ok)

    def test_no_journal(self) -> None:
        db = sqlite3.connect(self.path)
        db.execute("DROP TABLE journal")
        db.commit()
        db.close()
        self.assertIn("journal", check_database(self.path).problem)
