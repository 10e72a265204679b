"""
``lucid-meta verify``, ``restore`` and ``restore-all`` against a real
``file://`` object store filled by a journalled, shipping store: what each
finds, what each rebuilds, and what each refuses.
"""

from __future__ import annotations

import io
import os
import sqlite3
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, utils
from twisted.internet.task import Clock
from twisted.trial.unittest import TestCase

from lucidlink.cli import meta as cli
from lucidlink.meta import mutations as m
from lucidlink.meta.segments import parse_segment_key
from lucidlink.meta.shipper import Shipper
from lucidlink.meta.snapshots import take_snapshot
from lucidlink.meta.store import ROOT_INODE, MetadataStore
from tests.client_helpers import MemoryObjectStore
from tests.meta_helpers import START_TIME, initialise_record

FILESPACE = "films"


class Origin:
    """One filespace's original server: a journalled store shipping segments (3 records each) to memory."""

    def __init__(self, test: TestCase, folder: Path, filespace: str) -> None:
        self.filespace = filespace
        self.clock = Clock()
        self.clock.advance(START_TIME)
        self.store = MetadataStore(folder / f"original-{filespace}.sqlite3", self.clock)
        test.addCleanup(self.store.close)
        self.objects = MemoryObjectStore()
        self.shipper = Shipper(self.store, self.objects, self.clock, filespace=filespace, durability="async",
                               max_records=3)
        test.successResultOf(self.shipper.start())
        test.addCleanup(self.shipper.stop)
        self.rounds = 0

    def work(self, rounds: int) -> None:
        """Directories, files with chunks and xattrs, renames; then ship every record."""
        if not self.store.initialised:
            self.store.apply(initialise_record())
        for _ in range(rounds):
            n = self.rounds = self.rounds + 1
            self.clock.advance(1.5)
            directory = self.store.apply(m.MakeDirectory(ROOT_INODE, b"d%d" % n, 0o755, n, 0)).value.inode
            created = self.store.apply(m.CreateFile(directory, b"f", 0o644, 0, 0, True)).value[0].inode
            self.store.apply(m.CommitChunks(created, 0, 3000, ((0, b"obj-%d" % n, 1024, 1024),), 0))
            self.store.apply(m.SetXattr(created, b"user.x", b"v%d" % n, 1))
            self.store.apply(m.Rename(directory, b"f", ROOT_INODE, b"moved%d" % n, 0))
        self.clock.advance(self.shipper.ship_interval)
        while self.shipper.pending():
            self.clock.advance(self.shipper.ship_interval)

    def snapshot(self) -> None:
        self.clock.advance(1)
        take_snapshot(self.store, self.objects, self.filespace, self.clock)

    def publish(self, root: Path) -> None:
        """Copy every object into the file:// store at ``root`` (one file per key, as the local store keeps them)."""
        for key, data in self.objects.objects.items():
            path = root / key
            if not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(data)

    def segment_keys(self) -> list[str]:
        return sorted(key for key in self.objects.objects if parse_segment_key(self.filespace, key))


class LucidMetaTests(TestCase):
    """The commands, run in-process on trial's reactor through :func:`lucidlink.cli.meta.run`."""

    def setUp(self) -> None:
        self.folder = Path(self.mktemp()).resolve()
        self.root = self.folder / "objects"
        self.root.mkdir(parents=True)
        self.config = self.write_config("data/{filespace}")
        self.origin = Origin(self, self.folder, FILESPACE)

    def write_config(self, data_dir: str, name: str = "lucid-meta.ini") -> Path:
        path = self.folder / name
        path.write_text(f"[meta]\ndata_dir = {data_dir}\nlisten = tcp:0\nstore = {self.store_url()}\n")
        return path

    def store_url(self) -> str:
        """The store the commands read (tests/test_s3_system.py mirrors ``root`` into S3 instead)."""
        return self.root.as_uri()

    def data_dir(self, filespace: str = FILESPACE) -> Path:
        return self.folder / "data" / filespace

    @defer.inlineCallbacks
    def lucid_meta(self, *argv: str) -> Any:
        """Run ``lucid-meta argv``; fires with (status, stdout, stderr)."""
        out, err = io.StringIO(), io.StringIO()
        status = yield cli.run(reactor, list(argv), out, err)
        return status, out.getvalue(), err.getvalue()

    def fs_args(self, filespace: str = FILESPACE) -> list[str]:
        return ["--filespace", filespace, "--config", str(self.config)]

    def healthy(self, rounds: int = 3) -> None:
        self.origin.work(rounds)
        self.origin.snapshot()
        self.origin.work(2)
        self.origin.publish(self.root)

    def open_restored(self, filespace: str = FILESPACE) -> MetadataStore:
        store = MetadataStore(self.data_dir(filespace) / "metadata.sqlite3", Clock())
        self.addCleanup(store.close)
        return store

    @defer.inlineCallbacks
    def test_restore_into_empty_folder(self) -> Any:
        """A restore into an empty data folder gives the original database, row for row."""
        self.healthy()
        status, out, err = yield self.lucid_meta("restore", *self.fs_args())
        self.assertEqual((status, err), (0, ""))
        head = self.origin.shipper.journal.head()[0]
        self.assertIn(f"{FILESPACE}: restored to seq {head} from snapshot at seq", out)
        self.assertEqual(self.open_restored().dump(), self.origin.store.dump())

    @defer.inlineCallbacks
    def test_verify_healthy(self) -> Any:
        """After a restore, verify finds every check passing and exits 0."""
        self.healthy()
        yield self.lucid_meta("restore", *self.fs_args())
        status, out, err = yield self.lucid_meta("verify", *self.fs_args())
        self.assertEqual((status, err), (0, ""), out)
        head = self.origin.shipper.journal.head()[0]
        self.assertIn("passes quick_check", out)
        self.assertIn(f"journal chain verifies from seq 1 to {head}", out)
        self.assertIn("newest snapshot at seq", out)
        self.assertIn(f"hold seq 1 to {head}; each parses and they chain without gaps", out)
        self.assertIn(f"both at seq {head} with the same hash", out)
        self.assertEqual(out.splitlines()[-1], f"{FILESPACE}: all is well")
        self.assertNotIn("PROBLEM", out)

    @defer.inlineCallbacks
    def test_verify_names_corrupt_segment(self) -> Any:
        """A damaged segment is named, and the exit status and last line say there are problems."""
        self.healthy()
        yield self.lucid_meta("restore", *self.fs_args())
        victim = self.origin.segment_keys()[1]
        path = self.root / victim
        data = bytearray(path.read_bytes())
        data[-40] ^= 0x01
        path.write_bytes(bytes(data))
        status, out, err = yield self.lucid_meta("verify", *self.fs_args())
        self.assertEqual(status, 1)
        self.assertIn(f"PROBLEM: store: segment {victim} is damaged: checksum mismatch", out)
        self.assertIn(f"lucid-meta: {FILESPACE}: ", err)
        self.assertIn("problems found", err)

    @defer.inlineCallbacks
    def test_verify_local_behind_store(self) -> Any:
        """A local database that misses records the store holds is said to trail it, by how many."""
        self.origin.work(2)
        self.origin.publish(self.root)
        yield self.lucid_meta("restore", *self.fs_args())
        behind = self.origin.shipper.journal.head()[0]
        self.origin.work(1)
        self.origin.publish(self.root)
        head = self.origin.shipper.journal.head()[0]
        status, out, err = yield self.lucid_meta("verify", *self.fs_args())
        self.assertEqual(status, 1)
        self.assertIn(f"the local database trails the store: local seq {behind}, store seq {head}", out)
        self.assertIn("1 problem found", err)

    @defer.inlineCallbacks
    def test_verify_missing_database(self) -> Any:
        self.healthy()
        status, out, _ = yield self.lucid_meta("verify", *self.fs_args())
        self.assertEqual(status, 1)
        self.assertIn(f"PROBLEM: local: no database at {self.data_dir() / 'metadata.sqlite3'}", out)

    @defer.inlineCallbacks
    def test_restore_refuses_while_database_open(self) -> Any:
        """A database a server holds open (locked) is never replaced, even with --force."""
        self.healthy()
        yield self.lucid_meta("restore", *self.fs_args())
        self.open_restored()
        status, _, err = yield self.lucid_meta("restore", "--force", *self.fs_args())
        self.assertEqual(status, 1)
        self.assertIn("a server is running on", err)
        self.assertIn("is in use (locked)", err)

    @defer.inlineCallbacks
    def test_restore_refuses_with_live_pidfile(self) -> Any:
        """A twistd.pid naming a live process stops the restore; a stale one does not."""
        self.healthy()
        self.data_dir().mkdir(parents=True)
        (self.data_dir() / "twistd.pid").write_text(f"{os.getpid()}\n")
        status, _, err = yield self.lucid_meta("restore", *self.fs_args())
        self.assertEqual(status, 1)
        self.assertIn(f"process {os.getpid()} in", err)
        (self.data_dir() / "twistd.pid").write_text("999999999\n")
        status, _, err = yield self.lucid_meta("restore", *self.fs_args())
        self.assertEqual((status, err), (0, ""))

    @defer.inlineCallbacks
    def test_restore_keeps_healthy_database_without_force(self) -> Any:
        """A healthy database is replaced only with --force, and then kept beside."""
        self.healthy()
        yield self.lucid_meta("restore", *self.fs_args())
        status, _, err = yield self.lucid_meta("restore", *self.fs_args())
        self.assertEqual(status, 1)
        self.assertIn("passes quick_check; give --force", err)
        status, out, err = yield self.lucid_meta("restore", "--force", *self.fs_args())
        self.assertEqual((status, err), (0, ""))
        kept = [p.name for p in self.data_dir().iterdir()
                if ".before-restore-" in p.name and not p.name.endswith(("-wal", "-shm"))]
        self.assertEqual(len(kept), 1, kept)
        self.assertIn("previous database is kept as", out)
        self.assertEqual(self.open_restored().dump(), self.origin.store.dump())

    @defer.inlineCallbacks
    def test_corrupt_segment_stops_restore(self) -> Any:
        """A damaged segment: the restore stops at its last good record and the exit status says so."""
        self.origin.work(3)
        victim = self.origin.segment_keys()[2]
        _, last = parse_segment_key(FILESPACE, victim)  # type: ignore[misc]
        data = bytearray(self.origin.objects.objects[victim])
        data[-40] ^= 0x01  # inside the last record's hash: the records before it still chain
        self.origin.objects.objects[victim] = bytes(data)
        self.origin.publish(self.root)
        status, out, err = yield self.lucid_meta("restore", *self.fs_args())
        self.assertEqual(status, 1)
        self.assertIn("stopped there", out)
        self.assertIn(f"the restore stopped at seq {last - 1}", err)
        self.assertIn(victim, err)

    @defer.inlineCallbacks
    def test_restore_to_seq(self) -> Any:
        self.origin.work(2)
        expected = self.origin.store.dump()
        seq = self.origin.shipper.journal.head()[0]
        self.origin.work(2)
        self.origin.publish(self.root)
        status, out, _ = yield self.lucid_meta("restore", "--to-seq", str(seq), *self.fs_args())
        self.assertEqual(status, 0)
        self.assertIn(f"restored to seq {seq}", out)
        self.assertEqual(self.open_restored().dump(), expected)

    @defer.inlineCallbacks
    def test_restore_to_time(self) -> Any:
        """--to-time restores to the last record written at or before that moment (ISO 8601, UTC by default)."""
        self.origin.work(2)
        expected = self.origin.store.dump()
        seq = self.origin.shipper.journal.head()[0]
        moment = datetime.fromtimestamp(self.origin.clock.seconds() + 0.5, UTC)
        self.origin.clock.advance(60)
        self.origin.work(2)
        self.origin.snapshot()
        self.origin.publish(self.root)
        status, out, err = yield self.lucid_meta("restore", "--to-time", moment.isoformat(), *self.fs_args())
        self.assertEqual((status, err), (0, ""), out)
        self.assertIn(f"is seq {seq}", out)
        self.assertEqual(self.open_restored().dump(), expected)
        status, _, err = yield self.lucid_meta("restore", "--force", "--to-time", "2001-01-01T00:00:00",
                                               *self.fs_args())
        self.assertEqual(status, 1)
        self.assertIn("no journal record was written at or before 2001-01-01T00:00:00Z", err)

    @defer.inlineCallbacks
    def test_restore_all(self) -> Any:
        """Three filespaces in one store: each restored into its own folder, each named in the table."""
        origins = {FILESPACE: self.origin}
        for name in ("news", "archive"):
            origins[name] = Origin(self, self.folder, name)
        for rounds, origin in enumerate(origins.values(), start=1):
            origin.work(rounds)
            origin.publish(self.root)
        # Chunk objects of other filespaces (keyed by filespace id) are not filespaces.
        (self.root / "00ff" / "chunks").mkdir(parents=True)
        (self.root / "00ff" / "chunks" / "x").write_bytes(b"chunk")
        status, out, err = yield self.lucid_meta("restore-all", "--parallel", "2", "--config", str(self.config))
        self.assertEqual((status, err), (0, ""), out)
        lines = out.splitlines()
        self.assertEqual(lines[0].split(), ["FILESPACE", "SEQ", "ENTRIES", "SECONDS", "ERROR"])
        for name, origin in origins.items():
            row = next(line.split() for line in lines if line.startswith(name + " "))
            self.assertEqual(row[1], str(origin.shipper.journal.head()[0]))
            self.assertEqual(int(row[2]), len(origin.store.dump()["inodes"]))
            self.assertEqual(row[4], "-")
            self.assertEqual(self.open_restored(name).dump(), origin.store.dump())
        self.assertEqual(lines[-1], "restored 3 filespaces")

    @defer.inlineCallbacks
    def test_restore_all_only(self) -> Any:
        """--only restores the named filespaces alone; a name the store does not hold is refused."""
        other = Origin(self, self.folder, "news")
        for origin in (self.origin, other):
            origin.work(1)
            origin.publish(self.root)
        status, out, _ = yield self.lucid_meta("restore-all", "--only", "news", "--config", str(self.config))
        self.assertEqual(status, 0, out)
        self.assertTrue((self.data_dir("news") / "metadata.sqlite3").exists())
        self.assertFalse(self.data_dir().exists())
        status, _, err = yield self.lucid_meta("restore-all", "--only", "absent", "--config", str(self.config))
        self.assertEqual(status, 1)
        self.assertIn("no journal segments or snapshots of absent", err)

    @defer.inlineCallbacks
    def test_restore_all_reports_failures(self) -> Any:
        """One filespace failing does not stop the others; the table and the exit status say which."""
        other = Origin(self, self.folder, "news")
        self.origin.work(1)
        other.work(1)
        self.origin.publish(self.root)
        other.publish(self.root)
        self.data_dir("news").mkdir(parents=True)
        (self.data_dir("news") / "twistd.pid").write_text(f"{os.getpid()}\n")
        status, out, err = yield self.lucid_meta("restore-all", "--config", str(self.config))
        self.assertEqual(status, 1)
        self.assertIn("a server is running", out)
        self.assertIn("1 of 2 filespaces did not restore fully: news", err)
        self.assertTrue((self.data_dir() / "metadata.sqlite3").exists())

    @defer.inlineCallbacks
    def test_restore_all_needs_filespace_in_data_dir(self) -> Any:
        self.origin.work(1)
        self.origin.publish(self.root)
        config = self.write_config("data/shared", "shared.ini")
        status, _, err = yield self.lucid_meta("restore-all", "--config", str(config))
        self.assertEqual(status, 1)
        self.assertIn("restore-all needs {filespace} in it", err)

    @defer.inlineCallbacks
    def test_config_without_store(self) -> Any:
        self.config.write_text("[meta]\ndata_dir = data/{filespace}\n")
        status, _, err = yield self.lucid_meta("verify", *self.fs_args())
        self.assertEqual(status, 1)
        self.assertIn("store: missing", err)

    @defer.inlineCallbacks
    def test_verify_subprocess(self) -> Any:
        """The installed ``lucid-meta verify`` runs as its own process, on its own reactor."""
        self.healthy()
        yield self.lucid_meta("restore", *self.fs_args())
        script = Path(sys.executable).parent / "lucid-meta"
        command, argv = (str(script), []) if script.exists() else (sys.executable, ["-m", "lucidlink.cli.meta"])
        out, err, code = yield utils.getProcessOutputAndValue(
            command, argv + ["verify", *self.fs_args()], env=dict(os.environ))
        self.assertEqual(code, 0, (out, err))
        self.assertIn(b"films: all is well", out)
        db = sqlite3.connect(str(self.data_dir() / "metadata.sqlite3"))
        db.execute("DELETE FROM journal WHERE seq = (SELECT max(seq) FROM journal)")
        db.commit()
        db.close()
        out, err, code = yield utils.getProcessOutputAndValue(
            command, argv + ["verify", *self.fs_args()], env=dict(os.environ))
        self.assertEqual(code, 1)
        self.assertIn(b"trails the store", out)
        self.assertTrue(err.startswith(b"lucid-meta: films: 1 problem found"), err)
