"""
The chunk cache: sealed chunk objects on local disk, LRU, bounded in bytes.

Chunk objects are immutable and named by random ids, so a cached copy never
goes stale: the cache is keyed by object id and needs no invalidation.  It
holds ciphertext only, exactly the bytes of the object store; a read opens
(authenticates and decrypts) just the 64 KiB blocks it needs, so a cache
entry altered on disk fails its AES-GCM tag and is dropped and fetched again,
never returned.

Each cached object is one sparse file, ``objects/XY/<id hex>``, written at
the object's own offsets; the index (SQLite, ``index.sqlite3``) says which
sealed blocks of it are present, its size, and when it was last used.
Entries are evicted whole, least recently used first, once the cache holds
more than ``capacity`` bytes (an entry being read is pinned meanwhile).  The
index is loaded at open and kept in memory; a file the index does not know
(left by a crash between writing the file and the index) is removed at open.
A crash can leave an index that claims blocks the disk lost: those fail
their tags and are fetched again.  A damaged index is started again empty;
one SQLite cannot open or write at all (a full or read-only disk) stops the
cache from opening with an error that names it.

The index and the set of entries are the reactor thread's.  Other threads
may ask :meth:`ChunkCache.has`, read files with :meth:`ChunkCache.read_sealed`
and note a use with :meth:`ChunkCache.used_elsewhere` (kept aside and
applied to the recency order before anything is evicted).  A file read that
way can be evicted meanwhile: opening it then fails (gone), or what was read
is the same immutable object (unlinked after the open), or blocks missing
from a file written again fail their tags; never other plaintext.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sqlite3
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from lucidlink import crypto
from lucidlink.errors import InvalidArgument, LucidError

_log = Logger()

INDEX_NAME = "index.sqlite3"
OBJECTS_FOLDER = "objects"
GIB = 1024**3
DEFAULT_CAPACITY = 10 * GIB
"""The cache size when none is given and the disk has room for it."""
TOUCHES_PER_SAVE = 256
"""Recency updates kept in memory before they are written to the index."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS objects (
    id BLOB PRIMARY KEY,
    object_length INTEGER NOT NULL,
    blocks BLOB NOT NULL,
    bytes INTEGER NOT NULL,
    used INTEGER NOT NULL
)
"""


def default_capacity(folder: Path, held: int = 0) -> int:
    """
    10 GiB, or half the room of a cache in ``folder`` when that is less: the disk's free space and ``held``, what
    the cache holds already.

    The other half is left to the write-back journals in the same folder, which cannot evict anything.
    """
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    room = shutil.disk_usage(probe).free + held
    return max(1, min(DEFAULT_CAPACITY, room // 2))


def _block_span(object_length: int, block: int) -> tuple[int, int]:
    """Where sealed block ``block`` lies in an object of ``object_length`` plaintext bytes: (start, length)."""
    start = crypto.CHUNK_HEADER_SIZE + block * crypto.SEALED_BLOCK_SIZE
    plain = min(crypto.BLOCK_SIZE, object_length - block * crypto.BLOCK_SIZE)
    return start, max(0, plain) + crypto.BLOCK_OVERHEAD


@dataclass(eq=False)
class _Entry:
    object_length: int
    blocks: bytearray
    """One byte per sealed block: 1 when the file holds it."""
    bytes: int

    def has(self, first: int, last: int) -> bool:
        return all(self.blocks[first : last + 1]) and last < len(self.blocks)


class ChunkCache:
    """
    Sealed chunk objects in ``folder``, at most ``capacity`` bytes of them (see the module).

    :param capacity: bytes; the least recently used entries go beyond it.  None: :func:`default_capacity`,
        counting what the cache holds as room.
    """

    def __init__(self, folder: Path, capacity: int | None) -> None:
        if capacity is not None and capacity <= 0:
            raise InvalidArgument(f"a chunk cache holds a positive number of bytes, not {capacity}")
        self.folder = Path(folder)
        self.capacity = capacity if capacity is not None else DEFAULT_CAPACITY
        self.objects = self.folder / OBJECTS_FOLDER
        self.objects.mkdir(parents=True, exist_ok=True)
        self._objects_prefix = os.path.join(self.objects, "")
        self._db, rows = self._open_index()
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._pins: dict[bytes, int] = {}
        self._touched: set[bytes] = set()
        self._used_elsewhere: dict[bytes, None] = {}
        """Entries other threads read since the reactor last looked, in order (see :meth:`used_elsewhere`)."""
        self._clock = 0
        self._closed = False
        self.size = 0
        """Bytes held."""
        self.hits = 0
        self.misses = 0
        self._load(rows)
        if capacity is None:
            self.capacity = default_capacity(self.folder, held=self.size)
        self._evict()

    def __repr__(self) -> str:
        return f"<ChunkCache {self.folder}: {self.size} of {self.capacity} bytes>"

    def _open_index(self) -> tuple[sqlite3.Connection, list[tuple[Any, ...]]]:
        """
        The index and its rows; a damaged index is started again empty (its files then go, unknown).

        An index SQLite cannot open or write at all (a full or read-only disk) is a LucidError naming it.
        """
        path = self.folder / INDEX_NAME
        for attempt in range(2):
            db = None
            try:
                db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute(_SCHEMA)
                rows = db.execute("SELECT id, object_length, blocks, bytes, used FROM objects ORDER BY used").fetchall()
                return db, rows
            except sqlite3.Error as error:
                if db is not None:
                    db.close()
                damaged = type(error) is sqlite3.DatabaseError  # not a database, malformed; not an I/O error
                if not damaged or attempt:
                    raise LucidError(
                        f"the chunk cache index {path} cannot be used: {error} (is its disk full or read-only?)"
                    ) from None
                _log.warn("the chunk cache index {path} is damaged ({error}); the cache starts again empty",
                          path=path, error=error)
                for suffix in ("", "-wal", "-shm"):
                    path.with_name(path.name + suffix).unlink(missing_ok=True)
        raise AssertionError("unreachable")

    def _load(self, rows: list[tuple[Any, ...]]) -> None:
        for object_id, object_length, blocks, size, used in rows:
            if not self.path_of(object_id).is_file():
                self._db.execute("DELETE FROM objects WHERE id = ?", (object_id,))
                continue
            self._entries[bytes(object_id)] = _Entry(object_length, bytearray(blocks), size)
            self.size += size
            self._clock = max(self._clock, used)
        known = {object_id.hex() for object_id in self._entries}
        for subfolder in self.objects.iterdir():
            for path in subfolder.iterdir() if subfolder.is_dir() else ():
                if path.name not in known:
                    path.unlink(missing_ok=True)

    def path_of(self, object_id: bytes) -> Path:
        """The file that holds (or would hold) object ``object_id``."""
        return Path(self._file_name(object_id))

    def _file_name(self, object_id: bytes) -> str:
        name = object_id.hex()
        return f"{self._objects_prefix}{name[:2]}/{name}"

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, object_id: object) -> bool:
        return object_id in self._entries

    # -- reading -------------------------------------------------------------------

    def has(self, object_id: bytes, first_block: int, last_block: int) -> bool:
        """Whether sealed blocks ``first_block`` to ``last_block`` of the object are cached (any thread)."""
        entry = self._entries.get(object_id)
        return entry is not None and entry.has(first_block, last_block)

    def pin(self, object_id: bytes) -> None:
        """Keep the entry from eviction until :meth:`unpin` (while a thread reads its file)."""
        self._pins[object_id] = self._pins.get(object_id, 0) + 1

    def unpin(self, object_id: bytes) -> None:
        left = self._pins.get(object_id, 0) - 1
        if left > 0:
            self._pins[object_id] = left
        else:
            self._pins.pop(object_id, None)
            self._evict()

    def touch(self, object_id: bytes) -> None:
        """The entry was used now: last in line for eviction."""
        if object_id in self._entries:
            self._entries.move_to_end(object_id)
            self._touched.add(object_id)
            self.hits += 1
            if len(self._touched) >= TOUCHES_PER_SAVE:
                self._save_touches()

    def used_elsewhere(self, object_id: bytes) -> None:
        """
        Note, from any thread, that the entry was read: it moves up in the recency order.

        The note is taken in (as :meth:`touch`) on the reactor's thread before
        the next eviction and when recency is saved.
        """
        used = self._used_elsewhere
        used.pop(object_id, None)  # last use last, so the most recent is touched last
        used[object_id] = None

    def _take_uses(self) -> None:
        """Apply the uses other threads noted (see :meth:`used_elsewhere`)."""
        if not self._used_elsewhere:
            return
        used, self._used_elsewhere = self._used_elsewhere, {}
        for object_id in list(used):
            self.touch(object_id)

    def read_sealed(self, object_id: bytes, start: int, length: int) -> bytes:
        """
        Bytes ``[start, start + length)`` of a cached object's file (any thread).

        Pin the entry first to keep it; unpinned, it may be evicted meanwhile (see the module).

        Fewer bytes than asked (a file cut short) come back as they are: opening them fails.
        """
        descriptor = os.open(self._file_name(object_id), os.O_RDONLY)
        try:
            return os.pread(descriptor, length, start)
        finally:
            os.close(descriptor)

    # -- storing ---------------------------------------------------------------------

    def store(self, object_id: bytes, object_length: int, start: int, sealed: bytes | memoryview) -> None:
        """
        Keep ``sealed``, the bytes of the object from offset ``start`` (whole sealed blocks).

        ``object_length`` is the object's plaintext length (as chunk maps give
        it).  The same as :meth:`write_sealed` then :meth:`record`.
        """
        self.write_sealed(object_id, start, sealed)
        self.record(object_id, object_length, start, len(sealed))

    def write_sealed(self, object_id: bytes, start: int, sealed: bytes | memoryview) -> None:
        """
        Write an object's bytes from ``start`` into its file (any thread; pin first); :meth:`record` them next.

        A file linked in by :meth:`adopt` is shared with the object store or
        the write-back journal: it is replaced by a copy of the cache's own
        (which keeps the blocks the index says it holds), never written into.
        """
        path = self.path_of(object_id)
        path.parent.mkdir(parents=True, exist_ok=True)  # the whole folder may have been removed meanwhile
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        copy = None
        if os.fstat(descriptor).st_nlink > 1:
            os.close(descriptor)
            descriptor, copy = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
        try:
            if copy is not None:
                shutil.copyfile(path, copy)
            view = memoryview(sealed)
            written = 0
            while written < len(view):
                written += os.pwrite(descriptor, view[written:], start + written)
            if copy is not None:
                os.replace(copy, path)
                copy = None
        finally:
            os.close(descriptor)
            if copy is not None:
                os.unlink(copy)

    def adopt(self, object_id: bytes, path: str | Path) -> None:
        """
        Make the whole object in the file at ``path`` the cached file of ``object_id`` (any thread; pin first).

        A hard link where the cache folder's file system allows one, else a
        copy; the file must never change afterwards (a stored object).
        :meth:`record` it next.
        """
        target = self._file_name(object_id)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        for attempt in range(2):
            try:
                os.link(path, target)
                return
            except FileExistsError:
                if attempt:
                    raise
                os.unlink(target)  # blocks of it fetched before: the whole object replaces them
            except OSError as error:
                if error.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                    raise
                break
        self.write_sealed(object_id, 0, Path(path).read_bytes())

    def record(self, object_id: bytes, object_length: int, start: int, length: int) -> None:
        """Note in the index that the object's file holds its whole sealed blocks in ``[start, start + length)``."""
        count = crypto.block_count(object_length)
        first = (start - crypto.CHUNK_HEADER_SIZE) // crypto.SEALED_BLOCK_SIZE if start else 0
        end = start + length
        blocks = []
        for block in range(first, count):
            block_start, block_length = _block_span(object_length, block)
            if block_start + block_length > end:
                break
            if block_start >= start:
                blocks.append((block, block_length))
        if not blocks:
            return
        entry = self._entries.get(object_id)
        if entry is not None and (entry.object_length != object_length or len(entry.blocks) != count):
            self.drop(object_id)
            entry = None
        if entry is None:
            entry = _Entry(object_length, bytearray(count), 0)
            self._entries[object_id] = entry
        for block, block_length in blocks:
            if not entry.blocks[block]:
                entry.blocks[block] = 1
                entry.bytes += block_length
                self.size += block_length
        self._entries.move_to_end(object_id)
        self._clock += 1
        self._db.execute(
            "INSERT OR REPLACE INTO objects (id, object_length, blocks, bytes, used) VALUES (?, ?, ?, ?, ?)",
            (object_id, object_length, bytes(entry.blocks), entry.bytes, self._clock),
        )
        self._touched.discard(object_id)
        self._evict(keep=object_id)

    def drop(self, object_id: bytes) -> None:
        """Forget an entry and remove its file (it was found damaged, or is evicted)."""
        entry = self._entries.pop(object_id, None)
        if entry is not None:
            self.size -= entry.bytes
        self._touched.discard(object_id)
        self._db.execute("DELETE FROM objects WHERE id = ?", (object_id,))
        self.path_of(object_id).unlink(missing_ok=True)

    def give_back(self, wanted: int) -> int:
        """
        Drop the least recently used unpinned entries until ``wanted`` bytes went (or none is left); the bytes gone.

        For the write-back journals in the same folder, which found the disk full: a file goes even if the
        index cannot say so (SQLite needs room too), and one the index names but the disk lacks is dropped
        at the next open.
        """
        self._take_uses()
        freed = 0
        for object_id in list(self._entries):
            if freed >= wanted:
                break
            if object_id in self._pins:
                continue
            entry = self._entries.pop(object_id)
            self.size -= entry.bytes
            freed += entry.bytes
            self._touched.discard(object_id)
            self.path_of(object_id).unlink(missing_ok=True)
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("DELETE FROM objects WHERE id = ?", (object_id,))
        return freed

    def _evict(self, keep: bytes | None = None) -> None:
        if self.size <= self.capacity:
            return
        self._take_uses()
        for object_id in list(self._entries):
            if self.size <= self.capacity:
                break
            if object_id != keep and object_id not in self._pins:
                self.drop(object_id)

    def _save_touches(self) -> None:
        self._take_uses()
        touched, self._touched = self._touched, set()
        rows = []
        for object_id in self._entries:  # in recency order
            if object_id in touched:
                self._clock += 1
                rows.append((self._clock, object_id))
        self._db.executemany("UPDATE objects SET used = ? WHERE id = ?", rows)

    def close(self) -> None:
        """Write the recency the index does not have yet and close it."""
        if self._closed:
            return
        self._save_touches()
        self._db.close()
        self._closed = True
