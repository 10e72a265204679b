"""
Write-back journals: a handle's uncommitted writes on local disk, sealed, so that nothing is lost.

A file handle that writes keeps its changes in memory and, record by record,
in a journal file under the cache folder (``writeback/pending/``), from its
first change after a commit until the next commit succeeds; then the
journal is removed.  A lost connection, a restarted metadata server or a
restarted client therefore loses no buffered write: on the next mount the
journals left behind are replayed onto the file and committed, provided the
file's chunk map is still at the version the journal started from.  If it
is not (someone else changed the file meanwhile) or the file is gone, the
journal is moved to ``writeback/conflicts/`` with a note saying why, and the
mount says so; nothing is merged blindly.

A journal is written without ``fsync`` while its handle works: it is there
for the next run if this process dies, and a commit usually removes it
within seconds, so streaming writes seldom cost the disk twice.  A journal
left behind because its commit failed is synced first.  (A machine that
loses power loses what no ``fsync`` of the program made durable, as with any
local file; an ``fsync`` of the program commits to the servers.)

The data in a journal is sealed with the file's key (the AES-256-GCM key of
the file's chunk, :meth:`~lucidlink.crypto.FilespaceKeys.chunk_cipher`), a
random nonce per record, and associated data that binds the record to its
inode, chunk, offset and place in the journal; so the cache folder holds
no plaintext, and a record altered or moved is detected.

Journal format (version 1)::

    journal = magic "LUCIDWB1" || inode (u64) || base version (u64) || record...
    record  = kind (u8) || body length (u32) || body
    WRITE       body = chunk index (u64) || offset in chunk (u32) || nonce (12) || ciphertext || tag
    TRUNCATE    body = size (u64)
    COMMITTING  body = expected version (u64) || size (u64) || (index (u64) || object id (16) || length (u64))...
    STAGED      body = chunk index (u64) || chunk length (u64)

A record cut short at the end (a crash while appending) ends the journal.
``COMMITTING`` is written just before a commit is sent, so that a journal
whose commit did succeed (the client died before removing it) is recognised
on replay and not reported as a conflict.

``STAGED``: a chunk written in order from its first byte is kept as the
chunk object it will be stored as, sealed block by block into a file of
its own (``<journal>.<record number>``, :class:`StagedChunk`), instead of in
``WRITE`` records: each block is sealed once, on the way in, and once the
chunk is whole the file is stored as it is (hard-linked into a local
object store and the chunk cache), so its bytes are written to disk once
instead of three times.  The record stands
for the whole blocks the file holds, at the record's place in the journal;
the bytes of a block not yet whole are journaled in ``WRITE`` records.  The
writer stops staging a chunk (and journals its writes in ``WRITE`` records
again) as soon as a write changes it other than by appending, a merge
rebuilds it, or the file is cut (even to a larger size: blocks sealed after
a ``TRUNCATE`` record would be replayed before it), so the staged blocks
always hold what the chunk held when each was sealed, and every record
after the ``STAGED`` one is laid over them on replay as it was over the
chunk.  A staged block's nonce is the object's random prefix and
its index, and the writer seals each block once; the last block of the
chunk is sealed only once the chunk is whole (its ``chunk length`` is the
filespace's chunk size), so a chunk that ends shorter is sealed anew, from
memory, with another prefix.  (A lucidlink from before ``STAGED`` finds an
unknown record kind in such a journal and keeps it as damaged: nothing is
lost.)
"""

from __future__ import annotations

import contextlib
import enum
import errno
import glob
import itertools
import os
import re
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lucidlink import crypto
from lucidlink.atomic import fsync_folder
from lucidlink.errors import IntegrityError, InvalidArgument, NoSpace
from lucidlink.protocol.messages import ChunkRef

MAGIC = b"LUCIDWB1"
_HEADER = struct.Struct(">8sQQ")
_RECORD = struct.Struct(">BI")
_WRITE = struct.Struct(">QI")
_SIZE = struct.Struct(">Q")
_COMMITTING = struct.Struct(">QQ")
_REF = struct.Struct(">Q16sQ")
_STAGED = struct.Struct(">QQ")
_AD = struct.Struct(">QQIQ")
_LABEL = b"lucidlink write-back v1\x00"
_NONCE_SIZE = 12
PENDING = "pending"
CONFLICTS = "conflicts"
_NAME = re.compile(r"^(\d+)-(\d+)\.journal$")


class RecordKind(enum.IntEnum):
    WRITE = 1
    TRUNCATE = 2
    COMMITTING = 3
    STAGED = 4


@dataclass(frozen=True)
class Write:
    """Bytes written at ``offset`` of chunk ``index``."""

    index: int
    offset: int
    data: bytes


@dataclass(frozen=True)
class Truncate:
    size: int


@dataclass(frozen=True)
class Committing:
    """A commit about to be sent: against ``expected``, of ``refs`` and ``size``."""

    expected: int
    size: int
    refs: tuple[ChunkRef, ...]


@dataclass(frozen=True)
class Staged:
    """Chunk ``index`` was staged (read back as the :class:`Write` of its whole staged blocks)."""

    index: int
    chunk_length: int


Record = Write | Truncate | Committing


def _associated_data(inode: int, index: int, offset: int, number: int) -> bytes:
    return _LABEL + _AD.pack(inode, index, offset, number)


def _write_error(error: OSError, path: Path) -> Exception:
    """What a failed write of a journal means to the writer: the disk is full, or an unexpected I/O error."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return NoSpace(f"no room left for the write-back journal {path}")
    return error


def staged_path(journal: Path, number: int) -> Path:
    """The file of the chunk staged by record ``number`` of ``journal``."""
    return journal.with_name(f"{journal.name}.{number}")


def _staged_files(journal: Path) -> list[Path]:
    """The staged chunks of ``journal`` (see :func:`staged_path`)."""
    return [path for path in journal.parent.glob(f"{glob.escape(journal.name)}.*") if path.suffix[1:].isdigit()]


class StagedChunk:
    """
    A chunk object built in a file as the writer appends to the chunk (see ``STAGED`` in the module).

    :meth:`add` seals every block the chunk's buffer holds whole and that
    is not in the file yet; once :attr:`complete`, the file is the chunk
    object, ready to store.
    """

    def __init__(self, path: Path, sealer: crypto.BlockSealer) -> None:
        self.path = path
        self.sealer = sealer
        self._taken_back = False
        self._descriptor: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            _write_all(self._descriptor, [crypto.CHUNK_HEADER], 0)
        except OSError as error:
            self.close()
            path.unlink(missing_ok=True)
            raise _write_error(error, path) from None

    def __repr__(self) -> str:
        return f"<StagedChunk {self.path.name}: {self.sealer.sealed} of {self.sealer.count} blocks>"

    @property
    def complete(self) -> bool:
        """Whether the file holds the whole object."""
        return self.sealer.complete

    @property
    def staged(self) -> int:
        """How many bytes of the chunk, from its first, the file holds sealed."""
        return self.sealer.sealed * crypto.BLOCK_SIZE

    def add(self, data: bytes | bytearray | memoryview) -> int:
        """Seal into the file each block that ``data`` (the chunk from its first byte) holds whole; :attr:`staged` after."""
        if self._descriptor is None or self._taken_back:
            raise IntegrityError(f"the staged chunk {self.path} is closed")
        sealer = self.sealer
        first = sealer.sealed
        pieces: list[bytes] = []
        # Released here: a view left in the frame of an error would keep the writer's buffer from being cut back.
        with memoryview(data).cast("B") as view:
            while not sealer.complete and len(view) >= self.staged + sealer.block_length():
                start = self.staged
                pieces += (sealer.prefix, sealer.seal_next(view[start : start + sealer.block_length()]))
                sealer.advance()
        if pieces:
            try:
                _write_all(self._descriptor, pieces, crypto.sealed_block_offset(first))
            except OSError as error:
                sealer.sealed = first  # not in the file: sealed again (the same bytes) by the next add
                with contextlib.suppress(OSError):
                    os.ftruncate(self._descriptor, crypto.sealed_block_offset(first))
                raise _write_error(error, self.path) from None
        return self.staged

    def take_back(self, blocks_from: int) -> None:
        """
        Drop the blocks sealed from byte ``blocks_from`` on (a multiple of the block size); no more are added.

        The writer stops staging the chunk: the bytes of those blocks are journaled in records, or their write failed.
        """
        self._taken_back = True
        if self.sealer.complete:
            return  # a whole object may be stored by a link already: it never changes
        self.sealer.sealed = min(self.sealer.sealed, blocks_from // crypto.BLOCK_SIZE)
        if self._descriptor is not None:
            try:
                os.ftruncate(self._descriptor, crypto.sealed_block_offset(self.sealer.sealed))
            except OSError as error:
                raise _write_error(error, self.path) from None

    def sync(self) -> None:
        if self._descriptor is not None:
            os.fsync(self._descriptor)

    def read(self) -> bytes:
        """The object's bytes (those written so far)."""
        return self.path.read_bytes()

    def close(self) -> None:
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None


def _write_all(descriptor: int, pieces: list[bytes], offset: int) -> None:
    """Write ``pieces`` one after the other at ``offset`` (one system call as a rule)."""
    written = os.pwritev(descriptor, pieces, offset)
    rest = memoryview(b"".join(pieces))[written:] if written < sum(map(len, pieces)) else b""
    offset += written
    while rest:
        written = os.pwrite(descriptor, rest, offset)
        rest, offset = rest[written:], offset + written


class Journal:
    """One handle's journal file (see the module): appended to, synced, removed once committed."""

    def __init__(self, path: Path, keys: crypto.FilespaceKeys, inode: int, version: int) -> None:
        self.path = path
        self.keys = keys
        self.inode = inode
        self.version = version
        self.size = 0
        self._records = 0
        self._named = False
        self._staged: list[StagedChunk] = []
        self._descriptor: int | None = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            self._append(_HEADER.pack(MAGIC, inode, version))
        except BaseException:
            self.close()  # left, it would read as a damaged journal at the next start
            path.unlink(missing_ok=True)
            raise

    def __repr__(self) -> str:
        return f"<Journal {self.path.name} of inode {self.inode}>"

    def _append(self, data: bytes) -> None:
        if self._descriptor is None:
            raise IntegrityError(f"the write-back journal {self.path} is closed")
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._descriptor, view)
                view = view[written:]
        except OSError as error:
            # Part of a record left in the middle would make the records after it unreadable.
            with contextlib.suppress(OSError):
                os.ftruncate(self._descriptor, self.size)
            raise _write_error(error, self.path) from None
        self.size += len(data)

    def _record(self, kind: RecordKind, body: bytes) -> None:
        self._append(_RECORD.pack(kind, len(body)) + body)
        self._records += 1

    def write(self, index: int, offset: int, data: bytes | memoryview) -> None:
        """Record ``data`` written at ``offset`` of chunk ``index``, sealed."""
        nonce = os.urandom(_NONCE_SIZE)
        sealed = self.keys.chunk_cipher(self.inode, index).encrypt(
            nonce, bytes(data), _associated_data(self.inode, index, offset, self._records)
        )
        self._record(RecordKind.WRITE, _WRITE.pack(index, offset) + nonce + sealed)

    def truncate(self, size: int) -> None:
        self._record(RecordKind.TRUNCATE, _SIZE.pack(size))

    def stage(self, index: int, chunk_length: int) -> StagedChunk:
        """Stage chunk ``index`` (``chunk_length`` bytes once whole) from here on: its file, recorded."""
        staged = StagedChunk(
            staged_path(self.path, self._records), crypto.BlockSealer(self.keys, self.inode, index, chunk_length)
        )
        try:
            self._record(RecordKind.STAGED, _STAGED.pack(index, chunk_length))
        except BaseException:
            staged.close()
            staged.path.unlink(missing_ok=True)
            raise
        self._staged.append(staged)
        return staged

    def committing(self, expected: int, size: int, refs: list[ChunkRef]) -> None:
        body = _COMMITTING.pack(expected, size) + b"".join(
            _REF.pack(ref.index, ref.object_id.ljust(16, b"\0"), ref.length) for ref in refs
        )
        self._record(RecordKind.COMMITTING, body)

    def sync(self) -> None:
        """Make what is recorded durable, and the journal's name the first time."""
        if self._descriptor is not None:
            for staged in self._staged:
                staged.sync()
            os.fsync(self._descriptor)
            if not self._named:
                fsync_folder(self.path.parent)
                self._named = True

    def close(self) -> None:
        """Close the file and leave it (for the next mount to replay)."""
        for staged in self._staged:
            staged.close()
        if self._descriptor is not None:
            os.close(self._descriptor)
            self._descriptor = None

    def remove(self) -> None:
        """Everything recorded is committed: the journal goes."""
        self.close()
        self.path.unlink(missing_ok=True)
        for staged in self._staged:
            staged.path.unlink(missing_ok=True)


@dataclass
class PendingJournal:
    """A journal left by an earlier run, read back."""

    path: Path
    inode: int
    version: int
    written: float
    """When the journal was last written (seconds since the epoch)."""
    records: list[Record] = field(default_factory=list)

    @property
    def last_commit(self) -> Committing | None:
        """The commit that was about to be sent when the journal ended, if it ended so."""
        return self.records[-1] if self.records and isinstance(self.records[-1], Committing) else None

    def remove(self) -> None:
        remove_journal(self.path)


def remove_journal(path: Path) -> None:
    """Delete a journal file and the chunks it staged."""
    path.unlink(missing_ok=True)
    for staged in _staged_files(path):
        staged.unlink(missing_ok=True)


def read_journal(path: Path, keys: crypto.FilespaceKeys) -> PendingJournal:
    """Read a journal back, opening its writes; IntegrityError if it is damaged (not merely cut short)."""
    data = path.read_bytes()
    if len(data) < _HEADER.size:
        raise IntegrityError(f"the write-back journal {path} is too short to have a header")
    magic, inode, version = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise IntegrityError(f"{path} is not a write-back journal this lucidlink can read")
    journal = PendingJournal(path, inode, version, path.stat().st_mtime)
    position = _HEADER.size
    for number in itertools.count():
        if position + _RECORD.size > len(data):
            break
        kind, length = _RECORD.unpack_from(data, position)
        body = data[position + _RECORD.size : position + _RECORD.size + length]
        if len(body) < length:
            break  # cut short by a crash while appending
        position += _RECORD.size + length
        record = _parse(keys, inode, kind, body, number, path)
        if isinstance(record, Staged):
            record = _read_staged(keys, inode, record, staged_path(path, number))
        journal.records.append(record)
    return journal


def _parse(
    keys: crypto.FilespaceKeys, inode: int, kind: int, body: bytes, number: int, path: Path
) -> Record | Staged:
    where = f"record {number} of the write-back journal {path}"
    try:
        if kind == RecordKind.WRITE:
            index, offset = _WRITE.unpack_from(body)
            nonce = body[_WRITE.size : _WRITE.size + _NONCE_SIZE]
            sealed = body[_WRITE.size + _NONCE_SIZE :]
            try:
                data = keys.chunk_cipher(inode, index).decrypt(
                    nonce, sealed, _associated_data(inode, index, offset, number)
                )
            except Exception:
                raise IntegrityError(f"{where} was altered or does not belong there") from None
            return Write(index, offset, data)
        if kind == RecordKind.TRUNCATE:
            return Truncate(_SIZE.unpack(body)[0])
        if kind == RecordKind.COMMITTING:
            expected, size = _COMMITTING.unpack_from(body)
            refs = tuple(
                ChunkRef(index, b"" if object_id == bytes(16) else object_id, length, length)
                for index, object_id, length in _REF.iter_unpack(body[_COMMITTING.size :])
            )
            return Committing(expected, size, refs)
        if kind == RecordKind.STAGED:
            index, chunk_length = _STAGED.unpack(body)
            return Staged(index, chunk_length)
    except struct.error:
        raise IntegrityError(f"{where} is malformed") from None
    raise IntegrityError(f"{where} has unknown kind {kind}")


def _read_staged(keys: crypto.FilespaceKeys, inode: int, record: Staged, path: Path) -> Write:
    """The whole blocks a staged chunk's file holds, as the write of their plaintext (IntegrityError if damaged)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise IntegrityError(f"the staged chunk {path} of a write-back journal is missing") from None
    if data[: crypto.CHUNK_HEADER_SIZE] != crypto.CHUNK_HEADER:
        raise IntegrityError(f"the staged chunk {path} does not begin as a chunk object")
    whole = (len(data) - crypto.CHUNK_HEADER_SIZE) // crypto.SEALED_BLOCK_SIZE
    if not whole:
        return Write(record.index, 0, b"")
    sealed = data[crypto.CHUNK_HEADER_SIZE : crypto.sealed_block_offset(whole)]
    try:
        plain = crypto.open_blocks(keys, inode, record.index, 0, sealed, record.chunk_length)
    except (IntegrityError, InvalidArgument):
        raise IntegrityError(f"the staged chunk {path} was altered or does not belong there") from None
    return Write(record.index, 0, plain)


class WriteBackJournals:
    """The write-back journals of one filespace, in ``folder`` (``pending/`` and ``conflicts/``)."""

    def __init__(self, folder: Path, keys: crypto.FilespaceKeys) -> None:
        self.folder = Path(folder)
        self.keys = keys
        self.pending_folder = self.folder / PENDING
        self.conflicts_folder = self.folder / CONFLICTS
        self.pending_folder.mkdir(parents=True, exist_ok=True)
        self.conflicts_folder.mkdir(parents=True, exist_ok=True)
        self._tidy_staged()
        numbers = [int(match.group(1)) for match in map(_NAME.match, self._names()) if match]
        self._numbers = itertools.count(max(numbers, default=0) + 1)

    def _tidy_staged(self) -> None:
        """
        Put each staged chunk where its journal is, or delete it if its journal is gone.

        A process that died while keeping a journal (:meth:`keep`) or removing one left them apart.
        """
        for folder, other in ((self.pending_folder, self.conflicts_folder), (self.conflicts_folder, self.pending_folder)):
            for path in list(folder.iterdir()):
                journal, _, number = path.name.rpartition(".")
                if not number.isdigit() or not _NAME.match(journal) or (folder / journal).exists():
                    continue
                if (other / journal).exists():
                    os.replace(path, other / path.name)
                else:
                    path.unlink(missing_ok=True)

    def _names(self) -> list[str]:
        return [path.name for folder in (self.pending_folder, self.conflicts_folder) for path in folder.iterdir()]

    def begin(self, inode: int, version: int) -> Journal:
        """
        A new journal for changes to ``inode`` made on top of chunk map ``version``.

        A folder removed meanwhile (a cleaner of old files, a person clearing the cache) is made again:
        else no write could be journaled until the next mount.
        """
        path = self.pending_folder / f"{next(self._numbers)}-{inode}.journal"
        try:
            return Journal(path, self.keys, inode, version)
        except FileNotFoundError:
            self.pending_folder.mkdir(parents=True, exist_ok=True)
            self.conflicts_folder.mkdir(parents=True, exist_ok=True)
            return Journal(path, self.keys, inode, version)

    def pending_paths(self) -> list[Path]:
        """The journals left behind, oldest first."""
        found = [(int(match.group(1)), path) for path in self.pending_folder.iterdir()
                 if (match := _NAME.match(path.name))]
        return [path for _, path in sorted(found)]

    def pending(self) -> Iterator[PendingJournal | tuple[Path, IntegrityError]]:
        """Each journal left behind, read back (or, if damaged, its path and the error), oldest first."""
        for path in self.pending_paths():
            try:
                yield read_journal(path, self.keys)
            except IntegrityError as error:
                yield path, error

    def keep(self, path: Path, reason: str) -> Path:
        """Move a journal that cannot be committed to ``conflicts/``, with a note of why; its new path."""
        kept = self.conflicts_folder / path.name
        for staged in _staged_files(path):
            os.replace(staged, self.conflicts_folder / staged.name)
        os.replace(path, kept)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
        kept.with_suffix(".why").write_text(f"{stamp} UTC: {reason}\n", encoding="utf-8")
        return kept
