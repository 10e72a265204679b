"""
The llfuse adapter: a filespace's :class:`~lucidlink.client.interface.IFilespaceInodes` as a mount.

It translates and nothing more.  llfuse calls :class:`FilespaceOperations`
on its worker threads, holding llfuse's global lock; the Twisted reactor runs
in a helper thread of its own (:class:`ReactorThread`, started with
``installSignalHandlers=False``).  Every call into the filesystem core
crosses over in one place, :meth:`Bridge.call`: it releases the llfuse lock,
runs the core call on the reactor with ``blockingCallFromThread``, waits,
takes the lock back, and turns a :class:`~lucidlink.errors.LucidError` into
``llfuse.FUSEError`` with the errno its ``errno_name`` names.  The errno
table (:data:`ERRNO`) lives here and nowhere else.  The exceptions are
what the core can answer at once from what it has cached, in llfuse's
thread (:meth:`Bridge.here`): a read (``FileHandle.read_cached``), a lookup,
attributes or a missing extended attribute (``Inodes.lookup_cached``,
``getattr_cached``, ``getxattr_cached``), and a flush with nothing to store;
and the release of a handle with nothing to store, left to the reactor
without waiting (:meth:`Bridge.post`).

What another client changes reaches the kernel through :class:`KernelCaches`
(its caches of attributes, entries and pages are dropped, from a thread that
never holds the llfuse lock); descriptors of one file on this mount see each
other's writes at once (the core's handles of one file share its buffered
data); ``flock`` and
``fcntl`` locks go to the metadata server through
:mod:`lucidlink.fuse_locks`, which adds the lock operations llfuse lacks
(and tells ``write`` when the kernel writes back pages of a shared mapping).

:func:`serve` mounts and tears down in order (an ``ExitStack``): once
llfuse's loop ends (unmount or signal), open handles are closed (their
buffered writes stored and the chunk maps committed) before the filesystem
is unmounted; :mod:`lucidlink.cli.mount` then closes the session and stops
the reactor.
"""

from __future__ import annotations

import atexit
import contextlib
import cProfile
import dataclasses
import errno
import itertools
import logging
import os
import pstats
import queue
import stat
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import llfuse
from twisted.internet import defer
from twisted.internet.threads import blockingCallFromThread
from twisted.python.failure import Failure

from lucidlink import fuse_locks
from lucidlink.crypto import BLOCK_SIZE
from lucidlink.errors import LucidError
from lucidlink.fuse_device import device_descriptor, refuse_pending
from lucidlink.fuse_threads import (
    DeafThread,
    llfuse_starting_deaf_threads,
    queued_items,
    stop_signals_held,
    waking_stuck_workers,
)
from lucidlink.kernel_pages import PageStore
from lucidlink.protocol.messages import Attributes, FileKind, LockKind, LockType

log = logging.getLogger(__name__)

ATTRIBUTE_TIMEOUT = 1.0
"""Seconds the kernel may keep attributes and directory entries before asking again."""

ERRNO: dict[str, int] = {
    name: getattr(errno, name)
    for name in (
        "EPROTO", "EPROTONOSUPPORT", "EAGAIN", "ETIMEDOUT", "ENOTCONN", "ENOENT", "EEXIST", "ENOTEMPTY",
        "ENOTDIR", "EISDIR", "EACCES", "EPERM", "EINVAL", "ENAMETOOLONG", "ENOSPC", "ESTALE", "EIO", "ENODEV",
        "ENODATA", "EXDEV", "ELOOP", "ERANGE", "EFBIG", "EROFS", "EOPNOTSUPP", "EDEADLK", "EBADF",
    )
}
"""``LucidError.errno_name`` to errno: the only errno table of lucidlink."""

_KIND_BITS = {FileKind.FILE: stat.S_IFREG, FileKind.DIRECTORY: stat.S_IFDIR, FileKind.SYMLINK: stat.S_IFLNK}


PROFILE_VARIABLE = "LUCID_PROFILE"
"""Set to a file name, the mount profiles its threads (cProfile) and writes the merged figures there at exit."""


class ThreadProfiles:
    """
    cProfile in every thread of the mount: those started with ``threading`` and llfuse's own.

    ``cProfile`` sees one thread at a time; :meth:`install` starts a profile
    in each thread started later (the reactor's, its thread pool's), and
    :meth:`enter` in the calling thread if it has none yet (llfuse's workers,
    which ``threading`` never starts).  At exit the profiles are merged into
    one ``pstats`` file (``python -m pstats FILE``).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._profiles: list[cProfile.Profile] = []
        self._local = threading.local()

    def install(self) -> None:
        threading.setprofile(self._started)
        atexit.register(self.dump)

    def _started(self, frame: Any, event: str, argument: Any) -> None:
        self.enter()

    def enter(self) -> None:
        """Profile the calling thread from now on (once)."""
        if not getattr(self._local, "profile", None):
            profile = self._local.profile = cProfile.Profile()
            self._profiles.append(profile)
            profile.enable()

    def dump(self) -> None:
        for profile in self._profiles:
            profile.disable()
        if self._profiles:
            pstats.Stats(*self._profiles).dump_stats(self.path)


PROFILES: ThreadProfiles | None = (
    ThreadProfiles(os.environ[PROFILE_VARIABLE]) if os.environ.get(PROFILE_VARIABLE) else None
)


def errno_of(error: LucidError) -> int:
    """The errno a :class:`LucidError` stands for (EIO for a name the table lacks)."""
    return ERRNO.get(error.errno_name, errno.EIO)


class ReactorThread:
    """The Twisted reactor, run in a daemon helper thread without signal handlers."""

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self._thread = DeafThread(
            target=reactor.run, kwargs={"installSignalHandlers": False}, name="lucid-reactor", daemon=True
        )

    def start(self) -> None:
        """Start the thread."""
        if PROFILES is not None:
            PROFILES.install()
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the reactor (its shutdown triggers run) and wait for the thread."""
        if self._thread.is_alive():
            self.reactor.callFromThread(self.reactor.stop)
            self._thread.join(timeout)


ANSWERS = frozenset({
    "ENOENT", "EEXIST", "ENOTEMPTY", "ENOTDIR", "EISDIR", "EACCES", "EPERM", "EINVAL", "ENAMETOOLONG", "EAGAIN",
    "ENODATA", "EXDEV", "ELOOP", "ERANGE", "EFBIG", "EOPNOTSUPP", "EDEADLK", "EBADF",
})
"""Errno names a filesystem answers every day (a missing name, a refused permission): not logged as failures."""

FAILURE_LOG_INTERVAL = 10.0
"""Seconds between two log lines of one kind of failure (the servers away fail every call meanwhile)."""

_monotonic = time.monotonic


class _FailureLog:
    """Failures the program sees as EIO, ENOSPC, EROFS...: logged with what failed, one line a while per kind."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, str], tuple[float, int]] = {}
        self._lock = threading.Lock()

    def failed(self, name: str, error: LucidError) -> None:
        key = (name, type(error).__name__)
        now = _monotonic()
        with self._lock:
            last, quiet = self._last.get(key, (None, 0))
            if last is not None and now - last < FAILURE_LOG_INTERVAL:
                self._last[key] = (last, quiet + 1)
                return
            self._last[key] = (now, 0)
        more = f" ({quiet} more like it since)" if quiet else ""
        log.warning("%s failed (%s): %s%s", name, errno.errorcode.get(errno_of(error), "EIO"), error, more)


_FAILURES = _FailureLog()


@contextlib.contextmanager
def fuse_errors(function: Callable[..., Any]) -> Iterator[None]:
    """
    Errors of ``function`` (called inside) as ``FUSEError``: a LucidError's errno, anything unexpected EIO.

    Failures other than the everyday :data:`ANSWERS` are logged too: the program sees only an errno.
    """
    try:
        yield
    except LucidError as error:
        name = getattr(function, "__name__", str(function))
        if error.errno_name in ANSWERS:
            log.debug("%s: %s", name, error)
        else:
            _FAILURES.failed(name, error)
        raise llfuse.FUSEError(errno_of(error)) from None
    except llfuse.FUSEError:
        raise
    except Exception:
        log.exception("unexpected failure of %s", getattr(function, "__name__", function))
        raise llfuse.FUSEError(errno.EIO) from None


class Bridge:
    """
    The one crossing from llfuse's threads to the reactor.

    ``call(function, *arguments)`` runs ``function`` (which returns a
    Deferred or a value) on the reactor and blocks the calling thread until
    it fires, with the llfuse lock released meanwhile so that other requests
    proceed.  ``locked``: whether callers hold the llfuse lock (true while
    llfuse runs; :func:`mount` also calls before and after).
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor
        self.locked = False

    def released(self) -> contextlib.AbstractContextManager[Any]:
        """A context in which the llfuse lock is released (if callers hold it)."""
        return llfuse.lock_released if self.locked else contextlib.nullcontext()

    def call(self, function: Callable[..., Any], *arguments: Any, **keywords: Any) -> Any:
        if PROFILES is not None:
            PROFILES.enter()
        with self.released():
            return self.translated(function, *arguments, **keywords)

    def translated(self, function: Callable[..., Any], *arguments: Any, **keywords: Any) -> Any:
        """Run ``function`` on the reactor and wait, errors as ``FUSEError`` (the llfuse lock is not touched)."""
        with fuse_errors(function):
            return self.wait(function, *arguments, **keywords)

    def wait(self, function: Callable[..., Any], *arguments: Any, **keywords: Any) -> Any:
        """Run ``function`` on the reactor; its result, or its error raised here."""
        return blockingCallFromThread(self.reactor, defer.maybeDeferred, function, *arguments, **keywords)

    def here(self, function: Callable[..., Any], *arguments: Any) -> Any:
        """Call ``function`` (a core method that answers from what it has cached) in this thread, errors as ``FUSEError``."""
        with fuse_errors(function):
            return function(*arguments)

    def post(self, function: Callable[..., Any], *arguments: Any) -> None:
        """Run ``function`` on the reactor without waiting (in order with every other crossing)."""
        self.reactor.callFromThread(function, *arguments)


class KernelCaches:
    """
    Drops what the kernel caches of an inode (attributes, entries, pages) once it changed elsewhere.

    :meth:`changed` (an :meth:`~lucidlink.client.filespace.Inodes.on_change`
    listener, so called on the reactor) only queues; a thread of its own calls
    ``llfuse.invalidate_*``, never holding llfuse's lock: the kernel may make
    an invalidation wait for pages that a read being served holds, and that
    read needs the lock.  ``known()`` lists the inodes the kernel holds, all
    of which a reconnect (notifications missed) drops.
    """

    def __init__(self, known: Callable[[], Iterable[int]], pages: PageStore | None = None) -> None:
        self._known = known
        self._pages = pages
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: DeafThread | None = None
        self._queued = 0
        self._carried_out = 0
        self._counting = threading.Lock()
        self._stopping = False

    def start(self) -> None:
        """Start carrying out invalidations (only while mounted)."""
        self._thread = DeafThread(target=self._run, name="lucid-invalidate", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """
        Stop; invalidations still queued are dropped (those waiting in :meth:`settle` let go).

        It is called once llfuse's loop has ended: the mount is going, and
        llfuse no longer passes invalidations to the kernel (past its queue's
        1,000, each would wait for good).
        """
        if self._thread is not None:
            self._stopping = True
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def changed(self, inode: int, parent: int = 0, name: bytes | None = None) -> None:
        """Queue the invalidation a change calls for (see ``Inodes.on_change``)."""
        self._put((inode, parent, name))

    def drop_pages(self, inode: int) -> None:
        """Queue dropping ``inode``'s attributes and pages."""
        self._put((inode, 0, None))

    def _put(self, item: tuple[int, int, bytes | None]) -> None:
        with self._counting:
            self._queued += 1
            self._queue.put(item)

    def settle(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is carried out (at once when not running or nothing is left)."""
        if self._thread is None or self._carried_out == self._queued:
            return True
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def _run(self) -> None:
        for inode, parent, name in queued_items(self._queue):
            if self._stopping:
                continue
            if self._pages is not None:  # here, not on the reactor: a store may wait for a read that needs it
                if inode:
                    self._pages.changed(inode)
                elif name is None:
                    self._pages.changed_all()
            if name is not None:
                _quietly(llfuse.invalidate_entry, parent, name)
                _quietly(llfuse.invalidate_inode, parent, True)
            elif inode:
                _quietly(llfuse.invalidate_inode, inode)
            else:
                for known in list(self._known()):
                    _quietly(llfuse.invalidate_inode, known)
            self._carried_out += 1


def _quietly(invalidate: Callable[..., None], *arguments: Any) -> None:
    """Invalidate, ignoring what the kernel does not hold (ENOENT) and a mount going away."""
    try:
        invalidate(*arguments)
    except OSError as error:
        if error.errno not in (errno.ENOENT, errno.EBADF, errno.ENOTCONN, errno.ENODEV):
            log.warning("could not invalidate the kernel's cache: %s", os.strerror(error.errno or errno.EIO))


@dataclass
class _Directory:
    """An open directory: its entries as read by ``opendir``, ``.`` and ``..`` first, and its attributes."""

    entries: list[tuple[bytes, Attributes]]
    attributes: Attributes


class FilespaceOperations(llfuse.Operations):
    """
    llfuse requests translated into :class:`IFilespaceInodes` calls through a :class:`Bridge`.

    Open files and directories are numbered here; the core's
    :class:`~lucidlink.client.filespace.FileHandle` does the work.
    """

    def __init__(self, inodes: Any, bridge: Bridge) -> None:
        super().__init__()
        if inodes.root_inode != llfuse.ROOT_INODE:
            raise LucidError(f"the filespace's root is inode {inodes.root_inode}, FUSE's is {llfuse.ROOT_INODE}")
        self.inodes = inodes
        self.bridge = bridge
        self._numbers = itertools.count(1)
        self._files: dict[int, Any] = {}
        self._directories: dict[int, _Directory] = {}
        self._lookups: Counter[int] = Counter()
        """The kernel's lookup count of each inode it holds."""
        self._cached_version: dict[int, int] = {}
        """The chunk map version whose content the kernel's page cache of an inode may hold."""
        self.pages = PageStore(llfuse.notify_store)
        self.kernel = KernelCaches(lambda: list(self._lookups), self.pages)
        self._closing: set[defer.Deferred[Any]] = set()
        """Closes of clean handles under way on the reactor (only touched there): not waited for by ``release``."""

    # -- translation -------------------------------------------------------------

    def _call(self, name: str, *arguments: Any, **keywords: Any) -> Any:
        return self.bridge.call(getattr(self.inodes, name), *arguments, **keywords)

    def _looked_up(self, attributes: Attributes) -> llfuse.EntryAttributes:
        """An entry the kernel will hold (and ``forget``) by its inode number."""
        entry = self._entry(attributes)
        self._lookups[attributes.inode] += 1
        return entry

    def _entry(self, attributes: Attributes) -> llfuse.EntryAttributes:
        entry = llfuse.EntryAttributes()
        entry.st_ino = attributes.inode
        entry.generation = 0
        entry.entry_timeout = ATTRIBUTE_TIMEOUT
        entry.attr_timeout = ATTRIBUTE_TIMEOUT
        entry.st_mode = _KIND_BITS[attributes.kind] | stat.S_IMODE(attributes.mode)
        entry.st_nlink = attributes.nlink
        entry.st_uid = attributes.uid
        entry.st_gid = attributes.gid
        entry.st_rdev = 0
        entry.st_size = attributes.size
        entry.st_blksize = self.inodes.chunk_size
        entry.st_blocks = -(-entry.st_size // 512)
        entry.st_atime_ns = attributes.atime_ns
        entry.st_mtime_ns = attributes.mtime_ns
        entry.st_ctime_ns = attributes.ctime_ns
        return entry

    def _file(self, fh: int) -> Any:
        try:
            return self._files[fh]
        except KeyError:
            raise llfuse.FUSEError(errno.EBADF) from None

    def _keep(self, handle: Any) -> int:
        number = next(self._numbers)
        self._files[number] = handle
        return number

    # -- the tree ----------------------------------------------------------------

    def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> llfuse.EntryAttributes:
        if name == b".":
            return self._looked_up(self._call("getattr", parent_inode))
        if name == b"..":
            raise llfuse.FUSEError(errno.ENOENT)  # the kernel resolves ".." itself
        known = self.bridge.here(self.inodes.lookup_cached, parent_inode, name)
        return self._looked_up(known if known is not None else self._call("lookup", parent_inode, name))

    def getattr(self, inode: int, ctx: Any = None) -> llfuse.EntryAttributes:
        known = self.bridge.here(self.inodes.getattr_cached, inode)
        if known is not None:
            return self._entry(known)
        try:
            return self._entry(self._call("getattr", inode))
        except llfuse.FUSEError as error:
            # The server keeps no removed directory for its open descriptors; a local filesystem
            # shows it with no links.
            held = [d.attributes for d in self._directories.values() if d.attributes.inode == inode]
            if error.errno != errno.ENOENT or not held:
                raise
            return self._entry(dataclasses.replace(held[-1], nlink=0))

    def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> llfuse.EntryAttributes:
        changes: dict[str, Any] = {}
        if fields.update_mode:
            changes["mode"] = stat.S_IMODE(attr.st_mode)
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        if fields.update_size:
            changes["size"] = attr.st_size
        if fields.update_atime:
            changes["atime_ns"] = attr.st_atime_ns
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
        with self.bridge.released(), self.pages.changing(inode):
            attributes = self.bridge.translated(self.inodes.setattr, inode, **changes)
        for directory in self._directories.values():
            if directory.attributes.inode == inode:
                directory.attributes = attributes
        return self._entry(attributes)

    def opendir(self, inode: int, ctx: Any) -> int:
        here = self._call("getattr", inode)
        if here.kind != FileKind.DIRECTORY:
            raise llfuse.FUSEError(errno.ENOTDIR)
        entries = self._call("readdir", inode)
        number = next(self._numbers)
        self._directories[number] = _Directory([(b".", here), (b"..", here), *entries], here)
        return number

    def readdir(self, fh: int, off: int) -> Iterator[tuple[bytes, llfuse.EntryAttributes, int]]:
        directory = self._directories.get(fh)
        if directory is None:
            raise llfuse.FUSEError(errno.EBADF)
        for position in range(off, len(directory.entries)):
            name, attributes = directory.entries[position]
            yield name, self._entry(attributes), position + 1

    def releasedir(self, fh: int) -> None:
        self._directories.pop(fh, None)

    def fsyncdir(self, fh: int, datasync: bool) -> None:
        """Wait for the changes this mount made without waiting (under directory leases) to be stored."""
        self.bridge.call(self.inodes.sync_changes)

    def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> llfuse.EntryAttributes:
        return self._looked_up(self._call("mkdir", parent_inode, name, stat.S_IMODE(mode), ctx.uid, ctx.gid))

    def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._call("rmdir", parent_inode, name)

    def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._call("unlink", parent_inode, name)

    def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int, name_new: bytes,
               ctx: Any) -> None:
        self._call("rename", parent_inode_old, name_old, parent_inode_new, name_new, 0)

    def link(self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any) -> llfuse.EntryAttributes:
        return self._looked_up(self._call("link", inode, new_parent_inode, new_name))

    def symlink(self, parent_inode: int, name: bytes, target: bytes, ctx: Any) -> llfuse.EntryAttributes:
        return self._looked_up(self._call("symlink", parent_inode, name, target, ctx.uid, ctx.gid))

    def readlink(self, inode: int, ctx: Any) -> bytes:
        return self._call("readlink", inode)  # type: ignore[no-any-return]

    def forget(self, inode_list: Any) -> None:
        for inode, count in inode_list:
            left = self._lookups[inode] - count
            if left > 0:
                self._lookups[inode] = left
            else:
                del self._lookups[inode]
                self._cached_version.pop(inode, None)

    def statfs(self, ctx: Any) -> llfuse.StatvfsData:
        totals = self._call("statfs")
        data = llfuse.StatvfsData()
        block = totals.block_size or 4096
        data.f_bsize = block
        data.f_frsize = block
        data.f_blocks = totals.total_bytes // block
        data.f_bfree = max(0, totals.total_bytes - totals.used_bytes) // block
        data.f_bavail = data.f_bfree
        data.f_files = totals.total_inodes
        data.f_ffree = max(0, totals.total_inodes - totals.used_inodes)
        data.f_favail = data.f_ffree
        data.f_namemax = 255
        return data

    # -- files -------------------------------------------------------------------

    def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
               ctx: Any) -> tuple[int, llfuse.EntryAttributes]:
        if flags & os.O_TRUNC:  # the name may turn out to be an existing file (made meanwhile elsewhere)
            self.pages.creating()
        handle = self._call("create", parent_inode, name, stat.S_IMODE(mode), flags, ctx.uid, ctx.gid)
        number = self._keep(handle)
        if _changes_pages(flags):
            with self.bridge.released():
                self.pages.writer_opened(handle.inode)
        attributes = handle.opened
        if attributes.size or handle.size:  # an existing file, maybe emptied by O_TRUNC: ask again
            try:
                attributes = self._call("getattr", handle.inode)
            except llfuse.FUSEError:
                self.release(number)
                raise
        self._cached_version[handle.inode] = handle.version
        return number, self._looked_up(attributes)

    def open(self, inode: int, flags: int, ctx: Any) -> int:
        """Open; close-to-open: pages the kernel kept of another version of the file are dropped first."""
        writer = _changes_pages(flags)
        if writer:
            with self.bridge.released():
                self.pages.writer_opened(inode)
        try:
            handle = self._call("open", inode, flags)
        except BaseException:
            if writer:
                self.pages.writer_closed(inode)
            raise
        cached = self._cached_version.get(inode)
        if cached is not None and cached != handle.version:
            self.kernel.drop_pages(inode)
        self._cached_version[inode] = handle.version
        with self.bridge.released():
            self.kernel.settle()  # also carries out notifications that came before the open's answer
        return self._keep(handle)

    def read(self, fh: int, off: int, size: int) -> bytes:
        """Served here when the core has it cached (no crossing), else on the reactor."""
        if PROFILES is not None:
            PROFILES.enter()
        handle = self._file(fh)
        within_a_block = off % BLOCK_SIZE + size <= BLOCK_SIZE and size < BLOCK_SIZE
        generation = self.pages.generation(handle.inode) if within_a_block else None
        if generation is None:
            return self._read(handle, off, size)
        # The whole block is opened anyway: the kernel gets the rest of it too (see lucidlink.kernel_pages).
        start = off - off % BLOCK_SIZE
        block = self._read(handle, start, BLOCK_SIZE)
        view = memoryview(block)
        skip = off - start
        answer = bytes(view[skip : skip + size])
        self.pages.offer(handle.inode, generation, start, view[:skip])
        self.pages.offer(handle.inode, generation, off + len(answer), view[skip + len(answer) :])
        return answer

    def _read(self, handle: Any, off: int, size: int) -> bytes:
        cached = handle.read_cached(off, size)
        if cached is not None:
            return cached  # type: ignore[no-any-return]
        return self.bridge.call(handle.read, off, size)  # type: ignore[no-any-return]

    def write(self, fh: int, off: int, buf: bytes) -> int:
        """Made here when the core can make it at once (no crossing), else on the reactor."""
        if PROFILES is not None:
            PROFILES.enter()
        handle = self._file(fh)
        if fuse_locks.writing_back_pages():  # of a shared mapping: at ``off`` even through an O_APPEND handle
            return self.bridge.call(handle.write, off, buf, pages=True)  # type: ignore[no-any-return]
        written = self.bridge.here(handle.write_direct, off, buf)
        if written is not None:
            return written  # type: ignore[no-any-return]
        return self.bridge.call(handle.write, off, buf)  # type: ignore[no-any-return]

    def flush(self, fh: int) -> None:
        handle = self._file(fh)
        if not handle.clean:
            self.bridge.call(handle.flush)

    def fsync(self, fh: int, datasync: bool) -> None:
        self.bridge.call(self._file(fh).fsync)

    def release(self, fh: int) -> None:
        """Close the handle; one with nothing to store is closed on the reactor without waiting (nothing to tell)."""
        handle = self._files.pop(fh, None)
        if handle is None:
            return
        try:
            if handle.clean:
                self._note_version(handle)
                self.bridge.post(self._close_clean, handle)
                return
            try:
                self.bridge.call(handle.close)
            finally:
                self._note_version(handle)
        finally:
            if _changes_pages(handle.flags):
                self.pages.writer_closed(handle.inode)

    def _note_version(self, handle: Any) -> None:
        if handle.inode in self._cached_version:
            self._cached_version[handle.inode] = max(self._cached_version[handle.inode], handle.version)

    def _close_clean(self, handle: Any) -> None:
        """On the reactor: close a handle that has nothing to store, remembering it until it is closed."""
        closing = defer.maybeDeferred(handle.close)
        self._closing.add(closing)

        def closed(result: Any) -> None:
            self._closing.discard(closing)
            if isinstance(result, Failure):
                log.warning("closing a file of inode %s failed: %s", handle.inode, result.getErrorMessage())

        closing.addBoth(closed)

    def _closed(self) -> defer.Deferred[Any]:
        """On the reactor: fires once every close under way has ended."""
        return defer.DeferredList(list(self._closing))

    def close_all(self) -> None:
        """Close every open file (storing buffered writes): the filesystem goes away."""
        for number in list(self._files):
            try:
                self.release(number)
            except llfuse.FUSEError as error:
                log.error("buffered writes of an open file could not be committed (%s); they stay in the write-back"
                          " journal, which the next mount of the filespace commits", os.strerror(error.errno))
        with self.bridge.released():
            self.bridge.wait(self._closed)
        self._directories.clear()

    # -- locks (called by lucidlink.fuse_locks on llfuse's threads, without its lock) ---

    def lock(self, inode: int, owner: int, kind: LockKind, lock_type: LockType, start: int, end: int,
             wait: bool) -> None:
        """Take, change or release a lock of the kernel's lock owner ``owner``."""
        self.bridge.translated(self.inodes.lock, inode, owner, kind, lock_type, start, end, wait)

    def test_lock(self, inode: int, owner: int, kind: LockKind, lock_type: LockType, start: int,
                  end: int) -> tuple[LockType, int, int]:
        """The type and range of the first lock in the way of this one (type UNLOCK: none)."""
        state = self.bridge.translated(self.inodes.test_lock, inode, owner, kind, lock_type, start, end)
        return state.lock_type, state.start, state.end

    # -- extended attributes -----------------------------------------------------

    def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        """
        Answered here when the core knows the answer (the kernel asks before every write), else on the reactor.

        llfuse itself asks without a context, before a ``setxattr`` with
        ``XATTR_CREATE`` or ``XATTR_REPLACE`` (it checks those flags, and
        does not pass them on): any error but ``FUSEError`` there ends the mount.
        """
        cached = self.bridge.here(self.inodes.getxattr_cached, inode, name)
        if cached is not None:
            return cached  # type: ignore[no-any-return]
        return self._call("getxattr", inode, name)  # type: ignore[no-any-return]

    def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        self._call("setxattr", inode, name, value)

    def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        return self._call("listxattr", inode)  # type: ignore[no-any-return]

    def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        self._call("removexattr", inode, name)


def stop_storing_pages(pages: PageStore, device: int | None, timeout: float = 5.0) -> None:
    """
    Stop the page store once llfuse's loop has ended, whatever it waits for.

    A store can be waiting in the kernel for a page that a read holds; with
    the loop ended nobody answers that read, and the store (with the read,
    and this process's exit) would wait for good.  The requests left on the
    FUSE device (``device``) are then refused (:mod:`lucidlink.fuse_device`),
    which ends the read with an error and the store with it.
    """
    if pages.stop(timeout):
        return
    log.warning("storing pages in the kernel waits for a read nobody answers now; refusing the requests left")
    if device is not None:
        refuse_pending(device, lambda: not pages.alive, max(timeout, 10.0))
    if not pages.stop(timeout):
        log.error("the page store's thread did not end; the mount may not go away until the reads on it are killed")


def _changes_pages(flags: int) -> bool:
    """Whether an open with ``flags`` may change the file's pages (a writer, or a truncate)."""
    return flags & os.O_ACCMODE != os.O_RDONLY or bool(flags & os.O_TRUNC)


def mount_options(filespace: str) -> set[str]:
    """llfuse's options for a filespace's mount."""
    return {f"fsname=lucid:{filespace}", "subtype=lucid", "big_writes", "default_permissions"}


def serve(operations: FilespaceOperations, mountpoint: str, filespace: str,
          ready: Callable[[], None] = lambda: None) -> int | None:
    """
    Mount, serve until unmounted or signalled, close open files, unmount.

    Returns what ``llfuse.main`` does: None after an unmount, else the signal number.
    A stop signal that comes while mounting ends the loop as soon as it runs.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(stop_signals_held())
        llfuse.init(operations, mountpoint, mount_options(filespace))
        stack.callback(llfuse.close, unmount=True)
        device = device_descriptor()
        try:
            locks = fuse_locks.install(operations)
        except fuse_locks.NotInstalled as why:
            log.warning("flock and fcntl locks stay local to this mount, and pages of a shared mapping written "
                        "back through an O_APPEND descriptor are appended: %s", why)
        else:
            stack.callback(lambda: locks)  # the callbacks live until llfuse.close
        stack.callback(operations.close_all)
        operations.kernel.start()
        stack.callback(operations.kernel.stop)
        operations.pages.start()
        stack.callback(stop_storing_pages, operations.pages, device)
        unsubscribe = operations.bridge.wait(operations.inodes.on_change, operations.kernel.changed)
        stack.callback(operations.bridge.wait, unsubscribe)
        ready()
        stack.enter_context(llfuse_starting_deaf_threads())
        stack.enter_context(waking_stuck_workers())
        operations.bridge.locked = True
        try:
            return llfuse.main(workers=None, handle_signals=True)  # type: ignore[no-any-return]
        finally:
            operations.bridge.locked = False  # main has ended its workers; nobody holds the lock now
    return None

