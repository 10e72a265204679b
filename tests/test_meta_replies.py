"""The answers a metadata server keeps of named clients' changes (:mod:`lucidlink.meta.replies`)."""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from lucidlink import errors
from lucidlink.meta.replies import RepliesKept, Reply
from lucidlink.protocol import messages as w

CLIENT = b"client-number-1!"


class ReplyTests(SynchronousTestCase):
    def test_waits_for_the_first_attempt(self) -> None:
        """Asked before the first attempt is answered, a reply fires with that answer; after, at once."""
        reply = Reply(w.MkDir, 0.0)
        waiting = reply.replay()
        self.assertNoResult(waiting)
        self.assertEqual(reply.settle("answer"), "answer")
        self.assertEqual(self.successResultOf(waiting), "answer")
        self.assertEqual(self.successResultOf(reply.replay()), "answer")

    def test_an_error_too(self) -> None:
        reply = Reply(w.MkDir, 0.0)
        waiting = reply.replay()
        failure = Failure(errors.AlreadyExists("taken"))
        self.assertIs(reply.settle(failure), failure)
        self.failureResultOf(waiting, errors.AlreadyExists)
        self.failureResultOf(reply.replay(), errors.AlreadyExists)


class RepliesKeptTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.replies = RepliesKept(self.clock, remember_seconds=60, remember_count=3)

    def test_kept_a_while(self) -> None:
        """An answer is there for ``remember_seconds``, then forgotten."""
        reply = self.replies.add(CLIENT, 7, w.MkDir)
        self.clock.advance(59)
        self.assertIs(self.replies.get(CLIENT, 7), reply)
        self.clock.advance(2)
        self.assertIsNone(self.replies.get(CLIENT, 7))
        self.assertEqual(len(self.replies), 0)

    def test_made_but_not_stored_is_kept_while_asked_for(self) -> None:
        """A change made but not stored stays kept as long as its client keeps sending it again."""
        reply = self.replies.add(CLIENT, 7, w.MkDir)
        reply.made = "the entry"
        for _ in range(5):
            self.clock.advance(50)
            self.assertIs(self.replies.get(CLIENT, 7), reply)
        self.clock.advance(61)
        self.assertIsNone(self.replies.get(CLIENT, 7))

    def test_the_latest_few_per_client(self) -> None:
        """Each client keeps its last ``remember_count`` answers; other clients' are theirs."""
        for request_id in range(1, 6):
            self.replies.add(CLIENT, request_id, w.MkDir)
        self.replies.add(b"another-client!!", 1, w.Unlink)
        self.assertEqual([self.replies.get(CLIENT, i) is not None for i in range(1, 6)],
                         [False, False, True, True, True])
        self.assertEqual(self.replies.get(b"another-client!!", 1).kind, w.Unlink)  # type: ignore[union-attr]

    def test_forget(self) -> None:
        self.replies.add(CLIENT, 7, w.MkDir)
        self.replies.forget(CLIENT, 7)
        self.replies.forget(b"never-seen-this!", 1)
        self.assertIsNone(self.replies.get(CLIENT, 7))

    def test_bound_to_its_user(self) -> None:
        self.replies.register(CLIENT, "wendy")
        self.replies.register(CLIENT, "wendy")
        self.assertRaises(errors.AccessDenied, self.replies.register, CLIENT, "rita")

    def test_a_client_gone_is_forgotten(self) -> None:
        """A client named and quiet for ``remember_seconds``, with no answer kept, is forgotten, user and all."""
        for number in range(100):
            self.replies.register(b"client-number-%d" % number, "wendy")
        self.replies.register(CLIENT, "wendy")
        self.replies.add(CLIENT, 1, w.MkDir)
        self.clock.advance(30)
        self.replies.register(CLIENT, "wendy")  # named again: still in use
        self.clock.advance(31)
        self.replies.get(CLIENT, 1)  # sweeps
        self.assertEqual(list(self.replies._owners), [CLIENT])
        self.assertRaises(errors.AccessDenied, self.replies.register, CLIENT, "rita")
        self.clock.advance(31)
        self.replies.get(CLIENT, 1)
        self.assertEqual(self.replies._owners, {})

    def test_what_the_client_is_told(self) -> None:
        """The boot id is new with every server; the bounds are the ones kept."""
        known = self.replies.known()
        self.assertEqual((known.remember_ms, known.remember_count), (60_000, 3))
        self.assertEqual(known.boot_id, self.replies.boot_id)
        self.assertNotEqual(RepliesKept(self.clock).boot_id, self.replies.boot_id)
