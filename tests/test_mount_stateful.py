"""
Random sequences of file operations, applied to a real mount and to a plain
local directory, must give the same results: the same return values, the same
errno, the same contents and the same stat fields (type, permission bits,
size, link count) and the same extended attributes.

Hypothesis's stateful testing chooses the operations: create and open with
every flag that matters, writes at offsets around chunk boundaries and far
past the end (sparse files), truncation, reads, renames over existing names,
unlinking open files, directories, hard and symbolic links, chmod, listings,
extended attributes by path and by descriptor (with XATTR_CREATE and
XATTR_REPLACE), times set by ``utime``, ``lseek`` and ``read`` at the
descriptor's position, ``copy_file_range``, reads and writes through shared
mappings, a hard link followed by the removal or a rename of one of its
names, and a directory renamed over another.  At the end of each example,
once its descriptors are closed, a second mount of the filespace must show
the same tree; between descriptors the tree is also changed through it, and
files are copied as ``cp -p`` does (times set before the close), whose times
the second mount must show.
Every example works in a fresh folder of one mount; the numbers of examples
and steps are bounded so the whole test takes well under a minute.
"""

from __future__ import annotations

import itertools
import mmap
import os
import stat
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

from lucidlink.crypto import DEFAULT_CHUNK_SIZE
from tests.mount_helpers import DemoMountCase

CHUNK = DEFAULT_CHUNK_SIZE
PATHS = ["f0", "f1", "d0", "d0/f0", "d0/d1", "l0"]
"""Every name an operation may touch; most operations meet existing and missing names alike."""
LINK_TARGETS = ["f0", "d0", "d0/f0", "l0", "missing"]
OFFSETS = [0, 1, 4095, 4096, 131072 - 3, CHUNK - 2, CHUNK, 3 * CHUNK + 5, 2**33 + 1]
SIZES = [0, 3, 4096, CHUNK - 1, CHUNK + 1, 2**33 + 7]
OPEN_FLAGS = [
    os.O_RDONLY, os.O_WRONLY, os.O_RDWR, os.O_RDWR | os.O_CREAT, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
    os.O_RDWR | os.O_CREAT | os.O_EXCL, os.O_WRONLY | os.O_APPEND, os.O_RDWR | os.O_APPEND | os.O_CREAT,
    os.O_RDONLY | os.O_DIRECTORY,
]
MODES = [0o600, 0o644, 0o755, 0o400, 0o000, 0o4755, 0o2775, 0o1777]
OWNERS = [(0, 0), (1000, 1000), (1000, -1), (-1, 2000)]
"""Owners ``chown`` gives (-1 keeps the user or the group)."""
XATTR_NAMES = ["user.a", "user.b", "user.long-name-of-an-attribute"]
"""The extended attributes an operation may set or remove; reads also ask for one the kernel asks before writes."""
XATTR_FLAGS = [0, os.XATTR_CREATE, os.XATTR_REPLACE]
TIMES_NS = [0, 1, 1_000_000_007, 1_700_000_000_123_456_789, -86_400_000_000_000]
"""Access and modification times ``utime`` sets: the epoch, nanoseconds, now-ish, and a day before the epoch."""
SEEKS = [os.SEEK_SET, os.SEEK_CUR, os.SEEK_END]
xattr_values = st.one_of(st.binary(max_size=40), st.sampled_from([b"", b"1", b"2"]))
OTHER_MOUNT_PATIENCE = 5.0
"""Seconds the other mount may take to show what was closed on the first (it is told of changes)."""
CHANGES_BY_PATH: dict[str, Callable[[Path, Path], Any]] = {
    "unlink": lambda path, _: os.unlink(path),
    "rename": os.rename,
    "link": os.link,
    "symlink": lambda path, destination: os.symlink(destination.name, path),
    "mkdir": lambda path, _: os.mkdir(path, 0o755),
    "rmdir": lambda path, _: os.rmdir(path),
    "chmod": lambda path, _: os.chmod(path, 0o640),
    "truncate": lambda path, _: os.truncate(path, 5),
    "setxattr": lambda path, _: os.setxattr(path, "user.a", b"elsewhere", follow_symlinks=False),
    "removexattr": lambda path, _: os.removexattr(path, "user.a", follow_symlinks=False),
}
"""Changes the second mount makes (each of a path, some of a second one too)."""
WHOLE_READ_LIMIT = 16 * CHUNK
"""Files up to this size are compared whole; larger (sparse) ones around every offset of :data:`OFFSETS`."""

payloads = st.one_of(
    st.binary(min_size=1, max_size=3000),
    st.builds(lambda size, byte: bytes([byte]) * size, st.sampled_from([65536, 200_000]), st.integers(1, 255)),
)

Outcome = tuple[str, Any]


def outcome(function: Callable[..., Any], *arguments: Any) -> Outcome:
    """``("ok", result)`` or ``("errno", name)``: what a call did, comparable across filesystems."""
    try:
        return ("ok", function(*arguments))
    except OSError as error:
        return ("errno", os.strerror(error.errno or 0))


def stat_fields(result: os.stat_result) -> tuple[int, ...]:
    """The stat fields that must match: type, permission bits, link count, owner, and size (not of directories)."""
    size = -1 if stat.S_ISDIR(result.st_mode) else result.st_size
    return (stat.S_IFMT(result.st_mode), stat.S_IMODE(result.st_mode), result.st_nlink, result.st_uid,
            result.st_gid, size)


class MountVersusLocal(RuleBasedStateMachine):
    """The same operations on the mount (``mounted``) and on a local directory (``local``)."""

    mount_root: Path
    other_root: Path | None = None
    """A second mount of the same filespace, where the teardown looks for the same tree."""
    runs = itertools.count()
    handles = Bundle("handles")

    def __init__(self) -> None:
        super().__init__()
        self.mounted = self.mount_root / f"run-{next(self.runs)}"
        self.mounted.mkdir()
        self._local = tempfile.TemporaryDirectory(prefix="lucid-stateful-")
        self.local = Path(self._local.name)
        os.chmod(self.local, stat.S_IMODE(os.stat(self.mounted).st_mode))
        self.open: dict[int, tuple[int, int]] = {}
        self._numbers = itertools.count()

    # -- comparing ---------------------------------------------------------------

    def both(self, what: str, function: Callable[[Path], Any]) -> Outcome:
        """Run ``function(root)`` under both roots; they must agree."""
        here, there = outcome(function, self.mounted), outcome(function, self.local)
        assert here == there, f"{what}: the mount gave {_short(here)}, a local directory {_short(there)}"
        return here

    def both_handles(self, what: str, number: int, function: Callable[[int], Any]) -> Outcome:
        mounted, local = self.open[number]
        here, there = outcome(function, mounted), outcome(function, local)
        assert here == there, f"{what}: the mount gave {_short(here)}, a local directory {_short(there)}"
        return here

    @initialize(content=payloads, shared=st.booleans())
    def populate(self, content: bytes, shared: bool) -> None:
        """
        Start from a file in a directory and one beside it, so that most operations meet something.

        A ``shared`` directory has the set-group-ID bit and a group of its own, which what is made in it takes.
        """
        for root in (self.mounted, self.local):
            os.mkdir(root / "d0")
            if shared:
                os.chmod(root / "d0", 0o2775)
                os.chown(root / "d0", -1, 2000)
            (root / "d0" / "f0").write_bytes(content)
            (root / "f0").write_bytes(content[::-1])

    @initialize(target=handles, flags=st.sampled_from([os.O_RDWR, os.O_RDWR | os.O_APPEND, os.O_RDONLY]))
    def open_first(self, flags: int) -> Any:
        """Two descriptors of one file from the start (one read-write), so their coherence is tested."""
        opened = [self._open("f0", os.O_RDWR, 0o644), self._open("f0", flags, 0o644)]
        return multiple(*[number for number in opened if number is not None])

    # -- by path -----------------------------------------------------------------

    @rule(target=handles, path=st.sampled_from(PATHS), flags=st.sampled_from(OPEN_FLAGS),
          mode=st.sampled_from([0o644, 0o600]))
    def open_file(self, path: str, flags: int, mode: int) -> Any:
        number = self._open(path, flags, mode)
        return multiple() if number is None else number

    def _open(self, path: str, flags: int, mode: int) -> int | None:
        """Open ``path`` under both roots: the number of the pair of descriptors, or None if both failed alike."""
        opened = [outcome(os.open, root / path, flags, mode) for root in (self.mounted, self.local)]
        kinds = [kind for kind, _ in opened]
        if kinds == ["ok", "ok"]:
            number = next(self._numbers)
            self.open[number] = (opened[0][1], opened[1][1])
            return number
        for kind, fd in opened:
            if kind == "ok":
                os.close(fd)
        assert opened[0] == opened[1], f"open {path} {flags:#o}: the mount gave {opened[0]}, locally {opened[1]}"
        return None

    @rule(path=st.sampled_from(PATHS), data=payloads)
    def write_whole(self, path: str, data: bytes) -> None:
        self.both(f"write {path}", lambda root: (root / path).write_bytes(data))

    @rule(path=st.sampled_from(PATHS))
    def read_whole(self, path: str) -> None:
        self.both(f"read {path}", lambda root: _content(root / path))

    @rule(path=st.sampled_from(PATHS), size=st.sampled_from(SIZES))
    def truncate(self, path: str, size: int) -> None:
        self.both(f"truncate {path} {size}", lambda root: os.truncate(root / path, size))

    @rule(source=st.sampled_from(PATHS), destination=st.sampled_from(PATHS))
    def rename(self, source: str, destination: str) -> None:
        self.both(f"rename {source} {destination}", lambda root: os.rename(root / source, root / destination))

    @rule(path=st.sampled_from(PATHS))
    def unlink(self, path: str) -> None:
        self.both(f"unlink {path}", lambda root: os.unlink(root / path))

    @rule(path=st.sampled_from(PATHS))
    def mkdir(self, path: str) -> None:
        self.both(f"mkdir {path}", lambda root: os.mkdir(root / path, 0o755))

    @rule(path=st.sampled_from(PATHS))
    def rmdir(self, path: str) -> None:
        self.both(f"rmdir {path}", lambda root: os.rmdir(root / path))

    @rule(source=st.sampled_from(PATHS), destination=st.sampled_from(PATHS))
    def link(self, source: str, destination: str) -> None:
        self.both(f"link {source} {destination}", lambda root: os.link(root / source, root / destination))

    @rule(pointing_at=st.sampled_from(LINK_TARGETS), path=st.sampled_from(PATHS))
    def symlink(self, pointing_at: str, path: str) -> None:
        self.both(f"symlink {pointing_at} {path}", lambda root: os.symlink(pointing_at, root / path))

    @rule(path=st.sampled_from(PATHS))
    def readlink(self, path: str) -> None:
        self.both(f"readlink {path}", lambda root: os.readlink(root / path))

    @rule(path=st.sampled_from(PATHS), mode=st.sampled_from(MODES))
    def chmod(self, path: str, mode: int) -> None:
        self.both(f"chmod {path} {mode:o}", lambda root: os.chmod(root / path, mode))

    @rule(path=st.sampled_from(PATHS), owner=st.sampled_from(OWNERS), follow=st.booleans())
    def chown(self, path: str, owner: tuple[int, int], follow: bool) -> None:
        self.both(f"chown {path} {owner}", lambda root: os.chown(root / path, *owner, follow_symlinks=follow))

    @rule(path=st.sampled_from(["", *PATHS]), name=st.sampled_from(XATTR_NAMES), value=xattr_values,
          flags=st.sampled_from(XATTR_FLAGS), follow=st.booleans())
    def setxattr(self, path: str, name: str, value: bytes, flags: int, follow: bool) -> None:
        self.both(f"setxattr {path} {name} {flags}",
                  lambda root: os.setxattr(root / path, name, value, flags, follow_symlinks=follow))

    @rule(path=st.sampled_from(["", *PATHS]), name=st.sampled_from([*XATTR_NAMES, "security.capability"]),
          follow=st.booleans())
    def getxattr(self, path: str, name: str, follow: bool) -> None:
        self.both(f"getxattr {path} {name}", lambda root: os.getxattr(root / path, name, follow_symlinks=follow))

    @rule(path=st.sampled_from(["", *PATHS]), follow=st.booleans())
    def listxattr(self, path: str, follow: bool) -> None:
        self.both(f"listxattr {path}", lambda root: sorted(os.listxattr(root / path, follow_symlinks=follow)))

    @rule(path=st.sampled_from(["", *PATHS]), name=st.sampled_from(XATTR_NAMES), follow=st.booleans())
    def removexattr(self, path: str, name: str, follow: bool) -> None:
        self.both(f"removexattr {path} {name}", lambda root: os.removexattr(root / path, name, follow_symlinks=follow))

    @rule(path=st.sampled_from(["", *PATHS]))
    def listdir(self, path: str) -> None:
        self.both(f"listdir {path!r}", lambda root: sorted(os.listdir(root / path)))

    @rule(path=st.sampled_from(PATHS), follow=st.booleans())
    def stat(self, path: str, follow: bool) -> None:
        self.both(f"stat {path}", lambda root: stat_fields(os.stat(root / path, follow_symlinks=follow)))

    @rule(path=st.sampled_from(["", *PATHS]))
    def scandir(self, path: str) -> None:
        """Names with the types ``readdir`` gives, before any ``stat``."""
        self.both(f"scandir {path!r}", lambda root: _listing_with_types(root / path))

    @rule(path=st.sampled_from(PATHS), times=st.tuples(st.sampled_from(TIMES_NS), st.sampled_from(TIMES_NS)),
          follow=st.booleans())
    def utime(self, path: str, times: tuple[int, int], follow: bool) -> None:
        self.both(f"utime {path} {times}", lambda root: _set_times(root / path, times, follow))

    @rule(source=st.sampled_from(PATHS), destination=st.sampled_from(PATHS),
          then=st.sampled_from(["unlink source", "rename source", "rename destination"]))
    def link_then(self, source: str, destination: str, then: str) -> None:
        """A hard link, then the original unlinked or one name renamed over the other (the same file)."""
        def linked(root: Path) -> Any:
            os.link(root / source, root / destination)
            if then == "unlink source":
                os.unlink(root / source)
            elif then == "rename source":
                os.rename(root / source, root / destination)
            else:
                os.rename(root / destination, root / source)
            return [stat_fields(os.stat(root / name, follow_symlinks=False)) for name in (source, destination)
                    if os.path.lexists(root / name)]
        self.both(f"link {source} {destination}, {then}", linked)

    @rule(source=st.sampled_from(["d0/d1", "f1", "d0", "l0"]),
          destination=st.sampled_from(["d0/d1", "f1", "l0", "d0"]), child=st.booleans())
    def rename_directory_over_empty_one(self, source: str, destination: str, child: bool) -> None:
        """Both made directories if they can be (the source with a file in it), then one renamed over the other."""
        def renamed(root: Path) -> Any:
            for name in (source, destination):
                if not os.path.lexists(root / name):
                    os.mkdir(root / name, 0o755)
            if child and os.path.isdir(root / source) and not os.path.lexists(root / source / "f0"):
                (root / source / "f0").write_bytes(b"child")
            os.rename(root / source, root / destination)
            return [stat_fields(os.stat(root / name, follow_symlinks=False)) for name in ("", "d0", destination)
                    if os.path.lexists(root / name)]
        self.both(f"rename directory {source} over {destination}", renamed)

    # -- by descriptor -----------------------------------------------------------

    @rule(number=handles, offset=st.sampled_from(OFFSETS), data=payloads)
    def pwrite(self, number: int, offset: int, data: bytes) -> None:
        self.both_handles(f"pwrite {len(data)} bytes at {offset}", number, lambda fd: os.pwrite(fd, data, offset))

    @rule(number=handles, data=payloads)
    def write(self, number: int, data: bytes) -> None:
        self.both_handles(f"write {len(data)} bytes", number, lambda fd: os.write(fd, data))

    @rule(number=handles, offset=st.sampled_from(OFFSETS), size=st.sampled_from([1, 4096, 70000]))
    def pread(self, number: int, offset: int, size: int) -> None:
        self.both_handles(f"pread {size} bytes at {offset}", number, lambda fd: os.pread(fd, size, offset))

    @rule(number=handles, size=st.sampled_from(SIZES))
    def ftruncate(self, number: int, size: int) -> None:
        self.both_handles(f"ftruncate {size}", number, lambda fd: os.ftruncate(fd, size))

    @rule(number=handles, offset=st.sampled_from(OFFSETS), whence=st.sampled_from(SEEKS))
    def lseek(self, number: int, offset: int, whence: int) -> None:
        """Not on directories: their offsets are cookies of each filesystem's own."""
        if not self._is_directory(number):
            self.both_handles(f"lseek {offset} {whence}", number, lambda fd: os.lseek(fd, offset, whence))

    @rule(number=handles, size=st.sampled_from([1, 4096, 70000]))
    def read(self, number: int, size: int) -> None:
        self.both_handles(f"read {size} bytes", number, lambda fd: os.read(fd, size))

    @rule(source=handles, destination=handles, count=st.sampled_from([1, 4096, 70000]),
          source_offset=st.sampled_from(OFFSETS), destination_offset=st.sampled_from(OFFSETS))
    def copy_file_range(self, source: int, destination: int, count: int, source_offset: int,
                        destination_offset: int) -> None:
        results = [outcome(os.copy_file_range, self.open[source][side], self.open[destination][side], count,
                           source_offset, destination_offset) for side in (0, 1)]
        assert results[0] == results[1], (
            f"copy_file_range {count} bytes from {source_offset} to {destination_offset}: "
            f"the mount gave {_short(results[0])}, a local directory {_short(results[1])}")

    @rule(number=handles, offset=st.sampled_from(OFFSETS), data=payloads)
    def mmap_write(self, number: int, offset: int, data: bytes) -> None:
        if self._is_directory(number):
            return
        self.both_handles(f"mmap write {len(data)} bytes at {offset}", number,
                          lambda fd: _write_mapped(fd, offset, data))

    @rule(number=handles, offset=st.sampled_from(OFFSETS), size=st.sampled_from([1, 4096, 70000]))
    def mmap_read(self, number: int, offset: int, size: int) -> None:
        if self._is_directory(number):
            return
        self.both_handles(f"mmap read {size} bytes at {offset}", number, lambda fd: _read_mapped(fd, offset, size))

    @rule(number=handles, mode=st.sampled_from(MODES))
    def fchmod(self, number: int, mode: int) -> None:
        self.xattrs_by_handle(f"fchmod {mode:o}", number, lambda fd: os.fchmod(fd, mode))

    def _is_directory(self, number: int) -> bool:
        """Whether a pair of descriptors is of a directory (whose size differs between filesystems)."""
        return stat.S_ISDIR(os.fstat(self.open[number][1]).st_mode)

    @rule(number=handles)
    def fstat(self, number: int) -> None:
        self.both_handles("fstat", number, lambda fd: stat_fields(os.fstat(fd)))

    @rule(number=handles)
    def fsync(self, number: int) -> None:
        self.both_handles("fsync", number, os.fsync)

    @rule(number=handles, name=st.sampled_from(XATTR_NAMES), value=xattr_values, flags=st.sampled_from(XATTR_FLAGS))
    def fsetxattr(self, number: int, name: str, value: bytes, flags: int) -> None:
        self.xattrs_by_handle(f"fsetxattr {name} {flags}", number, lambda fd: os.setxattr(fd, name, value, flags))

    @rule(number=handles, name=st.sampled_from([*XATTR_NAMES, "security.capability"]))
    def fgetxattr(self, number: int, name: str) -> None:
        self.xattrs_by_handle(f"fgetxattr {name}", number, lambda fd: os.getxattr(fd, name))

    @rule(number=handles)
    def flistxattr(self, number: int) -> None:
        self.xattrs_by_handle("flistxattr", number, lambda fd: sorted(os.listxattr(fd)))

    @rule(number=handles, name=st.sampled_from(XATTR_NAMES))
    def fremovexattr(self, number: int, name: str) -> None:
        self.xattrs_by_handle(f"fremovexattr {name}", number, lambda fd: os.removexattr(fd, name))

    def xattrs_by_handle(self, what: str, number: int, function: Callable[[int], Any]) -> None:
        """
        As :meth:`both_handles`, but not on a directory removed while open.

        The metadata server keeps no removed directory for descriptors open
        on it (see docs/decisions.rst): its extended attributes are gone.
        """
        removed = os.fstat(self.open[number][1])
        if not (stat.S_ISDIR(removed.st_mode) and removed.st_nlink == 0):
            self.both_handles(what, number, function)

    @rule(number=consumes(handles))
    def close(self, number: int) -> None:
        self.both_handles("close", number, os.close)
        del self.open[number]

    # -- the end of an example -----------------------------------------------------

    def teardown(self) -> None:
        try:
            for number in list(self.open):
                self.both_handles("close at the end", number, os.close)
                del self.open[number]
            for path in ["", *PATHS]:
                self.stat(path, follow=False)
                self.listdir(path)
                self.read_whole(path)
                self.both(f"xattrs of {path}", lambda root, path=path: _xattrs(root / path))
            self.seen_by_the_other_mount()
        finally:
            for mounted, local in self.open.values():
                for fd in (mounted, local):
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            self._local.cleanup()

    def seen_by_the_other_mount(self) -> None:
        """Once every descriptor is closed, a second mount of the filespace soon shows the local directory's tree."""
        if self.other_root is not None:
            self._soon_the_same("the other mount", self.other_root / self.mounted.name)

    def _soon_the_same(self, what: str, root: Path) -> None:
        expected = _snapshot(self.local)
        deadline = time.monotonic() + OTHER_MOUNT_PATIENCE
        while (seen := _snapshot(root)) != expected and time.monotonic() < deadline:
            time.sleep(0.05)
        differences = {path: (seen[path], expected[path]) for path in expected if seen[path] != expected[path]}
        assert not differences, f"{what} (first), a local directory (second): {_short(('', differences))}"

    @precondition(lambda self: self.other_root is not None and not self.open)
    @rule(path=st.sampled_from(PATHS), data=payloads, times=st.tuples(st.sampled_from(TIMES_NS),
                                                                       st.sampled_from(TIMES_NS)))
    def copy_keeping_times(self, path: str, data: bytes, times: tuple[int, int]) -> None:
        """
        As ``cp -p`` copies: write, set the times through the descriptor, close.

        The times are read back through the second mount, which knows only
        what the server stored.
        """
        assert self.other_root is not None

        def copied(root: Path) -> None:
            fd = os.open(root / path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data)
                os.utime(fd, ns=times)
            finally:
                os.close(fd)

        here, there = outcome(copied, self.mounted), outcome(copied, self.local)
        assert here == there, f"copy to {path}: the mount gave {_short(here)}, a local directory {_short(there)}"
        if here[0] == "ok":
            self._soon_the_same("the other mount", self.other_root / self.mounted.name)
            stored = os.stat(self.other_root / self.mounted.name / path).st_mtime_ns
            assert stored == times[1], f"copy to {path}: the other mount has mtime {stored}, not {times[1]}"

    @precondition(lambda self: self.other_root is not None and not self.open)
    @rule()
    def other_mount_agrees(self) -> None:
        """Between descriptors, the second mount shows the same tree (what it cached is dropped when it changes)."""
        self.seen_by_the_other_mount()

    @precondition(lambda self: self.other_root is not None and not self.open)
    @rule(path=st.sampled_from(PATHS), data=payloads)
    def write_through_the_other_mount(self, path: str, data: bytes) -> None:
        """A file written whole through the second mount soon reads the same through the first."""
        assert self.other_root is not None
        elsewhere = self.other_root / self.mounted.name
        self._soon_the_same("the other mount", elsewhere)  # another client learns of changes soon, not at once
        here, there = (outcome(lambda root: (root / path).write_bytes(data), root) for root in (elsewhere, self.local))
        assert here == there, f"write {path} elsewhere: the other mount gave {_short(here)}, locally {_short(there)}"
        self._soon_the_same("the first mount", self.mounted)

    @precondition(lambda self: self.other_root is not None and not self.open)
    @rule(change=st.sampled_from(sorted(CHANGES_BY_PATH)), path=st.sampled_from(PATHS),
          destination=st.sampled_from(PATHS))
    def change_through_the_other_mount(self, change: str, path: str, destination: str) -> None:
        """A change of the tree made through the second mount soon shows through the first (what it cached too)."""
        assert self.other_root is not None
        elsewhere = self.other_root / self.mounted.name
        self._soon_the_same("the other mount", elsewhere)
        function = CHANGES_BY_PATH[change]
        here, there = (outcome(function, root / path, root / destination) for root in (elsewhere, self.local))
        assert here == there, f"{change} {path} {destination} elsewhere: the other mount gave {_short(here)}, " \
                              f"locally {_short(there)}"
        self._soon_the_same("the first mount", self.mounted)


def _snapshot(root: Path) -> dict[str, list[Outcome]]:
    """What the teardown compares of each path: type, mode, links and size, listing, content, xattrs."""
    return {
        path: [outcome(function, root / path) for function in (_own_stat_fields, _listing, _content, _xattrs)]
        for path in ["", *PATHS]
    }


def _own_stat_fields(path: Path) -> tuple[int, ...]:
    return stat_fields(os.stat(path, follow_symlinks=False))


def _listing(path: Path) -> list[str]:
    return sorted(os.listdir(path))


def _content(path: Path) -> Any:
    """A file's bytes; of a large (sparse) one, the bytes around each offset of interest."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size <= WHOLE_READ_LIMIT:
            return os.pread(fd, size + 1, 0)
        return [(offset, os.pread(fd, 8192, max(0, offset - 4096))) for offset in [*OFFSETS, *SIZES, size]]
    finally:
        os.close(fd)


def _listing_with_types(path: Path) -> list[tuple[str, bool, bool]]:
    with os.scandir(path) as entries:
        return sorted((entry.name, entry.is_dir(follow_symlinks=False), entry.is_symlink()) for entry in entries)


def _set_times(path: Path, times: tuple[int, int], follow: bool) -> tuple[int, int]:
    """Set the access and modification times and read them back."""
    os.utime(path, ns=times, follow_symlinks=follow)
    result = os.stat(path, follow_symlinks=follow)
    return result.st_atime_ns, result.st_mtime_ns


def _mapped_region(fd: int, offset: int, size: int) -> tuple[int, int] | None:
    """The page-aligned start and length of a mapping of ``size`` bytes at ``offset``, or None past the end."""
    if offset + size > os.fstat(fd).st_size:
        return None
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    return start, offset + size - start


def _write_mapped(fd: int, offset: int, data: bytes) -> bool:
    """Write through a shared mapping inside the file (synced); False past the end of the file."""
    region = _mapped_region(fd, offset, len(data))
    if region is None:
        return False
    start, length = region
    with mmap.mmap(fd, length, offset=start) as mapped:
        mapped[offset - start:] = data
        mapped.flush()
    return True


def _read_mapped(fd: int, offset: int, size: int) -> bytes | None:
    region = _mapped_region(fd, offset, size)
    if region is None:
        return None
    start, length = region
    with mmap.mmap(fd, length, offset=start, access=mmap.ACCESS_READ) as mapped:
        return mapped[offset - start:]


def _xattrs(path: Path) -> dict[str, bytes]:
    """Every extended attribute of ``path`` (not followed if a symbolic link) with its value."""
    return {name: os.getxattr(path, name, follow_symlinks=False) for name in os.listxattr(path, follow_symlinks=False)}


def _short(result: Outcome) -> str:
    text = repr(result)
    return text if len(text) < 300 else text[:300] + "..."


class StatefulMountTests(DemoMountCase):
    """A mount behaves as a local directory under random sequences of operations."""

    def test_mount_matches_local_directory(self) -> None:
        """Results, errno, contents and stat fields match a local directory, step after step."""
        mount = self.start_mount()
        MountVersusLocal.mount_root = mount.mountpoint
        MountVersusLocal.other_root = self.start_mount("other").mountpoint
        run_state_machine_as_test(
            MountVersusLocal,
            settings=settings(
                max_examples=int(os.environ.get("LUCID_STATEFUL_EXAMPLES", "25")),
                stateful_step_count=int(os.environ.get("LUCID_STATEFUL_STEPS", "30")),
                deadline=None,
                database=None,
                report_multiple_bugs=False,
                # Shrinking a long sequence over a mount takes minutes: asked for, not by default.
                phases=[phase for phase in Phase if phase != Phase.shrink or os.environ.get("LUCID_STATEFUL_SHRINK")],
                suppress_health_check=list(HealthCheck),
            ),
        )
