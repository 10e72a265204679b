"""
The journal: each mutation appends one hash-chained record in its own
transaction, and any change to a stored record is found, naming its sequence.
"""

from __future__ import annotations

from lucidlink.errors import AlreadyExists
from lucidlink.meta import mutations as m
from lucidlink.meta.journal import GENESIS_HASH, ChainError, Entry, Journal, chain_hash, verify_chain
from lucidlink.meta.store import ROOT_INODE
from tests.meta_helpers import StoreTestCase, initialise_record


class JournalTests(StoreTestCase):
    """Appending, chaining and verifying journal records."""

    def open_journalled(self) -> tuple[Journal, object]:
        store = self.open_store("journalled.sqlite3")
        journal = Journal(self.clock).install(store)
        store.apply(initialise_record())
        return journal, store

    def test_every_mutation_appends_a_chained_record(self) -> None:
        """Each applied mutation adds the next sequence, its encoded completed record, and the chained hash."""
        journal, store = self.open_journalled()
        self.tick()
        applied = store.apply(m.MakeDirectory(ROOT_INODE, b"d", 0o755, 0, 0))  # type: ignore[attr-defined]
        entries = journal.entries()
        self.assertEqual([entry.seq for entry in entries], [1, 2])
        self.assertEqual(entries[1].record, m.encode(applied.record))
        self.assertEqual(entries[0].hash, chain_hash(GENESIS_HASH, 1, entries[0].record))
        self.assertEqual(entries[1].hash, chain_hash(entries[0].hash, 2, entries[1].record))
        self.assertEqual(entries[1].time_ns, int(self.clock.seconds() * 1e9))
        self.assertEqual(journal.head(), (2, entries[1].hash))
        self.assertEqual(journal.verify(), journal.head())

    def test_refused_mutation_appends_nothing(self) -> None:
        """A mutation the store refuses rolls back its journal record with it."""
        journal, store = self.open_journalled()
        store.apply(m.MakeDirectory(ROOT_INODE, b"d", 0o755, 0, 0))  # type: ignore[attr-defined]
        self.assertRaises(AlreadyExists, store.apply, m.MakeDirectory(ROOT_INODE, b"d", 0o755, 0, 0))  # type: ignore[attr-defined]
        self.assertEqual(journal.head()[0], 2)

    def test_chain_hash_formula(self) -> None:
        """The hash is SHA-256 over the previous hash, the 8-byte big-endian sequence and the record."""
        import hashlib

        self.assertEqual(chain_hash(b"p" * 32, 7, b"rec"),
                         hashlib.sha256(b"p" * 32 + (7).to_bytes(8, "big") + b"rec").digest())

    def test_tampered_record_is_named(self) -> None:
        """Changing a stored record's bytes breaks the chain at that record's sequence."""
        journal, store = self.open_journalled()
        for name in (b"a", b"b", b"c"):
            store.apply(m.MakeDirectory(ROOT_INODE, name, 0o755, 0, 0))  # type: ignore[attr-defined]
        store._db.execute("UPDATE journal SET record = ? WHERE seq = 3", (b"{}",))  # type: ignore[attr-defined]
        error = self.assertRaises(ChainError, journal.verify)
        self.assertEqual(error.seq, 3)
        self.assertIn("seq 3", str(error))

    def test_removed_record_is_named(self) -> None:
        """A missing record breaks the chain where it should be."""
        journal, store = self.open_journalled()
        for name in (b"a", b"b"):
            store.apply(m.MakeDirectory(ROOT_INODE, name, 0o755, 0, 0))  # type: ignore[attr-defined]
        store._db.execute("DELETE FROM journal WHERE seq = 2")  # type: ignore[attr-defined]
        self.assertEqual(self.assertRaises(ChainError, journal.verify).seq, 2)

    def test_verify_chain_checks_order(self) -> None:
        """Records out of order are refused even when each hash is right for its own place."""
        first = Entry(1, 0, b"a", chain_hash(GENESIS_HASH, 1, b"a"))
        third = Entry(3, 0, b"c", chain_hash(first.hash, 3, b"c"))
        self.assertEqual(verify_chain([first], GENESIS_HASH, 0), (1, first.hash))
        self.assertEqual(self.assertRaises(ChainError, verify_chain, [first, third], GENESIS_HASH, 0).seq, 2)

    def test_journal_survives_reopening(self) -> None:
        """The chain continues across a restart of the store."""
        journal, store = self.open_journalled()
        store.close()  # type: ignore[attr-defined]
        again = self.open_store("journalled.sqlite3")
        journal = Journal(self.clock).install(again)
        again.apply(m.MakeDirectory(ROOT_INODE, b"x", 0o755, 0, 0))
        self.assertEqual(journal.verify()[0], 2)
