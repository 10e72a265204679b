"""
Retention and pruning: what a pruned store still restores (now, and any
moment in the window), what pruning leaves alone (the newest good snapshot
and the records after it; everything when the newest snapshot is damaged),
and how it behaves when the store will not delete.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lucidlink.cli import meta as cli
from lucidlink.errors import AccessDenied, InvalidArgument
from lucidlink.meta.config import ConfigError, load_config, parse_duration
from lucidlink.meta.prune import plan_prune, prune
from lucidlink.meta.segments import parse_segment_key
from lucidlink.meta.snapshots import Snapshotter, manifest_key, restore, seq_at_time, snapshot_key
from lucidlink.meta.store import MetadataStore
from lucidlink.objectstore.faults import FaultyObjectStore
from lucidlink.objectstore.local import LocalObjectStore
from tests.test_cli_meta import Origin
from tests.test_meta_tap import FILESPACE as TAP_FILESPACE
from tests.test_meta_tap import make_certificates, write_config

FILESPACE = "films"
DAY = 86400.0
WEEK = 7 * DAY


class History:
    """A filespace with three snapshots three days apart and records after the last, all in memory."""

    def __init__(self, test: Any, folder: Path) -> None:
        self.test = test
        self.folder = folder
        self.origin = Origin(test, folder, FILESPACE)
        self.snapshots: list[tuple[int, float]] = []
        """(seq, time) of each snapshot taken."""
        self.moments: list[tuple[float, int, dict[str, Any]]] = []
        """(time, seq, dump) after each round of work."""
        for _ in range(3):
            self.work()
            self.snapshot()
            self.origin.clock.advance(3 * DAY)
        self.work()
        self.origin.clock.advance(DAY)
        self.work()

    @property
    def clock(self) -> Clock:
        return self.origin.clock

    @property
    def objects(self) -> dict[str, bytes]:
        return self.origin.objects.objects

    def work(self) -> None:
        self.origin.work(2)
        self.moments.append((self.clock.seconds(), self.origin.shipper.head(), self.origin.store.dump()))

    def snapshot(self) -> None:
        self.origin.snapshot()
        self.snapshots.append((self.origin.shipper.head(), self.clock.seconds()))

    def segment_spans(self) -> list[tuple[int, int]]:
        return sorted(span for key in self.objects if (span := parse_segment_key(FILESPACE, key)))

    def restore(self, name: str, object_store: Any = None, **options: Any) -> tuple[Any, dict[str, Any]]:
        target = self.folder / name
        result = self.test.successResultOf(restore(object_store or self.origin.objects, FILESPACE, target, **options))
        store = MetadataStore(target, Clock())
        try:
            return result, store.dump()
        finally:
            store.close()


class PruneTests(SynchronousTestCase):
    """Pruning a store in memory, on a task.Clock."""

    def setUp(self) -> None:
        self.folder = Path(self.mktemp())
        self.folder.mkdir()
        self.history = History(self, self.folder)
        self.now = self.history.clock.seconds()

    def prune(self, retention: float = WEEK, store: Any = None, **options: Any) -> Any:
        return self.successResultOf(prune(store or self.history.origin.objects, FILESPACE, retention, self.now,
                                          **options))

    def test_deletes_what_the_window_does_not_need(self) -> None:
        """With a week kept, the anchor is the newest snapshot older than a week: older history goes."""
        (old_seq, _), (anchor_seq, anchor_time), (newest_seq, _) = self.history.snapshots
        self.assertLess(anchor_time, self.now - WEEK)  # taken 7 days and some seconds ago
        before = set(self.history.objects)
        done = self.prune()
        self.assertEqual(done.error, "")
        self.assertEqual(done.plan.anchor.seq, anchor_seq)
        self.assertEqual(done.plan.newest.seq, newest_seq)
        gone = before - set(self.history.objects)
        self.assertEqual(gone, set(done.deleted))
        self.assertEqual(gone, {manifest_key(FILESPACE, old_seq), snapshot_key(FILESPACE, old_seq)} | {
            key for key in before if (span := parse_segment_key(FILESPACE, key)) and span[1] <= anchor_seq})
        self.assertTrue(all(last > anchor_seq for _, last in self.history.segment_spans()))
        self.assertEqual(self.history.segment_spans()[0][0], anchor_seq + 1)
        self.assertIn(f"restorable from seq {anchor_seq}", done.summary)
        self.assertEqual(self.prune().deleted, [], "a second run finds nothing more")

    def test_restore_to_now_after_pruning(self) -> None:
        """Whatever the retention, a pruned store restores to its head, equal to the original."""
        for retention in (1.0, DAY, 3 * DAY, WEEK, 30 * DAY):
            self.prune(retention)
            result, dump = self.history.restore(f"now-{retention}.sqlite3")
            self.assertTrue(result.complete, result.summary)
            self.assertEqual(result.seq, self.history.origin.shipper.head())
            self.assertEqual(dump, self.history.origin.store.dump())
        self.assertEqual(result.snapshot_seq, self.history.snapshots[-1][0])

    def test_restore_to_a_time_in_the_window(self) -> None:
        """Every moment after the cutoff can still be restored, to the exact database of that moment."""
        self.prune()
        cutoff = self.now - WEEK
        inside = [moment for moment in self.history.moments if moment[0] >= cutoff]
        self.assertGreaterEqual(len(inside), 3)
        for index, (moment, seq, dump) in enumerate(inside):
            found = self.successResultOf(seq_at_time(self.history.origin.objects, FILESPACE,
                                                     int((moment + 0.5) * 1e9)))
            self.assertEqual(found, seq)
            result, restored = self.history.restore(f"moment-{index}.sqlite3", to_seq=found)
            self.assertTrue(result.complete, result.summary)
            self.assertEqual(restored, dump)
        # The cutoff itself is the anchor snapshot's state.
        anchor_seq = self.history.snapshots[1][0]
        self.assertEqual(self.successResultOf(seq_at_time(self.history.origin.objects, FILESPACE,
                                                          int(cutoff * 1e9))), anchor_seq)

    def test_before_the_window_is_refused_clearly(self) -> None:
        """A moment older than every snapshot left, once its segments are gone, is named as outside the window."""
        self.prune(DAY)
        failure = self.failureResultOf(seq_at_time(self.history.origin.objects, FILESPACE,
                                                   int(self.history.moments[0][0] * 1e9)), InvalidArgument)
        self.assertIn("before the retention window", str(failure.value))

    def test_damaged_newest_snapshot_deletes_nothing(self) -> None:
        """The newest snapshot is damaged: nothing goes, and restore falls back to an older good one."""
        newest_seq = self.history.snapshots[-1][0]
        key = snapshot_key(FILESPACE, newest_seq)
        stored = self.history.objects[key]
        self.history.objects[key] = stored[:-1] + bytes([stored[-1] ^ 0xFF])  # changed, whatever it was
        before = dict(self.history.objects)
        done = self.prune(1.0)
        self.assertEqual(done.deleted, [])
        self.assertTrue(done.plan.damaged)
        self.assertIn(f"the newest snapshot, at seq {newest_seq}, is damaged", done.summary)
        self.assertEqual(self.history.objects, before)
        result, dump = self.history.restore("fallback.sqlite3")
        self.assertTrue(result.complete, result.summary)
        self.assertEqual(result.snapshot_seq, self.history.snapshots[1][0])
        self.assertEqual(dump, self.history.origin.store.dump())

    def test_damaged_anchor_falls_back_to_an_older_one(self) -> None:
        """A damaged snapshot cannot anchor the window: the next older good one does, and keeps its segments."""
        anchor_seq = self.history.snapshots[1][0]
        key = snapshot_key(FILESPACE, anchor_seq)
        self.history.objects[key] = b"not a snapshot"
        done = self.prune()
        self.assertEqual(done.plan.anchor.seq, self.history.snapshots[0][0])
        self.assertNotIn(key, done.deleted)
        self.assertTrue(all(last > self.history.snapshots[0][0] for _, last in self.history.segment_spans()))
        result, restored = self.history.restore("older-anchor.sqlite3", to_seq=anchor_seq)
        self.assertEqual(restored, next(dump for _, seq, dump in self.history.moments if seq == anchor_seq))

    def test_nothing_older_than_the_window(self) -> None:
        """No snapshot is older than the retention: every object stays."""
        before = set(self.history.objects)
        done = self.prune(30 * DAY)
        self.assertEqual(done.deleted, [])
        self.assertFalse(done.plan.damaged)
        self.assertIn("no good snapshot was taken before", done.summary)
        self.assertEqual(set(self.history.objects), before)

    def test_no_snapshot_at_all(self) -> None:
        for seq, _ in self.history.snapshots:
            del self.history.objects[manifest_key(FILESPACE, seq)]
        done = self.prune(1.0)
        self.assertEqual(done.deleted, [])
        self.assertIn("no snapshot yet", done.summary)

    def test_gap_after_the_anchor_deletes_nothing(self) -> None:
        """The segment after the anchor is missing: the window cannot be restored, so nothing is deleted."""
        anchor_seq = self.history.snapshots[1][0]
        after = next(key for key in sorted(self.history.objects)
                     if (span := parse_segment_key(FILESPACE, key)) and span[0] <= anchor_seq + 1 <= span[1])
        del self.history.objects[after]
        before = set(self.history.objects)
        done = self.prune()
        self.assertEqual(done.deleted, [])
        self.assertTrue(done.plan.damaged)
        self.assertIn(f"no segment holds seq {anchor_seq + 1}", done.summary)
        self.assertEqual(set(self.history.objects), before)

    def test_dry_run(self) -> None:
        before = set(self.history.objects)
        done = self.prune(dry_run=True)
        self.assertEqual(done.deleted, [])
        self.assertGreater(len(done.plan.keys), 2)
        self.assertEqual(set(self.history.objects), before)
        self.assertEqual(set(self.prune().deleted), set(done.plan.keys))

    def test_manifests_go_before_their_snapshots_and_old_before_new(self) -> None:
        keys = self.successResultOf(plan_prune(self.history.origin.objects, FILESPACE, WEEK, self.now)).keys
        old_seq = self.history.snapshots[0][0]
        self.assertLess(keys.index(manifest_key(FILESPACE, old_seq)), keys.index(snapshot_key(FILESPACE, old_seq)))
        segments = [parse_segment_key(FILESPACE, key) for key in keys if parse_segment_key(FILESPACE, key)]
        self.assertEqual(segments, sorted(segments))

    def test_store_refusing_deletes(self) -> None:
        """Without the deletion credential: nothing is deleted, the error says why, restores still work."""
        faulty = FaultyObjectStore(self.history.origin.objects)
        faulty.fail_always({"delete"}, lambda operation, key: AccessDenied(f"the object store denied delete of {key!r}"))
        before = set(self.history.objects)
        done = self.prune(store=faulty)
        self.assertEqual(done.deleted, [])
        self.assertIn("pruning needs the deletion credential", done.error)
        self.assertIn("stopped:", done.summary)
        self.assertEqual(set(self.history.objects), before)
        result, dump = self.history.restore("denied.sqlite3")
        self.assertEqual(dump, self.history.origin.store.dump())

    def test_store_failing_half_way(self) -> None:
        """A delete that fails after some succeeded leaves a store that still restores in the window."""
        faulty = FaultyObjectStore(self.history.origin.objects)
        faulty.fail_next(1, {"delete"})
        faulty.fail_next(1, {"delete"})  # the first delete goes through only once the first fault is spent
        done = self.prune(store=faulty)
        self.assertIn("deleting failed", done.error)
        result, dump = self.history.restore("half.sqlite3")
        self.assertEqual(dump, self.history.origin.store.dump())
        self.assertEqual(self.prune().error, "")


class SnapshotterPruneTests(SynchronousTestCase):
    """The server prunes after each snapshot when told to."""

    def test_prunes_after_snapshot(self) -> None:
        folder = Path(self.mktemp())
        folder.mkdir()
        history = History(self, folder)
        origin = history.origin
        snapshotter = Snapshotter(origin.store, origin.objects, FILESPACE, origin.clock, interval=DAY,
                                  prune_retention=3 * DAY)
        snapshotter.start()
        origin.work(1)
        origin.clock.advance(DAY)
        self.assertEqual(snapshotter.taken, 1)
        self.assertEqual(snapshotter.last_pruned.plan.anchor.seq, history.snapshots[-1][0])
        self.assertNotIn(manifest_key(FILESPACE, history.snapshots[0][0]), history.objects)
        origin.work(1)
        self.successResultOf(snapshotter.stop())
        self.assertEqual(snapshotter.taken, 2)
        result, dump = history.restore("served.sqlite3")
        self.assertEqual(dump, origin.store.dump())


class DurationTests(SynchronousTestCase):
    def test_units(self) -> None:
        self.assertEqual(parse_duration("7d"), WEEK)
        self.assertEqual(parse_duration("36h"), 36 * 3600)
        self.assertEqual(parse_duration("90m"), 5400)
        self.assertEqual(parse_duration(" 3600 "), 3600)
        self.assertEqual(parse_duration("1.5D"), 1.5 * DAY)

    def test_bad(self) -> None:
        for text in ("", "d", "seven days", "-1d", "0", "inf", "7w"):
            with self.assertRaises(ValueError, msg=text):
                parse_duration(text)


class RetentionConfigTests(SynchronousTestCase):
    """The ``retention`` and ``prune`` keys of lucid-meta.ini."""

    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.directory.mkdir()
        make_certificates(self.directory)

    def load(self, **keys: Any) -> Any:
        return load_config(write_config(self.directory, **keys), TAP_FILESPACE)

    def test_defaults_and_values(self) -> None:
        config = self.load(store="file:///srv/objects")
        self.assertEqual((config.retention, config.prune), (WEEK, False))
        config = self.load(store="file:///srv/objects", retention="35d", prune="true")
        self.assertEqual((config.retention, config.prune), (35 * DAY, True))

    def test_refusals(self) -> None:
        for keys, expected in (
            ({"store": "file:///srv/o", "retention": "forever"}, "[meta] retention: 'forever' is not a duration"),
            ({"store": "file:///srv/o", "retention": "0d"}, "[meta] retention: 0d must be more than zero"),
            ({"store": "file:///srv/o", "prune": "sometimes"}, "[meta] prune: 'sometimes' is not true or false"),
            ({"prune": "yes"}, "[meta] prune: true needs `store`"),
        ):
            with self.assertRaises(ConfigError) as caught:
                self.load(**keys)
            self.assertIn(expected, str(caught.exception))


class PruneCommandTests(TestCase):
    """``lucid-meta prune`` on a file:// store, on trial's reactor."""

    def setUp(self) -> None:
        self.folder = Path(self.mktemp()).resolve()
        self.root = self.folder / "objects"
        self.root.mkdir(parents=True)
        self.config = self.folder / "lucid-meta.ini"
        self.config.write_text(f"[meta]\ndata_dir = data/{{filespace}}\nstore = {self.root.as_uri()}\n"
                               "retention = 7d\n")
        self.history = History(self, self.folder)
        self.history.origin.publish(self.root)
        # The store's "now" is the reactor's; shift the history so its last record was written a moment ago.
        self.shift = reactor.seconds() - self.history.clock.seconds()

    @defer.inlineCallbacks
    def lucid_meta(self, *argv: str) -> Any:
        out, err = io.StringIO(), io.StringIO()
        status = yield cli.run(reactor, list(argv), out, err)
        return status, out.getvalue(), err.getvalue()

    def retention_for(self, days: float) -> str:
        """The --retention that puts the cutoff ``days`` before the history's end, whatever the reactor's time."""
        return f"{self.shift + days * DAY:.0f}"

    @defer.inlineCallbacks
    def test_dry_run_then_prune_then_restore_to_a_time(self) -> None:
        before = sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file())
        status, out, err = yield self.lucid_meta("prune", "--config", str(self.config), "--dry-run",
                                                 "--retention", self.retention_for(7))
        self.assertEqual((status, err), (0, ""))
        self.assertIn("would delete: films:", out)
        listed = [line.strip() for line in out.splitlines() if line.startswith("  ")]
        self.assertIn(manifest_key(FILESPACE, self.history.snapshots[0][0]), listed)
        self.assertEqual(sorted(p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()),
                         before)

        status, out, err = yield self.lucid_meta("prune", "--config", str(self.config), "-f", FILESPACE,
                                                 "--retention", self.retention_for(7))
        self.assertEqual((status, err), (0, ""))
        self.assertIn(f"deleted {len(listed)} of {len(listed)} objects", out)
        for key in listed:
            self.assertFalse((self.root / key).exists(), key)

        moment, seq, dump = self.history.moments[-2]
        when = _iso(moment + 0.5)
        status, out, err = yield self.lucid_meta("restore", "--filespace", FILESPACE, "--config", str(self.config),
                                                 "--to-time", when)
        self.assertEqual((status, err), (0, ""), out)
        self.assertIn(f"is seq {seq}", out)
        store = MetadataStore(self.folder / "data" / FILESPACE / "metadata.sqlite3", Clock())
        self.addCleanup(store.close)
        self.assertEqual(store.dump(), dump)

    @defer.inlineCallbacks
    def test_verify_after_pruning(self) -> None:
        """A pruned store restores to its head, and verify finds nothing wrong with either."""
        status, out, err = yield self.lucid_meta("prune", "--config", str(self.config),
                                                 "--retention", self.retention_for(1))
        self.assertEqual((status, err), (0, ""), out)
        self.assertIn("deleted", out)
        args = ["--filespace", FILESPACE, "--config", str(self.config)]
        status, out, err = yield self.lucid_meta("restore", *args)
        self.assertEqual((status, err), (0, ""), out)
        status, out, err = yield self.lucid_meta("verify", *args)
        self.assertEqual((status, err), (0, ""), out)
        self.assertIn("films: all is well", out)

    @defer.inlineCallbacks
    def test_refused_delete_on_a_local_store(self) -> None:
        """A file:// store that will not delete: nothing deleted, the error names the credential."""
        local = LocalObjectStore(self.root, reactor)
        self.addCleanup(local.close)
        faulty = FaultyObjectStore(local)
        faulty.fail_always({"delete"}, lambda operation, key: AccessDenied(f"denied delete of {key!r}"))
        done = yield prune(faulty, FILESPACE, float(self.retention_for(7)), reactor.seconds())
        self.assertIn("deletion credential", done.error)
        self.assertEqual(done.deleted, [])

    @defer.inlineCallbacks
    def test_bad_retention(self) -> None:
        self.config.write_text(f"[meta]\nstore = {self.root.as_uri()}\nretention = a week\n")
        status, out, err = yield self.lucid_meta("prune", "--config", str(self.config))
        self.assertEqual(status, 1)
        self.assertIn("retention: 'a week' is not a duration", err)


def _iso(seconds: float) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(seconds, UTC).isoformat()
