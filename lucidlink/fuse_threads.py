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
from collections.abc import Callable, Iterator
from typing import Any

import llfuse

log = logging.getLogger(__name__)

STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
"""The signals that end llfuse's loop (and so the mount)."""

WAKE_SIGNAL = signal.SIGRTMIN
"""What :class:`StuckWorkerWaker` interrupts a worker with (its handler does nothing)."""

_SYSCALL_NUMBERS = {
    "x86_64": (234, 0), "aarch64": (131, 63), "riscv64": (131, 63), "ppc64le": (250, 3), "s390x": (241, 3),
    "armv7l": (268, 3),
}
"""The numbers of the ``tgkill`` and ``read`` system calls, by machine."""

PTHREAD_DESCRIPTOR_BYTES = 2048
"""How far into a thread's descriptor (from its ``pthread_t``) ``pthread_join`` may wait (glibc: the tid, at 720)."""

WORKER_TIDS: dict[int, int] = {}
"""llfuse's workers, ``pthread_t`` (``ident``) to kernel thread id, as each registered itself when it started."""


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


def queued_items(source: Any) -> Iterator[Any]:
    """
    The items a worker thread takes from queue ``source``, until a None.

    A ``threading.Event`` in the queue is set when reached, not given: it is
    how a caller waits for what was queued before it.
    """
    while True:
        item = source.get()
        if item is None:
            return
        if isinstance(item, threading.Event):
            item.set()
            continue
        yield item


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

    def current_thread(self) -> threading.Thread:
        """What each llfuse worker calls first, in its own thread: its ids are noted in :data:`WORKER_TIDS`."""
        WORKER_TIDS[threading.get_ident()] = threading.get_native_id()
        return threading.current_thread()

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


def fuse_workers_running() -> tuple[int, int]:
    """
    How many of llfuse's worker threads run still, and how many it started (for stack dumps).

    Each worker stays in :data:`WORKER_TIDS` after it ends; its task in /proc does not.
    """
    tids = list(WORKER_TIDS.values())
    return sum(os.path.exists(f"/proc/self/task/{tid}") for tid in tids), len(tids)


def worker_being_joined(joiner: int, workers: dict[int, int], proc: str = "/proc/self") -> tuple[int, int] | None:
    """
    The worker (``ident``, tid) that thread ``joiner`` (a tid) waits to join, from /proc; None if none.

    ``pthread_join`` waits on a futex inside the joined thread's descriptor,
    which starts at its ``pthread_t`` (a thread's ``ident``); llfuse's
    ``sem_wait`` waits on the joiner's own stack.
    """
    fields = _syscall_of(joiner, proc)
    if fields is None:
        return None
    address = int(fields[1], 16)
    for ident, tid in workers.items():
        if 0 <= address - ident < PTHREAD_DESCRIPTOR_BYTES:
            return ident, tid
    return None


def reading_fuse_device(tid: int, proc: str = "/proc/self") -> bool:
    """Whether thread ``tid`` waits in a ``read`` of /dev/fuse (as a worker waiting for a request does)."""
    fields = _syscall_of(tid, proc)
    if fields is None or platform.machine() not in _SYSCALL_NUMBERS:
        return False
    if int(fields[0]) != _SYSCALL_NUMBERS[platform.machine()][1]:
        return False
    try:
        return os.readlink(f"{proc}/fd/{int(fields[1], 16)}") == "/dev/fuse"
    except OSError:
        return False


def _syscall_of(tid: int, proc: str) -> list[str] | None:
    """The system call thread ``tid`` waits in and its arguments (hexadecimal), if it waits in one."""
    try:
        with open(f"{proc}/task/{tid}/syscall") as file:
            fields = file.read().split()
    except OSError:
        return None
    if len(fields) < 2 or fields[0] in ("running", "-1"):
        return None
    return fields


def _tgkill(tid: int, signal_number: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYSCALL_NUMBERS[platform.machine()][0], os.getpid(), tid, signal_number) != 0:
        error = ctypes.get_errno()
        raise OSError(error, os.strerror(error))


def _install_wake_handler() -> None:
    """A handler that does nothing, for good: restored, SIGRTMIN's default would end the process if one came late."""
    if signal.getsignal(WAKE_SIGNAL) == signal.SIG_DFL:
        signal.signal(WAKE_SIGNAL, lambda number, frame: None)


class StuckWorkerWaker:
    """
    Interrupts a worker of llfuse's that ``llfuse.main`` has been joining for a whole ``interval``, waiting in a read.

    Such a worker took llfuse's SIGUSR1 before its ``read`` of /dev/fuse
    instead of in it, and waits for a request that never comes.
    :data:`WAKE_SIGNAL` interrupts that ``read``; the worker then sees the
    session ended and returns.  A worker still busy with a request is left
    to finish it.  ``joiner``: the tid of the thread in ``llfuse.main``.
    """

    def __init__(self, joiner: int, interval: float = 0.5, proc: str = "/proc/self",
                 send: Callable[[int, int], None] = _tgkill) -> None:
        self.joiner = joiner
        self.interval = interval
        self.proc = proc
        self.send = send
        self._suspect: tuple[int, int] | None = None
        self._warned: set[int] = set()
        self._stopped = threading.Event()
        self._thread: DeafThread | None = None

    @classmethod
    def can_work(cls) -> bool:
        """Whether this machine and thread allow it: known system call numbers, and the main thread."""
        return platform.machine() in _SYSCALL_NUMBERS and threading.current_thread() is threading.main_thread()

    def start(self) -> None:
        """Watch from now on, in a thread of its own (call in the main thread: it may install a signal handler)."""
        _install_wake_handler()
        self._thread = DeafThread(target=self._watch, name="lucid-worker-waker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop watching."""
        self._stopped.set()
        if self._thread is not None:
            self._thread.join()

    def poll(self) -> None:
        """Look once; wake the worker joined since the last look if it waits in a read."""
        joined = worker_being_joined(self.joiner, dict(WORKER_TIDS), self.proc)
        if joined is not None and joined == self._suspect and reading_fuse_device(joined[1], self.proc):
            tid = joined[1]
            if tid not in self._warned:
                self._warned.add(tid)
                log.warning("llfuse's worker %d missed the signal that ends it; interrupting its read", tid)
            try:
                self.send(tid, WAKE_SIGNAL)
            except ProcessLookupError:
                log.warning("llfuse's worker %d had ended when it was to be interrupted", tid)
        self._suspect = joined

    def _watch(self) -> None:
        while not self._stopped.wait(self.interval):
            self.poll()


@contextlib.contextmanager
def waking_stuck_workers() -> Iterator[None]:
    """Within, a :class:`StuckWorkerWaker` watches the calling thread (where it can work)."""
    if not StuckWorkerWaker.can_work():
        log.debug("llfuse's workers are not watched: not the main thread, or %s unknown", platform.machine())
        yield
        return
    waker = StuckWorkerWaker(threading.get_native_id())
    waker.start()
    try:
        yield
    finally:
        waker.stop()
