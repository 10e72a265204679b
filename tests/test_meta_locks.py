"""
Advisory locks as plain logic: sharing, ranges, waiting, deadlocks, leases.
"""

from __future__ import annotations

from twisted.trial.unittest import SynchronousTestCase

from lucidlink import errors
from lucidlink.meta.locks import WHOLE_FILE_END, HeldLock, LockTable
from lucidlink.protocol.messages import LockKind, LockType

READ, WRITE, UNLOCK = LockType.READ, LockType.WRITE, LockType.UNLOCK
FLOCK, POSIX = LockKind.FLOCK, LockKind.POSIX
A, B, C = (1, 10), (2, 20), (3, 30)  # owners in three sessions
INODE = 7


class LockTableTests(SynchronousTestCase):
    """One filespace's locks."""

    def setUp(self) -> None:
        self.locks = LockTable()

    def flock(self, owner: tuple[int, int], lock_type: LockType, wait: bool = False) -> object:
        return self.locks.lock(owner, INODE, FLOCK, lock_type, 0, 0, wait)

    def posix(self, owner: tuple[int, int], lock_type: LockType, start: int, end: int, wait: bool = False) -> object:
        return self.locks.lock(owner, INODE, POSIX, lock_type, start, end, wait)

    def test_shared_locks_coexist(self) -> None:
        """Several owners may hold READ at once."""
        self.assertIsNone(self.flock(A, READ))
        self.assertIsNone(self.flock(B, READ))
        self.assertEqual(len(self.locks.held(INODE, FLOCK)), 2)

    def test_exclusive_conflicts(self) -> None:
        """WRITE excludes everyone else; the refusal names the lock in the way."""
        self.flock(A, WRITE)
        with self.assertRaises(errors.Locked) as caught:
            self.flock(B, READ)
        self.assertIn("write lock", str(caught.exception))
        self.assertRaises(errors.Locked, self.flock, B, WRITE)

    def test_same_owner_converts(self) -> None:
        """An owner's own lock never stands in its way: it converts READ to WRITE."""
        self.flock(A, READ)
        self.flock(A, WRITE)
        self.assertEqual(self.locks.held(INODE, FLOCK), [HeldLock(A, WRITE, 0, WHOLE_FILE_END)])

    def test_conversion_blocked_by_other_reader(self) -> None:
        """An upgrade waits for the other readers."""
        self.flock(A, READ)
        self.flock(B, READ)
        self.assertRaises(errors.Locked, self.flock, A, WRITE)

    def test_kinds_do_not_interact(self) -> None:
        """A flock and a POSIX lock on the same file never conflict."""
        self.flock(A, WRITE)
        self.assertIsNone(self.posix(B, WRITE, 0, 100))

    def test_disjoint_ranges(self) -> None:
        """POSIX locks on separate ranges coexist; overlapping WRITE conflicts."""
        self.posix(A, WRITE, 0, 99)
        self.posix(B, WRITE, 100, 199)
        self.assertRaises(errors.Locked, self.posix, C, READ, 50, 150)
        self.assertIsNone(self.posix(C, READ, 200, WHOLE_FILE_END))

    def test_unlock_splits(self) -> None:
        """Unlocking the middle of a range leaves the two ends."""
        self.posix(A, WRITE, 0, 99)
        self.posix(A, UNLOCK, 40, 59)
        self.assertEqual(self.locks.held(INODE, POSIX), [HeldLock(A, WRITE, 0, 39), HeldLock(A, WRITE, 60, 99)])
        self.assertIsNone(self.posix(B, WRITE, 40, 59))

    def test_touching_ranges_merge(self) -> None:
        """An owner's adjacent locks of one type become one."""
        self.posix(A, READ, 0, 9)
        self.posix(A, READ, 10, 19)
        self.assertEqual(self.locks.held(INODE, POSIX), [HeldLock(A, READ, 0, 19)])

    def test_change_type_of_part(self) -> None:
        """Relocking part of a range with another type splits it in three."""
        self.posix(A, READ, 0, 99)
        self.posix(A, WRITE, 10, 19)
        self.assertEqual(
            self.locks.held(INODE, POSIX),
            [HeldLock(A, READ, 0, 9), HeldLock(A, WRITE, 10, 19), HeldLock(A, READ, 20, 99)],
        )

    def test_bad_range(self) -> None:
        """A range that ends before it starts is InvalidArgument."""
        self.assertRaises(errors.InvalidArgument, self.posix, A, READ, 10, 5)

    def test_waiters_granted_in_order(self) -> None:
        """Waiting requests are granted when the lock is released, first come first served."""
        self.flock(A, WRITE)
        first = self.flock(B, WRITE, wait=True)
        second = self.flock(C, WRITE, wait=True)
        self.assertNoResult(first)
        self.flock(A, UNLOCK)
        self.successResultOf(first)
        self.assertNoResult(second)
        self.flock(B, UNLOCK)
        self.successResultOf(second)

    def test_readers_granted_together(self) -> None:
        """All waiting readers are granted when a writer leaves."""
        self.flock(A, WRITE)
        waiting = [self.flock(B, READ, wait=True), self.flock(C, READ, wait=True)]
        self.flock(A, UNLOCK)
        for deferred in waiting:
            self.successResultOf(deferred)

    def test_downgrade_wakes_readers(self) -> None:
        """Turning a WRITE into a READ lets waiting readers in."""
        self.flock(A, WRITE)
        waiting = self.flock(B, READ, wait=True)
        self.flock(A, READ)
        self.successResultOf(waiting)

    def test_deadlock_detected(self) -> None:
        """Two owners each waiting for the other's range: the second wait is refused."""
        self.posix(A, WRITE, 0, 9)
        self.posix(B, WRITE, 10, 19)
        waiting = self.posix(A, WRITE, 10, 19, wait=True)
        self.assertRaises(errors.Deadlock, self.posix, B, WRITE, 0, 9, True)
        self.assertNoResult(waiting)

    def test_deadlock_through_three(self) -> None:
        """A cycle through three owners is found too."""
        for owner, start in ((A, 0), (B, 10), (C, 20)):
            self.posix(owner, WRITE, start, start + 9)
        self.posix(A, WRITE, 10, 19, wait=True)
        self.posix(B, WRITE, 20, 29, wait=True)
        self.assertRaises(errors.Deadlock, self.posix, C, WRITE, 0, 9, True)

    def test_end_session(self) -> None:
        """A session's end drops its locks, fails its waits and wakes the others."""
        self.flock(A, WRITE)
        self.assertIsNone(self.locks.lock(A, 8, FLOCK, WRITE, 0, 0, False))
        waiting_b = self.flock(B, WRITE, wait=True)
        self.assertEqual(self.locks.end_session(A[0]), {INODE, 8})
        self.successResultOf(waiting_b)
        self.assertEqual(self.locks.held(INODE, FLOCK), [HeldLock(B, WRITE, 0, WHOLE_FILE_END)])

    def test_end_session_fails_waits(self) -> None:
        """A request still waiting when its session ends fails with ConnectionClosed."""
        self.flock(A, WRITE)
        waiting = self.flock(B, WRITE, wait=True)
        self.locks.end_session(B[0])
        self.failureResultOf(waiting, errors.ConnectionClosed)
        self.flock(A, UNLOCK)
        self.assertEqual(self.locks.held(INODE, FLOCK), [])

    def test_release_inode(self) -> None:
        """Closing a session's last handle on a file drops all its locks there, of both kinds."""
        self.flock(A, WRITE)
        self.posix((A[0], 99), READ, 0, 10)
        self.posix(B, READ, 50, 60)
        self.locks.release_inode(A[0], INODE)
        self.assertEqual(self.locks.held(INODE, FLOCK), [])
        self.assertEqual(self.locks.held(INODE, POSIX), [HeldLock(B, READ, 50, 60)])

    def test_test_reports_first_conflict(self) -> None:
        """LockTest names the lock in the way, or nothing."""
        self.posix(A, WRITE, 5, 9)
        self.assertEqual(self.locks.test(B, INODE, POSIX, READ, 0, 100), HeldLock(A, WRITE, 5, 9))
        self.assertIsNone(self.locks.test(A, INODE, POSIX, WRITE, 0, 100))
        self.assertIsNone(self.locks.test(B, INODE, POSIX, READ, 10, 100))

    def test_interest_in_release(self) -> None:
        """Sessions refused a lock are remembered for one LOCK_RELEASED notice."""
        self.flock(A, WRITE)
        self.assertRaises(errors.Locked, self.flock, B, WRITE)
        self.assertEqual(self.locks.interested(INODE), {B[0]})
        self.assertEqual(self.locks.interested(INODE), set())
