"""
The rest of a decrypted block handed to the kernel's page cache after a small read.

Chunks are sealed in blocks of :data:`~lucidlink.crypto.BLOCK_SIZE` (64 KiB):
a 4 KiB read opens a whole block, and the kernel, which asked for one page,
would ask again for each of the other fifteen.  After answering a small read
the mount offers the rest of the block to :class:`PageStore`, whose thread
stores it with ``llfuse.notify_store``; the next reads of those pages never
leave the kernel.

What is stored must be what a read would give when the store lands, so a
store is made only while nothing here can change the file's pages:

- no writable handle of the inode is open on this mount (a write changes
  pages in the kernel, and a store of older bytes landing after it would
  undo it);
- no change was noted since the bytes were read: another client's change (the
  kernel's pages are dropped), a truncate or any other ``setattr``, an open
  that found a newer version.

The check and the store are made under the inode's lock, which a new writer
and each change take first; so a store either lands before them (and their
own invalidation or write follows it) or is not made.  The kernel holds the
pages of a read until it is answered, so stores are made in a thread of
their own, never in a request's: a store of a page a read holds waits for
that read's answer.  A store that cannot be made is dropped: the kernel asks
for those pages when it needs them.
"""

from __future__ import annotations

import errno
import logging
import queue
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from lucidlink.fuse_threads import DeafThread, queued_items

log = logging.getLogger(__name__)

QUEUE_LIMIT = 256
"""Stores waiting at most (64 KiB each at most): more are dropped, not waited for."""

_LOCK_STRIPES = 64
_GONE = {errno.ENOENT, errno.EBADF, errno.ENOTCONN, errno.ENODEV}


class PageStore:
    """
    Stores offered bytes of an inode in the kernel's page cache, in a thread of its own, while still true.

    ``store(inode, offset, data)`` is ``llfuse.notify_store`` when mounted.
    Called from llfuse's threads: :meth:`generation` and :meth:`offer` by
    reads, :meth:`writer_opened` and :meth:`writer_closed` by opens and
    releases, :meth:`changing` by anything that changes a file's pages
    otherwise.  Those that take an inode's lock must not hold llfuse's
    lock meanwhile (a store may wait for a read, which needs it).
    """

    def __init__(self, store: Callable[[int, int, Any], None]) -> None:
        self._store = store
        self._queue: queue.Queue[Any] = queue.Queue(QUEUE_LIMIT)
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._writers: Counter[int] = Counter()
        self._changes: Counter[int] = Counter()
        self._epoch = 0
        self._thread: DeafThread | None = None
        self.stored = 0
        """Stores made (for tests and figures)."""

    def start(self) -> None:
        """Start storing (only while mounted)."""
        self._thread = DeafThread(target=self._run, name="lucid-page-store", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop; what is still queued is dropped.  Call before llfuse's session closes."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put(None)
        thread.join(timeout)

    def _lock(self, inode: int) -> threading.Lock:
        return self._locks[inode % _LOCK_STRIPES]

    def generation(self, inode: int) -> tuple[int, int] | None:
        """What a read notes before it reads, for :meth:`offer`; None when a writer has the inode open."""
        if self._writers[inode] or self._thread is None:
            return None
        return self._epoch, self._changes[inode]

    def offer(self, inode: int, generation: tuple[int, int], offset: int, data: Any) -> None:
        """Queue ``data`` (bytes a read got, at ``offset``) to be stored, unless the queue is full."""
        if not len(data):
            return
        try:
            self._queue.put_nowait((inode, generation, offset, data))
        except queue.Full:
            pass

    @contextmanager
    def changing(self, inode: int) -> Iterator[None]:
        """
        Around a change of the inode made here otherwise than by a write (a truncate, say).

        Bytes read before it ends are not stored: a read may begin before
        the change and read after it began.
        """
        self.changed(inode)
        try:
            yield
        finally:
            self.changed(inode)

    def changed(self, inode: int) -> None:
        """The inode changed (elsewhere: call before its pages are dropped): bytes read before are not stored."""
        with self._lock(inode):
            self._changes[inode] += 1

    def changed_all(self) -> None:
        """Every inode may have changed (notifications were missed)."""
        for lock in self._locks:
            lock.acquire()
        try:
            self._epoch += 1
        finally:
            for lock in self._locks:
                lock.release()

    def writer_opened(self, inode: int) -> None:
        """A writable handle of the inode is opening: no store from now until it is closed."""
        with self._lock(inode):
            self._writers[inode] += 1
            self._changes[inode] += 1

    def writer_closed(self, inode: int) -> None:
        """A writable handle of the inode was released."""
        with self._lock(inode):
            self._writers[inode] -= 1
            if self._writers[inode] <= 0:
                del self._writers[inode]
            self._changes[inode] += 1

    def forget(self, inode: int) -> None:
        """The kernel holds nothing of the inode any more."""
        with self._lock(inode):
            self._changes.pop(inode, None)

    def settle(self, timeout: float = 10.0) -> bool:
        """Wait until what was offered so far is stored or dropped (at once when not running)."""
        if self._thread is None:
            return True
        done = threading.Event()
        try:
            self._queue.put(done, timeout=timeout)
        except queue.Full:
            return False
        return done.wait(timeout)

    def _run(self) -> None:
        for inode, generation, offset, data in queued_items(self._queue):
            with self._lock(inode):
                if self._writers[inode] or generation != (self._epoch, self._changes[inode]):
                    continue
                try:
                    self._store(inode, offset, data)
                except OSError as error:
                    if error.errno not in _GONE:
                        log.debug("could not store pages of inode %d in the kernel: %s", inode, error)
                    continue
                self.stored += 1
