"""
Directory leases, the server's side: one session's promise that no other reads or changes a directory.

A writer's session asks for a lease on a directory (``LeaseDirectory``); it
is granted when no other session holds one on it and no other session has
read or changed the directory's entries within ``reads_remembered`` seconds
(what other clients may still answer from their caches).  While it lasts,
any other session's request that reads or changes the directory, or reads
its attributes, makes the server push ``LeaseRecall`` to the holder and
answer ``Busy``: the asker tries again shortly, as after any ``Busy``.  The
holder gives the lease back (``LeaseReturned``) after the changes it made
under it; a session's requests run in order, so they are committed before
the return is.  A lease ends by itself ``lease_seconds`` after it was
granted or last renewed, and with its holder's session.  Nothing of it is
kept on disk: a restarted server has no leases.  ``docs/directory-leases.rst``
has the whole design, and what clients do with a lease.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

from lucidlink.errors import Busy

LEASE_SECONDS = 10.0
"""How long a lease lasts unless renewed."""

READS_REMEMBERED = 30.0
"""How long a session's read of a directory keeps others from a lease on it: a client's metadata cache's TTL."""

RECALL_RETRY_MS = 20
"""What ``Busy`` tells a session that met a lease being recalled to wait before it asks again."""


@dataclass(slots=True)
class Lease:
    """A directory's lease: who holds it, until when, and whether it was recalled."""

    directory: int
    holder: int
    expires: float
    recalled: bool = False


class DirectoryLeases:
    """The leases of one filespace, and who read which directory lately (see the module)."""

    def __init__(self, clock: IReactorTime, lease_seconds: float = LEASE_SECONDS,
                 reads_remembered: float = READS_REMEMBERED) -> None:
        self.clock = clock
        self.lease_seconds = lease_seconds
        self.reads_remembered = reads_remembered
        self._leases: dict[int, Lease] = {}
        self._touched: dict[int, dict[int, float]] = {}
        self._swept_at = 0.0

    def __len__(self) -> int:
        return len(self._leases)

    def held(self, directory: int) -> Lease | None:
        """The lease on ``directory``, if one is in force."""
        lease = self._leases.get(directory)
        if lease is not None and lease.expires <= self.clock.seconds():
            del self._leases[directory]
            return None
        return lease

    def grant(self, session: int, directory: int) -> Lease:
        """Grant (or renew) ``session`` a lease on ``directory``; Busy if another session stands in the way."""
        now = self.clock.seconds()
        lease = self.held(directory)
        if lease is not None and lease.holder != session:
            raise Busy(f"directory {directory} is leased by another client", retry_after_ms=RECALL_RETRY_MS)
        if lease is not None and lease.recalled:
            raise Busy(f"the lease on directory {directory} is being recalled", retry_after_ms=RECALL_RETRY_MS)
        oldest = now - self.reads_remembered
        if any(other != session and at > oldest for other, at in self._touched.get(directory, {}).items()):
            raise Busy(f"directory {directory} was used by another client lately", retry_after_ms=1000)
        if lease is None:
            lease = self._leases[directory] = Lease(directory, session, now + self.lease_seconds)
        else:
            lease.expires = now + self.lease_seconds
        return lease

    def touch(self, session: int, directories: Iterable[int], recall: Callable[[Lease], None],
              remember: bool = True) -> None:
        """
        ``session`` reads or changes ``directories`` now: Busy if another session holds a lease on one.

        A lease met this way is recalled (``recall(lease)``, once).  With
        ``remember`` the use is noted for :meth:`grant`'s rule.
        """
        now = self.clock.seconds()
        for directory in directories:
            lease = self._leases.get(directory) if self._leases else None
            if lease is not None and lease.holder != session:
                if lease.expires > now:
                    if remember:  # it comes back once the lease is returned: not granted again meanwhile
                        self._touched.setdefault(directory, {})[session] = now
                    if not lease.recalled:
                        lease.recalled = True
                        recall(lease)
                    raise Busy(f"directory {directory} is leased by another client; it is being recalled",
                               retry_after_ms=RECALL_RETRY_MS)
                del self._leases[directory]
            if remember:
                self._touched.setdefault(directory, {})[session] = now
        self._sweep(now)

    def returned(self, session: int, directory: int) -> bool:
        """``session`` gives its lease on ``directory`` back; whether it held one."""
        lease = self._leases.get(directory)
        if lease is None or lease.holder != session:
            return False
        del self._leases[directory]
        return True

    def end_session(self, session: int) -> list[int]:
        """The session ended: its leases end, its reads are forgotten; the directories it held."""
        ended = [directory for directory, lease in self._leases.items() if lease.holder == session]
        for directory in ended:
            del self._leases[directory]
        for readers in self._touched.values():
            readers.pop(session, None)
        return ended

    def _sweep(self, now: float) -> None:
        """Forget reads older than ``reads_remembered`` (at most once a second)."""
        if now - self._swept_at < 1.0:
            return
        self._swept_at = now
        oldest = now - self.reads_remembered
        for directory in list(self._touched):
            readers = self._touched[directory]
            for session in [session for session, at in readers.items() if at <= oldest]:
                del readers[session]
            if not readers:
                del self._touched[directory]
