"""
Replaying the completed mutation records of a workload on an empty store
rebuilds an identical database: the property the journal and restore rely on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lucidlink.errors import LucidError
from lucidlink.meta import mutations as m
from lucidlink.meta.store import ROOT_INODE, MetadataStore
from lucidlink.protocol.messages import FileKind, RenameFlags, Role, SetAttrField, XattrFlags
from tests.meta_helpers import CHUNK_SIZE, START_TIME, initialise_record

NAMES = [b"a", b"b", b"c", b"d"]
OPERATIONS = 18
step = st.tuples(
    st.sampled_from(range(OPERATIONS)),
    st.integers(0, 2**16),
    st.integers(0, 2**16),
    st.integers(0, 2**16),
    st.integers(0, 2**16),
    st.floats(0, 5),
)


class Workload:
    """Drives a store with operations chosen by numbers, and records what it journals."""

    def __init__(self, folder: Path, clock: Clock) -> None:
        self.folder = folder
        self.clock = clock
        self.records: list[bytes] = []
        self.store = self.open()
        self.held: list[int] = []
        self.reserved: list[int] = []

    def open(self) -> MetadataStore:
        return MetadataStore(self.folder / "live.sqlite3", self.clock, journal=self.journal)

    def journal(self, cursor: Any, record: m.Mutation, applied: Any) -> None:
        self.records.append(m.encode(record))

    def inodes(self, kind: FileKind | None = None) -> list[int]:
        sql = "SELECT id FROM inodes" + ("" if kind is None else f" WHERE kind = {int(kind)}") + " ORDER BY id"
        return [row[0] for row in self.store._db.execute(sql)]

    @staticmethod
    def pick(choices: list[Any], number: int) -> Any:
        return choices[number % len(choices)] if choices else 999

    def entries(self) -> list[tuple[int, bytes]]:
        return [(row[0], bytes(row[1])) for row in self.store._db.execute(
            "SELECT parent, name FROM entries ORDER BY parent, name"
        )]

    def run(self, operation: int, a: int, b: int, c: int, d: int) -> None:
        directories = self.inodes(FileKind.DIRECTORY)
        files = self.inodes(FileKind.FILE)
        everything = self.inodes()
        directory, other_directory = self.pick(directories, a), self.pick(directories, c)
        name, other_name = self.pick(NAMES, b), self.pick(NAMES, d)
        entries = self.entries()
        if entries and operation in (4, 5, 6) and a % 8:
            # Mostly an entry that exists, sometimes one made up.
            directory, name = self.pick(entries, a // 8 + b)
        apply = self.store.apply
        if operation == 0:
            apply(m.MakeDirectory(directory, name, a & 0o777, b, c))
        elif operation == 1:
            apply(m.CreateFile(directory, name, b & 0o777, a, d, bool(c & 1)))
        elif operation == 2:
            apply(m.MakeSymlink(directory, name, bytes([b & 0xFF]) * (1 + c % 7), a, b))
        elif operation == 3:
            apply(m.MakeLink(self.pick(files, b), other_directory, other_name))
        elif operation == 4:
            apply(m.Unlink(directory, name))
        elif operation == 5:
            empty = [(row[0], bytes(row[1])) for row in self.store._db.execute(
                "SELECT e.parent, e.name FROM entries e JOIN inodes i ON i.id = e.inode WHERE i.kind = ?"
                " AND NOT EXISTS (SELECT 1 FROM entries c WHERE c.parent = i.id) ORDER BY 1, 2",
                (FileKind.DIRECTORY,),
            )]
            if empty and c % 4:
                directory, name = self.pick(empty, d)
            apply(m.RemoveDirectory(directory, name))
        elif operation == 6:
            flags = [RenameFlags.NONE, RenameFlags.NONE, RenameFlags.NOREPLACE, RenameFlags.EXCHANGE][a % 4]
            apply(m.Rename(directory, name, other_directory, other_name, flags))
        elif operation == 7:
            fields = b & int(SetAttrField(sum(SetAttrField)))
            apply(m.SetAttributes(self.pick(everything, a), fields, c, d, a, c * 7 % (5 * CHUNK_SIZE), b, d))
        elif operation == 8:
            apply(m.SetXattr(self.pick(everything, a), name, bytes([c & 0xFF]) * (d % 9), list(XattrFlags)[b % 3]))
        elif operation == 9:
            apply(m.RemoveXattr(self.pick(everything, a), name))
        elif operation == 10:
            inode = self.pick(files, a)
            chunks = tuple(
                (
                    index,
                    b"" if (b >> index) & 1 else f"obj-{c}-{d}-{index}".encode(),
                    (c + index) % (CHUNK_SIZE + 1),
                    max((c + index) % (CHUNK_SIZE + 1), (c * 3 + index) % (CHUNK_SIZE + 1)),
                )
                for index in range(d % 4)
            )
            expected = 0 if b & 0x10 else c % 4
            apply(m.CommitChunks(inode, expected, (a * 37) % (4 * CHUNK_SIZE), chunks, d * 1000))
        elif operation == 11 and everything:
            inode = self.pick(everything, b)
            self.store.hold(inode)
            self.held.append(inode)
        elif operation == 12 and self.held:
            self.store.release(self.held.pop(b % len(self.held)))
        elif operation == 13:
            apply(m.AddUser(f"user{b % 5}", list(Role)[c % 3], bytes([d & 0xFF]) * 16, 3, 65536, 1, b"v", b"k"))
        elif operation == 14:
            user = self.pick([user.name for user in self.store.users()], b)
            if a % 2:
                apply(m.RemoveUser(user))
            else:
                apply(m.ChangeCredentials(user, b"n" * 16, 2, 1024, 1, bytes([c & 0xFF]), b"k2"))
        elif operation == 15:
            # A restart: handles are gone, so orphans are reclaimed.
            self.store.close()
            self.store = self.open()
            self.held = []
            self.store.reclaim_orphans()
        elif operation == 16:
            count = 1 + a % 8
            client = b"" if c % 3 == 0 else bytes([c % 3])  # a named client's block is kept on record
            first = apply(m.ReserveInodes(count, client=client)).value
            self.reserved.extend(range(first, first + count))
        elif operation == 17 and self.reserved:
            inode = self.reserved.pop(b % len(self.reserved))  # a client's own id, given once
            if c % 3 == 0:
                apply(m.MakeDirectory(directory, name, a & 0o777, b, c, inode))
            elif c % 3 == 1:
                apply(m.CreateFile(directory, name, b & 0o777, a, d, bool(c & 4), inode))
            else:
                apply(m.MakeSymlink(directory, name, b"t" * (1 + d % 5), a, b, inode))


class ReplayTests(SynchronousTestCase):
    """A random workload's records, replayed into a fresh store, give the same dump."""

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(step, min_size=10, max_size=80))
    def test_replay_gives_identical_database(self, steps: list[tuple[int, int, int, int, int, float]]) -> None:
        """After every step of the workload, its records replayed so far rebuild the same database."""
        clock = Clock()
        clock.advance(START_TIME)
        folder = Path(self.mktemp())
        folder.mkdir()
        workload = Workload(folder, clock)
        # The replaying store has its own clock, far from the original one.
        replica = MetadataStore(folder / "replica.sqlite3", Clock())
        replayed = 0
        try:
            workload.store.apply(m.SetBootstrapToken(b"h" * 32))
            workload.store.apply(initialise_record())
            for operation, a, b, c, d, seconds in steps:
                clock.advance(seconds)
                try:
                    workload.run(operation, a, b, c, d)
                except LucidError:
                    pass  # refused: rolled back, never journalled
                for data in workload.records[replayed:]:
                    replica.apply(m.decode(data))
                replayed = len(workload.records)
                self.assertEqual(replica.dump(), workload.store.dump())
        finally:
            workload.store.close()
            replica.close()

    def test_open_orphan_replays(self) -> None:
        """A file unlinked while open is kept in the replica too, and goes when the original releases it."""
        clock = Clock()
        folder = Path(self.mktemp())
        folder.mkdir()
        workload = Workload(folder, clock)
        replica = MetadataStore(folder / "replica.sqlite3", Clock())
        self.addCleanup(replica.close)
        self.addCleanup(lambda: workload.store.close())
        store = workload.store
        store.apply(initialise_record())
        inode = store.apply(m.CreateFile(ROOT_INODE, b"f", 0o644, 0, 0, True)).value[0].inode
        store.hold(inode)
        store.apply(m.Unlink(ROOT_INODE, b"f"))
        for data in workload.records:
            replica.apply(m.decode(data))
        self.assertEqual(replica.orphans(), [inode])
        self.assertEqual(replica.dump(), store.dump())
        store.release(inode)
        replica.apply(m.decode(workload.records[-1]))
        self.assertEqual(replica.orphans(), [])
        self.assertEqual(replica.dump(), store.dump())
