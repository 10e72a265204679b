"""Inode ids clients reserve and give their own creations (:mod:`lucidlink.meta.inode_blocks`)."""

from __future__ import annotations

from pathlib import Path

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lucidlink import errors
from lucidlink.meta import mutations as m
from lucidlink.meta.inode_blocks import InodeBlocks
from lucidlink.meta.service import MetadataResponder
from lucidlink.meta.store import MAX_INODE_BLOCK, ROOT_INODE, MetadataStore
from lucidlink.protocol.messages import ClientId, Create, InodeBlock, MkDir, ReserveInodes, Symlink
from tests.meta_helpers import initialise_record
from tests.test_meta_replay import Workload
from tests.test_meta_service import FILESPACE, O_WRONLY, InitialisedTestCase, Peer, _FailingCommit

CLIENT = b"client-of-wendy!"


class ReservedInodeServiceTests(InitialisedTestCase):
    """A named writer reserves ids and gives them to what it creates; nobody else can."""

    def setUp(self) -> None:
        super().setUp()
        self.wendy = self.named("wendy", CLIENT)

    def named(self, user: str, client: bytes) -> Peer:
        peer = self.logged_in(user)
        peer.answer(ClientId(client))
        return peer

    def test_own_ids_for_files_folders_and_links(self) -> None:
        """Creations take the ids given; the server's own ids go past the block."""
        block = self.wendy.answer(ReserveInodes(3))
        self.assertIsInstance(block, InodeBlock)
        first = block.first
        made = [
            self.wendy.answer(Create(ROOT_INODE, b"f", 0o644, 0, 0, True, O_WRONLY, first)).attributes.inode,
            self.wendy.answer(MkDir(ROOT_INODE, b"d", 0o755, 0, 0, first + 1)).attributes.inode,
            self.wendy.answer(Symlink(ROOT_INODE, b"s", b"target", 0, 0, first + 2)).attributes.inode,
        ]
        self.assertEqual(made, [first, first + 1, first + 2])
        plain = self.logged_in("wendy").answer(MkDir(ROOT_INODE, b"server's", 0o755, 0, 0)).attributes.inode
        self.assertGreaterEqual(plain, first + 3)

    def test_each_id_once_and_only_its_clients(self) -> None:
        """An id used, outside the block, or of another client is refused, and nothing is made."""
        first = self.wendy.answer(ReserveInodes(2)).first
        self.wendy.answer(MkDir(ROOT_INODE, b"a", 0o755, 0, 0, first))
        self.wendy.refused(MkDir(ROOT_INODE, b"b", 0o755, 0, 0, first), errors.InvalidArgument)
        self.wendy.refused(MkDir(ROOT_INODE, b"b", 0o755, 0, 0, first + 2), errors.InvalidArgument)
        other = self.named("wendy", b"another-client!!")
        other.refused(MkDir(ROOT_INODE, b"b", 0o755, 0, 0, first + 1), errors.InvalidArgument)
        unnamed = self.logged_in("wendy")
        unnamed.refused(MkDir(ROOT_INODE, b"b", 0o755, 0, 0, first + 1), errors.InvalidArgument)
        unnamed.refused(ReserveInodes(2), errors.InvalidArgument)
        self.wendy.refused(ReserveInodes(0), errors.InvalidArgument)
        self.wendy.refused(ReserveInodes(MAX_INODE_BLOCK + 1), errors.InvalidArgument)
        self.logged_in("rita").refused(ReserveInodes(2), errors.AccessDenied)
        self.assertEqual(self.wendy.answer(MkDir(ROOT_INODE, b"b", 0o755, 0, 0, first + 1)).attributes.inode,
                         first + 1)

    def test_a_refused_creation_keeps_its_id(self) -> None:
        """A creation the store refuses (the name is taken) does not use the id; nor does opening an existing file."""
        first = self.wendy.answer(ReserveInodes(1)).first
        self.wendy.answer(MkDir(ROOT_INODE, b"taken", 0o755, 0, 0))
        self.wendy.refused(MkDir(ROOT_INODE, b"taken", 0o755, 0, 0, first), errors.AlreadyExists)
        existing = self.wendy.answer(Create(ROOT_INODE, b"f", 0o644, 0, 0, True, O_WRONLY)).attributes.inode
        opened = self.wendy.answer(Create(ROOT_INODE, b"f", 0o644, 0, 0, False, O_WRONLY, first))
        self.assertEqual(opened.attributes.inode, existing)
        self.assertEqual(self.wendy.answer(MkDir(ROOT_INODE, b"new", 0o755, 0, 0, first)).attributes.inode, first)

    def test_a_rolled_back_creation_gives_its_id_back(self) -> None:
        """A commit that fails undoes the creation: the id, even a block's last, is the client's again."""
        first = self.wendy.answer(ReserveInodes(1)).first
        real = self.store._db
        self.store._db = _FailingCommit(real)  # type: ignore[assignment]
        try:
            self.wendy.refused(MkDir(ROOT_INODE, b"a", 0o755, 0, 0, first), errors.NoSpace)
        finally:
            self.store._db = real
        self.assertEqual(self.wendy.answer(MkDir(ROOT_INODE, b"a", 0o755, 0, 0, first)).attributes.inode, first)

    def test_a_restarted_server_knows_the_blocks(self) -> None:
        """After a restart the client's unused ids are still its own; those used already are refused."""
        first = self.wendy.answer(ReserveInodes(4)).first
        self.wendy.answer(MkDir(ROOT_INODE, b"a", 0o755, 0, 0, first))
        self.responder = MetadataResponder(self.store, self.clock, FILESPACE)
        again = self.named("wendy", CLIENT)
        again.refused(MkDir(ROOT_INODE, b"b", 0o755, 0, 0, first), errors.InvalidArgument)
        self.assertEqual(again.answer(MkDir(ROOT_INODE, b"b", 0o755, 0, 0, first + 1)).attributes.inode, first + 1)
        self.named("wendy", b"another client!!").refused(MkDir(ROOT_INODE, b"c", 0o755, 0, 0, first + 2),
                                                         errors.InvalidArgument)
        self.assertGreaterEqual(again.answer(MkDir(ROOT_INODE, b"c", 0o755, 0, 0)).attributes.inode, first + 4)

    def test_a_create_sent_again_after_a_restart_opens_what_it_made(self) -> None:
        """The server keeps no answers across a restart: a create of its own id that made the entry opens it."""
        first = self.wendy.answer(ReserveInodes(4)).first
        made = self.wendy.answer(Create(ROOT_INODE, b"f", 0o644, 0, 0, True, O_WRONLY, first))
        self.responder = MetadataResponder(self.store, self.clock, FILESPACE)
        again = self.named("wendy", CLIENT)
        opened = again.answer(Create(ROOT_INODE, b"f", 0o644, 0, 0, True, O_WRONLY, first))
        self.assertEqual(opened.attributes, made.attributes)
        again.refused(Create(ROOT_INODE, b"g", 0o644, 0, 0, True, O_WRONLY, first), errors.InvalidArgument)

    def test_blocks_on_record_are_bounded(self) -> None:
        """The store keeps the newest blocks, for a day."""
        for _ in range(3):
            self.wendy.answer(ReserveInodes(2))
        self.assertEqual(len(self.store.inode_blocks()), 3)
        self.clock.advance(25 * 3600)
        last = self.wendy.answer(ReserveInodes(2)).first
        self.assertEqual(self.store.inode_blocks(), [(CLIENT, last, 2)])


class ReplayTests(SynchronousTestCase):
    def test_a_reservation_replays(self) -> None:
        """Replayed, a reservation moves the replica's next id as it moved the original's."""
        folder = Path(self.mktemp())
        folder.mkdir()
        workload = Workload(folder, Clock())
        self.addCleanup(lambda: workload.store.close())
        replica = MetadataStore(folder / "replica.sqlite3", Clock())
        self.addCleanup(replica.close)
        store = workload.store
        store.apply(initialise_record())
        first = store.apply(m.ReserveInodes(10, client=CLIENT)).value
        store.apply(m.CreateFile(ROOT_INODE, b"f", 0o644, 0, 0, True, first + 3))
        for data in workload.records:
            replica.apply(m.decode(data))
        self.assertEqual(replica.dump(), store.dump())
        self.assertEqual(replica.inode_blocks(), [(CLIENT, first, 10)])
        next_here = store.apply(m.MakeDirectory(ROOT_INODE, b"d", 0o755, 0, 0)).value.inode
        next_there = replica.apply(m.MakeDirectory(ROOT_INODE, b"d", 0o755, 0, 0)).value.inode
        self.assertEqual((next_here, next_there), (first + 10, first + 10))


class InodeBlocksTests(SynchronousTestCase):
    def test_blocks(self) -> None:
        blocks = InodeBlocks(Clock())
        blocks.add(CLIENT, 100, 2)
        block = blocks.take(CLIENT, 100)
        self.assertRaises(errors.InvalidArgument, blocks.take, CLIENT, 100)
        blocks.give_back(CLIENT, 100, block)
        blocks.take(CLIENT, 100)
        blocks.take(CLIENT, 101)
        self.assertEqual(blocks._blocks[CLIENT], {}, "a block all used is forgotten")
        blocks.add(CLIENT, 200, 5)
        blocks.remove(CLIENT, 200, 5)
        self.assertRaises(errors.InvalidArgument, blocks.check, CLIENT, 200)
        self.assertRaises(errors.InvalidArgument, blocks.check, None, 200)

    def test_owned_ids_and_blocks_of_unknown_uses(self) -> None:
        blocks = InodeBlocks(Clock())
        blocks.add(CLIENT, 100, 2)
        blocks.add(CLIENT, 200, 2, uses_known=False)  # on record from before this server started
        self.assertEqual([blocks.owns(CLIENT, inode) for inode in (100, 102, 200)], [True, False, True])
        self.assertFalse(blocks.owns(b"another", 100))
        self.assertEqual([blocks.uses_known(CLIENT, inode) for inode in (100, 200, 300)], [True, False, True])
        blocks.take(CLIENT, 100)
        self.assertFalse(blocks.owns(CLIENT, 100))
        blocks.take(CLIENT, 200)
        blocks.take(CLIENT, 201)
        self.assertEqual(blocks._uses_unknown, set(), "forgotten with its block")

    def test_a_client_holds_few_blocks_and_loses_them_when_idle(self) -> None:
        """A fifth block makes a client forget its oldest; an hour without use forgets them all."""
        clock = Clock()
        blocks = InodeBlocks(clock, max_blocks=4, idle_seconds=3600)
        for first in range(100, 600, 100):
            blocks.add(CLIENT, first, 10)
        self.assertRaises(errors.InvalidArgument, blocks.check, CLIENT, 100)
        blocks.check(CLIENT, 500)
        blocks.add(b"another-client!!", 1000, 10)
        clock.advance(1800)
        blocks.take(CLIENT, 500)
        clock.advance(1800)
        blocks.add(b"a-third-client!!", 2000, 10)  # sweeps
        self.assertRaises(errors.InvalidArgument, blocks.check, b"another-client!!", 1000)
        blocks.check(CLIENT, 501)
        self.assertEqual(len(blocks), 5)
