"""
The journal segment format: a round trip, and every kind of damage named.
"""

from __future__ import annotations

import hashlib

from twisted.trial.unittest import SynchronousTestCase

from lucidlink.meta.journal import GENESIS_HASH, Entry, chain_hash
from lucidlink.meta.segments import (
    CHECKSUM_SIZE,
    MAGIC,
    SegmentError,
    build_segment,
    parse_segment,
    parse_segment_key,
    salvage_segment,
    segment_key,
)


def chain(count: int, first: int = 1, prev: bytes = GENESIS_HASH) -> list[Entry]:
    """``count`` chained entries starting at ``first``."""
    entries = []
    for seq in range(first, first + count):
        record = b'{"kind": "r%d"}' % seq
        prev = chain_hash(prev, seq, record)
        entries.append(Entry(seq, 1_000 + seq, record, prev))
    return entries


def reseal(body: bytes) -> bytes:
    """``body`` with a fresh, valid checksum: damage the checksum cannot catch."""
    return body + hashlib.sha256(body).digest()


class SegmentFormatTests(SynchronousTestCase):
    """Building and parsing segments."""

    def test_round_trip(self) -> None:
        """What is built parses back to the same records, range and prev hash."""
        entries = chain(3, first=5, prev=b"p" * 32)
        segment = parse_segment(build_segment(b"demo", b"p" * 32, entries), b"demo")
        self.assertEqual((segment.first_seq, segment.last_seq, segment.prev_hash), (5, 7, b"p" * 32))
        self.assertEqual(segment.entries, entries)
        self.assertEqual(segment.filespace_id, b"demo")

    def test_layout(self) -> None:
        """The header is magic, version, filespace id, range and prev hash; the checksum ends it."""
        data = build_segment(b"fs", GENESIS_HASH, chain(1))
        self.assertEqual(data[:8], MAGIC)
        self.assertEqual(data[8], 1)
        self.assertEqual(data[9:13], b"\x00\x02fs")
        self.assertEqual(data[13:29], (1).to_bytes(8, "big") * 2)
        self.assertEqual(data[-CHECKSUM_SIZE:], hashlib.sha256(data[:-CHECKSUM_SIZE]).digest())

    def test_empty_segment_is_not_built(self) -> None:
        self.assertRaises(ValueError, build_segment, b"fs", GENESIS_HASH, [])

    def test_bad_magic(self) -> None:
        data = build_segment(b"fs", GENESIS_HASH, chain(2))
        error = self.assertRaises(SegmentError, parse_segment, b"NOTASEG!" + data[8:])
        self.assertIn("bad magic", str(error))

    def test_unknown_version(self) -> None:
        data = build_segment(b"fs", GENESIS_HASH, chain(2))
        error = self.assertRaises(SegmentError, parse_segment, reseal(data[:8] + b"\x09" + data[9:-CHECKSUM_SIZE]))
        self.assertIn("version 9", str(error))

    def test_checksum_mismatch(self) -> None:
        """One flipped bit anywhere is a checksum mismatch."""
        data = build_segment(b"fs", GENESIS_HASH, chain(3))
        for position in (20, len(data) // 2, len(data) - 40, len(data) - 1):
            damaged = bytearray(data)
            damaged[position] ^= 0x01
            error = self.assertRaises(SegmentError, parse_segment, bytes(damaged))
            self.assertIn("checksum mismatch", str(error))

    def test_truncated(self) -> None:
        data = build_segment(b"fs", GENESIS_HASH, chain(3))
        for length in (0, 5, 40, len(data) - 1):
            self.assertRaises(SegmentError, parse_segment, data[:length])

    def test_trailing_bytes(self) -> None:
        data = build_segment(b"fs", GENESIS_HASH, chain(2))
        error = self.assertRaises(SegmentError, parse_segment, reseal(data[:-CHECKSUM_SIZE] + b"xx"))
        self.assertIn("stray bytes", str(error))

    def test_broken_chain_names_the_sequence(self) -> None:
        """A record altered and resealed is caught by the chain, at its sequence."""
        entries = chain(4)
        entries[2] = Entry(3, entries[2].time_ns, b'{"kind": "forged"}', entries[2].hash)
        error = self.assertRaises(SegmentError, parse_segment, build_segment(b"fs", GENESIS_HASH, entries))
        self.assertIn("broken chain at seq 3", str(error))
        self.assertEqual(error.seq, 3)

    def test_wrong_prev_hash(self) -> None:
        """A segment whose first record does not follow its stated prev hash is refused at its first seq."""
        error = self.assertRaises(SegmentError, parse_segment, build_segment(b"fs", b"x" * 32, chain(2)))
        self.assertIn("broken chain at seq 1", str(error))

    def test_range_mismatch(self) -> None:
        entries = chain(3)
        data = build_segment(b"fs", GENESIS_HASH, entries)
        body = data[:13] + (1).to_bytes(8, "big") + (9).to_bytes(8, "big") + data[29:-CHECKSUM_SIZE]
        self.assertIn("holds 3 records", str(self.assertRaises(SegmentError, parse_segment, reseal(body))))

    def test_wrong_filespace(self) -> None:
        data = build_segment(b"one", GENESIS_HASH, chain(1))
        self.assertRaises(SegmentError, parse_segment, data, b"two")

    def test_salvage_keeps_the_chained_prefix(self) -> None:
        """A damaged segment gives back exactly the records before the damage, which the chain vouches for."""
        entries = chain(4)
        data = bytearray(build_segment(b"fs", GENESIS_HASH, entries))
        third = bytes(data).index(entries[2].record)
        data[third + 3] ^= 0x01
        salvage = salvage_segment(bytes(data), 0, GENESIS_HASH)
        self.assertEqual(salvage.entries, entries[:2])
        self.assertIn("checksum mismatch", salvage.problem)
        self.assertEqual(salvage_segment(build_segment(b"fs", GENESIS_HASH, entries), 2, entries[1].hash).entries,
                         entries[2:])

    def test_keys(self) -> None:
        """Keys sort by sequence and parse back; other keys are not segments."""
        key = segment_key("demo", 1, 250)
        self.assertEqual(key, "demo/journal/00000000000000000001-00000000000000000250.seg")
        self.assertEqual(parse_segment_key("demo", key), (1, 250))
        self.assertIsNone(parse_segment_key("demo", "demo/journal/junk"))
        self.assertIsNone(parse_segment_key("other", key))
        self.assertLess(segment_key("demo", 9, 9), segment_key("demo", 10, 10))
