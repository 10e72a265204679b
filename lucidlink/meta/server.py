"""
The metadata server's lifecycle: open the store, listen, register, and stop in order.

:class:`MetaServer` is a ``MultiService`` built from a
:class:`~lucidlink.meta.config.MetaConfig`.  It listens (TLS on every
``listen`` endpoint, behind a connection cap) while privileged; when it
starts, its :class:`~lucidlink.meta.guardian.Guardian` checks the SQLite
database in the data folder (restoring it from the object store when it is
missing, damaged or behind the store) and has the server open it: reclaim
orphans left by the previous run, write the bootstrap token of a new
filespace.  Until then, and whenever a later check finds damage, every
request is answered with the retryable ``Restoring`` by the
:class:`~lucidlink.meta.guardian.Gate` all connections talk to.  When
discovery endpoints are configured, it registers with every discovery
instance and heartbeats, saying ``restoring`` or ``serving``.  Every change
is journalled (:mod:`lucidlink.meta.journal`); with a ``store`` the journal
is shipped (:mod:`lucidlink.meta.shipper`) and snapshots taken
(:mod:`lucidlink.meta.snapshots`).  Stopping reverses that: unregister
(entries expire), stop listening, say goodbye to every connection, ship what
is left and take a last snapshot (unless the database fails its check),
close the store.
"""

from __future__ import annotations

import socket
import sqlite3
from collections.abc import Sequence
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from lucidlink.discovery.announcer import Announcer
from lucidlink.discovery.shedding import ConnectionCap
from lucidlink.errors import LucidError
from lucidlink.listening import EndpointListener
from lucidlink.meta import bootstrap
from lucidlink.meta.config import MetaConfig
from lucidlink.meta.guardian import DATABASE_NAME, RESTORING_RETRY_MS, Gate, Guardian, State, check_database
from lucidlink.meta.journal import Journal, verify_chain
from lucidlink.meta.service import MetadataResponder
from lucidlink.meta.shipper import Shipper
from lucidlink.meta.snapshots import Snapshotter
from lucidlink.meta.store import MetadataStore
from lucidlink.protocol.connection import ServerConnection, ServerFactory
from lucidlink.protocol.messages import ServerStatus, StatusChanged
from lucidlink.tls import server_tls_options


class _ResponderFactory(ServerFactory):
    """Builds connections that all talk to the server's :class:`~lucidlink.meta.guardian.Gate`."""

    def __init__(self, server: MetaServer, clock: Any, **options: Any) -> None:
        super().__init__(server.gate, clock, **options)
        self.server = server
        self.noisy = False

    def buildProtocol(self, addr: Any) -> ServerConnection | None:  # type: ignore[override]
        if not self.server.running:
            return None  # stopped: the port closes the connection
        return super().buildProtocol(addr)


class MetaServer(MultiService):
    """One filespace's metadata server, assembled from ``config``.

    ``store``, ``responder``, ``shipper`` and ``snapshotter`` exist while the
    database is served; ``guardian`` and ``announcer`` while it runs.  Tests
    and tools may look at them.
    """

    log = Logger()

    def __init__(self, config: MetaConfig, reactor: Any) -> None:
        super().__init__()
        self.config = config
        self.reactor = reactor
        self.store: MetadataStore | None = None
        self.responder: MetadataResponder | None = None
        self.announcer: Announcer | None = None
        self.object_store: Any = None
        self.shipper: Shipper | None = None
        self.snapshotter: Snapshotter | None = None
        self.guardian: Guardian | None = None
        self.gate = Gate(config.filespace, config.server_id, self._database_error)
        protocol_factory = _ResponderFactory(self, reactor)
        tls_factory = TLSMemoryBIOFactory(
            server_tls_options(config.certificate, config.private_key), False, protocol_factory
        )
        self.connection_cap = ConnectionCap(tls_factory, config.max_connections)
        self.listeners = [
            EndpointListener(serverFromString(reactor, description), self.connection_cap, description)
            for description in config.listen
        ]
        for listener in self.listeners:
            listener.setServiceParent(self)

    @property
    def token_path(self) -> Any:
        return self.config.data_dir / bootstrap.TOKEN_FILE_NAME

    def startService(self) -> None:
        config = self.config
        config.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        shipped = config.store is not None and config.durability != "off"
        if not shipped:
            self.log.warn("the journal of {filespace} is not shipped (no store, or durability=off): "
                          "a lost disk loses its metadata", filespace=config.filespace)
        self.guardian = Guardian(
            self, self.gate, self.reactor, filespace=config.filespace, data_dir=config.data_dir,
            open_object_store=self._open_object_store if shipped else None,
            auto_restore=config.auto_restore, check_interval=config.check_interval,
            durability=config.durability, shipped=self._shipped, on_status=self._status_changed,
            command_hint=f"lucid-meta restore --filespace {config.filespace} --config {config.path} "
                         f"--data-dir {config.data_dir}",
        )
        super().startService()
        self.guardian.start()
        if config.discovery is not None:
            defer.gatherResults([listener.when_listening() for listener in self.listeners]).addCallbacks(
                self._announce, lambda failure: self.log.failure("not registering with discovery", failure)
            )

    # -- what the guardian opens and closes --------------------------------------------

    def open_database(self) -> MetadataResponder:
        """Open the data folder's database (a new one if missing), start shipping; the responder serving it."""
        assert self.guardian is not None
        data_dir = self.config.data_dir
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)  # the folder may have gone while running
        store = MetadataStore(data_dir / DATABASE_NAME, self.reactor, synchronous=self.synchronous)
        try:
            journal = Journal(self.reactor, on_append=self.guardian.saw_head).install(store)
            reclaimed = store.reclaim_orphans()
            bootstrap.prepare_token(store, self.token_path)
        except BaseException:
            store.close()
            raise
        if reclaimed is not None:
            self.log.info("reclaimed {count} files left open by the last run", count=len(reclaimed.record.inodes))
        self.store = store
        self._start_shipping(journal)
        self.responder = MetadataResponder(
            self.store, self.reactor, self.config.filespace,
            token_path=self.token_path, server_name=self.config.server_id,
            on_status_changed=self._status_changed,
            shipper=self.shipper if self.config.durability == "sync" else None,
            lock_grace=self.config.lock_grace,
        )
        self.log.info("serving filespace {filespace} from {data_dir}", filespace=self.config.filespace,
                      data_dir=str(data_dir))
        return self.responder

    @property
    def synchronous(self) -> str:
        """SQLite's ``synchronous`` for the database.

        With ``durability=sync`` an answer waits until the change is in the
        object store, so the local commit need not reach the disk first: a
        power cut loses at most commits the store holds, and the guardian
        replays them when the server starts.
        """
        return "NORMAL" if self.config.store is not None and self.config.durability == "sync" else "FULL"

    @defer.inlineCallbacks
    def close_database(self, reason: str, damaged: bool) -> Any:
        """End every session (telling them ``reason``), stop shipping and snapshots, close the database.

        A ``damaged`` database gets no last snapshot (it would poison the
        store's newest snapshot), and its clients hear ``StatusChanged(RESTORING)``
        first.
        """
        self.gate.stop_serving(reason)
        responder, self.responder = self.responder, None
        if responder is not None:
            if damaged:
                for session in list(responder.sessions.values()):
                    session.connection.push(StatusChanged(ServerStatus.RESTORING, RESTORING_RETRY_MS, reason))
            yield responder.close_all(reason)
        shipper, self.shipper = self.shipper, None
        if shipper is not None:
            try:
                yield shipper.stop(final=not damaged or self._tail_verifies(shipper))
            except Exception as error:  # a damaged database may fail the last shipment; the restore decides
                self.log.warn("the last shipment of {filespace} failed: {error}", filespace=self.config.filespace,
                              error=str(error))
        snapshotter, self.snapshotter = self.snapshotter, None
        if snapshotter is not None:
            try:
                yield snapshotter.stop(final=not damaged)
            except Exception as error:
                self.log.warn("the last snapshot of {filespace} failed: {error}", filespace=self.config.filespace,
                              error=str(error))
        store, self.store = self.store, None
        if store is not None:
            try:
                store.close()
            except sqlite3.Error as error:
                self.log.warn("closing the database of {filespace}: {error}", filespace=self.config.filespace,
                              error=str(error))

    def _tail_verifies(self, shipper: Shipper) -> bool:
        """Whether the records the store lacks still chain in a damaged database (then they are worth shipping)."""
        try:
            first = shipper.shipped_seq
            verify_chain(shipper.journal.entries(after=first), shipper.journal.hash_at(first), first)
        except (sqlite3.Error, LucidError) as error:
            self.log.error("the journal of {filespace} after seq {seq} cannot be read back intact ({error}); "
                           "those records are not shipped", filespace=self.config.filespace,
                           seq=shipper.shipped_seq, error=str(error))
            return False
        return True

    def _open_object_store(self) -> Any:
        """The object store of the journal, opened the first time (raises LucidError while it cannot be).

        A missing ``file://`` folder is made only when a database is here to
        fill it: with neither, an empty new folder would pass for a store
        without history, and the server would start a new filespace where
        it should have restored one.
        """
        if self.object_store is None:
            from lucidlink.objectstore import open_store

            url = self.config.store
            assert url is not None
            create = url.startswith("file:") and (self.config.data_dir / DATABASE_NAME).exists()
            self.object_store = open_store(url, self.reactor, create=create)
        return self.object_store

    def _database_error(self, error: Exception) -> None:
        if self.guardian is not None:
            self.guardian.database_error(error)

    def _shipped(self) -> int | None:
        return self.shipper.shipped_seq if self.shipper is not None else None

    def _start_shipping(self, journal: Journal) -> None:
        config = self.config
        assert self.store is not None
        if self.object_store is None:
            return
        self.shipper = Shipper(self.store, self.object_store, self.reactor, filespace=config.filespace,
                               durability=config.durability, ship_interval=config.ship_interval, journal=journal)
        self.shipper.start()
        self.snapshotter = Snapshotter(self.store, self.object_store, config.filespace, self.reactor,
                                       config.snapshot_interval, config.retention if config.prune else None)
        self.snapshotter.start()

    def _announce(self, ports: Sequence[Any]) -> None:
        settings = self.config.discovery
        if settings is None or not self.running:
            return
        self.announcer = Announcer(
            self.reactor, settings.endpoints, settings.ca_file, settings.identity,
            settings.key.key_id, settings.key.secret,
            filespace=self.config.filespace,
            server_id=self.config.server_id,
            endpoints=self.advertised(ports),
            identity=self.config.identity,
            status=self.status,
            heartbeat_interval=settings.heartbeat_interval,
        )
        self.announcer.start()

    def status(self) -> ServerStatus:
        """What the server tells discovery it is doing."""
        if self.guardian is None or self.guardian.state is State.STOPPED:
            return ServerStatus.UNKNOWN
        if self.guardian.state is State.SERVING and self.responder is not None:
            return self.responder.status
        return ServerStatus.RESTORING

    def _status_changed(self) -> None:
        if self.announcer is not None:
            self.announcer.announce_now()

    def advertised(self, ports: Sequence[Any]) -> list[str]:
        """The endpoints clients should connect to: ``advertise``, or derived from the listening ports."""
        if self.config.advertise:
            return list(self.config.advertise)
        derived = []
        for description, port in zip(self.config.listen, ports):
            endpoint = client_endpoint_for(description, port)
            if endpoint is None:
                self.log.warn("cannot tell clients how to reach {listen}; set advertise", listen=description)
            else:
                derived.append(endpoint)
        return derived

    @defer.inlineCallbacks
    def stopService(self) -> Any:
        announcer, self.announcer = self.announcer, None
        if announcer is not None:
            yield announcer.stop()
        yield defer.maybeDeferred(super().stopService)
        guardian = self.guardian
        if guardian is not None:
            yield guardian.stop()
        if self.store is not None:
            # No last snapshot of a database that fails its check: it would become the newest restore point.
            health = check_database(self.config.data_dir / DATABASE_NAME)
            if not health.ok:
                self.log.error("not taking a last snapshot of {filespace}: {problem}",
                               filespace=self.config.filespace, problem=health.problem)
            yield self.close_database("the metadata server is stopping", damaged=not health.ok)
        self.gate.stop_serving("the metadata server is stopping")
        object_store, self.object_store = self.object_store, None
        if object_store is not None:
            yield object_store.close()
        self.guardian = None


def client_endpoint_for(listen: str, port: Any) -> str | None:
    """The client endpoint string that reaches a server listening on ``listen`` (now at ``port``)."""
    kind = listen.split(":", 1)[0].lower()
    address = port.getHost()
    if kind in ("tcp", "tcp6"):
        host = _interface(listen)
        if host in ("", "0.0.0.0", "::"):
            host = socket.getfqdn()
        if ":" in host:
            return f"tcp6:host={host.replace(':', chr(92) + ':')}:port={address.port}"
        return f"tcp:{host}:{address.port}"
    if kind == "unix":
        return f"unix:{address.name.decode() if isinstance(address.name, bytes) else address.name}"
    return None


def _interface(listen: str) -> str:
    for part in listen.replace("\\:", "\0").split(":")[1:]:
        if part.startswith("interface="):
            return part[len("interface="):].replace("\0", ":")
    return ""
