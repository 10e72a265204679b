"""
The local-directory object store: the IObjectStore contract, and what only a
directory on disk can get wrong (atomicity, fsync, a full disk, path
traversal), plus the fault-injecting wrapper and opening stores by URL.
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
from pathlib import Path
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.threadpool import ThreadPool
from twisted.trial.unittest import TestCase
from zope.interface.verify import verifyObject

from lucidlink import errors
from lucidlink.objectstore import IObjectStore, open_store
from lucidlink.objectstore import local as local_module
from lucidlink.objectstore.faults import FaultyObjectStore
from lucidlink.objectstore.interface import IFileObjectStore
from lucidlink.objectstore.local import LocalObjectStore
from tests.objectstore_behaviour import ObjectStoreBehaviourMixin


def temporary_folder(case: TestCase) -> Path:
    """A fresh, empty folder for one test."""
    folder = Path(case.mktemp()).absolute()
    folder.mkdir(parents=True)
    return folder


def stray_files(root: Path) -> list[str]:
    """Temporary files left anywhere under ``root``."""
    return [name for _, _, names in os.walk(root) for name in names if name.startswith(".tmp-")]


def disk_full(*args: object) -> None:
    """Stands in for a write that meets a full disk."""
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class LocalBehaviourTests(ObjectStoreBehaviourMixin, TestCase):
    """The local store keeps the whole IObjectStore contract."""

    def make_store(self) -> LocalObjectStore:
        return LocalObjectStore(temporary_folder(self), reactor)


class PackedBehaviourTests(ObjectStoreBehaviourMixin, TestCase):
    """The local store keeps the contract when every folder packs its create-only puts."""

    def make_store(self) -> LocalObjectStore:
        return LocalObjectStore(temporary_folder(self), reactor, packed=lambda folder: True)


class FaultlessBehaviourTests(ObjectStoreBehaviourMixin, TestCase):
    """A FaultyObjectStore with no faults injected is indistinguishable from the store it wraps."""

    def make_store(self) -> FaultyObjectStore:
        return FaultyObjectStore(LocalObjectStore(temporary_folder(self), reactor))


class LocalStoreTests(TestCase):
    """What is particular to keeping objects as files."""

    def setUp(self) -> None:
        self.root = temporary_folder(self)
        self.store = LocalObjectStore(self.root, reactor)
        self.addCleanup(self.store.close)

    async def test_layout(self) -> None:
        """Key parts are folders; the object is a plain file readable only by its owner."""
        await self.store.put("chunks/ab/cdef", b"sealed")
        path = self.root / "chunks" / "ab" / "cdef"
        self.assertEqual(path.read_bytes(), b"sealed")
        self.assertEqual(stat.S_IMODE(path.stat().st_mode), 0o600)

    async def test_no_temporary_files_after_success(self) -> None:
        """Successful puts, plain and create-only, leave no temporary file."""
        await self.store.put("a/b", b"1")
        await self.store.put("a/b", b"2")
        await self.store.put("a/c", b"3", create_only=True)
        await self.assertFailure(self.store.put("a/c", b"4", create_only=True), errors.AlreadyExists)
        self.assertEqual(stray_files(self.root), [])

    async def test_full_disk(self) -> None:
        """A full disk is NoSpace naming the store, and leaves neither object nor temporary file."""
        self.patch(local_module, "_write_fully", disk_full)
        failure = await self.assertFailure(self.store.put("a/b", b"data"), errors.NoSpace)
        self.assertEqual(str(failure), f"object store at {self.root} is full")
        await self.assertFailure(self.store.head("a/b"), errors.NotFound)
        self.assertEqual(stray_files(self.root), [])

    async def test_full_disk_at_fsync(self) -> None:
        """A full disk found at fsync (as on NFS) is NoSpace too."""
        self.patch(os, "fsync", disk_full)
        await self.assertFailure(self.store.put("a", b"data"), errors.NoSpace)
        self.assertEqual(stray_files(self.root), [])

    async def test_failed_overwrite_keeps_old_object(self) -> None:
        """A put that fails leaves the object it would have replaced intact."""
        await self.store.put("precious", b"old")
        self.patch(local_module, "_write_fully", disk_full)
        await self.assertFailure(self.store.put("precious", b"new"), errors.NoSpace)
        self.assertEqual(await self.store.get("precious"), b"old")
        self.assertEqual(stray_files(self.root), [])

    def count_fsyncs(self) -> list[int]:
        """From now on, the descriptors every ``os.fsync`` is given (it still syncs them)."""
        synced: list[int] = []
        real_fsync = os.fsync

        def counting_fsync(fd: int) -> None:
            synced.append(fd)
            real_fsync(fd)

        self.patch(os, "fsync", counting_fsync)
        return synced

    async def test_fsync(self) -> None:
        """A put fsyncs the file and its folder; new folders are made durable too."""
        synced = self.count_fsyncs()
        await self.store.put("x/y/first", b"1")
        self.assertEqual(len(synced), 4)  # root for x, x for y, the file, then y
        del synced[:]
        await self.store.put("x/y/second", b"2")
        self.assertEqual(len(synced), 2)
        del synced[:]
        await self.store.delete("x/y/second")
        self.assertEqual(len(synced), 1)

    async def test_ranged_get_reads_only_the_range(self) -> None:
        """A ranged get asks the file for the range, not the whole object."""
        await self.store.put("big", bytes(1000))
        reads: list[tuple[int, int]] = []
        real_pread = os.pread

        def recording_pread(fd: int, length: int, offset: int) -> bytes:
            reads.append((length, offset))
            return real_pread(fd, length, offset)

        self.patch(os, "pread", recording_pread)
        self.assertEqual(await self.store.get_range("big", 100, 10), bytes(10))
        self.assertEqual(reads, [(10, 100)])

    async def test_path_traversal_refused(self) -> None:
        """Keys that would leave the store's folder are refused, and nothing is written outside."""
        for key in ["../escape", "a/../../escape", "/tmp/escape", "..", "a/./../escape"]:
            await self.assertFailure(self.store.put(key, b"x"), errors.InvalidArgument)
            await self.assertFailure(self.store.get(key), errors.InvalidArgument)
            await self.assertFailure(self.store.delete(key), errors.InvalidArgument)
        await self.assertFailure(self.store.list("../"), errors.InvalidArgument)
        self.assertEqual(sorted(os.listdir(self.root.parent)), [self.root.name])
        self.assertEqual(os.listdir(self.root), [])

    async def test_key_used_as_folder_refused(self) -> None:
        """A key cannot also be another key's folder on disk; the clash is named, not hidden."""
        await self.store.put("a/b", b"1")
        failure = await self.assertFailure(self.store.put("a", b"2"), errors.InvalidArgument)
        self.assertIn("clashes", str(failure))
        await self.assertFailure(self.store.put("a", b"2", create_only=True), errors.InvalidArgument)
        await self.store.put("c", b"3")
        await self.assertFailure(self.store.put("c/d", b"4"), errors.InvalidArgument)
        await self.assertFailure(self.store.get("a"), errors.NotFound)
        await self.assertFailure(self.store.head("a"), errors.NotFound)
        await self.assertFailure(self.store.get_range("a", 0, 1), errors.NotFound)
        await self.store.delete("a")
        self.assertEqual([info.key for info in await self.store.list()], ["a/b", "c"])
        self.assertEqual(stray_files(self.root), [])

    async def test_stray_files_not_listed(self) -> None:
        """Temporary files of crashed writers and files no key could name are not listed."""
        (self.root / ".tmp-0123").write_bytes(b"partial")
        (self.root / "not a key").write_bytes(b"?")
        (self.root / "ok").write_bytes(b"!")
        self.assertEqual([info.key for info in await self.store.list()], ["ok"])

    async def test_create_only_needs_hard_links(self) -> None:
        """On a file system without hard links a create-only put says so."""

        def no_links(*args: object) -> None:
            raise OSError(errno.EPERM, os.strerror(errno.EPERM))

        self.patch(os, "link", no_links)
        failure = await self.assertFailure(self.store.put("k", b"x", create_only=True), errors.NotSupported)
        self.assertIn("hard links", str(failure))
        self.assertEqual(stray_files(self.root), [])

    async def test_put_file_links_the_file_in(self) -> None:
        """put_file makes the file the object (a hard link, synced with its folder), create-only."""
        source = self.root.parent / f"{self.root.name}-staged"
        source.write_bytes(b"sealed object")
        self.addCleanup(source.unlink, missing_ok=True)
        verifyObject(IFileObjectStore, self.store)
        synced = self.count_fsyncs()
        await self.store.put_file("chunks/ab/cd", str(source))
        self.assertEqual(await self.store.get("chunks/ab/cd"), b"sealed object")
        self.assertTrue(os.path.samefile(source, self.root / "chunks" / "ab" / "cd"))
        self.assertGreaterEqual(len(synced), 2, "the file, then its folder")
        await self.assertFailure(self.store.put_file("chunks/ab/cd", str(source)), errors.AlreadyExists)
        self.assertEqual(stray_files(self.root), [])

    async def test_put_file_from_another_file_system(self) -> None:
        """A file on another file system (no hard link possible) is copied; without hard links at all, NotSupported."""
        source = self.root.parent / f"{self.root.name}-staged"
        source.write_bytes(b"copied")
        self.addCleanup(source.unlink, missing_ok=True)
        real_link = os.link
        refusals = iter([errno.EXDEV])

        def refused(*args: Any) -> None:
            code = next(refusals, None)
            if code is None:
                real_link(*args)
                return
            raise OSError(code, os.strerror(code))

        self.patch(os, "link", refused)
        await self.store.put_file("a", str(source))
        self.assertEqual(await self.store.get("a"), b"copied")
        self.assertFalse(os.path.samefile(source, self.root / "a"))
        refusals = iter([errno.EPERM, errno.EPERM])
        await self.assertFailure(self.store.put_file("b", str(source)), errors.NotSupported)
        await self.assertFailure(self.store.put_file("gone", str(source) + "-missing"), errors.Unavailable)
        self.assertEqual(stray_files(self.root), [])

    async def test_file_of(self) -> None:
        """A plain object's file is named (and outlives the object's deletion where linked); a packed or missing one is not."""
        await self.store.put("chunks/ab/cd", b"sealed object", create_only=True)
        path = await self.store.file_of("chunks/ab/cd")
        self.assertEqual(Path(path).read_bytes(), b"sealed object")
        kept = self.root.parent / f"{self.root.name}-kept"
        os.link(path, kept)
        self.addCleanup(kept.unlink, missing_ok=True)
        await self.store.delete("chunks/ab/cd")
        self.assertEqual(kept.read_bytes(), b"sealed object")
        self.assertIsNone(await self.store.file_of("chunks/ab/cd"))
        await self.store.put("fs/journal/0001", b"segment", create_only=True)
        self.assertIsNone(await self.store.file_of("fs/journal/0001"), "packed")
        self.assertIsNone(await self.store.file_of("fs"), "a folder")
        await self.assertFailure(self.store.file_of("../escape"), errors.InvalidArgument)

    async def test_put_file_into_a_pack(self) -> None:
        """A folder that packs its objects takes the file's bytes into its pack."""
        source = self.root.parent / f"{self.root.name}-staged"
        source.write_bytes(b"segment")
        self.addCleanup(source.unlink, missing_ok=True)
        await self.store.put_file("fs/journal/0001", str(source))
        self.assertEqual(await self.store.get("fs/journal/0001"), b"segment")
        self.assertFalse((self.root / "fs" / "journal" / "0001").exists())

    async def test_vanished_folder_is_unavailable(self) -> None:
        """If the store's folder disappears (an unmounted disk), operations fail as Unavailable, not NotFound."""
        await self.store.put("k", b"x")
        shutil.rmtree(self.root)
        for operation in [
            self.store.get("k"),
            self.store.get_range("k", 0, 1),
            self.store.head("k"),
            self.store.delete("k"),
            self.store.list(),
            self.store.put("k", b"y"),
            self.store.put("new/k", b"y"),
        ]:
            failure = await self.assertFailure(operation, errors.Unavailable)
            self.assertIn("is missing", str(failure))
        self.assertFalse(self.root.exists())

    def test_missing_folder_refused(self) -> None:
        """Opening a store on a folder that does not exist fails, unless asked to create it."""
        missing = self.root / "missing"
        self.assertRaises(errors.NotFound, LocalObjectStore, missing, reactor)
        store = LocalObjectStore(missing, reactor, create=True)
        self.addCleanup(store.close)
        self.assertTrue(missing.is_dir())

    async def test_close_stops_owned_pool(self) -> None:
        """Closing stops the store's own thread pool; later operations fail."""
        store = LocalObjectStore(self.root, reactor)
        await store.put("k", b"x")
        await store.close()
        self.assertTrue(store._threadpool.joined)
        await self.assertFailure(store.get("k"), errors.Unavailable)

    async def test_given_pool_is_left_running(self) -> None:
        """A thread pool handed in belongs to the caller and survives close."""
        pool = ThreadPool(minthreads=0, maxthreads=2)
        pool.start()
        self.addCleanup(pool.stop)
        store = LocalObjectStore(self.root, reactor, threadpool=pool)
        await store.put("k", b"x")
        await store.close()
        self.assertTrue(pool.started)

    async def test_put_refuses_text(self) -> None:
        """Objects are bytes; a str is refused rather than encoded somehow."""
        await self.assertFailure(self.store.put("k", "text"), errors.InvalidArgument)  # type: ignore[arg-type]


class OpenStoreTests(TestCase):
    """Stores are opened from URLs; unknown schemes are refused by name."""

    async def test_file_url(self) -> None:
        """file:///path opens a local store on that folder."""
        root = temporary_folder(self)
        for url in [f"file://{root}", f"file://localhost{root}"]:
            store = open_store(url, reactor)
            self.addCleanup(store.close)
            self.assertTrue(verifyObject(IObjectStore, store))
            await store.put("k", b"x")
        self.assertEqual((root / "k").read_bytes(), b"x")

    def test_file_url_create(self) -> None:
        """create makes the folder of a new store."""
        root = temporary_folder(self) / "new" / "store"
        self.assertRaises(errors.NotFound, open_store, f"file://{root}", reactor)
        store = open_store(f"file://{root}", reactor, create=True)
        self.addCleanup(store.close)
        self.assertTrue(root.is_dir())

    def test_unsupported_scheme(self) -> None:
        """A scheme without a backend is refused with NotSupported naming it."""
        for url, scheme in [("gs://bucket/prefix", "'gs'"), ("ftp://host/x", "'ftp'")]:
            with self.assertRaises(errors.NotSupported) as caught:
                open_store(url, reactor)
            self.assertIn(f"scheme {scheme} is not supported yet", str(caught.exception))

    def test_bad_file_urls(self) -> None:
        """A bare path, a remote host, a relative path or a query are refused."""
        for url in ["/tmp/store", "file://otherhost/tmp/x", "file:relative", "file:///tmp/x?y=1"]:
            self.assertRaises(errors.InvalidArgument, open_store, url, reactor)


class FaultyObjectStoreTests(TestCase):
    """The fault injector fails, delays and corrupts exactly what it is told to."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.inner = LocalObjectStore(temporary_folder(self), reactor)
        self.store = FaultyObjectStore(self.inner, clock=self.clock)
        self.addCleanup(self.store.close)

    async def test_fail_next(self) -> None:
        """The next N calls of the named operations fail with Unavailable; others pass."""
        self.store.fail_next(2, operations={"put"})
        await self.assertFailure(self.store.put("k", b"1"), errors.Unavailable)
        await self.assertFailure(self.store.get("k"), errors.NotFound)
        failure = await self.assertFailure(self.store.put("k", b"2"), errors.Unavailable)
        self.assertIn("injected fault: put of 'k'", str(failure))
        await self.store.put("k", b"3")
        self.assertEqual(await self.store.get("k"), b"3")

    async def test_fail_after_success(self) -> None:
        """A fault after the operation reports failure although the object was stored."""
        self.store.fail_next(after=True)
        await self.assertFailure(self.store.put("k", b"stored"), errors.Unavailable)
        self.assertEqual(await self.inner.get("k"), b"stored")

    async def test_fail_always_until_healed(self) -> None:
        """Everything fails until heal, with the error the test chose."""
        self.store.fail_always(error=lambda operation, key: errors.NoSpace(f"{operation} {key}"))
        for _ in range(3):
            await self.assertFailure(self.store.put("k", b"x"), errors.NoSpace)
        await self.assertFailure(self.store.list(), errors.NoSpace)
        self.store.heal()
        await self.store.put("k", b"x")

    async def test_delay(self) -> None:
        """Calls wait for the injected clock."""
        await self.inner.put("k", b"x")
        self.store.set_delay(5.0)
        pending: Deferred[bytes] = self.store.get("k")
        self.assertNoResult(pending)
        self.clock.advance(4.9)
        self.assertNoResult(pending)
        self.clock.advance(0.1)
        self.assertEqual(await pending, b"x")

    async def test_corruption(self) -> None:
        """The next read returns altered bytes; later reads are clean again."""
        await self.inner.put("k", b"abcdef")
        self.store.corrupt_next()
        altered = await self.store.get_range("k", 0, 6)
        self.assertNotEqual(altered, b"abcdef")
        self.assertEqual(len(altered), 6)
        self.assertEqual(await self.store.get("k"), b"abcdef")
        self.store.corrupt_always(lambda data: data[:-1])
        self.assertEqual(await self.store.get("k"), b"abcde")
        self.assertEqual(await self.store.get("k"), b"abcde")

    async def test_calls_recorded(self) -> None:
        """Every call is recorded with its key, faulty or not."""
        self.store.fail_next(operations={"head"})
        await self.store.put("a", b"")
        await self.assertFailure(self.store.head("a"), errors.Unavailable)
        await self.store.list("x/")
        self.assertEqual(self.store.calls, [("put", "a"), ("head", "a"), ("list", "x/")])

    def test_misuse_refused(self) -> None:
        """Unknown operations, and delays without a clock, are refused."""
        self.assertRaises(errors.InvalidArgument, self.store.fail_next, operations={"gte"})
        clockless = FaultyObjectStore(self.inner)
        self.assertRaises(errors.InvalidArgument, clockless.set_delay, 1.0)

    def test_provides_interface(self) -> None:
        """The wrapper is an IObjectStore itself."""
        self.assertTrue(verifyObject(IObjectStore, self.store))

