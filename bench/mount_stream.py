"""
Benchmark: streaming one large file through ``lucid-mount``, and the mount's memory while it does.

Real processes (run from the checkout, ``PYTHONPATH=.``): ``lucid demo DIR
--no-mount`` (discovery, a metadata server, a local-directory object store)
and ``lucid-mount --foreground`` on it.
Phases, each on a fresh mount (so the kernel's page cache of the mount is
gone and every byte crosses FUSE):

- ``write``: the file written in 1 MiB pieces, then ``fsync`` (stored and
  committed), then closed;
- ``cold, no read-ahead``: read in order with an empty cache and ``--read-ahead 0``;
- ``cold, read-ahead N``: the same with ``--read-ahead N`` (the default 4);
- ``warm``: read again on a new mount over that cache (from local disk).

The baseline is the local disk, in the same run: the same file written to
and read from a plain folder next to the object store (its read is the page
cache's, i.e. what a local disk gives at best).  Throughputs are shown as
ratios to it.  The resident memory of the ``lucid-mount`` process is sampled
every 0.1 s; its peak (``VmHWM``) is the figure to hold under 300 MB.

Prints a table, then one line of JSON; exits 1 if the peak memory is over
the limit or a read returned other bytes than were written.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from fs_bench import MountProcess, parse_size  # the same mount handling as the files benchmark

from tests.demo_helpers import RunningDemo

MIB = 1024 * 1024
RSS_LIMIT = 300 * MIB
PIECE = MIB


class Mount(MountProcess):
    """``lucid-mount demo MOUNTPOINT --foreground`` with a cache folder, memory sampled while it runs."""

    def __init__(self, demo: RunningDemo, mountpoint: Path, cache: Path, cache_size: str, read_ahead: int) -> None:
        log = mountpoint.parent / "mount.log"
        log.unlink(missing_ok=True)
        self.peak_rss = 0
        self._sampling = False
        super().__init__(
            [sys.executable, "-m", "lucidlink.cli.mount", "demo", str(mountpoint), "--foreground",
             "--cache-dir", str(cache), "--cache-size", cache_size, "--read-ahead", str(read_ahead)],
            mountpoint, log, dict(os.environ, LUCID_CONFIG=str(demo.config)),
        )
        self._sampling = True
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _status(self, field: str) -> int:
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
        except (FileNotFoundError, ProcessLookupError):
            pass
        return 0

    def _sample(self) -> None:
        while self._sampling:
            self.peak_rss = max(self.peak_rss, self._status("VmRSS"))
            time.sleep(0.1)

    def stop(self) -> int:  # type: ignore[override]
        """Unmount (SIGTERM), wait; the peak resident memory it had (VmHWM)."""
        peak = max(self.peak_rss, self._status("VmHWM"))
        self._sampling = False
        super().stop()
        return peak


def write_file(path: Path, size: int, seed: bytes) -> tuple[float, str]:
    """Write ``size`` bytes (a repeating pseudo-random MiB, made different per piece), fsync; (seconds, sha256)."""
    block = hashlib.sha256(seed).digest() * (PIECE // 32)
    digest = hashlib.sha256()
    started = time.monotonic()
    with open(path, "wb", buffering=0) as stream:
        for number in range(-(-size // PIECE)):
            piece = number.to_bytes(8, "big") + block[8 : min(PIECE, size - number * PIECE)]
            stream.write(piece)
            digest.update(piece)
        os.fsync(stream.fileno())
    return time.monotonic() - started, digest.hexdigest()


def read_file(path: Path) -> tuple[float, str]:
    """Read the whole file in order in 1 MiB pieces; (seconds, sha256)."""
    digest = hashlib.sha256()
    started = time.monotonic()
    with open(path, "rb", buffering=0) as stream:
        while piece := stream.read(PIECE):
            digest.update(piece)
    return time.monotonic() - started, digest.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="1G", help="the file's size (default 1G; 4G for the memory target)")
    parser.add_argument("--cache-size", default="",
                        help="the mount's --cache-size (default: the file's size plus 10%%)")
    parser.add_argument("--read-ahead", type=int, default=4, help="read-ahead of the second cold read (default 4)")
    parser.add_argument("--dir", type=Path, help="where to put everything (default: a temporary folder, removed)")
    args = parser.parse_args()
    size = parse_size(args.size)
    cache_size = args.cache_size or str(size + size // 10)
    base = args.dir or Path(tempfile.mkdtemp(prefix="lucid-mount-stream-"))
    base.mkdir(parents=True, exist_ok=True)
    demo = RunningDemo(base / "demo")
    demo.wait_until_ready()
    rows: list[tuple[str, float, int]] = []
    problems: list[str] = []
    try:
        mountpoint = base / "mnt"
        mountpoint.mkdir(exist_ok=True)
        local = base / "local.bin"
        local_write, digest = write_file(local, size, b"lucid")
        local_read, local_digest = read_file(local)
        local.unlink()

        def phase(name: str, cache: str, read_ahead: int, work: str) -> None:
            mount = Mount(demo, mountpoint, base / cache, cache_size, read_ahead)
            try:
                if work == "write":
                    seconds, got = write_file(mountpoint / "stream.bin", size, b"lucid")
                else:
                    seconds, got = read_file(mountpoint / "stream.bin")
            finally:
                peak = mount.stop()
            if got != digest:
                problems.append(f"{name}: the bytes differ from what was written")
            rows.append((name, seconds, peak))

        phase("write + fsync", "cache-write", args.read_ahead, "write")
        phase("cold, no read-ahead", "cache-cold-0", 0, "read")
        phase(f"cold, read-ahead {args.read_ahead}", "cache-cold", args.read_ahead, "read")
        phase("warm (local cache)", "cache-cold", args.read_ahead, "read")
    finally:
        demo.stop()
        if args.dir is None:
            shutil.rmtree(base, ignore_errors=True)
    if local_digest != digest:
        problems.append("the local baseline read other bytes")

    print(f"{'phase':<24} {'seconds':>8} {'MiB/s':>8} {'of local':>9} {'peak RSS MiB':>13}")
    print(f"{'local disk write':<24} {local_write:>8.2f} {size / MIB / local_write:>8.1f} {'1.00':>9} {'':>13}")
    print(f"{'local disk read':<24} {local_read:>8.2f} {size / MIB / local_read:>8.1f} {'1.00':>9} {'':>13}")
    figures = {}
    for name, seconds, peak in rows:
        baseline = local_write if name.startswith("write") else local_read
        print(f"{name:<24} {seconds:>8.2f} {size / MIB / seconds:>8.1f} {baseline / seconds:>9.2f} {peak / MIB:>13.0f}")
        figures[name] = {"seconds": round(seconds, 3), "mib_per_s": round(size / MIB / seconds, 1),
                         "ratio_to_local": round(baseline / seconds, 3), "peak_rss_mib": round(peak / MIB, 1)}
        if peak > RSS_LIMIT:
            problems.append(f"{name}: peak RSS {peak / MIB:.0f} MiB is over {RSS_LIMIT // MIB} MiB")
    for problem in problems:
        print(f"PROBLEM: {problem}")
    print(json.dumps({
        "benchmark": "mount_stream", "size": size, "cache_size": cache_size, "read_ahead": args.read_ahead,
        "local": {"write_mib_per_s": round(size / MIB / local_write, 1), "read_mib_per_s": round(size / MIB / local_read, 1)},
        "phases": figures, "ok": not problems,
    }))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
