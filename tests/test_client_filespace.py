"""
The filesystem core: files by chunks, directories, links, xattrs and paths,
against a real metadata server (in memory for property tests, on loopback
TLS for the rest) and a real object store.
"""

from __future__ import annotations

import itertools
import os
import random
import stat
from collections.abc import Generator
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.defer import Deferred
from zope.interface.verify import verifyObject

from lucidlink import crypto, errors
from lucidlink.client.filespace import Filespace, chunk_object_key
from lucidlink.client.interface import IFilespaceInodes
from lucidlink.protocol.messages import FileKind, RenameFlags, XattrFlags
from tests.client_helpers import ClientTestCase, MemoryFilespaceCase, synchronous

NAMES = (f"file-{number}".encode() for number in itertools.count())
"""A new file name for every example."""
CHUNK = 128 * 1024
"""The chunk size of the in-memory tests: two 64 KiB crypto blocks per chunk."""


def pattern(length: int, seed: int) -> bytes:
    """``length`` bytes that differ from one seed to another."""
    return random.Random(seed).randbytes(length)


operations = st.one_of(
    st.tuples(st.just("write"), st.integers(0, 5 * CHUNK), st.integers(0, 2 * CHUNK + 100), st.integers(0, 99)),
    st.tuples(st.just("truncate"), st.integers(0, 5 * CHUNK)),
    st.tuples(st.just("read"), st.integers(0, 6 * CHUNK), st.integers(0, 3 * CHUNK)),
    st.tuples(st.just("flush")),
    st.tuples(st.just("reopen")),
    st.tuples(st.just("server-truncate"), st.integers(0, 5 * CHUNK)),
)


class ModelTests(MemoryFilespaceCase):
    """A file behaves like a bytearray, whatever is written, cut, grown and read, and wherever."""

    chunk_size = CHUNK

    @settings(max_examples=int(os.environ.get("LUCID_MODEL_EXAMPLES", 40)))
    @given(st.lists(operations, max_size=12))
    def test_file_matches_model(self, steps: list[tuple[Any, ...]]) -> None:
        """Random writes, truncations, reads, flushes and reopenings agree with a bytearray."""
        inodes = self.fs.inodes
        handle = self.now(inodes.create(1, next(NAMES), 0o644, os.O_RDWR | os.O_CREAT | os.O_EXCL))
        model = bytearray()
        for step in steps:
            kind = step[0]
            if kind == "write":
                _, offset, length, seed = step
                data = pattern(length, seed)
                self.assertEqual(self.now(handle.write(offset, data)), length)
                if length:
                    if offset > len(model):
                        model.extend(bytes(offset - len(model)))
                    model[offset : offset + length] = data
            elif kind in ("truncate", "server-truncate"):
                size = step[1]
                if kind == "truncate":
                    self.now(handle.truncate(size))
                else:
                    self.now(inodes.setattr(handle.inode, size=size))
                del model[size:]
                model.extend(bytes(size - len(model)))
            elif kind == "read":
                _, offset, length = step
                self.assertEqual(self.now(handle.read(offset, length)), bytes(model[offset : offset + length]))
            elif kind == "flush":
                self.now(handle.flush())
                self.assertFalse(handle.pending)
            else:
                self.now(handle.close())
                handle = self.now(inodes.open(handle.inode, os.O_RDWR))
            self.assertEqual(handle.size, len(model))
        self.now(handle.close())
        again = self.now(inodes.open(handle.inode, os.O_RDONLY))
        self.assertEqual(self.now(again.read(0, len(model) + 10)), bytes(model))
        self.assertEqual(self.now(inodes.getattr(handle.inode)).size, len(model))
        self.now(again.close())

    def test_ranged_reads_fetch_only_what_is_needed(self) -> None:
        """A small read in the middle of a chunk fetches one ranged piece of one object."""
        handle = self.now(self.fs.inodes.create(1, b"big", 0o644, os.O_RDWR))
        data = pattern(3 * CHUNK, 1)
        self.now(handle.write(0, data))
        self.now(handle.close())
        reader = self.now(self.fs.inodes.open(handle.inode, os.O_RDONLY))
        before = self.objects.gets
        self.assertEqual(self.now(reader.read(CHUNK + 70_000, 100)), data[CHUNK + 70_000 : CHUNK + 70_100])
        self.assertEqual(self.objects.gets - before, 1)

    def test_buffered_writes_are_bounded(self) -> None:
        """Past the buffer limit a write stores what is buffered, so a large put streams."""
        fs = Filespace(self.fs.session, self.objects, max_dirty=2 * CHUNK, offload=synchronous)
        handle = self.now(fs.inodes.create(1, b"stream", 0o644, os.O_WRONLY))
        for index in range(10):
            self.now(handle.write(index * CHUNK, pattern(CHUNK, index)))
            self.assertLessEqual(handle.buffered, 3 * CHUNK)
        self.assertGreaterEqual(len(self.objects.objects), 6)
        self.now(handle.close())
        self.assertEqual(self.now(fs.read_file("/stream")), b"".join(pattern(CHUNK, i) for i in range(10)))

    def test_readdir_pages(self) -> None:
        """A directory longer than one page is read to its end, names opened."""
        import lucidlink.meta.store as meta_store

        self.patch(meta_store, "MAX_READDIR_LIMIT", 3)
        for index in range(8):
            self.now(self.fs.mkdir(f"/d{index}"))
        names = [name for name, _ in self.now(self.fs.listdir("/"))]
        self.assertEqual(names, [f"d{index}" for index in range(8)])


class ConcurrentWriterTests(MemoryFilespaceCase):
    """Two sessions writing one file: a Conflict makes the later one rebase, and nothing is lost."""

    chunk_size = CHUNK

    @defer.inlineCallbacks
    def setUp(self) -> Generator[Deferred[Any], Any, None]:
        yield super().setUp()
        self.other = yield self.memory_filespace()

    def two_handles(self) -> tuple[Any, Any, Filespace]:
        other = self.other
        first = self.now(self.fs.inodes.create(1, b"shared", 0o644, os.O_RDWR))
        self.now(first.write(0, b"a" * (2 * CHUNK)))
        self.now(first.flush())
        second = self.now(other.inodes.open(first.inode, os.O_RDWR))
        return first, second, other

    def test_different_chunks(self) -> None:
        """Each writer changes its own chunk; both changes survive."""
        first, second, other = self.two_handles()
        self.now(first.write(10, b"first"))
        self.now(second.write(CHUNK + 10, b"second"))
        self.now(first.close())
        self.now(second.close())
        data = self.now(other.read_file("/shared"))
        expected = bytearray(b"a" * (2 * CHUNK))
        expected[10:15] = b"first"
        expected[CHUNK + 10 : CHUNK + 16] = b"second"
        self.assertEqual(data, bytes(expected))

    def test_same_chunk_different_bytes(self) -> None:
        """Writers of different bytes of one chunk both keep theirs: the later lays its writes over."""
        first, second, other = self.two_handles()
        self.now(second.write(5000, b"second"))  # read chunk 0 as its base before the other commits
        self.now(first.write(10, b"first"))
        self.now(first.close())
        self.now(second.close())
        data = self.now(self.fs.read_file("/shared"))
        self.assertEqual(data[10:15], b"first")
        self.assertEqual(data[5000:5006], b"second")
        self.assertEqual(len(data), 2 * CHUNK)

    def test_growth_and_truncation(self) -> None:
        """A writer that extended the file keeps the other's growth; a truncation of the later writer wins."""
        first, second, other = self.two_handles()
        self.now(first.write(3 * CHUNK, b"tail"))
        self.now(second.write(0, b"head"))
        self.now(first.close())
        self.now(second.close())
        data = self.now(self.fs.read_file("/shared"))
        self.assertEqual((len(data), data[:4], data[-4:]), (3 * CHUNK + 4, b"head", b"tail"))
        first = self.now(self.fs.inodes.open(second.inode, os.O_RDWR))
        second = self.now(other.inodes.open(second.inode, os.O_RDWR))
        self.now(first.write(0, b"HEAD"))
        self.now(second.truncate(100))
        self.now(first.close())
        self.now(second.close())
        self.assertEqual(self.now(self.fs.read_file("/shared")), b"HEAD" + b"a" * 96)

    @settings(max_examples=int(os.environ.get("LUCID_MODEL_EXAMPLES", 30)))
    @given(
        st.lists(st.tuples(st.sampled_from("ABab"), st.integers(0, 60), st.integers(0, 4999), st.integers(1, 5000))),
    )
    def test_disjoint_writers_both_survive(self, steps: list[tuple[str, int, int, int]]) -> None:
        """Two sessions writing disjoint stripes of one file, flushing in any order, lose nothing."""
        stripe = 5000
        first = self.now(self.fs.inodes.create(1, next(NAMES), 0o644, os.O_RDWR | os.O_EXCL))
        second = self.now(self.other.inodes.open(first.inode, os.O_RDWR))
        handles = {"A": first, "B": second}
        model = bytearray()
        for number, (who, stripe_number, offset, length) in enumerate(steps):
            handle = handles[who.upper()]
            if who.islower():
                self.now(handle.flush())
                continue
            stripe_number = stripe_number * 2 + (who == "B")  # A writes even stripes, B odd ones
            start = stripe_number * stripe + offset
            data = pattern(min(length, stripe - offset), number)
            self.now(handle.write(start, data))
            model.extend(bytes(max(0, start + len(data) - len(model))))
            model[start : start + len(data)] = data
            self.assertEqual(self.now(handle.read(start, len(data))), data)
        self.now(first.close())
        self.now(second.close())
        self.assertEqual(self.now(self.fs.inodes.getattr(first.inode)).size, len(model))
        reader = self.now(self.fs.inodes.open(first.inode, os.O_RDONLY))
        self.assertEqual(self.now(reader.read(0, len(model) + 1)), bytes(model))
        self.now(reader.close())

    def test_uncommitted_writes_show_in_this_clients_sizes(self) -> None:
        """Writes a handle still buffers grow the size this client reports; other clients see them once committed."""
        first, second, other = self.two_handles()
        self.now(first.write(3 * CHUNK, b"tail"))
        grown = 3 * CHUNK + 4
        self.assertEqual(self.now(self.fs.inodes.getattr(first.inode)).size, grown)
        self.assertEqual(dict(self.now(self.fs.inodes.readdir(1)))[b"shared"].size, grown)
        self.assertEqual(self.now(other.inodes.getattr(first.inode)).size, 2 * CHUNK)
        self.now(first.flush())
        self.assertEqual(self.now(other.inodes.getattr(first.inode)).size, grown)

    def test_notified_reader_sees_new_size(self) -> None:
        """A reader told of another session's commit reads the new size and content."""
        first, second, other = self.two_handles()
        reader = self.now(other.inodes.open(first.inode, os.O_RDONLY))
        self.now(first.write(2 * CHUNK, b"more"))
        self.now(first.flush())
        self.assertEqual(self.now(reader.read(2 * CHUNK, 10)), b"more")


class FileTests(ClientTestCase):
    """Files through a real server on loopback and a local object store."""

    @defer.inlineCallbacks
    def test_round_trip_across_chunks(self) -> Generator[Deferred[Any], Any, None]:
        """Writes at random offsets and sizes across chunk boundaries read back as written."""
        fs = yield self.filespace()
        rng = random.Random(7)
        model = bytearray()
        handle = yield fs.open_path("/random", os.O_RDWR | os.O_CREAT)
        for round_number in range(12):
            offset = rng.randrange(0, 5 * self.chunk_size)
            data = pattern(rng.randrange(1, 2 * self.chunk_size), round_number)
            yield handle.write(offset, data)
            model.extend(bytes(max(0, offset - len(model))))
            model[offset : offset + len(data)] = data
            if round_number % 4 == 3:
                yield handle.flush()
            start = rng.randrange(0, len(model))
            piece = yield handle.read(start, 100_000)
            self.assertEqual(piece, bytes(model[start : start + 100_000]))
        yield handle.close()
        self.assertEqual((yield fs.read_file("/random")), bytes(model))
        self.assertEqual((yield fs.resolve("/random")).size, len(model))

    @defer.inlineCallbacks
    def test_sparse_and_huge_offsets(self) -> Generator[Deferred[Any], Any, None]:
        """A write far past the end leaves a hole of zeros that costs nothing."""
        fs = yield self.filespace()
        offset = 2**40 + 5
        handle = yield fs.open_path("/sparse", os.O_RDWR | os.O_CREAT)
        yield handle.write(offset, b"far away")
        yield handle.close()
        self.assertEqual((yield fs.resolve("/sparse")).size, offset + 8)
        reader = yield fs.open_path("/sparse")
        self.assertEqual((yield reader.read(0, 50)), bytes(50))
        self.assertEqual((yield reader.read(offset - 3, 100)), bytes(3) + b"far away")
        self.assertEqual((yield reader.read(offset + 8, 10)), b"")
        yield reader.close()
        stored = yield self.objects.list(f"{self.filespace_id.hex()}/chunks/")
        self.assertEqual(len(stored), 1)

    @defer.inlineCallbacks
    def test_truncate_and_extend(self) -> Generator[Deferred[Any], Any, None]:
        """Cut inside a chunk then grown, a file reads zeros where the cut bytes were, both ways."""
        fs = yield self.filespace()
        data = pattern(3 * self.chunk_size, 3)
        yield fs.write_file("/cut", data)
        cut = self.chunk_size + 7
        # Client side: the cut chunk is rewritten as a new object, the chunks past it dropped.
        handle = yield fs.open_path("/cut", os.O_RDWR)
        yield handle.truncate(cut)
        yield handle.truncate(2 * self.chunk_size + 100)
        yield handle.close()
        back = yield fs.read_file("/cut")
        self.assertEqual(back, data[:cut] + bytes(2 * self.chunk_size + 100 - cut))
        # Server side: only the chunk's length shrinks; growing again still shows zeros.
        attributes = yield fs.resolve("/cut")
        yield fs.inodes.setattr(attributes.inode, size=10)
        yield fs.inodes.setattr(attributes.inode, size=self.chunk_size)
        back = yield fs.read_file("/cut")
        self.assertEqual(back, data[:10] + bytes(self.chunk_size - 10))

    @defer.inlineCallbacks
    def test_times_set_on_an_open_file_outlive_its_buffered_writes(self) -> Generator[Deferred[Any], Any, None]:
        """Times set after writes not yet stored (as ``cp -p`` sets them before closing) are kept once they are."""
        fs = yield self.filespace()
        handle = yield fs.open_path("/copied", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        yield handle.write(0, b"copied bytes")
        yield fs.inodes.setattr(handle.inode, atime_ns=1_000, mtime_ns=2_000)
        yield handle.close()
        other = yield self.filespace()
        stored = yield other.stat("/copied")
        self.assertEqual((stored.size, stored.atime_ns, stored.mtime_ns), (12, 1_000, 2_000))
        seen_here = yield fs.stat("/copied")
        self.assertEqual(seen_here.mtime_ns, 2_000)

    @defer.inlineCallbacks
    def test_open_flags(self) -> Generator[Deferred[Any], Any, None]:
        """O_APPEND writes at the end, O_EXCL refuses an existing file, O_TRUNC empties it."""
        fs = yield self.filespace()
        handle = yield fs.open_path("/log", os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        yield handle.write(0, b"one\n")
        yield handle.close()
        refused = yield self.assertFailure(fs.open_path("/log", os.O_WRONLY | os.O_CREAT | os.O_EXCL),
                                           errors.AlreadyExists)
        self.assertEqual(refused.errno_name, "EEXIST")
        appender = yield fs.open_path("/log", os.O_WRONLY | os.O_APPEND)
        yield appender.write(0, b"two\n")
        yield appender.write(0, b"three\n")
        yield appender.close()
        self.assertEqual((yield fs.read_file("/log")), b"one\ntwo\nthree\n")
        truncating = yield fs.open_path("/log", os.O_WRONLY | os.O_TRUNC)
        self.assertEqual(truncating.size, 0)
        yield truncating.close()
        self.assertEqual((yield fs.read_file("/log")), b"")
        reader = yield fs.open_path("/log")
        refused = yield self.assertFailure(reader.write(0, b"no"), errors.BadFileHandle)
        self.assertIn("read-only", str(refused))
        yield reader.close()

    @defer.inlineCallbacks
    def test_unlinked_open_file_stays_readable(self) -> Generator[Deferred[Any], Any, None]:
        """A file removed while open is still read (and written) through its handle until closed."""
        fs = yield self.filespace()
        yield fs.write_file("/doomed", b"still here")
        handle = yield fs.open_path("/doomed", os.O_RDWR)
        yield fs.remove("/doomed")
        yield self.assertFailure(fs.resolve("/doomed"), errors.NotFound)
        self.assertEqual((yield handle.read(0, 100)), b"still here")
        yield handle.write(0, b"STILL")
        yield handle.flush()
        self.assertEqual((yield handle.read(0, 100)), b"STILL here")
        yield handle.close()
        self.assertEqual([name for name, _ in (yield fs.listdir("/"))], [])

    @defer.inlineCallbacks
    def test_tampered_chunk_is_refused(self) -> Generator[Deferred[Any], Any, None]:
        """A chunk object altered in the store fails to read with IntegrityError."""
        fs = yield self.filespace()
        yield fs.write_file("/precious", b"x" * 1000)
        [info] = yield self.objects.list(f"{self.filespace_id.hex()}/chunks/")
        sealed = bytearray((yield self.objects.get(info.key)))
        sealed[40] ^= 1
        yield self.objects.put(info.key, bytes(sealed))
        failure = yield self.assertFailure(fs.read_file("/precious"), errors.IntegrityError)
        self.assertEqual(failure.errno_name, "EIO")

    @defer.inlineCallbacks
    def test_chunk_keys(self) -> Generator[Deferred[Any], Any, None]:
        """Chunk objects live under the filespace id; each rewrite is a new object."""
        fs = yield self.filespace()
        yield fs.write_file("/f", b"v1")
        yield fs.write_file("/f", b"v2")
        stored = yield self.objects.list("")
        prefix = f"{self.filespace_id.hex()}/chunks/"
        self.assertEqual(len(stored), 2)
        self.assertTrue(all(info.key.startswith(prefix) for info in stored))
        self.assertEqual(chunk_object_key(b"\x01\x02", b"\xab"), "0102/chunks/ab")

    @defer.inlineCallbacks
    def test_concurrent_writers_over_the_wire(self) -> Generator[Deferred[Any], Any, None]:
        """Two sessions write different chunks of one file at once; both writes survive."""
        one = yield self.filespace()
        two = yield self.filespace()
        yield one.write_file("/shared", bytes(2 * self.chunk_size))
        first = yield one.open_path("/shared", os.O_RDWR)
        second = yield two.open_path("/shared", os.O_RDWR)
        yield first.write(1, b"one")
        yield second.write(self.chunk_size + 1, b"two")
        yield defer.gatherResults([first.close(), second.close()])
        data = yield one.read_file("/shared")
        self.assertEqual((data[1:4], data[self.chunk_size + 1 : self.chunk_size + 4]), (b"one", b"two"))

    @defer.inlineCallbacks
    def test_no_store(self) -> Generator[Deferred[Any], Any, None]:
        """Without an object store the tree can be listed; file data cannot be read."""
        fs = yield self.filespace()
        yield fs.write_file("/data", b"content")
        bare = Filespace(fs.session, None)
        self.assertEqual([name for name, _ in (yield bare.listdir("/"))], ["data"])
        yield self.assertFailure(bare.read_file("/data"), errors.NotSupported)


class TreeTests(ClientTestCase):
    """Directories, renames, links, symbolic links and extended attributes."""

    @defer.inlineCallbacks
    def test_directories(self) -> Generator[Deferred[Any], Any, None]:
        """mkdir (with parents), listdir, remove and remove_tree."""
        fs = yield self.filespace()
        verifyObject(IFilespaceInodes, fs.inodes)
        yield fs.mkdir("/a/b/c", parents=True)
        yield fs.mkdir("/a/b/c", parents=True)
        yield fs.mkdir("/", parents=True)
        yield self.assertFailure(fs.mkdir("/a"), errors.AlreadyExists)
        yield self.assertFailure(fs.mkdir("/x/y"), errors.NotFound)
        yield fs.write_file("/a/b/file", b"1")
        listing = yield fs.listdir("/a/b")
        self.assertEqual([(name, attributes.kind) for name, attributes in listing],
                         [("c", FileKind.DIRECTORY), ("file", FileKind.FILE)])
        self.assertEqual(stat.S_IMODE(listing[0][1].mode), 0o755)
        yield self.assertFailure(fs.remove("/a/b"), errors.NotEmpty)
        yield self.assertFailure(fs.remove("/"), errors.NotPermitted)
        yield fs.remove("/a/b/c")
        yield fs.remove_tree("/a")
        self.assertEqual((yield fs.listdir("/")), [])
        yield fs.mkdir("/b")
        self.assertEqual((yield fs.resolve("/b/../b/..")).inode, 1)
        yield self.assertFailure(fs.resolve("/a/.."), errors.NotFound)

    @defer.inlineCallbacks
    def test_names_are_sealed(self) -> Generator[Deferred[Any], Any, None]:
        """The server's database holds no plaintext name, link target, xattr or content."""
        fs = yield self.filespace()
        yield fs.mkdir("/Secret-Directory-Marmalade")
        yield fs.write_file("/Secret-Directory-Marmalade/Zebra-Forecast", b"Violet-Lighthouse-Content")
        yield fs.symlink("Okapi-Target-Hidden", "/Link-Name-Quokka")
        attributes = yield fs.resolve("/Secret-Directory-Marmalade/Zebra-Forecast")
        yield fs.inodes.setxattr(attributes.inode, b"user.Capybara-Attr", b"Axolotl-Value")
        dump = repr(self.meta.store.dump()).encode()
        objects = b""
        for info in (yield self.objects.list("")):
            objects += yield self.objects.get(info.key)
        for secret in (b"Marmalade", b"Zebra", b"Violet", b"Okapi", b"Quokka", b"Capybara", b"Axolotl"):
            self.assertNotIn(secret, dump)
            self.assertNotIn(secret, objects)
        # The same name in another directory seals differently.
        yield fs.mkdir("/Secret-Directory-Marmalade/Secret-Directory-Marmalade")
        outer = (yield fs.resolve("/Secret-Directory-Marmalade")).inode
        inodes = self.meta.store.dump()["inodes"]
        self.assertEqual(len(inodes[1]["entries"]), 2)
        self.assertFalse(set(inodes[1]["entries"]) & set(inodes[outer]["entries"]))

    @defer.inlineCallbacks
    def test_rename(self) -> Generator[Deferred[Any], Any, None]:
        """rename replaces as rename(2) does, with its errno classes."""
        fs = yield self.filespace()
        yield fs.write_file("/one", b"1")
        yield fs.write_file("/two", b"2")
        yield fs.mkdir("/empty")
        yield fs.mkdir("/full")
        yield fs.write_file("/full/inside", b"i")
        yield fs.rename("/one", "/two")
        self.assertEqual((yield fs.read_file("/two")), b"1")
        yield self.assertFailure(fs.resolve("/one"), errors.NotFound)
        yield fs.rename("/two", "/empty/moved")
        self.assertEqual((yield fs.read_file("/empty/moved")), b"1")
        for source, target, error, errno_name in (
            ("/full", "/empty", errors.NotEmpty, "ENOTEMPTY"),
            ("/empty/moved", "/full", errors.IsADirectory, "EISDIR"),
            ("/full", "/empty/moved", errors.NotADirectory, "ENOTDIR"),
            ("/full", "/full/inside/deeper", errors.NotADirectory, "ENOTDIR"),
            ("/missing", "/anywhere", errors.NotFound, "ENOENT"),
        ):
            failure = yield self.assertFailure(fs.rename(source, target), error)
            self.assertEqual(failure.errno_name, errno_name)
        yield fs.mkdir("/full/sub")
        yield self.assertFailure(fs.rename("/full", "/full/sub/x"), errors.InvalidArgument)
        yield fs.write_file("/a", b"a")
        yield self.assertFailure(fs.rename("/a", "/full/inside", RenameFlags.NOREPLACE), errors.AlreadyExists)
        yield fs.rename("/a", "/full/inside", RenameFlags.EXCHANGE)
        self.assertEqual((yield fs.read_file("/a")), b"i")
        yield fs.rename("/empty", "/full/sub")  # a directory replaces an empty directory
        self.assertEqual((yield fs.read_file("/full/sub/moved")), b"1")

    @defer.inlineCallbacks
    def test_hard_links(self) -> Generator[Deferred[Any], Any, None]:
        """A hard link is another name of the same inode; removing one name keeps the other."""
        fs = yield self.filespace()
        yield fs.write_file("/original", b"shared content")
        linked = yield fs.link("/original", "/alias")
        self.assertEqual(linked.nlink, 2)
        self.assertEqual((yield fs.resolve("/alias")).inode, (yield fs.resolve("/original")).inode)
        yield fs.remove("/original")
        self.assertEqual((yield fs.read_file("/alias")), b"shared content")
        self.assertEqual((yield fs.resolve("/alias")).nlink, 1)
        yield fs.mkdir("/dir")
        yield self.assertFailure(fs.link("/dir", "/dir2"), errors.NotPermitted)

    @defer.inlineCallbacks
    def test_symlinks(self) -> Generator[Deferred[Any], Any, None]:
        """Symbolic links are followed in the middle of paths and, when asked, at the end."""
        fs = yield self.filespace()
        yield fs.mkdir("/real/deep", parents=True)
        yield fs.write_file("/real/deep/file", b"found")
        link = yield fs.symlink("real/deep", "/shortcut")
        self.assertEqual((link.kind, link.size), (FileKind.SYMLINK, len("real/deep")))
        yield fs.symlink("/real", "/absolute")
        yield fs.symlink("../deep/file", "/real/deep/relative")
        self.assertEqual((yield fs.readlink("/shortcut")), "real/deep")
        self.assertEqual((yield fs.read_file("/shortcut/file")), b"found")
        self.assertEqual((yield fs.read_file("/absolute/deep/relative")), b"found")
        self.assertEqual((yield fs.resolve("/shortcut")).kind, FileKind.SYMLINK)
        self.assertEqual((yield fs.resolve("/shortcut", follow=True)).kind, FileKind.DIRECTORY)
        self.assertEqual((yield fs.stat("/shortcut")).size, len("real/deep"))
        yield fs.symlink("loop-b", "/loop-a")
        yield fs.symlink("loop-a", "/loop-b")
        failure = yield self.assertFailure(fs.resolve("/loop-a", follow=True), errors.TooManyLinks)
        self.assertEqual(failure.errno_name, "ELOOP")
        yield fs.symlink("nowhere", "/dangling")
        yield self.assertFailure(fs.read_file("/dangling"), errors.NotFound)
        yield self.assertFailure(fs.readlink("/real"), errors.InvalidArgument)
        # Writing through a link writes its target; removing the link leaves the target.
        yield fs.write_file("/shortcut/file", b"rewritten")
        yield fs.remove("/shortcut")
        self.assertEqual((yield fs.read_file("/real/deep/file")), b"rewritten")
        # The target the server keeps is sealed.
        inode = (yield fs.resolve("/absolute")).inode
        sealed = self.meta.store.dump()["inodes"][inode]["target"]
        self.assertNotIn(b"/real", sealed)
        self.assertEqual(len(sealed), len(b"/real") + crypto.SEALED_TARGET_OVERHEAD)

    @defer.inlineCallbacks
    def test_xattrs(self) -> Generator[Deferred[Any], Any, None]:
        """Extended attributes are set, read, listed and removed, with CREATE and REPLACE."""
        fs = yield self.filespace()
        yield fs.write_file("/tagged", b"")
        inode = (yield fs.resolve("/tagged")).inode
        inodes = fs.inodes
        yield inodes.setxattr(inode, b"user.colour", b"blue")
        yield inodes.setxattr(inode, b"user.size", b"\x00" * 1000)
        self.assertEqual((yield inodes.getxattr(inode, b"user.colour")), b"blue")
        self.assertEqual((yield inodes.listxattr(inode)), [b"user.colour", b"user.size"])
        yield self.assertFailure(inodes.setxattr(inode, b"user.colour", b"red", XattrFlags.CREATE),
                                 errors.AlreadyExists)
        yield self.assertFailure(inodes.setxattr(inode, b"user.none", b"x", XattrFlags.REPLACE), errors.NoAttribute)
        yield inodes.setxattr(inode, b"user.colour", b"red", XattrFlags.REPLACE)
        self.assertEqual((yield inodes.getxattr(inode, b"user.colour")), b"red")
        yield inodes.removexattr(inode, b"user.colour")
        failure = yield self.assertFailure(inodes.getxattr(inode, b"user.colour"), errors.NoAttribute)
        self.assertEqual(failure.errno_name, "ENODATA")
        yield self.assertFailure(inodes.removexattr(inode, b"user.colour"), errors.NoAttribute)
        self.assertEqual((yield inodes.listxattr(inode)), [b"user.size"])

    @defer.inlineCallbacks
    def test_statfs(self) -> Generator[Deferred[Any], Any, None]:
        """statfs reports the chunk size as the block size, and the bytes in files."""
        fs = yield self.filespace()
        yield fs.write_file("/a", b"x" * 1000)
        stats = yield fs.statfs()
        self.assertEqual(stats.block_size, self.chunk_size)
        self.assertEqual(stats.used_bytes, 1000)
        self.assertGreater(stats.total_bytes, stats.used_bytes)
        self.assertEqual(stats.used_inodes, 2)

    @defer.inlineCallbacks
    def test_inode_level(self) -> Generator[Deferred[Any], Any, None]:
        """The inode level works on plaintext names under parent inodes."""
        fs = yield self.filespace()
        inodes = fs.inodes
        directory = yield inodes.mkdir(1, b"dir", 0o700, 1, 2)
        self.assertEqual((directory.uid, directory.gid, stat.S_IMODE(directory.mode)), (1, 2, 0o700))
        handle = yield inodes.create(directory.inode, b"file", 0o600, os.O_RDWR | os.O_CREAT, 1, 2)
        yield handle.write(0, b"abc")
        yield handle.close()
        self.assertEqual((yield inodes.lookup(directory.inode, b"file")).size, 3)
        yield inodes.rename(directory.inode, b"file", 1, b"moved", 0)
        self.assertEqual(sorted(name for name, _ in (yield inodes.readdir(1))), [b"dir", b"moved"])
        changed = yield inodes.setattr(directory.inode, mode=0o755, mtime_ns=123)
        self.assertEqual((stat.S_IMODE(changed.mode), changed.mtime_ns), (0o755, 123))
        yield self.assertFailure(inodes.lookup(1, b"a/b"), errors.InvalidArgument)
        yield inodes.unlink(1, b"moved")
        yield inodes.rmdir(1, b"dir")
        self.assertEqual((yield inodes.readdir(1)), [])
