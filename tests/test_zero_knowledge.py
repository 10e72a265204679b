"""
Zero knowledge, proven: after files with distinctive names and contents are
written through the real command line and real services, no byte of the
metadata server's data folder and log, discovery's log, or the object store
contains those names, those contents, or the master key.
"""

from __future__ import annotations

import base64
from pathlib import Path

from twisted.trial.unittest import TestCase

from lucidlink.crypto import import_key
from tests.demo_helpers import RunningDemo, lucid

SECRET_NAME = "Quarterly-Forecast-Zebra"
SECRET_DIRECTORY = "Project-Marmalade"
SECRET_CONTENT = "The eagle lands at midnight beside the violet lighthouse."
SECRET_LINK_TARGET = "Hidden-Target-Okapi"


def variants(text: str) -> list[bytes]:
    """How a string could leak: UTF-8, UTF-16 either way, and lowercase forms of those."""
    forms = []
    for candidate in (text, text.lower()):
        forms += [candidate.encode("utf-8"), candidate.encode("utf-16-le"), candidate.encode("utf-16-be")]
    return forms


class ZeroKnowledgeTests(TestCase):
    """Everything the operators hold, scanned for what only users should know."""

    timeout = 300

    def test_servers_and_store_never_see_names_contents_or_key(self) -> None:
        base = Path(self.mktemp()).absolute()
        base.mkdir()
        demo_dir = base / "demo"
        demo = RunningDemo(demo_dir)
        self.addCleanup(demo.stop)
        demo.wait_until_ready()
        config = demo.config

        local = base / f"{SECRET_NAME}.txt"
        local.write_text(SECRET_CONTENT * 50)
        for arguments in (
            ("mkdir", f"demo:/{SECRET_DIRECTORY}"),
            ("put", str(local), f"demo:/{SECRET_DIRECTORY}/{SECRET_NAME}.txt"),
            ("ln", "-s", SECRET_LINK_TARGET, f"demo:/{SECRET_DIRECTORY}/link-{SECRET_NAME}"),
        ):
            result = lucid(config, *arguments)
            self.assertEqual(result.returncode, 0, result.stderr.decode())
        back = lucid(config, "cat", f"demo:/{SECRET_DIRECTORY}/{SECRET_NAME}.txt")
        self.assertEqual(back.stdout.decode(), SECRET_CONTENT * 50)
        listing = lucid(config, "ls", f"demo:/{SECRET_DIRECTORY}")
        self.assertIn(SECRET_NAME, listing.stdout.decode())

        key_file = base / "key.txt"
        self.assertEqual(lucid(config, "key", "export", "demo", str(key_file)).returncode, 0)
        self.assertEqual(key_file.stat().st_mode & 0o777, 0o600)
        master_key = import_key(key_file.read_text()).master_key

        demo.stop()
        needles = variants(SECRET_NAME) + variants(SECRET_DIRECTORY) + variants(SECRET_CONTENT[:30])
        needles += variants(SECRET_LINK_TARGET)
        needles += [master_key, master_key.hex().encode(), base64.b64encode(master_key)]
        scanned = 0
        for folder in (demo_dir / "meta", demo_dir / "discovery", demo_dir / "objects"):
            for path in folder.rglob("*"):
                if not path.is_file():
                    continue
                data = path.read_bytes()
                scanned += len(data)
                for needle in needles:
                    self.assertNotIn(needle, data, f"{needle!r} found in {path}")
        self.assertGreater(scanned, len(SECRET_CONTENT) * 50)
