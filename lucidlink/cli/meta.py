"""
``lucid-meta``: the metadata operator's command line — verify and restore.

``lucid-meta verify --filespace X --config F`` checks one filespace and
prints one finding a line: the local database (``PRAGMA quick_check``, its
journal's hash chain), the journal in the object store (every segment parses
and chains onto the one before, without gaps; the newest snapshot matches its
manifest and checksum) and whether the local head equals, trails or is ahead
of the store's.  ``lucid-meta restore`` rebuilds a data folder's database from
the store (:func:`lucidlink.meta.snapshots.restore`), to its head or to a
sequence or a moment (``--to-seq``, ``--to-time``), refusing while a server
runs on the folder and keeping any database it replaces beside it.
``lucid-meta restore-all`` finds every filespace in the store and restores
each into its data folder, several at a time, and ends with a table.
``lucid-meta prune`` deletes the segments and snapshots older than the
retention period that no restore in it needs (:mod:`lucidlink.meta.prune`),
run with the store credential that may delete; ``lucid-meta gc`` deletes,
with the same credential, the chunk objects no chunk map and no moment of the
retention window needs (:mod:`lucidlink.meta.chunk_gc`).

Only ``data_dir``, ``store`` and ``retention`` of the ``[meta]`` section are read, with the
same rules as the server (:mod:`lucidlink.meta.config`): restoring needs
neither listen addresses nor certificates, which may not be back yet when a
machine is rebuilt, and one shared config serves every filespace.

Each command is a function of the reactor (:func:`run`) that tests drive on
trial's reactor; :func:`main` runs it on the process's reactor.  Failures end
with one line on stderr, ``lucid-meta: <what went wrong>``, and exit 1.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from twisted.internet import defer

from lucidlink.errors import Busy, LucidError
from lucidlink.inifile import read_section
from lucidlink.meta.chunk_gc import DEFAULT_GRACE
from lucidlink.meta.config import DEFAULT_DATA_ROOT, DEFAULT_RETENTION, SECTION, ConfigError, parse_duration
from lucidlink.meta.guardian import DATABASE_NAME, Restored, install_restored, quick_check, read_only
from lucidlink.meta.journal import GENESIS_HASH, ChainError, Entry, verify_chain
from lucidlink.meta.segments import (
    SegmentError,
    parse_segment,
    parse_segment_key,
    segment_prefix,
)
from lucidlink.meta.snapshots import Manifest, fetch_snapshot, read_manifest, seq_at_time, snapshot_prefix

PROG = "lucid-meta"
PIDFILE_NAME = "twistd.pid"
_NAME_CHARACTERS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-")


class CommandFailed(LucidError):
    """The command ran but what it found or did is not all well; the message says what."""


# -- configuration --------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """What ``lucid-meta`` needs of a lucid-meta.ini: where data folders are, and the object store."""

    path: Path
    data_dir_text: str
    """The raw ``data_dir`` value ("" when unset)."""
    store: str | None
    retention: float = DEFAULT_RETENTION
    """The ``retention`` key: seconds of history ``prune`` keeps."""

    @classmethod
    def load(cls, path: Path | str, store: str | None = None) -> Settings:
        path = Path(path)
        section = read_section(path, SECTION, ConfigError)
        url = store or section.get("store", "").strip() or None
        if url is None:
            raise ConfigError(f"{path}: [{SECTION}] store: missing; the object store to restore from is needed "
                              "(or give --store URL)")
        if "://" not in url:
            raise ConfigError(f"{path}: [{SECTION}] store: {url!r} is not an object store URL")
        retention = DEFAULT_RETENTION
        if section.get("retention", "").strip():
            try:
                retention = parse_duration(section["retention"])
            except ValueError as error:
                raise ConfigError(f"{path}: [{SECTION}] retention: {error}") from None
        return cls(path, section.get("data_dir", "").strip(), url, retention)

    @property
    def per_filespace(self) -> bool:
        """Whether each filespace gets its own data folder (``{filespace}`` in data_dir, or the default)."""
        return not self.data_dir_text or "{filespace}" in self.data_dir_text

    def data_dir(self, filespace: str, override: str | None = None) -> Path:
        if override:
            return Path(override).expanduser().resolve()
        if not self.data_dir_text:
            return DEFAULT_DATA_ROOT / filespace
        text = self.data_dir_text.replace("{filespace}", filespace)
        return (self.path.parent / Path(text).expanduser()).resolve()


def check_filespace(name: str) -> str:
    """``name`` if it is a valid filespace name (the rule of the server's config), else ConfigError."""
    if not (0 < len(name) <= 63 and set(name) <= _NAME_CHARACTERS and name[0] != "-" and name[-1] != "-"):
        raise ConfigError(f"filespace name {name!r} must be 1 to 63 lower-case letters, digits and inner hyphens")
    return name


# -- the local data folder --------------------------------------------------------


def running_server(data_dir: Path) -> str | None:
    """Why a server seems to run on ``data_dir`` (a live pid in twistd.pid, a locked database), or None."""
    pidfile = data_dir / PIDFILE_NAME
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        pid = None
    if pid is not None and pid > 0:
        try:
            os.kill(pid, 0)
            return f"process {pid} in {pidfile} is running"
        except PermissionError:
            return f"process {pid} in {pidfile} is running"
        except ProcessLookupError:
            pass
    database = data_dir / DATABASE_NAME
    if database.exists():
        # In WAL mode every open connection holds a shared lock, so an exclusive one fails while a server has it open.
        db = sqlite3.connect(str(database), timeout=0, isolation_level=None)
        try:
            db.execute("PRAGMA locking_mode=EXCLUSIVE")
            db.execute("BEGIN EXCLUSIVE")
            db.execute("ROLLBACK")
        except sqlite3.OperationalError as error:
            if "locked" in str(error) or "busy" in str(error):
                return f"{database} is in use (locked)"
        except sqlite3.DatabaseError:
            pass
        finally:
            db.close()
    return None


def local_journal(database: Path) -> tuple[int, bytes]:
    """Verify the whole journal chain of ``database``; its head.  Raises ChainError or sqlite3.Error."""
    db = read_only(database)
    try:
        rows = db.execute("SELECT seq, time_ns, record, hash FROM journal ORDER BY seq")
        return verify_chain((Entry(s, t, bytes(r), bytes(h)) for s, t, r, h in rows), GENESIS_HASH, 0)
    finally:
        db.close()


def local_hash_at(database: Path, seq: int) -> bytes | None:
    if seq == 0:
        return GENESIS_HASH
    db = read_only(database)
    try:
        row = db.execute("SELECT hash FROM journal WHERE seq = ?", (seq,)).fetchone()
    finally:
        db.close()
    return bytes(row[0]) if row else None


# -- verify -----------------------------------------------------------------------


@dataclass
class Report:
    """What verify found: one ``(ok, text)`` a finding."""

    filespace: str
    findings: list[tuple[bool, str]] = field(default_factory=list)

    def ok(self, text: str) -> None:
        self.findings.append((True, text))

    def problem(self, text: str) -> None:
        self.findings.append((False, text))

    @property
    def problems(self) -> list[str]:
        return [text for ok, text in self.findings if not ok]

    def lines(self) -> list[str]:
        return [f"{'ok' if ok else 'PROBLEM'}: {text}" for ok, text in self.findings]


@defer.inlineCallbacks
def _check_snapshot(object_store: Any, filespace: str, key: str) -> Any:
    """The Manifest of the snapshot whose manifest is ``key``, checked as a restore checks it; LucidError if not."""
    with tempfile.TemporaryDirectory(prefix="lucid-verify-") as scratch:
        manifest = yield read_manifest(object_store, filespace, key)
        yield fetch_snapshot(object_store, filespace, manifest, Path(scratch) / "snapshot.sqlite3")
    return manifest


@defer.inlineCallbacks
def verify_filespace(object_store: Any, filespace: str, data_dir: Path) -> Any:
    """Check the local database and the store's journal of ``filespace``; fires with a :class:`Report`."""
    report = Report(filespace)
    database = data_dir / DATABASE_NAME
    local: tuple[int, bytes] | None = None
    if not database.exists():
        report.problem(f"local: no database at {database}")
    else:
        checked = quick_check(database)
        if checked == "ok":
            report.ok(f"local: {database} passes quick_check")
            try:
                local = local_journal(database)
                report.ok(f"local: journal chain verifies from seq 1 to {local[0]}")
            except ChainError as error:
                report.problem(f"local: journal {error}")
            except sqlite3.Error as error:
                report.problem(f"local: cannot read the journal: {error}")
        else:
            report.problem(f"local: {database} fails quick_check: {checked}")

    # Snapshots: the newest must match its manifest; the newest good one anchors the chain.
    snapshot: Manifest | None = None
    infos = yield object_store.list(snapshot_prefix(filespace))
    manifests = sorted((info.key for info in infos if info.key.endswith(".manifest")), reverse=True)
    for index, key in enumerate(manifests):
        try:
            snapshot = yield _check_snapshot(object_store, filespace, key)
        except LucidError as error:
            report.problem(f"store: snapshot {key}: {error}")
            continue
        assert snapshot is not None
        newest = "newest snapshot" if index == 0 else "newest good snapshot"
        report.ok(f"store: {newest} at seq {snapshot.seq} matches its manifest and checksum")
        break
    if not manifests:
        report.ok("store: no snapshots (a restore replays the whole journal)")

    # Segments: each parses, and each chains onto the one before, without gaps.
    wanted = {seq for seq in (local[0] if local else None, snapshot.seq if snapshot else None) if seq is not None}
    seen: dict[int, bytes] = {}
    infos = yield object_store.list(segment_prefix(filespace))
    spans = sorted((span, info.key) for info in infos if (span := parse_segment_key(filespace, info.key)))
    head: tuple[int, bytes] | None = None
    start: int | None = None
    broken = False
    bad_segments = 0
    for (first, last), key in spans:
        try:
            segment = parse_segment((yield object_store.get(key)))
        except (SegmentError, LucidError) as error:
            report.problem(f"store: segment {key} is damaged: {error}")
            broken, bad_segments = True, bad_segments + 1
            continue
        if (segment.first_seq, segment.last_seq) != (first, last):
            report.problem(f"store: segment {key} holds seq {segment.first_seq} to {segment.last_seq}, not what "
                           "its name says")
            broken, bad_segments = True, bad_segments + 1
            continue
        if broken:
            continue
        if head is None:
            start, head = first, (first - 1, segment.prev_hash)
            seen[first - 1] = segment.prev_hash
            if first == 1 and segment.prev_hash != GENESIS_HASH:
                report.problem(f"store: segment {key} starts at seq 1 but not from the genesis hash")
                broken = True
                continue
        elif first > head[0] + 1:
            report.problem(f"store: no segment holds seq {head[0] + 1} (the next one, {key}, starts at {first})")
            broken = True
            continue
        else:
            known = {first - 1: segment.prev_hash, **{entry.seq: entry.hash for entry in segment.entries}}
            if known.get(head[0]) != head[1]:
                report.problem(f"store: segment {key} does not chain onto seq {head[0]}")
                broken = True
                continue
        for entry in segment.entries:
            if entry.seq in wanted:
                seen[entry.seq] = entry.hash
        if last > head[0]:
            head = (last, segment.entries[-1].hash)
    if head is not None and start is not None:
        if not broken:
            report.ok(f"store: {len(spans)} segments hold seq {start} to {head[0]}; each parses and they chain "
                      "without gaps")
        elif not bad_segments:
            pass  # the gap or mismatch is already named
        else:
            report.problem(f"store: the verified journal ends at seq {head[0]}")
        if start > 1 and (snapshot is None or snapshot.seq < start - 1):
            report.problem(f"store: segments start at seq {start} and no good snapshot reaches back to seq "
                           f"{start - 1}: the store cannot be restored in full")
    elif bad_segments:
        report.problem("store: the journal cannot be verified from its first segment")
    elif snapshot is None:
        report.problem(f"store: holds no journal segments and no snapshots of {filespace}")
    if snapshot is not None and snapshot.seq in seen and seen[snapshot.seq] != snapshot.hash:
        report.problem(f"store: the snapshot at seq {snapshot.seq} disagrees with the journal's hash there")

    store_head = head
    if snapshot is not None and (store_head is None or snapshot.seq > store_head[0]):
        store_head = (snapshot.seq, snapshot.hash)
        seen[snapshot.seq] = snapshot.hash
    if local is not None and store_head is not None:
        _compare_heads(report, database, local, store_head, seen)
        if broken:
            report.problem(f"head: compared with seq {store_head[0]}, where the store's verified journal ends")
    return report


def _compare_heads(report: Report, database: Path, local: tuple[int, bytes], store: tuple[int, bytes],
                   seen: dict[int, bytes]) -> None:
    (local_seq, local_hash), (store_seq, store_hash) = local, store
    if local_seq == store_seq:
        if local_hash == store_hash:
            report.ok(f"head: the local database and the store are both at seq {local_seq} with the same hash")
        else:
            report.problem(f"head: both at seq {local_seq} but the hashes differ: the histories diverged")
    elif local_seq < store_seq:
        there = GENESIS_HASH if local_seq == 0 else seen.get(local_seq)
        if there is not None and there != local_hash:
            report.problem(f"head: the local database (seq {local_seq}) diverged from the store (seq {store_seq})")
        else:
            report.problem(f"head: the local database trails the store: local seq {local_seq}, store seq "
                           f"{store_seq} ({store_seq - local_seq} records behind)")
    else:
        if local_hash_at(database, store_seq) != store_hash:
            report.problem(f"head: the local database (seq {local_seq}) diverged from the store (seq {store_seq})")
        else:
            report.ok(f"head: the local database is ahead of the store: local seq {local_seq}, store seq "
                      f"{store_seq} ({local_seq - store_seq} records not shipped yet)")


# -- restore ----------------------------------------------------------------------


@defer.inlineCallbacks
def restore_filespace(reactor: Any, object_store: Any, filespace: str, data_dir: Path,
                      to_seq: int | None = None, force: bool = False) -> Any:
    """Rebuild ``data_dir``'s database of ``filespace`` from the store; fires with :class:`Restored`.

    Refuses (Busy) while a server runs on ``data_dir`` (checked again before
    the new database goes in), and (CommandFailed) to replace a healthy
    database unless ``force``.  The new
    database is built beside the old one, which is then moved aside as
    ``metadata.sqlite3.before-restore-<time>`` (with its -wal and -shm).
    A restore stopped at a damaged segment still installs what it rebuilt;
    ``error`` says where it stopped.
    """
    running = running_server(data_dir)
    if running is not None:
        raise Busy(f"{filespace}: a server is running on {data_dir} ({running}); stop it first")
    database = data_dir / DATABASE_NAME
    if database.exists() and not force:
        checked = quick_check(database)
        if checked == "ok":
            raise CommandFailed(f"{filespace}: {database} exists and passes quick_check; give --force to replace "
                                "it (it is kept beside as metadata.sqlite3.before-restore-<time>)")

    def still_stopped() -> None:
        running = running_server(data_dir)
        if running is not None:
            raise Busy(f"{filespace}: a server started on {data_dir} during the restore ({running}); "
                       "nothing was replaced")

    done = yield install_restored(reactor, object_store, filespace, data_dir, to_seq, before_install=still_stopped)
    return done


@defer.inlineCallbacks
def filespaces_in(object_store: Any) -> Any:
    """The names of the filespaces with journal segments or snapshots in the store, sorted."""
    names = set()
    for info in (yield object_store.list("")):
        parts = info.key.split("/")
        if len(parts) >= 3 and parts[1] in ("journal", "snapshots"):
            try:
                names.add(check_filespace(parts[0]))
            except ConfigError:
                continue
    return sorted(names)


@defer.inlineCallbacks
def restore_all(reactor: Any, object_store: Any, settings: Settings, parallel: int, force: bool = False,
                progress: TextIO | None = None, only: Sequence[str] = ()) -> Any:
    """Restore every filespace found in the store (or those of ``only``), ``parallel`` at a time.

    Fires with a list of :class:`Restored`, one per filespace, in name order.
    """
    if not settings.per_filespace:
        raise ConfigError(f"{settings.path}: [{SECTION}] data_dir = {settings.data_dir_text} names one folder for "
                          "every filespace; restore-all needs {filespace} in it (data_dir = /var/lib/lucidlink/meta/"
                          "{filespace})")
    names = yield filespaces_in(object_store)
    if not names:
        raise CommandFailed("the object store holds no journal segments or snapshots of any filespace")
    if only:
        missing = sorted(set(only) - set(names))
        if missing:
            raise CommandFailed("the object store holds no journal segments or snapshots of "
                                + ", ".join(missing))
        names = sorted(set(only))
    from tqdm import tqdm

    bar = tqdm(total=len(names), unit="filespace", file=progress or sys.stderr,
               disable=progress is None or not progress.isatty())
    semaphore = defer.DeferredSemaphore(max(1, parallel))

    @defer.inlineCallbacks
    def one(name: str) -> Any:
        started = reactor.seconds()
        try:
            done = yield restore_filespace(reactor, object_store, name, settings.data_dir(name), force=force)
        except Exception as error:  # one filespace's failure must not stop the others
            text = str(error) or type(error).__name__
            done = Restored(name, seconds=reactor.seconds() - started,
                            error=text.removeprefix(f"{name}: "))
        bar.update(1)
        bar.set_postfix_str(name)
        return done

    try:
        results = yield defer.gatherResults([semaphore.run(one, name) for name in names], consumeErrors=True)
    finally:
        bar.close()
    return results


def summary_table(results: Sequence[Restored]) -> str:
    """The table restore-all ends with: filespace, sequence reached, entries, seconds, errors."""
    rows = [("FILESPACE", "SEQ", "ENTRIES", "SECONDS", "ERROR")]
    for r in results:
        rows.append((r.filespace, "-" if r.seq is None else str(r.seq), "-" if r.entries is None else str(r.entries),
                     f"{r.seconds:.2f}", r.error or "-"))
    widths = [max(len(row[column]) for row in rows) for column in range(4)]
    return "\n".join(
        "  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(row[:4]))
        + "  " + row[4]
        for row in rows
    )


# -- the command line ---------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The parser of every ``lucid-meta`` subcommand."""
    parser = argparse.ArgumentParser(prog=PROG, description="Verify and restore lucidlink metadata servers' data.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def deleting(sub: argparse.ArgumentParser, verb: str, retention: str) -> None:
        common(sub, filespace=False)
        sub.add_argument("--filespace", "-f", action="append", type=_filespace, default=[], metavar="NAME",
                         help=f"{verb} this filespace (repeatable; default: every one in the store)")
        sub.add_argument("--retention", type=_duration, metavar="DURATION",
                         help=f"{retention} (default: the config's retention, or 7d)")
        sub.add_argument("--dry-run", "-n", action="store_true", help="say what would be deleted; delete nothing")

    def common(sub: argparse.ArgumentParser, filespace: bool = True) -> None:
        if filespace:
            sub.add_argument("--filespace", "-f", required=True, type=_filespace, metavar="NAME")
            sub.add_argument("--data-dir", "-d", metavar="DIR", help="the data folder, instead of the config's data_dir")
        sub.add_argument("--config", "-c", required=True, type=Path, metavar="FILE",
                         help="the metadata server's config (its data_dir and store are used)")
        sub.add_argument("--store", metavar="URL", help="the object store, instead of the config's store")

    verify = commands.add_parser("verify", help="check a filespace's local database and its journal in the store",
                                 description="Check the local database, the journal and snapshots in the object "
                                             "store, and how their heads compare; one finding a line.")
    common(verify)
    restore_parser = commands.add_parser(
        "restore", help="rebuild a filespace's database from the object store",
        description="Rebuild the data folder's database from the newest snapshot and the journal segments.")
    common(restore_parser)
    target = restore_parser.add_mutually_exclusive_group()
    target.add_argument("--to-seq", type=_sequence, metavar="N", help="stop after journal record N")
    target.add_argument("--to-time", type=_time_ns, metavar="T",
                        help="stop after the last record written at or before T (ISO 8601, such as "
                             "2026-11-26T09:30:00Z; UTC when no zone is given)")
    restore_parser.add_argument("--force", action="store_true",
                                help="replace an existing healthy database (kept beside as *.before-restore-<time>)")
    everything = commands.add_parser(
        "restore-all", help="restore every filespace found in the object store",
        description="Restore every filespace with journal segments or snapshots in the store into its data "
                    "folder (the config's data_dir must name {filespace}), several at a time.")
    common(everything, filespace=False)
    everything.add_argument("--parallel", "-j", type=_sequence, default=os.cpu_count() or 1, metavar="N",
                            help="restore N filespaces at a time (default: the number of CPUs)")
    everything.add_argument("--force", action="store_true", help="replace existing healthy databases")
    everything.add_argument("--only", action="append", type=_filespace, default=[], metavar="NAME",
                            help="restore this filespace only (repeatable; default: every one in the store)")
    pruning = commands.add_parser(
        "prune", help="delete journal segments and snapshots older than the retention period",
        description="Delete the segments and snapshots of each filespace that no point in the retention window "
                    "needs (never the newest good snapshot nor the records after it); run it with the object "
                    "store credential that may delete.")
    deleting(pruning, "prune", "keep this much history, such as 7d or 36h")
    collecting = commands.add_parser(
        "gc", help="delete chunk objects no chunk map needs",
        description="Rebuild each filespace from the object store and delete the chunk objects that no chunk map "
                    "names, that no moment of the retention window needs, and that are older than the grace "
                    "period; run it with the object store credential that may delete.")
    deleting(collecting, "collect", "keep what restores this far back need, such as 7d")
    collecting.add_argument("--grace", type=_duration, default=DEFAULT_GRACE, metavar="DURATION",
                            help="keep uploads younger than this that no chunk map names yet, at least 1h "
                                 "(default: 7d)")
    return parser


def _duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _filespace(text: str) -> str:
    try:
        return check_filespace(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _time_ns(text: str) -> int:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 time such as 2026-11-26T09:30:00Z") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp()) * 1_000_000_000 + moment.microsecond * 1000


def _sequence(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, not {value}")
    return value


@defer.inlineCallbacks
def _command(reactor: Any, args: argparse.Namespace, out: TextIO, err: TextIO) -> Any:
    settings = Settings.load(args.config, args.store)
    from lucidlink.objectstore import open_store

    assert settings.store is not None
    object_store = open_store(settings.store, reactor)
    try:
        if args.command == "verify":
            data_dir = settings.data_dir(args.filespace, args.data_dir)
            report = yield verify_filespace(object_store, args.filespace, data_dir)
            for line in report.lines():
                print(line, file=out)
            if report.problems:
                count = len(report.problems)
                raise CommandFailed(f"{args.filespace}: {count} problem{'s' if count > 1 else ''} found")
            print(f"{args.filespace}: all is well", file=out)
        elif args.command == "restore":
            data_dir = settings.data_dir(args.filespace, args.data_dir)
            to_seq = args.to_seq
            if args.to_time is not None:
                to_seq = yield seq_at_time(object_store, args.filespace, args.to_time)
                if to_seq == 0:
                    raise CommandFailed(f"{args.filespace}: no journal record was written at or before "
                                        f"{_iso(args.to_time)}")
                print(f"{args.filespace}: the last record written at or before {_iso(args.to_time)} is seq {to_seq}",
                      file=out)
            done = yield restore_filespace(reactor, object_store, args.filespace, data_dir, to_seq, args.force)
            _print_restored(done, out)
            if done.error:
                raise CommandFailed(f"{args.filespace}: the restore {done.error}")
        elif args.command == "prune":
            yield _prune(reactor, object_store, settings, args, out)
        elif args.command == "gc":
            yield _collect(reactor, object_store, settings, args, out)
        else:
            results = yield restore_all(reactor, object_store, settings, args.parallel, args.force, err, args.only)
            print(summary_table(results), file=out)
            failed = [r.filespace for r in results if r.error]
            if failed:
                raise CommandFailed(f"{len(failed)} of {len(results)} filespaces did not restore fully: "
                                    + ", ".join(failed))
            print(f"restored {len(results)} filespaces", file=out)
    finally:
        yield object_store.close()
    return 0


def _prune(reactor: Any, object_store: Any, settings: Settings, args: argparse.Namespace, out: TextIO) -> Any:
    from lucidlink.meta.prune import prune

    def one(name: str, retention: float) -> Any:
        return prune(object_store, name, retention, reactor.seconds(), dry_run=args.dry_run)

    return _delete_unneeded(object_store, settings, args, out, one, "pruned")


def _collect(reactor: Any, object_store: Any, settings: Settings, args: argparse.Namespace, out: TextIO) -> Any:
    from lucidlink.meta.chunk_gc import collect

    def one(name: str, retention: float) -> Any:
        return collect(object_store, name, retention, reactor.seconds(), args.grace, dry_run=args.dry_run)

    return _delete_unneeded(object_store, settings, args, out, one, "collected")


@defer.inlineCallbacks
def _delete_unneeded(object_store: Any, settings: Settings, args: argparse.Namespace, out: TextIO,
                     one: Callable[[str, float], Any], done_word: str) -> Any:
    """Run ``one(filespace, retention)`` (a prune or a collection) for each filespace asked for, and report."""
    names = args.filespace or (yield filespaces_in(object_store))
    retention = args.retention or settings.retention
    failed = []
    for name in names:
        done = yield one(name, retention)
        print(f"would delete: {done.plan.summary}" if args.dry_run and done.plan.keys else done.summary, file=out)
        if args.dry_run:
            for key in done.plan.keys:
                print(f"  {key}", file=out)
        if done.error or done.plan.damaged:
            failed.append(f"{name} ({done.error or done.plan.kept})")
    if failed:
        raise CommandFailed(f"{len(failed)} of {len(names)} filespaces not {done_word}: " + "; ".join(failed))


def _iso(time_ns: int) -> str:
    return datetime.fromtimestamp(time_ns / 1e9, UTC).isoformat().replace("+00:00", "Z")


def _print_restored(done: Restored, out: TextIO) -> None:
    print(done.summary, file=out)
    print(f"{done.filespace}: {done.entries} entries in {done.seconds:.2f} s", file=out)
    if done.kept is not None:
        print(f"{done.filespace}: the previous database is kept as {done.kept}", file=out)


@defer.inlineCallbacks
def run(reactor: Any, argv: Sequence[str], out: TextIO | None = None, err: TextIO | None = None) -> Any:
    """Run ``lucid-meta argv`` on ``reactor``; fires with the exit status (failures reported on ``err``)."""
    out = out or sys.stdout
    err = err or sys.stderr
    args = build_parser().parse_args(list(argv))
    try:
        status = yield _command(reactor, args, out, err)
    except (LucidError, ConfigError, sqlite3.Error) as error:
        print(f"{PROG}: {error}", file=err)
        return 1
    except OSError as error:
        where = f": {error.filename}" if error.filename else ""
        print(f"{PROG}: {error.strerror or error}{where}", file=err)
        return 1
    return status


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``lucid-meta`` with ``argv`` (default: the process arguments) on the process's reactor."""
    from lucidlink.cli.runner import run_on_reactor

    arguments = list(sys.argv[1:] if argv is None else argv)
    build_parser().parse_args(arguments)  # usage errors before the reactor starts
    try:
        return int(run_on_reactor(lambda reactor: run(reactor, arguments)))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

