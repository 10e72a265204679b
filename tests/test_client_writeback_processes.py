"""
Write-back with real processes: a running ``lucid demo`` (discovery and
metadata server processes, a local object store), client processes that die
with writes pending, and the metadata server killed and started again (the
demo restarts it, as systemd would).  Nothing acknowledged to a writer is
lost; what cannot be committed safely is kept and reported.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred

from lucidlink.cli.common import with_filespace
from tests.cache_helpers import pattern
from tests.demo_helpers import DemoCase, lucid

ROOT = Path(__file__).resolve().parent.parent
MIB = 1024 * 1024


class WriteBackProcessTests(DemoCase):
    """One demo per test; clients and the metadata server die and come back."""

    def client(self, *arguments: str) -> subprocess.CompletedProcess[str]:
        """Run a client process (``tests.writeback_client``) with the demo's config, to its end."""
        env = dict(os.environ, LUCID_CONFIG=str(self.demo.config), PYTHONPATH=str(ROOT))
        env.pop("LUCID_PASSPHRASE", None)
        return subprocess.run(
            [sys.executable, "-m", "tests.writeback_client", *arguments],
            env=env, capture_output=True, text=True, timeout=180, cwd=ROOT,
        )

    def ok(self, *arguments: str) -> bytes:
        result = lucid(self.demo.config, *arguments)
        self.assertEqual(result.returncode, 0, f"lucid {' '.join(arguments)}: {result.stderr.decode()}")
        return result.stdout

    def kill_meta(self, wait: bool = True) -> None:
        """SIGKILL the metadata server; with ``wait``, wait until the demo has it serving again."""
        pid_file = self.base / "demo" / "meta" / "demo" / "twistd.pid"
        old = int(pid_file.read_text())
        os.kill(old, signal.SIGKILL)
        if not wait:
            return
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                pid = int(pid_file.read_text())
            except (FileNotFoundError, ValueError):
                pid = old
            if pid != old and lucid(self.demo.config, "ls", "demo:/").returncode == 0:
                return
            time.sleep(0.2)
        raise AssertionError("the demo did not start the metadata server again")

    def test_client_and_metadata_server_restart(self) -> None:
        """A client dies with writes pending, the metadata server dies too; the next client commits them."""
        size = 9 * MIB + 123
        written = self.client("write", "demo", "/pending.bin", str(size), "1")
        self.assertEqual(written.stdout.strip(), "pending", written.stderr)
        self.kill_meta()
        self.assertIn("Size: 0", self.ok("stat", "demo:/pending.bin").decode(), "nothing committed yet")
        recovered = self.client("recover", "demo")
        self.assertEqual(recovered.returncode, 0, recovered.stderr)
        self.assertIn("left by an earlier run: committed", recovered.stderr)
        self.assertEqual(self.ok("cat", "demo:/pending.bin"), pattern(size, 1))
        self.assertEqual(list((self.base / "demo" / "cache").rglob("*.journal")), [])

    def test_conflict_is_reported_and_kept(self) -> None:
        """Pending writes to a file someone else changed meanwhile: not merged, reported, kept on disk."""
        original = self.base / "original.bin"
        original.write_bytes(b"first version\n")
        self.ok("put", str(original), "demo:/shared.bin")
        written = self.client("write", "demo", "/shared.bin", str(MIB), "2")
        self.assertEqual(written.stdout.strip(), "pending", written.stderr)
        theirs = self.base / "theirs.bin"
        theirs.write_bytes(b"someone else's version\n")
        self.ok("put", str(theirs), "demo:/shared.bin")
        recovered = self.client("recover", "demo")
        self.assertEqual(recovered.returncode, 0, recovered.stderr)
        self.assertIn("were NOT committed", recovered.stderr)
        self.assertIn("changed since these writes were made", recovered.stderr)
        kept = list((self.base / "demo" / "cache").rglob("conflicts/*.journal"))
        self.assertEqual(len(kept), 1)
        self.assertIn(str(kept[0]), recovered.stderr)
        self.assertEqual(self.ok("cat", "demo:/shared.bin"), b"someone else's version\n")

        # lucid conflicts: listed, then saved as a new file (their version with these writes over it)
        listed = self.ok("conflicts", "demo").decode()
        self.assertIn("1 writes (1048576 bytes)", listed)
        self.assertIn("changed since these writes were made", listed)
        journal_id = listed.split(":", 2)[0] + ":" + listed.split(":", 2)[1]
        self.assertRegex(journal_id, r"^\d+:\d+-\d+$")
        refused = lucid(self.demo.config, "conflicts", "demo", "--save", journal_id)
        self.assertEqual(refused.returncode, 1)
        self.assertIn("--save needs --to", refused.stderr.decode())
        saved = self.ok("conflicts", "demo", "--save", journal_id, "--to", "/shared (mine).bin").decode()
        self.assertIn(f"saved {journal_id} as demo:/shared (mine).bin (1048576 bytes)", saved)
        self.assertEqual(self.ok("cat", "demo:/shared (mine).bin"), pattern(MIB, 2))
        self.assertEqual(list((self.base / "demo" / "cache").rglob("conflicts/*")), [])
        self.assertEqual(lucid(self.demo.config, "conflicts", "demo").stdout, b"")

    @defer.inlineCallbacks
    def test_writer_outlives_a_metadata_server_restart(self) -> Generator[Deferred[Any], Any, None]:
        """A writer keeps writing while the metadata server is killed; close waits for it, nothing is lost."""
        data = pattern(10 * MIB + 5, 3)
        args = argparse.Namespace(config=self.demo.config, user=None, store=None, passphrase_file=None, timeout=None)

        @defer.inlineCallbacks
        def work(fs: Any) -> Generator[Deferred[Any], Any, None]:
            from lucidlink.client.filespace import Filespace

            cached = Filespace(fs.session, fs.store, cache_dir=self.base / "client-cache")
            try:
                handle = yield cached.open_path("/outage.bin", os.O_WRONLY | os.O_CREAT)
                half = len(data) // 2
                yield handle.write(0, data[:half])
                self.kill_meta(wait=False)
                yield handle.write(half, data[half:])
                yield handle.close()  # waits for the demo to start the metadata server again
            finally:
                yield cached.close()

        yield with_filespace(reactor, args, "demo", work)
        self.assertEqual(self.ok("cat", "demo:/outage.bin"), data)
