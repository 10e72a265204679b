"""
A running ``lucid demo`` for integration tests of the command line: real
discovery and metadata processes, a local object store, a client config.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from twisted.trial.unittest import TestCase


def lucid(config: Path, *arguments: str, environment: dict[str, str] | None = None,
          stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run the real ``lucid`` command with ``config``."""
    env = dict(os.environ, LUCID_CONFIG=str(config))
    env.pop("LUCID_PASSPHRASE", None)
    env.update(environment or {})
    return subprocess.run(
        [sys.executable, "-m", "lucidlink.cli.main", *arguments],
        env=env, capture_output=True, input=stdin, timeout=120,
    )


class RunningDemo:
    """
    ``lucid demo DIR`` in the background until :meth:`stop`; ``mount``: let it mount ``DIR/mnt`` too;
    ``store``: an object store URL instead of the demo's own local folder.
    """

    def __init__(self, directory: Path, mount: bool = False, store: str | None = None) -> None:
        self.directory = directory
        self.output: list[bytes] = []
        self.config = directory / "client.ini"
        self.log_path = directory.parent / f"{directory.name}.out"
        self._log: IO[bytes] = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lucidlink.cli.main", "demo", str(directory), *([] if mount else ["--no-mount"]),
             *(["--store", store] if store else [])],
            stdout=subprocess.PIPE, stderr=self._log,
        )

    def wait_until_ready(self, timeout: float = 180) -> None:
        """Block until the demo prints ``ready``; raise with its log if it does not."""
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        for line in self.process.stdout:
            self.output.append(line)
            if line.strip() == b"ready":
                return
            if time.monotonic() > deadline:
                break
        raise AssertionError(f"the demo never said ready:\n{self.log_path.read_text(errors='replace')}")

    def stop(self) -> None:
        """Ctrl-C the demo and wait for it (and so its services) to end."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self._log.close()


class DemoCase(TestCase):
    """A ``lucid demo`` (discovery and metadata processes, a local store) for each test, in ``base/demo``."""

    timeout = 600

    def setUp(self) -> None:
        self.base = Path(self.mktemp()).absolute()
        self.base.mkdir()
        self.demo = RunningDemo(self.base / "demo", store=self.store_url())
        self.addCleanup(self.demo.stop)
        self.demo.wait_until_ready()

    def store_url(self) -> str | None:
        """The demo's object store: its own local folder (tests/test_s3_system.py runs these on S3)."""
        return None
