"""
Reading chunk objects: from the local chunk cache when it holds them, else from the object store.

:class:`ChunkReader` turns "bytes ``[low, top)`` of chunk object X" into
plaintext.  It fetches only the sealed 64 KiB blocks that hold the range
(a ranged get), opens them in the offload thread pool, and keeps what it
fetched in the :class:`~lucidlink.client.chunk_cache.ChunkCache`; the next
read of those blocks is served from the cached ciphertext.

A cached entry that fails to open (altered or cut short on disk) is dropped
and fetched again from the store; only if the store's copy fails too does
the read fail, with ``IntegrityError``.

:meth:`ChunkReader.prefetch` fetches whole objects ahead of a sequential
reader (see :mod:`lucidlink.client.readahead`), at most ``read_ahead`` at
once across the client.  From a store that holds objects as files of this
machine (:class:`~lucidlink.objectstore.interface.IFileObjectStore`) the
cache links the object's file instead (the kernel reading it in ahead), so
no byte is read or written twice.  A read that needs blocks a fetch is bringing waits
for that fetch instead of asking the store a second time.

:meth:`ChunkReader.read_cached` serves a range whose blocks are cached from
any thread, without the reactor: it reads the sealed blocks from the cache
file and opens them there, or gives None (not cached, damaged, evicted
meanwhile) for the caller to go through :meth:`ChunkReader.read`, which
deals with every such case.  The plaintext of the blocks it opened last is
kept in memory (:class:`OpenedBlocks`, bounded), so small reads within one
64 KiB block open it once.
"""

from __future__ import annotations

import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from lucidlink import crypto
from lucidlink.chunk_keys import chunk_object_key
from lucidlink.client.chunk_cache import ChunkCache
from lucidlink.errors import IntegrityError, NotFound
from lucidlink.objectstore.interface import IFileObjectStore

Offload = Callable[..., "defer.Deferred[Any]"]

DEFAULT_READ_AHEAD = 4
"""Chunks fetched ahead of a sequential reader, and fetched at once, by default."""

INLINE_OPEN_BLOCKS = 3
"""
A range of at most this many sealed blocks is opened in the calling thread (read too, when cached).

Reading up to 192 KiB of the cache file (in the page cache as a rule) and
opening it takes a fraction of a millisecond; handing it to the offload pool
and back costs two thread switches, which on a busy machine take longer.  A
FUSE read (at most 128 KiB) spans at most three blocks.
"""


DEFAULT_OPENED_BLOCKS = 256
"""Opened 64 KiB blocks kept in memory (16 MiB) by default."""


def _blocks_of(sealed_range: crypto.SealedRange) -> tuple[int, int]:
    """The first and last sealed block a (non-empty) sealed range covers."""
    last = sealed_range.first_block + (sealed_range.object_length - 1) // crypto.SEALED_BLOCK_SIZE
    return sealed_range.first_block, last


BlockKey = tuple[int, int, bytes, int]
"""``(inode, chunk index, object id, block index)``: the object's plaintext is bound to the first two."""


class OpenedBlocks:
    """
    The plaintext of the last ``capacity`` blocks opened, least recently used dropped first (any thread).

    Chunk objects never change, so a block's plaintext never goes stale; it
    is kept under its file and chunk index too, so that an object a chunk
    map names in another place (which would fail its tag there) is never
    served from here.
    """

    def __init__(self, capacity: int = DEFAULT_OPENED_BLOCKS) -> None:
        self.capacity = capacity
        self._blocks: OrderedDict[BlockKey, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._blocks)

    def get(self, key: BlockKey) -> bytes | None:
        with self._lock:
            plain = self._blocks.get(key)
            if plain is not None:
                self._blocks.move_to_end(key)
            return plain

    def put(self, key: BlockKey, plain: bytes) -> None:
        if self.capacity <= 0:
            return
        with self._lock:
            self._blocks[key] = plain
            self._blocks.move_to_end(key)
            while len(self._blocks) > self.capacity:
                self._blocks.popitem(last=False)


class ChunkReader:
    """
    Plaintext ranges of chunk objects, through the cache (see the module).

    :param store: a function that returns the object store (it raises when there is none).
    :param cache: the chunk cache, or None to fetch every read (no read-ahead then).
    :param read_ahead: how many whole objects :meth:`prefetch` fetches at once.
    :param opened_blocks: how many opened blocks :meth:`read_cached` keeps in memory.
    """

    log = Logger()

    def __init__(
        self,
        store: Callable[[], Any],
        keys: crypto.FilespaceKeys,
        filespace_id: bytes,
        offload: Offload,
        cache: ChunkCache | None = None,
        read_ahead: int = DEFAULT_READ_AHEAD,
        opened_blocks: int = DEFAULT_OPENED_BLOCKS,
    ) -> None:
        self._store = store
        self.keys = keys
        self.filespace_id = filespace_id
        self.offload = offload
        self.cache = cache
        self.read_ahead = read_ahead if cache is not None else 0
        self._prefetches = defer.DeferredSemaphore(max(1, read_ahead))
        self._fetching: dict[bytes, list[tuple[int, int, defer.Deferred[None]]]] = {}
        self._keeping: set[defer.Deferred[None]] = set()
        self.prefetched = 0
        """Whole objects fetched ahead so far."""
        self.opened = OpenedBlocks(opened_blocks)
        self.served_at_once = 0
        """Ranges :meth:`read_cached` served."""

    def key(self, object_id: bytes) -> str:
        return chunk_object_key(self.filespace_id, object_id)

    # -- reading ------------------------------------------------------------------

    @defer.inlineCallbacks
    def read(
        self, inode: int, index: int, object_id: bytes, object_length: int, low: int, top: int
    ) -> Generator[defer.Deferred[Any], Any, bytes]:
        """Plaintext ``[low, top)`` of chunk ``index`` of ``inode``, held by object ``object_id``."""
        sealed_range = crypto.sealed_range_for(low, top - low, object_length)
        if not sealed_range.object_length:
            return b""
        first, last = _blocks_of(sealed_range)
        cache = self.cache
        if cache is not None:
            yield self._settle(object_id, first, last)
            if cache.has(object_id, first, last):
                plain = yield self._read_cached(inode, index, object_id, object_length, low, top)
                if plain is not None:
                    return plain
            cache.misses += 1
        done = self._begin_fetch(object_id, first, last)
        try:
            sealed = yield self._get(inode, index, object_id, sealed_range.object_start, sealed_range.object_length)
            if last - first < INLINE_OPEN_BLOCKS:
                plain = crypto.open_range(self.keys, inode, index, low, top - low, sealed, object_length)
            else:
                plain = yield self.offload(
                    crypto.open_range, self.keys, inode, index, low, top - low, sealed, object_length
                )
        except BaseException:
            self._end_fetch(object_id, done)
            raise
        if cache is None:
            self._end_fetch(object_id, done)
        else:
            # The reader has its bytes now; readers waiting on this fetch find them cached once kept.
            kept = self._keep(object_id, object_length, sealed_range.object_start, sealed)
            kept.addBoth(lambda _: self._end_fetch(object_id, done))
        return plain

    def read_cached(
        self, inode: int, index: int, object_id: bytes, object_length: int, low: int, top: int
    ) -> bytes | None:
        """
        Plaintext ``[low, top)`` (as :meth:`read`) if its blocks are cached, else None; from any thread.

        None too when the cached copy fails to open (damaged, or evicted and
        being written again): :meth:`read` then sorts it out.
        """
        cache = self.cache
        top = min(top, object_length)
        if cache is None or top <= low:
            return None if cache is None else b""
        size = crypto.BLOCK_SIZE
        first, last = low // size, (top - 1) // size
        blocks = [self.opened.get((inode, index, object_id, block)) for block in range(first, last + 1)]
        missing = [first + n for n, plain in enumerate(blocks) if plain is None]
        if missing:
            low_block, high_block = missing[0], missing[-1]
            if not cache.has(object_id, low_block, high_block):
                return None
            start = crypto.CHUNK_HEADER_SIZE + low_block * crypto.SEALED_BLOCK_SIZE
            length = (
                (high_block - low_block) * crypto.SEALED_BLOCK_SIZE
                + crypto.BLOCK_OVERHEAD + min(size, object_length - high_block * size)
            )
            try:
                sealed = cache.read_sealed(object_id, start, length)
                if len(sealed) != length:
                    return None
                plain = crypto.open_blocks(self.keys, inode, index, low_block, sealed, object_length)
            except (IntegrityError, OSError):
                return None
            cache.used_elsewhere(object_id)
            if (low_block, high_block) == (first, last) and low % size == 0 and (top % size == 0 or top == object_length):
                self.served_at_once += 1
                return plain  # whole blocks, read once as a rule: not kept
            for block in range(low_block, high_block + 1):
                at = (block - low_block) * size
                blocks[block - first] = piece = plain[at : at + size]
                self.opened.put((inode, index, object_id, block), piece)
        else:
            cache.used_elsewhere(object_id)
        self.served_at_once += 1
        skip, end = low - first * size, top - first * size
        if len(blocks) == 1:
            return blocks[0][skip:end]  # type: ignore[index]
        return b"".join(blocks)[skip:end]  # type: ignore[arg-type]

    @defer.inlineCallbacks
    def _read_cached(
        self, inode: int, index: int, object_id: bytes, object_length: int, low: int, top: int
    ) -> Generator[defer.Deferred[Any], Any, bytes | None]:
        """The range from the cached copy; None (the entry dropped) if that copy is damaged or gone."""
        cache = self.cache
        assert cache is not None
        cache.pin(object_id)
        first, last = _blocks_of(crypto.sealed_range_for(low, top - low, object_length))
        try:
            if last - first < INLINE_OPEN_BLOCKS:
                plain = self._open_cached(inode, index, object_id, object_length, low, top)
            else:
                plain = yield self.offload(self._open_cached, inode, index, object_id, object_length, low, top)
        except (IntegrityError, OSError) as error:
            self.log.warn(
                "cached copy of chunk {index} of inode {inode} is damaged ({error}); fetching it again",
                index=index, inode=inode, error=error,
            )
            cache.drop(object_id)
            return None
        finally:
            cache.unpin(object_id)
        cache.touch(object_id)
        return plain  # type: ignore[no-any-return]

    def _open_cached(self, inode: int, index: int, object_id: bytes, object_length: int, low: int, top: int) -> bytes:
        assert self.cache is not None
        sealed_range = crypto.sealed_range_for(low, top - low, object_length)
        sealed = self.cache.read_sealed(object_id, sealed_range.object_start, sealed_range.object_length)
        return crypto.open_range(self.keys, inode, index, low, top - low, sealed, object_length)

    @defer.inlineCallbacks
    def _get(
        self, inode: int, index: int, object_id: bytes, start: int, length: int
    ) -> Generator[defer.Deferred[Any], Any, bytes]:
        key = self.key(object_id)
        try:
            sealed = yield self._store().get_range(key, start, length)
        except NotFound:
            raise IntegrityError(
                f"chunk {index} of inode {inode} (object {key}) is missing from the object store"
            ) from None
        return sealed  # type: ignore[no-any-return]

    # -- fetches in flight ---------------------------------------------------------------

    def _begin_fetch(self, object_id: bytes, first: int, last: int) -> defer.Deferred[None]:
        done: defer.Deferred[None] = defer.Deferred()
        self._fetching.setdefault(object_id, []).append((first, last, done))
        return done

    def _end_fetch(self, object_id: bytes, done: defer.Deferred[None]) -> None:
        fetches = self._fetching.get(object_id, [])
        self._fetching[object_id] = [fetch for fetch in fetches if fetch[2] is not done]
        if not self._fetching[object_id]:
            del self._fetching[object_id]
        done.callback(None)

    def _settle(self, object_id: bytes, first: int, last: int) -> defer.Deferred[Any]:
        """Fires once the fetches now bringing any of blocks ``first`` to ``last`` have ended."""
        waits = [
            done for low, high, done in self._fetching.get(object_id, ())
            if low <= last and first <= high
        ]
        if not waits:
            return defer.succeed(None)
        return defer.DeferredList(self._settle_all(waits))

    @staticmethod
    def _settle_all(fetches: list[defer.Deferred[None]]) -> list[defer.Deferred[None]]:
        """One new Deferred per fetch, fired when it ends (the fetches' own results untouched)."""
        mirrors = []
        for done in fetches:
            mirror: defer.Deferred[None] = defer.Deferred()
            done.addBoth(lambda result, mirror=mirror: (mirror.callback(None), result)[1])
            mirrors.append(mirror)
        return mirrors

    # -- ahead of the reader ---------------------------------------------------------------

    def prefetch(self, inode: int, index: int, object_id: bytes, object_length: int) -> defer.Deferred[None]:
        """Bring the whole object into the cache in the background (nothing if it is there or coming)."""
        cache = self.cache
        if cache is None or not self.read_ahead:
            return defer.succeed(None)
        last = crypto.block_count(object_length) - 1
        if cache.has(object_id, 0, last) or any(
            low == 0 and high == last for low, high, _ in self._fetching.get(object_id, ())
        ):
            return defer.succeed(None)
        done = self._begin_fetch(object_id, 0, last)
        fetched = self._prefetches.run(self._prefetch, inode, index, object_id, object_length)
        fetched.addErrback(lambda failure: self.log.info(
            "fetching chunk {index} of inode {inode} ahead failed: {error}",
            index=index, inode=inode, error=failure.getErrorMessage(),
        ))
        return fetched.addBoth(lambda _: self._end_fetch(object_id, done))

    @defer.inlineCallbacks
    def _prefetch(
        self, inode: int, index: int, object_id: bytes, object_length: int
    ) -> Generator[defer.Deferred[Any], Any, None]:
        assert self.cache is not None
        last = crypto.block_count(object_length) - 1
        if self.cache.has(object_id, 0, last):
            return
        store = self._store()
        if IFileObjectStore.providedBy(store):
            path = yield store.file_of(self.key(object_id))
            if path is not None:
                yield self._adopt_into_cache(object_id, object_length, path)
                self.prefetched += 1
                return
        start = crypto.CHUNK_HEADER_SIZE
        sealed = yield self._get(inode, index, object_id, start, crypto.sealed_chunk_size(object_length) - start)
        yield self._keep(object_id, object_length, start, sealed)
        self.prefetched += 1

    def remember(self, object_id: bytes, object_length: int, sealed: bytes) -> defer.Deferred[None]:
        """Keep a whole sealed object this client has just stored (so reading it back is local)."""
        if self.cache is None:
            return defer.succeed(None)
        return self._keep(object_id, object_length, 0, sealed)

    def remember_file(self, object_id: bytes, object_length: int, path: Path) -> defer.Deferred[None]:
        """Keep a whole sealed object this client has just stored from the file at ``path`` (which never changes)."""
        if self.cache is None:
            return defer.succeed(None)
        return self._track(self._adopt_into_cache(object_id, object_length, path))

    @defer.inlineCallbacks
    def _adopt_into_cache(
        self, object_id: bytes, object_length: int, path: Path
    ) -> Generator[defer.Deferred[Any], Any, None]:
        cache = self.cache
        assert cache is not None
        cache.pin(object_id)
        try:
            yield self.offload(cache.adopt, object_id, path)
            cache.record(object_id, object_length, 0, crypto.sealed_chunk_size(object_length))
        except (OSError, sqlite3.Error) as error:
            self.log.warn("could not keep chunk object {id} in the cache: {error}", id=object_id.hex(), error=error)
        finally:
            cache.unpin(object_id)

    def _keep(self, object_id: bytes, object_length: int, start: int, sealed: bytes) -> defer.Deferred[None]:
        """Write fetched bytes into the cache (the file in the offload pool, then the index here)."""
        return self._track(self._write_into_cache(object_id, object_length, start, sealed))

    def _track(self, keeping: defer.Deferred[None]) -> defer.Deferred[None]:
        """Count ``keeping`` (something written into the cache) in until it is done (see :meth:`idle`)."""
        if not keeping.called:
            self._keeping.add(keeping)
            keeping.addBoth(lambda result: (self._keeping.discard(keeping), result)[1])
        return keeping

    @defer.inlineCallbacks
    def idle(self) -> Generator[defer.Deferred[Any], Any, None]:
        """Fires once nothing is being written into the cache (before the cache is closed)."""
        while self._keeping:
            yield defer.DeferredList(list(self._keeping))

    @defer.inlineCallbacks
    def settled(self) -> Generator[defer.Deferred[Any], Any, None]:
        """Fires once no fetch (read or ahead of the reader) is in flight and nothing is being kept."""
        while self._fetching or self._keeping:
            pending = [done for fetches in self._fetching.values() for _, _, done in fetches]
            yield defer.DeferredList(self._settle_all(pending) + list(self._keeping))

    @defer.inlineCallbacks
    def _write_into_cache(
        self, object_id: bytes, object_length: int, start: int, sealed: bytes
    ) -> Generator[defer.Deferred[Any], Any, None]:
        cache = self.cache
        assert cache is not None
        cache.pin(object_id)
        try:
            yield self.offload(cache.write_sealed, object_id, start, sealed)
            cache.record(object_id, object_length, start, len(sealed))
        except (OSError, sqlite3.Error) as error:
            self.log.warn("could not keep chunk object {id} in the cache: {error}", id=object_id.hex(), error=error)
        finally:
            cache.unpin(object_id)
