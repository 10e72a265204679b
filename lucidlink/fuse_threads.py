"""
llfuse's threads and the signals that end its loop.

``llfuse.main`` waits for SIGINT, SIGTERM or SIGHUP in the thread that
called it; when one comes it sends each of its worker threads SIGUSR1 (to
interrupt their ``read`` of /dev/fuse) and joins them.  Two things can go
wrong with that, and this module keeps both from happening:

- A stop signal taken by any other thread ends the session and wakes
  nobody, so the mount goes on serving.  Every thread lucidlink starts
  blocks the stop signals (:class:`DeafThread`), and so does the thread
  llfuse starts for notifications (:class:`ThreadingForLlfuse`).
- A worker that takes its SIGUSR1 after its last look at the session and
  before its ``read`` waits in that ``read`` for good, and the join with
  it.  :class:`StuckWorkerWaker` sees the join last and interrupts the
  worker again.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import platform
import signal
import threading
from collections.abc import Iterator
from typing import Any

import llfuse

log = logging.getLogger(__name__)

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
"""The signals that end llfuse's loop (and so the mount)."""

FUSE_WORKER_PREFIX = "fuse-worker-"
"""How llfuse names its worker threads (``threading.current_thread().name``)."""

WAKE_SIGNAL = signal.SIGRTMIN
"""What :class:`StuckWorkerWaker` interrupts a worker with (its handler does nothing)."""

_TGKILL = {"x86_64": 234, "aarch64": 131, "riscv64": 131, "ppc64le": 208, "s390x": 241, "armv7l": 268}
"""The number of the ``tgkill`` system call, by machine."""


class DeafThread(threading.Thread):
    """
    A thread started with SIGINT, SIGTERM and SIGHUP blocked in it (and in the threads it starts).

    llfuse ends its loop on those signals only when the thread that called
    ``llfuse.main`` takes them: that thread waits in ``sem_wait``, which the
    signal interrupts.  Taken by any other thread, the signal marked the
    session as ended and nobody looked, and the mount went on serving.
    """

    def start(self) -> None:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            super().start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)


class NotificationThread(DeafThread):
    """
    llfuse's notification thread: deaf, and once started the starting thread takes the stop signals again.

    ``llfuse.main`` starts it from the thread that must take the stop
    signals, once its handlers for them are in place: a signal held back
    since mounting (see :func:`stop_signals_held`) is taken by that handler then.
    """

    def start(self) -> None:
        super().start()
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)


class ThreadingForLlfuse:
    """
    ``threading`` as llfuse sees it: the thread it starts for notifications is a :class:`NotificationThread`.

    ``llfuse.main`` starts that thread itself, from the thread that must take
    the stop signals, so it would hear them too.
    """

    Thread = NotificationThread

    def __getattr__(self, name: str) -> Any:
        return getattr(threading, name)


@contextlib.contextmanager
def stop_signals_held() -> Iterator[None]:
    """
    Hold the stop signals back in this thread until ``llfuse.main`` handles them (see :class:`NotificationThread`).

    Taken before, once mounted, SIGTERM and SIGHUP ended the process and left
    the mount behind, stale; held, they end llfuse's loop as soon as it runs.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def llfuse_starting_deaf_threads() -> Iterator[None]:
    """Within, llfuse sees :class:`ThreadingForLlfuse` as ``threading``."""
    saved = llfuse.threading
    llfuse.threading = ThreadingForLlfuse()
    try:
        yield
    finally:
        llfuse.threading = saved


def fuse_workers() -> list[threading.Thread]:
    """llfuse's worker threads, ended or not: llfuse starts them without ``threading`` and names them as they start."""
    return [thread for thread in threading.enumerate() if thread.name.startswith(FUSE_WORKER_PREFIX)]


def fuse_workers_running() -> tuple[int, int]:
    """
    How many of llfuse's worker threads run still, and how many it started (for stack dumps).

    Each worker stays listed after it ends; its task in /proc does not.
    """
    workers = fuse_workers()
    return sum(os.path.exists(f"/proc/self/task/{worker.native_id}") for worker in workers), len(workers)


def worker_being_joined(joiner: int, workers: list[threading.Thread], proc: str = "/proc/self") -> threading.Thread | None:
    """
    The worker that thread ``joiner`` (a native id) waits to join, from what it waits on in /proc; None if none.

    ``pthread_join`` waits on a futex inside the joined thread's descriptor,
    which starts at its ``pthread_t`` (a thread's ``ident``); llfuse's
    ``sem_wait`` waits on the joiner's own stack.
    """
    try:
        with open(f"{proc}/task/{joiner}/syscall") as file:
            fields = file.read().split()
    except OSError:
        return None
    if len(fields) < 2 or fields[0] in ("running", "-1"):
        return None
    address = int(fields[1], 16)
    for worker in workers:
        if worker.ident is not None and 0 <= address - worker.ident < 4096:
            return worker
    return None


def _tgkill(native_id: int, signal_number: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_TGKILL[platform.machine()], os.getpid(), native_id, signal_number) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


class StuckWorkerWaker:
    """
    Interrupts a worker of llfuse's that ``llfuse.main`` has been joining for a whole ``interval``.

    Such a worker took llfuse's SIGUSR1 before its ``read`` of /dev/fuse
    instead of in it, and waits for a request that never comes.
    :data:`WAKE_SIGNAL` interrupts that ``read``; the worker then sees the
    session ended and returns.  :meth:`start` in the thread that will call
    ``llfuse.main`` (the main thread: it installs a signal handler).
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.woken: list[str] = []
        self._stopped = threading.Event()
        self._thread: DeafThread | None = None
        self._previous_handler: Any = None

    @classmethod
    def can_work(cls) -> bool:
        """Whether this machine and thread allow it: a known ``tgkill`` and the main thread."""
        return platform.machine() in _TGKILL and threading.current_thread() is threading.main_thread()

    def start(self) -> None:
        """Watch the calling thread from now on."""
        joiner = threading.get_native_id()
        self._previous_handler = signal.signal(WAKE_SIGNAL, lambda number, frame: None)
        self._thread = DeafThread(target=self._watch, args=(joiner,), name="lucid-worker-waker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching and put the signal's handler back."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()
            signal.signal(WAKE_SIGNAL, self._previous_handler)

    def _watch(self, joiner: int) -> None:
        suspect = None
        while not self._stopped.wait(self.interval):
            joined = worker_being_joined(joiner, fuse_workers())
            if joined is not None and joined is suspect and joined.native_id is not None:
                log.warning("llfuse's %s missed the signal that ends it; interrupting it again", joined.name)
                self.woken.append(joined.name)
                with contextlib.suppress(ProcessLookupError):
                    _tgkill(joined.native_id, WAKE_SIGNAL)
            suspect = joined


@contextlib.contextmanager
def waking_stuck_workers() -> Iterator[None]:
    """Within, a :class:`StuckWorkerWaker` watches the calling thread (where it can work)."""
    if not StuckWorkerWaker.can_work():
        log.debug("llfuse's workers are not watched: not the main thread, or tgkill unknown on %s",
                  platform.machine())
        yield
        return
    waker = StuckWorkerWaker()
    waker.start()
    try:
        yield
    finally:
        waker.stop()
