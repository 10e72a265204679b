"""
Two real mounts of one filespace (two ``lucid-mount`` processes, as two
desktops would run them): what one does, the other sees.

- Close-to-open: a file written and closed on one mount is read whole by an
  open on the other, even where the other's kernel kept pages of the old one.
- Renames, unlinks and listings reach the other mount within the attribute
  timeout (the metadata server's notifications make it sooner); the content of
  a file the other mount holds open changes under it once the change is
  committed (its kernel's pages are dropped).
- Locks: ``flock`` and ``fcntl`` byte-range locks contend between mounts
  (EWOULDBLOCK / EAGAIN, ``F_GETLK`` names the holder's range), a blocked
  ``flock`` waits until the holder lets go (or the waiter is interrupted),
  and locks end when their
  descriptor is closed and when the holder's mount dies.
- Concurrent writers: to different files, all data arrives; to one file,
  writes to different bytes are all kept, and where both wrote the same bytes
  the later close wins.  The earlier writer gets no error: its close
  succeeded, and a later read shows the other's bytes there.
- The metadata server killed (SIGKILL) and restarted while one mount streams
  a file and the other writes: the reader waits and goes on, every byte the
  writer wrote arrives.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from lucidlink.mount import ATTRIBUTE_TIMEOUT
from tests.mount_helpers import DemoMountCase

SEEN_WITHIN = ATTRIBUTE_TIMEOUT + 2.0
"""Seconds within which one mount must see another's change (the kernel's timeout, and slack for a busy machine)."""


def eventually(check: Callable[[], Any], within: float = SEEN_WITHIN) -> float:
    """Call ``check`` until it stops raising AssertionError or OSError; the seconds that took."""
    start = time.monotonic()
    while True:
        try:
            check()
            return time.monotonic() - start
        except (AssertionError, OSError):
            if time.monotonic() - start > within:
                raise
            time.sleep(0.02)


def pattern(seed: int, size: int) -> bytes:
    """``size`` bytes that differ for every seed (cheap to make, hard to confuse)."""
    block = hashlib.sha256(seed.to_bytes(8, "big")).digest() * 2048
    return (block * (size // len(block) + 1))[:size]


class TwoMountsTests(DemoMountCase):
    """Mounts ``a`` and ``b`` of one demo filespace."""

    def setUp(self) -> None:
        super().setUp()
        self.a = self.start_mount("a").mountpoint
        self.b = self.start_mount("b").mountpoint

    def test_changes_seen_by_the_other(self) -> None:
        """Content, names and listings changed on one mount are what the other shows (see the module)."""
        self.check_close_to_open()
        self.check_open_file_follows_changes()
        self.check_names_seen_by_the_other()

    def check_close_to_open(self) -> None:
        """A file written and closed on one mount is what an open on the other reads."""
        (self.a / "shared.txt").write_bytes(b"first version")
        self.assertEqual((self.b / "shared.txt").read_bytes(), b"first version")  # b's kernel keeps the pages
        for content in (b"FIRST VERSION", b"a longer second version", b"short"):
            (self.a / "shared.txt").write_bytes(content)
            self.assertEqual((self.b / "shared.txt").read_bytes(), content)
            self.assertEqual(os.stat(self.b / "shared.txt").st_size, len(content))
        big = pattern(1, 9 * 1024 * 1024 + 5)
        (self.b / "big.bin").write_bytes(big)
        self.assertEqual((self.a / "big.bin").read_bytes(), big)

    def check_open_file_follows_changes(self) -> None:
        """A file held open on one mount shows what the other committed, once it is told (no reopen)."""
        (self.a / "held.txt").write_bytes(b"old content")
        fd = os.open(self.b / "held.txt", os.O_RDONLY)
        self.addCleanup(os.close, fd)
        self.assertEqual(os.pread(fd, 100, 0), b"old content")
        (self.a / "held.txt").write_bytes(b"NEW CONTENT")

        def changed() -> None:
            self.assertEqual(os.pread(fd, 100, 0), b"NEW CONTENT")

        eventually(changed)

    def check_names_seen_by_the_other(self) -> None:
        """Renames, unlinks and new entries made on one mount reach the other's lookups and listings."""
        os.mkdir(self.a / "dir")
        (self.a / "dir" / "one").write_bytes(b"1")
        (self.a / "dir" / "two").write_bytes(b"2")
        self.assertEqual(sorted(os.listdir(self.b / "dir")), ["one", "two"])
        self.assertEqual(os.stat(self.b / "dir" / "one").st_size, 1)  # cached in b's kernel now

        os.rename(self.a / "dir" / "one", self.a / "dir" / "uno")

        def renamed() -> None:
            self.assertFalse((self.b / "dir" / "one").exists())
            self.assertEqual((self.b / "dir" / "uno").read_bytes(), b"1")
            self.assertEqual(sorted(os.listdir(self.b / "dir")), ["two", "uno"])

        eventually(renamed)

        os.rename(self.a / "dir" / "uno", self.a / "dir" / "two")  # over an existing file

        def replaced() -> None:
            self.assertEqual((self.b / "dir" / "two").read_bytes(), b"1")
            self.assertEqual(os.listdir(self.b / "dir"), ["two"])

        eventually(replaced)

        os.unlink(self.a / "dir" / "two")
        os.mkdir(self.a / "dir" / "sub")

        def changed() -> None:
            self.assertErrno(errno.ENOENT, os.stat, self.b / "dir" / "two")
            self.assertEqual(os.listdir(self.b / "dir"), ["sub"])
            self.assertEqual(os.stat(self.b / "dir").st_nlink, 3)

        eventually(changed)
        os.rmdir(self.b / "dir" / "sub")
        eventually(lambda: self.assertEqual(os.listdir(self.a / "dir"), []))

    def test_locks_contend_between_mounts(self) -> None:
        """flock and fcntl locks taken through one mount hold off the other (see the module)."""
        self.check_flock()
        self.check_fcntl_locks()

    def check_flock(self) -> None:
        """Exclusive flock against either kind; shared ones agree; a blocked flock waits; close releases."""
        (self.a / "locked").write_bytes(b"")
        holder = os.open(self.a / "locked", os.O_RDWR)
        other = os.open(self.b / "locked", os.O_RDWR)
        self.addCleanup(os.close, other)
        fcntl.flock(holder, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(other, fcntl.LOCK_SH | fcntl.LOCK_NB)        # shared and shared: both granted
        self.assertErrno(errno.EWOULDBLOCK, fcntl.flock, holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(other, fcntl.LOCK_UN)
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)        # upgraded once the other let go
        self.assertErrno(errno.EWOULDBLOCK, fcntl.flock, other, fcntl.LOCK_SH | fcntl.LOCK_NB)
        same_mount = os.open(self.a / "locked", os.O_RDONLY)      # another open file on the holder's mount
        self.addCleanup(os.close, same_mount)
        self.assertErrno(errno.EWOULDBLOCK, fcntl.flock, same_mount, fcntl.LOCK_EX | fcntl.LOCK_NB)

        # A process waiting for the lock can be interrupted (and leaves nothing queued behind).
        waiter = subprocess.Popen([sys.executable, "-c", (
            "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); print('waiting', flush=True);"
            " fcntl.flock(fd, fcntl.LOCK_EX)"
        ), str(self.b / "locked")], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.addCleanup(lambda: waiter.poll() is None and (waiter.kill(), waiter.wait(10)))
        self.assertEqual(waiter.stdout.readline(), b"waiting\n")  # type: ignore[union-attr]
        time.sleep(0.3)
        self.assertIsNone(waiter.poll(), "a blocking flock was granted while another mount held the lock")
        waiter.send_signal(signal.SIGINT)
        self.assertNotEqual(waiter.wait(10), 0)
        waiter.stdout.close()  # type: ignore[union-attr]

        granted = threading.Event()
        waiting = threading.Thread(target=lambda: (fcntl.flock(other, fcntl.LOCK_EX), granted.set()), daemon=True)
        waiting.start()
        self.assertFalse(granted.wait(0.5), "a blocking flock was granted while another mount held the lock")
        os.close(holder)                                          # the last close of the holder's file
        self.assertTrue(granted.wait(SEEN_WITHIN), "closing the holder did not release its flock")
        waiting.join(5)
        fcntl.flock(other, fcntl.LOCK_UN)

    def check_fcntl_locks(self) -> None:
        """Byte ranges conflict across mounts where they overlap; F_GETLK tells; close and death release."""
        dying = self.start_mount("dying").mountpoint
        (self.a / "ranges").write_bytes(bytes(100))
        holder = os.open(dying / "ranges", os.O_RDWR)
        other = os.open(self.b / "ranges", os.O_RDWR)
        self.addCleanup(os.close, other)
        fcntl.lockf(holder, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)      # bytes 0-9
        fcntl.lockf(other, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 50)      # bytes 50-59: no overlap
        with self.assertRaises(OSError) as caught:
            fcntl.lockf(other, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 5)
        self.assertIn(caught.exception.errno, (errno.EAGAIN, errno.EACCES))
        query = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 5, 1, 0)
        lock_type, _, start, length, _ = struct.unpack("hhqqi", fcntl.fcntl(other, fcntl.F_GETLK, query))
        self.assertEqual((lock_type, start, length), (fcntl.F_WRLCK, 0, 10))
        query = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 20, 10, 0)
        self.assertEqual(struct.unpack("hhqqi", fcntl.fcntl(other, fcntl.F_GETLK, query))[0], fcntl.F_UNLCK)

        # Closing a descriptor gives back its process's locks on the file.
        second = os.open(self.a / "ranges", os.O_RDWR)
        fcntl.lockf(second, fcntl.LOCK_EX | fcntl.LOCK_NB, 5, 70)
        os.close(second)
        fcntl.lockf(other, fcntl.LOCK_EX | fcntl.LOCK_NB, 5, 70)
        fcntl.lockf(other, fcntl.LOCK_UN, 5, 70)

        # The holder's mount dies: its locks end with its session.
        self.mounts["dying"].kill()
        eventually(lambda: fcntl.lockf(other, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 5), within=30)

    def test_concurrent_writers(self) -> None:
        """Writers on both mounts at once: of different files, and of one file."""
        self.check_writers_of_different_files()
        self.check_writers_of_one_file()

    def check_writers_of_different_files(self) -> None:
        """Both mounts write files at once; every byte of every file arrives, seen from both."""
        contents = {f"{side}-{number}": pattern(number * 2 + (side == "b"), 300_000 + number * 1_000_003)
                    for side in "ab" for number in range(3)}

        def write(name: str) -> None:
            root = self.a if name.startswith("a") else self.b
            with open(root / name, "wb") as file:
                data = contents[name]
                for start in range(0, len(data), 128 * 1024):
                    file.write(data[start : start + 128 * 1024])

        run_together([lambda name=name: write(name) for name in contents])  # type: ignore[misc]
        for name, data in contents.items():
            self.assertEqual((self.a / name).read_bytes(), data, name)
            self.assertEqual((self.b / name).read_bytes(), data, name)
            self.assertEqual(self.lucid_cat(f"/{name}"), data, name)

    def check_writers_of_one_file(self) -> None:
        """Two mounts write one file: different bytes are all kept; of the same bytes, the later close wins."""
        chunk = 4 * 1024 * 1024
        (self.a / "both.bin").write_bytes(b"")
        fd_a = os.open(self.a / "both.bin", os.O_WRONLY)
        fd_b = os.open(self.b / "both.bin", os.O_WRONLY)
        ours, theirs = pattern(10, chunk + 1000), pattern(11, 5000)
        os.pwrite(fd_a, ours, 0)                     # chunk 0 and the start of chunk 1
        os.pwrite(fd_b, theirs, chunk + 500)         # overlaps a's last 500 bytes, then goes on
        os.pwrite(fd_b, b"B" * 10, 100)              # the same bytes a wrote
        os.close(fd_a)                               # a commits first ...
        os.close(fd_b)                               # ... b rebases over it and wins where both wrote
        expected = bytearray(ours)
        expected[100:110] = b"B" * 10
        expected[chunk + 500 :] = theirs
        eventually(lambda: self.assertEqual((self.a / "both.bin").read_bytes(), bytes(expected)))
        self.assertEqual((self.b / "both.bin").read_bytes(), bytes(expected))
        self.assertEqual(self.lucid_cat("/both.bin"), bytes(expected))

    def start_mount(self, name: str = "mnt", *options: str) -> Any:
        mount = super().start_mount(name, *options)
        self.mounts = getattr(self, "mounts", {})
        self.mounts[name] = mount
        return mount


class MetadataServerRestartTests(DemoMountCase):
    """The metadata server dies and comes back while two mounts are busy."""

    def test_reader_and_writer_survive_a_restart(self) -> None:
        """A reader on one mount keeps going (or waits); a writer on the other loses nothing."""
        reading, writing = self.start_mount("reader").mountpoint, self.start_mount("writer").mountpoint
        streamed = pattern(99, 24 * 1024 * 1024 + 17)
        (writing / "stream.bin").write_bytes(streamed)
        written = {f"w{number}.bin": pattern(1000 + number, 700_000 + number) for number in range(12)}
        read_back = hashlib.sha256()
        progress = {"read": 0, "written": 0}

        def read() -> None:
            with open(reading / "stream.bin", "rb") as file:
                while piece := file.read(256 * 1024):
                    read_back.update(piece)
                    progress["read"] += len(piece)
                    time.sleep(0.01)

        def write() -> None:
            for name, data in written.items():
                with open(writing / name, "wb") as file:
                    file.write(data[: len(data) // 2])
                    file.flush()
                    time.sleep(0.05)
                    file.write(data[len(data) // 2 :])
                progress["written"] += 1

        def restart() -> None:
            while progress["read"] < 4 * 1024 * 1024 or progress["written"] < 1:
                time.sleep(0.02)
            self.kill_metadata_server()

        run_together([read, write, restart], timeout=240)
        self.assertEqual(read_back.hexdigest(), hashlib.sha256(streamed).hexdigest())
        for name, data in written.items():
            self.assertEqual((reading / name).read_bytes(), data, name)
            self.assertEqual(self.lucid_cat(f"/{name}"), data, name)


def run_together(work: list[Callable[[], object]], timeout: float = 120) -> None:
    """Run each callable in a thread of its own; raise the first failure, or if any is not done in time."""
    failures: list[BaseException] = []

    def run(function: Callable[[], object]) -> None:
        try:
            function()
        except BaseException as error:  # noqa: BLE001 - handed to the test
            failures.append(error)

    threads = [threading.Thread(target=run, args=(function,), daemon=True) for function in work]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        raise AssertionError(f"not done after {timeout} s")
    if failures:
        raise failures[0]
