"""
The soft-state registry: which metadata server serves which filespace, now.

Metadata servers register and then heartbeat; every heartbeat renews their
entry for ``entry_ttl`` seconds, and an entry whose heartbeats stop simply
expires.  Nothing is stored anywhere else, so a restarted discovery instance
is complete again after one heartbeat period, and any number of instances
can answer side by side.

The registry is plain logic: the clock is a parameter, and :meth:`Registry.sweep`
(run by a ``TimerService``) frees expired entries.  :meth:`Registry.resolve`
never answers with an expired entry, swept or not.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

from lucidlink.errors import InvalidArgument, NoSpace
from lucidlink.protocol.messages import ServerStatus

MAX_NAME_LENGTH = 255
MAX_ENDPOINTS = 16

# Lower ranks are preferred when several servers registered one filespace.
_STATUS_RANK = {
    ServerStatus.SERVING: 0,
    ServerStatus.RESTORING: 1,
    ServerStatus.DRAINING: 2,
}
_OTHER_RANK = len(_STATUS_RANK)


@dataclass(frozen=True, slots=True)
class Location:
    """Where a filespace is served: the answer to a resolve."""

    filespace: str
    endpoints: tuple[str, ...]
    identity: str
    ttl_ms: int
    """How long the answer holds without another heartbeat (static: as configured)."""
    status: ServerStatus


@dataclass(frozen=True, slots=True)
class Registration:
    """One metadata server's entry for one filespace, as its latest heartbeat left it."""

    filespace: str
    server_id: str
    endpoints: tuple[str, ...]
    identity: str
    status: ServerStatus
    renewed_at: float
    expires_at: float


class Registry:
    """Soft-state entries keyed by (filespace, server id), expiring ``entry_ttl`` after renewal.

    Entries are kept in order of renewal; since every renewal grants the same
    TTL, that is also the order of expiry, so a sweep only looks at the
    entries it frees.  At most ``max_entries`` entries exist: renewing an
    entry always works, a new one is refused with :class:`~lucidlink.errors.NoSpace`
    while the registry is full.
    """

    def __init__(self, clock: IReactorTime, *, entry_ttl: float, max_entries: int) -> None:
        if entry_ttl <= 0:
            raise InvalidArgument(f"entry_ttl must be positive, not {entry_ttl}")
        if max_entries < 1:
            raise InvalidArgument(f"max_entries must be at least 1, not {max_entries}")
        self.clock = clock
        self.entry_ttl = entry_ttl
        self.max_entries = max_entries
        self._by_renewal: OrderedDict[tuple[str, str], Registration] = OrderedDict()
        self._by_filespace: dict[str, dict[str, Registration]] = {}

    def __len__(self) -> int:
        return len(self._by_renewal)

    def register(
        self,
        filespace: str,
        server_id: str,
        endpoints: Sequence[str],
        identity: str,
        status: ServerStatus,
    ) -> Registration:
        """Create or renew the entry of ``server_id`` for ``filespace``.

        :raise InvalidArgument: if a field is empty, too long or malformed.
        :raise NoSpace: if this is a new entry and the registry is full.
        """
        _check_registration(filespace, server_id, endpoints, identity)
        key = (filespace, server_id)
        if key not in self._by_renewal and len(self._by_renewal) >= self.max_entries:
            self.sweep()
            if len(self._by_renewal) >= self.max_entries:
                raise NoSpace(
                    f"discovery registry is full ({self.max_entries} entries); "
                    f"cannot add server {server_id!r} for filespace {filespace!r}"
                )
        now = self.clock.seconds()
        entry = Registration(
            filespace, server_id, tuple(endpoints), identity, ServerStatus(status), now, now + self.entry_ttl
        )
        self._by_renewal[key] = entry
        self._by_renewal.move_to_end(key)
        self._by_filespace.setdefault(filespace, {})[server_id] = entry
        return entry

    def resolve(self, filespace: str) -> Location | None:
        """The preferred live entry for ``filespace``, or None.

        Preference: SERVING, then RESTORING, then DRAINING, then any other
        status; among equals the most recently renewed.  Expired entries are
        passed over whether or not a sweep has removed them yet, so a name
        that expired and a name never seen take the same path to None.
        """
        now = self.clock.seconds()
        best: Registration | None = None
        best_key = (0, 0.0)
        for entry in self._by_filespace.get(filespace, {}).values():
            if entry.expires_at <= now:
                continue
            key = (-_STATUS_RANK.get(entry.status, _OTHER_RANK), entry.renewed_at)
            if best is None or key > best_key:
                best, best_key = entry, key
        if best is None:
            return None
        ttl_ms = max(1, math.ceil((best.expires_at - now) * 1000))
        return Location(best.filespace, best.endpoints, best.identity, ttl_ms, best.status)

    def get(self, filespace: str, server_id: str) -> Registration | None:
        """The live entry of ``server_id`` for ``filespace``, or None."""
        entry = self._by_filespace.get(filespace, {}).get(server_id)
        if entry is None or entry.expires_at <= self.clock.seconds():
            return None
        return entry

    def entries(self, filespace: str) -> list[Registration]:
        """Every live entry for ``filespace``, most recently renewed last."""
        now = self.clock.seconds()
        live = [e for e in self._by_filespace.get(filespace, {}).values() if e.expires_at > now]
        return sorted(live, key=lambda e: e.renewed_at)

    def sweep(self) -> int:
        """Remove every expired entry; return how many went."""
        now = self.clock.seconds()
        removed = 0
        while self._by_renewal:
            key, entry = next(iter(self._by_renewal.items()))
            if entry.expires_at > now:
                break
            del self._by_renewal[key]
            servers = self._by_filespace[entry.filespace]
            del servers[entry.server_id]
            if not servers:
                del self._by_filespace[entry.filespace]
            removed += 1
        return removed


def _check_registration(filespace: str, server_id: str, endpoints: Sequence[str], identity: str) -> None:
    for what, value in (("filespace", filespace), ("server id", server_id), ("identity", identity)):
        _check_text(what, value)
    if not endpoints:
        raise InvalidArgument("a registration must name at least one endpoint")
    if len(endpoints) > MAX_ENDPOINTS:
        raise InvalidArgument(f"a registration may name at most {MAX_ENDPOINTS} endpoints, not {len(endpoints)}")
    for endpoint in endpoints:
        _check_text("endpoint", endpoint)
        if ":" not in endpoint:
            raise InvalidArgument(f"endpoint {endpoint!r} is not an endpoint string such as tcp:HOST:PORT")


def _check_text(what: str, value: str) -> None:
    if not value:
        raise InvalidArgument(f"a registration must have a {what}")
    if len(value) > MAX_NAME_LENGTH:
        raise InvalidArgument(f"{what} is longer than {MAX_NAME_LENGTH} characters")
    if not value.isprintable() or value != value.strip():
        raise InvalidArgument(f"{what} {value!r} has blanks at its ends or unprintable characters")
