"""
Snapshots and restore: a database rebuilt from the newest snapshot plus the
later segments equals the original in every row, and a damaged segment stops
the restore at its last good record, saying which.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lucidlink.errors import InvalidArgument
from lucidlink.meta import mutations as m
from lucidlink.meta.journal import Journal
from lucidlink.meta.segments import parse_segment_key
from lucidlink.meta.shipper import Shipper
from lucidlink.meta.snapshots import (
    Manifest,
    Snapshotter,
    catch_up,
    manifest_key,
    restore,
    snapshot_key,
    take_snapshot,
)
from lucidlink.meta.store import ROOT_INODE, MetadataStore
from tests.client_helpers import MemoryObjectStore
from tests.meta_helpers import START_TIME, initialise_record

FILESPACE = "films"


class RestoreTests(SynchronousTestCase):
    """A journalled store shipping to memory, restored into new files."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START_TIME)
        self.folder = Path(self.mktemp())
        self.folder.mkdir()
        self.store = self.open(self.folder / "original.sqlite3")
        self.objects = MemoryObjectStore()
        # max_records=3 so a workload spans several segments.
        self.shipper = Shipper(self.store, self.objects, self.clock, filespace=FILESPACE, durability="async",
                               max_records=3)
        self.successResultOf(self.shipper.start())
        self.addCleanup(lambda: self.shipper.stop())
        self.journal = self.shipper.journal
        self.inodes: list[int] = []

    def open(self, path: Path) -> MetadataStore:
        store = MetadataStore(path, self.clock)
        self.addCleanup(store.close)
        return store

    def work(self, rounds: int) -> None:
        """A mixed workload: directories, files, chunks, xattrs, renames, unlinks, a held orphan."""
        if not self.store.initialised:
            self.store.apply(initialise_record())
        for _ in range(rounds):
            self.clock.advance(1.5)
            n = len(self.inodes)
            directory = self.store.apply(m.MakeDirectory(ROOT_INODE, b"d%d" % n, 0o755, n, 0)).value.inode
            created = self.store.apply(m.CreateFile(directory, b"f", 0o644, 0, 0, True)).value[0].inode
            self.store.apply(m.CommitChunks(created, 0, 3000, ((0, b"obj-%d" % n, 1024, 1024),), 0))
            self.store.apply(m.SetXattr(created, b"user.x", b"v%d" % n, 1))
            self.store.apply(m.Rename(directory, b"f", ROOT_INODE, b"moved%d" % n, 0))
            self.inodes.append(created)
        if self.inodes and not self.store.held(self.inodes[0]):
            self.store.hold(self.inodes[0])
            self.store.apply(m.Unlink(ROOT_INODE, b"moved0"))

    def ship(self) -> None:
        self.clock.advance(self.shipper.ship_interval)
        while self.shipper.pending():
            self.clock.advance(self.shipper.ship_interval)

    def restored(self, name: str = "restored.sqlite3", **options: Any) -> tuple[Any, MetadataStore]:
        target = self.folder / name
        result = self.successResultOf(restore(self.objects, FILESPACE, target, **options))
        store = self.open(target)
        return result, store

    def test_snapshot_plus_segments_equals_original(self) -> None:
        """Restoring from a snapshot taken midway plus every later segment gives the same database and journal."""
        self.work(3)
        self.ship()
        manifest = self.successResultOf(take_snapshot(self.store, self.objects, FILESPACE, self.clock))
        self.assertEqual(manifest.seq, self.journal.head()[0])
        self.work(3)
        self.ship()
        result, store = self.restored()
        self.assertTrue(result.complete, result.summary)
        self.assertEqual(result.snapshot_seq, manifest.seq)
        self.assertEqual((result.seq, result.hash), self.journal.head())
        self.assertEqual(store.dump(), self.store.dump())
        restored_journal = Journal(Clock()).install(store)
        self.assertEqual(restored_journal.entries(), self.journal.entries())
        self.assertEqual(restored_journal.verify(), self.journal.head())

    def test_catch_up_replays_what_a_power_cut_lost(self) -> None:
        """A sound database that lost its last commits gets them back from the store, and nothing else changes."""
        self.work(2)
        self.ship()
        behind = self.folder / "behind.sqlite3"
        self.copy_of_original(behind)
        self.work(3)
        self.ship()
        seq, problem = self.successResultOf(catch_up(self.objects, FILESPACE, behind, self.clock))
        self.assertEqual(problem, "")
        self.assertEqual(seq, self.journal.head()[0])
        store = self.open(behind)
        self.assertEqual(store.dump(), self.store.dump())
        self.assertEqual(Journal(Clock()).install(store).verify(), self.journal.head())

    def test_catch_up_refuses_a_forked_database(self) -> None:
        """A database with a record of its own that the store never held is left at its head, with the reason."""
        self.work(2)
        self.ship()
        forked = self.folder / "forked.sqlite3"
        self.copy_of_original(forked)
        other = self.open(forked)
        Journal(self.clock).install(other)
        other.apply(m.MakeDirectory(ROOT_INODE, b"only-here", 0o755, 0, 0))
        head = Journal(Clock()).install(other).head()
        other.close()
        self.work(2)
        self.ship()
        seq, problem = self.successResultOf(catch_up(self.objects, FILESPACE, forked, self.clock))
        self.assertEqual(seq, head[0])
        self.assertIn("damaged", problem)

    def copy_of_original(self, target: Path) -> None:
        """A consistent copy of the original database as it is now."""
        copy = sqlite3.connect(target)
        try:
            self.store._db.backup(copy)
        finally:
            copy.close()

    def test_segments_alone(self) -> None:
        """Without a snapshot the whole journal is replayed from an empty database."""
        self.work(4)
        self.ship()
        result, store = self.restored()
        self.assertIsNone(result.snapshot_seq)
        self.assertTrue(result.complete)
        self.assertEqual(store.dump(), self.store.dump())

    def test_to_seq(self) -> None:
        """Restoring to a sequence gives the database as it was right after that record."""
        self.work(2)
        self.ship()
        expected_seq = self.journal.head()[0]
        expected = self.store.dump()
        self.successResultOf(take_snapshot(self.store, self.objects, FILESPACE, self.clock))
        self.work(2)
        self.ship()
        self.successResultOf(take_snapshot(self.store, self.objects, FILESPACE, self.clock))
        result, store = self.restored(to_seq=expected_seq - 2)
        self.assertEqual(result.seq, expected_seq - 2)
        result, store = self.restored("exact.sqlite3", to_seq=expected_seq)
        self.assertEqual(result.seq, expected_seq)
        self.assertEqual(result.snapshot_seq, expected_seq)
        self.assertEqual(store.dump(), expected)

    def test_corrupt_segment_stops_at_last_good_record(self) -> None:
        """A damaged segment: the records before the damage are restored, and the message names the sequence."""
        self.work(4)
        self.ship()
        keys = sorted(key for key in self.objects.objects if parse_segment_key(FILESPACE, key))
        self.assertGreater(len(keys), 3)
        victim = keys[2]
        first, _ = parse_segment_key(FILESPACE, victim)  # type: ignore[misc]
        good = first  # the segment's first record survives; its second is damaged
        expected = self.successResultOf(restore(self.objects, FILESPACE, self.folder / "expected.sqlite3",
                                                to_seq=good))
        expected_store = self.open(self.folder / "expected.sqlite3")
        entries = self.journal.entries(after=first)
        data = bytearray(self.objects.objects[victim])
        where = bytes(data).index(entries[0].record)
        data[where + 5] ^= 0x01
        self.objects.objects[victim] = bytes(data)
        result, store = self.restored()
        self.assertFalse(result.complete)
        self.assertEqual(result.seq, good)
        self.assertIn(f"last good record is seq {good}", result.summary)
        self.assertIn("checksum mismatch", result.problem)
        self.assertEqual(store.dump(), expected_store.dump())
        self.assertEqual(expected.seq, good)

    def test_overlapping_segments(self) -> None:
        """Segments that overlap (a put whose answer was lost, then a longer one) restore each record once."""
        from lucidlink.meta.segments import build_segment, segment_key

        self.work(2)
        entries = self.journal.entries()
        for first, last in ((1, 3), (1, 5), (4, 6), (6, len(entries))):
            prev = self.journal.hash_at(first - 1)
            self.objects.objects[segment_key(FILESPACE, first, last)] = build_segment(
                FILESPACE.encode(), prev, entries[first - 1:last])
        result, store = self.restored()
        self.assertTrue(result.complete, result.summary)
        self.assertEqual(store.dump(), self.store.dump())

    def test_missing_segment_stops_the_restore(self) -> None:
        self.work(3)
        self.ship()
        keys = sorted(key for key in self.objects.objects if parse_segment_key(FILESPACE, key))
        first, _ = parse_segment_key(FILESPACE, keys[1])  # type: ignore[misc]
        del self.objects.objects[keys[1]]
        result, _ = self.restored()
        self.assertEqual(result.seq, first - 1)
        self.assertIn(f"no segment holds seq {first}", result.problem)

    def test_unreadable_segment_stops_the_restore(self) -> None:
        """A segment the store cannot give (read ahead with others) stops the restore before it, naming it."""
        from lucidlink.objectstore.faults import FaultyObjectStore

        self.work(3)
        self.ship()
        keys = sorted(key for key in self.objects.objects if parse_segment_key(FILESPACE, key))
        faulty = FaultyObjectStore(self.objects)
        faulty.fail_next(1, {"get"})
        result = self.successResultOf(restore(faulty, FILESPACE, self.folder / "unreadable.sqlite3"))
        self.assertEqual(result.seq, 0)
        self.assertIn(f"cannot read {keys[0]}", result.problem)
        self.assertEqual(len([call for call in faulty.calls if call[0] == "get"]), 4, "read four ahead")

    def test_corrupt_snapshot_falls_back(self) -> None:
        """A snapshot that does not match its manifest is skipped for an older one (or none)."""
        self.work(2)
        self.ship()
        manifest = self.successResultOf(take_snapshot(self.store, self.objects, FILESPACE, self.clock))
        key = snapshot_key(FILESPACE, manifest.seq)
        stored = self.objects.objects[key]
        self.objects.objects[key] = stored[:-1] + bytes([stored[-1] ^ 0xFF])  # changed, whatever it was
        result, store = self.restored()
        self.assertIsNone(result.snapshot_seq)
        self.assertTrue(result.complete)
        self.assertEqual(store.dump(), self.store.dump())

    def test_manifest(self) -> None:
        """The manifest names the snapshot's sequence, chain hash, checksum and size, and is create-only."""
        self.work(1)
        manifest = self.successResultOf(take_snapshot(self.store, self.objects, FILESPACE, self.clock))
        stored = Manifest.from_bytes(self.objects.objects[manifest_key(FILESPACE, manifest.seq)])
        self.assertEqual(stored, manifest)
        self.assertEqual(stored.hash, self.journal.head()[1])
        self.assertEqual(stored.size, len(self.objects.objects[snapshot_key(FILESPACE, manifest.seq)]))
        self.assertIsNone(self.successResultOf(take_snapshot(self.store, self.objects, FILESPACE, self.clock)))

    def test_snapshotter_interval_and_stop(self) -> None:
        """A snapshot every interval when the journal moved, and one at a clean stop."""
        snapshotter = Snapshotter(self.store, self.objects, FILESPACE, self.clock, interval=100)
        snapshotter.start()
        self.work(1)
        self.clock.advance(100)
        self.assertEqual(snapshotter.taken, 1)
        self.clock.advance(100)
        self.assertEqual(snapshotter.taken, 1, "nothing changed")
        self.work(1)
        self.successResultOf(snapshotter.stop())
        self.assertEqual(snapshotter.taken, 2)

    def test_target_must_not_exist(self) -> None:
        (self.folder / "there").write_bytes(b"")
        self.failureResultOf(restore(self.objects, FILESPACE, self.folder / "there"), InvalidArgument)


class ReplayTransactionTests(SynchronousTestCase):
    """A restore replays a segment's records in one transaction: each record is a savepoint of it."""

    def test_refused_mutation_inside_a_transaction_undoes_only_itself(self) -> None:
        from lucidlink.errors import AlreadyExists

        clock = Clock()
        folder = Path(self.mktemp())
        folder.mkdir()
        store = MetadataStore(folder / "db.sqlite3", clock)
        self.addCleanup(store.close)
        store.apply(initialise_record())
        store._db.execute("BEGIN IMMEDIATE")
        store.apply(m.MakeDirectory(ROOT_INODE, b"kept", 0o755, 0, 0))
        with self.assertRaises(AlreadyExists):
            store.apply(m.MakeDirectory(ROOT_INODE, b"kept", 0o755, 0, 0))
        self.assertTrue(store._db.in_transaction, "the caller's transaction is still open")
        store.apply(m.MakeDirectory(ROOT_INODE, b"also", 0o755, 0, 0))
        store._db.execute("COMMIT")
        names = [name for name, _ in store.readdir(ROOT_INODE)[0]]
        self.assertEqual(sorted(names), [b"also", b"kept"])


class ReplayChecksTests(SynchronousTestCase):
    """A replayed record must land at its own sequence and complete to exactly the shipped record."""

    def setUp(self) -> None:
        folder = Path(self.mktemp())
        folder.mkdir()
        self.store = MetadataStore(folder / "db.sqlite3", Clock())
        self.addCleanup(self.store.close)
        self.journal = Journal(Clock()).install(self.store)

    @staticmethod
    def initialise() -> m.Initialise:
        import dataclasses

        return dataclasses.replace(initialise_record(), server_secret=bytes(32), time_ns=5)

    def entry(self, seq: int, record: m.Mutation) -> Any:
        from lucidlink.meta.journal import Entry, chain_hash

        data = m.encode(record)
        return Entry(seq, 5, data, chain_hash(self.journal.head()[1], seq, data))

    def test_shipped_bytes_and_time_are_kept(self) -> None:
        entry = self.entry(1, self.initialise())
        self.journal.replay(entry)
        self.assertEqual(self.journal.entries(), [entry])

    def test_wrong_place_is_refused(self) -> None:
        from lucidlink.meta.journal import ChainError

        with self.assertRaises(ChainError) as caught:
            self.journal.replay(self.entry(2, self.initialise()))
        self.assertIn("replaying seq 2 gave a different record at seq 1", str(caught.exception))
        self.assertEqual(self.journal.head()[0], 0)

    def test_reservation_journaled_before_blocks_were_kept_replays(self) -> None:
        """A ``reserve-inodes`` record shipped without ``client`` and ``time_ns`` completes to itself."""
        import json

        from lucidlink.meta.journal import Entry, chain_hash

        self.journal.replay(self.entry(1, self.initialise()))
        data = json.dumps({"kind": "reserve-inodes", "count": 16, "first": ROOT_INODE + 1},
                          separators=(",", ":"), sort_keys=True).encode("ascii")
        self.assertEqual(m.decode(data), m.ReserveInodes(16, ROOT_INODE + 1))
        entry = Entry(2, 5, data, chain_hash(self.journal.head()[1], 2, data))
        self.journal.replay(entry)
        self.assertEqual(self.journal.entries()[-1], entry)
        made = self.store.apply(m.MakeDirectory(ROOT_INODE, b"d", 0o755, 0, 0))
        self.assertEqual(made.record.inode, ROOT_INODE + 17, "past the block")

    def test_record_completing_differently_is_refused(self) -> None:
        """An unlink shipped without its ``kept`` list completes with one: not the record that was shipped."""
        from lucidlink.meta.journal import ChainError

        self.journal.replay(self.entry(1, self.initialise()))
        made = self.store.apply(m.MakeDirectory(ROOT_INODE, b"d", 0o755, 0, 0))
        self.assertEqual(made.record.inode, ROOT_INODE + 1)
        with self.assertRaises(ChainError):
            self.journal.replay(self.entry(3, m.Rename(ROOT_INODE, b"d", ROOT_INODE, b"e", 0, kept=None,
                                                       time_ns=7)))
        self.assertEqual(self.journal.head()[0], 2)
