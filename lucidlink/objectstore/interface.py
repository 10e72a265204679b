"""
What every object store backend offers: :class:`IObjectStore`.

An object store holds blobs under string keys: the encrypted chunks of
files, and the metadata servers' journal segments and snapshots.  Backends (a
local directory, S3) differ in speed and durability, never in behaviour:
``tests/objectstore_behaviour.py`` holds the contract as one test mixin that
every backend runs.

Keys are ``/``-separated parts made of ``A-Z a-z 0-9 . _ = -``, at most 1024
characters in all and 255 per part (a file name on most file systems).  A
part may not be empty or start with ``.`` (so ``.`` and ``..`` never are
parts, and a backend can keep its own temporary files), and a key may not
start or end with ``/``.  :func:`check_key` enforces this.

Portable keys never use one key as the folder of another (``a`` and ``a/b``):
S3 allows it, a directory on disk does not, and the local backend refuses
the second with :class:`~lucidlink.errors.InvalidArgument`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from zope.interface import Interface

from lucidlink.errors import InvalidArgument

if TYPE_CHECKING:
    from twisted.internet.defer import Deferred

MAX_KEY_LENGTH = 1024
MAX_PART_LENGTH = 255
KEY_PART = re.compile(r"[A-Za-z0-9_=-][A-Za-z0-9._=-]*")
"""What one ``/``-separated part of a key looks like."""
_PREFIX = re.compile(r"[A-Za-z0-9._=/-]*")


@dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What a store knows of an object without reading it."""

    key: str
    size: int
    modified: float
    """When the object was last written, in seconds since the epoch."""


def check_key(key: str) -> str:
    """Return ``key`` if it is a valid object key, else raise InvalidArgument saying why."""
    if not isinstance(key, str):
        raise InvalidArgument(f"an object key is a string, not {type(key).__name__}")
    if not key:
        raise InvalidArgument("an object key cannot be empty")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidArgument(f"an object key of {len(key)} characters is over the {MAX_KEY_LENGTH} limit")
    if key.startswith("/"):
        raise InvalidArgument(f"object key {key!r} is absolute")
    for part in key.split("/"):
        if not part:
            raise InvalidArgument(f"object key {key!r} has an empty part")
        if part in (".", ".."):
            raise InvalidArgument(f"object key {key!r} has a {part!r} part")
        if len(part) > MAX_PART_LENGTH:
            raise InvalidArgument(f"object key {key!r} has a part over {MAX_PART_LENGTH} characters")
        if not KEY_PART.fullmatch(part):
            raise InvalidArgument(f"object key {key!r} has a part {part!r} with characters outside A-Z a-z 0-9 . _ = -")
    return key


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` if it can begin valid keys (``""`` begins all), else raise InvalidArgument."""
    if not isinstance(prefix, str):
        raise InvalidArgument(f"an object key prefix is a string, not {type(prefix).__name__}")
    if not _PREFIX.fullmatch(prefix):
        raise InvalidArgument(f"object key prefix {prefix!r} has characters outside A-Z a-z 0-9 . _ = - /")
    if prefix.startswith("/"):
        raise InvalidArgument(f"object key prefix {prefix!r} is absolute")
    *folders, _ = prefix.split("/")
    for part in folders:
        if not part or part.startswith("."):
            raise InvalidArgument(f"object key prefix {prefix!r} has an empty or dotted part {part!r}")
    return prefix


class IObjectStore(Interface):
    """
    A place to keep objects, reached asynchronously.

    Every method returns a Deferred.  Failures are
    :class:`~lucidlink.errors.LucidError`\\ s: NotFound for a missing object,
    AlreadyExists for a refused overwrite, InvalidArgument for a bad key,
    NoSpace when the store is full, and Unavailable (retryable) when the
    store cannot be reached right now.  A write either stores the whole
    object or nothing: no reader ever sees part of an object.
    """

    def get(key: str) -> Deferred[bytes]:  # type: ignore[empty-body]
        """
        Read a whole object.

        Fires with its bytes, or fails with NotFound naming the key.
        """

    def get_range(key: str, start: int, length: int) -> Deferred[bytes]:  # type: ignore[empty-body]
        """
        Read ``length`` bytes of an object from offset ``start``.

        Only that range is read.  Fires with fewer bytes if the object ends
        first, with ``b""`` if ``start`` is at or past its end or ``length``
        is 0; fails with NotFound if the object does not exist (whatever the
        range), and with InvalidArgument for a negative ``start`` or ``length``.
        """

    def put(key: str, data: bytes, create_only: bool = False) -> Deferred[None]:  # type: ignore[empty-body]
        """
        Store ``data`` (any bytes-like object) as the object ``key``, atomically.

        By default an existing object is replaced; readers see the old or the
        new object, never a mix.  With ``create_only`` an existing object is
        never touched and the put fails with AlreadyExists: of several
        concurrent create-only puts of one key exactly one succeeds.  Fires
        with None once the object is durable.
        """

    def delete(key: str) -> Deferred[None]:  # type: ignore[empty-body]
        """
        Remove an object.

        Deleting an object that does not exist is not an error, so a delete
        can be retried safely.
        """

    def head(key: str) -> Deferred[ObjectInfo]:  # type: ignore[empty-body]
        """Fire with the :class:`ObjectInfo` of an object, or fail with NotFound."""

    def list(prefix: str = "") -> Deferred[list[ObjectInfo]]:  # type: ignore[empty-body]
        """
        Fire with every object whose key begins with ``prefix``, sorted by key.

        ``prefix`` is a plain string prefix, as in S3: ``"a/b"`` matches
        ``a/b/c`` and ``a/bc``; ``""`` matches everything.
        """

    def close() -> Deferred[None]:  # type: ignore[misc, empty-body]
        """Release what the store holds (threads, connections); it is not used afterwards."""


class IFileObjectStore(IObjectStore):
    """
    A store on the local file system that can take a file as an object, and give one, without copying it.

    Writers that already hold an object's bytes in a file of the same file
    system (a staged chunk of the write-back journal) store it with
    :meth:`put_file` instead of reading it back for :meth:`put`; readers
    that keep whole objects (the chunk cache) link the file :meth:`file_of`
    names instead of reading it and writing a copy.
    """

    def put_file(key: str, path: str) -> Deferred[None]:  # type: ignore[empty-body]
        """
        Store the file at ``path`` as object ``key``, create-only (as ``put(..., create_only=True)``).

        The file becomes the object (a hard link where the store can make
        one, else a copy), so it must not change afterwards; it is made
        durable first.  Fires with None once the object is durable.
        """

    def file_of(key: str) -> Deferred[str | None]:  # type: ignore[empty-body]
        """
        Fire with the path of the file that holds exactly object ``key``, or None (packed, or missing).

        The file never changes (an object is written once; a later put or
        delete replaces or removes the name, not the file), so a reader may
        link it where it keeps copies.  The kernel is asked to read its pages
        in at once.
        """
