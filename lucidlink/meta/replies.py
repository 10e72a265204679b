"""
Answers to changes, kept a while, so that a change sent again after a lost connection is made once.

A client names itself after login (``ClientId``, a random id bound to the
user that registered it) and keeps the request id of a change the same
when it sends it again on a new connection.  The server keeps what became
of each change of a named client (:class:`Reply`: pending, then the answer
or the error) for ``remember_seconds`` and, per client, for its last
``remember_count`` changes, in memory: a change sent again within those
bounds gets the first attempt's answer, or waits for it, and is not made
twice.  A change that was made but whose journal record could not be
stored was answered ``Unavailable``; sent again, it is answered once the
journal is stored, with what it made, and is not made again.  A restarted
server remembers nothing; its ``boot_id`` tells the
client so (``ClientKnown``), and the client then says that an error may
come from its own first attempt, as it does with a server that keeps no
answers.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure

from lucidlink.errors import AccessDenied
from lucidlink.protocol import messages as w

REMEMBER_SECONDS = 300.0
"""How long an answer is kept."""

REMEMBER_COUNT = 4096
"""How many of each client's latest answers are kept."""

_PENDING: Any = object()


class Reply:
    """What became of one change: pending until :meth:`settle`, then its answer or Failure."""

    def __init__(self, kind: type, at: float) -> None:
        self.kind = kind
        self.at = at
        self.outcome: Any = _PENDING
        self.made: Any = None
        """The answer of a change made whose journal record could not be stored (its outcome says Unavailable)."""
        self._waiters: list[defer.Deferred[Any]] = []

    @property
    def pending(self) -> bool:
        """Whether the first attempt is not answered yet."""
        return self.outcome is _PENDING

    def settle(self, result: Any) -> Any:
        """Note the answer (or Failure) and pass it on: a callback for both chains of the first attempt."""
        self.outcome = result
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(result) if isinstance(result, Failure) else waiter.callback(result)
        return result

    def replay(self) -> defer.Deferred[Any]:
        """The first attempt's answer, once it is known."""
        if self.outcome is _PENDING:
            waiter: defer.Deferred[Any] = defer.Deferred()
            self._waiters.append(waiter)
            return waiter
        if isinstance(self.outcome, Failure):
            return defer.fail(self.outcome)
        return defer.succeed(self.outcome)


class RepliesKept:
    """The kept answers of every named client (see the module)."""

    def __init__(self, clock: IReactorTime, remember_seconds: float = REMEMBER_SECONDS,
                 remember_count: int = REMEMBER_COUNT) -> None:
        self.clock = clock
        self.remember_seconds = remember_seconds
        self.remember_count = remember_count
        self.boot_id = os.urandom(8)
        self._owners: dict[bytes, str] = {}
        self._named_at: dict[bytes, float] = {}
        self._replies: dict[bytes, OrderedDict[int, Reply]] = {}
        self._swept_at = 0.0

    def known(self) -> w.ClientKnown:
        """What a client is told when it names itself."""
        return w.ClientKnown(self.boot_id, int(self.remember_seconds * 1000), self.remember_count)

    def register(self, client: bytes, user: str) -> None:
        """
        Bind ``client`` to ``user``: AccessDenied if another user named it first.

        A client is forgotten once it was last named (or changed something)
        ``remember_seconds`` ago and none of its answers is kept.
        """
        self._sweep()
        owner = self._owners.setdefault(client, user)
        if owner != user:
            raise AccessDenied("this client id belongs to another user")
        self._named_at[client] = self.clock.seconds()

    def get(self, client: bytes, request_id: int) -> Reply | None:
        """
        The reply kept for this change, if any.

        One whose change was made but not stored is kept anew each time it is
        asked for: the client sends it again until the store is back, however
        long that takes, and it must not be made twice meanwhile.
        """
        self._sweep()
        replies = self._replies.get(client)
        reply = replies.get(request_id) if replies is not None else None
        if reply is not None and replies is not None and reply.made is not None:
            reply.at = self.clock.seconds()
            replies.move_to_end(request_id)
        return reply

    def add(self, client: bytes, request_id: int, kind: type) -> Reply:
        """A reply to keep for a change being made now."""
        self._sweep()
        replies = self._replies.setdefault(client, OrderedDict())
        reply = replies[request_id] = Reply(kind, self.clock.seconds())
        replies.move_to_end(request_id)
        while len(replies) > self.remember_count:
            replies.popitem(last=False)
        return reply

    def forget(self, client: bytes, request_id: int) -> None:
        """Keep no answer for this change (its answer asks for it to be sent again)."""
        replies = self._replies.get(client)
        if replies is not None:
            replies.pop(request_id, None)

    def __len__(self) -> int:
        return sum(len(replies) for replies in self._replies.values())

    def _sweep(self) -> None:
        """Forget answers older than ``remember_seconds``, and clients with none (at most once a second)."""
        now = self.clock.seconds()
        if now - self._swept_at < 1.0:
            return
        self._swept_at = now
        oldest = now - self.remember_seconds
        for client in list(self._replies):
            replies = self._replies[client]
            while replies and next(iter(replies.values())).at < oldest:
                replies.popitem(last=False)
            if not replies:
                del self._replies[client]
        for client in [client for client, at in self._named_at.items() if at < oldest and client not in self._replies]:
            del self._named_at[client], self._owners[client]
