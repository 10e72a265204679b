"""
Changes made at once in a leased directory, and sent to the metadata server without waiting.

While this session holds a directory's lease (:mod:`lucidlink.client.leases`),
no other session reads or changes its entries, so what this client knows
of them is exact.  :class:`LeasedChanges` then makes two changes at once,
as the server would make them, and posts them to the session's
:class:`~lucidlink.client.pipeline.ChangePipeline`:

- ``create`` of a name known to be absent: the new file takes an inode id
  reserved for this client (:class:`~lucidlink.client.inode_pool.InodePool`),
  its handle's server id comes with the answer;
- ``unlink`` of a file (not a directory) with one link.

Each carries the time it was made at, which the server keeps because the
session holds the lease.  Anything else, or a directory without a usable
lease, goes the usual way (the caller's), one request answered before the
call returns.

A change the server refuses (its lease was lost with the connection, a
full disk, a role taken away) cannot fail the call that made it, which has
returned: the directory is read again from the server, the kernel is told
to forget what it cached of the entry, the refusal is logged, and the next
:meth:`Inodes.sync_changes <lucidlink.client.filespace.Inodes.sync_changes>`
(``fsync``, ``fsyncdir``, closing the filespace) fails with it.
"""

from __future__ import annotations

import dataclasses
import stat
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from lucidlink.client.inode_pool import InodePool
from lucidlink.client.leases import HeldLeases
from lucidlink.client.metadata_cache import ABSENT
from lucidlink.client.session import ServerHandle
from lucidlink.errors import ConnectionClosed, LucidError, NotFound, RequestTimeout, Unavailable
from lucidlink.protocol import messages as w
from lucidlink.protocol.messages import Attributes, FileKind

if TYPE_CHECKING:
    from lucidlink.client.filespace import FileHandle, Inodes

_log = Logger()

_NO_ANSWER = (Unavailable, ConnectionClosed, RequestTimeout)
"""Errors that say the change's fate is not known (a soft session's deadline passed, the session closed)."""

PERMISSION_BITS = 0o7777


class ChangeRefused(LucidError):
    """A change made here at once (under a directory lease) was refused by the metadata server, or never answered."""

    errno_name = "EIO"


class LeasedChanges:
    """Creates and unlinks made at once under a directory lease (see the module)."""

    def __init__(self, inodes: Inodes) -> None:
        self.inodes = inodes
        self.session = inodes.session
        self.known = inodes.known
        self.leases = HeldLeases(self.session)
        self.inode_pool = InodePool(self.session)
        self._refused: list[ChangeRefused] = []
        self._fetching: set[int] = set()
        """Directories whose attributes are being fetched for a lease asked for."""

    def ask_for_lease(self, directory: int) -> None:
        """This client made, listed whole or changed ``directory``: ask for its lease (a writer's session only)."""
        role = self.session.role
        if role is not None and role >= w.Role.WRITER and self.leases.ask(directory):
            self.inode_pool.prime()
            if self.known.attributes(directory) is None and directory not in self._fetching:
                # A create made at once needs them (its group, its times); once, for changes made side by side.
                self._fetching.add(directory)
                self.inodes.getattr(directory).addBoth(self._fetched, directory)

    def _fetched(self, _: Any, directory: int) -> None:
        self._fetching.discard(directory)

    # -- create ------------------------------------------------------------------------

    @defer.inlineCallbacks
    def create(
        self, parent: int, name: bytes, mode: int, flags: int, uid: int, gid: int
    ) -> Any:
        """A new, open file ``name`` in ``parent``, made at once; None if it cannot be made that way."""
        if not self._may_create(parent, name):
            return None
        yield self.session.pipeline.room()
        if not self._may_create(parent, name):  # again, if it waited for room
            return None
        directory = self.known.attributes(parent)
        if directory is None:
            return None
        sealed = self.inodes._seal(parent, name)
        inode = self.inode_pool.take()
        if inode is None:
            return None
        now = self._now_ns()
        group = directory.gid if directory.mode & stat.S_ISGID else gid  # as the server: see MetadataStore
        attributes = Attributes(inode, FileKind.FILE, stat.S_IFREG | (mode & PERMISSION_BITS), 1, uid, group, 0,
                                now, now, now, 1)
        since = self.known.changing()
        self.known.added(parent, name, attributes, since, created=True)
        server = self.session.handle_to_come(inode, flags)
        request = w.Create(parent, sealed, mode, uid, gid, True, flags, inode, now)
        self.session.pipeline.post_noting_connection(request).addCallbacks(
            self._created, self._refused_change,
            callbackArgs=(server, parent, attributes),
            errbackArgs=(f"creating inode {inode}", parent, name, inode, server),
        )
        handle: FileHandle = yield self.inodes._opened(server, attributes, flags)
        return handle

    def _may_create(self, parent: int, name: bytes) -> bool:
        return (
            self.leases.usable(parent)
            and not self.inodes._entries_changing[parent]  # a change of its own on its way may make the name
            and self.known.entry(parent, name) == ABSENT
        )

    def _created(
        self, answered: tuple[w.Opened, int], server: ServerHandle, parent: int, attributes: Attributes
    ) -> None:
        opened, generation = answered
        self.session.handle_came(server, opened.handle, generation)
        if opened.attributes != attributes:  # made otherwise than here (the lease had ended): learn it again
            self.known.inode_changed(attributes.inode)
            self.known.inode_changed(parent)  # its times are the server's too
            self.inodes._tell_change(attributes.inode)

    # -- unlink ------------------------------------------------------------------------

    @defer.inlineCallbacks
    def unlink(self, parent: int, name: bytes) -> Any:
        """Remove file ``name`` of ``parent`` at once: whether it was (else the caller removes it as usual)."""
        if self._file_to_unlink(parent, name) is None:
            return False
        yield self.session.pipeline.room()
        inode = self._file_to_unlink(parent, name)  # again, if it waited for room
        if inode is None:
            return False
        now = self._now_ns()
        directory = self.known.attributes(parent)
        since = self.known.changing()
        self.known.removed(parent, name, since)
        if directory is not None:
            self.known.learn(dataclasses.replace(directory, mtime_ns=now, ctime_ns=now), since)
        request = w.Unlink(parent, self.inodes._seal(parent, name), now, inode)
        self.session.pipeline.post(request).addCallbacks(
            self._unlinked, self._unlink_refused, callbackArgs=(parent, now), errbackArgs=(inode, parent, name),
        )
        return True

    def _unlinked(self, answer: Any, parent: int, now: int) -> None:
        if isinstance(answer, w.Entry) and answer.attributes.mtime_ns != now:
            self.known.inode_changed(parent)  # made at the server's time (the lease had ended): learn it again

    def _unlink_refused(self, failure: Failure, inode: int, parent: int, name: bytes) -> None:
        if failure.check(NotFound):
            # Gone, as this client said: made by a server that restarted before answering, or the name is
            # another file's now (made by another client since that restart).
            _log.info("entry of inode {inode} in directory {parent} was removed already", inode=inode, parent=parent)
            return
        self._refused_change(failure, f"removing inode {inode}", parent, name, inode, None)

    def _file_to_unlink(self, parent: int, name: bytes) -> int | None:
        """The inode entry ``name`` of ``parent`` names, if it may be unlinked here at once."""
        if not self.leases.usable(parent):
            return None
        inode = self.known.entry(parent, name)
        if not inode:
            return None
        attributes = self.known.attributes(inode)
        if attributes is None or attributes.kind == FileKind.DIRECTORY or attributes.nlink != 1:
            return None  # another link's attributes, elsewhere, would lag behind
        return inode

    # -- refusals ----------------------------------------------------------------------

    def _refused_change(
        self, failure: Failure, doing: str, parent: int, name: bytes, inode: int, server: ServerHandle | None
    ) -> None:
        if not failure.check(LucidError):
            _log.failure("{doing} in directory {parent} failed", failure, doing=doing, parent=parent)
        if failure.check(*_NO_ANSWER):
            what = "got no answer from the metadata server (it may have been made or not)"
        else:
            what = "was refused by the metadata server"
        refused = ChangeRefused(f"{doing} in directory {parent}, made here at once, {what}: {failure.getErrorMessage()}")
        if server is not None:
            server.lost = refused
        self.known.directory_changed(parent)
        self.known.inode_changed(inode)
        self.inodes._tell_change(inode, parent, name)
        self._refused.append(refused)
        _log.warn("{error}", error=refused)

    @defer.inlineCallbacks
    def sync(self) -> Any:
        """Wait for every change posted so far; ChangeRefused for any refused since the last call."""
        yield self.session.pipeline.settled()
        if self._refused:
            refused, self._refused = self._refused, []
            more = f" (and {len(refused) - 1} more)" if len(refused) > 1 else ""
            raise ChangeRefused(f"{refused[0]}{more}")

    def close(self) -> None:
        """Stop using leases (the session ends them)."""
        self.leases.close()

    def _now_ns(self) -> int:
        return int(self.session.reactor.seconds() * 1_000_000_000)

