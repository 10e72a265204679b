"""
Journal segments: a run of journal records as one immutable object.

A segment is declared with construct in the style of
:mod:`lucidlink.protocol.messages` (all integers big-endian)::

    magic          8 bytes   b"LUCIDSEG"
    version        u8        FORMAT_VERSION
    filespace_id   u16 length, bytes
    first_seq      u64
    last_seq       u64
    prev_hash      32 bytes  the chain hash before first_seq
    records        u32 count, then each:
        seq        u64
        time_ns    i64
        record     u32 length, bytes (the encoded mutation)
        hash       32 bytes (chain hash after this record)
    checksum       32 bytes  SHA-256 of every byte before it

:func:`parse_segment` checks, in order, the magic, the version, the checksum,
the structure, the sequence range and the hash chain, and raises
:class:`SegmentError` saying which failed (``broken chain at seq N``).
:func:`salvage_segment` returns the records of a damaged segment whose hashes
still chain from ``prev_hash`` — each is authenticated by the chain alone —
so a restore can stop at the last good record rather than at the segment.

Segments live at ``<filespace>/journal/<first seq>-<last seq>.seg`` (both
zero-padded to 20 digits so keys sort by sequence), written create-only.
"""

from __future__ import annotations

import hashlib
import io
import re
from dataclasses import dataclass, field

import construct as c

from lucidlink.errors import IntegrityError
from lucidlink.meta.journal import HASH_SIZE, ChainError, Entry, verify_chain
from lucidlink.protocol.records import ListOf, Record, wire

MAGIC = b"LUCIDSEG"
FORMAT_VERSION = 1
CHECKSUM_SIZE = 32
SEQ_DIGITS = 20

U8, U16, U32, U64 = c.Int8ub, c.Int16ub, c.Int32ub, c.Int64ub
Hash = c.Bytes(HASH_SIZE)

_KEY = re.compile(r"(?P<first>\d{20})-(?P<last>\d{20})\.seg")


class SegmentError(IntegrityError):
    """A segment is not what it should be; ``seq`` is the first record at fault, if one is."""

    def __init__(self, message: str, seq: int | None = None) -> None:
        super().__init__(message)
        self.seq = seq


@dataclass
class SegmentRecord:
    """One journal record inside a segment."""

    seq: int = wire(U64)
    time_ns: int = wire(c.Int64sb)
    record: bytes = wire(c.Prefixed(U32, c.GreedyBytes))
    hash: bytes = wire(Hash)


SEGMENT_RECORD = Record(SegmentRecord)


@dataclass
class Segment:
    """A run of consecutive journal records of one filespace."""

    magic: bytes = wire(c.Bytes(len(MAGIC)))
    version: int = wire(U8)
    filespace_id: bytes = wire(c.Prefixed(U16, c.GreedyBytes))
    first_seq: int = wire(U64)
    last_seq: int = wire(U64)
    prev_hash: bytes = wire(Hash)
    records: list[SegmentRecord] = wire(ListOf(U32, SEGMENT_RECORD), default_factory=list)

    @property
    def entries(self) -> list[Entry]:
        return [Entry(r.seq, r.time_ns, r.record, r.hash) for r in self.records]


SEGMENT = Record(Segment)


@dataclass(frozen=True)
class Salvage:
    """What :func:`salvage_segment` could trust of a damaged segment."""

    entries: list[Entry] = field(default_factory=list)
    problem: str = ""


def build_segment(filespace_id: bytes, prev_hash: bytes, entries: list[Entry]) -> bytes:
    """The bytes of the segment holding ``entries`` (consecutive, non-empty) after ``prev_hash``."""
    if not entries:
        raise ValueError("a segment holds at least one record")
    body = SEGMENT.build(Segment(
        MAGIC, FORMAT_VERSION, filespace_id, entries[0].seq, entries[-1].seq, prev_hash,
        [SegmentRecord(e.seq, e.time_ns, e.record, e.hash) for e in entries],
    ))
    return body + hashlib.sha256(body).digest()


def _header(data: bytes) -> None:
    if len(data) >= len(MAGIC) and data[:len(MAGIC)] != MAGIC:
        raise SegmentError(f"bad magic {data[:len(MAGIC)]!r}: not a journal segment")
    if len(data) < len(MAGIC) + 1 + CHECKSUM_SIZE:
        raise SegmentError(f"truncated: {len(data)} bytes is too short for a segment")
    version = data[len(MAGIC)]
    if version != FORMAT_VERSION:
        raise SegmentError(f"unknown segment format version {version} (this code reads {FORMAT_VERSION})")


def _structure(data: bytes) -> Segment:
    _header(data)
    stream = io.BytesIO(data[:-CHECKSUM_SIZE])
    try:
        segment: Segment = SEGMENT.parse_stream(stream)
        used = stream.tell()
    except (c.ConstructError, ValueError) as error:
        raise SegmentError(f"malformed segment: {error}") from None
    if used != len(data) - CHECKSUM_SIZE:
        raise SegmentError(f"malformed segment: {len(data) - CHECKSUM_SIZE - used} stray bytes before the checksum")
    return segment


def parse_segment(data: bytes, filespace_id: bytes | None = None) -> Segment:
    """Parse and fully check segment bytes.

    :raise SegmentError: naming the first thing wrong: bad magic, unknown
        version, checksum mismatch, malformed structure, wrong filespace,
        sequence range, or ``broken chain at seq N``.
    """
    data = bytes(data)
    _header(data)
    if hashlib.sha256(data[:-CHECKSUM_SIZE]).digest() != data[-CHECKSUM_SIZE:]:
        raise SegmentError("checksum mismatch: the segment was altered or damaged")
    segment = _structure(data)
    _check(segment, filespace_id)
    return segment


def _check(segment: Segment, filespace_id: bytes | None) -> None:
    if filespace_id is not None and segment.filespace_id != filespace_id:
        raise SegmentError(f"segment of filespace id {segment.filespace_id.hex()}, not {filespace_id.hex()}")
    if not segment.records:
        raise SegmentError("a segment holds no records")
    if segment.first_seq < 1 or segment.last_seq - segment.first_seq + 1 != len(segment.records):
        raise SegmentError(f"segment says seq {segment.first_seq} to {segment.last_seq} but holds "
                           f"{len(segment.records)} records")
    try:
        verify_chain(segment.entries, segment.prev_hash, segment.first_seq - 1)
    except ChainError as error:
        raise SegmentError(str(error), error.seq) from None
    if segment.records[-1].seq != segment.last_seq:
        raise SegmentError(f"segment says it ends at seq {segment.last_seq} but ends at {segment.records[-1].seq}")


def salvage_segment(data: bytes, prev_seq: int, prev_hash: bytes) -> Salvage:
    """The records of ``data`` that chain on from record ``prev_seq`` (hash ``prev_hash``).

    Never raises: a segment too damaged to parse salvages nothing.  The
    chain hash authenticates each record returned, checksum or not.
    """
    try:
        segment = parse_segment(data)
        problem = ""
    except SegmentError as error:
        problem = str(error)
        try:
            segment = _structure(bytes(data))
        except SegmentError:
            return Salvage([], problem)
    good: list[Entry] = []
    for entry in segment.entries:
        if entry.seq <= prev_seq:
            continue
        try:
            prev_seq, prev_hash = verify_chain([entry], prev_hash, prev_seq)
        except ChainError as error:
            return Salvage(good, problem or str(error))
        good.append(entry)
    return Salvage(good, problem)


def segment_prefix(filespace: str) -> str:
    """Where the segments of ``filespace`` live in the object store."""
    return f"{filespace}/journal/"


def segment_key(filespace: str, first_seq: int, last_seq: int) -> str:
    """The object key of the segment holding ``first_seq`` to ``last_seq``."""
    return f"{segment_prefix(filespace)}{first_seq:0{SEQ_DIGITS}d}-{last_seq:0{SEQ_DIGITS}d}.seg"


def parse_segment_key(filespace: str, key: str) -> tuple[int, int] | None:
    """``(first_seq, last_seq)`` of a segment key, or None if ``key`` is not one."""
    prefix = segment_prefix(filespace)
    if not key.startswith(prefix):
        return None
    match = _KEY.fullmatch(key[len(prefix):])
    if match is None:
        return None
    return int(match["first"]), int(match["last"])
