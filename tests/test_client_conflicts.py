"""
Kept write-back journals: listed, saved as a new file (the file as it is now
with the journal's writes laid over it), or discarded; damaged ones can only
be discarded; a failed save keeps the journal.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import Deferred

from lucidlink import errors
from lucidlink.client import conflicts
from lucidlink.client.filespace import Filespace
from tests.client_helpers import CacheFolderCase

CHUNK = 64 * 1024


class ConflictTests(CacheFolderCase):
    """Journals kept because their file changed, or went, while the client that wrote them was down."""

    chunk_size = CHUNK

    def root(self, fs: Filespace) -> Path:
        return self.base / "cache" / fs.session.filespace_id.hex()

    @defer.inlineCallbacks
    def conflict(self, path: str = "/shared.bin") -> Generator[Deferred[Any], Any, Filespace]:
        """A client writes ``path`` and dies; another commits ``path`` meanwhile; the next keeps the journal."""
        first = yield self.client()
        yield first.write_file(path, b"original content")
        handle = yield first.open_path(path, os.O_RDWR)
        yield handle.write(0, b"MINE")
        yield handle.write(2 * CHUNK, b"far out")
        yield self.crash(first)
        other = yield self.filespace()
        yield other.write_file(path, b"theirs, committed meanwhile")
        second = yield self.client()
        (outcome,) = yield second.recover()
        self.assertFalse(outcome.committed)
        return second

    @defer.inlineCallbacks
    def test_listed_with_what_and_why(self) -> Generator[Deferred[Any], Any, None]:
        fs = yield self.conflict()
        (kept,) = conflicts.kept_journals(self.root(fs), fs.session.keys)
        self.assertRegex(kept.id, r"^\d+:\d+-\d+$")
        self.assertEqual((kept.writes, kept.written, kept.truncations), (2, 11, 0))
        self.assertIn("changed since these writes were made", kept.why)
        self.assertIn("2 writes (11 bytes)", kept.summary)
        self.assertEqual(conflicts.find_journal(self.root(fs), fs.session.keys, kept.id), kept)

    @defer.inlineCallbacks
    def test_saved_as_a_new_file(self) -> Generator[Deferred[Any], Any, None]:
        """The new file is the file as it is now with the writes laid over; the journal is gone after."""
        fs = yield self.conflict()
        (kept,) = conflicts.kept_journals(self.root(fs), fs.session.keys)
        size = yield conflicts.save_as(fs, kept, "/shared (saved).bin")
        now = b"theirs, committed meanwhile"
        expected = b"MINE" + now[4:] + bytes(2 * CHUNK - len(now)) + b"far out"
        self.assertEqual(size, len(expected))
        reader = yield self.filespace()
        self.assertEqual((yield reader.read_file("/shared (saved).bin")), expected)
        self.assertEqual((yield reader.read_file("/shared.bin")), now, "the file itself is left alone")
        self.assertEqual(conflicts.kept_journals(self.root(fs), fs.session.keys), [])
        self.assertFalse(kept.path.with_suffix(".why").exists())

    @defer.inlineCallbacks
    def test_file_gone_saves_the_writes_alone(self) -> Generator[Deferred[Any], Any, None]:
        first = yield self.client()
        yield first.write_file("/gone.bin", b"x" * 100)
        handle = yield first.open_path("/gone.bin", os.O_RDWR)
        yield handle.write(10, b"mine")
        yield handle.truncate(20)
        yield self.crash(first)
        other = yield self.filespace()
        yield other.remove("/gone.bin")
        second = yield self.client()
        yield second.recover()
        (kept,) = conflicts.kept_journals(self.root(second), second.session.keys)
        self.assertEqual(kept.truncations, 1)
        yield conflicts.save_as(second, kept, "/recovered.bin")
        self.assertEqual((yield other.read_file("/recovered.bin")), bytes(10) + b"mine" + bytes(6))

    @defer.inlineCallbacks
    def test_existing_target_refused_and_journal_kept(self) -> Generator[Deferred[Any], Any, None]:
        fs = yield self.conflict()
        (kept,) = conflicts.kept_journals(self.root(fs), fs.session.keys)
        with self.assertRaises(errors.AlreadyExists):
            yield conflicts.save_as(fs, kept, "/shared.bin")
        self.assertTrue(kept.path.exists())

    @defer.inlineCallbacks
    def test_damaged_journal_can_only_be_discarded(self) -> Generator[Deferred[Any], Any, None]:
        fs = yield self.conflict()
        (kept,) = conflicts.kept_journals(self.root(fs), fs.session.keys)
        data = bytearray(kept.path.read_bytes())
        data[-3] ^= 0xFF
        kept.path.write_bytes(bytes(data))
        (damaged,) = conflicts.kept_journals(self.root(fs), fs.session.keys)
        self.assertIn("damaged", damaged.summary)
        with self.assertRaises(errors.IntegrityError):
            yield conflicts.save_as(fs, damaged, "/never.bin")
        with self.assertRaises(errors.NotFound):
            yield (yield self.filespace()).resolve("/never.bin")
        conflicts.discard(damaged)
        self.assertEqual(conflicts.kept_journals(self.root(fs), fs.session.keys), [])

    @defer.inlineCallbacks
    def test_unknown_and_malformed_names(self) -> Generator[Deferred[Any], Any, None]:
        fs = yield self.conflict()
        with self.assertRaises(errors.NotFound):
            conflicts.find_journal(self.root(fs), fs.session.keys, "9:999-1")
        with self.assertRaises(errors.InvalidArgument):
            conflicts.find_journal(self.root(fs), fs.session.keys, "../../etc/passwd")
        self.assertEqual(conflicts.kept_journals(self.base / "nowhere", fs.session.keys), [])
