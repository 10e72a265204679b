"""
``flock`` and ``fcntl`` locks for llfuse, which has no lock operations.

llfuse 1.x fills libfuse 2's ``struct fuse_lowlevel_ops`` without ``getlk``,
``setlk`` and ``flock``, so libfuse tells the kernel that the filesystem does
not lock, and each kernel keeps locks to itself: two mounts never contend.
:func:`install` adds the three operations after ``llfuse.init`` and before
``llfuse.main`` (the kernel learns what the filesystem does from the INIT
request that ``main`` answers).  It finds llfuse's session through the
module's symbol table, the session's copy of the operations table through
``fuse_session_data``, and writes ctypes callbacks into the empty slots.  It
also wraps ``flush`` (a close hands back the closing owner's byte-range locks),
``release`` (the last close of an open file hands back its ``flock``) and
``write_buf`` (llfuse's write): llfuse does not pass on
``fuse_file_info.writepage``, which marks the kernel writing back pages of a
shared mapping (stored at their offset even through an ``O_APPEND``
descriptor); :func:`writing_back_pages` tells it to the ``write`` operation
llfuse calls in the same thread.

Everything it relies on is checked first (the symbols, the table found by its
content, the three slots empty); when something does not look as expected it
installs nothing and says why, and locks stay local to the mount.  The
callbacks run on llfuse's worker threads without llfuse's lock, and call a
:class:`LockRequests` (the mount's), which raises ``llfuse.FUSEError``.  A
request that may wait asks again until granted rather than queueing on the
server, so that a signalled process or an unmount ends the wait.

Layouts are libfuse 2.9's on Linux x86_64 and aarch64 (LP64): ``struct
fuse_file_info``, ``struct flock`` and the order of ``fuse_lowlevel_ops``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

import llfuse

from lucidlink.protocol.messages import LockKind, LockType

log = logging.getLogger(__name__)

LOCK_END = 2**64 - 1
"""The last byte of "to the end of the file" (as ``lucidlink.meta.locks`` has it)."""

_SLOTS = {"flush": 17, "release": 18, "write_buf": 36, "getlk": 31, "setlk": 32, "flock": 39}
"""Positions in ``struct fuse_lowlevel_ops`` (libfuse 2.9): each a function pointer."""
_TABLE_SLOTS = 41
_PROBE = 8 * 8
"""Bytes of llfuse's table looked for in the session's copy (its first eight pointers)."""
FIRST_RETRY, LAST_RETRY = 0.01, 0.25
"""Seconds between the attempts of a lock request that waits (doubling from the first to the last)."""
_FLOCK_RELEASE = 1 << 4
"""``fuse_file_info.flock_release``: the fifth of the bit fields after ``writepage``."""


class FileInfo(ctypes.Structure):
    """``struct fuse_file_info`` of libfuse 2.9."""

    _fields_ = [
        ("flags", ctypes.c_int), ("fh_old", ctypes.c_ulong), ("writepage", ctypes.c_int),
        ("bits", ctypes.c_uint), ("fh", ctypes.c_uint64), ("lock_owner", ctypes.c_uint64),
    ]


class Flock(ctypes.Structure):
    """``struct flock`` of Linux LP64."""

    _fields_ = [
        ("l_type", ctypes.c_short), ("l_whence", ctypes.c_short), ("l_start", ctypes.c_int64),
        ("l_len", ctypes.c_int64), ("l_pid", ctypes.c_int),
    ]


_REQUEST = ctypes.c_void_p
_FILE_CALL = ctypes.CFUNCTYPE(None, _REQUEST, ctypes.c_uint64, ctypes.POINTER(FileInfo))
_GETLK = ctypes.CFUNCTYPE(None, _REQUEST, ctypes.c_uint64, ctypes.POINTER(FileInfo), ctypes.POINTER(Flock))
_SETLK = ctypes.CFUNCTYPE(
    None, _REQUEST, ctypes.c_uint64, ctypes.POINTER(FileInfo), ctypes.POINTER(Flock), ctypes.c_int
)
_FLOCK = ctypes.CFUNCTYPE(None, _REQUEST, ctypes.c_uint64, ctypes.POINTER(FileInfo), ctypes.c_int)
_WRITE_BUF = ctypes.CFUNCTYPE(
    None, _REQUEST, ctypes.c_uint64, ctypes.c_void_p, ctypes.c_int64, ctypes.POINTER(FileInfo)
)

_page_writeback = threading.local()


def writing_back_pages() -> bool:
    """Whether the ``write`` request this thread serves writes back cached pages (``fuse_file_info.writepage``)."""
    return getattr(_page_writeback, "active", False)

_TYPES = {fcntl.F_RDLCK: LockType.READ, fcntl.F_WRLCK: LockType.WRITE, fcntl.F_UNLCK: LockType.UNLOCK}
_FCNTL_TYPES = {value: key for key, value in _TYPES.items()}


class LockRequests(Protocol):
    """What the callbacks ask for; errors as ``llfuse.FUSEError``."""

    def lock(self, inode: int, owner: int, kind: LockKind, lock_type: LockType, start: int, end: int,
             wait: bool) -> None: ...

    def test_lock(self, inode: int, owner: int, kind: LockKind, lock_type: LockType, start: int,
                  end: int) -> tuple[LockType, int, int]: ...


class NotInstalled(Exception):
    """Locks could not be added; the message says why."""


class InstalledLocks:
    """The callbacks written into the session's table (kept alive here) and the locks taken through them."""

    def __init__(self, requests: LockRequests, libfuse: Any, session: int, flush: int, release: int,
                 write_buf: int) -> None:
        self.requests = requests
        self._libfuse = libfuse
        self._session = session
        self._llfuse_flush = _FILE_CALL(flush)
        self._llfuse_release = _FILE_CALL(release)
        self._llfuse_write_buf = _WRITE_BUF(write_buf)
        self._posix_owners: set[tuple[int, int]] = set()
        self._flock_owners: set[tuple[int, int]] = set()
        self.callbacks = {
            "getlk": _GETLK(self._getlk), "setlk": _SETLK(self._setlk), "flock": _FLOCK(self._flock),
            "flush": _FILE_CALL(self._flush_then_unlock), "release": _FILE_CALL(self._release_then_unlock),
            "write_buf": _WRITE_BUF(self._write_telling_pages),
        }

    def _answer(self, request: int, work: Callable[[], Any]) -> None:
        try:
            work()
        except llfuse.FUSEError as error:
            self._libfuse.fuse_reply_err(request, error.errno)
        except Exception:
            log.exception("a lock request failed")
            self._libfuse.fuse_reply_err(request, errno.EIO)
        else:
            self._libfuse.fuse_reply_err(request, 0)

    def _getlk(self, request: int, inode: int, info: Any, lock: Any) -> None:
        wanted = lock.contents
        try:
            start, end = _range(wanted)
            lock_type, held_start, held_end = self.requests.test_lock(
                inode, info.contents.lock_owner, LockKind.POSIX, _TYPES[wanted.l_type], start, end
            )
        except llfuse.FUSEError as error:
            self._libfuse.fuse_reply_err(request, error.errno)
            return
        except Exception:
            log.exception("a lock test failed")
            self._libfuse.fuse_reply_err(request, errno.EIO)
            return
        answer = Flock(_FCNTL_TYPES[lock_type], 0, 0, 0, 0)
        if lock_type != LockType.UNLOCK:
            answer.l_start = held_start
            answer.l_len = 0 if held_end >= LOCK_END or held_end >= 2**63 - 1 else held_end - held_start + 1
        self._libfuse.fuse_reply_lock(request, ctypes.byref(answer))

    def _setlk(self, request: int, inode: int, info: Any, lock: Any, sleep: int) -> None:
        wanted, owner = lock.contents, info.contents.lock_owner

        def work() -> None:
            start, end = _range(wanted)
            lock_type = _TYPES[wanted.l_type]
            self._take(request, inode, owner, LockKind.POSIX, lock_type, start, end, bool(sleep))
            if lock_type != LockType.UNLOCK:
                self._posix_owners.add((inode, owner))

        self._answer(request, work)

    def _flock(self, request: int, inode: int, info: Any, operation: int) -> None:
        owner = info.contents.lock_owner

        def work() -> None:
            if operation & fcntl.LOCK_UN:
                lock_type = LockType.UNLOCK
            else:
                lock_type = LockType.WRITE if operation & fcntl.LOCK_EX else LockType.READ
            self._take(request, inode, owner, LockKind.FLOCK, lock_type, 0, LOCK_END, not operation & fcntl.LOCK_NB)
            if lock_type == LockType.UNLOCK:
                self._flock_owners.discard((inode, owner))
            else:
                self._flock_owners.add((inode, owner))

        self._answer(request, work)

    def _take(self, request: int, inode: int, owner: int, kind: LockKind, lock_type: LockType, start: int,
              end: int, wait: bool) -> None:
        """
        Take the lock; with ``wait``, ask again until it is granted.

        The asking stops with EINTR when the waiting process is signalled
        (the kernel interrupts the request) or the mount ends; the server
        holds no queued request that could be granted after nobody waits.
        """
        delay = FIRST_RETRY
        while True:
            try:
                self.requests.lock(inode, owner, kind, lock_type, start, end, False)
                return
            except llfuse.FUSEError as error:
                if not wait or error.errno != errno.EAGAIN:
                    raise
            if self._libfuse.fuse_req_interrupted(request) or self._libfuse.fuse_session_exited(self._session):
                raise llfuse.FUSEError(errno.EINTR)
            time.sleep(delay)
            delay = min(delay * 2, LAST_RETRY)

    def _flush_then_unlock(self, request: int, inode: int, info: Any) -> None:
        self._give_back(self._posix_owners, inode, info.contents.lock_owner, LockKind.POSIX)
        self._llfuse_flush(request, inode, info)

    def _release_then_unlock(self, request: int, inode: int, info: Any) -> None:
        if info.contents.bits & _FLOCK_RELEASE:
            self._give_back(self._flock_owners, inode, info.contents.lock_owner, LockKind.FLOCK)
        self._llfuse_release(request, inode, info)

    def _write_telling_pages(self, request: int, inode: int, buffers: int, offset: int, info: Any) -> None:
        if not info.contents.writepage:
            self._llfuse_write_buf(request, inode, buffers, offset, info)
            return
        _page_writeback.active = True
        try:
            self._llfuse_write_buf(request, inode, buffers, offset, info)
        finally:
            _page_writeback.active = False

    def _give_back(self, owners: set[tuple[int, int]], inode: int, owner: int, kind: LockKind) -> None:
        if (inode, owner) not in owners:
            return
        owners.discard((inode, owner))
        try:
            self.requests.lock(inode, owner, kind, LockType.UNLOCK, 0, LOCK_END, False)
        except Exception as error:  # the server ends the locks with the handle or the session anyway
            log.warning("could not release a lock of inode %d at close: %s", inode, error)


def _range(lock: Flock) -> tuple[int, int]:
    """``[start, end]`` of a ``struct flock`` libfuse made (``l_whence`` SEEK_SET, ``l_len`` 0: to the end)."""
    if lock.l_start < 0 or lock.l_len < 0:
        raise llfuse.FUSEError(errno.EINVAL)
    end = LOCK_END if lock.l_len == 0 else lock.l_start + lock.l_len - 1
    return lock.l_start, end


def _symbols(path: str, wanted: set[str]) -> dict[str, int]:
    """The values of ``wanted`` symbols in an ELF64 little-endian file's symbol tables."""
    with open(path, "rb") as file:
        data = file.read()
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise NotInstalled(f"{path} is not a 64-bit little-endian ELF file")
    (section_offset,) = struct.unpack_from("<Q", data, 0x28)
    entry_size, count = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, section_offset + i * entry_size) for i in range(count)]
    found: dict[str, int] = {}
    for section in sections:
        if section[1] not in (2, 11):  # SHT_SYMTAB, SHT_DYNSYM
            continue
        names = sections[section[6]][4]
        for offset in range(section[4], section[4] + section[5], 24):
            name_at, _, _, _, value, _ = struct.unpack_from("<IBBHQQ", data, offset)
            end = data.index(b"\0", names + name_at)
            name = data[names + name_at : end].decode(errors="replace")
            if name in wanted:
                found[name] = value
    missing = wanted - set(found)
    if missing:
        raise NotInstalled(f"{path} lacks the symbols {', '.join(sorted(missing))}")
    return found


def install(requests: LockRequests) -> InstalledLocks:
    """
    Add lock operations to llfuse's session (between ``llfuse.init`` and ``llfuse.main``).

    Keep the result until ``llfuse.close``: it holds the callbacks.
    :raise NotInstalled: with the reason, when anything is not as expected.
    """
    if sys.platform != "linux" or ctypes.sizeof(ctypes.c_void_p) != 8:
        raise NotInstalled("lock operations are added only on 64-bit Linux")
    session_symbol, table_symbol = "__pyx_v_6llfuse_session", "__pyx_v_6llfuse_fuse_ops"
    symbols = _symbols(llfuse.__file__, {session_symbol, table_symbol, "PyInit_llfuse"})
    module = ctypes.CDLL(llfuse.__file__)
    base = ctypes.cast(module.PyInit_llfuse, ctypes.c_void_p).value - symbols["PyInit_llfuse"]  # type: ignore[operator]
    session = ctypes.c_void_p.from_address(base + symbols[session_symbol]).value
    if not session:
        raise NotInstalled("llfuse has no session (call install after llfuse.init)")
    name = ctypes.util.find_library("fuse") or "libfuse.so.2"
    libfuse = ctypes.CDLL(name)
    libfuse.fuse_session_data.restype = ctypes.c_void_p
    libfuse.fuse_session_data.argtypes = [ctypes.c_void_p]
    libfuse.fuse_reply_err.argtypes = [ctypes.c_void_p, ctypes.c_int]
    libfuse.fuse_reply_lock.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    libfuse.fuse_req_interrupted.argtypes = [ctypes.c_void_p]
    libfuse.fuse_session_exited.argtypes = [ctypes.c_void_p]
    data = libfuse.fuse_session_data(session)
    probe = ctypes.string_at(base + symbols[table_symbol], _PROBE)
    offset = ctypes.string_at(data, 1024).find(probe)
    if offset < 0 or offset % 8:
        raise NotInstalled("the session's table of operations was not found")
    table = (ctypes.c_void_p * _TABLE_SLOTS).from_address(data + offset)
    mine = (ctypes.c_void_p * _TABLE_SLOTS).from_address(base + symbols[table_symbol])
    if list(table) != list(mine):
        raise NotInstalled("the session's table of operations is not llfuse's")
    if any(table[_SLOTS[slot]] for slot in ("getlk", "setlk", "flock")):
        raise NotInstalled("llfuse has lock operations already")
    if not (table[_SLOTS["flush"]] and table[_SLOTS["release"]] and table[_SLOTS["write_buf"]]):
        raise NotInstalled("llfuse has no flush, release or write_buf operation")
    installed = InstalledLocks(
        requests, libfuse, session, table[_SLOTS["flush"]], table[_SLOTS["release"]], table[_SLOTS["write_buf"]]
    )
    for slot, callback in installed.callbacks.items():
        table[_SLOTS[slot]] = ctypes.cast(callback, ctypes.c_void_p).value
    return installed
