"""
The metadata store in-process: one behaviour test per rule of
docs/metadata-protocol.rst, each refusal checked by its error class.
"""

from __future__ import annotations

import errno
import os
import sqlite3
import stat
from typing import Any

from zope.interface.verify import verifyObject

from lucidlink import errors
from lucidlink.meta import mutations as m
from lucidlink.meta.interface import IMetadataStore
from lucidlink.meta.journal import Journal
from lucidlink.meta.store import MAX_NAME_LENGTH, MAX_READDIR_LIMIT, ROOT_INODE, MetadataStore
from lucidlink.protocol.messages import FileKind, NotifyKind, RenameFlags, Role, SetAttrField, XattrFlags
from tests.meta_helpers import CHUNK_SIZE, FILESPACE_ID, START_TIME, StoreTestCase, initialise_record

NOW_NS = int(START_TIME * 1_000_000_000)


class OpeningTests(StoreTestCase):
    """The database itself: its settings, and the root a bootstrap makes."""

    def test_provides_interface(self) -> None:
        """MetadataStore is a faithful IMetadataStore."""
        self.assertTrue(verifyObject(IMetadataStore, self.store))

    def test_wal_and_full_sync(self) -> None:
        """The database runs in WAL mode with synchronous=FULL."""
        self.assertEqual(self.store._db.execute("PRAGMA journal_mode").fetchone()[0], "wal")
        self.assertEqual(self.store._db.execute("PRAGMA synchronous").fetchone()[0], 2)

    def test_root_directory(self) -> None:
        """Inode 1 is the root: a directory with mode 0755, two links, the bootstrap time."""
        root = self.store.getattr(ROOT_INODE)
        self.assertEqual(root.kind, FileKind.DIRECTORY)
        self.assertEqual(root.mode, stat.S_IFDIR | 0o755)
        self.assertEqual(root.nlink, 2)
        self.assertEqual(root.ctime_ns, NOW_NS)
        self.assertEqual(self.store.chunk_size, CHUNK_SIZE)
        self.assertEqual(self.store.filespace_id, FILESPACE_ID)

    def test_initialise_once(self) -> None:
        """A second initialisation is refused."""
        self.assertRaises(errors.AlreadyExists, self.store.apply, initialise_record())

    def test_uninitialised_store(self) -> None:
        """A fresh store says it is not initialised and has no chunk size yet."""
        fresh = self.open_store("fresh.sqlite3")
        self.assertFalse(fresh.initialised)
        self.assertRaises(errors.NotInitialized, getattr, fresh, "chunk_size")

    def test_reopen_keeps_everything(self) -> None:
        """Closing and opening the database again finds the same tree."""
        self.mkdir(ROOT_INODE, b"kept")
        before = self.store.dump()
        self.store.close()
        self.store = self.open_store()
        self.assertEqual(self.store.dump(), before)

    def test_inode_ids_never_reused(self) -> None:
        """Removing the newest inode and reopening does not hand its id out again."""
        inode = self.create(ROOT_INODE, b"f")
        self.store.apply(m.Unlink(ROOT_INODE, b"f"))
        self.store.close()
        self.store = self.open_store()
        self.assertGreater(self.create(ROOT_INODE, b"g"), inode)

    def test_unknown_inode(self) -> None:
        """An inode that does not exist is NotFound."""
        self.assertRaises(errors.NotFound, self.store.getattr, 999)
        self.assertRaises(errors.NotFound, self.store.getattr, 0)
        self.assertRaises(errors.NotFound, self.store.apply, m.SetXattr(999, b"n", b"v"))


class EntryTests(StoreTestCase):
    """Making, finding and listing entries."""

    def test_mkdir_links(self) -> None:
        """A new directory has two links and adds one to its parent; both times move."""
        self.tick()
        inode = self.mkdir(ROOT_INODE, b"d", 0o40750)
        child = self.store.getattr(inode)
        self.assertEqual((child.nlink, child.mode, child.uid), (2, stat.S_IFDIR | 0o750, 1000))
        root = self.store.getattr(ROOT_INODE)
        self.assertEqual(root.nlink, 3)
        self.assertEqual(root.mtime_ns, NOW_NS + 1_000_000_000)
        self.assertEqual(self.store.lookup(ROOT_INODE, b"d").inode, inode)

    def test_setgid_directory_passes_on_its_group(self) -> None:
        """In a directory with the set-group-ID bit, new entries take its group; new directories the bit too."""
        shared = self.mkdir(ROOT_INODE, b"shared", 0o2775)
        self.store.apply(m.SetAttributes(shared, SetAttrField.GID, gid=2000))
        made = [
            self.store.getattr(self.mkdir(shared, b"d", 0o755)),
            self.store.getattr(self.create(shared, b"f", 0o644)),
            self.store.apply(m.MakeSymlink(shared, b"l", b"t", 1000, 1000)).value,
        ]
        self.assertEqual([(a.mode, a.uid, a.gid) for a in made], [
            (stat.S_IFDIR | 0o2755, 1000, 2000), (stat.S_IFREG | 0o644, 1000, 2000), (stat.S_IFLNK | 0o777, 1000, 2000),
        ])
        plain = self.store.getattr(self.mkdir(self.mkdir(ROOT_INODE, b"plain", 0o775), b"d", 0o755))
        self.assertEqual((plain.mode, plain.gid), (stat.S_IFDIR | 0o755, 1000))

    def test_name_taken(self) -> None:
        """Every kind of creation refuses a taken name with AlreadyExists."""
        self.mkdir(ROOT_INODE, b"x")
        self.assertRaises(errors.AlreadyExists, self.mkdir, ROOT_INODE, b"x")
        self.assertRaises(errors.AlreadyExists, self.create, ROOT_INODE, b"x")
        self.assertRaises(errors.AlreadyExists, self.store.apply, m.MakeSymlink(ROOT_INODE, b"x", b"t", 0, 0))

    def test_parent_must_be_directory(self) -> None:
        """Entries go in directories only; lookups in files are NotADirectory."""
        file = self.create(ROOT_INODE, b"f")
        self.assertRaises(errors.NotADirectory, self.mkdir, file, b"d")
        self.assertRaises(errors.NotADirectory, self.store.lookup, file, b"d")
        self.assertRaises(errors.NotFound, self.mkdir, 12345, b"d")

    def test_lookup_missing(self) -> None:
        """An absent name is NotFound."""
        self.assertRaises(errors.NotFound, self.store.lookup, ROOT_INODE, b"absent")

    def test_name_length(self) -> None:
        """Names are 1 to 1024 bytes of ciphertext."""
        self.mkdir(ROOT_INODE, b"n" * MAX_NAME_LENGTH)
        self.assertRaises(errors.NameTooLong, self.mkdir, ROOT_INODE, b"n" * (MAX_NAME_LENGTH + 1))
        self.assertRaises(errors.InvalidArgument, self.mkdir, ROOT_INODE, b"")
        self.assertRaises(errors.NameTooLong, self.store.lookup, ROOT_INODE, b"n" * (MAX_NAME_LENGTH + 1))

    def test_create_exclusive(self) -> None:
        """An exclusive create of an existing name fails; a plain one opens the existing file."""
        inode = self.create(ROOT_INODE, b"f")
        self.assertRaises(errors.AlreadyExists, self.create, ROOT_INODE, b"f")
        applied = self.store.apply(m.CreateFile(ROOT_INODE, b"f", 0o600, 0, 0, False))
        attributes, created = applied.value
        self.assertEqual((attributes.inode, created), (inode, False))
        self.assertEqual(applied.changes, ())

    def test_create_over_directory(self) -> None:
        """A plain create of a directory's name is IsADirectory."""
        self.mkdir(ROOT_INODE, b"d")
        self.assertRaises(errors.IsADirectory, self.store.apply, m.CreateFile(ROOT_INODE, b"d", 0o600, 0, 0, False))

    def test_readdir_pages_in_name_order(self) -> None:
        """Pages follow the sealed names' byte order; the cursor continues after the last."""
        names = [bytes([value]) * 3 for value in (200, 3, 77, 1, 150)]
        for name in names:
            self.create(ROOT_INODE, name)
        first, cursor, done = self.store.readdir(ROOT_INODE, b"", 2)
        self.assertEqual([name for name, _ in first], sorted(names)[:2])
        self.assertFalse(done)
        rest, _, done = self.store.readdir(ROOT_INODE, cursor, 10)
        self.assertEqual([name for name, _ in rest], sorted(names)[2:])
        self.assertTrue(done)
        self.assertEqual(rest[0][1].kind, FileKind.FILE)

    def test_readdir_limit_is_capped(self) -> None:
        """A limit above the server's cap (or zero) is served as the cap."""
        directory = self.mkdir(ROOT_INODE, b"big")
        file = self.create(ROOT_INODE, b"f")
        # Seeded directly: thousands of transactions would only slow the test down.
        self.store._db.execute("BEGIN")
        self.store._db.executemany(
            "INSERT INTO entries (parent, name, inode) VALUES (?, ?, ?)",
            [(directory, index.to_bytes(2, "big"), file) for index in range(MAX_READDIR_LIMIT + 1)],
        )
        self.store._db.execute("COMMIT")
        for limit in (0, 10**6):
            page, _, done = self.store.readdir(directory, b"", limit)
            self.assertEqual((len(page), done), (MAX_READDIR_LIMIT, False))

    def test_readdir_of_file(self) -> None:
        """Listing a file is NotADirectory."""
        self.assertRaises(errors.NotADirectory, self.store.readdir, self.create(ROOT_INODE, b"f"))


class RemovalTests(StoreTestCase):
    """unlink and rmdir."""

    def test_unlink_file(self) -> None:
        """Unlinking a file's only link removes it, and its chunks become garbage."""
        inode = self.create(ROOT_INODE, b"f")
        self.write(inode, 10, [(0, b"object-a", 10, 10)])
        self.store.apply(m.Unlink(ROOT_INODE, b"f"))
        self.assertRaises(errors.NotFound, self.store.getattr, inode)
        self.assertEqual(self.store.garbage(), [b"object-a"])

    def test_unlink_directory(self) -> None:
        """unlink refuses directories."""
        self.mkdir(ROOT_INODE, b"d")
        self.assertRaises(errors.IsADirectory, self.store.apply, m.Unlink(ROOT_INODE, b"d"))

    def test_unlink_missing(self) -> None:
        """Unlinking an absent name is NotFound."""
        self.assertRaises(errors.NotFound, self.store.apply, m.Unlink(ROOT_INODE, b"nothing"))

    def test_rmdir(self) -> None:
        """rmdir removes an empty directory and its parent loses a link."""
        inode = self.mkdir(ROOT_INODE, b"d")
        self.store.apply(m.RemoveDirectory(ROOT_INODE, b"d"))
        self.assertRaises(errors.NotFound, self.store.getattr, inode)
        self.assertEqual(self.store.getattr(ROOT_INODE).nlink, 2)

    def test_rmdir_not_empty(self) -> None:
        """A directory with entries is NotEmpty."""
        inode = self.mkdir(ROOT_INODE, b"d")
        self.create(inode, b"f")
        self.assertRaises(errors.NotEmpty, self.store.apply, m.RemoveDirectory(ROOT_INODE, b"d"))

    def test_rmdir_of_file(self) -> None:
        """rmdir of a file is NotADirectory."""
        self.create(ROOT_INODE, b"f")
        self.assertRaises(errors.NotADirectory, self.store.apply, m.RemoveDirectory(ROOT_INODE, b"f"))

    def test_removed_directory_takes_no_entries(self) -> None:
        """A directory held open after rmdir accepts no new entries."""
        inode = self.mkdir(ROOT_INODE, b"d")
        self.store.hold(inode)
        self.store.apply(m.RemoveDirectory(ROOT_INODE, b"d"))
        self.assertEqual(self.store.getattr(inode).nlink, 0)
        self.assertRaises(errors.NotFound, self.create, inode, b"f")
        self.store.release(inode)
        self.assertRaises(errors.NotFound, self.store.getattr, inode)


class RenameTests(StoreTestCase):
    """rename(2) and renameat2's flags."""

    def rename(self, old_parent: int, old: bytes, new_parent: int, new: bytes, flags: int = 0) -> None:
        self.store.apply(m.Rename(old_parent, old, new_parent, new, flags))

    def test_move_file(self) -> None:
        """A moved file keeps its inode under the new name; the old name is gone."""
        inode = self.create(ROOT_INODE, b"a")
        directory = self.mkdir(ROOT_INODE, b"d")
        self.tick()
        self.rename(ROOT_INODE, b"a", directory, b"b")
        self.assertEqual(self.store.lookup(directory, b"b").inode, inode)
        self.assertRaises(errors.NotFound, self.store.lookup, ROOT_INODE, b"a")
        self.assertEqual(self.store.getattr(inode).ctime_ns, NOW_NS + 1_000_000_000)

    def test_replace_file(self) -> None:
        """Renaming onto a file replaces it; the replaced file is reclaimed."""
        a = self.create(ROOT_INODE, b"a")
        b = self.create(ROOT_INODE, b"b")
        self.write(b, 5, [(0, b"old", 5, 5)])
        self.write(a, 5, [(0, b"kept", 5, 5)])
        self.assertEqual(self.store.chunk_objects(), {b"old", b"kept"})
        self.tick()
        self.rename(ROOT_INODE, b"a", ROOT_INODE, b"b")
        self.assertEqual(self.names(ROOT_INODE), [b"b"])
        self.assertEqual(self.store.lookup(ROOT_INODE, b"b").inode, a)
        self.assertRaises(errors.NotFound, self.store.getattr, b)
        self.assertEqual(self.store.garbage(), [b"old"])
        self.assertEqual(self.store.garbage_times(), {b"old": self.store.now_ns()})
        self.assertEqual(self.store.chunk_objects(), {b"kept"})

    def test_directory_replaces_empty_directory(self) -> None:
        """A directory may replace an empty directory; link counts stay right across parents."""
        source_parent = self.mkdir(ROOT_INODE, b"p")
        source = self.mkdir(source_parent, b"s")
        target = self.mkdir(ROOT_INODE, b"t")
        self.rename(source_parent, b"s", ROOT_INODE, b"t")
        self.assertEqual(self.store.lookup(ROOT_INODE, b"t").inode, source)
        self.assertRaises(errors.NotFound, self.store.getattr, target)
        self.assertEqual(self.store.getattr(source_parent).nlink, 2)
        self.assertEqual(self.store.getattr(ROOT_INODE).nlink, 4)  # p and t

    def test_directory_over_nonempty_directory(self) -> None:
        """A directory cannot replace one with entries."""
        self.mkdir(ROOT_INODE, b"s")
        target = self.mkdir(ROOT_INODE, b"t")
        self.create(target, b"f")
        self.assertRaises(errors.NotEmpty, self.rename, ROOT_INODE, b"s", ROOT_INODE, b"t")

    def test_directory_over_file(self) -> None:
        """A directory cannot replace a file."""
        self.mkdir(ROOT_INODE, b"s")
        self.create(ROOT_INODE, b"f")
        self.assertRaises(errors.NotADirectory, self.rename, ROOT_INODE, b"s", ROOT_INODE, b"f")

    def test_file_over_directory(self) -> None:
        """A file cannot replace a directory."""
        self.create(ROOT_INODE, b"f")
        self.mkdir(ROOT_INODE, b"d")
        self.assertRaises(errors.IsADirectory, self.rename, ROOT_INODE, b"f", ROOT_INODE, b"d")

    def test_into_own_subtree(self) -> None:
        """A directory cannot move into itself or below itself."""
        a = self.mkdir(ROOT_INODE, b"a")
        b = self.mkdir(a, b"b")
        c = self.mkdir(b, b"c")
        self.assertRaises(errors.InvalidArgument, self.rename, ROOT_INODE, b"a", c, b"a")
        self.assertRaises(errors.InvalidArgument, self.rename, ROOT_INODE, b"a", a, b"a2")
        self.rename(b, b"c", ROOT_INODE, b"c")  # moving up is fine
        self.assertEqual(self.store.lookup(ROOT_INODE, b"c").inode, c)

    def test_same_inode_does_nothing(self) -> None:
        """Renaming a name onto another link of the same inode leaves both links."""
        inode = self.create(ROOT_INODE, b"a")
        self.store.apply(m.MakeLink(inode, ROOT_INODE, b"b"))
        before = self.store.dump()
        self.tick()
        self.rename(ROOT_INODE, b"a", ROOT_INODE, b"b")
        self.assertEqual(self.store.dump(), before)
        self.rename(ROOT_INODE, b"a", ROOT_INODE, b"a")
        self.assertEqual(self.store.dump(), before)

    def test_noreplace(self) -> None:
        """NOREPLACE refuses an existing target."""
        self.create(ROOT_INODE, b"a")
        self.create(ROOT_INODE, b"b")
        self.assertRaises(errors.AlreadyExists, self.rename, ROOT_INODE, b"a", ROOT_INODE, b"b", RenameFlags.NOREPLACE)
        self.rename(ROOT_INODE, b"a", ROOT_INODE, b"c", RenameFlags.NOREPLACE)
        self.assertEqual(self.names(ROOT_INODE), [b"b", b"c"])

    def test_exchange(self) -> None:
        """EXCHANGE swaps a file and a directory between parents; link counts follow the directory."""
        left = self.mkdir(ROOT_INODE, b"left")
        right = self.mkdir(ROOT_INODE, b"right")
        file = self.create(left, b"x")
        directory = self.mkdir(right, b"y")
        self.rename(left, b"x", right, b"y", RenameFlags.EXCHANGE)
        self.assertEqual(self.store.lookup(left, b"x").inode, directory)
        self.assertEqual(self.store.lookup(right, b"y").inode, file)
        self.assertEqual(self.store.getattr(left).nlink, 3)
        self.assertEqual(self.store.getattr(right).nlink, 2)

    def test_exchange_needs_target(self) -> None:
        """EXCHANGE with no target is NotFound; with NOREPLACE it is InvalidArgument."""
        self.create(ROOT_INODE, b"a")
        self.create(ROOT_INODE, b"b")
        self.assertRaises(errors.NotFound, self.rename, ROOT_INODE, b"a", ROOT_INODE, b"z", RenameFlags.EXCHANGE)
        self.assertRaises(
            errors.InvalidArgument, self.rename, ROOT_INODE, b"a", ROOT_INODE, b"b",
            RenameFlags.EXCHANGE | RenameFlags.NOREPLACE,
        )

    def test_exchange_into_own_subtree(self) -> None:
        """EXCHANGE cannot put a directory below itself."""
        a = self.mkdir(ROOT_INODE, b"a")
        self.create(a, b"inner")
        self.assertRaises(errors.InvalidArgument, self.rename, ROOT_INODE, b"a", a, b"inner", RenameFlags.EXCHANGE)

    def test_missing_source(self) -> None:
        """Renaming an absent name is NotFound."""
        self.assertRaises(errors.NotFound, self.rename, ROOT_INODE, b"none", ROOT_INODE, b"x")

    def test_changes(self) -> None:
        """A rename reports both entries and both parents as changed."""
        inode = self.create(ROOT_INODE, b"a")
        directory = self.mkdir(ROOT_INODE, b"d")
        applied = self.store.apply(m.Rename(ROOT_INODE, b"a", directory, b"b"))
        kinds = {(change.kind, change.inode, change.parent, change.name) for change in applied.changes}
        self.assertIn((NotifyKind.ENTRY_CHANGED, inode, ROOT_INODE, b"a"), kinds)
        self.assertIn((NotifyKind.ENTRY_CHANGED, inode, directory, b"b"), kinds)
        self.assertIn((NotifyKind.INODE_CHANGED, ROOT_INODE, 0, b""), kinds)
        self.assertIn((NotifyKind.INODE_CHANGED, directory, 0, b""), kinds)


class LinkTests(StoreTestCase):
    """Hard links and symbolic links."""

    def test_hard_link(self) -> None:
        """A hard link counts; removing one link leaves the file with the other."""
        inode = self.create(ROOT_INODE, b"a")
        directory = self.mkdir(ROOT_INODE, b"d")
        self.assertEqual(self.store.apply(m.MakeLink(inode, directory, b"b")).value.nlink, 2)
        self.store.apply(m.Unlink(ROOT_INODE, b"a"))
        self.assertEqual(self.store.lookup(directory, b"b").nlink, 1)

    def test_no_hard_links_to_directories(self) -> None:
        """Linking a directory is NotPermitted."""
        directory = self.mkdir(ROOT_INODE, b"d")
        self.assertRaises(errors.NotPermitted, self.store.apply, m.MakeLink(directory, ROOT_INODE, b"e"))

    def test_symlink(self) -> None:
        """A symbolic link keeps its sealed target; its size is the target's length."""
        attributes = self.store.apply(m.MakeSymlink(ROOT_INODE, b"l", b"sealed-target", 5, 6)).value
        self.assertEqual(attributes.kind, FileKind.SYMLINK)
        self.assertEqual(attributes.mode, stat.S_IFLNK | 0o777)
        self.assertEqual(attributes.size, len(b"sealed-target"))
        self.assertEqual(self.store.readlink(attributes.inode), b"sealed-target")

    def test_readlink_of_file(self) -> None:
        """Reading a non-link is InvalidArgument."""
        self.assertRaises(errors.InvalidArgument, self.store.readlink, self.create(ROOT_INODE, b"f"))

    def test_symlink_target_limits(self) -> None:
        """An empty target is InvalidArgument, a huge one NameTooLong."""
        self.assertRaises(errors.InvalidArgument, self.store.apply, m.MakeSymlink(ROOT_INODE, b"l", b"", 0, 0))
        self.assertRaises(errors.NameTooLong, self.store.apply, m.MakeSymlink(ROOT_INODE, b"l", b"t" * 9000, 0, 0))


class AttributeTests(StoreTestCase):
    """setattr, truncation and extension."""

    def setattr(self, inode: int, fields: int, **values: Any) -> Any:
        return self.store.apply(m.SetAttributes(inode, fields, **values)).value

    def test_mode_keeps_type(self) -> None:
        """A mode change keeps the file type bits."""
        inode = self.create(ROOT_INODE, b"f")
        attributes = self.setattr(inode, SetAttrField.MODE, mode=stat.S_IFDIR | 0o4711)
        self.assertEqual(attributes.mode, stat.S_IFREG | 0o4711)

    def test_owner_and_times(self) -> None:
        """uid, gid and explicit times are set; *_NOW use the server's clock; ctime always moves."""
        inode = self.create(ROOT_INODE, b"f")
        self.tick(5)
        attributes = self.setattr(
            inode, SetAttrField.UID | SetAttrField.GID | SetAttrField.ATIME | SetAttrField.MTIME_NOW,
            uid=7, gid=8, atime_ns=123,
        )
        now = NOW_NS + 5_000_000_000
        self.assertEqual((attributes.uid, attributes.gid, attributes.atime_ns), (7, 8, 123))
        self.assertEqual((attributes.mtime_ns, attributes.ctime_ns), (now, now))

    def test_truncate(self) -> None:
        """Truncation drops chunks wholly beyond the size and shortens the last; version grows.

        Only the logical length shrinks: the object, and its length, stay.
        """
        inode = self.create(ROOT_INODE, b"f")
        self.write(inode, 3 * CHUNK_SIZE, [(0, b"c0", CHUNK_SIZE, CHUNK_SIZE), (1, b"c1", CHUNK_SIZE, CHUNK_SIZE), (2, b"c2", CHUNK_SIZE, CHUNK_SIZE)])
        version = self.store.getattr(inode).version
        attributes = self.setattr(inode, SetAttrField.SIZE, size=CHUNK_SIZE + 10)
        self.assertEqual((attributes.size, attributes.version), (CHUNK_SIZE + 10, version + 1))
        _, _, chunks = self.store.chunk_map(inode)
        self.assertEqual(chunks, [(0, b"c0", CHUNK_SIZE, CHUNK_SIZE), (1, b"c1", 10, CHUNK_SIZE)])
        self.assertEqual(self.store.garbage(), [b"c2"])

    def test_truncate_on_boundary(self) -> None:
        """Truncating to a chunk boundary keeps the chunks before it whole."""
        inode = self.create(ROOT_INODE, b"f")
        self.write(inode, 2 * CHUNK_SIZE, [(0, b"c0", CHUNK_SIZE, CHUNK_SIZE), (1, b"c1", CHUNK_SIZE, CHUNK_SIZE)])
        self.setattr(inode, SetAttrField.SIZE, size=CHUNK_SIZE)
        self.assertEqual(self.store.chunk_map(inode)[2], [(0, b"c0", CHUNK_SIZE, CHUNK_SIZE)])

    def test_truncate_then_extend(self) -> None:
        """Extending a truncated file does not bring the cut bytes back: the length stays short."""
        inode = self.create(ROOT_INODE, b"f")
        self.write(inode, CHUNK_SIZE, [(0, b"c0", CHUNK_SIZE, CHUNK_SIZE)])
        self.setattr(inode, SetAttrField.SIZE, size=10)
        self.setattr(inode, SetAttrField.SIZE, size=2 * CHUNK_SIZE)
        self.assertEqual(self.store.chunk_map(inode)[2], [(0, b"c0", 10, CHUNK_SIZE)])
        self.assertEqual(self.store.dump()["inodes"][inode]["chunks"], {0: (b"c0", 10, CHUNK_SIZE)})

    def test_extend(self) -> None:
        """Extending keeps the chunks; the new range is a hole."""
        inode = self.create(ROOT_INODE, b"f")
        self.write(inode, 10, [(0, b"c0", 10, 10)])
        attributes = self.setattr(inode, SetAttrField.SIZE, size=5 * CHUNK_SIZE)
        self.assertEqual(attributes.size, 5 * CHUNK_SIZE)
        self.assertEqual(self.store.chunk_map(inode)[2], [(0, b"c0", 10, 10)])

    def test_size_of_directory(self) -> None:
        """A size change of a directory is IsADirectory; of a symlink, InvalidArgument."""
        self.assertRaises(errors.IsADirectory, self.setattr, ROOT_INODE, SetAttrField.SIZE, size=0)
        link = self.store.apply(m.MakeSymlink(ROOT_INODE, b"l", b"t", 0, 0)).value.inode
        self.assertRaises(errors.InvalidArgument, self.setattr, link, SetAttrField.SIZE, size=0)

    def test_too_large(self) -> None:
        """A size beyond what SQLite holds is FileTooLarge."""
        inode = self.create(ROOT_INODE, b"f")
        self.assertRaises(errors.FileTooLarge, self.setattr, inode, SetAttrField.SIZE, size=2**64 - 1)

    def test_unknown_fields(self) -> None:
        """Bits outside SetAttrField are InvalidArgument."""
        self.assertRaises(errors.InvalidArgument, self.setattr, ROOT_INODE, 0x1000)


class XattrTests(StoreTestCase):
    """Extended attributes and their flags."""

    def test_set_get_list_remove(self) -> None:
        """An attribute set is read back, listed, and removed."""
        inode = self.create(ROOT_INODE, b"f")
        self.store.apply(m.SetXattr(inode, b"n2", b"v2"))
        self.store.apply(m.SetXattr(inode, b"n1", b"v1"))
        self.assertEqual(self.store.getxattr(inode, b"n1"), b"v1")
        self.assertEqual(self.store.listxattr(inode), [b"n1", b"n2"])
        self.store.apply(m.RemoveXattr(inode, b"n1"))
        self.assertRaises(errors.NoAttribute, self.store.getxattr, inode, b"n1")

    def test_flags(self) -> None:
        """CREATE refuses an existing name, REPLACE an absent one; ANY does both."""
        inode = self.create(ROOT_INODE, b"f")
        self.assertRaises(errors.NoAttribute, self.store.apply, m.SetXattr(inode, b"n", b"v", XattrFlags.REPLACE))
        self.store.apply(m.SetXattr(inode, b"n", b"v", XattrFlags.CREATE))
        self.assertRaises(errors.AlreadyExists, self.store.apply, m.SetXattr(inode, b"n", b"w", XattrFlags.CREATE))
        self.store.apply(m.SetXattr(inode, b"n", b"w", XattrFlags.REPLACE))
        self.store.apply(m.SetXattr(inode, b"n", b"x", XattrFlags.ANY))
        self.assertEqual(self.store.getxattr(inode, b"n"), b"x")

    def test_remove_absent(self) -> None:
        """Removing an absent attribute is NoAttribute."""
        self.assertRaises(errors.NoAttribute, self.store.apply, m.RemoveXattr(ROOT_INODE, b"n"))

    def test_limits(self) -> None:
        """Over-long names and values are OutOfRange, as setxattr(2) says."""
        self.assertRaises(errors.OutOfRange, self.store.apply, m.SetXattr(ROOT_INODE, b"n" * 2000, b"v"))
        self.assertRaises(errors.OutOfRange, self.store.apply, m.SetXattr(ROOT_INODE, b"n", b"v" * 100_000))

    def test_removed_with_inode(self) -> None:
        """A reclaimed inode takes its attributes with it."""
        inode = self.create(ROOT_INODE, b"f")
        self.store.apply(m.SetXattr(inode, b"n", b"v"))
        self.store.apply(m.Unlink(ROOT_INODE, b"f"))
        self.assertNotIn(inode, self.store.dump()["inodes"])


class ChunkMapTests(StoreTestCase):
    """Committing and reading chunk maps."""

    def test_commit_and_read(self) -> None:
        """A commit sets size, mtime and chunks and bumps the version."""
        inode = self.create(ROOT_INODE, b"f")
        attributes = self.store.apply(m.CommitChunks(
            inode, 1, 2 * CHUNK_SIZE + 5, ((0, b"a", CHUNK_SIZE, CHUNK_SIZE), (2, b"c", 5, 5)), mtime_ns=42,
        )).value
        self.assertEqual((attributes.size, attributes.version, attributes.mtime_ns), (2 * CHUNK_SIZE + 5, 2, 42))
        version, size, chunks = self.store.chunk_map(inode, 1, 5)
        self.assertEqual((version, size, chunks), (2, 2 * CHUNK_SIZE + 5, [(2, b"c", 5, 5)]))

    def test_conflict(self) -> None:
        """A commit against a version that moved on is a Conflict; 0 skips the check."""
        inode = self.create(ROOT_INODE, b"f")
        self.write(inode, 1, [(0, b"a", 1, 1)], expected=1)
        self.assertRaises(errors.Conflict, self.write, inode, 1, [(0, b"b", 1, 1)], 1)
        self.write(inode, 1, [(0, b"b", 1, 1)], expected=0)
        self.assertEqual(self.store.chunk_map(inode)[2], [(0, b"b", 1, 1)])

    def test_replaced_objects_are_garbage(self) -> None:
        """An object no chunk map references any more is recorded as garbage."""
        inode = self.create(ROOT_INODE, b"f")
        self.write(inode, 10, [(0, b"old", 10, 10)])
        self.write(inode, 10, [(0, b"new", 10, 10)])
        self.assertEqual(self.store.garbage(), [b"old"])

    def test_hole(self) -> None:
        """An empty object id removes the entry, leaving a hole."""
        inode = self.create(ROOT_INODE, b"f")
        self.write(inode, 2 * CHUNK_SIZE, [(0, b"a", CHUNK_SIZE, CHUNK_SIZE), (1, b"b", CHUNK_SIZE, CHUNK_SIZE)])
        self.write(inode, 2 * CHUNK_SIZE, [(0, b"", 0, 0)])
        self.assertEqual(self.store.chunk_map(inode)[2], [(1, b"b", CHUNK_SIZE, CHUNK_SIZE)])
        self.assertEqual(self.store.garbage(), [b"a"])

    def test_commit_trims_to_size(self) -> None:
        """A commit that shrinks the size drops and shortens chunks as a truncation does."""
        inode = self.create(ROOT_INODE, b"f")
        self.write(inode, 2 * CHUNK_SIZE, [(0, b"a", CHUNK_SIZE, CHUNK_SIZE), (1, b"b", CHUNK_SIZE, CHUNK_SIZE)])
        self.write(inode, 7, [])
        self.assertEqual(self.store.chunk_map(inode)[2], [(0, b"a", 7, CHUNK_SIZE)])

    def test_bad_chunks(self) -> None:
        """Chunks longer than their object or the chunk size, repeated, or with long ids are InvalidArgument."""
        inode = self.create(ROOT_INODE, b"f")
        self.assertRaises(errors.InvalidArgument, self.write, inode, 10, [(0, b"a", CHUNK_SIZE + 1, CHUNK_SIZE + 1)])
        self.assertRaises(errors.InvalidArgument, self.write, inode, 10, [(0, b"a", 5, CHUNK_SIZE + 1)])
        self.assertRaises(errors.InvalidArgument, self.write, inode, 10, [(0, b"a", 6, 5)])
        self.assertRaises(errors.InvalidArgument, self.write, inode, 10, [(0, b"a", -1, 5)])
        self.assertRaises(errors.InvalidArgument, self.write, inode, 10, [(0, b"a", 1, 1), (0, b"b", 1, 1)])
        self.assertRaises(errors.InvalidArgument, self.write, inode, 10, [(0, b"a" * 65, 1, 1)])

    def test_directories_have_no_chunks(self) -> None:
        """A directory's chunk map is IsADirectory."""
        self.assertRaises(errors.IsADirectory, self.store.chunk_map, ROOT_INODE)
        self.assertRaises(errors.IsADirectory, self.write, ROOT_INODE, 0, [])


class OrphanTests(StoreTestCase):
    """Files unlinked while open stay until released, and are reclaimed at start."""

    def test_open_file_outlives_unlink(self) -> None:
        """An unlinked file that is held stays readable and writable until released."""
        inode = self.create(ROOT_INODE, b"f")
        self.write(inode, 10, [(0, b"a", 10, 10)])
        self.store.hold(inode)
        applied = self.store.apply(m.Unlink(ROOT_INODE, b"f"))
        self.assertEqual(applied.record.kept, (inode,))
        self.assertEqual(self.store.getattr(inode).nlink, 0)
        self.write(inode, CHUNK_SIZE + 10, [(1, b"b", 10, 10)])
        self.assertEqual(self.store.chunk_map(inode)[2], [(0, b"a", 10, 10), (1, b"b", 10, 10)])
        self.assertEqual(self.store.garbage(), [])
        self.assertIsNotNone(self.store.release(inode))
        self.assertRaises(errors.NotFound, self.store.getattr, inode)
        self.assertEqual(self.store.garbage(), [b"a", b"b"])

    def test_two_holds(self) -> None:
        """The inode goes with the last hold, not the first."""
        inode = self.create(ROOT_INODE, b"f")
        self.store.hold(inode)
        self.store.hold(inode)
        self.store.apply(m.Unlink(ROOT_INODE, b"f"))
        self.assertIsNone(self.store.release(inode))
        self.store.getattr(inode)
        self.store.release(inode)
        self.assertRaises(errors.NotFound, self.store.getattr, inode)

    def test_replaced_by_rename_while_open(self) -> None:
        """A file replaced by a rename while open is kept too."""
        target = self.create(ROOT_INODE, b"target")
        self.create(ROOT_INODE, b"source")
        self.store.hold(target)
        self.store.apply(m.Rename(ROOT_INODE, b"source", ROOT_INODE, b"target"))
        self.assertEqual(self.store.getattr(target).nlink, 0)

    def test_orphans_reclaimed_at_start(self) -> None:
        """Holds do not survive a restart: orphans go when the store is next opened and swept."""
        inode = self.create(ROOT_INODE, b"f")
        self.write(inode, 10, [(0, b"a", 10, 10)])
        self.store.hold(inode)
        self.store.apply(m.Unlink(ROOT_INODE, b"f"))
        self.store.close()
        self.store = self.open_store()
        self.assertEqual(self.store.orphans(), [inode])
        self.store.reclaim_orphans()
        self.assertEqual(self.store.orphans(), [])
        self.assertEqual(self.store.garbage(), [b"a"])
        self.assertIsNone(self.store.reclaim_orphans())

    def test_hard_link_to_orphan(self) -> None:
        """A file without links cannot gain one back."""
        inode = self.create(ROOT_INODE, b"f")
        self.store.hold(inode)
        self.store.apply(m.Unlink(ROOT_INODE, b"f"))
        self.assertRaises(errors.NotFound, self.store.apply, m.MakeLink(inode, ROOT_INODE, b"g"))


class StatFsTests(StoreTestCase):
    """Totals."""

    def test_totals(self) -> None:
        """Bytes used sum the files' sizes; inodes count every inode; blocks are chunks."""
        first = self.create(ROOT_INODE, b"a")
        second = self.create(ROOT_INODE, b"b")
        self.mkdir(ROOT_INODE, b"d")
        self.write(first, 100, [])
        self.write(second, 23, [])
        totals = self.store.statfs()
        self.assertEqual((totals.block_size, totals.used_bytes, totals.used_inodes), (CHUNK_SIZE, 123, 4))
        self.assertGreater(totals.total_bytes, totals.used_bytes)
        self.assertGreater(totals.total_inodes, totals.used_inodes)


class UserTests(StoreTestCase):
    """Users and the last admin."""

    def add(self, name: str, role: Role) -> None:
        self.store.apply(m.AddUser(name, role, b"s" * 16, 3, 65536, 1, b"v" * 32, b"k"))

    def test_add_and_list(self) -> None:
        """Users are listed by name with their roles."""
        self.add("zed", Role.READER)
        self.add("bob", Role.WRITER)
        self.assertEqual([(u.name, u.role) for u in self.store.users()],
                         [("admin", Role.ADMIN), ("bob", Role.WRITER), ("zed", Role.READER)])

    def test_duplicate(self) -> None:
        """A taken name is AlreadyExists."""
        self.add("bob", Role.WRITER)
        self.assertRaises(errors.AlreadyExists, self.add, "bob", Role.READER)

    def test_bad_names_and_roles(self) -> None:
        """Empty or unprintable names and unknown roles are InvalidArgument."""
        self.assertRaises(errors.InvalidArgument, self.add, "", Role.READER)
        self.assertRaises(errors.InvalidArgument, self.add, "tab\tname", Role.READER)
        self.assertRaises(errors.InvalidArgument, self.add, "x", 9)  # type: ignore[arg-type]

    def test_last_admin_stays(self) -> None:
        """The last admin cannot be removed; once another exists, it can."""
        self.assertRaises(errors.NotPermitted, self.store.apply, m.RemoveUser("admin"))
        self.add("second", Role.ADMIN)
        self.store.apply(m.RemoveUser("admin"))
        self.assertIsNone(self.store.user("admin"))
        self.assertRaises(errors.NotFound, self.store.apply, m.RemoveUser("admin"))

    def test_change_credentials(self) -> None:
        """New credentials replace the old ones; an unknown user is NotFound."""
        self.store.apply(m.ChangeCredentials("admin", b"n" * 16, 4, 1024, 2, b"w" * 32, b"new key"))
        user = self.store.user("admin")
        assert user is not None
        self.assertEqual((user.salt, user.time_cost, user.wrapped_key), (b"n" * 16, 4, b"new key"))
        self.assertRaises(errors.NotFound, self.store.apply,
                          m.ChangeCredentials("nobody", b"n" * 16, 4, 1024, 2, b"w", b"k"))


class JournalHookTests(StoreTestCase):
    """The journal hook runs inside each mutation's transaction."""

    def test_hook_sees_completed_record_inside_transaction(self) -> None:
        """The hook gets the completed record while the change is visible but uncommitted."""
        seen: list[Any] = []

        def journal(cursor: sqlite3.Cursor, record: m.Mutation, applied: Any) -> None:
            self.assertTrue(self.store._db.in_transaction)
            seen.append((record, cursor.execute("SELECT COUNT(*) FROM entries").fetchone()[0]))

        self.store.journal = journal
        self.tick(2)
        self.mkdir(ROOT_INODE, b"d")
        ((record, entries),) = seen
        self.assertIsInstance(record, m.MakeDirectory)
        self.assertEqual(record.time_ns, NOW_NS + 2_000_000_000)
        self.assertIsNotNone(record.inode)
        self.assertEqual(entries, 1)

    def test_failing_hook_rolls_back(self) -> None:
        """If the journal cannot be written, the change is not made."""
        before = self.store.dump()

        def journal(cursor: sqlite3.Cursor, record: m.Mutation, applied: Any) -> None:
            raise OSError(errno.EIO, "journal unwritable")

        self.store.journal = journal
        self.assertRaises(OSError, self.mkdir, ROOT_INODE, b"d")
        self.assertEqual(self.store.dump(), before)

    def test_refused_mutation_is_not_journalled(self) -> None:
        """A mutation a rule refuses never reaches the journal."""
        seen: list[Any] = []
        self.store.journal = lambda cursor, record, applied: seen.append(record)
        self.assertRaises(errors.NotFound, self.store.apply, m.Unlink(ROOT_INODE, b"absent"))
        self.assertEqual(seen, [])


class _FullDisk:
    """Stands in for the store's SQLite connection; the ``fail_at``-th statement finds the disk full."""

    def __init__(self, db: sqlite3.Connection, fail_at: int, error: BaseException) -> None:
        self._db = db
        self.fail_at = fail_at
        self.error = error
        self.statements = 0

    def _count(self) -> None:
        self.statements += 1
        if self.statements == self.fail_at:
            raise self.error

    def execute(self, *args: Any) -> Any:
        self._count()
        return self._db.execute(*args)

    def cursor(self) -> Any:
        return _FullDiskCursor(self, self._db.cursor())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


class _FullDiskCursor:
    def __init__(self, disk: _FullDisk, cursor: sqlite3.Cursor) -> None:
        self.disk = disk
        self.cursor = cursor

    def execute(self, *args: Any) -> Any:
        self.disk._count()
        return self.cursor.execute(*args)


class FullDiskTests(StoreTestCase):
    """A full disk at any statement of a mutation: NoSpace, and nothing changed."""

    def busy_tree(self) -> None:
        inode = self.create(ROOT_INODE, b"victim")
        self.write(inode, 2 * CHUNK_SIZE, [(0, b"v0", CHUNK_SIZE, CHUNK_SIZE), (1, b"v1", CHUNK_SIZE, CHUNK_SIZE)])
        self.store.apply(m.SetXattr(inode, b"x", b"y"))
        self.create(ROOT_INODE, b"source")

    def check_every_moment(self, error: BaseException) -> None:
        self.busy_tree()
        before = self.store.dump()
        real = self.store._db
        mutation = m.Rename(ROOT_INODE, b"source", ROOT_INODE, b"victim")
        for fail_at in range(1, 200):
            disk = _FullDisk(real, fail_at, error)
            self.store._db = disk  # type: ignore[assignment]
            try:
                self.store.apply(mutation)
            except errors.NoSpace as refused:
                self.assertIn("disk is full", str(refused))
                self.store._db = real
                self.assertFalse(real.in_transaction)
                self.assertEqual(self.store.dump(), before, f"changed by a failure at statement {fail_at}")
                continue
            finally:
                self.store._db = real
            self.assertLess(disk.statements, fail_at, "the mutation succeeded although a statement failed")
            break
        else:
            self.fail("the mutation never got through")
        self.assertGreater(fail_at, 5)
        self.assertEqual(self.names(ROOT_INODE), [b"victim"])
        self.assertEqual(self.store.garbage(), [b"v0", b"v1"])

    def test_sqlite_full(self) -> None:
        """SQLite's "database or disk is full" at any point leaves the database as it was."""
        self.check_every_moment(sqlite3.OperationalError("database or disk is full"))

    def test_enospc(self) -> None:
        """An OSError ENOSPC at any point is NoSpace too."""
        self.check_every_moment(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))

    def test_other_errors_pass(self) -> None:
        """Other database errors are not disguised as NoSpace."""
        self.store._db = _FullDisk(self.store._db, 2, sqlite3.OperationalError("disk I/O error"))  # type: ignore[assignment]
        try:
            self.assertRaises(sqlite3.OperationalError, self.mkdir, ROOT_INODE, b"d")
        finally:
            self.store._db = self.store._db._db  # type: ignore[attr-defined]


class _FailingCommit:
    """Stands in for the store's SQLite connection; ``COMMIT`` finds the disk full."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def execute(self, sql: str, *args: Any) -> Any:
        if sql == "COMMIT":
            raise sqlite3.OperationalError("database or disk is full")
        return self._db.execute(sql, *args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._db, name)


class GroupCommitTests(StoreTestCase):
    """Mutations of a group share one transaction, each in its own savepoint."""

    def setUp(self) -> None:
        super().setUp()
        self.journal = Journal(self.clock).install(self.store)
        self.before = self.store.dump()

    def other_connection_sees(self, name: bytes) -> bool:
        with sqlite3.connect(self.store.path) as other:
            return other.execute("SELECT 1 FROM entries WHERE parent = ? AND name = ?",
                                 (ROOT_INODE, name)).fetchone() is not None

    def test_one_commit_at_the_end(self) -> None:
        """Nothing is committed (seen by another connection) until the group ends; then everything is."""
        with self.store.group() as group:
            for name in (b"a", b"b", b"c"):
                self.mkdir(ROOT_INODE, name)
            self.assertTrue(self.store._db.in_transaction)
            self.assertFalse(self.other_connection_sees(b"a"))
        self.assertEqual(group.applied, 3)
        self.assertFalse(self.store._db.in_transaction)
        self.assertTrue(all(self.other_connection_sees(name) for name in (b"a", b"b", b"c")))
        self.assertEqual(self.journal.verify()[0], 3)

    def test_refused_mutation_rolls_back_alone(self) -> None:
        """A refusal inside a group is its own error; the others stay, and the journal has no gap."""
        with self.store.group() as group:
            self.mkdir(ROOT_INODE, b"a")
            self.assertRaises(errors.AlreadyExists, self.mkdir, ROOT_INODE, b"a")
            self.assertRaises(errors.NotFound, self.store.apply, m.Unlink(ROOT_INODE, b"absent"))
            self.mkdir(ROOT_INODE, b"b")
        self.assertEqual(group.applied, 2)
        self.assertEqual(self.names(ROOT_INODE), [b"a", b"b"])
        seq, _ = self.journal.verify()
        self.assertEqual([m.decode(entry.record).name for entry in self.journal.entries()], [b"a", b"b"])
        self.assertEqual(seq, 2)

    def test_empty_group(self) -> None:
        """A group without a mutation (or with refused ones only) changes nothing."""
        with self.store.group() as group:
            self.assertRaises(errors.NotFound, self.store.apply, m.Unlink(ROOT_INODE, b"absent"))
        self.assertEqual(group.applied, 0)
        self.assertEqual(self.store.dump(), self.before)

    def test_groups_do_not_nest(self) -> None:
        """A group inside a group is a programming error, and the outer one is rolled back."""
        with self.assertRaises(errors.InternalError):
            with self.store.group():
                self.mkdir(ROOT_INODE, b"a")
                with self.store.group():
                    pass
        self.assertEqual(self.store.dump(), self.before)
        self.assertIsNone(self.store._group)

    def test_commit_fails(self) -> None:
        """A full disk at COMMIT: NoSpace from the group, and none of its mutations stays."""
        real = self.store._db
        self.store._db = _FailingCommit(real)  # type: ignore[assignment]
        try:
            with self.assertRaises(errors.NoSpace):
                with self.store.group():
                    self.mkdir(ROOT_INODE, b"a")
                    self.mkdir(ROOT_INODE, b"b")
        finally:
            self.store._db = real
        self.assertFalse(real.in_transaction)
        self.assertEqual(self.store.dump(), self.before)
        self.mkdir(ROOT_INODE, b"c")  # the store goes on
        self.assertEqual(self.journal.verify()[0], 1)

    def test_full_disk_at_any_statement(self) -> None:
        """A full disk anywhere in a group: each mutation either stays and said so, or the whole group is gone."""
        real = self.store._db
        names = (b"x", b"y", b"z")
        for fail_at in range(1, 200):
            disk = _FullDisk(real, fail_at, sqlite3.OperationalError("database or disk is full"))
            self.store._db = disk  # type: ignore[assignment]
            succeeded = []
            try:
                with self.store.group():
                    for name in names:
                        try:
                            self.mkdir(ROOT_INODE, name)
                        except errors.NoSpace:
                            continue
                        succeeded.append(name)
            except errors.NoSpace:
                succeeded = []
            finally:
                self.store._db = real
            self.assertFalse(real.in_transaction)
            self.assertEqual(self.names(ROOT_INODE), succeeded, f"a failure at statement {fail_at}")
            self.journal.verify()
            if disk.statements < fail_at:
                break
            for name in succeeded:
                self.store.apply(m.RemoveDirectory(ROOT_INODE, name))
        else:
            self.fail("the group never got through")
        self.assertEqual(succeeded, list(names))

    def test_whole_transaction_lost(self) -> None:
        """When SQLite gives up the whole transaction, the group fails even for mutations that had passed."""
        real = self.store._db

        class RollsBackAll(_FullDisk):
            def _count(self) -> None:
                self.statements += 1
                if self.statements == self.fail_at:
                    real.execute("ROLLBACK")  # what SQLite may do on SQLITE_FULL
                    raise self.error

        with self.store.group():
            self.mkdir(ROOT_INODE, b"a")
        disk = RollsBackAll(real, 0, sqlite3.OperationalError("database or disk is full"))
        self.store._db = disk  # type: ignore[assignment]
        try:
            with self.assertRaises(errors.NoSpace):
                with self.store.group():
                    self.mkdir(ROOT_INODE, b"b")
                    disk.fail_at = disk.statements + 3
                    self.assertRaises(errors.NoSpace, self.mkdir, ROOT_INODE, b"c")
                    self.assertRaises(errors.NoSpace, self.mkdir, ROOT_INODE, b"d")
        finally:
            self.store._db = real
        self.assertEqual(self.names(ROOT_INODE), [b"a"])
        self.assertEqual(self.journal.verify()[0], 1)

    def test_initialised_is_remembered(self) -> None:
        """Once committed, the initialised flag is not read again."""
        self.assertTrue(self.store.initialised)
        real = self.store._db
        self.store._db = _FullDisk(real, 1, sqlite3.OperationalError("no statement expected"))  # type: ignore[assignment]
        try:
            self.assertTrue(self.store.initialised)
        finally:
            self.store._db = real

    def test_uninitialised_is_not_remembered(self) -> None:
        """A new store says False until the bootstrap commits, then True."""
        store = self.open_store("fresh.sqlite3")
        self.assertFalse(store.initialised)
        store.apply(initialise_record())
        self.assertTrue(store.initialised)


class RecordTests(StoreTestCase):
    """Records are plain values that survive encoding."""

    def test_encode_round_trip(self) -> None:
        """Every kind of record comes back equal from its bytes."""
        records = [
            m.CommitChunks(5, 2, 100, ((0, b"\x00\xff", 100, 100), (1, b"", 0, 0)), 7, 8),
            m.Unlink(1, b"name", (4, 5), 9),
            m.Initialise(b"id", 4096, "admin", b"s", 1, 2, 3, b"v", b"k", b"secret", 10),
        ]
        for record in records:
            self.assertEqual(m.decode(m.encode(record)), record)

    def test_unknown_kind(self) -> None:
        """Bytes of an unknown kind or shape are InvalidArgument."""
        self.assertRaises(errors.InvalidArgument, m.decode, b'{"kind":"nope"}')
        self.assertRaises(errors.InvalidArgument, m.decode, b'{"kind":"unlink","bogus":1}')
        self.assertRaises(errors.InvalidArgument, m.decode, b"not json")

    def test_store_refuses_non_records(self) -> None:
        """apply takes mutation records only."""
        self.assertRaises(errors.InvalidArgument, self.store.apply, "mkdir")  # type: ignore[arg-type]


class FreshStoreTests(StoreTestCase):
    """A store opened on a path that already holds another schema version is refused."""

    def test_future_schema(self) -> None:
        """A database from a newer server is refused with both versions named."""
        path = self.folder / "future.sqlite3"
        db = sqlite3.connect(path)
        db.execute("PRAGMA user_version = 99")
        db.close()
        with self.assertRaises(errors.InternalError) as caught:
            MetadataStore(path, self.clock)
        self.assertIn("schema version 99", str(caught.exception))
