"""llfuse's threads and stop signals (:mod:`lucidlink.fuse_threads`): unit tests, and a real mount whose worker missed its wake-up."""

from __future__ import annotations

import _thread
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from twisted.trial.unittest import SynchronousTestCase, TestCase

from tests.mount_helpers import SKIP, is_mounted, unmount_lazily

try:
    import llfuse

    from lucidlink.fuse_threads import (
        FUSE_WORKER_PREFIX,
        STOP_SIGNALS,
        DeafThread,
        ThreadingForLlfuse,
        fuse_workers_running,
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
        """The thread llfuse starts for notifications is deaf too; the rest of ``threading`` is the real one."""
        seen = ThreadingForLlfuse()
        self.assertTrue(issubclass(seen.Thread, DeafThread))
        self.assertIs(seen.current_thread, threading.current_thread)

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
        """A worker is a thread llfuse started (not through ``threading``) and named; it runs while its task lives."""
        started, leave, ended = threading.Event(), threading.Event(), threading.Event()
        ids: list[int] = []

        def work() -> None:
            thread = threading.current_thread()  # a dummy thread, as in llfuse's workers: it stays listed
            thread.name = FUSE_WORKER_PREFIX + "1"
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


class WorkerBeingJoinedTests(SynchronousTestCase):
    """What the thread in ``llfuse.main`` waits on, read from /proc, says which worker it joins."""

    if llfuse is None:
        skip = "llfuse is not installed"

    def setUp(self) -> None:
        self.proc = Path(self.mktemp())
        (self.proc / "task" / "7").mkdir(parents=True)
        self.workers: list[Any] = [SimpleNamespace(ident=0x7F0000001000), SimpleNamespace(ident=0x7F0000801000)]

    def waiting(self, syscall: str) -> Any:
        (self.proc / "task" / "7" / "syscall").write_text(syscall + "\n")
        return worker_being_joined(7, self.workers, proc=str(self.proc))

    def test_join(self) -> None:
        """``pthread_join`` waits on a futex in the worker's descriptor, a little past its ident."""
        found = self.waiting("202 0x7f00008012d0 0x109 0x0 0x0 0x0 0x0 0x7ffd5a8c9e30 0x7f3df0ea6d36")
        self.assertIs(found, self.workers[1])

    def test_not_joining(self) -> None:
        """Waiting on its own stack (llfuse's ``sem_wait``), running, or not in a system call: no worker."""
        self.assertIsNone(self.waiting("202 0x7ffc79e2fdb0 0x189 0x0 0x0 0x0 0xffffffff 0x7ffc79e2fd00 0x7f3df0ea6d36"))
        self.assertIsNone(self.waiting("running"))
        self.assertIsNone(self.waiting("-1 0x7ffc79e2fd00 0x7f3df0ea6d36"))

    def test_no_such_thread(self) -> None:
        self.assertIsNone(worker_being_joined(8, self.workers, proc=str(self.proc)))


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

def current_thread():
    # llfuse's workers call this first thing: the first to call it never hears llfuse's SIGUSR1,
    # as a worker that took it just before its read of /dev/fuse does not.
    if not deaf:
        deaf.append(threading.get_native_id())
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    return threading.current_thread()

fuse_threads.ThreadingForLlfuse.current_thread = staticmethod(current_thread)

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
