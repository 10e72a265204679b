"""
What the client knows of the tree between questions to the metadata server
(:mod:`lucidlink.client.metadata_cache`): alone, then inside the core against
a real server on loopback, where it saves round trips and must still see
every change another session makes, and forget everything when the
connection goes.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import stat
from collections.abc import Callable, Generator
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer, reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lucidlink import crypto, errors
from lucidlink.client.filespace import Filespace
from lucidlink.client.metadata_cache import ABSENT, ABSENT_XATTR, MetadataCache
from lucidlink.client.session import open_session
from lucidlink.protocol import messages as w
from lucidlink.protocol.messages import Attributes, FileKind
from tests.client_helpers import (
    ADMIN,
    ADMIN_PASSPHRASE,
    FILESPACE,
    ClientTestCase,
    InMemoryConnection,
    MemoryFilespaceCase,
    deferLater,
    fast_backoff,
    memory_resolver,
    synchronous,
)

ROOT = 1


def attributes(inode: int, kind: FileKind = FileKind.FILE, mode: int = 0o644, nlink: int = 1,
               time_ns: int = 1_000) -> Attributes:
    bits = stat.S_IFDIR if kind == FileKind.DIRECTORY else stat.S_IFREG
    return Attributes(inode, kind, bits | mode, nlink, 0, 0, 0, time_ns, time_ns, time_ns, 1)


class MetadataCacheTests(SynchronousTestCase):
    """The cache alone, on a fake clock."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.cache = MetadataCache(clock=self.clock.seconds, ttl=30.0, capacity=4)

    def test_learned_answers_are_served(self) -> None:
        """A looked-up entry, its attributes and a missing name are answered until they expire."""
        cache = self.cache
        self.assertIsNone(cache.lookup(ROOT, b"f"))
        cache.learn_entry(ROOT, b"f", attributes(5), cache.mark())
        cache.learn_absent(ROOT, b"gone", cache.mark())
        self.assertEqual(cache.lookup(ROOT, b"f"), attributes(5))
        self.assertEqual(cache.attributes(5), attributes(5))
        self.assertEqual(cache.lookup(ROOT, b"gone"), ABSENT)
        self.assertIsNone(cache.lookup(ROOT, b"other"), "not known: the directory was not read whole")
        self.clock.advance(30)
        self.assertIsNone(cache.lookup(ROOT, b"f"))
        self.assertIsNone(cache.attributes(5))
        self.assertIsNone(cache.lookup(ROOT, b"gone"))

    def test_xattr_answers_expire(self) -> None:
        """A kept ``getxattr`` answer is served until it expires, as everything learned: notifications may be lost unseen."""
        cache = self.cache
        cache.learn_xattr(5, b"user.colour", b"blue", cache.mark())
        cache.learn_xattr(5, b"security.capability", None, cache.mark())
        self.assertEqual(cache.xattr(5, b"user.colour"), b"blue")
        self.assertIs(cache.xattr(5, b"security.capability"), ABSENT_XATTR)
        self.assertIsNone(cache.xattr(5, b"user.other"))
        self.clock.advance(30)
        self.assertIsNone(cache.xattr(5, b"user.colour"))
        self.assertIsNone(cache.xattr(5, b"security.capability"))

    def test_whole_directory(self) -> None:
        """A directory read whole (or made here) answers every name it lacks as absent, until an entry changes."""
        cache = self.cache
        cache.learn_listing(7, [(b"a", attributes(8))], cache.mark())
        self.assertEqual(cache.lookup(7, b"a"), attributes(8))
        self.assertEqual(cache.lookup(7, b"b"), ABSENT)
        cache.entry_changed(7, b"b", 9)
        self.assertIsNone(cache.lookup(7, b"b"))
        self.assertEqual(cache.lookup(7, b"a"), attributes(8), "the other entries stay")

        cache.added(ROOT, b"new", attributes(10, FileKind.DIRECTORY, nlink=2), cache.mark(), created=True)
        self.assertEqual(cache.lookup(10, b"anything"), ABSENT)
        self.assertEqual(cache.listing(10), [])
        cache.added(10, b"f", attributes(11), cache.mark(), created=True)
        cache.learn_absent(10, b"g", cache.mark())
        self.assertEqual(cache.listing(10), [(b"f", attributes(11))])
        cache.inode_changed(11)
        self.assertIsNone(cache.listing(10), "an entry's attributes are not known")
        self.assertIsNone(cache.listing(ROOT), "not known whole")

    def test_answer_crossing_a_notification_is_not_learned(self) -> None:
        """The server may tell of a change before answering with the state before it: such an answer is dropped."""
        cache = self.cache
        cache.learn(attributes(5), cache.mark())
        since = cache.mark()
        cache.inode_changed(99)  # any notification while the requests were on their way
        cache.learn(attributes(5, mode=0o600), since)
        cache.learn_entry(ROOT, b"f", attributes(6), since)
        cache.learn_absent(ROOT, b"g", since)
        cache.learn_listing(7, [], since)
        cache.learn_xattr_names(6, [], since)
        self.assertIsNone(cache.attributes(5), "the older answer is forgotten too")
        self.assertIsNone(cache.lookup(ROOT, b"f"))
        self.assertIsNone(cache.lookup(ROOT, b"g"))
        self.assertIsNone(cache.lookup(7, b"x"))
        self.assertIsNone(cache.xattr_names(6))

    def test_notifications_drop_what_they_name(self) -> None:
        """A changed inode loses its attributes and xattr names; a changed entry its name, directory and inode."""
        cache = self.cache
        cache.learn_listing(7, [(b"a", attributes(8)), (b"b", attributes(9))], cache.mark())
        cache.learn(attributes(7, FileKind.DIRECTORY), cache.mark())
        cache.learn_xattr_names(8, [b"user.x"], cache.mark())
        cache.inode_changed(8)
        self.assertIsNone(cache.attributes(8))
        self.assertIsNone(cache.xattr_names(8))
        self.assertEqual(cache.attributes(9), attributes(9))
        cache.entry_changed(7, b"b", 9)
        self.assertIsNone(cache.attributes(9))
        self.assertIsNone(cache.attributes(7))
        self.assertIsNone(cache.lookup(7, b"b"))
        cache.learn(attributes(9), cache.mark())
        cache.directory_changed(7)
        self.assertIsNone(cache.entry(7, b"a"))
        self.assertEqual(cache.attributes(9), attributes(9))
        cache.clear()
        self.assertIsNone(cache.attributes(9))
        cache.learn(attributes(9, nlink=0), cache.mark())
        self.assertIsNone(cache.attributes(9), "a file with no links goes when its last handle does, untold")

    def test_own_changes(self) -> None:
        """What this client makes and removes is known at once; its directory's times follow a new inode's."""
        cache = self.cache
        cache.learn(attributes(ROOT, FileKind.DIRECTORY, nlink=2, time_ns=1), cache.mark())
        cache.added(ROOT, b"d", attributes(5, FileKind.DIRECTORY, nlink=2, time_ns=50), cache.mark(), created=True)
        self.assertEqual(cache.attributes(ROOT), dataclasses.replace(
            attributes(ROOT, FileKind.DIRECTORY, nlink=3, time_ns=50), atime_ns=1
        ))
        self.assertEqual(cache.xattr_names(5), frozenset())
        cache.added(ROOT, b"link", attributes(6, time_ns=2), cache.mark(), created=False)
        self.assertIsNone(cache.attributes(ROOT), "a link's times are not the directory's")
        self.assertEqual(cache.lookup(ROOT, b"link"), attributes(6, time_ns=2))
        self.assertIsNone(cache.xattr_names(6))

        cache.removed(ROOT, b"link", cache.mark())
        self.assertEqual(cache.lookup(ROOT, b"link"), ABSENT)
        self.assertIsNone(cache.attributes(6))
        self.assertEqual(cache.attributes(5), attributes(5, FileKind.DIRECTORY, nlink=2, time_ns=50))
        cache.removed(ROOT, b"unknown", cache.mark())
        self.assertIsNone(cache.attributes(5), "some inode not known here lost a link")

        cache.learn_entry(ROOT, b"a", attributes(7), cache.mark())
        cache.learn_entry(5, b"b", attributes(8), cache.mark())
        cache.renamed(ROOT, b"a", 5, b"b")
        self.assertIsNone(cache.lookup(ROOT, b"a"))
        self.assertIsNone(cache.lookup(5, b"b"))
        self.assertIsNone(cache.attributes(7))
        self.assertIsNone(cache.attributes(8))

    def test_read_across_a_listing_learned_meanwhile(self) -> None:
        """
        A lookup in another thread, crossing a listing being learned, does not take a name for absent.

        It must not join the directory's entries as they were (without the
        name) to the wholeness the listing brings.
        """
        cache = self.cache
        cache.learn_entry(7, b"a", attributes(8), cache.mark())
        listed: list[bool] = []

        def clock_while_the_listing_is_learned() -> float:
            if not listed:
                listed.append(True)
                cache.learn_listing(7, [(b"a", attributes(8)), (b"b", attributes(9))], cache.mark())
            return self.clock.seconds()

        cache.clock = clock_while_the_listing_is_learned
        self.assertIn(cache.entry(7, b"b"), (None, 9))
        self.assertEqual(listed, [True], "the listing came between the reads")
        self.assertEqual(cache.entry(7, b"b"), 9)

    def test_own_removal_or_rename_of_what_is_not_known(self) -> None:
        """
        A rename to a name known absent forgets only the inodes it names; one of a name
        not known, or a removal of one, forgets all that is kept of any inode (it may be gone).
        """
        cache = MetadataCache(clock=self.clock.seconds, ttl=30.0, capacity=100)
        cache.learn_listing(7, [(b"a", attributes(8)), (b"b", attributes(9))], cache.mark())
        cache.learn(attributes(20), cache.mark())
        cache.learn_xattr_names(20, [], cache.mark())
        cache.renamed(7, b"a", 7, b"c")  # c: known absent, in the same directory
        self.assertIsNone(cache.attributes(8))
        self.assertEqual(cache.attributes(20), attributes(20), "not named by the rename")
        self.assertEqual(cache.xattr_names(20), frozenset())
        cache.learn_listing(21, [], cache.mark())
        cache.removed(ROOT, b"unknown", cache.mark())
        self.assertIsNone(cache.attributes(20))
        self.assertIsNone(cache.xattr_names(20))
        self.assertIsNone(cache.listing(21), "it may have been that directory")
        self.assertEqual(cache.lookup(ROOT, b"unknown"), ABSENT)

    def test_bounded(self) -> None:
        """Past its capacity the oldest learned are forgotten."""
        cache = self.cache
        for inode in range(10, 20):
            cache.learn_entry(inode, b"f", attributes(inode + 100), cache.mark())
        self.assertIsNone(cache.attributes(110))
        self.assertEqual(cache.attributes(119), attributes(119))
        self.assertIsNone(cache.entry(10, b"f"))
        self.assertEqual(cache.entry(19, b"f"), 119)


class InodesCacheTests(ClientTestCase):
    """The core against a real server: hits cost no request; changes elsewhere and lost connections are seen."""

    def count_requests(self, fs: Filespace) -> list[Any]:
        """Every request ``fs``'s core sends through ``call`` from now on."""
        sent: list[Any] = []
        session = fs.inodes.session
        call = session.call

        def counting(message: Any, timeout: float | None = None) -> Deferred[Any]:
            sent.append(message() if callable(message) else message)
            return call(message, timeout)

        session.call = counting  # type: ignore[method-assign]
        return sent

    @defer.inlineCallbacks
    def until(self, check: Callable[[], Deferred[Any]]) -> Generator[Deferred[Any], Any, Any]:
        """``check()``'s result once it stops failing (with an assertion or a LucidError)."""
        for _ in range(300):
            try:
                result = yield check()
                return result
            except (AssertionError, errors.LucidError):
                yield deferLater(0.01)
        result = yield check()
        return result

    @defer.inlineCallbacks
    def test_hits_need_no_request(self) -> Generator[Deferred[Any], Any, None]:
        """What this client made or read is answered without asking, and matches what the server says."""
        fs = yield self.filespace()
        inodes = fs.inodes
        root = yield inodes.getattr(ROOT)
        folder = yield inodes.mkdir(ROOT, b"folder", 0o755)
        handle = yield inodes.create(folder.inode, b"f", 0o644, os.O_RDWR | os.O_CREAT | os.O_EXCL)
        yield handle.write(0, b"hello")
        yield handle.close()
        sent = self.count_requests(fs)
        found = yield inodes.lookup(folder.inode, b"f")
        self.assertEqual((found.size, found.version), (5, handle.version), "the commit's answer is known")
        yield inodes.getattr(found.inode)
        yield self.assertFailure(inodes.lookup(folder.inode, b"missing"), errors.NotFound)
        yield self.assertFailure(inodes.getxattr(found.inode, b"user.none"), errors.NoAttribute)
        here = yield inodes.getattr(folder.inode)
        top = yield inodes.getattr(ROOT)
        listed = yield inodes.readdir(folder.inode)
        self.assertEqual(listed, [(b"f", found)])
        self.assertEqual(sent, [])
        server = yield fs.inodes.session.call(w.GetAttr(folder.inode))
        self.assertEqual(here, server.attributes, "the folder's times follow its new file's")
        server = yield fs.inodes.session.call(w.GetAttr(ROOT))
        self.assertEqual(top, server.attributes)
        self.assertEqual(top.nlink, root.nlink + 1)

        del sent[:]
        yield inodes.unlink(folder.inode, b"f")
        yield self.assertFailure(inodes.lookup(folder.inode, b"f"), errors.NotFound)
        here = yield inodes.getattr(folder.inode)
        self.assertEqual([type(message) for message in sent], [w.Unlink], "the unlink's answer tells the folder's")
        server = yield fs.inodes.session.call(w.GetAttr(folder.inode))
        self.assertEqual(here, server.attributes)
        del sent[:]
        yield inodes.readdir(ROOT)
        yield inodes.lookup(ROOT, b"folder")
        yield self.assertFailure(inodes.lookup(ROOT, b"not-there"), errors.NotFound)
        self.assertEqual([type(message) for message in sent], [w.ReadDir])

    @defer.inlineCallbacks
    def watched_tree(self) -> Generator[Deferred[Any], Any, tuple[Any, Any, Any, Any]]:
        """A writer's file ``/f`` and folder ``/d``, then a watcher that looked both up: (writer, watcher, f, d)."""
        writer = yield self.filespace()
        yield writer.write_file("/f", b"one")
        yield writer.mkdir("/d")
        watcher = yield self.filespace()  # after those changes: none of their notifications is on its way
        f = yield watcher.inodes.lookup(ROOT, b"f")
        d = yield watcher.inodes.lookup(ROOT, b"d")
        return writer, watcher, f, d

    @defer.inlineCallbacks
    def test_changes_elsewhere_are_seen(self) -> Generator[Deferred[Any], Any, None]:
        """Another session's new entries, removals, attribute and xattr changes drop what they change here."""
        writer, watcher, f, d = yield self.watched_tree()
        inodes = watcher.inodes
        yield inodes.readdir(d.inode)
        yield self.assertFailure(inodes.lookup(ROOT, b"later"), errors.NotFound)
        yield inodes.listxattr(f.inode)
        yield self.assertFailure(inodes.getxattr(f.inode, b"user.tag"), errors.NoAttribute)

        yield writer.write_file("/later", b"x")
        yield writer.write_file("/d/new", b"y")
        yield writer.inodes.setattr(f.inode, mode=0o600)
        yield writer.inodes.setxattr(f.inode, b"user.tag", b"v")
        yield writer.write_file("/f", b"longer content")

        yield self.until(lambda: inodes.lookup(ROOT, b"later"))
        yield self.until(lambda: inodes.lookup(d.inode, b"new"))
        value = yield self.until(lambda: inodes.getxattr(f.inode, b"user.tag"))
        self.assertEqual(value, b"v")

        @defer.inlineCallbacks
        def changed() -> Generator[Deferred[Any], Any, None]:
            now = yield inodes.getattr(f.inode)
            self.assertEqual((stat.S_IMODE(now.mode), now.size), (0o600, len(b"longer content")))

        yield self.until(changed)
        yield writer.remove("/d/new")

        @defer.inlineCallbacks
        def removed() -> Generator[Deferred[Any], Any, None]:
            yield self.assertFailure(inodes.lookup(d.inode, b"new"), errors.NotFound)

        yield self.until(removed)

    @defer.inlineCallbacks
    def test_forgotten_when_the_connection_is_lost(self) -> Generator[Deferred[Any], Any, None]:
        """Changes made while this session could not be told are seen after it connects again."""
        writer, watcher, f, d = yield self.watched_tree()
        inodes = watcher.inodes
        yield self.assertFailure(inodes.lookup(ROOT, b"g"), errors.NotFound)
        yield inodes.readdir(d.inode)
        yield inodes.listxattr(f.inode)
        sent = self.count_requests(watcher)
        yield inodes.getattr(f.inode)
        yield inodes.readdir(d.inode)
        yield self.assertFailure(inodes.getxattr(f.inode, b"user.tag"), errors.NoAttribute)
        self.assertEqual(sent, [])
        self.meta.drop_connections()
        yield deferLater(0.05)  # the watcher hears of it; nothing it is told can arrive any more
        yield writer.inodes.setattr(f.inode, mode=0o600)
        yield writer.write_file("/g", b"two")
        yield writer.write_file("/d/new", b"three")
        yield writer.inodes.setxattr(f.inode, b"user.tag", b"v")
        now = yield inodes.getattr(f.inode)
        self.assertEqual(stat.S_IMODE(now.mode), 0o600)
        g = yield inodes.lookup(ROOT, b"g")
        self.assertEqual(g.size, 3)
        listed = yield inodes.readdir(d.inode)
        self.assertEqual([name for name, _ in listed], [b"new"])
        value = yield inodes.getxattr(f.inode, b"user.tag")
        self.assertEqual(value, b"v")
        self.assertEqual([type(message) for message in sent], [w.GetAttr, w.Lookup, w.ReadDir, w.GetXattr])
        self.assertEqual(watcher.inodes.session.reconnects, 1)

    @defer.inlineCallbacks
    def test_answer_after_a_notification_is_not_kept(self) -> Generator[Deferred[Any], Any, None]:
        """A lookup answered just after the server told of a change to it is used once, not kept."""
        fs = yield self.filespace()
        yield fs.write_file("/f", b"one")
        inodes = fs.inodes
        session = inodes.session
        call = session.call

        def told_meanwhile(message: Any, timeout: float | None = None) -> Deferred[Any]:
            answer = call(message, timeout)
            inodes._notified(w.Notify(w.NotifyKind.INODE_CHANGED, 12345, 0, b""))
            return answer

        session.call = told_meanwhile  # type: ignore[method-assign]
        inodes.known.clear()  # what writing the file taught
        found = yield inodes.lookup(ROOT, b"f")
        self.assertIsNone(inodes.known.attributes(found.inode))
        self.assertIsNone(inodes.known.entry(ROOT, b"f"))

    @defer.inlineCallbacks
    def test_empty_file_needs_no_chunk_map(self) -> Generator[Deferred[Any], Any, None]:
        """A write into a file known empty (new, or emptied by O_TRUNC) reads no chunk map; into content, it does."""
        fs = yield self.filespace()
        inodes = fs.inodes
        sent = self.count_requests(fs)
        handle = yield inodes.create(ROOT, b"new", 0o644, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        yield handle.write(0, b"first")
        yield handle.close()
        self.assertNotIn(w.ChunkMapRead, [type(message) for message in sent])

        handle = yield inodes.open(handle.inode, os.O_WRONLY)
        yield handle.write(2, b"!")
        yield handle.close()
        self.assertIn(w.ChunkMapRead, [type(message) for message in sent], "content to keep: the map is read")
        data = yield fs.read_file("/new")
        self.assertEqual(data, b"fi!st")

        del sent[:]
        handle = yield inodes.open(handle.inode, os.O_WRONLY | os.O_TRUNC)
        yield handle.write(1, b"x")
        yield handle.close()
        self.assertNotIn(w.ChunkMapRead, [type(message) for message in sent])
        data = yield fs.read_file("/new")
        self.assertEqual(data, b"\0x")

    @defer.inlineCallbacks
    def test_listing_read_across_an_own_change_is_not_kept(self) -> Generator[Deferred[Any], Any, None]:
        """
        A directory read in pages while this client removes, makes or writes entries is not learned whole.

        The server tells others, not this session, of its own changes: the
        first page, read before such a change, must not be kept as the directory.
        """
        from lucidlink.meta import store
        self.patch(store, "MAX_READDIR_LIMIT", 1)  # one entry a page
        fs = yield self.filespace()
        yield fs.write_file("/a", b"one")
        yield fs.write_file("/b", b"two")
        inodes = fs.inodes
        session = inodes.session
        call = session.call

        @defer.inlineCallbacks
        def read_with_change_after_first_page(
            change: Callable[[bytes], Deferred[Any]]
        ) -> Generator[Deferred[Any], Any, bytes]:
            """readdir(ROOT), with ``change(name on the first page)`` made before the second page is asked for."""
            first: list[bytes] = []

            def paged(message: Any, timeout: float | None = None) -> Deferred[Any]:
                if isinstance(message, w.ReadDir) and message.cursor and len(first) == 1:
                    first.append(b"changed")
                    return change(first[0]).addCallback(lambda _: call(message, timeout))
                answer = call(message, timeout)
                if isinstance(message, w.ReadDir) and not message.cursor:
                    answer.addCallback(lambda page: first.append(
                        crypto.open_name(inodes.keys, ROOT, page.entries[0].name)) or page)
                return answer

            inodes.known.clear()
            session.call = paged  # type: ignore[method-assign]
            try:
                yield inodes.readdir(ROOT)
            finally:
                session.call = call  # type: ignore[method-assign]
            self.assertEqual(len(first), 2, "the change was made between the pages")
            return first[0]

        @defer.inlineCallbacks
        def made_and_removed(name: bytes) -> Generator[Deferred[Any], Any, None]:
            handle = yield inodes.create(ROOT, b"c", 0o644, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
            yield handle.close()
            yield inodes.unlink(ROOT, name)

        removed = yield read_with_change_after_first_page(made_and_removed)
        yield self.assertFailure(inodes.lookup(ROOT, removed), errors.NotFound)
        c = yield inodes.lookup(ROOT, b"c")
        self.assertEqual(c.size, 0)
        listed = yield inodes.readdir(ROOT)
        self.assertEqual(len(listed), 2)
        self.assertNotIn(removed, [name for name, _ in listed])

        @defer.inlineCallbacks
        def written(name: bytes) -> Generator[Deferred[Any], Any, None]:
            found = yield inodes.lookup(ROOT, name)
            handle = yield inodes.open(found.inode, os.O_WRONLY)
            yield handle.write(0, b"grown longer")
            yield handle.close()

        grown = yield read_with_change_after_first_page(written)
        found = yield inodes.lookup(ROOT, grown)
        self.assertEqual(found.size, len(b"grown longer"), "the commit's size, not the first page's")

    @defer.inlineCallbacks
    def test_create_racing_an_own_link_of_the_name(self) -> Generator[Deferred[Any], Any, None]:
        """
        A create of a name known absent, sent while this client's link to that name is on its way, opens the linked file.

        That file is not new: its extended attributes are not known to be none.
        """
        fs = yield self.filespace()
        yield fs.write_file("/tagged", b"x")
        inodes = fs.inodes
        tagged = yield inodes.lookup(ROOT, b"tagged")
        yield inodes.setxattr(tagged.inode, b"user.tag", b"v")
        yield self.assertFailure(inodes.lookup(ROOT, b"alias"), errors.NotFound)
        linking = inodes.link(tagged.inode, ROOT, b"alias")
        creating = inodes.create(ROOT, b"alias", 0o644, os.O_WRONLY | os.O_CREAT)
        yield linking
        handle = yield creating
        self.assertEqual(handle.inode, tagged.inode, "the create opened what the link made")
        yield handle.close()
        value = yield inodes.getxattr(tagged.inode, b"user.tag")
        self.assertEqual(value, b"v")
        self.assertEqual(inodes._entries_changing, {}, "every change was answered")
        yield inodes.rename(ROOT, b"alias", ROOT, b"renamed")
        yield self.assertFailure(inodes.rename(ROOT, b"alias", ROOT, b"again"), errors.NotFound)
        self.assertEqual(inodes._entries_changing, {}, "answered, or failed")

    @defer.inlineCallbacks
    def assert_known_is_true(self, fs: Filespace) -> Generator[Deferred[Any], Any, None]:
        """Everything ``fs``'s cache holds is what the server says now (asked past the cache)."""
        inodes = fs.inodes
        known = inodes.known
        call = type(inodes.session).call.__get__(inodes.session)  # not a wrapper a test put on it
        for inode, (attributes, _) in list(known._attributes.items()):
            if known.attributes(inode) is None:
                continue
            answer = yield call(w.GetAttr(inode))
            self.assertEqual(attributes, answer.attributes, f"attributes of inode {inode}")
        for parent, names in list(known._entries.items()):
            for name in list(names):
                kept = known.entry(parent, name)
                if kept is None:
                    continue
                try:
                    answer = yield call(w.Lookup(parent, crypto.seal_name(inodes.keys, parent, name)))
                except errors.NotFound:
                    self.assertEqual(kept, ABSENT, f"entry {name!r} of {parent}")
                else:
                    self.assertEqual(kept, answer.attributes.inode, f"entry {name!r} of {parent}")
            if known._whole.get(parent, 0.0) > known.clock():
                listed = set()
                cursor = b""
                while True:
                    page = yield call(w.ReadDir(parent, cursor, 0))
                    listed |= {crypto.open_name(inodes.keys, parent, entry.name) for entry in page.entries}
                    if page.done or not page.entries:
                        break
                    cursor = page.cursor
                self.assertEqual({name for name, (inode, _) in names.items() if inode != ABSENT}, listed,
                                 f"directory {parent} known whole")
        for inode, (xattr_names, _) in list(known._xattr_names.items()):
            if known.xattr_names(inode) is None:
                continue
            answer = yield call(w.ListXattr(inode))
            self.assertEqual(xattr_names, {crypto.open_xattr_name(inodes.keys, inode, n) for n in answer.names},
                             f"extended attributes of inode {inode}")
        for inode, values in list(known._xattr_values.items()):
            for name in list(values):
                kept = known.xattr(inode, name)
                if kept is None:
                    continue
                sealed_name = crypto.seal_xattr_name(inodes.keys, inode, name)
                try:
                    answer = yield call(w.GetXattr(inode, sealed_name))
                except errors.NoAttribute:
                    self.assertIs(kept, ABSENT_XATTR, f"extended attribute {name!r} of inode {inode}")
                else:
                    value = crypto.open_xattr_value(inodes.keys, inode, sealed_name, answer.value)
                    self.assertEqual(kept, value, f"extended attribute {name!r} of inode {inode}")

    @defer.inlineCallbacks
    def learn_everything(self, fs: Filespace) -> Generator[Deferred[Any], Any, None]:
        """Read every directory, entry, attributes and xattr names from the root down, into ``fs``'s cache."""
        inodes = fs.inodes
        directories = [ROOT]
        yield inodes.getattr(ROOT)
        while directories:
            directory = directories.pop()
            for name, _ in (yield inodes.readdir(directory)):
                found = yield inodes.lookup(directory, name)
                yield inodes.getattr(found.inode)
                yield inodes.listxattr(found.inode)
                if found.kind == FileKind.DIRECTORY:
                    directories.append(found.inode)
            yield self.assertFailure(inodes.lookup(directory, b"never-made"), errors.NotFound)

    @defer.inlineCallbacks
    def changes(self, fs: Filespace) -> Generator[Deferred[Any], Any, list[Callable[[], Deferred[Any]]]]:
        """Set up a tree in ``fs``; the changes to make in it one by one, each with side effects on other inodes."""
        inodes = fs.inodes
        yield fs.write_file("/a", b"aaaa")
        yield fs.write_file("/b", b"bb")
        yield fs.mkdir("/d")
        yield fs.mkdir("/e")
        a = yield inodes.lookup(ROOT, b"a")
        b = yield inodes.lookup(ROOT, b"b")
        d = yield inodes.lookup(ROOT, b"d")
        return [
            lambda: inodes.link(a.inode, d.inode, b"a-link"),
            lambda: inodes.setxattr(a.inode, b"user.x", b"1"),
            lambda: inodes.rename(ROOT, b"b", ROOT, b"a"),  # over a file with another link
            lambda: inodes.rename(d.inode, b"a-link", ROOT, b"moved"),
            lambda: inodes.symlink(d.inode, b"s", b"/target"),
            lambda: inodes.mkdir(d.inode, b"sub"),
            lambda: inodes.rename(ROOT, b"e", d.inode, b"sub"),  # a directory over an empty one, elsewhere
            lambda: inodes.rmdir(d.inode, b"sub"),
            lambda: fs.write_file("/a", b"x"),  # O_TRUNC, then a commit
            lambda: inodes.setattr(b.inode, size=1),
            lambda: inodes.link(b.inode, ROOT, b"b2"),
            lambda: inodes.removexattr(a.inode, b"user.x"),
            lambda: inodes.unlink(ROOT, b"a"),
            lambda: inodes.rename(ROOT, b"b2", d.inode, b"s", w.RenameFlags.EXCHANGE),
            lambda: inodes.unlink(ROOT, b"moved"),
            lambda: inodes.unlink(ROOT, b"b2"),  # the symlink, since the exchange
        ]

    @defer.inlineCallbacks
    def test_own_changes_keep_it_true(self) -> Generator[Deferred[Any], Any, None]:
        """After each change this client makes, all it knows matches the server: links, renames over, O_TRUNC..."""
        fs = yield self.filespace()
        steps = yield self.changes(fs)
        yield self.learn_everything(fs)
        yield self.assert_known_is_true(fs)
        for number, step in enumerate(steps):
            yield step()
            yield self.still_true(fs, number)

    @defer.inlineCallbacks
    def test_changes_elsewhere_keep_it_true(self) -> Generator[Deferred[Any], Any, None]:
        """After each change another session makes, and a round trip, all this client knows matches the server."""
        writer = yield self.filespace()
        steps = yield self.changes(writer)
        watcher = yield self.filespace()
        yield self.learn_everything(watcher)
        for number, step in enumerate(steps):
            yield step()
            yield watcher.inodes.statfs()  # answered after the notifications the change sent
            yield self.still_true(watcher, number)

    @defer.inlineCallbacks
    def still_true(self, fs: Filespace, number: int) -> Generator[Deferred[Any], Any, None]:
        """What ``fs`` knows after step ``number`` matches the server, and again once it has learned everything."""
        try:
            yield self.assert_known_is_true(fs)
            yield self.learn_everything(fs)
            yield self.assert_known_is_true(fs)
        except (AssertionError, errors.LucidError) as error:
            self.fail(f"after step {number}: {error!r}")

    @defer.inlineCallbacks
    def reads_crossing_changes(self, here: bool) -> Generator[Deferred[Any], Any, None]:
        """Read everything while each change is made (by ``here``: the reader), then check what the reader knows."""
        from lucidlink.meta import store
        self.patch(store, "MAX_READDIR_LIMIT", 1)  # listings cross the changes
        writer = yield self.filespace()
        steps = yield self.changes(writer)
        reader = writer if here else (yield self.filespace())
        yield self.learn_everything(reader)
        for number, step in enumerate(steps):
            reading = self.learn_everything(reader)
            yield step()
            yield reading.addErrback(lambda failure: failure.trap(errors.NotFound))  # a name gone meanwhile
            yield reader.inodes.statfs()  # answered after the notifications the change sent
            try:
                yield self.assert_known_is_true(reader)
            except (AssertionError, errors.LucidError) as error:
                self.fail(f"after step {number}: {error!r}")

    def test_reads_crossing_own_changes_keep_it_true(self) -> Deferred[None]:
        """Reads on their way while this client changes the tree leave nothing untrue behind."""
        return self.reads_crossing_changes(here=True)

    def test_reads_crossing_changes_elsewhere_keep_it_true(self) -> Deferred[None]:
        """Reads on their way while another session changes the tree leave nothing untrue behind."""
        return self.reads_crossing_changes(here=False)



PATHS = [b"a", b"b", b"c", b"d", b"d/a", b"d/c", b"d/e", b"d/e/a"]
"""Every path a step of :class:`CacheModelTests` may touch; most steps meet existing and missing ones alike."""
XATTRS = [b"user.x", b"user.y"]
RUNS = (f"run-{number}".encode() for number in itertools.count())
"""The folder of each example, under the root."""

_path = st.sampled_from(PATHS)
_client = st.sampled_from(["here", "elsewhere"])
cache_steps = st.lists(st.one_of(
    st.tuples(_client, st.just("create"), _path, st.booleans()),
    st.tuples(_client, st.just("mkdir"), _path),
    st.tuples(_client, st.just("unlink"), _path),
    st.tuples(_client, st.just("rmdir"), _path),
    st.tuples(_client, st.just("rename"), _path, _path,
              st.sampled_from([0, w.RenameFlags.NOREPLACE, w.RenameFlags.EXCHANGE])),
    st.tuples(_client, st.just("link"), _path, _path),
    st.tuples(_client, st.just("symlink"), _path),
    st.tuples(_client, st.just("chmod"), _path, st.sampled_from([0o600, 0o644, 0o755])),
    st.tuples(_client, st.just("truncate"), _path, st.integers(0, 3)),
    st.tuples(_client, st.just("setxattr"), _path, st.sampled_from(XATTRS), st.binary(max_size=3),
              st.sampled_from([w.XattrFlags.ANY, w.XattrFlags.CREATE, w.XattrFlags.REPLACE])),
    st.tuples(_client, st.just("removexattr"), _path, st.sampled_from(XATTRS)),
    st.tuples(_client, st.just("open"), _path, st.sampled_from([os.O_RDONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC])),
    st.tuples(_client, st.just("write"), st.integers(0, 3), st.integers(0, 5), st.binary(min_size=1, max_size=4)),
    st.tuples(_client, st.just("close"), st.integers(0, 3)),
    st.tuples(_client, st.just("read"), _path),
    st.tuples(st.just("here"), st.just("deliver"), st.integers(0, 7)),
    st.tuples(st.just("here"), st.just("settle")),
), min_size=3, max_size=30)
"""
Changes and reads by either of two sessions: this one ("here") and another
("elsewhere"); and, when this one's answers are held back, the delivery of
one of them, or of all.
"""


class HeldAnswers(InMemoryConnection):
    """An in-memory connection whose answers, while :attr:`holding`, wait for :meth:`deliver` (notifications do not)."""

    holding = False

    def __init__(self, *arguments: Any) -> None:
        super().__init__(*arguments)
        self.held: list[tuple[Deferred[Any], Deferred[Any]]] = []

    def request(self, message: Any, timeout: float | None = None, request_id: int | None = None) -> Deferred[Any]:
        answer = super().request(message, timeout, request_id)
        if not self.holding:
            return answer
        later: Deferred[Any] = Deferred()
        self.held.append((answer, later))
        return later

    def deliver(self, index: int) -> None:
        """Deliver the answer held at ``index`` (of those held, oldest first)."""
        answer, later = self.held.pop(index)
        answer.chainDeferred(later)

    def settle(self) -> None:
        """Deliver every answer held, those asked for meanwhile too, oldest first."""
        while self.held:
            self.deliver(0)


class CacheModelTests(MemoryFilespaceCase):
    """
    Random changes and reads, by this session and another, over a small tree
    (files, directories, hard and symbolic links, renames over and exchanges,
    extended attributes, open files written and truncated): once every answer
    has arrived, all that either session's metadata cache holds is what the
    server says.  This session's answers may be held back (the server tells
    of changes before it answers what was read before them; answers come in
    any order), so its own steps cross each other and the other's.
    """

    assert_known_is_true = InodesCacheTests.assert_known_is_true

    @defer.inlineCallbacks
    def setUp(self) -> Generator[Deferred[Any], Any, None]:
        yield super().setUp()
        self.connections: list[HeldAnswers] = []
        session = yield open_session(
            reactor, filespace=FILESPACE, user=ADMIN, passphrase=ADMIN_PASSPHRASE,
            resolver=memory_resolver(self.folder / "state"), connect=self.connect, backoff=fast_backoff(), deadline=5,
        )
        self.addCleanup(session.close)
        self.here = Filespace(session, self.objects, uid=1000, gid=1000, offload=synchronous)
        self.elsewhere = self.fs

    def connect(self, endpoint: str, identity: str) -> Deferred[HeldAnswers]:
        self.connections.append(HeldAnswers(self.responder))
        return defer.succeed(self.connections[-1])

    @settings(max_examples=int(os.environ.get("LUCID_MODEL_EXAMPLES", 30)), deadline=None)
    @given(st.booleans(), cache_steps)
    def test_caches_match_the_server(self, hold: bool, steps: list[tuple[Any, ...]]) -> None:
        """Whatever either session does, and in whatever order this one's answers come, no cache is left untrue."""
        connection = self.connections[-1]
        clients = {"here": self.here, "elsewhere": self.elsewhere}
        handles: dict[str, list[Any]] = {"here": [], "elsewhere": []}
        self.populate()
        connection.holding = hold
        under_way: list[Deferred[Any]] = []
        try:
            for number, step in enumerate(steps):
                who, kind, *arguments = step
                if kind == "deliver":
                    if connection.held:
                        connection.deliver(arguments[0] % len(connection.held))
                elif kind == "settle":
                    connection.settle()
                else:
                    doing = self.apply(clients[who], handles[who], kind, *arguments)
                    under_way.append(doing.addErrback(lambda failure: failure.trap(errors.LucidError)))
                if not connection.held:
                    self.check(clients, f"after step {number} {step}")
            connection.settle()
            for doing in under_way:
                self.now(doing)
            self.check(clients, "at the end")
        finally:
            connection.holding = False
            connection.settle()
            for opened in handles.values():
                for handle in opened:
                    handle.close().addErrback(lambda failure: None)

    def check(self, clients: dict[str, Filespace], when: str) -> None:
        """Everything either session's cache holds is what the server says (asked without holding answers)."""
        connection = self.connections[-1]
        holding, connection.holding = connection.holding, False
        try:
            for name, fs in clients.items():
                try:
                    self.now(self.assert_known_is_true(fs))
                except AssertionError as error:
                    self.fail(f"{name}'s cache {when}: {error}")
        finally:
            connection.holding = holding

    def populate(self) -> None:
        """A new folder for the example, with files, folders and an xattr, learned by both sessions (and nothing else)."""
        for fs in (self.here, self.elsewhere):
            fs.inodes.known.clear()
        self.top = self.now(self.here.inodes.mkdir(ROOT, next(RUNS))).inode
        for path, content in ((b"a", b"aaa"), (b"d", None), (b"d/a", b"da"), (b"d/e", None), (b"b", b"")):
            if content is None:
                self.now(self.apply(self.here, [], "mkdir", path))
            else:
                opened: list[Any] = []
                self.now(self.apply(self.here, opened, "create", path, True))
                self.now(opened[0].write(0, content))
                self.now(opened[0].close())
        self.now(self.apply(self.here, [], "setxattr", b"a", b"user.x", b"1", w.XattrFlags.CREATE))
        for fs in (self.here, self.elsewhere):
            for path in PATHS:
                self.now(self.apply(fs, [], "read", path).addErrback(lambda failure: failure.trap(errors.NotFound)))

    @defer.inlineCallbacks
    def parent_of(self, fs: Filespace, path: bytes) -> Generator[Deferred[Any], Any, tuple[int, bytes]]:
        """The inode of ``path``'s directory (looked up through ``fs``'s cache) and its last name."""
        *folders, name = path.split(b"/")
        parent = self.top
        for folder in folders:
            parent = (yield fs.inodes.lookup(parent, folder)).inode
        return parent, name

    @defer.inlineCallbacks
    def apply(
        self, fs: Filespace, opened: list[Any], kind: str, *arguments: Any
    ) -> Generator[Deferred[Any], Any, None]:
        """Make one step through ``fs``; the files it opens are added to ``opened``, those it closes taken out."""
        inodes = fs.inodes
        if kind in ("write", "close"):
            if opened:
                handle = opened[arguments[0] % len(opened)]
                if kind == "close":
                    opened.remove(handle)
                    yield handle.close()
                else:
                    yield handle.write(arguments[1], arguments[2])
            return
        parent, name = yield self.parent_of(fs, arguments[0])
        if kind == "create":
            handle = yield inodes.create(parent, name, 0o644, os.O_RDWR | os.O_CREAT | (os.O_EXCL * arguments[1]))
            opened.append(handle)
        elif kind == "mkdir":
            yield inodes.mkdir(parent, name)
        elif kind == "unlink":
            yield inodes.unlink(parent, name)
        elif kind == "rmdir":
            yield inodes.rmdir(parent, name)
        elif kind == "symlink":
            yield inodes.symlink(parent, name, b"d/a")
        elif kind in ("rename", "link"):
            new_parent, new_name = yield self.parent_of(fs, arguments[1])
            if kind == "rename":
                yield inodes.rename(parent, name, new_parent, new_name, arguments[2])
            else:
                found = yield inodes.lookup(parent, name)
                yield inodes.link(found.inode, new_parent, new_name)
        else:
            found = yield inodes.lookup(parent, name)
            if kind == "chmod":
                yield inodes.setattr(found.inode, mode=arguments[1])
            elif kind == "truncate":
                yield inodes.setattr(found.inode, size=arguments[1])
            elif kind == "setxattr":
                yield inodes.setxattr(found.inode, arguments[1], arguments[2], arguments[3])
            elif kind == "removexattr":
                yield inodes.removexattr(found.inode, arguments[1])
            elif kind == "open":
                handle = yield inodes.open(found.inode, arguments[1])
                opened.append(handle)
            else:
                yield inodes.getattr(found.inode)
                yield inodes.listxattr(found.inode)
                for xattr in XATTRS:
                    try:
                        yield inodes.getxattr(found.inode, xattr)
                    except errors.NoAttribute:
                        pass
                if found.kind == FileKind.DIRECTORY:
                    yield inodes.readdir(found.inode)
