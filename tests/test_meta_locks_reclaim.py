"""
Locks after a restart: the grace period in which only reclaims are granted,
in the lock table, in the metadata responder (on a :class:`task.Clock`), and
the ``lock_grace`` setting.
"""

from __future__ import annotations

from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

from lucidlink import errors
from lucidlink.meta.config import DEFAULT_LOCK_GRACE, ConfigError, load_config
from lucidlink.meta.locks import WHOLE_FILE_END, HeldLock, LockTable
from lucidlink.meta.service import MetadataResponder
from lucidlink.meta.store import ROOT_INODE
from lucidlink.protocol import messages as w
from lucidlink.protocol.messages import LockKind, LockType
from tests.test_meta_service import InitialisedTestCase, ServiceTestCase
from tests.test_meta_tap import FILESPACE, make_certificates, write_config

READ, WRITE, UNLOCK = LockType.READ, LockType.WRITE, LockType.UNLOCK
FLOCK, POSIX = LockKind.FLOCK, LockKind.POSIX
A, B = (1, 10), (2, 20)
INODE = 7
GRACE = 10.0


class GraceTableTests(SynchronousTestCase):
    """The lock table in and after its grace period."""

    def setUp(self) -> None:
        self.locks = LockTable()
        self.locks.begin_grace()

    def test_reclaim_granted_new_request_refused(self) -> None:
        """In grace a reclaim is granted; a new request is refused, naming the grace period."""
        self.locks.reclaim(A, INODE, FLOCK, WRITE, 0, 0)
        with self.assertRaises(errors.Locked) as caught:
            self.locks.lock(B, INODE, FLOCK, READ, 0, 0, False)
        self.assertIn("grace period", str(caught.exception))
        self.assertEqual(self.locks.held(INODE, FLOCK), [HeldLock(A, WRITE, 0, WHOLE_FILE_END)])

    def test_free_lock_refused_too(self) -> None:
        """Even a lock nobody reclaimed is refused in grace: its holder may not have come back yet."""
        self.assertRaises(errors.Locked, self.locks.lock, B, 99, POSIX, WRITE, 0, 10, False)
        self.assertEqual(self.locks.end_grace(), {99})
        self.assertIsNone(self.locks.lock(B, 99, POSIX, WRITE, 0, 10, False))

    def test_waiting_request_granted_when_grace_ends(self) -> None:
        """A request that waits is queued and granted when the grace period ends, if free."""
        granted = self.locks.lock(B, INODE, POSIX, WRITE, 0, 10, True)
        assert granted is not None
        self.assertNoResult(granted)
        self.locks.end_grace()
        self.successResultOf(granted)
        self.assertEqual(self.locks.held(INODE, POSIX), [HeldLock(B, WRITE, 0, 10)])

    def test_waiting_request_behind_reclaimed_lock(self) -> None:
        """A waiter behind a reclaimed lock waits on past the grace period, until the holder unlocks."""
        self.locks.reclaim(A, INODE, POSIX, WRITE, 5, 9)
        granted = self.locks.lock(B, INODE, POSIX, READ, 0, 20, True)
        assert granted is not None
        self.locks.end_grace()
        self.assertNoResult(granted)
        self.locks.lock(A, INODE, POSIX, UNLOCK, 0, WHOLE_FILE_END, False)
        self.successResultOf(granted)

    def test_holder_may_change_its_lock(self) -> None:
        """A holder that reclaimed may unlock, or convert its own range, in grace."""
        self.locks.reclaim(A, INODE, POSIX, READ, 0, 99)
        self.assertIsNone(self.locks.lock(A, INODE, POSIX, WRITE, 10, 20, False))
        self.assertRaises(errors.Locked, self.locks.lock, A, INODE, POSIX, WRITE, 90, 120, False)
        self.assertIsNone(self.locks.lock(A, INODE, POSIX, UNLOCK, 0, 99, False))
        self.assertEqual(self.locks.held(INODE, POSIX), [])

    def test_conflicting_reclaim_refused(self) -> None:
        """Two claims of one exclusive lock: the second is refused, in grace and after it."""
        self.locks.reclaim(A, INODE, FLOCK, WRITE, 0, 0)
        self.assertRaises(errors.Locked, self.locks.reclaim, B, INODE, FLOCK, READ, 0, 0)
        self.locks.end_grace()
        self.assertRaises(errors.Locked, self.locks.reclaim, B, INODE, FLOCK, WRITE, 0, 0)

    def test_reclaim_after_grace_when_free(self) -> None:
        """After grace (a session ended but the server kept running) a free lock is reclaimed."""
        self.locks.end_grace()
        self.locks.reclaim(A, INODE, POSIX, READ, 0, 9)
        self.locks.reclaim(B, INODE, POSIX, READ, 5, 20)
        self.assertEqual(len(self.locks.held(INODE, POSIX)), 2)

    def test_unlock_is_not_reclaimed(self) -> None:
        self.assertRaises(errors.InvalidArgument, self.locks.reclaim, A, INODE, FLOCK, UNLOCK, 0, 0)


class RecordTests(SynchronousTestCase):
    """The table as a client's record of what it holds."""

    def test_record_splits_and_lists(self) -> None:
        """Recording grants and unlocks splits ranges as the server does; all_held lists what is left."""
        locks = LockTable()
        locks.record((0, 5), INODE, POSIX, WRITE, 0, 99)
        locks.record((0, 5), INODE, POSIX, UNLOCK, 10, 19)
        locks.record((0, 6), 3, FLOCK, READ, 0, 0)
        self.assertEqual(locks.all_held(), [
            (3, FLOCK, HeldLock((0, 6), READ, 0, WHOLE_FILE_END)),
            (INODE, POSIX, HeldLock((0, 5), WRITE, 0, 9)),
            (INODE, POSIX, HeldLock((0, 5), WRITE, 20, 99)),
        ])


class ResponderGraceTests(InitialisedTestCase):
    """The metadata responder's grace period runs on its clock; reclaims go over the wire."""

    def setUp(self) -> None:
        super().setUp()
        self.responder = self.make_responder(lock_grace=GRACE)  # the server started again
        self.holder, self.newcomer = self.logged_in("wendy"), self.logged_in("wendy")

    def test_grace_then_normal(self) -> None:
        """In grace the reclaim is granted and a newcomer refused; after it the newcomer meets the lock."""
        self.assertEqual(self.holder.answer(w.LockReclaim(ROOT_INODE, 1, FLOCK, WRITE, 0, 0)), w.Ok())
        refusal = self.newcomer.refused(w.Lock(ROOT_INODE, 2, FLOCK, READ, 0, 0, False), errors.Locked)
        self.assertIn("grace period", str(refusal))
        self.clock.advance(GRACE)
        refusal = self.newcomer.refused(w.Lock(ROOT_INODE, 2, FLOCK, READ, 0, 0, False), errors.Locked)
        self.assertIn("write lock", str(refusal))

    def test_reader_cannot_reclaim_exclusive(self) -> None:
        """A reclaim needs the same role as the lock it takes."""
        rita = self.logged_in("rita")
        rita.refused(w.LockReclaim(ROOT_INODE, 1, FLOCK, WRITE, 0, 0), errors.AccessDenied)

    def test_waiter_granted_on_time(self) -> None:
        """A request waiting in grace is granted when the period ends, with no other request to notice it."""
        waiting = self.newcomer.ask(w.Lock(ROOT_INODE, 2, POSIX, WRITE, 0, 10, True))
        self.clock.advance(GRACE - 0.1)
        self.flush()
        self.assertNoResult(waiting)
        self.clock.advance(0.1)
        self.flush()
        self.assertEqual(self.successResultOf(waiting), w.Ok())

    def test_no_grace_by_default(self) -> None:
        """Without ``lock_grace`` (tests, tools) locks are granted at once."""
        self.assertFalse(MetadataResponder(self.store, self.clock, "films").locks.in_grace)

    def test_no_grace_before_initialisation(self) -> None:
        """A filespace not yet initialised has no lock holders to wait for."""
        ServiceTestCase.setUp(self)
        self.assertFalse(self.make_responder(lock_grace=GRACE).locks.in_grace)


class LockGraceSettingTests(SynchronousTestCase):
    """``lock_grace`` in the [meta] section."""

    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.directory.mkdir()
        make_certificates(self.directory)

    def test_values(self) -> None:
        """Default, seconds, a duration, and 0 for none."""
        self.assertEqual(self.read(), DEFAULT_LOCK_GRACE)
        self.assertEqual(self.read(lock_grace="12.5"), 12.5)
        self.assertEqual(self.read(lock_grace="2m"), 120.0)
        self.assertEqual(self.read(lock_grace="0"), 0.0)
        self.assertEqual(self.read(lock_grace="0s"), 0.0)

    def read(self, **keys: str) -> float:
        return load_config(write_config(self.directory, **keys), FILESPACE).lock_grace

    def test_bad_value(self) -> None:
        """A bad value names the file and the key."""
        for bad in ("soon", "-3"):
            with self.assertRaises(ConfigError) as caught:
                load_config(write_config(self.directory, lock_grace=bad), FILESPACE)
            self.assertIn("lock_grace", str(caught.exception))
