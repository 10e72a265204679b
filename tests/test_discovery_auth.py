"""
Registration authentication: signing, each way a registration is refused,
key rotation, and the bounded nonce cache.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from lucidlink import errors
from lucidlink.discovery import auth
from lucidlink.discovery.auth import (
    Keyring,
    NonceCache,
    RegistrationKey,
    RegistrationVerifier,
    sign,
    signed_bytes,
)
from lucidlink.protocol.codec import encode_frame
from lucidlink.protocol.messages import Heartbeat, Register, ServerStatus

NOW = 1_800_000_000.0
CURRENT = RegistrationKey("2026-11", bytes(range(32)))
PREVIOUS = RegistrationKey("2026-05", bytes(range(32, 64)), retires_at=NOW + 3600)


def registration(cls: type[Register] = Register, *, timestamp: float = NOW, nonce: bytes = b"n" * 16, **fields: Any) -> Register:
    values: dict[str, Any] = dict(
        filespace="media", server_id="meta-1", endpoints=["tcp:10.0.0.1:7001"], identity="meta.media.lucid",
        status=ServerStatus.SERVING, timestamp_ms=int(timestamp * 1000), nonce=nonce, key_id="", mac=b"",
    )
    values.update(fields)
    return cls(**values)


class SigningTests(SynchronousTestCase):
    """What the MAC covers."""

    def test_signed_bytes_is_the_frame_without_mac(self) -> None:
        """The MAC covers the encoded frame of the message with mac emptied, and nothing else."""
        message = sign(registration(), CURRENT.key_id, CURRENT.secret)
        self.assertEqual(signed_bytes(message), encode_frame(dataclasses.replace(message, mac=b"")))
        self.assertEqual(len(message.mac), 32)
        self.assertEqual(message.key_id, "2026-11")

    def test_every_field_is_covered(self) -> None:
        """Changing any field other than mac changes what is signed."""
        message = sign(registration(), CURRENT.key_id, CURRENT.secret)
        changes = dict(
            filespace="other", server_id="meta-2", endpoints=["tcp:10.0.0.2:7001"], identity="x",
            status=ServerStatus.DRAINING, timestamp_ms=message.timestamp_ms + 1, nonce=b"m" * 16, key_id="2026-05",
        )
        for field, value in changes.items():
            changed = dataclasses.replace(message, **{field: value})
            self.assertNotEqual(auth.compute_mac(changed, CURRENT.secret), message.mac, field)

    def test_register_cannot_pass_for_heartbeat(self) -> None:
        """The message type is signed: the same fields as a Heartbeat carry another MAC."""
        register = sign(registration(Register), CURRENT.key_id, CURRENT.secret)
        heartbeat = sign(registration(Heartbeat), CURRENT.key_id, CURRENT.secret)
        self.assertNotEqual(register.mac, heartbeat.mac)

    def test_parse_key(self) -> None:
        """KEY_ID:HEX parses; short or non-hex secrets are refused."""
        key = RegistrationKey.parse("2026-11:" + "ab" * 32)
        self.assertEqual((key.key_id, key.secret), ("2026-11", b"\xab" * 32))
        self.assertNotIn("ab" * 32, repr(key))
        for bad in ("no-colon", ":" + "ab" * 32, "id:" + "ab" * 8, "id:xyz"):
            self.assertRaises(errors.InvalidArgument, RegistrationKey.parse, bad)


class VerifierTests(SynchronousTestCase):
    """Every refusal is an AuthenticationFailed, logged with its own message and counted by reason."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.refusals: list[str] = []
        self.verifier = RegistrationVerifier(
            Keyring(CURRENT, PREVIOUS), self.clock, max_skew=30, on_refused=self.refusals.append
        )
        self.events: list[dict[str, Any]] = []
        globalLogPublisher.addObserver(self.events.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.events.append)

    def refused(self, message: Register, reason: str) -> str:
        with self.assertRaises(errors.AuthenticationFailed) as caught:
            self.verifier.verify(message, "10.9.8.7")
        self.assertEqual(self.refusals[-1:], [reason])
        logged = [e for e in self.events if e.get("reason") == reason]
        self.assertEqual(len(logged), 1, self.events)
        self.assertEqual(logged[0]["source"], "10.9.8.7")
        return str(caught.exception)

    def test_current_key_accepted(self) -> None:
        """A fresh message signed with the current key passes."""
        self.verifier.verify(sign(registration(), CURRENT.key_id, CURRENT.secret))
        self.assertEqual(self.refusals, [])

    def test_bad_mac(self) -> None:
        """A wrong MAC is refused; the sender learns only that authentication failed."""
        message = sign(registration(), CURRENT.key_id, CURRENT.secret)
        forged = dataclasses.replace(message, endpoints=["tcp:evil:1"])
        text = self.refused(forged, auth.BAD_MAC)
        self.assertEqual(text, "registration refused: authentication failed")
        self.assertIn("bad MAC", self.events[-1]["log_format"])

    def test_truncated_mac(self) -> None:
        """A MAC of the wrong length is a bad MAC."""
        message = sign(registration(), CURRENT.key_id, CURRENT.secret)
        self.refused(dataclasses.replace(message, mac=message.mac[:16]), auth.BAD_MAC)

    def test_unknown_key(self) -> None:
        """A key id discovery does not hold is refused, reading like a bad MAC to the sender."""
        text = self.refused(sign(registration(), "2024-01", CURRENT.secret), auth.UNKNOWN_KEY)
        self.assertEqual(text, "registration refused: authentication failed")
        self.assertIn("unknown key id", self.events[-1]["log_format"])

    def test_previous_key_accepted_within_its_window(self) -> None:
        """The previous secret still verifies before it retires."""
        self.clock.advance(3599)
        self.verifier.verify(sign(registration(timestamp=NOW + 3599), PREVIOUS.key_id, PREVIOUS.secret))
        self.assertEqual(self.refusals, [])

    def test_previous_key_refused_after_its_window(self) -> None:
        """After it retires, the previous secret is refused, saying so."""
        self.clock.advance(3600)
        text = self.refused(sign(registration(timestamp=NOW + 3600), PREVIOUS.key_id, PREVIOUS.secret), auth.RETIRED_KEY)
        self.assertIn("was retired at", text)
        self.assertIn("previous key id", self.events[-1]["log_format"])
        self.verifier.verify(sign(registration(timestamp=NOW + 3600), CURRENT.key_id, CURRENT.secret))

    def test_stale_timestamp_behind(self) -> None:
        """A timestamp more than the skew behind is refused, naming the clocks."""
        text = self.refused(sign(registration(timestamp=NOW - 31), CURRENT.key_id, CURRENT.secret), auth.STALE_TIMESTAMP)
        self.assertIn("31.0 s behind", text)
        self.assertIn("check the clocks", text)

    def test_stale_timestamp_ahead(self) -> None:
        """A timestamp more than the skew ahead is refused too."""
        text = self.refused(sign(registration(timestamp=NOW + 31), CURRENT.key_id, CURRENT.secret), auth.STALE_TIMESTAMP)
        self.assertIn("31.0 s ahead of", text)

    def test_within_skew_both_ways(self) -> None:
        """Timestamps up to the skew away in either direction pass."""
        self.verifier.verify(sign(registration(timestamp=NOW - 29.9, nonce=b"a" * 16), CURRENT.key_id, CURRENT.secret))
        self.verifier.verify(sign(registration(timestamp=NOW + 29.9, nonce=b"b" * 16), CURRENT.key_id, CURRENT.secret))

    def test_replayed_nonce(self) -> None:
        """The same message twice: the second is a replay."""
        message = sign(registration(), CURRENT.key_id, CURRENT.secret)
        self.verifier.verify(message)
        self.clock.advance(10)
        text = self.refused(message, auth.REPLAYED_NONCE)
        self.assertEqual(text, "registration refused: replayed nonce")

    def test_replay_after_window_is_stale(self) -> None:
        """Once its timestamp is outside the skew, a replay is refused as stale (the nonce may be forgotten)."""
        message = sign(registration(), CURRENT.key_id, CURRENT.secret)
        self.verifier.verify(message)
        self.clock.advance(61)
        self.refused(message, auth.STALE_TIMESTAMP)

    def test_refused_message_nonce_not_remembered(self) -> None:
        """A refused message does not use up its nonce."""
        message = sign(registration(), CURRENT.key_id, CURRENT.secret)
        with self.assertRaises(errors.AuthenticationFailed):
            self.verifier.verify(dataclasses.replace(message, mac=b"\x00" * 32))
        self.verifier.verify(message)

    def test_bad_nonce_length(self) -> None:
        """A nonce shorter than 8 bytes is refused."""
        self.refused(sign(registration(nonce=b"1234"), CURRENT.key_id, CURRENT.secret), auth.BAD_NONCE)


class KeyringTests(SynchronousTestCase):
    """Rules of the keyring."""

    def test_previous_needs_retirement(self) -> None:
        """A previous key without a retirement time is refused."""
        self.assertRaises(errors.InvalidArgument, Keyring, CURRENT, RegistrationKey("old", bytes(32)))

    def test_ids_differ(self) -> None:
        """The previous key cannot share the current key's id."""
        self.assertRaises(errors.InvalidArgument, Keyring, CURRENT, RegistrationKey(CURRENT.key_id, bytes(32), 1.0))


class NonceCacheTests(SynchronousTestCase):
    """The nonce cache is bounded, and a full one refuses rather than forgets."""

    def test_forgets_expired(self) -> None:
        """Nonces past their forget time are dropped."""
        cache = NonceCache(100)
        for n in range(10):
            self.assertIsNone(cache.remember(bytes([n]) * 8, 1000 + n, forget_at=10.0 + n, now=float(n)))
        self.assertEqual(len(cache), 10)
        cache.remember(b"z" * 8, 2000, forget_at=100.0, now=15.0)
        self.assertEqual(len(cache), 5)

    def test_bounded_with_watermark(self) -> None:
        """Over max_size the oldest goes, and messages no newer than it are refused."""
        cache = NonceCache(3)
        for n in range(5):
            self.assertIsNone(cache.remember(bytes([n]) * 8, 1000 + n, forget_at=100.0, now=0.0))
        self.assertEqual(len(cache), 3)
        self.assertEqual(cache.watermark_ms, 1001)
        self.assertEqual(cache.remember(b"\x00" * 8, 1000, forget_at=100.0, now=0.0), auth.BEFORE_REPLAY_WINDOW)
        self.assertEqual(cache.remember(b"\x04" * 8, 1004, forget_at=100.0, now=0.0), auth.REPLAYED_NONCE)
        self.assertIsNone(cache.remember(b"\x05" * 8, 1005, forget_at=100.0, now=0.0))
