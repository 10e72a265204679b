"""
Directory leases, the client's side: which directories this session may change without waiting.

A lease is the metadata server's promise that no other session reads or
changes a directory until it recalls it (:mod:`lucidlink.meta.leases`;
``docs/directory-leases.rst``).  :class:`HeldLeases` asks for one
(:meth:`~HeldLeases.ask`, when the core made, listed whole or changed the
directory; not again soon after a refusal or a recall), renews it at half
its time while it is used, and gives it back when it lapses unused and on
a recall, *through the change pipeline*, so that the return follows every
change this client made under it.  The lease counts from when it was asked
for, not from when it was granted, so this client stops using it before the
server lets it go; and it is void once the connection it was granted on is
gone (the server ends a session's leases with it).

While :meth:`~HeldLeases.usable` says so, the core applies changes of the
directory's entries to what it knows at once and sends them through the
pipeline (:class:`~lucidlink.client.filespace.Inodes`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from lucidlink.errors import LucidError
from lucidlink.protocol import messages as w

if TYPE_CHECKING:
    from lucidlink.client.session import FilespaceSession

MARGIN_SECONDS = 2.0
"""A lease is not used in the last seconds of its time: changes sent then may reach the server after it ended."""
ASK_AGAIN_SECONDS = 5.0
"""A directory whose lease was refused or recalled is not asked for again for this long (others use it)."""
MAX_REFUSALS_KEPT = 4096

_log = Logger()


@dataclass(eq=False)
class _Held:
    directory: int
    until: float
    """This client's clock: the lease is not used from then on."""
    generation: int
    """The connection it was granted on."""
    renewal: Any = None
    used: bool = False


class HeldLeases:
    """The directory leases one session holds (see the module)."""

    def __init__(self, session: FilespaceSession, on_ended: Callable[[int], object] = lambda directory: None) -> None:
        self.session = session
        self.clock = session.reactor
        self.on_ended = on_ended
        """Called with a directory whose lease ended here (recalled, or not renewed)."""
        self._held: dict[int, _Held] = {}
        self._asking: set[int] = set()
        self._refused_until: dict[int, float] = {}
        self._returning: dict[int, int] = {}
        """Directories whose ``LeaseReturned`` waits in the pipeline, and how many."""
        self._closed = False
        self._unsubscribe = [session.on_notify(self._pushed), session.on_connection_lost(self.drop_all)]

    def usable(self, directory: int) -> bool:
        """Whether changes of ``directory``'s entries may be made here at once (and sent without waiting)."""
        held = self._held.get(directory)
        if held is None:
            return False
        live = self.session._live
        if live is None or live.generation != held.generation or self.clock.seconds() >= held.until:
            return False
        held.used = True
        return True

    def ask(self, directory: int) -> bool:
        """
        Ask for a lease on ``directory`` in the background (one attempt: a refusal means none for now, and
        for :data:`ASK_AGAIN_SECONDS`); whether one is held or asked for.
        """
        live = self.session._live
        if directory in self._asking or directory in self._held:
            return True
        if live is None or self.session._closed or self._closed:
            return False
        if self._refused_until.get(directory, 0.0) > self.clock.seconds():
            return False
        if directory in self._returning:
            return False  # asked now, it would be granted before the return, which would end the new lease
        self._refused_until.pop(directory, None)
        self._request(directory, live)
        return True

    def _request(self, directory: int, live: Any) -> None:
        self._asking.add(directory)
        asked_at = self.clock.seconds()
        live.connection.request(w.LeaseDirectory(directory)).addCallbacks(
            self._granted, self._refused, callbackArgs=(directory, asked_at, live.generation),
            errbackArgs=(directory,),
        )

    def drop_all(self) -> None:
        """Every lease is void (the connection is gone: the server ended them with the session)."""
        held, self._held = self._held, {}
        for lease in held.values():
            self._stop_renewing(lease)
            self.on_ended(lease.directory)

    def close(self) -> None:
        """Stop listening to the session; the leases end with it."""
        self._closed = True
        for unsubscribe in self._unsubscribe:
            unsubscribe()
        self._unsubscribe = []
        held, self._held = self._held, {}
        for lease in held.values():
            self._stop_renewing(lease)

    # -- inside --------------------------------------------------------------------

    def _granted(self, answer: w.Lease, directory: int, asked_at: float, generation: int) -> None:
        self._asking.discard(directory)
        live = self.session._live
        if live is None or live.generation != generation or self.session._closed or self._closed:
            return
        seconds = answer.expires_ms / 1000
        held = self._held.get(directory)
        if held is None:
            held = self._held[directory] = _Held(directory, 0.0, generation)
        else:
            self._stop_renewing(held)
        held.until = asked_at + seconds - MARGIN_SECONDS
        held.used = False
        held.renewal = self.clock.callLater(max(0.0, seconds / 2), self._renew, held)

    def _refused(self, failure: Failure, directory: int) -> None:
        self._asking.discard(directory)
        if not failure.check(LucidError):
            _log.failure("asking for a lease on directory {directory} failed", failure, directory=directory)
        self._not_again_soon(directory)
        if self._held.pop(directory, None) is not None:  # a renewal refused: the lease is being recalled
            self.on_ended(directory)

    def _renew(self, held: _Held) -> None:
        held.renewal = None
        if self._held.get(held.directory) is not held:
            return
        live = self.session._live
        if held.used and live is not None and live.generation == held.generation:
            self._request(held.directory, live)
            return
        del self._held[held.directory]  # not used lately: given back, so that others need not recall it
        self.on_ended(held.directory)
        self._give_back(held.directory).addErrback(lambda _: None)

    def _pushed(self, message: Any) -> None:
        if not isinstance(message, w.LeaseRecall):
            return
        held = self._held.pop(message.inode, None)
        self._not_again_soon(message.inode)  # another client uses it
        if held is not None:
            self._stop_renewing(held)
            self.on_ended(held.directory)
        # After this session's changes of the directory, so the server has made them when it takes the lease back.
        self._give_back(message.inode).addErrback(
            lambda failure: _log.info("could not give the lease on directory {directory} back: {error}",
                                      directory=message.inode, error=failure.value)
        )

    def _give_back(self, directory: int) -> defer.Deferred[Any]:
        """Post ``LeaseReturned``; until it is answered (or failed) the directory is not asked for again."""
        self._returning[directory] = self._returning.get(directory, 0) + 1

        def answered(result: Any) -> Any:
            left = self._returning.pop(directory) - 1
            if left:
                self._returning[directory] = left
            return result

        return self.session.pipeline.post(w.LeaseReturned(directory)).addBoth(answered)

    def _not_again_soon(self, directory: int) -> None:
        """Ask for ``directory``'s lease again only after :data:`ASK_AGAIN_SECONDS`."""
        now = self.clock.seconds()
        if len(self._refused_until) >= MAX_REFUSALS_KEPT:
            self._refused_until = {folder: until for folder, until in self._refused_until.items() if until > now}
        self._refused_until[directory] = now + ASK_AGAIN_SECONDS

    def _stop_renewing(self, held: _Held) -> None:
        if held.renewal is not None and held.renewal.active():
            held.renewal.cancel()
        held.renewal = None

