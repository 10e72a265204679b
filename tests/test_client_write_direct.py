"""
Writes made at once in the calling thread (``FileHandle.write_direct``): the
same bytes, journal and background stores as a write through the reactor,
refused (None, nothing changed) whenever the reactor is needed, and the
answers a file open here keeps of its extended attributes.  Against the real
client core, a metadata server answering in memory, and an in-memory object
store.
"""

from __future__ import annotations

import os
import random
import threading
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred

from lucidlink import crypto, errors
from lucidlink.client import filespace as filespace_module
from lucidlink.client.filespace import Filespace
from tests.cache_helpers import pattern
from tests.client_helpers import MemoryFilespaceCase

CHUNK = 4 * crypto.BLOCK_SIZE


class WriteDirectTests(MemoryFilespaceCase):
    """``write_direct`` against ``write`` and ``read`` of the same file."""

    chunk_size = CHUNK

    def setUp(self) -> Any:
        done = super().setUp()

        def ready(_: object) -> None:
            self.scheduled: list[tuple[Any, ...]] = []
            self.fs.inodes.call_in_reactor = lambda function, *arguments: self.scheduled.append((function, arguments))

        return done.addCallback(ready)

    def run_scheduled(self) -> None:
        """Run what writes of other threads handed to the reactor."""
        scheduled, self.scheduled = self.scheduled, []
        for function, arguments in scheduled:
            function(*arguments)

    def create(self, fs: Filespace | None = None, flags: int = os.O_RDWR) -> Any:
        fs = fs or self.fs
        handle = self.now(fs.inodes.create(fs.root_inode, b"file.bin", 0o644, flags | os.O_CREAT, 1000, 1000))
        self.addCleanup(lambda: handle.closed or self.now(handle.close()))
        return handle

    def test_sequential_writes_after_the_first(self) -> None:
        """A new file is known empty, so a writer's pieces are taken at once; reads, size and the commit agree."""
        handle = self.create()
        data = random.Random(1).randbytes(3 * CHUNK + 1000)
        piece = 32 * 1024
        for offset in range(0, len(data), piece):
            self.assertEqual(handle.write_direct(offset, data[offset : offset + piece]), len(data[offset : offset + piece]))
        self.assertEqual(handle.size, len(data))
        self.assertEqual(self.now(handle.read(0, len(data) + 10)), data)
        self.now(handle.close())
        self.assertEqual(self.now(self.fs.read_file("/file.bin")), data)

    def test_finished_chunks_are_stored_on_the_reactor(self) -> None:
        """Chunks a direct writer moved past are handed to the reactor, which stores them before any flush."""
        handle = self.create()
        data = random.Random(2).randbytes(2 * CHUNK + 10)
        self.assertEqual(handle.write_direct(0, data[:CHUNK]), CHUNK, "a whole chunk needs nothing read")
        self.assertEqual(handle.write_direct(CHUNK, data[CHUNK : CHUNK + 10]), 10, "a new file is known empty")
        self.assertEqual(handle.write_direct(CHUNK + 10, data[CHUNK + 10 :]), len(data) - CHUNK - 10)
        self.assertEqual(self.objects.objects, {})
        self.run_scheduled()
        self.assertEqual(len(self.objects.objects), 2, "chunks 0 and 1, not the unfinished third")
        self.now(handle.close())
        self.assertEqual(len(self.objects.objects), 3)
        self.assertEqual(self.now(self.fs.read_file("/file.bin")), data)

    @defer.inlineCallbacks
    def test_refused_when_the_reactor_is_needed(self) -> Generator[Deferred[Any], Any, None]:
        """Stored bytes to read, an unknown map, a busy file, a read-only or closed handle: None, nothing changed."""
        self.now(self.fs.write_file("/file.bin", random.Random(3).randbytes(2 * CHUNK)))
        other = yield self.memory_filespace()
        handle = self.now(other.open_path("/file.bin", os.O_RDWR))
        self.assertIsNone(handle.write_direct(10, b"x"), "the chunk map is not known")
        self.now(handle.read(0, 1))
        self.assertIsNone(handle.write_direct(10, b"x"), "the chunk's stored bytes would have to be read")
        self.assertEqual(handle.write_direct(0, bytes(CHUNK)), CHUNK, "a whole chunk replaces them")
        self.assertEqual(handle.write_direct(5, b"abc"), 3, "a buffered chunk is written at once")

        busy = handle.file._lock.acquire()
        self.assertIsNone(handle.write_direct(5, b"abc"), "a write, cut or commit is under way")
        self.now(busy).release()

        reader = self.now(other.open_path("/file.bin", os.O_RDONLY))
        self.assertIsNone(reader.write_direct(5, b"abc"))
        self.assertIsInstance(self.failureResultOf(reader.write(5, b"abc")).value, errors.BadFileHandle)
        self.now(reader.close())
        self.assertIsNone(handle.write_direct(-1, b"abc"))
        self.assertIsNone(handle.write_direct(5, b""))
        self.now(handle.close())
        self.assertIsNone(handle.write_direct(5, b"abc"))
        expected = bytearray(random.Random(3).randbytes(2 * CHUNK))
        expected[:CHUNK] = bytes(CHUNK)
        expected[5:8] = b"abc"
        self.assertEqual(self.now(self.fs.read_file("/file.bin")), bytes(expected))

    @defer.inlineCallbacks
    def test_buffer_limit_goes_through_the_reactor(self) -> Generator[Deferred[Any], Any, None]:
        """A write that would leave more than max_dirty buffered is refused; through the reactor it stores first."""
        fs = yield self.memory_filespace(max_dirty=2 * CHUNK)
        handle = self.create(fs)
        self.assertEqual(handle.write_direct(0, bytes(CHUNK)), CHUNK)
        self.assertEqual(handle.write_direct(CHUNK, bytes(CHUNK)), CHUNK)
        self.assertIsNone(handle.write_direct(2 * CHUNK, b"x"))
        self.now(handle.write(2 * CHUNK, b"x"))
        self.assertEqual(handle.buffered, 0, "stored and committed")
        self.assertEqual(self.now(fs.stat("/file.bin")).size, 2 * CHUNK + 1)

    def test_append(self) -> None:
        """O_APPEND writes at the end: at once into a buffered chunk, through the reactor into a stored one."""
        handle = self.create(flags=os.O_RDWR | os.O_APPEND)
        self.now(handle.write(0, b"first "))
        self.assertEqual(handle.write_direct(0, b"second"), 6)
        self.assertEqual(self.now(handle.read(0, 100)), b"first second")
        self.now(handle.flush())
        self.assertIsNone(handle.write_direct(0, b"!"), "the stored chunk's bytes would have to be read")
        self.now(handle.write(0, b"!"))
        self.assertEqual(self.now(handle.read(0, 100)), b"first second!")

    def test_hides_the_view_of_other_threads(self) -> None:
        """A direct write hides what other threads could read at once, before it changes anything."""
        handle = self.create()
        self.now(handle.write(0, bytes(CHUNK)))
        self.now(handle.flush())
        self.now(handle.read(0, 100))
        self.assertIsNotNone(handle.file._view, "other threads may read at once")
        self.assertEqual(handle.write_direct(CHUNK, b"!" * CHUNK), CHUNK)
        self.assertIsNone(handle.file._view, "the file is being changed")
        self.assertEqual(self.now(handle.read(CHUNK - 1, 3)), b"\0!!")

    @defer.inlineCallbacks
    def test_journal_full_is_reported(self) -> Generator[Deferred[Any], Any, None]:
        """
        A journal that cannot be written (a full disk) fails the write with NoSpace once committing what was
        buffered made no room for a new one; a direct write leaves it to the reactor, which can commit.
        """
        fs = yield self.memory_filespace(cache_dir=Path(self.mktemp()))
        self.addCleanup(fs.close)
        handle = self.create(fs)
        self.now(handle.write(0, b"x"))
        journal = handle.file._journal
        os.close(journal._descriptor)
        journal._descriptor = os.open("/dev/full", os.O_WRONLY)

        def no_room(inode: int, version: int) -> Any:
            raise errors.NoSpace("no room left for a new write-back journal")

        fs.inodes.journals.begin = no_room
        self.assertIsNone(handle.write_direct(1, b"y"))
        self.assertIsInstance(self.failureResultOf(handle.write(1, b"y")).value, errors.NoSpace)
        self.assertIsNone(handle.file._journal, "the commit made to find room removed the journal")
        del fs.inodes.journals.begin  # room again
        self.now(handle.close())
        self.assertEqual(self.now(fs.read_file("/file.bin")), b"x")

    def test_threads_write_while_the_reactor_flushes(self) -> None:
        """Writes of another thread and flushes on the reactor interleave without losing a byte."""
        handle = self.create()
        self.now(handle.write(0, b"\0"))
        size = 2 * CHUNK
        model = bytearray(size)
        end = 1
        rounds = 200
        done = threading.Event()
        refused = []

        def writer() -> None:
            nonlocal end
            chooser = random.Random(4)
            for number in range(rounds):
                offset = chooser.randrange(size - 100)
                data = bytes([number % 251 + 1]) * chooser.randrange(1, 100)
                if handle.write_direct(offset, data) is None:
                    refused.append((offset, data))
                else:
                    model[offset : offset + len(data)] = data
                    end = max(end, offset + len(data))
            done.set()

        thread = threading.Thread(target=writer)
        thread.start()
        while not done.is_set():
            self.now(handle.flush())
        thread.join()
        for offset, data in refused:
            self.now(handle.write(offset, data))
            model[offset : offset + len(data)] = data
            end = max(end, offset + len(data))
        self.now(handle.close())
        self.assertEqual(self.now(self.fs.read_file("/file.bin")), bytes(model[:end]))

    @defer.inlineCallbacks
    def test_thread_appends_staged_while_the_reactor_flushes(self) -> Generator[Deferred[Any], Any, None]:
        """A writer thread appending (staged chunks), flushes and background stores meanwhile, then a close or a crash."""
        self.patch(filespace_module, "STAGE_FROM", crypto.BLOCK_SIZE)
        handed_lock = threading.Lock()
        for crash in (False, True):
            cache_dir = Path(self.mktemp())
            fs = yield self.memory_filespace(cache_dir=cache_dir)
            handed: list[tuple[Any, ...]] = []

            def hand(function: Any, *arguments: Any, handed: list[tuple[Any, ...]] = handed) -> None:
                with handed_lock:
                    handed.append((function, arguments))

            def run_handed(handed: list[tuple[Any, ...]] = handed) -> None:
                with handed_lock:
                    calls, handed[:] = list(handed), []
                for function, arguments in calls:
                    function(*arguments)

            fs.inodes.call_in_reactor = hand
            handle = self.now(fs.inodes.create(fs.root_inode, b"file.bin", 0o644, os.O_RDWR | os.O_CREAT, 1000, 1000))
            data = pattern(6 * CHUNK + 777, 20 + crash)
            self.now(handle.write(0, data[:100]))
            self.now(handle.flush())
            self.now(handle.read(0, 1))
            done = threading.Event()
            refused: list[tuple[int, bytes]] = []

            def writer(
                handle: Any = handle, data: bytes = data, done: threading.Event = done,
                refused: list[tuple[int, bytes]] = refused,
            ) -> None:
                chooser = random.Random(5)
                offset = 100
                while offset < len(data):
                    piece = data[offset : offset + chooser.choice([100, 4096, 32768, 131072])]
                    if handle.write_direct(offset, piece) is None:
                        refused.append((offset, piece))
                    offset += len(piece)
                done.set()

            thread = threading.Thread(target=writer)
            thread.start()
            flushes = random.Random(6)
            while not done.is_set():
                run_handed()
                if flushes.random() < 0.3:
                    self.now(handle.flush())
            thread.join()
            for offset, piece in refused:
                self.now(handle.write(offset, piece))
            run_handed()
            if crash:
                if handle.file._journal is not None:
                    handle.file._journal.close()
                self.now(fs.close())
                fs = yield self.memory_filespace(cache_dir=cache_dir)
                outcomes = self.now(fs.recover())
                self.assertTrue(all(outcome.committed for outcome in outcomes), [str(o) for o in outcomes])
            else:
                self.now(handle.close())
            self.now(fs.close())
            self.assertEqual(self.now(self.fs.read_file("/file.bin")), data)
            self.now(self.fs.inodes.unlink(self.fs.root_inode, b"file.bin"))


class KeptXattrTests(MemoryFilespaceCase):
    """The extended attributes a file open here keeps: until its own change or another client's."""

    @defer.inlineCallbacks
    def test_kept_while_open_and_dropped_on_change(self) -> Generator[Deferred[Any], Any, None]:
        inodes = self.fs.inodes
        handle = self.now(inodes.create(inodes.root_inode, b"x.bin", 0o644, os.O_RDWR | os.O_CREAT, 1000, 1000))
        inode = handle.inode
        self.assertIsNone(inodes.getxattr_cached(inode, b"security.capability"), "nothing asked yet")
        self.failureResultOf(inodes.getxattr(inode, b"security.capability"), errors.NoAttribute)
        with self.assertRaises(errors.NoAttribute):
            inodes.getxattr_cached(inode, b"security.capability")

        self.now(inodes.setxattr(inode, b"user.colour", b"blue"))
        self.assertIsNone(inodes.getxattr_cached(inode, b"security.capability"), "a change of ours drops them")
        self.assertEqual(self.now(inodes.getxattr(inode, b"user.colour")), b"blue")
        self.assertEqual(inodes.getxattr_cached(inode, b"user.colour"), b"blue")
        self.now(inodes.setxattr(inode, b"user.empty", b""))
        self.assertEqual(self.now(inodes.getxattr(inode, b"user.empty")), b"")
        self.assertEqual(inodes.getxattr_cached(inode, b"user.empty"), b"", "an empty value is kept too")

        other = yield self.memory_filespace()
        self.now(other.inodes.setxattr(inode, b"user.colour", b"red"))
        self.assertIsNone(inodes.getxattr_cached(inode, b"user.colour"), "another client's change is told")
        self.assertEqual(self.now(inodes.getxattr(inode, b"user.colour")), b"red")
        self.now(inodes.removexattr(inode, b"user.colour"))
        self.assertIsNone(inodes.getxattr_cached(inode, b"user.colour"))
        self.failureResultOf(inodes.getxattr(inode, b"user.colour"), errors.NoAttribute)

        self.now(handle.close())
        self.assertIsNone(inodes.getxattr_cached(inode, b"user.empty"), "nothing is kept of a closed file")

    def test_answer_read_across_a_change_is_not_kept(self) -> None:
        """An answer that arrives after the file changed may predate the change: it is not kept."""
        inodes = self.fs.inodes
        handle = self.now(inodes.create(inodes.root_inode, b"y.bin", 0o644, os.O_RDWR | os.O_CREAT, 1000, 1000))
        self.addCleanup(lambda: self.now(handle.close()))
        answer: defer.Deferred[Any] = defer.Deferred()
        call = inodes.session.call
        self.patch(inodes.session, "call", lambda request: answer)
        asking = inodes.getxattr(handle.inode, b"user.late")
        handle.invalidate()
        self.patch(inodes.session, "call", call)
        answer.errback(errors.NoAttribute("none"))
        self.failureResultOf(asking, errors.NoAttribute)
        self.assertIsNone(inodes.getxattr_cached(handle.inode, b"user.late"))
