"""
Real mounts for tests (their own tier): ``lucid-mount`` processes in the
foreground against a running ``lucid demo``, all unmounted in cleanup with a
timeout (a signal, then ``fusermount -u -z`` if the mount lingers), and the
reason FUSE cannot be tested here, if it cannot.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from lucidlink.cli.mount import STACKS_SIGNAL
from tests.demo_helpers import DemoCase, lucid


def _why_no_fuse() -> str | None:
    if not Path("/dev/fuse").exists():
        return "/dev/fuse is missing: FUSE mounts cannot be tested here"
    try:
        import llfuse  # noqa: F401
    except ImportError:
        return "llfuse is not installed (pip install 'lucidlink[fuse]'): FUSE mounts cannot be tested here"
    if os.getuid() != 0 and shutil.which("fusermount") is None:
        return "fusermount is missing: FUSE mounts cannot be made by this user"
    return None


SKIP = _why_no_fuse()
"""Why real mounts cannot be tested here, or None."""


def is_mounted(mountpoint: Path) -> bool:
    """Whether something is mounted at ``mountpoint``, a stale FUSE mount too (``os.path.ismount`` misses those)."""
    target = os.path.abspath(mountpoint).encode()
    with open("/proc/self/mounts", "rb") as mounts:
        return any(line.split()[1].replace(b"\\040", b" ") == target for line in mounts if line.strip())


def unmount_lazily(mountpoint: Path) -> None:
    """Detach whatever is mounted at ``mountpoint`` (nothing blocks on it afterwards)."""
    if is_mounted(mountpoint):
        subprocess.run(["fusermount", "-u", "-z", str(mountpoint)], capture_output=True, timeout=30)


class MountProcess:
    """``lucid-mount FILESPACE MOUNTPOINT --foreground`` until :meth:`stop`."""

    def __init__(self, config: Path, filespace: str, mountpoint: Path, log: Path, *options: str) -> None:
        self.mountpoint = mountpoint
        self.log = log
        self._log = log.open("ab")
        self._start = self._log.tell()
        env = dict(os.environ, LUCID_CONFIG=str(config))
        env.pop("LUCID_PASSPHRASE", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "lucidlink.cli.mount", filespace, str(mountpoint), "--foreground", *options],
            stdout=self._log, stderr=subprocess.STDOUT, env=env,
        )

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_until_mounted(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not (b" mounted at " in self.log.read_bytes()[self._start:] and os.path.ismount(self.mountpoint)):
            if self.process.poll() is not None:
                raise AssertionError(f"lucid-mount exited with {self.process.returncode}:\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"not mounted after {timeout} s:\n{self.log_text()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """End the process at once (SIGKILL), as a crash would, and detach its mount."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        unmount_lazily(self.mountpoint)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120) -> int | None:
        """Signal the process and wait for it; unmount lazily and kill it if it lingers."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        if self.process.poll() is None:
            self.process.send_signal(STACKS_SIGNAL)  # where it hangs, into its log
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(2)
        if self.process.poll() is None:
            self.process.kill()  # ends its FUSE connection, so nothing below blocks on the mount
            self.process.wait(10)
        unmount_lazily(self.mountpoint)
        self._log.close()
        return self.process.returncode


class DemoMountCase(DemoCase):
    """A running demo filespace (``demo``) that tests mount under a temporary folder."""

    timeout = 300
    if SKIP:
        skip = SKIP

    def start_mount(self, name: str = "mnt", *options: str) -> MountProcess:
        """Mount the demo filespace at ``base/name`` (made if missing); unmounted in cleanup."""
        mountpoint = self.base / name
        try:
            mountpoint.mkdir()
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTCONN):  # ENOTCONN: a stale mount (--force cleans it)
                raise
        mount = MountProcess(self.demo.config, "demo", mountpoint, self.base / f"{name}.log", *options)
        self.addCleanup(mount.stop)
        mount.wait_until_mounted()
        return mount

    def assertErrno(self, number: int, function: object, *arguments: object) -> None:
        with self.assertRaises(OSError) as caught:
            function(*arguments)  # type: ignore[operator]
        self.assertEqual(caught.exception.errno, number, f"{errno.errorcode[caught.exception.errno]}")

    def metadata_server_pid(self) -> int:
        """The process id of the demo's metadata server."""
        return int((self.demo.directory / "meta" / "demo" / "twistd.pid").read_text())

    def kill_metadata_server(self) -> None:
        """SIGKILL the demo's metadata server (the demo restarts it, as systemd would)."""
        pid_file = self.demo.directory / "meta" / "demo" / "twistd.pid"
        pid = self.metadata_server_pid()
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if int(pid_file.read_text()) != pid:
                    return
            except (OSError, ValueError):
                pass
            time.sleep(0.05)
        raise AssertionError("the demo did not restart its metadata server")

    def lucid_cat(self, path: str) -> bytes:
        result = lucid(self.demo.config, "cat", f"demo:{path}")
        self.assertEqual(result.returncode, 0, result.stderr.decode())
        return result.stdout
