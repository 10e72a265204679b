"""
The static map: fixed answers for small deployments, from an ini file.

Each filespace is a section::

    [filespace media]
    endpoints = tcp:meta1.example.net:7001
                tcp:meta2.example.net:7001
    identity = media.meta.lucid
    ttl = 300

``endpoints`` holds one or more client endpoint strings, one per line;
``identity`` is the TLS identity the metadata server's certificate names;
``ttl`` (seconds, optional) is how long clients may keep the answer.
Registrations take precedence: a static entry answers only while no live
registration exists for its filespace.  A static entry is reported SERVING.
"""

from __future__ import annotations

import configparser
import math
from collections.abc import Mapping
from pathlib import Path

from lucidlink.discovery.registry import Location
from lucidlink.errors import InvalidArgument
from lucidlink.inifile import read_ini
from lucidlink.protocol.messages import ServerStatus

DEFAULT_STATIC_TTL = 60.0
SECTION_PREFIX = "filespace "
_KEYS = frozenset({"endpoints", "identity", "ttl"})


class StaticMap:
    """Filespace name to a fixed :class:`~lucidlink.discovery.registry.Location`."""

    def __init__(self, locations: Mapping[str, Location] | None = None) -> None:
        self.locations: dict[str, Location] = dict(locations or {})

    def __len__(self) -> int:
        return len(self.locations)

    def lookup(self, filespace: str) -> Location | None:
        """The configured location of ``filespace``, or None."""
        return self.locations.get(filespace)

    @classmethod
    def load(cls, path: Path) -> StaticMap:
        """Read a static map file.

        :raise InvalidArgument: naming the file, section and key of anything wrong.
        """
        parser = read_ini(path, InvalidArgument, what="static map", kind="static map",
                          default_section="\x00no defaults")
        return cls({location.filespace: location for location in _locations(parser, path)})


def _locations(parser: configparser.ConfigParser, path: Path) -> list[Location]:
    locations = []
    for section in parser.sections():
        if not section.startswith(SECTION_PREFIX) or not section[len(SECTION_PREFIX):].strip():
            raise InvalidArgument(f"{path}: section [{section}] should be [filespace NAME]")
        name = section[len(SECTION_PREFIX):].strip()
        values = parser[section]

        def fail(key: str, problem: str, section: str = section) -> InvalidArgument:
            return InvalidArgument(f"{path}: [{section}] {key}: {problem}")

        unknown = sorted(set(values) - _KEYS)
        if unknown:
            raise fail(unknown[0], f"unknown key (known: {', '.join(sorted(_KEYS))})")
        endpoints = tuple(line.strip() for line in values.get("endpoints", "").splitlines() if line.strip())
        if not endpoints:
            raise fail("endpoints", "missing; give one or more endpoint strings such as tcp:HOST:PORT")
        for endpoint in endpoints:
            if ":" not in endpoint or any(c.isspace() for c in endpoint):
                raise fail("endpoints", f"{endpoint!r} is not an endpoint string such as tcp:HOST:PORT")
        identity = values.get("identity", "").strip()
        if not identity:
            raise fail("identity", "missing; give the name the metadata server's certificate carries")
        try:
            ttl = float(values.get("ttl", str(DEFAULT_STATIC_TTL)))
        except ValueError:
            raise fail("ttl", f"{values['ttl']!r} is not a number of seconds") from None
        if not 0 < ttl <= 86_400:
            raise fail("ttl", f"{ttl:g} is not between 0 and 86400 seconds")
        locations.append(Location(name, endpoints, identity, math.ceil(ttl * 1000), ServerStatus.SERVING))
    return locations
