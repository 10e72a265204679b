"""
The seams of the metadata server that may have more than one implementation.
"""

from __future__ import annotations

from typing import Any

from zope.interface import Attribute, Interface


class IMetadataStore(Interface):
    """The metadata of one filespace: changed only by :meth:`apply`, read by plain methods."""

    journal = Attribute(
        "None, or a callable journal(cursor, record, applied) run inside every mutation's transaction"
    )
    initialised = Attribute("Whether the filespace has been bootstrapped")
    chunk_size = Attribute("The filespace's chunk size in bytes")
    filespace_id = Attribute("The filespace's id")
    server_secret = Attribute("The secret behind unknown users' fake salts (None before the first mutation)")
    bootstrap_token_hash = Attribute("The hash of the unused bootstrap token, or None")

    def apply(mutation: Any) -> Any:  # type: ignore[misc]
        """Run one mutation record in one transaction; return an Applied with the completed record."""

    def group() -> Any:  # type: ignore[misc]
        """A context manager: the block's mutations share one transaction, committed once at its end."""

    def hold(inode: int) -> None:  # type: ignore[misc]
        """A session opened ``inode``: keep it while held, even without links."""

    def forget_hold(inode: int) -> None:  # type: ignore[misc]
        """Drop one hold without reclaiming (its creation was rolled back)."""

    def release(inode: int) -> Any:  # type: ignore[misc]
        """Drop one hold; reclaim the inode if it was the last and the inode has no links."""

    def reclaim_orphans() -> Any:  # type: ignore[misc]
        """Reclaim every inode without links that nobody holds."""

    def getattr(inode: int) -> Any:  # type: ignore[misc]
        """An inode's attributes."""

    def lookup(parent: int, name: bytes) -> Any:  # type: ignore[misc]
        """The attributes of the entry ``name`` in ``parent``."""

    def readdir(inode: int, cursor: bytes, limit: int) -> Any:  # type: ignore[misc]
        """A page of a directory: (entries, cursor, done)."""

    def readlink(inode: int) -> bytes:  # type: ignore[misc]
        """A symbolic link's sealed target."""

    def getxattr(inode: int, name: bytes) -> bytes:  # type: ignore[misc]
        """An extended attribute's sealed value."""

    def listxattr(inode: int) -> list[bytes]:  # type: ignore[misc]
        """An inode's sealed extended attribute names."""

    def chunk_map(inode: int, first_index: int, count: int) -> Any:  # type: ignore[misc]
        """(version, size, chunks) of a window of a file's chunk map."""

    def statfs() -> Any:  # type: ignore[misc]
        """Totals for statfs."""

    def user(name: str) -> Any:  # type: ignore[misc]
        """A user's record, or None."""

    def users() -> list[Any]:  # type: ignore[misc]
        """Every user."""

    def first_user() -> Any:  # type: ignore[misc]
        """The oldest user, or None."""

    def dump() -> dict[str, Any]:  # type: ignore[misc]
        """Everything the store holds, as plain values."""

    def close() -> None:  # type: ignore[misc]
        """Release the database."""
