"""
Reads served at once from any thread (``FileHandle.read_cached``): only
what is known and cached, always the bytes a read through the reactor gives,
and nothing once the file is being changed here or was changed elsewhere,
its chunks evicted or their cached copies damaged.  Against the real client
core, a metadata server answering in memory, and an in-memory object store.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from lucidlink import crypto
from lucidlink.client.chunk_reader import OpenedBlocks
from lucidlink.client.filespace import Filespace
from lucidlink.client.readahead import STREAK
from tests.client_helpers import MemoryFilespaceCase

CHUNK = 4 * crypto.BLOCK_SIZE
"""The chunk size of these tests: four sealed blocks per chunk."""
SEALED_CHUNK = CHUNK + 4 * crypto.BLOCK_OVERHEAD
"""What a whole chunk takes in the cache."""


class ReadCachedTests(MemoryFilespaceCase):
    """``read_cached`` against ``read`` of the same handle."""

    chunk_size = CHUNK
    CHUNKS = 6

    def setUp(self) -> Any:
        done = super().setUp()

        def written(_: object) -> None:
            self.content = random.Random(11).randbytes(self.CHUNKS * CHUNK - 1000)
            self.now(self.fs.write_file("/file.bin", self.content))

        return done.addCallback(written)

    @defer.inlineCallbacks
    def reader(self, **options: Any) -> Generator[Deferred[Any], Any, Filespace]:
        """Another client with a chunk cache of its own."""
        options.setdefault("read_ahead", 0)
        fs = yield self.memory_filespace(cache_dir=Path(self.mktemp()), **options)
        self.addCleanup(fs.close)
        return fs

    def open(self, fs: Filespace, flags: int = os.O_RDONLY) -> Any:
        handle = self.now(fs.open_path("/file.bin", flags))
        self.addCleanup(lambda: handle.closed or self.now(handle.close()))
        return handle

    def read_through(self, handle: Any, offset: int = 0, size: int | None = None) -> bytes:
        """A read through the reactor (every chunk of the file by default)."""
        return self.now(handle.read(offset, self.CHUNKS * CHUNK if size is None else size))  # type: ignore[no-any-return]

    def reads_of(self, fs: Filespace) -> list[int]:
        """Count the sealed reads of ``fs``'s cache file from now on; the list grows with each."""
        cache = fs.cache
        assert cache is not None
        lengths: list[int] = []
        read_sealed = cache.read_sealed

        def counted(object_id: bytes, start: int, length: int) -> bytes:
            lengths.append(length)
            return read_sealed(object_id, start, length)

        self.patch(cache, "read_sealed", counted)
        return lengths

    @defer.inlineCallbacks
    def test_serves_what_a_read_left_known_and_cached(self) -> Generator[Deferred[Any], Any, None]:
        """After one read through the reactor, any range reads at once, as ``read`` gives it."""
        fs = yield self.reader()
        handle = self.open(fs)
        self.assertIsNone(handle.read_cached(0, 10), "nothing is known before a read")
        self.assertEqual(self.read_through(handle), self.content)
        gets = self.objects.gets
        ranges = [
            (0, 4096), (CHUNK - 100, 200), (crypto.BLOCK_SIZE - 1, 2), (2 * CHUNK + 7, 3 * CHUNK),
            (len(self.content) - 10, 4096), (len(self.content), 10), (len(self.content) + 5000, 10),
            (3 * CHUNK, 0), (0, len(self.content) + 1),
        ]
        served_before = fs.inodes.chunks.served_at_once
        for offset, size in ranges:
            self.assertEqual(handle.read_cached(offset, size), self.content[offset : offset + size], (offset, size))
        self.assertGreater(fs.inodes.chunks.served_at_once, served_before)
        self.assertEqual(self.objects.gets, gets, "nothing fetched")
        self.assertIsNone(handle.read_cached(-1, 10))

    @defer.inlineCallbacks
    def test_holes_read_as_zeros(self) -> Generator[Deferred[Any], Any, None]:
        """Chunks never written, and bytes past a chunk's length, read as zeros at once too."""
        sparse = self.now(self.fs.open_path("/sparse.bin", os.O_RDWR | os.O_CREAT))
        self.now(sparse.write(3 * CHUNK + 10, b"tail"))
        self.now(sparse.close())
        fs = yield self.reader()
        handle = self.now(fs.open_path("/sparse.bin"))
        expected = bytes(3 * CHUNK + 10) + b"tail"
        self.assertEqual(self.read_through(handle), expected)
        for offset, size in ((0, 10), (CHUNK - 5, 2 * CHUNK), (3 * CHUNK, 100), (2 * CHUNK, 2 * CHUNK)):
            self.assertEqual(handle.read_cached(offset, size), expected[offset : offset + size], (offset, size))
        self.now(handle.close())
        self.assertIsNone(handle.read_cached(0, 10), "a closed handle serves nothing")

    @defer.inlineCallbacks
    def test_only_cached_chunks(self) -> Generator[Deferred[Any], Any, None]:
        """A chunk not in the cache is not served: the caller reads it through the reactor."""
        fs = yield self.reader()
        handle = self.open(fs)
        self.assertEqual(self.read_through(handle, 0, 100), self.content[:100])
        self.assertEqual(handle.read_cached(10, 50), self.content[10:60])
        self.assertIsNone(handle.read_cached(2 * CHUNK, 50))
        self.assertIsNone(handle.read_cached(CHUNK - 10, 50), "half of it is in a chunk not cached")
        self.assertIsNone(handle.read_cached(crypto.BLOCK_SIZE, 50), "a block of a cached chunk not fetched")

    @defer.inlineCallbacks
    def test_pending_writes_and_cuts_go_through_the_reactor(self) -> Generator[Deferred[Any], Any, None]:
        """From a write or a cut until the commit and the next read, nothing is served at once."""
        fs = yield self.reader()
        handle = self.open(fs, os.O_RDWR)
        model = bytearray(self.content)
        self.assertEqual(self.read_through(handle), self.content)
        writing = handle.write(CHUNK + 5, b"new bytes")
        self.assertIsNone(handle.read_cached(CHUNK, 100), "the write is being made")
        self.now(writing)
        model[CHUNK + 5 : CHUNK + 14] = b"new bytes"
        self.assertIsNone(handle.read_cached(0, 100), "written and not committed")
        self.assertEqual(self.read_through(handle), bytes(model))
        self.assertIsNone(handle.read_cached(0, 100), "a read does not publish a file with writes pending")
        self.now(handle.flush())
        self.assertIsNone(handle.read_cached(0, 100))
        self.assertEqual(self.read_through(handle, 0, 10), bytes(model[:10]))
        self.assertEqual(handle.read_cached(CHUNK, 100), bytes(model[CHUNK : CHUNK + 100]))

        self.now(handle.truncate(CHUNK + 10))
        del model[CHUNK + 10 :]
        self.assertIsNone(handle.read_cached(0, 10), "cut and not committed")
        self.assertEqual(self.read_through(handle), bytes(model))
        self.now(handle.flush())
        self.assertEqual(self.read_through(handle), bytes(model))
        self.assertEqual(handle.read_cached(CHUNK, CHUNK), bytes(model[CHUNK:]))
        self.assertEqual(handle.read_cached(2 * CHUNK, 10), b"")

        self.now(handle.write(5 * CHUNK, b"grown"))
        self.now(handle.flush())
        model.extend(bytes(5 * CHUNK - len(model)) + b"grown")
        self.assertEqual(self.read_through(handle), bytes(model))
        self.assertEqual(handle.read_cached(CHUNK, 5 * CHUNK), bytes(model[CHUNK:]))

    @defer.inlineCallbacks
    def test_another_clients_change(self) -> Generator[Deferred[Any], Any, None]:
        """Told that another client committed, the handle serves nothing until a read brings the new map."""
        fs = yield self.reader()
        handle = self.open(fs)
        self.assertEqual(self.read_through(handle), self.content)
        writer = self.now(self.fs.open_path("/file.bin", os.O_RDWR))
        self.now(writer.write(2 * CHUNK, b"changed elsewhere"))
        self.assertEqual(handle.read_cached(2 * CHUNK, 17), self.content[2 * CHUNK : 2 * CHUNK + 17],
                         "not committed yet: the old content stands")
        self.now(writer.close())
        self.assertIsNone(handle.read_cached(2 * CHUNK, 17), "the notification hid what was known")
        self.assertEqual(self.read_through(handle, 2 * CHUNK, 17), b"changed elsewhere")
        self.assertEqual(handle.read_cached(2 * CHUNK, 17), b"changed elsewhere")
        self.assertEqual(handle.read_cached(0, 100), self.content[:100])

    @defer.inlineCallbacks
    def test_truncation_by_setattr(self) -> Generator[Deferred[Any], Any, None]:
        """A size set through the inodes (``truncate(2)`` on a path) hides what was known."""
        fs = yield self.reader()
        handle = self.open(fs)
        self.assertEqual(self.read_through(handle), self.content)
        self.now(fs.inodes.setattr(handle.inode, size=100))
        self.assertIsNone(handle.read_cached(0, 200))
        self.assertEqual(self.read_through(handle, 0, 200), self.content[:100])
        self.assertEqual(handle.read_cached(0, 200), self.content[:100])

    @defer.inlineCallbacks
    def test_evicted_chunks_are_not_served(self) -> Generator[Deferred[Any], Any, None]:
        """An evicted chunk is read through the reactor (and fetched again); one evicted mid-read too."""
        fs = yield self.reader(cache_size=2 * SEALED_CHUNK)
        handle = self.open(fs)
        self.assertEqual(self.read_through(handle), self.content)
        cache = fs.cache
        assert cache is not None
        self.assertEqual(len(cache), 2)
        self.assertIsNone(handle.read_cached(0, 100), "chunk 0 was evicted")
        last = (self.CHUNKS - 1) * CHUNK
        self.assertEqual(handle.read_cached(last, 100), self.content[last : last + 100])

        read_sealed = cache.read_sealed

        def evicted_first(object_id: bytes, start: int, length: int) -> bytes:
            cache.drop(object_id)
            return read_sealed(object_id, start, length)

        self.patch(cache, "read_sealed", evicted_first)
        self.assertIsNone(handle.read_cached(last - CHUNK + crypto.BLOCK_SIZE, 100))
        self.assertEqual(self.read_through(handle, last - CHUNK, 100), self.content[last - CHUNK : last - CHUNK + 100])

    @defer.inlineCallbacks
    def test_uses_keep_entries(self) -> Generator[Deferred[Any], Any, None]:
        """An entry read at once counts as used: eviction takes the one read longest ago."""
        fs = yield self.reader(cache_size=2 * SEALED_CHUNK + 10)
        handle = self.open(fs)
        self.assertEqual(self.read_through(handle, 0, 2 * CHUNK), self.content[: 2 * CHUNK])
        self.assertEqual(handle.read_cached(10, 10), self.content[10:20])  # chunk 0 is now the newest
        self.assertEqual(self.read_through(handle, 2 * CHUNK, 10), self.content[2 * CHUNK : 2 * CHUNK + 10])
        self.assertEqual(handle.read_cached(20, 10), self.content[20:30], "chunk 0 stayed")
        self.assertIsNone(handle.read_cached(CHUNK, 10), "chunk 1 went")

    @defer.inlineCallbacks
    def test_damaged_copy_is_never_served(self) -> Generator[Deferred[Any], Any, None]:
        """A cached block altered on disk fails its tag: not served, then dropped and fetched through the reactor."""
        fs = yield self.reader()
        handle = self.open(fs)
        self.assertEqual(self.read_through(handle), self.content)
        cache = fs.cache
        assert cache is not None
        object_id = handle.file._map[1].object_id
        path = cache.path_of(object_id)
        data = bytearray(path.read_bytes())
        data[crypto.CHUNK_HEADER_SIZE + crypto.BLOCK_SIZE // 2] ^= 1
        path.write_bytes(bytes(data))
        self.assertIsNone(handle.read_cached(CHUNK + 10, 100))
        self.assertIn(object_id, cache, "the reader in another thread does not drop it; the reactor does")
        self.assertEqual(self.read_through(handle, CHUNK + 10, 100), self.content[CHUNK + 10 : CHUNK + 110])
        self.assertEqual(handle.read_cached(CHUNK + 10, 100), self.content[CHUNK + 10 : CHUNK + 110])
        path.write_bytes(path.read_bytes()[:1000])  # cut short, under a block already opened
        self.assertEqual(handle.read_cached(CHUNK + 10, 100), self.content[CHUNK + 10 : CHUNK + 110],
                         "an opened block is served from memory: it passed its tag")
        self.assertIsNone(handle.read_cached(CHUNK + 3 * crypto.BLOCK_SIZE, 100), "a block past the cut")

    @defer.inlineCallbacks
    def test_small_reads_open_a_block_once(self) -> Generator[Deferred[Any], Any, None]:
        """Sixteen 4 KiB reads within one 64 KiB block read and open it once; whole blocks are not kept."""
        fs = yield self.reader()
        handle = self.open(fs)
        self.assertEqual(self.read_through(handle), self.content)
        lengths = self.reads_of(fs)
        block = 2 * CHUNK + crypto.BLOCK_SIZE
        for page in range(16):
            at = block + page * 4096
            self.assertEqual(handle.read_cached(at, 4096), self.content[at : at + 4096])
        self.assertEqual(lengths, [crypto.SEALED_BLOCK_SIZE])
        self.assertEqual(handle.read_cached(block - 10, 20), self.content[block - 10 : block + 10])
        self.assertEqual(lengths[1:], [crypto.SEALED_BLOCK_SIZE], "only the block before was read")
        kept = len(fs.inodes.chunks.opened)
        whole = 3 * CHUNK
        self.assertEqual(handle.read_cached(whole, 2 * crypto.BLOCK_SIZE), self.content[whole : whole + 2 * crypto.BLOCK_SIZE])
        self.assertEqual(len(fs.inodes.chunks.opened), kept, "whole blocks read in full are not kept")

    @defer.inlineCallbacks
    def test_sequential_reader_is_fetched_ahead(self) -> Generator[Deferred[Any], Any, None]:
        """Reads served at once tell read-ahead too, which fetches the next chunks on the reactor."""
        fs = yield self.reader(read_ahead=2)
        handle = self.open(fs)
        scheduled: list[Any] = []
        fs.inodes.call_in_reactor = lambda function, *arguments: scheduled.append((function, arguments))
        self.assertEqual(self.read_through(handle, 0, 4096), self.content[:4096])
        self.now(fs.inodes.chunks.settled())
        self.assertEqual(fs.inodes.chunks.prefetched, 0)
        offset = 4096
        for _ in range(STREAK + 1):
            self.assertEqual(handle.read_cached(offset, 4096), self.content[offset : offset + 4096])
            offset += 4096
        self.assertEqual(len(scheduled), 1, scheduled)
        function, arguments = scheduled.pop()
        function(*arguments)
        self.now(fs.inodes.chunks.settled())
        self.assertEqual(fs.inodes.chunks.prefetched, 3, "chunks 0 to 2")
        self.assertEqual(handle.read_cached(2 * CHUNK, 100), self.content[2 * CHUNK : 2 * CHUNK + 100])

    @defer.inlineCallbacks
    def test_racing_changes_and_evictions(self) -> Generator[Deferred[Any], Any, None]:
        """
        Threads reading at once while the reactor's thread evicts, writes and takes another client's change.

        Every answer is the content as it was or as it became; none that
        began after the change was known is the old content.
        """
        fs = yield self.reader(cache_size=3 * SEALED_CHUNK)
        handle = self.open(fs)
        new = bytearray(self.content)
        new[CHUNK // 2 : CHUNK // 2 + 3 * CHUNK] = random.Random(12).randbytes(3 * CHUNK)
        new = bytes(new)
        phase = [0]
        stop = threading.Event()
        answers: list[tuple[int, int, bytes]] = []

        def read_at_once(seed: int) -> None:
            rng = random.Random(seed)
            while not stop.is_set():
                offset, began = rng.randrange(len(self.content)), phase[0]
                got = handle.read_cached(offset, rng.choice((100, 4096, 128 * 1024)))
                if got is not None:
                    answers.append((began, offset, got))

        threads = [threading.Thread(target=read_at_once, args=(seed,)) for seed in range(2)]
        for thread in threads:
            thread.start()
        try:
            rng = random.Random(13)
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                at = rng.randrange(len(self.content))
                self.assertEqual(self.read_through(handle, at, 64 * 1024), self.content[at : at + 64 * 1024])
                time.sleep(0.001)
            writer = self.now(self.fs.open_path("/file.bin", os.O_RDWR))
            self.now(writer.write(CHUNK // 2, new[CHUNK // 2 : CHUNK // 2 + 3 * CHUNK]))
            self.now(writer.close())
            phase[0] = 1
            time.sleep(0.05)  # the readers meet the file as the notification left it
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                at = rng.randrange(len(self.content))
                self.assertEqual(self.read_through(handle, at, 64 * 1024), new[at : at + 64 * 1024])
                time.sleep(0.001)
        finally:
            stop.set()
            for thread in threads:
                thread.join()
        before = [(offset, got) for began, offset, got in answers if began == 0]
        after = [(offset, got) for began, offset, got in answers if began == 1]
        self.assertGreater(min(len(before), len(after)), 10, (len(before), len(after)))
        for offset, got in before:
            self.assertIn(got, (self.content[offset : offset + len(got)], new[offset : offset + len(got)]))
        for offset, got in after:
            self.assertEqual(got, new[offset : offset + len(got)], offset)


class OpenedBlocksTests(SynchronousTestCase):
    """The plaintext of opened blocks, bounded and kept apart by file and chunk."""

    def test_bounded_least_recently_used(self) -> None:
        opened = OpenedBlocks(2)
        opened.put((1, 0, b"a", 0), b"zero")
        opened.put((1, 0, b"a", 1), b"one")
        self.assertEqual(opened.get((1, 0, b"a", 0)), b"zero")
        opened.put((1, 0, b"a", 2), b"two")
        self.assertEqual(len(opened), 2)
        self.assertIsNone(opened.get((1, 0, b"a", 1)), "the block used longest ago went")
        self.assertEqual(opened.get((1, 0, b"a", 2)), b"two")
        self.assertIsNone(opened.get((2, 0, b"a", 2)), "the same object under another file is not served")
        self.assertIsNone(opened.get((1, 1, b"a", 2)), "nor under another chunk")
        nothing = OpenedBlocks(0)
        nothing.put((1, 0, b"a", 0), b"zero")
        self.assertEqual(len(nothing), 0)


class ChangeDuringMapReadTests(MemoryFilespaceCase):
    """A chunk map read that the server answers after telling of a later change is not kept."""

    chunk_size = CHUNK

    @defer.inlineCallbacks
    def test_map_read_across_a_notification_is_read_again(self) -> Generator[Deferred[Any], Any, None]:
        """The server runs a read, then another client's commit, in one group and tells of the commit first."""
        content = random.Random(1).randbytes(3 * CHUNK)
        self.now(self.fs.write_file("/file.bin", content))
        self.now(self.fs.write_file("/other", b"x"))
        fs = yield self.memory_filespace(cache_dir=Path(self.mktemp()), read_ahead=0)
        self.addCleanup(fs.close)
        handle = self.now(fs.open_path("/file.bin", os.O_RDONLY))
        self.assertEqual(self.now(handle.read(0, 100)), content[:100])
        writer = self.now(self.fs.open_path("/file.bin", os.O_RDWR))
        self.now(writer.write(0, b"A" * 100))
        self.now(writer.flush())
        other = self.now(fs.resolve("/other"))
        clock = task.Clock()
        self.responder.clock = clock
        self.responder.group_window = 0.0  # groups run when the clock says, as in a busy server
        events: list[str] = []
        fs.inodes.on_change(lambda inode, parent, name: events.append("notified"))
        read_map = handle.file._read_map

        def traced(windows: Any) -> Deferred[Any]:
            return read_map(windows).addCallback(lambda answer: (events.append(f"map {answer[0]}"), answer)[1])

        handle.file._read_map = traced  # type: ignore[method-assign]
        setattr_done = fs.inodes.setattr(other.inode, mode=0o600)  # a change of this client queued first
        reading = handle.read(0, 100)  # its map read waits in the same group
        self.now(writer.write(0, b"B" * 100))
        flushing = writer.flush()  # the other client's commit, later in that group
        clock.advance(0)
        self.now(setattr_done)
        self.now(flushing)
        self.now(reading)  # concurrent with the commit: either content is right
        self.responder.group_window = None
        self.assertLess(events.index("notified"), len(events) - 1, events)
        now = b"B" * 100
        self.assertEqual(self.now(handle.read(0, 100)), now, "the map read before the change is not kept")
        self.assertIn(handle.read_cached(0, 100), (None, now))
        self.assertEqual(handle.version, writer.version)
