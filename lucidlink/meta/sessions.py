"""
Sessions of a metadata server: who is logged in, what they hold open, and
how often they may fail to log in.

A :class:`Session` lives as long as its connection.  Its :class:`Handle`\\ s
are open files (the store keeps an unlinked file while a handle holds it);
they belong to the session alone and do not survive it.  :class:`LoginLimiter`
rate-limits failed logins per user name and per source address with
:class:`TokenBucket`\\ s on an injected clock.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.interfaces import IReactorTime

from lucidlink.errors import BadFileHandle, Busy
from lucidlink.protocol.messages import Role

O_ACCMODE = 0o3
O_RDONLY = 0o0
O_TRUNC = 0o1000
"""Linux ``open(2)`` flag values: clients send them as Linux spells them."""


@dataclass(slots=True)
class Handle:
    """An open file of a session."""

    id: int
    inode: int
    writable: bool


@dataclass(eq=False)
class Session:
    """One connection's session: its user once logged in, and its open handles.

    Open and close handles with :meth:`opened` and :meth:`closed`, which
    keep a count per inode, so :meth:`holds` costs the same however many
    handles are open.
    """

    id: int
    connection: Any
    source: str
    user: str | None = None
    role: Role | None = None
    client: bytes | None = None
    """The id the client named itself by (``ClientId``), if it did."""
    held_back: tuple[int, float] | None = None
    """A change of the named client's refused ``Busy`` (its request id), and until when the ones after it are too."""
    handles: dict[int, Handle] = field(default_factory=dict)
    _open_per_inode: Counter[int] = field(default_factory=Counter, repr=False)

    @property
    def logged_in(self) -> bool:
        return self.user is not None

    def handle(self, handle_id: int, inode: int | None = None, *, writing: bool = False) -> Handle:
        """This session's handle ``handle_id`` (on ``inode``, writable if ``writing``)."""
        handle = self.handles.get(handle_id)
        if handle is None:
            raise BadFileHandle(f"handle {handle_id} is not open in this session")
        if inode is not None and handle.inode != inode:
            raise BadFileHandle(f"handle {handle_id} is open on inode {handle.inode}, not {inode}")
        if writing and not handle.writable:
            raise BadFileHandle(f"handle {handle_id} was opened read-only")
        return handle

    def opened(self, handle: Handle) -> None:
        """Count ``handle`` as open in this session."""
        self.handles[handle.id] = handle
        self._open_per_inode[handle.inode] += 1

    def closed(self, handle: Handle) -> None:
        """Forget ``handle``, open in this session."""
        del self.handles[handle.id]
        left = self._open_per_inode[handle.inode] - 1
        if left:
            self._open_per_inode[handle.inode] = left
        else:
            del self._open_per_inode[handle.inode]

    def holds(self, inode: int) -> bool:
        """Whether this session has a handle open on ``inode``."""
        return inode in self._open_per_inode


def is_writable(open_flags: int) -> bool:
    """Whether ``open(2)`` flags ask to write."""
    return (open_flags & O_ACCMODE) != O_RDONLY or bool(open_flags & O_TRUNC)


class TokenBucket:
    """``capacity`` tokens, refilled at ``rate`` per second; a failure takes one."""

    __slots__ = ("capacity", "rate", "tokens", "updated")

    def __init__(self, capacity: float, rate: float, now: float) -> None:
        self.capacity = capacity
        self.rate = rate
        self.tokens = capacity
        self.updated = now

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def wait(self, now: float) -> float:
        """Seconds until a token is there (0 if there is one now)."""
        self._refill(now)
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def take(self, now: float) -> None:
        """Take a token (the bucket may go empty, not below)."""
        self._refill(now)
        self.tokens = max(0.0, self.tokens - 1)

    def full(self, now: float) -> bool:
        """Whether the bucket has refilled completely (and can be forgotten)."""
        self._refill(now)
        return self.tokens >= self.capacity


@dataclass(frozen=True, slots=True)
class Rate:
    """A burst of ``burst`` failures, then one every ``1 / per_second`` seconds."""

    burst: float
    per_second: float


class LoginLimiter:
    """Failed logins, limited per user name and per source address.

    :meth:`check` before trying a login raises :class:`~lucidlink.errors.Busy`
    with a retry hint when either bucket is empty; :meth:`failed` after a
    failure takes a token from both.  Buckets that have refilled are
    forgotten once more than ``max_tracked`` exist, so guessing many names
    does not grow memory without bound.
    """

    def __init__(
        self,
        clock: IReactorTime,
        *,
        per_user: Rate = Rate(5, 0.2),  # noqa: B008
        per_source: Rate = Rate(20, 1.0),  # noqa: B008
        max_tracked: int = 10000,
    ) -> None:
        self.clock = clock
        self.per_user = per_user
        self.per_source = per_source
        self.max_tracked = max_tracked
        self._users: dict[str, TokenBucket] = {}
        self._sources: dict[str, TokenBucket] = {}

    def check(self, user: str, source: str) -> None:
        """Raise Busy if ``user`` or ``source`` failed too often lately."""
        now = self.clock.seconds()
        waits = [
            (bucket.wait(now), what)
            for bucket, what in (
                (self._users.get(user), f"user {user!r}"),
                (self._sources.get(source), f"address {source}"),
            )
            if bucket is not None
        ]
        wait, what = max(waits, default=(0.0, ""))
        if wait > 0:
            raise Busy(
                f"too many failed logins for {what}; try again in {math.ceil(wait)} s",
                retry_after_ms=math.ceil(wait * 1000),
            )

    def failed(self, user: str, source: str) -> None:
        """Count a failed login of ``user`` from ``source``."""
        now = self.clock.seconds()
        for buckets, key, rate in ((self._users, user, self.per_user), (self._sources, source, self.per_source)):
            bucket = buckets.get(key)
            if bucket is None:
                self._forget_full(buckets, now)
                bucket = buckets[key] = TokenBucket(rate.burst, rate.per_second, now)
            bucket.take(now)

    def _forget_full(self, buckets: dict[str, TokenBucket], now: float) -> None:
        if len(buckets) < self.max_tracked:
            return
        for key in [key for key, bucket in buckets.items() if bucket.full(now)]:
            del buckets[key]
        while len(buckets) >= self.max_tracked:  # everything recently failed: drop the oldest
            del buckets[next(iter(buckets))]
