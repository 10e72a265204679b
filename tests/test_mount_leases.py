"""
Directory leases through real mounts (their own tier): ``lucid-mount`` makes
creates and unlinks in a directory it leases at once, and sends them to the
metadata server without waiting (``docs/directory-leases.rst``).  Two mounts
of one filespace, as two desktops:

- Many creates and unlinks on one mount, then the other lists and looks up
  the names: it sees exactly the first one's result (the lease is recalled,
  and given back after the changes made under it).  And the other mount
  listing while the first creates: no errors, and nothing stale once the
  first's ``fsyncdir`` returned.  Both mounts creating the same names in a
  leased folder: each is made once.
- Close-to-open holds for files made under a lease.
- POSIX under a lease: ``fsyncdir``, an open file unlinked, ``O_EXCL``, a
  name made again after its unlink, renames.
- ``--sync-metadata`` mounts take no lease, and work.
- Unmounting right after creates loses none: the process waits for the
  changes in flight (held by a stopped metadata server, or a burst).
- The metadata server killed and restarted while creates and unlinks are in
  flight: both mounts agree afterwards, nothing an ``fsyncdir`` vouched for
  is lost, and a loss is never silent (the next ``fsyncdir`` fails).  That
  the creates are kept: sent again, and made, by the new server.

Whether a directory is leased is seen from outside by inode ids: a file made
under a lease takes its id from a block the server reserved for the mount
before, so it is lower than that of a file a third mount, which takes no
leases (``--sync-metadata``), made meanwhile the usual way (the server's
next id is past every block it reserved).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import subprocess
import time
from pathlib import Path

from lucidlink.atomic import fsync_folder
from tests.mount_helpers import DemoMountCase, MountProcess
from tests.test_mount_shared import eventually, pattern, run_together

LEASED_WITHIN = 10.0
"""Seconds within which a mount holds the lease on a directory it made (it asks in the background)."""


fsyncdir = fsync_folder
"""``fsync`` of a folder of the mount (FUSE's fsyncdir): wait for the changes made in it without waiting."""


def touch(path: Path) -> int:
    """Create the empty file ``path`` (it must not exist); its inode number."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        return os.fstat(fd).st_ino
    finally:
        os.close(fd)


class LeaseCase(DemoMountCase):
    """Mounts ``a`` and ``b`` of one demo filespace, and a ``--sync-metadata`` mount that makes the probes."""

    def setUp(self) -> None:
        super().setUp()
        self.mounts: dict[str, MountProcess] = {}
        self.a = self.start_mount("a").mountpoint
        self.b = self.start_mount("b").mountpoint
        self.prober = self.start_mount("prober", "--sync-metadata").mountpoint
        os.mkdir(self.prober / "probes")
        self.probes = 0

    def start_mount(self, name: str = "mnt", *options: str) -> MountProcess:
        mount = super().start_mount(name, *options)
        self.mounts[name] = mount
        return mount

    def made_under_lease(self, folder: Path) -> bool:
        """Whether a file made in ``folder`` now (and removed again) is made under a lease (see the module)."""
        self.probes += 1
        server_next = touch(self.prober / "probes" / f"p{self.probes}")
        probe = folder / f".probe{self.probes}"
        leased = touch(probe) < server_next
        os.unlink(probe)
        return leased

    def until_leased(self, folder: Path) -> None:
        """Wait until the mount of ``folder`` makes creates in it under a lease."""
        deadline = time.monotonic() + LEASED_WITHIN
        while not self.made_under_lease(folder):
            if time.monotonic() > deadline:
                raise AssertionError(f"{folder} was not leased after {LEASED_WITHIN} s")
            time.sleep(0.05)

    def continue_metadata_server(self, pid: int) -> None:
        """Let the metadata server stopped with SIGSTOP go on (if it is still there)."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)

    def assertSameListing(self, expected: set[str], *folders: Path) -> None:
        for folder in folders:
            self.assertEqual(sorted(os.listdir(folder)), sorted(expected), folder)


class LeasedChangesTests(LeaseCase):
    """Creates and unlinks made at once on one mount, seen by the other; POSIX under a lease."""

    def test_many_changes_seen_by_the_other(self) -> None:
        """300 creates and 200 unlinks on ``a``, then ``b`` lists and looks up: exactly ``a``'s result."""
        os.mkdir(self.a / "many")
        self.until_leased(self.a / "many")
        names = [f"f{number:03}" for number in range(300)]
        for name in names:
            touch(self.a / "many" / name)
        removed = {name for number, name in enumerate(names) if number % 3}
        for name in sorted(removed):
            os.unlink(self.a / "many" / name)
        kept = set(names) - removed
        self.assertSameListing(kept, self.b / "many", self.a / "many")
        for name in names[:30]:
            if name in kept:
                self.assertEqual(os.stat(self.b / "many" / name).st_size, 0)
            else:
                self.assertErrno(errno.ENOENT, os.stat, self.b / "many" / name)
        fsyncdir(self.a / "many")

        # The other mount lists over and over while this one creates; after its fsyncdir, nothing is stale.
        os.mkdir(self.a / "together")
        self.until_leased(self.a / "together")
        made = [f"t{number:03}" for number in range(200)]
        for name in made[:50]:  # in flight, some of them, when b's first listing recalls the lease
            touch(self.a / "together" / name)
        listings: list[set[str]] = []

        def create() -> None:
            for name in made[50:]:
                touch(self.a / "together" / name)
            fsyncdir(self.a / "together")

        def list_until_all_seen() -> None:
            deadline = time.monotonic() + 60
            while len(listings) == 0 or listings[-1] != set(made):
                listings.append(set(os.listdir(self.b / "together")))
                self.assertLessEqual(listings[-1], set(made))
                self.assertLess(time.monotonic(), deadline, f"b saw {len(listings[-1])} of {len(made)}")

        run_together([create, list_until_all_seen])
        self.assertGreater(len(listings), 1, "b listed only once: the two did not overlap")
        self.assertSameListing(set(made), self.b / "together", self.a / "together")

    def test_both_mounts_create_in_a_leased_folder(self) -> None:
        """Both mounts create at once in a folder ``a`` leases: of names both make, one wins; all agree after."""
        os.mkdir(self.a / "both")
        self.until_leased(self.a / "both")
        won: dict[str, set[str]] = {"a": set(), "b": set()}

        def create(side: str, root: Path) -> None:
            for number in range(150):
                for name in (f"{side}{number}", f"x{number}"):
                    try:
                        touch(root / "both" / name)
                    except FileExistsError:
                        continue
                    won[side].add(name)

        run_together([lambda: create("a", self.a), lambda: create("b", self.b)])
        fsyncdir(self.a / "both")
        contended = {f"x{number}" for number in range(150)}
        self.assertEqual(won["a"] & won["b"], set(), "both made the same name")
        self.assertEqual((won["a"] | won["b"]) & contended, contended)
        self.assertSameListing(won["a"] | won["b"], self.a / "both", self.b / "both")

    def test_close_to_open(self) -> None:
        """Files written and closed under ``a``'s lease are read whole on ``b``."""
        os.mkdir(self.a / "docs")
        self.until_leased(self.a / "docs")
        contents = {f"doc{number}": pattern(number, 1000 * number + 7) for number in range(12)}
        for name, data in contents.items():
            with open(self.a / "docs" / name, "xb") as file:
                file.write(data)
        for name, data in contents.items():
            self.assertEqual((self.b / "docs" / name).read_bytes(), data, name)
        self.assertSameListing(set(contents), self.b / "docs")
        self.assertEqual(self.lucid_cat("/docs/doc3"), contents["doc3"])

    def test_posix_under_a_lease(self) -> None:
        """fsyncdir, an open file unlinked, O_EXCL, a name made again, a rename: as on a local filesystem."""
        folder = self.a / "posix"
        os.mkdir(folder)
        self.until_leased(folder)
        fsyncdir(folder)

        # Made and unlinked while open (both at once under the lease): the descriptor keeps the file.
        fd = os.open(folder / "open", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.pwrite(fd, b"written before", 0)
            os.unlink(folder / "open")
            self.assertErrno(errno.ENOENT, os.stat, folder / "open")
            self.assertEqual(os.pread(fd, 100, 0), b"written before")
            os.pwrite(fd, b"WRITTEN AFTER", 0)
            self.assertEqual(os.pread(fd, 100, 0), b"WRITTEN AFTERe")
            self.assertEqual(os.fstat(fd).st_nlink, 0)
            os.fsync(fd)
        finally:
            os.close(fd)

        # Closed, opened again, unlinked while open.
        (folder / "reopened").write_bytes(b"stored")
        fd = os.open(folder / "reopened", os.O_RDWR)
        try:
            os.unlink(folder / "reopened")
            self.assertEqual(os.pread(fd, 100, 0), b"stored")
            os.pwrite(fd, b"!", 6)
            self.assertEqual(os.pread(fd, 100, 0), b"stored!")
        finally:
            os.close(fd)
        self.assertEqual(os.listdir(folder), [])

        # O_EXCL of a name made a moment ago; a name made again right after its unlink.
        touch(folder / "exists")
        self.assertErrno(errno.EEXIST, os.open, folder / "exists", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        (folder / "again").write_bytes(b"first")
        first = os.stat(folder / "again").st_ino
        os.unlink(folder / "again")
        fd = os.open(folder / "again", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"second")
        os.close(fd)
        self.assertNotEqual(os.stat(folder / "again").st_ino, first)
        self.assertEqual((folder / "again").read_bytes(), b"second")

        # A rename within the leased folder, after changes made at once in it.
        touch(folder / "before")
        os.rename(folder / "before", folder / "after")
        os.rename(folder / "again", folder / "exists")  # over a file made under the lease
        fsyncdir(folder)
        self.assertSameListing({"after", "exists"}, folder, self.b / "posix")
        self.assertEqual((self.b / "posix" / "exists").read_bytes(), b"second")
        self.assertErrno(errno.ENOENT, os.stat, self.b / "posix" / "before")
        self.assertErrno(errno.ENOENT, os.stat, self.b / "posix" / "again")

        # Back on a: b's reads recalled the lease; changes go to the server one at a time, and still work.
        os.unlink(folder / "after")
        touch(folder / "late")
        eventually(lambda: self.assertSameListing({"exists", "late"}, self.b / "posix"))

    def test_sync_metadata(self) -> None:
        """A ``--sync-metadata`` mount takes no lease, and creates, unlinks and lists as it should."""
        synced = self.start_mount("synced", "--sync-metadata").mountpoint
        folder = synced / "plain"
        os.mkdir(folder)
        time.sleep(0.5)  # a lease, were one asked for, would be granted by now
        self.assertFalse(self.made_under_lease(folder))
        for number in range(20):
            touch(folder / f"n{number}")
        for number in range(0, 20, 2):
            os.unlink(folder / f"n{number}")
        self.assertErrno(errno.EEXIST, os.open, folder / "n1", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        self.assertErrno(errno.ENOENT, os.unlink, folder / "n0")
        fsyncdir(folder)
        odd = {f"n{number}" for number in range(1, 20, 2)}
        self.assertSameListing(odd, folder, self.a / "plain")
        self.assertFalse(self.made_under_lease(folder))


class UnmountTests(LeaseCase):
    """Unmounting waits for the changes a mount made without waiting."""

    def test_unmount_right_after_creates(self) -> None:
        """
        ``fusermount -u`` right after creates (no fsync): the process waits for those in flight, and every
        file is there.  Once with 20 creates surely in flight (the metadata server stopped until a second
        after the unmount), once right after a burst of 300.
        """
        os.mkdir(self.a / "held")
        self.until_leased(self.a / "held")
        fsyncdir(self.a / "held")  # the pipeline empty: the 20 below fit in it
        server = self.metadata_server_pid()
        os.kill(server, signal.SIGSTOP)
        self.addCleanup(self.continue_metadata_server, server)
        held = {f"h{number:02}" for number in range(20)}
        for name in sorted(held):
            touch(self.a / "held" / name)
        mount = self.unmount("a")
        with self.assertRaises(subprocess.TimeoutExpired, msg="the mount ended with changes unsent"):
            mount.process.wait(1)
        self.continue_metadata_server(server)
        self.assertEqual(mount.process.wait(60), 0, mount.log_text())
        self.assertNotIn("was refused by the metadata server", mount.log_text())
        self.assertSameListing(held, self.b / "held")

        self.start_mount("a")
        self.assertSameListing(held, self.a / "held")
        os.mkdir(self.a / "burst")
        self.until_leased(self.a / "burst")
        burst = {f"u{number:03}" for number in range(300)}
        for name in sorted(burst):
            touch(self.a / "burst" / name)
        mount = self.unmount("a")
        self.assertEqual(mount.process.wait(60), 0, mount.log_text())
        self.assertNotIn("was refused by the metadata server", mount.log_text())
        self.assertSameListing(burst, self.b / "burst")

    def unmount(self, name: str) -> MountProcess:
        """``fusermount -u`` of mount ``name`` (its process ends by itself)."""
        mount = self.mounts[name]
        subprocess.run(["fusermount", "-u", str(mount.mountpoint)], check=True, capture_output=True, timeout=60)
        return mount


class MetadataServerRestartTests(LeaseCase):
    """
    The metadata server dies and comes back while a mount has creates and unlinks in flight in a leased folder.

    To have changes surely in flight, the server is stopped (SIGSTOP) first:
    ``a`` answers its program's creates and unlinks at once and holds them
    in its pipeline; then the server is killed (SIGKILL) and the demo
    restarts it.
    """

    def creates_across_a_restart(self) -> tuple[list[str], set[str], list[int], set[str]]:
        """
        20 creates stored (fsyncdir); 20 creates and 10 unlinks of those stored in flight when the server dies;
        20 creates after its restart, and an fsyncdir.  Returns the names created (and not unlinked), those an
        fsyncdir that succeeded vouched for, the errno of each that failed, and what ``a`` lists afterwards
        (``b`` lists the same).
        """
        folder = self.a / "inflight"
        os.mkdir(folder)
        self.until_leased(folder)
        created: list[str] = []
        vouched: set[str] = set()
        failed: list[int] = []

        def create(numbers: range) -> None:
            for number in numbers:
                touch(folder / f"c{number:03}")
                created.append(f"c{number:03}")

        def sync() -> None:
            try:
                fsyncdir(folder)
            except OSError as error:
                failed.append(error.errno)
            else:
                vouched.update(created)

        create(range(20))
        sync()
        os.kill(self.metadata_server_pid(), signal.SIGSTOP)
        self.addCleanup(self.continue_metadata_server, self.metadata_server_pid())
        create(range(20, 40))
        for _ in range(10):  # in flight too: unlinks of files stored before
            removed = created.pop(0)
            os.unlink(folder / removed)
            vouched.discard(removed)
        self.kill_metadata_server()
        create(range(40, 60))
        sync()
        seen_by_a = set(os.listdir(folder))
        eventually(lambda: self.assertEqual(set(os.listdir(self.b / "inflight")), seen_by_a))
        return created, vouched, failed, seen_by_a

    def test_nothing_lost_silently(self) -> None:
        """Both mounts agree; what an fsyncdir vouched for is kept; fsyncdir fails if, and only if, a create was lost."""
        created, vouched, failed, seen_by_a = self.creates_across_a_restart()
        self.assertEqual(vouched - seen_by_a, set(), "files an fsyncdir that succeeded vouched for are lost")
        self.assertLessEqual({f"c{number:03}" for number in (*range(10, 20), *range(40, 60))}, seen_by_a)
        self.assertEqual({f"c{number:03}" for number in range(10)} & seen_by_a, set(), "unlinks in flight undone")
        lost = set(created) - seen_by_a
        self.assertEqual(failed, [errno.EIO] if lost else [], f"lost: {sorted(lost)}")
        if lost:
            self.assertIn("was refused by the metadata server", self.mounts["a"].log_text())

    def test_creates_in_flight_kept(self) -> None:
        """Every create ``a`` answered is kept across the restart: sent again, and made, by the new server."""
        created, _, failed, seen_by_a = self.creates_across_a_restart()
        log = self.mounts["a"].log_text().splitlines()
        refusals = [line for line in log if "was refused by the metadata server" in line]
        self.assertEqual((sorted(set(created) - seen_by_a), failed), ([], []), refusals[:1])

