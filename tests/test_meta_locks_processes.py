"""
Locks across a real restart: a ``twistd lucid-meta`` process killed with
``kill -9`` and started again, two clients on loopback TLS.  The holder's
lock lives only in the killed process's memory; it must hold it again, by
itself, and the other client must be refused during the grace period and
after it.
"""

from __future__ import annotations

import os
import time
from typing import Any

from twisted.internet import defer

from lucidlink import errors
from lucidlink.protocol.messages import LockKind, LockType
from tests.test_meta_faults import FaultTestCase, sleep

GRACE = 6.0


class RestartTests(FaultTestCase):
    """A lock held when the metadata server is killed."""

    keys = {"lock_grace": str(GRACE)}

    @defer.inlineCallbacks
    def test_holder_keeps_lock_through_kill(self) -> Any:
        """The holder reconnects and reclaims; the other is refused in grace, after it, until the unlock."""
        holder, other = self.writers[0].fs, self.writers[1].fs
        handle = yield holder.inodes.create(holder.root_inode, b"locked", 0o644, os.O_RDWR)
        inode = handle.inode
        yield holder.inodes.lock(inode, 1, LockKind.FLOCK, LockType.WRITE)
        yield holder.inodes.lock(inode, 1, LockKind.POSIX, LockType.WRITE, 0, 99)
        yield self.assertFailure(other.inodes.lock(inode, 2, LockKind.FLOCK, LockType.READ), errors.Locked)

        self.meta.kill()
        yield sleep(0.3)
        yield self.meta.start()
        refused = yield self.assertFailure(
            other.inodes.lock(inode, 2, LockKind.POSIX, LockType.READ, 500, 600), errors.Locked
        )
        self.assertIn("grace period", str(refused))

        restarted = time.monotonic()
        # The holder makes no call: it connects again by itself and reclaims.  A busy machine may take a while.
        yield self.until_reclaimed(other, inode, deadline=restarted + 60)
        yield sleep(max(0.0, restarted + GRACE + 0.5 - time.monotonic()))
        refused = yield self.assertFailure(other.inodes.lock(inode, 2, LockKind.FLOCK, LockType.READ), errors.Locked)
        self.assertIn("write lock", str(refused))
        yield self.assertFailure(
            other.inodes.lock(inode, 2, LockKind.POSIX, LockType.READ, 50, 60), errors.Locked
        )
        yield other.inodes.lock(inode, 2, LockKind.POSIX, LockType.READ, 500, 600)  # a free range is granted

        yield handle.write(0, b"written under the lock")
        yield handle.close()  # the last close hands the locks back
        yield other.inodes.lock(inode, 2, LockKind.FLOCK, LockType.WRITE)
        self.assertEqual(holder.inodes.held_locks.all_held(), [])

    @defer.inlineCallbacks
    def until_reclaimed(self, other: Any, inode: int, deadline: float) -> Any:
        """Wait until ``other`` sees the holder's write lock on ``inode`` again (reclaimed), or fail at ``deadline``."""
        while True:
            state = yield other.inodes.test_lock(inode, 2, LockKind.FLOCK, LockType.READ)
            if state.lock_type == LockType.WRITE:
                return
            if time.monotonic() > deadline:
                raise AssertionError("the holder did not reclaim its lock within 60 s of the restart")
            yield sleep(0.1)
