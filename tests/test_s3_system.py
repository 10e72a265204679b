"""
The whole system on the S3 backend: the integration tests of the metadata
server's shipping and restore, of ``lucid-meta``, of the ``lucid`` file
commands, of a real mount, of write-back with client processes that die,
and the metadata server's fault tests (``kill -9``, a damaged database, a
damaged journal segment, the store unreachable), run again with an
``s3://`` store on the test process's ``moto_server`` (see
:class:`tests.s3_fixtures.S3StoreMixin`).

The test classes are the ones written for the local store, subclassed; the
modules are imported whole so that trial does not collect their classes
twice.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from twisted.internet import defer, reactor

from lucidlink.chunk_keys import parse_chunk_key
from lucidlink.objectstore.s3 import S3ObjectStore
from tests import (
    test_cli_files,
    test_cli_meta,
    test_client_writeback_processes,
    test_meta_chunk_gc,
    test_meta_faults,
    test_meta_tap,
    test_mount_posix,
)
from tests.s3_fixtures import OutageProxy, S3StoreMixin, make_store


class S3ShippingServerTests(S3StoreMixin, test_meta_tap.ShippingServerTests):
    """A metadata server shipping its journal and snapshots to S3 (durability=sync), restored from there."""

    async def test_writes_are_shipped_and_restorable(self) -> None:
        await super().test_writes_are_shipped_and_restorable()
        filespace = test_meta_tap.FILESPACE
        self.assertStoredInBucket(f"{filespace}/journal/", f"{filespace}/snapshots/")


class S3LucidMetaTests(S3StoreMixin, test_cli_meta.LucidMetaTests):
    """
    ``lucid-meta verify``, ``restore`` and ``restore-all`` reading an S3 store.

    The tests lay objects out in the folder ``root``, as for a ``file://``
    store; before each command, what changed there is put into (or removed
    from) the bucket, which is the only store the command sees.
    """

    def setUp(self) -> None:
        self.mirrored: dict[str, bytes] = {}
        super().setUp()

    def mirror(self) -> None:
        """Make the bucket under the prefix hold exactly the files under ``root``."""
        client = self.moto.client()
        present = {}
        for path in self.root.rglob("*"):
            if path.is_file():
                key = path.relative_to(self.root).as_posix()
                data = path.read_bytes()
                present[key] = hashlib.sha256(data).digest()
                if self.mirrored.get(key) != present[key]:
                    client.put_object(Bucket=self.s3_bucket, Key=f"{self.s3_prefix}/{key}", Body=data)
        for key in set(self.mirrored) - set(present):
            client.delete_object(Bucket=self.s3_bucket, Key=f"{self.s3_prefix}/{key}")
        self.mirrored = present

    def lucid_meta(self, *argv: str) -> Any:
        self.mirror()
        return super().lucid_meta(*argv)


class S3ChunkCollectionTests(S3StoreMixin, test_meta_chunk_gc.CollectCommandTests):
    """``lucid-meta gc`` on an S3 store: listing, and batch deletes (``DeleteObjects``)."""

    def publish(self, objects: dict[str, bytes]) -> None:
        client = self.moto.client()
        for key, data in objects.items():
            client.put_object(Bucket=self.s3_bucket, Key=f"{self.s3_prefix}/{key}", Body=data)

    def chunk_files(self) -> set[bytes]:
        return {object_id for key in self.keys_in_bucket()
                if (object_id := parse_chunk_key(self.fs.filespace_id, key)) is not None}

    @defer.inlineCallbacks
    def test_gc_keeps_recent_uploads_then_collects_with_a_short_grace(self) -> None:
        """Every object here was written just now: the replaced chunk goes, the uncommitted upload stays."""
        for grace in ("7d", "1h"):
            status, out, err = yield self.lucid_meta("gc", "--config", str(self.config), "--retention", "1h",
                                                     "--grace", grace)
            self.assertEqual((status, err), (0, ""))
            self.assertEqual(self.chunk_files(), {self.current, self.abandoned})
        self.assertIn("1 recent uploads kept", out)


class S3CommandLineTests(S3StoreMixin, test_cli_files.CommandLineTests):
    """The ``lucid`` file commands against a demo whose chunks, journal and snapshots live in S3."""

    def test_files_and_failures(self) -> None:
        super().test_files_and_failures()
        self.assertStoredInBucket("/chunks/", "demo/journal/")
        self.assertFalse((self.demo.directory / "objects").exists())


class S3MountTests(S3StoreMixin, test_mount_posix.MountTests):
    """A real mount of a demo filespace kept in S3: POSIX behaviour and the mount's lifecycle."""

    def test_posix_behaviour(self) -> None:
        super().test_posix_behaviour()
        self.assertStoredInBucket("/chunks/", "demo/journal/")
        self.assertFalse((self.demo.directory / "objects").exists())


class S3FaultStore(S3StoreMixin):
    """
    The fault tests' store on S3: the metadata server reaches moto through
    an :class:`~tests.s3_fixtures.OutageProxy`, so that "the store goes
    away" is moto's port refusing connections; the clients put their chunks
    straight into moto, under a prefix of their own.
    """

    def s3_endpoint(self) -> str:
        self.proxy = OutageProxy(self.moto)
        self.addCleanup(self.proxy.go_away)  # type: ignore[attr-defined]
        return self.proxy.endpoint

    def chunk_store(self) -> S3ObjectStore:
        self.store_url()
        return make_store(reactor, self.moto.endpoint, self.s3_bucket, "chunks")

    @contextmanager
    def store_away(self) -> Iterator[None]:
        self.proxy.go_away()
        try:
            yield
        finally:
            self.proxy.come_back()

    def journal_segments(self) -> list[str]:
        return [
            key for key in self.keys_in_bucket() if key.startswith(f"{test_meta_faults.FILESPACE}/journal/")
        ]

    def damage_object(self, key: str) -> None:
        client, name = self.moto.client(), f"{self.s3_prefix}/{key}"
        data = bytearray(client.get_object(Bucket=self.s3_bucket, Key=name)["Body"].read())
        data[len(data) // 2] ^= 0xFF
        client.put_object(Bucket=self.s3_bucket, Key=name, Body=bytes(data))


class S3KillTests(S3FaultStore, test_meta_faults.KillTests):
    """``kill -9`` under load, its journal shipped to S3; then its disk lost, restored from S3."""


class S3SyncDamageTests(S3FaultStore, test_meta_faults.SyncDamageTests):
    """The database damaged, truncated and deleted (running and stopped): restored from S3 each time."""


class S3AsyncDamageTests(S3FaultStore, test_meta_faults.AsyncDamageTests):
    """durability=async on S3: the loss is bounded by ship_interval and logged."""


class S3StoreOutageTests(S3FaultStore, test_meta_faults.StoreOutageTests):
    """The S3 endpoint refusing connections for a while (durability=sync)."""


class S3CorruptSegmentTests(S3FaultStore, test_meta_faults.CorruptSegmentTests):
    """A journal segment damaged in the bucket: the restore stops at the last good record."""


class S3WriteBackProcessTests(S3StoreMixin, test_client_writeback_processes.WriteBackProcessTests):
    """Client processes dying with writes pending, and the metadata server killed, on a demo kept in S3."""
