"""
The discovery configuration: a good file reads whole, and each bad or
missing key is refused with the file and the key named.
"""

from __future__ import annotations

import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase

from lucidlink.discovery.config import ConfigError, load_config, with_backlog
from lucidlink.discovery.tap import Options
from tests.discovery_fixtures import KEY_ID, SECRET, write_config

EXAMPLE = Path(__file__).parent.parent / "etc" / "lucid-discovery.ini"


class ConfigTests(SynchronousTestCase):
    """Reading ``[discovery]``."""

    def setUp(self) -> None:
        self.directory = Path(self.mktemp())

    def refused(self, key: str, expected: str, **overrides: Any) -> str:
        path = write_config(self.directory, **overrides)
        with self.assertRaises(usage.UsageError) as caught:
            load_config(path)
        text = str(caught.exception)
        self.assertIn(str(path), text)
        self.assertIn(f"[discovery] {key}:", text)
        self.assertIn(expected, text)
        return text

    def test_good_config(self) -> None:
        """Every key is read, with paths taken from the file's directory."""
        path = write_config(self.directory, listen="tcp:0:interface=127.0.0.1\n    tcp6:0:interface=\\:\\:1", max_entries="50")
        config = load_config(path)
        self.assertEqual(config.listen, ("tcp:0:interface=127.0.0.1", "tcp6:0:interface=\\:\\:1"))
        self.assertEqual(config.certificate, (self.directory / "discovery.pem").resolve())
        self.assertEqual(config.keyring.current.key_id, KEY_ID)
        self.assertEqual(config.keyring.current.secret, SECRET)
        self.assertIsNone(config.keyring.previous)
        self.assertEqual(config.max_entries, 50)
        self.assertEqual(config.max_clock_skew, 30)
        self.assertIsNotNone(config.static_map.lookup("static-fs"))

    def test_listen_override(self) -> None:
        """--listen replaces the file's listen."""
        config = load_config(write_config(self.directory), listen=["tcp:0:interface=127.0.0.2"])
        self.assertEqual(config.listen, ("tcp:0:interface=127.0.0.2",))

    def test_previous_secret(self) -> None:
        """A previous secret is read with its retirement time (no zone: UTC)."""
        config = load_config(write_config(
            self.directory,
            registration_secret_previous="old:" + "cd" * 32,
            registration_secret_previous_expires="2026-12-01T00:00:00",
        ))
        assert config.keyring.previous is not None
        self.assertEqual(config.keyring.previous.retires_at, datetime(2026, 12, 1, tzinfo=UTC).timestamp())

    def test_limits(self) -> None:
        """max_connections and max_handshakes default to what one core serves, and can be set."""
        config = load_config(write_config(self.directory))
        self.assertEqual((config.max_connections, config.max_handshakes), (2000, 128))
        config = load_config(write_config(Path(self.mktemp()), max_connections="500", max_handshakes="16"))
        self.assertEqual((config.max_connections, config.max_handshakes), (500, 16))

    def test_listen_backlog_added(self) -> None:
        """A tcp, tcp6 or unix endpoint without a backlog gets a large one; others are left alone."""
        self.assertEqual(with_backlog("tcp:7000"), "tcp:7000:backlog=4096")
        self.assertEqual(with_backlog("tcp6:7000:interface=\\:\\:1"), "tcp6:7000:interface=\\:\\:1:backlog=4096")
        self.assertEqual(with_backlog("unix:/run/d.sock", 10), "unix:/run/d.sock:backlog=10")
        self.assertEqual(with_backlog("tcp:7000:backlog=64"), "tcp:7000:backlog=64")
        self.assertEqual(with_backlog("systemd:domain=INET:index=0"), "systemd:domain=INET:index=0")

    def test_missing_file(self) -> None:
        """A missing configuration file is named."""
        with self.assertRaises(ConfigError) as caught:
            load_config(self.directory / "nope.ini")
        self.assertIn("nope.ini", str(caught.exception))

    def test_bad_keys_are_named(self) -> None:
        """Each bad or missing key is refused, naming file and key."""
        self.refused("listen", "missing", listen=None)
        self.refused("listen", "not a server endpoint string", listen="carrier-pigeon:7")
        self.refused("listen", "TLS is added by discovery", listen="ssl:7000")
        self.refused("certificate", "missing", certificate=None)
        self.refused("private_key", "no file at", private_key="absent.key")
        self.refused("certificate", "cannot serve TLS", certificate="static-map.ini")
        self.refused("entry_ttl", "'soon' is not a number", entry_ttl="soon")
        self.refused("max_entries", "must be at least 1", max_entries="0")
        self.refused("max_connections", "not a whole number", max_connections="1.5")
        self.refused("max_handshakes", "must be at least 1", max_handshakes="0")
        self.refused("heartbeat_interval", "must be shorter than entry_ttl", heartbeat_interval="20")
        self.refused("idle_timeout", "must be longer than heartbeat_interval", idle_timeout="5")
        self.refused("metrics_listen", "not a server endpoint string", metrics_listen="nowhere")
        self.refused("static_map", "should be [filespace NAME]", static_map="discovery.ini")
        self.refused("colour", "unknown key", colour="blue")

    def test_secret_keys_are_named(self) -> None:
        """Secret problems name the secret's key and never print the secret."""
        self.refused("registration_secret_current", "missing", registration_secret_current_file=None)
        text = self.refused("registration_secret_current", "not hexadecimal", registration_secret_current_file=None,
                            registration_secret_current="k:zz" + "00" * 31)
        self.assertNotIn("00" * 31, text)
        self.refused("registration_secret_current", "not both", registration_secret_current="k:" + "00" * 32)
        self.refused("registration_secret_previous_expires", "missing", registration_secret_previous="old:" + "cd" * 32)
        self.refused("registration_secret_previous_expires", "not an ISO 8601 time",
                     registration_secret_previous="old:" + "cd" * 32, registration_secret_previous_expires="tuesday")

    def test_secret_file_must_be_private(self) -> None:
        """A secret file that others may read is refused."""
        write_config(self.directory)
        os.chmod(self.directory / "registration-secret", 0o644)
        with self.assertRaises(ConfigError) as caught:
            load_config(self.directory / "discovery.ini")
        self.assertIn("registration_secret_current_file:", str(caught.exception))
        self.assertIn("chmod 600", str(caught.exception))

    def test_options_require_config(self) -> None:
        """The twistd options insist on --config and check the file."""
        self.assertRaises(usage.UsageError, Options().parseOptions, [])
        options = Options()
        options.parseOptions(["--config", str(write_config(self.directory)), "--listen", "tcp:0", "--listen", "tcp:1"])
        self.assertEqual(options["discovery"].listen, ("tcp:0", "tcp:1"))

    def test_example_documents_every_key(self) -> None:
        """etc/lucid-discovery.ini mentions every key there is."""
        from lucidlink.discovery.config import KEYS

        text = EXAMPLE.read_text()
        for key in KEYS:
            self.assertIn(f"{key} =", text, key)
