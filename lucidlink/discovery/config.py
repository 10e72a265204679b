"""
The discovery service's configuration: one ``[discovery]`` section of an ini file.

:func:`load_config` reads and checks every key at once, so ``twistd`` refuses
to start with one clear line naming the file and the key, rather than
failing later.  Relative paths are taken from the config file's directory.
``etc/lucid-discovery.ini`` documents every key.
"""

from __future__ import annotations

import configparser
import dataclasses
import math
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from OpenSSL import SSL
from twisted.internet.endpoints import serverFromString
from twisted.python import usage

from lucidlink.discovery.auth import DEFAULT_MAX_SKEW, Keyring, RegistrationKey
from lucidlink.discovery.shedding import DEFAULT_MAX_HANDSHAKES, DEFAULT_MAX_SOURCES
from lucidlink.discovery.static_map import StaticMap
from lucidlink.errors import InvalidArgument, LucidError
from lucidlink.inifile import read_section
from lucidlink.tls import server_tls_options

SECTION = "discovery"
DEFAULT_LISTEN_BACKLOG = 4096
"""The listen backlog of a ``listen`` endpoint that names none (Twisted's own default is 50)."""
_BACKLOG_KINDS = ("tcp", "tcp6", "unix")
DEFAULT_METRICS_LISTEN = "tcp:9120:interface=127.0.0.1"

T = TypeVar("T")


def with_backlog(description: str, backlog: int = DEFAULT_LISTEN_BACKLOG) -> str:
    """``description`` with ``backlog=`` added if it is a tcp, tcp6 or unix endpoint without one.

    When the accept gate holds new connections back, the kernel's backlog is
    where they wait: at Twisted's default of 50 it would drop nearly all of a
    storm's connection attempts.  (Linux caps it at ``net.core.somaxconn``.)
    """
    kind, _, rest = description.partition(":")
    if kind.lower() not in _BACKLOG_KINDS or "backlog=" in rest:
        return description
    return f"{description}:backlog={backlog}"


class ConfigError(usage.UsageError):
    """The configuration file is missing, unreadable, or has a bad or missing key."""


@dataclass(frozen=True)
class DiscoveryConfig:
    """Everything ``twistd lucid-discovery`` is told, checked."""

    path: Path
    listen: tuple[str, ...]
    certificate: Path
    private_key: Path
    keyring: Keyring
    static_map_path: Path | None = None
    static_map: StaticMap = dataclasses.field(default_factory=StaticMap)
    entry_ttl: float = 15.0
    heartbeat_interval: float = 5.0
    max_clock_skew: float = DEFAULT_MAX_SKEW
    max_entries: int = 20_000
    max_connections: int = 2_000
    max_handshakes: int = DEFAULT_MAX_HANDSHAKES
    max_in_flight: int = 1_000
    per_source_rate: float = 20.0
    per_source_burst: float = 40.0
    max_sources: int = DEFAULT_MAX_SOURCES
    idle_timeout: float = 60.0
    handshake_timeout: float = 10.0
    metrics_listen: str = DEFAULT_METRICS_LISTEN


KEYS = frozenset({
    "listen", "certificate", "private_key",
    "registration_secret_current", "registration_secret_current_file",
    "registration_secret_previous", "registration_secret_previous_file", "registration_secret_previous_expires",
    "static_map", "entry_ttl", "heartbeat_interval", "max_clock_skew", "max_entries", "max_connections",
    "max_handshakes", "max_in_flight", "per_source_rate", "per_source_burst", "max_sources", "idle_timeout",
    "handshake_timeout", "metrics_listen",
})


def load_config(path: Path | str, listen: Sequence[str] = ()) -> DiscoveryConfig:
    """Read and check ``path``; ``listen``, if given, replaces the file's ``listen``.

    :raise ConfigError: naming the file and the key at fault.
    """
    path = Path(path)
    return _Reader(path, read_section(path, SECTION, ConfigError)).read(listen)


class _Reader:
    """Reads keys from one section, failing with the file and key named."""

    def __init__(self, path: Path, section: configparser.SectionProxy) -> None:
        self.path = path
        self.section = section
        self.base = path.parent

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.path}: [{SECTION}] {key}: {problem}")

    def read(self, listen_override: Sequence[str]) -> DiscoveryConfig:
        unknown = sorted(set(self.section) - KEYS)
        if unknown:
            raise self.fail(unknown[0], "unknown key; see etc/lucid-discovery.ini for the known ones")
        defaults = DiscoveryConfig.__dataclass_fields__
        entry_ttl = self.number("entry_ttl", defaults["entry_ttl"].default)
        heartbeat_interval = self.number("heartbeat_interval", defaults["heartbeat_interval"].default)
        if heartbeat_interval >= entry_ttl:
            raise self.fail(
                "heartbeat_interval",
                f"{heartbeat_interval:g} s must be shorter than entry_ttl ({entry_ttl:g} s), or entries expire between heartbeats",
            )
        idle_timeout = self.number("idle_timeout", defaults["idle_timeout"].default, allow_zero=True)
        if 0 < idle_timeout <= heartbeat_interval:
            raise self.fail(
                "idle_timeout",
                f"{idle_timeout:g} s must be longer than heartbeat_interval ({heartbeat_interval:g} s), "
                "or metadata servers' connections are closed between heartbeats (0 turns it off)",
            )
        metrics_listen = self.section.get("metrics_listen", DEFAULT_METRICS_LISTEN).strip()
        if metrics_listen:
            self.endpoint("metrics_listen", metrics_listen)
        static_map_path = self.resolve(self.section["static_map"].strip()) if self.section.get("static_map", "").strip() else None
        certificate, private_key = self.tls_files()
        return DiscoveryConfig(
            path=self.path,
            listen=self.listen(listen_override),
            certificate=certificate,
            private_key=private_key,
            keyring=self.keyring(),
            static_map_path=static_map_path,
            static_map=self.static_map(static_map_path) if static_map_path else StaticMap(),
            entry_ttl=entry_ttl,
            heartbeat_interval=heartbeat_interval,
            max_clock_skew=self.number("max_clock_skew", defaults["max_clock_skew"].default),
            max_entries=self.integer("max_entries", defaults["max_entries"].default),
            max_connections=self.integer("max_connections", defaults["max_connections"].default),
            max_handshakes=self.integer("max_handshakes", defaults["max_handshakes"].default),
            max_in_flight=self.integer("max_in_flight", defaults["max_in_flight"].default),
            per_source_rate=self.number("per_source_rate", defaults["per_source_rate"].default, allow_zero=True),
            per_source_burst=self.number("per_source_burst", defaults["per_source_burst"].default),
            max_sources=self.integer("max_sources", defaults["max_sources"].default),
            idle_timeout=idle_timeout,
            handshake_timeout=self.number("handshake_timeout", defaults["handshake_timeout"].default),
            metrics_listen=metrics_listen,
        )

    # -- kinds of value -------------------------------------------------------

    def _value(self, key: str, default: T, convert: Callable[[str], T], what: str) -> T:
        text = self.section.get(key, "").strip()
        if not text:
            return default
        try:
            return convert(text)
        except ValueError:
            raise self.fail(key, f"{text!r} is not {what}") from None

    def number(self, key: str, default: float, allow_zero: bool = False) -> float:
        value = self._value(key, default, float, "a number")
        if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
            raise self.fail(key, f"{value:g} must be {'zero or more' if allow_zero else 'more than zero'}")
        return value

    def integer(self, key: str, default: int) -> int:
        value = self._value(key, default, int, "a whole number")
        if value < 1:
            raise self.fail(key, f"{value} must be at least 1")
        return value

    def resolve(self, text: str) -> Path:
        return (self.base / Path(text).expanduser()).resolve()

    def existing_file(self, key: str) -> Path:
        text = self.section.get(key, "").strip()
        if not text:
            raise self.fail(key, "missing")
        path = self.resolve(text)
        if not path.is_file():
            raise self.fail(key, f"no file at {path}")
        return path

    def tls_files(self) -> tuple[Path, Path]:
        certificate = self.existing_file("certificate")
        private_key = self.existing_file("private_key")
        try:
            server_tls_options(certificate, private_key).getContext()
        except (LucidError, ValueError, TypeError, SSL.Error) as error:
            raise self.fail("certificate", f"{certificate} with {private_key} cannot serve TLS: {error}") from None
        return certificate, private_key

    def static_map(self, path: Path) -> StaticMap:
        try:
            return StaticMap.load(path)
        except InvalidArgument as error:
            raise self.fail("static_map", str(error)) from None

    def endpoint(self, key: str, description: str) -> str:
        if description.split(":", 1)[0].lower() in ("ssl", "tls"):
            raise self.fail(key, f"{description!r}: give a plain endpoint such as tcp:7000; TLS is added by discovery")
        try:
            serverFromString(None, description)  # parses only; the reactor is used when listening
        except (ValueError, KeyError, TypeError) as error:
            raise self.fail(key, f"{description!r} is not a server endpoint string: {error}") from None
        return description

    def listen(self, override: Sequence[str]) -> tuple[str, ...]:
        if override:
            return tuple(self.endpoint("listen (--listen)", d) for d in override)
        lines = [line.strip() for line in self.section.get("listen", "").splitlines() if line.strip()]
        if not lines:
            raise self.fail("listen", "missing; give one or more endpoint strings such as tcp:7000, one per line")
        return tuple(self.endpoint("listen", line) for line in lines)

    def secret(self, key: str, retires_at: float | None = None) -> RegistrationKey | None:
        """A ``KEY_ID:HEX`` secret given inline as ``key`` or in the 0600 file ``key_file``."""
        inline = self.section.get(key, "").strip()
        file_key = f"{key}_file"
        file_name = self.section.get(file_key, "").strip()
        if inline and file_name:
            raise self.fail(key, f"give {key} or {file_key}, not both")
        if file_name:
            key, text = file_key, self._secret_file(file_key, self.resolve(file_name))
        elif inline:
            text = inline
        else:
            return None
        try:
            return RegistrationKey.parse(text, retires_at)
        except InvalidArgument as error:
            raise self.fail(key, str(error)) from None

    def _secret_file(self, key: str, path: Path) -> str:
        try:
            mode = path.stat().st_mode
            text = path.read_text(encoding="utf-8")
        except OSError as error:
            raise self.fail(key, f"cannot read {path}: {error.strerror or error}") from None
        if os.name == "posix" and stat.S_IMODE(mode) & 0o077:
            raise self.fail(key, f"{path} may be read by others (mode {stat.S_IMODE(mode):o}); chmod 600 it")
        return text

    def keyring(self) -> Keyring:
        current = self.secret("registration_secret_current")
        if current is None:
            raise self.fail("registration_secret_current", "missing (or give registration_secret_current_file)")
        expires_text = self.section.get("registration_secret_previous_expires", "").strip()
        retires_at = self._instant("registration_secret_previous_expires", expires_text) if expires_text else None
        previous = self.secret("registration_secret_previous", retires_at)
        if previous is not None and retires_at is None:
            raise self.fail(
                "registration_secret_previous_expires",
                "missing; say until when (ISO 8601) the previous secret is still accepted",
            )
        try:
            return Keyring(current, previous)
        except InvalidArgument as error:
            raise self.fail("registration_secret_previous", str(error)) from None

    def _instant(self, key: str, text: str) -> float:
        try:
            moment = datetime.fromisoformat(text)
        except ValueError:
            raise self.fail(key, f"{text!r} is not an ISO 8601 time such as 2026-12-01T00:00:00Z") from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
