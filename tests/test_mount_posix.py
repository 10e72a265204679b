"""
Real mounts (their own tier): ``lucid-mount`` run as a process in the
foreground against a running demo, and a POSIX behaviour suite of plain
``os`` calls on the mount, with errno values as a local filesystem gives them.

Every mount is unmounted in cleanup (a signal, then ``fusermount -u -z`` if
it lingers); the whole module is skipped where FUSE cannot work.
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from twisted.trial.unittest import TestCase

from lucidlink.cli.mount import STACKS_SIGNAL
from tests.demo_helpers import RunningDemo, lucid
from tests.mount_helpers import SKIP, DemoMountCase, is_mounted, unmount_lazily

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def threads_hearing_stop_signals(pid: int) -> list[int]:
    """The threads of process ``pid`` that do not block some stop signal, from /proc."""
    hearing = []
    for task in sorted(Path(f"/proc/{pid}/task").iterdir(), key=lambda path: int(path.name)):
        status = dict(line.split(":\t", 1) for line in (task / "status").read_text().splitlines() if ":\t" in line)
        blocked = int(status["SigBlk"], 16)
        if any(not blocked & (1 << (number - 1)) for number in STOP_SIGNALS):
            hearing.append(int(task.name))
    return hearing


class MountTests(DemoMountCase):
    """A demo filespace mounted under a temporary folder."""

    def setUp(self) -> None:
        super().setUp()
        self.mnt = self.base / "mnt"
        self.mount = self.start_mount()

    def test_posix_behaviour(self) -> None:
        """Files, directories, links and xattrs behave as on a local filesystem."""
        mnt = self.mnt
        self.assertIn("README.txt", os.listdir(mnt))
        self.assertTrue((mnt / "README.txt").read_bytes().startswith(b"Welcome"))

        # Writes and reads at offsets; the size a handle sees before close.
        path = mnt / "offsets.bin"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            self.assertEqual(os.pwrite(fd, b"hello world", 0), 11)
            self.assertEqual(os.pwrite(fd, b"WORLD", 6), 5)
            self.assertEqual(os.fstat(fd).st_size, 11)
            self.assertEqual(os.pread(fd, 100, 0), b"hello WORLD")
            self.assertEqual(os.pread(fd, 3, 4), b"o W")
            self.assertEqual(os.pread(fd, 10, 100), b"")
            os.fsync(fd)
        finally:
            os.close(fd)
        self.assertEqual(path.read_bytes(), b"hello WORLD")
        self.assertEqual(os.stat(path).st_mode & 0o777, 0o640)

        # A file spanning chunks, read back whole and through `lucid cat`.
        data = os.urandom(9 * 1024 * 1024 + 77)
        (mnt / "big.bin").write_bytes(data)
        self.assertEqual((mnt / "big.bin").read_bytes(), data)
        self.assertEqual(self.lucid_cat("/big.bin"), data)

        # Sparse files and a large offset.
        sparse = mnt / "sparse.bin"
        fd = os.open(sparse, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, b"far", 2**33)
            os.pwrite(fd, b"near", 5000)
        finally:
            os.close(fd)
        self.assertEqual(os.stat(sparse).st_size, 2**33 + 3)
        fd = os.open(sparse, os.O_RDONLY)
        try:
            self.assertEqual(os.pread(fd, 3, 2**33), b"far")
            self.assertEqual(os.pread(fd, 10, 2**33 - 7), bytes(7) + b"far")
            self.assertEqual(os.pread(fd, 5000, 0), bytes(5000))
            self.assertEqual(os.pread(fd, 6, 4999), b"\0near\0")
        finally:
            os.close(fd)

        # Truncate and extend, by path and by descriptor.
        os.truncate(path, 5)
        self.assertEqual(path.read_bytes(), b"hello")
        os.truncate(path, 8)
        self.assertEqual(path.read_bytes(), b"hello\0\0\0")
        fd = os.open(path, os.O_RDWR)
        try:
            os.ftruncate(fd, 2)
            self.assertEqual(os.fstat(fd).st_size, 2)
        finally:
            os.close(fd)
        self.assertEqual(path.read_bytes(), b"he")
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
        os.close(fd)
        self.assertEqual(os.stat(path).st_size, 0)

        # O_APPEND writes at the end.
        log = mnt / "log.txt"
        log.write_bytes(b"one\n")
        fd = os.open(log, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, b"two\n")
            os.write(fd, b"three\n")
        finally:
            os.close(fd)
        self.assertEqual(log.read_bytes(), b"one\ntwo\nthree\n")

        # O_EXCL, and the errno values of a local filesystem.
        self.assertErrno(errno.EEXIST, os.open, log, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        self.assertErrno(errno.ENOENT, os.open, mnt / "missing", os.O_RDONLY)
        self.assertErrno(errno.ENOENT, os.stat, mnt / "missing" / "deeper")
        self.assertErrno(errno.ENOENT, os.unlink, mnt / "missing")
        os.mkdir(mnt / "dir")
        self.assertErrno(errno.EEXIST, os.mkdir, mnt / "dir")
        self.assertErrno(errno.EEXIST, os.mkdir, log)
        self.assertErrno(errno.EISDIR, os.open, mnt / "dir", os.O_WRONLY)
        self.assertErrno(errno.EISDIR, os.unlink, mnt / "dir")
        self.assertErrno(errno.ENOTDIR, os.stat, log / "x")
        self.assertErrno(errno.ENOTDIR, os.rmdir, log)
        self.assertErrno(errno.ENOTDIR, os.listdir, log)

        # Directories: rmdir of a non-empty one; renames over empty and non-empty directories.
        (mnt / "dir" / "inside.txt").write_bytes(b"inside")
        self.assertErrno(errno.ENOTEMPTY, os.rmdir, mnt / "dir")
        os.mkdir(mnt / "empty")
        os.mkdir(mnt / "full")
        (mnt / "full" / "f").write_bytes(b"f")
        self.assertErrno(errno.ENOTEMPTY, os.rename, mnt / "dir", mnt / "full")
        self.assertErrno(errno.ENOTDIR, os.rename, mnt / "dir", log)
        self.assertErrno(errno.EISDIR, os.rename, log, mnt / "dir")
        os.rename(mnt / "dir", mnt / "empty")
        self.assertFalse((mnt / "dir").exists())
        self.assertEqual((mnt / "empty" / "inside.txt").read_bytes(), b"inside")
        self.assertEqual(sorted(os.listdir(mnt / "empty")), ["inside.txt"])
        os.unlink(mnt / "full" / "f")
        os.rmdir(mnt / "full")
        self.assertFalse((mnt / "full").exists())

        # Rename over an existing file replaces it.
        (mnt / "old.txt").write_bytes(b"old")
        (mnt / "new.txt").write_bytes(b"new")
        os.rename(mnt / "new.txt", mnt / "old.txt")
        self.assertEqual((mnt / "old.txt").read_bytes(), b"new")
        self.assertFalse((mnt / "new.txt").exists())

        # An unlinked file stays readable through a descriptor open on it.
        doomed = mnt / "doomed.txt"
        doomed.write_bytes(b"still here")
        fd = os.open(doomed, os.O_RDWR)
        try:
            os.unlink(doomed)
            self.assertFalse(doomed.exists())
            self.assertEqual(os.pread(fd, 100, 0), b"still here")
            os.pwrite(fd, b"STILL", 0)
            self.assertEqual(os.pread(fd, 100, 0), b"STILL here")
        finally:
            os.close(fd)
        self.assertNotIn("doomed.txt", os.listdir(mnt))

        # Hard links.
        os.link(mnt / "old.txt", mnt / "hard.txt")
        self.assertEqual(os.stat(mnt / "old.txt").st_nlink, 2)
        self.assertEqual(os.stat(mnt / "hard.txt").st_ino, os.stat(mnt / "old.txt").st_ino)
        os.unlink(mnt / "old.txt")
        self.assertEqual(os.stat(mnt / "hard.txt").st_nlink, 1)
        self.assertEqual((mnt / "hard.txt").read_bytes(), b"new")

        # Symbolic links.
        os.symlink("hard.txt", mnt / "soft")
        self.assertEqual(os.readlink(mnt / "soft"), "hard.txt")
        self.assertEqual((mnt / "soft").read_bytes(), b"new")
        self.assertTrue(os.path.islink(mnt / "soft"))
        self.assertEqual(os.lstat(mnt / "soft").st_size, len("hard.txt"))
        os.symlink("/nowhere/at/all", mnt / "dangling")
        self.assertErrno(errno.ENOENT, os.stat, mnt / "dangling")
        self.assertEqual(os.readlink(mnt / "dangling"), "/nowhere/at/all")

        # Extended attributes.
        os.setxattr(mnt / "hard.txt", "user.colour", b"blue")
        os.setxattr(mnt / "hard.txt", "user.size", b"\x00\x01")
        self.assertEqual(os.getxattr(mnt / "hard.txt", "user.colour"), b"blue")
        self.assertEqual(sorted(os.listxattr(mnt / "hard.txt")), ["user.colour", "user.size"])
        os.removexattr(mnt / "hard.txt", "user.colour")
        self.assertEqual(os.listxattr(mnt / "hard.txt"), ["user.size"])
        self.assertErrno(errno.ENODATA, os.getxattr, mnt / "hard.txt", "user.colour")
        self.assertErrno(errno.ENODATA, os.setxattr, mnt / "hard.txt", "user.colour", b"red", os.XATTR_REPLACE)
        self.assertErrno(errno.EEXIST, os.setxattr, mnt / "hard.txt", "user.size", b"", os.XATTR_CREATE)
        os.setxattr(mnt / "hard.txt", "user.colour", b"red", os.XATTR_CREATE)
        os.setxattr(mnt / "hard.txt", "user.colour", b"green", os.XATTR_REPLACE)
        self.assertEqual(os.getxattr(mnt / "hard.txt", "user.colour"), b"green")

        # Attributes: mode and times.
        os.chmod(mnt / "hard.txt", 0o600)
        self.assertEqual(os.stat(mnt / "hard.txt").st_mode & 0o777, 0o600)
        os.utime(mnt / "hard.txt", ns=(1_000_000_000_123, 2_000_000_000_456))
        self.assertEqual(os.stat(mnt / "hard.txt").st_mtime_ns, 2_000_000_000_456)

        # statfs answers.
        self.assertGreater(os.statvfs(mnt).f_bsize, 0)

    def test_mapped_writes_of_an_append_descriptor(self) -> None:
        """Pages written through a shared mapping of an ``O_APPEND`` descriptor are stored where they are, not appended."""
        path = self.mnt / "mapped.bin"
        path.write_bytes(b"abcdef")
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
        try:
            with mmap.mmap(fd, 6) as mapped:
                mapped[0:2] = b"XY"
                mapped.flush()
            os.write(fd, b"+")
        finally:
            os.close(fd)
        self.assertEqual(path.read_bytes(), b"XYcdef+")
        self.assertEqual(self.lucid_cat("/mapped.bin"), b"XYcdef+")

    def test_lifecycle(self) -> None:
        """Buffered writes survive SIGTERM; a busy, a non-empty and a stale mount point are refused clearly."""
        fd = os.open(self.mnt / "dirty.txt", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"not yet stored" * 1000)
        self.assertEqual(threads_hearing_stop_signals(self.mount.process.pid), [self.mount.process.pid],
                         "only the thread in llfuse.main may take a stop signal")
        self.assertEqual(self.mount.stop(signal.SIGTERM), 0, self.mount.log_text())
        with self.assertRaises(OSError):
            os.close(fd)
        self.assertFalse(is_mounted(self.mnt))
        self.assertEqual(self.lucid_cat("/dirty.txt"), b"not yet stored" * 1000)

        def refused(mountpoint: Path, *options: str) -> str:
            env = dict(os.environ, LUCID_CONFIG=str(self.demo.config))
            result = subprocess.run(
                [sys.executable, "-m", "lucidlink.cli.mount", "demo", str(mountpoint), "--foreground", *options],
                capture_output=True, env=env, timeout=60,
            )
            self.assertEqual(result.returncode, 1, result.stdout)
            lines = result.stderr.decode().strip().splitlines()
            self.assertEqual(len(lines), 1, lines)
            self.assertTrue(lines[0].startswith("lucid-mount: "), lines[0])
            return lines[0]

        self.assertIn("not an empty directory", refused(self.base))
        self.assertIn("does not exist", refused(self.base / "nowhere"))

        # A mount whose process died (SIGKILL) leaves a stale mount point.
        mount = self.start_mount()
        self.assertIn("busy", refused(self.mnt))
        os.kill(mount.process.pid, signal.SIGKILL)
        mount.process.wait(30)
        self.assertErrno(errno.ENOTCONN, os.listdir, self.mnt)
        self.assertIn("fusermount -u", refused(self.mnt))
        again = self.start_mount("mnt", "--force")
        self.assertIn("README.txt", os.listdir(self.mnt))

        # SIGUSR2 writes where every thread is into the log, and the mount goes on.
        again.process.send_signal(STACKS_SIGNAL)
        deadline = time.monotonic() + 30
        while "in serve" not in again.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertIn("in serve", again.log_text())
        self.assertIn("llfuse workers running: 30 of 30", again.log_text())
        self.assertIn("README.txt", os.listdir(self.mnt))
        self.assertEqual(again.stop(signal.SIGINT), 0, again.log_text())
        self.assertFalse(is_mounted(self.mnt))

        # In the background: the command returns once mounted; `fusermount -u` ends the process.
        env = dict(os.environ, LUCID_CONFIG=str(self.demo.config))
        result = subprocess.run(
            [sys.executable, "-m", "lucidlink.cli.mount", "demo", str(self.mnt)],
            capture_output=True, env=env, timeout=120,
        )
        self.addCleanup(self.unmount_background)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.background = int(result.stdout.decode().rsplit("(process ", 1)[1].rstrip(")\n"))
        self.assertTrue(os.path.ismount(self.mnt))
        (self.mnt / "background.txt").write_bytes(b"from the background")
        subprocess.run(["fusermount", "-u", str(self.mnt)], check=True, capture_output=True, timeout=60)
        deadline = time.monotonic() + 60
        while os.path.exists(f"/proc/{self.background}") and time.monotonic() < deadline:
            time.sleep(0.1)
        self.assertFalse(os.path.exists(f"/proc/{self.background}"))
        self.assertEqual(self.lucid_cat("/background.txt"), b"from the background")

    def unmount_background(self) -> None:
        unmount_lazily(self.mnt)
        pid = getattr(self, "background", None)
        if pid is not None and os.path.exists(f"/proc/{pid}"):
            deadline = time.monotonic() + 30
            while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
                time.sleep(0.1)
            if os.path.exists(f"/proc/{pid}"):
                os.kill(pid, signal.SIGKILL)


class DemoMountTests(TestCase):
    """``lucid demo`` mounts its filespace at DIR/mnt where FUSE works, and unmounts it when stopped."""

    timeout = 600
    if SKIP:
        skip = SKIP

    def test_demo_mounts(self) -> None:
        """The demo shows ``ls`` and ``cat`` of the mount; Ctrl-C leaves nothing mounted."""
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        mnt = base / "demo" / "mnt"

        self.addCleanup(unmount_lazily, mnt)
        demo = RunningDemo(base / "demo", mount=True)
        self.addCleanup(demo.stop)
        demo.wait_until_ready()
        output = b"".join(demo.output).decode()
        self.assertIn(f"mounted at {mnt}", output)
        self.assertIn("Welcome to the lucidlink demo filespace.", output)
        self.assertTrue(os.path.ismount(mnt))
        (mnt / "through-the-demo.txt").write_bytes(b"mounted")
        self.assertEqual(
            lucid(demo.config, "cat", "demo:/through-the-demo.txt").stdout, b"mounted"
        )
        demo.stop()
        self.assertEqual(demo.process.returncode, 0, demo.log_path.read_text(errors="replace"))
        self.assertFalse(os.path.ismount(mnt))
