"""
The whole system on the S3 backend: the integration tests of the metadata
server's shipping and restore, of ``lucid-meta``, of the ``lucid`` file
commands and of a real mount, run again with an ``s3://`` store on the test
process's ``moto_server`` (see :class:`tests.s3_fixtures.S3StoreMixin`).

The test classes are the ones written for the local store, subclassed; the
modules are imported whole so that trial does not collect their classes
twice.
"""

from __future__ import annotations

import hashlib
from typing import Any

from tests import test_cli_files, test_cli_meta, test_meta_tap, test_mount_posix
from tests.s3_fixtures import S3StoreMixin


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
