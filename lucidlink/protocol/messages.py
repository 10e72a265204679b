"""
Every message of the lucidlink wire protocol, declared once.

A frame on the wire is a 4-byte big-endian length, then the :class:`Header`
(protocol version, message type, request id, flags), then the body of the
message that the type names.  Each message is a dataclass whose fields carry
their construct declaration (:func:`~lucidlink.protocol.records.wire`); the
:func:`message` decorator gives it its type number and registers it.

Message types come in families:

- ``0x00xx`` every connection: the version handshake, errors, keepalive.
- ``0x01xx`` discovery: registration by metadata servers, resolution by clients.
- ``0x02xx`` metadata server: login, users, the file tree, chunk maps, locks.

Names, symlink targets and extended attributes travel as ciphertext made on
the client (``bytes`` fields); the servers never see them in clear.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import construct as c

from lucidlink.protocol.records import IntEnumField, ListOf, Record, wire

PROTOCOL_VERSION = 1
"""The version this code speaks, sent in every header and in :class:`Hello`."""

LENGTH_PREFIX_SIZE = 4
LENGTH_PREFIX_FORMAT = "I"  # struct format of the 4-byte big-endian length
DEFAULT_MAX_FRAME_LENGTH = 16 * 1024 * 1024

# Primitive wire types, named for what they carry.
U8, U16, U32, U64 = c.Int8ub, c.Int16ub, c.Int32ub, c.Int64ub
Timestamp = c.Int64sb  # nanoseconds (files) or milliseconds (registrations), as named
InodeId = c.Int64ub
HandleId = c.Int64ub
Text = c.PascalString(c.Int16ub, "utf8")
ShortBytes = c.Prefixed(c.Int16ub, c.GreedyBytes)
LongBytes = c.Prefixed(c.Int32ub, c.GreedyBytes)
Bool = c.Flag


class Flags(enum.IntFlag):
    """Header flags: whether a frame answers a request or is pushed unasked."""

    NONE = 0
    RESPONSE = 0x01
    PUSH = 0x02


@dataclass(slots=True)
class Header:
    """Follows the length prefix of every frame."""

    version: int = wire(U8)
    type: int = wire(U16)
    request_id: int = wire(U32)
    flags: int = wire(U8)


HEADER = Record(Header)
HEADER_SIZE = 8


class MessageType(enum.IntEnum):
    """The type number of every message, by family."""

    HELLO = 0x0001
    WELCOME = 0x0002
    ERROR = 0x0003
    OK = 0x0004
    PING = 0x0005
    PONG = 0x0006
    GOODBYE = 0x0007

    REGISTER = 0x0101
    HEARTBEAT = 0x0102
    REGISTERED = 0x0103
    RESOLVE = 0x0104
    RESOLVED = 0x0105

    LOGIN_START = 0x0201
    LOGIN_CHALLENGE = 0x0202
    LOGIN = 0x0203
    LOGIN_OK = 0x0204
    BOOTSTRAP = 0x0205
    CLIENT_ID = 0x0206
    CLIENT_KNOWN = 0x0207
    RESERVE_INODES = 0x0208
    INODE_BLOCK = 0x0209
    USER_ADD = 0x0210
    USER_REMOVE = 0x0211
    USER_PASSWD = 0x0212
    USER_LIST = 0x0213
    USER_LISTING = 0x0214
    LOOKUP = 0x0220
    GETATTR = 0x0221
    SETATTR = 0x0222
    ENTRY = 0x0223
    READDIR = 0x0224
    DIR_PAGE = 0x0225
    MKDIR = 0x0226
    RMDIR = 0x0227
    CREATE = 0x0228
    UNLINK = 0x0229
    RENAME = 0x022A
    LINK = 0x022B
    SYMLINK = 0x022C
    READLINK = 0x022D
    LINK_TARGET = 0x022E
    SETXATTR = 0x0230
    GETXATTR = 0x0231
    XATTR_VALUE = 0x0232
    LISTXATTR = 0x0233
    XATTR_NAMES = 0x0234
    REMOVEXATTR = 0x0235
    STATFS = 0x0236
    FS_STATS = 0x0237
    OPEN = 0x0240
    OPENED = 0x0241
    RELEASE = 0x0242
    CHUNKMAP_READ = 0x0243
    CHUNKMAP = 0x0244
    CHUNKMAP_COMMIT = 0x0245
    CHUNKMAP_COMMITTED = 0x0246
    LOCK = 0x0250
    LOCK_TEST = 0x0251
    LOCK_STATE = 0x0252
    LOCK_RECLAIM = 0x0253
    NOTIFY = 0x0260
    STATUS_CHANGED = 0x0261
    LEASE_DIRECTORY = 0x0270
    LEASE = 0x0271
    LEASE_RECALL = 0x0272
    LEASE_RETURNED = 0x0273


class ServerStatus(enum.IntEnum):
    """What a metadata server is doing, as discovery and its clients see it."""

    SERVING = 1
    RESTORING = 2
    DRAINING = 3
    UNKNOWN = 4
    UNINITIALIZED = 5


class Role(enum.IntEnum):
    """What a user of a filespace may do."""

    READER = 1
    WRITER = 2
    ADMIN = 3


class FileKind(enum.IntEnum):
    """The kind of an inode."""

    FILE = 1
    DIRECTORY = 2
    SYMLINK = 3


class SetAttrField(enum.IntFlag):
    """Which fields of :class:`SetAttr` to apply."""

    MODE = 0x01
    UID = 0x02
    GID = 0x04
    SIZE = 0x08
    ATIME = 0x10
    MTIME = 0x20
    ATIME_NOW = 0x40
    MTIME_NOW = 0x80


class RenameFlags(enum.IntFlag):
    """``renameat2`` flags."""

    NONE = 0
    NOREPLACE = 0x1
    EXCHANGE = 0x2


class XattrFlags(enum.IntEnum):
    """``setxattr`` flags."""

    ANY = 0
    CREATE = 1
    REPLACE = 2


class LockKind(enum.IntEnum):
    """Whole-file (flock) or byte-range (fcntl) locks: they do not interact."""

    FLOCK = 1
    POSIX = 2


class LockType(enum.IntEnum):
    """Shared, exclusive, or release."""

    READ = 1
    WRITE = 2
    UNLOCK = 3


class NotifyKind(enum.IntEnum):
    """What a pushed :class:`Notify` says changed."""

    INODE_CHANGED = 1
    ENTRY_CHANGED = 2
    LOCK_RELEASED = 3


# ---------------------------------------------------------------------------
# Registration

MessageClass = TypeVar("MessageClass", bound=type)

MESSAGE_CLASSES: dict[int, type] = {}
"""Every message class by its type number."""


def message(message_type: MessageType) -> Callable[[MessageClass], MessageClass]:
    """Make ``cls`` a dataclass message of ``message_type`` and register it."""

    def register(cls: MessageClass) -> MessageClass:
        cls = dataclass(slots=True)(cls)  # type: ignore[assignment]
        cls.TYPE = message_type  # type: ignore[attr-defined]
        cls.RECORD = Record(cls)  # type: ignore[attr-defined]
        if message_type in MESSAGE_CLASSES:
            raise RuntimeError(f"message type {message_type!r} declared twice")
        MESSAGE_CLASSES[message_type] = cls
        return cls

    return register


class Message:
    """What every message class provides (for type checkers)."""

    __slots__ = ()
    TYPE: ClassVar[MessageType]
    RECORD: ClassVar[Record]


# ---------------------------------------------------------------------------
# Nested records


@dataclass(slots=True)
class Attributes:
    """What the server knows of an inode: POSIX attributes, never names or data."""

    inode: int = wire(InodeId)
    kind: FileKind = wire(IntEnumField(U8, FileKind))
    mode: int = wire(U32)
    nlink: int = wire(U32)
    uid: int = wire(U32)
    gid: int = wire(U32)
    size: int = wire(U64)
    atime_ns: int = wire(Timestamp)
    mtime_ns: int = wire(Timestamp)
    ctime_ns: int = wire(Timestamp)
    version: int = wire(U64)


ATTRIBUTES = Record(Attributes)


@dataclass(slots=True)
class DirEntry:
    """One entry of a directory page: the sealed name and the child's attributes."""

    name: bytes = wire(ShortBytes)
    attributes: Attributes = wire(ATTRIBUTES)


@dataclass(slots=True)
class ChunkRef:
    """Where chunk ``index`` of a file lives in the object store.

    ``length`` is how many of the object's plaintext bytes belong to the file
    (a truncation shortens it); ``object_length`` is how many plaintext bytes
    the object holds, which opening it needs (``length <= object_length``).
    """

    index: int = wire(U64)
    object_id: bytes = wire(ShortBytes)
    length: int = wire(U32)
    object_length: int = wire(U32)


@dataclass(slots=True)
class UserInfo:
    """A user of a filespace as ``USER_LIST`` shows it."""

    name: str = wire(Text)
    role: Role = wire(IntEnumField(U8, Role))


@dataclass(slots=True)
class KdfParameters:
    """Argon2id parameters of one user's passphrase, kept by the server."""

    salt: bytes = wire(ShortBytes)
    time_cost: int = wire(U32)
    memory_kib: int = wire(U32)
    parallelism: int = wire(U8)


KDF_PARAMETERS = Record(KdfParameters)


@dataclass(slots=True)
class Credentials:
    """What the server keeps of a user: KDF parameters, login secret, wrapped key."""

    kdf: KdfParameters = wire(KDF_PARAMETERS)
    login_secret: bytes = wire(ShortBytes)
    wrapped_key: bytes = wire(ShortBytes)


CREDENTIALS = Record(Credentials)
Endpoints = ListOf(U16, Text)

# ---------------------------------------------------------------------------
# Every connection


@message(MessageType.HELLO)
class Hello(Message):
    """First frame of every connection: who the client is and what it speaks.

    The layout of this message never changes, so that peers of different
    versions can always tell each other which versions they speak.
    """

    version: int = wire(U16)
    peer_name: str = wire(Text)
    filespace: str = wire(Text)


@message(MessageType.WELCOME)
class Welcome(Message):
    """The server's answer to :class:`Hello`."""

    version: int = wire(U16)
    server_name: str = wire(Text)
    session_id: int = wire(U64)
    keepalive_ms: int = wire(U32)
    status: ServerStatus = wire(IntEnumField(U8, ServerStatus))


@message(MessageType.ERROR)
class Error(Message):
    """A request failed; ``code`` is from :data:`lucidlink.errors.ERRORS_BY_CODE`."""

    code: int = wire(U16)
    retry_after_ms: int = wire(U32)
    text: str = wire(Text)


@message(MessageType.OK)
class Ok(Message):
    """A request succeeded and there is nothing more to say."""


@message(MessageType.PING)
class Ping(Message):
    """Keepalive; either side may send it."""

    nonce: int = wire(U64)


@message(MessageType.PONG)
class Pong(Message):
    """Answer to :class:`Ping` with the same nonce."""

    nonce: int = wire(U64)


@message(MessageType.GOODBYE)
class Goodbye(Message):
    """Pushed before a peer closes the connection, saying why."""

    code: int = wire(U16)
    text: str = wire(Text)


# ---------------------------------------------------------------------------
# Discovery


@message(MessageType.REGISTER)
class Register(Message):
    """A metadata server announces where it serves a filespace.

    ``mac`` is an HMAC-SHA256 over every other field, keyed by the
    registration secret ``key_id`` names; ``timestamp_ms`` and ``nonce``
    stop replays.
    """

    filespace: str = wire(Text)
    server_id: str = wire(Text)
    endpoints: list[str] = wire(Endpoints)
    identity: str = wire(Text)
    status: ServerStatus = wire(IntEnumField(U8, ServerStatus))
    timestamp_ms: int = wire(Timestamp)
    nonce: bytes = wire(ShortBytes)
    key_id: str = wire(Text)
    mac: bytes = wire(ShortBytes)


@message(MessageType.HEARTBEAT)
class Heartbeat(Register):
    """The periodic renewal of a :class:`Register`; the same fields and rules."""


@message(MessageType.REGISTERED)
class Registered(Message):
    """Discovery accepted a registration; heartbeat again within ``ttl_ms``."""

    ttl_ms: int = wire(U32)
    heartbeat_ms: int = wire(U32)


@message(MessageType.RESOLVE)
class Resolve(Message):
    """A client asks which metadata server serves ``filespace``."""

    filespace: str = wire(Text)


@message(MessageType.RESOLVED)
class Resolved(Message):
    """Where ``filespace`` is served, the TLS identity to expect, and for how long."""

    filespace: str = wire(Text)
    endpoints: list[str] = wire(Endpoints)
    identity: str = wire(Text)
    ttl_ms: int = wire(U32)
    status: ServerStatus = wire(IntEnumField(U8, ServerStatus))


# ---------------------------------------------------------------------------
# Metadata server: login, bootstrap and users


@message(MessageType.LOGIN_START)
class LoginStart(Message):
    """Ask for a user's KDF parameters (a stable fake for unknown users)."""

    user: str = wire(Text)


@message(MessageType.LOGIN_CHALLENGE)
class LoginChallenge(Message):
    """The KDF parameters the client runs the passphrase through."""

    kdf: KdfParameters = wire(KDF_PARAMETERS)


@message(MessageType.LOGIN)
class Login(Message):
    """Prove knowledge of the passphrase with the derived login secret."""

    user: str = wire(Text)
    login_secret: bytes = wire(ShortBytes)


@message(MessageType.LOGIN_OK)
class LoginOk(Message):
    """A session is open: the user's role, wrapped key and the filespace's shape."""

    role: Role = wire(IntEnumField(U8, Role))
    wrapped_key: bytes = wire(ShortBytes)
    chunk_size: int = wire(U32)
    root_inode: int = wire(InodeId)
    filespace_id: bytes = wire(ShortBytes)


@message(MessageType.CLIENT_ID)
class ClientId(Message):
    """
    After login: the client's random id, the same on each of its connections.

    A change to the tree sent again under the same request id, by the same
    client, is answered with what the first attempt did instead of being
    made twice (see :class:`ClientKnown`).
    """

    client_id: bytes = wire(ShortBytes)


@message(MessageType.CLIENT_KNOWN)
class ClientKnown(Message):
    """
    What the server remembers of a client's changes, to answer one sent again as it was answered.

    Answers are kept ``remember_ms`` and, per client, for the last
    ``remember_count`` changes; ``boot_id`` is new each time the server
    starts (it remembers nothing from before).
    """

    boot_id: bytes = wire(ShortBytes)
    remember_ms: int = wire(U32)
    remember_count: int = wire(U32)


@message(MessageType.RESERVE_INODES)
class ReserveInodes(Message):
    """
    Ask for ``count`` inode ids of the client's own, for new files, directories and symbolic links.

    Needs a named client (``ClientId``); the ids are the client's until the
    server restarts, each good for one creation (its ``inode`` field).
    """

    count: int = wire(U32)


@message(MessageType.INODE_BLOCK)
class InodeBlock(Message):
    """The ids reserved: ``first`` to ``first + count - 1``."""

    first: int = wire(InodeId)
    count: int = wire(U32)


@message(MessageType.BOOTSTRAP)
class Bootstrap(Message):
    """Initialise a new filespace with its first admin, once, with the bootstrap token."""

    token: bytes = wire(ShortBytes)
    admin: str = wire(Text)
    credentials: Credentials = wire(CREDENTIALS)
    chunk_size: int = wire(U32)
    filespace_id: bytes = wire(ShortBytes)
    root_attributes: bytes = wire(ShortBytes)


@message(MessageType.USER_ADD)
class UserAdd(Message):
    """Add a user with a role and their own wrapped copy of the master key."""

    user: str = wire(Text)
    role: Role = wire(IntEnumField(U8, Role))
    credentials: Credentials = wire(CREDENTIALS)


@message(MessageType.USER_REMOVE)
class UserRemove(Message):
    """Remove a user; their sessions end."""

    user: str = wire(Text)


@message(MessageType.USER_PASSWD)
class UserPasswd(Message):
    """Replace a user's passphrase-derived credentials."""

    user: str = wire(Text)
    credentials: Credentials = wire(CREDENTIALS)


@message(MessageType.USER_LIST)
class UserList(Message):
    """List the users of the filespace."""


@message(MessageType.USER_LISTING)
class UserListing(Message):
    """The users of the filespace and their roles."""

    users: list[UserInfo] = wire(ListOf(U32, Record(UserInfo)))


# ---------------------------------------------------------------------------
# Metadata server: the tree


@message(MessageType.LOOKUP)
class Lookup(Message):
    """Find the entry ``name`` (sealed) in directory ``parent``."""

    parent: int = wire(InodeId)
    name: bytes = wire(ShortBytes)


@message(MessageType.GETATTR)
class GetAttr(Message):
    """Read an inode's attributes."""

    inode: int = wire(InodeId)


@message(MessageType.SETATTR)
class SetAttr(Message):
    """Change the attributes ``fields`` names; a size change truncates or extends."""

    inode: int = wire(InodeId)
    fields: int = wire(U32)
    mode: int = wire(U32)
    uid: int = wire(U32)
    gid: int = wire(U32)
    size: int = wire(U64)
    atime_ns: int = wire(Timestamp)
    mtime_ns: int = wire(Timestamp)


@message(MessageType.ENTRY)
class Entry(Message):
    """An inode's attributes, answering lookups, creations and attribute changes."""

    attributes: Attributes = wire(ATTRIBUTES)


@message(MessageType.READDIR)
class ReadDir(Message):
    """Read a page of directory entries after ``cursor`` (empty: from the start)."""

    inode: int = wire(InodeId)
    cursor: bytes = wire(ShortBytes)
    limit: int = wire(U32)


@message(MessageType.DIR_PAGE)
class DirPage(Message):
    """Entries with their attributes; ``cursor`` continues after the last."""

    entries: list[DirEntry] = wire(ListOf(U32, Record(DirEntry)))
    cursor: bytes = wire(ShortBytes)
    done: bool = wire(Bool)


@message(MessageType.MKDIR)
class MkDir(Message):
    """Make a directory."""

    parent: int = wire(InodeId)
    name: bytes = wire(ShortBytes)
    mode: int = wire(U32)
    uid: int = wire(U32)
    gid: int = wire(U32)
    inode: int = wire(InodeId, default=0)
    """0: the server gives it an id; else one of the client's own (:class:`ReserveInodes`)."""


@message(MessageType.RMDIR)
class RmDir(Message):
    """Remove an empty directory."""

    parent: int = wire(InodeId)
    name: bytes = wire(ShortBytes)


@message(MessageType.CREATE)
class Create(Message):
    """Create a regular file, and open it (``exclusive``: fail if it exists)."""

    parent: int = wire(InodeId)
    name: bytes = wire(ShortBytes)
    mode: int = wire(U32)
    uid: int = wire(U32)
    gid: int = wire(U32)
    exclusive: bool = wire(Bool)
    open_flags: int = wire(U32)
    inode: int = wire(InodeId, default=0)
    """For a new file: 0, the server gives it an id; else one of the client's own (:class:`ReserveInodes`)."""
    time_ns: int = wire(Timestamp, default=0)
    """0: the server's clock; else the time the client already answered with (honoured under its lease)."""


@message(MessageType.UNLINK)
class Unlink(Message):
    """Remove a directory entry that is not a directory."""

    parent: int = wire(InodeId)
    name: bytes = wire(ShortBytes)
    time_ns: int = wire(Timestamp, default=0)
    """As :attr:`Create.time_ns`."""
    inode: int = wire(InodeId, default=0)
    """0, or the inode the entry must name (else ``NotFound``): an unlink sent again removes only what it meant."""


@message(MessageType.RENAME)
class Rename(Message):
    """Move an entry, replacing the target as POSIX ``rename`` does."""

    old_parent: int = wire(InodeId)
    old_name: bytes = wire(ShortBytes)
    new_parent: int = wire(InodeId)
    new_name: bytes = wire(ShortBytes)
    flags: int = wire(U32)


@message(MessageType.LINK)
class Link(Message):
    """Make a hard link to ``inode``."""

    inode: int = wire(InodeId)
    new_parent: int = wire(InodeId)
    new_name: bytes = wire(ShortBytes)


@message(MessageType.SYMLINK)
class Symlink(Message):
    """Make a symbolic link whose (sealed) target is ``target``."""

    parent: int = wire(InodeId)
    name: bytes = wire(ShortBytes)
    target: bytes = wire(ShortBytes)
    uid: int = wire(U32)
    gid: int = wire(U32)
    inode: int = wire(InodeId, default=0)
    """0: the server gives it an id; else one of the client's own (:class:`ReserveInodes`)."""


@message(MessageType.READLINK)
class ReadLink(Message):
    """Read a symbolic link's sealed target."""

    inode: int = wire(InodeId)


@message(MessageType.LINK_TARGET)
class LinkTarget(Message):
    """A symbolic link's sealed target."""

    target: bytes = wire(ShortBytes)


@message(MessageType.SETXATTR)
class SetXattr(Message):
    """Set an extended attribute (name and value sealed)."""

    inode: int = wire(InodeId)
    name: bytes = wire(ShortBytes)
    value: bytes = wire(LongBytes)
    flags: XattrFlags = wire(IntEnumField(U8, XattrFlags))


@message(MessageType.GETXATTR)
class GetXattr(Message):
    """Read an extended attribute."""

    inode: int = wire(InodeId)
    name: bytes = wire(ShortBytes)


@message(MessageType.XATTR_VALUE)
class XattrValue(Message):
    """An extended attribute's sealed value."""

    value: bytes = wire(LongBytes)


@message(MessageType.LISTXATTR)
class ListXattr(Message):
    """List an inode's extended attribute names."""

    inode: int = wire(InodeId)


@message(MessageType.XATTR_NAMES)
class XattrNames(Message):
    """Sealed extended attribute names."""

    names: list[bytes] = wire(ListOf(U32, ShortBytes))


@message(MessageType.REMOVEXATTR)
class RemoveXattr(Message):
    """Remove an extended attribute."""

    inode: int = wire(InodeId)
    name: bytes = wire(ShortBytes)


@message(MessageType.STATFS)
class StatFs(Message):
    """Ask for the filespace's totals."""


@message(MessageType.FS_STATS)
class FsStats(Message):
    """Totals for ``statfs``."""

    block_size: int = wire(U32)
    total_bytes: int = wire(U64)
    used_bytes: int = wire(U64)
    total_inodes: int = wire(U64)
    used_inodes: int = wire(U64)


# ---------------------------------------------------------------------------
# Metadata server: open files and chunk maps


@message(MessageType.OPEN)
class Open(Message):
    """Open a file: the server keeps an unlinked file while a handle is open."""

    inode: int = wire(InodeId)
    flags: int = wire(U32)


@message(MessageType.OPENED)
class Opened(Message):
    """A handle for an opened (or created) file, with its attributes."""

    handle: int = wire(HandleId)
    attributes: Attributes = wire(ATTRIBUTES)


@message(MessageType.RELEASE)
class Release(Message):
    """Close a handle; its locks are released."""

    handle: int = wire(HandleId)


@message(MessageType.CHUNKMAP_READ)
class ChunkMapRead(Message):
    """Read ``count`` chunk references from ``first_index`` on."""

    inode: int = wire(InodeId)
    first_index: int = wire(U64)
    count: int = wire(U32)


@message(MessageType.CHUNKMAP)
class ChunkMap(Message):
    """A window of a file's chunk map at ``version``; absent chunks are holes."""

    inode: int = wire(InodeId)
    version: int = wire(U64)
    size: int = wire(U64)
    chunks: list[ChunkRef] = wire(ListOf(U32, Record(ChunkRef)))


@message(MessageType.CHUNKMAP_COMMIT)
class ChunkMapCommit(Message):
    """Replace chunk references and set the size, if the map is still at ``expected_version``."""

    inode: int = wire(InodeId)
    handle: int = wire(HandleId)
    expected_version: int = wire(U64)
    size: int = wire(U64)
    chunks: list[ChunkRef] = wire(ListOf(U32, Record(ChunkRef)))
    mtime_ns: int = wire(Timestamp)


@message(MessageType.CHUNKMAP_COMMITTED)
class ChunkMapCommitted(Message):
    """The new version of the chunk map and the file's attributes."""

    version: int = wire(U64)
    attributes: Attributes = wire(ATTRIBUTES)


# ---------------------------------------------------------------------------
# Metadata server: locks and notifications


@message(MessageType.LOCK)
class Lock(Message):
    """Take, change or release an advisory lock held by ``owner`` of this session."""

    inode: int = wire(InodeId)
    owner: int = wire(U64)
    kind: LockKind = wire(IntEnumField(U8, LockKind))
    lock_type: LockType = wire(IntEnumField(U8, LockType))
    start: int = wire(U64)
    end: int = wire(U64)
    wait: bool = wire(Bool)


@message(MessageType.LOCK_TEST)
class LockTest(Message):
    """Would this lock be granted? (``F_GETLK``)"""

    inode: int = wire(InodeId)
    owner: int = wire(U64)
    kind: LockKind = wire(IntEnumField(U8, LockKind))
    lock_type: LockType = wire(IntEnumField(U8, LockType))
    start: int = wire(U64)
    end: int = wire(U64)


@message(MessageType.LOCK_STATE)
class LockState(Message):
    """The first conflicting lock, or ``lock_type`` UNLOCK when there is none."""

    lock_type: LockType = wire(IntEnumField(U8, LockType))
    start: int = wire(U64)
    end: int = wire(U64)
    owner: int = wire(U64)


@message(MessageType.LOCK_RECLAIM)
class LockReclaim(Message):
    """Take again a lock this client held in an earlier session; granted, even in the grace period, if free."""

    inode: int = wire(InodeId)
    owner: int = wire(U64)
    kind: LockKind = wire(IntEnumField(U8, LockKind))
    lock_type: LockType = wire(IntEnumField(U8, LockType))
    start: int = wire(U64)
    end: int = wire(U64)


@message(MessageType.NOTIFY)
class Notify(Message):
    """Pushed to the other sessions of a filespace when something changed."""

    kind: NotifyKind = wire(IntEnumField(U8, NotifyKind))
    inode: int = wire(InodeId)
    parent: int = wire(InodeId)
    name: bytes = wire(ShortBytes)


@message(MessageType.STATUS_CHANGED)
class StatusChanged(Message):
    """Pushed when the server's status changes (for example to ``RESTORING``)."""

    status: ServerStatus = wire(IntEnumField(U8, ServerStatus))
    retry_after_ms: int = wire(U32)
    text: str = wire(Text)


@message(MessageType.LEASE_DIRECTORY)
class LeaseDirectory(Message):
    """Ask for a lease on a directory: no other session reads or changes its entries until it is recalled."""

    inode: int = wire(InodeId)


@message(MessageType.LEASE)
class Lease(Message):
    """A lease granted (or renewed) until ``expires_ms`` from now, unless recalled first."""

    inode: int = wire(InodeId)
    expires_ms: int = wire(U32)


@message(MessageType.LEASE_RECALL)
class LeaseRecall(Message):
    """Pushed to a lease's holder: another session wants the directory; send ``LeaseReturned`` once done."""

    inode: int = wire(InodeId)


@message(MessageType.LEASE_RETURNED)
class LeaseReturned(Message):
    """The holder gives a lease back, after every change it made under it (answered ``Ok``)."""

    inode: int = wire(InodeId)
