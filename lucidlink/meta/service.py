"""
The metadata protocol answered: the business logic behind each connection.

:class:`MetadataResponder` is the :class:`~lucidlink.protocol.connection.IResponder`
of a metadata server.  It welcomes connections for its filespace only, logs
sessions in, checks each request against the session's role, turns requests
into store reads or mutation records, keeps handles and locks, and pushes
``Notify`` to the filespace's other sessions after every change.  It never
sees bytes, sockets or TLS; the rules it enforces are those of
``docs/metadata-protocol.rst``.

Group commit: the requests that change the tree are not answered at once but
queued, and ``group_window`` seconds later (by default: once the reactor has
read everything that arrived with them) they run in arrival order inside one
:meth:`~lucidlink.meta.interface.IMetadataStore.group`, each mutation in its own
savepoint, committed with one fsync.  Only then are they answered and the
other sessions told, in one write per connection; with a ``shipper`` only
once the journal records are durable in the object store.  A refused request
gets its own error.

No transaction is open between reactor turns, so a request answered at once
sees committed state only.  A session's requests run in the order it sent
them: behind a queued change, any request of the same session is queued too
and runs inside the group, and its answer, like the changes', leaves only
after the commit.  If the commit fails, every request of the group that had
no error of its own fails with the commit's error (the handles it opened are
closed again), so nothing answered ever rests on a rolled-back change.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lucidlink import crypto
from lucidlink.errors import (
    AccessDenied,
    AuthenticationFailed,
    Busy,
    InvalidArgument,
    IsADirectory,
    LucidError,
    NotADirectory,
    NotFound,
    NotInitialized,
    NotSupported,
    Restoring,
    Unavailable,
    UnknownFilespace,
)
from lucidlink.meta import bootstrap
from lucidlink.meta import mutations as m
from lucidlink.meta.inode_blocks import InodeBlocks
from lucidlink.meta.interface import IMetadataStore
from lucidlink.meta.leases import RECALL_RETRY_MS, DirectoryLeases, Lease
from lucidlink.meta.locks import LockTable
from lucidlink.meta.replies import RepliesKept, Reply
from lucidlink.meta.sessions import Handle, LoginLimiter, Session, is_writable
from lucidlink.meta.store import ROOT_INODE, Applied, Change
from lucidlink.protocol import messages as w
from lucidlink.protocol.connection import OWN_REQUEST_ID_LIMIT, IResponder, ServerConnection
from lucidlink.protocol.messages import FileKind, LockType, NotifyKind, Role, ServerStatus

DEFAULT_KDF = (crypto.DEFAULT_TIME_COST, crypto.DEFAULT_MEMORY_KIB, crypto.DEFAULT_PARALLELISM)
"""Argon2id time cost, memory (KiB) and parallelism shown for unknown users when no user exists to copy."""
_BOOTSTRAP_LIMIT_KEY = "\x00bootstrap"
_DUMMY_SALT = bytes(16)
_DUMMY_VERIFIER = bytes(32)
_ROLE_NAMES = {Role.READER: "a reader", Role.WRITER: "a writer", Role.ADMIN: "an admin"}

_log = Logger()

Answer = Callable[["MetadataResponder", Session, Any], Any]
_ANSWERS: dict[type, tuple[Answer, Role | None, str, bool]] = {}


_LEASE_SCOPE: dict[type, Callable[[Any], tuple[tuple[int, ...], tuple[int, ...]]]] = {
    w.Lookup: lambda m: ((m.parent,), ()),
    w.ReadDir: lambda m: ((m.inode,), ()),
    w.MkDir: lambda m: ((m.parent,), ()),
    w.Create: lambda m: ((m.parent,), ()),
    w.Symlink: lambda m: ((m.parent,), ()),
    w.Link: lambda m: ((m.new_parent,), ()),
    w.Unlink: lambda m: ((m.parent,), ()),
    w.RmDir: lambda m: ((m.parent,), ()),
    w.Rename: lambda m: ((m.old_parent, m.new_parent), ()),
    w.GetAttr: lambda m: ((), (m.inode,)),
    w.SetAttr: lambda m: ((), (m.inode,)),
    w.Open: lambda m: ((), (m.inode,)),
    w.GetXattr: lambda m: ((), (m.inode,)),
    w.ListXattr: lambda m: ((), (m.inode,)),
    w.SetXattr: lambda m: ((), (m.inode,)),
    w.RemoveXattr: lambda m: ((), (m.inode,)),
}
"""Per request: the directories whose entries it reads or changes, and the inodes whose attributes it does."""


def answers(message_class: type, role: Role | None = Role.READER, doing: str = "",
            grouped: bool = False) -> Callable[[Answer], Answer]:
    """Register the decorated method as the answer to ``message_class``.

    ``role`` is the least role the request needs (``None``: no login needed);
    ``doing`` names the action in the refusal a weaker role gets; ``grouped``
    requests (changes to the tree) wait for the next group commit.
    """

    def register(method: Answer) -> Answer:
        _ANSWERS[message_class] = (method, role, doing, grouped)
        return method

    return register


@dataclass(slots=True)
class _Queued:
    """A request waiting for the group commit, and what became of it."""

    session: Session
    method: Answer
    message: Any
    answered: defer.Deferred[Any] = field(default_factory=defer.Deferred)
    outcome: Any = None
    """The answer, or the Failure to send instead."""
    changes: list[tuple[Session, tuple[Change, ...]]] = field(default_factory=list)
    """What each mutation the request applied changed (one entry per mutation)."""
    reply: Reply | None = None
    """Where a named client's change that is made but not stored is noted (see :mod:`lucidlink.meta.replies`)."""


@implementer(IResponder)
class MetadataResponder:
    """Answers every metadata request of one filespace's clients.

    ``store`` provides :class:`~lucidlink.meta.interface.IMetadataStore`;
    ``token_path`` is where the bootstrap token file lives (deleted once used);
    ``on_status_changed`` is called when the status changes (after the bootstrap);
    ``lock_grace`` is the seconds after the start during which only reclaimed
    locks are granted (see :mod:`lucidlink.meta.locks`; 0: none; none either
    for a filespace not yet initialised).
    """

    def __init__(
        self,
        store: IMetadataStore,
        clock: IReactorTime,
        filespace: str,
        *,
        token_path: Path | None = None,
        server_name: str | None = None,
        max_connections: int = 1024,
        limiter: LoginLimiter | None = None,
        on_status_changed: Callable[[], object] | None = None,
        shipper: Any = None,
        group_window: float | None = 0.0,
        lock_grace: float = 0.0,
    ) -> None:
        self.store = store
        self.clock = clock
        self.filespace = filespace
        self.token_path = token_path
        self.server_name = server_name or f"lucid-meta {filespace}"
        self.max_connections = max_connections
        self.limiter = limiter or LoginLimiter(clock)
        self.on_status_changed = on_status_changed
        self.shipper = shipper
        """A :class:`~lucidlink.meta.shipper.Shipper` whose ``durable`` a write waits on before it is answered."""
        self.group_window = group_window
        """Seconds a change waits for others to share its commit (0: until the reactor's next turn; None: no
        group commit, each change is committed and answered at once, as in-memory tests need)."""
        self._unpublished: list[tuple[Session, tuple[Change, ...]]] | None = None
        self._queue: list[_Queued] = []
        self._queued_sessions: set[int] = set()
        self._commit_call: IDelayedCall | None = None
        self._undo: list[Callable[[], None]] | None = None
        self.groups = 0
        """Group commits made so far (for tests and metrics)."""
        self.locks = LockTable()
        self._grace_ends = clock.seconds() + lock_grace
        self._grace_call: IDelayedCall | None = None
        if lock_grace > 0 and store.initialised:  # before its initialisation no one can hold a lock
            self.locks.begin_grace()
        self.sessions: dict[int, Session] = {}
        self.replies = RepliesKept(clock)
        """The answers kept of named clients' changes (see :mod:`lucidlink.meta.replies`)."""
        self.leases = DirectoryLeases(clock)
        """The directory leases sessions hold (see :mod:`lucidlink.meta.leases`)."""
        self.inode_blocks = InodeBlocks(clock)
        """The inode ids named clients reserved and have not used (see :mod:`lucidlink.meta.inode_blocks`)."""
        if store.initialised:
            for client, first, count in store.inode_blocks():  # a restarted server knows them still
                self.inode_blocks.add(client, first, count, uses_known=False)
        self._session_ids = itertools.count(1)
        self._handle_ids = itertools.count(1)

    @property
    def status(self) -> ServerStatus:
        """What this server tells its clients it is doing."""
        return ServerStatus.SERVING if self.store.initialised else ServerStatus.UNINITIALIZED

    # -- IResponder ----------------------------------------------------------------

    def welcome(self, connection: ServerConnection, hello: w.Hello) -> w.Welcome:
        if hello.filespace != self.filespace:
            raise UnknownFilespace(f"this server serves filespace {self.filespace!r}, not {hello.filespace!r}")
        if len(self.sessions) >= self.max_connections:
            raise Busy(f"the server for {self.filespace!r} has {len(self.sessions)} connections", retry_after_ms=1000)
        session = Session(next(self._session_ids), connection, _source(connection))
        connection.session = session
        self.sessions[session.id] = session
        keepalive_ms = int(getattr(connection, "keepalive_interval", 0) * 1000)
        return w.Welcome(w.PROTOCOL_VERSION, self.server_name, session.id, keepalive_ms, self.status)

    def respond(self, connection: ServerConnection, message: Any) -> Any:
        session: Session | None = connection.session
        entry = _ANSWERS.get(type(message))
        if session is None or entry is None:
            raise NotSupported(f"{type(message).__name__} is not served by a metadata server")
        method, role, doing, grouped = entry
        if role is not None:
            self._require_role(session, role, doing)
        request_id = getattr(connection, "request_id", None)
        # Only ids a client gives its calls: those a connection numbers itself start again on each connection.
        own_call = session.client is not None and request_id is not None and request_id >= OWN_REQUEST_ID_LIMIT
        named = grouped and own_call
        if named or (own_call and isinstance(message, w.LeaseReturned)):
            # A lease given back after the holder's changes of the directory must not overtake one refused.
            self._hold_back(session, request_id)
        scope = _LEASE_SCOPE.get(type(message))
        if scope is not None:
            try:
                self._mind_leases(session, message, scope)
            except Busy:
                if named:
                    session.held_back = (request_id, self.clock.seconds() + self.leases.lease_seconds)
                raise
        if named:
            return self._once(session, method, message, request_id)
        answer = self._answer_in_turn(session, method, message, grouped)
        if self.leases and isinstance(message, (w.Lookup, w.ReadDir)):
            if isinstance(answer, defer.Deferred):
                return answer.addCallback(self._no_lease_shown, session)
            return self._no_lease_shown(answer, session)
        return answer

    # -- leases --------------------------------------------------------------------------

    def _mind_leases(self, session: Session, message: Any, scope: Callable[[Any], tuple[Any, Any]]) -> None:
        """Busy (and a recall) if ``message`` reads or changes a directory another session holds a lease on."""
        entries, attributes = scope(message)
        self.leases.touch(session.id, entries, self._recall)
        if self.leases:
            self.leases.touch(session.id, (*attributes, *self._directories_named(message)), self._recall,
                              remember=False)

    def _hold_back(self, session: Session, request_id: int) -> None:
        """
        Busy for a named client's change that came after one of its changes refused ``Busy``, until that one is
        sent again (for a lease's time at most): a client that sends changes without waiting sends the refused one
        again first, and then these, so they are made in the order it sent them.
        """
        if session.held_back is None:
            return
        refused, until = session.held_back
        if request_id != refused and self.clock.seconds() < until:
            raise Busy(f"request {refused} of this client was refused; it goes first", retry_after_ms=RECALL_RETRY_MS)
        session.held_back = None

    def _directories_named(self, message: Any) -> list[int]:
        """The entries a removal or a rename acts on, when they are directories whose own entries it reads."""
        names = {w.RmDir: lambda m: [(m.parent, m.name)],
                 w.Rename: lambda m: [(m.old_parent, m.old_name), (m.new_parent, m.new_name)]}.get(type(message))
        found = []
        for parent, name in names(message) if names is not None else ():
            try:
                attributes = self.store.lookup(parent, name)
            except LucidError:
                continue
            if attributes.kind == FileKind.DIRECTORY:
                found.append(attributes.inode)
        return found

    def _no_lease_shown(self, answer: Any, session: Session) -> Any:
        """A lookup or listing may not show the attributes of a directory another session holds a lease on."""
        shown = [answer.attributes] if isinstance(answer, w.Entry) else [entry.attributes for entry in answer.entries]
        self.leases.touch(session.id, [attributes.inode for attributes in shown
                                       if attributes.kind == FileKind.DIRECTORY], self._recall, remember=False)
        return answer

    def _recall(self, lease: Lease) -> None:
        holder = self.sessions.get(lease.holder)
        if holder is not None:
            holder.connection.push(w.LeaseRecall(lease.directory))

    @answers(w.LeaseDirectory, role=Role.WRITER, doing="leasing directories")
    def _lease_directory(self, session: Session, message: w.LeaseDirectory) -> w.Lease:
        if self.store.getattr(message.inode).kind != FileKind.DIRECTORY:
            raise NotADirectory(f"inode {message.inode} is not a directory")
        lease = self.leases.grant(session.id, message.inode)
        return w.Lease(message.inode, max(0, int((lease.expires - self.clock.seconds()) * 1000)))

    @answers(w.LeaseReturned, role=Role.WRITER, doing="leasing directories")
    def _lease_returned(self, session: Session, message: w.LeaseReturned) -> w.Ok:
        self.leases.returned(session.id, message.inode)
        return w.Ok()

    # -- answering in turn -----------------------------------------------------------------

    def _answer_in_turn(self, session: Session, method: Answer, message: Any, grouped: bool,
                        reply: Reply | None = None) -> Any:
        """Answer now, or queue behind the session's changes; ``reply``: where a change made but not stored is noted."""
        if (grouped and self.group_window is not None) or session.id in self._queued_sessions:
            # Behind its session's queued changes, a request waits its turn: each session's requests run in order.
            return self._enqueue(session, method, message, reply)
        return self._answer_alone(session, method, message, reply)

    def _once(self, session: Session, method: Answer, message: Any, request_id: int) -> Any:
        """A named client's change: made and its answer kept, or, sent again, answered as the first time."""
        assert session.client is not None
        reply = self.replies.get(session.client, request_id)
        if reply is not None:
            if reply.kind is not type(message):
                raise InvalidArgument(
                    f"request {request_id} of this client was a {reply.kind.__name__}, not a {type(message).__name__}"
                )
            if reply.made is not None and isinstance(reply.outcome, Failure):
                again: Answer = lambda responder, session, message: responder._stored_again(reply)  # noqa: E731
            else:
                again = lambda responder, session, message: reply.replay()  # noqa: E731
            # In turn, as the session's other requests: one still waiting for its commit holds back those after it.
            answer = self._answer_in_turn(session, again, message, grouped=reply.pending)
            return answer.addCallback(self._answered_again, session, message)
        client = session.client
        assert session.user is not None
        self.replies.register(client, session.user)  # still its user's, and in use
        reply = self.replies.add(client, request_id, type(message))

        def settle(result: Any) -> Any:
            if isinstance(result, Failure) and result.check(Busy, Restoring, Unavailable) and reply.made is None:
                self.replies.forget(client, request_id)  # "try again", and nothing was made: the next attempt is
            return reply.settle(result)

        try:
            result = self._answer_in_turn(session, method, message, grouped=True, reply=reply)
        except BaseException:
            settle(Failure())
            raise
        if isinstance(result, defer.Deferred):
            return result.addBoth(settle)
        return settle(result)

    def _stored_again(self, reply: Reply) -> defer.Deferred[Any]:
        """A change made whose journal could not be stored: its answer once the journal is (Unavailable till then)."""
        durable = self.shipper.durable() if self.shipper is not None else defer.succeed(None)
        return durable.addCallback(lambda _: reply.made)

    def _answered_again(self, answer: Any, session: Session, message: Any) -> Any:
        """The kept answer to a change sent again; a file created then is opened again in this session."""
        if isinstance(answer, w.Opened) and isinstance(message, w.Create):
            first = session.handles.get(answer.handle)
            if first is not None and first.inode == answer.attributes.inode:
                return answer  # the first attempt's handle is this session's own: not a second one
            return self._open(session, w.Open(answer.attributes.inode, message.open_flags))
        return answer

    def _answer_alone(self, session: Session, method: Answer, message: Any, reply: Reply | None = None) -> Any:
        if self.shipper is None:
            return method(self, session, message)
        # A write is answered, and the others told, only once its journal record is durable.
        before = self.shipper.head()
        self._unpublished = []
        try:
            answer = method(self, session, message)
        except BaseException:
            unpublished, self._unpublished = self._unpublished or [], None
            self._publish_all(unpublished)
            raise
        unpublished, self._unpublished = self._unpublished, None
        if self.shipper.head() == before:
            self._publish_all(unpublished)
            return answer
        durable = self.shipper.durable()

        def publish(result: Any) -> Any:
            # Published even if shipping failed: the change is in the database and reads show it.
            self._publish_all(unpublished)
            if reply is not None and isinstance(result, Failure):
                reply.made = answer
            return result

        return durable.addBoth(publish).addCallback(lambda _: answer)

    # -- group commit ----------------------------------------------------------------

    def _enqueue(self, session: Session, method: Answer, message: Any,
                 reply: Reply | None = None) -> defer.Deferred[Any]:
        queued = _Queued(session, method, message, reply=reply)
        self._queue.append(queued)
        self._queued_sessions.add(session.id)
        if self._commit_call is None:
            self._commit_call = self.clock.callLater(self.group_window or 0.0, self.commit_group)
        return queued.answered

    def commit_group(self) -> None:
        """Run every queued change in one transaction, commit it, then answer (see the module)."""
        if self._commit_call is not None:
            if self._commit_call.active():
                self._commit_call.cancel()
            self._commit_call = None
        queue, self._queue = self._queue, []
        self._queued_sessions.clear()
        if not queue:
            return
        undo: list[Callable[[], None]] = []
        self._undo = undo
        try:
            with self.store.group() as group:
                for queued in queue:
                    self._unpublished = queued.changes
                    try:
                        queued.outcome = queued.method(self, queued.session, queued.message)
                    except BaseException:
                        queued.outcome = Failure()
        except BaseException:
            # Nothing of the group is in the database: every request fails, with its own error if it had one.
            failure = Failure()
            for step in reversed(undo):
                step()
            for queued in queue:
                if isinstance(queued.outcome, defer.Deferred):  # its own answer is replaced by the commit's error
                    queued.outcome.addErrback(lambda _: None)
                if not isinstance(queued.outcome, Failure):
                    queued.outcome, queued.changes = failure, []
            self._deliver(queue, None)
            return
        finally:
            self._unpublished = self._undo = None
        self.groups += 1
        if self.shipper is None or not group.applied:
            self._deliver(queue, None)
            return
        self.shipper.durable().addBoth(lambda result: self._deliver(queue, result))

    def _deliver(self, queue: list[_Queued], shipped: Any) -> None:
        """Tell the other sessions what the group changed, then answer each request, one write per connection.

        ``shipped`` is a Failure if the journal could not be shipped: then every
        request that changed something is answered with it (the change stays;
        see :mod:`lucidlink.meta.shipper`).
        """
        changes = [change for queued in queue for change in queued.changes]
        connections = [session.connection for session in self.sessions.values()] if changes else []
        connections += [queued.session.connection for queued in queue]
        corked = [connection for connection in connections if _cork(connection)]
        try:
            self._publish_all(changes)
            for queued in queue:
                outcome = queued.outcome
                if isinstance(shipped, Failure) and queued.changes and not isinstance(outcome, Failure):
                    if queued.reply is not None:
                        queued.reply.made = outcome
                    outcome = shipped
                if isinstance(outcome, Failure):
                    queued.answered.errback(outcome)
                elif isinstance(outcome, defer.Deferred):  # a lock that has to wait
                    outcome.chainDeferred(queued.answered)
                else:
                    queued.answered.callback(outcome)
        finally:
            for connection in corked:
                connection.uncork()

    def _publish_all(self, unpublished: list[tuple[Session, tuple[Change, ...]]]) -> None:
        """Tell every logged-in session what the others changed: each change once, in order."""
        if len(unpublished) == 1:
            self._publish(*unpublished[0])
            return
        authors_of: dict[Change, set[int]] = {}
        for author, changes in unpublished:
            for change in changes:
                authors_of.setdefault(change, set()).add(author.id)
        notes = [(w.Notify(change.kind, change.inode, change.parent, change.name), authors)
                 for change, authors in authors_of.items()]
        for session in self.sessions.values() if notes else ():
            if session.logged_in:
                for note, authors in notes:
                    if session.id not in authors or len(authors) > 1:
                        session.connection.push(note)

    def connection_ended(self, connection: ServerConnection, reason: LucidError) -> None:
        session: Session | None = connection.session
        if session is None or session.id not in self.sessions:
            return
        if session.id in self._queued_sessions:
            self.commit_group()  # what it sent is applied before its handles close
        del self.sessions[session.id]
        self.leases.end_session(session.id)
        inodes = {handle.inode for handle in session.handles.values()}
        for handle in list(session.handles.values()):
            self._close_handle(session, handle)
        inodes |= self.locks.end_session(session.id)
        for inode in inodes:
            self._tell_lock_released(inode)

    def close_all(self, text: str) -> defer.Deferred[Any]:
        """Commit what is queued, then close every connection, saying why; fires when all are gone."""
        self.commit_group()
        return defer.gatherResults(
            [session.connection.close(text) for session in list(self.sessions.values())], consumeErrors=True
        )

    # -- rules shared by many answers ----------------------------------------------

    def _require_role(self, session: Session, needed: Role, doing: str) -> None:
        if not self.store.initialised:
            raise NotInitialized(f"filespace {self.filespace!r} has not been initialised; run lucid filespace init")
        if session.role is None:
            raise AccessDenied("log in first")
        if session.role < needed:
            raise AccessDenied(
                f"user {session.user!r} is {_ROLE_NAMES[session.role]}; {doing or 'this'} needs the"
                f" {needed.name.lower()} role"
            )

    def _apply(self, session: Session, record: m.Mutation) -> Applied:
        applied = self.store.apply(record)
        if self._unpublished is not None:
            self._unpublished.append((session, tuple(applied.changes)))
        else:
            self._publish(session, applied.changes)
        return applied

    def _publish(self, author: Session, changes: Iterable[Change]) -> None:
        """Tell every other logged-in session what changed."""
        notes = [w.Notify(change.kind, change.inode, change.parent, change.name) for change in changes]
        if not notes:
            return
        for session in self.sessions.values():
            if session is not author and session.logged_in:
                for note in notes:
                    session.connection.push(note)

    def _tell_lock_released(self, inode: int) -> None:
        for session_id in self.locks.interested(inode):
            session = self.sessions.get(session_id)
            if session is not None:
                session.connection.push(w.Notify(NotifyKind.LOCK_RELEASED, inode, 0, b""))

    def _open_handle(self, session: Session, inode: int, writable: bool) -> Handle:
        handle = Handle(next(self._handle_ids), inode, writable)
        session.opened(handle)
        self.store.hold(inode)
        if self._undo is not None:  # opened inside a group commit, which may yet fail
            self._undo.append(lambda: self._forget_handle(session, handle))
        return handle

    def _forget_handle(self, session: Session, handle: Handle) -> None:
        """Undo :meth:`_open_handle` of a creation that was rolled back (nothing to reclaim)."""
        if session.handles.get(handle.id) is handle:
            session.closed(handle)
            self.store.forget_hold(handle.inode)

    def _close_handle(self, session: Session, handle: Handle) -> None:
        session.closed(handle)
        if not session.holds(handle.inode):
            self.locks.release_inode(session.id, handle.inode)
        try:
            self.store.release(handle.inode)
        except LucidError as error:
            # The orphan stays; it is reclaimed when the server next starts.
            _log.warn("could not reclaim inode {inode}: {error}", inode=handle.inode, error=error)

    # -- bootstrap and login -----------------------------------------------------------

    @answers(w.Bootstrap, role=None)
    def _bootstrap(self, session: Session, message: w.Bootstrap) -> w.Ok:
        refused = AuthenticationFailed("bootstrap token not valid (already used?)")
        if self.store.initialised:
            raise refused
        self.limiter.check(_BOOTSTRAP_LIMIT_KEY, session.source)
        if not bootstrap.token_matches(message.token, self.store.bootstrap_token_hash):
            self.limiter.failed(_BOOTSTRAP_LIMIT_KEY, session.source)
            raise refused
        salt, time_cost, memory_kib, parallelism, verifier, wrapped_key = _credentials(message.credentials)
        self.store.apply(m.Initialise(
            message.filespace_id, message.chunk_size, message.admin, salt, time_cost, memory_kib, parallelism,
            verifier, wrapped_key,
        ))
        if self.token_path is not None:
            bootstrap.remove_token(self.token_path)
        _log.info("filespace {filespace} initialised by {peer} with admin {admin}",
                  filespace=self.filespace, peer=session.source, admin=message.admin)
        for other in self.sessions.values():
            if other is not session:
                other.connection.push(w.StatusChanged(ServerStatus.SERVING, 0, "the filespace is initialised"))
        if self.on_status_changed is not None:
            self.on_status_changed()
        return w.Ok()

    def _require_initialised(self) -> None:
        if not self.store.initialised:
            raise NotInitialized(f"filespace {self.filespace!r} has not been initialised; run lucid filespace init")

    @answers(w.LoginStart, role=None)
    def _login_start(self, session: Session, message: w.LoginStart) -> w.LoginChallenge:
        self._require_initialised()
        user = self.store.user(message.user)
        if user is not None:
            return w.LoginChallenge(w.KdfParameters(user.salt, user.time_cost, user.memory_kib, user.parallelism))
        # Unknown: a stable fake salt and the parameters a real user would likely have.
        template = self.store.first_user()
        time_cost, memory_kib, parallelism = (
            (template.time_cost, template.memory_kib, template.parallelism) if template else DEFAULT_KDF
        )
        salt = crypto.fake_kdf_salt(self.store.server_secret, message.user)
        return w.LoginChallenge(w.KdfParameters(salt, time_cost, memory_kib, parallelism))

    @answers(w.Login, role=None)
    def _login(self, session: Session, message: w.Login) -> w.LoginOk:
        self._require_initialised()
        if session.logged_in:
            raise InvalidArgument(f"this connection is already logged in as {session.user!r}")
        self.limiter.check(message.user, session.source)
        user = self.store.user(message.user)
        if user is None:
            crypto.check_login(message.login_secret, _DUMMY_SALT, _DUMMY_VERIFIER)  # the same work either way
            accepted = False
        else:
            accepted = crypto.check_login(message.login_secret, user.salt, user.verifier)
        if not accepted or user is None:
            self.limiter.failed(message.user, session.source)
            _log.info("failed login as {user} from {source}", user=message.user, source=session.source)
            raise AuthenticationFailed("user name or passphrase not accepted")
        session.user, session.role = user.name, user.role
        return w.LoginOk(user.role, user.wrapped_key, self.store.chunk_size, ROOT_INODE, self.store.filespace_id)

    # -- users -------------------------------------------------------------------

    @answers(w.ClientId, role=Role.READER)
    def _client_id(self, session: Session, message: w.ClientId) -> w.ClientKnown:
        client = bytes(message.client_id)
        if not 8 <= len(client) <= 64:
            raise InvalidArgument(f"a client id has 8 to 64 bytes, not {len(client)}")
        assert session.user is not None
        self.replies.register(client, session.user)
        session.client = client
        return self.replies.known()

    @answers(w.UserAdd, role=Role.ADMIN, doing="adding users")
    def _user_add(self, session: Session, message: w.UserAdd) -> w.Ok:
        salt, time_cost, memory_kib, parallelism, verifier, wrapped_key = _credentials(message.credentials)
        self.store.apply(m.AddUser(message.user, message.role, salt, time_cost, memory_kib, parallelism, verifier,
                                   wrapped_key))
        return w.Ok()

    @answers(w.UserRemove, role=Role.ADMIN, doing="removing users")
    def _user_remove(self, session: Session, message: w.UserRemove) -> w.Ok:
        self.store.apply(m.RemoveUser(message.user))
        for other in list(self.sessions.values()):
            if other.user == message.user:
                other.user = other.role = None
                # After this answer has left, so that an admin removing themself still hears it.
                self.clock.callLater(0, other.connection.close, f"user {message.user!r} was removed")
        return w.Ok()

    @answers(w.UserPasswd, role=Role.READER)
    def _user_passwd(self, session: Session, message: w.UserPasswd) -> w.Ok:
        if message.user != session.user:
            self._require_role(session, Role.ADMIN, "changing another user's passphrase")
        salt, time_cost, memory_kib, parallelism, verifier, wrapped_key = _credentials(message.credentials)
        self.store.apply(m.ChangeCredentials(message.user, salt, time_cost, memory_kib, parallelism, verifier,
                                             wrapped_key))
        return w.Ok()

    @answers(w.UserList, role=Role.ADMIN, doing="listing users")
    def _user_list(self, session: Session, message: w.UserList) -> w.UserListing:
        return w.UserListing([w.UserInfo(user.name, user.role) for user in self.store.users()])

    # -- reading the tree ------------------------------------------------------------

    @answers(w.Lookup)
    def _lookup(self, session: Session, message: w.Lookup) -> w.Entry:
        return w.Entry(self.store.lookup(message.parent, message.name))

    @answers(w.GetAttr)
    def _getattr(self, session: Session, message: w.GetAttr) -> w.Entry:
        return w.Entry(self.store.getattr(message.inode))

    @answers(w.ReadDir)
    def _readdir(self, session: Session, message: w.ReadDir) -> w.DirPage:
        entries, cursor, done = self.store.readdir(message.inode, message.cursor, message.limit)
        return w.DirPage([w.DirEntry(name, attributes) for name, attributes in entries], cursor, done)

    @answers(w.ReadLink)
    def _readlink(self, session: Session, message: w.ReadLink) -> w.LinkTarget:
        return w.LinkTarget(self.store.readlink(message.inode))

    @answers(w.GetXattr)
    def _getxattr(self, session: Session, message: w.GetXattr) -> w.XattrValue:
        return w.XattrValue(self.store.getxattr(message.inode, message.name))

    @answers(w.ListXattr)
    def _listxattr(self, session: Session, message: w.ListXattr) -> w.XattrNames:
        return w.XattrNames(self.store.listxattr(message.inode))

    @answers(w.StatFs)
    def _statfs(self, session: Session, message: w.StatFs) -> w.FsStats:
        totals = self.store.statfs()
        return w.FsStats(totals.block_size, totals.total_bytes, totals.used_bytes, totals.total_inodes,
                         totals.used_inodes)

    @answers(w.ChunkMapRead)
    def _chunkmap_read(self, session: Session, message: w.ChunkMapRead) -> w.ChunkMap:
        version, size, chunks = self.store.chunk_map(message.inode, message.first_index, message.count)
        return w.ChunkMap(message.inode, version, size, [w.ChunkRef(*chunk) for chunk in chunks])

    # -- changing the tree ---------------------------------------------------------------

    @answers(w.SetAttr, role=Role.WRITER, doing="writing", grouped=True)
    def _setattr(self, session: Session, message: w.SetAttr) -> w.Entry:
        applied = self._apply(session, m.SetAttributes(
            message.inode, message.fields, message.mode, message.uid, message.gid, message.size,
            message.atime_ns, message.mtime_ns,
        ))
        return w.Entry(applied.value)

    @answers(w.MkDir, role=Role.WRITER, doing="writing", grouped=True)
    def _mkdir(self, session: Session, message: w.MkDir) -> w.Entry:
        applied = self._apply(session, m.MakeDirectory(message.parent, message.name, message.mode, message.uid,
                                                       message.gid, self._own_inode(session, message.inode)))
        self._used_inode(session, message.inode, applied.value.inode)
        return w.Entry(applied.value)

    @answers(w.Create, role=Role.WRITER, doing="writing", grouped=True)
    def _create(self, session: Session, message: w.Create) -> w.Opened:
        made = self._made_already(session, message)
        if made is not None:
            handle = self._open_handle(session, made.inode, is_writable(message.open_flags))
            return w.Opened(handle.id, made)
        applied = self._apply(session, m.CreateFile(message.parent, message.name, message.mode, message.uid,
                                                    message.gid, message.exclusive,
                                                    self._own_inode(session, message.inode),
                                                    self._holders_time(session, message.parent, message.time_ns)))
        attributes, _created = applied.value
        self._used_inode(session, message.inode, attributes.inode)
        handle = self._open_handle(session, attributes.inode, is_writable(message.open_flags))
        return w.Opened(handle.id, attributes)

    def _made_already(self, session: Session, message: w.Create) -> w.Attributes | None:
        """
        The file a ``Create`` naming an id of the client's own made already, if its entry names it: the same
        change sent again after a restart of this server (which keeps no answers across one).
        """
        if not message.inode or (
            self.inode_blocks.owns(session.client, message.inode)
            and self.inode_blocks.uses_known(session.client, message.inode)
        ):
            return None  # an id not used yet: a first attempt
        try:
            found = self.store.lookup(message.parent, message.name)
        except LucidError:
            return None
        return found if found.inode == message.inode and found.kind == FileKind.FILE else None

    @answers(w.ReserveInodes, role=Role.WRITER, doing="creating files", grouped=True)
    def _reserve_inodes(self, session: Session, message: w.ReserveInodes) -> w.InodeBlock:
        client = session.client
        if client is None:
            raise InvalidArgument("inode ids are reserved for a named client (ClientId first)")
        first = self._apply(session, m.ReserveInodes(message.count, client=client)).value
        self.inode_blocks.add(client, first, message.count)
        if self._undo is not None:  # inside a group commit, which may yet fail
            self._undo.append(lambda: self.inode_blocks.remove(client, first, message.count))
        return w.InodeBlock(first, message.count)

    def _own_inode(self, session: Session, inode: int) -> int | None:
        """The id a creation gives its new inode: None (the store's next) for 0, else one of the client's own."""
        if not inode:
            return None
        self.inode_blocks.check(session.client, inode)
        if not self.inode_blocks.uses_known(session.client, inode) and self.store.inode_exists(inode):
            raise InvalidArgument(f"inode id {inode} is used already")  # before this server started
        return inode

    def _used_inode(self, session: Session, inode: int, made: int) -> None:
        """A creation that named ``inode`` made ``made``: the client's id is used if they are the same."""
        client = session.client
        if inode and made == inode and client is not None:
            block = self.inode_blocks.take(client, inode)
            if self._undo is not None:  # inside a group commit, which may yet fail
                self._undo.append(lambda: self.inode_blocks.give_back(client, inode, block))

    @answers(w.Symlink, role=Role.WRITER, doing="writing", grouped=True)
    def _symlink(self, session: Session, message: w.Symlink) -> w.Entry:
        applied = self._apply(session, m.MakeSymlink(message.parent, message.name, message.target, message.uid,
                                                     message.gid, self._own_inode(session, message.inode)))
        self._used_inode(session, message.inode, applied.value.inode)
        return w.Entry(applied.value)

    @answers(w.Link, role=Role.WRITER, doing="writing", grouped=True)
    def _link(self, session: Session, message: w.Link) -> w.Entry:
        applied = self._apply(session, m.MakeLink(message.inode, message.new_parent, message.new_name))
        return w.Entry(applied.value)

    @answers(w.Unlink, role=Role.WRITER, doing="writing", grouped=True)
    def _unlink(self, session: Session, message: w.Unlink) -> w.Entry:
        if message.inode and self.store.lookup(message.parent, message.name).inode != message.inode:
            raise NotFound(f"the entry names another inode than {message.inode} now")
        applied = self._apply(session, m.Unlink(
            message.parent, message.name, time_ns=self._holders_time(session, message.parent, message.time_ns)
        ))
        return w.Entry(applied.value)

    def _holders_time(self, session: Session, directory: int, time_ns: int) -> int | None:
        """
        The time a change of ``directory``'s entries is made at: the one the client gave if it holds the
        directory's lease (it answered its program with that time already), else the server's (None).
        """
        if not time_ns:
            return None
        lease = self.leases.held(directory) if self.leases else None
        return time_ns if lease is not None and lease.holder == session.id else None

    @answers(w.RmDir, role=Role.WRITER, doing="writing", grouped=True)
    def _rmdir(self, session: Session, message: w.RmDir) -> w.Entry:
        applied = self._apply(session, m.RemoveDirectory(message.parent, message.name))
        return w.Entry(applied.value)

    @answers(w.Rename, role=Role.WRITER, doing="writing", grouped=True)
    def _rename(self, session: Session, message: w.Rename) -> w.Ok:
        self._apply(session, m.Rename(message.old_parent, message.old_name, message.new_parent, message.new_name,
                                      message.flags))
        return w.Ok()

    @answers(w.SetXattr, role=Role.WRITER, doing="writing", grouped=True)
    def _setxattr(self, session: Session, message: w.SetXattr) -> w.Ok:
        self._apply(session, m.SetXattr(message.inode, message.name, message.value, message.flags))
        return w.Ok()

    @answers(w.RemoveXattr, role=Role.WRITER, doing="writing", grouped=True)
    def _removexattr(self, session: Session, message: w.RemoveXattr) -> w.Ok:
        self._apply(session, m.RemoveXattr(message.inode, message.name))
        return w.Ok()

    # -- open files and chunk maps -------------------------------------------------------

    @answers(w.Open)
    def _open(self, session: Session, message: w.Open) -> w.Opened:
        attributes = self.store.getattr(message.inode)
        writable = is_writable(message.flags)
        if attributes.nlink == 0:
            raise NotFound(f"inode {message.inode} has been removed")
        if attributes.kind == FileKind.SYMLINK:
            raise InvalidArgument(f"inode {message.inode} is a symbolic link; open its target")
        if writable:
            if attributes.kind == FileKind.DIRECTORY:
                raise IsADirectory(f"inode {message.inode} is a directory")
            self._require_role(session, Role.WRITER, "opening a file for writing")
        handle = self._open_handle(session, message.inode, writable)
        return w.Opened(handle.id, attributes)

    @answers(w.Release)
    def _release(self, session: Session, message: w.Release) -> w.Ok:
        handle = session.handle(message.handle)
        self._close_handle(session, handle)
        self._tell_lock_released(handle.inode)
        return w.Ok()

    @answers(w.ChunkMapCommit, role=Role.WRITER, doing="writing", grouped=True)
    def _chunkmap_commit(self, session: Session, message: w.ChunkMapCommit) -> w.ChunkMapCommitted:
        session.handle(message.handle, message.inode, writing=True)
        applied = self._apply(session, m.CommitChunks(
            message.inode, message.expected_version, message.size,
            tuple((chunk.index, chunk.object_id, chunk.length, chunk.object_length) for chunk in message.chunks),
            message.mtime_ns,
        ))
        return w.ChunkMapCommitted(applied.value.version, applied.value)

    # -- locks -------------------------------------------------------------------------

    def _check_grace(self) -> None:
        """End the grace period once its time is up, telling the sessions refused meanwhile."""
        if self.locks.in_grace and self.clock.seconds() >= self._grace_ends:
            if self._grace_call is not None and self._grace_call.active():
                self._grace_call.cancel()
            self._grace_call = None
            for inode in self.locks.end_grace():
                self._tell_lock_released(inode)

    def _wake_after_grace(self) -> None:
        """A request waits for the grace period: make sure something ends it on time."""
        if self._grace_call is None:
            delay = max(0.0, self._grace_ends - self.clock.seconds())
            self._grace_call = self.clock.callLater(delay, self._check_grace)

    @answers(w.Lock)
    def _lock(self, session: Session, message: w.Lock) -> Any:
        if message.lock_type == LockType.WRITE:
            self._require_role(session, Role.WRITER, "an exclusive lock")
        self.store.getattr(message.inode)
        self._check_grace()
        granted = self.locks.lock(
            (session.id, message.owner), message.inode, message.kind, message.lock_type, message.start,
            message.end, message.wait,
        )
        if granted is None:
            if message.lock_type != LockType.WRITE:  # an unlock or a downgrade may free others
                self._tell_lock_released(message.inode)
            return w.Ok()
        if self.locks.in_grace:
            self._wake_after_grace()
        return granted.addCallback(lambda _: w.Ok())

    @answers(w.LockReclaim)
    def _lock_reclaim(self, session: Session, message: w.LockReclaim) -> w.Ok:
        if message.lock_type == LockType.WRITE:
            self._require_role(session, Role.WRITER, "an exclusive lock")
        self.store.getattr(message.inode)
        self._check_grace()
        self.locks.reclaim(
            (session.id, message.owner), message.inode, message.kind, message.lock_type, message.start, message.end
        )
        return w.Ok()

    @answers(w.LockTest)
    def _lock_test(self, session: Session, message: w.LockTest) -> w.LockState:
        self.store.getattr(message.inode)
        lock = self.locks.test(
            (session.id, message.owner), message.inode, message.kind, message.lock_type, message.start, message.end
        )
        if lock is None:
            return w.LockState(LockType.UNLOCK, 0, 0, 0)
        return w.LockState(lock.lock_type, lock.start, lock.end, lock.owner[1])


def _credentials(credentials: w.Credentials) -> tuple[bytes, int, int, int, bytes, bytes]:
    """What the store keeps of credentials: KDF parameters, a verifier of the login secret, the wrapped key."""
    kdf = crypto.KdfParameters(  # checks the salt's length and the parameters' ranges
        credentials.kdf.salt, credentials.kdf.time_cost, credentials.kdf.memory_kib, credentials.kdf.parallelism
    )
    if len(credentials.login_secret) < 16 or not credentials.wrapped_key:
        raise InvalidArgument("credentials need a login secret of at least 16 bytes and a wrapped key")
    verifier = crypto.login_verifier(credentials.login_secret, kdf.salt)
    return kdf.salt, kdf.time_cost, kdf.memory_kib, kdf.parallelism, verifier, credentials.wrapped_key


def _cork(connection: Any) -> bool:
    """Hold back ``connection``'s writes until it is uncorked; False if it cannot or already is."""
    cork = getattr(connection, "cork", None)
    return bool(cork is not None and cork())


def _source(connection: ServerConnection) -> str:
    """The peer's address without its port: what login limits are counted by."""
    try:
        address = connection.transport.getPeer()  # type: ignore[union-attr]
    except Exception:
        return "unknown"
    return str(getattr(address, "host", address))
