"""
Small reads through a real mount hand the rest of their block to the kernel (:mod:`lucidlink.kernel_pages`).

Which pages the kernel holds is read with ``mincore`` on a mapping of the
file; readahead is turned off on the descriptors that read
(``POSIX_FADV_RANDOM``), so the kernel asks the mount for the page read and
no other.  The stored pages must never be older than the file: a write, a
truncate or another mount's change after the read is what every later read
sees.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import random
import signal
import threading
import time
from pathlib import Path

from lucidlink.crypto import BLOCK_SIZE
from tests.mount_helpers import DemoMountCase
from tests.test_mount_shared import eventually, pattern

PAGE = mmap.PAGESIZE
PAGES_PER_BLOCK = BLOCK_SIZE // PAGE

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]


def resident_pages(path: Path) -> list[int]:
    """The numbers of the file's pages in the kernel's page cache (``mincore`` of a shared read-only mapping)."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(descriptor).st_size
        if not size:
            return []
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, descriptor, 0)
        if address in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            pages = -(-size // PAGE)
            vector = ctypes.create_string_buffer(pages)
            if _libc.mincore(address, size, vector) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            return [number for number in range(pages) if vector.raw[number] & 1]
        finally:
            _libc.munmap(address, size)
    finally:
        os.close(descriptor)


def random_reader(path: Path, flags: int = os.O_RDONLY) -> int:
    """A descriptor on which the kernel reads no more than asked (no readahead)."""
    descriptor = os.open(path, flags)
    os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_RANDOM)
    return descriptor


class MountPagesTests(DemoMountCase):
    def setUp(self) -> None:
        super().setUp()
        self.mnt = self.base / "mnt"

    def written(self, name: str, content: bytes) -> Path:
        """A file of the mount holding ``content``, none of its pages in the kernel."""
        path = self.mnt / name
        path.write_bytes(content)
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)
        self.assertEqual(resident_pages(path), [])
        return path

    def test_a_small_read_brings_its_block_into_the_kernel(self) -> None:
        self.start_mount()
        content = pattern(1, 4 * BLOCK_SIZE)
        path = self.written("four-blocks.bin", content)
        reader = random_reader(path)
        try:
            self.assertEqual(os.pread(reader, PAGE, BLOCK_SIZE + 2 * PAGE), content[BLOCK_SIZE + 2 * PAGE :][:PAGE])
            block = list(range(PAGES_PER_BLOCK, 2 * PAGES_PER_BLOCK))
            eventually(lambda: self.assertEqual(resident_pages(path), block), within=10)
            for page in block:
                self.assertEqual(os.pread(reader, PAGE, page * PAGE), content[page * PAGE :][:PAGE])
        finally:
            os.close(reader)

    def test_the_last_block_is_stored_up_to_the_end_of_the_file(self) -> None:
        self.start_mount()
        content = pattern(2, BLOCK_SIZE + 5 * PAGE + 100)
        path = self.written("short-tail.bin", content)
        reader = random_reader(path)
        try:
            self.assertEqual(os.pread(reader, PAGE, BLOCK_SIZE), content[BLOCK_SIZE :][:PAGE])
            tail = list(range(PAGES_PER_BLOCK, PAGES_PER_BLOCK + 6))
            eventually(lambda: self.assertEqual(resident_pages(path), tail), within=10)
            self.assertEqual(os.pread(reader, 2 * BLOCK_SIZE, BLOCK_SIZE), content[BLOCK_SIZE:])
        finally:
            os.close(reader)
        time.sleep(0.2)
        self.assertEqual(path.stat().st_size, len(content))

    def test_random_reads_give_the_file(self) -> None:
        """Pages read from the kernel after stores are the file's: random reads, then the whole file."""
        self.start_mount()
        content = random.Random(3).randbytes(24 * BLOCK_SIZE + 1234)
        path = self.written("random.bin", content)
        chooser = random.Random(4)
        reader = random_reader(path)
        try:
            for _ in range(300):
                offset = chooser.randrange(0, len(content) // PAGE + 1) * PAGE
                self.assertEqual(os.pread(reader, PAGE, offset), content[offset : offset + PAGE], f"at {offset}")
            self.assertGreater(len(resident_pages(path)), 300)
            self.assertEqual(os.pread(reader, len(content) + 1, 0), content)
        finally:
            os.close(reader)

    def test_writes_after_a_small_read_are_never_undone(self) -> None:
        """A store of bytes read before a write never lands after it, whatever the timing."""
        self.start_mount()
        content = bytearray(pattern(5, 2 * BLOCK_SIZE))
        path = self.written("rewritten.bin", bytes(content))
        chooser = random.Random(6)
        for round_ in range(40):
            reader = random_reader(path)
            try:
                self.assertEqual(os.pread(reader, PAGE, 0), bytes(content[:PAGE]))
                writer = random_reader(path, os.O_RDWR)
                try:
                    page = chooser.randrange(1, 2 * PAGES_PER_BLOCK)
                    new = pattern(100 + round_, PAGE)
                    os.pwrite(writer, new, page * PAGE)
                    content[page * PAGE : (page + 1) * PAGE] = new
                    self.assertEqual(os.pread(reader, PAGE, page * PAGE), new, f"round {round_}, page {page}")
                finally:
                    os.close(writer)
                time.sleep(0.01)
                self.assertEqual(os.pread(reader, 2 * BLOCK_SIZE, 0), bytes(content), f"round {round_}")
            finally:
                os.close(reader)
        self.assertEqual(path.read_bytes(), bytes(content))

    def test_a_truncate_after_a_small_read_stands(self) -> None:
        """A store that would land past a truncate would also grow the file back: it is not made."""
        self.start_mount()
        for round_ in range(20):
            content = pattern(200 + round_, 2 * BLOCK_SIZE)
            path = self.written(f"cut-{round_}.bin", content)
            reader = random_reader(path)
            try:
                self.assertEqual(os.pread(reader, PAGE, BLOCK_SIZE), content[BLOCK_SIZE:][:PAGE])
                os.truncate(path, BLOCK_SIZE + 100)
                time.sleep(0.02)
                self.assertEqual(os.fstat(reader).st_size, BLOCK_SIZE + 100, f"round {round_}")
                self.assertEqual(os.pread(reader, 2 * BLOCK_SIZE, 0), content[: BLOCK_SIZE + 100], f"round {round_}")
            finally:
                os.close(reader)

    def test_another_mounts_change_is_read_after_stores(self) -> None:
        """Close-to-open and a held descriptor both see another mount's change, not stored older pages."""
        self.start_mount("a")
        self.start_mount("b")
        a, b = self.base / "a", self.base / "b"
        old, new = pattern(7, 2 * BLOCK_SIZE), pattern(8, 2 * BLOCK_SIZE)
        (a / "shared.bin").write_bytes(old)
        reader = random_reader(b / "shared.bin")
        try:
            self.assertEqual(os.pread(reader, PAGE, 0), old[:PAGE])
            eventually(lambda: self.assertIn(PAGES_PER_BLOCK - 1, resident_pages(b / "shared.bin")), within=10)
            (a / "shared.bin").write_bytes(new)
            eventually(lambda: self.assertEqual(os.pread(reader, PAGE, 3 * PAGE), new[3 * PAGE :][:PAGE]))
        finally:
            os.close(reader)
        reader = random_reader(b / "shared.bin")
        try:
            self.assertEqual(os.pread(reader, 2 * BLOCK_SIZE, 0), new)
        finally:
            os.close(reader)

    def test_a_mount_stops_under_random_readers(self) -> None:
        """Stopped while programs read at random (stores under way, reads queued): the mount still goes away."""
        mount = self.start_mount()
        content = random.Random(9).randbytes(64 * BLOCK_SIZE)
        path = self.written("busy.bin", content)
        stop = threading.Event()
        wrong: list[int] = []

        def read_at_random(seed: int) -> None:
            chooser = random.Random(seed)
            try:
                reader = random_reader(path)
            except OSError:
                return
            try:
                while not stop.is_set():
                    offset = chooser.randrange(0, len(content) // PAGE) * PAGE
                    try:
                        if os.pread(reader, PAGE, offset) != content[offset : offset + PAGE]:
                            wrong.append(offset)
                    except OSError:
                        return  # the mount went away under the read
            finally:
                os.close(reader)

        readers = [threading.Thread(target=read_at_random, args=(seed,), daemon=True) for seed in range(4)]
        for reader in readers:
            reader.start()
        time.sleep(1.0)
        started = time.monotonic()
        self.assertEqual(mount.stop(signal.SIGTERM, timeout=60), 0, mount.log_text())
        self.assertLess(time.monotonic() - started, 60)
        stop.set()
        for reader in readers:
            reader.join(30)
            self.assertFalse(reader.is_alive(), "a reader still waits on the mount")
        self.assertEqual(wrong, [])

