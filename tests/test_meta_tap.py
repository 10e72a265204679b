"""
``twistd lucid-meta`` from a config file: checked options, then a real server
on loopback that a TLS client bootstraps and uses, registered with a real
discovery instance.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from twisted.internet import defer, reactor, task
from twisted.python import usage
from twisted.trial.unittest import SynchronousTestCase, TestCase

from lucidlink import errors
from lucidlink.discovery import tap as discovery_tap
from lucidlink.meta import tap
from lucidlink.meta.bootstrap import TOKEN_FILE_NAME, read_token
from lucidlink.meta.config import ConfigError, identity_for, load_config
from lucidlink.meta.guardian import State
from lucidlink.meta.server import MetaServer, client_endpoint_for
from lucidlink.protocol.messages import (
    Bootstrap,
    ChunkMapCommit,
    ChunkRef,
    Create,
    GetAttr,
    Login,
    Lookup,
    MkDir,
    Ok,
    Release,
    Resolve,
    ServerStatus,
)
from lucidlink.protocol.network import connect_tls
from lucidlink.supervise import twistd_command
from lucidlink.tls import init_ca, issue_certificate
from tests.discovery_fixtures import DISCOVERY_IDENTITY, KEY_ID, SECRET
from tests.discovery_fixtures import write_config as write_discovery_config
from tests.meta_helpers import CHUNK_SIZE, FILESPACE_ID, credentials

FILESPACE = "reels"


def make_certificates(directory: Path, filespace: str = FILESPACE) -> None:
    """A CA (unless one is there) and a metadata server certificate for ``filespace`` in ``directory``."""
    if not (directory / "ca" / "ca.pem").exists():
        init_ca(directory / "ca")
    issue_certificate(directory / "ca", [identity_for(filespace), "127.0.0.1"], directory / "meta", force=True)


def write_config(directory: Path, **keys: Any) -> Path:
    """A lucid-meta.ini in ``directory`` listening on loopback port 0; ``keys`` add or (None) drop keys."""
    directory.mkdir(parents=True, exist_ok=True)
    values: dict[str, Any] = {
        "data_dir": "data/{filespace}",
        "listen": "tcp:0:interface=127.0.0.1",
        "certificate": "meta.pem",
        "private_key": "meta.key",
    }
    values.update(keys)
    lines = ["[meta]"] + [f"{key} = {value}" for key, value in values.items() if value is not None]
    path = directory / "lucid-meta.ini"
    path.write_text("\n".join(lines) + "\n")
    return path


class ConfigTests(SynchronousTestCase):
    """Bad configurations stop the server with the file and the key named."""

    def setUp(self) -> None:
        self.directory = Path(self.mktemp())
        self.directory.mkdir()
        make_certificates(self.directory)

    def parse(self, *arguments: str) -> tap.Options:
        options = tap.Options()
        options.parseOptions(list(arguments))
        return options

    def refusal(self, **keys: Any) -> str:
        path = write_config(self.directory, **keys)
        with self.assertRaises(ConfigError) as caught:
            self.parse("--filespace", FILESPACE, "--config", str(path))
        return str(caught.exception)

    def test_defaults_and_overrides(self) -> None:
        """A minimal file works; --data-dir and --listen replace its keys."""
        path = write_config(self.directory)
        config = self.parse("--filespace", FILESPACE, "--config", str(path))["meta"]
        self.assertEqual(config.data_dir, (self.directory / "data" / FILESPACE).resolve())
        self.assertEqual(config.listen, ("tcp:0:interface=127.0.0.1",))
        self.assertIsNone(config.discovery)
        self.assertEqual(config.identity, "reels.meta.lucid")
        other = self.parse("-f", FILESPACE, "-c", str(path), "--data-dir", str(self.directory / "elsewhere"),
                           "--listen", "tcp:7101", "--listen", "tcp:7102")["meta"]
        self.assertEqual(other.data_dir, (self.directory / "elsewhere").resolve())
        self.assertEqual(other.listen, ("tcp:7101", "tcp:7102"))

    def test_default_data_dir(self) -> None:
        """Without data_dir the data lives in /var/lib/lucidlink/meta/<filespace>."""
        config = load_config(write_config(self.directory, data_dir=None), FILESPACE)
        self.assertEqual(config.data_dir, Path("/var/lib/lucidlink/meta") / FILESPACE)

    def test_required_options(self) -> None:
        """--filespace and --config are required."""
        self.assertRaises(usage.UsageError, self.parse, "--config", str(write_config(self.directory)))
        self.assertRaises(usage.UsageError, self.parse, "--filespace", FILESPACE)

    def test_missing_listen(self) -> None:
        """No listen key: the message names the file and the key."""
        message = self.refusal(listen=None)
        self.assertIn(str(self.directory / "lucid-meta.ini"), message)
        self.assertIn("[meta] listen: missing", message)

    def test_bad_endpoint(self) -> None:
        """A listen line that is not an endpoint string, or asks for TLS itself, is refused."""
        self.assertIn("[meta] listen: 'nonsense:1' is not a server endpoint string", self.refusal(listen="nonsense:1"))
        self.assertIn("TLS is added by the server", self.refusal(listen="ssl:7100"))

    def test_certificate_must_name_filespace(self) -> None:
        """A certificate for another filespace is refused: clients would refuse it."""
        issue_certificate(self.directory / "ca", ["other.meta.lucid"], self.directory / "other")
        message = self.refusal(certificate="other.pem", private_key="other.key")
        self.assertIn("[meta] certificate:", message)
        self.assertIn("does not name reels.meta.lucid", message)

    def test_missing_certificate(self) -> None:
        """A certificate file that is not there is named."""
        self.assertIn("[meta] certificate: no file at", self.refusal(certificate="absent.pem"))

    def test_unknown_key(self) -> None:
        """A misspelt key is refused rather than ignored."""
        self.assertIn("[meta] lisen: unknown key", self.refusal(lisen="tcp:1"))

    def test_bad_number(self) -> None:
        """Numbers are checked."""
        self.assertIn("[meta] max_connections: 'many' is not a whole number", self.refusal(max_connections="many"))

    def test_discovery_needs_secret(self) -> None:
        """Registering with discovery needs the registration secret."""
        (self.directory / "ca.pem").write_bytes((self.directory / "ca" / "ca.pem").read_bytes())
        message = self.refusal(discovery="tcp:127.0.0.1:7000", discovery_ca="ca.pem")
        self.assertIn("[meta] registration_secret: missing", message)

    def test_secret_file_must_be_private(self) -> None:
        """A registration secret file others can read is refused."""
        secret = self.directory / "secret"
        secret.write_text(f"{KEY_ID}:{SECRET.hex()}\n")
        os.chmod(secret, 0o644)
        message = self.refusal(discovery="tcp:127.0.0.1:7000", discovery_ca="ca/ca.pem",
                               registration_secret_file="secret")
        self.assertIn("[meta] registration_secret_file:", message)
        self.assertIn("chmod 600", message)

    def test_durability_keys(self) -> None:
        """Without store nothing is shipped; with it sync is the default; async and intervals are read."""
        self.assertEqual(load_config(write_config(self.directory), FILESPACE).durability, "off")
        config = load_config(write_config(self.directory, store="file:///srv/objects"), FILESPACE)
        self.assertEqual((config.store, config.durability, config.ship_interval, config.snapshot_interval),
                         ("file:///srv/objects", "sync", 1.0, 3600.0))
        config = load_config(write_config(self.directory, store="file:///srv/objects", durability="async",
                                          ship_interval="0.5", snapshot_interval="60"), FILESPACE)
        self.assertEqual((config.durability, config.ship_interval, config.snapshot_interval), ("async", 0.5, 60.0))

    def test_bad_durability(self) -> None:
        self.assertIn("durability: 'always' is not one of sync, async, off",
                      self.refusal(store="file:///srv/o", durability="always"))
        self.assertIn("durability: sync needs `store`", self.refusal(durability="sync"))
        self.assertIn("[meta] store: '/srv/o' is not an object store URL", self.refusal(store="/srv/o"))
        self.assertIn("ship_interval", self.refusal(store="file:///srv/o", ship_interval="0"))

    def test_check_keys(self) -> None:
        """check_interval (default 10 s) and auto_restore (default on) are read; bad values are refused."""
        config = load_config(write_config(self.directory), FILESPACE)
        self.assertEqual((config.check_interval, config.auto_restore), (10.0, True))
        config = load_config(write_config(self.directory, check_interval="0.5", auto_restore="false"), FILESPACE)
        self.assertEqual((config.check_interval, config.auto_restore), (0.5, False))
        self.assertIn("[meta] auto_restore: 'maybe' is not true or false", self.refusal(auto_restore="maybe"))
        self.assertIn("[meta] check_interval: -1 must be more than zero", self.refusal(check_interval="-1"))

    def test_bad_filespace_name(self) -> None:
        """A filespace name that cannot be part of a TLS name is refused."""
        with self.assertRaises(ConfigError):
            self.parse("--filespace", "Not_Valid", "--config", str(write_config(self.directory)))


class EndpointTests(SynchronousTestCase):
    """What clients are told to connect to."""

    class Port:
        def __init__(self, **address: Any) -> None:
            self.address = type("Address", (), address)()

        def getHost(self) -> Any:
            return self.address

    def test_tcp(self) -> None:
        """A TCP listener on one interface is reached at that address and the real port."""
        self.assertEqual(client_endpoint_for("tcp:0:interface=127.0.0.1", self.Port(port=4321)), "tcp:127.0.0.1:4321")

    def test_ipv6(self) -> None:
        """An IPv6 interface is escaped for a tcp6 client endpoint."""
        self.assertEqual(
            client_endpoint_for("tcp6:7100:interface=\\:\\:1", self.Port(port=7100)),
            "tcp6:host=\\:\\:1:port=7100",
        )

    def test_all_interfaces(self) -> None:
        """A listener on every interface is advertised by the host's name."""
        endpoint = client_endpoint_for("tcp:7100", self.Port(port=7100))
        assert endpoint is not None
        self.assertTrue(endpoint.startswith("tcp:") and endpoint.endswith(":7100"))


class LoopbackServerTests(TestCase):
    """A real metadata server on loopback, registered with a real discovery instance."""

    timeout = 30

    def server_keys(self) -> dict[str, str]:
        """More keys for the server's configuration."""
        return {}

    @defer.inlineCallbacks
    def setUp(self) -> Any:
        self.directory = Path(self.mktemp())
        # Discovery, with its CA, which signs the metadata server's certificate too.
        discovery_options = discovery_tap.Options()
        discovery_options.parseOptions(["--config", str(write_discovery_config(
            self.directory, metrics_listen="", heartbeat_interval="0.2", entry_ttl="2"
        ))])
        discovery = discovery_tap.makeService(discovery_options)
        discovery.startService()
        self.addCleanup(discovery.stopService)
        discovery_port = yield discovery.listeners[0].when_listening()
        self.discovery_address = f"tcp:127.0.0.1:{discovery_port.getHost().port}"

        make_certificates(self.directory)
        config = write_config(
            self.directory,
            discovery=self.discovery_address,
            discovery_ca="ca/ca.pem",
            discovery_identity=DISCOVERY_IDENTITY,
            registration_secret_file="registration-secret",
            heartbeat_interval="0.2",
            **self.server_keys(),
        )
        options = tap.Options()
        options.parseOptions(["--filespace", FILESPACE, "--config", str(config)])
        self.server = tap.makeService(options)
        self.assertIsInstance(self.server, MetaServer)
        self.server.startService()
        self.addCleanup(self.server.stopService)
        port = yield self.server.listeners[0].when_listening()
        self.address = f"tcp:127.0.0.1:{port.getHost().port}"
        self.data_dir = self.directory / "data" / FILESPACE
        yield self.serving()

    @defer.inlineCallbacks
    def serving(self) -> Any:
        """Fire once the server's first check is done and it serves its database."""
        for _ in range(200):
            if self.server.guardian is not None and self.server.guardian.state is State.SERVING:
                return
            yield task.deferLater(reactor, 0.02, lambda: None)
        self.fail(f"the server never served; its guardian is {self.server.guardian and self.server.guardian.state}")

    @defer.inlineCallbacks
    def connect(self, address: str | None = None) -> Any:
        connection = yield connect_tls(
            reactor, address or self.address, self.directory / "ca" / "ca.pem", identity_for(FILESPACE),
            peer_name="test", filespace=FILESPACE, keepalive_interval=0,
        )
        self.addCleanup(connection.close, "test over")
        return connection

    @defer.inlineCallbacks
    def resolve(self, status: ServerStatus) -> Any:
        """What discovery answers for the filespace, once it has the given status."""
        connection = yield connect_tls(
            reactor, self.discovery_address, self.directory / "ca" / "ca.pem", DISCOVERY_IDENTITY,
            keepalive_interval=0,
        )
        try:
            for _ in range(100):
                try:
                    answer = yield connection.request(Resolve(FILESPACE))
                    if answer.status == status:
                        return answer
                except errors.UnknownFilespace:
                    pass
                yield task.deferLater(reactor, 0.05, lambda: None)
            self.fail(f"discovery never said {status.name} for {FILESPACE}")
        finally:
            yield connection.close("test over")

    @defer.inlineCallbacks
    def test_bootstrap_and_use(self) -> Any:
        """A client bootstraps with the token file, logs in and works; discovery points at the server."""
        token_path = self.data_dir / TOKEN_FILE_NAME
        self.assertEqual(stat.S_IMODE(token_path.stat().st_mode), 0o600)
        self.assertEqual(stat.S_IMODE(self.data_dir.stat().st_mode), 0o700)
        before = yield self.resolve(ServerStatus.UNINITIALIZED)
        self.assertEqual(before.identity, "reels.meta.lucid")
        self.assertEqual(before.endpoints, [self.address])

        connection = yield self.connect(before.endpoints[0])
        self.assertEqual(connection.welcome.status, ServerStatus.UNINITIALIZED)
        answer = yield connection.request(
            Bootstrap(read_token(token_path), "admin", credentials("admin"), CHUNK_SIZE, FILESPACE_ID, b"")
        )
        self.assertEqual(answer, Ok())
        self.assertFalse(token_path.exists())
        yield self.resolve(ServerStatus.SERVING)

        ok = yield connection.request(Login("admin", credentials("admin").login_secret))
        self.assertEqual(ok.filespace_id, FILESPACE_ID)
        made = yield connection.request(MkDir(ok.root_inode, b"sealed-dir", 0o755, 0, 0))
        opened = yield connection.request(Create(made.attributes.inode, b"sealed-file", 0o644, 0, 0, True, 2))
        inode = opened.attributes.inode
        yield connection.request(ChunkMapCommit(inode, opened.handle, 1, 5, [ChunkRef(0, b"object", 5, 5)], 0))
        yield connection.request(Release(opened.handle))
        found = yield connection.request(Lookup(made.attributes.inode, b"sealed-file"))
        self.assertEqual((found.attributes.inode, found.attributes.size), (inode, 5))

    @defer.inlineCallbacks
    def test_restart_keeps_tree(self) -> Any:
        """Stopped and started again, the server serves the same tree from its data folder."""
        connection = yield self.connect()
        token = read_token(self.data_dir / TOKEN_FILE_NAME)
        yield connection.request(Bootstrap(token, "admin", credentials("admin"), CHUNK_SIZE, FILESPACE_ID, b""))
        yield connection.request(Login("admin", credentials("admin").login_secret))
        made = yield connection.request(MkDir(1, b"kept", 0o755, 0, 0))
        yield self.server.stopService()
        self.assertTrue(connection._lost or connection.closing)
        self.server.startService()
        port = yield self.server.listeners[0].when_listening()
        yield self.serving()
        again = yield self.connect(f"tcp:127.0.0.1:{port.getHost().port}")
        self.assertEqual(again.welcome.status, ServerStatus.SERVING)
        yield again.request(Login("admin", credentials("admin").login_secret))
        found = yield again.request(GetAttr(made.attributes.inode))
        self.assertEqual(found.attributes.inode, made.attributes.inode)


class ShippingServerTests(LoopbackServerTests):
    """The same server with a local object store and durability=sync: every test above, and shipping."""

    def server_keys(self) -> dict[str, str]:
        return {"store": self.store_url(), "snapshot_interval": "3600"}

    def store_url(self) -> str:
        """The server's object store, a folder made as an operator makes it (tests/test_s3_system.py runs these on S3)."""
        objects = (self.directory / "objects").resolve()
        objects.mkdir(parents=True, exist_ok=True)
        return objects.as_uri()

    @defer.inlineCallbacks
    def test_writes_are_shipped_and_restorable(self) -> Any:
        """Answered writes are already in segments; after a clean stop, a restore equals the database."""
        from lucidlink.meta.server import DATABASE_NAME
        from lucidlink.meta.snapshots import restore
        from lucidlink.meta.store import MetadataStore
        from lucidlink.objectstore import open_store

        objects = open_store(self.store_url(), reactor)
        self.addCleanup(objects.close)
        connection = yield self.connect()
        token = read_token(self.data_dir / TOKEN_FILE_NAME)
        yield connection.request(Bootstrap(token, "admin", credentials("admin"), CHUNK_SIZE, FILESPACE_ID, b""))
        yield connection.request(Login("admin", credentials("admin").login_secret))
        yield connection.request(MkDir(1, b"shipped", 0o755, 0, 0))
        shipper = self.server.shipper
        assert shipper is not None
        self.assertEqual(shipper.pending(), 0, "the answer came after the upload")
        self.assertTrue((yield objects.list(f"{FILESPACE}/journal/")))
        yield self.server.stopService()
        self.assertTrue((yield objects.list(f"{FILESPACE}/snapshots/")))
        target = self.directory / "restored.sqlite3"
        result = yield restore(objects, FILESPACE, target)
        self.assertTrue(result.complete, result.summary)
        original = MetadataStore(self.data_dir / DATABASE_NAME, reactor)
        restored = MetadataStore(target, reactor)
        try:
            self.assertEqual(restored.dump(), original.dump())
        finally:
            original.close()
            restored.close()
        self.server.startService()  # for the cleanup's stopService


class DamagedServerTests(ShippingServerTests):
    """The same server, told not to restore by itself: damage found while it runs is announced and refused."""

    def server_keys(self) -> dict[str, str]:
        return {**super().server_keys(), "auto_restore": "false"}

    @defer.inlineCallbacks
    def test_damage_is_announced(self) -> Any:
        """The data folder gone under the server: discovery says restoring, clients are told to wait and retry."""
        import shutil

        before = yield self.connect()
        pushed: list[Any] = []
        before.on_push = pushed.append
        shutil.rmtree(self.data_dir)
        assert self.server.guardian is not None
        yield self.server.guardian.check()
        self.assertEqual(self.server.status(), ServerStatus.RESTORING)
        yield self.resolve(ServerStatus.RESTORING)
        self.assertIn(ServerStatus.RESTORING, [message.status for message in pushed if hasattr(message, "status")])
        again = yield self.connect()
        self.assertEqual(again.welcome.status, ServerStatus.RESTORING)
        refused = yield self.assertFailure(again.request(Login("admin", credentials("admin").login_secret)),
                                           errors.Restoring)
        self.assertTrue(refused.retryable)


class ExampleConfigTests(SynchronousTestCase):
    """etc/lucid-meta.ini documents every key the server reads."""

    def test_every_key_documented(self) -> None:
        """Each known key appears, set or commented out, in the example file; no other key does."""
        from lucidlink.meta.config import KEYS

        example = Path(__file__).parent.parent / "etc" / "lucid-meta.ini"
        mentioned = {
            line.lstrip("#").split("=", 1)[0].strip()
            for line in example.read_text().splitlines()
            if "=" in line and not line.startswith("# ") and line.lstrip("#")[:1].isalpha()
        }
        self.assertEqual(mentioned, set(KEYS))


class TwistdTests(TestCase):
    """The real command: ``twistd -n lucid-meta`` in its own process."""

    timeout = 60

    @defer.inlineCallbacks
    def test_twistd_serves_over_unix_socket(self) -> Any:
        """twistd starts the plugin; a client bootstraps over its socket; SIGTERM stops it cleanly."""
        import signal
        import subprocess

        directory = Path(self.mktemp()).resolve()
        make_certificates(directory)
        import shutil
        import tempfile

        sockets = Path(tempfile.mkdtemp(prefix="lucid-meta-"))  # AF_UNIX paths are short
        self.addCleanup(shutil.rmtree, sockets, True)
        socket_path = sockets / "meta.sock"
        config = write_config(directory, listen=f"unix:{socket_path}")
        process = subprocess.Popen(
            twistd_command("--nodaemon", "--pidfile=", "--logfile=-",
                           "lucid-meta", "--filespace", FILESPACE, "--config", str(config)),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=directory,
        )

        def stop() -> None:
            if process.poll() is None:
                process.kill()
            process.wait()
            process.stdout.close()  # type: ignore[union-attr]

        self.addCleanup(stop)
        token_path = directory / "data" / FILESPACE / TOKEN_FILE_NAME
        for _ in range(200):
            if token_path.exists() and socket_path.exists() or process.poll() is not None:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        if process.poll() is not None:
            self.fail(f"twistd exited early: {process.stdout.read().decode()}")  # type: ignore[union-attr]
        connection = yield connect_tls(
            reactor, f"unix:{socket_path}", directory / "ca" / "ca.pem", identity_for(FILESPACE),
            filespace=FILESPACE, keepalive_interval=0,
        )
        answer = yield connection.request(
            Bootstrap(read_token(token_path), "admin", credentials("admin"), CHUNK_SIZE, FILESPACE_ID, b"")
        )
        self.assertEqual(answer, Ok())
        yield connection.request(Login("admin", credentials("admin").login_secret))
        yield connection.close("test over")
        process.send_signal(signal.SIGTERM)
        for _ in range(200):
            if process.poll() is not None:
                break
            yield task.deferLater(reactor, 0.05, lambda: None)
        output = process.stdout.read().decode()  # type: ignore[union-attr]
        # twistd reports the signal that stopped it as its exit status, after shutting down.
        self.assertIn(process.returncode, (0, -signal.SIGTERM), output)
        self.assertIn("Server Shut Down.", output)
        self.assertIn("wrote a new bootstrap token", output)
        self.assertIn("initialised by", output)
