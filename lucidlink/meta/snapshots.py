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
damaged or missing, saying which sequence it reached.  It is built for
speed: the snapshot is inflated straight into a scratch file, segments are
read a few ahead, each segment's records are replayed in one transaction
with ``synchronous=OFF``, and the result is checked (``quick_check``) and
synced once before it is renamed into place.  :func:`seq_at_time` finds
the record to stop at for a moment, starting from a snapshot, so it works
on a store pruned to its retention window (:mod:`lucidlink.meta.prune`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import Clock, LoopingCall
from twisted.logger import Logger

from lucidlink.atomic import fsync_folder
from lucidlink.errors import AlreadyExists, IntegrityError, InvalidArgument, LucidError, NotFound
from lucidlink.meta.journal import GENESIS_HASH, Entry, Journal
from lucidlink.meta.segments import parse_segment_key, salvage_segment, segment_prefix
from lucidlink.meta.store import MetadataStore

MANIFEST_FORMAT = 1
DEFAULT_SNAPSHOT_INTERVAL = 3600.0
SEQ_DIGITS = 20
PREFETCH_SEGMENTS = 4
"""Segments a restore reads ahead of the one it replays."""
_INFLATE_PIECE = 1 << 22

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


def quick_check(connect: Callable[[], sqlite3.Connection], prepare: Callable[[sqlite3.Connection], object] = bool) -> str:
    """"ok", or what opening (``connect``, then ``prepare``) or ``PRAGMA quick_check`` says is wrong."""
    try:
        db = connect()
    except sqlite3.Error as error:
        return str(error)
    try:
        prepare(db)
        rows = [row[0] for row in db.execute("PRAGMA quick_check")]
    except sqlite3.Error as error:
        return str(error)
    finally:
        db.close()
    return "ok" if rows == ["ok"] else "; ".join(rows[:3])


def check_serialized(database: bytes) -> str:
    """"ok", or what ``PRAGMA quick_check`` says is wrong with the serialized ``database``."""
    return quick_check(lambda: sqlite3.connect(":memory:"), lambda copy: copy.deserialize(database))


def check_file(path: Path) -> str:
    """"ok", or what ``PRAGMA quick_check`` says is wrong with the database file at ``path`` (nobody else's)."""
    return quick_check(lambda: sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True))


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
    """Takes a snapshot every ``interval`` seconds when the journal moved, and on :meth:`stop`.

    With ``prune_retention`` (seconds) it also prunes the store after each
    new snapshot (:mod:`lucidlink.meta.prune`), keeping that much history; a
    store that refuses to delete is logged, never fatal.
    """

    def __init__(self, store: MetadataStore, object_store: Any, filespace: str, clock: IReactorTime,
                 interval: float = DEFAULT_SNAPSHOT_INTERVAL, prune_retention: float | None = None) -> None:
        self.store = store
        self.object_store = object_store
        self.filespace = filespace
        self.clock = clock
        self.interval = interval
        self.prune_retention = prune_retention
        self.last_pruned: Any = None
        """The :class:`~lucidlink.meta.prune.Pruned` of the last pruning, if any."""
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
            if self.prune_retention is not None and self._loop.running:  # not at stop: it would only delay it
                yield self._prune()
        return manifest

    @defer.inlineCallbacks
    def _prune(self) -> Any:
        from lucidlink.meta.prune import prune

        try:
            self.last_pruned = yield prune(self.object_store, self.filespace, self.prune_retention,
                                           self.clock.seconds())
        except LucidError as error:
            _log.warn("pruning {filespace} failed: {error}", filespace=self.filespace, error=str(error))


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


def snapshot_object_seq(filespace: str, key: str, suffixes: tuple[str, ...] = (".manifest", ".db.z")) -> int | None:
    """The sequence in the name of a snapshot object (manifest or data) ``key``, or None if it is not one."""
    prefix = snapshot_prefix(filespace)
    if not key.startswith(prefix):
        return None
    name = key[len(prefix):]
    for suffix in suffixes:
        stem = name.removesuffix(suffix)
        if stem != name and len(stem) == SEQ_DIGITS and stem.isdigit():
            return int(stem)
    return None


@defer.inlineCallbacks
def manifests(object_store: Any, filespace: str) -> Any:
    """Every snapshot manifest of ``filespace`` in the store, newest first: ``[(seq, key)]``."""
    infos = yield object_store.list(snapshot_prefix(filespace))
    found = [(seq, info.key) for info in infos if (seq := snapshot_object_seq(filespace, info.key, (".manifest",))) is not None]
    return sorted(found, reverse=True)


@defer.inlineCallbacks
def read_manifest(object_store: Any, filespace: str, key: str) -> Any:
    """The :class:`Manifest` stored at ``key``; fails with IntegrityError if it is not one of ``filespace``."""
    manifest = Manifest.from_bytes((yield object_store.get(key)))
    if manifest.filespace != filespace or manifest_key(filespace, manifest.seq) != key:
        raise IntegrityError(f"manifest {key} describes seq {manifest.seq} of filespace {manifest.filespace!r}")
    return manifest


def database_head(path: Path) -> tuple[int, bytes]:
    """The journal head of the database file at ``path``; IntegrityError if it cannot be read."""
    db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT seq, hash FROM journal ORDER BY seq DESC LIMIT 1").fetchone()
    except sqlite3.Error as error:
        raise IntegrityError(f"the snapshot is not a readable metadata database: {error}") from None
    finally:
        db.close()
    return (row[0], bytes(row[1])) if row else (0, GENESIS_HASH)


@defer.inlineCallbacks
def fetch_snapshot(object_store: Any, filespace: str, manifest: Manifest, path: Path) -> Any:
    """Write the database of the snapshot ``manifest`` describes to ``path``, checking it on the way.

    Fails with IntegrityError (or NotFound) if the data does not match the
    manifest's size and checksum, does not decompress, or its journal does
    not end where the manifest says.
    """
    data = yield object_store.get(snapshot_key(filespace, manifest.seq))
    if len(data) != manifest.size or hashlib.sha256(data).digest() != manifest.sha256:
        raise IntegrityError(f"snapshot at seq {manifest.seq} does not match its manifest")
    _decompress_into(data, path, manifest.seq)
    if database_head(path) != (manifest.seq, manifest.hash):
        raise IntegrityError(f"snapshot at seq {manifest.seq} does not end where its manifest says")
    checked = check_file(path)
    if checked != "ok":
        # Taken from a database already damaged on disk: its checksum is right, its pages are not.
        raise IntegrityError(f"snapshot at seq {manifest.seq} fails quick_check: {checked}")
    return manifest


def _decompress_into(data: bytes, path: Path, seq: int) -> None:
    """Inflate ``data`` into ``path`` a piece at a time, so the whole database is never in memory twice."""
    inflater = zlib.decompressobj()
    view = memoryview(data)
    try:
        with open(path, "wb") as out:
            for start in range(0, len(view), _INFLATE_PIECE):
                out.write(inflater.decompress(view[start:start + _INFLATE_PIECE]))
            out.write(inflater.flush())
    except zlib.error as error:
        raise IntegrityError(f"snapshot at seq {seq} does not decompress: {error}") from None
    if not inflater.eof or inflater.unused_data:
        raise IntegrityError(f"snapshot at seq {seq} is not one whole zlib stream")


@defer.inlineCallbacks
def newest_snapshot(object_store: Any, filespace: str, path: Path, *, to_seq: int | None = None,
                    taken_by_ns: int | None = None) -> Any:
    """Fetch into ``path`` the newest good snapshot at or before ``to_seq`` (taken by ``taken_by_ns``).

    Damaged snapshots are skipped (and logged) for older ones.  Fires with
    its :class:`Manifest`, or None (and ``path`` absent) if there is none.
    """
    for seq, key in (yield manifests(object_store, filespace)):
        if to_seq is not None and seq > to_seq:
            continue
        try:
            manifest = yield read_manifest(object_store, filespace, key)
            if taken_by_ns is not None and manifest.time_ns > taken_by_ns:
                continue
            yield fetch_snapshot(object_store, filespace, manifest, path)
        except (IntegrityError, NotFound) as error:
            _log.warn("skipping snapshot {key}: {error}", key=key, error=str(error))
            continue
        return manifest
    path.unlink(missing_ok=True)
    return None


@defer.inlineCallbacks
def segments_after(object_store: Any, filespace: str, seq: int, to_seq: int | None = None) -> Any:
    """``[(first, last, key)]`` of the segments holding records after ``seq`` (up to ``to_seq``), in order."""
    infos = yield object_store.list(segment_prefix(filespace))
    spans = sorted(
        (span[0], span[1], info.key) for info in infos if (span := parse_segment_key(filespace, info.key)) is not None
    )
    return [span for span in spans if span[1] > seq and (to_seq is None or span[0] <= to_seq)]


class _Prefetch:
    """Gets the objects of ``keys`` in order, ``window`` of them in flight ahead of the reader."""

    def __init__(self, object_store: Any, keys: list[str], window: int = PREFETCH_SEGMENTS) -> None:
        self.object_store = object_store
        self.keys = keys
        self.window = window
        self._pending: list[defer.Deferred[bytes]] = []
        self._next = 0

    def get(self) -> defer.Deferred[bytes]:
        """The next object (in ``keys`` order)."""
        while len(self._pending) < self.window and self._next < len(self.keys):
            self._pending.append(self.object_store.get(self.keys[self._next]))
            self._next += 1
        return self._pending.pop(0)

    def settle(self) -> defer.Deferred[Any]:
        """Fires once the objects still in flight have arrived or failed (both ignored): nothing is left running."""
        pending, self._pending = self._pending, []
        return defer.DeferredList(pending, consumeErrors=True)


def _replay_mode(store: MetadataStore) -> None:
    # A restore builds a scratch file that is renamed into place only once finished, then synced:
    # nothing is gained by syncing every replayed record on the way.
    store._db.execute("PRAGMA synchronous=OFF")


def _seal(store: MetadataStore) -> None:
    """Fold the WAL into the database, check it, and put it on disk."""
    db = store._db
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    rows = [row[0] for row in db.execute("PRAGMA quick_check")]
    if rows != ["ok"]:
        raise IntegrityError(f"the restored database fails quick_check: {'; '.join(rows[:3])}")
    db.execute("PRAGMA synchronous=FULL")
    with open(store.path, "rb+") as database:
        os.fsync(database.fileno())


@defer.inlineCallbacks
def restore(object_store: Any, filespace: str, target_path: Path | str, to_seq: int | None = None,
            clock: IReactorTime | None = None) -> Any:
    """Rebuild the database of ``filespace`` at ``target_path`` (which must not exist) up to ``to_seq``.

    Fires with a :class:`RestoreResult`.  The database is built beside the
    target and renamed into place only once complete (or stopped at the last
    good record), checked (``PRAGMA quick_check``) and synced, so a failed
    restore leaves nothing half-built at the target.
    """
    target = Path(target_path)
    if target.exists():
        raise InvalidArgument(f"{target} exists; restore builds a new database")
    if to_seq is not None and to_seq < 0:
        raise InvalidArgument(f"cannot restore to seq {to_seq}")
    handle, scratch_name = tempfile.mkstemp(prefix=".restoring-", dir=target.parent)
    os.close(handle)
    scratch = Path(scratch_name)
    try:
        manifest = yield newest_snapshot(object_store, filespace, scratch, to_seq=to_seq)
        snapshot_seq = manifest.seq if manifest is not None else None
        store = MetadataStore(scratch, clock or Clock())
        try:
            _replay_mode(store)
            journal = Journal(clock or Clock()).install(store)
            seq, chain, problem = yield _replay(object_store, filespace, journal, to_seq)
            _seal(store)
        finally:
            store.close()
        os.replace(scratch, target)
        fsync_folder(target.parent)
    except BaseException:
        for leftover in (scratch, Path(f"{scratch}-wal"), Path(f"{scratch}-shm")):
            leftover.unlink(missing_ok=True)
        raise
    for leftover in (Path(f"{scratch}-wal"), Path(f"{scratch}-shm")):
        leftover.unlink(missing_ok=True)
    result = RestoreResult(seq, chain, snapshot_seq, not problem, problem)
    _log.info("{filespace}: {summary}", filespace=filespace, summary=result.summary)
    return result


@defer.inlineCallbacks
def catch_up(object_store: Any, filespace: str, path: Path, clock: IReactorTime | None = None) -> Any:
    """Replay onto the sound database at ``path`` every stored record after its journal head.

    For a database whose last commits were lost without damage (a power cut
    under ``synchronous=NORMAL``): the records must chain onto its own head,
    so a database that forked from the stored history is not touched past
    its head.  Fires with ``(seq, problem)``; ``problem`` is "" once the
    database holds everything the store does.
    """
    store = MetadataStore(path, clock or Clock())
    try:
        journal = Journal(clock or Clock()).install(store)
        seq, _, problem = yield _replay(object_store, filespace, journal, None)
        store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        store.close()
    return seq, problem


@defer.inlineCallbacks
def _replay(object_store: Any, filespace: str, journal: Journal, to_seq: int | None) -> Any:
    """Replay every stored record after the journal's head (up to ``to_seq``); fires with (seq, hash, problem)."""
    seq, chain = journal.head()
    problem = ""
    spans = yield segments_after(object_store, filespace, seq, to_seq)
    fetch = _Prefetch(object_store, [key for _, _, key in spans])
    try:
        for first, last, key in spans:
            if to_seq is not None and seq >= to_seq:
                break
            try:
                data = yield fetch.get()
            except LucidError as error:
                problem = f"cannot read {key}: {error}"
                break
            if last <= seq:
                continue
            if first > seq + 1:
                problem = f"no segment holds seq {seq + 1} (the next one, {key}, starts at {first})"
                break
            salvage = salvage_segment(data, seq, chain)
            seq, chain = _replay_entries(journal, salvage.entries, to_seq, seq, chain)
            if salvage.problem:
                problem = f"{key} is damaged ({salvage.problem}); the last good record is seq {seq}"
                break
    finally:
        yield fetch.settle()
    if to_seq is not None and seq < to_seq and not problem:
        problem = f"the journal ends at seq {seq}, before seq {to_seq}"
    return seq, chain, problem


def _replay_entries(journal: Journal, entries: list[Entry], to_seq: int | None, seq: int,
                    chain: bytes) -> tuple[int, bytes]:
    """Replay ``entries`` (up to ``to_seq``) in one transaction: one commit a segment, not one a record."""
    db = journal.store._db  # type: ignore[union-attr]
    db.execute("BEGIN IMMEDIATE")
    try:
        for entry in entries:
            if to_seq is not None and entry.seq > to_seq:
                break
            journal.replay(entry)
            seq, chain = entry.seq, entry.hash
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    return seq, chain


@defer.inlineCallbacks
def seq_at_time(object_store: Any, filespace: str, time_ns: int) -> Any:
    """The last journal record written at or before ``time_ns``; fires with its seq (0: none).

    Starts from the newest snapshot taken by then (its records are all
    older) and reads the later segments until the first record written
    later, or a damaged or missing segment (a restore stops there anyway).
    :raise InvalidArgument: if the store no longer holds that moment
        (pruned: before the retention window).
    """
    seq, chain = 0, GENESIS_HASH
    for _, key in (yield manifests(object_store, filespace)):
        try:
            manifest = yield read_manifest(object_store, filespace, key)
        except (IntegrityError, NotFound):
            continue
        if manifest.time_ns <= time_ns:
            seq, chain = manifest.seq, manifest.hash
            break
    spans = yield segments_after(object_store, filespace, seq)
    if seq == 0 and spans and spans[0][0] > 1:
        raise InvalidArgument(f"the store holds no snapshot taken by then and its journal starts at seq "
                              f"{spans[0][0]}: that moment is before the retention window")
    for first, _, key in spans:
        if first > seq + 1:
            break
        salvage = salvage_segment((yield object_store.get(key)), seq, chain)
        for entry in salvage.entries:
            if entry.time_ns > time_ns:
                return seq
            seq, chain = entry.seq, entry.hash
        if salvage.problem:
            break
    return seq
