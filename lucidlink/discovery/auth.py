"""
Authentication of registrations: only holders of a registration secret may
tell discovery where a filespace is served.

Every :class:`~lucidlink.protocol.messages.Register` and ``Heartbeat`` carries
``mac``, an HMAC-SHA256 keyed by the secret ``key_id`` names, over
:func:`signed_bytes` of the message: the frame :func:`~lucidlink.protocol.codec.encode_frame`
makes of the message with ``mac`` set to empty bytes, with request id 0, no
flags and the protocol version.  That is every other field in its wire
encoding (length-prefixed, so fields cannot be shifted into each other) plus
the header, so a Register cannot pass for a Heartbeat.  ``key_id`` is signed
too.

Secrets rotate without downtime: a :class:`Keyring` holds the current secret
and optionally the previous one with the time it retires.  Metadata servers
switch to the new secret while discovery still accepts the previous; after
its retirement a message signed with it is refused.

``timestamp_ms`` (wall-clock milliseconds) must lie within ``max_skew`` of
discovery's clock in either direction, and ``nonce`` must not have been seen
in that window: a captured message cannot be replayed.  The nonce cache is
bounded in time (a nonce is forgotten once its timestamp is too old to pass
anyway) and in size (when full, the oldest nonce goes and nothing older than
it is accepted any more, so a full cache refuses rather than forgets).

:class:`RegistrationVerifier` logs each refusal with a message of its own.
To the sender, an unknown key id and a bad MAC read alike ("authentication
failed"); the other refusals are explained, since the sender has shown it
holds a secret and needs to know, for instance, that its clock is off.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from lucidlink.errors import AuthenticationFailed, InvalidArgument
from lucidlink.protocol.codec import encode_frame
from lucidlink.protocol.messages import Register

DEFAULT_MAX_SKEW = 30.0
DEFAULT_NONCE_CACHE_SIZE = 100_000
MIN_SECRET_BYTES = 16
MIN_NONCE_BYTES = 8
MAX_NONCE_BYTES = 64
MAC_BYTES = 32

# Reasons a registration is refused: metric labels and log keys.
UNKNOWN_KEY = "unknown_key"
RETIRED_KEY = "retired_key"
BAD_MAC = "bad_mac"
STALE_TIMESTAMP = "stale_timestamp"
BAD_NONCE = "bad_nonce"
REPLAYED_NONCE = "replayed_nonce"
BEFORE_REPLAY_WINDOW = "before_replay_window"
REASONS = (UNKNOWN_KEY, RETIRED_KEY, BAD_MAC, STALE_TIMESTAMP, BAD_NONCE, REPLAYED_NONCE, BEFORE_REPLAY_WINDOW)

_GENERIC_REFUSAL = "registration refused: authentication failed"


@dataclass(frozen=True)
class RegistrationKey:
    """A registration secret and its id; ``retires_at`` (POSIX seconds) only for a previous secret."""

    key_id: str
    secret: bytes = dataclasses.field(repr=False)
    retires_at: float | None = None

    def __post_init__(self) -> None:
        if not self.key_id or not self.key_id.isprintable() or self.key_id != self.key_id.strip():
            raise InvalidArgument(f"registration key id {self.key_id!r} must be printable text without blanks at its ends")
        if len(self.secret) < MIN_SECRET_BYTES:
            raise InvalidArgument(
                f"registration secret {self.key_id!r} has {len(self.secret)} bytes; at least {MIN_SECRET_BYTES} are needed"
            )

    @classmethod
    def parse(cls, text: str, retires_at: float | None = None) -> RegistrationKey:
        """Read ``KEY_ID:HEX_SECRET`` (for example ``2026-11:`` and 64 hex digits)."""
        key_id, colon, hex_secret = text.strip().rpartition(":")
        if not colon or not key_id:
            raise InvalidArgument("a registration secret is written KEY_ID:HEX_SECRET")
        try:
            secret = bytes.fromhex(hex_secret)
        except ValueError:
            raise InvalidArgument(f"the secret of registration key {key_id!r} is not hexadecimal") from None
        return cls(key_id, secret, retires_at)


class Keyring:
    """The current registration secret and, while it rotates out, the previous one."""

    def __init__(self, current: RegistrationKey, previous: RegistrationKey | None = None) -> None:
        if current.retires_at is not None:
            raise InvalidArgument("the current registration secret cannot have a retirement time")
        if previous is not None:
            if previous.retires_at is None:
                raise InvalidArgument("the previous registration secret needs the time it retires")
            if previous.key_id == current.key_id:
                raise InvalidArgument(f"the current and previous registration secrets share the id {current.key_id!r}")
        self.current = current
        self.previous = previous

    def find(self, key_id: str) -> RegistrationKey | None:
        """The key named ``key_id``, retired or not, or None."""
        if key_id == self.current.key_id:
            return self.current
        if self.previous is not None and key_id == self.previous.key_id:
            return self.previous
        return None


def signed_bytes(message: Register) -> bytes:
    """What the MAC of a Register or Heartbeat covers (see the module docstring)."""
    return encode_frame(dataclasses.replace(message, mac=b""))


def compute_mac(message: Register, secret: bytes) -> bytes:
    """HMAC-SHA256 of :func:`signed_bytes` under ``secret``."""
    return hmac.new(secret, signed_bytes(message), hashlib.sha256).digest()


def sign(message: Register, key_id: str, secret: bytes) -> Register:
    """``message`` naming ``key_id``, with its MAC: what a metadata server sends."""
    named = dataclasses.replace(message, key_id=key_id, mac=b"")
    return dataclasses.replace(named, mac=compute_mac(named, secret))


class RegistrationVerifier:
    """Checks MAC, key, timestamp and nonce of each registration; refuses and logs failures.

    ``on_refused(reason)`` is told of every refusal (for metrics); ``reason``
    is one of :data:`REASONS`.
    """

    log = Logger()

    def __init__(
        self,
        keyring: Keyring,
        clock: IReactorTime,
        *,
        max_skew: float = DEFAULT_MAX_SKEW,
        nonce_cache_size: int = DEFAULT_NONCE_CACHE_SIZE,
        on_refused: Callable[[str], object] | None = None,
    ) -> None:
        self.keyring = keyring
        self.clock = clock
        self.max_skew = max_skew
        self.on_refused = on_refused
        self.nonces = NonceCache(nonce_cache_size)

    def verify(self, message: Register, source: str = "unknown") -> None:
        """Accept ``message`` or raise :class:`~lucidlink.errors.AuthenticationFailed`.

        An accepted message's nonce is remembered, so the same message is
        refused the second time.
        """
        now = self.clock.seconds()
        key = self.keyring.find(message.key_id)
        if key is None:
            self._refuse(UNKNOWN_KEY, _GENERIC_REFUSAL, message, source,
                         "refused registration from {source}: unknown key id {key_id!r}")
        assert key is not None
        if len(message.mac) != MAC_BYTES or not hmac.compare_digest(message.mac, compute_mac(message, key.secret)):
            self._refuse(BAD_MAC, _GENERIC_REFUSAL, message, source,
                         "refused registration from {source}: bad MAC for key id {key_id!r}")
        if key.retires_at is not None and now >= key.retires_at:
            retired = _iso(key.retires_at)
            self._refuse(
                RETIRED_KEY,
                f"registration refused: key {key.key_id!r} was retired at {retired}; sign with the current key",
                message, source,
                "refused registration from {source}: previous key id {key_id!r} used after it retired at {retired}",
                retired=retired,
            )
        skew = message.timestamp_ms / 1000 - now
        if abs(skew) > self.max_skew:
            direction = "ahead of" if skew > 0 else "behind"
            self._refuse(
                STALE_TIMESTAMP,
                f"registration refused: its timestamp is {abs(skew):.1f} s {direction} discovery's clock "
                f"(at most {self.max_skew:g} s allowed); check the clocks",
                message, source,
                "refused registration from {source}: stale timestamp, {skew:.1f} s {direction} this clock",
                skew=abs(skew), direction=direction,
            )
        if not MIN_NONCE_BYTES <= len(message.nonce) <= MAX_NONCE_BYTES:
            self._refuse(
                BAD_NONCE,
                f"registration refused: a nonce has {MIN_NONCE_BYTES} to {MAX_NONCE_BYTES} bytes, not {len(message.nonce)}",
                message, source,
                "refused registration from {source}: nonce of {length} bytes", length=len(message.nonce),
            )
        outcome = self.nonces.remember(message.nonce, message.timestamp_ms, now + 2 * self.max_skew, now)
        if outcome == REPLAYED_NONCE:
            self._refuse(REPLAYED_NONCE, "registration refused: replayed nonce", message, source,
                         "refused registration from {source}: replayed nonce {nonce}", nonce=message.nonce.hex())
        elif outcome == BEFORE_REPLAY_WINDOW:
            self._refuse(
                BEFORE_REPLAY_WINDOW,
                "registration refused: its timestamp is older than the replay cache reaches; send a fresh one",
                message, source,
                "refused registration from {source}: timestamp older than the full nonce cache remembers",
            )

    def _refuse(self, reason: str, text: str, message: Register, source: str, log_format: str, **fields: object) -> None:
        self.log.warn(
            log_format, source=source, key_id=message.key_id, filespace=message.filespace,
            server_id=message.server_id, reason=reason, **fields,
        )
        if self.on_refused is not None:
            self.on_refused(reason)
        raise AuthenticationFailed(text)


class NonceCache:
    """The nonces of accepted registrations, bounded in number and in time.

    Each nonce is kept until ``forget_at``, a time by which its message
    would be refused as stale anyway; the verifier passes "now plus twice the
    allowed skew", which grows with its clock.  When ``max_size`` nonces are kept,
    the oldest is dropped and its timestamp becomes a watermark: no message
    with an older or equal timestamp is accepted, so dropping a nonce never
    opens a replay.
    """

    def __init__(self, max_size: int) -> None:
        if max_size < 1:
            raise InvalidArgument(f"the nonce cache needs room for at least one nonce, not {max_size}")
        self.max_size = max_size
        self.watermark_ms: int | None = None
        self._nonces: OrderedDict[bytes, tuple[float, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._nonces)

    def remember(self, nonce: bytes, timestamp_ms: int, forget_at: float, now: float) -> str | None:
        """Remember ``nonce``; None if new, else why the message must be refused."""
        self._forget_expired(now)
        if nonce in self._nonces:
            return REPLAYED_NONCE
        if self.watermark_ms is not None and timestamp_ms <= self.watermark_ms:
            return BEFORE_REPLAY_WINDOW
        self._nonces[nonce] = (forget_at, timestamp_ms)
        while len(self._nonces) > self.max_size:
            _, (_, dropped_ms) = self._nonces.popitem(last=False)
            self.watermark_ms = dropped_ms if self.watermark_ms is None else max(self.watermark_ms, dropped_ms)
        return None

    def _forget_expired(self, now: float) -> None:
        # Callers pass a forget_at that grows with their clock, so insertion
        # order is expiry order and the expired nonces are all at the front.
        while self._nonces:
            forget_at, _ = next(iter(self._nonces.values()))
            if forget_at > now:
                return
            self._nonces.popitem(last=False)


def _iso(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).isoformat(timespec="seconds")
