"""
Tests for lucidlink.supervise: children die with their supervisor.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from lucidlink.supervise import dying_with_parent

SUPERVISOR = textwrap.dedent("""
    import sys
    from pathlib import Path
    from twisted.internet import reactor
    from lucidlink.supervise import SupervisedProcess

    child = SupervisedProcess(reactor, "sleeper", [sys.executable, "-c", "import time; time.sleep(60)"], Path(sys.argv[1]))

    def started():
        child.start()
        reactor.callLater(0.5, lambda: print(child.pid, flush=True))

    reactor.callWhenRunning(started)
    reactor.run()
""")


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its new parent to reap it does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


class DieWithParentTests(SynchronousTestCase):
    """A supervised child is sent SIGTERM when its supervisor dies, even by SIGKILL."""

    def setUp(self) -> None:
        if not sys.platform.startswith("linux"):
            self.skipTest("the parent-death signal is Linux's")

    def test_child_ends_with_killed_supervisor(self) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        supervisor = subprocess.Popen(
            [sys.executable, "-c", SUPERVISOR, self.mktemp()], stdout=subprocess.PIPE, env=env, text=True
        )
        self.addCleanup(supervisor.wait)
        self.addCleanup(lambda: supervisor.poll() is None and supervisor.kill())
        assert supervisor.stdout is not None
        child = int(supervisor.stdout.readline())
        self.addCleanup(lambda: _alive(child) and os.kill(child, signal.SIGKILL))
        self.assertTrue(_alive(child))
        supervisor.kill()
        supervisor.wait()
        supervisor.stdout.close()
        deadline = time.monotonic() + 10
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        self.assertFalse(_alive(child), "the child outlived its supervisor")

    def test_runs_the_command(self) -> None:
        result = subprocess.run(dying_with_parent([sys.executable, "-c", "print('ran')"]), capture_output=True, text=True)
        self.assertEqual((result.returncode, result.stdout), (0, "ran\n"))

    def test_orphan_does_not_start(self) -> None:
        """A child whose supervisor died before it could ask for the signal does not run the command."""
        argv = dying_with_parent([sys.executable, "-c", "print('ran')"])
        argv[3] = "1"  # the supervisor it expects is not its parent
        result = subprocess.run(argv, capture_output=True, text=True)
        self.assertEqual(result.stdout, "")
        self.assertIn("supervisor is gone", result.stderr)
