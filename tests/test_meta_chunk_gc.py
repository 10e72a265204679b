"""
Garbage collection of chunk objects: what it deletes (garbage older than the
retention window, uploads never committed and older than the grace period),
what it keeps (every chunk a chunk map names, now or at any moment of the
window), and when it deletes nothing at all.
"""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lucidlink.chunk_keys import chunk_object_key, parse_chunk_key
from lucidlink.cli import meta as cli
from lucidlink.errors import AccessDenied, InvalidArgument
from lucidlink.meta import mutations as m
from lucidlink.meta.chunk_gc import collect
from lucidlink.meta.segments import parse_segment_key
from lucidlink.meta.shipper import Shipper
from lucidlink.meta.snapshots import restore, seq_at_time, take_snapshot
from lucidlink.meta.store import ROOT_INODE, MetadataStore
from lucidlink.objectstore.faults import FaultyObjectStore
from tests.client_helpers import MemoryObjectStore
from tests.meta_helpers import START_TIME, initialise_record

FILESPACE = "films"
HOUR = 3600.0
DAY = 24 * HOUR


class Filespace:
    """A journalled filespace shipping to a store in memory, whose clients upload chunks there too."""

    def __init__(self, test: Any, folder: Path) -> None:
        self.test = test
        self.folder = folder
        self.clock = Clock()
        self.clock.advance(START_TIME)
        self.store = MetadataStore(folder / "original.sqlite3", self.clock)
        test.addCleanup(self.store.close)
        self.objects = MemoryObjectStore(self.clock)
        self.shipper = Shipper(self.store, self.objects, self.clock, filespace=FILESPACE, durability="async",
                               max_records=3)
        test.successResultOf(self.shipper.start())
        test.addCleanup(self.shipper.stop)
        self.store.apply(initialise_record())
        self.filespace_id = self.store.filespace_id
        self.uploads = 0

    def upload(self) -> bytes:
        """A chunk object stored as a client stores one, not yet named by any chunk map."""
        self.uploads += 1
        object_id = b"chunk-%010d" % self.uploads
        self.objects.objects[chunk_object_key(self.filespace_id, object_id)] = b"sealed"
        self.objects.modified[chunk_object_key(self.filespace_id, object_id)] = self.clock.seconds()
        return object_id

    def create(self, name: bytes) -> int:
        return self.store.apply(m.CreateFile(ROOT_INODE, name, 0o644, 0, 0, True)).value[0].inode  # type: ignore

    def write(self, inode: int) -> bytes:
        """Upload a chunk and commit it as the file's first chunk: what the file held before becomes garbage."""
        object_id = self.upload()
        self.store.apply(m.CommitChunks(inode, 0, 1024, ((0, object_id, 1024, 1024),)))
        return object_id

    def unlink(self, name: bytes) -> None:
        self.store.apply(m.Unlink(ROOT_INODE, name))

    def ship(self) -> None:
        self.clock.advance(self.shipper.ship_interval)
        while self.shipper.pending():
            self.clock.advance(self.shipper.ship_interval)

    def stored_chunks(self) -> set[bytes]:
        return {object_id for key in self.objects.objects
                if (object_id := parse_chunk_key(self.filespace_id, key)) is not None}

    def referenced(self, database: Path) -> set[bytes]:
        store = MetadataStore(database, Clock())
        try:
            return store.chunk_objects()
        finally:
            store.close()


class CollectTests(SynchronousTestCase):
    """Collecting a filespace kept in memory, on a task.Clock."""

    def setUp(self) -> None:
        self.folder = Path(self.mktemp())
        self.folder.mkdir()
        fs = self.fs = Filespace(self, self.folder)
        # Ten days ago: a file written twice (its first chunk garbage since then), an upload never committed.
        self.kept_file = fs.create(b"kept")
        self.old_version = fs.write(self.kept_file)
        self.current = fs.write(self.kept_file)
        self.abandoned = fs.upload()
        fs.ship()
        take_snapshot(fs.store, fs.objects, FILESPACE, fs.clock)
        fs.clock.advance(8 * DAY)
        # Two days ago: a file deleted (its chunk garbage since then, inside a week's window).
        doomed = fs.create(b"doomed")
        self.deleted_two_days_ago = fs.write(doomed)
        fs.ship()
        self.before_delete = fs.clock.seconds()
        fs.clock.advance(1)
        fs.unlink(b"doomed")
        fs.ship()
        fs.clock.advance(2 * DAY)
        # An hour ago: an upload whose commit may be on its way.
        self.fresh_upload = fs.upload()
        fs.clock.advance(HOUR)
        self.now = fs.clock.seconds()

    def collect(self, store: Any = None, retention: float = 7 * DAY, grace: float = DAY, **options: Any) -> Any:
        return self.successResultOf(collect(store or self.fs.objects, FILESPACE, retention, self.now, grace,
                                            **options))

    def test_deletes_only_what_nothing_needs(self) -> None:
        """Garbage older than the window and an old uncommitted upload go; live, recent garbage and fresh stay."""
        done = self.collect()
        self.assertEqual(done.error, "")
        self.assertEqual(done.plan.kept, "")
        gone = {parse_chunk_key(self.fs.filespace_id, key) for key in done.deleted}
        self.assertEqual(gone, {self.old_version, self.abandoned})
        self.assertEqual(self.fs.stored_chunks(), {self.current, self.deleted_two_days_ago, self.fresh_upload})
        plan = done.plan
        self.assertEqual((plan.stored, plan.live, plan.recent_garbage, plan.young), (5, 1, 1, 1))
        self.assertIn("deleted 2 of 2 unneeded chunk objects", done.summary)
        self.assertEqual(self.collect().deleted, [], "a second run finds nothing more")

    def test_every_moment_of_the_window_still_has_its_chunks(self) -> None:
        """Restored to now or to before the delete two days ago, every chunk a map names is in the store."""
        self.collect()
        for name, moment in (("now", self.now), ("before-delete", self.before_delete)):
            to_seq = self.successResultOf(seq_at_time(self.fs.objects, FILESPACE, int(moment * 1e9)))
            target = self.folder / f"{name}.sqlite3"
            result = self.successResultOf(restore(self.fs.objects, FILESPACE, target, to_seq=to_seq))
            self.assertTrue(result.complete, result.summary)
            named = self.fs.referenced(target)
            self.assertTrue(named, name)
            self.assertLessEqual(named, self.fs.stored_chunks(), name)
        self.assertIn(self.deleted_two_days_ago, self.fs.referenced(self.folder / "before-delete.sqlite3"))

    def test_a_longer_retention_keeps_older_garbage(self) -> None:
        """With thirty days kept, the chunk replaced ten days ago stays; the abandoned upload still goes."""
        done = self.collect(retention=30 * DAY)
        self.assertEqual({parse_chunk_key(self.fs.filespace_id, key) for key in done.deleted}, {self.abandoned})

    def test_a_longer_grace_keeps_the_abandoned_upload(self) -> None:
        done = self.collect(grace=30 * DAY)
        self.assertEqual({parse_chunk_key(self.fs.filespace_id, key) for key in done.deleted}, {self.old_version})

    def test_grace_under_an_hour_refused(self) -> None:
        self.failureResultOf(collect(self.fs.objects, FILESPACE, 7 * DAY, self.now, 60.0), InvalidArgument)
        self.assertEqual(len(self.fs.stored_chunks()), 5)

    def test_dry_run_deletes_nothing(self) -> None:
        done = self.collect(dry_run=True)
        self.assertEqual(len(done.plan.keys), 2)
        self.assertEqual(done.deleted, [])
        self.assertEqual(len(self.fs.stored_chunks()), 5)

    def test_nothing_deleted_when_the_journal_cannot_be_read_to_its_end(self) -> None:
        """A damaged segment: a chunk map past it could name anything, so nothing goes, and it says why."""
        last = max((key for key in self.fs.objects.objects if parse_segment_key(FILESPACE, key)),
                   key=lambda key: parse_segment_key(FILESPACE, key))
        self.fs.objects.objects[last] = b"not a segment"
        done = self.collect()
        self.assertEqual(done.deleted, [])
        self.assertIn("could not be read to its end", done.plan.kept)
        self.assertEqual(len(self.fs.stored_chunks()), 5)

    def test_objects_of_other_filespaces_and_stray_names_untouched(self) -> None:
        """Only this filespace's chunk names are judged."""
        other = chunk_object_key(b"another filespace", b"\x01" * 16)
        stray = chunk_object_key(self.fs.filespace_id, b"") + "not-hex"
        for key in (other, stray):
            self.fs.objects.objects[key] = b"x"
        self.collect()
        self.assertIn(other, self.fs.objects.objects)
        self.assertIn(stray, self.fs.objects.objects)

    def test_refused_delete_is_reported(self) -> None:
        """A credential that may not delete stops the collection with a message saying so."""
        store = FaultyObjectStore(self.fs.objects)
        store.fail_always({"delete"}, lambda operation, key: AccessDenied(f"denied delete of {key!r}"))
        done = self.collect(store)
        self.assertEqual(done.deleted, [])
        self.assertIn("needs the deletion credential", done.error)
        self.assertEqual(len(self.fs.stored_chunks()), 5)


class CollectCommandTests(TestCase):
    """``lucid-meta gc`` on a file:// store."""

    def setUp(self) -> None:
        self.folder = Path(self.mktemp()).resolve()
        self.root = self.folder / "objects"
        self.root.mkdir(parents=True)
        self.config = self.folder / "lucid-meta.ini"
        self.config.write_text(f"[meta]\ndata_dir = data/{{filespace}}\nlisten = tcp:0\nstore = {self.store_url()}\n")
        fs = self.fs = Filespace(self, self.folder)
        inode = fs.create(b"file")
        self.replaced = fs.write(inode)
        self.current = fs.write(inode)
        self.abandoned = fs.upload()
        fs.ship()
        self.publish(fs.objects.objects)

    def store_url(self) -> str:
        """The store the command reads (tests/test_s3_system.py puts the objects into S3 instead)."""
        return self.root.as_uri()

    def publish(self, objects: dict[str, bytes]) -> None:
        """Lay the objects out in ``root``, written two days ago."""
        two_days_ago = time.time() - 2 * DAY
        for key, data in objects.items():
            path = self.root / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            os.utime(path, (two_days_ago, two_days_ago))

    @defer.inlineCallbacks
    def lucid_meta(self, *argv: str) -> Any:
        out, err = io.StringIO(), io.StringIO()
        status = yield cli.run(reactor, list(argv), out, err)
        return status, out.getvalue(), err.getvalue()

    def chunk_files(self) -> set[bytes]:
        """The object ids of the chunks in the store."""
        prefix = self.root / self.fs.filespace_id.hex() / "chunks"
        return {bytes.fromhex(path.name) for path in prefix.iterdir()}

    @defer.inlineCallbacks
    def test_gc_keeps_recent_uploads_then_collects_with_a_short_grace(self) -> None:
        """The replaced chunk goes at once; the upload no map names waits for the grace period (7 days)."""
        status, out, err = yield self.lucid_meta("gc", "--config", str(self.config), "--retention", "1h")
        self.assertEqual((status, err), (0, ""))
        self.assertIn("films: deleted 1 of 1 unneeded chunk objects", out)
        self.assertEqual(self.chunk_files(), {self.current, self.abandoned})

        status, out, err = yield self.lucid_meta("gc", "--config", str(self.config), "--retention", "1h",
                                                 "--grace", "1d", "--dry-run")
        self.assertEqual((status, err), (0, ""))
        self.assertIn("would delete: films: 1 unneeded chunk objects to delete", out)
        self.assertIn("1 in use", out)
        self.assertIn(self.abandoned.hex(), out)
        self.assertEqual(self.chunk_files(), {self.current, self.abandoned})

        status, out, err = yield self.lucid_meta("gc", "--config", str(self.config), "--retention", "1h",
                                                 "--grace", "1d")
        self.assertEqual((status, err), (0, ""))
        self.assertEqual(self.chunk_files(), {self.current})
        status, out, err = yield self.lucid_meta("gc", "--config", str(self.config))
        self.assertIn("films: nothing to delete", out)

    @defer.inlineCallbacks
    def test_unknown_filespace_fails_and_says_so(self) -> None:
        status, out, err = yield self.lucid_meta("gc", "--config", str(self.config), "--filespace", "nothing-here")
        self.assertEqual(status, 1)
        self.assertIn("nothing-here", err)
        self.assertIn("no journal", err)

    @defer.inlineCallbacks
    def test_grace_under_an_hour_refused(self) -> None:
        status, _, err = yield self.lucid_meta("gc", "--config", str(self.config), "--grace", "10m")
        self.assertEqual(status, 1)
        self.assertIn("grace period under 3600 s", err)
        self.assertEqual(self.chunk_files(), {self.replaced, self.current, self.abandoned})
