"""
``lucid demo [DIR] [--store URL]``: the whole system on one machine.

It lays out ``DIR`` (made on first use, reused after)::

    DIR/ca/             a private CA (ca.pem, ca.key)
    DIR/discovery/      discovery's certificate, secret, config and log
    DIR/meta/demo/      the metadata server's data folder, twistd.pid, log
    DIR/meta/meta.ini   its config (certificate demo.meta.lucid)
    DIR/objects/        the local object store (unless --store names another)
    DIR/client.ini      the client config, naming DIR/passphrase (mode 0600)
    DIR/mnt/            the filespace, mounted with lucid-mount where FUSE works

starts ``twistd lucid-discovery`` and ``twistd lucid-meta --filespace demo``
on loopback (restarting either if it dies, as the systemd units in ``etc/``
do), initialises filespace ``demo`` with user ``demo`` the first time, puts
a few sample files, lists and reads them back, mounts the filespace at
``DIR/mnt`` with ``lucid-mount`` (a supervised child too; unless FUSE is
missing or ``--no-mount``) and shows it with ``ls`` and ``cat``, prints how to
use the filespace from another shell and a line ``ready``, and runs until
Ctrl-C, which stops everything it started (the mount first, so that it
stores what it buffers while the servers still run).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import sys
from collections.abc import Generator
from pathlib import Path
from typing import Any

from twisted.internet import defer, task, threads
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)

from lucidlink.atomic import write_atomically
from lucidlink.errors import LucidError, UnknownFilespace
from lucidlink.protocol.messages import ServerStatus
from lucidlink.supervise import SupervisedProcess, twistd_command
from lucidlink.tls import init_ca, issue_certificate

FILESPACE = "demo"
USER = "demo"
DISCOVERY_IDENTITY = "discovery.lucid"
SAMPLES = {
    "/README.txt": b"Welcome to the lucidlink demo filespace.\n"
                   b"Names and contents are sealed on the client; the servers see neither.\n",
    "/media/clip.bin": bytes(range(256)) * 4096,
    "/notes/todo.txt": b"- mount it with lucid-mount\n- share it with a colleague\n",
}


def add_demo_command(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Register ``demo`` on the top-level subparsers."""
    demo = subparsers.add_parser(
        "demo", help="run discovery, a metadata server and a filespace on this machine",
        description=__doc__.split("\n\n")[0].split(": ", 1)[1] if __doc__ else None,
    )
    demo.add_argument("directory", nargs="?", type=Path, default=Path("lucid-demo"), metavar="DIR",
                      help="where everything lives (default ./lucid-demo)")
    demo.add_argument("--store", metavar="URL", help="object store URL (default file://DIR/objects)")
    demo.add_argument("--no-mount", action="store_true", help="do not mount the filespace at DIR/mnt")
    demo.add_argument("--exit-when-ready", action="store_true",
                      help="stop everything once ready instead of waiting for Ctrl-C (for scripts and tests)")
    demo.set_defaults(func=run_demo)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class DemoLayout:
    """The folders and files of one demo directory."""

    def __init__(self, root: Path, store: str | None) -> None:
        self.root = root.absolute()
        self.ca = self.root / "ca"
        self.discovery = self.root / "discovery"
        self.meta = self.root / "meta"
        self.data = self.meta / FILESPACE
        self.objects = self.root / "objects"
        self.client_ini = self.root / "client.ini"
        self.passphrase = self.root / "passphrase"
        self.ports_file = self.root / "ports.json"
        self.mountpoint = self.root / "mnt"
        self.store = store or f"file://{self.objects}"
        self.fresh = not (self.data.is_dir() and any(self.data.iterdir()))
        """Whether the metadata server has never run here (so the filespace is still to be initialised)."""

    def prepare(self) -> dict[str, int]:
        """Make whatever is missing; return the ports (kept from the first run)."""
        for folder in (self.root, self.discovery, self.meta, self.data, self.root / "state"):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.store.startswith("file://"):
            Path(self.store[len("file://"):]).mkdir(parents=True, exist_ok=True, mode=0o700)
        if not (self.ca / "ca.pem").exists():
            init_ca(self.ca)
        if not (self.discovery / "discovery.pem").exists():
            issue_certificate(self.ca, [DISCOVERY_IDENTITY, "127.0.0.1"], self.discovery / "discovery")
        if not (self.meta / "meta.pem").exists():
            issue_certificate(self.ca, [f"{FILESPACE}.meta.lucid"], self.meta / "meta")
        secret_file = self.discovery / "registration-secret"
        if not secret_file.exists():
            write_atomically(secret_file, f"demo:{secrets.token_hex(32)}\n".encode())
        if not self.passphrase.exists():
            write_atomically(self.passphrase, (secrets.token_urlsafe(18) + "\n").encode())
        if self.ports_file.exists():
            ports = json.loads(self.ports_file.read_text())
        else:
            ports = {"discovery": _free_port(), "meta": _free_port()}
            self.ports_file.write_text(json.dumps(ports) + "\n")
        self._write_configs(ports, secret_file)
        return ports

    def _write_configs(self, ports: dict[str, int], secret_file: Path) -> None:
        (self.discovery / "discovery.ini").write_text(
            "[discovery]\n"
            f"listen = tcp:{ports['discovery']}:interface=127.0.0.1\n"
            "certificate = discovery.pem\n"
            "private_key = discovery.key\n"
            "registration_secret_current_file = registration-secret\n"
            "entry_ttl = 6\n"
            "heartbeat_interval = 2\n"
            "metrics_listen =\n"
        )
        (self.meta / "meta.ini").write_text(
            "[meta]\n"
            f"data_dir = {self.data}\n"
            f"listen = tcp:{ports['meta']}:interface=127.0.0.1\n"
            "certificate = meta.pem\n"
            "private_key = meta.key\n"
            f"discovery = tcp:127.0.0.1:{ports['discovery']}\n"
            f"discovery_ca = {self.ca / 'ca.pem'}\n"
            f"discovery_identity = {DISCOVERY_IDENTITY}\n"
            f"registration_secret_file = {secret_file}\n"
            "heartbeat_interval = 2\n"
            f"store = {self.store}\n"
            "durability = sync\n"
        )
        self.client_ini.write_text(
            "[client]\n"
            f"discovery = tcp:127.0.0.1:{ports['discovery']}\n"
            f"ca = {self.ca / 'ca.pem'}\n"
            f"discovery_identity = {DISCOVERY_IDENTITY}\n"
            f"user = {USER}\n"
            f"passphrase_file = {self.passphrase}\n"
            f"store = {self.store}\n"
            f"state_dir = {self.root / 'state'}\n"
            f"cache_dir = {self.root / 'cache'}\n"
        )

    def services(self, reactor: Any) -> list[SupervisedProcess]:
        """The two services, not yet started."""
        discovery = SupervisedProcess(
            reactor, "lucid-discovery",
            twistd_command("-n", f"--pidfile={self.discovery / 'twistd.pid'}",
                           "lucid-discovery", "--config", str(self.discovery / "discovery.ini")),
            self.discovery / "discovery.log",
        )
        meta = SupervisedProcess(
            reactor, "lucid-meta",
            twistd_command("-n", f"--pidfile={self.data / 'twistd.pid'}",
                           "lucid-meta", "--filespace", FILESPACE, "--config", str(self.meta / "meta.ini")),
            self.data / "meta.log",
        )
        return [discovery, meta]

    def mount(self, reactor: Any) -> SupervisedProcess:
        """``lucid-mount`` of the filespace at ``DIR/mnt`` in the foreground (cleaning a stale mount first)."""
        return SupervisedProcess(
            reactor, "lucid-mount",
            [sys.executable, "-m", "lucidlink.cli.mount", FILESPACE, str(self.mountpoint), "--foreground",
             "--force", "--config", str(self.client_ini)],
            self.root / "mount.log",
        )


def fuse_problem(mountpoint: Path) -> str | None:
    """Why ``lucid demo`` cannot mount here, or None."""
    from lucidlink.cli.mount import MountRefused, check_fuse, check_mountpoint

    try:
        check_fuse()
        mountpoint.mkdir(exist_ok=True, mode=0o700)
        check_mountpoint(mountpoint, force=False)
    except MountRefused as refused:
        if "stale mount" in str(refused):
            return None  # lucid-mount --force cleans it
        return str(refused)
    except OSError as error:
        return f"{mountpoint}: {error.strerror}"
    return None


@defer.inlineCallbacks
def _wait_for_mount(reactor: Any, mount: SupervisedProcess, mountpoint: Path,
                    timeout: float = 60.0) -> Generator[Any, Any, list[str]]:
    """Wait until the filespace is mounted; the lines of ``ls`` and ``cat`` of it to show."""
    log = mount.log_path
    deadline = reactor.seconds() + timeout
    while not (log.exists() and b" mounted at " in log.read_bytes() and os.path.ismount(mountpoint)):
        if reactor.seconds() > deadline:
            raise LucidError(f"lucid-mount did not mount {mountpoint} within {timeout:g} s; see {log}")
        yield task.deferLater(reactor, 0.2, lambda: None)

    def look() -> list[str]:
        shown = [f"$ ls {mountpoint}", "  " + "  ".join(sorted(os.listdir(mountpoint))),
                 f"$ cat {mountpoint / 'README.txt'}"]
        shown.extend("  " + line for line in (mountpoint / "README.txt").read_text().splitlines())
        return shown

    lines = yield threads.deferToThread(look)
    return lines


def _unmount_if_left(mountpoint: Path) -> None:
    """A mount left behind (lucid-mount killed): detach it lazily."""
    import subprocess

    try:
        mounted = os.path.ismount(mountpoint)
    except OSError:
        mounted = True
    if mounted:
        subprocess.run(["fusermount", "-u", "-z", str(mountpoint)], capture_output=True, timeout=30)


@defer.inlineCallbacks
def _wait_for_port(reactor: Any, port: int, what: str, timeout: float = 30.0) -> Generator[Any, Any, None]:
    deadline = reactor.seconds() + timeout
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.settimeout(0.5)
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        if reactor.seconds() > deadline:
            raise LucidError(f"{what} did not start listening on port {port} within {timeout:g} s; see its log")
        yield task.deferLater(reactor, 0.2, lambda: None)


def _client_args(layout: DemoLayout) -> argparse.Namespace:
    return argparse.Namespace(config=layout.client_ini, user=None, store=None, passphrase_file=None, timeout=60.0)


@defer.inlineCallbacks
def _initialise(reactor: Any, layout: DemoLayout) -> Generator[Any, Any, bool]:
    """Initialise the filespace if its server still holds a bootstrap token; True if it did."""
    from lucidlink.cli.common import client_config, read_passphrase_file
    from lucidlink.client.resolver import Resolver, connect_to_filespace, tls_connector
    from lucidlink.client.session import initialise_filespace

    token_file = layout.data / "bootstrap-token"
    deadline = reactor.seconds() + 60
    # A fresh metadata server writes its token once it has opened its store, maybe after it listens.
    while layout.fresh and not token_file.exists() and reactor.seconds() < deadline:
        yield task.deferLater(reactor, 0.2, lambda: None)
    if not token_file.exists():
        return False
    config = client_config(_client_args(layout))
    resolver = Resolver.from_config(reactor, config)
    connection = None
    try:
        connect = tls_connector(reactor, layout.ca / "ca.pem", filespace=FILESPACE, peer_name="lucid demo")
        while True:
            try:
                connection = yield connect_to_filespace(resolver, FILESPACE, connect, deadline=deadline)
            except UnknownFilespace:
                if reactor.seconds() > deadline:
                    raise
                yield task.deferLater(reactor, 0.2, lambda: None)  # not registered with discovery yet
                continue
            if connection.welcome.status != ServerStatus.RESTORING or reactor.seconds() > deadline:
                break
            # Still checking its object store: it closes this connection once it serves.
            yield connection.close("not serving yet")
            connection = None
            yield task.deferLater(reactor, 0.2, lambda: None)
        yield initialise_filespace(
            reactor, connection=connection, token=token_file.read_text().strip(), admin=USER,
            passphrase=read_passphrase_file(layout.passphrase),
        )
    finally:
        if connection is not None:
            yield connection.close("initialised")
        yield resolver.close()
    return True


@defer.inlineCallbacks
def _samples(reactor: Any, layout: DemoLayout) -> Generator[Any, Any, list[str]]:
    """Put the sample files, list them and read them back; the lines to show."""
    from lucidlink.cli.common import with_filespace

    @defer.inlineCallbacks
    def work(fs: Any) -> Generator[Any, Any, list[str]]:
        shown = []
        for path, data in SAMPLES.items():
            yield fs.mkdir(os.path.dirname(path) or "/", parents=True)
            yield fs.write_file(path, data)
        for path, data in SAMPLES.items():
            back = yield fs.read_file(path)
            if back != data:
                raise LucidError(f"{path} read back differs from what was written")
            shown.append(f"  {FILESPACE}:{path}  {len(data):>8} bytes, read back intact")
        names = yield fs.listdir("/")
        shown.append("  / holds: " + ", ".join(sorted(_text(name) for name, _ in names)))
        return shown

    lines = yield with_filespace(reactor, _client_args(layout), FILESPACE, work)
    return lines


def _text(name: Any) -> str:
    return name.decode("utf-8", "surrogateescape") if isinstance(name, bytes) else str(name)


def run_demo(args: argparse.Namespace) -> int:
    """``lucid demo``: run until Ctrl-C (or until ready, with --exit-when-ready)."""
    from twisted.internet import reactor as global_reactor

    reactor: Any = global_reactor
    globalLogBeginner.beginLoggingTo(
        [FilteringLogObserver(textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(LogLevel.warn)])],
        redirectStandardIO=False,
    )
    layout = DemoLayout(args.directory, args.store)
    ports = layout.prepare()
    services = layout.services(reactor)
    mounting = not args.no_mount and fuse_problem(layout.mountpoint) is None
    mount = layout.mount(reactor) if mounting else None
    outcome: list[Any] = []

    @defer.inlineCallbacks
    def start() -> Generator[Any, Any, None]:
        for service in services:
            service.start()
        yield _wait_for_port(reactor, ports["discovery"], "lucid-discovery")
        yield _wait_for_port(reactor, ports["meta"], "lucid-meta")
        for service in services:
            service.healthy()
        initialised = yield _initialise(reactor, layout)
        if initialised:
            print(f"initialised filespace {FILESPACE!r}; its admin is {USER!r}")
        lines = yield _samples(reactor, layout)
        print("sample files:")
        print("\n".join(lines))
        if mount is not None:
            (layout.root / "mount.log").unlink(missing_ok=True)
            mount.start()
            shown = yield _wait_for_mount(reactor, mount, layout.mountpoint)
            mount.healthy()
            print(f"mounted at {layout.mountpoint}:")
            print("\n".join(shown))
        elif not args.no_mount:
            print(f"not mounted: {fuse_problem(layout.mountpoint)}")
        print(
            f"\nThe filespace {FILESPACE!r} is served from {layout.root}. From another shell:\n"
            f"  export LUCID_CONFIG={layout.client_ini}\n"
            f"  lucid ls -l {FILESPACE}:/\n"
            f"  lucid cat {FILESPACE}:/README.txt\n"
            f"  lucid put ./some-file {FILESPACE}:/\n"
            f"Logs: {layout.discovery / 'discovery.log'} and {layout.data / 'meta.log'}.\n"
            "Press Ctrl-C to stop.",
        )
        print("ready", flush=True)
        if args.exit_when_ready:
            reactor.stop()

    def failed(failure: Any) -> None:
        outcome.append(failure)
        reactor.stop()

    @defer.inlineCallbacks
    def stop_services() -> Generator[Any, Any, None]:
        if mount is not None:
            yield mount.stop()
            yield threads.deferToThread(_unmount_if_left, layout.mountpoint)
        yield defer.gatherResults([service.stop() for service in services], consumeErrors=True)

    reactor.addSystemEventTrigger("before", "shutdown", stop_services)
    reactor.callWhenRunning(lambda: start().addErrback(failed))
    reactor.run()
    if outcome:
        outcome[0].raiseException()
    return 0
