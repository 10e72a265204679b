"""
:mod:`lucidlink.kernel_pages` without a mount: which offered bytes reach the kernel, in its thread.

The store function stands in for ``llfuse.notify_store``; the mount's own
use is tested through real mounts in :mod:`tests.test_mount_pages`.
"""

from __future__ import annotations

import errno
import threading
import time

from twisted.trial.unittest import SynchronousTestCase

from lucidlink import kernel_pages
from lucidlink.kernel_pages import PageStore


class Kernel:
    """Records stores; ``hold`` makes the next store wait until released; ``error`` makes stores fail."""

    def __init__(self) -> None:
        self.stores: list[tuple[int, int, bytes]] = []
        self.hold: threading.Event | None = None
        self.entered = threading.Event()
        self.error: OSError | None = None

    def store(self, inode: int, offset: int, data: object) -> None:
        self.entered.set()
        if self.hold is not None:
            self.hold.wait(10)
        if self.error is not None:
            raise self.error
        self.stores.append((inode, offset, bytes(data)))  # type: ignore[call-overload]


class PageStoreTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.kernel = Kernel()
        self.pages = PageStore(self.kernel.store)
        self.pages.start()
        self.addCleanup(self.pages.stop)

    def settle(self) -> None:
        self.assertTrue(self.pages.settle())

    def test_offered_bytes_are_stored(self) -> None:
        generation = self.pages.generation(7)
        assert generation is not None
        self.pages.offer(7, generation, 4096, b"x" * 8192)
        self.settle()
        self.assertEqual(self.kernel.stores, [(7, 4096, b"x" * 8192)])
        self.assertEqual(self.pages.stored, 1)

    def test_nothing_is_stored_while_a_writer_is_open(self) -> None:
        self.pages.writer_opened(7)
        self.assertIsNone(self.pages.generation(7))
        self.assertIsNotNone(self.pages.generation(8))

    def test_bytes_read_before_a_writer_opened_are_not_stored(self) -> None:
        generation = self.pages.generation(7)
        assert generation is not None
        self.pages.writer_opened(7)
        self.pages.writer_closed(7)
        self.pages.offer(7, generation, 0, b"old")
        self.settle()
        self.assertEqual(self.kernel.stores, [])
        after = self.pages.generation(7)
        assert after is not None
        self.pages.offer(7, after, 0, b"new")
        self.settle()
        self.assertEqual(self.kernel.stores, [(7, 0, b"new")])

    def test_bytes_read_before_or_during_a_change_are_not_stored(self) -> None:
        before = self.pages.generation(7)
        with self.pages.changing(7):
            during = self.pages.generation(7)
        other = self.pages.generation(8)
        assert before is not None and during is not None and other is not None
        self.pages.offer(7, before, 0, b"before")
        self.pages.offer(7, during, 0, b"during")
        self.pages.offer(8, other, 0, b"other inode")
        self.settle()
        self.assertEqual(self.kernel.stores, [(8, 0, b"other inode")])

    def test_a_change_elsewhere_and_a_change_of_all(self) -> None:
        seven, eight = self.pages.generation(7), self.pages.generation(8)
        assert seven is not None and eight is not None
        self.pages.changed(7)
        self.pages.offer(7, seven, 0, b"seven")
        self.pages.offer(8, eight, 0, b"eight")
        self.settle()
        self.assertEqual(self.kernel.stores, [(8, 0, b"eight")])
        eight = self.pages.generation(8)
        assert eight is not None
        self.pages.changed_all()
        self.pages.offer(8, eight, 0, b"eight again")
        self.settle()
        self.assertEqual(self.kernel.stores, [(8, 0, b"eight")])

    def test_changes_wait_for_a_store_under_way(self) -> None:
        """
        A store lands whole before a change of its inode goes on (the change's invalidation follows it).

        Changes of other inodes, a create with ``O_TRUNC`` and a writer's
        close do not wait: none can need it, and a store may wait long.
        """
        self.kernel.hold = threading.Event()
        generation = self.pages.generation(7)
        assert generation is not None
        self.pages.offer(7, generation, 0, b"landing")
        self.assertTrue(self.kernel.entered.wait(10))
        self.pages.changed(8)
        self.pages.creating()
        self.pages.writer_closed(9)
        waiting = []
        for change in (lambda: self.pages.changed(7), lambda: self.pages.writer_opened(7), self.pages.changed_all):
            started, done = threading.Event(), threading.Event()
            thread = threading.Thread(target=lambda change=change, s=started, d=done: (s.set(), change(), d.set()))
            thread.start()
            self.assertTrue(started.wait(10))
            waiting.append((thread, done))
        time.sleep(0.1)
        self.assertEqual([done.is_set() for _, done in waiting], [False, False, False])
        self.kernel.hold.set()
        for thread, done in waiting:
            self.assertTrue(done.wait(10))
            thread.join(10)
        self.assertEqual(self.kernel.stores, [(7, 0, b"landing")])

    def test_bytes_read_before_a_create_that_empties_are_not_stored(self) -> None:
        seven, eight = self.pages.generation(7), self.pages.generation(8)
        assert seven is not None and eight is not None
        self.pages.creating()
        self.pages.offer(7, seven, 0, b"seven")
        self.pages.offer(8, eight, 0, b"eight")
        after = self.pages.generation(8)
        assert after is not None
        self.pages.offer(8, after, 0, b"read after")
        self.settle()
        self.assertEqual(self.kernel.stores, [(8, 0, b"read after")])

    def test_a_full_record_of_changes_starts_again(self) -> None:
        """Past :data:`STAMPS_KEPT` inodes the record starts again, and nothing read before is stored."""
        self.patch(kernel_pages, "STAMPS_KEPT", 3)
        old = self.pages.generation(1)
        assert old is not None
        for inode in (2, 3, 4):
            self.pages.changed(inode)
        self.assertEqual(len(self.pages._changed_at), 3)
        self.pages.changed(5)  # a fourth inode: a fresh record
        self.assertEqual(list(self.pages._changed_at), [5])
        self.pages.offer(1, old, 0, b"read before")
        self.pages.offer(2, old, 0, b"read before, changed")
        new = self.pages.generation(2)
        assert new is not None
        self.pages.offer(2, new, 0, b"read after")
        self.settle()
        self.assertEqual(self.kernel.stores, [(2, 0, b"read after")])

    def test_stop_tells_whether_the_thread_ended(self) -> None:
        """A store waiting in the kernel keeps the thread: stop says so, and a later stop waits for it again."""
        self.kernel.hold = threading.Event()
        generation = self.pages.generation(7)
        assert generation is not None
        self.pages.offer(7, generation, 0, b"stuck")
        self.assertTrue(self.kernel.entered.wait(10))
        self.assertFalse(self.pages.stop(timeout=0.05))
        self.kernel.hold.set()
        self.assertTrue(self.pages.stop(timeout=10))
        self.assertTrue(self.pages.stop())

    def test_a_full_queue_drops_offers(self) -> None:
        self.kernel.hold = threading.Event()
        generation = self.pages.generation(7)
        assert generation is not None
        self.pages.offer(7, generation, 0, b"first")
        self.assertTrue(self.kernel.entered.wait(10))
        for number in range(kernel_pages.QUEUE_LIMIT + 10):
            self.pages.offer(7, generation, 4096 * (number + 1), b"more")
        self.assertEqual(self.pages._queue.qsize(), kernel_pages.QUEUE_LIMIT)
        self.kernel.hold.set()
        self.settle()
        self.assertEqual(len(self.kernel.stores), 1 + kernel_pages.QUEUE_LIMIT)

    def test_empty_offers_are_not_queued(self) -> None:
        generation = self.pages.generation(7)
        assert generation is not None
        self.pages.offer(7, generation, 0, memoryview(b""))
        self.assertTrue(self.pages._queue.empty())

    def test_a_failed_store_is_dropped(self) -> None:
        self.kernel.error = OSError(errno.ENOENT, "the kernel holds no such inode")
        generation = self.pages.generation(7)
        assert generation is not None
        self.pages.offer(7, generation, 0, b"x")
        self.settle()
        self.assertEqual((self.kernel.stores, self.pages.stored), ([], 0))
        self.kernel.error = None
        self.pages.offer(7, generation, 0, b"y")
        self.settle()
        self.assertEqual(self.kernel.stores, [(7, 0, b"y")])

    def test_nothing_is_offered_before_start_or_after_stop(self) -> None:
        stopped = PageStore(self.kernel.store)
        self.assertIsNone(stopped.generation(7))
        self.pages.stop()
        self.assertIsNone(self.pages.generation(7))
