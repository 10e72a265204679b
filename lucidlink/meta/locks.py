"""
Advisory locks: whole-file (flock) and byte-range (POSIX), shared or exclusive.

:class:`LockTable` is plain logic with no clock and no I/O.  A lock is held
by an *owner*: the pair (session id, owner number the client chose).  FLOCK
locks cover the whole file; POSIX locks cover ``[start, end]`` inclusive and
split and merge as ``fcntl`` locks do; the two kinds never conflict with
each other.  A request that conflicts either fails at once
(:class:`~lucidlink.errors.Locked`) or waits in a FIFO queue, answered by a
Deferred when it is granted; a wait that would close a cycle of owners each
waiting for the next is refused with :class:`~lucidlink.errors.Deadlock`.

Locks are leases: they end with their session (:meth:`LockTable.end_session`)
and are never written to disk.  So a server that starts (or opens its
database again) may have forgotten locks its clients still hold: it begins in
a *grace period* (:meth:`LockTable.begin_grace`) during which only *reclaims*
are granted, the requests of clients that held a lock before and take it
again on reconnecting; a new request is refused (or, with ``wait``, waits
for the grace period to end), as NFS servers do after a restart.  A reclaim
never waits: it is granted when nothing conflicts, in grace or after it.

The table also serves a client as the record of the locks it holds
(:meth:`LockTable.record`, :meth:`LockTable.all_held`), which it reclaims.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from twisted.internet import defer

from lucidlink.errors import ConnectionClosed, Deadlock, InvalidArgument, Locked
from lucidlink.protocol.messages import LockKind, LockType

WHOLE_FILE_END = 2**64 - 1
"""The last byte a lock can cover: "to the end of the file"."""

Owner = tuple[int, int]
"""(session id, the client's owner number)."""
_Key = tuple[int, LockKind]


@dataclass(frozen=True, slots=True)
class HeldLock:
    """A granted lock."""

    owner: Owner
    lock_type: LockType
    start: int
    end: int

    def conflicts(self, owner: Owner, lock_type: LockType, start: int, end: int) -> bool:
        """Whether this lock stands in the way of ``owner`` taking ``lock_type`` on the range."""
        return (
            self.owner != owner
            and self.start <= end
            and start <= self.end
            and (lock_type == LockType.WRITE or self.lock_type == LockType.WRITE)
        )


@dataclass(slots=True)
class _Waiter:
    key: _Key
    owner: Owner
    lock_type: LockType
    start: int
    end: int
    granted: defer.Deferred[None] = field(default_factory=defer.Deferred)


class LockTable:
    """Every advisory lock of one filespace, and the requests waiting for one."""

    def __init__(self) -> None:
        self._held: dict[_Key, list[HeldLock]] = {}
        self._waiting: dict[_Key, list[_Waiter]] = {}
        self._refused: dict[int, set[int]] = {}  # inode -> sessions told Locked
        self.in_grace = False
        """Whether only reclaims are granted (see the module)."""

    # -- requests ------------------------------------------------------------

    def lock(self, owner: Owner, inode: int, kind: LockKind, lock_type: LockType, start: int, end: int,
             wait: bool) -> defer.Deferred[None] | None:
        """Take, change or release (``UNLOCK``) a lock.

        :return: ``None`` when done at once, or a Deferred that fires when a
            waiting request is granted.
        :raise Locked: on a conflict when not waiting.
        :raise Deadlock: when waiting would deadlock.
        """
        key = (inode, kind)
        start, end = _range(kind, start, end)
        if lock_type == LockType.UNLOCK:
            self._set(key, owner, None, start, end)
            self._wake(key)
            return None
        blockers = self._blockers(key, owner, lock_type, start, end)
        if self.in_grace and not self._held_by(key, owner, start, end):
            return self._during_grace(key, owner, lock_type, start, end, wait, blockers)
        if not blockers:
            self._set(key, owner, lock_type, start, end)
            self._wake(key)  # a downgrade may free waiters
            return None
        if not wait:
            self._refused.setdefault(inode, set()).add(owner[0])
            first = blockers[0]
            raise Locked(
                f"inode {inode} is locked ({first.lock_type.name.lower()} lock on bytes"
                f" {first.start}-{first.end}) by another owner"
            )
        if self._would_deadlock(owner, blockers):
            raise Deadlock(f"waiting for the lock on inode {inode} would deadlock")
        waiter = _Waiter(key, owner, lock_type, start, end)
        self._waiting.setdefault(key, []).append(waiter)
        return waiter.granted

    def reclaim(self, owner: Owner, inode: int, kind: LockKind, lock_type: LockType, start: int,
                end: int) -> None:
        """Take again a lock ``owner`` held before the server restarted or its session ended.

        Granted, in the grace period or after it, when nothing conflicts.

        :raise Locked: when another owner holds a conflicting lock.
        """
        if lock_type == LockType.UNLOCK:
            raise InvalidArgument("only a lock can be reclaimed, not an unlock")
        key = (inode, kind)
        start, end = _range(kind, start, end)
        blockers = self._blockers(key, owner, lock_type, start, end)
        if blockers:
            first = blockers[0]
            raise Locked(
                f"inode {inode} cannot be locked again: another owner took a {first.lock_type.name.lower()}"
                f" lock on bytes {first.start}-{first.end} meanwhile"
            )
        self._set(key, owner, lock_type, start, end)

    def record(self, owner: Owner, inode: int, kind: LockKind, lock_type: LockType, start: int, end: int) -> None:
        """Note that ``owner`` now holds ``lock_type`` (UNLOCK: nothing) on the range, as the server granted."""
        start, end = _range(kind, start, end)
        self._set((inode, kind), owner, None if lock_type == LockType.UNLOCK else lock_type, start, end)

    def all_held(self) -> list[tuple[int, LockKind, HeldLock]]:
        """Every granted lock as ``(inode, kind, lock)``."""
        return [(inode, kind, lock) for (inode, kind), locks in sorted(self._held.items()) for lock in locks]

    def test(self, owner: Owner, inode: int, kind: LockKind, lock_type: LockType, start: int,
             end: int) -> HeldLock | None:
        """The first lock that would stand in the way of this request (``F_GETLK``)."""
        if lock_type == LockType.UNLOCK:
            return None
        start, end = _range(kind, start, end)
        blockers = self._blockers((inode, kind), owner, lock_type, start, end)
        return blockers[0] if blockers else None

    def held(self, inode: int, kind: LockKind) -> list[HeldLock]:
        """The locks granted on ``inode`` of ``kind``, in order."""
        return list(self._held.get((inode, kind), ()))

    # -- ending leases -------------------------------------------------------------

    def release_inode(self, session: int, inode: int) -> None:
        """Release every lock ``session`` holds on ``inode`` (its last handle closed)."""
        for kind in LockKind:
            key = (inode, kind)
            for lock in list(self._held.get(key, ())):
                if lock.owner[0] == session:
                    self._set(key, lock.owner, None, 0, WHOLE_FILE_END)
            self._wake(key)

    def end_session(self, session: int) -> set[int]:
        """Drop every lock and waiting request of ``session``; return the inodes it had locks on."""
        for key, waiters in list(self._waiting.items()):
            for waiter in [w for w in waiters if w.owner[0] == session]:
                waiters.remove(waiter)
                waiter.granted.errback(ConnectionClosed("the session ended while waiting for a lock"))
            if not waiters:
                del self._waiting[key]
        released = [key for key, locks in self._held.items() if any(lock.owner[0] == session for lock in locks)]
        for key in released:
            self._held[key] = [lock for lock in self._held[key] if lock.owner[0] != session]
            if not self._held[key]:
                del self._held[key]
            self._wake(key)
        for sessions in self._refused.values():
            sessions.discard(session)
        return {inode for inode, _ in released}

    # -- the grace period after a start ----------------------------------------------

    def begin_grace(self) -> None:
        """Grant only reclaims (and unlocks) until :meth:`end_grace`."""
        self.in_grace = True

    def end_grace(self) -> set[int]:
        """Grant requests again, those waiting first; return the inodes whose refused sessions may try again."""
        self.in_grace = False
        for key in list(self._waiting):
            self._wake(key)
        return set(self._refused)

    def interested(self, inode: int) -> set[int]:
        """Sessions refused a lock on ``inode`` since they were last told it may be free; forgets them."""
        return self._refused.pop(inode, set())

    # -- internals -----------------------------------------------------------

    def _during_grace(self, key: _Key, owner: Owner, lock_type: LockType, start: int, end: int, wait: bool,
                      blockers: list[HeldLock]) -> defer.Deferred[None]:
        """A new lock asked for in the grace period: refused, or queued until it ends."""
        inode = key[0]
        if not wait:
            self._refused.setdefault(inode, set()).add(owner[0])
            raise Locked(
                f"inode {inode} cannot be locked yet: the metadata server started recently and gives the"
                " locks held before it to their holders first (grace period)"
            )
        if blockers and self._would_deadlock(owner, blockers):
            raise Deadlock(f"waiting for the lock on inode {inode} would deadlock")
        waiter = _Waiter(key, owner, lock_type, start, end)
        self._waiting.setdefault(key, []).append(waiter)
        return waiter.granted

    def _held_by(self, key: _Key, owner: Owner, start: int, end: int) -> bool:
        """Whether ``owner`` holds some lock on all of ``[start, end]`` (a change of it is no new lock)."""
        covered = start
        for lock in self._held.get(key, ()):
            if lock.owner == owner and lock.start <= covered <= lock.end:
                if lock.end >= end:
                    return True
                covered = lock.end + 1
        return False

    def _blockers(self, key: _Key, owner: Owner, lock_type: LockType, start: int, end: int) -> list[HeldLock]:
        return [lock for lock in self._held.get(key, ()) if lock.conflicts(owner, lock_type, start, end)]

    def _set(self, key: _Key, owner: Owner, lock_type: LockType | None, start: int, end: int) -> None:
        """Make ``owner`` hold ``lock_type`` (None: nothing) on exactly ``[start, end]`` of ``key``."""
        kept: list[HeldLock] = []
        for lock in self._held.get(key, ()):
            if lock.owner != owner or lock.end < start or end < lock.start:
                kept.append(lock)
                continue
            if lock.start < start:
                kept.append(HeldLock(owner, lock.lock_type, lock.start, start - 1))
            if end < lock.end:
                kept.append(HeldLock(owner, lock.lock_type, end + 1, lock.end))
        if lock_type is not None:
            kept.append(HeldLock(owner, lock_type, start, end))
        kept = _merged(kept, owner)
        if kept:
            self._held[key] = kept
        else:
            self._held.pop(key, None)

    def _wake(self, key: _Key) -> None:
        """Grant, in order, the waiting requests on ``key`` that no longer conflict."""
        waiters = self._waiting.get(key)
        if not waiters or self.in_grace:
            return
        granted: list[_Waiter] = []
        for waiter in list(waiters):
            if not self._blockers(key, waiter.owner, waiter.lock_type, waiter.start, waiter.end):
                waiters.remove(waiter)
                self._set(key, waiter.owner, waiter.lock_type, waiter.start, waiter.end)
                granted.append(waiter)
        if not waiters:
            del self._waiting[key]
        for waiter in granted:
            waiter.granted.callback(None)

    def _would_deadlock(self, requester: Owner, blockers: Iterable[HeldLock]) -> bool:
        """Whether some blocking owner waits, directly or through others, for ``requester``."""
        pending = [lock.owner for lock in blockers]
        seen: set[Owner] = set()
        while pending:
            owner = pending.pop()
            if owner == requester:
                return True
            if owner in seen:
                continue
            seen.add(owner)
            for waiters in self._waiting.values():
                for waiter in waiters:
                    if waiter.owner == owner:
                        pending.extend(
                            lock.owner
                            for lock in self._blockers(waiter.key, owner, waiter.lock_type, waiter.start, waiter.end)
                        )
        return False


def _range(kind: LockKind, start: int, end: int) -> tuple[int, int]:
    if kind == LockKind.FLOCK:
        return 0, WHOLE_FILE_END
    if start > end:
        raise InvalidArgument(f"a lock range cannot start ({start}) after it ends ({end})")
    return start, end


def _merged(locks: list[HeldLock], owner: Owner) -> list[HeldLock]:
    """Join ``owner``'s touching locks of the same type; keep everything in start order."""
    others = [lock for lock in locks if lock.owner != owner]
    mine = sorted((lock for lock in locks if lock.owner == owner), key=lambda lock: lock.start)
    joined: list[HeldLock] = []
    for lock in mine:
        if joined and joined[-1].lock_type == lock.lock_type and joined[-1].end + 1 >= lock.start:
            last = joined.pop()
            lock = HeldLock(owner, lock.lock_type, last.start, max(last.end, lock.end))
        joined.append(lock)
    return sorted(others + joined, key=lambda lock: (lock.start, lock.owner))
