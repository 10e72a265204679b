"""
The seam between the filesystem core and what sits on it: :class:`IFilespaceInodes`.

A FUSE layer (and any other binding) sees a filespace as inodes: it looks
names up in directories, reads attributes, opens files and gets handles.
Every method returns a Deferred and fails with a
:class:`~lucidlink.errors.LucidError` whose ``errno_name`` the binding turns
into an errno.  Names, link targets and extended attributes are plaintext
``bytes`` here; sealing them is the implementation's business.
"""

from __future__ import annotations

from typing import Any

from zope.interface import Attribute, Interface


class IFilespaceInodes(Interface):
    """One filespace as inodes, for a filesystem binding."""

    root_inode = Attribute("The inode of the root directory")
    chunk_size = Attribute("The filespace's chunk size in bytes")

    def lookup(parent: int, name: bytes) -> Any:  # type: ignore[misc]
        """The attributes of entry ``name`` of directory ``parent``."""

    def getattr(inode: int) -> Any:  # type: ignore[misc]
        """The attributes of ``inode``."""

    def setattr(inode: int, **changes: Any) -> Any:  # type: ignore[misc]
        """Change mode, uid, gid, size or times; fires with the new attributes."""

    def readdir(inode: int) -> Any:  # type: ignore[misc]
        """Every entry of directory ``inode`` as ``(name, attributes)``; no ``.`` or ``..``."""

    def mkdir(parent: int, name: bytes, mode: int, uid: int, gid: int) -> Any:  # type: ignore[misc]
        """Make a directory; fires with its attributes."""

    def create(parent: int, name: bytes, mode: int, flags: int, uid: int, gid: int) -> Any:  # type: ignore[misc]
        """Create (or, without ``O_EXCL``, open) a regular file; fires with a file handle."""

    def open(inode: int, flags: int) -> Any:  # type: ignore[misc]
        """Open a file with ``open(2)`` flags; fires with a file handle."""

    def unlink(parent: int, name: bytes) -> Any:  # type: ignore[misc]
        """Remove a non-directory entry."""

    def rmdir(parent: int, name: bytes) -> Any:  # type: ignore[misc]
        """Remove an empty directory."""

    def rename(parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int) -> Any:  # type: ignore[misc]
        """Move an entry as ``renameat2`` does."""

    def link(inode: int, new_parent: int, new_name: bytes) -> Any:  # type: ignore[misc]
        """Make a hard link; fires with the inode's attributes."""

    def symlink(parent: int, name: bytes, target: bytes, uid: int, gid: int) -> Any:  # type: ignore[misc]
        """Make a symbolic link; fires with its attributes."""

    def readlink(inode: int) -> Any:  # type: ignore[misc]
        """The target of a symbolic link."""

    def setxattr(inode: int, name: bytes, value: bytes, flags: Any) -> Any:  # type: ignore[misc]
        """Set an extended attribute."""

    def getxattr(inode: int, name: bytes) -> Any:  # type: ignore[misc]
        """The value of an extended attribute."""

    def getxattr_cached(inode: int, name: bytes) -> Any:  # type: ignore[misc]
        """At once, from any thread: the value of an extended attribute if known here, else None (no Deferred)."""

    def listxattr(inode: int) -> Any:  # type: ignore[misc]
        """The names of an inode's extended attributes."""

    def removexattr(inode: int, name: bytes) -> Any:  # type: ignore[misc]
        """Remove an extended attribute."""

    def statfs() -> Any:  # type: ignore[misc]
        """The filespace's totals."""
