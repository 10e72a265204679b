"""
The contract of IObjectStore, written once for every backend.

A backend's tests mix :class:`ObjectStoreBehaviourMixin` into a trial
``TestCase`` and define ``make_store()``, which returns a fresh, empty store
(or a Deferred of one).  The store is closed after each test.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, DeferredList, maybeDeferred
from zope.interface.verify import verifyObject

from lucidlink.errors import AlreadyExists, InvalidArgument, LucidError, NotFound
from lucidlink.objectstore.interface import IObjectStore, ObjectInfo

if TYPE_CHECKING:
    from twisted.trial.unittest import TestCase as _TestCase
else:
    _TestCase = object

INVALID_KEYS = [
    "",
    "/absolute",
    "a//b",
    "a/",
    "..",
    "../escape",
    "a/../b",
    "a/./b",
    ".hidden",
    "a/.hidden",
    "with space",
    "back\\slash",
    "nul\x00",
    "ünïcode",
    "x" * 1025,
    "p" * 256,
]


class ObjectStoreBehaviourMixin(_TestCase):
    """Everything IObjectStore promises, against the store ``make_store()`` returns."""

    store: Any

    def make_store(self) -> Any:
        raise NotImplementedError("a backend's test case says how to make its store")

    async def setUp(self) -> None:
        self.store = await maybeDeferred(self.make_store)
        self.addCleanup(self.store.close)

    async def refused(self, deferred: Deferred[Any], error: type[LucidError], *words: str) -> LucidError:
        """Wait for ``deferred`` to fail with ``error`` whose message holds ``words``."""
        caught: LucidError = await self.assertFailure(deferred, error)
        for word in words:
            self.assertIn(word, str(caught))
        return caught

    def test_provides_interface(self) -> None:
        """The store provides every method of IObjectStore."""
        self.assertTrue(verifyObject(IObjectStore, self.store))

    async def test_put_then_get(self) -> None:
        """What is put is got back, byte for byte."""
        self.assertIsNone(await self.store.put("chunks/ab/object", b"sealed bytes"))
        self.assertEqual(await self.store.get("chunks/ab/object"), b"sealed bytes")

    async def test_put_accepts_bytes_like(self) -> None:
        """bytearray and memoryview data are stored as their bytes."""
        await self.store.put("a", bytearray(b"array"))
        await self.store.put("b", memoryview(b"xxview")[2:])
        self.assertEqual(await self.store.get("a"), b"array")
        self.assertEqual(await self.store.get("b"), b"view")

    async def test_empty_and_large_objects(self) -> None:
        """An empty object and a multi-megabyte one both round-trip."""
        large = bytes(range(256)) * (3 * 4096 + 7)
        await self.store.put("empty", b"")
        await self.store.put("large", large)
        self.assertEqual(await self.store.get("empty"), b"")
        self.assertEqual(await self.store.get("large"), large)

    async def test_put_replaces(self) -> None:
        """A plain put replaces an existing object."""
        await self.store.put("key", b"old")
        await self.store.put("key", b"new and longer")
        self.assertEqual(await self.store.get("key"), b"new and longer")

    async def test_create_only_creates(self) -> None:
        """A create-only put of a new key stores the object."""
        await self.store.put("journal/segment-1", b"records", create_only=True)
        self.assertEqual(await self.store.get("journal/segment-1"), b"records")

    async def test_create_only_never_replaces(self) -> None:
        """A create-only put of an existing key fails with AlreadyExists and changes nothing."""
        await self.store.put("journal/segment-1", b"first")
        await self.refused(
            self.store.put("journal/segment-1", b"second", create_only=True), AlreadyExists, "journal/segment-1"
        )
        self.assertEqual(await self.store.get("journal/segment-1"), b"first")

    async def test_concurrent_create_only_one_wins(self) -> None:
        """Of several concurrent create-only puts of one key exactly one succeeds, and its data stays."""
        attempts = [self.store.put("race", f"writer {n}".encode(), create_only=True) for n in range(6)]
        results = await DeferredList(attempts, consumeErrors=True)
        winners = [n for n, (ok, _) in enumerate(results) if ok]
        self.assertEqual(len(winners), 1)
        for ok, outcome in results:
            if not ok:
                outcome.trap(AlreadyExists)
        self.assertEqual(await self.store.get("race"), f"writer {winners[0]}".encode())

    async def test_concurrent_puts(self) -> None:
        """Many puts in flight at once all land."""
        await DeferredList([self.store.put(f"many/{n:03}", bytes([n]) * n) for n in range(40)], fireOnOneErrback=True)
        listed = await self.store.list("many/")
        self.assertEqual([info.size for info in listed], list(range(40)))

    async def test_get_missing(self) -> None:
        """Getting an absent object fails with NotFound naming the key."""
        await self.refused(self.store.get("absent/key"), NotFound, "absent/key")

    async def test_get_range(self) -> None:
        """A ranged get returns exactly the range, short at the end, empty past it."""
        data = bytes(range(200))
        await self.store.put("ranged", data)
        for start, length in [(0, 200), (0, 1), (10, 20), (199, 1), (150, 100), (200, 10), (500, 10), (5, 0)]:
            got = await self.store.get_range("ranged", start, length)
            self.assertEqual(got, data[start : start + length], (start, length))

    async def test_get_range_missing(self) -> None:
        """A ranged get of an absent object fails with NotFound, whatever the range."""
        await self.refused(self.store.get_range("absent", 0, 10), NotFound, "absent")
        await self.refused(self.store.get_range("absent", 0, 0), NotFound, "absent")

    async def test_get_range_negative(self) -> None:
        """Negative starts and lengths are refused."""
        await self.store.put("ranged", b"data")
        await self.refused(self.store.get_range("ranged", -1, 2), InvalidArgument)
        await self.refused(self.store.get_range("ranged", 0, -2), InvalidArgument)

    async def test_delete(self) -> None:
        """A deleted object is gone, and its key can be created again."""
        await self.store.put("doomed", b"x")
        self.assertIsNone(await self.store.delete("doomed"))
        await self.refused(self.store.get("doomed"), NotFound)
        await self.store.put("doomed", b"again", create_only=True)
        self.assertEqual(await self.store.get("doomed"), b"again")

    async def test_delete_missing_is_fine(self) -> None:
        """Deleting an absent object succeeds, so deletes can be retried."""
        self.assertIsNone(await self.store.delete("never/was"))

    async def test_head(self) -> None:
        """head describes an object without reading it."""
        await self.store.put("described", b"12345")
        info = await self.store.head("described")
        self.assertEqual((info.key, info.size), ("described", 5))
        self.assertLess(abs(info.modified - time.time()), 300)

    async def test_head_missing(self) -> None:
        """head of an absent object fails with NotFound naming the key."""
        await self.refused(self.store.head("absent"), NotFound, "absent")

    async def test_list(self) -> None:
        """list gives every object under a prefix, sorted by key, with sizes."""
        for key in ["b/2", "a/1", "b/10", "b/1/x", "c", "b-side"]:
            await self.store.put(key, key.encode())
        everything = await self.store.list()
        keys = ["a/1", "b-side", "b/1/x", "b/10", "b/2", "c"]
        self.assertEqual([info.key for info in everything], keys)
        self.assertEqual([info.size for info in everything], [len(key) for key in keys])
        self.assertTrue(all(isinstance(info, ObjectInfo) for info in everything))

    async def test_list_prefix_is_a_string_prefix(self) -> None:
        """A prefix matches keys that begin with it, across folder boundaries, as in S3."""
        for key in ["snap/1/manifest", "snap/10", "snap/2", "snapshots", "other"]:
            await self.store.put(key, b"")
        listed = await self.store.list("snap/1")
        self.assertEqual([info.key for info in listed], ["snap/1/manifest", "snap/10"])
        listed = await self.store.list("snap")
        self.assertEqual(len(listed), 4)
        listed = await self.store.list("snap/")
        self.assertEqual(len(listed), 3)
        self.assertEqual(await self.store.list("nothing/here"), [])

    async def test_list_empty_store(self) -> None:
        """A new store lists nothing."""
        self.assertEqual(await self.store.list(), [])

    async def test_list_after_delete(self) -> None:
        """Deleted objects are not listed."""
        await self.store.put("keep", b"")
        await self.store.put("drop/me", b"")
        await self.store.delete("drop/me")
        self.assertEqual([info.key for info in await self.store.list()], ["keep"])

    async def test_unusual_valid_keys(self) -> None:
        """Every allowed character, dots inside parts and long keys work."""
        keys = ["A-Z_a-z.0-9=", "x/y.z/w..v", "k" * 255, "/".join(["p"] * 100)]
        for key in keys:
            await self.store.put(key, key.encode())
            self.assertEqual(await self.store.get(key), key.encode())

    async def test_invalid_keys_refused(self) -> None:
        """Every operation refuses keys that are empty, absolute, dotted or hold odd characters."""
        for key in INVALID_KEYS:
            await self.refused(self.store.put(key, b"x"), InvalidArgument)
            await self.refused(self.store.get(key), InvalidArgument)
            await self.refused(self.store.get_range(key, 0, 1), InvalidArgument)
            await self.refused(self.store.head(key), InvalidArgument)
            await self.refused(self.store.delete(key), InvalidArgument)
        self.assertEqual(await self.store.list(), [])

    async def test_invalid_prefixes_refused(self) -> None:
        """list refuses prefixes no valid key can begin with."""
        for prefix in ["/", "../", "a//", "a/../", "with space", ".hidden/"]:
            await self.refused(self.store.list(prefix), InvalidArgument)
