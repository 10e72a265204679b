"""
``lucid-mount FILESPACE MOUNTPOINT``: a filespace as a local folder, through FUSE.

It checks that FUSE works and that the mount point is an empty directory
(saying how to clean a stale mount left by a crash, or doing it with
``--force``), logs in as the ``lucid`` commands do (see
:mod:`lucidlink.cli.common`), mounts, and serves until the filesystem is
unmounted (``fusermount -u MOUNTPOINT``) or the process gets SIGINT or
SIGTERM; either way open files are closed first, so every buffered write is
stored and committed, and the mount point is left unmounted.

Chunks read and written are kept, sealed, in a local cache (``--cache-dir``,
one folder per filespace, at most ``--cache-size`` bytes, surviving
remounts); a file read in order has the next ``--read-ahead`` chunks fetched
ahead of it.  Writes are journaled there, sealed, until committed; writes a
crash or an outage left uncommitted are committed when the filespace is
mounted next (or, if the file changed meanwhile, kept and reported).

Without ``--foreground`` it goes to the background once the mount is up
(the exit status says whether it came up).  ``--hard`` (the default) makes
metadata calls wait and retry for as long as the servers are away;
``--soft --timeout S`` fails them with an error after S seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import errno
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import traceback
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.python.failure import Failure

from lucidlink.cli.common import DEFAULT_TIMEOUT
from lucidlink.client.config import load_config
from lucidlink.errors import LucidError

FUSE_DEVICE = Path("/dev/fuse")
PROGRAM = "lucid-mount"

MALLOC_MMAP_THRESHOLD = 32 * 1024 * 1024
"""Blocks below this come from malloc's heap, not fresh pages of their own: chunk buffers (4 MiB) among them."""
MALLOC_TRIM_THRESHOLD = 256 * 1024 * 1024
"""Freed heap memory that malloc keeps for reuse instead of giving it back to the system at once."""
STACKS_SIGNAL = signal.SIGUSR2
"""``kill -USR2 PID`` makes a running mount write every thread's stack to its standard error (llfuse keeps SIGUSR1)."""
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


class MountRefused(Exception):
    """The mount cannot go ahead; the message says why and what to do."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROGRAM, description="Mount a lucidlink filespace as a local folder (FUSE).",
    )
    parser.add_argument("filespace", metavar="FILESPACE", help="the filespace to mount")
    parser.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT", help="an empty directory")
    parser.add_argument(
        "--config", type=Path, metavar="FILE",
        help="the client config file (default: $LUCID_CONFIG, else ~/.config/lucid/client.ini)",
    )
    parser.add_argument("--user", help="the user to log in as (default: LUCID_USER, else the config's user)")
    parser.add_argument(
        "--passphrase-file", type=Path, metavar="FILE",
        help="read the passphrase from FILE (else LUCID_PASSPHRASE, the config's passphrase_file, a prompt)",
    )
    parser.add_argument("--store", metavar="URL", help="the object store (default: LUCID_STORE, else the config's store)")
    parser.add_argument("--foreground", "-f", action="store_true",
                        help="stay in the foreground (default: go to the background once mounted)")
    durability = parser.add_mutually_exclusive_group()
    durability.add_argument("--hard", action="store_true",
                            help="metadata calls wait and retry while the servers are away (the default)")
    durability.add_argument("--soft", action="store_true",
                            help="metadata calls fail (EIO) when the servers are away for --timeout seconds")
    parser.add_argument("--timeout", type=float, metavar="SECONDS",
                        help=f"with --soft: how long to keep trying (default {DEFAULT_TIMEOUT:g})")
    parser.add_argument("--sync-metadata", action="store_true",
                        help="every create and unlink waits for the metadata server's answer (default: in a directory"
                             " this mount holds a lease on, they are made at once and sent without waiting)")
    parser.add_argument("--force", action="store_true",
                        help="clean a stale mount left at MOUNTPOINT by a crashed lucid-mount first")
    cache = parser.add_argument_group("cache")
    cache.add_argument("--cache-dir", type=Path, metavar="DIR",
                       help="where sealed chunks and uncommitted writes are kept"
                            " (default: LUCID_CACHE_DIR, else the config's cache_dir, else ~/.cache/lucid)")
    cache.add_argument("--cache-size", metavar="SIZE",
                       help="the most the chunk cache holds, e.g. 20G or 512M"
                            " (default: LUCID_CACHE_SIZE, the config's cache_size, else 10G or half the free space)")
    cache.add_argument("--read-ahead", metavar="CHUNKS",
                       help="chunks fetched ahead, in parallel, of a file read in order; 0 for none"
                            " (default: LUCID_READ_AHEAD, the config's read_ahead, else 4)")
    return parser


# -- checks --------------------------------------------------------------------------


def check_fuse() -> Any:
    """The llfuse module, once FUSE is known to work here; MountRefused otherwise."""
    if not FUSE_DEVICE.exists():
        raise MountRefused(f"FUSE is not available: {FUSE_DEVICE} is missing (load the fuse kernel module)")
    try:
        import llfuse
    except ImportError as error:
        raise MountRefused(
            f"FUSE is not available: the llfuse module cannot be imported ({error});"
            " install it with: pip install 'lucidlink[fuse]'"
        ) from None
    return llfuse


def unmount_stale(mountpoint: Path) -> None:
    """Detach a dead FUSE mount (lazily, so nothing blocks on it)."""
    command = ["fusermount", "-u", "-z", str(mountpoint)]
    if shutil.which("fusermount") is None:
        command = ["umount", "-l", str(mountpoint)]
    result = subprocess.run(command, capture_output=True, timeout=30)
    if result.returncode:
        message = result.stderr.decode(errors="replace").strip()
        raise MountRefused(f"could not clean the stale mount at {mountpoint}: {message}")


def check_mountpoint(mountpoint: Path, force: bool = False) -> Path:
    """The mount point, absolute, if it is an empty directory nothing is mounted on."""
    mountpoint = mountpoint.absolute()
    try:
        os.stat(mountpoint)
        os.statvfs(mountpoint)  # asks the filesystem itself, where stat may answer from the kernel's cache
    except OSError as error:
        if error.errno == errno.ENOTCONN:
            if not force:
                raise MountRefused(
                    f"{mountpoint} is a stale mount left by a crash (transport endpoint is not connected):"
                    f" run 'fusermount -u {mountpoint}' or pass --force"
                ) from None
            unmount_stale(mountpoint)
            return check_mountpoint(mountpoint)
        if error.errno == errno.ENOENT:
            raise MountRefused(f"the mount point {mountpoint} does not exist; make it an empty directory") from None
        raise MountRefused(f"cannot use {mountpoint} as the mount point: {error.strerror}") from None
    if os.path.ismount(mountpoint):
        raise MountRefused(f"{mountpoint} is busy: something is mounted there already")
    if not mountpoint.is_dir():
        raise MountRefused(f"the mount point {mountpoint} is not a directory")
    if any(mountpoint.iterdir()):
        raise MountRefused(f"the mount point {mountpoint} is not an empty directory")
    return mountpoint


# -- mounting ------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheSettings:
    """Where and how much the mount caches, every source applied."""

    folder: Path
    size: int | None
    read_ahead: int


def cache_settings(args: argparse.Namespace) -> CacheSettings:
    """The cache options, the environment and the config file, in that order (errors name the source)."""
    config = load_config(args.config, overrides={
        "cache_dir": args.cache_dir, "cache_size": args.cache_size, "read_ahead": args.read_ahead,
    })
    return CacheSettings(config.cache_dir, config.cache_size, config.read_ahead)


@defer.inlineCallbacks
def cached_filespace(fs: Any, settings: CacheSettings, leases: bool = False) -> Generator[defer.Deferred[Any], Any, Any]:
    """
    ``fs`` again, with its local cache, and the writes an earlier run left uncommitted committed.

    ``leases``: it makes creates and unlinks in directories it holds a lease on at once (see ``Filespace``).

    Each journal left behind is reported on stderr: committed, or kept and why not.
    """
    from lucidlink.client.filespace import Filespace

    cached = Filespace(
        fs.session, fs.store, uid=fs.uid, gid=fs.gid,
        cache_dir=settings.folder, cache_size=settings.size, read_ahead=settings.read_ahead,
        leases=leases,
    )
    fs.close()
    try:
        recovered = yield cached.recover()
    except BaseException:
        cached.close()
        raise
    for outcome in recovered:
        print(f"{PROGRAM}: {outcome}", file=sys.stderr, flush=True)
    return cached


def _session_args(args: argparse.Namespace) -> argparse.Namespace:
    """What :func:`~lucidlink.cli.common.with_filespace` reads, with the durability mode as a deadline."""
    timeout = (args.timeout if args.timeout is not None else DEFAULT_TIMEOUT) if args.soft else None
    return argparse.Namespace(
        config=args.config, user=args.user, store=args.store, passphrase_file=args.passphrase_file,
        passphrase=getattr(args, "passphrase", None), timeout=timeout,
    )


def ask_passphrase(args: argparse.Namespace) -> str:
    """The passphrase, asked for now (the background process has no terminal to prompt on)."""
    from lucidlink.cli.common import client_config, passphrase_for, require_user

    session_args = _session_args(args)
    config = client_config(session_args)
    user = require_user(config)
    return passphrase_for(session_args, config, f"Passphrase for {user} on {args.filespace}: ")


def in_background(args: argparse.Namespace) -> int:
    """
    Fork; the child mounts and serves in a session of its own, the parent waits until the mount is up.

    The child reports over a pipe: ``ok`` once mounted, else the one line that
    says why not (the parent prints it).  Its standard streams go to
    /dev/null once the mount is up.  Fork comes before any thread or reactor exists.
    """
    reading, writing = os.pipe()
    child = os.fork()
    if child:
        os.close(writing)
        with os.fdopen(reading, "rb") as pipe:
            report = pipe.read().decode(errors="replace").strip()
        if report == "ok":
            print(f"{PROGRAM}: {args.filespace} mounted at {args.mountpoint.absolute()} (process {child})", flush=True)
            return 0
        print(report or f"{PROGRAM}: the background process ended before the mount was up", file=sys.stderr)
        return 1
    os.close(reading)
    os.setsid()
    status = 1
    try:
        def mounted(mountpoint: Path) -> None:
            os.write(writing, b"ok\n")
            os.close(writing)
            quiet = os.open(os.devnull, os.O_RDWR)
            for stream in (0, 1, 2):
                os.dup2(quiet, stream)
            os.close(quiet)

        status = _reporting(lambda message: _tell(writing, message), lambda: run_mount(args, ready=mounted))
    finally:
        os._exit(status)


def _tell(descriptor: int, message: str) -> None:
    with contextlib.suppress(OSError):
        os.write(descriptor, message.encode() + b"\n")


def tell_stacks_on_signal(stream: Any = None) -> threading.Thread:
    """
    Write every thread's stack to ``stream`` (standard error) each time :data:`STACKS_SIGNAL` comes.

    The signal is blocked in this thread, so in every thread started from it
    later, and taken by a thread of its own with ``sigwait``: the stacks are
    read holding the GIL, while no other thread runs Python code.  Call it
    before any other thread starts.
    """
    signal.pthread_sigmask(signal.SIG_BLOCK, {STACKS_SIGNAL})

    def tell() -> None:
        while True:
            signal.sigwait({STACKS_SIGNAL})
            names = {thread.ident: thread.name for thread in threading.enumerate()}
            lines = []
            for ident, frame in sys._current_frames().items():
                lines.append(f"Thread {names.get(ident, ident)}:\n")
                lines.extend(traceback.format_stack(frame))
            running, started = fuse_workers_running()
            lines.append(f"llfuse workers running: {running} of {started}\n")
            print("".join(lines), file=stream or sys.stderr, flush=True)

    from lucidlink.fuse_threads import DeafThread, fuse_workers_running

    teller = DeafThread(target=tell, name="stacks on SIGUSR2", daemon=True)
    teller.start()
    return teller


def reuse_freed_buffers() -> bool:
    """
    Have glibc's malloc keep the memory of freed chunk buffers for the next ones (false: not glibc).

    A writer's chunks are buffered (4 MiB each) until their commit frees
    them all at once.  By default each buffer gets pages of its own, given
    back when freed, so every 128 KiB write into the next buffers faulted in
    and zeroed fresh pages: about three times the cost of copying the bytes.
    """
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, MALLOC_TRIM_THRESHOLD)
    )


def run_mount(args: argparse.Namespace, ready: Any = None) -> int:
    """
    Log in, mount, serve until unmounted or signalled, tear down in order.

    ``ready(mountpoint)`` is called once the mount is up.
    """
    if args.timeout is not None and not args.soft:
        raise MountRefused("--timeout goes with --soft (with --hard, calls wait for as long as it takes)")
    check_fuse()
    mountpoint = check_mountpoint(args.mountpoint, force=args.force)
    settings = cache_settings(args)
    reuse_freed_buffers()
    tell_stacks_on_signal()

    from twisted.internet import reactor as global_reactor

    from lucidlink.cli.common import with_filespace
    from lucidlink.mount import Bridge, FilespaceOperations, ReactorThread, serve

    reactor: Any = global_reactor
    opened: queue.Queue[Any] = queue.Queue()
    ended: queue.Queue[Any] = queue.Queue()
    release: defer.Deferred[None] = defer.Deferred()

    @defer.inlineCallbacks
    def work(fs: Any) -> Generator[defer.Deferred[Any], Any, None]:
        cached = yield cached_filespace(fs, settings, leases=not args.sync_metadata)
        opened.put(cached)
        try:
            yield release
        finally:
            yield cached.close()

    def log_in() -> None:
        done = with_filespace(reactor, _session_args(args), args.filespace, work)
        done.addBoth(lambda outcome: (opened.put(outcome), ended.put(outcome)))

    def log_out() -> None:
        if not release.called:
            reactor.callFromThread(release.callback, None)
        outcome = ended.get(timeout=60)
        if isinstance(outcome, Failure):
            outcome.raiseException()

    with contextlib.ExitStack() as stack:
        reactor_thread = ReactorThread(reactor)
        reactor_thread.start()
        stack.callback(reactor_thread.stop)
        reactor.callFromThread(log_in)
        fs = opened.get()
        if isinstance(fs, Failure):
            ended.get()
            fs.raiseException()
        stack.callback(log_out)
        operations = FilespaceOperations(fs.inodes, Bridge(reactor))
        serve(operations, str(mountpoint), args.filespace, ready=lambda: ready(mountpoint) if ready else None)
    return 0


def _say_mounted(args: argparse.Namespace) -> Any:
    def say(mountpoint: Path) -> None:
        print(f"{PROGRAM}: {args.filespace} mounted at {mountpoint}", flush=True)
    return say


def _quiet_logging() -> None:
    import logging

    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    logging.basicConfig(level=logging.WARNING, format=f"{PROGRAM}: %(message)s")
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(LogLevel.warn)])],
        redirectStandardIO=False,
    )


def _reporting(say: Any, work: Any) -> int:
    """Run ``work()``; a failure is one line given to ``say`` and exit status 1 (130 for Ctrl-C)."""
    try:
        return int(work() or 0)
    except (MountRefused, LucidError) as error:
        say(f"{PROGRAM}: {error}")
        return 1
    except OSError as error:
        where = f": {error.filename}" if error.filename else ""
        say(f"{PROGRAM}: {error.strerror or error}{where}")
        return 1
    except KeyboardInterrupt:
        say(f"{PROGRAM}: interrupted")
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lucid-mount`` with ``argv`` (default: the process arguments)."""
    args = build_parser().parse_args(argv)

    def say(message: str) -> None:
        print(message, file=sys.stderr)

    def start() -> int:
        _quiet_logging()
        if args.foreground:
            return run_mount(args, ready=_say_mounted(args))
        check_fuse()
        check_mountpoint(args.mountpoint, force=args.force)
        cache_settings(args)
        args.force = False
        args.passphrase = ask_passphrase(args)
        return in_background(args)

    return _reporting(say, start)


if __name__ == "__main__":
    sys.exit(main())
