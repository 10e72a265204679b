"""
The metadata server's lifecycle: open the store, listen, register, and stop in order.

:class:`MetaServer` is a ``MultiService`` built from a
:class:`~lucidlink.meta.config.MetaConfig`.  It listens (TLS on every
``listen`` endpoint, behind a connection cap) while privileged; when it
starts it opens the SQLite store in the data folder, reclaims orphans left
by the previous run, writes the bootstrap token of a new filespace, and,
when discovery endpoints are configured, registers with every discovery
instance and heartbeats.  Every change is journalled
(:mod:`lucidlink.meta.journal`); with a ``store`` the journal is shipped
(:mod:`lucidlink.meta.shipper`) and snapshots taken
(:mod:`lucidlink.meta.snapshots`).  Stopping reverses that: unregister
(entries expire), stop listening, say goodbye to every connection, ship what
is left and take a last snapshot, close the store.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Any

from twisted.application.service import MultiService
from twisted.internet import defer
from twisted.internet.endpoints import serverFromString
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory

from lucidlink.discovery.announcer import Announcer
from lucidlink.discovery.shedding import ConnectionCap
from lucidlink.listening import EndpointListener
from lucidlink.meta import bootstrap
from lucidlink.meta.config import MetaConfig
from lucidlink.meta.journal import Journal
from lucidlink.meta.service import MetadataResponder
from lucidlink.meta.shipper import Shipper
from lucidlink.meta.snapshots import Snapshotter
from lucidlink.meta.store import MetadataStore
from lucidlink.protocol.connection import ServerConnection, ServerFactory
from lucidlink.protocol.messages import ServerStatus
from lucidlink.tls import server_tls_options

DATABASE_NAME = "metadata.sqlite3"


class _ResponderFactory(ServerFactory):
    """Builds connections for the server's responder, which exists only once the server has started."""

    def __init__(self, server: MetaServer, clock: Any, **options: Any) -> None:
        super().__init__(None, clock, **options)  # type: ignore[arg-type]
        self.server = server
        self.noisy = False

    def buildProtocol(self, addr: Any) -> ServerConnection | None:  # type: ignore[override]
        if self.server.responder is None:
            return None  # not started (or stopped): the port closes the connection
        self.responder = self.server.responder
        return super().buildProtocol(addr)


class MetaServer(MultiService):
    """One filespace's metadata server, assembled from ``config``.

    ``store``, ``responder`` and ``announcer`` exist while it runs; tests and
    tools may look at them.
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
        data_dir = self.config.data_dir
        data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.store = MetadataStore(data_dir / DATABASE_NAME, self.reactor)
        journal = Journal(self.reactor).install(self.store)
        self._start_shipping(journal)
        reclaimed = self.store.reclaim_orphans()
        if reclaimed is not None:
            self.log.info("reclaimed {count} files left open by the last run", count=len(reclaimed.record.inodes))
        bootstrap.prepare_token(self.store, self.token_path)
        self.responder = MetadataResponder(
            self.store, self.reactor, self.config.filespace,
            token_path=self.token_path, server_name=self.config.server_id,
            on_status_changed=self._status_changed,
            shipper=self.shipper if self.config.durability == "sync" else None,
        )
        super().startService()
        self.log.info("serving filespace {filespace} from {data_dir}", filespace=self.config.filespace,
                      data_dir=str(data_dir))
        if self.config.discovery is not None:
            defer.gatherResults([listener.when_listening() for listener in self.listeners]).addCallbacks(
                self._announce, lambda failure: self.log.failure("not registering with discovery", failure)
            )

    def _start_shipping(self, journal: Journal) -> None:
        config = self.config
        assert self.store is not None
        if config.store is None or config.durability == "off":
            self.log.warn("the journal of {filespace} is not shipped (no store, or durability=off): "
                          "a lost disk loses its metadata", filespace=config.filespace)
            return
        from lucidlink.objectstore import open_store

        self.object_store = open_store(config.store, self.reactor, create=config.store.startswith("file:"))
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
        return self.responder.status if self.responder is not None else ServerStatus.UNKNOWN

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
        responder, self.responder = self.responder, None
        if responder is not None:
            yield responder.close_all("the metadata server is stopping")
        shipper, self.shipper = self.shipper, None
        if shipper is not None:
            yield shipper.stop()
        snapshotter, self.snapshotter = self.snapshotter, None
        if snapshotter is not None:
            yield snapshotter.stop()
        object_store, self.object_store = self.object_store, None
        if object_store is not None:
            yield object_store.close()
        store, self.store = self.store, None
        if store is not None:
            store.close()


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
