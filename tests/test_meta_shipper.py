"""
Shipping the journal: group commit, sync writes answered only once stored,
an unreachable store failing writes with Unavailable while reads go on, and
shipping resuming by itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lucidlink import errors
from lucidlink.meta import mutations as m
from lucidlink.meta.segments import parse_segment, parse_segment_key, segment_prefix
from lucidlink.meta.shipper import Shipper
from lucidlink.meta.store import ROOT_INODE, MetadataStore
from lucidlink.objectstore.faults import FaultyObjectStore
from lucidlink.protocol.messages import ClientId, Create, GetAttr, Lookup, MkDir, Notify
from tests.client_helpers import MemoryObjectStore
from tests.meta_helpers import START_TIME, initialise_record
from tests.test_meta_service import FILESPACE, O_WRONLY, InitialisedTestCase

WINDOW = 0.005


def segment_puts(objects: FaultyObjectStore) -> list[str]:
    """The segment keys put so far."""
    return [key for operation, key in objects.calls if operation == "put" and "/journal/" in key]


def stored_chain(memory: MemoryObjectStore, filespace: str) -> list[int]:
    """Every sequence in the stored segments, in key order, each segment fully checked."""
    seqs: list[int] = []
    for key in sorted(memory.objects):
        if parse_segment_key(filespace, key) is not None:
            seqs.extend(entry.seq for entry in parse_segment(memory.objects[key]).entries)
    return seqs


class ShipperTests(SynchronousTestCase):
    """The shipper on its own, over a store and a faulty in-memory object store."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START_TIME)
        folder = Path(self.mktemp())
        folder.mkdir()
        self.store = MetadataStore(folder / "metadata.sqlite3", self.clock)
        self.addCleanup(self.store.close)
        self.memory = MemoryObjectStore()
        self.objects = FaultyObjectStore(self.memory, self.clock)

    def shipper(self, **options: Any) -> Shipper:
        shipper = Shipper(self.store, self.objects, self.clock, filespace=FILESPACE, group_window=WINDOW, **options)
        self.successResultOf(shipper.start())
        self.addCleanup(lambda: shipper.stop())
        return shipper

    def mkdir(self, name: bytes) -> None:
        self.store.apply(m.MakeDirectory(ROOT_INODE, name, 0o755, 0, 0))

    def test_group_commit(self) -> None:
        """Several mutations waiting within the window share one upload, and all are answered by it."""
        shipper = self.shipper()
        self.store.apply(initialise_record())
        waits = [shipper.durable()]
        for name in (b"a", b"b", b"c"):
            self.mkdir(name)
            waits.append(shipper.durable())
        self.assertEqual(segment_puts(self.objects), [])
        for wait in waits:
            self.assertNoResult(wait)
        self.clock.advance(WINDOW)
        for wait in waits:
            self.successResultOf(wait)
        self.assertEqual(len(segment_puts(self.objects)), 1)
        self.assertEqual(stored_chain(self.memory, FILESPACE), [1, 2, 3, 4])

    def test_waiter_that_stops_everything(self) -> None:
        """A waiter woken by an upload may stop the shipper and close the store at once: nothing runs after."""
        folder = Path(self.mktemp())
        folder.mkdir()
        store = MetadataStore(folder / "own.sqlite3", self.clock)
        shipper = Shipper(store, self.objects, self.clock, filespace=FILESPACE, group_window=WINDOW,
                          durability="async")
        self.successResultOf(shipper.start())
        shipper.durability = "sync"  # the async tick would ship too; this wait is the only reason to ship
        store.apply(initialise_record())
        stopped: list[Any] = []

        def shut_down(_: Any) -> None:
            stopped.append(shipper.stop())
            store.close()

        shipper.durable().addCallback(shut_down)
        self.clock.advance(WINDOW)
        self.assertEqual(len(stopped), 1)
        self.successResultOf(stopped[0])
        import gc

        gc.collect()  # an error left in a Deferred is logged when the Deferred is collected
        self.assertEqual(self.flushLoggedErrors(), [])

    def test_records_during_an_upload_share_the_next_one(self) -> None:
        """While an upload is in flight, new records wait and then go together in one more upload."""
        shipper = self.shipper()
        self.objects.set_delay(1.0)
        self.store.apply(initialise_record())
        first = shipper.durable()
        self.clock.advance(WINDOW)
        self.mkdir(b"a")
        second = shipper.durable()
        self.mkdir(b"b")
        third = shipper.durable()
        self.assertEqual(len(segment_puts(self.objects)), 1)
        self.clock.advance(1.0)
        self.successResultOf(first)
        self.assertNoResult(second)
        self.assertEqual(len(segment_puts(self.objects)), 2)
        self.clock.advance(1.0)
        self.successResultOf(second)
        self.successResultOf(third)
        self.assertEqual(stored_chain(self.memory, FILESPACE), [1, 2, 3])

    def test_async_answers_at_once_and_ships_on_interval(self) -> None:
        """In async mode durable() fires at once and a segment goes every ship_interval."""
        shipper = self.shipper(durability="async", ship_interval=1.0)
        self.store.apply(initialise_record())
        self.mkdir(b"a")
        self.successResultOf(shipper.durable())
        self.assertEqual(segment_puts(self.objects), [])
        self.clock.advance(1.0)
        self.assertEqual(len(segment_puts(self.objects)), 1)
        self.assertEqual(shipper.pending(), 0)
        self.clock.advance(5.0)
        self.assertEqual(len(segment_puts(self.objects)), 1, "nothing new, nothing shipped")

    def test_unreachable_store_fails_then_resumes(self) -> None:
        """Waiters fail with Unavailable; once the store is back the shipper catches up without being asked."""
        shipper = self.shipper()
        self.store.apply(initialise_record())
        self.objects.fail_always(operations={"put"})
        wait = shipper.durable()
        self.clock.advance(WINDOW)
        failure = self.failureResultOf(wait, errors.Unavailable)
        self.assertTrue(failure.value.retryable)
        self.assertIn("saved on the metadata server", str(failure.value))
        self.mkdir(b"a")
        self.assertEqual(shipper.pending(), 2)
        self.objects.heal()
        self.clock.advance(60)
        self.assertEqual(shipper.pending(), 0)
        self.assertEqual(stored_chain(self.memory, FILESPACE), [1, 2])

    def test_lost_answer_to_a_stored_put(self) -> None:
        """A put stored but reported failed is recognised on retry (same bytes) instead of diverging."""
        shipper = self.shipper()
        self.store.apply(initialise_record())
        self.objects.fail_next(operations={"put"}, after=True)
        wait = shipper.durable()
        self.clock.advance(WINDOW)
        self.failureResultOf(wait, errors.Unavailable)
        self.clock.advance(1.0)
        self.assertEqual(shipper.pending(), 0)
        self.assertEqual(shipper.last_error, None)
        self.successResultOf(shipper.durable())

    def test_restart_continues_after_shipped_segments(self) -> None:
        """A new shipper finds where the stored segments end and ships only the rest."""
        first = self.shipper()
        self.store.apply(initialise_record())
        self.clock.advance(WINDOW)
        self.successResultOf(first.durable())
        self.successResultOf(first.stop())
        self.mkdir(b"a")
        second = self.shipper()
        self.assertEqual(second.shipped_seq, 1)
        self.clock.advance(WINDOW)
        self.assertEqual(stored_chain(self.memory, FILESPACE), [1, 2])

    def test_stop_ships_what_is_left(self) -> None:
        shipper = self.shipper(durability="async", ship_interval=60)
        self.store.apply(initialise_record())
        self.successResultOf(shipper.stop())
        self.assertEqual(stored_chain(self.memory, FILESPACE), [1])

    def test_keys_are_create_only(self) -> None:
        """Every segment put refuses to overwrite."""
        shipper = self.shipper()
        self.store.apply(initialise_record())
        self.memory.objects[f"{segment_prefix(FILESPACE)}00000000000000000001-00000000000000000001.seg"] = b"other"
        wait = shipper.durable()
        self.clock.advance(WINDOW)
        self.failureResultOf(wait, errors.Unavailable)
        self.assertEqual(self.memory.objects[
            f"{segment_prefix(FILESPACE)}00000000000000000001-00000000000000000001.seg"], b"other")


class SyncServiceTests(InitialisedTestCase):
    """The metadata service in sync mode answers a write only once its segment is stored."""

    def open_store(self) -> MetadataStore:
        store = super().open_store()
        self.memory = MemoryObjectStore()
        self.objects = FaultyObjectStore(self.memory, self.clock)
        self.shipper = Shipper(store, self.objects, self.clock, filespace=FILESPACE, group_window=WINDOW)
        self.successResultOf(self.shipper.start())
        self.addCleanup(lambda: self.shipper.stop())
        return store

    def make_responder(self, **options: Any) -> Any:
        return super().make_responder(shipper=self.shipper, **options)

    def flush(self) -> None:
        super().flush()
        self.clock.advance(WINDOW)
        super().flush()

    def test_write_waits_for_the_upload(self) -> None:
        """The answer, and the other clients' notification, come only after the segment is stored."""
        writer = self.logged_in("wendy")
        watcher = self.logged_in("rita")
        watcher.notes()
        self.objects.set_delay(2.0)
        asked = writer.ask(MkDir(ROOT_INODE, b"new", 0o755, 0, 0))
        self.assertNoResult(asked)
        self.assertEqual([n for n in watcher.notes() if isinstance(n, Notify)], [])
        self.clock.advance(2.0)
        self.flush()
        self.successResultOf(asked)
        self.assertTrue(watcher.notes())
        self.assertEqual(self.shipper.pending(), 0)
        self.assertEqual(stored_chain(self.memory, FILESPACE)[-1], self.shipper.head())

    def test_store_unreachable_change_sent_again(self) -> None:
        """A named client's change made but not stored is, sent again, answered once stored, and made once."""
        writer = self.logged_in("wendy")
        writer.answer(ClientId(b"client-of-wendy!"))
        self.objects.fail_always(operations={"put"})

        def send() -> Any:
            writer.server.request_id = 2**31 + 1
            answer = self.responder.respond(writer.server, MkDir(ROOT_INODE, b"kept", 0o755, 0, 0))
            self.flush()
            return answer

        self.failureResultOf(send(), errors.Unavailable)
        self.failureResultOf(send(), errors.Unavailable)  # still not stored: still Unavailable, not AlreadyExists
        self.objects.heal()
        self.clock.advance(60)
        made = self.successResultOf(send())
        self.assertEqual(made.attributes, writer.answer(Lookup(ROOT_INODE, b"kept")).attributes)
        self.assertEqual(self.shipper.pending(), 0)

    def test_store_unreachable_create_sent_again_on_its_connection(self) -> None:
        """A Create made but not stored, sent again on the same connection, answers with its one handle."""
        writer = self.logged_in("wendy")
        writer.answer(ClientId(b"client-of-wendy!"))
        self.objects.fail_always(operations={"put"})

        def send() -> Any:
            writer.server.request_id = 2**31 + 1
            answer = self.responder.respond(writer.server, Create(ROOT_INODE, b"f", 0o644, 0, 0, True, O_WRONLY))
            self.flush()
            return answer

        self.failureResultOf(send(), errors.Unavailable)
        self.objects.heal()
        self.clock.advance(60)
        opened = self.successResultOf(send())
        handles = writer.server.session.handles  # type: ignore[union-attr]
        self.assertEqual(list(handles), [opened.handle], "the first attempt's handle, not a second one")

    def test_store_unreachable(self) -> None:
        """A write fails with Unavailable but is kept; reads work; the retry says it exists; shipping resumes."""
        writer = self.logged_in("wendy")
        self.objects.fail_always(operations={"put"})
        failure = writer.refused(MkDir(ROOT_INODE, b"kept", 0o755, 0, 0), errors.Unavailable)
        self.assertTrue(failure.retryable)
        entry = writer.answer(Lookup(ROOT_INODE, b"kept"))
        self.assertEqual(writer.answer(GetAttr(entry.attributes.inode)).attributes, entry.attributes)
        writer.refused(MkDir(ROOT_INODE, b"kept", 0o755, 0, 0), errors.AlreadyExists)
        self.objects.heal()
        self.clock.advance(60)
        self.assertEqual(self.shipper.pending(), 0)
        writer.answer(MkDir(ROOT_INODE, b"after", 0o755, 0, 0))
        self.assertEqual(stored_chain(self.memory, FILESPACE), list(range(1, self.shipper.head() + 1)))
