"""
A real ``twistd lucid-meta`` killed with SIGKILL in the middle of group
commits: every change it acknowledged is in its database and in the object
store, and the journal's hash chain holds.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections import Counter
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from lucidlink import errors
from lucidlink.meta import mutations as m
from lucidlink.meta.bootstrap import TOKEN_FILE_NAME, read_token
from lucidlink.meta.config import identity_for
from lucidlink.meta.journal import Journal
from lucidlink.meta.server import DATABASE_NAME
from lucidlink.meta.snapshots import restore
from lucidlink.meta.store import ROOT_INODE, MetadataStore
from lucidlink.objectstore import open_store
from lucidlink.protocol.messages import Bootstrap, Create, Login, MkDir, ServerStatus
from lucidlink.protocol.network import connect_tls
from tests.meta_helpers import CHUNK_SIZE, FILESPACE_ID, credentials
from tests.processes import free_port, start_service, wait_for_port
from tests.test_meta_tap import make_certificates, write_config

FILESPACE = "reels"
CLIENTS = 4
IN_FLIGHT = 48
"""Requests each client keeps in flight, so that every group commit holds many changes."""


class Writer:
    """One connection that keeps ``IN_FLIGHT`` creations going and notes each acknowledged one."""

    def __init__(self, connection: Any, prefix: bytes, acknowledged: list[bytes]) -> None:
        self.connection = connection
        self.prefix = prefix
        self.acknowledged = acknowledged
        self.sent = 0
        self.in_flight = 0
        self.stopped = False

    def start(self) -> None:
        for _ in range(IN_FLIGHT):
            self.send()

    def send(self) -> None:
        if self.stopped:
            return
        name = b"%s-%06d" % (self.prefix, self.sent)
        request = (MkDir(ROOT_INODE, name, 0o755, 0, 0) if self.sent % 3 == 0
                   else Create(ROOT_INODE, name, 0o644, 0, 0, True, 0))
        self.sent += 1
        self.in_flight += 1
        self.connection.request(request, timeout=30).addCallbacks(self.answered, self.failed, (name,))

    def answered(self, _: Any, name: bytes) -> None:
        self.in_flight -= 1
        self.acknowledged.append(name)
        self.send()

    def failed(self, failure: Any) -> None:
        self.in_flight -= 1
        failure.trap(errors.LucidError)
        self.stopped = True


class KillMidGroupTests(TestCase):
    """SIGKILL while many changes are being grouped, committed and shipped."""

    timeout = 120

    @defer.inlineCallbacks
    def test_acknowledged_changes_survive_kill(self) -> Any:
        """Every acknowledged change is in the database and the store after kill -9; the chain is intact."""
        directory = Path(self.mktemp()).resolve()
        make_certificates(directory, FILESPACE)
        objects = directory / "objects"
        objects.mkdir()
        port = free_port()
        config = write_config(directory, listen=f"tcp:{port}:interface=127.0.0.1", store=objects.as_uri(),
                              durability="sync")
        server = start_service(self, ["--logfile", str(directory / "meta.log"), "lucid-meta", "--filespace",
                                      FILESPACE, "--config", str(config)], directory / "twistd.out")
        yield wait_for_port(port, server)
        data_dir = directory / "data" / FILESPACE

        def connect() -> Any:
            return connect_tls(
                reactor, f"tcp:127.0.0.1:{port}", directory / "ca" / "ca.pem", identity_for(FILESPACE),
                filespace=FILESPACE, keepalive_interval=0,
            )

        # A connection made while the server still checks its database is closed once it serves.
        deadline = time.monotonic() + 60
        while True:
            probe = yield connect()
            status = probe.welcome.status
            yield probe.close("probe")
            if status == ServerStatus.UNINITIALIZED or time.monotonic() > deadline:
                break
            yield task.deferLater(reactor, 0.1, lambda: None)
        connections = []
        for _ in range(CLIENTS):
            connection = yield connect()
            self.addCleanup(connection.close, "test over")
            connections.append(connection)
        yield connections[0].request(Bootstrap(
            read_token(data_dir / TOKEN_FILE_NAME), "admin", credentials("admin"), CHUNK_SIZE, FILESPACE_ID, b""
        ))
        for connection in connections:
            yield connection.request(Login("admin", credentials("admin").login_secret))

        acknowledged: list[bytes] = []
        writers = [Writer(connection, b"c%d" % index, acknowledged) for index, connection in enumerate(connections)]
        for writer in writers:
            writer.start()
        while len(acknowledged) < 1500:
            yield task.deferLater(reactor, 0.02, lambda: None)
        os.kill(server.pid, signal.SIGKILL)
        known = len(acknowledged)
        in_flight = sum(writer.in_flight for writer in writers)
        self.assertEqual(server.process.wait(10), -signal.SIGKILL)
        for connection in connections:
            yield connection.when_lost()
        # Answers that were on their way when the process died count too: the server sent them.
        self.assertGreater(in_flight, 0, "no change was in flight when the server died")
        self.assertGreaterEqual(len(acknowledged), known)

        # The database as the next start finds it (SQLite recovers the WAL on open).
        store = MetadataStore(data_dir / DATABASE_NAME, task.Clock())
        self.addCleanup(store.close)
        journal = Journal(task.Clock()).install(store)
        head, _ = journal.verify()
        (records,) = store._db.execute("SELECT COUNT(*) FROM journal").fetchone()
        self.assertEqual(head, records)
        self.assertEqual(store._db.execute("PRAGMA integrity_check").fetchone(), ("ok",))
        entries, _, _ = store.readdir(ROOT_INODE, b"", 0)
        names = {name for name, _ in entries}
        while len(entries) == 4096:
            entries, _, _ = store.readdir(ROOT_INODE, entries[-1][0], 0)
            names.update(name for name, _ in entries)
        missing = set(acknowledged) - names
        self.assertEqual(missing, set(), f"{len(missing)} acknowledged changes lost")
        # One journal record per change, and nothing else but the bootstrap's.
        kinds = Counter(m.decode(entry.record).KIND for entry in journal.entries())
        self.assertEqual(kinds.pop(m.MakeDirectory.KIND) + kinds.pop(m.CreateFile.KIND), len(names))
        self.assertEqual(kinds, {m.SetBootstrapToken.KIND: 1, m.Initialise.KIND: 1})

        # durability=sync: the object store alone rebuilds every acknowledged change, chain verified.
        object_store = open_store(objects.as_uri(), reactor)
        self.addCleanup(object_store.close)
        restored_path = directory / "restored.sqlite3"
        yield restore(object_store, FILESPACE, restored_path)
        restored = MetadataStore(restored_path, task.Clock())
        self.addCleanup(restored.close)
        for name in acknowledged:
            restored.lookup(ROOT_INODE, name)
        with sqlite3.connect(restored_path) as copy:
            (restored_records,) = copy.execute("SELECT COUNT(*) FROM journal").fetchone()
        self.assertLessEqual(restored_records, records)
