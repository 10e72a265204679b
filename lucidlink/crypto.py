"""
The key hierarchy of a filespace, and the sealing of names, attributes and chunks.

Everything a server stores that says something about content is sealed here,
on the client, and opened here again:

- A filespace has a random 256-bit master key.  :class:`FilespaceKeys`
  derives its subkeys with HKDF-SHA256, salted with the filespace id.
- A user's passphrase goes through Argon2id (:func:`derive_user_secrets`):
  one half wraps the master key (:func:`wrap_master_key`), the other half is
  the login secret, of which the server keeps only :func:`login_verifier`.
- Names are AES-SIV, bound to their directory: deterministic within it, so
  the server can look entries up by ciphertext (:func:`seal_name`).
- Symlink targets and extended attribute values are AES-256-GCM bound to
  their inode (and attribute name).
- Chunks are AES-256-GCM in 64 KiB blocks, each bound to its file, chunk
  index, block index and to whether it is the last block, so a ranged read
  fetches and opens only the blocks it needs (:func:`sealed_range_for`,
  :func:`open_range`).

Anything altered, truncated, or moved to another place fails to open with
:class:`~lucidlink.errors.IntegrityError`.  The module does no I/O and knows
nothing of Twisted; every function is safe to call from any thread.

Chunk object format (version 1)::

    object = version (1 byte, 0x01) || block 0 || block 1 || ... || block n-1
    block  = prefix (8 bytes) || AES-256-GCM ciphertext || tag (16 bytes)

The plaintext is cut in 64 KiB blocks, the last one possibly shorter (an
empty chunk is one empty block).  ``prefix`` is 8 random bytes chosen once per
object and repeated in every block, so that any run of blocks fetched by a
ranged read carries its own nonces.  Block ``i`` has nonce ``prefix || i``
(4 bytes big-endian) and associated data ``version || inode (u64) ||
chunk index (u64) || i (u32) || last (u8)``.  The GCM key is derived per
(inode, chunk index) from the filespace's chunk key, so nonces repeat only if
one chunk of one file is rewritten about 2**32 times.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import struct
import threading
import unicodedata
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple, Protocol, TypeAlias

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from lucidlink import errors

MASTER_KEY_SIZE = 32
FILESPACE_ID_SIZE = 16
CHUNK_ID_SIZE = 16
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
BLOCK_SIZE = 64 * 1024

NAME_MAX = 255
"""The longest name, in bytes, as on Linux."""
SEALED_NAME_MAX = NAME_MAX + 16
"""The longest sealed name: the padded name and the 16-byte SIV."""
SYMLINK_MAX = 4095
"""The longest symlink target, in bytes (``PATH_MAX`` less its NUL)."""
XATTR_NAME_MAX = 255

CHUNK_FORMAT_VERSION = 1
CHUNK_HEADER_SIZE = 1
_PREFIX_SIZE = 8
_TAG_SIZE = 16
BLOCK_OVERHEAD = _PREFIX_SIZE + _TAG_SIZE
SEALED_BLOCK_SIZE = BLOCK_SIZE + BLOCK_OVERHEAD

_U64_LIMIT = 1 << 64
_BLOCK_AD = struct.Struct(">BQQIB")  # version, inode, chunk index, block index, last
_INODE = struct.Struct(">Q")

_ATTRIBUTE_VERSION = 1
_NONCE_SIZE = 12
_ATTRIBUTE_OVERHEAD = 1 + _NONCE_SIZE + _TAG_SIZE
SEALED_TARGET_OVERHEAD = _ATTRIBUTE_OVERHEAD
"""How many bytes longer a sealed symlink target (or xattr value) is than the plaintext."""
_WRAP_VERSION = 1
_WRAPPED_KEY_SIZE = 1 + _NONCE_SIZE + MASTER_KEY_SIZE + _TAG_SIZE

_CHUNK_CIPHER_CACHE = 256

Buffer: TypeAlias = bytes | bytearray | memoryview
"""Bytes-like input: sealing and opening take any of these without copying."""


def new_master_key() -> bytes:
    """A fresh random 256-bit master key for a new filespace."""
    return os.urandom(MASTER_KEY_SIZE)


def new_filespace_id() -> bytes:
    """A fresh random 16-byte filespace id, chosen once at creation."""
    return os.urandom(FILESPACE_ID_SIZE)


def new_chunk_id() -> bytes:
    """A fresh random 16-byte id for a new chunk object."""
    return os.urandom(CHUNK_ID_SIZE)


def _check_size(value: bytes, size: int, what: str) -> bytes:
    if len(value) != size:
        raise errors.InvalidArgument(f"a {what} is {size} bytes, not {len(value)}")
    return bytes(value)


def _u64(value: int, what: str) -> bytes:
    if not 0 <= value < _U64_LIMIT:
        raise errors.InvalidArgument(f"{what} {value} is out of range")
    return _INODE.pack(value)


def _hkdf(master_key: bytes, salt: bytes, label: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt, info=label).derive(master_key)


class FilespaceKeys:
    """
    The subkeys of one filespace, derived from its master key.

    Each subkey comes from HKDF-SHA256 with the filespace id as salt and its
    own label, so no two uses share a key.  The cipher objects are built once
    and reused; chunk ciphers (one per file chunk) are kept in a small cache.
    The master key itself is not kept.
    """

    def __init__(self, master_key: bytes, filespace_id: bytes) -> None:
        master_key = _check_size(master_key, MASTER_KEY_SIZE, "master key")
        self.filespace_id = _check_size(filespace_id, FILESPACE_ID_SIZE, "filespace id")
        salt = self.filespace_id
        self.names = AESSIV(_hkdf(master_key, salt, b"lucidlink names v1", 64))
        self.xattr_names = AESSIV(_hkdf(master_key, salt, b"lucidlink xattr names v1", 64))
        self.attributes = AESGCM(_hkdf(master_key, salt, b"lucidlink attributes v1", 32))
        self._chunk_root = _hkdf(master_key, salt, b"lucidlink chunks v1", 32)
        self._chunk_ciphers: OrderedDict[tuple[int, int], AESGCM] = OrderedDict()
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<FilespaceKeys of filespace {self.filespace_id.hex()}>"

    def chunk_cipher(self, inode: int, chunk_index: int) -> AESGCM:
        """The AES-256-GCM cipher of chunk ``chunk_index`` of file ``inode``."""
        slot = (inode, chunk_index)
        with self._lock:
            cipher = self._chunk_ciphers.get(slot)
            if cipher is not None:
                self._chunk_ciphers.move_to_end(slot)
                return cipher
        info = b"lucidlink chunk key v1" + _u64(inode, "inode") + _u64(chunk_index, "chunk index")
        # HKDF-Expand with the chunk key as PRK, for one 32-byte block of output.
        cipher = AESGCM(hmac.digest(self._chunk_root, info + b"\x01", "sha256"))
        with self._lock:
            self._chunk_ciphers[slot] = cipher
            if len(self._chunk_ciphers) > _CHUNK_CIPHER_CACHE:
                self._chunk_ciphers.popitem(last=False)
        return cipher


# ---------------------------------------------------------------------------
# Passphrases, wrapped master keys and logins


# RFC 9106 (section 4) recommends t=3 with 64 MiB when 2 GiB cannot be spent; on a
# desktop that is about 0.15 s per login.  cryptography runs Argon2's lanes one
# after the other, so more lanes would only cost the user time, not an attacker.
DEFAULT_TIME_COST = 3
DEFAULT_MEMORY_KIB = 64 * 1024
DEFAULT_PARALLELISM = 1
MAX_KDF_MEMORY_KIB = 4 * 1024 * 1024

# The weakest parameters a client accepts from a server (OWASP's minimum for
# Argon2id): a server that handed out weaker ones could brute-force the
# passphrase behind the login secret it receives.
MINIMUM_TIME_COST = 2
MINIMUM_MEMORY_KIB = 19 * 1024


@dataclass(frozen=True, slots=True)
class KdfParameters:
    """Argon2id parameters of one user's passphrase, kept by the metadata server."""

    salt: bytes
    time_cost: int
    memory_kib: int
    parallelism: int

    def __post_init__(self) -> None:
        if not 8 <= len(self.salt) <= 64:
            raise errors.InvalidArgument(f"an Argon2id salt is 8 to 64 bytes, not {len(self.salt)}")
        if not 1 <= self.parallelism <= 64:
            raise errors.InvalidArgument(f"Argon2id parallelism {self.parallelism} is not within 1..64")
        if not 1 <= self.time_cost <= 64:
            raise errors.InvalidArgument(f"Argon2id time cost {self.time_cost} is not within 1..64")
        # The upper bound keeps a hostile server from making a client allocate without limit.
        if not 8 * self.parallelism <= self.memory_kib <= MAX_KDF_MEMORY_KIB:
            raise errors.InvalidArgument(
                f"Argon2id memory {self.memory_kib} KiB is not within {8 * self.parallelism}..{MAX_KDF_MEMORY_KIB}"
            )


class KdfParametersLike(Protocol):
    """Anything with the four fields of :class:`KdfParameters` (such as the wire record)."""

    @property
    def salt(self) -> bytes: ...

    @property
    def time_cost(self) -> int: ...

    @property
    def memory_kib(self) -> int: ...

    @property
    def parallelism(self) -> int: ...


def new_kdf_parameters(
    time_cost: int = DEFAULT_TIME_COST,
    memory_kib: int = DEFAULT_MEMORY_KIB,
    parallelism: int = DEFAULT_PARALLELISM,
) -> KdfParameters:
    """Parameters for a new passphrase: the given costs and a random 16-byte salt."""
    return KdfParameters(os.urandom(16), time_cost, memory_kib, parallelism)


def _as_kdf_parameters(kdf: KdfParametersLike) -> KdfParameters:
    if isinstance(kdf, KdfParameters):
        return kdf
    return KdfParameters(bytes(kdf.salt), kdf.time_cost, kdf.memory_kib, kdf.parallelism)


def check_kdf_strength(
    kdf: KdfParametersLike,
    minimum_time_cost: int = MINIMUM_TIME_COST,
    minimum_memory_kib: int = MINIMUM_MEMORY_KIB,
) -> None:
    """
    Refuse Argon2id parameters a server offers that are too weak to protect a passphrase.

    A client calls this before :func:`derive_user_secrets` with what the
    login challenge carried.
    """
    if kdf.time_cost < minimum_time_cost or kdf.memory_kib < minimum_memory_kib:
        raise errors.AuthenticationFailed(
            f"the server asks for Argon2id with time cost {kdf.time_cost} and {kdf.memory_kib} KiB,"
            f" weaker than the minimum of {minimum_time_cost} and {minimum_memory_kib} KiB"
        )


class UserSecrets(NamedTuple):
    """What a passphrase yields: a key that never leaves the client, and a login secret."""

    wrapping_key: bytes
    login_secret: bytes


def derive_user_secrets(passphrase: str, kdf: KdfParametersLike) -> UserSecrets:
    """
    Run a passphrase through Argon2id to 64 bytes and split them in two halves.

    The first half wraps the master key; the second is sent to the server as
    the login secret.  The passphrase is NFC-normalised first, so the same
    passphrase typed on different systems gives the same keys.
    """
    if not passphrase:
        raise errors.InvalidArgument("the passphrase is empty")
    parameters = _as_kdf_parameters(kdf)
    material = Argon2id(
        salt=parameters.salt,
        length=64,
        iterations=parameters.time_cost,
        lanes=parameters.parallelism,
        memory_cost=parameters.memory_kib,
    ).derive(unicodedata.normalize("NFC", passphrase).encode("utf-8"))
    return UserSecrets(material[:32], material[32:])


def _wrap_associated_data(filespace_id: bytes, user: str) -> bytes:
    return b"lucidlink wrapped master key v1\x00" + bytes(filespace_id) + user.encode("utf-8")


def wrap_master_key(wrapping_key: bytes, master_key: bytes, filespace_id: bytes, user: str) -> bytes:
    """
    Seal the master key for one user: AES-256-GCM bound to the filespace and the user name.

    The result (61 bytes) is what the metadata server keeps for the user.
    """
    _check_size(master_key, MASTER_KEY_SIZE, "master key")
    nonce = os.urandom(_NONCE_SIZE)
    sealed = AESGCM(_check_size(wrapping_key, 32, "wrapping key")).encrypt(
        nonce, master_key, _wrap_associated_data(filespace_id, user)
    )
    return bytes([_WRAP_VERSION]) + nonce + sealed


def unwrap_master_key(wrapping_key: bytes, wrapped: bytes, filespace_id: bytes, user: str) -> bytes:
    """Open a user's wrapped master key; a wrong passphrase gives AuthenticationFailed."""
    if len(wrapped) != _WRAPPED_KEY_SIZE or wrapped[0] != _WRAP_VERSION:
        raise errors.IntegrityError(f"the wrapped key of user {user} is malformed")
    cipher = AESGCM(_check_size(wrapping_key, 32, "wrapping key"))
    try:
        return cipher.decrypt(
            wrapped[1 : 1 + _NONCE_SIZE], wrapped[1 + _NONCE_SIZE :], _wrap_associated_data(filespace_id, user)
        )
    except InvalidTag:
        raise errors.AuthenticationFailed(f"wrong passphrase for user {user}") from None


def login_verifier(login_secret: bytes, salt: bytes) -> bytes:
    """
    What the server stores in place of a login secret: a salted SHA-256.

    The login secret is 256 uniformly random bits (Argon2id output), so one
    fast hash suffices: there is nothing to brute-force, and the server never
    keeps anything a client could log in with.
    """
    return hashlib.sha256(b"lucidlink login verifier v1\x00" + bytes(salt) + bytes(login_secret)).digest()


def check_login(login_secret: bytes, salt: bytes, verifier: bytes) -> bool:
    """Whether a login secret matches a stored verifier, in constant time."""
    return hmac.compare_digest(login_verifier(login_secret, salt), verifier)


def fake_kdf_salt(server_secret: bytes, user: str) -> bytes:
    """
    A stable 16-byte salt for a user who does not exist.

    The server answers a login start for an unknown user with this salt (and
    the default costs), so the answer does not tell who exists.
    """
    return hmac.digest(server_secret, b"lucidlink fake salt v1\x00" + user.encode("utf-8"), "sha256")[:16]


def fake_kdf_parameters(server_secret: bytes, user: str) -> KdfParameters:
    """The parameters to offer for an unknown user: default costs and :func:`fake_kdf_salt`."""
    return KdfParameters(
        fake_kdf_salt(server_secret, user), DEFAULT_TIME_COST, DEFAULT_MEMORY_KIB, DEFAULT_PARALLELISM
    )


# ---------------------------------------------------------------------------
# Offline recovery copies of the master key

_EXPORT_BEGIN = "-----BEGIN LUCIDLINK FILESPACE KEY-----"
_EXPORT_END = "-----END LUCIDLINK FILESPACE KEY-----"
_EXPORT_VERSION = 1
_EXPORT_CHECKSUM_SIZE = 4
_EXPORT_PAYLOAD_SIZE = 1 + FILESPACE_ID_SIZE + MASTER_KEY_SIZE + _EXPORT_CHECKSUM_SIZE


class ExportedKey(NamedTuple):
    """What a recovery copy holds."""

    filespace_id: bytes
    master_key: bytes
    filespace_name: str


def _export_checksum(body: bytes) -> bytes:
    return hashlib.sha256(b"lucidlink key export\x00" + body).digest()[:_EXPORT_CHECKSUM_SIZE]


def export_key(filespace_id: bytes, master_key: bytes, filespace_name: str = "") -> str:
    """
    An offline recovery copy of a filespace's master key, as text.

    The key block is base32 in groups of five (easy to print and type back),
    holding a version byte, the filespace id, the master key and a 4-byte
    checksum that catches typing mistakes.  The header lines are for people;
    only the ``Filespace-Id`` line is checked on import.
    """
    body = (
        bytes([_EXPORT_VERSION])
        + _check_size(filespace_id, FILESPACE_ID_SIZE, "filespace id")
        + _check_size(master_key, MASTER_KEY_SIZE, "master key")
    )
    text = base64.b32encode(body + _export_checksum(body)).decode("ascii").rstrip("=")
    groups = [text[start : start + 5] for start in range(0, len(text), 5)]
    lines = [_EXPORT_BEGIN, "# Anyone holding this text can read every file of the filespace. Keep it offline."]
    if filespace_name:
        lines.append(f"Filespace: {filespace_name}")
    lines.append(f"Filespace-Id: {filespace_id.hex()}")
    lines.append("")
    lines.extend(" ".join(groups[start : start + 6]) for start in range(0, len(groups), 6))
    lines.append(_EXPORT_END)
    return "\n".join(lines) + "\n"


def import_key(text: str) -> ExportedKey:
    """Read back what :func:`export_key` wrote; spaces, dashes and case do not matter."""
    lines = [line.strip() for line in text.splitlines()]
    markers = [" ".join(line.split()).upper() for line in lines]
    try:
        start = markers.index(_EXPORT_BEGIN)
        end = markers.index(_EXPORT_END, start)
    except ValueError:
        raise errors.InvalidArgument("not a lucidlink key export: its BEGIN or END line is missing") from None
    headers: dict[str, str] = {}
    encoded = []
    for line in lines[start + 1 : end]:
        if not line or line.startswith("#"):
            continue
        if ":" in line:
            field, _, value = line.partition(":")
            headers[field.strip().lower()] = value.strip()
        else:
            encoded.append("".join(line.split()).replace("-", "").upper())
    joined = "".join(encoded)
    try:
        payload = base64.b32decode(joined + "=" * (-len(joined) % 8))
    except binascii.Error:
        raise errors.InvalidArgument("the key export is damaged: its key block is not base32") from None
    if len(payload) != _EXPORT_PAYLOAD_SIZE:
        raise errors.InvalidArgument(
            f"the key export is damaged: its key block holds {len(payload)} bytes, not {_EXPORT_PAYLOAD_SIZE}"
        )
    if base64.b32encode(payload).decode("ascii").rstrip("=") != joined:
        # The last character carries a spare bit that decoding ignores; a change there is damage too.
        raise errors.InvalidArgument("the key export is damaged: its last character is not one export writes")
    body, checksum = payload[:-_EXPORT_CHECKSUM_SIZE], payload[-_EXPORT_CHECKSUM_SIZE:]
    if not hmac.compare_digest(_export_checksum(body), checksum):
        raise errors.InvalidArgument("the key export is damaged: its checksum does not match (a typing mistake?)")
    if body[0] != _EXPORT_VERSION:
        raise errors.InvalidArgument(f"the key export has format version {body[0]}, which this lucidlink cannot read")
    filespace_id, master_key = body[1 : 1 + FILESPACE_ID_SIZE], body[1 + FILESPACE_ID_SIZE :]
    stated = headers.get("filespace-id")
    if stated is not None and stated.lower() != filespace_id.hex():
        raise errors.InvalidArgument("the key export is damaged: its Filespace-Id line does not match its key block")
    return ExportedKey(filespace_id, master_key, headers.get("filespace", ""))


# ---------------------------------------------------------------------------
# Names, symlink targets and extended attributes


def check_name(name: bytes) -> None:
    """Refuse what cannot be a directory entry's name, saying why."""
    if not name:
        raise errors.InvalidArgument("a name cannot be empty")
    if len(name) > NAME_MAX:
        raise errors.NameTooLong(f"a name of {len(name)} bytes is over the {NAME_MAX}-byte limit")
    if name in (b".", b".."):
        raise errors.InvalidArgument(f"the name {name.decode()!r} is reserved")
    if b"/" in name:
        raise errors.InvalidArgument(f"the name {name!r} contains '/'")
    if b"\x00" in name:
        raise errors.InvalidArgument(f"the name {name!r} contains a NUL byte")


def _pad(name: bytes) -> bytes:
    # Names hold no NUL, so NUL padding to a multiple of 16 (at most NAME_MAX) is
    # reversible; the server then learns a name's length only to within 16 bytes.
    return name.ljust(min(-(-len(name) // 16) * 16, NAME_MAX), b"\x00")


def _unpad(padded: bytes) -> bytes:
    return padded.rstrip(b"\x00")


def seal_name(keys: FilespaceKeys, parent_inode: int, name: bytes) -> bytes:
    """
    Seal a directory entry's name, bound to its directory.

    AES-SIV is deterministic: the same name in the same directory always
    seals to the same bytes, so the server can index and look up entries by
    their sealed names; in another directory it seals differently.
    """
    check_name(name)
    return keys.names.encrypt(_pad(name), [_u64(parent_inode, "parent inode")])


def open_name(keys: FilespaceKeys, parent_inode: int, sealed: bytes) -> bytes:
    """The name :func:`seal_name` sealed; IntegrityError if altered or from another directory."""
    if not _TAG_SIZE < len(sealed) <= SEALED_NAME_MAX:
        raise errors.IntegrityError(f"a sealed name in directory {parent_inode} has an impossible length {len(sealed)}")
    try:
        return _unpad(keys.names.decrypt(bytes(sealed), [_u64(parent_inode, "parent inode")]))
    except InvalidTag:
        raise errors.IntegrityError(
            f"a name in directory {parent_inode} was altered or does not belong there"
        ) from None


def _seal_attribute(keys: FilespaceKeys, associated_data: bytes, plaintext: bytes) -> bytes:
    nonce = os.urandom(_NONCE_SIZE)
    version = bytes([_ATTRIBUTE_VERSION])
    return version + nonce + keys.attributes.encrypt(nonce, plaintext, version + associated_data)


def _open_attribute(keys: FilespaceKeys, associated_data: bytes, sealed: bytes, what: str) -> bytes:
    if len(sealed) < _ATTRIBUTE_OVERHEAD or sealed[0] != _ATTRIBUTE_VERSION:
        raise errors.IntegrityError(f"{what} is malformed")
    try:
        return keys.attributes.decrypt(
            sealed[1 : 1 + _NONCE_SIZE], sealed[1 + _NONCE_SIZE :], sealed[:1] + associated_data
        )
    except InvalidTag:
        raise errors.IntegrityError(f"{what} was altered or does not belong there") from None


def seal_symlink_target(keys: FilespaceKeys, inode: int, target: bytes) -> bytes:
    """Seal a symlink's target, bound to the symlink's inode (AES-256-GCM, random nonce)."""
    if not target:
        raise errors.InvalidArgument("a symlink target cannot be empty")
    if len(target) > SYMLINK_MAX:
        raise errors.NameTooLong(f"a symlink target of {len(target)} bytes is over the {SYMLINK_MAX}-byte limit")
    if b"\x00" in target:
        raise errors.InvalidArgument("a symlink target cannot contain a NUL byte")
    return _seal_attribute(keys, b"symlink\x00" + _u64(inode, "inode"), target)


def open_symlink_target(keys: FilespaceKeys, inode: int, sealed: bytes) -> bytes:
    """The target :func:`seal_symlink_target` sealed; IntegrityError if altered or moved."""
    return _open_attribute(keys, b"symlink\x00" + _u64(inode, "inode"), sealed, f"the target of symlink {inode}")


def seal_xattr_name(keys: FilespaceKeys, inode: int, name: bytes) -> bytes:
    """Seal an extended attribute's name deterministically, bound to its inode, so it can be looked up."""
    if not name:
        raise errors.InvalidArgument("an extended attribute name cannot be empty")
    if len(name) > XATTR_NAME_MAX:
        raise errors.OutOfRange(
            f"an extended attribute name of {len(name)} bytes is over the {XATTR_NAME_MAX}-byte limit"
        )
    if b"\x00" in name:
        raise errors.InvalidArgument("an extended attribute name cannot contain a NUL byte")
    return keys.xattr_names.encrypt(_pad(name), [_u64(inode, "inode")])


def open_xattr_name(keys: FilespaceKeys, inode: int, sealed: bytes) -> bytes:
    """The name :func:`seal_xattr_name` sealed; IntegrityError if altered or from another inode."""
    if not _TAG_SIZE < len(sealed) <= SEALED_NAME_MAX:
        raise errors.IntegrityError(f"a sealed attribute name of inode {inode} has an impossible length {len(sealed)}")
    try:
        return _unpad(keys.xattr_names.decrypt(bytes(sealed), [_u64(inode, "inode")]))
    except InvalidTag:
        raise errors.IntegrityError(
            f"an extended attribute name of inode {inode} was altered or does not belong there"
        ) from None


def _xattr_associated_data(inode: int, sealed_name: bytes) -> bytes:
    return b"xattr\x00" + _u64(inode, "inode") + bytes(sealed_name)


def seal_xattr_value(keys: FilespaceKeys, inode: int, sealed_name: bytes, value: bytes) -> bytes:
    """Seal an extended attribute's value, bound to its inode and its sealed name."""
    return _seal_attribute(keys, _xattr_associated_data(inode, sealed_name), value)


def open_xattr_value(keys: FilespaceKeys, inode: int, sealed_name: bytes, sealed_value: bytes) -> bytes:
    """The value :func:`seal_xattr_value` sealed; IntegrityError if altered or moved."""
    return _open_attribute(
        keys, _xattr_associated_data(inode, sealed_name), sealed_value, f"an extended attribute value of inode {inode}"
    )


# ---------------------------------------------------------------------------
# Chunks


def block_count(chunk_plain_length: int) -> int:
    """How many blocks a chunk of this many plaintext bytes is sealed in (at least one)."""
    return max(1, -(-chunk_plain_length // BLOCK_SIZE))


def sealed_chunk_size(chunk_plain_length: int) -> int:
    """The size of the object that a chunk of this many plaintext bytes seals to."""
    return CHUNK_HEADER_SIZE + chunk_plain_length + block_count(chunk_plain_length) * BLOCK_OVERHEAD


def _block_plain_length(block_index: int, chunk_plain_length: int) -> int:
    return min(BLOCK_SIZE, chunk_plain_length - block_index * BLOCK_SIZE)


def seal_chunk(keys: FilespaceKeys, inode: int, chunk_index: int, plaintext: Buffer) -> bytes:
    """Seal chunk ``chunk_index`` of file ``inode`` into one object (see the module's format)."""
    cipher = keys.chunk_cipher(inode, chunk_index)
    source = memoryview(plaintext).cast("B")
    length = len(source)
    count = block_count(length)
    prefix = os.urandom(_PREFIX_SIZE)
    sealed = bytearray(sealed_chunk_size(length))
    sealed[0] = CHUNK_FORMAT_VERSION
    target = memoryview(sealed)
    position = CHUNK_HEADER_SIZE
    for index in range(count):
        block = source[index * BLOCK_SIZE : (index + 1) * BLOCK_SIZE]
        end = position + len(block) + BLOCK_OVERHEAD
        target[position : position + _PREFIX_SIZE] = prefix
        associated_data = _BLOCK_AD.pack(CHUNK_FORMAT_VERSION, inode, chunk_index, index, index == count - 1)
        cipher.encrypt_into(
            prefix + index.to_bytes(4, "big"), block, associated_data, target[position + _PREFIX_SIZE : end]
        )
        position = end
    return bytes(sealed)


CHUNK_HEADER = bytes([CHUNK_FORMAT_VERSION])
"""What a chunk object begins with, before block 0."""


def sealed_block_offset(block_index: int) -> int:
    """Where block ``block_index`` begins in a chunk object."""
    return CHUNK_HEADER_SIZE + block_index * SEALED_BLOCK_SIZE


class BlockSealer:
    """
    Seals the blocks of one chunk object one at a time, in order, as :func:`seal_chunk` seals them all at once.

    ``chunk_plain_length`` is the object's whole plaintext length (it
    decides which block is the last).  The object is :data:`CHUNK_HEADER`
    and then each block at :func:`sealed_block_offset`.  Each block is
    sealed once: its nonce is the object's prefix and its index.
    """

    def __init__(self, keys: FilespaceKeys, inode: int, chunk_index: int, chunk_plain_length: int) -> None:
        self._cipher = keys.chunk_cipher(inode, chunk_index)
        self._inode = inode
        self._chunk_index = chunk_index
        self.chunk_plain_length = chunk_plain_length
        self.count = block_count(chunk_plain_length)
        self.prefix = os.urandom(_PREFIX_SIZE)
        self.sealed = 0
        """How many blocks were sealed (blocks ``0`` to ``sealed - 1``)."""

    @property
    def complete(self) -> bool:
        return self.sealed == self.count

    def block_length(self) -> int:
        """The plaintext length of the next block."""
        return _block_plain_length(self.sealed, self.chunk_plain_length)

    def seal_next(self, plaintext: Buffer) -> bytes:
        """The next block sealed, without its prefix (:attr:`prefix` comes before it in the object)."""
        index = self.sealed
        if index >= self.count or len(memoryview(plaintext)) != self.block_length():
            raise errors.InvalidArgument(f"no block {index} of {len(memoryview(plaintext))} bytes in this chunk")
        associated_data = _BLOCK_AD.pack(CHUNK_FORMAT_VERSION, self._inode, self._chunk_index, index, index == self.count - 1)
        return self._cipher.encrypt(self.prefix + index.to_bytes(4, "big"), plaintext, associated_data)

    def advance(self) -> None:
        """The block :meth:`seal_next` gave is in the object now."""
        self.sealed += 1


def _open_blocks(
    cipher: AESGCM,
    inode: int,
    chunk_index: int,
    first_block: int,
    sealed: memoryview,
    chunk_plain_length: int,
) -> bytes:
    count = block_count(chunk_plain_length)
    where = f"chunk {chunk_index} of inode {inode}"
    parts = []
    prefix = None
    position = 0
    index = first_block
    while position < len(sealed):
        if index >= count:
            raise errors.IntegrityError(f"{where} has {len(sealed) - position} bytes past its last block")
        end = position + BLOCK_OVERHEAD + _block_plain_length(index, chunk_plain_length)
        if end > len(sealed):
            raise errors.IntegrityError(f"{where} is cut short in block {index}")
        block_prefix = sealed[position : position + _PREFIX_SIZE]
        if prefix is None:
            prefix = bytes(block_prefix)
        elif block_prefix != prefix:
            raise errors.IntegrityError(f"block {index} of {where} comes from another object")
        associated_data = _BLOCK_AD.pack(CHUNK_FORMAT_VERSION, inode, chunk_index, index, index == count - 1)
        try:
            parts.append(
                cipher.decrypt(prefix + index.to_bytes(4, "big"), sealed[position + _PREFIX_SIZE : end], associated_data)
            )
        except InvalidTag:
            raise errors.IntegrityError(f"block {index} of {where} was altered or does not belong there") from None
        position = end
        index += 1
    return b"".join(parts)


def open_chunk(keys: FilespaceKeys, inode: int, chunk_index: int, sealed: Buffer) -> bytes:
    """The plaintext of a whole chunk object; IntegrityError on any tampering or truncation."""
    cipher = keys.chunk_cipher(inode, chunk_index)
    view = memoryview(sealed).cast("B")
    where = f"chunk {chunk_index} of inode {inode}"
    if len(view) < CHUNK_HEADER_SIZE + BLOCK_OVERHEAD:
        raise errors.IntegrityError(f"{where} is a {len(view)}-byte object, too short to be a chunk")
    if view[0] != CHUNK_FORMAT_VERSION:
        raise errors.IntegrityError(f"{where} has unknown format version {view[0]}")
    whole, rest = divmod(len(view) - CHUNK_HEADER_SIZE, SEALED_BLOCK_SIZE)
    if 0 < rest < BLOCK_OVERHEAD:
        raise errors.IntegrityError(f"{where} is cut short in block {whole}")
    plain_length = whole * BLOCK_SIZE + max(0, rest - BLOCK_OVERHEAD)
    return _open_blocks(cipher, inode, chunk_index, 0, view[CHUNK_HEADER_SIZE:], plain_length)


class SealedRange(NamedTuple):
    """The bytes of a chunk object to fetch for a plaintext range, and the block they begin with."""

    object_start: int
    object_length: int
    first_block: int


def sealed_range_for(plain_offset: int, plain_length: int, chunk_plain_length: int) -> SealedRange:
    """
    Which bytes of a chunk object hold plaintext ``[plain_offset, plain_offset + plain_length)``.

    The range is clamped to the chunk; a range with nothing in it has
    ``object_length`` 0 and needs no fetch.  Fetch the range, then open it
    with :func:`open_range` (or :func:`open_blocks`).
    """
    if plain_offset < 0 or plain_length < 0 or chunk_plain_length < 0:
        raise errors.InvalidArgument(
            f"no plaintext range at offset {plain_offset}, length {plain_length} of a {chunk_plain_length}-byte chunk"
        )
    end = min(plain_offset + plain_length, chunk_plain_length)
    first_block = min(plain_offset // BLOCK_SIZE, block_count(chunk_plain_length) - 1)
    object_start = CHUNK_HEADER_SIZE + first_block * SEALED_BLOCK_SIZE
    if end <= plain_offset:
        return SealedRange(object_start, 0, first_block)
    last_block = (end - 1) // BLOCK_SIZE
    object_end = (
        CHUNK_HEADER_SIZE
        + last_block * SEALED_BLOCK_SIZE
        + BLOCK_OVERHEAD
        + _block_plain_length(last_block, chunk_plain_length)
    )
    return SealedRange(object_start, object_end - object_start, first_block)


def open_blocks(
    keys: FilespaceKeys,
    inode: int,
    chunk_index: int,
    first_block: int,
    sealed_bytes: Buffer,
    chunk_plain_length: int,
) -> bytes:
    """
    The plaintext of consecutive whole blocks of a chunk, from ``first_block`` on.

    ``sealed_bytes`` is what a ranged read of :func:`sealed_range_for`'s range
    returned.  The plaintext starts at offset ``first_block * BLOCK_SIZE`` of
    the chunk; :func:`open_range` cuts out the requested range instead.
    """
    if not 0 <= first_block < block_count(chunk_plain_length):
        raise errors.InvalidArgument(f"a chunk of {chunk_plain_length} bytes has no block {first_block}")
    cipher = keys.chunk_cipher(inode, chunk_index)
    return _open_blocks(
        cipher, inode, chunk_index, first_block, memoryview(sealed_bytes).cast("B"), chunk_plain_length
    )


def open_range(
    keys: FilespaceKeys,
    inode: int,
    chunk_index: int,
    plain_offset: int,
    plain_length: int,
    sealed_bytes: Buffer,
    chunk_plain_length: int,
) -> bytes:
    """The plaintext range asked of :func:`sealed_range_for`, from the bytes of its range."""
    sealed_range = sealed_range_for(plain_offset, plain_length, chunk_plain_length)
    view = memoryview(sealed_bytes).cast("B")
    if len(view) != sealed_range.object_length:
        raise errors.IntegrityError(
            f"chunk {chunk_index} of inode {inode}: a ranged read returned"
            f" {len(view)} bytes, not {sealed_range.object_length}"
        )
    if not view:
        return b""
    plaintext = open_blocks(keys, inode, chunk_index, sealed_range.first_block, view, chunk_plain_length)
    skip = plain_offset - sealed_range.first_block * BLOCK_SIZE
    return plaintext[skip : skip + min(plain_length, chunk_plain_length - plain_offset)]
