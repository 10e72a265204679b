"""
Every change to a filespace's metadata, as a plain replayable record.

A mutation is a frozen dataclass of plain values (ints, strings, bytes,
booleans, tuples of them).  :meth:`MetadataStore.apply
<lucidlink.meta.store.MetadataStore.apply>` runs one in a single SQLite
transaction.  Fields that only the store can decide — the inode id a
creation allocates, the time, the random server secret, which unlinked
inodes stay because a session holds them open — may be left ``None``: the
store fills them in, and the *completed* record is what it hands to its
journal hook and returns.  Replaying completed records, in order, on an
empty store gives an identical database; that is how a lost disk is rebuilt
from the journal.

:func:`encode` and :func:`decode` turn records into bytes and back (JSON,
bytes as base64), so a journal can store them.
"""

from __future__ import annotations

import base64
import dataclasses
import json
from dataclasses import dataclass
from typing import Any, ClassVar

from lucidlink.errors import InvalidArgument

MUTATIONS: dict[str, type[Mutation]] = {}
"""Every mutation class by its ``KIND``."""


class Mutation:
    """What every mutation record provides."""

    __slots__ = ()
    KIND: ClassVar[str]


def mutation(kind: str) -> Any:
    """Make ``cls`` a frozen dataclass mutation called ``kind`` and register it."""

    def register(cls: type) -> type:
        cls = dataclass(frozen=True, slots=True)(cls)
        cls.KIND = kind  # type: ignore[attr-defined]
        if kind in MUTATIONS:
            raise RuntimeError(f"mutation kind {kind!r} declared twice")
        MUTATIONS[kind] = cls  # type: ignore[assignment]
        return cls

    return register


# ---------------------------------------------------------------------------
# The filespace and its users


@mutation("set-bootstrap-token")
class SetBootstrapToken(Mutation):
    """Remember the hash of a new one-time bootstrap token (and make the server secret)."""

    token_hash: bytes
    server_secret: bytes | None = None


@mutation("initialise")
class Initialise(Mutation):
    """Make the filespace: its id, chunk size, root directory and first admin."""

    filespace_id: bytes
    chunk_size: int
    admin: str
    salt: bytes
    time_cost: int
    memory_kib: int
    parallelism: int
    verifier: bytes
    wrapped_key: bytes
    server_secret: bytes | None = None
    time_ns: int | None = None


@mutation("add-user")
class AddUser(Mutation):
    """Add a user with a role, their KDF parameters, login verifier and wrapped key."""

    name: str
    role: int
    salt: bytes
    time_cost: int
    memory_kib: int
    parallelism: int
    verifier: bytes
    wrapped_key: bytes


@mutation("remove-user")
class RemoveUser(Mutation):
    """Remove a user (never the last admin)."""

    name: str


@mutation("change-credentials")
class ChangeCredentials(Mutation):
    """Replace a user's KDF parameters, login verifier and wrapped key."""

    name: str
    salt: bytes
    time_cost: int
    memory_kib: int
    parallelism: int
    verifier: bytes
    wrapped_key: bytes


# ---------------------------------------------------------------------------
# The tree


@mutation("mkdir")
class MakeDirectory(Mutation):
    """Make directory ``name`` in ``parent``."""

    parent: int
    name: bytes
    mode: int
    uid: int
    gid: int
    inode: int | None = None
    time_ns: int | None = None


@mutation("create")
class CreateFile(Mutation):
    """Make regular file ``name`` in ``parent``; not ``exclusive``: an existing file is fine."""

    parent: int
    name: bytes
    mode: int
    uid: int
    gid: int
    exclusive: bool
    inode: int | None = None
    time_ns: int | None = None


@mutation("symlink")
class MakeSymlink(Mutation):
    """Make symbolic link ``name`` in ``parent`` with the sealed ``target``."""

    parent: int
    name: bytes
    target: bytes
    uid: int
    gid: int
    inode: int | None = None
    time_ns: int | None = None


@mutation("link")
class MakeLink(Mutation):
    """Make a hard link ``name`` in ``parent`` to ``inode``."""

    inode: int
    parent: int
    name: bytes
    time_ns: int | None = None


@mutation("unlink")
class Unlink(Mutation):
    """Remove the non-directory entry ``name`` from ``parent``.

    ``kept`` lists the inodes left without links that stay because a session
    holds them open.
    """

    parent: int
    name: bytes
    kept: tuple[int, ...] | None = None
    time_ns: int | None = None


@mutation("rmdir")
class RemoveDirectory(Mutation):
    """Remove the empty directory ``name`` from ``parent``."""

    parent: int
    name: bytes
    kept: tuple[int, ...] | None = None
    time_ns: int | None = None


@mutation("rename")
class Rename(Mutation):
    """Move an entry as ``renameat2`` does, with its ``flags``."""

    old_parent: int
    old_name: bytes
    new_parent: int
    new_name: bytes
    flags: int = 0
    kept: tuple[int, ...] | None = None
    time_ns: int | None = None


@mutation("setattr")
class SetAttributes(Mutation):
    """Change the attributes ``fields`` (``SetAttrField`` bits) names."""

    inode: int
    fields: int
    mode: int = 0
    uid: int = 0
    gid: int = 0
    size: int = 0
    atime_ns: int = 0
    mtime_ns: int = 0
    time_ns: int | None = None


@mutation("setxattr")
class SetXattr(Mutation):
    """Set an extended attribute; ``flags`` is an ``XattrFlags`` value."""

    inode: int
    name: bytes
    value: bytes
    flags: int = 0
    time_ns: int | None = None


@mutation("removexattr")
class RemoveXattr(Mutation):
    """Remove an extended attribute."""

    inode: int
    name: bytes
    time_ns: int | None = None


@mutation("commit-chunks")
class CommitChunks(Mutation):
    """Replace chunk map entries and set the size, if the map is at ``expected_version``.

    ``chunks`` holds ``(index, object_id, length, object_length)``: ``length``
    plaintext bytes of the object belong to the file, and the object holds
    ``object_length``; an empty ``object_id`` removes the entry.  ``expected_version`` 0 skips the check.  ``mtime_ns``
    0 means the store's time.
    """

    inode: int
    expected_version: int
    size: int
    chunks: tuple[tuple[int, bytes, int, int], ...]
    mtime_ns: int = 0
    time_ns: int | None = None


@mutation("reserve-inodes")
class ReserveInodes(Mutation):
    """
    Move the next inode id past ``count`` ids a client gives its own creations, from ``first``; the block
    is kept as ``client``'s (older records have none) so that a restarted server still knows it.
    """

    count: int
    first: int | None = None
    client: bytes = b""
    time_ns: int | None = None


@mutation("reclaim")
class Reclaim(Mutation):
    """Delete inodes that have no links left (no longer open); their chunks become garbage."""

    inodes: tuple[int, ...]
    time_ns: int | None = None


# ---------------------------------------------------------------------------
# Bytes for a journal


def to_plain(record: Mutation) -> dict[str, Any]:
    """The record as a dict of JSON-friendly values, with its kind."""
    plain: dict[str, Any] = {"kind": record.KIND}
    for field in dataclasses.fields(record):  # type: ignore[arg-type]
        plain[field.name] = _plain(getattr(record, field.name))
    return plain


def from_plain(plain: dict[str, Any]) -> Mutation:
    """Rebuild a record from :func:`to_plain`'s output."""
    values = dict(plain)
    kind = values.pop("kind", None)
    cls = MUTATIONS.get(kind)  # type: ignore[arg-type]
    if cls is None:
        raise InvalidArgument(f"unknown mutation kind {kind!r}")
    try:
        return cls(**{name: _unplain(value) for name, value in values.items()})
    except TypeError as error:
        raise InvalidArgument(f"malformed {kind} mutation: {error}") from None


def encode(record: Mutation) -> bytes:
    """The record as compact JSON bytes."""
    return json.dumps(to_plain(record), separators=(",", ":"), sort_keys=True).encode("ascii")


def decode(data: bytes) -> Mutation:
    """Rebuild a record from :func:`encode`'s bytes."""
    try:
        plain = json.loads(data)
    except ValueError as error:
        raise InvalidArgument(f"mutation is not valid JSON: {error}") from None
    if not isinstance(plain, dict):
        raise InvalidArgument("mutation is not a JSON object")
    return from_plain(plain)


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"b64": base64.b64encode(value).decode("ascii")}
    if isinstance(value, tuple):
        return [_plain(item) for item in value]
    return value


def _unplain(value: Any) -> Any:
    if isinstance(value, dict):
        return base64.b64decode(value["b64"], validate=True)
    if isinstance(value, list):
        return tuple(_unplain(item) for item in value)
    return value
