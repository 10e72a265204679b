"""
Shared pieces of the metadata server tests: a store on a temporary file with
a task.Clock, and valid-looking credentials.
"""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path
from typing import Any

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lucidlink import crypto
from lucidlink.meta import mutations as m
from lucidlink.meta.store import MetadataStore
from lucidlink.protocol.messages import Credentials, KdfParameters

CHUNK_SIZE = 1024
FILESPACE_ID = bytes(range(16))
START_TIME = 1_700_000_000.0


def credentials(user: str, passphrase_secret: bytes | None = None) -> Credentials:
    """Credentials the way a client makes them, without running Argon2."""
    secret = passphrase_secret or hashlib.sha256(user.encode()).digest()
    salt = hashlib.sha256(b"salt" + user.encode()).digest()[:16]
    return Credentials(KdfParameters(salt, 3, 65536, 1), secret, b"wrapped key of " + user.encode())


def initialise_record(admin: str = "admin") -> m.Initialise:
    """The record a Bootstrap by ``admin`` makes."""
    creds = credentials(admin)
    return m.Initialise(
        FILESPACE_ID, CHUNK_SIZE, admin, creds.kdf.salt, creds.kdf.time_cost, creds.kdf.memory_kib,
        creds.kdf.parallelism, crypto.login_verifier(creds.login_secret, creds.kdf.salt), creds.wrapped_key,
    )


class StoreTestCase(SynchronousTestCase):
    """An initialised store in a temporary folder, on a clock that starts in 2023."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(START_TIME)
        self.folder = Path(self.mktemp())
        self.folder.mkdir()
        self.store = self.open_store()
        self.store.apply(initialise_record())

    def open_store(self, name: str = "metadata.sqlite3", **options: Any) -> MetadataStore:
        store = MetadataStore(self.folder / name, self.clock, **options)
        self.addCleanup(store.close)
        return store

    def tick(self, seconds: float = 1.0) -> None:
        self.clock.advance(seconds)

    # -- shorthands ------------------------------------------------------------

    def mkdir(self, parent: int, name: bytes, mode: int = 0o755) -> int:
        return self.store.apply(m.MakeDirectory(parent, name, mode, 1000, 1000)).value.inode

    def create(self, parent: int, name: bytes, mode: int = 0o644) -> int:
        return self.store.apply(m.CreateFile(parent, name, mode, 1000, 1000, True)).value[0].inode

    def write(self, inode: int, size: int, chunks: list[tuple[int, bytes, int, int]], expected: int = 0) -> Any:
        return self.store.apply(m.CommitChunks(inode, expected, size, tuple(chunks))).value

    def names(self, directory: int) -> list[bytes]:
        entries, _, _ = self.store.readdir(directory)
        return [name for name, _ in entries]

    def assert_kind(self, inode: int, kind: int) -> None:
        mode = self.store.getattr(inode).mode
        self.assertEqual(stat.S_IFMT(mode), kind)
