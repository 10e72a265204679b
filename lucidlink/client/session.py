"""
A logged-in session with one filespace's metadata server, kept alive across outages.

:func:`open_session` connects (the cached endpoint first, discovery when it
fails: :func:`~lucidlink.client.resolver.connect_to_filespace`), asks for the
user's Argon2id parameters, refuses weak ones, derives the user's secrets in
a thread, logs in and unwraps the master key into
:class:`~lucidlink.crypto.FilespaceKeys`.  The passphrase is not kept: the
session keeps the two derived secrets, which is what logging in again needs.

:meth:`FilespaceSession.call` sends one request and, when the answer is a
retryable error, waits and sends it again:

- ``Busy``, ``Restoring`` and ``Unavailable`` answers: the request did
  nothing; wait (the library :class:`~lucidlink.client.backoff.Backoff`,
  never shorter than the server's ``retry_after_ms``) and send it again.
- ``ConnectionClosed`` or ``RequestTimeout``: the connection is gone (or
  silent, and is then dropped).  The next attempt connects again, logs in
  again with the kept secrets, and opens again the handles the session had
  open (handles do not outlive a connection on the server), then sends the
  request again.

This goes on until the session's ``deadline``: ``None`` waits for ever (a
``--hard`` mount), a number of seconds fails with ``Unavailable`` once a
call has tried for that long (``--soft``, the ``lucid`` command).

Requests that change the tree are not idempotent, so every attempt of a
call goes under the same request id, and the session names itself to the
server after each login (``ClientId``): the server answers a change sent
again as it answered the first attempt, and makes it once.  Where the server
cannot have kept that answer (it restarted: another ``boot_id``; too long
or too many calls ago; it does not know ``ClientId``; a change of users,
which it does not keep), one sent again after
the connection dropped may meet its own earlier success: a ``MkDir``,
``Create`` (exclusive), ``Symlink``, ``Link`` or ``UserAdd`` answered
``AlreadyExists``; an ``Unlink``, ``RmDir``, ``Rename`` or ``UserRemove``
answered ``NotFound``; a ``RemoveXattr`` answered ``NoAttribute``.  The
session cannot tell that from someone else's change, so it surfaces the
error (same class, same errno) with a note that an earlier attempt may have
done it; the command line shows that line.  ``ChunkMapCommit`` needs no
note: its ``Conflict`` is handled by rebasing (see
:mod:`lucidlink.client.filespace`), which is idempotent in content.

A file that was unlinked while open lives on the server only as long as the
session that holds it: when the connection drops, the server releases the
session's handles and reclaims the file, so its handle cannot be opened
again; such a handle reports the loss (its buffered writes are not dropped
silently: flushing them fails, naming the file).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer, task, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from lucidlink import crypto
from lucidlink.client.backoff import Backoff, FallingRateLog, retry_after_seconds
from lucidlink.client.pipeline import ChangePipeline
from lucidlink.client.resolver import Connect, Resolver, connect_to_filespace, tls_connector
from lucidlink.errors import (
    AlreadyExists,
    AuthenticationFailed,
    BadFileHandle,
    Busy,
    ConnectionClosed,
    IntegrityError,
    InvalidArgument,
    LucidError,
    NoAttribute,
    NotFound,
    NotSupported,
    RequestTimeout,
    Restoring,
    Unavailable,
)
from lucidlink.protocol import messages as w
from lucidlink.protocol.connection import OWN_REQUEST_ID_LIMIT
from lucidlink.protocol.messages import Role

DEFAULT_CHUNK_SIZE = crypto.DEFAULT_CHUNK_SIZE

O_ACCMODE = os.O_ACCMODE


class Reconnect:
    """What :meth:`Session._retrying` is doing when a session connects again on its own (to keep its locks)."""


CHANGES_KEPT = frozenset({
    w.SetAttr, w.MkDir, w.Create, w.Symlink, w.Link, w.Unlink, w.RmDir, w.Rename, w.SetXattr, w.RemoveXattr,
    w.ChunkMapCommit, w.ReserveInodes,
})
"""The requests whose answers a server keeps for a named client: the changes that wait for a group commit."""

_RETRY_ANSWERS = (Busy, Restoring, Unavailable)
_CONNECTION_GONE = (ConnectionClosed, RequestTimeout)
# Requests that may meet their own earlier success when sent again, and the error it looks like.
_NOT_IDEMPOTENT: dict[type, tuple[type[LucidError], ...]] = {
    w.MkDir: (AlreadyExists,),
    w.Create: (AlreadyExists,),
    w.Symlink: (AlreadyExists,),
    w.Link: (AlreadyExists,),
    w.UserAdd: (AlreadyExists,),
    w.Unlink: (NotFound,),
    w.RmDir: (NotFound,),
    w.Rename: (NotFound,),
    w.UserRemove: (NotFound,),
    w.RemoveXattr: (NoAttribute,),
    w.SetXattr: (AlreadyExists,),
}

Message = Any
MessageOrFactory = Any
"""A request, or a function of no arguments that makes it (called at every attempt)."""
Listener = Callable[[Any], object]


@dataclass(eq=False)
class ServerHandle:
    """A handle the metadata server gave this session; opened again after a reconnect.

    ``id`` changes when it is opened again; ``lost`` is the error that made
    opening it again impossible (the file was reclaimed, the role taken away).
    """

    inode: int
    flags: int
    id: int
    generation: int
    lost: LucidError | None = None
    released: bool = False


@dataclass(eq=False)
class _Live:
    """The logged-in connection and its number (every new connection gets a new one)."""

    connection: Any
    generation: int
    known: w.ClientKnown | None = None
    """What the server keeps of this client's answers (None: nothing)."""


def _attempt_timeout(live: _Live, asked: float | None, left: float | None) -> float | None:
    """
    Seconds one attempt waits for its answer: what the caller ``asked`` (a lock that waits for another
    client's may take hours), else the connection's own timeout, at most ``left``; None: the connection's.
    """
    if asked is not None or left is None:
        return asked
    own = getattr(live.connection, "request_timeout", None)
    return left if own is None else min(own, left)


def _reopen_flags(flags: int) -> int:
    """The flags a handle opened with ``flags`` is opened again with after a reconnect."""
    reopen_flags = flags & O_ACCMODE
    if reopen_flags == os.O_RDONLY and flags & os.O_TRUNC:
        reopen_flags = os.O_RDWR  # O_TRUNC asked to write: keep the handle writable
    return reopen_flags


def _offload(reactor: Any, function: Callable[..., Any], *arguments: Any) -> defer.Deferred[Any]:
    """Run CPU-heavy ``function`` in the reactor's thread pool."""
    return threads.deferToThreadPool(reactor, reactor.getThreadPool(), function, *arguments)


def _wire_kdf(kdf: crypto.KdfParameters) -> w.KdfParameters:
    return w.KdfParameters(kdf.salt, kdf.time_cost, kdf.memory_kib, kdf.parallelism)


class FilespaceSession:
    """
    A logged-in session with one filespace's metadata server (see the module).

    Made by :func:`open_session`.  ``role``, ``chunk_size``, ``filespace_id``,
    ``root_inode`` and ``keys`` come from the login.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        *,
        filespace: str,
        user: str,
        resolver: Resolver,
        connect: Connect,
        deadline: float | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        if deadline is not None and deadline <= 0:
            raise InvalidArgument(f"a session deadline is a positive number of seconds, not {deadline}")
        self.reactor = reactor
        self.filespace = filespace
        self.user = user
        self.resolver = resolver
        self.deadline = deadline
        self.backoff = backoff if backoff is not None else resolver.backoff
        self.role: Role | None = None
        self.chunk_size = 0
        self.filespace_id = b""
        self.root_inode = 0
        self.keys: crypto.FilespaceKeys | None = None
        self.reconnects = 0
        """How many times the session connected again after losing its connection."""
        self._connect = connect
        self._secrets: crypto.UserSecrets | None = None
        self._passphrase: str | None = None
        self._wrapped_key = b""
        self._live: _Live | None = None
        self._generation = 0
        self.client_id = os.urandom(16)
        """This client's name to the server, the same on every connection (see ``ClientId``)."""
        self._calls = 0
        self._establishing = False
        self._waiting: list[defer.Deferred[_Live]] = []
        self._handles: set[ServerHandle] = set()
        self._notify_listeners: list[Listener] = []
        self._reconnect_listeners: list[Callable[[], object]] = []
        self._lost_listeners: list[Callable[[], object]] = []
        self._keep_connected: list[Callable[[], bool]] = []
        self._closed = False
        self.pipeline = ChangePipeline(self)
        """The changes sent without waiting for their answers (see :mod:`lucidlink.client.pipeline`)."""

    def __repr__(self) -> str:
        return f"<FilespaceSession {self.user!r} on {self.filespace!r}>"

    # -- hooks ---------------------------------------------------------------

    def on_notify(self, listener: Listener) -> Callable[[], None]:
        """Call ``listener`` with every pushed ``Notify`` and ``StatusChanged``; returns an unsubscribe function."""
        self._notify_listeners.append(listener)
        return lambda: self._notify_listeners.remove(listener) if listener in self._notify_listeners else None

    def on_reconnect(self, listener: Callable[[], object]) -> Callable[[], None]:
        """Call ``listener`` after every reconnect: notifications may have been missed meanwhile."""
        self._reconnect_listeners.append(listener)
        return lambda: self._reconnect_listeners.remove(listener) if listener in self._reconnect_listeners else None

    def on_connection_lost(self, listener: Callable[[], object]) -> Callable[[], None]:
        """Call ``listener`` whenever the connection is lost or dropped: notifications may be missed from then on."""
        self._lost_listeners.append(listener)
        return lambda: self._lost_listeners.remove(listener) if listener in self._lost_listeners else None

    # -- requests ------------------------------------------------------------

    def keep_connected(self, wanted: Callable[[], bool]) -> Callable[[], None]:
        """Connect again at once when the connection is lost while ``wanted()`` (not at the next call).

        For state the server forgets with a session, such as locks, that must
        be taken again before others take it; returns an unsubscribe.
        """
        self._keep_connected.append(wanted)
        return lambda: self._keep_connected.remove(wanted) if wanted in self._keep_connected else None

    def call(self, message: MessageOrFactory, timeout: float | None = None) -> defer.Deferred[Any]:
        """
        Send a request and fire with its answer, retrying as the module says.

        ``message`` may be a function that makes the request, called at every
        attempt (a request that names a handle must be made after a
        reconnect opened the handle again).  ``timeout`` is the time one
        attempt may wait for its answer (the connection's default if None).
        """

        def send(live: _Live, request_id: int, left: float | None) -> defer.Deferred[Any]:
            request = message() if callable(message) else message
            return live.connection.request(request, timeout=_attempt_timeout(live, timeout, left), request_id=request_id)

        kind = type(message() if callable(message) else message)
        return self._retrying(send, kind)

    def open_handle(self, inode: int, flags: int) -> defer.Deferred[tuple[ServerHandle, w.Attributes]]:
        """``Open`` ``inode``: a handle the session opens again after a reconnect, and the attributes."""
        return self._opening(w.Open(inode, flags), inode_of=lambda answer: answer.attributes.inode, flags=flags)

    def create_handle(self, request: w.Create) -> defer.Deferred[tuple[ServerHandle, w.Attributes]]:
        """``Create`` (and open) a file: as :meth:`open_handle`."""
        return self._opening(request, inode_of=lambda answer: answer.attributes.inode, flags=request.open_flags)

    def handle_to_come(self, inode: int, flags: int) -> ServerHandle:
        """
        The handle of a file whose ``Create`` was posted to the :attr:`pipeline`: its id comes with the answer
        (:meth:`handle_came`).  Requests that name it are sent after the pipeline's answers, so they have it.
        """
        return ServerHandle(inode, _reopen_flags(flags), 0, 0)

    def handle_came(self, handle: ServerHandle, handle_id: int, generation: int) -> None:
        """The ``Create`` of :meth:`handle_to_come`'s ``handle`` was answered on connection ``generation``."""
        handle.id, handle.generation = handle_id, generation
        if handle.released or self._closed:
            return
        self._handles.add(handle)
        live = self._live
        if live is not None and live.generation != generation:  # answered by a connection since replaced
            self._reopen_handles(live).addErrback(
                lambda failure: self.log.info("could not open inode {inode} again: {error}",
                                              inode=handle.inode, error=failure.value)
            )

    def release_handle(self, handle: ServerHandle) -> defer.Deferred[None]:
        """``Release`` a handle; nothing to do once its connection is gone (the server let it go then)."""
        handle.released = True
        self._handles.discard(handle)
        if handle.lost is not None:
            return defer.succeed(None)

        def send(live: _Live, request_id: int, left: float | None) -> defer.Deferred[Any]:
            if live.generation != handle.generation:
                return defer.succeed(None)
            release = live.connection.request(
                w.Release(handle.id), timeout=_attempt_timeout(live, None, left), request_id=request_id
            )
            return release.addErrback(_ignore, BadFileHandle)

        return self._retrying(send, w.Release).addCallback(lambda _: None)

    @defer.inlineCallbacks
    def _opening(
        self, request: Message, inode_of: Callable[[Any], int], flags: int
    ) -> Generator[defer.Deferred[Any], Any, tuple[ServerHandle, w.Attributes]]:
        answered: list[int] = []

        def send(live: _Live, request_id: int, left: float | None) -> defer.Deferred[Any]:
            def note(answer: Any) -> Any:
                answered.append(live.generation)
                return answer

            return live.connection.request(
                request, timeout=_attempt_timeout(live, None, left), request_id=request_id
            ).addCallback(note)

        opened = yield self._retrying(send, type(request))
        handle = ServerHandle(inode_of(opened), _reopen_flags(flags), opened.handle, answered[-1])
        self._handles.add(handle)
        return handle, opened.attributes

    @defer.inlineCallbacks
    def _retrying(
        self, send: Callable[[_Live, int, float | None], defer.Deferred[Any]], kind: type, ordered: bool = True
    ) -> Generator[defer.Deferred[Any], Any, Any]:
        """
        ``send(live connection, request id, seconds left)`` until it answers, as the module says.

        ``ordered``: sent only once every change posted to the :attr:`pipeline`
        before it is answered, so that it comes after them and sees them.

        Every attempt carries the same request id, so a server that keeps
        answers (:class:`~lucidlink.protocol.messages.ClientKnown`) answers
        a change sent again as it answered it the first time.  ``seconds
        left`` (None without a deadline) bounds the wait for one answer that
        has no timeout of its own, so that a server that keeps the connection
        but answers nothing costs a soft session its deadline, not a request
        timeout.
        """
        what = kind.__name__
        clock = self.reactor
        if ordered and len(self.pipeline):
            yield self.pipeline.settled()
        started = clock.seconds()
        deadline = None if self.deadline is None else started + self.deadline
        attempt = 0
        request_id = self._next_call_id()
        first_sent: _Live | None = None
        maybe_done = False
        first_failure: LucidError | None = None  # named too when the last attempt, cut short, says less
        run = FallingRateLog(clock)
        while True:
            if self._closed:
                raise ConnectionClosed(f"the session with {self.filespace!r} is closed")
            live = None
            try:
                live = yield self._connected(deadline)
                if first_sent is None:
                    first_sent = live
                answer = yield send(live, request_id, None if deadline is None else max(0.001, deadline - clock.seconds()))
                return answer
            except _CONNECTION_GONE as error:
                if live is not None:
                    maybe_done = True
                    self._drop(live)
                last: LucidError = error
            except _RETRY_ANSWERS as error:
                last = error
            except LucidError as error:
                if (
                    maybe_done and isinstance(error, _NOT_IDEMPOTENT.get(kind, ()))
                    and not (kind in CHANGES_KEPT and self._answer_kept(first_sent, live, request_id, started))
                ):
                    raise type(error)(
                        f"{error} ({what} was sent again after the connection to the metadata server was lost;"
                        " the first attempt may have done it)"
                    ) from None
                raise
            if first_failure is None:
                first_failure = last
            delay = self.backoff.delay(attempt, retry_after_seconds(last))
            attempt += 1
            now = clock.seconds()
            if deadline is not None and now + delay >= deadline:
                earlier = f" (first: {first_failure})" if str(first_failure) != str(last) else ""
                raise Unavailable(
                    f"the metadata server of {self.filespace!r} did not answer {what} within"
                    f" {self.deadline:g} s: {last}{earlier}",
                    retry_after_ms=last.retry_after_ms,
                )
            if run.failure():
                self.log.info(
                    "{what} to {filespace!r} failed ({failures} times so far); trying again in {delay:.2f} s: {error}",
                    what=what, filespace=self.filespace, failures=run.failures, delay=delay, error=last,
                )
            yield task.deferLater(clock, delay, lambda: None)

    def _next_call_id(self) -> int:
        """
        A request id for one call, the same at every attempt: from ``OWN_REQUEST_ID_LIMIT`` up (a connection
        numbers its own requests below), the call's number modulo that.
        """
        self._calls += 1
        return OWN_REQUEST_ID_LIMIT + self._calls % OWN_REQUEST_ID_LIMIT

    def _answer_kept(self, first: _Live | None, live: _Live | None, request_id: int, started: float) -> bool:
        """
        Whether the answer to a call sent again on ``live`` is the one its first attempt got.

        So when the server named the same boot on both connections and keeps
        answers long enough and many enough to still hold this call's.
        """
        if first is None or live is None or first.known is None or live.known is None:
            return False
        known = live.known
        return (
            bytes(first.known.boot_id) == bytes(known.boot_id)
            and self.reactor.seconds() - started < known.remember_ms / 1000
            and (self._calls - request_id) % OWN_REQUEST_ID_LIMIT < known.remember_count  # calls made since
        )

    # -- the connection --------------------------------------------------------

    def _connected(self, deadline: float | None) -> defer.Deferred[_Live]:
        """The logged-in connection: the current one, or a new one (one attempt for all callers)."""
        if self._live is not None:
            return defer.succeed(self._live)
        waiter: defer.Deferred[_Live] = defer.Deferred()
        self._waiting.append(waiter)
        if not self._establishing:
            self._establishing = True
            self._establish(deadline).addBoth(self._established)
        return waiter

    def _established(self, result: Any) -> None:
        self._establishing = False
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            if isinstance(result, Failure):
                waiter.errback(result)
            else:
                waiter.callback(result)

    @defer.inlineCallbacks
    def _establish(self, deadline: float | None) -> Generator[defer.Deferred[Any], Any, _Live]:
        first = self.keys is None  # never logged in (a first login may have derived the secrets already)
        connection = yield connect_to_filespace(
            self.resolver, self.filespace, self._connect, deadline, known_to_exist=not first
        )
        self._generation += 1
        live = _Live(connection, self._generation)
        try:
            connection.on_push = self._pushed
            yield self._log_in(connection)
            live.known = yield self._name_client(connection)
            yield self._reopen_handles(live)
            if not self._closed:
                self.pipeline.send_again(live)  # before any other request: changes go in the order they were made
        except BaseException:
            connection.close("login failed", timeout=0)
            raise
        if self._closed:
            connection.close("session closed")
            raise ConnectionClosed(f"the session with {self.filespace!r} is closed")
        self._live = live
        connection.when_lost().addCallback(self._lost, live)
        if not first:
            self.reconnects += 1
            self.log.info("connected to the metadata server of {filespace!r} again", filespace=self.filespace)
            for listener in list(self._reconnect_listeners):
                try:
                    listener()
                except Exception:
                    self.log.failure("reconnect listener failed")
        return live

    @defer.inlineCallbacks
    def _log_in(self, connection: Any) -> Generator[defer.Deferred[Any], Any, None]:
        if self._secrets is None:
            challenge = yield connection.request(w.LoginStart(self.user))
            crypto.check_kdf_strength(challenge.kdf)
            passphrase, self._passphrase = self._passphrase, None
            if passphrase is None:
                raise AuthenticationFailed(f"no passphrase to log in to {self.filespace!r} as {self.user!r}")
            try:
                self._secrets = yield _offload(self.reactor, crypto.derive_user_secrets, passphrase, challenge.kdf)
            except BaseException:
                self._passphrase = passphrase
                raise
        first = self.keys is None
        try:
            ok = yield connection.request(w.Login(self.user, self._secrets.login_secret))
        except AuthenticationFailed:
            if first:
                raise AuthenticationFailed(f"wrong passphrase for user {self.user!r} (or no such user)") from None
            raise AuthenticationFailed(
                f"cannot log in to {self.filespace!r} again as {self.user!r}: the passphrase was changed"
                " or the user removed meanwhile"
            ) from None
        if first:
            try:
                master_key = crypto.unwrap_master_key(
                    self._secrets.wrapping_key, ok.wrapped_key, ok.filespace_id, self.user
                )
            except AuthenticationFailed:
                raise AuthenticationFailed(f"wrong passphrase for user {self.user!r} (or no such user)") from None
            self.keys = crypto.FilespaceKeys(master_key, ok.filespace_id)
            self.filespace_id = bytes(ok.filespace_id)
            self.chunk_size = ok.chunk_size
            self.root_inode = ok.root_inode
        elif (bytes(ok.filespace_id), ok.chunk_size, ok.root_inode) != (
            self.filespace_id, self.chunk_size, self.root_inode
        ):
            raise IntegrityError(
                f"the metadata server of {self.filespace!r} now serves a filespace with another id or shape"
            )
        self.role = ok.role
        self._wrapped_key = bytes(ok.wrapped_key)

    @defer.inlineCallbacks
    def _name_client(self, connection: Any) -> Generator[defer.Deferred[Any], Any, w.ClientKnown | None]:
        """Tell the server this client's id; what it keeps of answers (None: a server that keeps none)."""
        try:
            known = yield connection.request(w.ClientId(self.client_id))
        except NotSupported:
            return None
        return known  # type: ignore[no-any-return]

    @defer.inlineCallbacks
    def _reopen_handles(self, live: _Live) -> Generator[defer.Deferred[Any], Any, None]:
        for handle in list(self._handles):
            if handle.generation == live.generation or handle.lost is not None:
                continue
            try:
                opened = yield live.connection.request(w.Open(handle.inode, handle.flags))
            except (*_CONNECTION_GONE, *_RETRY_ANSWERS):
                raise
            except LucidError as error:
                handle.lost = type(error)(
                    f"inode {handle.inode} could not be opened again after the connection was lost: {error}"
                )
                self._handles.discard(handle)
                continue
            handle.id, handle.generation = opened.handle, live.generation

    def _lost(self, reason: Any, live: _Live) -> None:
        if self._live is live:
            self._live = None
            self._tell_lost()
            if not self._closed:
                self.log.info(
                    "lost the connection to the metadata server of {filespace!r}: {reason}",
                    filespace=self.filespace, reason=reason,
                )
                if any(wanted() for wanted in self._keep_connected):
                    # Retried like any request: a server that is restarting or restoring closes early attempts.
                    self.connect_again().addErrback(
                        lambda failure: self.log.warn("could not connect again: {error}", error=failure.value)
                    )

    def connect_again(self) -> defer.Deferred[Any]:
        """Connect (and log in) again now, retrying as calls do: until the deadline, if the session has one."""
        return self._retrying(lambda live, request_id, left: defer.succeed(None), Reconnect, ordered=False)

    def _drop(self, live: _Live) -> None:
        """Stop using a connection that failed a request (closing it at once if it still looks alive)."""
        if self._live is live:
            self._live = None
            self._tell_lost()
        live.connection.close("a request failed; connecting again", timeout=0)

    def _tell_lost(self) -> None:
        for listener in list(self._lost_listeners):
            try:
                listener()
            except Exception:
                self.log.failure("connection-lost listener failed")

    def _pushed(self, message: Any) -> None:
        for listener in list(self._notify_listeners):
            try:
                listener(message)
            except Exception:
                self.log.failure("notification listener failed on {message}", message=type(message).__name__)

    @defer.inlineCallbacks
    def close(self) -> Generator[defer.Deferred[Any], Any, None]:
        """Say goodbye and close the connection; the server releases the session's handles and locks."""
        self._closed = True
        self._handles.clear()
        live, self._live = self._live, None
        if live is not None:
            yield live.connection.close("session closed")  # the answers in flight are heard first
        self.pipeline.fail_all(ConnectionClosed(f"the session with {self.filespace!r} is closed"))

    # -- users and keys -----------------------------------------------------------

    def _master_key(self) -> bytes:
        if self._secrets is None:
            raise AuthenticationFailed("the session is not logged in")
        return crypto.unwrap_master_key(self._secrets.wrapping_key, self._wrapped_key, self.filespace_id, self.user)

    @defer.inlineCallbacks
    def _credentials(
        self, name: str, passphrase: str, kdf: crypto.KdfParameters | None
    ) -> Generator[defer.Deferred[Any], Any, tuple[w.Credentials, crypto.UserSecrets]]:
        kdf = kdf if kdf is not None else crypto.new_kdf_parameters()
        user_secrets = yield _offload(self.reactor, crypto.derive_user_secrets, passphrase, kdf)
        wrapped = crypto.wrap_master_key(user_secrets.wrapping_key, self._master_key(), self.filespace_id, name)
        return w.Credentials(_wire_kdf(kdf), user_secrets.login_secret, wrapped), user_secrets

    @defer.inlineCallbacks
    def add_user(
        self, name: str, role: Role, passphrase: str, *, kdf: crypto.KdfParameters | None = None
    ) -> Generator[defer.Deferred[Any], Any, None]:
        """
        Add a user: their credentials are derived here, from their passphrase, and the master key wrapped for them.

        ``kdf``: Argon2id parameters with a fresh salt (default: the library's costs and a new salt).
        """
        credentials, _ = yield self._credentials(name, passphrase, kdf)
        yield self.call(w.UserAdd(name, Role(role), credentials))

    def remove_user(self, name: str) -> defer.Deferred[None]:
        """Remove a user; their sessions end."""
        return self.call(w.UserRemove(name)).addCallback(lambda _: None)

    @defer.inlineCallbacks
    def change_passphrase(
        self, name: str, new_passphrase: str, *, kdf: crypto.KdfParameters | None = None
    ) -> Generator[defer.Deferred[Any], Any, None]:
        """Give user ``name`` (this session's own user, or anyone for an admin) a new passphrase."""
        credentials, user_secrets = yield self._credentials(name, new_passphrase, kdf)
        yield self.call(w.UserPasswd(name, credentials))
        if name == self.user:
            # Log in with the new secrets from now on.
            self._secrets = user_secrets
            self._wrapped_key = credentials.wrapped_key

    def list_users(self) -> defer.Deferred[list[w.UserInfo]]:
        """The users of the filespace and their roles, by name (admins only)."""
        return self.call(w.UserList()).addCallback(lambda listing: list(listing.users))

    def export_key(self) -> str:
        """An offline recovery copy of the master key (:func:`lucidlink.crypto.export_key`)."""
        return crypto.export_key(self.filespace_id, self._master_key(), self.filespace)


def _ignore(failure: Failure, *errors: type[Exception]) -> None:
    """An errback that swallows ``errors`` and passes anything else on."""
    failure.trap(*errors)


@defer.inlineCallbacks
def open_session(
    reactor: Any,
    *,
    filespace: str,
    user: str,
    passphrase: str,
    resolver: Resolver,
    ca_file: Path | str | None = None,
    deadline: float | None = None,
    connect: Connect | None = None,
    backoff: Backoff | None = None,
) -> Generator[defer.Deferred[Any], Any, FilespaceSession]:
    """
    Log in to ``filespace`` as ``user``: a :class:`FilespaceSession`.

    :param resolver: finds the metadata server (its endpoint cache first).
    :param ca_file: the CA that signs metadata server certificates (unless ``connect`` is given).
    :param deadline: seconds a call (and this login) may keep retrying; ``None``: for ever.
    :param connect: how to connect (default: TLS with ``ca_file``).
    :param backoff: delays between retries (default: the resolver's).
    :raise AuthenticationFailed: "wrong passphrase for user 'U' (or no such user)",
        or weak Argon2id parameters offered by the server.
    :raise Unavailable: when the server could not be reached before the deadline.
    """
    if connect is None:
        if ca_file is None:
            raise InvalidArgument("connecting to a metadata server needs the CA file that signs its certificate")
        connect = tls_connector(reactor, Path(ca_file), filespace=filespace, peer_name=f"lucid ({user})")
    session = FilespaceSession(
        reactor, filespace=filespace, user=user, resolver=resolver, connect=connect, deadline=deadline,
        backoff=backoff,
    )
    session._passphrase = passphrase
    yield session._retrying(lambda live, request_id, left: defer.succeed(None), w.Login)
    return session


@defer.inlineCallbacks
def initialise_filespace(
    reactor: Any,
    *,
    connection: Any,
    token: bytes | str,
    admin: str,
    passphrase: str,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    kdf: crypto.KdfParameters | None = None,
) -> Generator[defer.Deferred[Any], Any, bytes]:
    """
    Initialise a new filespace over ``connection`` (``lucid filespace init``): fires with its id.

    The master key and the filespace id are made here, on the client; the
    admin's credentials are derived from ``passphrase`` (``kdf``: Argon2id
    parameters with a fresh salt, default the library's) and the key wrapped
    for them, then ``Bootstrap`` with the server's one-time ``token``.
    """
    if isinstance(token, str):
        token = token.strip().encode("utf-8")
    master_key = crypto.new_master_key()
    filespace_id = crypto.new_filespace_id()
    kdf = kdf if kdf is not None else crypto.new_kdf_parameters()
    user_secrets = yield _offload(reactor, crypto.derive_user_secrets, passphrase, kdf)
    wrapped = crypto.wrap_master_key(user_secrets.wrapping_key, master_key, filespace_id, admin)
    credentials = w.Credentials(_wire_kdf(kdf), user_secrets.login_secret, wrapped)
    yield connection.request(w.Bootstrap(token, admin, credentials, chunk_size, filespace_id, b""))
    return filespace_id
