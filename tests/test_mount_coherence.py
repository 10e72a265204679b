"""
The adapter's own bookkeeping, without a mount: descriptors of one file see
each other's writes (as on a local filesystem), the kernel's lookup counts
decide which inodes a reconnect invalidates, an open removed directory still
has attributes, the lock operations refuse clearly what they cannot use, and
the core tells the mount what other clients changed.
"""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import stat
import threading
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from tests.client_helpers import ClientTestCase, MemoryFilespaceCase, deferLater
from tests.test_mount import Context, SynchronousBridge

try:
    import llfuse

    from lucidlink import fuse_locks
    from lucidlink import mount as mount_module
    from lucidlink.crypto import BLOCK_SIZE
    from lucidlink.fuse_threads import DeafThread
    from lucidlink.kernel_pages import PageStore
    from lucidlink.mount import (
        FilespaceOperations,
        KernelCaches,
        stop_storing_pages,
    )
except ImportError:
    llfuse = None


class Fields:
    """What ``setattr`` is asked to change: the mode only (llfuse's own SetattrFields is read-only)."""

    update_mode = True
    update_uid = update_gid = update_size = update_atime = update_mtime = False


class HeldPageStore(PageStore if llfuse is not None else object):  # type: ignore[misc]
    """Takes offers, and stores them only once let go (so a test puts changes between a read and its store)."""

    def __init__(self) -> None:
        self.stores: list[tuple[int, int, bytes]] = []
        super().__init__(lambda inode, offset, data: self.stores.append((inode, offset, bytes(data))))
        self._thread = DeafThread(target=self._run, daemon=True)

    def let_go(self) -> list[tuple[int, int, bytes]]:
        """Store what is offered (and still true); the stores made."""
        assert self._thread is not None
        if not self._thread.is_alive():
            self._thread.start()
        assert self.settle()
        return self.stores


class AdapterCoherenceTests(MemoryFilespaceCase):
    """:class:`FilespaceOperations` over an in-memory filespace."""

    if llfuse is None:
        skip = "llfuse is not installed"

    def setUp(self) -> Any:
        done = super().setUp()
        done.addCallback(lambda _: setattr(self, "ops", FilespaceOperations(self.fs.inodes, SynchronousBridge(None))))
        return done

    def test_descriptors_see_each_others_writes(self) -> None:
        """A write through one descriptor is read through another at once; of two writes, the later wins."""
        ctx = Context()
        first, entry = self.ops.create(llfuse.ROOT_INODE, b"f", stat.S_IFREG | 0o644, os.O_RDWR | os.O_CREAT, ctx)
        second = self.ops.open(entry.st_ino, os.O_RDWR, ctx)
        self.ops.write(first, 5, b"abc")
        self.assertEqual(self.ops.read(second, 0, 100), b"\0\0\0\0\0abc")
        self.ops.write(second, 0, b"XY")
        self.ops.write(first, 1, b"1")  # after the second's write of the same byte: this one must win
        self.assertEqual(self.ops.read(second, 0, 100), b"X1\0\0\0abc")
        self.ops.release(second)
        self.ops.release(first)
        third = self.ops.open(entry.st_ino, os.O_RDONLY, ctx)
        self.assertEqual(self.ops.read(third, 0, 100), b"X1\0\0\0abc")
        self.ops.release(third)

    def test_pages_written_back_through_an_append_descriptor(self) -> None:
        """A write the kernel marks as page write-back goes at its offset through an ``O_APPEND`` handle; others append."""
        ctx = Context()
        writer, entry = self.ops.create(llfuse.ROOT_INODE, b"f", stat.S_IFREG | 0o644, os.O_RDWR | os.O_CREAT, ctx)
        self.ops.write(writer, 0, b"abcdef")
        appender = self.ops.open(entry.st_ino, os.O_RDWR | os.O_APPEND, ctx)
        told: list[Any] = []

        def llfuse_write_buf(request: int, inode: int, buffers: int, offset: int, info: Any) -> None:
            try:
                told.append(self.ops.write(appender, offset, b"XY"))
            except Exception as error:  # a ctypes callback cannot raise
                told.append(error)

        original = fuse_locks._WRITE_BUF(llfuse_write_buf)
        address = ctypes.cast(original, ctypes.c_void_p).value
        locks = fuse_locks.InstalledLocks(None, None, 0, 0, 0, address)  # type: ignore[arg-type]
        wrapper = locks.callbacks["write_buf"]
        wrapper(None, entry.st_ino, None, 0, ctypes.byref(fuse_locks.FileInfo(writepage=1)))
        wrapper(None, entry.st_ino, None, 0, ctypes.byref(fuse_locks.FileInfo(writepage=0)))
        self.assertEqual(told, [2, 2])
        self.assertFalse(fuse_locks.writing_back_pages())
        self.assertEqual(self.ops.read(writer, 0, 100), b"XYcdefXY")
        self.ops.release(appender)
        self.ops.release(writer)

    def file_of_two_blocks(self) -> tuple[int, bytes, HeldPageStore]:
        """A file of two blocks and more (written and closed), and held stores in place of the kernel's."""
        ctx = Context()
        content = os.urandom(2 * BLOCK_SIZE + 100)
        writer, entry = self.ops.create(llfuse.ROOT_INODE, b"f", stat.S_IFREG | 0o644, os.O_RDWR | os.O_CREAT, ctx)
        self.ops.write(writer, 0, content)
        self.ops.release(writer)
        self.ops.pages = pages = HeldPageStore()
        self.ops.kernel._pages = pages
        self.addCleanup(pages.stop)
        self.addCleanup(pages.let_go)
        return entry.st_ino, content, pages

    def test_a_small_read_offers_the_rest_of_its_block(self) -> None:
        """The kernel asked for two pages of the second block: it gets the block's other pages too."""
        inode, content, pages = self.file_of_two_blocks()
        reader = self.ops.open(inode, os.O_RDONLY, Context())
        self.assertEqual(self.ops.read(reader, BLOCK_SIZE + 4096, 8192), content[BLOCK_SIZE + 4096 :][:8192])
        self.assertEqual(self.ops.read(reader, 2 * BLOCK_SIZE, 4096), content[2 * BLOCK_SIZE :])
        self.assertEqual(self.ops.read(reader, BLOCK_SIZE - 4096, 8192), content[BLOCK_SIZE - 4096 :][:8192])
        self.assertEqual(self.ops.read(reader, 0, BLOCK_SIZE), content[:BLOCK_SIZE])
        self.assertEqual(pages.let_go(), [
            (inode, BLOCK_SIZE, content[BLOCK_SIZE:][:4096]),
            (inode, BLOCK_SIZE + 3 * 4096, content[BLOCK_SIZE + 3 * 4096 : 2 * BLOCK_SIZE]),
        ], "the tail block holds no more than was read; reads across blocks or of whole blocks offer nothing")
        self.ops.release(reader)

    def stores_during(self, method: str, pages: HeldPageStore) -> list[list[tuple[int, int, bytes]]]:
        """Let the held stores go right after the core's ``method`` made its change (before the adapter goes on)."""
        original = getattr(self.ops.inodes, method)
        landed: list[list[tuple[int, int, bytes]]] = []

        def making(*arguments: Any, **keywords: Any) -> Any:
            result = original(*arguments, **keywords)
            landed.append(list(pages.let_go()))
            return result

        self.patch(self.ops.inodes, method, making)
        return landed

    def test_no_store_lands_after_a_writer_opens(self) -> None:
        inode, content, pages = self.file_of_two_blocks()
        reader = self.ops.open(inode, os.O_RDONLY, Context())
        self.ops.read(reader, 0, 4096)
        landed = self.stores_during("open", pages)
        writer = self.ops.open(inode, os.O_WRONLY, Context())
        self.assertEqual(landed, [[]])
        self.ops.write(writer, 8192, b"new")
        self.ops.read(reader, 0, 4096)
        self.assertEqual(pages.let_go(), [], "nothing is stored while a writer is open")
        self.ops.release(writer)
        self.ops.read(reader, 0, 4096)
        self.assertEqual(pages.let_go(), [(inode, 4096, content[4096:8192] + b"new" + content[8195:BLOCK_SIZE])])
        self.ops.release(reader)

    def test_a_forgotten_inode_keeps_its_changes(self) -> None:
        """The kernel forgetting an inode (and looking it up again) does not make bytes read before a change new."""
        inode, _, pages = self.file_of_two_blocks()
        reader = self.ops.open(inode, os.O_RDONLY, Context())
        self.ops.read(reader, 0, 4096)
        self.ops.release(reader)
        writer = self.ops.open(inode, os.O_WRONLY, Context())
        self.ops.write(writer, 8192, b"new")
        self.ops.release(writer)
        self.ops.forget([(inode, 1)])
        self.ops.lookup(llfuse.ROOT_INODE, b"f", Context())
        self.assertEqual(pages.let_go(), [])

    def test_no_store_lands_after_a_truncating_open(self) -> None:
        inode, _, pages = self.file_of_two_blocks()
        reader = self.ops.open(inode, os.O_RDONLY, Context())
        self.ops.read(reader, BLOCK_SIZE, 4096)
        landed = self.stores_during("open", pages)
        self.ops.release(self.ops.open(inode, os.O_RDONLY | os.O_TRUNC, Context()))
        self.assertEqual(landed, [[]])
        self.ops.release(reader)

    def test_no_store_lands_after_a_create_that_empties_a_file(self) -> None:
        """A create with ``O_TRUNC`` of a name that is an existing file (the kernel thought it absent) empties it."""
        inode, _, pages = self.file_of_two_blocks()
        reader = self.ops.open(inode, os.O_RDONLY, Context())
        self.ops.read(reader, BLOCK_SIZE, 4096)
        landed = self.stores_during("create", pages)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        writer, entry = self.ops.create(llfuse.ROOT_INODE, b"f", stat.S_IFREG | 0o644, flags, Context())
        self.assertEqual((entry.st_ino, entry.st_size, landed), (inode, 0, [[]]))
        self.ops.release(writer)
        self.ops.release(reader)

    def test_no_store_lands_after_a_setattr(self) -> None:
        inode, _, pages = self.file_of_two_blocks()
        reader = self.ops.open(inode, os.O_RDONLY, Context())
        self.ops.read(reader, BLOCK_SIZE, 4096)

        class Size(Fields):
            update_mode = False
            update_size = True

        attributes = llfuse.EntryAttributes()
        attributes.st_size = 100
        landed = self.stores_during("setattr", pages)
        self.assertEqual(self.ops.setattr(inode, attributes, Size(), None, Context()).st_size, 100)
        self.assertEqual(landed, [[]])
        self.assertEqual(pages.let_go(), [])
        self.ops.release(reader)

    def changed_elsewhere(self, inode_told: int | None) -> list[tuple[int, int, bytes]]:
        """The stores made of a read before the invalidation thread is told of a change of ``inode_told``."""
        self.patch(llfuse, "invalidate_inode", lambda inode, attributes_only=False: None)
        inode, _, pages = self.file_of_two_blocks()
        reader = self.ops.open(inode, os.O_RDONLY, Context())
        self.ops.read(reader, BLOCK_SIZE, 4096)
        self.ops.kernel.start()
        self.addCleanup(self.ops.kernel.stop)
        self.ops.kernel.changed(inode if inode_told is None else inode_told)
        self.assertTrue(self.ops.kernel.settle())
        self.ops.release(reader)
        return pages.let_go()

    def test_no_store_lands_after_a_change_elsewhere(self) -> None:
        """The invalidation thread notes the change before the kernel drops the pages: the store is not made."""
        self.assertEqual(self.changed_elsewhere(None), [])

    def test_no_store_lands_after_a_reconnect(self) -> None:
        """A reconnect (notifications missed) drops every inode's pages: no store of before it is made."""
        self.assertEqual(self.changed_elsewhere(0), [])

    def test_a_change_of_another_inode_leaves_stores(self) -> None:
        self.assertEqual(len(self.changed_elsewhere(12345)), 1)

    def test_lookup_counts(self) -> None:
        """An inode stays known to the kernel until ``forget`` takes back every lookup of it."""
        ctx = Context()
        made = self.ops.mkdir(llfuse.ROOT_INODE, b"d", stat.S_IFDIR | 0o755, ctx)
        self.ops.lookup(llfuse.ROOT_INODE, b"d", ctx)
        known = self.ops.kernel._known
        self.assertIn(made.st_ino, known())
        self.ops.forget([(made.st_ino, 1)])
        self.assertIn(made.st_ino, known())
        self.ops.forget([(made.st_ino, 1)])
        self.assertNotIn(made.st_ino, known())
        self.assertTrue(self.ops.kernel.settle())  # not running (not mounted): nothing to wait for

    def gated_kernel(self) -> tuple[KernelCaches, threading.Event, threading.Event, list[int]]:
        """Running invalidations whose ``invalidate_inode`` waits for a gate: the kernel, the gate, entered, done."""
        gate, entered = threading.Event(), threading.Event()
        invalidated: list[int] = []

        def invalidate_inode(inode: int, attributes_only: bool = False) -> None:
            entered.set()
            gate.wait(10)
            invalidated.append(inode)

        self.patch(llfuse, "invalidate_inode", invalidate_inode)
        kernel = KernelCaches(lambda: [])
        kernel.start()
        self.addCleanup(kernel.stop)
        return kernel, gate, entered, invalidated

    def test_settle_waits_only_for_what_is_queued(self) -> None:
        """``settle`` waits while invalidations are queued, and not at all once they are carried out."""
        kernel, gate, _, invalidated = self.gated_kernel()
        kernel.drop_pages(7)
        self.assertFalse(kernel.settle(timeout=0.05), "the invalidation is still under way")
        gate.set()
        self.assertTrue(kernel.settle())
        self.assertEqual(invalidated, [7])
        served, kernel._queue = kernel._queue, queue.SimpleQueue()  # what settle puts now is never answered
        self.assertTrue(kernel.settle(timeout=0.05), "nothing left to wait for")
        kernel._queue = served

    def test_stop_drops_what_is_queued(self) -> None:
        """Stopped (llfuse's loop has ended), the invalidations still queued are dropped, and settle lets go."""
        kernel, gate, entered, invalidated = self.gated_kernel()
        for inode in (7, 8, 9):
            kernel.drop_pages(inode)
        self.assertTrue(entered.wait(10))
        settled: list[bool] = []
        waiter = threading.Thread(target=lambda: settled.append(kernel.settle(timeout=10)))
        waiter.start()
        deadline = time.monotonic() + 10
        while kernel._queue.qsize() < 3 and time.monotonic() < deadline:  # 8, 9 and the waiter's mark
            time.sleep(0.001)
        stopping = threading.Thread(target=kernel.stop)
        stopping.start()
        gate.set()
        stopping.join(10)
        waiter.join(10)
        self.assertFalse(stopping.is_alive())
        self.assertEqual(invalidated, [7], "the one under way ends; the rest are dropped")
        self.assertEqual(settled, [True])

    def test_removed_open_directory(self) -> None:
        """A directory removed while open keeps its attributes (as last changed here) with no links."""
        ctx = Context()
        made = self.ops.mkdir(llfuse.ROOT_INODE, b"d", stat.S_IFDIR | 0o755, ctx)
        fh = self.ops.opendir(made.st_ino, ctx)
        attributes = llfuse.EntryAttributes()
        attributes.st_mode = stat.S_IFDIR | 0o700
        fields = Fields()
        self.ops.setattr(made.st_ino, attributes, fields, None, ctx)
        self.ops.rmdir(llfuse.ROOT_INODE, b"d", ctx)
        gone = self.ops.getattr(made.st_ino)
        self.assertEqual((gone.st_mode, gone.st_nlink), (stat.S_IFDIR | 0o700, 0))
        self.ops.releasedir(fh)
        with self.assertRaises(llfuse.FUSEError) as caught:
            self.ops.getattr(made.st_ino)
        self.assertEqual(caught.exception.errno, errno.ENOENT)


class FuseLocksTests(SynchronousTestCase):
    """:mod:`lucidlink.fuse_locks` adds nothing, and says why, when things are not as it expects."""

    if llfuse is None:
        skip = "llfuse is not installed"

    def test_not_elf(self) -> None:
        """A file that is not a 64-bit ELF object is refused by name."""
        path = Path(self.mktemp())
        path.write_bytes(b"#!/bin/sh\n")
        with self.assertRaises(fuse_locks.NotInstalled) as caught:
            fuse_locks._symbols(str(path), {"anything"})
        self.assertIn("not a 64-bit little-endian ELF file", str(caught.exception))

    def test_missing_symbols(self) -> None:
        """Symbols llfuse's module does not have are named."""
        with self.assertRaises(fuse_locks.NotInstalled) as caught:
            fuse_locks._symbols(llfuse.__file__, {"PyInit_llfuse", "no_such_symbol"})
        self.assertIn("lacks the symbols no_such_symbol", str(caught.exception))

    def test_before_init(self) -> None:
        """Without ``llfuse.init`` there is no session to add operations to."""
        with self.assertRaises(fuse_locks.NotInstalled) as caught:
            fuse_locks.install(None)  # type: ignore[arg-type]
        self.assertIn("no session", str(caught.exception))

    def test_ranges(self) -> None:
        """``l_len`` 0 runs to the end of the file; a negative start or length is EINVAL."""
        self.assertEqual(fuse_locks._range(fuse_locks.Flock(0, 0, 10, 0, 0)), (10, fuse_locks.LOCK_END))
        self.assertEqual(fuse_locks._range(fuse_locks.Flock(0, 0, 10, 5, 0)), (10, 14))
        with self.assertRaises(llfuse.FUSEError) as caught:
            fuse_locks._range(fuse_locks.Flock(0, 0, -1, 5, 0))
        self.assertEqual(caught.exception.errno, errno.EINVAL)


class PageStoreStopTests(SynchronousTestCase):
    """Stopping the page store when llfuse's loop has ended, even with a store waiting in the kernel."""

    if llfuse is None:
        skip = "llfuse is not installed"

    def test_a_stuck_store_ends_by_refusing_the_requests_left(self) -> None:
        """The store waits for a page that a read no worker will answer holds: the read is refused, the store ends."""
        refused = threading.Event()
        entered = threading.Event()

        def store(inode: int, offset: int, data: Any) -> None:
            entered.set()
            if refused.wait(30):
                raise OSError(errno.ENOTCONN, "the read holding the page was refused")

        pages = PageStore(store)
        pages.start()
        generation = pages.generation(7)
        assert generation is not None
        pages.offer(7, generation, 0, b"x")
        self.assertTrue(entered.wait(10))
        calls: list[tuple[int, float]] = []

        def refuse_pending(device: int, done: Any, seconds: float) -> int:
            calls.append((device, seconds))
            refused.set()
            deadline = time.monotonic() + seconds
            while not done() and time.monotonic() < deadline:
                time.sleep(0.01)
            return 1

        self.patch(mount_module, "refuse_pending", refuse_pending)
        with self.assertLogs("lucidlink.mount", "WARNING") as logged:
            stop_storing_pages(pages, 9, timeout=0.05)
        self.assertEqual(calls, [(9, 10.0)])
        self.assertEqual([record.levelname for record in logged.records], ["WARNING"], "and no error: it ended")
        self.assertFalse(pages.alive)

    def test_a_store_that_ends_needs_nothing_refused(self) -> None:
        pages = PageStore(lambda inode, offset, data: None)
        pages.start()
        self.patch(mount_module, "refuse_pending", lambda *arguments: self.fail("refused"))
        stop_storing_pages(pages, 9)
        self.assertFalse(pages.alive)


class ChangeListenerTests(ClientTestCase):
    """``Inodes.on_change`` (what the mount invalidates the kernel's caches by), over a real server."""

    @defer.inlineCallbacks
    def test_changes_elsewhere_are_told(self) -> Generator[Deferred[Any], Any, None]:
        """Another session's new entry, removal and write reach the listener with plain names."""
        writer = yield self.filespace()
        watcher = yield self.filespace()
        told: list[tuple[int, int, bytes | None]] = []
        unsubscribe = watcher.inodes.on_change(lambda *change: told.append(change))
        root = writer.root_inode
        yield writer.write_file("/new.txt", b"hello")
        made = yield writer.stat("/new.txt")

        @defer.inlineCallbacks
        def until(change: tuple[int, int, bytes | None]) -> Generator[Deferred[Any], Any, None]:
            for _ in range(200):
                if change in told:
                    return
                yield deferLater(0.01)
            self.fail(f"{change} was not told; told {told}")

        yield until((made.inode, root, b"new.txt"))
        yield until((root, 0, None))
        yield until((made.inode, 0, None))
        yield writer.remove("/new.txt")
        told.clear()
        yield writer.mkdir("/later")
        yield until((root, 0, None))
        self.meta.drop_connections()  # what was said meanwhile is lost: after the reconnect, everything
        yield watcher.stat("/")
        yield until((0, 0, None))
        unsubscribe()
        told.clear()
        yield writer.mkdir("/unheard")
        yield deferLater(0.2)
        self.assertEqual(told, [])
