"""
The journal: every metadata change, in order, hash-chained, in the database itself.

:class:`Journal` is the store's journal hook.  Inside the transaction of each
mutation it appends one row to the ``journal`` table: the sequence number
(1, 2, 3, …), the time, the encoded completed record
(:func:`lucidlink.meta.mutations.encode`) and a SHA-256 hash chained to the
previous row's::

    hash = SHA-256(prev_hash || seq as 8 bytes big-endian || record bytes)

with ``prev_hash`` of the first record :data:`GENESIS_HASH` (32 zero bytes).
The change and its journal row commit together or not at all, so the table
is exactly the list of changes the database has seen.  In a group commit
(:meth:`lucidlink.meta.store.MetadataStore.group`) each row is written in
its mutation's savepoint: a refused mutation takes its row back with it, and
the next one takes the same sequence number, so the chain has no gap.  The shipper
(:mod:`lucidlink.meta.shipper`) copies rows to the object store in segments;
restore (:mod:`lucidlink.meta.snapshots`) replays them.
"""

from __future__ import annotations

import hashlib
import sqlite3
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from twisted.internet.interfaces import IReactorTime

from lucidlink.errors import IntegrityError
from lucidlink.meta import mutations as m
from lucidlink.meta.store import Applied, MetadataStore

GENESIS_HASH = bytes(32)
"""The chain hash before the first record of every filespace."""
HASH_SIZE = 32

_SCHEMA = """
CREATE TABLE IF NOT EXISTS journal (
    seq INTEGER PRIMARY KEY,
    time_ns INTEGER NOT NULL,
    record BLOB NOT NULL,
    hash BLOB NOT NULL
)
"""


class ChainError(IntegrityError):
    """A journal's hash chain does not hold; ``seq`` names the first record at fault."""

    def __init__(self, message: str, seq: int) -> None:
        super().__init__(message)
        self.seq = seq


@dataclass(frozen=True, slots=True)
class Entry:
    """One journal record: its place, its time, the encoded mutation and its chain hash."""

    seq: int
    time_ns: int
    record: bytes
    hash: bytes


def chain_hash(prev_hash: bytes, seq: int, record: bytes) -> bytes:
    """The hash of record ``seq`` that follows ``prev_hash``."""
    return hashlib.sha256(prev_hash + struct.pack(">Q", seq) + record).digest()


def verify_chain(entries: Iterable[Entry], prev_hash: bytes, prev_seq: int) -> tuple[int, bytes]:
    """Check that ``entries`` follow record ``prev_seq`` (hash ``prev_hash``) in order.

    Returns the last sequence and hash.
    :raise ChainError: naming the first sequence that is out of place or whose hash is wrong.
    """
    for entry in entries:
        if entry.seq != prev_seq + 1:
            raise ChainError(f"broken chain at seq {prev_seq + 1}: found seq {entry.seq} instead", prev_seq + 1)
        if chain_hash(prev_hash, entry.seq, entry.record) != entry.hash:
            raise ChainError(f"broken chain at seq {entry.seq}: its hash does not match its record", entry.seq)
        prev_seq, prev_hash = entry.seq, entry.hash
    return prev_seq, prev_hash


class Journal:
    """Appends a chained journal record to every mutation of one store.

    Make one and :meth:`install` it on a :class:`MetadataStore`.
    ``on_append(seq)`` is called inside the transaction after each append
    (before the commit, and in a group commit the row may still be rolled
    back: whoever reacts must read the row later, from the reactor, not at
    once).
    """

    def __init__(self, clock: IReactorTime, on_append: Callable[[int], object] | None = None) -> None:
        self.clock = clock
        self.on_append = on_append
        self.store: MetadataStore | None = None
        self._replaying: tuple[Entry, m.Mutation] | None = None

    def install(self, store: MetadataStore) -> Journal:
        """Make the ``journal`` table if missing and become ``store``'s journal hook."""
        store._db.execute(_SCHEMA)
        store.journal = self
        self.store = store
        return self

    # -- the hook ------------------------------------------------------------------

    def __call__(self, cursor: sqlite3.Cursor, record: m.Mutation, applied: Applied) -> None:
        prev_seq, prev_hash = _head(cursor)
        seq = prev_seq + 1
        replaying = self._replaying
        if replaying is not None:
            # A restore replays a record shipped before: it must land at the same place and complete to the same
            # record (the one decoded from the shipped bytes, which are kept as they are).
            entry, shipped = replaying
            if entry.seq != seq or record != shipped:
                raise ChainError(f"replaying seq {entry.seq} gave a different record at seq {seq}", entry.seq)
            data, time_ns, digest = entry.record, entry.time_ns, entry.hash
            if chain_hash(prev_hash, seq, data) != digest:
                raise ChainError(f"broken chain at seq {seq}: its hash does not match its record", seq)
        else:
            data = m.encode(record)
            time_ns = int(self.clock.seconds() * 1_000_000_000)
            digest = chain_hash(prev_hash, seq, data)
        cursor.execute("INSERT INTO journal (seq, time_ns, record, hash) VALUES (?, ?, ?, ?)",
                       (seq, time_ns, data, digest))
        if self.on_append is not None:
            self.on_append(seq)

    def replay(self, entry: Entry) -> Applied:
        """Apply the shipped ``entry`` to the store, keeping its sequence, time and hash."""
        assert self.store is not None, "install the journal first"
        shipped = m.decode(entry.record)
        self._replaying = (entry, shipped)
        try:
            return self.store.apply(shipped)
        finally:
            self._replaying = None

    # -- reading -------------------------------------------------------------------

    def head(self) -> tuple[int, bytes]:
        """The last sequence number and its hash; ``(0, GENESIS_HASH)`` for an empty journal."""
        return _head(self._db())

    def entries(self, after: int = 0, limit: int | None = None) -> list[Entry]:
        """The records after sequence ``after``, in order, at most ``limit`` of them."""
        sql = "SELECT seq, time_ns, record, hash FROM journal WHERE seq > ? ORDER BY seq"
        parameters: tuple[Any, ...] = (after,)
        if limit is not None:
            sql += " LIMIT ?"
            parameters += (limit,)
        return [Entry(seq, time_ns, bytes(record), bytes(digest))
                for seq, time_ns, record, digest in self._db().execute(sql, parameters)]

    def hash_at(self, seq: int) -> bytes:
        """The chain hash after record ``seq`` (``GENESIS_HASH`` for 0)."""
        if seq == 0:
            return GENESIS_HASH
        row = self._db().execute("SELECT hash FROM journal WHERE seq = ?", (seq,)).fetchone()
        if row is None:
            raise ChainError(f"the journal has no record {seq}", seq)
        return bytes(row[0])

    def verify(self) -> tuple[int, bytes]:
        """Walk the whole table checking the chain; return the head, or raise ChainError naming the seq."""
        return verify_chain(self._iterate(), GENESIS_HASH, 0)

    def _iterate(self) -> Iterator[Entry]:
        for seq, time_ns, record, digest in self._db().execute(
            "SELECT seq, time_ns, record, hash FROM journal ORDER BY seq"
        ):
            yield Entry(seq, time_ns, bytes(record), bytes(digest))

    def _db(self) -> sqlite3.Connection:
        assert self.store is not None, "install the journal first"
        return self.store._db


def _head(db: sqlite3.Connection | sqlite3.Cursor) -> tuple[int, bytes]:
    row = db.execute("SELECT seq, hash FROM journal ORDER BY seq DESC LIMIT 1").fetchone()
    if row is None:
        return 0, GENESIS_HASH
    return row[0], bytes(row[1])
