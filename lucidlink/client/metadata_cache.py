"""
What this client knows of the tree between two questions to the metadata server.

:class:`MetadataCache` keeps, as the server last answered them, the
attributes of inodes, the entries of directories (a name and the inode it
names, or that the name is absent), which directories it knows whole (every
entry, so a name it lacks there is absent), and the names of an inode's
extended attributes when it knows them all (a listing, or a new inode: none),
and of files open here the answers ``getxattr`` got (the kernel asks for
``security.capability`` before every write).
:class:`~lucidlink.client.filespace.Inodes` answers lookups, ``getattr`` and
extended attributes from it without a round trip.

It stays true because the server tells this session of every change another
session makes (``Notify``: an inode's attributes or content, an entry of a
directory), and this client's own changes update it as their answers arrive:

- a notification drops what it names (:meth:`inode_changed`,
  :meth:`entry_changed`, :meth:`directory_changed`); losing the connection
  (notifications may be missed until the next one is logged in) drops
  everything (:meth:`clear`);
- an answer is only learned if no notification arrived while it was on its
  way: the server may tell of a change before it answers a request that
  read the state before that change, and a directory read in pages may
  cross a change this client makes (of which it is not told).  Every
  notification, :meth:`clear` and change sent from here (:meth:`changing`)
  moves :attr:`epoch` on; a caller takes :meth:`mark` before sending and
  passes it with what it learned, which is kept only if the epoch has not
  moved since;
- what it learned is kept ``ttl`` seconds at most, a bound on how long a
  connection that went silent without closing (its notifications lost) can
  leave it wrong.

It is bounded: past ``capacity`` inodes (or directories), the oldest learned
are forgotten.  It changes on the reactor's thread only; its readers
(:meth:`attributes`, :meth:`lookup`, :meth:`xattr_names`) are also called
from other threads, and each of their dictionary reads is one step: a name
missing from a directory is absent only if the directory is whole and its
entries are still those read (wholeness goes before entries, and comes after).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from lucidlink.protocol.messages import Attributes, FileKind

DEFAULT_CAPACITY = 100_000
"""Inodes (and, separately, directories) whose attributes (entries) are kept at most."""
DEFAULT_TTL = 30.0
"""Seconds an answer is kept at most, however quiet the server is."""

ABSENT = 0
"""What :meth:`MetadataCache.entry` gives for a name known not to exist (no inode is 0)."""

ABSENT_XATTR = object()
"""What :meth:`MetadataCache.xattr` gives for an extended attribute known not to exist."""

_Value = TypeVar("_Value")


class MetadataCache:
    """Attributes, directory entries, whole directories and xattr names as the server last told (see the module)."""

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, ttl: float = DEFAULT_TTL, capacity: int = DEFAULT_CAPACITY
    ) -> None:
        self.clock = clock
        self.ttl = ttl
        self.capacity = capacity
        self.epoch = 0
        """Moves on with every notification and :meth:`clear`: answers sent before a move are not learned."""
        self._attributes: dict[int, tuple[Attributes, float]] = {}
        self._entries: dict[int, dict[bytes, tuple[int, float]]] = {}
        self._whole: dict[int, float] = {}
        self._xattr_names: dict[int, tuple[frozenset[bytes], float]] = {}
        self._xattr_values: dict[int, dict[bytes, tuple[bytes | object, float]]] = {}

    def mark(self) -> int:
        """Take before sending a request whose answer will be learned."""
        return self.epoch

    def changing(self) -> int:
        """
        Take instead of :meth:`mark` before sending a change of this client's own.

        The server tells other sessions, not this one, of its changes, so the
        epoch moves here: an answer already on its way (a directory read in
        pages, one of them before the change) is not learned.
        """
        self.epoch += 1
        return self.epoch

    # -- reading (any thread) ------------------------------------------------------

    def attributes(self, inode: int) -> Attributes | None:
        """The attributes of ``inode``, or None if not known."""
        return self._fresh(self._attributes.get(inode))

    def entry(self, parent: int, name: bytes) -> int | None:
        """The inode ``name`` names in ``parent``, :data:`ABSENT` if it names none, None if not known."""
        names = self._entries.get(parent)
        if names is None:
            return None
        now = self.clock()
        kept = names.get(name)
        if kept is not None:
            return kept[0] if kept[1] > now else None
        if self._whole.get(parent, 0.0) <= now:
            return None
        # Whole, but perhaps by entries learned since ``names`` was read (another thread): then not known.
        return ABSENT if self._entries.get(parent) is names else None

    def lookup(self, parent: int, name: bytes) -> Attributes | int | None:
        """Entry ``name`` of ``parent`` with its attributes, :data:`ABSENT`, or None when either is not known."""
        inode = self.entry(parent, name)
        if not inode:
            return inode
        return self.attributes(inode)

    def listing(self, directory: int) -> list[tuple[bytes, Attributes]] | None:
        """Every entry of ``directory`` with its attributes, if it is known whole and each of them is known."""
        now = self.clock()
        names = self._entries.get(directory)
        if names is None or self._whole.get(directory, 0.0) <= now:
            return None
        entries = []
        for name, (inode, expiry) in list(names.items()):
            if inode == ABSENT:
                continue
            attributes = self.attributes(inode)
            if expiry <= now or attributes is None:
                return None
            entries.append((name, attributes))
        return entries

    def xattr_names(self, inode: int) -> frozenset[bytes] | None:
        """The names of ``inode``'s extended attributes, or None if not known."""
        return self._fresh(self._xattr_names.get(inode))

    def xattr(self, inode: int, name: bytes) -> bytes | object | None:
        """The value of ``inode``'s extended attribute ``name``, :data:`ABSENT_XATTR` if it has none, None if not known."""
        values = self._xattr_values.get(inode)
        return None if values is None else self._fresh(values.get(name))

    # -- learning what the server answered --------------------------------------------

    def learn(self, attributes: Attributes, since: int) -> None:
        """The server answered ``attributes`` to a request sent at ``since``."""
        if since != self.epoch or attributes.nlink == 0:
            # A file with no links lives only until its last handle anywhere is released, unannounced.
            self._attributes.pop(attributes.inode, None)
            return
        self._attributes[attributes.inode] = (attributes, self._expiry())
        self._bound(self._attributes)

    def learn_entry(self, parent: int, name: bytes, attributes: Attributes, since: int) -> None:
        """A lookup of ``name`` in ``parent`` found ``attributes``."""
        self.learn(attributes, since)
        self._set_entry(parent, name, attributes.inode, since)

    def learn_absent(self, parent: int, name: bytes, since: int) -> None:
        """A lookup of ``name`` in ``parent`` found nothing."""
        self._set_entry(parent, name, ABSENT, since)

    def learn_listing(self, directory: int, entries: Iterable[tuple[bytes, Attributes]], since: int) -> None:
        """Every entry of ``directory`` (read entirely, starting at ``since``)."""
        if since != self.epoch:
            self._forget_directory(directory)
            return
        expiry = self._expiry()
        names = {}
        for name, attributes in entries:
            names[name] = (attributes.inode, expiry)
            self.learn(attributes, since)
        self._whole_directory(directory, names)

    def learn_xattr(self, inode: int, name: bytes, value: bytes | None, since: int) -> None:
        """A ``getxattr`` of ``name`` sent at ``since`` found ``value`` (None: none by that name).

        Kept until a change of the inode, :meth:`forget_xattr_values` or ``ttl``
        seconds have passed; the caller keeps only those of files open here,
        which bounds them.
        """
        if since == self.epoch:
            kept = ABSENT_XATTR if value is None else value
            self._xattr_values.setdefault(inode, {})[name] = (kept, self._expiry())

    def forget_xattr_values(self, inode: int) -> None:
        """Values learned of ``inode`` go (its last handle here closed); its names stay."""
        self._xattr_values.pop(inode, None)

    def learn_xattr_names(self, inode: int, names: Iterable[bytes], since: int) -> None:
        """``inode``'s extended attributes are named ``names``, and no others."""
        if since != self.epoch:
            self._xattr_names.pop(inode, None)
            return
        self._xattr_names[inode] = (frozenset(names), self._expiry())
        self._bound(self._xattr_names)

    # -- this client's own changes ------------------------------------------------

    def added(self, parent: int, name: bytes, attributes: Attributes, since: int, created: bool = False) -> None:
        """
        This client made entry ``name`` in ``parent`` (create, mkdir, link, symlink): its answer.

        ``created``: the entry's inode is new.  The server makes an inode and
        touches its directory in one transaction, at one time, so the
        directory's new times are the inode's; else they are not known here.
        """
        directory = self.attributes(parent)
        self._attributes.pop(parent, None)
        fresh = since == self.epoch
        if directory is not None and created and fresh:
            links = 1 if attributes.kind == FileKind.DIRECTORY else 0
            self._attributes[parent] = (dataclasses.replace(
                directory, mtime_ns=attributes.ctime_ns, ctime_ns=attributes.ctime_ns, nlink=directory.nlink + links
            ), self._expiry())
        self.learn_entry(parent, name, attributes, since)
        if created:
            self.learn_xattr_names(attributes.inode, (), since)
            if attributes.kind == FileKind.DIRECTORY and fresh:
                self._whole_directory(attributes.inode, {})  # new, hence empty

    def removed(self, parent: int, name: bytes, since: int) -> None:
        """This client removed entry ``name`` of ``parent`` (unlink, rmdir)."""
        self._attributes.pop(parent, None)
        inode = self.entry(parent, name)
        if inode:
            self._forget_inode(inode)  # fewer links, or gone
        elif inode is None:
            self._forget_every_inode()  # whichever inode it was has fewer links now, or is gone
        self._set_entry(parent, name, ABSENT, since)

    def renamed(self, parent: int, name: bytes, new_parent: int, new_name: bytes) -> None:
        """This client moved an entry (or tried): both directories and the inodes involved are forgotten."""
        inodes = [self.entry(parent, name), self.entry(new_parent, new_name)]  # both before either is forgotten
        for inode in inodes:
            if inode:
                self._forget_inode(inode)  # a replaced inode may be gone
            elif inode is None:
                self._forget_every_inode()  # an inode not known here was moved or replaced
        for directory in (parent, new_parent):
            self._attributes.pop(directory, None)
            self._forget_directory(directory)

    # -- what changed elsewhere ------------------------------------------------------

    def inode_changed(self, inode: int) -> None:
        """``inode``'s attributes, content or extended attributes changed (told by the server, or changed here)."""
        self.xattrs_changed(inode)
        self._attributes.pop(inode, None)

    def xattrs_changed(self, inode: int) -> None:
        """``inode``'s extended attributes may have changed: what is kept of them goes, answers on their way too."""
        self.epoch += 1
        self._xattr_names.pop(inode, None)
        self._xattr_values.pop(inode, None)

    def entry_changed(self, parent: int, name: bytes, inode: int) -> None:
        """Entry ``name`` of ``parent`` now names ``inode``, or nothing."""
        self.inode_changed(inode)
        self._forget_directory(inode)  # a directory removed, or replaced by a rename, is gone
        self._whole.pop(parent, None)  # first: a reader that misses the name must not find it whole
        names = self._entries.get(parent)
        if names is not None:
            names.pop(name, None)
        self._attributes.pop(parent, None)

    def directory_changed(self, directory: int) -> None:
        """Anything in ``directory`` may have changed (a name that could not be read, a change that failed)."""
        self.epoch += 1
        self._attributes.pop(directory, None)
        self._forget_directory(directory)

    def clear(self) -> None:
        """Anything may have changed (the connection was lost: notifications may be missed)."""
        self.epoch += 1
        self._attributes.clear()
        self._entries.clear()
        self._whole.clear()
        self._xattr_names.clear()
        self._xattr_values.clear()

    # -- inside ---------------------------------------------------------------------

    def _expiry(self) -> float:
        return self.clock() + self.ttl

    def _fresh(self, kept: tuple[_Value, float] | None) -> _Value | None:
        if kept is None or kept[1] <= self.clock():
            return None
        return kept[0]

    def _set_entry(self, parent: int, name: bytes, inode: int, since: int) -> None:
        names = self._entries.get(parent)
        if since != self.epoch:
            self._whole.pop(parent, None)  # first: a reader that misses the name must not find it whole
            if names is not None:
                names.pop(name, None)
            return
        if names is None:
            names = self._entries[parent] = {}
            self._bound(self._entries, self._whole)
        names[name] = (inode, self._expiry())
        if len(names) > self.capacity:
            self._forget_directory(parent)

    def _whole_directory(self, directory: int, names: dict[bytes, tuple[int, float]]) -> None:
        self._whole.pop(directory, None)
        self._entries.pop(directory, None)
        self._entries[directory] = names
        self._whole[directory] = self._expiry()
        self._bound(self._entries, self._whole)

    def _forget_inode(self, inode: int) -> None:
        self._attributes.pop(inode, None)
        self._xattr_names.pop(inode, None)
        self._xattr_values.pop(inode, None)
        self._forget_directory(inode)

    def _forget_every_inode(self) -> None:
        """An inode not known here lost a link, or went: nothing kept of any inode may stay (its epoch stays)."""
        self._whole.clear()
        self._entries.clear()
        self._attributes.clear()
        self._xattr_names.clear()
        self._xattr_values.clear()

    def _forget_directory(self, directory: int) -> None:
        self._whole.pop(directory, None)
        self._entries.pop(directory, None)

    def _bound(self, kept: dict[int, Any], *alongside: dict[int, Any]) -> None:
        while len(kept) > self.capacity:
            oldest = next(iter(kept))
            del kept[oldest]
            for other in alongside:
                other.pop(oldest, None)
