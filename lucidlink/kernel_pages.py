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
- nothing changed the inode since the bytes were read: another client's
  change (the kernel's pages are dropped), a truncate or any other
  ``setattr``, an open for writing or with ``O_TRUNC``, a create with
  ``O_TRUNC`` (of any name: it may turn out to be an existing file), a
  reconnect.

Each change takes a stamp from one counter, and a read notes the counter
before it reads: a store is made only if no stamp of its inode, and no
stamp of every inode, is newer than its read (the counts are read and
changed under one small lock, never held while storing).  The check and
the store are made under the inode's lock (one of 64, each shared by a
stripe of inodes); an open for writing, a ``setattr`` and another
client's change take that lock as they stamp, so a store under way lands
before them (and their write, truncate or invalidation follows it).

The kernel holds the pages of a read until it is answered, so stores are
made in a thread of their own, never in a request's: a store of a page
that a read holds waits for that read's answer.  A store that cannot be
made is dropped: the kernel asks for those pages when it needs them.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
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

STAMPS_KEPT = 100_000
"""Inodes whose last change is remembered; past that the record starts again (older reads are not stored)."""

_LOCK_STRIPES = 64
_GONE = {errno.ENOENT, errno.EBADF, errno.ENOTCONN, errno.ENODEV, errno.ECONNABORTED}


class PageStore:
    """
    Stores offered bytes of an inode in the kernel's page cache, in a thread of its own, while still true.

    ``store(inode, offset, data)`` is ``llfuse.notify_store`` when mounted.
    Called from llfuse's threads: :meth:`generation` and :meth:`offer` by
    reads, :meth:`writer_opened` and :meth:`writer_closed` by opens and
    releases, :meth:`changing` and :meth:`creating` around other changes.
    Those that take an inode's lock (:meth:`writer_opened`,
    :meth:`changing`, :meth:`changed`, :meth:`changed_all`) must not hold
    llfuse's lock meanwhile: a store may wait for a read, which needs it.
    """

    def __init__(self, store: Callable[[int, int, Any], None]) -> None:
        self._store = store
        self._queue: queue.Queue[Any] = queue.Queue(QUEUE_LIMIT)
        self._locks = [threading.Lock() for _ in range(_LOCK_STRIPES)]
        self._counting = threading.Lock()
        """Guards the counts below; never held while storing."""
        self._stamps = itertools.count(1)
        self._now = 0
        """The last stamp taken."""
        self._changed_at: dict[int, int] = {}
        self._all_changed_at = 0
        """The stamp of the last change of every inode (a reconnect, a create with ``O_TRUNC``, a fresh record)."""
        self._writers: Counter[int] = Counter()
        self._thread: DeafThread | None = None
        self._ending: DeafThread | None = None
        self.stored = 0
        """Stores made (for tests and figures)."""

    def start(self) -> None:
        """Start storing (only while mounted)."""
        self._thread = DeafThread(target=self._run, name="lucid-page-store", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> bool:
        """
        Stop; what is still queued is dropped.  Call before llfuse's session closes.

        False if the thread did not end within ``timeout``: it waits in the
        kernel for a page that a read no worker will answer now holds.
        """
        thread, self._thread = self._thread, None
        if thread is None:
            thread, self._ending = self._ending, None
            if thread is None:
                return True
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        with contextlib.suppress(queue.Full):
            self._queue.put(None, timeout=timeout)
        thread.join(timeout)
        if thread.is_alive():
            self._ending = thread  # the next stop waits for it again
            return False
        return True

    @property
    def alive(self) -> bool:
        """Whether the thread runs (or has not ended after :meth:`stop`)."""
        thread = self._thread or self._ending
        return thread is not None and thread.is_alive()

    def _lock(self, inode: int) -> threading.Lock:
        return self._locks[inode % _LOCK_STRIPES]

    def generation(self, inode: int) -> int | None:
        """What a read notes before it reads, for :meth:`offer`; None when a writer has the inode open."""
        with self._counting:
            if self._writers[inode] or self._thread is None:
                return None
            return self._now

    def offer(self, inode: int, generation: int, offset: int, data: Any) -> None:
        """Queue ``data`` (bytes a read got, at ``offset``) to be stored, unless the queue is full."""
        if not len(data):
            return
        try:
            self._queue.put_nowait((inode, generation, offset, data))
        except queue.Full:
            pass

    def _note_all(self) -> None:
        with self._counting:
            self._now = self._all_changed_at = next(self._stamps)

    def _note(self, inode: int) -> None:
        with self._counting:
            self._note_counted(inode)

    def _note_counted(self, inode: int) -> None:
        self._now = next(self._stamps)
        if len(self._changed_at) >= STAMPS_KEPT and inode not in self._changed_at:
            self._all_changed_at = self._now  # everything older than this stamp is not stored
            self._changed_at.clear()
        self._changed_at[inode] = self._now

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
            self._note(inode)

    def creating(self) -> None:
        """
        A create with ``O_TRUNC`` is about to be made: bytes read before it, of any inode, are not stored.

        The name may turn out to be an existing file, which the create
        empties; its :meth:`writer_opened` follows, before the kernel hears
        of the create, and waits for a store of that file under way (the
        kernel drops what lies past the size the create answers).  No lock
        is taken here.
        """
        self._note_all()

    def changed_all(self) -> None:
        """Every inode may have changed (notifications were missed): stamped, then each store under way ends."""
        self._note_all()
        for lock in self._locks:  # one at a time: a stuck store holds up only its own stripe's changes
            with lock:
                pass

    def writer_opened(self, inode: int) -> None:
        """A writable handle of the inode is opening: no store from now until it is closed."""
        with self._lock(inode), self._counting:
            self._writers[inode] += 1
            self._note_counted(inode)

    def writer_closed(self, inode: int) -> None:
        """A writable handle of the inode was released (no store of the inode can be under way: no lock)."""
        with self._counting:
            self._note_counted(inode)
            self._writers[inode] -= 1
            if self._writers[inode] <= 0:
                del self._writers[inode]

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

    def _still_true(self, inode: int, generation: int) -> bool:
        with self._counting:
            return not self._writers[inode] and generation >= max(self._changed_at.get(inode, 0), self._all_changed_at)

    def _run(self) -> None:
        for inode, generation, offset, data in queued_items(self._queue):
            with self._lock(inode):
                if self._thread is None or not self._still_true(inode, generation):
                    continue
                try:
                    self._store(inode, offset, data)
                except OSError as error:
                    if error.errno not in _GONE:
                        log.debug("could not store pages of inode %d in the kernel: %s", inode, error)
                    continue
                self.stored += 1
