"""
Real service processes for integration tests: started with twistd on
loopback, stopped by their own PID in cleanup, never left behind.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from lucidlink.supervise import twistd_command


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ServiceProcess:
    """One ``twistd -n`` process and its log file."""

    def __init__(self, arguments: Sequence[str], log: Path, cwd: Path | None = None) -> None:
        self.log = log
        self.arguments = list(arguments)
        self._log_file = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            twistd_command("-n", "--pidfile=", *self.arguments),
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            cwd=cwd,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int | None:
        """Signal the process, wait for it (killing it if it lingers); its exit status."""
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout)
        self._log_file.close()
        return self.process.returncode

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def start_service(test: TestCase, arguments: Sequence[str], log: Path) -> ServiceProcess:
    """Start ``twistd -n ARGUMENTS``; the test's cleanup stops it."""
    service = ServiceProcess(arguments, log)
    test.addCleanup(service.stop)
    return service


@defer.inlineCallbacks
def wait_for_port(port: int, service: ServiceProcess, timeout: float = 20.0) -> Any:
    """Fire once 127.0.0.1:``port`` accepts connections; fail with the log if the service died."""
    deadline = time.monotonic() + timeout
    while True:
        if service.process.poll() is not None:
            raise AssertionError(f"service exited with {service.process.returncode}:\n{service.log_text()}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.settimeout(0.5)
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing listens on port {port} after {timeout} s:\n{service.log_text()}")
        yield task.deferLater(reactor, 0.1, lambda: None)  # type: ignore[arg-type]
