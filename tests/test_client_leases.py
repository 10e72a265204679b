"""The client's directory leases (:mod:`lucidlink.client.leases`): asked, renewed while used, recalled, void."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lucidlink import errors
from lucidlink.client.leases import MARGIN_SECONDS, HeldLeases
from lucidlink.protocol import messages as w


@dataclass
class _Connection:
    asked: list[tuple[Any, defer.Deferred[Any]]] = field(default_factory=list)

    def request(self, message: Any) -> defer.Deferred[Any]:
        answer: defer.Deferred[Any] = defer.Deferred()
        self.asked.append((message, answer))
        return answer


@dataclass
class _Live:
    connection: _Connection
    generation: int


class _Pipeline:
    def __init__(self) -> None:
        self.posted: list[Any] = []
        self.behind: list[defer.Deferred[Any]] | None = None
        """Set to a list: a posted change waits there for its answer (behind changes in flight)."""

    def post(self, message: Any) -> defer.Deferred[Any]:
        self.posted.append(message)
        if self.behind is None:
            return defer.succeed(w.Ok())
        answer: defer.Deferred[Any] = defer.Deferred()
        self.behind.append(answer)
        return answer


class _Session:
    """What :class:`HeldLeases` uses of a session: its clock, connection, pipeline and hooks."""

    def __init__(self) -> None:
        self.reactor = Clock()
        self._live: _Live | None = _Live(_Connection(), 1)
        self._closed = False
        self.pipeline = _Pipeline()
        self.pushed: list[Any] = []
        self.lost: list[Any] = []

    def on_notify(self, listener: Any) -> Any:
        self.pushed.append(listener)
        return lambda: self.pushed.remove(listener)

    def on_connection_lost(self, listener: Any) -> Any:
        self.lost.append(listener)
        return lambda: self.lost.remove(listener)

    def push(self, message: Any) -> None:
        for listener in list(self.pushed):
            listener(message)

    def lose_connection(self) -> None:
        self._live = None
        for listener in list(self.lost):
            listener()


class HeldLeasesTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.session = _Session()
        self.clock = self.session.reactor
        self.ended: list[int] = []
        self.leases = HeldLeases(self.session, on_ended=self.ended.append)  # type: ignore[arg-type]

    @property
    def asked(self) -> list[tuple[Any, defer.Deferred[Any]]]:
        assert self.session._live is not None
        return self.session._live.connection.asked

    def grant(self, directory: int = 7, seconds: float = 10.0) -> None:
        message, answer = self.asked[-1]
        self.assertEqual(message, w.LeaseDirectory(directory))
        answer.callback(w.Lease(directory, int(seconds * 1000)))

    def test_counted_from_when_it_was_asked_for(self) -> None:
        self.leases.ask(7)
        self.leases.ask(7)
        self.assertEqual(len(self.asked), 1, "asked once")
        self.assertFalse(self.leases.usable(7))
        self.clock.advance(1.0)  # the answer took a second
        self.grant()
        self.assertTrue(self.leases.usable(7))
        self.clock.advance(10.0 - MARGIN_SECONDS - 1.0 - 0.01)
        self.assertTrue(self.leases.usable(7))
        self.clock.advance(0.02)
        self.assertFalse(self.leases.usable(7), "not used in its last seconds, counted from the asking")

    def test_renewed_at_half_time_while_used(self) -> None:
        self.leases.ask(7)
        self.grant()
        self.assertTrue(self.leases.usable(7))
        self.clock.advance(5.0)
        self.assertEqual(len(self.asked), 2, "renewed")
        self.grant()
        self.clock.advance(4.0)
        self.assertTrue(self.leases.usable(7))
        self.clock.advance(3.0)
        self.assertTrue(self.leases.usable(7), "for ten seconds from the renewal (less the margin)")
        self.assertEqual(len(self.asked), 3, "and renewed again, having been used")
        self.assertEqual(self.ended, [])

    def test_lapses_when_not_used(self) -> None:
        self.leases.ask(7)
        self.grant()
        self.clock.advance(5.0)
        self.assertEqual(len(self.asked), 1, "not renewed")
        self.assertFalse(self.leases.usable(7))
        self.assertEqual(self.ended, [7])
        self.assertEqual(self.session.pipeline.posted, [w.LeaseReturned(7)], "given back: nobody need recall it")

    def test_not_asked_for_again_before_its_return_is_made(self) -> None:
        """
        A lapsed lease's return waits behind changes in the pipeline: a new ask sent straight on the connection
        would be granted first, and the return would then end the new lease at the server, unknown here.
        """
        self.session.pipeline.behind = []
        self.leases.ask(7)
        self.grant()
        self.clock.advance(5.0)
        self.assertEqual(self.session.pipeline.posted, [w.LeaseReturned(7)])
        self.assertFalse(self.leases.ask(7))
        self.assertEqual(len(self.asked), 1, "not asked while the return is on its way")
        self.session.pipeline.behind[0].callback(w.Ok())
        self.assertTrue(self.leases.ask(7))
        self.assertEqual(len(self.asked), 2, "asked once the server has it back")

    def test_not_asked_for_again_before_a_recalled_lease_is_back(self) -> None:
        self.session.pipeline.behind = []
        self.leases.ask(7)
        self.grant()
        self.session.push(w.LeaseRecall(7))
        self.clock.advance(5.0)  # the pipeline is held up longer than the pause after a recall
        self.assertFalse(self.leases.ask(7))
        self.assertEqual(len(self.asked), 1)
        self.session.pipeline.behind[0].errback(errors.ConnectionClosed("lost"))  # ended with the session anyway
        self.assertTrue(self.leases.ask(7))
        self.assertEqual(len(self.asked), 2)

    def test_refused(self) -> None:
        self.leases.ask(7)
        self.asked[-1][1].errback(errors.Busy("used by another client lately"))
        self.assertFalse(self.leases.usable(7))
        self.leases.ask(7)
        self.assertEqual(len(self.asked), 1, "not asked again at once: others use it")
        self.clock.advance(5.0)
        self.leases.ask(7)
        self.assertEqual(len(self.asked), 2, "asked again later")

    def test_a_refused_renewal_ends_it(self) -> None:
        self.leases.ask(7)
        self.grant()
        self.leases.usable(7)
        self.clock.advance(5.0)
        self.asked[-1][1].errback(errors.Busy("being recalled"))
        self.assertFalse(self.leases.usable(7))
        self.assertEqual(self.ended, [7])

    def test_recalled_and_given_back_behind_the_changes(self) -> None:
        self.leases.ask(7)
        self.grant()
        self.session.push(w.LeaseRecall(7))
        self.assertFalse(self.leases.usable(7))
        self.assertEqual(self.session.pipeline.posted, [w.LeaseReturned(7)])
        self.assertEqual(self.ended, [7])
        self.leases.ask(7)
        self.assertEqual(len(self.asked), 1, "not asked again at once: another client uses it")
        self.clock.advance(5.0)
        self.assertEqual(len(self.asked), 1, "no renewal after a recall")
        self.session.push(w.Notify(w.NotifyKind.INODE_CHANGED, 7, 0, b""))  # other pushes are not leases' business
        self.assertEqual(self.session.pipeline.posted, [w.LeaseReturned(7)])

    def test_void_with_the_connection(self) -> None:
        self.leases.ask(7)
        self.grant()
        self.session.lose_connection()
        self.assertEqual(self.ended, [7])
        self.session._live = _Live(_Connection(), 2)
        self.assertFalse(self.leases.usable(7))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_granted_on_a_connection_since_lost(self) -> None:
        self.leases.ask(7)
        message, answer = self.asked[-1]
        self.session.lose_connection()
        self.session._live = _Live(_Connection(), 2)
        answer.callback(w.Lease(7, 10_000))
        self.assertFalse(self.leases.usable(7))
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_granted_after_closing(self) -> None:
        """An answer that comes after :meth:`HeldLeases.close` leaves no lease and no renewal behind."""
        self.leases.ask(7)
        self.leases.close()
        self.grant()
        self.assertFalse(self.leases.usable(7))
        self.assertEqual(self.clock.getDelayedCalls(), [])
