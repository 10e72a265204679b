"""
Write-back: a handle's uncommitted writes journaled on local disk (sealed),
full chunks stored in the background, and the writes a dead client left
behind committed by the next one, unless the file changed meanwhile (then
kept, and said so).  The journal on its own, then the real client core
against a real metadata server on loopback and a local object store.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import shutil
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor, task
from twisted.internet.defer import Deferred
from twisted.trial.unittest import SynchronousTestCase

from lucidlink import crypto, errors
from lucidlink.client import filespace as filespace_module
from lucidlink.client import writeback
from lucidlink.client.filespace import Filespace
from lucidlink.client.writeback import Committing, Truncate, Write, WriteBackJournals, read_journal
from lucidlink.objectstore.faults import FaultyObjectStore
from lucidlink.protocol.messages import ChunkRef, Role
from tests.cache_helpers import change, pattern
from tests.client_helpers import CacheFolderCase, MemoryFilespaceCase, cheap_kdf

KEYS = crypto.FilespaceKeys(bytes(range(32)), bytes(16))
CHUNK = 2 * crypto.BLOCK_SIZE


class JournalTests(SynchronousTestCase):
    """The journal file: what goes in comes back, sealed; damage is detected, a torn end is not damage."""

    def setUp(self) -> None:
        self.journals = WriteBackJournals(Path(self.mktemp()), KEYS)

    def test_round_trip(self) -> None:
        """Writes, truncations and commit marks come back in order; the writes were sealed on disk."""
        secret = pattern(5000, 1)
        journal = self.journals.begin(inode=42, version=7)
        journal.write(3, 100, secret)
        journal.truncate(12345)
        journal.committing(7, 12345, [ChunkRef(3, b"\x05" * 16, 5100, 5100), ChunkRef(4, b"", 0, 0)])
        journal.sync()
        journal.close()
        self.assertNotIn(secret[:32], journal.path.read_bytes())
        (found,) = list(self.journals.pending())
        assert not isinstance(found, tuple)
        self.assertEqual((found.inode, found.version), (42, 7))
        self.assertEqual(found.records, [
            Write(3, 100, secret), Truncate(12345),
            Committing(7, 12345, (ChunkRef(3, b"\x05" * 16, 5100, 5100), ChunkRef(4, b"", 0, 0))),
        ])
        self.assertEqual(found.last_commit, found.records[-1])

    def test_torn_end_is_ignored(self) -> None:
        """A record cut short by a crash while appending ends the journal; what came before stands."""
        journal = self.journals.begin(1, 1)
        journal.write(0, 0, b"kept")
        journal.write(0, 4, b"torn")
        journal.close()
        journal.path.write_bytes(journal.path.read_bytes()[:-3])
        self.assertEqual(read_journal(journal.path, KEYS).records, [Write(0, 0, b"kept")])

    def test_damage_is_detected(self) -> None:
        """An altered byte, or records moved to another file's journal, fail to open."""
        journal = self.journals.begin(1, 1)
        journal.write(0, 0, b"some data")
        journal.close()
        data = bytearray(journal.path.read_bytes())
        data[-3] ^= 1
        journal.path.write_bytes(bytes(data))
        with self.assertRaises(errors.IntegrityError):
            read_journal(journal.path, KEYS)
        other = self.journals.begin(2, 1)
        other.close()
        data[-3] ^= 1
        other.path.write_bytes(other.path.read_bytes() + bytes(data[len(other.path.read_bytes()) :]))
        with self.assertRaises(errors.IntegrityError):
            read_journal(other.path, KEYS)
        (first, second) = list(self.journals.pending())
        self.assertIsInstance(first, tuple)
        self.assertIsInstance(second, tuple)

    def test_folder_removed_meanwhile_is_made_again(self) -> None:
        """A journal begun after its folder was removed (a cleaner, a person) makes the folder again."""
        shutil.rmtree(self.journals.folder)
        journal = self.journals.begin(inode=5, version=1)
        journal.write(0, 0, b"still journaled")
        journal.close()
        self.assertEqual(read_journal(journal.path, KEYS).records, [Write(0, 0, b"still journaled")])
        self.assertEqual(self.journals.pending_paths(), [journal.path])

    def test_keep_and_numbering(self) -> None:
        """Kept journals move to conflicts/ with a note; new journals never reuse a number."""
        journal = self.journals.begin(5, 1)
        journal.close()
        kept = self.journals.keep(journal.path, "because")
        self.assertEqual(kept.parent.name, writeback.CONFLICTS)
        self.assertIn("because", kept.with_suffix(".why").read_text())
        again = WriteBackJournals(self.journals.folder, KEYS)
        self.assertEqual(again.pending_paths(), [])
        fresh = again.begin(5, 1)
        fresh.close()
        self.assertNotEqual(fresh.path.name, journal.path.name)


    def test_staged_chunks_left_apart_from_their_journal(self) -> None:
        """Staged chunks a death left apart from their journal (keeping or removing it) are put back, or deleted."""
        data = pattern(2 * crypto.BLOCK_SIZE, 15)
        journal = self.journals.begin(inode=9, version=2)
        staged = journal.stage(0, len(data))
        staged.add(data)
        journal.close()
        os.replace(staged.path, self.journals.conflicts_folder / staged.path.name)  # died keeping it
        gone = self.journals.begin(inode=9, version=2)
        gone.stage(0, len(data)).add(data)
        gone.close()
        gone.path.unlink()  # died removing it
        again = WriteBackJournals(self.journals.folder, KEYS)
        (found,) = list(again.pending())
        assert not isinstance(found, tuple)
        self.assertEqual(found.records, [Write(0, 0, data)])
        self.assertEqual(sorted(path.name for path in again.pending_folder.iterdir()),
                         sorted([journal.path.name, staged.path.name]))
        self.assertEqual(list(again.conflicts_folder.iterdir()), [])

    def test_staged_chunk_round_trip(self) -> None:
        """A staged chunk holds sealed blocks only; read back, its whole blocks are one write at its record's place."""
        block = crypto.BLOCK_SIZE
        data = pattern(4 * block, 3)
        journal = self.journals.begin(inode=9, version=2)
        journal.write(1, 0, data[:1000])
        staged = journal.stage(1, len(data))
        self.assertEqual(staged.add(data[: 2 * block + 5]), 2 * block)
        journal.write(1, 2 * block, data[2 * block : 2 * block + 5])
        journal.truncate(10)
        journal.close()
        self.assertNotIn(data[:32], staged.path.read_bytes())
        self.assertEqual(staged.path.name, f"{journal.path.name}.1", "named by its record's number")
        (found,) = list(self.journals.pending())
        assert not isinstance(found, tuple)
        self.assertEqual(found.records, [
            Write(1, 0, data[:1000]), Write(1, 0, data[: 2 * block]), Write(1, 2 * block, data[2 * block : 2 * block + 5]),
            Truncate(10),
        ])
        found.remove()
        self.assertEqual(list(self.journals.folder.rglob("*.journal*")), [])

    def test_whole_staged_chunk_is_the_object(self) -> None:
        """Once every block is in, the staged file is the chunk object seal_chunk would make (another prefix)."""
        data = pattern(3 * crypto.BLOCK_SIZE, 4)
        journal = self.journals.begin(inode=9, version=2)
        staged = journal.stage(5, len(data))
        staged.add(data[:100])
        self.assertFalse(staged.complete)
        staged.add(data)
        self.assertTrue(staged.complete)
        self.assertEqual(staged.add(data), len(data), "nothing sealed twice")
        sealed = staged.read()
        self.assertEqual(len(sealed), crypto.sealed_chunk_size(len(data)))
        self.assertEqual(crypto.open_chunk(KEYS, 9, 5, sealed), data)
        with self.assertRaises(errors.IntegrityError):
            crypto.open_chunk(KEYS, 9, 6, sealed)
        journal.remove()
        self.assertFalse(staged.path.exists())

    def test_staged_chunk_damage(self) -> None:
        """A staged block cut short ends the staged write; one altered, or the file gone, is damage; kept together."""
        block = crypto.BLOCK_SIZE
        data = pattern(4 * block, 5)
        journal = self.journals.begin(inode=3, version=1)
        staged = journal.stage(0, len(data))
        staged.add(data[: 3 * block])
        journal.close()
        whole = staged.path.read_bytes()
        staged.path.write_bytes(whole[:-10])
        self.assertEqual(read_journal(journal.path, KEYS).records, [Write(0, 0, data[: 2 * block])])
        altered = bytearray(whole)
        altered[100] ^= 1
        staged.path.write_bytes(bytes(altered))
        with self.assertRaises(errors.IntegrityError):
            read_journal(journal.path, KEYS)
        staged.path.unlink()
        with self.assertRaises(errors.IntegrityError):
            read_journal(journal.path, KEYS)
        staged.path.write_bytes(whole)
        kept = self.journals.keep(journal.path, "kept")
        self.assertEqual(read_journal(kept, KEYS).records, [Write(0, 0, data[: 3 * block])])
        self.assertFalse(staged.path.exists())


class WriteBackTests(CacheFolderCase):
    """The client core with a cache folder: journals, background stores, and recovery by the next client."""

    chunk_size = CHUNK

    def pending(self) -> list[Path]:
        return sorted((self.base / "cache").rglob("pending/*.journal"))

    @defer.inlineCallbacks
    def test_writes_survive_a_client_restart(self) -> Generator[Deferred[Any], Any, None]:
        """Writes a dead client never committed are committed by the next one, as they were."""
        first = yield self.client()
        yield first.write_file("/old.bin", pattern(3 * CHUNK, 1))
        expected = bytearray(pattern(3 * CHUNK, 1))
        handle = yield first.open_path("/old.bin", os.O_RDWR)
        yield handle.write(CHUNK - 10, b"x" * 20)
        yield handle.truncate(2 * CHUNK + 5)
        yield handle.write(4 * CHUNK, b"tail")
        expected[CHUNK - 10 : CHUNK + 10] = b"x" * 20
        del expected[2 * CHUNK + 5 :]
        expected.extend(bytes(4 * CHUNK - len(expected)) + b"tail")
        made = yield first.open_path("/new.bin", os.O_WRONLY | os.O_CREAT)
        yield made.write(0, pattern(5 * CHUNK + 7, 2))
        self.assertEqual(len(self.pending()), 2)
        yield self.crash(first)

        reader = yield self.filespace()
        self.assertEqual((yield reader.stat("/new.bin")).size, 0, "nothing was committed before the crash")

        second = yield self.client()
        outcomes = yield second.recover()
        self.assertEqual([outcome.committed for outcome in outcomes], [True, True], [str(o) for o in outcomes])
        self.assertEqual(self.pending(), [])
        self.assertEqual((yield reader.read_file("/old.bin")), bytes(expected))
        self.assertEqual((yield reader.read_file("/new.bin")), pattern(5 * CHUNK + 7, 2))
        self.assertEqual((yield second.recover()), [])

    @defer.inlineCallbacks
    def test_changed_file_keeps_the_journal(self) -> Generator[Deferred[Any], Any, None]:
        """If someone changed the file meanwhile, the writes are not merged: kept, and the reason given."""
        first = yield self.client()
        yield first.write_file("/shared.bin", b"original")
        handle = yield first.open_path("/shared.bin", os.O_RDWR)
        yield handle.write(0, b"mine")
        yield self.crash(first)
        other = yield self.filespace()
        yield other.write_file("/shared.bin", b"theirs, committed meanwhile")

        second = yield self.client()
        (outcome,) = yield second.recover()
        self.assertFalse(outcome.committed)
        self.assertIn("changed since these writes were made", outcome.reason)
        self.assertIn("NOT committed", str(outcome))
        assert outcome.kept is not None
        self.assertTrue(outcome.kept.exists())
        self.assertIn("changed since", outcome.kept.with_suffix(".why").read_text())
        kept = read_journal(outcome.kept, second.session.keys)
        self.assertEqual(kept.records, [Write(0, 0, b"mine")])
        self.assertEqual((yield other.read_file("/shared.bin")), b"theirs, committed meanwhile")
        self.assertEqual(self.pending(), [])

    @defer.inlineCallbacks
    def test_removed_file_keeps_the_journal(self) -> Generator[Deferred[Any], Any, None]:
        """A file removed meanwhile cannot take the writes: kept, saying so."""
        first = yield self.client()
        yield first.write_file("/gone.bin", b"original")
        handle = yield first.open_path("/gone.bin", os.O_RDWR)
        yield handle.write(3, b"more")
        yield self.crash(first)
        yield (yield self.filespace()).remove("/gone.bin")
        second = yield self.client()
        (outcome,) = yield second.recover()
        self.assertFalse(outcome.committed)
        self.assertIn("no longer exists", outcome.reason)

    @defer.inlineCallbacks
    def test_commit_before_the_crash_is_recognised(self) -> Generator[Deferred[Any], Any, None]:
        """A journal whose commit went through (the client died before removing it) is not a conflict."""
        first = yield self.client()
        self.patch(writeback.Journal, "remove", writeback.Journal.close)
        yield first.write_file("/done.bin", pattern(2 * CHUNK + 3, 4))
        self.assertEqual(len(self.pending()), 1)
        yield self.crash(first)
        second = yield self.client()
        (outcome,) = yield second.recover()
        self.assertTrue(outcome.committed)
        self.assertIn("committed before the restart", outcome.reason)
        self.assertEqual((yield second.read_file("/done.bin")), pattern(2 * CHUNK + 3, 4))

    @defer.inlineCallbacks
    def test_damaged_journal_is_kept(self) -> Generator[Deferred[Any], Any, None]:
        """A journal altered on disk is not replayed: kept, naming the damage."""
        first = yield self.client()
        handle = yield first.open_path("/f.bin", os.O_WRONLY | os.O_CREAT)
        yield handle.write(0, b"data" * 100)
        yield self.crash(first)
        (path,) = self.pending()
        data = bytearray(path.read_bytes())
        data[-5] ^= 1
        path.write_bytes(bytes(data))
        second = yield self.client()
        (outcome,) = yield second.recover()
        self.assertFalse(outcome.committed)
        self.assertIn("altered", outcome.reason)
        self.assertEqual((yield second.stat("/f.bin")).size, 0)

    @defer.inlineCallbacks
    def test_full_chunks_are_stored_in_the_background(self) -> Generator[Deferred[Any], Any, None]:
        """A sequential writer's finished chunks are stored before the flush; the flush stores the rest."""
        store = FaultyObjectStore(self.objects)
        fs = yield self.client(store)
        handle = yield fs.open_path("/seq.bin", os.O_WRONLY | os.O_CREAT)
        data = pattern(6 * CHUNK + 100, 5)
        for offset in range(0, len(data), 32 * 1024):
            yield handle.write(offset, data[offset : offset + 32 * 1024])
        yield task.deferLater(reactor, 0.5, lambda: None)
        puts_before_flush = [key for operation, key in store.calls if operation == "put"]
        self.assertEqual(len(puts_before_flush), 6, "the six full chunks, not the unfinished seventh")
        yield handle.close()
        puts = [key for operation, key in store.calls if operation == "put"]
        self.assertEqual(len(puts), 7)
        self.assertEqual((yield fs.read_file("/seq.bin")), data)
        self.assertEqual(self.pending(), [])
        yield fs.inodes.chunks.idle()  # the last chunk, stored from memory, is kept in the background
        self.assertEqual(len(fs.cache), 7, "what was stored is cached: reading it back is local")

    @defer.inlineCallbacks
    def test_rewritten_chunk_is_stored_again(self) -> Generator[Deferred[Any], Any, None]:
        """A chunk written again while its background store runs is stored again with its new content."""
        store = FaultyObjectStore(self.objects, clock=reactor)
        fs = yield self.client(store)
        handle = yield fs.open_path("/again.bin", os.O_RDWR | os.O_CREAT)
        store.set_delay(0.2)
        yield handle.write(0, b"a" * CHUNK + b"b")  # chunk 0 is full: its store begins
        yield handle.write(5, b"changed")
        store.heal()
        yield handle.close()
        expected = b"a" * 5 + b"changed" + b"a" * (CHUNK - 12) + b"b"
        self.assertEqual((yield fs.read_file("/again.bin")), expected)
        other = yield self.filespace()
        self.assertEqual((yield other.read_file("/again.bin")), expected)

    @defer.inlineCallbacks
    def test_writes_wait_out_a_metadata_outage(self) -> Generator[Deferred[Any], Any, None]:
        """With the metadata server gone, close waits; once it is back everything is committed."""
        session = yield self.login(deadline=None)
        fs = Filespace(session, self.objects, cache_dir=self.base / "cache")
        self.addCleanup(fs.close)
        handle = yield fs.open_path("/outage.bin", os.O_WRONLY | os.O_CREAT)
        yield handle.write(0, pattern(3 * CHUNK, 6))
        yield self.meta.stop()
        closing = handle.close()
        yield task.deferLater(reactor, 0.5, lambda: None)
        self.assertFalse(closing.called, "close returns only once the chunk map is committed")
        self.assertEqual(len(self.pending()), 1)
        yield self.meta.start()
        yield closing
        self.assertEqual(self.pending(), [])
        self.assertEqual((yield (yield self.filespace()).read_file("/outage.bin")), pattern(3 * CHUNK, 6))

    @defer.inlineCallbacks
    def test_chunks_stored_long_before_the_commit_are_stored_again(self) -> Generator[Deferred[Any], Any, None]:
        """After an outage longer than UPLOADS_FRESH_FOR, the commit names new uploads, not ones gc may have taken."""
        self.patch(filespace_module, "UPLOADS_FRESH_FOR", 0.3)
        store = FaultyObjectStore(self.objects)
        session = yield self.login(deadline=None)
        fs = Filespace(session, store, cache_dir=self.base / "cache")
        self.addCleanup(fs.close)
        handle = yield fs.open_path("/late.bin", os.O_WRONLY | os.O_CREAT)
        yield handle.write(0, pattern(2 * CHUNK, 7))
        yield self.meta.stop()
        closing = handle.close()
        yield task.deferLater(reactor, 0.6, lambda: None)
        early = {key for operation, key in store.calls if operation == "put"}
        self.assertEqual(len(early), 2)
        yield self.meta.start()
        yield closing
        stored = {key for operation, key in store.calls if operation == "put"}
        self.assertEqual(len(stored), 4, "both chunks were stored again")
        for key in early:  # what gc would do to uploads no chunk map names
            yield self.objects.delete(key)
        other = yield self.filespace()
        self.assertEqual((yield other.read_file("/late.bin")), pattern(2 * CHUNK, 7))

    @defer.inlineCallbacks
    def test_live_clients_keep_their_own_writes(self) -> Generator[Deferred[Any], Any, None]:
        """Two clients on one cache folder take separate slots; only a dead one's writes are taken over."""
        first = yield self.client()
        second = yield self.client()
        assert first.local_folder is not None and second.local_folder is not None
        self.assertNotEqual(first.local_folder.slot, second.local_folder.slot)
        handle = yield first.open_path("/live.bin", os.O_WRONLY | os.O_CREAT)
        yield handle.write(0, b"still being written")
        self.assertEqual((yield second.recover()), [], "a live client's journal is not replayed")
        self.assertEqual(len(self.pending()), 1)
        first_chunks = first.local_folder.chunks
        self.assertTrue(first_chunks.is_dir())
        yield self.crash(first)
        (outcome,) = yield second.recover()
        self.assertTrue(outcome.committed, str(outcome))
        self.assertEqual((yield second.read_file("/live.bin")), b"still being written")
        self.assertEqual(self.pending(), [])
        self.assertFalse(first_chunks.exists(), "the dead slot's cache is removed")

    @defer.inlineCallbacks
    def test_unreachable_servers_leave_writes_pending(self) -> Generator[Deferred[Any], Any, None]:
        """A recovery that cannot reach the metadata server keeps the writes pending for the next try."""
        first = yield self.client()
        handle = yield first.open_path("/later.bin", os.O_WRONLY | os.O_CREAT)
        yield handle.write(0, b"to be committed later")
        yield self.crash(first)
        session = yield self.login(deadline=0.5)
        second = Filespace(session, self.objects, cache_dir=self.base / "cache")
        self.addCleanup(second.close)
        yield self.meta.stop()
        (outcome,) = yield second.recover()
        self.assertFalse(outcome.committed)
        self.assertIsNone(outcome.kept)
        self.assertIn("stay pending", str(outcome))
        self.assertEqual(len(self.pending()), 1)
        yield self.meta.start()
        (outcome,) = yield second.recover()
        self.assertTrue(outcome.committed, str(outcome))
        self.assertEqual((yield second.read_file("/later.bin")), b"to be committed later")

    @defer.inlineCallbacks
    def test_reader_leaves_writes_pending(self) -> Generator[Deferred[Any], Any, None]:
        """
        A reader's client cannot commit a writer's writes left behind: they stay pending (not conflicts, nobody
        changed the file) for the next writer's client, which commits them.
        """
        first = yield self.client()
        yield first.session.add_user("rita", Role.READER, "rita's passphrase", kdf=cheap_kdf())
        handle = yield first.open_path("/left.bin", os.O_WRONLY | os.O_CREAT)
        yield handle.write(0, b"left by a writer")
        yield self.crash(first)
        session = yield self.login(user="rita", passphrase="rita's passphrase")
        reader = Filespace(session, self.objects, cache_dir=self.base / "cache")
        self.addCleanup(reader.close)
        (outcome,) = yield reader.recover()
        self.assertFalse(outcome.committed)
        self.assertIsNone(outcome.kept)
        self.assertIn("stay pending", str(outcome))
        self.assertIn("user 'rita' is a reader", str(outcome))
        self.assertEqual(len(self.pending()), 1)
        yield reader.close()
        second = yield self.client()
        (outcome,) = yield second.recover()
        self.assertTrue(outcome.committed, str(outcome))
        self.assertEqual((yield second.read_file("/left.bin")), b"left by a writer")


NAMES = (f"replayed-{number}".encode() for number in itertools.count())
step = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 4 * CHUNK), st.integers(1, 2 * CHUNK + 10), st.integers(0, 99)),
    st.tuples(st.just("truncate"), st.integers(0, 4 * CHUNK)),
    st.tuples(st.just("flush")),
)
steps = st.lists(step, max_size=10)
in_order = st.one_of(
    st.tuples(st.just("append"), st.integers(1, CHUNK + 10), st.integers(0, 99)),
    st.tuples(st.just("write"), st.integers(0, 4).map(lambda k: k * CHUNK), st.integers(1, 2 * CHUNK), st.integers(0, 99)),
)
staging_steps = st.lists(st.one_of(in_order, in_order, step), max_size=12)
"""More writes in order from a chunk's first byte (staged), among the rest; ``append`` writes at the end."""


class StagingTests(CacheFolderCase):
    """Chunks written in order are staged, stored by hard links, and recovered from their staged files."""

    chunk_size = 4 * crypto.BLOCK_SIZE

    def setUp(self) -> Any:
        self.patch(filespace_module, "STAGE_FROM", crypto.BLOCK_SIZE)
        return super().setUp()

    def staged(self) -> list[Path]:
        return sorted((self.base / "cache").rglob("pending/*.journal.*"))

    @defer.inlineCallbacks
    def write_in_order(self, handle: Any, data: bytes, piece: int = 32 * 1024) -> Generator[Deferred[Any], Any, None]:
        for offset in range(0, len(data), piece):
            yield handle.write(offset, data[offset : offset + piece])

    @defer.inlineCallbacks
    def test_chunks_written_in_order_are_stored_by_links(self) -> Generator[Deferred[Any], Any, None]:
        """Each whole chunk's staged file becomes its object and its cache entry: one copy on disk."""
        chunk = self.chunk_size
        fs = yield self.client()
        handle = yield fs.open_path("/staged.bin", os.O_WRONLY | os.O_CREAT)
        data = pattern(3 * chunk + 100, 8)
        yield self.write_in_order(handle, data)
        self.assertEqual(len(self.staged()), 3, "the last chunk holds less than a block")
        yield task.deferLater(reactor, 0.5, lambda: None)
        stored = yield self.objects.list(f"{self.filespace_id.hex()}/chunks/")
        self.assertEqual(len(stored), 3)
        for info in stored:
            path, _, size = self.objects.locate(info.key)
            self.assertEqual(size, crypto.sealed_chunk_size(chunk))
            self.assertEqual(path.stat().st_nlink, 3, "the object, the staged file and the cache entry")
        yield handle.close()
        self.assertEqual(self.staged(), [])
        yield fs.inodes.chunks.idle()  # the last chunk, stored from memory, is kept in the background
        self.assertEqual(len(fs.cache), 4)
        other = yield self.filespace()
        self.assertEqual((yield other.read_file("/staged.bin")), data)

    @defer.inlineCallbacks
    def test_staged_writes_survive_a_client_restart(self) -> Generator[Deferred[Any], Any, None]:
        """Staged chunks, a chunk no longer staged (written again) and the records after them are all recovered."""
        chunk = self.chunk_size
        first = yield self.client()
        handle = yield first.open_path("/crash.bin", os.O_RDWR | os.O_CREAT)
        expected = bytearray(pattern(2 * chunk + crypto.BLOCK_SIZE + 7, 9))
        yield self.write_in_order(handle, bytes(expected))
        yield handle.write(10, b"written again")
        expected[10:23] = b"written again"
        yield handle.write(chunk + 5, b"and again")
        expected[chunk + 5 : chunk + 14] = b"and again"
        self.assertEqual(len(self.staged()), 3)
        yield self.crash(first)
        yield task.deferLater(reactor, 0.3, lambda: None)  # what it was storing in the background is done

        second = yield self.client()
        (outcome,) = yield second.recover()
        self.assertTrue(outcome.committed, str(outcome))
        self.assertEqual(self.staged(), [])
        self.assertEqual((yield second.read_file("/crash.bin")), bytes(expected))

    @defer.inlineCallbacks
    def test_cut_chunk_is_sealed_anew(self) -> Generator[Deferred[Any], Any, None]:
        """A whole staged chunk cut shorter is stored from memory, not from its staged file."""
        chunk = self.chunk_size
        store = FaultyObjectStore(self.objects, clock=reactor)
        fs = yield self.client(store)
        handle = yield fs.open_path("/cut.bin", os.O_RDWR | os.O_CREAT)
        store.set_delay(0.2)
        data = pattern(chunk + 10, 10)
        yield self.write_in_order(handle, data)
        yield handle.truncate(chunk - 3)
        store.heal()
        yield handle.close()
        self.assertEqual((yield (yield self.filespace()).read_file("/cut.bin")), data[: chunk - 3])


class ReplayModelTests(MemoryFilespaceCase):
    """Whatever a handle did before its client died, the next client's replay leaves the file as a bytearray would be."""

    chunk_size = CHUNK

    @settings(max_examples=int(os.environ.get("LUCID_MODEL_EXAMPLES", 30)), deadline=None)
    @given(st.binary(max_size=3 * CHUNK), steps)
    def test_replay_matches_model(self, initial: bytes, changes: list[tuple[Any, ...]]) -> None:
        """Random writes, cuts and flushes, then a crash and a recovery: the file holds them all."""
        self.check_replay(initial, changes)

    def check_replay(self, initial: bytes, changes: list[tuple[Any, ...]]) -> None:
        cache_dir = Path(self.mktemp())
        name = next(NAMES)
        first = Filespace(self.fs.session, self.objects, cache_dir=cache_dir, offload=self.fs.inodes.offload)
        handle = self.now(first.inodes.create(1, name, 0o644, os.O_RDWR | os.O_CREAT | os.O_EXCL))
        self.now(handle.write(0, initial))
        self.now(handle.flush())
        model = bytearray(initial)
        for step in changes:
            if step[0] == "append":
                step = ("write", len(model), *step[1:])
            self.now(change(handle, model, step) or handle.flush())
        if handle.file._journal is not None:
            handle.file._journal.close()  # the client dies here
        self.now(first.close())

        second = Filespace(self.fs.session, self.objects, cache_dir=cache_dir, offload=self.fs.inodes.offload)
        outcomes = self.now(second.recover())
        self.assertTrue(all(outcome.committed for outcome in outcomes), [str(o) for o in outcomes])
        reader = self.now(second.inodes.open(handle.inode))
        self.assertEqual(self.now(reader.read(0, len(model) + CHUNK)), bytes(model))
        self.now(reader.close())
        self.now(second.close())


class StagedReplayModelTests(MemoryFilespaceCase):
    """The same, with every chunk appended to from empty staged from its first block."""

    chunk_size = CHUNK
    check_replay = ReplayModelTests.check_replay

    @settings(max_examples=int(os.environ.get("LUCID_MODEL_EXAMPLES", 30)), deadline=None)
    @given(st.binary(max_size=3 * CHUNK), staging_steps)
    def test_staged_replay_matches_model(self, initial: bytes, changes: list[tuple[Any, ...]]) -> None:
        """Random writes, cuts and flushes, then a crash and a recovery: the file holds them all."""
        with patched(filespace_module, "STAGE_FROM", crypto.BLOCK_SIZE):
            self.check_replay(initial, changes)


    def test_cut_between_appends(self) -> None:
        """A cut (even one that grows the file) stops staging: the appends after it are records after it."""
        block = crypto.BLOCK_SIZE
        with patched(filespace_module, "STAGE_FROM", block):
            self.check_replay(b"", [
                ("write", 0, block + 1000, 1), ("truncate", block + 2000), ("write", block + 1000, block - 1000, 2),
            ])
            self.check_replay(b"", [("write", 0, block + 1000, 1), ("truncate", 10), ("append", 2 * block, 2)])
            self.check_replay(b"", [("write", 4 * CHUNK, CHUNK - 9, 0), ("append", CHUNK + 10, 0)])


@contextlib.contextmanager
def patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    """``owner.name`` is ``value`` inside (``TestCase.patch`` lasts the whole test, not one example)."""
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


class _ShortThenFull:
    """``os`` as the journal sees it, whose next ``write`` takes half the bytes and then finds the disk full."""

    def __init__(self) -> None:
        self.armed = True

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)

    def write(self, descriptor: int, data: Any) -> int:
        if not self.armed:
            return os.write(descriptor, data)
        self.armed = False
        os.write(descriptor, bytes(memoryview(data)[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")


class FullJournalTests(SynchronousTestCase):
    """A record the disk had no room for leaves nothing behind: the records after it read back."""

    def test_failed_record_is_not_left_torn(self) -> None:
        """Half a record written before ENOSPC is taken back, so later records are not read as its rest."""
        journals = WriteBackJournals(Path(self.mktemp()), KEYS)
        journal = journals.begin(inode=4, version=1)
        journal.write(0, 0, b"before")
        self.patch(writeback, "os", _ShortThenFull())
        with self.assertRaises(errors.NoSpace):
            journal.write(0, 6, b"refused" * 100)
        journal.write(0, 6, b"after")
        journal.close()
        self.assertEqual(read_journal(journal.path, KEYS).records, [Write(0, 0, b"before"), Write(0, 6, b"after")])


    def test_journal_begun_on_a_full_disk_leaves_no_file(self) -> None:
        """A journal whose header found no room is not left behind (it would read as damaged at the next start)."""
        journals = WriteBackJournals(Path(self.mktemp()), KEYS)
        self.patch(writeback, "os", _ShortThenFull())
        with self.assertRaises(errors.NoSpace):
            journals.begin(inode=4, version=1)
        self.assertEqual(journals.pending_paths(), [])

    def test_failed_staged_blocks_are_not_left(self) -> None:
        """Blocks of a staged chunk's write that ENOSPC cut short are taken back: a replay has none of them."""
        block = crypto.BLOCK_SIZE
        data = pattern(4 * block, 14)
        journals = WriteBackJournals(Path(self.mktemp()), KEYS)
        journal = journals.begin(inode=4, version=1)
        staged = journal.stage(0, len(data))
        staged.add(data[:block])
        shim = _ShortThenFull()

        def pwritev(descriptor: int, pieces: list[bytes], offset: int) -> int:
            os.lseek(descriptor, offset, os.SEEK_SET)
            return shim.write(descriptor, b"".join(pieces))

        shim.pwritev = pwritev  # type: ignore[attr-defined]
        self.patch(writeback, "os", shim)
        with self.assertRaises(errors.NoSpace):
            staged.add(data[: 4 * block])
        journal.close()
        self.assertEqual(read_journal(journal.path, KEYS).records, [Write(0, 0, data[:block])])


class FullDiskTests(MemoryFilespaceCase):
    """A write refused for want of room (NoSpace) changes nothing: not the buffer, not the journal, not the file."""

    chunk_size = 4 * crypto.BLOCK_SIZE

    def client(self, cache_dir: Path) -> Filespace:
        return Filespace(self.fs.session, self.objects, cache_dir=cache_dir, offload=self.fs.inodes.offload)

    def open_file(self, fs: Filespace) -> Any:
        return self.now(fs.inodes.create(1, next(NAMES), 0o644, os.O_RDWR | os.O_CREAT | os.O_EXCL))

    def disk_full(self, handle: Any, new_journals_too: bool = True) -> Any:
        """
        Writes of the handle's journal fail with ENOSPC until the returned function is called, and so does
        beginning a new one (``new_journals_too``; else a commit makes room).
        """
        journal = handle.file._journal
        descriptor = journal._descriptor
        journal._descriptor = os.open("/dev/full", os.O_WRONLY)
        journals = handle.file._inodes.journals

        def no_room(inode: int, version: int) -> Any:
            raise errors.NoSpace("no room left for a new write-back journal")

        if new_journals_too:
            journals.begin = no_room

        def room_again() -> None:
            if journal._descriptor is None:  # a commit to make room removed the journal meanwhile
                os.close(descriptor)
            else:
                os.close(journal._descriptor)
                journal._descriptor = descriptor
            journals.__dict__.pop("begin", None)

        return room_again

    def test_failed_write_leaves_no_bytes(self) -> None:
        """Bytes of a refused write never show, even once the file grows over them; directly or not."""
        for direct in (False, True):
            handle = self.open_file(self.client(Path(self.mktemp())))
            self.now(handle.write(0, b"a" * 100))
            self.now(handle.read(0, 1))
            room_again = self.disk_full(handle)
            if direct:
                self.assertIsNone(handle.write_direct(100, b"b" * 100), "left to the reactor, which can commit")
            self.assertIsInstance(self.failureResultOf(handle.write(100, b"b" * 100)).value, errors.NoSpace)
            room_again()
            self.now(handle.truncate(300))
            self.assertEqual(self.now(handle.read(0, 300)), b"a" * 100 + bytes(200))

    def test_failed_overwrite_of_a_whole_chunk_keeps_the_stored_one(self) -> None:
        """A refused write of a whole stored chunk does not commit that chunk as empty."""
        chunk = self.chunk_size
        for direct in (False, True):
            handle = self.open_file(self.client(Path(self.mktemp())))
            stored = pattern(chunk + 10, 11)
            self.now(handle.write(0, stored))
            self.now(handle.flush())
            self.now(handle.write(chunk + 10, b"tail"))
            self.now(handle.read(0, 1))
            room_again = self.disk_full(handle)
            if direct:
                self.assertIsNone(handle.write_direct(0, b"x" * chunk), "left to the reactor, which can commit")
            self.assertIsInstance(self.failureResultOf(handle.write(0, b"x" * chunk)).value, errors.NoSpace)
            room_again()
            self.now(handle.close())
            reader = self.now(self.fs.inodes.open(handle.inode))
            self.assertEqual(self.now(reader.read(0, 2 * chunk)), stored + b"tail")
            self.now(reader.close())

    def test_refused_write_is_not_replayed_from_a_staged_block(self) -> None:
        """A block sealed into a staged chunk for a write then refused is not in the file after a crash."""
        block = crypto.BLOCK_SIZE
        cache_dir = Path(self.mktemp())
        with patched(filespace_module, "STAGE_FROM", block):
            first = self.client(cache_dir)
            handle = self.open_file(first)
            kept = pattern(block + 10, 12)
            self.now(handle.write(0, kept))
            self.assertIsNotNone(handle.file._dirty[0].staged)
            room_again = self.disk_full(handle)
            handle.file._make_room = lambda full, wanted: defer.fail(full)  # the commit that would make room fails too: the journal stays
            self.assertIsInstance(self.failureResultOf(handle.write(block + 10, b"r" * block)).value, errors.NoSpace)
            room_again()
            handle.file._journal.close()  # the client dies here
            self.now(first.close())
        second = self.client(cache_dir)
        outcomes = self.now(second.recover())
        self.assertTrue(outcomes and all(outcome.committed for outcome in outcomes), [str(o) for o in outcomes])
        reader = self.now(second.inodes.open(handle.inode))
        self.assertEqual(self.now(reader.read(0, 3 * block)), kept)
        self.now(reader.close())
        self.now(second.close())

    def test_full_journal_disk_commits_early(self) -> None:
        """
        A write the journal has no room for commits what is buffered (its journal then goes) and is made after
        all; directly it is left to the reactor, which can commit.
        """
        for direct in (False, True):
            handle = self.open_file(self.client(Path(self.mktemp())))
            self.now(handle.write(0, b"a" * 100))
            self.now(handle.read(0, 1))
            self.disk_full(handle, new_journals_too=False)
            if direct:
                self.assertIsNone(handle.write_direct(100, b"b" * 100))
            self.assertEqual(self.now(handle.write(100, b"b" * 100)), 100)
            reader = self.now(self.fs.inodes.open(handle.inode))
            self.assertEqual(self.now(reader.read(0, 300)), b"a" * 100, "committed before the write")
            self.now(reader.close())
            self.now(handle.close())
            reader = self.now(self.fs.inodes.open(handle.inode))
            self.assertEqual(self.now(reader.read(0, 300)), b"a" * 100 + b"b" * 100)
            self.now(reader.close())

    def test_full_journal_disk_commits_before_a_cut(self) -> None:
        """A cut the journal has no room for commits what is buffered first, and is made."""
        handle = self.open_file(self.client(Path(self.mktemp())))
        self.now(handle.write(0, b"a" * 100))
        self.now(handle.read(0, 1))
        self.disk_full(handle, new_journals_too=False)
        self.now(handle.truncate(50))
        self.assertEqual(self.now(handle.read(0, 100)), b"a" * 50)
        self.now(handle.close())
        reader = self.now(self.fs.inodes.open(handle.inode))
        self.assertEqual(self.now(reader.read(0, 200)), b"a" * 50)
        self.now(reader.close())

    def test_full_journal_disk_takes_room_from_the_chunk_cache(self) -> None:
        """A first write that finds no room for a journal has the chunk cache give back room, and is made."""
        fs = self.client(Path(self.mktemp()))
        cache = fs.inodes.chunks.cache
        cache.store(b"\x01" * 16, 10, 0, crypto.seal_chunk(KEYS, 9, 0, bytes(10)))
        handle = self.open_file(fs)
        journals, begin = fs.inodes.journals, fs.inodes.journals.begin

        def begin_once_there_is_room(inode: int, version: int) -> Any:
            if len(cache):
                raise errors.NoSpace("no room left for a new write-back journal")
            return begin(inode, version)

        journals.begin = begin_once_there_is_room
        self.assertEqual(self.now(handle.write(0, b"a" * 100)), 100)
        self.assertEqual(len(cache), 0)
        self.now(handle.close())
        reader = self.now(self.fs.inodes.open(handle.inode))
        self.assertEqual(self.now(reader.read(0, 200)), b"a" * 100)
        self.now(reader.close())

    def test_refused_write_of_a_staged_chunk_leaves_no_bytes(self) -> None:
        """A write whose staged blocks and records both find the disk full is refused (NoSpace), its bytes gone."""
        block = crypto.BLOCK_SIZE
        with patched(filespace_module, "STAGE_FROM", block):
            for direct in (False, True):
                handle = self.open_file(self.client(Path(self.mktemp())))
                kept = pattern(block + 10, 15)
                self.now(handle.write(0, kept))
                self.assertIsNotNone(handle.file._dirty[0].staged)
                room_again = self.disk_full(handle)

                def no_room(*arguments: Any) -> None:
                    raise OSError(errno.ENOSPC, "No space left on device")

                with patched(writeback, "_write_all", no_room):
                    if direct:
                        self.assertIsNone(handle.write_direct(block + 10, b"r" * block))
                    failure = self.failureResultOf(handle.write(block + 10, b"r" * block))
                    self.assertIsInstance(failure.value, errors.NoSpace)
                room_again()
                self.assertEqual(handle.size, len(kept))
                self.now(handle.truncate(3 * block))
                self.assertEqual(self.now(handle.read(0, 3 * block)), kept + bytes(3 * block - len(kept)))
                self.now(handle.close())

    def test_write_across_chunks_is_cut_short(self) -> None:
        """A write refused in its second chunk is a short write of the first: its count, size and bytes agree."""
        chunk = self.chunk_size
        self.patch(filespace_module, "STAGE_FROM", 10 * chunk)
        data = pattern(chunk + 100, 13)
        for direct in (False, True):
            handle = self.open_file(self.client(Path(self.mktemp())))
            self.now(handle.write(0, b"."))
            self.now(handle.read(0, 1))
            journal = handle.file._journal
            calls = itertools.count()

            def write_once(index: int, offset: int, piece: Any, journal: Any = journal, calls: Any = calls) -> None:
                if next(calls):
                    raise errors.NoSpace("the disk is full")
                writeback.Journal.write(journal, index, offset, piece)

            journal.write = write_once
            written = handle.write_direct(0, data) if direct else self.now(handle.write(0, data))
            self.assertEqual(written, chunk)
            self.assertEqual(handle.size, chunk)
            del journal.write
            self.now(handle.truncate(2 * chunk))
            self.assertEqual(self.now(handle.read(0, 2 * chunk)), data[:chunk] + bytes(chunk))
            self.now(handle.close())
