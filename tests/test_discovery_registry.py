"""
The soft-state registry: registration, renewal, expiry, preference and its
bound, driven by a task.Clock.
"""

from __future__ import annotations

from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from lucidlink import errors
from lucidlink.discovery.registry import Registry
from lucidlink.protocol.messages import ServerStatus

SERVING, RESTORING, DRAINING = ServerStatus.SERVING, ServerStatus.RESTORING, ServerStatus.DRAINING


class RegistryTests(SynchronousTestCase):
    """Entries live for entry_ttl after their last renewal."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.registry = Registry(self.clock, entry_ttl=15, max_entries=4)

    def register(self, filespace: str = "fs", server: str = "meta-1", status: ServerStatus = SERVING,
                 endpoint: str = "tcp:10.0.0.1:7001") -> None:
        self.registry.register(filespace, server, [endpoint], f"meta.{filespace}.lucid", status)

    def test_registered_entry_resolves(self) -> None:
        """A registration is what resolve answers, with the entry's remaining TTL."""
        self.register()
        location = self.registry.resolve("fs")
        assert location is not None
        self.assertEqual(location.endpoints, ("tcp:10.0.0.1:7001",))
        self.assertEqual(location.identity, "meta.fs.lucid")
        self.assertEqual(location.status, SERVING)
        self.assertEqual(location.ttl_ms, 15_000)
        self.clock.advance(5)
        self.assertEqual(self.registry.resolve("fs").ttl_ms, 10_000)  # type: ignore[union-attr]

    def test_heartbeats_keep_it_alive(self) -> None:
        """Renewals within the TTL keep the entry; when they stop, it expires."""
        self.register()
        for _ in range(10):
            self.clock.advance(5)
            self.register()
        self.assertIsNotNone(self.registry.resolve("fs"))
        self.clock.advance(14.9)
        self.assertIsNotNone(self.registry.resolve("fs"))
        self.clock.advance(0.1)
        self.assertIsNone(self.registry.resolve("fs"))

    def test_expired_entry_not_answered_before_sweep(self) -> None:
        """Resolve ignores an expired entry the sweep has not reached yet."""
        self.register()
        self.clock.advance(15)
        self.assertEqual(len(self.registry), 1)
        self.assertIsNone(self.registry.resolve("fs"))
        self.assertIsNone(self.registry.get("fs", "meta-1"))

    def test_sweep_frees_only_expired(self) -> None:
        """The sweep removes expired entries and keeps live ones."""
        self.register("old")
        self.clock.advance(10)
        self.register("new")
        self.clock.advance(6)
        self.assertEqual(self.registry.sweep(), 1)
        self.assertEqual(len(self.registry), 1)
        self.assertIsNone(self.registry.resolve("old"))
        self.assertIsNotNone(self.registry.resolve("new"))

    def test_renewal_moves_entry_to_the_back(self) -> None:
        """An entry renewed after others is swept after them."""
        self.register("a")
        self.register("b")
        self.clock.advance(10)
        self.register("a")
        self.clock.advance(6)
        self.assertEqual(self.registry.sweep(), 1)
        self.assertIsNotNone(self.registry.resolve("a"))

    def test_serving_preferred_over_restoring_over_draining(self) -> None:
        """Among several servers of one filespace, SERVING wins, then RESTORING, then DRAINING."""
        self.register(server="drainer", status=DRAINING, endpoint="tcp:d:1")
        self.register(server="restorer", status=RESTORING, endpoint="tcp:r:1")
        self.register(server="server", status=SERVING, endpoint="tcp:s:1")
        self.clock.advance(1)
        self.register(server="drainer", status=DRAINING, endpoint="tcp:d:1")
        self.assertEqual(self.registry.resolve("fs").endpoints, ("tcp:s:1",))  # type: ignore[union-attr]
        self.clock.advance(14.5)  # "server" expires; the others were renewed later
        self.register(server="restorer", status=RESTORING, endpoint="tcp:r:1")
        self.assertEqual(self.registry.resolve("fs").endpoints, ("tcp:r:1",))  # type: ignore[union-attr]

    def test_freshest_among_equals(self) -> None:
        """Among servers of the same status, the latest renewed wins."""
        self.register(server="a", endpoint="tcp:a:1")
        self.clock.advance(1)
        self.register(server="b", endpoint="tcp:b:1")
        self.assertEqual(self.registry.resolve("fs").endpoints, ("tcp:b:1",))  # type: ignore[union-attr]
        self.clock.advance(1)
        self.register(server="a", endpoint="tcp:a:1")
        self.assertEqual(self.registry.resolve("fs").endpoints, ("tcp:a:1",))  # type: ignore[union-attr]

    def test_status_change_takes_effect(self) -> None:
        """A heartbeat with a new status replaces the old one."""
        self.register()
        self.register(status=RESTORING)
        self.assertEqual(self.registry.resolve("fs").status, RESTORING)  # type: ignore[union-attr]
        self.assertEqual(len(self.registry), 1)

    def test_full_registry_refuses_new_entries(self) -> None:
        """At max_entries a new entry is refused with NoSpace; renewals still work."""
        for name in "abcd":
            self.register(name)
        with self.assertRaises(errors.NoSpace) as caught:
            self.register("e")
        self.assertIn("registry is full (4 entries)", str(caught.exception))
        self.register("a")

    def test_full_registry_sweeps_before_refusing(self) -> None:
        """A full registry with expired entries makes room rather than refusing."""
        for name in "abcd":
            self.register(name)
        self.clock.advance(15)
        self.register("e")
        self.assertEqual(len(self.registry), 1)

    def test_invalid_registrations(self) -> None:
        """Empty names, no endpoints or malformed endpoints are refused as InvalidArgument."""
        cases = [
            ("", "s", ["tcp:h:1"], "id"),
            ("fs", "", ["tcp:h:1"], "id"),
            ("fs", "s", [], "id"),
            ("fs", "s", ["nonsense"], "id"),
            ("fs", "s", ["tcp:h:1"], ""),
            ("fs\n", "s", ["tcp:h:1"], "id"),
            ("x" * 300, "s", ["tcp:h:1"], "id"),
            ("fs", "s", ["tcp:h:1"] * 17, "id"),
        ]
        for filespace, server, endpoints, identity in cases:
            with self.assertRaises(errors.InvalidArgument):
                self.registry.register(filespace, server, endpoints, identity, SERVING)
        self.assertEqual(len(self.registry), 0)
