"""
Client settings: where discovery is, which CA to trust, where state lives.

Each setting is taken from the first of these that gives it:

1. the command-line option (``--discovery``, ``--ca``, ...);
2. the environment (``LUCID_DISCOVERY``, ``LUCID_CA``, ...; an empty
   variable counts as unset);
3. the ``[client]`` section of the config file;
4. the default.

The config file is the one ``--config`` names, else the one the
``LUCID_CONFIG`` variable names, else ``~/.config/lucid/client.ini``
(``$XDG_CONFIG_HOME/lucid/client.ini`` when that is set).  A file named by
``--config`` or ``LUCID_CONFIG`` must exist; the default one need not, and
without it every setting has its default.  ``docs/client.ini.example`` is an
example to start from.

=====================  ==========================  ==================================
setting (in the file)  environment                 default
=====================  ==========================  ==================================
``discovery``          ``LUCID_DISCOVERY``         none: commands that resolve need it
``ca``                 ``LUCID_CA``                none: commands that connect need it
``discovery_identity`` ``LUCID_DISCOVERY_IDENTITY`` ``discovery.lucid``
``user``               ``LUCID_USER``              none
``state_dir``          ``LUCID_STATE_DIR``         ``~/.local/state/lucid`` (``$XDG_STATE_HOME/lucid``)
``cache_dir``          ``LUCID_CACHE_DIR``         ``~/.cache/lucid`` (``$XDG_CACHE_HOME/lucid``)
``passphrase_file``    ``LUCID_PASSPHRASE_FILE``   none
``store``              ``LUCID_STORE``             none: commands that read or write data need it
``cache_size``         ``LUCID_CACHE_SIZE``        10 GiB, or half the cache disk's free space if less
``read_ahead``         ``LUCID_READ_AHEAD``        4 (chunks)
=====================  ==========================  ==================================

``cache_size`` is how many bytes of sealed chunks ``lucid-mount`` keeps in
``cache_dir`` (per filespace): a number of bytes, or with a suffix ``K``,
``M``, ``G``, ``T`` (powers of 1024; ``KiB``, ``GB``... are read the same).
``read_ahead`` is how many chunks are fetched ahead of a sequential reader
(0 turns read-ahead off).

``store`` is the object store URL where chunks live (``file:///srv/lucid``);
each client may reach it with its own credentials.

``discovery`` is one or more endpoint strings (``tcp:discovery1.example:7000``):
in the file one per line (or separated by commas), in the environment
separated by spaces or commas.  Relative paths in the file are relative to
the file's own folder; relative paths from the environment or the command
line are relative to the working directory; ``~`` is expanded everywhere.
A setting the file does not know is an error, so that a typo is not
silently ignored.
"""

from __future__ import annotations

import configparser
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lucidlink.client.chunk_reader import DEFAULT_READ_AHEAD
from lucidlink.errors import InvalidArgument, NotFound

SECTION = "client"
CONFIG_ENVIRONMENT_VARIABLE = "LUCID_CONFIG"
DEFAULT_DISCOVERY_IDENTITY = "discovery.lucid"
"""The TLS identity discovery instances present unless configured otherwise."""


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5}


def parse_size(text: str) -> int:
    """A size in bytes from ``"20G"``, ``"512MiB"``, ``"1.5T"`` or ``"4096"`` (suffixes are powers of 1024)."""
    match = _SIZE.match(text)
    if match is None:
        raise InvalidArgument(f"{text.strip()!r} is not a size: give bytes, or a number with K, M, G or T (20G)")
    size = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if size <= 0:
        raise InvalidArgument(f"a size must be more than zero bytes, not {text.strip()!r}")
    return size


def parse_count(text: str) -> int:
    """A whole number, zero or more."""
    try:
        value = int(text.strip())
    except ValueError:
        raise InvalidArgument(f"{text.strip()!r} is not a whole number") from None
    if value < 0:
        raise InvalidArgument(f"{value} is negative")
    return value


@dataclass(frozen=True)
class ClientConfig:
    """The client's settings, every source already applied."""

    path: Path | None
    """The config file that was read, or ``None`` when there was none."""
    discovery: tuple[str, ...]
    ca: Path | None
    discovery_identity: str
    user: str | None
    state_dir: Path
    cache_dir: Path
    passphrase_file: Path | None
    store: str | None = None
    cache_size: int | None = None
    """Bytes of chunk cache; None: :func:`~lucidlink.client.chunk_cache.default_capacity`."""
    read_ahead: int = DEFAULT_READ_AHEAD

    def require_store(self) -> str:
        """The object store URL; raise if it is not configured anywhere."""
        if not self.store:
            raise InvalidArgument(
                "no object store is configured: give --store URL, set LUCID_STORE,"
                f" or add 'store = file:///...' to [{SECTION}] in {self._file_hint()}"
            )
        return self.store

    def require_discovery(self) -> tuple[str, ...]:
        """The discovery endpoints; raise if none are configured anywhere."""
        if not self.discovery:
            raise InvalidArgument(
                "no discovery endpoints are configured: give --discovery ENDPOINT, set"
                f" LUCID_DISCOVERY, or add 'discovery = ...' to [{SECTION}] in {self._file_hint()}"
            )
        return self.discovery

    def require_ca(self) -> Path:
        """The CA certificate file; raise if it is not configured or not there."""
        if self.ca is None:
            raise InvalidArgument(
                "no CA certificate is configured: give --ca FILE, set LUCID_CA,"
                f" or add 'ca = ...' to [{SECTION}] in {self._file_hint()}"
            )
        if not self.ca.is_file():
            raise NotFound(f"no CA certificate at {self.ca}")
        return self.ca

    def _file_hint(self) -> str:
        return str(self.path) if self.path is not None else "the config file (--config FILE)"


@dataclass(frozen=True)
class _Setting:
    name: str
    parse: Callable[[str, Path | None], Any]
    """Turns the text of the setting into its value; the path is the folder relative paths start from."""

    @property
    def environment_variable(self) -> str:
        return f"LUCID_{self.name.upper()}"


def _text(value: str, base: Path | None) -> str:
    return value.strip()


def _path(value: str, base: Path | None) -> Path:
    path = Path(value.strip()).expanduser()
    return base / path if base is not None and not path.is_absolute() else path


def _endpoints(value: str, base: Path | None) -> tuple[str, ...]:
    return tuple(part for part in re.split(r"[\s,]+", value) if part)


def _size(value: str, base: Path | None) -> int:
    return parse_size(value)


def _count(value: str, base: Path | None) -> int:
    return parse_count(value)


SETTINGS = (
    _Setting("discovery", _endpoints),
    _Setting("ca", _path),
    _Setting("discovery_identity", _text),
    _Setting("user", _text),
    _Setting("state_dir", _path),
    _Setting("cache_dir", _path),
    _Setting("passphrase_file", _path),
    _Setting("store", _text),
    _Setting("cache_size", _size),
    _Setting("read_ahead", _count),
)


def load_config(
    config_option: Path | None = None,
    *,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> ClientConfig:
    """
    The client's settings from the command line, the environment, the file and the defaults.

    :param config_option: the file ``--config`` named, if it was given.
    :param overrides: command-line values by setting name (``discovery``,
        ``ca``, ...); ``None`` or an empty list means the option was not given.
    :param environ: the environment (default ``os.environ``).
    :raise NotFound: if a config file named by ``--config`` or ``LUCID_CONFIG``
        does not exist.
    :raise InvalidArgument: if the file is not a valid INI file or names an
        unknown setting.
    """
    environ = os.environ if environ is None else environ
    overrides = overrides or {}
    candidate, named_by = config_file_path(config_option, environ)
    from_file = _read_config_file(candidate, named_by)
    path = candidate if from_file is not None else None
    base = path.parent if path is not None else None

    values: dict[str, Any] = {}
    for setting in SETTINGS:
        given = overrides.get(setting.name)
        from_environment = environ.get(setting.environment_variable, "").strip()
        try:
            if given is not None and given != [] and given != ():
                values[setting.name] = _from_command_line(setting, given)
            elif from_environment:
                values[setting.name] = setting.parse(from_environment, None)
            elif from_file and setting.name in from_file:
                values[setting.name] = setting.parse(from_file[setting.name], base)
            else:
                values[setting.name] = None
        except InvalidArgument as error:
            source = (
                "the command line" if given is not None and given != [] and given != ()
                else setting.environment_variable if from_environment else f"[{SECTION}] of {path}"
            )
            raise InvalidArgument(f"{setting.name} from {source}: {error}") from None

    home = Path(environ.get("HOME") or Path.home())
    return ClientConfig(
        path=path,
        discovery=values["discovery"] or (),
        ca=values["ca"],
        discovery_identity=values["discovery_identity"] or DEFAULT_DISCOVERY_IDENTITY,
        user=values["user"] or None,
        state_dir=values["state_dir"] or _xdg(environ, "XDG_STATE_HOME", home / ".local" / "state") / "lucid",
        cache_dir=values["cache_dir"] or _xdg(environ, "XDG_CACHE_HOME", home / ".cache") / "lucid",
        passphrase_file=values["passphrase_file"],
        store=values["store"] or None,
        cache_size=values["cache_size"],
        read_ahead=DEFAULT_READ_AHEAD if values["read_ahead"] is None else values["read_ahead"],
    )


def config_file_path(config_option: Path | None, environ: Mapping[str, str]) -> tuple[Path, str | None]:
    """The config file to read, and what named it (``None`` for the default file)."""
    if config_option is not None:
        return Path(config_option).expanduser(), "--config"
    named = environ.get(CONFIG_ENVIRONMENT_VARIABLE, "").strip()
    if named:
        return Path(named).expanduser(), CONFIG_ENVIRONMENT_VARIABLE
    home = Path(environ.get("HOME") or Path.home())
    return _xdg(environ, "XDG_CONFIG_HOME", home / ".config") / "lucid" / "client.ini", None


def _read_config_file(path: Path, named_by: str | None) -> dict[str, str] | None:
    """The ``[client]`` settings in ``path``; ``None`` if a default file is absent."""
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#",))
    try:
        with path.open(encoding="utf-8") as stream:
            parser.read_file(stream)
    except FileNotFoundError:
        if named_by is None:
            return None
        raise NotFound(f"no client config file at {path} (named by {named_by})") from None
    except configparser.Error as error:
        raise InvalidArgument(f"cannot read the client config file {path}: {_one_line(error)}") from None
    except UnicodeDecodeError:
        raise InvalidArgument(f"the client config file {path} is not UTF-8 text") from None
    if not parser.has_section(SECTION):
        return {}
    settings = dict(parser.items(SECTION, raw=True))
    known = {setting.name for setting in SETTINGS}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise InvalidArgument(
            f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}"
            f" in [{SECTION}] of {path}; known settings: {', '.join(sorted(known))}"
        )
    return settings


def _from_command_line(setting: _Setting, given: Any) -> Any:
    if isinstance(given, (list, tuple)):
        given = ",".join(given)
    if isinstance(given, int):
        return given
    return setting.parse(str(given), None)


def _xdg(environ: Mapping[str, str], variable: str, fallback: Path) -> Path:
    # The XDG base directory specification ignores relative paths.
    value = environ.get(variable, "").strip()
    return Path(value) if value and Path(value).is_absolute() else fallback


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())

