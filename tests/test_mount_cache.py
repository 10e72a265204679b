"""
The chunk cache, read-ahead and write-back through a real mount (their own
tier, like :mod:`tests.test_mount_posix`): ``lucid-mount`` as a process on a
running demo, its cache bounded by ``--cache-size`` and found again after a
remount, and writes acknowledged to a program surviving ``kill -9`` of the
mount.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
from pathlib import Path

from tests.demo_helpers import lucid
from tests.mount_helpers import DemoMountCase, MountProcess

MIB = 1024 * 1024


def cached_bytes(cache: Path) -> int:
    """Bytes in the chunk cache files under ``cache`` (sparse files counted by their blocks)."""
    return sum(path.stat().st_blocks * 512 for path in cache.rglob("chunks/objects/*/*"))


class MountCacheTests(DemoMountCase):
    """A demo filespace mounted with a small cache in a folder of the test's own."""

    def setUp(self) -> None:
        super().setUp()
        self.mnt = self.base / "mnt"
        self.cache = self.base / "cache"

    def start_mount(self, *options: str) -> MountProcess:  # type: ignore[override]
        return super().start_mount(
            "mnt", "--cache-dir", str(self.cache), "--cache-size", "12M", "--read-ahead", "2", *options
        )

    def test_cache_is_bounded_and_survives_a_remount(self) -> None:
        """Written and read through the mount, the cache stays within its size and serves the next mount."""
        mount = self.start_mount()
        content = random.Random(1).randbytes(20 * MIB + 7)
        (self.mnt / "big.bin").write_bytes(content)
        self.assertEqual((self.mnt / "big.bin").read_bytes(), content)
        self.assertLessEqual(cached_bytes(self.cache), 12 * MIB + MIB)
        self.assertEqual(mount.stop(signal.SIGTERM), 0, mount.log_text())
        kept = cached_bytes(self.cache)
        self.assertGreater(kept, 4 * MIB)

        again = self.start_mount()
        with open(self.mnt / "big.bin", "rb") as stream:
            stream.seek(len(content) - 3 * MIB)
            self.assertEqual(stream.read(), content[-3 * MIB :])
        self.assertEqual((self.mnt / "big.bin").read_bytes(), content)
        self.assertLessEqual(cached_bytes(self.cache), 12 * MIB + MIB)
        self.assertEqual(again.stop(signal.SIGINT), 0, again.log_text())

    def test_acknowledged_writes_survive_kill_9(self) -> None:
        """The mount dies with writes a program made and did not close; the next mount commits them."""
        mount = self.start_mount()
        content = random.Random(2).randbytes(6 * MIB + 11)
        descriptor = os.open(self.mnt / "unclosed.bin", os.O_WRONLY | os.O_CREAT, 0o644)
        written = 0
        while written < len(content):
            written += os.write(descriptor, content[written : written + 128 * 1024])
        os.kill(mount.process.pid, signal.SIGKILL)
        mount.process.wait(30)
        with contextlib.suppress(OSError):  # the mount is gone: closing may fail (ENOTCONN)
            os.close(descriptor)

        again = self.start_mount("--force")  # cleans the stale mount the dead one left
        self.assertIn("left by an earlier run: committed", again.log_text())
        self.assertEqual((self.mnt / "unclosed.bin").read_bytes(), content)
        self.assertEqual(again.stop(signal.SIGTERM), 0, again.log_text())
        result = lucid(self.demo.config, "cat", "demo:/unclosed.bin")
        self.assertEqual(result.stdout, content)
