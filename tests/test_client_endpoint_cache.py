"""
The endpoint cache: survives a restart of the client, is written atomically and
privately, and a damaged file is ignored (logged once) and rewritten, never an error.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from lucidlink import atomic
from lucidlink.client.endpoint_cache import FILE_NAME, EndpointCache, Location
from lucidlink.protocol.messages import Resolved, ServerStatus


def location(filespace: str = "demo", endpoint: str = "tcp:10.0.0.5:7100", stored_at: float = 100.0) -> Location:
    return Location(
        filespace=filespace,
        endpoints=(endpoint, "tcp:10.0.0.6:7100"),
        identity=f"meta.{filespace}.lucid",
        status=ServerStatus.SERVING,
        ttl_ms=30_000,
        stored_at=stored_at,
        source="tcp:10.0.0.2:7000",
    )


class EndpointCacheTests(SynchronousTestCase):
    """One JSON file in the state folder, the last answer per filespace."""

    def setUp(self) -> None:
        self.state_dir = Path(self.mktemp()) / "state"
        self.path = self.state_dir / FILE_NAME
        self.warnings: list[dict[str, Any]] = []

        def observe(event: dict[str, Any]) -> None:
            if "endpoint cache" in event.get("log_format", ""):
                self.warnings.append(event)

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)

    def test_survives_restart(self) -> None:
        """What one client stored, a new client object over the same folder finds."""
        EndpointCache(self.state_dir).put(location("demo"))
        EndpointCache(self.state_dir).put(location("other", "tcp:10.0.0.9:7100"))
        restarted = EndpointCache(self.state_dir)
        self.assertEqual(restarted.get("demo"), location("demo"))
        self.assertEqual(restarted.get("other"), location("other", "tcp:10.0.0.9:7100"))
        self.assertEqual(restarted.filespaces(), ["demo", "other"])
        self.assertIsNone(restarted.get("missing"))
        self.assertEqual(self.warnings, [])

    def test_replace_and_remove(self) -> None:
        """A new answer replaces the old; a removed filespace is gone after a restart."""
        cache = EndpointCache(self.state_dir)
        cache.put(location("demo", "tcp:old:1"))
        cache.put(location("demo", "tcp:new:1"))
        self.assertEqual(EndpointCache(self.state_dir).get("demo"), location("demo", "tcp:new:1"))
        cache.remove("demo")
        cache.remove("never-there")
        self.assertIsNone(EndpointCache(self.state_dir).get("demo"))

    def test_private_and_atomic(self) -> None:
        """The folder is 0700, the file 0600, and no temporary file is left behind."""
        EndpointCache(self.state_dir).put(location())
        self.assertEqual(stat.S_IMODE(self.state_dir.stat().st_mode), 0o700)
        self.assertEqual(stat.S_IMODE(self.path.stat().st_mode), 0o600)
        self.assertEqual([p.name for p in self.state_dir.iterdir()], [FILE_NAME])

    def test_other_process_entries_kept(self) -> None:
        """A write does not lose what another client process wrote since this one read."""
        mine = EndpointCache(self.state_dir)
        mine.put(location("mine"))
        EndpointCache(self.state_dir).put(location("theirs"))
        mine.put(location("mine", "tcp:moved:1"))
        self.assertEqual(EndpointCache(self.state_dir).filespaces(), ["mine", "theirs"])

    def test_from_resolved(self) -> None:
        """A Resolved answer becomes a location that round-trips through the file."""
        answer = Resolved("demo", ["tcp:a:1"], "meta.demo.lucid", 5000, ServerStatus.RESTORING)
        stored = Location.from_resolved(answer, 42.5, source="tcp:d:7000")
        EndpointCache(self.state_dir).put(stored)
        found = EndpointCache(self.state_dir).get("demo")
        assert found is not None
        self.assertEqual(found, stored)
        self.assertEqual(found.status_name, "restoring")

    def damaged(self, content: bytes) -> EndpointCache:
        """A cache over a file holding ``content``, after one lookup."""
        self.state_dir.mkdir(parents=True)
        self.path.write_bytes(content)
        cache = EndpointCache(self.state_dir)
        self.assertIsNone(cache.get("demo"))
        return cache

    def assertRewritten(self, cache: EndpointCache) -> None:
        """The damage was logged once, the file is sound again, and new answers are kept."""
        self.assertEqual(len(self.warnings), 1, self.warnings)
        self.assertIn("ignoring the endpoint cache", self.warnings[0]["log_format"])
        document = json.loads(self.path.read_text())
        self.assertEqual(document["version"], 1)
        cache.put(location("demo"))
        cache.get("demo")
        self.assertEqual(EndpointCache(self.state_dir).get("demo"), location("demo"))
        self.assertEqual(len(self.warnings), 1)

    def test_garbage_ignored(self) -> None:
        """Bytes that are not even text are ignored, logged once, and rewritten."""
        self.assertRewritten(self.damaged(b"\xff\xfe\x00garbage\x80"))

    def test_truncated_json_ignored(self) -> None:
        """A file cut short (a crash of an older, non-atomic writer) is ignored and rewritten."""
        self.state_dir.mkdir(parents=True)
        EndpointCache(self.state_dir).put(location("demo"))
        whole = self.path.read_bytes()
        self.path.write_bytes(whole[: len(whole) // 2])
        cache = EndpointCache(self.state_dir)
        self.assertIsNone(cache.get("demo"))
        self.assertRewritten(cache)

    def test_empty_file_ignored(self) -> None:
        """What a power cut may leave of a file written without fsync is ignored and rewritten."""
        self.assertRewritten(self.damaged(b""))

    def test_written_without_fsync(self) -> None:
        """The cache is a hint: writing it costs no fsync, of the file or its folder."""
        synced: list[int] = []
        self.patch(atomic.os, "fsync", synced.append)
        EndpointCache(self.state_dir).put(location("demo"))
        self.assertEqual(synced, [])
        self.assertEqual(EndpointCache(self.state_dir).get("demo"), location("demo"))
        atomic.write_atomically(self.state_dir / "durable", b"kept")
        self.assertEqual(len(synced), 2, "a durable write syncs the file and the folder")

    def test_wrong_shape_ignored(self) -> None:
        """JSON of the wrong shape is ignored and rewritten."""
        for document in ([1, 2, 3], {"version": 99, "filespaces": {}}, {"version": 1, "filespaces": []}, "text"):
            self.warnings.clear()
            if self.state_dir.exists():
                self.path.unlink(missing_ok=True)
                self.state_dir.rmdir()
            self.assertRewritten(self.damaged(json.dumps(document).encode()))

    def test_wrong_types_dropped_others_kept(self) -> None:
        """Entries with fields of the wrong type are dropped; sound entries survive."""
        good = location("good").to_json()
        bad_entries = {
            "endpoints-a-string": dict(good, endpoints="tcp:a:1"),
            "endpoint-not-string": dict(good, endpoints=[7]),
            "ttl-a-string": dict(good, ttl_ms="30"),
            "ttl-a-bool": dict(good, ttl_ms=True),
            "negative-ttl": dict(good, ttl_ms=-1),
            "status-unknown-word": dict(good, status="sleeping"),
            "stored-missing": {k: v for k, v in good.items() if k != "stored_at"},
            "identity-null": dict(good, identity=None),
            "not-an-object": ["tcp:a:1"],
        }
        document = {"version": 1, "filespaces": {"good": good, **bad_entries}}
        self.state_dir.mkdir(parents=True)
        self.path.write_text(json.dumps(document))
        cache = EndpointCache(self.state_dir)
        self.assertEqual(cache.filespaces(), ["good"])
        self.assertEqual(cache.get("good"), location("good"))
        self.assertEqual(len(self.warnings), 1)
        self.assertEqual(list(json.loads(self.path.read_text())["filespaces"]), ["good"])

    def test_unreadable_never_an_error(self) -> None:
        """A cache path that cannot be read or written is logged and the client carries on."""
        self.path.mkdir(parents=True)  # a folder where the file should be
        cache = EndpointCache(self.state_dir)
        self.assertIsNone(cache.get("demo"))
        cache.put(location("demo"))
        cache.remove("demo")
        formats = [event["log_format"] for event in self.warnings]
        self.assertEqual(len([f for f in formats if "ignoring" in f]), 1, formats)
        self.assertEqual(len([f for f in formats if "cannot write" in f]), 1, formats)
        self.assertEqual([p.name for p in self.state_dir.iterdir()], [FILE_NAME])
