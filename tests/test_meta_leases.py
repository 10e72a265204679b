"""Directory leases on the metadata server (:mod:`lucidlink.meta.leases`): granted, recalled, returned, ended."""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lucidlink import errors
from lucidlink.meta.leases import LEASE_SECONDS, READS_REMEMBERED, DirectoryLeases
from lucidlink.meta.store import ROOT_INODE
from lucidlink.protocol.messages import (
    ClientId,
    Create,
    GetAttr,
    GetXattr,
    Lease,
    LeaseDirectory,
    LeaseRecall,
    LeaseReturned,
    Link,
    ListXattr,
    Lookup,
    MkDir,
    Open,
    ReadDir,
    RemoveXattr,
    Rename,
    RmDir,
    SetAttr,
    SetAttrField,
    SetXattr,
    Symlink,
    Unlink,
    XattrFlags,
)
from tests.test_meta_service import O_RDONLY, O_WRONLY, InitialisedTestCase, Peer


class LeaseServiceTests(InitialisedTestCase):
    """Two writers' sessions: wendy leases the folders she makes; the other meets her leases."""

    def setUp(self) -> None:
        super().setUp()
        self.wendy = self.logged_in("wendy")
        self.other = self.logged_in("wendy", host="192.0.2.7")
        self.folders = 0

    def leased_folder(self) -> int:
        """A folder wendy made and holds a lease on (the other session never saw it)."""
        self.folders += 1
        inode = self.wendy.answer(MkDir(ROOT_INODE, b"d%d" % self.folders, 0o755, 0, 0)).attributes.inode
        lease = self.wendy.answer(LeaseDirectory(inode))
        self.assertEqual(lease, Lease(inode, int(LEASE_SECONDS * 1000)))
        return inode

    def recalls(self, peer: Peer) -> list[int]:
        return [note.inode for note in peer.notes() if isinstance(note, LeaseRecall)]

    def test_recalled_then_returned(self) -> None:
        """Another session is told Busy while the holder is asked back once; after the return it is served."""
        folder = self.leased_folder()
        self.wendy.notes()
        busy = self.other.refused(ReadDir(folder, b"", 100), errors.Busy)
        self.assertLess(busy.retry_after_ms, 1000)
        self.other.refused(Lookup(folder, b"x"), errors.Busy)
        self.assertEqual(self.recalls(self.wendy), [folder])
        made = self.wendy.answer(Create(folder, b"x", 0o644, 0, 0, True, O_WRONLY))
        self.wendy.answer(LeaseReturned(folder))
        self.assertEqual(self.other.answer(Lookup(folder, b"x")).attributes, made.attributes)

    def test_the_holders_time_is_kept(self) -> None:
        """Creates and unlinks carry the time their holder answered with; it is kept only under the lease."""
        folder = self.leased_folder()
        made = self.wendy.answer(Create(folder, b"x", 0o644, 0, 0, True, O_WRONLY, 0, 1_234_567_890))
        self.assertEqual((made.attributes.mtime_ns, made.attributes.ctime_ns), (1_234_567_890, 1_234_567_890))
        self.assertEqual(self.store.getattr(folder).mtime_ns, 1_234_567_890)
        self.wendy.answer(Unlink(folder, b"x", 1_234_567_999))
        self.assertEqual(self.store.getattr(folder).ctime_ns, 1_234_567_999)
        unleased = self.wendy.answer(Create(ROOT_INODE, b"y", 0o644, 0, 0, True, O_WRONLY, 0, 1_234_567_890))
        self.assertNotEqual(unleased.attributes.ctime_ns, 1_234_567_890)
        self.wendy.answer(LeaseReturned(folder))
        self.wendy.answer(Create(folder, b"z", 0o644, 0, 0, True, O_WRONLY))
        self.wendy.answer(Unlink(folder, b"z", 1_234_567_999))
        self.assertNotEqual(self.store.getattr(folder).ctime_ns, 1_234_567_999)

    def test_every_request_that_reads_or_changes_it(self) -> None:
        """Each request that reads or changes a leased folder's entries or attributes recalls the lease."""
        file = self.wendy.answer(Create(ROOT_INODE, b"file", 0o644, 0, 0, True, O_WRONLY)).attributes.inode
        asks: list[Any] = [
            lambda d: Lookup(d, b"x"), lambda d: ReadDir(d, b"", 10), lambda d: MkDir(d, b"m", 0o755, 0, 0),
            lambda d: Create(d, b"c", 0o644, 0, 0, True, O_WRONLY), lambda d: Symlink(d, b"s", b"t", 0, 0),
            lambda d: Link(file, d, b"l"), lambda d: Unlink(d, b"x"), lambda d: RmDir(d, b"x"),
            lambda d: Rename(d, b"x", ROOT_INODE, b"y", 0), lambda d: Rename(ROOT_INODE, b"file", d, b"y", 0),
            lambda d: GetAttr(d), lambda d: SetAttr(d, SetAttrField.MODE, 0o700, 0, 0, 0, 0, 0),
            lambda d: Open(d, O_RDONLY), lambda d: GetXattr(d, b"user.a"), lambda d: ListXattr(d),
            lambda d: SetXattr(d, b"user.a", b"v", XattrFlags(0)), lambda d: RemoveXattr(d, b"user.a"),
            lambda d: Lookup(ROOT_INODE, b"d%d" % self.folders),  # shows the folder's attributes
            lambda d: ReadDir(ROOT_INODE, b"", 100),  # so does the listing of its parent
            lambda d: RmDir(ROOT_INODE, b"d%d" % self.folders),
            lambda d: Rename(ROOT_INODE, b"file", ROOT_INODE, b"d%d" % self.folders, 0),
        ]
        for ask in asks:
            folder = self.leased_folder()
            self.wendy.notes()
            message = ask(folder)
            self.other.refused(message, errors.Busy)
            self.assertEqual(self.recalls(self.wendy), [folder], message)
            self.wendy.answer(LeaseReturned(folder))

    def test_not_granted_where_another_session_looked_lately(self) -> None:
        """A folder another session listed within the remembered time (what it may have cached) is not leased."""
        folder = self.wendy.answer(MkDir(ROOT_INODE, b"shared", 0o755, 0, 0)).attributes.inode
        self.other.answer(ReadDir(folder, b"", 10))
        self.wendy.refused(LeaseDirectory(folder), errors.Busy)
        self.clock.advance(READS_REMEMBERED + 2)
        self.wendy.answer(LeaseDirectory(folder))
        self.other.refused(LeaseDirectory(folder), errors.Busy)

    def test_the_holder_is_never_kept_waiting(self) -> None:
        folder = self.leased_folder()
        self.wendy.answer(Create(folder, b"mine", 0o644, 0, 0, True, O_WRONLY))
        self.wendy.answer(ReadDir(folder, b"", 10))
        self.wendy.answer(GetAttr(folder))
        self.assertEqual(self.recalls(self.wendy), [])

    def test_ends_by_itself_and_with_its_session(self) -> None:
        """Not renewed, a lease ends after its time; renewed, it lasts; its holder's session ending ends it."""
        folder = self.leased_folder()
        self.clock.advance(LEASE_SECONDS / 2)
        self.wendy.answer(LeaseDirectory(folder))  # renewed
        self.clock.advance(LEASE_SECONDS * 0.75)
        self.other.refused(GetAttr(folder), errors.Busy)
        self.wendy.answer(LeaseReturned(folder))
        self.clock.advance(READS_REMEMBERED + 2)
        self.wendy.answer(LeaseDirectory(folder))
        self.clock.advance(LEASE_SECONDS + 1)
        self.other.answer(GetAttr(folder))
        another = self.leased_folder()
        self.wendy.disconnect()
        self.other.answer(GetAttr(another))
        self.assertEqual(len(self.responder.leases), 0)

    def test_two_holders_renaming_into_each_others_folders(self) -> None:
        """Nothing is held back: each is told Busy, each holder is asked back, and both renames then go through."""
        mine = self.leased_folder()
        self.wendy.answer(MkDir(mine, b"a", 0o755, 0, 0))
        theirs = self.other.answer(MkDir(ROOT_INODE, b"theirs", 0o755, 0, 0)).attributes.inode
        self.other.answer(MkDir(theirs, b"b", 0o755, 0, 0))
        self.other.answer(LeaseDirectory(theirs))
        self.wendy.notes(), self.other.notes()
        self.wendy.refused(Rename(mine, b"a", theirs, b"a", 0), errors.Busy)
        self.other.refused(Rename(theirs, b"b", mine, b"b", 0), errors.Busy)
        self.assertEqual((self.recalls(self.wendy), self.recalls(self.other)), ([mine], [theirs]))
        self.wendy.answer(LeaseReturned(mine))
        self.other.answer(LeaseReturned(theirs))
        self.wendy.answer(Rename(mine, b"a", theirs, b"a", 0))
        self.other.answer(Rename(theirs, b"b", mine, b"b", 0))
        self.assertEqual([entry.name for entry in self.wendy.answer(ReadDir(mine, b"", 10)).entries], [b"b"])

    def test_a_recalled_lease_is_not_renewed(self) -> None:
        folder = self.leased_folder()
        self.other.refused(GetAttr(folder), errors.Busy)
        self.wendy.refused(LeaseDirectory(folder), errors.Busy)

    def test_only_folders_and_only_writers(self) -> None:
        file = self.wendy.answer(Create(ROOT_INODE, b"f", 0o644, 0, 0, True, O_WRONLY)).attributes.inode
        self.wendy.refused(LeaseDirectory(file), errors.NotADirectory)
        self.wendy.refused(LeaseDirectory(424242), errors.NotFound)
        rita = self.logged_in("rita")
        rita.refused(LeaseDirectory(ROOT_INODE), errors.AccessDenied)


class HeldBackTests(InitialisedTestCase):
    """A named client's changes sent one behind the other: one refused Busy holds back the ones sent after it."""

    leased_folder = LeaseServiceTests.leased_folder

    def setUp(self) -> None:
        super().setUp()
        self.wendy = self.logged_in("wendy")
        self.other = self.logged_in("wendy", host="192.0.2.7")
        self.other.answer(ClientId(b"the-other-client"))
        self.folders = 0

    def send(self, message: Any, request_id: int) -> Any:
        """``message`` from the other session, handed to the responder as its connection would."""
        self.other.server.request_id = request_id
        return self.responder.respond(self.other.server, message)

    def test_changes_behind_a_refused_one_wait_for_it(self) -> None:
        """Moved out of a leased folder, then removed: the removal waits for the move, and both are made in order."""
        folder = self.leased_folder()
        self.wendy.answer(Create(folder, b"a", 0o644, 0, 0, True, O_WRONLY))
        move, remove = Rename(folder, b"a", ROOT_INODE, b"a", 0), Unlink(ROOT_INODE, b"a")
        self.assertRaises(errors.Busy, self.send, move, 2**31 + 1)
        self.assertRaises(errors.Busy, self.send, remove, 2**31 + 2)
        self.assertRaises(errors.Busy, self.send, remove, 2**31 + 2)  # sent again before the refused one
        self.wendy.answer(LeaseReturned(folder))
        moved, removed = self.send(move, 2**31 + 1), self.send(remove, 2**31 + 2)
        self.clock.advance(0)
        self.successResultOf(moved), self.successResultOf(removed)
        self.assertRaises(errors.NotFound, self.store.lookup, ROOT_INODE, b"a")

    def test_a_lease_is_not_given_back_before_a_change_refused_ahead_of_it(self) -> None:
        """
        A change in the other's own leased folder, held back behind a refused one, then that lease's return:
        the return waits too, so that nobody sees the folder before the change is made.
        """
        theirs = self.other.answer(MkDir(ROOT_INODE, b"theirs", 0o755, 0, 0)).attributes.inode
        self.other.answer(LeaseDirectory(theirs))
        folder = self.leased_folder()
        self.assertRaises(errors.Busy, self.send, MkDir(folder, b"m", 0o755, 0, 0), 2**31 + 1)
        self.assertRaises(errors.Busy, self.send, Create(theirs, b"c", 0o644, 0, 0, True, O_WRONLY), 2**31 + 2)
        self.assertRaises(errors.Busy, self.send, LeaseReturned(theirs), 2**31 + 3)
        self.assertIsNotNone(self.responder.leases.held(theirs), "still held: the create is not made yet")
        self.wendy.answer(LeaseReturned(folder))
        for message, request_id in ((MkDir(folder, b"m", 0o755, 0, 0), 2**31 + 1),
                                    (Create(theirs, b"c", 0o644, 0, 0, True, O_WRONLY), 2**31 + 2),
                                    (LeaseReturned(theirs), 2**31 + 3)):
            answer = self.send(message, request_id)
            self.clock.advance(0)
            self.successResultOf(defer.maybeDeferred(lambda answer=answer: answer))
        self.assertIsNone(self.responder.leases.held(theirs))

    def test_held_back_for_a_lease_at_most(self) -> None:
        """A refused change never sent again holds nothing back once a lease would have ended."""
        folder = self.leased_folder()
        self.assertRaises(errors.Busy, self.send, MkDir(folder, b"m", 0o755, 0, 0), 2**31 + 1)
        self.assertRaises(errors.Busy, self.send, MkDir(ROOT_INODE, b"n", 0o755, 0, 0), 2**31 + 2)
        self.clock.advance(LEASE_SECONDS)
        made = self.send(MkDir(ROOT_INODE, b"n", 0o755, 0, 0), 2**31 + 2)
        self.clock.advance(0)
        self.successResultOf(made)

    def test_reads_and_unnamed_sessions_are_not_held_back(self) -> None:
        folder = self.leased_folder()
        self.assertRaises(errors.Busy, self.send, MkDir(folder, b"m", 0o755, 0, 0), 2**31 + 1)
        self.other.answer(GetAttr(ROOT_INODE))
        plain = self.logged_in("wendy", host="192.0.2.9")
        plain.refused(MkDir(folder, b"m", 0o755, 0, 0), errors.Busy)
        plain.answer(MkDir(ROOT_INODE, b"n", 0o755, 0, 0))


class DirectoryLeasesTests(SynchronousTestCase):
    """The lease table alone."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.leases = DirectoryLeases(self.clock, lease_seconds=10, reads_remembered=30)
        self.recalled: list[int] = []

    def test_reads_are_forgotten(self) -> None:
        """A session's reads stop standing in others' way after the remembered time; they are swept."""
        self.leases.touch(1, [5], lambda lease: self.recalled.append(lease.directory))
        self.assertRaises(errors.Busy, self.leases.grant, 2, 5)
        self.clock.advance(31)
        self.leases.touch(1, [6], lambda lease: None)  # sweeps
        self.assertEqual(self.leases.grant(2, 5).holder, 2)
        self.assertNotIn(5, self.leases._touched)

    def test_returned_only_by_its_holder(self) -> None:
        self.leases.grant(1, 5)
        self.assertFalse(self.leases.returned(2, 5))
        self.assertTrue(self.leases.returned(1, 5))
        self.assertFalse(self.leases.returned(1, 5))

    def test_end_session(self) -> None:
        self.leases.grant(1, 5)
        self.leases.grant(1, 6)
        self.leases.touch(1, [7], lambda lease: None)
        self.assertEqual(sorted(self.leases.end_session(1)), [5, 6])
        self.assertEqual(self.leases.grant(2, 7).holder, 2)

    def test_a_session_kept_waiting_by_a_lease_keeps_it_from_being_granted_again(self) -> None:
        """Given back after a recall, the lease is not granted again before the session that waited gets in."""
        self.leases.grant(1, 5)
        self.assertRaises(errors.Busy, self.leases.touch, 2, [5], lambda lease: self.recalled.append(lease.directory))
        self.assertEqual(self.recalled, [5])
        self.assertTrue(self.leases.returned(1, 5))
        self.assertRaises(errors.Busy, self.leases.grant, 1, 5)
