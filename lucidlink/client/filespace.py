"""
The filesystem core: the files and directories of one filespace.

:class:`Filespace` puts a logged-in
:class:`~lucidlink.client.session.FilespaceSession` and an object store
together.  It has two levels:

- :attr:`Filespace.inodes`, an :class:`Inodes` (the
  :class:`~lucidlink.client.interface.IFilespaceInodes` a FUSE layer sees):
  lookups by parent inode and name, attributes, directories, links, xattrs,
  and :class:`FileHandle`\\ s.  Names are sealed with
  :func:`~lucidlink.crypto.seal_name` under their parent directory's inode
  (a rename seals the new name under the new parent), xattr names and values
  under their inode.
- Paths, for the command line: :meth:`Filespace.resolve`,
  :meth:`Filespace.listdir`, :meth:`Filespace.open_path`, ... walk a path
  component by component from the root, following symbolic links in the
  middle (and at the end when asked), ``TooManyLinks`` after 40.

A :class:`FileHandle` is one open of a file; every handle of a file on this
client shares one :class:`OpenFile`, which holds the buffered writes, the
size and the chunk map cache, so each handle sees the others' writes at once,
as descriptors of a local file do.  It reads and writes by chunks.  Reading a chunk
fetches only the sealed blocks that hold the range (a ranged get of
:func:`~lucidlink.crypto.sealed_range_for`), opened with the object's
``object_length``, through the :class:`~lucidlink.client.chunk_reader.ChunkReader`
and its on-disk :class:`~lucidlink.client.chunk_cache.ChunkCache`; holes, and
bytes past a chunk's ``length``, read as zeros.  A handle read in order has
the next chunks fetched ahead (:mod:`lucidlink.client.readahead`).
:meth:`FileHandle.read_cached` serves a read from any thread, without the
reactor, when the file has nothing pending and the chunks it needs are
known and cached (see :meth:`OpenFile.read_cached`); a mount tries it first.
Writes are buffered per chunk (a partial overwrite of an existing chunk reads
it first) and, with a cache folder, journaled sealed on disk
(:mod:`lucidlink.client.writeback`; a chunk written in order is staged there
as the object it will be stored as, and stored by a link); a chunk the
writer has filled and moved past is stored in the background.
:meth:`FileHandle.write_direct` makes a write from any thread, without the
reactor, when it needs nothing from it (see :meth:`OpenFile.write_direct`);
a mount tries it first.  :meth:`FileHandle.flush` (and ``close``,
and a write that finds more than ``max_dirty`` bytes buffered) stores the
rest: each changed chunk is sealed into a new object with a random id,
stored create-only under :func:`chunk_object_key`, a bounded number at once,
and then the chunk map is committed against the version the handle last saw
(and the journal removed).  If another writer
committed meanwhile (``Conflict``), the handle reads the map again and
rebases: each of its chunks that the other writer changed is rebuilt from the
other writer's content with this handle's written byte ranges laid over it,
stored as a new object, and the commit is tried again.  So two writers of
different chunks, or of different bytes of one chunk, both keep their
writes; where they wrote the same bytes, the last to commit wins.

The locks this client takes are remembered in :attr:`Inodes.held_locks` and
reclaimed when the session connects again (:meth:`Inodes.reclaim_locks`); one
that another client took meanwhile is lost, and reads and writes of the
file's handles then fail with :class:`LockLost`.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lucidlink import crypto
from lucidlink.client.cache_folder import CacheFolder
from lucidlink.client.chunk_cache import ChunkCache
from lucidlink.client.chunk_reader import DEFAULT_READ_AHEAD, ChunkReader, chunk_object_key
from lucidlink.client.interface import IFilespaceInodes
from lucidlink.client.leased_changes import LeasedChanges
from lucidlink.client.metadata_cache import ABSENT, ABSENT_XATTR, MetadataCache
from lucidlink.client.readahead import SequentialReads
from lucidlink.client.session import FilespaceSession, ServerHandle
from lucidlink.client.writeback import (
    Committing,
    Journal,
    PendingJournal,
    StagedChunk,
    Truncate,
    Write,
    WriteBackJournals,
)
from lucidlink.errors import (
    AccessDenied,
    AlreadyExists,
    BadFileHandle,
    Busy,
    Conflict,
    ConnectionClosed,
    FileTooLarge,
    IntegrityError,
    InvalidArgument,
    IsADirectory,
    LucidError,
    NoAttribute,
    NoSpace,
    NotADirectory,
    NotFound,
    NotPermitted,
    NotSupported,
    ReadOnly,
    RequestTimeout,
    Restoring,
    TooManyLinks,
    Unavailable,
)
from lucidlink.meta.locks import HeldLock, LockTable
from lucidlink.objectstore.interface import IFileObjectStore
from lucidlink.protocol import messages as w
from lucidlink.protocol.messages import (
    Attributes,
    ChunkRef,
    FileKind,
    LockKind,
    LockType,
    NotifyKind,
    SetAttrField,
    XattrFlags,
)

_log = Logger()

DEFAULT_MAX_DIRTY = 64 * 1024 * 1024
"""Buffered bytes per handle beyond which a write stores them before it returns."""
DEFAULT_PARALLEL_UPLOADS = 4
STAGE_FROM = 4 * crypto.BLOCK_SIZE
"""A chunk appended to from empty is staged (see ``OpenFile._journal_piece``) once it holds this many bytes."""
CHUNKMAP_WINDOW = 1024
"""Chunk map entries read per ``ChunkMapRead``."""
MAX_SYMLINK_FOLLOWS = 40
MAX_FILE_SIZE = 2**63 - 1
MAX_COMMIT_ATTEMPTS = 16

UPLOADS_FRESH_FOR = 1800.0
"""Seconds a stored chunk may wait for its commit; older, it is stored again (half gc's shortest grace)."""
READ_STEP = 4 * 1024 * 1024
LOCK_END = 2**64 - 1
"""The last byte a lock can cover: a lock to ``LOCK_END`` runs to the end of the file, however it grows."""
LOCK_WAIT_TIMEOUT = 24 * 3600.0
"""Seconds a lock request that waits for a conflicting lock may take."""
_OWN = 0
"""The session part of the owners in :attr:`Inodes.held_locks` (this client is the only session there)."""


class _StaleUploads(LucidError):
    """Chunks waited so long for their commit that chunk garbage collection may have deleted them."""

    errno_name = "EIO"


class LockLost(LucidError):
    """A lock held here could not be taken again after the metadata server restarted: I/O on the file fails."""

    errno_name = "EIO"
_UNKNOWN: tuple[bytes, int] = (b"", -1)
"""A chunk's base that only the reactor can find out (see ``OpenFile._base_of``; compared by identity)."""
_UNREACHABLE = (Unavailable, Busy, Restoring, ConnectionClosed, RequestTimeout)
"""Errors that say nothing about a file, only that the servers are away for now."""
_NOT_THE_FILES = (AccessDenied, NoSpace, ReadOnly)
"""
Errors that say nothing about a file either: the user's role (a reader's client finding a writer's
writes left behind), a full disk or store, a read-only store.
"""
SYMLINK_BINDING = 0
"""The inode symlink targets are sealed under: none, as the link's own inode is not known yet."""

ChangeListener = Callable[[int, int, "bytes | None"], object]
"""``listener(inode, parent, name)``: see :meth:`Inodes.on_change`."""
Offload = Callable[..., "defer.Deferred[Any]"]
"""``offload(function, *arguments)``: run CPU-heavy work (sealing, opening) and fire with its result."""


def is_writable(flags: int) -> bool:
    """Whether ``open(2)`` flags ask to write (as the metadata server decides it)."""
    return (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)


def _plain_attributes(attributes: Attributes) -> Attributes:
    """Attributes as a filesystem shows them: a symlink's size is its plaintext target's length."""
    if attributes.kind == FileKind.SYMLINK:
        return dataclasses.replace(attributes, size=max(0, attributes.size - crypto.SEALED_TARGET_OVERHEAD))
    return attributes


def _gather(deferreds: list[defer.Deferred[Any]]) -> defer.Deferred[list[Any]]:
    """All results in order, or the first failure itself (not wrapped in FirstError)."""

    def unwrap(failure: Failure) -> Failure:
        failure.trap(defer.FirstError)
        return failure.value.subFailure  # type: ignore[union-attr]

    return defer.gatherResults(deferreds, consumeErrors=True).addErrback(unwrap)


def _add_range(ranges: list[list[int]], start: int, end: int) -> None:
    """Add ``[start, end)`` to sorted, disjoint ranges, merging what touches."""
    merged = [start, end]
    kept = []
    for existing in ranges:
        if existing[1] < merged[0] or existing[0] > merged[1]:
            kept.append(existing)
        else:
            merged = [min(merged[0], existing[0]), max(merged[1], existing[1])]
    kept.append(merged)
    kept.sort()
    ranges[:] = kept


def _clip_ranges(ranges: list[list[int]], limit: int) -> None:
    ranges[:] = [[start, min(end, limit)] for start, end in ranges if start < limit]


def _covers(ranges: list[list[int]], start: int, end: int) -> bool:
    return end <= start or any(a <= start and end <= b for a, b in ranges)


@dataclass(frozen=True)
class Recovery:
    """What became of a write-back journal left by an earlier run."""

    journal: Path
    inode: int
    committed: bool
    kept: Path | None
    """Where the journal was kept, when its writes could not be committed."""
    reason: str

    def __str__(self) -> str:
        if self.committed:
            return f"writes to inode {self.inode} left by an earlier run: {self.reason}"
        kept = f"; kept in {self.kept}" if self.kept is not None else ""
        return f"writes to inode {self.inode} left by an earlier run were NOT committed: {self.reason}{kept}"


@dataclass(frozen=True)
class _ReadView:
    """What reading a file with nothing pending needs, as it was at one chunk map version (never changed)."""

    size: int
    version: int
    chunks: dict[int, ChunkRef]
    windows: frozenset[int]
    """The chunk map windows ``chunks`` holds in full: an index of one of them that is not in it is a hole."""


@dataclass(eq=False)
class _Dirty:
    """A chunk changed by a handle and not yet committed."""

    data: bytearray
    """The chunk's new content from its first byte; its length is the new object's."""
    base: tuple[bytes, int] | None
    """``(object_id, length)`` of the map entry ``data`` was built on (``(b"", 0)``: a hole; None: not read)."""
    written: list[list[int]] = dataclasses.field(default_factory=list)
    """The byte ranges this handle wrote, which a rebase lays over another writer's content."""
    object_id: bytes | None = None
    """The stored object holding ``data``, once sealed and stored."""
    stored_at: float = 0.0
    """When ``object_id`` was stored (the session clock's seconds)."""
    generation: int = 0
    """Counts changes to ``data``: an upload begun before the last change does not hold it."""
    appends_only: bool = True
    """Whether ``data`` was only ever appended to, from empty (so it can be staged)."""
    staged: StagedChunk | None = None
    """The chunk object being built from ``data`` in the journal (see :mod:`~lucidlink.client.writeback`)."""

    def rewritten(self) -> None:
        """``data`` changes other than by appending: it is no longer staged."""
        self.appends_only = False
        self.staged = None

    @property
    def staged_whole(self) -> StagedChunk | None:
        """The staged object, if it holds the whole of ``data`` (then ``data`` is the whole chunk)."""
        staged = self.staged
        return staged if staged is not None and staged.complete else None

    def changed(self) -> None:
        self.object_id = None
        self.generation += 1


class OpenFile:
    """
    A file open on this client: reads, buffered writes, truncation, flush (see the module).

    Every :class:`FileHandle` of the file here shares it, so each sees the
    others' buffered writes at once, as descriptors of a local file do.
    ``size`` is the file's size as this client sees it, its unstored writes
    included; ``version`` the chunk map version its changes are based on.
    """

    def __init__(self, inodes: Inodes, attributes: Attributes) -> None:
        self._inodes = inodes
        self.handles: list[FileHandle] = []
        """The open handles of the file here; commits go through a writable one."""
        self.inode = attributes.inode
        self.size = attributes.size
        self.version = attributes.version
        self._chunk_size = inodes.chunk_size
        self._map: dict[int, ChunkRef] = {}
        self._windows: set[int] = set()
        self._map_version: int | None = attributes.version
        self._empty_version: int | None = attributes.version if attributes.size == 0 else None
        """A chunk map version at which the file was empty, so its map had no entries (none to read)."""
        self._stale = False
        self._dirty: dict[int, _Dirty] = {}
        self._size_changed = False
        self._truncated_to: int | None = None
        self._grown_to = 0
        self._lock = defer.DeferredLock()
        self._guard = threading.Lock()
        """
        Held by a write of another thread (:meth:`write_direct`) while it changes the file, and by the
        reactor's code that changes what such a write reads or must not interleave with (see :meth:`write_direct`).
        """
        self._reads = SequentialReads(self._chunk_size, inodes.chunks.read_ahead)
        self._reads_lock = threading.Lock()
        """Guards ``_reads``, which reads of other threads (:meth:`read_cached`) tell too."""
        self._invalidations = 0
        """Counts :meth:`invalidate` calls: a chunk map read across one may be older than the change."""
        self._view: _ReadView | None = None
        """What :meth:`read_cached` may serve from; None whenever the file is being changed or may be stale."""
        self._uploading: dict[int, defer.Deferred[None]] = {}
        self._journal: Journal | None = None
        self.replaying = False
        """Set while a journal left by an earlier run is replayed onto this file (nothing is journaled)."""
        self.rebase_on_conflict = True
        """False: a commit that meets another writer's fails with Conflict instead of merging."""

    def __repr__(self) -> str:
        return f"<OpenFile of inode {self.inode}, size {self.size}, {len(self.handles)} handles>"

    @property
    def pending(self) -> bool:
        """Whether the file holds changes not yet committed."""
        return bool(self._dirty) or self._size_changed

    @property
    def buffered(self) -> int:
        """Bytes of chunk content buffered and not yet committed."""
        return sum(len(chunk.data) for chunk in self._dirty.values())

    # -- reading ----------------------------------------------------------------

    @defer.inlineCallbacks
    def read(self, offset: int, size: int) -> Generator[defer.Deferred[Any], Any, bytes]:
        """Up to ``size`` bytes from ``offset``: fewer at the end of the file, ``b""`` past it."""
        if offset < 0 or size < 0:
            raise InvalidArgument(f"cannot read {size} bytes at offset {offset}")
        chunk_size = self._chunk_size
        if self._stale and not self.pending:
            yield self._load(offset // chunk_size, offset // chunk_size)
        end = min(offset + size, self.size)
        if end <= offset:
            return b""
        first, last = offset // chunk_size, (end - 1) // chunk_size
        clean = [index for index in range(first, last + 1) if index not in self._dirty]
        if clean:
            yield self._load(clean[0], clean[-1])
            end = min(offset + size, self.size)
        with self._reads_lock:
            ahead = self._reads.observe(offset, size, self.size)
        if ahead:
            self._read_ahead(ahead)
        pieces = []
        for index in range(first, last + 1):
            start = index * chunk_size
            low, high = max(offset, start) - start, min(end, start + chunk_size) - start
            if high <= low:
                continue
            dirty = self._dirty.get(index)
            if dirty is not None:
                piece = bytes(dirty.data[low:high])
                pieces.append(defer.succeed(piece + bytes(high - low - len(piece))))
            else:
                entry = self._map.get(index)
                pieces.append(self._fetch(index, entry, low, high, self._visible_length(index, entry)))
        parts = yield _gather(pieces)
        self._publish_view()
        return b"".join(parts)

    def _publish_view(self) -> None:
        """Let other threads read from what is known now, if the file is at rest (see :meth:`read_cached`)."""
        with self._guard:
            view = self._view
            if (
                self.pending or self._stale or self._lock.locked or self._map_version != self.version
                or (view is not None and view.windows == self._windows)
            ):
                return
            self._view = _ReadView(self.size, self.version, dict(self._map), frozenset(self._windows))

    def _hide_view(self) -> None:
        """The file is about to change (or may have): reads of other threads go through the reactor."""
        self._view = None

    def read_cached(self, offset: int, size: int) -> bytes | None:
        """
        Up to ``size`` bytes from ``offset`` (as :meth:`read`), from any thread, or None.

        Served from the chunk map as the last read through the reactor left
        it, and from the chunk cache, when the file has nothing pending and
        has not changed since (every change hides that view first); None
        when anything needed is not known or not cached, and the caller goes
        through :meth:`read`.  A sequential reader is told to
        :mod:`~lucidlink.client.readahead` as by :meth:`read`, and the
        fetches ahead of it begin on the reactor.
        """
        view = self._view
        if view is None or offset < 0 or size < 0:
            return None
        chunk_size = self._chunk_size
        end = min(offset + size, view.size)
        pieces = []
        if end > offset:
            for index in range(offset // chunk_size, (end - 1) // chunk_size + 1):
                if index // CHUNKMAP_WINDOW not in view.windows:
                    return None
                start = index * chunk_size
                low, high = max(offset, start) - start, min(end, start + chunk_size) - start
                entry = view.chunks.get(index)
                top = min(high, entry.length) if entry is not None else 0
                if top <= low:
                    pieces.append(bytes(high - low))
                    continue
                if not entry.object_id:  # type: ignore[union-attr]
                    return None
                plain = self._inodes.chunks.read_cached(
                    self.inode, index, entry.object_id, entry.object_length, low, top  # type: ignore[union-attr]
                )
                if plain is None:
                    return None
                pieces.append(plain + bytes(high - top) if top < high else plain)
        if self._view is not view:
            return None  # changed meanwhile: the reactor answers with what it is now
        with self._reads_lock:
            ahead = self._reads.observe(offset, size, view.size)
        if ahead:
            self._inodes.call_in_reactor(self._read_ahead, ahead)
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _read_ahead(self, indices: range) -> None:
        """Fetch the committed chunks ``indices`` into the cache in the background."""

        @defer.inlineCallbacks
        def fetch() -> Generator[defer.Deferred[Any], Any, None]:
            yield self._load(indices[0], indices[-1])
            for index in indices:
                entry = self._map.get(index)
                if entry is not None and entry.object_id and index not in self._dirty:
                    self._inodes.chunks.prefetch(self.inode, index, entry.object_id, entry.object_length)

        fetch().addErrback(lambda failure: None)  # the reader itself fetches what it needs

    def _visible_length(self, index: int, entry: ChunkRef | None) -> int:
        """
        How many bytes of a committed chunk the file still shows, as this handle sees it.

        The server trims entries to its size; only this handle's own pending
        truncation cuts them further.  (Not this handle's size: with changes
        pending it is not refreshed, and a chunk another writer committed may
        lie past it, yet must be the base of this handle's writes there.)
        """
        if entry is None:
            return 0
        if self._truncated_to is not None:
            return max(0, min(entry.length, self._truncated_to - index * self._chunk_size))
        return entry.length

    @defer.inlineCallbacks
    def _fetch(
        self, index: int, entry: ChunkRef | None, low: int, high: int, visible: int
    ) -> Generator[defer.Deferred[Any], Any, bytes]:
        """Bytes ``[low, high)`` of committed chunk ``index``, zeros past its first ``visible`` bytes."""
        if entry is None or low >= visible:
            return bytes(high - low)
        top = min(high, visible)
        self._inodes.require_store()
        plain = yield self._inodes.chunks.read(self.inode, index, entry.object_id, entry.object_length, low, top)
        return plain + bytes(high - top)

    @property
    def _known_empty(self) -> bool:
        """Whether the file is empty at the chunk map version known here: the server keeps no entry past its size."""
        return not self._stale and self._map_version is not None and self._map_version == self._empty_version

    @defer.inlineCallbacks
    def _load(self, first: int, last: int) -> Generator[defer.Deferred[Any], Any, None]:
        """Make sure the chunk map cache holds chunks ``first`` to ``last`` (at one version)."""
        if self._known_empty:
            return
        for _ in range(MAX_COMMIT_ATTEMPTS):
            needed = [
                window for window in range(first // CHUNKMAP_WINDOW, last // CHUNKMAP_WINDOW + 1)
                if window not in self._windows
            ]
            if not needed and not self._stale:
                return
            needed = needed or [first // CHUNKMAP_WINDOW]
            invalidations = self._invalidations
            version, size, entries = yield self._read_map(needed)
            self._hide_view()
            if self._invalidations != invalidations:
                # The server told of a change while the map was read: the answer may predate it.
                continue
            with self._guard:
                if version != self._map_version:
                    self._map.clear()
                    self._windows.clear()
                    self._map_version = version
                if not self.pending:
                    self.size, self.version = size, version
                elif self._truncated_to is None:
                    self.size = max(self.size, size)  # another writer's growth; a commit keeps it
                self._stale = False
                for window in needed:
                    base = window * CHUNKMAP_WINDOW
                    for index in [i for i in self._map if base <= i < base + CHUNKMAP_WINDOW]:
                        del self._map[index]
                    self._windows.add(window)
                self._map.update(entries)
        raise Conflict(f"the chunk map of inode {self.inode} kept changing while it was read")

    @defer.inlineCallbacks
    def _read_map(
        self, windows: Iterable[int]
    ) -> Generator[defer.Deferred[Any], Any, tuple[int, int, dict[int, ChunkRef]]]:
        """The chunk map in some windows, all at one version: (version, size, entries)."""
        windows = sorted(set(windows))
        for _ in range(MAX_COMMIT_ATTEMPTS):
            answers = yield _gather([
                self._inodes.session.call(w.ChunkMapRead(self.inode, window * CHUNKMAP_WINDOW, CHUNKMAP_WINDOW))
                for window in windows
            ])
            if len({answer.version for answer in answers}) == 1:
                entries = {chunk.index: chunk for answer in answers for chunk in answer.chunks}
                return answers[0].version, answers[0].size, entries
        raise Conflict(f"the chunk map of inode {self.inode} kept changing while it was read")

    # -- writing ----------------------------------------------------------------

    def write(self, offset: int, data: bytes | bytearray | memoryview, append: bool = False) -> defer.Deferred[int]:
        """
        Write ``data`` at ``offset`` (at the end with ``append``); fires with its length.

        The bytes are buffered; they are stored by :meth:`flush`, :meth:`close`,
        or a later write once more than the buffer limit is held.
        """
        self._hide_view()
        return self._exclusively(self._write, offset, data, append)

    def _exclusively(self, function: Callable[..., Any], *arguments: Any) -> defer.Deferred[Any]:
        """Run ``function`` under the file's lock, with no write of another thread under way or begun meanwhile."""

        def run(*arguments: Any) -> Any:
            with self._guard:
                pass  # a write of another thread that began before the lock was taken has ended
            return function(*arguments)

        return self._lock.run(run, *arguments)

    def write_direct(self, offset: int, data: bytes | bytearray | memoryview, append: bool = False) -> int | None:
        """
        What :meth:`write` does, done at once in the calling thread (any thread) when it can be; else None.

        It can when the write needs nothing from the reactor: the file's lock
        is free (no write, cut or commit under way), the writer's handle is
        not lost, each chunk it touches is buffered already, written whole,
        or known (its chunk map window read) with none of its stored bytes
        to keep, and it leaves at most ``max_dirty`` bytes buffered.  The
        bytes are journaled and buffered as by :meth:`write`; chunks the
        writer moved past are handed to the reactor to store.  None: nothing
        was changed, and the caller goes through :meth:`write`, which also
        gives every error of a write it refused.  While it runs it holds
        ``_guard``; the reactor's code that takes the file's lock waits for
        it first, and the code that changes the chunk map, the size or the
        read view outside that lock holds the guard meanwhile.
        """
        with self._guard:
            if self._lock.locked or self.replaying:
                return None
            try:
                if self._writer().lost is not None:
                    return None
            except BadFileHandle:
                return None
            view = memoryview(data).cast("B")
            length = len(view)
            if append:
                if self._stale and not self.pending:
                    return None
                offset = self.size
            if offset < 0 or not length or offset + length > MAX_FILE_SIZE:
                return None
            pieces = self._direct_pieces(offset, length)
            if pieces is None:
                return None
            self._hide_view()
            position = 0
            try:
                for index, low, high, base in pieces:
                    chunk = self._dirty.get(index)
                    if chunk is None:
                        chunk = self._dirty[index] = _Dirty(bytearray(), base)
                    self._lay(chunk, index, low, view[position : position + high - low])
                    position += high - low
            except NoSpace:
                if not position:
                    return None  # through the reactor, which can commit what is buffered to make room
                length = position
            except LucidError:
                if not position:
                    raise
                length = position  # the chunks before the one that failed are written: a short write
            self.size = max(self.size, offset + length)
            self._grown_to = max(self._grown_to, offset + length)
        first, current = offset // self._chunk_size, (offset + length) // self._chunk_size
        if current > first:
            self._inodes.call_in_reactor(self._upload_in_background, first, current)
        return length

    def _direct_pieces(self, offset: int, length: int) -> list[tuple[int, int, int, tuple[bytes, int] | None]] | None:
        """
        ``(index, low, high, base)`` of each chunk a write touches, if :meth:`write_direct` can make it; else None.

        ``base``: that of a new buffer for the chunk, if it has none yet.
        """
        chunk_size = self._chunk_size
        pieces = []
        grows = 0
        end = offset + length
        here = offset
        while here < end:
            index = here // chunk_size
            low = here - index * chunk_size
            high = min(chunk_size, end - index * chunk_size)
            chunk = self._dirty.get(index)
            base = None
            if chunk is None:
                base = self._base_of(index, low, high)
                if base is _UNKNOWN:
                    return None
                grows += high
            else:
                grows += max(0, high - len(chunk.data))
            pieces.append((index, low, high, base))
            here += high - low
        if grows and self.buffered + grows > self._inodes.max_dirty:
            return None  # the write through the reactor stores them before it returns
        return pieces

    def _base_of(self, index: int, low: int, high: int) -> tuple[bytes, int] | None:
        """
        The base of a new buffer of chunk ``index`` for a write of ``[low, high)`` (see ``_Dirty.base``).

        ``_UNKNOWN`` when the chunk map is not known there, or when stored bytes of the chunk would
        have to be read (what :meth:`_dirty_chunk` does on the reactor).
        """
        if low == 0 and high == self._chunk_size:
            return None
        if self._known_empty:
            return (b"", 0)
        if self._stale or index // CHUNKMAP_WINDOW not in self._windows:
            return _UNKNOWN
        entry = self._map.get(index)
        existing = self._visible_length(index, entry)
        if existing and (low > 0 or high < existing):
            return _UNKNOWN
        return (entry.object_id, entry.length) if entry else (b"", 0)

    def _upload_in_background(self, first: int, current: int) -> None:
        """On the reactor: store the full chunks a write of another thread moved past (see :meth:`write_direct`)."""
        if not self._lock.locked:  # else a write or a flush under way stores them
            self._upload_finished_chunks(first, current)

    @defer.inlineCallbacks
    def _write(self, offset: int, data: Any, append: bool) -> Generator[defer.Deferred[Any], Any, int]:
        self._check_not_lost()
        view = memoryview(data).cast("B")
        length = len(view)
        if append:
            if self._stale and not self.pending:
                yield self._load(0, 0)
            offset = self.size
        if offset < 0:
            raise InvalidArgument(f"cannot write at offset {offset}")
        if offset + length > MAX_FILE_SIZE:
            raise FileTooLarge(f"a file holds at most {MAX_FILE_SIZE} bytes")
        if not length:
            return 0
        chunk_size = self._chunk_size
        position = 0
        made_room = False
        while position < length:
            here = offset + position
            index = here // chunk_size
            low = here - index * chunk_size
            high = min(chunk_size, low + length - position)
            chunk = yield self._dirty_chunk(index, low, high)
            try:
                self._lay(chunk, index, low, view[position : position + high - low])
            except NoSpace as full:
                if position or made_room:
                    if not position:
                        raise
                    length = position
                    break
                made_room = True
                yield self._make_room(full, high - low)
                continue
            except LucidError:
                if not position:
                    raise
                length = position  # the chunks before the one that failed are written: a short write
                break
            position += high - low
        self.size = max(self.size, offset + length)
        self._grown_to = max(self._grown_to, offset + length)
        self._upload_finished_chunks(offset // chunk_size, (offset + length) // chunk_size)
        if self.buffered > self._inodes.max_dirty:
            yield self._flush_locked()
        return length

    @defer.inlineCallbacks
    def _make_room(self, full: NoSpace, wanted: int) -> Generator[defer.Deferred[Any], Any, None]:
        """
        The journal's disk is full: the chunk cache gives back room, and what is buffered is committed (its
        journal then goes).

        If the commit fails, the write fails with ``full`` (the disk is the problem to name).
        """
        cache = self._inodes.chunks.cache
        freed = cache.give_back(wanted + 2 * self._chunk_size) if cache is not None else 0
        if not self.pending:
            _log.warn("{error}; {freed} bytes of the chunk cache were dropped to make room", error=full, freed=freed)
            return
        _log.warn("{error}; {freed} bytes of the chunk cache were dropped and the buffered writes of inode {inode}"
                  " are committed early to make room", error=full, freed=freed, inode=self.inode)
        try:
            yield self._flush_locked()
        except LucidError as error:
            _log.warn("committing the buffered writes of inode {inode} failed: {error}", inode=self.inode, error=error)
            raise full from None

    def _lay(self, chunk: _Dirty, index: int, low: int, piece: memoryview) -> None:
        """
        Put ``piece`` into chunk ``index``'s buffer at ``low``, and journal it.

        If it cannot be journaled (a full disk), the buffer is left as it was and the error raised:
        a write that fails must not be committed later, nor show.
        """
        high = low + len(piece)
        if low != len(chunk.data):
            chunk.rewritten()
        length, replaced, written = len(chunk.data), bytes(chunk.data[low:high]), [list(r) for r in chunk.written]
        if low > len(chunk.data):
            chunk.data.extend(bytes(low - len(chunk.data)))
        chunk.data[low:high] = piece
        _add_range(chunk.written, low, high)
        chunk.changed()
        if not self._journaling:
            return
        try:
            self._journal_piece(chunk, index, low, piece)
        except BaseException:
            chunk.data[low : low + len(replaced)] = replaced
            del chunk.data[length:]
            chunk.written = written
            if not chunk.data and not written and self._dirty.get(index) is chunk:
                del self._dirty[index]  # made for this write: left, it would commit the chunk as empty
            raise

    def _journal_piece(self, chunk: _Dirty, index: int, low: int, piece: memoryview) -> None:
        """
        Journal ``piece``, just written at ``low`` of the chunk's buffer.

        A chunk appended to from empty is staged once it holds
        :data:`STAGE_FROM` bytes: its whole blocks go sealed into the staged
        object, only the rest of the write into a ``WRITE`` record.
        """
        journal = self._journaled()
        staged, before = chunk.staged, chunk.staged.staged if chunk.staged is not None else 0
        if (
            staged is None and chunk.appends_only and len(chunk.data) >= STAGE_FROM
            and self._chunk_size % crypto.BLOCK_SIZE == 0
        ):
            try:
                staged = chunk.staged = journal.stage(index, self._chunk_size)
            except (OSError, LucidError) as error:
                _log.warn("chunk {index} of inode {inode} is journaled, not staged: {error}",
                          index=index, inode=self.inode, error=error)
                chunk.rewritten()
        try:
            start = max(low, staged.add(chunk.data)) if staged is not None else low
            if start < low + len(piece):
                journal.write(index, start, piece[start - low :])
        except (OSError, LucidError) as error:
            if staged is None:
                raise
            _log.warn("chunk {index} of inode {inode} is journaled, not staged: {error}",
                      index=index, inode=self.inode, error=error)
            chunk.rewritten()
            # The blocks sealed for this write go: the write may yet fail, and a replay must not bring them back.
            staged.take_back(before)
            journal.write(index, low, piece)

    @property
    def _journaling(self) -> bool:
        return self._inodes.journals is not None and not self.replaying

    def _journaled(self) -> Journal:
        """The journal of this handle's uncommitted changes, begun with the first of them."""
        if self._journal is None:
            assert self._inodes.journals is not None
            self._journal = self._inodes.journals.begin(self.inode, self.version)
        return self._journal

    def _upload_finished_chunks(self, first: int, current: int) -> None:
        """
        Store, in the background, the full chunks from ``first`` up to (not with) ``current``.

        A sequential writer has moved past them; when the next flush comes,
        they are stored already (unless written again meanwhile).
        """
        starting = []
        with self._guard:
            for index in range(first, current):
                chunk = self._dirty.get(index)
                if (chunk is None or chunk.object_id is not None or index in self._uploading
                        or len(chunk.data) != self._chunk_size):
                    continue
                staged = chunk.staged_whole
                starting.append((index, chunk, chunk.generation, staged or bytes(chunk.data)))
        for index, chunk, generation, data in starting:

            def stored(object_id: bytes, index: int = index, chunk: _Dirty = chunk, generation: int = generation) -> None:
                with self._guard:
                    if self._dirty.get(index) is chunk and chunk.generation == generation:
                        chunk.object_id, chunk.stored_at = object_id, self._now()

            if isinstance(data, StagedChunk):
                uploading = self._inodes.upload_staged(self.inode, index, data)
            else:
                uploading = self._inodes.upload(self.inode, index, data)
            uploading.addCallback(stored)
            self._uploading[index] = uploading

            def ended(result: Any, index: int = index, uploading: defer.Deferred[None] = uploading) -> None:
                if self._uploading.get(index) is uploading:
                    del self._uploading[index]  # a failed upload is tried again by the flush

            uploading.addBoth(ended)

    @defer.inlineCallbacks
    def _dirty_chunk(self, index: int, low: int, high: int) -> Generator[defer.Deferred[Any], Any, _Dirty]:
        """The buffer of chunk ``index``, made (from the stored chunk if the write leaves some of it) if needed."""
        chunk = self._dirty.get(index)
        if chunk is not None:
            return chunk
        if low == 0 and high == self._chunk_size:
            chunk = _Dirty(bytearray(), None)
        else:
            yield self._load(index, index)
            entry = self._map.get(index)
            existing = self._visible_length(index, entry)
            data = b""
            if existing and (low > 0 or high < existing):
                data = yield self._fetch(index, entry, 0, existing, existing)
            chunk = _Dirty(
                bytearray(data), (entry.object_id, entry.length) if entry else (b"", 0), appends_only=not data
            )
        self._dirty[index] = chunk
        return chunk

    def truncate(self, size: int) -> defer.Deferred[None]:
        """
        Make the file ``size`` bytes long, as this handle's next commit will.

        A cut inside a chunk rewrites that chunk as a new object; chunks past
        the end are dropped; growing only changes the size (the new bytes read
        as zeros).
        """
        self._hide_view()
        return self._exclusively(self._truncate, size)

    @defer.inlineCallbacks
    def _truncate(self, size: int) -> Generator[defer.Deferred[Any], Any, None]:
        self._check_not_lost()
        if size < 0:
            raise InvalidArgument(f"a file cannot be {size} bytes long")
        if size > MAX_FILE_SIZE:
            raise FileTooLarge(f"a file holds at most {MAX_FILE_SIZE} bytes")
        if self._stale and not self.pending:
            yield self._load(0, 0)
        if self._journaling:
            try:
                self._journaled().truncate(size)
            except NoSpace as full:
                yield self._make_room(full, 0)
                self._journaled().truncate(size)
        for chunk in self._dirty.values():
            # Blocks sealed after the cut would be replayed before it (at their STAGED record).
            chunk.rewritten()
        chunk_size = self._chunk_size
        if size < self.size:
            kept_chunks = -(-size // chunk_size)
            for index in [i for i in self._dirty if i >= kept_chunks]:
                del self._dirty[index]
            for index in [i for i in self._map if i >= kept_chunks]:
                del self._map[index]
            if size % chunk_size:
                index, keep = size // chunk_size, size % chunk_size
                chunk = self._dirty.get(index)
                if chunk is not None:
                    del chunk.data[keep:]
                    _clip_ranges(chunk.written, keep)
                    chunk.rewritten()
                    chunk.changed()
                else:
                    yield self._load(index, index)
                    entry = self._map.get(index)
                    if entry is not None and self._visible_length(index, entry) > keep:
                        data = yield self._fetch(index, entry, 0, keep, keep)
                        self._dirty[index] = _Dirty(bytearray(data), (entry.object_id, entry.length), appends_only=False)
            self._truncated_to = size if self._truncated_to is None else min(self._truncated_to, size)
        else:
            self._grown_to = max(self._grown_to, size)
        self.size = size
        self._size_changed = True

    # -- storing ----------------------------------------------------------------

    def flush(self) -> defer.Deferred[None]:
        """Store the buffered chunks and commit the chunk map (``fsync`` is the same)."""
        return self._exclusively(self._flush_locked)

    fsync = flush

    @defer.inlineCallbacks
    def _flush_locked(self) -> Generator[defer.Deferred[Any], Any, None]:
        if not self.pending:
            return
        self._check_not_lost()
        chunk_size = self._chunk_size
        truncated_to = self._truncated_to
        if truncated_to is not None and -(-self.size // chunk_size) > -(-truncated_to // chunk_size):
            # Cut, then grown past the cut's last chunk: a commit only trims past its own size, so
            # the chunks the cut dropped are dropped by a commit of the cut size first.
            expected, committed = yield self._commit(lambda: ([], truncated_to), final=False)
            self._committed([], expected, committed, keep_pending=True)
        refs: list[ChunkRef] = []

        @defer.inlineCallbacks
        def prepare() -> Generator[defer.Deferred[Any], Any, tuple[list[ChunkRef], int]]:
            yield defer.DeferredList(list(self._uploading.values()))
            yield _gather([
                self._upload(index, chunk)
                for index, chunk in sorted(self._dirty.items())
                if chunk.object_id is None and chunk.data
            ])
            refs[:] = [
                ChunkRef(index, chunk.object_id or b"", len(chunk.data), len(chunk.data))
                for index, chunk in sorted(self._dirty.items())
            ]
            return refs, self.size

        expected, committed = yield self._commit(prepare)
        self._committed(refs, expected, committed)
        if self._journal is not None:
            self._journal.remove()
            self._journal = None

    @defer.inlineCallbacks
    def _upload(self, index: int, chunk: _Dirty) -> Generator[defer.Deferred[Any], Any, None]:
        staged = chunk.staged_whole
        if staged is not None:
            chunk.object_id = yield self._inodes.upload_staged(self.inode, index, staged)
        else:
            chunk.object_id = yield self._inodes.upload(self.inode, index, bytes(chunk.data))
        chunk.stored_at = self._now()

    def _now(self) -> float:
        return float(self._inodes.session.reactor.seconds())

    def _forget_stale_uploads(self) -> None:
        """Raise _StaleUploads, and forget them, if chunks to commit were stored too long ago.

        Chunk garbage collection (``lucid-meta gc``) deletes uploads no chunk
        map names once they are older than its grace period; a commit that
        waited longer than :data:`UPLOADS_FRESH_FOR` (a long disconnection)
        stores its chunks again rather than name objects that may be gone.
        """
        oldest = self._now() - UPLOADS_FRESH_FOR
        stale = [chunk for chunk in self._dirty.values() if chunk.object_id and chunk.stored_at < oldest]
        if stale:
            for chunk in stale:
                chunk.object_id = None
            raise _StaleUploads(f"{len(stale)} chunks of inode {self.inode} were stored too long ago to commit")

    @defer.inlineCallbacks
    def _commit(
        self, prepare: Callable[[], Any], final: bool = True
    ) -> Generator[defer.Deferred[Any], Any, tuple[int, Any]]:
        """
        Commit what ``prepare()`` gives (refs and size), rebasing on Conflict: (expected version, answer).

        ``final``: the commit leaves nothing pending, so the journal notes it
        first (a replay that finds it done knows the journal is done).
        """
        for attempt in range(1, MAX_COMMIT_ATTEMPTS + 1):
            refs, size = yield defer.maybeDeferred(prepare)
            expected = self.version
            if self._journal is not None and final:
                try:
                    self._journal.committing(expected, size, refs)
                except NoSpace as error:
                    # Not worth failing the commit over: a crash before the journal goes would keep its
                    # writes as a conflict (nothing lost), where this note would have said they were in.
                    _log.warn("{error}; committing inode {inode} without noting it in the journal",
                              error=error, inode=self.inode)

            def commit(refs: list[ChunkRef] = refs, size: int = size, expected: int = expected) -> w.ChunkMapCommit:
                if refs:
                    self._forget_stale_uploads()
                return w.ChunkMapCommit(self.inode, self._writer().id, expected, size, refs, 0)

            since = self._inodes.known.changing()
            try:
                committed = yield self._inodes.session.call(commit)
                self._inodes.known.learn(committed.attributes, since)
            except _StaleUploads as error:
                if attempt == MAX_COMMIT_ATTEMPTS:
                    raise
                _log.info("{error}; storing them again before the commit", error=error)
                continue
            except Conflict:
                if not self.rebase_on_conflict:
                    raise Conflict(
                        f"inode {self.inode} changed since version {expected}; its writes here were not merged"
                    ) from None
                if attempt == MAX_COMMIT_ATTEMPTS:
                    raise Conflict(
                        f"inode {self.inode} kept changing; its chunk map could not be committed"
                        f" in {MAX_COMMIT_ATTEMPTS} attempts"
                    ) from None
                yield self._rebase()
                continue
            except BadFileHandle:
                self._check_not_lost()
                raise
            return expected, committed
        raise AssertionError("unreachable")

    def _committed(
        self, refs: list[ChunkRef], expected: int, committed: w.ChunkMapCommitted, keep_pending: bool = False
    ) -> None:
        """The commit of ``refs`` against version ``expected`` succeeded: bring the cache up to date.

        ``keep_pending``: it was the first of two commits (a cut); the buffered chunks and size stay.
        """
        self._hide_view()
        size = committed.attributes.size
        if self._map_version != expected:
            self._map.clear()
            self._windows.clear()
        else:
            for ref in refs:
                if ref.object_id:
                    self._map[ref.index] = ref
                else:
                    self._map.pop(ref.index, None)
            kept_chunks = -(-size // self._chunk_size)
            for index in [i for i in self._map if i >= kept_chunks]:
                del self._map[index]
            last = self._map.get(size // self._chunk_size)
            if last is not None and size % self._chunk_size and last.length > size % self._chunk_size:
                self._map[last.index] = dataclasses.replace(last, length=size % self._chunk_size)
        self._map_version = self.version = committed.version
        self._truncated_to = None
        self._stale = False
        if not keep_pending:
            self.size = size
            self._dirty.clear()
            self._size_changed = False
            self._grown_to = 0

    @defer.inlineCallbacks
    def _rebase(self) -> Generator[defer.Deferred[Any], Any, None]:
        """Another writer committed first: rebuild the changed chunks over its content."""
        chunk_size = self._chunk_size
        windows = {index // CHUNKMAP_WINDOW for index in self._dirty} or {0}
        version, size, entries = yield self._read_map(windows)
        self._hide_view()
        for index, chunk in self._dirty.items():
            entry = entries.get(index)
            now = (entry.object_id, entry.length) if entry is not None else (b"", 0)
            if chunk.base == now:
                continue
            limit = entry.length if entry is not None else 0
            if self._truncated_to is not None:
                limit = min(limit, max(0, self._truncated_to - index * chunk_size))
            theirs = b""
            if limit and not _covers(chunk.written, 0, limit):
                theirs = yield self._fetch(index, entry, 0, limit, limit)
            rebuilt = bytearray(theirs)
            for start, end in chunk.written:
                if start > len(rebuilt):
                    rebuilt.extend(bytes(start - len(rebuilt)))
                rebuilt[start:end] = chunk.data[start:end]
            chunk.data, chunk.base = rebuilt, now
            chunk.rewritten()
            chunk.changed()
        self.version = version
        if self._truncated_to is None:
            self.size = max(size, self._grown_to)
        self._map = dict(entries)
        self._windows = set(windows)
        self._map_version = version

    @defer.inlineCallbacks
    def holds(self, commit: Committing | None) -> Generator[defer.Deferred[Any], Any, bool]:
        """Whether the file's chunk map is now what ``commit`` made (or would have made) it."""
        if commit is None:
            return False
        windows = {ref.index // CHUNKMAP_WINDOW for ref in commit.refs} or {0}
        _, size, entries = yield self._read_map(windows)
        if size != commit.size:
            return False
        for ref in commit.refs:
            entry = entries.get(ref.index)
            if (entry.object_id if entry is not None else b"") != ref.object_id:
                return False
        return True

    def truncate_at_open(self, server: ServerHandle) -> defer.Deferred[None]:
        """``O_TRUNC`` through ``server``: empty the file at once, whatever its version (``expected_version`` 0).

        Writes buffered here before are dropped: the truncation ends them as it would have once committed.
        """
        self._hide_view()
        return self._exclusively(self._truncate_at_open, server)

    @defer.inlineCallbacks
    def _truncate_at_open(self, server: ServerHandle) -> Generator[defer.Deferred[Any], Any, None]:
        since = self._inodes.known.changing()
        committed = yield self._inodes.session.call(lambda: w.ChunkMapCommit(self.inode, server.id, 0, 0, [], 0))
        self._inodes.known.learn(committed.attributes, since)
        self._hide_view()
        self._map.clear()
        self._windows.clear()
        self._map_version = self.version = self._empty_version = committed.version
        self.size = 0
        self._dirty.clear()
        self._size_changed = False
        self._truncated_to = None
        self._grown_to = 0
        if self._journal is not None:
            self._journal.remove()
            self._journal = None

    def ended(self) -> None:
        """Its last handle here closed: writes that could not be committed stay journaled for the next mount."""
        self._hide_view()
        with self._guard:
            if self._journal is not None:
                self._journal.sync()
                self._journal.close()
                self._journal = None

    # -- checks and notifications ---------------------------------------------------

    def _writer(self) -> ServerHandle:
        """The server handle commits go through: the first open writable handle's."""
        writers = [handle.server for handle in self.handles if handle.writable]
        for server in writers:
            if server.lost is None:
                return server
        if writers:
            return writers[0]
        raise BadFileHandle(f"inode {self.inode} has writes buffered and no handle open for writing to commit them")

    def _check_not_lost(self) -> None:
        lost = self._writer().lost
        if lost is not None:
            unsaved = f"; {self.buffered} buffered bytes could not be stored" if self.pending else ""
            raise type(lost)(f"{lost}{unsaved}")

    def invalidate(self, attributes: Attributes | None = None) -> None:
        """
        The file changed elsewhere: read the chunk map (and, without changes of our own, the size) again.

        ``attributes``: the file's new attributes, when the change was made here.
        """
        with self._guard:
            self._hide_view()
            self._invalidations += 1
            self._inodes.known.xattrs_changed(self.inode)
            self._map.clear()
            self._windows.clear()
            self._map_version = None
            if not self.pending:
                self._stale = True
                if attributes is not None:
                    self.size, self.version = attributes.size, attributes.version


class FileHandle:
    """
    One open of a file (a descriptor): its flags and server handle over the :class:`OpenFile` it shares.

    Reads, writes and sizes are the shared file's, so handles of one file on
    one client see each other's buffered writes at once.
    """

    def __init__(self, inodes: Inodes, file: OpenFile, server: ServerHandle, flags: int, opened: Attributes) -> None:
        self._inodes = inodes
        self.file = file
        self.server = server
        self.inode = file.inode
        self.opened = opened
        """The attributes the server answered the open (or create) with."""
        self.flags = flags
        self.writable = is_writable(flags)
        self.closed = False
        self.lock_lost: LockLost | None = None
        """Set when a lock on the file was held as it opened and could not be taken again: reads and writes fail."""

    def __repr__(self) -> str:
        return f"<FileHandle of inode {self.inode}, size {self.size}>"

    @property
    def size(self) -> int:
        return self.file.size

    @property
    def version(self) -> int:
        return self.file.version

    @property
    def pending(self) -> bool:
        """Whether the file holds changes not yet committed (through any of its handles here)."""
        return self.file.pending

    @property
    def buffered(self) -> int:
        return self.file.buffered

    def read(self, offset: int, size: int) -> defer.Deferred[bytes]:
        """Up to ``size`` bytes from ``offset``: fewer at the end of the file, ``b""`` past it."""
        return self._checked(self._check_open) or self.file.read(offset, size)

    def read_cached(self, offset: int, size: int) -> bytes | None:
        """
        What :meth:`read` would give, from any thread and at once, when it is known and cached here; else None.

        See :meth:`OpenFile.read_cached`; None also for a closed handle or
        one whose lock was lost (:meth:`read` gives their errors).
        """
        if self.closed or self.lock_lost is not None:
            return None
        return self.file.read_cached(offset, size)

    def write(self, offset: int, data: bytes | bytearray | memoryview, *,
              pages: bool = False) -> defer.Deferred[int]:
        """
        Write ``data`` at ``offset`` (at the end with ``O_APPEND``); fires with its length (see :class:`OpenFile`).

        ``pages``: the kernel writes back pages of a shared mapping, which
        go at ``offset`` whatever the handle's flags.
        """
        return self._checked(self._check_writable) or self.file.write(offset, data, self._appends(pages))

    def write_direct(self, offset: int, data: bytes | bytearray | memoryview, *, pages: bool = False) -> int | None:
        """
        What :meth:`write` would do, done at once in the calling thread (any thread) when it can be; else None.

        See :meth:`OpenFile.write_direct`; None also for a closed or
        read-only handle, or one whose lock was lost (:meth:`write` gives their errors).
        """
        if self.closed or self.lock_lost is not None or not self.writable:
            return None
        return self.file.write_direct(offset, data, self._appends(pages))

    def _appends(self, pages: bool) -> bool:
        return not pages and bool(self.flags & os.O_APPEND)

    def truncate(self, size: int) -> defer.Deferred[None]:
        """Make the file ``size`` bytes long, as its next commit will."""
        return self._checked(self._check_writable) or self.file.truncate(size)

    @property
    def clean(self) -> bool:
        """Whether :meth:`flush` has nothing to do (a read-only handle, or nothing pending); read from any thread."""
        return not self.writable or not self.file.pending

    def flush(self) -> defer.Deferred[None]:
        """Store the file's buffered chunks and commit its chunk map; nothing for a read-only handle (a close)."""
        if not self.writable:
            return defer.succeed(None)
        return self.file.flush()

    def fsync(self) -> defer.Deferred[None]:
        """
        Store the file's buffered chunks and commit its chunk map, through whichever handle; and wait for the
        changes made here without waiting (:meth:`Inodes.sync_changes`), which fails if one was refused.
        """
        return self.file.flush().addCallback(lambda _: self._inodes.sync_changes())

    def holds(self, commit: Committing | None) -> defer.Deferred[bool]:
        """Whether the file's chunk map is now what ``commit`` made (or would have made) it."""
        return self.file.holds(commit)

    def invalidate(self, attributes: Attributes | None = None) -> None:
        """The file changed elsewhere (see :meth:`OpenFile.invalidate`)."""
        self.file.invalidate(attributes)

    def truncate_at_open(self) -> defer.Deferred[None]:
        """``O_TRUNC``: empty the file at once, whatever its version."""
        return self.file.truncate_at_open(self.server)

    @defer.inlineCallbacks
    def close(self) -> Generator[defer.Deferred[Any], Any, None]:
        """Flush (a writable handle), then release the handle (released even if the flush fails, whose error is raised)."""
        if self.closed:
            return
        try:
            yield self.flush()
        finally:
            self.closed = True
            self._inodes.forget(self)
            yield self._inodes.session.release_handle(self.server)

    @staticmethod
    def _checked(check: Callable[[], None]) -> defer.Deferred[Any] | None:
        """None when ``check`` passes, else a failed Deferred with its error."""
        try:
            check()
        except LucidError:
            return defer.fail()
        return None

    def _check_open(self) -> None:
        if self.closed:
            raise BadFileHandle(f"the handle of inode {self.inode} is closed")
        if self.lock_lost is not None:
            raise self.lock_lost

    def _check_writable(self) -> None:
        self._check_open()
        if not self.writable:
            raise BadFileHandle(f"inode {self.inode} was opened read-only")


@implementer(IFilespaceInodes)
class Inodes:
    """
    One filespace as inodes (see the module): what a FUSE layer calls.

    :param offload: runs sealing and opening of chunks (default: the
        reactor's thread pool; tests pass a synchronous one).
    :param cache: the local chunk cache (None: every read fetches, and there is no read-ahead).
    :param read_ahead: chunks fetched ahead of a sequential reader.
    :param journals: where uncommitted writes are journaled (None: in memory only).
    :param leases: ask for directory leases, and under one make creates and unlinks at once
        (:mod:`lucidlink.client.leased_changes`); else every change waits for the server's answer.
    """

    def __init__(
        self,
        session: FilespaceSession,
        store: Any = None,
        *,
        max_dirty: int = DEFAULT_MAX_DIRTY,
        parallel_uploads: int = DEFAULT_PARALLEL_UPLOADS,
        offload: Offload | None = None,
        cache: ChunkCache | None = None,
        read_ahead: int = DEFAULT_READ_AHEAD,
        journals: WriteBackJournals | None = None,
        leases: bool = False,
    ) -> None:
        if session.keys is None:
            raise InvalidArgument("the session is not logged in")
        self.session = session
        self.store = store
        self.keys: crypto.FilespaceKeys = session.keys
        self.filespace_id = session.filespace_id
        self.chunk_size = session.chunk_size
        self.root_inode = session.root_inode
        self.max_dirty = max_dirty
        reactor = session.reactor
        self.offload: Offload = offload or (
            lambda function, *arguments: threads.deferToThreadPool(
                reactor, reactor.getThreadPool(), function, *arguments
            )
        )
        self._uploads = defer.DeferredSemaphore(parallel_uploads)
        self.chunks = ChunkReader(self.require_store, self.keys, self.filespace_id, self.offload, cache, read_ahead)
        self.call_in_reactor: Callable[..., object] = reactor.callFromThread
        """Runs a function on the reactor's thread, called from any thread (and returns at once)."""
        self.journals = journals
        self._handles: dict[int, set[FileHandle]] = {}
        self._files: dict[int, OpenFile] = {}
        self._change_listeners: list[ChangeListener] = []
        self.known = MetadataCache(clock=reactor.seconds)
        """Attributes and entries as the server last told, kept true by its notifications (lookups and getattrs)."""
        self._entries_changing: Counter[int] = Counter()
        """Directories with a change sent from here that may make an entry (not a removal), not answered yet."""
        self.held_locks = LockTable()
        """The locks this client holds, as the server granted them: taken again after a reconnect."""
        self._unsubscribe = [
            session.on_notify(self._notified), session.on_reconnect(self._reconnected),
            session.on_connection_lost(self.known.clear),
            session.keep_connected(lambda: bool(self.held_locks.all_held())),
        ]
        self.at_once = LeasedChanges(self) if leases else None
        """Creates and unlinks made at once under a directory lease (None: leases are not used)."""

    def require_store(self) -> Any:
        """The object store; NotSupported if there is none (commands that only list need none)."""
        if self.store is None:
            raise NotSupported("no object store is configured; reading and writing file data needs one")
        return self.store

    def _seal(self, parent: int, name: bytes) -> bytes:
        return crypto.seal_name(self.keys, parent, bytes(name))

    @defer.inlineCallbacks
    def _entry(self, request: Any) -> Generator[defer.Deferred[Any], Any, Attributes]:
        since = self.known.mark()
        answer = yield self.session.call(request)
        self.known.learn(answer.attributes, since)
        return self._as_seen_here(answer.attributes)

    @defer.inlineCallbacks
    def _made(
        self, parent: int, name: bytes, request: Any, created: bool = True
    ) -> Generator[defer.Deferred[Any], Any, Attributes]:
        """Send ``request``, which makes entry ``name`` of ``parent`` (and, ``created``, a new inode); its attributes."""
        since = self.known.changing()
        try:
            answer = yield self._changing_entries(self.session.call(request), parent)
        except BaseException:
            self.known.directory_changed(parent)  # it may have been made before the error
            raise
        self.known.added(parent, name, answer.attributes, since, created)
        return self._as_seen_here(answer.attributes)

    def _changing_entries(self, answer: defer.Deferred[Any], *directories: int) -> defer.Deferred[Any]:
        """``answer`` to a change of entries of ``directories``, counted in :attr:`_entries_changing` until it comes."""
        self._entries_changing.update(directories)

        def answered(result: Any) -> Any:
            self._entries_changing.subtract(directories)
            for directory in directories:
                if self._entries_changing[directory] <= 0:
                    self._entries_changing.pop(directory, None)
            return result

        return answer.addBoth(answered)

    def _as_seen_here(self, attributes: Attributes) -> Attributes:
        """Attributes as this client sees them: plain, and grown by writes its handles have not committed."""
        attributes = _plain_attributes(attributes)
        handles = tuple(self._handles.get(attributes.inode, ()))  # one step: other threads call this too
        pending = [handle.size for handle in handles if handle.pending]
        if pending and max(pending) > attributes.size:
            return dataclasses.replace(attributes, size=max(pending))
        return attributes

    # -- the tree ------------------------------------------------------------------

    @defer.inlineCallbacks
    def lookup(self, parent: int, name: bytes) -> Generator[defer.Deferred[Any], Any, Attributes]:
        """The attributes of entry ``name`` of directory ``parent`` (from :attr:`known` if it has them)."""
        known = self.lookup_cached(parent, name)
        if known is not None:
            return known
        since = self.known.mark()
        try:
            answer = yield self.session.call(w.Lookup(parent, self._seal(parent, name)))
        except NotFound:
            self.known.learn_absent(parent, name, since)
            raise
        self.known.learn_entry(parent, name, answer.attributes, since)
        return self._as_seen_here(answer.attributes)

    def getattr(self, inode: int) -> defer.Deferred[Attributes]:
        """The attributes of ``inode`` (from :attr:`known` if it has them)."""
        known = self.getattr_cached(inode)
        if known is not None:
            return defer.succeed(known)
        return self._entry(w.GetAttr(inode))

    def lookup_cached(self, parent: int, name: bytes) -> Attributes | None:
        """
        What :meth:`lookup` would give, at once and from any thread, when :attr:`known` has it; else None.

        Raises as :meth:`lookup` would for a bad name, and ``NotFound`` for a name known to be absent.
        """
        crypto.check_name(name)
        known = self.known.lookup(parent, name)
        if known == ABSENT:
            raise NotFound(f"no such entry in directory {parent}")
        return self._as_seen_here(known) if isinstance(known, Attributes) else None

    def getattr_cached(self, inode: int) -> Attributes | None:
        """What :meth:`getattr` would give, at once and from any thread, when :attr:`known` has it; else None."""
        known = self.known.attributes(inode)
        return None if known is None else self._as_seen_here(known)

    @defer.inlineCallbacks
    def setattr(
        self,
        inode: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        atime_now: bool = False,
        mtime_now: bool = False,
    ) -> Generator[defer.Deferred[Any], Any, Attributes]:
        """
        Change what is given; fires with the new attributes.

        A size change is made by the server (the last chunk's ``length``
        shortened, or the file extended with zeros); this client's open
        handles of the file store their buffered writes first, as they do
        before a given modification time (their commit would move it).
        """
        fields = SetAttrField(0)
        for value, field in ((mode, SetAttrField.MODE), (uid, SetAttrField.UID), (gid, SetAttrField.GID),
                             (size, SetAttrField.SIZE), (atime_ns, SetAttrField.ATIME),
                             (mtime_ns, SetAttrField.MTIME)):
            if value is not None:
                fields |= field
        if atime_now:
            fields |= SetAttrField.ATIME_NOW
        if mtime_now:
            fields |= SetAttrField.MTIME_NOW
        if size is not None or mtime_ns is not None:
            yield _gather([handle.flush() for handle in self._handles.get(inode, ())])
        self.known.inode_changed(inode)  # whatever the answer, the old attributes are gone
        attributes = yield self._entry(w.SetAttr(
            inode, int(fields), mode or 0, uid or 0, gid or 0, size or 0, atime_ns or 0, mtime_ns or 0
        ))
        if size is not None:
            for handle in self._handles.get(inode, ()):
                handle.invalidate(attributes)
        return attributes

    @defer.inlineCallbacks
    def readdir(self, inode: int) -> Generator[defer.Deferred[Any], Any, list[tuple[bytes, Attributes]]]:
        """
        Every entry of directory ``inode``, names opened.

        In the server's order (by sealed name); from :attr:`known`, in no
        particular order, when it holds the directory whole.
        """
        known = self.known.listing(inode)
        if known is not None:
            return [(name, self._as_seen_here(attributes)) for name, attributes in known]
        entries: list[tuple[bytes, Attributes]] = []
        cursor = b""
        since = self.known.mark()
        while True:
            page = yield self.session.call(w.ReadDir(inode, cursor, 0))
            for entry in page.entries:
                entries.append((crypto.open_name(self.keys, inode, entry.name), entry.attributes))
            if page.done or not page.entries:
                self.known.learn_listing(inode, entries, since)
                if self.at_once is not None and self.known.listing(inode) is not None:
                    self.at_once.ask_for_lease(inode)
                return [(name, self._as_seen_here(attributes)) for name, attributes in entries]
            cursor = page.cursor

    @defer.inlineCallbacks
    def mkdir(
        self, parent: int, name: bytes, mode: int = 0o755, uid: int = 0, gid: int = 0
    ) -> Generator[defer.Deferred[Any], Any, Attributes]:
        """Make directory ``name`` in ``parent``."""
        attributes = yield self._made(parent, name, w.MkDir(parent, self._seal(parent, name), mode, uid, gid))
        if self.at_once is not None:
            self.at_once.ask_for_lease(attributes.inode)
        return attributes

    @defer.inlineCallbacks
    def create(
        self, parent: int, name: bytes, mode: int = 0o644, flags: int = os.O_RDWR | os.O_CREAT,
        uid: int = 0, gid: int = 0,
    ) -> Generator[defer.Deferred[Any], Any, FileHandle]:
        """Create regular file ``name`` in ``parent`` and open it (``O_EXCL``: it must not exist)."""
        if self.at_once is not None:
            made = yield self.at_once.create(parent, name, mode, flags, uid, gid)
            if made is not None:
                return made
        request = w.Create(parent, self._seal(parent, name), mode, uid, gid, bool(flags & os.O_EXCL), flags)
        since = self.known.changing()
        # Known absent: had another session made it before this create, that would be told before the answer;
        # a change sent from here may make it before this create, untold.
        new = request.exclusive or (self.known.entry(parent, name) == ABSENT and not self._entries_changing[parent])
        try:
            server, attributes = yield self._changing_entries(self.session.create_handle(request), parent)
        except BaseException:
            self.known.directory_changed(parent)
            raise
        self.known.added(parent, name, attributes, since, created=new)
        if self.at_once is not None:
            self.at_once.ask_for_lease(parent)  # the next files may be made at once
        handle = yield self._opened(server, attributes, flags)
        return handle

    @defer.inlineCallbacks
    def open(self, inode: int, flags: int = os.O_RDONLY) -> Generator[defer.Deferred[Any], Any, FileHandle]:
        """Open ``inode`` with ``open(2)`` flags (``O_TRUNC`` empties it, ``O_APPEND`` writes at the end)."""
        since = self.known.mark()
        server, attributes = yield self.session.open_handle(inode, flags)
        self.known.learn(attributes, since)
        handle = yield self._opened(server, attributes, flags)
        return handle

    @defer.inlineCallbacks
    def _opened(
        self, server: ServerHandle, attributes: Attributes, flags: int
    ) -> Generator[defer.Deferred[Any], Any, FileHandle]:
        file = self._files.get(attributes.inode)
        if file is None:
            file = self._files[attributes.inode] = OpenFile(self, attributes)
        elif attributes.version != file.version:
            file.invalidate(attributes)  # close-to-open: the server's answer is newer than what was cached
        handle = FileHandle(self, file, server, flags, attributes)
        file.handles.append(handle)
        self._handles.setdefault(handle.inode, set()).add(handle)
        if flags & os.O_TRUNC and handle.writable and attributes.size:
            try:
                yield handle.truncate_at_open()
            except BaseException:
                yield handle.close()
                raise
        return handle

    @defer.inlineCallbacks
    def unlink(self, parent: int, name: bytes) -> Generator[defer.Deferred[Any], Any, None]:
        """Remove entry ``name`` (not a directory) from ``parent``."""
        if self.at_once is not None:
            done = yield self.at_once.unlink(parent, name)
            if done:
                return
        yield self._removing(parent, name, w.Unlink(parent, self._seal(parent, name)))
        if self.at_once is not None:
            self.at_once.ask_for_lease(parent)  # the next files may be removed at once

    def sync_changes(self) -> defer.Deferred[None]:
        """
        Fires once every change made here without waiting is answered (``fsync``, ``fsyncdir``, closing);
        fails with :class:`~lucidlink.client.leased_changes.ChangeRefused` if one was refused since last asked.
        """
        if self.at_once is None:
            return defer.succeed(None)
        return self.at_once.sync()  # type: ignore[no-any-return]

    def rmdir(self, parent: int, name: bytes) -> defer.Deferred[None]:
        """Remove the empty directory ``name`` from ``parent``."""
        return self._removing(parent, name, w.RmDir(parent, self._seal(parent, name)))

    @defer.inlineCallbacks
    def _removing(self, parent: int, name: bytes, request: Any) -> Generator[defer.Deferred[Any], Any, None]:
        since = self.known.changing()
        try:
            answer = yield self.session.call(request)  # a removal makes no name: not counted as changing entries
        except BaseException:
            self.known.directory_changed(parent)  # it may have been removed before the error
            raise
        self.known.removed(parent, name, since)
        if isinstance(answer, w.Entry):  # the directory's new attributes (older servers answer Ok)
            self.known.learn(answer.attributes, since)

    @defer.inlineCallbacks
    def rename(
        self, parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int = 0
    ) -> Generator[defer.Deferred[Any], Any, None]:
        """Move an entry as ``renameat2`` does; the new name is sealed under the new parent."""
        self.known.changing()
        try:
            yield self._changing_entries(self.session.call(lambda: w.Rename(
                parent, self._seal(parent, name), new_parent, self._seal(new_parent, new_name), int(flags)
            )), parent, new_parent)
        finally:
            self.known.renamed(parent, name, new_parent, new_name)

    @defer.inlineCallbacks
    def link(self, inode: int, new_parent: int, new_name: bytes) -> Generator[defer.Deferred[Any], Any, Attributes]:
        """Make a hard link to ``inode`` named ``new_name`` in ``new_parent``."""
        self.known.inode_changed(inode)
        attributes = yield self._made(
            new_parent, new_name, w.Link(inode, new_parent, self._seal(new_parent, new_name)), created=False
        )
        return attributes

    @defer.inlineCallbacks
    def symlink(
        self, parent: int, name: bytes, target: bytes, uid: int = 0, gid: int = 0
    ) -> Generator[defer.Deferred[Any], Any, Attributes]:
        """
        Make symbolic link ``name`` in ``parent`` pointing at ``target`` (sealed).

        The target is sealed before the server allocates the link's inode, so it
        is bound to the filespace's key, not to the inode (see docs/decisions.rst).
        """
        sealed_target = crypto.seal_symlink_target(self.keys, SYMLINK_BINDING, bytes(target))
        attributes = yield self._made(parent, name, w.Symlink(parent, self._seal(parent, name), sealed_target, uid, gid))
        return attributes

    @defer.inlineCallbacks
    def readlink(self, inode: int) -> Generator[defer.Deferred[Any], Any, bytes]:
        """The target of symbolic link ``inode``."""
        answer = yield self.session.call(w.ReadLink(inode))
        return crypto.open_symlink_target(self.keys, SYMLINK_BINDING, answer.target)

    @defer.inlineCallbacks
    def _simple(self, make: Callable[[], Any]) -> Generator[defer.Deferred[Any], Any, None]:
        yield self.session.call(make())

    # -- extended attributes -----------------------------------------------------------

    def setxattr(
        self, inode: int, name: bytes, value: bytes, flags: XattrFlags = XattrFlags.ANY
    ) -> defer.Deferred[None]:
        """Set extended attribute ``name`` (``CREATE``: must be new; ``REPLACE``: must exist)."""

        def request() -> w.SetXattr:
            sealed_name = crypto.seal_xattr_name(self.keys, inode, bytes(name))
            sealed_value = crypto.seal_xattr_value(self.keys, inode, sealed_name, bytes(value))
            return w.SetXattr(inode, sealed_name, sealed_value, XattrFlags(flags))

        return self._changing_xattrs(inode, self._simple(request))

    @defer.inlineCallbacks
    def getxattr(self, inode: int, name: bytes) -> Generator[defer.Deferred[Any], Any, bytes]:
        """
        The value of extended attribute ``name``.

        Of a file open here, :attr:`known` keeps the answer (a value, or none
        by that name) until a change of the file is told (another client's,
        or a reconnect), this client changes the file, or its last handle
        closes: the kernel asks for ``security.capability`` before every
        ``write(2)``.  :meth:`getxattr_cached` answers from what is kept.
        """
        name = bytes(name)
        kept = self.getxattr_cached(inode, name)
        if kept is not None:
            return kept
        since = self.known.mark()
        sealed_name = crypto.seal_xattr_name(self.keys, inode, name)
        try:
            answer = yield self.session.call(w.GetXattr(inode, sealed_name))
        except NoAttribute:
            if inode in self._files:
                self.known.learn_xattr(inode, name, None, since)
            raise
        value = crypto.open_xattr_value(self.keys, inode, sealed_name, answer.value)
        if inode in self._files:
            self.known.learn_xattr(inode, name, value, since)
        return value

    def getxattr_cached(self, inode: int, name: bytes) -> bytes | None:
        """
        At once, from any thread: the value of extended attribute ``name`` if known here, else None.

        Raises what :meth:`getxattr` would when the answer is known: ``NoAttribute``
        for a name the inode is known not to have (:attr:`known` holds its
        names, or kept that answer), and the errors of a bad name.
        """
        name = bytes(name)
        names = self.known.xattr_names(inode)
        if names is not None and name not in names:
            crypto.seal_xattr_name(self.keys, inode, name)  # a bad name's error first
            raise NoAttribute(f"inode {inode} has no such extended attribute")
        value = self.known.xattr(inode, name)
        if value is ABSENT_XATTR:
            raise NoAttribute(f"inode {inode} has no such extended attribute")
        return value

    @defer.inlineCallbacks
    def _changing_xattrs(self, inode: int, change: defer.Deferred[None]) -> Generator[defer.Deferred[Any], Any, None]:
        """Forget what is kept of ``inode`` while ``change`` (a set or a removal) is made, and its xattrs after."""
        self.known.inode_changed(inode)
        try:
            yield change
        finally:
            self.known.xattrs_changed(inode)

    @defer.inlineCallbacks
    def listxattr(self, inode: int) -> Generator[defer.Deferred[Any], Any, list[bytes]]:
        """The names of ``inode``'s extended attributes."""
        since = self.known.mark()
        answer = yield self.session.call(w.ListXattr(inode))
        names = sorted(crypto.open_xattr_name(self.keys, inode, name) for name in answer.names)
        self.known.learn_xattr_names(inode, names, since)
        return names

    def removexattr(self, inode: int, name: bytes) -> defer.Deferred[None]:
        """Remove extended attribute ``name``."""
        return self._changing_xattrs(
            inode, self._simple(lambda: w.RemoveXattr(inode, crypto.seal_xattr_name(self.keys, inode, bytes(name))))
        )

    def statfs(self) -> defer.Deferred[w.FsStats]:
        """The filespace's totals (``FsStats``)."""
        return self.session.call(w.StatFs())

    # -- advisory locks ------------------------------------------------------------------

    def lock(
        self, inode: int, owner: int, kind: LockKind, lock_type: LockType, start: int = 0, end: int = LOCK_END,
        wait: bool = False,
    ) -> defer.Deferred[None]:
        """
        Take, change or release (``UNLOCK``) ``owner``'s lock on bytes ``[start, end]`` of ``inode``.

        ``owner`` is a number of this client's choosing (the kernel's lock
        owner).  On a conflict: ``Locked`` (EAGAIN) at once, or with ``wait``
        the answer comes once the lock is granted.
        """
        request = w.Lock(inode, owner, kind, lock_type, start, end, wait)
        if lock_type == LockType.UNLOCK:
            # Forgotten here at once: even if the answer is lost, the lock must not be reclaimed.
            self.held_locks.record((_OWN, owner), inode, kind, lock_type, start, end)

        def granted(_: Any) -> None:
            self.held_locks.record((_OWN, owner), inode, kind, lock_type, start, end)

        return self.session.call(request, timeout=LOCK_WAIT_TIMEOUT if wait else None).addCallback(granted)

    def test_lock(
        self, inode: int, owner: int, kind: LockKind, lock_type: LockType, start: int = 0, end: int = LOCK_END
    ) -> defer.Deferred[w.LockState]:
        """The first lock that stands in the way of ``owner`` taking this one (``lock_type`` UNLOCK: none)."""
        return self.session.call(w.LockTest(inode, owner, kind, lock_type, start, end))

    @defer.inlineCallbacks
    def reclaim_locks(self) -> Generator[defer.Deferred[Any], Any, list[LockLost]]:
        """
        Take again every lock held here (after a reconnect: the server may have forgotten them).

        A lock another client took meanwhile is lost: it is forgotten here,
        logged as an error, and the handles of its file open now fail every
        later read and write with :class:`LockLost` (EIO), as NFS does when a
        lock cannot be reclaimed; their buffered writes are still committed
        at close.  Returns what was lost.
        """
        lost: list[LockLost] = []
        for inode, kind, held in self.held_locks.all_held():
            request = w.LockReclaim(inode, held.owner[1], kind, held.lock_type, held.start, held.end)
            try:
                yield self.session.call(request)
            except (ConnectionClosed, RequestTimeout):
                raise  # the next reconnect tries again
            except LucidError as error:
                lost.append(self._lose_lock(inode, kind, held, error))
        return lost

    def _lose_lock(self, inode: int, kind: LockKind, held: HeldLock, error: LucidError) -> LockLost:
        self.held_locks.record(held.owner, inode, kind, LockType.UNLOCK, held.start, held.end)
        what = "flock" if kind == LockKind.FLOCK else f"lock on bytes {held.start}-{held.end}"
        lost = LockLost(
            f"the {held.lock_type.name.lower()} {what} of inode {inode} was lost when the connection to the"
            f" metadata server was made again: {error}"
        )
        _log.error("{lost}; reads and writes of the file's open handles now fail", lost=lost)
        for handle in self._handles.get(inode, ()):
            handle.lock_lost = lost
        return lost

    # -- chunks and handles ------------------------------------------------------------

    def upload(self, inode: int, index: int, data: bytes) -> defer.Deferred[bytes]:
        """Seal ``data`` as chunk ``index`` of ``inode`` into a new object and store it; fires with its id.

        A bounded number run at once; the sealed object is kept in the chunk cache too.
        """
        return self._uploads.run(self._seal_and_put, inode, index, data)

    @defer.inlineCallbacks
    def _seal_and_put(self, inode: int, index: int, data: bytes) -> Generator[defer.Deferred[Any], Any, bytes]:
        store = self.require_store()
        sealed = yield self.offload(crypto.seal_chunk, self.keys, inode, index, data)
        for _ in range(3):
            object_id = crypto.new_chunk_id()
            try:
                yield store.put(chunk_object_key(self.filespace_id, object_id), sealed, create_only=True)
            except AlreadyExists:
                continue  # 128 random bits met an existing object: draw again
            self.chunks.remember(object_id, len(data), sealed)  # in the background: the upload is done
            return object_id
        raise IntegrityError("the object store claims every new random chunk id exists already")

    def upload_staged(self, inode: int, index: int, staged: StagedChunk) -> defer.Deferred[bytes]:
        """Store a whole staged chunk object (see :mod:`~lucidlink.client.writeback`) as chunk ``index``; fires with its id.

        A store that takes files (:class:`~lucidlink.objectstore.interface.IFileObjectStore`) links it
        in; the chunk cache keeps it by a link too.
        """
        return self._uploads.run(self._put_staged, inode, index, staged)

    @defer.inlineCallbacks
    def _put_staged(self, inode: int, index: int, staged: StagedChunk) -> Generator[defer.Deferred[Any], Any, bytes]:
        store = self.require_store()
        takes_files = IFileObjectStore.providedBy(store)
        sealed = None if takes_files else (yield self.offload(staged.read))
        for _ in range(3):
            object_id = crypto.new_chunk_id()
            key = chunk_object_key(self.filespace_id, object_id)
            try:
                if takes_files:
                    yield store.put_file(key, str(staged.path))
                else:
                    yield store.put(key, sealed, create_only=True)
            except AlreadyExists:
                continue
            # Kept before the upload counts as done: the staged file goes with the journal after the commit.
            yield self.chunks.remember_file(object_id, staged.sealer.chunk_plain_length, staged.path)
            return object_id
        raise IntegrityError("the object store claims every new random chunk id exists already")

    # -- writes left by an earlier run ------------------------------------------------

    @defer.inlineCallbacks
    def recover(
        self, journals: WriteBackJournals | None = None
    ) -> Generator[defer.Deferred[Any], Any, list[Recovery]]:
        """
        Commit the writes an earlier run journaled and did not commit (see :mod:`lucidlink.client.writeback`).

        Each journal in ``journals`` (default: this client's) is replayed onto
        its file if the file's chunk map is still at the journal's base
        version, and committed with that version expected; otherwise it is
        kept in the conflicts folder.  One this client cannot commit for reasons
        that are not the file's (servers away, a reader's role, no room) stays
        pending.  Fires with what became of each journal.
        """
        outcomes: list[Recovery] = []
        journals = journals or self.journals
        if journals is None:
            return outcomes
        for found in journals.pending():
            if isinstance(found, tuple):
                path, error = found
                outcomes.append(Recovery(path, 0, False, journals.keep(path, str(error)), str(error)))
                continue

            def keep(reason: str, found: PendingJournal = found) -> Recovery:
                return Recovery(found.path, found.inode, False, journals.keep(found.path, reason), reason)

            try:
                outcome = yield self._recover(found, keep)
            except Conflict as error:
                outcome = keep(str(error))
            except _UNREACHABLE as error:
                outcome = Recovery(
                    found.path, found.inode, False, None,
                    f"the servers could not be reached ({error}); they stay pending for the next mount",
                )
            except _NOT_THE_FILES as error:
                outcome = Recovery(
                    found.path, found.inode, False, None,
                    f"they cannot be committed by this client ({error}); they stay pending for the next mount",
                )
            except LucidError as error:
                outcome = keep(f"inode {found.inode} could not take its writes back: {error}")
            outcomes.append(outcome)
        return outcomes

    @defer.inlineCallbacks
    def _recover(
        self, journal: PendingJournal, keep: Callable[[str], Recovery]
    ) -> Generator[defer.Deferred[Any], Any, Recovery]:
        try:
            handle = yield self.open(journal.inode, os.O_WRONLY)
        except NotFound:
            return keep(f"inode {journal.inode} no longer exists")
        try:
            if handle.version != journal.version:
                done = yield handle.holds(journal.last_commit)
                if done:
                    journal.remove()
                    return Recovery(journal.path, journal.inode, True, None, "committed before the restart")
                return keep(
                    f"inode {journal.inode} changed since these writes were made (its chunk map was at version"
                    f" {journal.version}, now {handle.version}); they were not merged",
                )
            handle.file.replaying = True
            handle.file.rebase_on_conflict = False
            for record in journal.records:
                if isinstance(record, Write):
                    yield handle.write(record.index * self.chunk_size + record.offset, record.data)
                elif isinstance(record, Truncate):
                    yield handle.truncate(record.size)
            yield handle.flush()
        finally:
            handle.file.replaying = False
            handle.file.rebase_on_conflict = True
            yield handle.close()
        journal.remove()
        return Recovery(journal.path, journal.inode, True, None, "committed")

    def forget(self, handle: FileHandle) -> None:
        """``handle`` is closed."""
        if handle in handle.file.handles:
            handle.file.handles.remove(handle)
        handles = self._handles.get(handle.inode)
        if handles is not None:
            handles.discard(handle)
            if not handles:
                del self._handles[handle.inode]
                self._files.pop(handle.inode, None)
                self.known.forget_xattr_values(handle.inode)
                handle.file.ended()
                self.held_locks.release_inode(_OWN, handle.inode)  # as the server does

    def open_handles(self) -> list[FileHandle]:
        """The handles opened here and not closed yet."""
        return [handle for handles in self._handles.values() for handle in handles]

    def on_change(self, listener: ChangeListener) -> Callable[[], None]:
        """
        Call ``listener(inode, parent, name)`` when another client changed something; returns an unsubscribe.

        ``name`` None: ``inode`` itself (attributes or content); else entry
        ``name`` (plain) of directory ``parent`` now names ``inode`` or is gone.
        ``inode`` 0 after a reconnect: anything may have changed meanwhile.
        """
        self._change_listeners.append(listener)
        return lambda: self._change_listeners.remove(listener) if listener in self._change_listeners else None

    def _tell_change(self, inode: int, parent: int = 0, name: bytes | None = None) -> None:
        for listener in list(self._change_listeners):
            listener(inode, parent, name)

    def _notified(self, message: Any) -> None:
        if not isinstance(message, w.Notify):
            return
        if message.kind == NotifyKind.INODE_CHANGED:
            self.known.inode_changed(message.inode)
            for handle in self._handles.get(message.inode, ()):
                handle.invalidate()
            self._tell_change(message.inode)
        elif message.kind == NotifyKind.ENTRY_CHANGED:
            try:
                name = crypto.open_name(self.keys, message.parent, message.name)
            except IntegrityError:
                self.known.directory_changed(message.parent)
                self._tell_change(message.parent)  # a name that does not open: the whole directory
            else:
                self.known.entry_changed(message.parent, name, message.inode)
                self._tell_change(message.inode, message.parent, name)

    def _reconnected(self) -> None:
        self.known.clear()
        for handle in self.open_handles():
            handle.invalidate()
        self._tell_change(0)
        if self.held_locks.all_held():
            self.reclaim_locks().addErrback(
                lambda failure: _log.warn("locks not taken again yet: {error}", error=failure.value)
            )

    def close(self) -> None:
        """Stop listening to the session (the handles stay as they are)."""
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []
        if self.at_once is not None:
            self.at_once.close()


# ---------------------------------------------------------------------------
# Paths


PathLike = str | bytes


def _components(path: PathLike) -> list[bytes]:
    raw = os.fsencode(path)
    return [part for part in raw.split(b"/") if part and part != b"."]


def _show(path: PathLike) -> str:
    return os.fsdecode(path) if isinstance(path, bytes) else path


class Filespace:
    """
    The files of one filespace: by path for the command line, by inode (:attr:`inodes`) for FUSE.

    ``store`` may be None for work that touches no file data (listing,
    users); ``uid``/``gid`` (default: this process's) own what paths create.

    ``cache_dir``: keep chunks (at most ``cache_size`` bytes, default
    :func:`~lucidlink.client.chunk_cache.default_capacity`) and the journals
    of uncommitted writes in ``cache_dir/<filespace id>/``; without it
    nothing is kept on disk and there is no read-ahead.

    ``leases``: creates and unlinks in a directory this session holds a lease
    on are made at once and sent without waiting (see :class:`Inodes`).
    """

    def __init__(
        self,
        session: FilespaceSession,
        store: Any = None,
        *,
        uid: int | None = None,
        gid: int | None = None,
        max_dirty: int = DEFAULT_MAX_DIRTY,
        parallel_uploads: int = DEFAULT_PARALLEL_UPLOADS,
        offload: Offload | None = None,
        cache_dir: Path | None = None,
        cache_size: int | None = None,
        read_ahead: int = DEFAULT_READ_AHEAD,
        leases: bool = False,
    ) -> None:
        self.session = session
        self.store = store
        self.cache: ChunkCache | None = None
        self.local_folder: CacheFolder | None = None
        journals = None
        if cache_dir is not None:
            if session.keys is None:
                raise InvalidArgument("the session is not logged in")
            if read_ahead < 0:
                raise InvalidArgument(f"read-ahead is a number of chunks, not {read_ahead}")
            self.local_folder = CacheFolder(Path(cache_dir) / session.filespace_id.hex())
            self.cache = ChunkCache(self.local_folder.chunks, cache_size)
            journals = WriteBackJournals(self.local_folder.writeback, session.keys)
        self.inodes = Inodes(
            session, store, max_dirty=max_dirty, parallel_uploads=parallel_uploads, offload=offload,
            cache=self.cache, read_ahead=read_ahead, journals=journals, leases=leases,
        )
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid

    @property
    def root_inode(self) -> int:
        return self.inodes.root_inode

    def statfs(self) -> defer.Deferred[w.FsStats]:
        """The filespace's totals."""
        return self.inodes.statfs()

    # -- walking ----------------------------------------------------------------------

    @defer.inlineCallbacks
    def _walk(
        self, path: PathLike, follow: bool
    ) -> Generator[defer.Deferred[Any], Any, tuple[int | None, bytes, Attributes]]:
        """(parent inode, name, attributes) of what ``path`` names; the root has no parent."""
        pending = deque(_components(path))
        # The directories from the root down to where the walk is: (inode, attributes or None for the root).
        stack: list[tuple[int, bytes, Attributes | None]] = [(self.root_inode, b"", None)]
        parent: int | None = None
        follows = 0
        while pending:
            name = pending.popleft()
            inode, _, attributes = stack[-1]
            if attributes is not None and attributes.kind != FileKind.DIRECTORY:
                raise NotADirectory(f"{_show(path)}: not a directory")
            if name == b"..":
                if len(stack) > 1:
                    stack.pop()
                continue
            try:
                found = yield self.inodes.lookup(inode, name)
            except NotFound:
                raise NotFound(f"{_show(path)}: no such file or directory") from None
            except NotADirectory:
                raise NotADirectory(f"{_show(path)}: not a directory") from None
            if found.kind == FileKind.SYMLINK and (pending or follow):
                follows += 1
                if follows > MAX_SYMLINK_FOLLOWS:
                    raise TooManyLinks(f"{_show(path)}: too many levels of symbolic links")
                target = yield self.inodes.readlink(found.inode)
                if target.startswith(b"/"):
                    del stack[1:]
                pending.extendleft(reversed(_components(target)))
                continue
            stack.append((found.inode, name, found))
        if len(stack) == 1:
            root = yield self.inodes.getattr(self.root_inode)
            return None, b"", root
        parent = stack[-2][0]
        _, name, attributes = stack[-1]
        assert attributes is not None
        return parent, name, attributes

    @defer.inlineCallbacks
    def _parent_of(self, path: PathLike) -> Generator[defer.Deferred[Any], Any, tuple[int, bytes]]:
        """The directory that holds (or is to hold) the last component of ``path``, and that name."""
        parts = _components(path)
        if not parts or parts[-1] == b"..":
            raise InvalidArgument(f"{_show(path)!r} does not end in a name")
        directory = b"/" + b"/".join(parts[:-1])
        _, _, attributes = yield self._walk(directory, follow=True)
        if attributes.kind != FileKind.DIRECTORY:
            raise NotADirectory(f"{_show(path)}: {os.fsdecode(directory)} is not a directory")
        return attributes.inode, parts[-1]

    @defer.inlineCallbacks
    def resolve(self, path: PathLike, follow: bool = False) -> Generator[defer.Deferred[Any], Any, Attributes]:
        """The attributes of what ``path`` names; a final symbolic link is followed only with ``follow``."""
        _, _, attributes = yield self._walk(path, follow)
        return attributes

    def stat(self, path: PathLike) -> defer.Deferred[Attributes]:
        """The attributes of ``path`` itself (a final symbolic link is not followed)."""
        return self.resolve(path, follow=False)

    # -- directories ------------------------------------------------------------------

    @defer.inlineCallbacks
    def listdir(self, path: PathLike) -> Generator[defer.Deferred[Any], Any, list[tuple[str, Attributes]]]:
        """The entries of directory ``path`` (symbolic links followed), by name."""
        _, _, attributes = yield self._walk(path, follow=True)
        if attributes.kind != FileKind.DIRECTORY:
            raise NotADirectory(f"{_show(path)}: not a directory")
        entries = yield self.inodes.readdir(attributes.inode)
        return sorted((os.fsdecode(name), entry) for name, entry in entries)

    @defer.inlineCallbacks
    def mkdir(
        self, path: PathLike, parents: bool = False, mode: int = 0o755
    ) -> Generator[defer.Deferred[Any], Any, Attributes]:
        """Make directory ``path``; with ``parents``, its missing parents too, and an existing one is fine."""
        if not parents:
            parent, name = yield self._parent_of(path)
            attributes = yield self.inodes.mkdir(parent, name, mode, self.uid, self.gid)
            return attributes
        parts = _components(path)
        attributes = yield self.inodes.getattr(self.root_inode)
        for depth in range(1, len(parts) + 1):
            prefix = b"/" + b"/".join(parts[:depth])
            if parts[depth - 1] == b"..":
                attributes = yield self.resolve(prefix, follow=True)
                continue
            try:
                attributes = yield self.inodes.mkdir(attributes.inode, parts[depth - 1], mode, self.uid, self.gid)
            except AlreadyExists:
                attributes = yield self.resolve(prefix, follow=True)
                if attributes.kind != FileKind.DIRECTORY:
                    raise AlreadyExists(f"{os.fsdecode(prefix)} exists and is not a directory") from None
        return attributes

    @defer.inlineCallbacks
    def remove(self, path: PathLike) -> Generator[defer.Deferred[Any], Any, None]:
        """Remove a file, a symbolic link (not its target) or an empty directory."""
        parent, name, attributes = yield self._walk(path, follow=False)
        if parent is None:
            raise NotPermitted("the root directory cannot be removed")
        if attributes.kind == FileKind.DIRECTORY:
            yield self.inodes.rmdir(parent, name)
        else:
            yield self.inodes.unlink(parent, name)

    @defer.inlineCallbacks
    def remove_tree(self, path: PathLike) -> Generator[defer.Deferred[Any], Any, None]:
        """Remove ``path`` and, if it is a directory, everything in it (symbolic links are not followed)."""
        parent, name, attributes = yield self._walk(path, follow=False)
        if parent is None:
            raise NotPermitted("the root directory cannot be removed")
        if attributes.kind == FileKind.DIRECTORY:
            yield self._empty(attributes.inode)
            yield self.inodes.rmdir(parent, name)
        else:
            yield self.inodes.unlink(parent, name)

    @defer.inlineCallbacks
    def _empty(self, directory: int) -> Generator[defer.Deferred[Any], Any, None]:
        entries = yield self.inodes.readdir(directory)
        for name, attributes in entries:
            if attributes.kind == FileKind.DIRECTORY:
                yield self._empty(attributes.inode)
                yield self.inodes.rmdir(directory, name)
            else:
                yield self.inodes.unlink(directory, name)

    # -- names ------------------------------------------------------------------------

    @defer.inlineCallbacks
    def rename(self, source: PathLike, target: PathLike, flags: int = 0) -> Generator[defer.Deferred[Any], Any, None]:
        """Rename ``source`` to exactly ``target``, as ``rename(2)`` (``renameat2`` with ``flags``)."""
        parent, name, _ = yield self._walk(source, follow=False)
        if parent is None:
            raise NotPermitted("the root directory cannot be renamed")
        new_parent, new_name = yield self._parent_of(target)
        yield self.inodes.rename(parent, name, new_parent, new_name, flags)

    @defer.inlineCallbacks
    def link(self, source: PathLike, target: PathLike) -> Generator[defer.Deferred[Any], Any, Attributes]:
        """Make ``target`` a hard link to ``source`` (a symbolic link itself, not followed)."""
        _, _, attributes = yield self._walk(source, follow=False)
        if attributes.kind == FileKind.DIRECTORY:
            raise NotPermitted(f"{_show(source)} is a directory; directories cannot have hard links")
        new_parent, new_name = yield self._parent_of(target)
        linked = yield self.inodes.link(attributes.inode, new_parent, new_name)
        return linked

    @defer.inlineCallbacks
    def symlink(self, target: PathLike, path: PathLike) -> Generator[defer.Deferred[Any], Any, Attributes]:
        """Make ``path`` a symbolic link to ``target`` (which need not exist)."""
        parent, name = yield self._parent_of(path)
        attributes = yield self.inodes.symlink(parent, name, os.fsencode(target), self.uid, self.gid)
        return attributes

    @defer.inlineCallbacks
    def readlink(self, path: PathLike) -> Generator[defer.Deferred[Any], Any, str]:
        """The target of symbolic link ``path``."""
        _, _, attributes = yield self._walk(path, follow=False)
        if attributes.kind != FileKind.SYMLINK:
            raise InvalidArgument(f"{_show(path)} is not a symbolic link")
        target = yield self.inodes.readlink(attributes.inode)
        return os.fsdecode(target)

    # -- files ------------------------------------------------------------------------

    @defer.inlineCallbacks
    def open_path(
        self, path: PathLike, flags: int = os.O_RDONLY, mode: int = 0o644
    ) -> Generator[defer.Deferred[Any], Any, FileHandle]:
        """Open ``path`` with ``open(2)`` flags (``O_CREAT`` makes it with ``mode``); a :class:`FileHandle`."""
        if flags & os.O_CREAT:
            parent, name = yield self._parent_of(path)
            try:
                handle = yield self.inodes.create(parent, name, mode, flags, self.uid, self.gid)
                return handle
            except AlreadyExists:
                if flags & os.O_EXCL:
                    raise AlreadyExists(f"{_show(path)} exists") from None
                # A symbolic link: open what it points at.
        _, _, attributes = yield self._walk(path, follow=True)
        if attributes.kind == FileKind.DIRECTORY and is_writable(flags):
            raise IsADirectory(f"{_show(path)} is a directory")
        handle = yield self.inodes.open(attributes.inode, flags & ~(os.O_CREAT | os.O_EXCL))
        return handle

    @defer.inlineCallbacks
    def read_file(self, path: PathLike) -> Generator[defer.Deferred[Any], Any, bytes]:
        """The whole content of file ``path``."""
        pieces: list[bytes] = []
        yield self.copy_out(path, pieces.append)
        return b"".join(pieces)

    @defer.inlineCallbacks
    def copy_out(self, path: PathLike, sink: Callable[[bytes], object],
                 step: int = READ_STEP) -> Generator[defer.Deferred[Any], Any, int]:
        """Stream file ``path`` to ``sink`` in pieces of ``step`` bytes; the number of bytes."""
        handle = yield self.open_path(path, os.O_RDONLY)
        offset = 0
        try:
            while True:
                piece = yield handle.read(offset, step)
                if not piece:
                    break
                sink(piece)
                offset += len(piece)
        finally:
            yield handle.close()
        return offset

    @defer.inlineCallbacks
    def write_file(self, path: PathLike, data: bytes, mode: int = 0o644) -> Generator[defer.Deferred[Any], Any, None]:
        """Make file ``path`` hold ``data`` (created, or emptied first)."""
        handle = yield self.open_path(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            yield handle.write(0, data)
        finally:
            yield handle.close()

    @defer.inlineCallbacks
    def recover(self) -> Generator[defer.Deferred[Any], Any, list[Recovery]]:
        """
        Commit the writes earlier runs left uncommitted (see :meth:`Inodes.recover`).

        Those of this slot of the cache folder, and of the slots of other
        client processes that died (see :mod:`lucidlink.client.cache_folder`).
        """
        outcomes: list[Recovery] = []
        if self.local_folder is None or self.inodes.journals is None:
            return outcomes
        outcomes.extend((yield self.inodes.recover()))
        with self.local_folder.orphans() as folders:
            for folder in folders:
                outcomes.extend((yield self.inodes.recover(WriteBackJournals(folder, self.inodes.keys))))
        return outcomes

    def close(self) -> defer.Deferred[None]:
        """
        Stop listening to the session, and close the cache once what is being written into it is written.

        Close handles first (their ``close`` stores buffered writes).  Changes made here without waiting are
        answered first; one that was refused is logged (as it was when refused), not raised.
        """
        return self.inodes.sync_changes().addErrback(
            lambda failure: _log.warn("closing the filespace: {error}", error=failure.value)
        ).addCallback(lambda _: self._close())

    def _close(self) -> defer.Deferred[None]:
        self.inodes.close()
        cache, self.cache = self.cache, None
        folder = self.local_folder

        def closed(_: object) -> None:
            self.inodes.chunks.cache = None  # a read after this fetches, as without a cache
            self.inodes.chunks.read_ahead = 0
            if cache is not None:
                cache.close()
            if folder is not None:
                folder.close()

        return self.inodes.chunks.idle().addCallback(closed)

