"""
The ``lucid`` command line against a running demo: the file commands do
what their names say, and every failure is one clear line and exit 1.
"""

from __future__ import annotations

import hashlib
import os

from tests.demo_helpers import DemoCase, lucid


class CommandLineTests(DemoCase):
    """One demo, many commands (the demo takes seconds to start)."""

    timeout = 400

    def ok(self, *arguments: str, **options: object) -> str:
        result = lucid(self.demo.config, *arguments, **options)  # type: ignore[arg-type]
        self.assertEqual(result.returncode, 0, f"lucid {' '.join(arguments)}: {result.stderr.decode()}")
        return result.stdout.decode()

    def fails(self, words: str, *arguments: str, **options: object) -> None:
        result = lucid(self.demo.config, *arguments, **options)  # type: ignore[arg-type]
        self.assertEqual(result.returncode, 1, result.stdout.decode())
        lines = result.stderr.decode().strip().splitlines()
        self.assertEqual(len(lines), 1, lines)
        self.assertTrue(lines[0].startswith("lucid: "), lines[0])
        self.assertIn(words, lines[0])

    def test_files_and_failures(self) -> None:
        """Every file command, then every failure the issue names."""
        # put / get a file spanning chunks, with its content checked
        big = self.base / "big.bin"
        big.write_bytes(os.urandom(9 * 1024 * 1024 + 123))
        self.ok("mkdir", "-p", "demo:/a/b/c")
        self.ok("put", str(big), "demo:/a/b/c/big.bin")
        self.ok("get", "demo:/a/b/c/big.bin", str(self.base / "back.bin"))
        self.assertEqual(
            hashlib.sha256((self.base / "back.bin").read_bytes()).digest(), hashlib.sha256(big.read_bytes()).digest()
        )
        self.assertIn("9437307", self.ok("ls", "-l", "demo:/a/b/c"))
        self.assertIn("Size: 9437307", self.ok("stat", "demo:/a/b/c/big.bin"))

        # mv, ln, ln -s, rm, rm -r
        self.ok("mv", "demo:/a/b/c/big.bin", "demo:/a/renamed.bin")
        self.ok("ln", "demo:/a/renamed.bin", "demo:/a/hard.bin")
        self.assertIn("Links: 2", self.ok("stat", "demo:/a/hard.bin"))
        self.ok("ln", "-s", "renamed.bin", "demo:/a/soft")
        self.assertIn("soft -> renamed.bin", self.ok("ls", "-l", "demo:/a"))
        self.ok("rm", "demo:/a/hard.bin")
        self.fails("is a directory (use rm -r)", "rm", "demo:/a")
        self.ok("rm", "-r", "demo:/a")
        self.assertNotIn("a", self.ok("ls", "demo:/").split())

        # failures, one line each
        self.fails("no such file or directory", "cat", "demo:/missing.txt")
        self.fails("no filespace named 'nowhere'", "ls", "nowhere:/")
        self.fails("wrong passphrase for user 'demo'", "ls", "demo:/", environment={"LUCID_PASSPHRASE": "not it"})
        self.fails("name", "mkdir", "demo:/" + "x" * 300)
        self.ok("user", "add", "demo", "rita", "--role", "reader", environment={"LUCID_NEW_PASSPHRASE": "rita-pass"})
        self.fails("is a reader", "mkdir", "--user", "rita", "demo:/not-allowed",
                   environment={"LUCID_PASSPHRASE": "rita-pass"})
        self.fails("admin", "user", "list", "demo", "--user", "rita", environment={"LUCID_PASSPHRASE": "rita-pass"})
        self.assertIn("rita\treader", self.ok("user", "list", "demo"))

        # a changed passphrase: the old one stops working
        self.ok("user", "passwd", "demo", "rita", environment={"LUCID_NEW_PASSPHRASE": "rita-new"})
        self.fails("wrong passphrase", "ls", "--user", "rita", "demo:/", environment={"LUCID_PASSPHRASE": "rita-pass"})
        self.ok("ls", "--user", "rita", "demo:/", environment={"LUCID_PASSPHRASE": "rita-new"})

        # the bootstrap token cannot be used twice
        token = self.base / "token"
        token.write_text("00" * 32)
        self.fails("bootstrap token", "filespace", "init", "demo", "--bootstrap-token-file", str(token),
                   "--admin", "mallory", environment={"LUCID_PASSPHRASE": "x"})

        # unreachable servers: a config whose discovery listens nowhere
        dead = self.base / "dead.ini"
        lines = []
        for line in self.demo.config.read_text().splitlines():
            if line.startswith("discovery ="):
                line = "discovery = tcp:127.0.0.1:1"
            elif line.startswith("state_dir ="):
                line = f"state_dir = {self.base / 'empty-state'}"
            lines.append(line)
        dead.write_text("\n".join(lines) + "\n")
        result = lucid(dead, "ls", "--timeout", "3", "demo:/")
        self.assertEqual(result.returncode, 1)
        self.assertIn("refused", result.stderr.decode())
