"""
Benchmark: the same file workloads on a plain folder, a Python passthrough mount of it, and ``lucid-mount``.

Three targets, in one run:

- ``plain``: a folder on the local disk;
- ``passthrough``: :mod:`bench.passthrough` (a minimal llfuse filesystem in
  Python, mounted with ``big_writes`` like ``lucid-mount``) over a folder of
  the same disk: the floor of FUSE in Python on this machine, and the
  baseline of the ratios;
- ``lucid``: ``lucid-mount --foreground`` with a cache folder of its own, on
  ``lucid demo DIR --no-mount`` (discovery, a metadata server, the
  local-directory object store on the same disk).

Workloads (``--size`` and the counts below shrink them for quick runs):

- W1: a file of ``--size`` (1 GiB) written in 1 MiB pieces, then ``fsync``
  (on lucid: the chunks stored and the chunk map committed);
- W2 cold: the file read in order on a fresh mount (lucid: an empty chunk
  cache), with the pages of the file (or of the object store, or of the
  passthrough's source) dropped from the kernel's page cache first
  (``posix_fadvise(DONTNEED)``); W2 warm: read again;
- W3: random 4 KiB ``pread`` at aligned offsets of that file for
  ``--random-seconds`` (20 s), on a fresh mount (lucid: its chunk cache kept);
- W4: ``--files`` (2,000) empty files created, stat'ed, listed, deleted;
- W5: ``--small-files`` (1,000) files of 64 KiB written (each closed, i.e.
  committed on lucid), then read back.

``--workloads W3`` leaves out W4 and W5 (W1 and W2 make and read the file
W3 needs, so they always run).

Prints a table (MiB/s or operations/s per target, and lucid / passthrough)
and then one line of JSON.  Exits 1 if a read gave other bytes than were
written.  Every mount and process it started is stopped whatever happens
(an error, Ctrl-C, SIGTERM, or ``--time-limit`` passing).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.demo_helpers import RunningDemo

MIB = 1024 * 1024
PIECE = MIB
PAGE = 4096
HERE = Path(__file__).resolve().parent
TARGETS = ("plain", "passthrough", "lucid")
WORKLOADS = ("W1", "W2", "W3", "W4", "W5")


class TimeLimit(Exception):
    """The run went over ``--time-limit``."""


def parse_size(text: str) -> int:
    from lucidlink.client.config import parse_size as parse

    return parse(text)


def drop_pages(root: Path) -> None:
    """Ask the kernel to drop the (clean) cached pages of every file under ``root``."""
    for folder, _, names in os.walk(root):
        for name in names:
            with contextlib.suppress(OSError):
                fd = os.open(os.path.join(folder, name), os.O_RDONLY)
                try:
                    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                finally:
                    os.close(fd)


def unmount(mountpoint: Path) -> None:
    if os.path.ismount(mountpoint):
        subprocess.run(["fusermount", "-u", "-z", str(mountpoint)], capture_output=True, timeout=30)


class MountProcess:
    """A FUSE filesystem served by a child process until :meth:`stop`."""

    def __init__(self, command: list[str], mountpoint: Path, log: Path, env: dict[str, str]) -> None:
        self.mountpoint = mountpoint
        self.log = log
        self.process = subprocess.Popen(command, stdout=open(log, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
                                        env=env)
        deadline = time.monotonic() + 120
        while not os.path.ismount(mountpoint):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"{command[2]} did not mount:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM (the filesystem flushes and unmounts), then a kill and a lazy unmount if it hangs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(120)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        unmount(self.mountpoint)


@dataclass
class Target:
    """Where the workloads run: ``root`` once :meth:`fresh` returned."""

    name: str
    base: Path
    root: Path = field(init=False)

    def __post_init__(self) -> None:
        """Make the folder ``root`` names."""

    def fresh(self, empty_cache: bool = False) -> None:
        """Start again with nothing of the files in the kernel's caches (and, with ``empty_cache``, lucid's)."""

    def stop(self) -> None:
        """Stop serving (nothing to do for a plain folder)."""


class Plain(Target):
    def __post_init__(self) -> None:
        self.root = self.base / "plain"
        self.root.mkdir(parents=True, exist_ok=True)

    def fresh(self, empty_cache: bool = False) -> None:
        drop_pages(self.root)


class Mounted(Target):
    """A target served by a process of its own; each :meth:`fresh` mounts anew."""

    mount: MountProcess | None = None

    def __post_init__(self) -> None:
        self.root = self.base / f"{self.name}-mnt"
        self.root.mkdir(parents=True, exist_ok=True)

    def command(self, empty_cache: bool) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def backing(self) -> Path:
        raise NotImplementedError

    def fresh(self, empty_cache: bool = False) -> None:
        self.stop()
        drop_pages(self.backing())
        command, env = self.command(empty_cache)
        self.mount = MountProcess(command, self.root, self.base / f"{self.name}.log", env)

    def stop(self) -> None:
        if self.mount is not None:
            mount, self.mount = self.mount, None
            mount.stop()
        unmount(self.root)


class Passthrough(Mounted):
    def backing(self) -> Path:
        source = self.base / "passthrough-source"
        source.mkdir(exist_ok=True)
        return source

    def command(self, empty_cache: bool) -> tuple[list[str], dict[str, str]]:
        return [sys.executable, str(HERE / "passthrough.py"), str(self.backing()), str(self.root)], dict(os.environ)


class Lucid(Mounted):
    demo: RunningDemo
    cache_size: str = "4G"
    profile: Path | None = None
    mounts = 0

    def backing(self) -> Path:
        return self.demo.directory

    def command(self, empty_cache: bool) -> tuple[list[str], dict[str, str]]:
        cache = self.base / "lucid-cache"
        if empty_cache:
            shutil.rmtree(cache, ignore_errors=True)
        env = dict(os.environ, LUCID_CONFIG=str(self.demo.config))
        if self.profile is not None:
            self.mounts += 1
            env["LUCID_PROFILE"] = f"{self.profile}.{self.mounts}"
        return [sys.executable, "-m", "lucidlink.cli.mount", "demo", str(self.root), "--foreground",
                "--cache-dir", str(cache), "--cache-size", self.cache_size], env


@dataclass
class Figure:
    """One measured figure: ``amount`` of ``unit`` in ``seconds``."""

    amount: float
    seconds: float
    unit: str

    @property
    def rate(self) -> float:
        return self.amount / self.seconds if self.seconds > 0 else float("inf")


# -- the workloads -----------------------------------------------------------------


def piece_of(block: bytes, number: int, length: int) -> bytes:
    return number.to_bytes(8, "big") + block[8:length]


class Pieces:
    """The big file's content: 1 MiB pieces of one block, each starting with its number (so none repeats).

    Pieces are made and checked in place (one buffer, compared with ``==``,
    i.e. ``memcmp``), so that the benchmark's own work stays far below the
    page cache's speed it has to measure.
    """

    def __init__(self, block: bytes) -> None:
        self.expected = bytearray(block)

    def piece(self, number: int) -> bytearray:
        self.expected[:8] = number.to_bytes(8, "big")
        return self.expected

    def matches(self, number: int, got: bytearray | memoryview) -> bool:
        piece = self.piece(number)
        return got == piece if len(got) == PIECE else bytes(got) == bytes(piece[: len(got)])


def write_big(root: Path, size: int, pieces: Pieces) -> Figure:
    """W1: write ``size`` bytes in 1 MiB pieces, then fsync."""
    started = time.monotonic()
    with open(root / "big.bin", "wb", buffering=0) as stream:
        for number in range(-(-size // PIECE)):
            length = min(PIECE, size - number * PIECE)
            piece = pieces.piece(number)
            stream.write(piece if length == PIECE else piece[:length])
        os.fsync(stream.fileno())
    return Figure(size / MIB, time.monotonic() - started, "MiB/s")


def read_big(root: Path, size: int, pieces: Pieces) -> tuple[Figure, int]:
    """W2: read the file in order in 1 MiB pieces; (figure, pieces that differ from what was written)."""
    buffer = bytearray(PIECE)
    view = memoryview(buffer)
    wrong = 0
    total = 0
    started = time.monotonic()
    with open(root / "big.bin", "rb", buffering=0) as stream:
        for number in range(-(-size // PIECE) + 1):
            length = stream.readinto(buffer)
            if not length:
                break
            total += length
            wrong += not pieces.matches(number, buffer if length == PIECE else view[:length])
    seconds = time.monotonic() - started
    return Figure(total / MIB, seconds, "MiB/s"), wrong + (total != size)


def random_reads(root: Path, seconds: float, block: bytes) -> tuple[Figure, int]:
    """W3: aligned 4 KiB preads at random offsets for ``seconds``; (figure, reads that gave wrong bytes)."""
    chooser = random.Random(6)
    wrong = 0
    count = 0
    fd = os.open(root / "big.bin", os.O_RDONLY)
    try:
        pages = os.fstat(fd).st_size // PAGE
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        started = time.monotonic()
        deadline = started + seconds
        while True:
            for _ in range(64):
                page = chooser.randrange(pages)
                got = os.pread(fd, PAGE, page * PAGE)
                offset = page * PAGE % PIECE
                if offset and got != block[offset : offset + PAGE]:
                    wrong += 1
                count += 1
            now = time.monotonic()
            if now >= deadline:
                break
    finally:
        os.close(fd)
    return Figure(count, now - started, "reads/s"), wrong


def metadata_ops(root: Path, count: int) -> dict[str, Figure]:
    """W4: create, stat, list and delete ``count`` empty files."""
    folder = root / "many"
    folder.mkdir()
    names = [str(folder / f"f{number:05d}") for number in range(count)]
    figures = {}
    started = time.monotonic()
    for name in names:
        os.close(os.open(name, os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o644))
    figures["create"] = Figure(count, time.monotonic() - started, "ops/s")
    started = time.monotonic()
    for name in names:
        os.stat(name)
    figures["stat"] = Figure(count, time.monotonic() - started, "ops/s")
    started = time.monotonic()
    listed = sum(1 for _ in os.scandir(folder))
    figures["list"] = Figure(listed, time.monotonic() - started, "entries/s")
    started = time.monotonic()
    for name in names:
        os.unlink(name)
    figures["delete"] = Figure(count, time.monotonic() - started, "ops/s")
    folder.rmdir()
    if listed != count:
        raise SystemExit(f"listing {folder} gave {listed} entries, not {count}")
    total = sum(f.seconds for f in figures.values())
    figures["all"] = Figure(3 * count + listed, total, "ops/s")
    return figures


def small_files(root: Path, count: int, size: int, block: bytes) -> tuple[dict[str, Figure], int]:
    """W5: write ``count`` files of ``size`` bytes (each closed), then read them; (figures, wrong files)."""
    folder = root / "small"
    folder.mkdir()
    contents = [piece_of(block, number, size) for number in range(count)]
    started = time.monotonic()
    for number, content in enumerate(contents):
        with open(folder / f"s{number:05d}", "wb", buffering=0) as stream:
            stream.write(content)
    write = Figure(count, time.monotonic() - started, "files/s")
    wrong = 0
    started = time.monotonic()
    for number, content in enumerate(contents):
        with open(folder / f"s{number:05d}", "rb", buffering=0) as stream:
            wrong += stream.read(size + 1) != content
    read = Figure(count, time.monotonic() - started, "files/s")
    shutil.rmtree(folder)
    return {"write": write, "read": read,
            "all": Figure(2 * count, write.seconds + read.seconds, "files/s")}, wrong


# -- the run -----------------------------------------------------------------------


def run_target(target: Target, args: argparse.Namespace, block: bytes,
               problems: list[str]) -> dict[str, Figure]:
    """Every workload on one target (the big file is removed at the end)."""
    figures: dict[str, Figure] = {}
    target.fresh(empty_cache=True)
    pieces = Pieces(block)
    figures["W1 write+fsync"] = write_big(target.root, args.size, pieces)
    target.fresh(empty_cache=True)
    for name in ("W2 read cold", "W2 read warm"):
        figures[name], wrong = read_big(target.root, args.size, pieces)
        if wrong:
            problems.append(f"{target.name}: {name}: {wrong} pieces differ from what was written")
    if "W3" in args.workloads:
        target.fresh()
        figures["W3 random 4K"], wrong = random_reads(target.root, args.random_seconds, block)
        if wrong:
            problems.append(f"{target.name}: {wrong} random reads gave other bytes")
    (target.root / "big.bin").unlink()
    if "W4" in args.workloads:
        for name, figure in metadata_ops(target.root, args.files).items():
            figures[f"W4 {name}"] = figure
    if "W5" in args.workloads:
        small, wrong = small_files(target.root, args.small_files, args.small_size, block)
        if wrong:
            problems.append(f"{target.name}: {wrong} small files read back other bytes")
        for name, figure in small.items():
            figures[f"W5 {name}"] = figure
    target.stop()
    return figures


def report(results: dict[str, dict[str, Figure]], args: argparse.Namespace, problems: list[str]) -> None:
    names = list(next(iter(results.values())))
    targets = list(results)
    ratio = "passthrough" in results and "lucid" in results
    header = f"{'workload':<18} {'unit':<10}" + "".join(f"{t:>13}" for t in targets)
    print(header + (f"{'lucid/pt':>10}" if ratio else ""))
    summary: dict[str, Any] = {}
    for name in names:
        unit = results[targets[0]][name].unit
        line = f"{name:<18} {unit:<10}" + "".join(f"{results[t][name].rate:>13,.1f}" for t in targets)
        entry = {t: round(results[t][name].rate, 1) for t in targets}
        if ratio:
            share = results["lucid"][name].rate / results["passthrough"][name].rate
            line += f"{share:>10.0%}"
            entry["lucid_over_passthrough"] = round(share, 3)
        print(line)
        summary[name] = entry
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print(json.dumps({
        "benchmark": "fs_bench", "size": args.size, "random_seconds": args.random_seconds, "files": args.files,
        "small_files": args.small_files, "small_size": args.small_size, "unit": {n: results[targets[0]][n].unit
                                                                                   for n in names},
        "figures": summary, "ok": not problems,
    }))


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise :class:`TimeLimit` in the main thread after ``seconds``; SIGTERM ends the run the same way."""

    def expired(signum: int, frame: Any) -> None:
        raise TimeLimit(f"stopped by signal {signum}" if signum == signal.SIGTERM else "over --time-limit")

    previous = signal.signal(signal.SIGALRM, expired), signal.signal(signal.SIGTERM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous[0])
        signal.signal(signal.SIGTERM, previous[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=parse_size, default=parse_size("1G"), help="W1-W3 file size (default 1G)")
    parser.add_argument("--random-seconds", type=float, default=20.0, help="W3 duration (default 20)")
    parser.add_argument("--files", type=int, default=2000, help="W4 file count (default 2000)")
    parser.add_argument("--small-files", type=int, default=1000, help="W5 file count (default 1000)")
    parser.add_argument("--small-size", type=parse_size, default=parse_size("64K"), help="W5 file size (default 64K)")
    parser.add_argument("--targets", default=",".join(TARGETS), help="comma-separated subset of plain,passthrough,lucid")
    parser.add_argument("--workloads", default=",".join(WORKLOADS),
                        help="comma-separated subset of W1-W5 (W1 and W2 always run: they make the file W3 reads)")
    parser.add_argument("--quick", action="store_true", help="small sizes: 128M, 5 s, 300 files, 200 small files")
    parser.add_argument("--time-limit", type=float, default=1800.0, help="stop everything after this many seconds")
    parser.add_argument("--profile", type=Path,
                        help="profile the lucid mounts (LUCID_PROFILE; see lucidlink.mount): PROFILE.1 for W1, .2 for W2, "
                             ".3 for W3-W5")
    parser.add_argument("--dir", type=Path, help="where to put everything (default: a temporary folder, removed)")
    args = parser.parse_args()
    if args.quick:
        args.size, args.random_seconds, args.files, args.small_files = 128 * MIB, 5.0, 300, 200
    args.workloads = {name.strip().upper() for name in args.workloads.split(",") if name.strip()}
    if args.workloads - set(WORKLOADS):
        parser.error(f"unknown workloads {', '.join(sorted(args.workloads - set(WORKLOADS)))}; choose from W1-W5")
    chosen = [name.strip() for name in args.targets.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(TARGETS))
    if unknown or not chosen:
        parser.error(f"unknown targets {', '.join(unknown) or '(none)'}; choose from {', '.join(TARGETS)}")
    if args.size < PIECE or args.small_size < 16 or args.files < 1 or args.small_files < 1:
        parser.error("--size must be at least 1M, --small-size at least 16 bytes, the counts at least 1")
    base = args.dir or Path(tempfile.mkdtemp(prefix="lucid-fs-bench-"))
    base.mkdir(parents=True, exist_ok=True)
    block = hashlib.sha256(b"lucid").digest() * (PIECE // 32)
    results: dict[str, dict[str, Figure]] = {}
    problems: list[str] = []
    made: list[Target] = []
    demo: RunningDemo | None = None
    try:
        with time_limit(args.time_limit):
            for name in chosen:
                if name == "plain":
                    target: Target = Plain(name, base)
                elif name == "passthrough":
                    target = Passthrough(name, base)
                else:
                    demo = RunningDemo(base / "demo")
                    demo.wait_until_ready()
                    target = Lucid(name, base)
                    target.demo = demo
                    target.cache_size = str(max(args.size * 2, 256 * MIB))
                    target.profile = args.profile
                made.append(target)
                started = time.monotonic()
                results[name] = run_target(target, args, block, problems)
                print(f"# {name}: {time.monotonic() - started:.1f} s", file=sys.stderr, flush=True)
    except (TimeLimit, KeyboardInterrupt) as stopped:
        problems.append(f"not finished: {stopped or 'interrupted'}")
    finally:
        for target in made:
            with contextlib.suppress(Exception):
                target.stop()
        if demo is not None:
            demo.stop()
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    if results:
        report(results, args, problems)
    else:
        print(json.dumps({"benchmark": "fs_bench", "ok": False, "problems": problems}))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
