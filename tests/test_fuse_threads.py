"""llfuse's threads and stop signals (:mod:`lucidlink.fuse_threads`): unit tests, and a real mount whose worker missed its wake-up."""

from __future__ import annotations

import _thread
import os
import platform
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.mount_helpers import SKIP, is_mounted, unmount_lazily

try:
    import llfuse

    from lucidlink import fuse_threads
    from lucidlink.fuse_threads import (
        STOP_SIGNALS,
        WAKE_SIGNAL,
        DeafThread,
        StuckWorkerWaker,
        ThreadingForLlfuse,
        fuse_workers_running,
        reading_fuse_device,
        worker_being_joined,
    )
except ImportError:
    llfuse = None


class StopSignalTests(SynchronousTestCase):
    """Threads of ours never take the signals that stop llfuse (one they took was lost, and the mount went on)."""

    if llfuse is None:
        skip = "llfuse is not installed"

    def test_started_deaf(self) -> None:
        masks: list[set[int]] = []
        before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
        thread = DeafThread(target=lambda: masks.append(set(signal.pthread_sigmask(signal.SIG_BLOCK, []))))
        thread.start()
        thread.join(10)
        self.assertTrue(STOP_SIGNALS <= masks[0], masks)
        self.assertEqual(signal.pthread_sigmask(signal.SIG_BLOCK, []), before, "this thread's own mask is kept")

    def test_llfuse_starts_deaf_threads(self) -> None:
        """The thread llfuse starts for notifications is deaf too; its workers note their ids; the rest is ``threading``."""
        self.patch(fuse_threads, "WORKER_TIDS", {})
        seen = ThreadingForLlfuse()
        self.assertTrue(issubclass(seen.Thread, DeafThread))
        self.assertIs(seen.current_thread(), threading.current_thread())
        self.assertEqual(fuse_threads.WORKER_TIDS, {threading.get_ident(): threading.get_native_id()})
        self.assertIs(seen.enumerate, threading.enumerate)

    def test_stop_signals_heard_once_llfuse_starts_its_thread(self) -> None:
        """Held back while mounting, the stop signals reach the thread in ``llfuse.main`` once it starts its thread."""
        masks: dict[str, set[int]] = {}

        def in_llfuse_main() -> None:
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)  # as serve holds them while mounting
            notifier = ThreadingForLlfuse().Thread(
                target=lambda: masks.setdefault("notifier", set(signal.pthread_sigmask(signal.SIG_BLOCK, [])))
            )
            notifier.start()
            notifier.join(10)
            masks["main"] = set(signal.pthread_sigmask(signal.SIG_BLOCK, []))

        thread = threading.Thread(target=in_llfuse_main)
        thread.start()
        thread.join(10)
        self.assertTrue(STOP_SIGNALS <= masks["notifier"], masks)
        self.assertFalse(STOP_SIGNALS & masks["main"], masks)


class FuseWorkersTests(SynchronousTestCase):
    """llfuse's workers, counted for the stack dump."""

    if llfuse is None:
        skip = "llfuse is not installed"

    def test_counts_running_and_started(self) -> None:
        """A worker is a thread llfuse started (not through ``threading``) that noted itself; it runs while its task lives."""
        self.patch(fuse_threads, "WORKER_TIDS", {})
        started, leave, ended = threading.Event(), threading.Event(), threading.Event()
        ids: list[int] = []

        def work() -> None:
            ThreadingForLlfuse().current_thread()  # what llfuse's workers call first thing
            ids.append(threading.get_native_id())
            started.set()
            leave.wait(10)
            ended.set()

        _thread.start_new_thread(work, ())
        self.assertTrue(started.wait(10))
        self.assertEqual(fuse_workers_running(), (1, 1))
        leave.set()
        self.assertTrue(ended.wait(10))
        deadline = time.monotonic() + 10  # the task ends a little after the Python code
        while os.path.exists(f"/proc/self/task/{ids[0]}") and time.monotonic() < deadline:
            time.sleep(0.01)
        self.assertEqual(fuse_workers_running(), (0, 1))


MAIN, READER, BUSY = 7, 8, 9
"""Thread ids in a made-up /proc: the thread in ``llfuse.main``, a worker in a read of /dev/fuse, a busy worker."""

WORKERS = {0x7F0000001000: READER, 0x7F0000801000: BUSY}
"""The made-up workers, ``ident`` to tid."""

JOINING = "202 {:#x} 0x109 0x0 0x0 0x0 0x0 0x7ffd5a8c9e30 0x7f3df0ea6d36"
"""``pthread_join``'s futex wait on a descriptor's tid (720 bytes in), as /proc shows it."""


class StuckWorkerWakerTests(SynchronousTestCase):
    """What the thread in ``llfuse.main`` and the workers wait on, read from /proc, says which worker to wake."""

    if llfuse is None:
        skip = "llfuse is not installed"

    def setUp(self) -> None:
        self.proc = Path(self.mktemp())
        for tid in (MAIN, READER, BUSY):
            (self.proc / "task" / str(tid)).mkdir(parents=True)
        (self.proc / "fd").mkdir()
        (self.proc / "fd" / "5").symlink_to("/dev/fuse")
        (self.proc / "fd" / "6").symlink_to("/dev/null")
        self.waits(READER, "0 0x5 0x7f0000100000 0x21000 0x0 0x0 0x0 0x7f00000ffe00 0x7f3df0ea6d36")
        self.waits(BUSY, "202 0x7f0000900000 0x189 0x0 0x0 0x0 0xffffffff 0x7f00008ffe00 0x7f3df0ea6d36")
        self.sent: list[tuple[int, int]] = []
        self.waker = StuckWorkerWaker(MAIN, proc=str(self.proc), send=lambda *sent: self.sent.append(sent))
        self.patch(fuse_threads, "WORKER_TIDS", dict(WORKERS))
        self.patch(platform, "machine", lambda: "x86_64")

    def waits(self, tid: int, syscall: str) -> None:
        (self.proc / "task" / str(tid) / "syscall").write_text(syscall + "\n")

    def test_join(self) -> None:
        """``pthread_join`` waits on a futex in the worker's descriptor, a little past its ident."""
        self.waits(MAIN, JOINING.format(0x7F0000801000 + 720))
        self.assertEqual(worker_being_joined(MAIN, WORKERS, proc=str(self.proc)), (0x7F0000801000, BUSY))

    def test_not_joining(self) -> None:
        """Waiting on its own stack (llfuse's ``sem_wait``), running, or not in a system call: no worker."""
        for syscall in ("202 0x7ffc79e2fdb0 0x189 0x0 0x0 0x0 0xffffffff 0x7ffc79e2fd00 0x7f3df0ea6d36",
                        "running", "-1 0x7ffc79e2fd00 0x7f3df0ea6d36"):
            self.waits(MAIN, syscall)
            self.assertIsNone(worker_being_joined(MAIN, WORKERS, proc=str(self.proc)))
        self.assertIsNone(worker_being_joined(10, WORKERS, proc=str(self.proc)), "no such thread")

    def test_reading_the_device(self) -> None:
        """Only a ``read`` of /dev/fuse counts as waiting for a request."""
        self.assertTrue(reading_fuse_device(READER, str(self.proc)))
        self.assertFalse(reading_fuse_device(BUSY, str(self.proc)))
        self.waits(READER, "0 0x6 0x7f0000100000 0x21000 0x0 0x0 0x0 0x7f00000ffe00 0x7f3df0ea6d36")
        self.assertFalse(reading_fuse_device(READER, str(self.proc)), "a read of another file")

    def test_wakes_a_worker_joined_for_a_whole_interval(self) -> None:
        """The worker is interrupted at the second look that finds it joined and reading, and at each one after."""
        self.waits(MAIN, JOINING.format(0x7F0000001000 + 720))
        self.waker.poll()
        self.assertEqual(self.sent, [], "a join is normally over at once")
        with self.assertLogs("lucidlink.fuse_threads", "WARNING") as logs:
            self.waker.poll()
            self.waker.poll()
        self.assertEqual(self.sent, [(READER, WAKE_SIGNAL)] * 2)
        self.assertEqual(len(logs.records), 1, "said once")
        self.assertIn(f"worker {READER} missed the signal", logs.output[0])

    def test_leaves_a_busy_worker_alone(self) -> None:
        """A worker joined while it finishes a request is not interrupted."""
        self.waits(MAIN, JOINING.format(0x7F0000801000 + 720))
        for _ in range(3):
            self.waker.poll()
        self.assertEqual(self.sent, [])

    def test_new_join_starts_over(self) -> None:
        """A join of another worker since the last look is not yet a stuck one."""
        self.waits(MAIN, JOINING.format(0x7F0000801000 + 720))
        self.waker.poll()
        self.waits(MAIN, JOINING.format(0x7F0000001000 + 720))
        self.waker.poll()
        self.assertEqual(self.sent, [])

    def test_runs_in_its_own_thread_and_stops(self) -> None:
        """Started, it looks every ``interval``; stopped, its thread is gone and the handler stays."""
        self.waits(MAIN, JOINING.format(0x7F0000001000 + 720))
        self.waker.interval = 0.01
        self.patch(fuse_threads.log, "warning", lambda *arguments: None)
        self.waker.start()
        deadline = time.monotonic() + 10
        while not self.sent and time.monotonic() < deadline:
            time.sleep(0.01)
        self.waker.stop()
        self.assertEqual(self.sent[0], (READER, WAKE_SIGNAL))
        self.assertFalse(any(thread.name == "lucid-worker-waker" for thread in threading.enumerate()))
        self.assertNotEqual(signal.getsignal(WAKE_SIGNAL), signal.SIG_DFL, "a late signal must not end the process")


SERVE_PRELUDE = """
import logging, os, signal, sys, threading, time
from lucidlink import fuse_threads
from lucidlink.mount import FilespaceOperations, serve
from tests.test_mount import SynchronousBridge

logging.basicConfig(level=logging.WARNING)

class Inodes:
    root_inode = 1
    chunk_size = 4096

    def on_change(self, listener):
        return lambda: None

operations = FilespaceOperations(Inodes(), SynchronousBridge(None))
"""
"""A script's start: a mount of nothing much to serve (``serve(operations, MOUNTPOINT, ...)``)."""


def run_serving(test: TestCase, script: str, *arguments: str) -> tuple[Path, subprocess.CompletedProcess[bytes]]:
    """Run ``SERVE_PRELUDE + script`` with a fresh mount point (unmounted in cleanup) and ``arguments``."""
    mountpoint = Path(test.mktemp()).absolute()
    mountpoint.mkdir(parents=True)
    test.addCleanup(unmount_lazily, mountpoint)
    done = subprocess.run(
        [sys.executable, "-c", SERVE_PRELUDE + script, str(mountpoint), *arguments],
        capture_output=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)),
    )
    return mountpoint, done


SERVE_WITH_A_DEAF_WORKER = """
deaf = []

registering = fuse_threads.ThreadingForLlfuse.current_thread

def current_thread(self):
    # llfuse's workers call this first thing: the first to call it never hears llfuse's SIGUSR1,
    # as a worker that took it just before its read of /dev/fuse does not.
    if not deaf:
        deaf.append(threading.get_native_id())
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    return registering(self)

fuse_threads.ThreadingForLlfuse.current_thread = current_thread

def stop_once_serving():
    while fuse_threads.fuse_workers_running() != (30, 30):
        time.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)

def ready():
    threading.Thread(target=stop_once_serving, daemon=True).start()

print(serve(operations, sys.argv[1], "deaf", ready=ready), flush=True)
"""


SERVE_SIGNALLED_EARLY = """
stop = int(sys.argv[2])
before = signal.pthread_sigmask(signal.SIG_BLOCK, [])
ended = serve(operations, sys.argv[1], "early", ready=lambda: os.kill(os.getpid(), stop))
print(ended, signal.pthread_sigmask(signal.SIG_BLOCK, []) == before, flush=True)
"""


class EarlyStopSignalTests(TestCase):
    """A stop signal that comes once the filesystem is mounted, before llfuse's loop runs, still ends it cleanly."""

    timeout = 120
    if SKIP:
        skip = SKIP

    def test_signal_before_the_loop(self) -> None:
        """SIGTERM and SIGHUP sent while mounting end ``serve`` with that signal, and nothing stays mounted."""
        for stop in (signal.SIGTERM, signal.SIGHUP):
            mountpoint, done = run_serving(self, SERVE_SIGNALLED_EARLY, str(int(stop)))
            self.assertEqual(
                (done.returncode, done.stdout.split()), (0, [str(int(stop)).encode(), b"True"]), done.stderr
            )
            self.assertFalse(is_mounted(mountpoint), "not left mounted")


class StuckWorkerTests(TestCase):
    """A worker that missed llfuse's SIGUSR1 is interrupted again, so a stop signal still ends the mount."""

    timeout = 120
    if SKIP:
        skip = SKIP

    def test_deaf_worker(self) -> None:
        """With one worker deaf to SIGUSR1, SIGTERM ends ``serve`` in seconds, and nothing stays mounted."""
        started = time.monotonic()
        mountpoint, done = run_serving(self, SERVE_WITH_A_DEAF_WORKER)
        self.assertEqual((done.returncode, done.stdout.split()), (0, [str(int(signal.SIGTERM)).encode()]), done.stderr)
        self.assertIn(b"missed the signal that ends it", done.stderr)
        self.assertLess(time.monotonic() - started, 30)
        self.assertFalse(is_mounted(mountpoint), "not left mounted")
