"""
Two real ``twistd lucid-discovery`` processes on loopback: a metadata
server registers with both, clients resolve, one instance is stopped and
the clients fail over to the other.
"""

from __future__ import annotations

import json
import random
import signal
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.trial.unittest import TestCase

from lucidlink import errors
from lucidlink.client.endpoint_cache import EndpointCache
from lucidlink.client.resolver import Resolver
from lucidlink.discovery.announcer import Announcer
from lucidlink.protocol.messages import ServerStatus
from tests.discovery_fixtures import DISCOVERY_IDENTITY, KEY_ID, SECRET, write_config
from tests.processes import free_port, start_service, wait_for_port


class TwoDiscoveryInstancesTests(TestCase):
    """Failover between real discovery processes."""

    timeout = 60

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.base = Path(self.mktemp()).absolute()
        self.ports = [free_port(), free_port()]
        self.services = []
        for index, port in enumerate(self.ports):
            folder = self.base / f"discovery{index}"
            if index == 1:  # the same certificate on both instances
                folder.mkdir(parents=True)
                for name in ("discovery.pem", "discovery.key"):
                    (folder / name).write_bytes((self.base / "discovery0" / name).read_bytes())
            config = write_config(
                folder,
                listen=f"tcp:{port}:interface=127.0.0.1",
                metrics_listen="",
                entry_ttl="4",
                heartbeat_interval="1",
            )
            service = start_service(self, ["lucid-discovery", "--config", str(config)], self.base / f"discovery{index}.log")
            self.services.append(service)
        for port, service in zip(self.ports, self.services):
            yield wait_for_port(port, service)
        self.ca_file = self.base / "discovery0" / "ca" / "ca.pem"
        self.endpoints = [f"tcp:127.0.0.1:{port}" for port in self.ports]
        self.announcer = Announcer(
            reactor, self.endpoints, self.ca_file, DISCOVERY_IDENTITY, KEY_ID, SECRET,
            filespace="alpha", server_id="meta-1", endpoints=["tcp:127.0.0.1:7101"],
            identity="alpha.meta.lucid", status=lambda: ServerStatus.SERVING,
        )
        self.announcer.start()
        self.addCleanup(self.announcer.stop)

    def resolver(self, seed: int, state: str | None = None) -> Resolver:
        cache = EndpointCache(self.base / state) if state else None
        resolver = Resolver(
            reactor, self.endpoints, self.ca_file, DISCOVERY_IDENTITY, cache=cache, rng=random.Random(seed),
            attempt_timeout=3,
        )
        self.addCleanup(resolver.close)
        return resolver

    @defer.inlineCallbacks
    def resolved_by_all(self) -> Any:
        """Wait until both instances answer for alpha (the announcer has registered)."""
        for _ in range(100):
            answers = []
            for index in range(2):
                only = Resolver(reactor, [self.endpoints[index]], self.ca_file, DISCOVERY_IDENTITY, attempt_timeout=3)
                try:
                    answers.append((yield only.resolve_once("alpha", reactor.seconds() + 3)))  # type: ignore[attr-defined]
                except errors.LucidError:
                    pass
                finally:
                    yield only.close()
            if len(answers) == 2:
                return answers
            yield task.deferLater(reactor, 0.2, lambda: None)  # type: ignore[arg-type]
        self.fail("the announcer never registered with both instances")

    @defer.inlineCallbacks
    def test_client_fails_over_when_one_instance_stops(self) -> Any:
        """With one instance stopped, every client still resolves through the other."""
        answers = yield self.resolved_by_all()
        self.assertEqual([a.endpoints for a in answers], [("tcp:127.0.0.1:7101",)] * 2)
        self.services[0].stop(signal.SIGTERM)
        for seed in range(6):  # random orders: some try the stopped instance first
            location = yield self.resolver(seed).resolve("alpha", deadline=reactor.seconds() + 20)  # type: ignore[attr-defined]
            self.assertEqual(location.identity, "alpha.meta.lucid")

    @defer.inlineCallbacks
    def test_endpoint_cache_survives_client_restart(self) -> Any:
        """A second client process (same state folder) knows the answer without asking."""
        yield self.resolved_by_all()
        first = self.resolver(1, "state")
        yield first.resolve("alpha", deadline=reactor.seconds() + 10)  # type: ignore[attr-defined]
        stored = json.loads((self.base / "state" / "endpoints.json").read_text())
        self.assertIn("alpha", json.dumps(stored))
        for service in self.services:
            service.stop(signal.SIGTERM)
        second = self.resolver(2, "state")
        location = yield second.locate("alpha")
        self.assertEqual(location.endpoints, ("tcp:127.0.0.1:7101",))
        self.assertEqual(second.discovery_requests, 0)

    @defer.inlineCallbacks
    def test_unknown_filespace(self) -> Any:
        """Both instances say NOT_FOUND for a name nobody registered."""
        yield self.resolved_by_all()
        with self.assertRaises(errors.UnknownFilespace):
            yield self.resolver(3).resolve("nobody", deadline=reactor.seconds() + 10)  # type: ignore[attr-defined]
