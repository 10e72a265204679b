"""
Keeping child services running: start a command, restart it when it dies,
stop it on request.

What systemd's ``Restart=on-failure`` does for a deployment, a
:class:`SupervisedProcess` does for ``lucid demo``: a service that exits
unexpectedly is started again after a capped, growing delay, and the log
says why.  Stopping sends SIGTERM, then SIGKILL if the process lingers.
On Linux a child is also sent SIGTERM when its supervisor dies, however it
dies (a SIGKILL included), so no service outlives the demo that started it.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer, protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

_TWISTD = "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()"


def twistd_command(*arguments: str) -> list[str]:
    """The argv that runs ``twistd ARGUMENTS`` with this interpreter, whatever PATH holds."""
    return [sys.executable, "-c", _TWISTD, *arguments]


_DIE_WITH_PARENT = """
import ctypes, os, signal, sys
try:
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG, kept across exec
except (OSError, AttributeError):
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit("its supervisor is gone")
os.execvp(sys.argv[2], sys.argv[2:])
"""


def dying_with_parent(argv: Sequence[str]) -> list[str]:
    """``argv`` run so that it is sent SIGTERM when this process (the thread that starts it) dies."""
    return [sys.executable, "-c", _DIE_WITH_PARENT, str(os.getpid()), *argv]


RESTART_INITIAL = 0.5
RESTART_CAP = 10.0
STOP_GRACE = 10.0


class _Child(protocol.ProcessProtocol):
    def __init__(self, owner: SupervisedProcess, log_file: Any) -> None:
        self.owner = owner
        self.log_file = log_file
        self.ended: defer.Deferred[Any] = defer.Deferred()

    def outReceived(self, data: bytes) -> None:
        self.log_file.write(data)
        self.log_file.flush()

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        # Not the Failure itself: a child that died unasked has no one waiting, and an unhandled Failure is logged.
        self.ended.callback(None)
        self.owner._ended(self, reason)


class SupervisedProcess:
    """One child process, restarted whenever it exits unasked."""

    log = Logger()

    def __init__(
        self, reactor: Any, name: str, argv: Sequence[str], log_path: Path, env: dict[str, str] | None = None
    ) -> None:
        self.reactor = reactor
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.env = dict(os.environ if env is None else env)
        self.restarts = 0
        self._child: _Child | None = None
        self._transport: Any = None
        self._stopping = False
        self._restart_call: Any = None
        self._delay = RESTART_INITIAL

    @property
    def pid(self) -> int | None:
        """The running child's process id."""
        return self._transport.pid if self._transport is not None and self._child is not None else None

    def start(self) -> None:
        """Start the child (and keep it running until :meth:`stop`)."""
        self._stopping = False
        self._spawn()

    def _spawn(self) -> None:
        self._restart_call = None
        # The folder may be gone with a lost disk (the demo keeps the metadata server's log and pid file in its
        # data folder); the child must come back all the same.
        self.log_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        log_file = self.log_path.open("ab")
        child = _Child(self, log_file)
        self._child = child
        argv = dying_with_parent(self.argv)
        self._transport = self.reactor.spawnProcess(child, argv[0], argv, env=self.env)

    def _ended(self, child: _Child, reason: Failure) -> None:
        child.log_file.close()
        if child is not self._child:
            return
        self._child = None
        if self._stopping:
            return
        self.restarts += 1
        delay = self._delay
        self._delay = min(RESTART_CAP, self._delay * 2)
        self.log.warn(
            "{name} exited ({why}); restarting in {delay:.1f} s (see {log})",
            name=self.name, why=reason.getErrorMessage(), delay=delay, log=self.log_path,
        )
        self._restart_call = self.reactor.callLater(delay, self._spawn)

    def healthy(self) -> None:
        """The child is serving: the next restart starts with a short delay again."""
        self._delay = RESTART_INITIAL

    def stop(self) -> defer.Deferred[Any]:
        """Stop the child and do not restart it; fires once it has exited."""
        self._stopping = True
        if self._restart_call is not None and self._restart_call.active():
            self._restart_call.cancel()
        child = self._child
        if child is None:
            return defer.succeed(None)
        self._signal(signal.SIGTERM)
        kill = self.reactor.callLater(STOP_GRACE, self._signal, signal.SIGKILL)

        def ended(result: Any) -> Any:
            if kill.active():
                kill.cancel()
            return None

        return child.ended.addBoth(ended)

    def _signal(self, number: int) -> None:
        try:
            self._transport.signalProcess({signal.SIGTERM: "TERM", signal.SIGKILL: "KILL"}[number])
        except Exception:  # already gone
            pass
