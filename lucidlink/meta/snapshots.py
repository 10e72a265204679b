"""
Snapshots of a metadata database, and restore from snapshot plus journal.

A snapshot is the whole SQLite database copied with the online backup API
(``sqlite3.Connection.backup``, consistent while the server runs), compressed
with zlib, stored at ``<filespace>/snapshots/<seq>.db.z``; its manifest, a
small JSON object stored after it at ``<filespace>/snapshots/<seq>.manifest``,
says what it holds::

    {"format": 1, "filespace": "X", "seq": 1234, "hash": "<chain hash hex>",
     "sha256": "<of the compressed object>", "size": <compressed bytes>,
     "raw_size": <database bytes>, "time_ns": <when taken>}

``seq`` is the last journal record the snapshot holds and ``hash`` the chain
hash after it.  Both objects are written create-only; a manifest exists only
for a complete snapshot, so a half-written one is never chosen.

:func:`restore` rebuilds a database from the newest snapshot at or before the
target whose data matches its manifest and passes ``PRAGMA quick_check`` (a
snapshot taken of a database already damaged on disk has a right checksum
and wrong pages), then replays every later segment
through the store (each record must land at its own sequence with its own
hash), and stops at the last record whose chain verifies if a segment is
damaged or missing, saying which sequence it reached.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock, LoopingCall
from twisted.logger import Logger

from lucidlink.errors import AlreadyExists, IntegrityError, InvalidArgument, LucidError, NotFound
from lucidlink.meta.journal import GENESIS_HASH, Journal
from lucidlink.meta.segments import parse_segment_key, salvage_segment, segment_prefix
from lucidlink.meta.store import MetadataStore

MANIFEST_FORMAT = 1
DEFAULT_SNAPSHOT_INTERVAL = 3600.0
SEQ_DIGITS = 20

_log = Logger()


@dataclass(frozen=True)
class Manifest:
    """What a snapshot holds (see the module)."""

    filespace: str
    seq: int
    hash: bytes
    sha256: bytes
    size: int
    raw_size: int
    time_ns: int

    def to_bytes(self) -> bytes:
        return json.dumps({
            "format": MANIFEST_FORMAT, "filespace": self.filespace, "seq": self.seq, "hash": self.hash.hex(),
            "sha256": self.sha256.hex(), "size": self.size, "raw_size": self.raw_size, "time_ns": self.time_ns,
        }, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Manifest:
        try:
            plain = json.loads(data)
            if plain["format"] != MANIFEST_FORMAT:
                raise IntegrityError(f"unknown snapshot manifest format {plain['format']}")
            return cls(plain["filespace"], int(plain["seq"]), bytes.fromhex(plain["hash"]),
                       bytes.fromhex(plain["sha256"]), int(plain["size"]), int(plain["raw_size"]),
                       int(plain["time_ns"]))
        except (ValueError, KeyError, TypeError) as error:
            raise IntegrityError(f"malformed snapshot manifest: {error}") from None


def snapshot_prefix(filespace: str) -> str:
    return f"{filespace}/snapshots/"


def snapshot_key(filespace: str, seq: int) -> str:
    return f"{snapshot_prefix(filespace)}{seq:0{SEQ_DIGITS}d}.db.z"


def manifest_key(filespace: str, seq: int) -> str:
    return f"{snapshot_prefix(filespace)}{seq:0{SEQ_DIGITS}d}.manifest"


def database_bytes(store: MetadataStore) -> bytes:
    """A consistent copy of ``store``'s whole database, by SQLite's online backup."""
    copy = sqlite3.connect(":memory:")
    try:
        store._db.backup(copy)
        data = bytearray(copy.serialize())
    finally:
        copy.close()
    # Header bytes 18-19 say "WAL" (2) when copied from a WAL database; a standalone copy is a rollback
    # journal database (1) so it opens anywhere, in memory too.  The server turns WAL back on when it opens it.
    data[18:20] = b"\x01\x01"
    return bytes(data)


def _head_of(database: bytes) -> tuple[int, bytes]:
    copy = sqlite3.connect(":memory:")
    try:
        copy.deserialize(database)
        row = copy.execute("SELECT seq, hash FROM journal ORDER BY seq DESC LIMIT 1").fetchone()
    except sqlite3.Error:
        row = None
    finally:
        copy.close()
    return (row[0], bytes(row[1])) if row else (0, GENESIS_HASH)


def check_serialized(database: bytes) -> str:
    """"ok", or what ``PRAGMA quick_check`` says is wrong with the serialized ``database``."""
    copy = sqlite3.connect(":memory:")
    try:
        copy.deserialize(database)
        rows = [row[0] for row in copy.execute("PRAGMA quick_check")]
    except sqlite3.Error as error:
        return str(error)
    finally:
        copy.close()
    return "ok" if rows == ["ok"] else "; ".join(rows[:3])


@defer.inlineCallbacks
def take_snapshot(store: MetadataStore, object_store: Any, filespace: str, clock: IReactorTime) -> Any:
    """Store a snapshot of ``store`` and fire with its :class:`Manifest` (or None if one exists at this seq)."""
    database = database_bytes(store)
    checked = check_serialized(database)
    if checked != "ok":
        raise IntegrityError(f"the database fails quick_check ({checked}); no snapshot is taken of it")
    seq, chain = _head_of(database)
    data = zlib.compress(database, 6)
    manifest = Manifest(filespace, seq, chain, hashlib.sha256(data).digest(), len(data), len(database),
                        int(clock.seconds() * 1_000_000_000))
    try:
        yield object_store.put(snapshot_key(filespace, seq), data, create_only=True)
        yield object_store.put(manifest_key(filespace, seq), manifest.to_bytes(), create_only=True)
    except AlreadyExists:
        return None  # nothing changed since the last snapshot
    return manifest


class Snapshotter:
    """Takes a snapshot every ``interval`` seconds when the journal moved, and on :meth:`stop`."""

    def __init__(self, store: MetadataStore, object_store: Any, filespace: str, clock: IReactorTime,
                 interval: float = DEFAULT_SNAPSHOT_INTERVAL) -> None:
        self.store = store
        self.object_store = object_store
        self.filespace = filespace
        self.clock = clock
        self.interval = interval
        self.last_seq: int | None = None
        self.taken = 0
        self._loop = LoopingCall(self.snapshot)
        self._loop.clock = clock
        self._running: defer.Deferred[Any] | None = None

    def start(self) -> None:
        self._loop.start(self.interval, now=False)

    @defer.inlineCallbacks
    def stop(self, final: bool = True) -> Any:
        """Stop taking snapshots; take a last one unless ``final`` is false (a damaged database)."""
        if self._loop.running:
            self._loop.stop()
        if self._running is not None:
            yield self._running
        if final:
            yield self.snapshot()

    @defer.inlineCallbacks
    def snapshot(self) -> Any:
        """Take a snapshot unless the journal has not moved since the last one; never fails (logs)."""
        if self._running is not None:
            return None
        journal = self.store.journal
        seq = journal.head()[0] if isinstance(journal, Journal) else None
        if seq is not None and seq == self.last_seq:
            return None
        self._running = take_snapshot(self.store, self.object_store, self.filespace, self.clock)
        try:
            manifest = yield self._running
        except LucidError as error:
            _log.warn("snapshot of {filespace} failed: {error}", filespace=self.filespace, error=str(error))
            return None
        finally:
            self._running = None
        self.last_seq = seq
        if manifest is not None:
            self.taken += 1
        return manifest


@dataclass(frozen=True)
class RestoreResult:
    """What :func:`restore` rebuilt."""

    seq: int
    """The last journal record in the restored database."""
    hash: bytes
    snapshot_seq: int | None
    """The snapshot it started from (None: from an empty database)."""
    complete: bool
    """False if it stopped early (a damaged or missing segment); ``problem`` says why."""
    problem: str = ""

    @property
    def summary(self) -> str:
        start = f"snapshot at seq {self.snapshot_seq}" if self.snapshot_seq is not None else "an empty database"
        text = f"restored to seq {self.seq} from {start}"
        return text if self.complete else f"{text}; stopped there: {self.problem}"


@defer.inlineCallbacks
def _newest_snapshot(object_store: Any, filespace: str, to_seq: int | None) -> Any:
    infos = yield object_store.list(snapshot_prefix(filespace))
    manifests = sorted((info.key for info in infos if info.key.endswith(".manifest")), reverse=True)
    for key in manifests:
        try:
            manifest = Manifest.from_bytes((yield object_store.get(key)))
            if to_seq is not None and manifest.seq > to_seq:
                continue
            data = yield object_store.get(snapshot_key(filespace, manifest.seq))
            if len(data) != manifest.size or hashlib.sha256(data).digest() != manifest.sha256:
                raise IntegrityError(f"snapshot at seq {manifest.seq} does not match its manifest")
            database = zlib.decompress(data)
            if _head_of(database) != (manifest.seq, manifest.hash):
                raise IntegrityError(f"snapshot at seq {manifest.seq} does not end where its manifest says")
            checked = check_serialized(database)
            if checked != "ok":
                # Taken from a database already damaged on disk: its checksum is right, its pages are not.
                raise IntegrityError(f"snapshot at seq {manifest.seq} fails quick_check: {checked}")
        except (IntegrityError, NotFound, zlib.error) as error:
            _log.warn("skipping snapshot {key}: {error}", key=key, error=str(error))
            continue
        return manifest, database
    return None


@defer.inlineCallbacks
def restore(object_store: Any, filespace: str, target_path: Path | str, to_seq: int | None = None,
            clock: IReactorTime | None = None) -> Any:
    """Rebuild the database of ``filespace`` at ``target_path`` (which must not exist) up to ``to_seq``.

    Fires with a :class:`RestoreResult`.  The database is built beside the
    target and renamed into place only once complete (or stopped at the last
    good record), so a failed restore leaves nothing half-built at the target.
    """
    target = Path(target_path)
    if target.exists():
        raise InvalidArgument(f"{target} exists; restore builds a new database")
    if to_seq is not None and to_seq < 0:
        raise InvalidArgument(f"cannot restore to seq {to_seq}")
    found = yield _newest_snapshot(object_store, filespace, to_seq)
    handle, scratch_name = tempfile.mkstemp(prefix=".restoring-", dir=target.parent)
    os.close(handle)
    scratch = Path(scratch_name)
    try:
        snapshot_seq = None
        if found is not None:
            manifest, database = found
            scratch.write_bytes(database)
            snapshot_seq = manifest.seq
        else:
            scratch.unlink()
        store = MetadataStore(scratch, clock or Clock())
        try:
            journal = Journal(clock or Clock()).install(store)
            seq, chain = journal.head()
            problem = ""
            infos = yield object_store.list(segment_prefix(filespace))
            spans = sorted(
                (span, info.key) for info in infos
                if (span := parse_segment_key(filespace, info.key)) is not None
            )
            for (first, last), key in spans:
                if to_seq is not None and seq >= to_seq:
                    break
                if last <= seq:
                    continue
                if first > seq + 1:
                    problem = f"no segment holds seq {seq + 1} (the next one, {key}, starts at {first})"
                    break
                try:
                    data = yield object_store.get(key)
                except LucidError as error:
                    problem = f"cannot read {key}: {error}"
                    break
                salvage = salvage_segment(data, seq, chain)
                for entry in salvage.entries:
                    if to_seq is not None and entry.seq > to_seq:
                        break
                    journal.replay(entry)
                    seq, chain = entry.seq, entry.hash
                if salvage.problem:
                    problem = f"{key} is damaged ({salvage.problem}); the last good record is seq {seq}"
                    break
            if to_seq is not None and seq < to_seq and not problem:
                problem = f"the journal ends at seq {seq}, before seq {to_seq}"
        finally:
            store.close()
        os.replace(scratch, target)
    except BaseException:
        for leftover in (scratch, Path(f"{scratch}-wal"), Path(f"{scratch}-shm")):
            leftover.unlink(missing_ok=True)
        raise
    for leftover in (Path(f"{scratch}-wal"), Path(f"{scratch}-shm")):
        leftover.unlink(missing_ok=True)
    result = RestoreResult(seq, chain, snapshot_seq, not problem, problem)
    _log.info("{filespace}: {summary}", filespace=filespace, summary=result.summary)
    return result
