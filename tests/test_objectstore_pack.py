"""
Packs of the local store: what a crash or damage leaves, and what readers,
writers and the journal shipper make of it.

Each :class:`FolderPack` keeps its own index, as a process does, so two of
them on one folder stand for two processes; their ``flock``\\ s exclude each
other as two processes' would.  Torn appends are made by writing part of an
encoded record where the next one goes, which is what the disk holds after
a power cut or a writer killed mid-write.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lucidlink import errors
from lucidlink.meta import mutations as m
from lucidlink.meta.segments import parse_segment, segment_prefix
from lucidlink.meta.shipper import Shipper
from lucidlink.meta.store import ROOT_INODE, MetadataStore
from lucidlink.objectstore import pack as pack_module
from lucidlink.objectstore.local import LocalObjectStore
from lucidlink.objectstore.pack import DELETE, HEADER_SIZE, PUT, FolderPack, encode_record
from tests.meta_helpers import initialise_record

STEP = 4096
LIMIT = 8192


def folder_for(case: SynchronousTestCase) -> Path:
    folder = Path(case.mktemp()).absolute()
    folder.mkdir(parents=True)
    return folder


def pack_file(folder: Path, number: int = 1) -> Path:
    """The pack of ``folder`` numbered ``number`` (a missing path if there is none)."""
    found = sorted((folder / ".pack").glob(f"{number:08d}-*"))
    return found[0] if found else folder / ".pack" / f"{number:08d}-missing"


def write_into(path: Path, offset: int, data: bytes) -> None:
    """Write ``data`` into the pack file at ``offset`` behind every index's back."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


class FolderPackTests(SynchronousTestCase):
    """Appends, reads, deletes and reclaiming, across two views of one folder."""

    def setUp(self) -> None:
        self.folder = folder_for(self)
        self.writer = FolderPack(self.folder, limit=LIMIT, step=STEP)
        self.reader = FolderPack(self.folder, limit=LIMIT, step=STEP)

    def append(self, name: str, data: bytes, pack: FolderPack | None = None) -> bool:
        return (pack or self.writer).append(name, data, taken=lambda: False)

    def read(self, name: str, pack: FolderPack | None = None) -> bytes | None:
        packed = (pack or self.reader).find(name)
        return None if packed is None else (pack or self.reader).read(packed)

    def test_no_packs(self) -> None:
        """A folder without packs has none, and finding in it finds nothing."""
        self.assertFalse(self.reader.exists())
        self.assertIsNone(self.reader.find("x"))
        self.assertFalse(self.reader.remove("x"))

    def test_append_then_read_elsewhere(self) -> None:
        """What one view appends, another reads, with its size and time."""
        self.assertTrue(self.append("a", b"alpha"))
        self.assertTrue(self.append("b", b""))
        self.assertEqual(self.read("a"), b"alpha")
        self.assertEqual(self.read("b"), b"")
        packed = self.reader.find("a")
        assert packed is not None
        self.assertEqual(packed.size, 5)
        self.assertEqual(self.reader.read(packed, 1, 3), b"lph")
        self.assertEqual(self.reader.read(packed, 4, 10), b"a")
        self.assertEqual(sorted(self.reader.objects()), ["a", "b"])

    def test_create_only(self) -> None:
        """A name packed already, or taken elsewhere, is refused; nothing is written."""
        self.assertTrue(self.append("a", b"first"))
        size = pack_file(self.folder).stat().st_size
        self.assertFalse(self.append("a", b"second", self.reader))
        self.assertFalse(self.writer.append("new", b"x", taken=lambda: True))
        self.assertEqual(self.read("a"), b"first")
        self.assertIsNone(self.reader.find("new"))
        self.assertEqual(pack_file(self.folder).stat().st_size, size)

    def test_appends_overwrite_written_blocks(self) -> None:
        """Within a step an append neither grows the file nor fsyncs it: one fdatasync."""
        self.append("first", b"x")
        size = pack_file(self.folder).stat().st_size
        self.assertEqual(size, STEP)
        calls: list[str] = []
        real_fsync, real_fdatasync = os.fsync, os.fdatasync
        self.patch(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd)))
        self.patch(os, "fdatasync", lambda fd: (calls.append("fdatasync"), real_fdatasync(fd)))
        self.append("second", b"y" * 100)
        self.assertEqual(calls, ["fdatasync"])
        self.assertEqual(pack_file(self.folder).stat().st_size, size)
        del calls[:]
        self.append("big", b"z" * STEP)  # past the written blocks: zeros ahead, fsynced once
        self.assertEqual(calls, ["fsync", "fdatasync"])
        self.assertEqual(pack_file(self.folder).stat().st_size % STEP, 0)

    def test_failed_sync_takes_the_record_back(self) -> None:
        """An append whose fdatasync fails is deleted after it, not overwritten: every view, even one that read it, agrees."""
        self.append("kept", b"k")
        real_fdatasync = os.fdatasync
        failures = [1]

        def failing_once(fd: int) -> None:
            if failures:
                failures.pop()
                self.reader.find("anything")  # another process reads while the sync runs
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            real_fdatasync(fd)

        self.patch(os, "fdatasync", failing_once)
        self.assertRaises(OSError, self.append, "lost", b"l" * 100)
        for view in (self.writer, self.reader, FolderPack(self.folder)):
            self.assertIsNone(view.find("lost"))
        self.assertTrue(self.append("s1", b"1" * 100))
        self.assertTrue(self.append("s2", b"2" * 1000))
        self.assertTrue(self.append("lost", b"again", self.reader))
        for view in (self.writer, self.reader, FolderPack(self.folder)):
            self.assertEqual(sorted(view.objects()), ["kept", "lost", "s1", "s2"])
            self.assertEqual(view.read(view.find("s2")), b"2" * 1000)
            self.assertEqual(view.read(view.find("lost")), b"again")

    def test_failing_sync_stops_the_view(self) -> None:
        """When not even the deletion can be made durable, that view appends nothing more; a new one can."""
        self.append("kept", b"k")

        def failing(fd: int) -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        restore = self.patch(os, "fdatasync", failing)
        self.assertRaises(OSError, self.append, "lost", b"l" * 100)
        restore.restore()
        with self.assertRaises(OSError) as refused:
            self.append("next", b"n")
        self.assertIn("could not be taken back", str(refused.exception))
        fresh = FolderPack(self.folder)
        self.assertEqual(sorted(fresh.objects()), ["kept"])
        self.assertTrue(self.append("next", b"n", fresh))
        self.assertEqual(sorted(self.reader.objects()), ["kept", "next"])

    def test_records_appended_before_a_rollover_are_seen(self) -> None:
        """A view that read the last pack sees what was appended to it after, once a later pack starts."""
        self.append("a0", b"x" * 700)
        self.assertIsNotNone(self.reader.find("a0"))
        for number in range(1, 3 * LIMIT // 700):
            self.append(f"a{number}", b"x" * 700)
        self.assertTrue(pack_file(self.folder, 2).exists())
        self.assertEqual(self.reader.objects().keys(), self.writer.objects().keys())
        self.assertFalse(self.append("a3", b"other", self.reader), "create-only: a3 exists")
        self.assertEqual(self.read("a3", FolderPack(self.folder)), b"x" * 700)

    def test_reclaim_by_a_view_that_read_before_a_rollover(self) -> None:
        """Deleting the first object, through a view that read it early, leaves the pack that holds others."""
        self.append("a0", b"x" * 700)
        self.reader.find("a0")
        for number in range(1, 2 * LIMIT // 700):
            self.append(f"a{number}", b"x" * 700)
        self.assertTrue(self.reader.remove("a0"))
        fresh = FolderPack(self.folder)
        self.assertEqual(sorted(fresh.objects()), sorted(f"a{n}" for n in range(1, 2 * LIMIT // 700)))
        self.assertEqual(self.read("a5", self.writer), b"x" * 700)

    def test_pack_reclaimed_while_a_view_reads(self) -> None:
        """A pack that goes between a view's listing and its reading makes the view read again, not come up empty."""
        count = 3 * LIMIT // 700
        for number in range(count):
            self.append(f"s{number:02d}", b"x" * 700)
        listing = self.reader._packs

        def listed_then_pruned() -> list[str]:
            listed = listing()
            self.reader._packs = listing
            for number in range(count // 2):  # the oldest pack empties and is reclaimed meanwhile
                self.writer.remove(f"s{number:02d}")
            return listed

        self.reader._packs = listed_then_pruned  # type: ignore[method-assign]
        self.assertIsNotNone(self.reader.find(f"s{count - 1:02d}"))
        self.assertEqual(len(self.reader.objects()), count - count // 2)

    def test_torn_record_replaced_while_a_view_reads_it(self) -> None:
        """The next writer clears a torn record and appends in its place between a view's two reads of it."""
        self.append("kept", b"k")
        end = self.writer._states[max(self.writer._states)].end
        write_into(pack_file(self.folder), end, encode_record(PUT, "unacked", b"U" * 3000)[:1000])
        next_writer = FolderPack(self.folder, limit=LIMIT, step=STEP)
        real_read = pack_module._read_exactly
        appended: list[bool] = []

        def read_then_append(fd: int, offset: int, length: int) -> bytes:
            data = real_read(fd, offset, length)
            if offset == end and length == HEADER_SIZE and not appended:
                appended.append(True)
                self.patch(pack_module, "_read_exactly", real_read)
                self.append("s1", b"1" * 500, next_writer)
                self.append("s2", b"2" * 500, next_writer)
                self.patch(pack_module, "_read_exactly", read_then_append)
            return data

        self.patch(pack_module, "_read_exactly", read_then_append)
        self.assertIsNone(self.reader.find("unacked"))
        self.assertTrue(appended)
        self.assertEqual(sorted(self.reader.objects()), ["kept", "s1", "s2"])

    def test_delete_and_again(self) -> None:
        """A deleted name is gone for every view and can be created again."""
        self.append("a", b"one")
        self.assertEqual(self.read("a"), b"one")
        self.assertTrue(self.reader.remove("a"))
        self.assertIsNone(self.writer.find("a"))
        self.assertFalse(self.writer.remove("a"))
        self.assertTrue(self.append("a", b"two"))
        self.assertEqual(self.read("a"), b"two")

    def test_packs_roll_and_are_reclaimed_oldest_first(self) -> None:
        """A full pack starts the next; once the oldest holds nothing it is unlinked, and stale views follow."""
        names = [f"seg-{n:03d}" for n in range(12)]
        for name in names:
            self.append(name, name.encode() * 100)  # 700 bytes each: several packs of 8 KiB
        packs = sorted((self.folder / ".pack").iterdir())
        self.assertGreater(len(packs), 1)
        self.assertEqual(self.read(names[0]), names[0].encode() * 100)
        first = pack_file(self.folder, 1).name
        first_pack_names = [name for name in names if self.writer.find(name).pack == first]  # type: ignore[union-attr]
        for name in first_pack_names[:-1]:
            self.writer.remove(name)
        self.assertTrue(pack_file(self.folder, 1).exists(), "still holds an object")
        self.writer.remove(first_pack_names[-1])
        self.assertFalse(pack_file(self.folder, 1).exists())
        left = names[len(first_pack_names):]
        self.assertEqual(sorted(self.reader.objects()), left)  # the reader's index had pack 1 in it
        for name in left:
            self.assertEqual(self.read(name), name.encode() * 100)

    def test_the_last_pack_stays(self) -> None:
        """Deleting everything keeps the last pack, where the next append goes."""
        self.append("a", b"x")
        self.writer.remove("a")
        self.assertTrue(pack_file(self.folder).exists())
        self.append("b", b"y")
        self.assertEqual(self.read("b"), b"y")

    def test_pack_made_again_is_read_anew(self) -> None:
        """Packs removed and started again under the same numbers are not mistaken for the old ones."""
        self.append("old", b"x")
        self.assertEqual(self.read("old"), b"x")
        os.unlink(pack_file(self.folder))
        self.append("new", b"y", FolderPack(self.folder, limit=LIMIT, step=STEP))
        self.assertIsNone(self.reader.find("old"))
        self.assertEqual(self.read("new"), b"y")


class AppendNowTests(SynchronousTestCase):
    """The fast path: an append made at once only when it is one write and one fdatasync."""

    def setUp(self) -> None:
        self.folder = folder_for(self)
        self.pack = FolderPack(self.folder, limit=LIMIT, step=STEP)
        self.pack.append("first", b"1", taken=lambda: False)  # reads the folder: the fast path may follow

    def now(self, name: str, data: bytes = b"data", pack: FolderPack | None = None) -> bool | None:
        return (pack or self.pack).append_now(name, data, taken=lambda: False)

    def test_appends_at_once(self) -> None:
        """A warm pack appends in place, durably (one fdatasync, no fsync), and others read it."""
        calls: list[str] = []
        real_fsync, real_fdatasync = os.fsync, os.fdatasync
        self.patch(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd)))
        self.patch(os, "fdatasync", lambda fd: (calls.append("fdatasync"), real_fdatasync(fd)))
        self.assertIs(self.now("second"), True)
        self.assertEqual(calls, ["fdatasync"])
        other = FolderPack(self.folder)
        self.assertEqual(other.read(other.find("second")), b"data")  # type: ignore[arg-type]

    def test_refuses_a_taken_name(self) -> None:
        """A name packed already, or taken elsewhere, is refused at once."""
        self.assertIs(self.now("first"), False)
        self.assertIs(self.pack.append_now("new", b"x", taken=lambda: True), False)

    def test_cold_pack_waits(self) -> None:
        """A view that has not read the folder yet leaves it to append (which reads every pack first)."""
        self.assertIsNone(self.now("x", pack=FolderPack(self.folder)))

    def test_lock_held_elsewhere_waits(self) -> None:
        """Another process appending (its lock held): no waiting here."""
        other = FolderPack(self.folder)
        with other._exclusive(create=False):
            self.assertIsNone(self.now("x"))
        self.assertIs(self.now("x"), True)

    def test_new_pack_elsewhere_waits(self) -> None:
        """A pack started by another process is read by append, not here."""
        other = FolderPack(self.folder, limit=LIMIT, step=STEP)
        while len(list((self.folder / ".pack").iterdir())) == 1:
            other.append(f"filler-{len(other.objects())}", b"f" * 2000, taken=lambda: False)
        self.assertIsNone(self.now("x"))
        self.assertTrue(self.pack.append("x", b"data", taken=lambda: False))
        self.assertIs(self.now("y"), True)

    def test_full_blocks_wait(self) -> None:
        """A record past the blocks written ahead (an extension and its fsync) is left to append."""
        self.assertIsNone(self.now("big", b"b" * STEP))
        self.assertIsNone(self.pack.find("big"))

    def test_torn_tail_waits(self) -> None:
        """An unfinished append of another writer is cleared by append, not here."""
        end = len(encode_record(PUT, "first", b"1", 0))
        write_into(pack_file(self.folder), end, encode_record(PUT, "torn", b"t" * 100)[:50])
        self.assertIsNone(self.now("x"))
        self.assertTrue(self.pack.append("x", b"data", taken=lambda: False))
        self.assertEqual(sorted(FolderPack(self.folder).objects()), ["first", "x"])


class TornAndDamagedTests(SynchronousTestCase):
    """What a crash or bit rot leaves in a pack, seen by a reader and then by the next writer."""

    def setUp(self) -> None:
        self.folder = folder_for(self)
        self.writer = FolderPack(self.folder, limit=LIMIT, step=STEP)
        for name in ("a", "b"):
            self.writer.append(name, name.encode() * 50, taken=lambda: False)
        self.end = 2 * len(encode_record(PUT, "a", b"a" * 50, 0))

    def fresh(self) -> FolderPack:
        """A view that has read nothing yet: a process started after the crash."""
        return FolderPack(self.folder, limit=LIMIT, step=STEP)

    def assertAppendable(self, pack: FolderPack) -> None:
        """The next append lands, is read back, and nothing stale is left after it."""
        self.assertTrue(pack.append("c", b"after", taken=lambda: False))
        other = self.fresh()
        packed = other.find("c")
        assert packed is not None
        self.assertEqual(other.read(packed), b"after")
        tail = pack_file(self.folder).read_bytes()[packed.offset + packed.size + 16:]
        self.assertEqual(tail.count(0), len(tail), "the torn record was cleared")

    def test_torn_last_record_is_not_an_object(self) -> None:
        """Part of a record at the end (header and some data): no object, and the next append replaces it."""
        torn = encode_record(PUT, "torn", b"t" * 300)
        write_into(pack_file(self.folder), self.end, torn[: len(torn) // 2])
        for view in (self.fresh(), self.writer):
            self.assertEqual(sorted(view.objects()), ["a", "b"])
            self.assertIsNone(view.find("torn"))
        self.assertAppendable(self.fresh())
        self.assertIsNone(self.fresh().find("torn"))

    def test_torn_header_is_not_an_object(self) -> None:
        """Only the first bytes of a header written: the same."""
        write_into(pack_file(self.folder), self.end, encode_record(PUT, "torn", b"t" * 300)[: HEADER_SIZE // 2])
        self.assertEqual(sorted(self.fresh().objects()), ["a", "b"])
        self.assertAppendable(self.writer)

    def test_lost_first_block_leaves_garbage_behind(self) -> None:
        """A torn record whose start never reached the disk but whose end did: cleared, never read as a record."""
        torn = encode_record(PUT, "torn", b"t" * 3000)
        write_into(pack_file(self.folder), self.end + 512, torn[512:])
        self.assertEqual(sorted(self.fresh().objects()), ["a", "b"])
        self.assertAppendable(self.fresh())

    def test_damaged_data_followed_by_records_is_still_the_object(self) -> None:
        """Bit rot inside an older record: the object is read as it is on disk, as a damaged file would be."""
        packed = self.writer.find("a")
        assert packed is not None
        flip(pack_file(self.folder), packed.offset + 10)
        view = self.fresh()
        self.assertEqual(sorted(view.objects()), ["a", "b"])
        data = view.read(view.find("a"))  # type: ignore[arg-type]
        self.assertNotEqual(data, b"a" * 50)
        self.assertEqual(len(data), 50)  # type: ignore[arg-type]
        self.assertAppendable(view)
        self.assertEqual(sorted(self.fresh().objects()), ["a", "b", "c"])

    def test_damaged_header_skips_to_the_next_record(self) -> None:
        """A header that does not check: its object is lost, the ones after it are not, and nothing is overwritten."""
        flip(pack_file(self.folder), 5)  # in the first record's header
        view = self.fresh()
        self.assertEqual(sorted(view.objects()), ["b"])
        self.assertAppendable(view)
        self.assertEqual(sorted(self.fresh().objects()), ["b", "c"])
        self.assertEqual(self.fresh().read(self.fresh().find("b")), b"b" * 50)  # type: ignore[arg-type]

    def test_damaged_last_record_counts_as_unfinished(self) -> None:
        """The last record's data damaged: it cannot be told from an unfinished append, so it is not an object."""
        packed = self.writer.find("b")
        assert packed is not None
        flip(pack_file(self.folder), packed.offset + 1)
        self.assertEqual(sorted(self.fresh().objects()), ["a"])

    def test_torn_delete_leaves_the_object(self) -> None:
        """A deletion record that did not finish: the object is still there, and deleting again works."""
        write_into(pack_file(self.folder), self.end, encode_record(DELETE, "a")[:-3])
        self.assertEqual(sorted(self.fresh().objects()), ["a", "b"])
        self.assertTrue(self.fresh().remove("a"))
        self.assertEqual(sorted(self.fresh().objects()), ["b"])

    def test_writer_killed_holding_the_lock(self) -> None:
        """A writer killed (SIGKILL) mid-append, lock held: the lock goes with it and the next writer goes on."""
        child = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(f"""
                import os, sys, time
                from pathlib import Path
                from lucidlink.objectstore.pack import FolderPack, encode_record, PUT
                pack = FolderPack(Path({str(self.folder)!r}), limit={LIMIT}, step={STEP})
                with pack._exclusive(create=False):
                    fd = os.open({str(pack_file(self.folder))!r}, os.O_WRONLY)
                    record = encode_record(PUT, "doomed", b"d" * 500)
                    os.pwrite(fd, record[:200], {self.end})
                    print("written", flush=True)
                    time.sleep(60)
            """)],
            stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.getcwd() + os.pathsep + str(
                Path(pack_module.__file__).parents[2])},
        )
        self.addCleanup(lambda: child.poll() is None and child.kill())
        assert child.stdout is not None
        self.assertEqual(child.stdout.readline(), b"written\n")
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
        self.assertIsNone(self.writer.find("doomed"))
        self.assertAppendable(self.writer)


class LocalStorePackTests(TestCase):
    """The local store with packs: plain files beside them, and the journal shipper after a crash."""

    def setUp(self) -> None:
        self.root = folder_for(self)
        self.store = LocalObjectStore(self.root, reactor)
        self.addCleanup(self.store.close)

    async def test_journal_segments_are_packed(self) -> None:
        """Create-only puts into a ``journal`` folder go to its pack; others are files; locate finds both."""
        await self.store.put("fs/journal/1-1.seg", b"records", create_only=True)
        await self.store.put("fs/snapshots/1.db.z", b"snapshot", create_only=True)
        self.assertFalse((self.root / "fs" / "journal" / "1-1.seg").exists())
        self.assertTrue(pack_file(self.root / "fs" / "journal").exists())
        path, offset, size = self.store.locate("fs/journal/1-1.seg")
        self.assertEqual(path.read_bytes()[offset:offset + size], b"records")
        self.assertEqual(self.store.locate("fs/snapshots/1.db.z"), (self.root / "fs" / "snapshots" / "1.db.z", 0, 8))
        self.assertRaises(errors.NotFound, self.store.locate, "fs/journal/2-2.seg")
        self.assertEqual([(i.key, i.size) for i in await self.store.list("fs/")],
                         [("fs/journal/1-1.seg", 7), ("fs/snapshots/1.db.z", 8)])

    async def test_other_processes_see_packed_objects(self) -> None:
        """A store opened without packing (another process, another setting) reads, lists and deletes them."""
        await self.store.put("fs/journal/1-1.seg", b"records", create_only=True)
        other = LocalObjectStore(self.root, reactor, packed=lambda folder: False)
        self.addCleanup(other.close)
        self.assertEqual(await other.get("fs/journal/1-1.seg"), b"records")
        self.assertEqual((await other.head("fs/journal/1-1.seg")).size, 7)
        self.assertEqual(await other.get_range("fs/journal/1-1.seg", 2, 3), b"cor")
        await self.assertFailure(other.put("fs/journal/1-1.seg", b"again", create_only=True), errors.AlreadyExists)
        await other.put("fs/journal/2-2.seg", b"more", create_only=True)  # the folder has packs: packed too
        self.assertFalse((self.root / "fs" / "journal" / "2-2.seg").exists())
        await other.delete("fs/journal/1-1.seg")
        await self.assertFailure(self.store.get("fs/journal/1-1.seg"), errors.NotFound)
        self.assertEqual([i.key for i in await self.store.list("fs/journal/")], ["fs/journal/2-2.seg"])

    async def test_plain_file_beside_a_packed_object(self) -> None:
        """A file of the same key (a plain put, or one copied in) is newer: it is read, and listed once."""
        await self.store.put("fs/journal/k", b"packed", create_only=True)
        (self.root / "fs" / "journal" / "copied").write_bytes(b"file")
        await self.assertFailure(self.store.put("fs/journal/copied", b"x", create_only=True), errors.AlreadyExists)
        await self.store.put("fs/journal/k", b"replaced")
        self.assertEqual(await self.store.get("fs/journal/k"), b"replaced")
        self.assertEqual([(i.key, i.size) for i in await self.store.list("fs/journal/")],
                         [("fs/journal/copied", 4), ("fs/journal/k", 8)])
        await self.store.delete("fs/journal/k")
        await self.assertFailure(self.store.get("fs/journal/k"), errors.NotFound)  # the packed one went too

    async def test_key_clashing_with_a_folder(self) -> None:
        """A packed name and a folder of the same name refuse each other as a clash, as files do."""
        await self.store.put("fs/journal/sub/x", b"1")
        failure = await self.assertFailure(self.store.put("fs/journal/sub", b"2", create_only=True),
                                           errors.InvalidArgument)
        self.assertIn("clashes", str(failure))
        await self.store.put("fs/journal/seg", b"3", create_only=True)
        for put in (self.store.put("fs/journal/seg/y", b"4"), self.store.put("fs/journal/seg/y/z", b"5")):
            failure = await self.assertFailure(put, errors.InvalidArgument)
            self.assertIn("clashes", str(failure))
        self.assertFalse((self.root / "fs" / "journal" / "seg").exists())

    def test_cheap_puts_are_made_at_once(self) -> None:
        """Once a journal folder is in use, a create-only put there is done when put() returns; others wait."""
        first = self.store.put("fs/journal/1", b"one", create_only=True)
        self.assertNoResult(first)  # the first reads the folder in the thread pool
        return first.addCallback(self._then_at_once)

    def _then_at_once(self, _: None) -> Any:
        self.successResultOf(self.store.put("fs/journal/2", b"two", create_only=True))
        self.failureResultOf(self.store.put("fs/journal/2", b"again", create_only=True), errors.AlreadyExists)
        self.failureResultOf(self.store.put("fs/journal/.x", b"bad", create_only=True), errors.InvalidArgument)
        other = FolderPack(self.root / "fs" / "journal")
        with other._exclusive(create=False):
            waiting = self.store.put("fs/journal/3", b"three", create_only=True)
            self.assertNoResult(waiting)  # another process holds the lock: the pool waits for it
        return waiting

    @defer.inlineCallbacks
    def test_shipper_goes_on_after_a_torn_segment(self) -> Any:
        """Power lost mid-put: the torn segment is no object, so a restarted shipper stores it again by itself."""
        store = MetadataStore(Path(self.mktemp()), reactor)
        self.addCleanup(store.close)
        store.apply(initialise_record())
        shipper = Shipper(store, self.store, reactor, filespace="fs", durability="sync")
        yield shipper.start()
        store.apply(m.MakeDirectory(ROOT_INODE, b"one", 0o755, 0, 0))
        yield shipper.durable()
        yield shipper.stop()
        store.apply(m.MakeDirectory(ROOT_INODE, b"two", 0o755, 0, 0))
        # What the crashed put of the next segment left: the front half of its record.
        journal = self.root / "fs" / "journal"
        pack = FolderPack(journal)
        end = max(packed.offset + packed.size for packed in pack.objects().values()) + 16
        torn = encode_record(PUT, "00000000000000000002-00000000000000000002.seg", b"s" * 400)
        write_into(pack_file(journal), end, torn[: len(torn) // 2])

        restarted = LocalObjectStore(self.root, reactor)
        self.addCleanup(restarted.close)
        again = Shipper(store, restarted, reactor, filespace="fs", durability="sync", journal=shipper.journal)
        yield again.start()
        self.assertEqual(again.shipped_seq, 1)
        yield again.durable()
        yield again.stop()
        self.assertEqual(again.shipped_seq, 2)
        keys = [info.key for info in (yield restarted.list(segment_prefix("fs")))]
        self.assertEqual(len(keys), 2)
        for key in keys:
            parse_segment((yield restarted.get(key)), b"fs")
