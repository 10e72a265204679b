"""
The metadata server's configuration: the ``[meta]`` section of an ini file.

:func:`load_config` reads and checks every key at once, so ``twistd`` refuses
to start with one line naming the file and the key at fault rather than
failing later.  Relative paths are taken from the config file's directory.
``etc/lucid-meta.ini`` documents every key.
"""

from __future__ import annotations

import configparser
import math
import os
import socket
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from OpenSSL import SSL
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import verify_certificate_hostname
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from lucidlink.discovery.auth import RegistrationKey
from lucidlink.errors import InvalidArgument, LucidError
from lucidlink.inifile import read_section
from lucidlink.tls import server_tls_options

SECTION = "meta"
DEFAULT_DATA_ROOT = Path("/var/lib/lucidlink/meta")
DEFAULT_HEARTBEAT_INTERVAL = 5.0
DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_DISCOVERY_IDENTITY = "discovery.lucid"

KEYS = frozenset({
    "data_dir", "listen", "advertise", "certificate", "private_key", "server_id",
    "discovery", "discovery_ca", "discovery_identity", "registration_secret", "registration_secret_file",
    "heartbeat_interval", "max_connections",
    "store", "durability", "ship_interval", "snapshot_interval", "check_interval", "auto_restore",
    "retention", "prune", "lock_grace",
})
DURABILITY_MODES = ("sync", "async", "off")
DEFAULT_SHIP_INTERVAL = 1.0
DEFAULT_SNAPSHOT_INTERVAL = 3600.0
DEFAULT_CHECK_INTERVAL = 10.0
DEFAULT_RETENTION = 7 * 86400.0
DEFAULT_LOCK_GRACE = 45.0
_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


class ConfigError(usage.UsageError):
    """The configuration file is missing, unreadable, or has a bad or missing key."""


def parse_duration(text: str) -> float:
    """Seconds in ``text``: a positive number with an optional unit s, m, h or d (``7d``, ``36h``, ``90``).

    :raise ValueError: saying what is wrong.
    """
    text = text.strip().lower()
    unit = _DURATION_UNITS.get(text[-1:], None)
    number = text[:-1] if unit is not None else text
    try:
        value = float(number) * (unit or 1.0)
    except ValueError:
        raise ValueError(f"{text!r} is not a duration such as 7d, 36h, 90m or 3600 (seconds)") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{text} must be more than zero")
    return value


def identity_for(filespace: str) -> str:
    """The TLS identity of the metadata server of ``filespace``: what its certificate must name."""
    return f"{filespace}.meta.lucid"


@dataclass(frozen=True)
class DiscoverySettings:
    """Where and how the server registers itself."""

    endpoints: tuple[str, ...]
    ca_file: Path
    identity: str
    key: RegistrationKey
    heartbeat_interval: float


@dataclass(frozen=True)
class MetaConfig:
    """Everything ``twistd lucid-meta`` is told, checked."""

    path: Path
    filespace: str
    data_dir: Path
    listen: tuple[str, ...]
    advertise: tuple[str, ...]
    """Empty: derived from ``listen`` once listening."""
    certificate: Path
    private_key: Path
    server_id: str
    discovery: DiscoverySettings | None
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    store: str | None = None
    """The object store URL journal segments and snapshots go to (None: not shipped)."""
    durability: str = "off"
    """sync, async or off (the default without ``store``; sync is the default with it)."""
    ship_interval: float = DEFAULT_SHIP_INTERVAL
    snapshot_interval: float = DEFAULT_SNAPSHOT_INTERVAL
    check_interval: float = DEFAULT_CHECK_INTERVAL
    """Seconds between checks of the database and its journal head."""
    auto_restore: bool = True
    """Whether a damaged database is restored from the store without an operator."""
    retention: float = DEFAULT_RETENTION
    """Seconds of history (segments and snapshots) kept in the store for point-in-time restore."""
    prune: bool = False
    """Whether the server itself deletes what ``retention`` no longer needs, after each snapshot."""
    lock_grace: float = DEFAULT_LOCK_GRACE
    """Seconds after the database opens during which only locks held before are granted (0: none)."""

    @property
    def identity(self) -> str:
        return identity_for(self.filespace)


def load_config(path: Path | str, filespace: str, *, data_dir: str | None = None,
                listen: Sequence[str] = ()) -> MetaConfig:
    """Read and check ``path`` for ``filespace``; ``data_dir`` and ``listen`` override the file.

    :raise ConfigError: naming the file and the key at fault.
    """
    path = Path(path)
    _check_filespace(filespace)
    return _Reader(path, read_section(path, SECTION, ConfigError), filespace).read(data_dir, listen)


def _check_filespace(filespace: str) -> None:
    if not filespace:
        raise ConfigError("--filespace NAME is required")
    allowed = set("abcdefghijklmnopqrstuvwxyz0123456789-")
    if len(filespace) > 63 or not set(filespace) <= allowed or filespace.startswith("-") or filespace.endswith("-"):
        raise ConfigError(
            f"filespace name {filespace!r} must be 1 to 63 lower-case letters, digits and inner hyphens"
            " (it becomes part of the TLS name <filespace>.meta.lucid)"
        )


class _Reader:
    """Reads keys from one section, failing with the file and the key named."""

    def __init__(self, path: Path, section: configparser.SectionProxy, filespace: str) -> None:
        self.path = path
        self.section = section
        self.filespace = filespace
        self.base = path.parent

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: [{SECTION}] {key}: {problem}")

    def read(self, data_dir: str | None, listen: Sequence[str]) -> MetaConfig:
        unknown = sorted(set(self.section) - KEYS)
        if unknown:
            raise self.fail(unknown[0], "unknown key; see etc/lucid-meta.ini for the known ones")
        certificate, private_key = self.tls_files()
        return MetaConfig(
            path=self.path,
            filespace=self.filespace,
            data_dir=self.data_dir(data_dir),
            listen=self.listen(listen),
            advertise=tuple(self.lines("advertise")),
            certificate=certificate,
            private_key=private_key,
            server_id=self.text("server_id") or f"{socket.gethostname()}/{self.filespace}",
            discovery=self.discovery(),
            max_connections=self.integer("max_connections", DEFAULT_MAX_CONNECTIONS),
            store=self.text("store") or None,
            durability=self.durability(),
            ship_interval=self.number("ship_interval", DEFAULT_SHIP_INTERVAL),
            snapshot_interval=self.number("snapshot_interval", DEFAULT_SNAPSHOT_INTERVAL),
            check_interval=self.number("check_interval", DEFAULT_CHECK_INTERVAL),
            auto_restore=self.boolean("auto_restore", True),
            retention=self.duration("retention", DEFAULT_RETENTION),
            prune=self.prune(),
            lock_grace=self.seconds("lock_grace", DEFAULT_LOCK_GRACE),
        )

    # -- kinds of value ------------------------------------------------------------

    def text(self, key: str) -> str:
        return self.section.get(key, "").strip()

    def lines(self, key: str) -> list[str]:
        return [line.strip() for line in self.section.get(key, "").splitlines() if line.strip()]

    def resolve(self, text: str) -> Path:
        return (self.base / Path(text).expanduser()).resolve()

    def number(self, key: str, default: float) -> float:
        text = self.text(key)
        if not text:
            return default
        try:
            value = float(text)
        except ValueError:
            raise self.fail(key, f"{text!r} is not a number") from None
        if not math.isfinite(value) or value <= 0:
            raise self.fail(key, f"{text} must be more than zero")
        return value

    def seconds(self, key: str, default: float) -> float:
        """A number of seconds that may be zero (a duration such as 45 or 2m, or 0: none)."""
        text = self.text(key)
        try:
            if text and float(text.lower().removesuffix("s")) == 0:
                return 0.0
        except ValueError:
            pass  # not a bare number: duration() says what is wrong
        return self.duration(key, default)

    def duration(self, key: str, default: float) -> float:
        text = self.text(key)
        if not text:
            return default
        try:
            return parse_duration(text)
        except ValueError as error:
            raise self.fail(key, str(error)) from None

    def boolean(self, key: str, default: bool) -> bool:
        text = self.text(key).lower()
        if not text:
            return default
        if text not in configparser.ConfigParser.BOOLEAN_STATES:
            raise self.fail(key, f"{text!r} is not true or false")
        return configparser.ConfigParser.BOOLEAN_STATES[text]

    def integer(self, key: str, default: int) -> int:
        text = self.text(key)
        if not text:
            return default
        try:
            value = int(text)
        except ValueError:
            raise self.fail(key, f"{text!r} is not a whole number") from None
        if value < 1:
            raise self.fail(key, f"{value} must be at least 1")
        return value

    def existing_file(self, key: str) -> Path:
        text = self.text(key)
        if not text:
            raise self.fail(key, "missing")
        path = self.resolve(text)
        if not path.is_file():
            raise self.fail(key, f"no file at {path}")
        return path

    def endpoint(self, key: str, description: str) -> str:
        if description.split(":", 1)[0].lower() in ("ssl", "tls"):
            raise self.fail(key, f"{description!r}: give a plain endpoint such as tcp:7100; TLS is added by the server")
        try:
            serverFromString(None, description)  # parses only; the reactor is used when listening
        except (ValueError, KeyError, TypeError) as error:
            raise self.fail(key, f"{description!r} is not a server endpoint string: {error}") from None
        return description

    # -- the keys ----------------------------------------------------------------

    def data_dir(self, override: str | None) -> Path:
        if override:
            return Path(override).expanduser().resolve()
        text = self.text("data_dir")
        if not text:
            return DEFAULT_DATA_ROOT / self.filespace
        return self.resolve(text.replace("{filespace}", self.filespace))

    def listen(self, override: Sequence[str]) -> tuple[str, ...]:
        if override:
            return tuple(self.endpoint("listen (--listen)", description) for description in override)
        lines = self.lines("listen")
        if not lines:
            raise self.fail("listen", "missing; give one or more endpoint strings such as tcp:7100, one per line")
        return tuple(self.endpoint("listen", line) for line in lines)

    def durability(self) -> str:
        store = self.text("store")
        if store and "://" not in store:
            raise self.fail("store", f"{store!r} is not an object store URL such as file:///var/lib/lucidlink/objects")
        mode = self.text("durability").lower()
        if not mode:
            return "sync" if store else "off"
        if mode not in DURABILITY_MODES:
            raise self.fail("durability", f"{mode!r} is not one of {', '.join(DURABILITY_MODES)}")
        if mode != "off" and not store:
            raise self.fail("durability", f"{mode} needs `store`, the object store the journal is shipped to")
        return mode

    def prune(self) -> bool:
        prune = self.boolean("prune", False)
        if prune and not self.text("store"):
            raise self.fail("prune", "true needs `store`, the object store to prune")
        return prune

    def tls_files(self) -> tuple[Path, Path]:
        certificate = self.existing_file("certificate")
        private_key = self.existing_file("private_key")
        try:
            server_tls_options(certificate, private_key).getContext()
            leaf = x509.load_pem_x509_certificates(certificate.read_bytes())[0]
        except (LucidError, ValueError, TypeError, SSL.Error) as error:
            raise self.fail("certificate", f"{certificate} with {private_key} cannot serve TLS: {error}") from None
        identity = identity_for(self.filespace)
        try:
            verify_certificate_hostname(leaf, identity)
        except (VerificationError, CertificateError):
            raise self.fail(
                "certificate", f"{certificate} does not name {identity}, so clients would refuse it"
            ) from None
        return certificate, private_key

    def discovery(self) -> DiscoverySettings | None:
        endpoints = self.lines("discovery")
        if not endpoints:
            for key in ("discovery_ca", "registration_secret", "registration_secret_file"):
                if self.text(key):
                    raise self.fail(key, "set, but no discovery endpoints are given to register with")
            return None
        for description in endpoints:
            if description.split(":", 1)[0].lower() in ("ssl", "tls"):
                raise self.fail("discovery", f"{description!r}: give a plain endpoint such as tcp:host:7000")
        return DiscoverySettings(
            endpoints=tuple(endpoints),
            ca_file=self.existing_file("discovery_ca"),
            identity=self.text("discovery_identity") or DEFAULT_DISCOVERY_IDENTITY,
            key=self.registration_secret(),
            heartbeat_interval=self.number("heartbeat_interval", DEFAULT_HEARTBEAT_INTERVAL),
        )

    def registration_secret(self) -> RegistrationKey:
        inline = self.text("registration_secret")
        file_name = self.text("registration_secret_file")
        if inline and file_name:
            raise self.fail("registration_secret", "give registration_secret or registration_secret_file, not both")
        key = "registration_secret"
        if file_name:
            key = "registration_secret_file"
            path = self.resolve(file_name)
            try:
                mode = path.stat().st_mode
                text = path.read_text(encoding="utf-8")
            except OSError as error:
                raise self.fail(key, f"cannot read {path}: {error.strerror or error}") from None
            if os.name == "posix" and stat.S_IMODE(mode) & 0o077:
                raise self.fail(key, f"{path} may be read by others (mode {stat.S_IMODE(mode):o}); chmod 600 it")
        elif inline:
            text = inline
        else:
            raise self.fail("registration_secret", "missing (or give registration_secret_file); discovery needs it")
        try:
            return RegistrationKey.parse(text)
        except InvalidArgument as error:
            raise self.fail(key, str(error)) from None
