"""
The last answer of discovery for each filespace, kept on disk.

When every client of a deployment reconnects at once (a metadata server
restarted, a network came back), the ones that remember where their
filespace was served go straight there and leave discovery alone.  So the
client keeps the last :class:`Location` of each filespace in one JSON file,
``endpoints.json`` in its state folder (``state_dir`` of
:mod:`lucidlink.client.config`), and it survives a restart of the client.

The file is written atomically — a temporary file beside it with mode 0600,
renamed over the old one — so a client that dies leaves the old file or the
new one, never half of one.  It is not fsynced: in a reconnect storm every
client writes it, and after a power cut a stale or empty file only sends the
client to discovery, as a missing one would.  It is read again before every
write, so two client processes sharing a state folder lose little of each
other's answers.

The cache is an optimisation, never a source of errors: a file that cannot
be read, is not JSON, or holds entries of the wrong shape is logged once and
ignored (entries that do make sense are kept) and the file is rewritten; a
file that cannot be written is logged, and the client goes on without it.

Format::

    {"version": 1,
     "filespaces": {"demo": {"endpoints": ["tcp:10.0.0.5:7100"],
                             "identity": "demo.meta.lucid",
                             "status": "serving", "ttl_ms": 30000,
                             "stored_at": 1732634400.5,
                             "source": "tcp:10.0.0.2:7000"}}}
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.logger import Logger

from lucidlink.atomic import write_atomically
from lucidlink.protocol.messages import Resolved, ServerStatus

FILE_NAME = "endpoints.json"
FORMAT_VERSION = 1

_log = Logger()


@dataclass(frozen=True)
class Location:
    """Where discovery said a filespace is served, and when it said so."""

    filespace: str
    endpoints: tuple[str, ...]
    """Endpoint strings of the metadata server, in the order to try them."""
    identity: str
    """The TLS identity the metadata server's certificate must carry."""
    status: ServerStatus
    ttl_ms: int
    """How long discovery vouches for this answer."""
    stored_at: float
    """When the answer arrived, in seconds on the clock of the client that asked."""
    source: str = ""
    """The discovery instance that answered."""

    @classmethod
    def from_resolved(cls, resolved: Resolved, stored_at: float, source: str = "") -> Location:
        """The location a :class:`~lucidlink.protocol.messages.Resolved` answer gives."""
        return cls(
            filespace=resolved.filespace,
            endpoints=tuple(resolved.endpoints),
            identity=resolved.identity,
            status=ServerStatus(resolved.status),
            ttl_ms=resolved.ttl_ms,
            stored_at=stored_at,
            source=source,
        )

    @property
    def status_name(self) -> str:
        """The status as users read it: ``serving``, ``restoring``, ..."""
        return self.status.name.lower()

    def to_json(self) -> dict[str, Any]:
        """The JSON object for this location (without the filespace, which is its key)."""
        return {
            "endpoints": list(self.endpoints),
            "identity": self.identity,
            "status": self.status_name,
            "ttl_ms": self.ttl_ms,
            "stored_at": self.stored_at,
            "source": self.source,
        }

    @classmethod
    def from_json(cls, filespace: str, data: Any) -> Location:
        """Read what :meth:`to_json` wrote; raise ValueError if it is not that shape."""
        if not isinstance(data, dict):
            raise ValueError(f"entry for {filespace!r} is not an object")
        endpoints = data.get("endpoints")
        if not isinstance(endpoints, list) or not all(isinstance(e, str) and e for e in endpoints):
            raise ValueError(f"entry for {filespace!r}: endpoints is not a list of endpoint strings")
        identity = _typed(data, "identity", str, filespace)
        status_name = _typed(data, "status", str, filespace)
        try:
            status = ServerStatus[status_name.upper()]
        except KeyError:
            raise ValueError(f"entry for {filespace!r}: unknown status {status_name!r}") from None
        ttl_ms = _typed(data, "ttl_ms", int, filespace)
        stored_at = _typed(data, "stored_at", (int, float), filespace)
        source = data.get("source", "")
        if not isinstance(source, str) or ttl_ms < 0 or not identity:
            raise ValueError(f"entry for {filespace!r} has an impossible value")
        return cls(filespace, tuple(endpoints), identity, status, ttl_ms, float(stored_at), source)


def _typed(data: dict[str, Any], key: str, kind: type | tuple[type, ...], filespace: str) -> Any:
    value = data.get(key)
    # bool is an int to Python, never to this file.
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"entry for {filespace!r}: {key} is missing or of the wrong type")
    return value


class EndpointCache:
    """
    The last :class:`Location` of each filespace, in ``state_dir/endpoints.json``.

    The file is read on first use.  :meth:`put` and :meth:`remove` write it
    at once; failing to read or write it is logged, never raised.
    """

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / FILE_NAME
        self._entries: dict[str, Location] | None = None
        self._complained_about_reading = False
        self._complained_about_writing = False

    def get(self, filespace: str) -> Location | None:
        """The last known location of ``filespace``, or ``None``."""
        return self._loaded().get(filespace)

    def filespaces(self) -> list[str]:
        """The filespaces with a known location, sorted."""
        return sorted(self._loaded())

    def put(self, location: Location) -> None:
        """Remember ``location`` (replacing what was known of its filespace), on disk."""
        self._update(lambda entries: entries.__setitem__(location.filespace, location))

    def remove(self, filespace: str) -> None:
        """Forget where ``filespace`` is, on disk too."""
        self._update(lambda entries: entries.pop(filespace, None))

    # -- internals --------------------------------------------------------

    def _loaded(self) -> dict[str, Location]:
        if self._entries is None:
            entries, sound = self._read()
            self._entries = entries
            if not sound:
                self._write(entries)
        return self._entries

    def _update(self, change: Callable[[dict[str, Location]], object]) -> None:
        # Read the file afresh: another client process may have written since.
        entries, _ = self._read()
        change(entries)
        self._entries = entries
        self._write(entries)

    def _read(self) -> tuple[dict[str, Location], bool]:
        """The entries on disk, and whether the file was sound (missing counts as sound)."""
        try:
            text = self.path.read_bytes().decode("utf-8")
        except FileNotFoundError:
            return {}, True
        except (OSError, UnicodeDecodeError) as error:
            self._complain(f"cannot read it: {_reason(error)}")
            return {}, False
        try:
            document = json.loads(text)
        except ValueError as error:
            self._complain(f"it is not JSON: {error}")
            return {}, False
        if (
            not isinstance(document, dict)
            or document.get("version") != FORMAT_VERSION
            or not isinstance(document.get("filespaces"), dict)
        ):
            self._complain(f"it is not a version {FORMAT_VERSION} endpoint cache")
            return {}, False
        return self._entries_from(document["filespaces"])

    def _entries_from(self, raw: Mapping[str, Any]) -> tuple[dict[str, Location], bool]:
        entries: dict[str, Location] = {}
        problems: list[str] = []
        for filespace, data in raw.items():
            try:
                entries[filespace] = Location.from_json(filespace, data)
            except ValueError as error:
                problems.append(str(error))
        if problems:
            self._complain("; ".join(problems) + " (those entries are dropped)")
        return entries, not problems

    def _write(self, entries: Mapping[str, Location]) -> None:
        document = {
            "version": FORMAT_VERSION,
            "filespaces": {name: entries[name].to_json() for name in sorted(entries)},
        }
        data = (json.dumps(document, indent=1, sort_keys=True) + "\n").encode("utf-8")
        try:
            write_atomically(self.path, data, durable=False)
        except OSError as error:
            if not self._complained_about_writing:
                self._complained_about_writing = True
                _log.warn(
                    "cannot write the endpoint cache {path}: {reason}; carrying on without it",
                    path=str(self.path), reason=_reason(error),
                )
            return
        self._complained_about_writing = False
        self._complained_about_reading = False

    def _complain(self, problem: str) -> None:
        if not self._complained_about_reading:
            self._complained_about_reading = True
            _log.warn(
                "ignoring the endpoint cache {path}: {problem}; it will be rewritten",
                path=str(self.path), problem=problem,
            )


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error)
