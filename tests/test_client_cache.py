"""
The client's chunk cache and read-ahead: sealed chunks on local disk in a
bounded LRU that survives reopening, damaged entries fetched again, readers
of one chunk sharing one fetch, and sequential readers fetched ahead of
(a bounded number at once) where random readers are not.  Against the real
client core, a real metadata server on loopback and a local object store.
"""

from __future__ import annotations

import errno
import itertools
import os
import random
import shutil
from collections.abc import Generator
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from lucidlink import crypto, errors
from lucidlink.chunk_keys import chunk_object_key
from lucidlink.client import cache_folder as cache_folder_module
from lucidlink.client import chunk_cache as chunk_cache_module
from lucidlink.client.cache_folder import CacheFolder
from lucidlink.client.chunk_cache import ChunkCache, default_capacity
from lucidlink.client.chunk_reader import ChunkReader
from lucidlink.client.config import parse_size
from lucidlink.client.filespace import Filespace
from lucidlink.client.readahead import STREAK, SequentialReads
from lucidlink.objectstore.faults import FaultyObjectStore
from lucidlink.objectstore.interface import IFileObjectStore
from tests.cache_helpers import change
from tests.client_helpers import ClientTestCase, MemoryFilespaceCase, synchronous

KEYS = crypto.FilespaceKeys(bytes(32), bytes(16))
CHUNK = 4 * crypto.BLOCK_SIZE
"""The chunk size of these tests: four sealed blocks per chunk."""


def sealed_object(length: int, seed: int, inode: int = 7, index: int = 0) -> tuple[bytes, bytes]:
    """A chunk's plaintext and its sealed object."""
    plain = random.Random(seed).randbytes(length)
    return plain, crypto.seal_chunk(KEYS, inode, index, plain)


FILESPACE_ID = b"\x0f" * 16


@implementer(IFileObjectStore)
class LinkingStore:
    """Objects as files of ``folder`` (given by :meth:`file_of`); ranged gets wait for :meth:`answer_gets`."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.objects: dict[str, bytes] = {}
        self._gets: list[tuple[Deferred[bytes], str, int, int]] = []

    def file_path(self, key: str) -> Path:
        return self.folder / key.replace("/", "_")

    def file_of(self, key: str) -> Deferred[str | None]:
        path = self.file_path(key)
        if not path.exists():
            self.folder.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self.objects[key])
        return defer.succeed(str(path))

    def get_range(self, key: str, start: int, length: int) -> Deferred[bytes]:
        getting: Deferred[bytes] = Deferred()
        self._gets.append((getting, key, start, length))
        return getting

    def answer_gets(self) -> None:
        gets, self._gets = self._gets, []
        for getting, key, start, length in gets:
            getting.callback(self.objects[key][start : start + length])


class ChunkCacheTests(SynchronousTestCase):
    """The cache on its own: what it keeps, what it evicts, what it finds after reopening."""

    def setUp(self) -> None:
        self.folder = Path(self.mktemp())

    def open(self, capacity: int | None) -> ChunkCache:
        cache = ChunkCache(self.folder, capacity)
        self.addCleanup(cache.close)
        return cache

    def test_evicts_least_recently_used_by_size(self) -> None:
        """Past its capacity the cache drops the entries used longest ago, whole, and never the newest."""
        one = len(sealed_object(CHUNK, 0)[1])
        cache = self.open(3 * one + 10)
        ids = [bytes([n]) * 16 for n in range(5)]
        for number, object_id in enumerate(ids[:3]):
            cache.store(object_id, CHUNK, 0, sealed_object(CHUNK, number)[1])
        self.assertEqual(cache.size, 3 * (one - crypto.CHUNK_HEADER_SIZE))
        cache.touch(ids[0])  # now ids[1] is the oldest
        cache.store(ids[3], CHUNK, 0, sealed_object(CHUNK, 3)[1])
        cache.store(ids[4], CHUNK, 0, sealed_object(CHUNK, 4)[1])
        self.assertEqual([object_id in cache for object_id in ids], [True, False, False, True, True])
        self.assertLessEqual(cache.size, cache.capacity)
        self.assertFalse(cache.path_of(ids[1]).exists())
        self.assertEqual(sorted(path.name for path in cache.objects.rglob("*") if path.is_file()),
                         sorted(object_id.hex() for object_id in (ids[0], ids[3], ids[4])))

    def test_pinned_entries_wait(self) -> None:
        """An entry being read is not evicted until it is unpinned."""
        one = len(sealed_object(CHUNK, 0)[1])
        cache = self.open(one)
        first, second = b"\x01" * 16, b"\x02" * 16
        cache.store(first, CHUNK, 0, sealed_object(CHUNK, 1)[1])
        cache.pin(first)
        cache.store(second, CHUNK, 0, sealed_object(CHUNK, 2)[1])
        self.assertIn(first, cache)
        cache.unpin(first)
        self.assertNotIn(first, cache)
        self.assertIn(second, cache)

    def test_blocks_kept_separately(self) -> None:
        """A ranged fetch caches just its blocks; the rest of the object is still missing."""
        cache = self.open(10 * CHUNK)
        _, sealed = sealed_object(3 * crypto.BLOCK_SIZE + 5, 9)
        middle = crypto.sealed_range_for(crypto.BLOCK_SIZE, 10, 3 * crypto.BLOCK_SIZE + 5)
        cache.store(b"\x09" * 16, 3 * crypto.BLOCK_SIZE + 5, middle.object_start,
                    sealed[middle.object_start : middle.object_start + middle.object_length])
        self.assertTrue(cache.has(b"\x09" * 16, 1, 1))
        self.assertFalse(cache.has(b"\x09" * 16, 0, 1))
        self.assertFalse(cache.has(b"\x09" * 16, 1, 3))
        self.assertEqual(cache.size, crypto.SEALED_BLOCK_SIZE)
        self.assertEqual(
            cache.read_sealed(b"\x09" * 16, middle.object_start, middle.object_length),
            sealed[middle.object_start : middle.object_start + middle.object_length],
        )

    def test_adopted_files_are_never_written_into(self) -> None:
        """An adopted file is linked in; bytes written for that object later go into a file of the cache's own."""
        cache = self.open(10 * CHUNK)
        _, sealed = sealed_object(CHUNK, 7)
        source = Path(self.mktemp())
        source.write_bytes(sealed)
        object_id = b"\x07" * 16
        cache.pin(object_id)
        cache.adopt(object_id, source)
        cache.record(object_id, CHUNK, 0, len(sealed))
        self.assertTrue(os.path.samefile(cache.path_of(object_id), source))
        self.assertEqual(cache.read_sealed(object_id, 0, len(sealed)), sealed)
        cache.write_sealed(object_id, 0, b"\0" * 100)
        cache.unpin(object_id)
        self.assertEqual(source.read_bytes(), sealed, "the shared file is untouched")
        self.assertFalse(os.path.samefile(cache.path_of(object_id), source))

    def test_adopted_over_a_partial_file_across_file_systems(self) -> None:
        """An object adopted where the cache holds some of its blocks, from another file system, is copied in."""
        cache = self.open(10 * CHUNK)
        _, sealed = sealed_object(CHUNK, 8)
        source = Path(self.mktemp())
        source.write_bytes(sealed)
        object_id = b"\x08" * 16
        first_block = crypto.CHUNK_HEADER_SIZE + crypto.SEALED_BLOCK_SIZE
        cache.store(object_id, CHUNK, 0, sealed[:first_block])
        link = os.link

        def across_file_systems(source: Any, target: Any) -> None:
            if os.path.exists(target):
                raise FileExistsError(errno.EEXIST, "File exists")
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        self.patch(chunk_cache_module.os, "link", across_file_systems)
        cache.pin(object_id)
        cache.adopt(object_id, source)
        cache.record(object_id, CHUNK, 0, len(sealed))
        cache.unpin(object_id)
        self.patch(chunk_cache_module.os, "link", link)
        self.assertEqual(cache.read_sealed(object_id, 0, len(sealed)), sealed)
        self.assertEqual(cache.path_of(object_id).read_bytes(), sealed)

    def test_block_read_while_its_object_is_linked_in(self) -> None:
        """
        A ranged read of an object whose fetch crossed the link of the whole object keeps the object whole.

        The reader's blocks were written into a file of the cache's own that
        held only them, while the index said the whole object was there.
        """
        cache = self.open(10 * CHUNK)
        plain, sealed = sealed_object(CHUNK, 8)
        object_id = b"\x08" * 16
        store = LinkingStore(Path(self.mktemp()))
        store.objects[chunk_object_key(FILESPACE_ID, object_id)] = sealed
        reader = ChunkReader(lambda: store, KEYS, FILESPACE_ID, synchronous, cache=cache)

        reading = reader.read(7, 0, object_id, CHUNK, 0, crypto.BLOCK_SIZE)  # its ranged get is on its way
        self.successResultOf(reader.prefetch(7, 0, object_id, CHUNK))  # the whole object, linked in
        store.answer_gets()
        self.assertEqual(self.successResultOf(reading), plain[: crypto.BLOCK_SIZE])

        self.assertEqual(cache.read_sealed(object_id, 0, len(sealed)), sealed, "the cached file holds what the index says")
        self.assertEqual(
            reader.read_cached(7, 0, object_id, CHUNK, CHUNK - crypto.BLOCK_SIZE, CHUNK), plain[-crypto.BLOCK_SIZE :]
        )
        self.assertEqual(store.file_path(chunk_object_key(FILESPACE_ID, object_id)).read_bytes(), sealed)

    def test_survives_reopening(self) -> None:
        """Entries, their bytes and their recency are there after closing and opening again."""
        one = len(sealed_object(CHUNK, 0)[1])
        cache = ChunkCache(self.folder, 3 * one)
        ids = [bytes([n]) * 16 for n in range(3)]
        objects = {}
        for number, object_id in enumerate(ids):
            _, objects[object_id] = sealed_object(CHUNK, number)
            cache.store(object_id, CHUNK, 0, objects[object_id])
        cache.touch(ids[0])
        cache.close()
        (self.folder / "objects" / "ff").mkdir()
        (self.folder / "objects" / "ff" / ("ff" * 16)).write_bytes(b"left by a crash")

        again = self.open(3 * one)
        self.assertEqual(len(again), 3)
        self.assertEqual(again.size, cache.size)
        for object_id in ids:
            self.assertEqual(again.read_sealed(object_id, 0, one), objects[object_id])
        self.assertFalse((self.folder / "objects" / "ff" / ("ff" * 16)).exists(), "files the index lacks go")
        again.store(b"\x09" * 16, CHUNK, 0, sealed_object(CHUNK, 9)[1])
        self.assertNotIn(ids[1], again, "the least recently used before closing goes first")
        self.assertIn(ids[0], again)

    def test_smaller_capacity_on_reopening(self) -> None:
        """Opened with less room than it holds, the cache evicts down to it at once."""
        one = len(sealed_object(CHUNK, 0)[1])
        cache = ChunkCache(self.folder, 4 * one)
        for number in range(4):
            cache.store(bytes([number]) * 16, CHUNK, 0, sealed_object(CHUNK, number)[1])
        cache.close()
        again = self.open(2 * one)
        self.assertEqual(len(again), 2)
        self.assertEqual(sorted(again._entries), [b"\x02" * 16, b"\x03" * 16])

    def test_objects_folder_removed_meanwhile(self) -> None:
        """Objects kept after the folder of objects was removed (a cleaner, a person) make it again."""
        cache = self.open(10 * CHUNK)
        shutil.rmtree(self.folder / "objects")
        _, sealed = sealed_object(CHUNK, 3)
        cache.store(b"\x03" * 16, CHUNK, 0, sealed)
        self.assertEqual(cache.read_sealed(b"\x03" * 16, 0, len(sealed)), sealed)

    def test_unusable_index_is_named(self) -> None:
        """An index SQLite cannot open (a full or read-only disk) is a LucidError naming it, not a traceback."""
        (self.folder / "index.sqlite3").mkdir(parents=True)
        with self.assertRaises(errors.LucidError) as caught:
            ChunkCache(self.folder, 1024)
        self.assertIn(str(self.folder / "index.sqlite3"), str(caught.exception))

    def test_damaged_index_is_rebuilt(self) -> None:
        """A damaged index is only a cache's: it is started again empty, and the files it named go."""
        cache = ChunkCache(self.folder, 10 * CHUNK)
        cache.store(b"\x01" * 16, CHUNK, 0, sealed_object(CHUNK, 1)[1])
        cache.close()
        (self.folder / "index.sqlite3").write_bytes(b"not a database" * 1000)
        again = self.open(10 * CHUNK)
        self.assertEqual(len(again), 0)
        self.assertEqual(list(self.folder.glob("objects/*/*")), [])
        again.store(b"\x02" * 16, CHUNK, 0, sealed_object(CHUNK, 2)[1])
        self.assertIn(b"\x02" * 16, again)

    def test_default_capacity_leaves_the_disk_room(self) -> None:
        """
        By default the cache takes half of the room it has (the disk's free space and what it holds), however
        small: the other half is the write-back journals', which fail with ENOSPC when the cache took it all.
        """
        one = len(sealed_object(CHUNK, 0)[1])
        free = [100 * 1024**2]
        self.patch(chunk_cache_module.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(0, 0, free[0]))
        self.assertEqual(default_capacity(self.folder), 50 * 1024**2)
        cache = ChunkCache(self.folder, None)
        self.assertEqual(cache.capacity, 50 * 1024**2)
        for number in range(4):
            cache.store(bytes([number]) * 16, CHUNK, 0, sealed_object(CHUNK, number)[1])
        cache.close()
        held = 4 * (one - crypto.CHUNK_HEADER_SIZE)
        free[0] = one
        again = self.open(None)
        self.assertEqual(again.capacity, (one + held) // 2)
        self.assertEqual(len(again), 2, "what it holds beyond half its room goes at once")

    def test_gives_back_room(self) -> None:
        """Asked for room (the journals' disk is full), the cache drops its least recently used unpinned entries."""
        one = len(sealed_object(CHUNK, 0)[1])
        cache = self.open(10 * one)
        ids = [bytes([n]) * 16 for n in range(4)]
        for number, object_id in enumerate(ids):
            cache.store(object_id, CHUNK, 0, sealed_object(CHUNK, number)[1])
        cache.pin(ids[0])
        self.assertGreaterEqual(cache.give_back(one + 1), one + 1)
        self.assertEqual(sorted(cache._entries), [ids[0], ids[3]], "two went, least recently used, the pinned kept")
        self.assertEqual(sorted(path.name for path in self.folder.glob("objects/*/*")), sorted(i.hex() for i in ids[::3]))
        self.assertEqual(cache.give_back(100 * one), one - crypto.CHUNK_HEADER_SIZE)
        self.assertEqual(list(cache._entries), [ids[0]])

    def test_refusals_and_defaults(self) -> None:
        """A capacity must be positive; the default fits the disk; sizes parse with suffixes."""
        with self.assertRaises(errors.InvalidArgument):
            ChunkCache(self.folder, 0)
        self.assertLessEqual(default_capacity(self.folder / "not" / "yet"), 10 * 1024**3)
        self.assertEqual(parse_size("20G"), 20 * 1024**3)
        self.assertEqual(parse_size("512 MiB"), 512 * 1024**2)
        self.assertEqual(parse_size("1.5k"), 1536)
        self.assertEqual(parse_size("4096"), 4096)
        for bad in ("", "-1G", "10X", "0", "G"):
            with self.assertRaises(errors.InvalidArgument):
                parse_size(bad)


class CacheFolderTests(SynchronousTestCase):
    """A process's slot of a filespace's cache folder."""

    def test_slot_taken_on_a_full_disk(self) -> None:
        """The process id noted in the slot's lock file is only a note: a disk with no room for it does not stop it."""
        root = Path(self.mktemp())

        def no_room(descriptor: int, data: Any) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

        self.patch(cache_folder_module.os, "write", no_room)
        folder = CacheFolder(root)
        self.addCleanup(folder.close)
        self.assertEqual(folder.slot, root / "1")
        second = CacheFolder(root)
        self.addCleanup(second.close)
        self.assertEqual(second.slot, root / "2", "the first slot stays locked")


class SequentialReadsTests(SynchronousTestCase):
    """Telling sequential readers from random ones, and how far ahead to fetch."""

    def test_sequential_reader(self) -> None:
        """After a run of reads in order, the current chunk and ``depth`` more are asked for, each once."""
        reads = SequentialReads(chunk_size=100, depth=3)
        asked: list[int] = []
        for offset in range(0, 1000, 25):
            asked.extend(reads.observe(offset, 25, file_size=1000))
        self.assertTrue(reads.sequential)
        self.assertEqual(asked, list(range(10)))
        first = SequentialReads(100, 3)
        runs = [list(first.observe(offset, 25, 1000)) for offset in range(0, 25 * (STREAK + 1), 25)]
        self.assertEqual(runs[:STREAK], [[]] * STREAK)
        self.assertEqual(runs[STREAK], [0, 1, 2, 3])

    def test_random_reader(self) -> None:
        """Reads that do not follow each other fetch nothing ahead."""
        reads = SequentialReads(chunk_size=100, depth=3)
        shuffled = list(range(0, 10_000, 25))
        random.Random(1).shuffle(shuffled)
        self.assertEqual([offset for offset in shuffled if reads.observe(offset, 25, 10_000)], [])

    def test_jump_starts_again(self) -> None:
        """A seek ends the run; a new run in order asks again from where it is."""
        reads = SequentialReads(chunk_size=100, depth=1)
        for offset in (0, 10, 20):
            reads.observe(offset, 10, 1000)
        self.assertEqual(list(reads.observe(500, 10, 1000)), [])
        self.assertEqual([list(reads.observe(offset, 10, 1000)) for offset in (510, 520)], [[], [5, 6]])
        self.assertEqual(list(SequentialReads(100, 0).observe(0, 10, 1000)), [])


class ConcurrencyCountingStore(FaultyObjectStore):
    """The real store, with the most reads it was ever asked for at once counted (and reads slowed)."""

    def __init__(self, inner: Any, read_delay: float = 0.0) -> None:
        super().__init__(inner)
        self.read_delay = read_delay
        self.in_flight = 0
        self.most_in_flight = 0

    def get_range(self, key: str, start: int, length: int) -> Deferred[bytes]:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)

        def ended(result: Any) -> Any:
            self.in_flight -= 1
            return result

        slowed = task.deferLater(reactor, self.read_delay, lambda: None) if self.read_delay else defer.succeed(None)
        return slowed.addCallback(lambda _: super(ConcurrencyCountingStore, self).get_range(key, start, length)).addBoth(ended)

    def reads(self) -> list[str]:
        return [key for operation, key in self.calls if operation in ("get", "get_range")]


class CachedReadTests(ClientTestCase):
    """Reading through the cache with the real client core."""

    chunk_size = CHUNK

    CHUNKS = 12

    @defer.inlineCallbacks
    def setUp(self) -> Generator[Deferred[Any], Any, None]:
        yield super().setUp()
        self.cache_dir = self.base / "cache"
        self.content = random.Random(5).randbytes(self.CHUNKS * CHUNK - 1000)
        writer = yield self.filespace()
        yield writer.write_file("/big.bin", self.content)

    @defer.inlineCallbacks
    def cached(self, store: Any = None, **options: Any) -> Generator[Deferred[Any], Any, Filespace]:
        """A new client (its own session) with a cache in ``cache_dir``: a mount, or a remount."""
        session = yield self.login()
        fs = Filespace(session, store or self.objects, cache_dir=self.cache_dir, **options)
        self.addCleanup(fs.close)
        return fs

    @defer.inlineCallbacks
    def read_all(self, fs: Filespace, step: int = 128 * 1024) -> Generator[Deferred[Any], Any, bytes]:
        handle = yield fs.open_path("/big.bin")
        pieces = []
        for offset in range(0, len(self.content), step):
            pieces.append((yield handle.read(offset, step)))
        yield handle.close()
        return b"".join(pieces)

    @defer.inlineCallbacks
    def test_remount_reads_from_cache(self) -> Generator[Deferred[Any], Any, None]:
        """Read once, the file comes from the cache after closing and opening the cache again."""
        first_store = ConcurrencyCountingStore(self.objects)
        fs = yield self.cached(first_store, read_ahead=0)
        self.assertEqual((yield self.read_all(fs)), self.content)
        self.assertTrue(first_store.reads())
        yield fs.close()

        store = ConcurrencyCountingStore(self.objects)
        again = yield self.cached(store)
        self.assertEqual((yield self.read_all(again, step=10_000)), self.content)
        self.assertEqual(store.reads(), [], "nothing fetched: every block was in the cache")
        self.assertGreater(again.cache.hits, 0)

    @defer.inlineCallbacks
    def test_cache_holds_no_plaintext(self) -> Generator[Deferred[Any], Any, None]:
        """What the cache folder holds is ciphertext: no 64-byte run of the file is in it."""
        fs = yield self.cached()
        self.assertEqual((yield self.read_all(fs)), self.content)
        handle = yield fs.open_path("/new.bin", os.O_WRONLY | os.O_CREAT)
        yield handle.write(0, self.content[: 3 * CHUNK])  # journaled, not yet committed
        on_disk = b"".join(path.read_bytes() for path in self.cache_dir.rglob("*") if path.is_file())
        self.assertGreater(len(on_disk), len(self.content))
        for start in range(0, len(self.content) - 64, len(self.content) // 50):
            self.assertNotIn(self.content[start : start + 64], on_disk)
        yield handle.close()

    @defer.inlineCallbacks
    def test_ranged_reads_open_only_their_blocks(self) -> Generator[Deferred[Any], Any, None]:
        """A small read of a cached chunk reads and opens the one or two 64 KiB blocks it needs, not the chunk."""
        fs = yield self.cached()
        self.assertEqual((yield self.read_all(fs)), self.content)
        cache = fs.cache
        assert cache is not None
        read_lengths: list[int] = []
        read_sealed = cache.read_sealed

        def recording(object_id: bytes, start: int, length: int) -> bytes:
            read_lengths.append(length)
            return read_sealed(object_id, start, length)

        self.patch(cache, "read_sealed", recording)
        handle = yield fs.open_path("/big.bin")
        for offset, blocks in ((5 * CHUNK + crypto.BLOCK_SIZE - 100, 2), (7 * CHUNK + 10, 1)):
            self.assertEqual((yield handle.read(offset, 200)), self.content[offset : offset + 200])
            self.assertEqual(read_lengths[-1], blocks * crypto.SEALED_BLOCK_SIZE)
        yield handle.close()
        self.assertEqual(len(read_lengths), 2)

    @defer.inlineCallbacks
    def test_damaged_entry_is_fetched_again(self) -> Generator[Deferred[Any], Any, None]:
        """A cached chunk altered on disk fails its tag: it is dropped and fetched again, never returned."""
        fs = yield self.cached(ConcurrencyCountingStore(self.objects))  # copies: the local store's files are linked
        self.assertEqual((yield self.read_all(fs)), self.content)
        yield fs.inodes.chunks.settled()  # no fetch ahead is still writing into a victim
        cache = fs.cache
        assert cache is not None
        victims = sorted(cache.objects.rglob("*"))
        victims = [path for path in victims if path.is_file()]
        self.assertEqual(len(victims), self.CHUNKS)
        for path in victims[:3]:
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x40
            path.write_bytes(bytes(data))
        victims[3].write_bytes(victims[3].read_bytes()[:1000])  # cut short
        store = ConcurrencyCountingStore(self.objects)
        fs.inodes.chunks._store = lambda: store
        self.assertEqual((yield self.read_all(fs)), self.content)
        yield fs.inodes.chunks.settled()
        self.assertEqual(len(set(store.reads())), 4, "the four damaged chunks, and only they, were fetched again")
        store.calls.clear()
        self.assertEqual((yield self.read_all(fs)), self.content)
        self.assertEqual(store.reads(), [], "the fetched copies replaced the damaged ones")

    @defer.inlineCallbacks
    def test_damaged_everywhere_fails(self) -> Generator[Deferred[Any], Any, None]:
        """When the store's copy is damaged too, the read fails with IntegrityError."""
        store = FaultyObjectStore(self.objects)
        fs = yield self.cached(store, read_ahead=0)
        store.corrupt_always()
        handle = yield fs.open_path("/big.bin")
        with self.assertRaises(errors.IntegrityError):
            yield handle.read(0, 100)
        yield handle.close()
        self.assertEqual(len(fs.cache), 0, "nothing that failed to open is cached")

    @defer.inlineCallbacks
    def test_concurrent_readers_share_fetches(self) -> Generator[Deferred[Any], Any, None]:
        """Many readers of the same blocks at once: all get the right bytes, the store is asked once."""
        store = ConcurrencyCountingStore(self.objects, read_delay=0.05)
        fs = yield self.cached(store, read_ahead=0)
        handles = yield defer.gatherResults([fs.open_path("/big.bin") for _ in range(8)])
        offset = 2 * CHUNK + 10
        results = yield defer.gatherResults([handle.read(offset, 5000) for handle in handles])
        self.assertEqual(results, [self.content[offset : offset + 5000]] * 8)
        self.assertEqual(len(store.reads()), 1)
        readers = [(handle, random.Random(n)) for n, handle in enumerate(handles)]

        @defer.inlineCallbacks
        def wander(handle: Any, rng: random.Random) -> Generator[Deferred[Any], Any, None]:
            for _ in range(20):
                at = rng.randrange(len(self.content))
                got = yield handle.read(at, 3000)
                self.assertEqual(got, self.content[at : at + 3000])

        yield defer.gatherResults([wander(handle, rng) for handle, rng in readers])
        yield defer.gatherResults([handle.close() for handle in handles])


class ReadAheadTests(ClientTestCase):
    """Sequential readers are fetched ahead of, in parallel and bounded; random readers are not."""

    chunk_size = CHUNK

    CHUNKS = 16

    @defer.inlineCallbacks
    def setUp(self) -> Generator[Deferred[Any], Any, None]:
        yield super().setUp()
        self.content = random.Random(6).randbytes(self.CHUNKS * CHUNK)
        writer = yield self.filespace()
        yield writer.write_file("/stream.bin", self.content)

    @defer.inlineCallbacks
    def reader(self, store: Any, read_ahead: int) -> Generator[Deferred[Any], Any, Filespace]:
        session = yield self.login()
        fs = Filespace(session, store, cache_dir=self.base / f"cache-{read_ahead}", read_ahead=read_ahead)
        self.addCleanup(fs.close)
        return fs

    @defer.inlineCallbacks
    def test_sequential_reader_is_fetched_ahead(self) -> Generator[Deferred[Any], Any, None]:
        """Whole chunks ahead are fetched, at most ``read_ahead`` at once, and the reader meets them cached."""
        store = ConcurrencyCountingStore(self.objects, read_delay=0.02)
        fs = yield self.reader(store, read_ahead=3)
        handle = yield fs.open_path("/stream.bin")
        step = 16 * 1024
        pieces = []
        for offset in range(0, len(self.content), step):
            pieces.append((yield handle.read(offset, step)))
            if offset == 4 * step:
                yield task.deferLater(reactor, 0.3, lambda: None)
                # the reader is in chunk 0: chunks 0 to 3 have been fetched ahead, no further
                self.assertEqual(fs.inodes.chunks.prefetched, 4)
        yield handle.close()
        self.assertEqual(b"".join(pieces), self.content)
        self.assertEqual(fs.inodes.chunks.prefetched, self.CHUNKS)
        self.assertLessEqual(store.most_in_flight, 3 + 1, "read-ahead plus the reader's own fetch")
        self.assertGreaterEqual(store.most_in_flight, 2, "fetches ran in parallel")
        reads_per_chunk = len(store.reads()) / self.CHUNKS
        self.assertLess(reads_per_chunk, 1.5, "about one fetch per chunk, not one per read")
        self.assertGreater(fs.cache.hits, len(pieces) // 2)

    @defer.inlineCallbacks
    def test_local_store_files_are_linked(self) -> Generator[Deferred[Any], Any, None]:
        """From a store that gives files (the local one), chunks fetched ahead are its files, linked, not copies."""
        fs = yield self.reader(self.objects, read_ahead=2)
        handle = yield fs.open_path("/stream.bin")
        step = 128 * 1024
        pieces = []
        for offset in range(0, len(self.content), step):
            pieces.append((yield handle.read(offset, step)))
        yield handle.close()
        self.assertEqual(b"".join(pieces), self.content)
        self.assertGreaterEqual(fs.inodes.chunks.prefetched, self.CHUNKS - 1)
        stored = {path.name: path for path in (self.base / "objects").rglob("*") if path.is_file()}
        cached = [path for path in (self.base / "cache-2").rglob("*") if path.is_file() and path.name in stored]
        linked = [path for path in cached if os.path.samefile(path, stored[path.name])]
        self.assertEqual(len(cached), self.CHUNKS)
        self.assertGreaterEqual(len(linked), self.CHUNKS - 1, "all but the first, which the reader fetched itself")

    @defer.inlineCallbacks
    def test_random_reader_is_not(self) -> Generator[Deferred[Any], Any, None]:
        """Random reads fetch what they read and nothing more."""
        store = ConcurrencyCountingStore(self.objects)
        fs = yield self.reader(store, read_ahead=4)
        handle = yield fs.open_path("/stream.bin")
        rng = random.Random(3)
        for _ in range(20):
            at = rng.randrange(len(self.content) - 4096)
            self.assertEqual((yield handle.read(at, 4096)), self.content[at : at + 4096])
        yield handle.close()
        self.assertEqual(fs.inodes.chunks.prefetched, 0)
        self.assertLess(fs.cache.size, len(self.content) // 2, "only the blocks read were fetched")

    @defer.inlineCallbacks
    def test_no_read_ahead(self) -> Generator[Deferred[Any], Any, None]:
        """``read_ahead`` 0: a sequential reader is served block by block, nothing fetched ahead."""
        store = ConcurrencyCountingStore(self.objects)
        fs = yield self.reader(store, read_ahead=0)
        handle = yield fs.open_path("/stream.bin")
        pieces = []
        for offset in range(0, len(self.content), 16 * 1024):
            pieces.append((yield handle.read(offset, 16 * 1024)))
        yield handle.close()
        self.assertEqual(b"".join(pieces), self.content)
        self.assertEqual(fs.inodes.chunks.prefetched, 0)
        self.assertEqual(store.most_in_flight, 1)


class ReadAheadLatencyTests(MemoryFilespaceCase):
    """
    On a store one second away (an injected clock), a sequential reader waits
    about a round trip per ``read_ahead`` chunks, not one per chunk or per block.
    """

    chunk_size = CHUNK
    CHUNKS = 16

    @defer.inlineCallbacks
    def waited(self, read_ahead: int) -> Generator[Deferred[Any], Any, float]:
        """Seconds of store latency a reader of the whole file, 16 KiB at a time, spent waiting."""
        clock = Clock()
        store = FaultyObjectStore(self.objects, clock=clock)
        store.set_delay(1.0)
        memory, self.objects = self.objects, store
        try:
            fs = yield self.memory_filespace(cache_dir=Path(self.mktemp()), read_ahead=read_ahead)
        finally:
            self.objects = memory
        self.addCleanup(fs.close)
        handle = self.now(fs.open_path("/stream.bin"))
        waited = 0.0
        pieces = []
        for offset in range(0, len(self.content), 16 * 1024):
            reading = handle.read(offset, 16 * 1024)
            while not reading.called:
                clock.advance(0.25)
                waited += 0.25
            pieces.append(self.now(reading))
        self.assertEqual(b"".join(pieces), self.content)
        return waited

    @defer.inlineCallbacks
    def test_streaming_waits_per_read_ahead_not_per_chunk(self) -> Generator[Deferred[Any], Any, None]:
        """Without read-ahead every block costs a round trip; with 4, about one per 4 chunks."""
        self.content = random.Random(8).randbytes(self.CHUNKS * CHUNK)
        self.now(self.fs.write_file("/stream.bin", self.content))
        without = yield self.waited(read_ahead=0)
        with_four = yield self.waited(read_ahead=4)
        self.assertGreaterEqual(without, self.CHUNKS * CHUNK // crypto.BLOCK_SIZE)
        self.assertLessEqual(with_four, self.CHUNKS / 4 + 2, (without, with_four))


class CacheSettingsTests(SynchronousTestCase):
    """``--cache-dir``, ``--cache-size`` and ``--read-ahead``: option, then environment, then file, then default."""

    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.base.mkdir()
        self.config = self.base / "client.ini"
        self.environ = {"HOME": str(self.base / "home")}

    def load(self, text: str = "", **overrides: Any) -> Any:
        from lucidlink.client.config import load_config

        self.config.write_text("[client]\n" + text)
        return load_config(self.config, overrides=overrides, environ=self.environ)

    def test_sources(self) -> None:
        """Defaults, the file, the environment and the command line, each over the last."""
        config = self.load()
        self.assertEqual((config.cache_size, config.read_ahead), (None, 4))
        config = self.load("cache_size = 2G\nread_ahead = 8\ncache_dir = here\n")
        self.assertEqual((config.cache_size, config.read_ahead, config.cache_dir), (2 * 1024**3, 8, self.base / "here"))
        self.environ.update(LUCID_CACHE_SIZE="300M", LUCID_READ_AHEAD="0")
        config = self.load("cache_size = 2G\nread_ahead = 8\n")
        self.assertEqual((config.cache_size, config.read_ahead), (300 * 1024**2, 0))
        config = self.load("cache_size = 2G\n", cache_size="1T", read_ahead="2")
        self.assertEqual((config.cache_size, config.read_ahead), (1024**4, 2))

    def test_errors_name_their_source(self) -> None:
        """A bad value is refused, saying which setting and where it came from."""
        with self.assertRaises(errors.InvalidArgument) as caught:
            self.load("cache_size = lots\n")
        self.assertIn(f"cache_size from [client] of {self.config}", str(caught.exception))
        self.assertIn("'lots' is not a size", str(caught.exception))
        self.environ["LUCID_READ_AHEAD"] = "-1"
        with self.assertRaises(errors.InvalidArgument) as caught:
            self.load()
        self.assertIn("read_ahead from LUCID_READ_AHEAD: -1 is negative", str(caught.exception))
        with self.assertRaises(errors.InvalidArgument) as caught:
            self.load(read_ahead="four")
        self.assertIn("read_ahead from the command line", str(caught.exception))

    def test_mount_options(self) -> None:
        """``lucid-mount`` reads its cache options through the same settings."""
        from lucidlink.cli import mount as cli_mount

        self.config.write_text("[client]\ncache_size = 5G\n")
        args = cli_mount.build_parser().parse_args([
            "demo", str(self.base), "--config", str(self.config), "--cache-dir", str(self.base / "c"),
            "--read-ahead", "6",
        ])
        settings = cli_mount.cache_settings(args)
        self.assertEqual(settings, cli_mount.CacheSettings(self.base / "c", 5 * 1024**3, 6))
        args.cache_size = "5 bananas"
        with self.assertRaises(errors.InvalidArgument):
            cli_mount.cache_settings(args)


model_steps = st.lists(st.one_of(
    st.tuples(st.just("write"), st.integers(0, 6 * CHUNK), st.integers(1, 2 * CHUNK), st.integers(0, 99)),
    st.tuples(st.just("truncate"), st.integers(0, 6 * CHUNK)),
    st.tuples(st.just("read"), st.integers(0, 7 * CHUNK), st.integers(0, 2 * CHUNK)),
    st.tuples(st.just("flush-and-stream")),
), max_size=12)


class CachedModelTests(MemoryFilespaceCase):
    """Through the cache, the journal and read-ahead, a file still behaves like a bytearray."""

    chunk_size = CHUNK

    @settings(max_examples=int(os.environ.get("LUCID_MODEL_EXAMPLES", 30)), deadline=None)
    @given(model_steps)
    def test_file_matches_model(self, steps: list[tuple[Any, ...]]) -> None:
        """Writes, cuts, reads (also at once when they can be), and after each flush a reader that streams the file."""
        fs = Filespace(self.fs.session, self.objects, cache_dir=Path(self.mktemp()), cache_size=3 * CHUNK,
                       read_ahead=2, offload=self.fs.inodes.offload)
        self.addCleanup(fs.close)
        handle = self.now(fs.inodes.create(1, next(NAMES), 0o644, os.O_RDWR | os.O_CREAT | os.O_EXCL))
        model = bytearray()
        for step in steps:
            changed = change(handle, model, step)
            if changed is not None:
                self.now(changed)
            elif step[0] == "read":
                _, offset, length = step
                self.assertEqual(self.now(handle.read(offset, length)), bytes(model[offset : offset + length]))
                at_once = handle.read_cached(offset, length)
                if at_once is not None:
                    self.assertEqual(at_once, bytes(model[offset : offset + length]))
            else:
                self.now(handle.flush())
                reader = self.now(fs.inodes.open(handle.inode, os.O_RDONLY))
                pieces = [self.now(reader.read(at, 16 * 1024)) for at in range(0, len(model) + 1, 16 * 1024)]
                self.assertEqual(b"".join(pieces), bytes(model))
                at_once = reader.read_cached(0, len(model) + 1)
                self.assertIn(at_once, (None, bytes(model)))
                self.now(reader.close())
            assert fs.cache is not None
            self.assertLessEqual(fs.cache.size, 3 * CHUNK + crypto.SEALED_BLOCK_SIZE * 4)
        self.now(handle.close())
        self.now(fs.close())


NAMES = (f"cached-{number}".encode() for number in itertools.count())
