"""
Keeping a metadata server honest about its database: health checks, the
``restoring`` state, and automatic restore.

The checks (:func:`check_database`) look at the database file from the
outside, with a connection of their own, so that what the server's own
connection keeps in its page cache cannot hide damage on the disk: the file
is there, SQLite can open it (its header is sound) and its length is a
whole number of pages, ``PRAGMA quick_check`` passes, and the journal's
head can be read.  They touch the file only through SQLite (see
:func:`check_database`).
:func:`store_head` says how far the object store's journal reaches; a local
head behind it means the disk lost acknowledged changes.

:class:`Guardian` runs those checks when the server starts and every
``check_interval`` seconds, and at once when a request meets an SQLite
error.  On damage it puts the server into ``restoring`` (discovery and the
connected clients are told; :class:`Gate` answers every request with the
retryable ``Restoring``), rebuilds the database from the newest valid
snapshot plus every later segment (:func:`install_restored`, which
``lucid-meta restore`` uses too), checks the result and serves again.  With
``auto_restore = false`` it stays in ``restoring`` and logs the command an
operator runs.  A restore that stops early at a damaged segment is not
served either: serving it would write new records over the history the
store still holds, so an operator decides (the log line says where it
stopped and what to run).

The guardian never owns the database: the server opens and closes it
through the two callbacks of :class:`DatabaseOwner`.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from twisted.internet import defer, task, threads
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lucidlink.errors import LucidError, Restoring, UnknownFilespace
from lucidlink.meta.config import DEFAULT_CHECK_INTERVAL
from lucidlink.meta.segments import parse_segment_key, segment_prefix
from lucidlink.meta.snapshots import RestoreResult, catch_up, restore, snapshot_prefix
from lucidlink.meta.snapshots import quick_check as snapshots_quick_check
from lucidlink.protocol import messages as w
from lucidlink.protocol.connection import IResponder, ServerConnection
from lucidlink.protocol.messages import ServerStatus

DATABASE_NAME = "metadata.sqlite3"
RESTORING_RETRY_MS = 500
"""What clients are told to wait before asking again while the server restores."""
SECOND_LOOK_DELAY = 0.2
"""Seconds between a failed check and the second one that confirms the damage."""

_log = Logger()


# -- the checks ---------------------------------------------------------------------


@dataclass(frozen=True)
class Health:
    """What :func:`check_database` found: ``problem`` is empty when the database is healthy."""

    problem: str = ""
    head: int = 0
    """The journal's last sequence (0 for none) when healthy."""
    missing: bool = False

    @property
    def ok(self) -> bool:
        return not self.problem


def read_only(database: Path) -> sqlite3.Connection:
    """A connection of its own to ``database`` that never creates it and never writes.

    Opened read-write (``mode=rw``) with ``query_only`` on rather than
    ``mode=ro``: a read-only connection to a WAL database that another
    process writes can fail with "disk I/O error" when it cannot take the
    locks the wal-index needs, which would look like damage.
    """
    db = sqlite3.connect(f"{database.absolute().as_uri()}?mode=rw", uri=True, isolation_level=None)
    db.execute("PRAGMA query_only = ON")
    return db


def quick_check(database: Path) -> str:
    """"ok", or what ``PRAGMA quick_check`` (or opening) says is wrong with ``database``."""
    return snapshots_quick_check(lambda: read_only(database))


def size_problem(database: Path) -> str:
    """What is wrong with the file's length for its page size ("" when nothing is, or it cannot be told)."""
    size = database.stat().st_size
    if size == 0:
        return f"{database} is empty (truncated to 0 bytes)"
    try:
        db = read_only(database)
        try:
            page_size = int(db.execute("PRAGMA page_size").fetchone()[0])
        finally:
            db.close()
    except sqlite3.Error as error:
        return f"{database} cannot be opened: {error}"
    if size % page_size:
        return f"{database} is truncated: {size} bytes is not a whole number of {page_size}-byte pages"
    return ""


def local_head(database: Path) -> int:
    """The last journal sequence in ``database`` (0 for an empty journal); raises sqlite3.Error."""
    db = read_only(database)
    try:
        row = db.execute("SELECT seq FROM journal ORDER BY seq DESC LIMIT 1").fetchone()
    finally:
        db.close()
    return int(row[0]) if row else 0


def check_database(database: Path) -> Health:
    """Check ``database`` from the outside: present, a sound header, ``quick_check``, a readable journal head."""
    # Never open the file other than through SQLite: closing any descriptor of it would drop the POSIX locks
    # the server's own connection holds, and another process could then delete its write-ahead log.
    if not database.exists():
        return Health(f"no database at {database}", missing=True)
    try:
        problem = size_problem(database)
    except OSError as error:
        return Health(f"cannot look at {database}: {error.strerror or error}")
    if problem:
        return Health(problem)
    checked = quick_check(database)
    if checked != "ok":
        return Health(f"{database} fails quick_check: {checked}")
    try:
        head = local_head(database)
    except sqlite3.Error as error:
        return Health(f"cannot read the journal of {database}: {error}")
    return Health(head=head)


@defer.inlineCallbacks
def store_head(object_store: Any, filespace: str) -> Any:
    """Fire with the last sequence the object store holds of ``filespace`` (segments and snapshots; 0: none)."""
    head = 0
    for info in (yield object_store.list(segment_prefix(filespace))):
        span = parse_segment_key(filespace, info.key)
        if span is not None:
            head = max(head, span[1])
    for info in (yield object_store.list(snapshot_prefix(filespace))):
        name = info.key.rsplit("/", 1)[-1]
        if name.endswith(".manifest") and name[: -len(".manifest")].isdigit():
            head = max(head, int(name[: -len(".manifest")]))
    return head


def count_inodes(database: Path) -> int:
    """How many inodes ``database`` holds."""
    db = read_only(database)
    try:
        return int(db.execute("SELECT count(*) FROM inodes").fetchone()[0])
    finally:
        db.close()


# -- restore into a data folder -------------------------------------------------------


@dataclass(frozen=True)
class Restored:
    """What one filespace's restore did."""

    filespace: str
    seq: int | None = None
    entries: int | None = None
    seconds: float = 0.0
    error: str = ""
    summary: str = ""
    kept: Path | None = None
    result: RestoreResult | None = None


@defer.inlineCallbacks
def install_restored(reactor: Any, object_store: Any, filespace: str, data_dir: Path, to_seq: int | None = None,
                     before_install: Callable[[], None] | None = None) -> Any:
    """Rebuild ``data_dir``'s database of ``filespace`` from the store and put it in place; fires with :class:`Restored`.

    The new database is built beside the old one; ``before_install`` (if
    given) may raise to keep the old one.  The old database, if any, is then
    moved aside as ``metadata.sqlite3.before-restore-<time>`` (with its -wal
    and -shm), never overwriting one kept earlier.  A restore stopped at a
    damaged segment still installs what it rebuilt; ``error`` says where it
    stopped.
    """
    started = reactor.seconds()
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    database = data_dir / DATABASE_NAME
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(reactor.seconds()))
    scratch = data_dir / f".{DATABASE_NAME}.restoring-{stamp}"
    for leftover in (scratch, Path(f"{scratch}-wal"), Path(f"{scratch}-shm")):
        leftover.unlink(missing_ok=True)
    result = yield restore(object_store, filespace, scratch, to_seq=to_seq, clock=reactor)
    kept = None
    try:
        if before_install is not None:
            before_install()
        if any(Path(f"{database}{suffix}").exists() for suffix in ("", "-wal", "-shm")):
            kept = data_dir / f"{DATABASE_NAME}.before-restore-{stamp}"
            count = 1
            while kept.exists():
                count += 1
                kept = data_dir / f"{DATABASE_NAME}.before-restore-{stamp}-{count}"
            for suffix in ("", "-wal", "-shm"):
                old = Path(f"{database}{suffix}")
                if old.exists():
                    os.replace(old, f"{kept}{suffix}")
        os.replace(scratch, database)
    except BaseException:
        scratch.unlink(missing_ok=True)
        raise
    return Restored(filespace, result.seq, count_inodes(database), reactor.seconds() - started,
                    "" if result.complete else f"stopped at seq {result.seq}: {result.problem}",
                    f"{filespace}: {result.summary}", kept, result)


# -- the responder every connection talks to ---------------------------------------------


@implementer(IResponder)
class Gate:
    """The responder of every connection: the serving responder's answers, or ``Restoring``.

    ``serving`` is the :class:`~lucidlink.meta.service.MetadataResponder` of
    the open database, or None while the server checks or restores.  A
    connection stays with the responder that welcomed it; one welcomed while
    restoring is closed when serving starts again, and its client connects
    anew.  An ``sqlite3.DatabaseError`` from a request is answered
    ``Restoring`` and reported to ``on_database_error`` rather than passed on
    as an internal error.
    """

    def __init__(self, filespace: str, server_name: str, on_database_error: Callable[[Exception], object]) -> None:
        self.filespace = filespace
        self.server_name = server_name
        self.on_database_error = on_database_error
        self.serving: Any = None
        self.reason = "the metadata server is starting"
        self._owners: dict[ServerConnection, Any] = {}

    def _restoring(self) -> Restoring:
        return Restoring(f"{self.filespace}: {self.reason}; retry shortly", retry_after_ms=RESTORING_RETRY_MS)

    def serve(self, responder: Any) -> None:
        """Hand new connections to ``responder``; close those welcomed while not serving."""
        self.serving = responder
        waiting = [connection for connection, owner in self._owners.items() if owner is None]
        for connection in waiting:
            connection.close("the metadata server serves again; connect again")

    def stop_serving(self, reason: str) -> None:
        """Answer ``Restoring`` (saying ``reason``) from now on."""
        self.serving = None
        self.reason = reason

    # -- IResponder ----------------------------------------------------------------

    def welcome(self, connection: ServerConnection, hello: w.Hello) -> Any:
        responder = self.serving
        if responder is not None:
            welcome = responder.welcome(connection, hello)
            self._owners[connection] = responder
            return welcome
        if hello.filespace != self.filespace:
            raise UnknownFilespace(f"this server serves filespace {self.filespace!r}, not {hello.filespace!r}")
        self._owners[connection] = None
        keepalive_ms = int(getattr(connection, "keepalive_interval", 0) * 1000)
        return w.Welcome(w.PROTOCOL_VERSION, self.server_name, 0, keepalive_ms, ServerStatus.RESTORING)

    def respond(self, connection: ServerConnection, message: Any) -> Any:
        owner = self._owners.get(connection)
        if owner is None or owner is not self.serving:
            raise self._restoring()
        try:
            answer = owner.respond(connection, message)
        except sqlite3.DatabaseError as error:
            raise self._damaged(error) from None
        if isinstance(answer, defer.Deferred):
            answer.addErrback(self._failed)
        return answer

    def _failed(self, failure: Failure) -> Any:
        failure.trap(sqlite3.DatabaseError)
        raise self._damaged(failure.value)

    def _damaged(self, error: BaseException) -> Restoring:
        _log.error("{filespace}: a request met a database error ({error}); checking the database now",
                   filespace=self.filespace, error=str(error))
        self.on_database_error(error)  # type: ignore[arg-type]
        return Restoring(f"{self.filespace}: the metadata server is checking its database; retry shortly",
                         retry_after_ms=RESTORING_RETRY_MS)

    def connection_ended(self, connection: ServerConnection, reason: LucidError) -> None:
        owner = self._owners.pop(connection, None)
        if owner is not None:
            owner.connection_ended(connection, reason)


# -- the state machine ------------------------------------------------------------------


class State(Enum):
    """Where the guardian is."""

    STARTING = "starting"
    SERVING = "serving"
    RESTORING = "restoring"
    HALTED = "halted"
    """Damaged and not restoring by itself: auto_restore is off, the store cannot give it all, or no store."""
    STOPPED = "stopped"


class DatabaseOwner(Protocol):
    """What the guardian needs of the server: open the database and serve it, or close it."""

    def open_database(self) -> Any:
        """Open the data folder's database (made if missing) and build what serves it; its responder."""

    def close_database(self, reason: str, damaged: bool) -> Any:
        """Stop serving (telling clients ``reason``) and close the database; may return a Deferred."""


class Guardian:
    """Checks the database of one filespace and restores it (see the module).

    ``open_object_store`` returns the object store journal segments and
    snapshots are in, opening it the first time (it raises LucidError while
    the store cannot be opened); None when the journal is not shipped.
    ``shipped`` is a function giving the last sequence the object store is
    known to hold while serving (the shipper's), or None; ``on_status`` is
    called whenever :attr:`state` changes.  ``command_hint`` is the
    ``lucid-meta`` command line an operator would run for this filespace.
    """

    def __init__(
        self,
        owner: DatabaseOwner,
        gate: Gate,
        reactor: Any,
        *,
        filespace: str,
        data_dir: Path,
        open_object_store: Callable[[], Any] | None = None,
        auto_restore: bool = True,
        check_interval: float = DEFAULT_CHECK_INTERVAL,
        durability: str = "off",
        shipped: Callable[[], int | None] = lambda: None,
        on_status: Callable[[], object] = lambda: None,
        command_hint: str = "",
    ) -> None:
        self.owner = owner
        self.gate = gate
        self.reactor = reactor
        self.filespace = filespace
        self.data_dir = data_dir
        self.open_object_store = open_object_store
        self.auto_restore = auto_restore
        self.check_interval = check_interval
        self.durability = durability
        self.shipped = shipped
        self.on_status = on_status
        self.command_hint = command_hint
        self.state = State.STARTING
        self.known_head = 0
        """The highest journal sequence this server has seen in its database (0: none yet)."""
        self.restores: list[Restored] = []
        self.problem = ""
        self._busy: defer.Deferred[Any] | None = None
        self._loop = LoopingCall(self.check)
        self._loop.clock = reactor

    @property
    def database(self) -> Path:
        return self.data_dir / DATABASE_NAME

    def saw_head(self, seq: int) -> None:
        """A journal record ``seq`` was appended (the server's journal calls this)."""
        self.known_head = max(self.known_head, seq)

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        """Check the database now (opening it when healthy), then every ``check_interval`` seconds."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._loop.start(self.check_interval, now=False)
        self._run(self._first_check)

    @defer.inlineCallbacks
    def stop(self) -> Any:
        """Stop checking; waits for a check or restore in progress."""
        if self._loop.running:
            self._loop.stop()
        yield self.idle()
        self._set(State.STOPPED)

    def check(self) -> defer.Deferred[Any]:
        """Check now (a no-op while a check or restore runs); fires when done, never fails."""
        if self.state in (State.HALTED, State.STOPPED):
            return defer.succeed(None)
        if self.state is State.STARTING:
            return self._run(self._first_check)  # an earlier attempt could not list the store
        if self.state is State.RESTORING:
            return self._run(self._restore)  # an earlier attempt could not reach the store
        return self._run(self._periodic_check)

    def database_error(self, error: Exception) -> None:
        """A request met ``error`` from SQLite: check at once."""
        if self.state is State.SERVING:
            self.check()

    def _run(self, step: Callable[[], defer.Deferred[Any]]) -> defer.Deferred[None]:
        """Run ``step`` unless one runs already; a Deferred that fires (with None) once the running one ends."""
        if self._busy is None:
            self._busy = busy = defer.Deferred()

            def done(result: Any) -> None:
                self._busy = None
                if isinstance(result, Failure):
                    _log.failure("{filespace}: the database check failed", result, filespace=self.filespace)
                busy.callback(None)

            defer.maybeDeferred(step).addBoth(done)
        return self.idle()

    def idle(self) -> defer.Deferred[None]:
        """Fires once no check or restore runs."""
        waiter: defer.Deferred[None] = defer.Deferred()
        if self._busy is None:
            waiter.callback(None)
        else:
            self._busy.addBoth(lambda result: (waiter.callback(None), result)[1])
        return waiter

    def _set(self, state: State) -> None:
        if state is not self.state:
            self.state = state
            self.on_status()

    # -- the steps ---------------------------------------------------------------------

    @defer.inlineCallbacks
    def _first_check(self) -> Any:
        health = check_database(self.database)
        if not health.ok and not health.missing:
            health = yield self._second_look(health)
        if health.missing:
            held = 0
            if self.open_object_store is not None:
                try:
                    held = yield store_head(self.open_object_store(), self.filespace)
                except LucidError as error:
                    # Creating a new database over a history the store may hold would fork it: wait for the store.
                    self.problem = f"no database and the object store cannot be listed ({error})"
                    _log.error("{filespace}: {problem}; will try again in {interval} s", filespace=self.filespace,
                               problem=self.problem, interval=self.check_interval)
                    return
            if held:
                yield self._damaged(health.problem + f" (the object store holds its journal up to seq {held})")
                return
            yield self._open_and_check_head()
            return
        if not health.ok:
            yield self._damaged(health.problem)
            return
        self.known_head = health.head
        yield self._open_and_check_head()

    @defer.inlineCallbacks
    def _open_and_check_head(self) -> Any:
        if self.open_object_store is not None:
            try:
                self.open_object_store()  # shipping starts with the database: the store must be there first
            except LucidError as error:
                _log.error("{filespace}: cannot open the object store ({error}); will try again in {interval} s",
                           filespace=self.filespace, error=str(error), interval=self.check_interval)
                return
        caught_up = yield self._catch_up()
        if not caught_up:
            return
        try:
            responder = self.owner.open_database()
        except sqlite3.DatabaseError as error:
            yield self.owner.close_database("the metadata server found its database damaged", True)
            yield self._damaged(f"cannot open {self.database}: {error}")
            return
        if self.open_object_store is not None:
            try:
                held = yield store_head(self.open_object_store(), self.filespace)
            except LucidError as error:
                _log.warn("{filespace}: cannot list the object store to compare journal heads ({error}); serving",
                          filespace=self.filespace, error=str(error))
            else:
                local = check_database(self.database)
                if local.ok and local.head < held:
                    yield self._damaged(self._behind(local.head, held))
                    return
        self._serve(responder)

    @defer.inlineCallbacks
    def _catch_up(self) -> Any:
        """Before opening: replay onto a sound database the records the store holds beyond its head.

        That is what a power cut under ``synchronous=NORMAL`` leaves (the last
        commits gone, the database sound).  Records that do not chain onto the
        database's own head mean it is not the filespace's history: damaged,
        and restored whole.  Fires with False if the database was not opened
        (restoring, or the store cannot be read yet).
        """
        if self.open_object_store is None or not self.database.exists():
            return True
        local = check_database(self.database)
        if not local.ok:
            return True  # opening meets the damage and says what it is
        try:
            object_store = self.open_object_store()
            held = yield store_head(object_store, self.filespace)
        except LucidError as error:
            _log.warn("{filespace}: cannot list the object store to compare journal heads ({error})",
                      filespace=self.filespace, error=str(error))
            return True
        if local.head >= held:
            return True
        _log.warn("{filespace}: {problem}; replaying them from the object store", filespace=self.filespace,
                  problem=self._behind(local.head, held))
        try:
            seq, problem = yield catch_up(object_store, self.filespace, self.database, self.reactor)
        except (LucidError, OSError, sqlite3.Error) as error:
            seq, problem = local.head, str(error)
        if problem or seq < held:
            yield self._damaged(f"{self._behind(local.head, held)}, and they cannot be replayed onto it "
                                f"({problem or f'replayed up to seq {seq}'})")
            return False
        _log.info("{filespace}: replayed seq {first} to {seq} from the object store", filespace=self.filespace,
                  first=local.head + 1, seq=seq)
        return True

    def _behind(self, local: int, held: int) -> str:
        return (f"the database's journal ends at seq {local} but the object store holds it up to seq {held}: "
                f"{held - local} acknowledged records are missing from the disk")

    def _serve(self, responder: Any) -> None:
        self.problem = ""
        self.gate.serve(responder)
        self._set(State.SERVING)

    @defer.inlineCallbacks
    def _periodic_check(self) -> Any:
        if self.state is not State.SERVING:
            return
        held = self.shipped()  # read first: the store never gets ahead of what was committed before
        health = yield threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), check_database,
                                                 self.database)
        if self.state is not State.SERVING:
            return
        if not health.ok:
            health = yield self._second_look(health)
        if self.state is not State.SERVING:
            return
        if not health.ok:
            yield self._damaged(health.problem)
        elif held is not None and health.head < held:
            yield self._damaged(self._behind(health.head, held))
        else:
            self.known_head = max(self.known_head, health.head)

    @defer.inlineCallbacks
    def _second_look(self, first: Health) -> Any:
        """Check again a moment later: a restore is not started on one look that may have raced a writer."""
        _log.warn("{filespace}: the database check failed ({problem}); checking again", filespace=self.filespace,
                  problem=first.problem)
        yield task.deferLater(self.reactor, SECOND_LOOK_DELAY, lambda: None)
        health = yield threads.deferToThreadPool(self.reactor, self.reactor.getThreadPool(), check_database,
                                                 self.database)
        return health

    @defer.inlineCallbacks
    def _damaged(self, problem: str) -> Any:
        """Stop serving the damaged database and restore it (or say what an operator must do)."""
        self.problem = problem
        _log.error("{filespace}: DATABASE DAMAGED: {problem}", filespace=self.filespace, problem=problem)
        self.gate.stop_serving("the metadata server is restoring its database")
        self._set(State.RESTORING)
        try:
            yield self.owner.close_database("the metadata server is restoring its database", True)
        except Exception:
            _log.failure("{filespace}: closing the damaged database", filespace=self.filespace)
        if self.open_object_store is None:
            self._halt("there is no object store to restore from (no `store` in the config); the damaged "
                       f"database stays at {self.database} for an operator")
            return
        if not self.auto_restore:
            self._halt(f"auto_restore is off: stop this server, run `{self.command_hint} --force`, then start it "
                       "again")
            return
        yield self._restore()

    def _halt(self, text: str) -> None:
        self.problem = text
        _log.error("{filespace}: NOT SERVING: {text}", filespace=self.filespace, text=text)
        self.gate.stop_serving(f"the metadata server's database is damaged and waits for an operator ({text})")
        self._set(State.HALTED)

    @defer.inlineCallbacks
    def _restore(self) -> Any:
        before = self.known_head
        _log.info("{filespace}: restoring the database from the object store", filespace=self.filespace)
        try:
            object_store = self.open_object_store()
            held = yield store_head(object_store, self.filespace)
            if not held:
                # Checked before anything is replaced: an empty database here would start as a new filespace.
                self._halt(f"the object store holds no journal record of {self.filespace}, so there is nothing to "
                           f"restore from; the damaged database stays at {self.database} (check the `store` URL)")
                return
            done = yield install_restored(self.reactor, object_store, self.filespace, self.data_dir)
        except (LucidError, OSError, sqlite3.Error) as error:
            _log.error("{filespace}: the restore failed ({error}); trying again in {interval} s",
                       filespace=self.filespace, error=str(error), interval=self.check_interval)
            return
        self.restores.append(done)
        if done.kept is not None:
            _log.info("{filespace}: the damaged database is kept as {kept}", filespace=self.filespace,
                      kept=str(done.kept))
        if done.error:
            self._halt(f"the journal in the object store is damaged: {done.summary}. Every record up to seq "
                       f"{done.seq} is restored in {self.database}; serving it would write over the history "
                       f"the store still holds. Check with `{self.command_hint.replace(' restore ', ' verify ')}`")
            return
        health = check_database(self.database)
        if not health.ok:
            self._halt(f"the restored database fails its check ({health.problem}); the newest snapshot may be "
                       "damaged")
            return
        _log.info("{summary} in {seconds:.2f} s ({entries} entries)", summary=done.summary, seconds=done.seconds,
                  entries=done.entries)
        if before and done.seq is not None and before > done.seq and self.durability == "async":
            _log.warn("{filespace}: {lost} acknowledged records were lost (durability=async): the damaged "
                      "database had reached seq {before}, the object store held them up to seq {seq}",
                      filespace=self.filespace, lost=before - done.seq, before=before, seq=done.seq)
        elif before and done.seq is not None and before > done.seq:
            _log.warn("{filespace}: no acknowledged record was lost, but {lost} records whose shipment never "
                      "completed (their writers were told to retry) are gone: the damaged database had reached "
                      "seq {before}, the object store held them up to seq {seq}",
                      filespace=self.filespace, lost=before - done.seq, before=before, seq=done.seq)
        elif before:
            _log.info("{filespace}: no acknowledged record was lost: the damaged database had reached seq {before}, "
                      "restored to seq {seq}", filespace=self.filespace, before=before, seq=done.seq)
        self.known_head = done.seq or 0
        try:
            responder = self.owner.open_database()
        except sqlite3.DatabaseError as error:
            self._halt(f"the restored database cannot be opened: {error}")
            return
        self._serve(responder)
        _log.info("{filespace}: serving again", filespace=self.filespace)

