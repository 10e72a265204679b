"""
Packs: small create-only objects of one folder, appended to pre-written files.

The local store (:mod:`lucidlink.objectstore.local`) keeps an object as a
file of its own, and a durable new file costs two journal commits of the
file system (the file, then its name).  A journal segment is small, written
create-only and waited on by every change in ``durability = sync``; in a
pack it costs one ``fdatasync`` of blocks that already exist, which commits
no file-system metadata at all.

The packs of the folder ``F`` are the files ``F/.pack/00000001-<random>``,
``00000002-<random>``, … (a dotted name is never a key part, so listings
skip it; the random part tells a pack from one made again under its number
after the folder was emptied).
Each holds records, one after the other, from offset 0::

    magic       4 bytes   b"LPK1"
    kind        u8        1: the object ``name`` holds ``data``; 2: it is deleted
    name        u8 length
    reserved    u16       0
    data        u32 length
    time        u64       nanoseconds since the epoch (the object's modified time)
    header_crc  u32       CRC-32 of the 24 bytes before it
    name        bytes
    data        bytes
    digest      16 bytes  BLAKE2b-128 of everything before it in the record

followed by zeros: a pack is extended with written zeros (and fsynced) a
step at a time, so an append overwrites blocks that are already allocated
and ``fdatasync`` has only the data to flush.  Appends are made under an
exclusive ``flock`` of ``F/.pack`` (held by one writer of any process at a
time) at the end of the last pack, which starts a new pack once it holds
``PACK_LIMIT`` bytes.  Readers take no lock: each process keeps an index
(name to pack, offset, size) and reads the records appended since it last
looked.

What a crash can leave, and what each reader makes of it:

- A record whose append did not finish (kill -9 mid-write, power lost
  before ``fdatasync`` returned) is the last in its pack, and its digest or
  header does not check: it is not an object, and it was never
  acknowledged.  The next writer zeroes it and everything after it, then
  appends in its place.
- A record that does not check but is followed by one that does was
  damaged after it was written (bit rot, an edit): it is still an object,
  read as it is on disk, as a damaged plain file would be; what reads it
  checks its own contents (a journal segment carries a checksum).
- A header that does not check, with valid records after it: the scan skips
  to the next record that checks, and those objects stay; the writer
  appends only where nothing valid follows.
- A pack created or extended but not synced holds zeros or nothing: no
  records.
- An append whose ``fdatasync`` fails is not stored: a deletion record for
  its name goes right after it (another process may have read it already,
  so its place is never reused).  If that cannot be made durable either,
  the view refuses every later append with the error, until the process
  opens the folder again.

Deleting a packed object appends a kind-2 record; the oldest pack is
unlinked once none of its objects is left (journal segments are pruned
oldest first, so packs go in order).  A pack that is no longer the last is
read to its end once more, then never again: every append to it was made
before the next pack was created.  A pack reclaimed while a process reads
the packs makes that process read them all again.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import secrets
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from lucidlink.atomic import fsync_folder

PACK_FOLDER = ".pack"
MAGIC = b"LPK1"
PUT, DELETE = 1, 2
PACK_LIMIT = 8 << 20
"""A pack that holds this many bytes is not appended to any more."""
PACK_STEP = 1 << 20
"""How many bytes of zeros are written ahead at a time."""

_HEADER = struct.Struct(">4sBBHIQ")
_HEADER_CRC = struct.Struct(">I")
HEADER_SIZE = _HEADER.size + _HEADER_CRC.size
DIGEST_SIZE = 16
_SCAN_BLOCK = 1 << 20
REFRESH_ATTEMPTS = 5
"""Passes over the packs before giving up when packs keep being reclaimed while they are read."""


def _digest(*parts: bytes | memoryview) -> bytes:
    hasher = hashlib.blake2b(digest_size=DIGEST_SIZE)
    for part in parts:
        hasher.update(part)
    return hasher.digest()


def encode_record(kind: int, name: str, data: bytes | memoryview = b"", time_ns: int | None = None) -> bytes:
    """One record as it is stored (see the module)."""
    encoded_name = name.encode("ascii")
    if time_ns is None:
        time_ns = time.time_ns()
    header = _HEADER.pack(MAGIC, kind, len(encoded_name), 0, len(data), time_ns)
    header += _HEADER_CRC.pack(zlib.crc32(header))
    body = header + encoded_name + bytes(data)
    return body + _digest(body)


@dataclass(frozen=True, slots=True)
class _Header:
    kind: int
    name_length: int
    data_length: int
    time_ns: int

    @property
    def record_size(self) -> int:
        return HEADER_SIZE + self.name_length + self.data_length + DIGEST_SIZE


def _parse_header(raw: bytes) -> _Header | None:
    """The header in ``raw`` (at least HEADER_SIZE bytes), or None if it does not check."""
    if len(raw) < HEADER_SIZE or raw[:4] != MAGIC:
        return None
    magic, kind, name_length, reserved, data_length, time_ns = _HEADER.unpack_from(raw)
    (crc,) = _HEADER_CRC.unpack_from(raw, _HEADER.size)
    if crc != zlib.crc32(raw[: _HEADER.size]) or kind not in (PUT, DELETE) or reserved or not name_length:
        return None
    return _Header(kind, name_length, data_length, time_ns)


@dataclass(frozen=True, slots=True)
class Packed:
    """Where a packed object's data is: in the pack file named ``pack``, from ``offset``, ``size`` bytes."""

    pack: str
    offset: int
    size: int
    modified: float


@dataclass
class _PackState:
    """How far this process has read one pack."""

    end: int = 0
    """Offset after the last record read; appends go here in the last pack."""
    tail_checked: bool = False
    """Nothing valid lies at or after ``end`` (checked once, then kept true by appending only at the end)."""
    tail_clean: bool = False
    """Everything at or after ``end`` is zero, so an append there leaves nothing stale behind it."""
    size: int = 0
    """The file's size when last scanned (under the lock: its size)."""
    sealed: bool = False
    """Read to its end after a later pack existed: nothing is appended to it any more."""


@dataclass
class _Record:
    offset: int
    header: _Header
    name: str
    intact: bool


_PACK_NAME = re.compile(r"(\d{8})-[0-9a-f]{8}")


def _new_pack_name(number: int) -> str:
    return f"{number:08d}-{secrets.token_hex(4)}"


class FolderPack:
    """The packs of one folder, as this process sees them.  Blocking; safe to share between threads."""

    def __init__(self, folder: Path, *, limit: int = PACK_LIMIT, step: int = PACK_STEP) -> None:
        self.folder = folder
        self.directory = folder / PACK_FOLDER
        self._directory = str(self.directory)
        self.limit = limit
        self.step = step
        self._lock = threading.RLock()
        self._states: dict[str, _PackState] = {}
        self._objects: dict[str, Packed] = {}
        self._directory_fd: int | None = None
        self._fds: dict[tuple[str, bool], int] = {}
        """Open files of the last pack (reading, writing): it is read and written on every put."""
        self._listing: tuple[tuple[int, int], list[str]] | None = None
        """The packs, and the pack folder's (inode, mtime) when they were listed."""
        self._broken: OSError | None = None
        """Why a failed append could not be taken back: nothing more is appended through this view."""

    def __repr__(self) -> str:
        return f"<FolderPack {self.directory}>"

    # -- reading -----------------------------------------------------------------------

    def exists(self) -> bool:
        """Whether the folder has packs (an object may live in one)."""
        return os.path.isdir(self._directory)

    def close(self) -> None:
        """Close the files kept open (the next use opens them again)."""
        with self._lock:
            self._close_files()
            if self._directory_fd is not None:
                os.close(self._directory_fd)
                self._directory_fd = None

    def find(self, name: str) -> Packed | None:
        """Where the object ``name`` is packed, if it is."""
        with self._lock:
            self._refresh()
            return self._objects.get(name)

    def objects(self) -> dict[str, Packed]:
        """Every packed object of the folder, by name."""
        with self._lock:
            self._refresh()
            return dict(self._objects)

    def read(self, packed: Packed, start: int = 0, length: int | None = None) -> bytes | None:
        """Bytes of a packed object, or None if its pack is gone (it was deleted since it was found)."""
        start = min(start, packed.size)
        length = packed.size - start if length is None else min(length, packed.size - start)
        try:
            fd = os.open(self.pack_path(packed.pack), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            return _read_exactly(fd, packed.offset + start, length)
        finally:
            os.close(fd)

    # -- writing -----------------------------------------------------------------------

    def append(self, name: str, data: bytes | memoryview, taken: Callable[[], bool]) -> bool:
        """Store ``data`` as ``name`` unless it is packed already or ``taken()`` says it exists elsewhere.

        Returns False (and writes nothing) in those cases.  Durable on return.
        """
        with self._lock, self._exclusive(create=True) as directory_fd:
            self._refresh()
            if name in self._objects or taken():
                return False
            record = encode_record(PUT, name, data)
            pack, offset = self._append(directory_fd, record)
            self._objects[name] = Packed(pack, offset + HEADER_SIZE + len(name), len(data),
                                         _HEADER.unpack_from(record)[5] / 1e9)
            return True

    def append_now(self, name: str, data: bytes | memoryview, taken: Callable[[], bool]) -> bool | None:
        """:meth:`append`, if it costs no more than one write into blocks written ahead and one fdatasync.

        None (nothing written) if it would wait for more: a lock held by
        another thread or process, a pack to read (new, reclaimed, or not
        read yet) or to clear, extend or start.  Then call :meth:`append`
        where waiting is fine.
        """
        if not self._lock.acquire(blocking=False):
            return None
        try:
            directory_fd = self._directory_fd
            if directory_fd is None or not self._states:
                return None
            try:
                fcntl.flock(directory_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return None
            try:
                if os.fstat(directory_fd).st_nlink == 0 or self._packs() != sorted(self._states):
                    return None
                pack = max(self._states)
                state = self._states[pack]
                if not state.tail_checked:
                    return None
                self._scan(pack, self._file(pack), state)
                if name in self._objects or taken():
                    return False
                record = encode_record(PUT, name, data)
                if not state.tail_clean or state.end + len(record) > min(state.size, self.limit):
                    return None
                _, offset = self._append(directory_fd, record)
            finally:
                fcntl.flock(directory_fd, fcntl.LOCK_UN)
            self._objects[name] = Packed(pack, offset + HEADER_SIZE + len(name), len(data),
                                         _HEADER.unpack_from(record)[5] / 1e9)
            return True
        finally:
            self._lock.release()

    def remove(self, name: str) -> bool:
        """Delete the packed object ``name``; False if there was none.  Durable on return."""
        if not self.exists():
            return False
        with self._lock, self._exclusive(create=False) as directory_fd:
            self._refresh()
            if name not in self._objects:
                return False
            self._append(directory_fd, encode_record(DELETE, name))
            del self._objects[name]
            self._reclaim(directory_fd)
            return True

    # -- inside ------------------------------------------------------------------------

    def pack_path(self, pack: str) -> str:
        """The file of the pack named ``pack``."""
        return os.path.join(self._directory, pack)

    @contextmanager
    def _exclusive(self, create: bool) -> Iterator[int]:
        """Hold the lock of the folder's packs (made if ``create``); yields the pack folder's descriptor."""
        fd = self._directory_fd
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if os.fstat(fd).st_nlink == 0:  # the folder was removed since we opened it
                fcntl.flock(fd, fcntl.LOCK_UN)
                self.close()
                self._forget()
                fd = None
        if fd is None:
            fd = self._open_directory(create)
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._directory_fd = fd
        try:
            yield fd
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _open_directory(self, create: bool) -> int:
        try:
            return os.open(self._directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except FileNotFoundError:
            if not create:
                raise
        try:
            os.mkdir(self._directory, 0o700)
        except FileExistsError:
            pass
        else:
            fsync_folder(self.folder)
        return os.open(self._directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    def _file(self, pack: str, writable: bool = False) -> int:
        """An open file of the last pack, kept open."""
        fd = self._fds.get((pack, writable))
        if fd is None:
            flags = os.O_RDWR if writable else os.O_RDONLY
            fd = self._fds[pack, writable] = os.open(self.pack_path(pack), flags | os.O_CLOEXEC)
        return fd

    def _close_files(self, keep: str | None = None) -> None:
        for (pack, writable), fd in list(self._fds.items()):
            if pack != keep:
                del self._fds[pack, writable]
                os.close(fd)

    def _packs(self) -> list[str]:
        """The names of the folder's packs, oldest first."""
        try:
            status = os.stat(self._directory)
        except (FileNotFoundError, NotADirectoryError):
            return []
        version = (status.st_ino, status.st_mtime_ns)
        if self._listing is not None and self._listing[0] == version:
            return self._listing[1]
        try:
            names = os.listdir(self._directory)
        except (FileNotFoundError, NotADirectoryError):
            return []
        packs = sorted(name for name in names if _PACK_NAME.fullmatch(name))
        # A folder's time has a coarse grain: one changed in the last second may change again without it moving.
        self._listing = (version, packs) if time.time_ns() - status.st_mtime_ns > 1_000_000_000 else None
        return packs

    def _refresh(self) -> None:
        """Read what was appended since this process last looked (by anyone)."""
        for _ in range(REFRESH_ATTEMPTS):
            if self._refresh_once():
                return
            self._forget()  # a pack was reclaimed while we read: start again from what is there
        raise OSError(errno.ESTALE, f"the packs of {self.folder} kept changing while they were read")

    def _refresh_once(self) -> bool:
        """One pass over the packs; False if one went while it was read (the index is then incomplete)."""
        packs = self._packs()
        if any(pack not in packs for pack in self._states):
            self._forget()  # a pack was reclaimed: start again from what is there
        self._close_files(keep=packs[-1] if packs else None)
        for pack in packs:
            state = self._states.setdefault(pack, _PackState())
            if state.sealed:
                continue
            last = pack == packs[-1]
            try:
                if last:
                    self._scan(pack, self._file(pack), state)
                    continue
                fd = os.open(self.pack_path(pack), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                return False
            try:
                self._scan(pack, fd, state)
            finally:
                os.close(fd)
            # A later pack exists, so every append to this one was made (and synced) before it
            # was created: read to its end now, it is complete.
            state.sealed = True
        return True

    def _forget(self) -> None:
        self._states.clear()
        self._objects.clear()
        self._listing = None
        self._close_files()

    def _scan(self, pack: str, fd: int, state: _PackState) -> None:
        size = state.size = os.fstat(fd).st_size
        position = state.end
        while position + HEADER_SIZE <= size:
            raw_header = _read_exactly(fd, position, HEADER_SIZE)
            if state.tail_checked and not any(raw_header):
                return  # the usual end: zeros where the next record will go
            record = _read_record(fd, position, size, raw_header)
            if record is None:
                found = _next_record(fd, position, size)
                if found is None:
                    state.tail_checked = True
                    state.tail_clean = _all_zero(fd, position, size)
                    return
                position = found
                continue
            if not record.intact and _next_record(fd, position, size) is None:
                # The last record, unfinished: not an object, and nothing after it checks.
                state.tail_checked, state.tail_clean = True, False
                return
            if not record.intact and _read_exactly(fd, position, HEADER_SIZE) != raw_header:
                continue  # a writer cleared an unfinished record and appended here meanwhile: read it again
            self._apply(pack, record)
            position += record.header.record_size
            state.end = position

    def _apply(self, pack: str, record: _Record) -> None:
        if record.header.kind == PUT:
            self._objects[record.name] = Packed(pack, record.offset + HEADER_SIZE + record.header.name_length,
                                                record.header.data_length, record.header.time_ns / 1e9)
        else:
            self._objects.pop(record.name, None)

    def _append(self, directory_fd: int, record: bytes) -> tuple[str, int]:
        """Write ``record`` at the end of the last pack (a new one if that is full); returns where."""
        if self._broken is not None:
            raise OSError(self._broken.errno, f"an earlier append to {self.directory} failed and could not be "
                                              f"taken back ({self._broken.strerror or self._broken})")
        packs = sorted(self._states)
        if packs and (self._states[packs[-1]].end == 0 or self._states[packs[-1]].end + len(record) <= self.limit):
            pack = packs[-1]
        else:
            pack = self._new_pack(directory_fd, int(packs[-1][:8]) + 1 if packs else 1)
        state = self._states[pack]
        fd = self._file(pack, writable=True)
        size = state.size
        if not state.tail_clean:
            # Nothing valid lies after the end (the scan made sure): clear what an unfinished append left.
            if state.end < size:
                _write_zeros(fd, state.end, size)
                os.fdatasync(fd)
            state.tail_checked = state.tail_clean = True
        offset = state.end
        needed = offset + len(record)
        if needed > size:
            state.size = -(-needed // self.step) * self.step
            _write_zeros(fd, size, state.size)
            os.fsync(fd)  # the new size and blocks, once a step
        try:
            _write_at(fd, record, offset)
            os.fdatasync(fd)
        except OSError:
            # Not durable, so not stored.  Another process may have read the record meanwhile, so
            # it is taken back by a deletion after it, never by reusing its place; if even that
            # cannot be made durable, this view appends nothing more (the error repeats).
            state.end = offset + len(record)
            header = _parse_header(record[:HEADER_SIZE])
            try:
                if header is None:
                    raise
                name = record[HEADER_SIZE : HEADER_SIZE + header.name_length].decode("ascii")
                deletion = encode_record(DELETE, name)
                _write_at(fd, deletion, state.end)
                os.fdatasync(fd)
                state.end += len(deletion)
            except OSError as error:
                self._broken = error
            raise
        state.end = offset + len(record)
        return pack, offset

    def _new_pack(self, directory_fd: int, number: int) -> str:
        pack = _new_pack_name(number)
        fd = os.open(self.pack_path(pack), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            _write_zeros(fd, 0, self.step)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.fsync(directory_fd)
        self._states[pack] = _PackState(tail_checked=True, tail_clean=True, size=self.step)
        return pack

    def _reclaim(self, directory_fd: int) -> None:
        """Unlink the oldest packs while they hold no object and are not the last."""
        packs = sorted(self._states)
        live = {packed.pack for packed in self._objects.values()}
        removed = False
        for pack in packs[:-1]:
            if pack in live:
                break
            os.unlink(self.pack_path(pack))
            del self._states[pack]
            removed = True
        if removed:
            os.fsync(directory_fd)


def _read_exactly(fd: int, offset: int, length: int) -> bytes:
    parts = []
    while length > 0:
        part = os.pread(fd, min(length, _SCAN_BLOCK), offset)
        if not part:
            break
        parts.append(part)
        offset += len(part)
        length -= len(part)
    return b"".join(parts)


def _read_record(fd: int, offset: int, size: int, raw_header: bytes | None = None) -> _Record | None:
    """The record at ``offset`` if its header checks and it fits in the file; ``intact`` if its digest does too."""
    if raw_header is None:
        raw_header = _read_exactly(fd, offset, HEADER_SIZE)
    header = _parse_header(raw_header)
    if header is None or offset + header.record_size > size:
        return None
    rest = _read_exactly(fd, offset + HEADER_SIZE, header.record_size - HEADER_SIZE)
    body = memoryview(rest)[: -DIGEST_SIZE]
    intact = _digest(raw_header, body) == rest[-DIGEST_SIZE:]
    try:
        name = bytes(body[: header.name_length]).decode("ascii")
    except UnicodeDecodeError:
        name, intact = "", False
    if not intact and not name:
        return None
    return _Record(offset, header, name, intact)


def _next_record(fd: int, start: int, size: int) -> int | None:
    """The offset of the first record after ``start`` whose header checks and that is intact."""
    position = start + 1
    while position + HEADER_SIZE <= size:
        block = _read_exactly(fd, position, min(_SCAN_BLOCK, size - position))
        found = block.find(MAGIC)
        if found < 0:
            position += max(1, len(block) - len(MAGIC) + 1)
            continue
        candidate = position + found
        record = _read_record(fd, candidate, size)
        if record is not None and record.intact:
            return candidate
        position = candidate + 1
    return None


def _all_zero(fd: int, start: int, end: int) -> bool:
    position = start
    while position < end:
        block = _read_exactly(fd, position, min(_SCAN_BLOCK, end - position))
        if not block:
            return True
        if block.count(0) != len(block):
            return False
        position += len(block)
    return True


def _write_at(fd: int, data: bytes | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written


def _write_zeros(fd: int, start: int, end: int) -> None:
    zeros = bytes(min(_SCAN_BLOCK, max(0, end - start)))
    while start < end:
        _write_at(fd, zeros[: end - start], start)
        start += min(len(zeros), end - start)


