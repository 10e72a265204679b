"""
Changes sent without waiting for their answers: in order, each made once.

A :class:`ChangePipeline` sends each change it is given at once, on the
session's connection, behind those posted before; the caller goes on and
hears of the answer later (the Deferred :meth:`~ChangePipeline.post`
returns).  The server runs a session's requests in the order they arrive,
so the changes are made in the order they were posted.

When the connection drops, the changes not yet answered are sent again on
the next connection, in the same order and under the same request ids,
before anything else is (the session calls :meth:`~ChangePipeline.send_again`
while it connects): the server answers those it made as it answered them
(``ClientId``, :mod:`lucidlink.meta.replies`) and makes the others.  A
"try again" answer (``Busy``, ``Restoring``, ``Unavailable``) pauses the
pipeline; after the session's backoff that change, and every later one not
answered yet, go again in order.  Any other error is the change's own: its
Deferred fails with it, and the caller, whose picture of the tree was
wrong, must look again.  At most ``limit`` changes are in flight (the
others wait their turn, in order);
:meth:`~ChangePipeline.room` waits for a place, :meth:`~ChangePipeline.settled`
for those posted so far to be answered.

This is the sending half of ``docs/directory-leases.rst`` (step 4): the
changes a client makes under a directory lease.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, task
from twisted.python.failure import Failure

from lucidlink.client.backoff import retry_after_seconds
from lucidlink.errors import Busy, ConnectionClosed, LucidError, RequestTimeout, Restoring, Unavailable

if TYPE_CHECKING:
    from lucidlink.client.session import FilespaceSession, _Live

DEFAULT_LIMIT = 64
"""Changes in flight at most: well under what a server takes on one connection (256)."""

_GONE = (ConnectionClosed, RequestTimeout)
_TRY_AGAIN = (Busy, Restoring, Unavailable)


@dataclass(eq=False)
class _Posted:
    """A change and what became of it."""

    request_id: int
    message: Any
    number: int
    """Its place among the changes posted."""
    answered: defer.Deferred[Any] = field(default_factory=defer.Deferred)
    sent_on: int | None = None
    """The generation of the connection it was last sent on (None: to send)."""


class ChangePipeline:
    """The changes of one session that nobody waits for (see the module)."""

    def __init__(self, session: FilespaceSession, limit: int = DEFAULT_LIMIT) -> None:
        self.session = session
        self.limit = limit
        self._posted: list[_Posted] = []
        self._paused = False
        self._attempt = 0
        self._room: list[defer.Deferred[None]] = []
        self._settled_waiters: list[tuple[int, defer.Deferred[None]]] = []
        self._numbered = 0
        self._reconnecting = False

    def __len__(self) -> int:
        return len(self._posted)

    def post(self, message: Any) -> defer.Deferred[Any]:
        """Send ``message`` behind the changes posted before; fires with its answer (or fails with its error)."""
        return self.post_noting_connection(message).addCallback(lambda answered: answered[0])

    def post_noting_connection(self, message: Any) -> defer.Deferred[tuple[Any, int]]:
        """As :meth:`post`; fires with the answer and the generation of the connection that gave it."""
        if self.session._closed:
            return defer.fail(ConnectionClosed(f"the session with {self.session.filespace!r} is closed"))
        self._numbered += 1
        posted = _Posted(self.session._next_call_id(), message, self._numbered)
        self._posted.append(posted)
        live = self.session._live
        if live is not None and not self._paused:
            self._send_in_order(live)
        else:
            self._reconnect()
        return posted.answered

    def room(self) -> defer.Deferred[None]:
        """Fires once fewer than ``limit`` changes wait for their answers."""
        if len(self._posted) < self.limit:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._room.append(waiter)
        return waiter

    def settled(self) -> defer.Deferred[None]:
        """
        Fires once every change posted so far is answered (later ones may still wait).

        A request sent outside the pipeline waits for this first, so that it
        is sent after, and sees, every change made before it.
        """
        if not self._posted:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._settled_waiters.append((self._posted[-1].number, waiter))
        return waiter

    def send_again(self, live: _Live) -> None:
        """On a new connection, before anything else: send every change not answered, in order."""
        self._paused = False
        self._send_in_order(live)

    def fail_all(self, error: LucidError) -> None:
        """Give up every change not answered (the session is closed, or cannot connect)."""
        posted, self._posted = self._posted, []
        for each in posted:
            each.answered.errback(Failure(error))
        self._settled()

    # -- inside --------------------------------------------------------------------

    def _send_in_order(self, live: _Live) -> None:
        """Send, in order, the changes not yet on ``live``, as long as fewer than ``limit`` are in flight there."""
        in_flight = sum(posted.sent_on == live.generation for posted in self._posted)
        for posted in self._posted:
            if in_flight >= self.limit:
                return
            if posted.sent_on != live.generation:
                self._send(posted, live)
                in_flight += 1

    def _send(self, posted: _Posted, live: _Live) -> None:
        posted.sent_on = live.generation
        live.connection.request(posted.message, request_id=posted.request_id).addCallbacks(
            self._answered, self._failed, callbackArgs=(posted, live), errbackArgs=(posted, live)
        )

    def _answered(self, answer: Any, posted: _Posted, live: _Live) -> None:
        if posted not in self._posted:
            return  # answered already, on another connection
        self._attempt = 0
        self._posted.remove(posted)
        current = self.session._live
        if current is not None and not self._paused:
            self._send_in_order(current)
        posted.answered.callback((answer, live.generation))
        self._settled()

    def _failed(self, failure: Failure, posted: _Posted, live: _Live) -> None:
        if posted not in self._posted or posted.sent_on != live.generation:
            return  # answered, or sent again since on another connection
        if failure.check(*_GONE):
            posted.sent_on = None
            self.session._drop(live)
            self._reconnect()
        elif failure.check(*_TRY_AGAIN):
            posted.sent_on = None
            if not self._paused:
                self._paused = True
                delay = self.session.backoff.delay(self._attempt, retry_after_seconds(failure.value))
                self._attempt += 1
                task.deferLater(self.session.reactor, delay, self._resume)
        else:
            self._posted.remove(posted)
            posted.answered.errback(failure)
            self._settled()

    def _resume(self) -> None:
        live = self.session._live
        if live is None:
            self._reconnect()
            return
        self._paused = False
        self._send_in_order(live)

    def _reconnect(self) -> None:
        """
        Have the session connect again, retrying as its calls do (until its deadline, if it has one); it sends
        what is posted on the new connection itself.
        """
        if self.session._closed:
            return  # closing fails what is left
        if self.session._live is not None and not self._paused:
            self.send_again(self.session._live)
            return
        if self._reconnecting:
            return
        self._reconnecting = True

        def ended(result: Any) -> Any:
            self._reconnecting = False
            return result

        self.session.connect_again().addBoth(ended).addErrback(self._cannot_connect)

    def _cannot_connect(self, failure: Failure) -> None:
        if failure.check(LucidError):
            self.fail_all(failure.value)  # type: ignore[arg-type]
        else:
            self.fail_all(Unavailable(f"cannot connect to the metadata server: {failure.getErrorMessage()}"))

    def _settled(self) -> None:
        if self._settled_waiters:
            oldest = self._posted[0].number if self._posted else self._numbered + 1
            ready = [waiter for last, waiter in self._settled_waiters if last < oldest]
            self._settled_waiters = [(last, waiter) for last, waiter in self._settled_waiters if last >= oldest]
            for waiter in ready:
                waiter.callback(None)
        if len(self._posted) < self.limit:
            room, self._room = self._room, []
            for waiter in room:
                waiter.callback(None)

