"""
The metadata of one filespace in SQLite: the tree, chunk maps, users.

:class:`MetadataStore` keeps everything in one SQLite database in WAL mode
with ``synchronous=FULL``, so a change is on disk when it is acknowledged
(``NORMAL`` when ``durability=sync`` already holds back every answer until
the change is stored in the object store: a power cut may then lose the
last commits, never the database, and the server replays them from the
store when it starts).
Reads are plain methods.  Every change is a record from
:mod:`lucidlink.meta.mutations` given to :meth:`MetadataStore.apply`, which
runs it in one ``BEGIN IMMEDIATE`` … ``COMMIT`` transaction and, inside that
same transaction, calls the optional ``journal`` hook with the completed
record: the seam where the journal is written, so a change and its journal
record commit together or not at all.

Group commit: inside ``with store.group():`` each :meth:`~MetadataStore.apply`
runs in its own ``SAVEPOINT`` of one shared transaction, committed once (one
fsync) when the block ends.  A refused mutation rolls back its savepoint
alone, journal row included, and raises its own error; the others stay.
Until the block ends nothing of it is durable, so whoever groups answers
nothing about those mutations (and nothing read inside the block) before
the block has ended without an error.

The rules are those of ``docs/metadata-protocol.rst``.  Names, symlink
targets and xattrs are opaque ciphertext; entries are ordered by their bytes.

Inodes that lose their last link while a session holds them open (see
:meth:`MetadataStore.hold`) stay, with ``nlink`` 0, until the last hold is
released; handles do not survive a restart, so such orphans are reclaimed by
:meth:`MetadataStore.reclaim_orphans` when the server starts.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import sqlite3
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from twisted.internet.interfaces import IReactorTime
from zope.interface import implementer

from lucidlink.errors import (
    AlreadyExists,
    Conflict,
    FileTooLarge,
    InternalError,
    InvalidArgument,
    IsADirectory,
    LucidError,
    NameTooLong,
    NoAttribute,
    NoSpace,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotInitialized,
    NotPermitted,
    OutOfRange,
)
from lucidlink.meta import mutations as m
from lucidlink.meta.interface import IMetadataStore
from lucidlink.protocol.messages import (
    Attributes,
    FileKind,
    NotifyKind,
    RenameFlags,
    Role,
    SetAttrField,
    XattrFlags,
)

ROOT_INODE = 1
SCHEMA_VERSION = 2
MAX_INODE_BLOCK = 65536
"""The most inode ids one ``ReserveInodes`` sets aside."""

MAX_NAME_LENGTH = 1024
"""Longest sealed entry name, in bytes."""
MAX_SYMLINK_TARGET_LENGTH = 8192
MAX_XATTR_NAME_LENGTH = 1024
MAX_XATTR_VALUE_LENGTH = 65536 + 1024
"""A 64 KiB value (the Linux limit) and room for its sealing."""
MAX_OBJECT_ID_LENGTH = 64
MAX_FILE_SIZE = 2**63 - 1
"""SQLite integers are signed 64-bit."""
MAX_CHUNK_SIZE = 2**30
MAX_USER_NAME_LENGTH = 255
MAX_READDIR_LIMIT = 4096
MAX_CHUNKMAP_COUNT = 16384
TOTAL_BYTES = 2**50
"""What ``statfs`` reports as the size of a filespace without a quota: 1 PiB."""
TOTAL_INODES = 2**32
SERVER_SECRET_LENGTH = 32

_PERMISSION_BITS = 0o7777
KEPT_INODE_BLOCKS_NS = 24 * 3600 * 1_000_000_000
"""How long the store keeps a client's block of inode ids on record (for a restarted server)."""
MAX_KEPT_INODE_BLOCKS = 1024
"""Blocks kept on record at most, the newest."""
_ALL_SETATTR_FIELDS = int(SetAttrField(sum(SetAttrField)))
_INODE_COLUMNS = "id, kind, mode, nlink, uid, gid, size, atime_ns, mtime_ns, ctime_ns, version"

_SCHEMA = """
CREATE TABLE inodes (
    id INTEGER PRIMARY KEY,
    kind INTEGER NOT NULL,
    mode INTEGER NOT NULL,
    nlink INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    size INTEGER NOT NULL,
    atime_ns INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    version INTEGER NOT NULL,
    target BLOB
);
CREATE INDEX inodes_orphaned ON inodes(id) WHERE nlink = 0;
CREATE TABLE entries (
    parent INTEGER NOT NULL,
    name BLOB NOT NULL,
    inode INTEGER NOT NULL,
    PRIMARY KEY (parent, name)
) WITHOUT ROWID;
CREATE INDEX entries_by_inode ON entries(inode);
CREATE TABLE chunks (
    inode INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    object_id BLOB NOT NULL,
    length INTEGER NOT NULL,
    object_length INTEGER NOT NULL,
    PRIMARY KEY (inode, idx)
) WITHOUT ROWID;
CREATE INDEX chunks_by_object ON chunks(object_id);
CREATE TABLE xattrs (
    inode INTEGER NOT NULL,
    name BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (inode, name)
) WITHOUT ROWID;
CREATE TABLE users (
    name TEXT PRIMARY KEY,
    role INTEGER NOT NULL,
    salt BLOB NOT NULL,
    time_cost INTEGER NOT NULL,
    memory_kib INTEGER NOT NULL,
    parallelism INTEGER NOT NULL,
    verifier BLOB NOT NULL,
    wrapped_key BLOB NOT NULL
);
CREATE TABLE settings (
    key TEXT PRIMARY KEY,
    value
) WITHOUT ROWID;
CREATE TABLE garbage (
    object_id BLOB PRIMARY KEY,
    since_ns INTEGER NOT NULL
) WITHOUT ROWID;
"""


class Change(NamedTuple):
    """Something other sessions should hear about: what :class:`~lucidlink.protocol.messages.Notify` says."""

    kind: NotifyKind
    inode: int
    parent: int = 0
    name: bytes = b""


@dataclass(frozen=True, slots=True)
class Applied:
    """The outcome of :meth:`MetadataStore.apply`."""

    record: m.Mutation
    """The completed record: what the journal stores and a replay applies."""
    value: Any
    """The answer: attributes for creations and attribute changes, else ``None``."""
    changes: tuple[Change, ...]


@dataclass(frozen=True, slots=True)
class UserRecord:
    """A user as the store keeps them."""

    name: str
    role: Role
    salt: bytes
    time_cost: int
    memory_kib: int
    parallelism: int
    verifier: bytes
    wrapped_key: bytes


@dataclass(frozen=True, slots=True)
class Totals:
    """What ``statfs`` reports."""

    block_size: int
    total_bytes: int
    used_bytes: int
    total_inodes: int
    used_inodes: int


Journal = Callable[[sqlite3.Cursor, m.Mutation, Applied], None]


class Group:
    """One group commit in progress (see :meth:`MetadataStore.group`)."""

    __slots__ = ("applied", "lost")

    def __init__(self) -> None:
        self.applied = 0
        """Mutations applied so far in the group's transaction."""
        self.lost: BaseException | None = None
        """Why the whole transaction was rolled back before its end, if it was."""


def _is_disk_full(error: BaseException) -> bool:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return True
    if isinstance(error, sqlite3.Error):
        if getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return True
        return "database or disk is full" in str(error)
    return False


class _Transaction:
    """What one mutation needs while it runs: the cursor, its time, what changed."""

    def __init__(self, cursor: sqlite3.Cursor, time_ns: int, kept: tuple[int, ...] | None,
                 holds: dict[int, int]) -> None:
        self.cursor = cursor
        self.time_ns = time_ns
        self.changes: dict[Change, None] = {}
        self.given_kept = kept
        self.kept: list[int] = []
        self.holds = holds
        self.garbage_candidates: set[bytes] = set()

    def execute(self, sql: str, parameters: Iterable[Any] = ()) -> sqlite3.Cursor:
        return self.cursor.execute(sql, tuple(parameters))

    def one(self, sql: str, parameters: Iterable[Any] = ()) -> Any:
        return self.cursor.execute(sql, tuple(parameters)).fetchone()

    def changed(self, kind: NotifyKind, inode: int, parent: int = 0, name: bytes = b"") -> None:
        self.changes[Change(kind, inode, parent, name)] = None

    def keep(self, inode: int) -> bool:
        """Whether an inode that just lost its last link stays because it is open."""
        if self.given_kept is not None:
            return inode in self.given_kept
        if self.holds.get(inode, 0) > 0:
            self.kept.append(inode)
            return True
        return False


@implementer(IMetadataStore)
class MetadataStore:
    """The metadata of one filespace, in the SQLite database at ``path``.

    ``clock`` gives the time of changes; ``synchronous`` is SQLite's
    (``NORMAL`` only where every acknowledged change is also in the object
    store, which :func:`~lucidlink.meta.snapshots.catch_up` replays after a
    power cut); ``journal``, if given, is called
    as ``journal(cursor, record, applied)`` inside every mutation's
    transaction, after the change and before the commit; if it raises, the
    change is rolled back.
    """

    def __init__(self, path: Path | str, clock: IReactorTime, *, journal: Journal | None = None,
                 synchronous: str = "FULL") -> None:
        self.path = Path(path)
        self.clock = clock
        self.journal = journal
        self._holds: dict[int, int] = {}
        self._group: Group | None = None
        self._initialised = False
        self._db = sqlite3.connect(str(self.path), isolation_level=None)
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            if synchronous not in ("FULL", "NORMAL"):
                raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._create_schema()
        except BaseException:
            self._db.close()
            raise
        self._executors: dict[type, Callable[[_Transaction, Any], Any]] = {
            m.SetBootstrapToken: self._set_bootstrap_token,
            m.Initialise: self._initialise,
            m.AddUser: self._add_user,
            m.RemoveUser: self._remove_user,
            m.ChangeCredentials: self._change_credentials,
            m.MakeDirectory: self._mkdir,
            m.CreateFile: self._create,
            m.MakeSymlink: self._symlink,
            m.MakeLink: self._link,
            m.Unlink: self._unlink,
            m.RemoveDirectory: self._rmdir,
            m.Rename: self._rename,
            m.SetAttributes: self._setattr,
            m.SetXattr: self._setxattr,
            m.RemoveXattr: self._removexattr,
            m.CommitChunks: self._commit_chunks,
            m.Reclaim: self._reclaim,
            m.ReserveInodes: self._reserve_inodes,
        }

    def _create_schema(self) -> None:
        (version,) = self._db.execute("PRAGMA user_version").fetchone()
        if version == SCHEMA_VERSION:
            return
        if version != 0:
            raise InternalError(
                f"{self.path} has metadata schema version {version}; this server knows version {SCHEMA_VERSION}"
            )
        self._db.execute("BEGIN IMMEDIATE")
        try:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    self._db.execute(statement)
            self._db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Close the database."""
        self._db.close()

    # -- the one way to change anything ------------------------------------------

    def apply(self, mutation: m.Mutation) -> Applied:
        """Run ``mutation`` in one transaction (in a group: one savepoint) and return what it did.

        :raise LucidError: if a rule of the protocol refuses the change (the
            database is untouched), :class:`NoSpace` if the disk is full.
        """
        executor = self._executors.get(type(mutation))
        if executor is None:
            raise InvalidArgument(f"{type(mutation).__name__} is not a mutation")
        try:
            return self._apply(executor, mutation)
        except LucidError:
            raise
        except (sqlite3.Error, OSError) as error:
            if _is_disk_full(error):
                raise NoSpace(f"the metadata disk is full; {mutation.KIND} was not applied") from None
            raise

    def _apply(self, executor: Callable[[_Transaction, Any], Any], mutation: m.Mutation) -> Applied:
        group = self._group
        if group is None:
            return self._in_transaction(executor, mutation)
        if group.lost is not None:
            raise group.lost
        db = self._db
        if not db.in_transaction:
            db.execute("BEGIN IMMEDIATE")
        db.execute("SAVEPOINT mutation")
        try:
            applied = self._run(executor, mutation)
            db.execute("RELEASE mutation")
        except BaseException as error:
            self._roll_back_savepoint(group, error)
            raise
        group.applied += 1
        return applied

    def _in_transaction(self, executor: Callable[[_Transaction, Any], Any], mutation: m.Mutation) -> Applied:
        db = self._db
        # Inside a transaction the caller opened (a restore replaying many records), a savepoint of it.
        nested = db.in_transaction
        db.execute("SAVEPOINT apply" if nested else "BEGIN IMMEDIATE")
        try:
            applied = self._run(executor, mutation)
            db.execute("RELEASE apply" if nested else "COMMIT")
        except BaseException:
            if nested:
                db.execute("ROLLBACK TO apply")
                db.execute("RELEASE apply")
            elif db.in_transaction:
                db.execute("ROLLBACK")
            raise
        return applied

    def _roll_back_savepoint(self, group: Group, error: BaseException) -> None:
        db = self._db
        if db.in_transaction:
            try:
                db.execute("ROLLBACK TO mutation")
                db.execute("RELEASE mutation")
                return
            except (sqlite3.Error, OSError):
                if db.in_transaction:
                    db.execute("ROLLBACK")
        # SQLite gave up the whole transaction (a full disk can do that): the group's earlier mutations are gone.
        if group.applied:
            group.lost = error

    def _run(self, executor: Callable[[_Transaction, Any], Any], mutation: m.Mutation) -> Applied:
        """Apply ``mutation`` inside the open transaction and call the journal hook."""
        cursor = self._db.cursor()
        time_ns = getattr(mutation, "time_ns", None)
        if time_ns is None:
            time_ns = self.now_ns()
        tx = _Transaction(cursor, time_ns, getattr(mutation, "kept", None), self._holds)
        record = self._complete(tx, mutation)
        value = executor(tx, record)
        if hasattr(record, "kept") and record.kept is None:  # type: ignore[attr-defined]
            record = dataclasses.replace(record, kept=tuple(tx.kept))  # type: ignore[type-var]
        self._collect_garbage(tx)
        applied = Applied(record, value, tuple(tx.changes))
        if self.journal is not None:
            self.journal(cursor, record, applied)
        return applied

    @contextmanager
    def group(self) -> Iterator[Group]:
        """Apply every mutation of the block in one transaction, committed once as the block ends.

        Each :meth:`apply` inside runs in its own savepoint and raises its own
        error.  If the commit fails, or SQLite gave up the transaction on the
        way, every mutation of the block is rolled back and the ``with``
        statement raises (:class:`NoSpace` for a full disk).  Groups do not nest.
        """
        if self._group is not None:
            raise InternalError("a group commit is already in progress")
        group = self._group = Group()
        db = self._db
        try:
            yield group
        except BaseException:
            self._group = None
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
        self._group = None
        try:
            if group.lost is not None:
                raise group.lost
            if db.in_transaction:
                db.execute("COMMIT")
        except (sqlite3.Error, OSError) as error:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if _is_disk_full(error):
                raise NoSpace(f"the metadata disk is full; {group.applied} changes were not applied") from None
            raise

    def _complete(self, tx: _Transaction, record: m.Mutation) -> m.Mutation:
        """Fill in what the store decides: time, new inode ids, the server secret."""
        updates: dict[str, Any] = {}
        if hasattr(record, "time_ns") and record.time_ns is None and not (  # type: ignore[attr-defined]
            isinstance(record, m.ReserveInodes) and not record.client  # as journaled before blocks were kept
        ):
            updates["time_ns"] = tx.time_ns
        if isinstance(record, m.MakeDirectory | m.CreateFile | m.MakeSymlink):
            if record.inode is None:
                updates["inode"] = self._setting(tx.cursor, "next_inode", ROOT_INODE + 1)
        if isinstance(record, m.ReserveInodes) and record.first is None:
            updates["first"] = self._setting(tx.cursor, "next_inode", ROOT_INODE + 1)
        if isinstance(record, m.SetBootstrapToken | m.Initialise) and record.server_secret is None:
            existing = self._setting(tx.cursor, "server_secret")
            updates["server_secret"] = existing if existing is not None else os.urandom(SERVER_SECRET_LENGTH)
        return dataclasses.replace(record, **updates) if updates else record  # type: ignore[type-var]

    def now_ns(self) -> int:
        """The clock's time in nanoseconds."""
        return int(self.clock.seconds() * 1_000_000_000)

    # -- holds: open files that must outlive their last link --------------------

    def hold(self, inode: int) -> None:
        """Note that a session opened ``inode``; it stays while held, even without links."""
        self._holds[inode] = self._holds.get(inode, 0) + 1

    def forget_hold(self, inode: int) -> None:
        """Drop one hold without reclaiming: undoes a :meth:`hold` whose creation was rolled back."""
        count = self._holds.get(inode, 0) - 1
        if count > 0:
            self._holds[inode] = count
        else:
            self._holds.pop(inode, None)

    def release(self, inode: int) -> Applied | None:
        """Drop one hold; reclaim the inode if that was the last and it has no links."""
        count = self._holds.get(inode, 0) - 1
        if count > 0:
            self._holds[inode] = count
            return None
        self._holds.pop(inode, None)
        row = self._db.execute("SELECT nlink FROM inodes WHERE id = ?", (inode,)).fetchone()
        if row is None or row[0] != 0:
            return None
        return self.apply(m.Reclaim((inode,)))

    def held(self, inode: int) -> bool:
        """Whether a session holds ``inode`` open."""
        return self._holds.get(inode, 0) > 0

    def orphans(self) -> list[int]:
        """Inodes with no links left (kept because they were open)."""
        return [row[0] for row in self._db.execute("SELECT id FROM inodes WHERE nlink = 0 ORDER BY id")]

    def reclaim_orphans(self) -> Applied | None:
        """Reclaim every inode without links that nobody holds (at start: all of them)."""
        orphans = tuple(inode for inode in self.orphans() if not self.held(inode))
        if not orphans:
            return None
        return self.apply(m.Reclaim(orphans))

    # -- reads -----------------------------------------------------------------

    @property
    def initialised(self) -> bool:
        """Whether the filespace has been bootstrapped (remembered once committed: it never goes back)."""
        if not self._initialised:
            initialised = bool(self._setting(self._db, "initialised", 0))
            self._initialised = initialised and not self._db.in_transaction
            return initialised
        return True

    @property
    def chunk_size(self) -> int:
        """The filespace's chunk size."""
        return int(self._require_initialised("chunk_size"))

    @property
    def filespace_id(self) -> bytes:
        """The filespace's id, chosen by the client that bootstrapped it."""
        return bytes(self._require_initialised("filespace_id"))

    @property
    def server_secret(self) -> bytes | None:
        """The secret behind the fake salts of unknown users."""
        return self._setting(self._db, "server_secret")

    @property
    def bootstrap_token_hash(self) -> bytes | None:
        """The hash of the current one-time bootstrap token, until it is used."""
        return self._setting(self._db, "bootstrap_token_hash")

    def getattr(self, inode: int) -> Attributes:
        """The attributes of ``inode``; :class:`NotFound` if there is none."""
        return _attributes(self._inode_row(self._db, inode))

    def lookup(self, parent: int, name: bytes) -> Attributes:
        """The attributes of the entry ``name`` in directory ``parent``."""
        _check_name(name)
        self._directory(self._db, parent)
        row = self._db.execute(
            f"SELECT {_prefixed('i')} FROM entries e JOIN inodes i ON i.id = e.inode"
            " WHERE e.parent = ? AND e.name = ?",
            (parent, name),
        ).fetchone()
        if row is None:
            raise NotFound(f"no such entry in directory {parent}")
        return _attributes(row)

    def readdir(self, inode: int, cursor: bytes = b"", limit: int = MAX_READDIR_LIMIT) -> tuple[
        list[tuple[bytes, Attributes]], bytes, bool
    ]:
        """A page of entries after ``cursor``, ordered by name: (entries, next cursor, done)."""
        self._directory(self._db, inode)
        limit = MAX_READDIR_LIMIT if limit <= 0 else min(limit, MAX_READDIR_LIMIT)
        rows = self._db.execute(
            f"SELECT e.name, {_prefixed('i')} FROM entries e JOIN inodes i ON i.id = e.inode"
            " WHERE e.parent = ? AND e.name > ? ORDER BY e.name LIMIT ?",
            (inode, cursor, limit + 1),
        ).fetchall()
        done = len(rows) <= limit
        rows = rows[:limit]
        entries = [(bytes(row[0]), _attributes(row[1:])) for row in rows]
        next_cursor = entries[-1][0] if entries else cursor
        return entries, next_cursor, done

    def readlink(self, inode: int) -> bytes:
        """The sealed target of symbolic link ``inode``."""
        row = self._db.execute("SELECT kind, target FROM inodes WHERE id = ?", (inode,)).fetchone()
        if row is None:
            raise NotFound(f"no inode {inode}")
        if row[0] != FileKind.SYMLINK:
            raise InvalidArgument(f"inode {inode} is not a symbolic link")
        return bytes(row[1])

    def getxattr(self, inode: int, name: bytes) -> bytes:
        """The value of extended attribute ``name`` of ``inode``."""
        self._inode_row(self._db, inode)
        row = self._db.execute("SELECT value FROM xattrs WHERE inode = ? AND name = ?", (inode, name)).fetchone()
        if row is None:
            raise NoAttribute(f"inode {inode} has no such extended attribute")
        return bytes(row[0])

    def listxattr(self, inode: int) -> list[bytes]:
        """The names of ``inode``'s extended attributes."""
        self._inode_row(self._db, inode)
        return [bytes(row[0]) for row in self._db.execute(
            "SELECT name FROM xattrs WHERE inode = ? ORDER BY name", (inode,)
        )]

    def chunk_map(self, inode: int, first_index: int = 0, count: int = MAX_CHUNKMAP_COUNT) -> tuple[
        int, int, list[tuple[int, bytes, int, int]]
    ]:
        """(version, size, [(index, object_id, length, object_length)]) for chunks in the window."""
        row = self._inode_row(self._db, inode)
        _require_file(row)
        count = MAX_CHUNKMAP_COUNT if count <= 0 else min(count, MAX_CHUNKMAP_COUNT)
        last = min(first_index + count - 1, MAX_FILE_SIZE)
        chunks = [
            (index, bytes(object_id), length, object_length)
            for index, object_id, length, object_length in self._db.execute(
                "SELECT idx, object_id, length, object_length FROM chunks"
                " WHERE inode = ? AND idx BETWEEN ? AND ? ORDER BY idx",
                (inode, min(first_index, MAX_FILE_SIZE), last),
            )
        ]
        return row[10], row[6], chunks

    def statfs(self) -> Totals:
        """Totals for ``statfs``: bytes in files and inodes in use."""
        used_bytes, used_inodes = self._db.execute(
            "SELECT COALESCE(SUM(CASE WHEN kind = ? THEN size ELSE 0 END), 0), COUNT(*) FROM inodes",
            (FileKind.FILE,),
        ).fetchone()
        total = TOTAL_BYTES if used_bytes < TOTAL_BYTES // 2 else used_bytes * 2
        return Totals(self.chunk_size, total, used_bytes, TOTAL_INODES, used_inodes)

    def user(self, name: str) -> UserRecord | None:
        """The user called ``name``, if there is one."""
        row = self._db.execute("SELECT * FROM users WHERE name = ?", (name,)).fetchone()
        return _user(row) if row is not None else None

    def users(self) -> list[UserRecord]:
        """Every user, by name."""
        return [_user(row) for row in self._db.execute("SELECT * FROM users ORDER BY name")]

    def first_user(self) -> UserRecord | None:
        """The oldest user (the bootstrap admin, unless removed)."""
        row = self._db.execute("SELECT * FROM users ORDER BY rowid LIMIT 1").fetchone()
        return _user(row) if row is not None else None

    def garbage(self) -> list[bytes]:
        """Object ids no chunk map references any more."""
        return [bytes(row[0]) for row in self._db.execute("SELECT object_id FROM garbage ORDER BY object_id")]

    def garbage_times(self) -> dict[bytes, int]:
        """:meth:`garbage` with, for each, when a chunk map last named it (nanoseconds since the epoch)."""
        return {bytes(object_id): since for object_id, since in self._db.execute("SELECT object_id, since_ns FROM garbage")}

    def chunk_objects(self) -> set[bytes]:
        """Every object id a chunk map names."""
        return {bytes(row[0]) for row in self._db.execute("SELECT DISTINCT object_id FROM chunks")}

    def dump(self) -> dict[str, Any]:
        """Everything the database holds, as plain values, for comparison and verification.

        ``inodes`` maps each inode id to its attributes, symlink target,
        entries (if a directory), chunk map (``{index: (object_id, length,
        object_length)}``) and xattrs; ``users``, ``settings`` and ``garbage``
        follow.
        """
        db = self._db
        inodes: dict[int, dict[str, Any]] = {}
        for row in db.execute(f"SELECT {_INODE_COLUMNS}, target FROM inodes ORDER BY id"):
            attributes = dataclasses.asdict(_attributes(row[:11]))
            attributes["kind"] = int(attributes["kind"])
            inodes[row[0]] = {
                "attributes": attributes,
                "target": bytes(row[11]) if row[11] is not None else None,
                "entries": {},
                "chunks": {},
                "xattrs": {},
            }
        for parent, name, inode in db.execute("SELECT parent, name, inode FROM entries ORDER BY parent, name"):
            inodes.setdefault(parent, {"missing": True, "entries": {}})["entries"][bytes(name)] = inode
        for inode, index, object_id, length, object_length in db.execute(
            "SELECT inode, idx, object_id, length, object_length FROM chunks ORDER BY inode, idx"
        ):
            inodes.setdefault(inode, {"missing": True, "chunks": {}}).setdefault("chunks", {})[index] = (
                bytes(object_id), length, object_length
            )
        for inode, name, value in db.execute("SELECT inode, name, value FROM xattrs ORDER BY inode, name"):
            inodes.setdefault(inode, {"missing": True, "xattrs": {}}).setdefault("xattrs", {})[bytes(name)] = bytes(value)
        users = {
            user.name: {
                "role": int(user.role),
                "salt": user.salt,
                "time_cost": user.time_cost,
                "memory_kib": user.memory_kib,
                "parallelism": user.parallelism,
                "verifier": user.verifier,
                "wrapped_key": user.wrapped_key,
            }
            for user in self.users()
        }
        settings = {
            key: bytes(value) if isinstance(value, bytes | memoryview) else value
            for key, value in db.execute("SELECT key, value FROM settings ORDER BY key")
        }
        garbage = {bytes(object_id): since for object_id, since in db.execute(
            "SELECT object_id, since_ns FROM garbage ORDER BY object_id"
        )}
        return {"inodes": inodes, "users": users, "settings": settings, "garbage": garbage}

    # -- helpers for reads and writes ------------------------------------------

    @staticmethod
    def _setting(db: sqlite3.Connection | sqlite3.Cursor, key: str, default: Any = None) -> Any:
        row = db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return default if row is None else row[0]

    @staticmethod
    def _put_setting(tx: _Transaction, key: str, value: Any) -> None:
        tx.execute("INSERT OR REPLACE INTO settings (key, value) VALUES (?, ?)", (key, value))

    def _require_initialised(self, key: str) -> Any:
        value = self._setting(self._db, key)
        if value is None:
            raise NotInitialized("the filespace has not been initialised")
        return value

    @staticmethod
    def _inode_row(db: Any, inode: int) -> tuple[Any, ...]:
        if not 0 < inode <= MAX_FILE_SIZE:
            raise NotFound(f"no inode {inode}")
        row = db.execute(f"SELECT {_INODE_COLUMNS} FROM inodes WHERE id = ?", (inode,)).fetchone()
        if row is None:
            raise NotFound(f"no inode {inode}")
        return tuple(row)

    @classmethod
    def _directory(cls, db: Any, inode: int) -> tuple[Any, ...]:
        """The row of ``inode``, which must be a directory that still has its entry."""
        row = cls._inode_row(db, inode)
        if row[1] != FileKind.DIRECTORY:
            raise NotADirectory(f"inode {inode} is not a directory")
        if row[3] == 0:
            raise NotFound(f"directory {inode} has been removed")
        return row

    @staticmethod
    def _entry(tx: _Transaction, parent: int, name: bytes) -> int | None:
        row = tx.one("SELECT inode FROM entries WHERE parent = ? AND name = ?", (parent, name))
        return None if row is None else row[0]

    def _new_inode(self, tx: _Transaction, inode: int, kind: FileKind, mode: int, nlink: int, uid: int,
                   gid: int, target: bytes | None = None) -> None:
        if tx.one("SELECT 1 FROM inodes WHERE id = ?", (inode,)) is not None:
            raise InternalError(f"inode {inode} allocated twice")
        now = tx.time_ns
        tx.execute(
            f"INSERT INTO inodes ({_INODE_COLUMNS}, target) VALUES (?, ?, ?, ?, ?, ?, 0, ?, ?, ?, 1, ?)",
            (inode, kind, mode, nlink, uid, gid, now, now, now, target),
        )
        next_inode = self._setting(tx.cursor, "next_inode", ROOT_INODE + 1)
        if inode >= next_inode:
            self._put_setting(tx, "next_inode", inode + 1)

    @staticmethod
    def _touch_directory(tx: _Transaction, inode: int, nlink_change: int = 0) -> None:
        tx.execute(
            "UPDATE inodes SET mtime_ns = ?, ctime_ns = ?, nlink = nlink + ? WHERE id = ?",
            (tx.time_ns, tx.time_ns, nlink_change, inode),
        )
        tx.changed(NotifyKind.INODE_CHANGED, inode)

    def _drop_link(self, tx: _Transaction, row: tuple[Any, ...]) -> None:
        """``row``'s inode lost an entry (already deleted); reclaim it if that was its last."""
        inode = row[0]
        nlink = 0 if row[1] == FileKind.DIRECTORY else row[3] - 1
        tx.execute("UPDATE inodes SET nlink = ?, ctime_ns = ? WHERE id = ?", (nlink, tx.time_ns, inode))
        tx.changed(NotifyKind.INODE_CHANGED, inode)
        if nlink == 0 and not tx.keep(inode):
            self._delete_inode(tx, inode)

    @staticmethod
    def _delete_inode(tx: _Transaction, inode: int) -> None:
        for (object_id,) in tx.execute("SELECT object_id FROM chunks WHERE inode = ?", (inode,)).fetchall():
            tx.garbage_candidates.add(bytes(object_id))
        tx.execute("DELETE FROM chunks WHERE inode = ?", (inode,))
        tx.execute("DELETE FROM xattrs WHERE inode = ?", (inode,))
        tx.execute("DELETE FROM inodes WHERE id = ?", (inode,))

    @staticmethod
    def _collect_garbage(tx: _Transaction) -> None:
        for object_id in sorted(tx.garbage_candidates):
            if tx.one("SELECT 1 FROM chunks WHERE object_id = ? LIMIT 1", (object_id,)) is None:
                tx.execute(
                    "INSERT OR IGNORE INTO garbage (object_id, since_ns) VALUES (?, ?)", (object_id, tx.time_ns)
                )

    def _is_within(self, tx: _Transaction, inode: int, ancestor: int) -> bool:
        """Whether directory ``inode`` is ``ancestor`` or lies in its subtree."""
        seen: set[int] = set()
        while inode not in seen:
            if inode == ancestor:
                return True
            seen.add(inode)
            row = tx.one("SELECT parent FROM entries WHERE inode = ? LIMIT 1", (inode,))
            if row is None:
                return False
            inode = row[0]
        raise InternalError(f"the tree has a cycle through inode {inode}")

    def _trim_chunks(self, tx: _Transaction, inode: int, size: int) -> None:
        """Drop chunks wholly beyond ``size``; shorten the one it ends in (its ``length`` only:
        the object, and so its ``object_length``, stays as it is)."""
        chunk_size = int(self._setting(tx.cursor, "chunk_size"))
        first_beyond = -(-size // chunk_size)  # chunks from here start at or after size
        for (object_id,) in tx.execute(
            "SELECT object_id FROM chunks WHERE inode = ? AND idx >= ?", (inode, first_beyond)
        ).fetchall():
            tx.garbage_candidates.add(bytes(object_id))
        tx.execute("DELETE FROM chunks WHERE inode = ? AND idx >= ?", (inode, first_beyond))
        if size % chunk_size:
            last = size // chunk_size
            tx.execute(
                "UPDATE chunks SET length = ? WHERE inode = ? AND idx = ? AND length > ?",
                (size % chunk_size, inode, last, size % chunk_size),
            )

    # -- executors: one per mutation kind ------------------------------------------

    def _set_bootstrap_token(self, tx: _Transaction, record: m.SetBootstrapToken) -> None:
        if self._setting(tx.cursor, "initialised", 0):
            raise AlreadyExists("the filespace is already initialised")
        self._put_setting(tx, "bootstrap_token_hash", record.token_hash)
        self._put_setting(tx, "server_secret", record.server_secret)

    def _initialise(self, tx: _Transaction, record: m.Initialise) -> None:
        if self._setting(tx.cursor, "initialised", 0):
            raise AlreadyExists("the filespace is already initialised")
        if not 0 < record.chunk_size <= MAX_CHUNK_SIZE:
            raise InvalidArgument(f"chunk size must be between 1 byte and {MAX_CHUNK_SIZE} bytes, not {record.chunk_size}")
        if not 0 < len(record.filespace_id) <= 64:
            raise InvalidArgument("the filespace id must be 1 to 64 bytes")
        for key, value in (
            ("filespace_id", record.filespace_id),
            ("chunk_size", record.chunk_size),
            ("server_secret", record.server_secret),
            ("created_ns", tx.time_ns),
            ("initialised", 1),
        ):
            self._put_setting(tx, key, value)
        tx.execute("DELETE FROM settings WHERE key = 'bootstrap_token_hash'")
        self._new_inode(tx, ROOT_INODE, FileKind.DIRECTORY, stat.S_IFDIR | 0o755, 2, 0, 0)
        self._add_user(tx, m.AddUser(
            record.admin, Role.ADMIN, record.salt, record.time_cost, record.memory_kib, record.parallelism,
            record.verifier, record.wrapped_key,
        ))

    def _add_user(self, tx: _Transaction, record: m.AddUser) -> None:
        _check_user_name(record.name)
        role = _role(record.role)
        if tx.one("SELECT 1 FROM users WHERE name = ?", (record.name,)) is not None:
            raise AlreadyExists(f"user {record.name!r} already exists")
        tx.execute(
            "INSERT INTO users (name, role, salt, time_cost, memory_kib, parallelism, verifier, wrapped_key)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (record.name, role, record.salt, record.time_cost, record.memory_kib, record.parallelism,
             record.verifier, record.wrapped_key),
        )

    def _remove_user(self, tx: _Transaction, record: m.RemoveUser) -> None:
        row = tx.one("SELECT role FROM users WHERE name = ?", (record.name,))
        if row is None:
            raise NotFound(f"no user {record.name!r}")
        if row[0] == Role.ADMIN:
            (admins,) = tx.one("SELECT COUNT(*) FROM users WHERE role = ?", (Role.ADMIN,))
            if admins <= 1:
                raise NotPermitted(f"{record.name!r} is the last admin and cannot be removed")
        tx.execute("DELETE FROM users WHERE name = ?", (record.name,))

    def _change_credentials(self, tx: _Transaction, record: m.ChangeCredentials) -> None:
        cursor = tx.execute(
            "UPDATE users SET salt = ?, time_cost = ?, memory_kib = ?, parallelism = ?, verifier = ?,"
            " wrapped_key = ? WHERE name = ?",
            (record.salt, record.time_cost, record.memory_kib, record.parallelism, record.verifier,
             record.wrapped_key, record.name),
        )
        if cursor.rowcount != 1:
            raise NotFound(f"no user {record.name!r}")

    def _make_entry(self, tx: _Transaction, parent: int, name: bytes) -> None:
        """Check that ``name`` may be made in ``parent``."""
        _check_name(name)
        self._directory(tx.cursor, parent)
        if self._entry(tx, parent, name) is not None:
            raise AlreadyExists(f"the name is taken in directory {parent}")

    def _link_entry(self, tx: _Transaction, parent: int, name: bytes, inode: int, subdirectory: bool) -> None:
        tx.execute("INSERT INTO entries (parent, name, inode) VALUES (?, ?, ?)", (parent, name, inode))
        self._touch_directory(tx, parent, 1 if subdirectory else 0)
        tx.changed(NotifyKind.ENTRY_CHANGED, inode, parent, name)

    def _reserve_inodes(self, tx: _Transaction, record: m.ReserveInodes) -> int:
        if not 1 <= record.count <= MAX_INODE_BLOCK:
            raise InvalidArgument(f"a block of inode ids holds 1 to {MAX_INODE_BLOCK}, not {record.count}")
        assert record.first is not None
        next_inode = self._setting(tx.cursor, "next_inode", ROOT_INODE + 1)
        self._put_setting(tx, "next_inode", max(next_inode, record.first + record.count))
        if record.client:
            oldest = tx.time_ns - KEPT_INODE_BLOCKS_NS
            blocks = [block for block in self._kept_inode_blocks(tx.cursor) if block[3] >= oldest]
            blocks.append([record.client.hex(), record.first, record.count, tx.time_ns])
            self._put_setting(tx, "inode_blocks", json.dumps(blocks[-MAX_KEPT_INODE_BLOCKS:]))
        return record.first

    @staticmethod
    def _kept_inode_blocks(db: Any) -> list[list[Any]]:
        kept = MetadataStore._setting(db, "inode_blocks")
        return [] if kept is None else list(json.loads(kept))

    def inode_blocks(self) -> list[tuple[bytes, int, int]]:
        """The inode id blocks reserved lately for named clients, oldest first: (client, first, count)."""
        return [(bytes.fromhex(client), first, count) for client, first, count, _ in self._kept_inode_blocks(self._db)]

    def inode_exists(self, inode: int) -> bool:
        """Whether ``inode`` is an inode of the filespace (with links or still open)."""
        return self._db.execute("SELECT 1 FROM inodes WHERE id = ?", (inode,)).fetchone() is not None

    def _group_of_new_entry(self, tx: _Transaction, parent: int, gid: int) -> tuple[int, int]:
        """
        The group of an entry made in ``parent`` by a caller of group ``gid``, and the mode bits it inherits.

        A directory with the set-group-ID bit gives its group to what is
        made in it, and the bit to new directories (as local filesystems do).
        """
        row = self._directory(tx.cursor, parent)
        return (row[5], stat.S_ISGID) if row[2] & stat.S_ISGID else (gid, 0)

    def _mkdir(self, tx: _Transaction, record: m.MakeDirectory) -> Attributes:
        self._make_entry(tx, record.parent, record.name)
        assert record.inode is not None
        gid, inherited = self._group_of_new_entry(tx, record.parent, record.gid)
        self._new_inode(tx, record.inode, FileKind.DIRECTORY,
                        stat.S_IFDIR | (record.mode & _PERMISSION_BITS) | inherited, 2, record.uid, gid)
        self._link_entry(tx, record.parent, record.name, record.inode, True)
        return _attributes(self._inode_row(tx.cursor, record.inode))

    def _create(self, tx: _Transaction, record: m.CreateFile) -> tuple[Attributes, bool]:
        _check_name(record.name)
        self._directory(tx.cursor, record.parent)
        existing = self._entry(tx, record.parent, record.name)
        if existing is not None:
            if record.exclusive:
                raise AlreadyExists(f"the name is taken in directory {record.parent}")
            row = self._inode_row(tx.cursor, existing)
            if row[1] == FileKind.DIRECTORY:
                raise IsADirectory(f"inode {existing} is a directory")
            if row[1] != FileKind.FILE:
                raise AlreadyExists(f"the name is taken by a symbolic link in directory {record.parent}")
            return _attributes(row), False
        assert record.inode is not None
        gid, _ = self._group_of_new_entry(tx, record.parent, record.gid)
        self._new_inode(tx, record.inode, FileKind.FILE, stat.S_IFREG | (record.mode & _PERMISSION_BITS),
                        1, record.uid, gid)
        self._link_entry(tx, record.parent, record.name, record.inode, False)
        return _attributes(self._inode_row(tx.cursor, record.inode)), True

    def _symlink(self, tx: _Transaction, record: m.MakeSymlink) -> Attributes:
        if not record.target:
            raise InvalidArgument("a symbolic link needs a target")
        if len(record.target) > MAX_SYMLINK_TARGET_LENGTH:
            raise NameTooLong(f"a symbolic link target holds at most {MAX_SYMLINK_TARGET_LENGTH} bytes sealed")
        self._make_entry(tx, record.parent, record.name)
        assert record.inode is not None
        gid, _ = self._group_of_new_entry(tx, record.parent, record.gid)
        self._new_inode(tx, record.inode, FileKind.SYMLINK, stat.S_IFLNK | 0o777, 1, record.uid, gid, record.target)
        tx.execute("UPDATE inodes SET size = ? WHERE id = ?", (len(record.target), record.inode))
        self._link_entry(tx, record.parent, record.name, record.inode, False)
        return _attributes(self._inode_row(tx.cursor, record.inode))

    def _link(self, tx: _Transaction, record: m.MakeLink) -> Attributes:
        row = self._inode_row(tx.cursor, record.inode)
        if row[1] == FileKind.DIRECTORY:
            raise NotPermitted("a directory cannot have hard links")
        if row[3] == 0:
            raise NotFound(f"inode {record.inode} has been removed")
        self._make_entry(tx, record.parent, record.name)
        tx.execute("UPDATE inodes SET nlink = nlink + 1, ctime_ns = ? WHERE id = ?", (tx.time_ns, record.inode))
        tx.changed(NotifyKind.INODE_CHANGED, record.inode)
        self._link_entry(tx, record.parent, record.name, record.inode, False)
        return _attributes(self._inode_row(tx.cursor, record.inode))

    def _existing_entry(self, tx: _Transaction, parent: int, name: bytes) -> tuple[Any, ...]:
        _check_name(name)
        self._directory(tx.cursor, parent)
        inode = self._entry(tx, parent, name)
        if inode is None:
            raise NotFound(f"no such entry in directory {parent}")
        return self._inode_row(tx.cursor, inode)

    def _remove_entry(self, tx: _Transaction, parent: int, name: bytes, row: tuple[Any, ...]) -> None:
        tx.execute("DELETE FROM entries WHERE parent = ? AND name = ?", (parent, name))
        tx.changed(NotifyKind.ENTRY_CHANGED, row[0], parent, name)

    def _unlink(self, tx: _Transaction, record: m.Unlink) -> Attributes:
        """Remove a non-directory entry; the directory's new attributes."""
        row = self._existing_entry(tx, record.parent, record.name)
        if row[1] == FileKind.DIRECTORY:
            raise IsADirectory("use rmdir to remove a directory")
        self._remove_entry(tx, record.parent, record.name, row)
        self._touch_directory(tx, record.parent)
        self._drop_link(tx, row)
        return _attributes(self._inode_row(tx.cursor, record.parent))

    def _rmdir(self, tx: _Transaction, record: m.RemoveDirectory) -> Attributes:
        """Remove an empty directory; its parent's new attributes."""
        row = self._existing_entry(tx, record.parent, record.name)
        if row[0] == ROOT_INODE:
            raise NotPermitted("the root directory cannot be removed")
        if row[1] != FileKind.DIRECTORY:
            raise NotADirectory("rmdir removes directories only")
        if tx.one("SELECT 1 FROM entries WHERE parent = ? LIMIT 1", (row[0],)) is not None:
            raise NotEmpty(f"directory {row[0]} is not empty")
        self._remove_entry(tx, record.parent, record.name, row)
        self._touch_directory(tx, record.parent, -1)
        self._drop_link(tx, row)
        return _attributes(self._inode_row(tx.cursor, record.parent))

    def _rename(self, tx: _Transaction, record: m.Rename) -> None:
        flags = record.flags
        if flags & ~(RenameFlags.NOREPLACE | RenameFlags.EXCHANGE):
            raise InvalidArgument(f"unknown rename flags {flags:#x}")
        if flags & RenameFlags.NOREPLACE and flags & RenameFlags.EXCHANGE:
            raise InvalidArgument("NOREPLACE and EXCHANGE exclude each other")
        _check_name(record.new_name)
        source = self._existing_entry(tx, record.old_parent, record.old_name)
        self._directory(tx.cursor, record.new_parent)
        target_inode = self._entry(tx, record.new_parent, record.new_name)
        target = None if target_inode is None else self._inode_row(tx.cursor, target_inode)
        if flags & RenameFlags.EXCHANGE:
            self._exchange(tx, record, source, target)
            return
        if target is not None and target[0] == source[0]:
            return  # two links of one inode: rename(2) does nothing
        source_is_dir = source[1] == FileKind.DIRECTORY
        if target is not None:
            if flags & RenameFlags.NOREPLACE:
                raise AlreadyExists(f"the name is taken in directory {record.new_parent}")
            if source_is_dir and target[1] != FileKind.DIRECTORY:
                raise NotADirectory("a directory can only replace a directory")
            if not source_is_dir and target[1] == FileKind.DIRECTORY:
                raise IsADirectory("a non-directory cannot replace a directory")
        if source_is_dir and self._is_within(tx, record.new_parent, source[0]):
            raise InvalidArgument("a directory cannot move into its own subtree")
        if target is not None and target[1] == FileKind.DIRECTORY:
            if tx.one("SELECT 1 FROM entries WHERE parent = ? LIMIT 1", (target[0],)) is not None:
                raise NotEmpty(f"directory {target[0]} is not empty")
        moves_directory = source_is_dir and record.old_parent != record.new_parent
        if target is not None:
            self._remove_entry(tx, record.new_parent, record.new_name, target)
            if target[1] == FileKind.DIRECTORY:
                tx.execute("UPDATE inodes SET nlink = nlink - 1 WHERE id = ?", (record.new_parent,))
            self._drop_link(tx, target)
        self._remove_entry(tx, record.old_parent, record.old_name, source)
        self._touch_directory(tx, record.old_parent, -1 if moves_directory else 0)
        self._link_entry(tx, record.new_parent, record.new_name, source[0], moves_directory)
        tx.execute("UPDATE inodes SET ctime_ns = ? WHERE id = ?", (tx.time_ns, source[0]))
        tx.changed(NotifyKind.INODE_CHANGED, source[0])

    def _exchange(self, tx: _Transaction, record: m.Rename, source: tuple[Any, ...],
                  target: tuple[Any, ...] | None) -> None:
        if target is None:
            raise NotFound(f"EXCHANGE needs an existing entry in directory {record.new_parent}")
        if target[0] == source[0]:
            return
        old_parent, new_parent = record.old_parent, record.new_parent
        if old_parent != new_parent:
            if source[1] == FileKind.DIRECTORY and self._is_within(tx, new_parent, source[0]):
                raise InvalidArgument("a directory cannot move into its own subtree")
            if target[1] == FileKind.DIRECTORY and self._is_within(tx, old_parent, target[0]):
                raise InvalidArgument("a directory cannot move into its own subtree")
        tx.execute("UPDATE entries SET inode = ? WHERE parent = ? AND name = ?", (target[0], old_parent, record.old_name))
        tx.execute("UPDATE entries SET inode = ? WHERE parent = ? AND name = ?", (source[0], new_parent, record.new_name))
        moved = (source[1] == FileKind.DIRECTORY) - (target[1] == FileKind.DIRECTORY)
        if old_parent == new_parent:
            moved = 0
        self._touch_directory(tx, old_parent, -moved)
        self._touch_directory(tx, new_parent, moved)
        for row, parent, name in ((source, new_parent, record.new_name), (target, old_parent, record.old_name)):
            tx.execute("UPDATE inodes SET ctime_ns = ? WHERE id = ?", (tx.time_ns, row[0]))
            tx.changed(NotifyKind.INODE_CHANGED, row[0])
            tx.changed(NotifyKind.ENTRY_CHANGED, row[0], parent, name)

    def _setattr(self, tx: _Transaction, record: m.SetAttributes) -> Attributes:
        row = self._inode_row(tx.cursor, record.inode)
        if record.fields & ~_ALL_SETATTR_FIELDS:
            raise InvalidArgument(f"unknown setattr fields {record.fields:#x}")
        fields = SetAttrField(record.fields)
        values: dict[str, Any] = {"ctime_ns": tx.time_ns}
        if fields & SetAttrField.MODE:
            values["mode"] = (row[2] & ~_PERMISSION_BITS) | (record.mode & _PERMISSION_BITS)
        if fields & SetAttrField.UID:
            values["uid"] = record.uid
        if fields & SetAttrField.GID:
            values["gid"] = record.gid
        if fields & SetAttrField.SIZE:
            if row[1] == FileKind.DIRECTORY:
                raise IsADirectory(f"inode {record.inode} is a directory")
            _require_file(row)
            if record.size > MAX_FILE_SIZE:
                raise FileTooLarge(f"a file holds at most {MAX_FILE_SIZE} bytes")
            self._trim_chunks(tx, record.inode, record.size)
            values["size"] = record.size
            values["version"] = row[10] + 1
            values["mtime_ns"] = tx.time_ns
        if fields & SetAttrField.ATIME_NOW:
            values["atime_ns"] = tx.time_ns
        elif fields & SetAttrField.ATIME:
            values["atime_ns"] = record.atime_ns
        if fields & SetAttrField.MTIME_NOW:
            values["mtime_ns"] = tx.time_ns
        elif fields & SetAttrField.MTIME:
            values["mtime_ns"] = record.mtime_ns
        assignments = ", ".join(f"{column} = ?" for column in values)
        tx.execute(f"UPDATE inodes SET {assignments} WHERE id = ?", (*values.values(), record.inode))
        tx.changed(NotifyKind.INODE_CHANGED, record.inode)
        return _attributes(self._inode_row(tx.cursor, record.inode))

    def _setxattr(self, tx: _Transaction, record: m.SetXattr) -> None:
        self._inode_row(tx.cursor, record.inode)
        _check_xattr_name(record.name)
        if len(record.value) > MAX_XATTR_VALUE_LENGTH:
            raise OutOfRange(f"an extended attribute value holds at most {MAX_XATTR_VALUE_LENGTH} bytes sealed")
        try:
            flags = XattrFlags(record.flags)
        except ValueError:
            raise InvalidArgument(f"unknown setxattr flags {record.flags}") from None
        exists = tx.one("SELECT 1 FROM xattrs WHERE inode = ? AND name = ?", (record.inode, record.name)) is not None
        if flags == XattrFlags.CREATE and exists:
            raise AlreadyExists(f"inode {record.inode} already has that extended attribute")
        if flags == XattrFlags.REPLACE and not exists:
            raise NoAttribute(f"inode {record.inode} has no such extended attribute")
        tx.execute(
            "INSERT OR REPLACE INTO xattrs (inode, name, value) VALUES (?, ?, ?)",
            (record.inode, record.name, record.value),
        )
        tx.execute("UPDATE inodes SET ctime_ns = ? WHERE id = ?", (tx.time_ns, record.inode))
        tx.changed(NotifyKind.INODE_CHANGED, record.inode)

    def _removexattr(self, tx: _Transaction, record: m.RemoveXattr) -> None:
        self._inode_row(tx.cursor, record.inode)
        _check_xattr_name(record.name)
        cursor = tx.execute("DELETE FROM xattrs WHERE inode = ? AND name = ?", (record.inode, record.name))
        if cursor.rowcount != 1:
            raise NoAttribute(f"inode {record.inode} has no such extended attribute")
        tx.execute("UPDATE inodes SET ctime_ns = ? WHERE id = ?", (tx.time_ns, record.inode))
        tx.changed(NotifyKind.INODE_CHANGED, record.inode)

    def _commit_chunks(self, tx: _Transaction, record: m.CommitChunks) -> Attributes:
        row = self._inode_row(tx.cursor, record.inode)
        if row[1] == FileKind.DIRECTORY:
            raise IsADirectory(f"inode {record.inode} is a directory")
        _require_file(row)
        if record.expected_version and record.expected_version != row[10]:
            raise Conflict(
                f"the chunk map of inode {record.inode} is at version {row[10]}, not {record.expected_version};"
                " read it again"
            )
        if record.size > MAX_FILE_SIZE:
            raise FileTooLarge(f"a file holds at most {MAX_FILE_SIZE} bytes")
        chunk_size = int(self._setting(tx.cursor, "chunk_size"))
        seen: set[int] = set()
        for index, object_id, length, object_length in record.chunks:
            if index in seen:
                raise InvalidArgument(f"chunk {index} appears twice in one commit")
            seen.add(index)
            if index * chunk_size > MAX_FILE_SIZE:
                raise FileTooLarge(f"chunk {index} lies beyond the largest file size")
            if len(object_id) > MAX_OBJECT_ID_LENGTH:
                raise InvalidArgument(f"an object id holds at most {MAX_OBJECT_ID_LENGTH} bytes")
            if not 0 <= length <= object_length <= chunk_size:
                raise InvalidArgument(
                    f"chunk {index} has length {length} of an object of {object_length} bytes;"
                    f" 0 <= length <= object length <= the chunk size ({chunk_size}) must hold"
                )
        for index, object_id, length, object_length in record.chunks:
            old = tx.one("SELECT object_id FROM chunks WHERE inode = ? AND idx = ?", (record.inode, index))
            if old is not None:
                tx.garbage_candidates.add(bytes(old[0]))
            if object_id:
                tx.execute(
                    "INSERT OR REPLACE INTO chunks (inode, idx, object_id, length, object_length)"
                    " VALUES (?, ?, ?, ?, ?)",
                    (record.inode, index, object_id, length, object_length),
                )
                tx.execute("DELETE FROM garbage WHERE object_id = ?", (object_id,))
            else:
                tx.execute("DELETE FROM chunks WHERE inode = ? AND idx = ?", (record.inode, index))
        self._trim_chunks(tx, record.inode, record.size)
        tx.execute(
            "UPDATE inodes SET size = ?, mtime_ns = ?, ctime_ns = ?, version = version + 1 WHERE id = ?",
            (record.size, record.mtime_ns or tx.time_ns, tx.time_ns, record.inode),
        )
        tx.changed(NotifyKind.INODE_CHANGED, record.inode)
        return _attributes(self._inode_row(tx.cursor, record.inode))

    def _reclaim(self, tx: _Transaction, record: m.Reclaim) -> None:
        for inode in record.inodes:
            row = tx.one("SELECT nlink FROM inodes WHERE id = ?", (inode,))
            if row is not None and row[0] == 0:
                self._delete_inode(tx, inode)


# ---------------------------------------------------------------------------


def _prefixed(alias: str) -> str:
    return ", ".join(f"{alias}.{column.strip()}" for column in _INODE_COLUMNS.split(","))


def _attributes(row: Any) -> Attributes:
    return Attributes(row[0], FileKind(row[1]), *row[2:11])


def _user(row: Any) -> UserRecord:
    name, role, salt, time_cost, memory_kib, parallelism, verifier, wrapped_key = row
    return UserRecord(name, Role(role), bytes(salt), time_cost, memory_kib, parallelism, bytes(verifier),
                      bytes(wrapped_key))


def _role(value: int) -> Role:
    try:
        return Role(value)
    except ValueError:
        raise InvalidArgument(f"{value} is not a role") from None


def _require_file(row: tuple[Any, ...]) -> None:
    if row[1] == FileKind.DIRECTORY:
        raise IsADirectory(f"inode {row[0]} is a directory")
    if row[1] != FileKind.FILE:
        raise InvalidArgument(f"inode {row[0]} is not a regular file")


def _check_name(name: bytes) -> None:
    if not name:
        raise InvalidArgument("an entry name cannot be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise NameTooLong(f"a sealed name holds at most {MAX_NAME_LENGTH} bytes, not {len(name)}")


def _check_xattr_name(name: bytes) -> None:
    if not name:
        raise InvalidArgument("an extended attribute name cannot be empty")
    if len(name) > MAX_XATTR_NAME_LENGTH:
        raise OutOfRange(f"a sealed extended attribute name holds at most {MAX_XATTR_NAME_LENGTH} bytes")


def _check_user_name(name: str) -> None:
    if not name or len(name) > MAX_USER_NAME_LENGTH:
        raise InvalidArgument(f"a user name holds 1 to {MAX_USER_NAME_LENGTH} characters")
    if any(not character.isprintable() for character in name) or name != name.strip():
        raise InvalidArgument(f"user name {name!r} has unprintable characters or surrounding spaces")
