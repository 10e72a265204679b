"""
Where is a filespace served?  Asking discovery, and connecting with the cache first.

:class:`Resolver` knows several discovery instances (endpoint strings), the
CA that signs their certificates and the TLS identity they present
(``discovery.lucid`` unless configured otherwise).  :meth:`Resolver.resolve`
asks them in a random order, shuffled for every round so that clients spread
over the instances; an instance that is unreachable, presents a certificate
that is refused or does not answer in time is passed over for the next.  An
instance that accepted the TCP connection has ``handshake_patience`` rather
than ``attempt_timeout`` to finish the handshake: an instance over its limits
leaves new connections in its listen backlog and serves them in order, and a
client that gave up there would only join the back of the queue again.  An
instance that answers ``Busy`` has already cost a TLS handshake, so the
client keeps that connection and asks again on it after the ``retry_after``
(plus jitter: :meth:`~lucidlink.client.backoff.Backoff.after_busy`), for up
to ``busy_patience`` seconds per instance, before it passes on.  When a whole round fails, it waits a backoff delay (capped
exponential, full jitter, never shorter than the largest ``retry_after`` it
was given) and goes round again, until the caller's deadline: ``None`` keeps
trying for ever, logging at a falling rate (a ``--hard`` mount); a deadline
gives up with :class:`~lucidlink.errors.Unavailable`, whose message says
what went wrong at each instance (a ``--soft`` mount, the ``lucid``
command).  It gives up as soon as the next round could not start before
the deadline, rather than sleeping until the deadline to fail there.  ``UnknownFilespace`` is definitive and raised at once.  Every
answer is stored in the :class:`~lucidlink.client.endpoint_cache.EndpointCache`.

To reconnect, :meth:`Resolver.locate` serves the cached answer without
asking discovery at all, however old it is: a stale answer costs one failed
connection, a fresh one saves a discovery request for every client that
reconnects at once; :meth:`Resolver.forget` (the cached endpoint
failed) and :meth:`Resolver.moved` (the server does not serve the filespace
any more) make the next ``locate`` ask.  :func:`connect_to_filespace` puts it
together: the cached endpoints first, discovery only when they fail, with
backoff between rounds.  That is how a reconnect storm misses discovery:

- a server restarting at its address is waited for there, ``cache_patience``
  seconds after it last accepted a connection (``handshake_patience`` at
  most), before discovery is asked;
- an attempt whose TCP connection is made is not cut off at
  ``attempt_timeout``: a server that accepted it is there, only slow (it
  has thousands of handshakes to make after a restart), and gets up to
  ``handshake_patience`` to finish;
- when discovery is asked and names the endpoint already known, the client
  keeps to that endpoint and does not ask again until the answer's TTL has
  run out: one discovery request per client per TTL at most, however long
  the server takes to come back.

Deadlines are absolute times on the injected clock (``clock.seconds()``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from lucidlink.client.backoff import Backoff, FallingRateLog, retry_after_seconds
from lucidlink.client.config import DEFAULT_DISCOVERY_IDENTITY, ClientConfig
from lucidlink.client.endpoint_cache import EndpointCache, Location
from lucidlink.errors import (
    Busy,
    InvalidArgument,
    NotFound,
    ProtocolError,
    RequestTimeout,
    TLSVerificationError,
    Unavailable,
    UnknownFilespace,
    VersionMismatch,
)
from lucidlink.protocol.messages import Resolve, Resolved
from lucidlink.protocol.network import client_endpoint, connect_tls

DEFAULT_ATTEMPT_TIMEOUT = 5.0
"""Seconds one instance or server has to connect, shake hands and answer."""

DEFAULT_LOG_INTERVAL = 300.0
"""A long run of failures is logged at least this often (see FallingRateLog)."""

DEFAULT_CACHE_PATIENCE = 10.0
"""Long enough for a metadata server to restart at its address."""

DEFAULT_HANDSHAKE_PATIENCE = 60.0
"""Seconds a server that accepted the TCP connection has to finish the handshake."""

DEFAULT_BUSY_PATIENCE = 10.0
"""Seconds of ``Busy`` waits one discovery connection is kept for."""

_CLOSE_GRACE = 2.0

Connect = Callable[..., "defer.Deferred[Any]"]
"""
``connect(endpoint, identity)``: a Deferred of a ready connection, or a LucidError.

A connect with a true ``reports_connected`` attribute also takes
``connected=callback``, called once the TCP connection is made (before the
handshake), as :class:`TLSConnector` does.
"""


class TLSConnector:
    """
    A :data:`Connect` that speaks TLS, trusting the CA in ``ca_file`` alone.

    ``options`` go to :class:`~lucidlink.protocol.connection.ClientConnection`.

    :raise NotFound: if ``ca_file`` is missing.
    """

    reports_connected = True

    def __init__(self, reactor: Any, ca_file: Path, **options: Any) -> None:
        if not Path(ca_file).is_file():
            raise NotFound(f"no CA certificate at {ca_file}")
        options.setdefault("peer_name", "lucid")
        self.reactor = reactor
        self.ca_file = ca_file
        self.options = options

    def __call__(
        self, endpoint: str, identity: str, connected: Callable[[], object] | None = None
    ) -> defer.Deferred[Any]:
        return connect_tls(self.reactor, endpoint, self.ca_file, identity, connected=connected, **self.options)


tls_connector = TLSConnector


def check_endpoints(reactor: Any, endpoints: Sequence[str]) -> None:
    """Raise InvalidArgument naming the first string that is not a client endpoint description."""
    for endpoint in endpoints:
        try:
            client_endpoint(reactor, endpoint)
        except Exception as error:
            raise InvalidArgument(
                f"{endpoint!r} is not an endpoint string like 'tcp:discovery.example:7000': {error}"
            ) from None


class _NoAnswer(Exception):
    """A round over the discovery instances found none that answered."""

    def __init__(self, retry_after: float, hopeless: bool) -> None:
        super().__init__("no discovery instance answered")
        self.retry_after = retry_after
        self.hopeless = hopeless


class Resolver:
    """
    Asks the discovery instances where filespaces are served, with failover and backoff.

    :param reactor: the clock for timeouts and waits; also the reactor to
        connect with, unless ``connect`` is given.
    :param discovery: endpoint strings of the discovery instances.
    :param ca_file: the CA whose certificates to trust (needed unless
        ``connect`` is given).
    :param identity: the TLS identity every discovery instance presents.
    :param cache: where answers are kept; ``None`` keeps nothing.
    :param rng: the random source for the order of instances and for jitter.
    :param backoff: delays between rounds (default: drawn from ``rng``).
    :param connect: how to connect (tests); default :func:`tls_connector`.
    :param attempt_timeout: seconds one instance has to connect and answer.
    :param fail_fast: give up after a round in which every instance refused
        for a reason waiting will not cure (its certificate was refused, it
        speaks another protocol version), even before the deadline; for
        one-shot commands.  Mounts leave it off and wait for an operator.
    :param log_interval: a long run of failed rounds is logged at least
        this often.
    :param cache_patience: seconds during which a reconnect keeps trying the
        cached endpoint of a filespace (a metadata server restarting at its
        address) before it asks discovery; a server that answers it does not
        serve the filespace, or presents another identity, ends the patience
        at once, and one that accepts the TCP connection starts it again
        (up to ``handshake_patience`` from the first attempt).  This keeps a
        fleet-wide restart from reaching discovery.
    :param handshake_patience: seconds a server or discovery instance that
        accepted the TCP connection (so it is there, if slow) has to finish
        the handshake, instead of ``attempt_timeout``; for connects that
        report it (see :data:`Connect`).
    :param busy_patience: seconds of ``Busy`` waits a discovery connection
        is kept for, asking again on it, before the next instance is tried.

    :attr:`discovery_requests` counts the requests sent to discovery
    instances (every attempt, answered or not); benchmarks read it.
    """

    log = Logger()

    def __init__(
        self,
        reactor: IReactorTime,
        discovery: Sequence[str],
        ca_file: Path | None = None,
        identity: str = DEFAULT_DISCOVERY_IDENTITY,
        *,
        cache: EndpointCache | None = None,
        rng: random.Random | None = None,
        backoff: Backoff | None = None,
        connect: Connect | None = None,
        attempt_timeout: float = DEFAULT_ATTEMPT_TIMEOUT,
        fail_fast: bool = False,
        log_interval: float = DEFAULT_LOG_INTERVAL,
        cache_patience: float = DEFAULT_CACHE_PATIENCE,
        handshake_patience: float = DEFAULT_HANDSHAKE_PATIENCE,
        busy_patience: float = DEFAULT_BUSY_PATIENCE,
    ) -> None:
        if not discovery:
            raise InvalidArgument("no discovery endpoints to ask")
        if connect is None:
            if ca_file is None:
                raise InvalidArgument("a resolver that makes its own TLS connections needs a CA file")
            check_endpoints(reactor, discovery)
            connect = tls_connector(reactor, ca_file, keepalive_interval=0)
        self.clock = reactor
        self.discovery = tuple(discovery)
        self.identity = identity
        self.cache = cache
        self.rng = rng if rng is not None else random.Random()
        self.backoff = backoff if backoff is not None else Backoff(self.rng)
        self.attempt_timeout = attempt_timeout
        self.fail_fast = fail_fast
        self.log_interval = log_interval
        self.cache_patience = cache_patience
        self.handshake_patience = handshake_patience
        self.busy_patience = busy_patience
        self.discovery_requests = 0
        self._connect = connect
        self._stale: set[str] = set()
        self._closing: set[defer.Deferred[Any]] = set()

    @classmethod
    def from_config(cls, reactor: Any, config: ClientConfig, **options: Any) -> Resolver:
        """A resolver for the discovery instances, CA and state folder of ``config``."""
        return cls(
            reactor,
            config.require_discovery(),
            config.require_ca(),
            config.discovery_identity,
            cache=EndpointCache(config.state_dir),
            **options,
        )

    # -- the cache --------------------------------------------------------

    def cached(self, filespace: str) -> Location | None:
        """The cached location of ``filespace``, unless it was forgotten since."""
        if self.cache is None or filespace in self._stale:
            return None
        return self.cache.get(filespace)

    def locate(self, filespace: str, deadline: float | None = None) -> defer.Deferred[Location]:
        """Where ``filespace`` is: the cached answer if there is one (no request at all), else :meth:`resolve`."""
        location = self.cached(filespace)
        if location is not None:
            return defer.succeed(location)
        return self.resolve(filespace, deadline)

    def forget(self, filespace: str) -> None:
        """The cached endpoint failed: the next :meth:`locate` asks discovery.

        The entry stays on disk, so a client that restarts before discovery
        answers still tries the last known endpoint first.
        """
        self._stale.add(filespace)

    def moved(self, filespace: str) -> None:
        """The cached endpoint does not serve ``filespace`` any more: drop it, on disk too."""
        self._stale.add(filespace)
        if self.cache is not None:
            self.cache.remove(filespace)

    # -- asking discovery -------------------------------------------------

    @defer.inlineCallbacks
    def resolve(
        self, filespace: str, deadline: float | None = None
    ) -> Generator[defer.Deferred[Any], Any, Location]:
        """
        Ask discovery where ``filespace`` is served, round after round until ``deadline``.

        :raise UnknownFilespace: at once, when an instance says no such
            filespace is registered.
        :raise Unavailable: at the deadline (or, with ``fail_fast``, when no
            instance can be used), saying what went wrong at each instance.
        """
        started = self.clock.seconds()
        failures: dict[str, str] = {}
        run = FallingRateLog(self.clock, self.log_interval)
        attempt = 0
        while True:
            try:
                location = yield self._round(filespace, deadline, failures)
            except _NoAnswer as no_answer:
                retry_after, hopeless = no_answer.retry_after, no_answer.hopeless
            else:
                if run.failures:
                    self.log.info(
                        "discovery answered for {filespace!r} after {rounds} failed rounds",
                        filespace=filespace, rounds=run.failures,
                    )
                return location
            delay = self.backoff.delay(attempt, retry_after)
            attempt += 1
            now = self.clock.seconds()
            if (deadline is not None and now + delay >= deadline) or (self.fail_fast and hopeless):
                raise Unavailable(
                    self._explain(filespace, failures, attempt, now - started),
                    retry_after_ms=round(retry_after * 1000),
                )
            if run.failure():
                self.log.warn(
                    "no discovery instance answered for {filespace!r} ({rounds} rounds so far);"
                    " trying again in {delay:.1f} s: {why}",
                    filespace=filespace, rounds=run.failures, delay=delay,
                    why=self._describe_all(failures),
                )
            yield task.deferLater(self.clock, delay, lambda: None)

    def resolve_once(self, filespace: str, deadline: float | None = None) -> defer.Deferred[Location]:
        """
        One round over the discovery instances, no waiting: the first answer, or Unavailable.

        The Unavailable carries the largest ``retry_after_ms`` an instance asked for.
        """
        started = self.clock.seconds()
        failures: dict[str, str] = {}

        def no_answer(failure: Failure) -> Failure:
            failure.trap(_NoAnswer)
            retry_after = failure.value.retry_after  # type: ignore[union-attr]
            return Failure(
                Unavailable(
                    self._explain(filespace, failures, 1, self.clock.seconds() - started),
                    retry_after_ms=round(retry_after * 1000),
                )
            )

        return self._round(filespace, deadline, failures).addErrback(no_answer)

    def close(self) -> defer.Deferred[Any]:
        """Fires once every connection to discovery this resolver opened is closed."""
        return defer.DeferredList(list(self._closing))

    @defer.inlineCallbacks
    def _round(
        self, filespace: str, deadline: float | None, failures: dict[str, str]
    ) -> Generator[defer.Deferred[Any], Any, Location]:
        order = list(self.discovery)
        self.rng.shuffle(order)
        retry_after = 0.0
        hopeless = True
        for endpoint in order:
            timeout = self.attempt_timeout
            if deadline is not None:
                timeout = min(timeout, deadline - self.clock.seconds())
                if timeout <= 0:
                    hopeless = False
                    break
            try:
                resolved = yield self._ask(endpoint, filespace, timeout, deadline)
            except defer.CancelledError:
                raise
            except UnknownFilespace:
                raise UnknownFilespace(f"no filespace named {filespace!r} is registered with discovery") from None
            except Exception as error:
                _note_failure(failures, endpoint, error, cut_short=timeout < self.attempt_timeout)
                retry_after = max(retry_after, retry_after_seconds(error))
                hopeless = hopeless and isinstance(error, (TLSVerificationError, VersionMismatch))
                continue
            location = Location.from_resolved(resolved, self.clock.seconds(), source=endpoint)
            self._stale.discard(filespace)
            if self.cache is not None:
                self.cache.put(location)
            return location
        raise _NoAnswer(retry_after, hopeless)

    @defer.inlineCallbacks
    def _ask(
        self, endpoint: str, filespace: str, timeout: float, deadline: float | None
    ) -> Generator[defer.Deferred[Any], Any, Resolved]:
        """
        Connect within ``timeout`` (``handshake_patience`` once the TCP connection
        is made: the instance is there, and its backlog is served in order), then
        ask, each answer within ``timeout``; wait out Busy answers on the same connection.
        """
        self.discovery_requests += 1
        connection = yield _patient_attempt(self, self._connect, endpoint, self.identity, timeout, deadline, _nothing)
        busy_waited = 0.0
        due = timeout if deadline is None else max(0.001, min(timeout, deadline - self.clock.seconds()))
        try:
            while True:
                try:
                    answer = yield connection.request(Resolve(filespace), timeout=due)
                    break
                except Busy as busy:
                    wait = self.backoff.after_busy(retry_after_seconds(busy))
                    if busy_waited + wait > self.busy_patience or (
                        deadline is not None and self.clock.seconds() + wait >= deadline
                    ):
                        raise
                busy_waited += wait
                yield task.deferLater(self.clock, wait, lambda: None)
                due = timeout if deadline is None else max(0.001, min(timeout, deadline - self.clock.seconds()))
                self.discovery_requests += 1
        except RequestTimeout:
            self._close(connection, abort=True)
            raise _silence(endpoint, timeout)() from None
        except BaseException:
            self._close(connection, abort=True)
            raise
        self._close(connection)
        if not isinstance(answer, Resolved) or answer.filespace != filespace:
            what = f"for {answer.filespace!r}" if isinstance(answer, Resolved) else type(answer).__name__
            raise ProtocolError(f"{endpoint} was asked about {filespace!r} but answered {what}")
        return answer

    def _close(self, connection: Any, abort: bool = False) -> None:
        closing = connection.close("resolved", timeout=0 if abort else _CLOSE_GRACE)
        self._closing.add(closing)
        closing.addBoth(lambda _: self._closing.discard(closing))

    def _explain(self, filespace: str, failures: dict[str, str], rounds: int, elapsed: float) -> str:
        tried = f"{rounds} round{'s' if rounds != 1 else ''} in {elapsed:.1f} s"
        return f"no discovery instance answered for {filespace!r} ({tried}): {self._describe_all(failures)}"

    def _describe_all(self, failures: dict[str, str]) -> str:
        return "; ".join(failures.get(e, f"{e}: not tried before the deadline") for e in self.discovery)


# ---------------------------------------------------------------------------
# Connecting to a filespace's metadata server


@defer.inlineCallbacks
def connect_to_filespace(
    resolver: Resolver,
    filespace: str,
    connect: Connect,
    deadline: float | None = None,
    known_to_exist: bool = False,
) -> Generator[defer.Deferred[Any], Any, Any]:
    """
    Connect to the metadata server of ``filespace``: the cached endpoints first.

    Each round tries the endpoints of the last known location with
    ``connect(endpoint, identity)``.  For ``cache_patience`` seconds that is
    all it does (the server is most likely restarting at its address); a
    round in which the server accepted the TCP connection (it is there, if
    busy) starts the patience again, up to ``handshake_patience`` from the
    first attempt.
    After that, a round whose endpoints all fail asks discovery (one round
    over its instances); a new answer is tried at once, and an answer that
    names the endpoints already known is taken as "wait for it there": no
    more discovery requests until that answer's TTL has run out.  An attempt
    whose TCP connection is made gets ``handshake_patience`` rather than
    ``attempt_timeout`` to finish (see the module docstring).  Between
    rounds it waits a backoff delay that honours any ``retry_after``; with a
    ``deadline`` it gives up with :class:`~lucidlink.errors.Unavailable`
    saying what failed, without one it keeps trying (logging at a falling
    rate).  A server that says it does not serve the filespace makes the
    cached entry go (:meth:`Resolver.moved`) and discovery is asked at once.

    ``known_to_exist``: the caller was logged in to the filespace before (it
    connects again), so discovery saying no such filespace is registered means
    its server is away (one that hangs loses its registration) and is tried
    again like any other failure.

    :return: a Deferred of the connection ``connect`` made.
    :raise UnknownFilespace: when discovery says there is no such filespace (not ``known_to_exist``).
    """
    clock = resolver.clock
    started = clock.seconds()
    run = FallingRateLog(clock, resolver.log_interval)
    server_failures: dict[str, str] = {}
    discovery_failure: str | None = "discovery was not asked before the deadline"
    known = resolver.cached(filespace)
    patient = known is not None
    alive_at = started
    """When the known server last accepted a TCP connection (or the start)."""
    confirmed_until: float | None = None
    """Discovery named ``known`` again: keep to it, without asking, until then."""
    rounds = 0
    while True:
        rounds += 1
        retry_after = 0.0
        if known is not None:
            connection, wait, moved, reached = yield _try_location(
                resolver, known, connect, deadline, server_failures
            )
            if connection is not None:
                return connection
            retry_after = max(retry_after, wait)
            if moved:
                patient = False
                confirmed_until = None
            if reached:
                alive_at = clock.seconds()
        now = clock.seconds()
        if deadline is not None and now >= deadline:
            break
        if patient and now - alive_at < resolver.cache_patience and now - started < resolver.handshake_patience:
            # Most likely the server is restarting at the same address: wait
            # for it there rather than join every other client at discovery.
            discovery_failure = None
        elif confirmed_until is not None and now < confirmed_until:
            discovery_failure = None  # discovery said to wait for it there
        else:
            patient = False
            if known is not None:
                resolver.forget(filespace)
            try:
                fresh = yield resolver.resolve_once(filespace, deadline)
            except Unavailable as error:
                discovery_failure = str(error)
                retry_after = max(retry_after, retry_after_seconds(error))
            except UnknownFilespace as error:
                if not known_to_exist:
                    raise
                discovery_failure = f"{error} (its server is away)"
            else:
                discovery_failure = None
                confirmed_until = clock.seconds() + max(fresh.ttl_ms / 1000, resolver.cache_patience)
                if known is None or (fresh.endpoints, fresh.identity) != (known.endpoints, known.identity):
                    connection, wait, _, _ = yield _try_location(resolver, fresh, connect, deadline, server_failures)
                    if connection is not None:
                        return connection
                    retry_after = max(retry_after, wait)
                    resolver.forget(filespace)
                known = fresh
        delay = resolver.backoff.delay(rounds - 1, retry_after)
        if deadline is not None and clock.seconds() + delay >= deadline:
            break
        if run.failure():
            resolver.log.warn(
                "cannot reach the metadata server of {filespace!r} ({rounds} rounds so far);"
                " trying again in {delay:.1f} s: {why}",
                filespace=filespace, rounds=run.failures, delay=delay,
                why=_why_unreachable(server_failures, discovery_failure),
            )
        yield task.deferLater(clock, delay, lambda: None)
    tried = f"{rounds} round{'s' if rounds != 1 else ''} in {clock.seconds() - started:.1f} s"
    raise Unavailable(
        f"cannot reach the metadata server of {filespace!r} ({tried}):"
        f" {_why_unreachable(server_failures, discovery_failure)}",
        retry_after_ms=round(retry_after * 1000),
    )


@defer.inlineCallbacks
def _try_location(
    resolver: Resolver,
    location: Location,
    connect: Connect,
    deadline: float | None,
    failures: dict[str, str],
) -> Generator[defer.Deferred[Any], Any, tuple[Any, float, bool, bool]]:
    """
    Try each endpoint of ``location``: (a connection, 0, False, True), or (None,
    the largest retry_after, whether a server said the filespace is not there,
    whether any endpoint accepted the TCP connection).
    """
    clock = resolver.clock
    retry_after = 0.0
    moved = False
    reached: list[bool] = []
    for endpoint in location.endpoints:
        timeout = resolver.attempt_timeout
        if deadline is not None:
            timeout = min(timeout, deadline - clock.seconds())
            if timeout <= 0:
                break
        try:
            connection = yield _patient_attempt(
                resolver, connect, endpoint, location.identity, timeout, deadline, lambda: reached.append(True)
            )
        except defer.CancelledError:
            raise
        except (UnknownFilespace, TLSVerificationError) as error:
            # Someone else answers at this address now: the filespace moved.
            failures[endpoint] = describe_failure(endpoint, error)
            resolver.moved(location.filespace)
            moved = True
        except Exception as error:
            _note_failure(failures, endpoint, error, cut_short=timeout < resolver.attempt_timeout)
            retry_after = max(retry_after, retry_after_seconds(error))
        else:
            return connection, 0.0, False, True
    return None, retry_after, moved, bool(reached)


def _patient_attempt(
    resolver: Resolver,
    connect: Connect,
    endpoint: str,
    identity: str,
    timeout: float,
    deadline: float | None,
    reached: Callable[[], object],
) -> defer.Deferred[Any]:
    """
    ``connect(endpoint, identity)`` within ``timeout``; once its TCP connection is
    made (if ``connect`` reports that), within ``handshake_patience`` from then,
    and ``reached()`` is called.
    """
    clock = resolver.clock
    if not _reports_connected(connect):
        return within(clock, connect(endpoint, identity), timeout, _silence(endpoint, timeout))
    bounded: list[_Bounded] = []

    def connected() -> None:
        reached()
        patience = resolver.handshake_patience
        if deadline is not None:
            patience = max(0.0, min(patience, deadline - clock.seconds()))
        error = _slow_handshake(endpoint, patience)
        if bounded:
            bounded[0].restart(max(timeout, patience), error)
        else:  # it connected before connect() even returned
            bounded.append(_Bounded(clock, max(timeout, patience), error))

    work = connect(endpoint, identity, connected=connected)
    if bounded:  # connected at once: keep the longer bound made in connected()
        return bounded[0].bind(work)
    bounded.append(_Bounded(clock, timeout, _silence(endpoint, timeout)))
    return bounded[0].bind(work)


def _nothing() -> None:
    """A callback with nothing to do."""


def _reports_connected(connect: Connect) -> bool:
    """Whether ``connect`` (or the object it is a method of) takes ``connected=``."""
    return bool(getattr(connect, "reports_connected", False) or getattr(getattr(connect, "__self__", None), "reports_connected", False))


def _why_unreachable(server_failures: dict[str, str], discovery_failure: str | None) -> str:
    servers = "; ".join(server_failures.values()) or "no endpoint known yet"
    if discovery_failure is None:
        return f"{servers} (discovery answered)"
    return f"{servers}; and {discovery_failure}"


# ---------------------------------------------------------------------------
# Helpers


def within(
    clock: IReactorTime,
    work: defer.Deferred[Any],
    timeout: float,
    timeout_error: Callable[[], Exception],
) -> defer.Deferred[Any]:
    """
    ``work``'s result, or ``timeout_error()`` after ``timeout`` seconds.

    On time-out, and when the caller cancels the result, ``work`` is
    cancelled and whatever it then makes of being cancelled is ignored: the
    caller sees the time-out error, or ``CancelledError``.  (Unlike
    ``Deferred.addTimeout``, which passes on what the cancelled work
    returned, and code that catches its own cancellation may return anything.)
    """
    return _Bounded(clock, timeout, timeout_error).bind(work)


class _Bounded:
    """The timer and result of :func:`within`; the bound can be moved while the work runs."""

    def __init__(self, clock: IReactorTime, timeout: float, timeout_error: Callable[[], Exception]) -> None:
        self.clock = clock
        self.work: defer.Deferred[Any] | None = None
        self.result: defer.Deferred[Any] = defer.Deferred(lambda _: self._stop(defer.CancelledError()))
        self.timer = clock.callLater(max(0.0, timeout), lambda: self._stop(timeout_error()))

    def bind(self, work: defer.Deferred[Any]) -> defer.Deferred[Any]:
        """Bound ``work``; returns the bounded result."""
        self.work = work
        if self.result.called:  # the bound ran out before the work was given
            work.cancel()
        else:
            work.addBoth(self._settled)
        return self.result

    def restart(self, timeout: float, timeout_error: Callable[[], Exception]) -> None:
        """The bound is now ``timeout`` seconds from now, failing with ``timeout_error()``."""
        if self.timer.active():
            self.timer.cancel()
            self.timer = self.clock.callLater(max(0.0, timeout), lambda: self._stop(timeout_error()))

    def _stop(self, error: Exception) -> None:
        if self.timer.active():
            self.timer.cancel()
        if not self.result.called:
            self.result.errback(Failure(error))
        if self.work is not None:
            self.work.cancel()

    def _settled(self, outcome: Any) -> None:
        if self.timer.active():
            self.timer.cancel()
        if self.result.called:
            return None  # timed out or cancelled: the outcome goes nowhere
        if isinstance(outcome, Failure):
            self.result.errback(outcome)
        else:
            self.result.callback(outcome)
        return None


def _note_failure(failures: dict[str, str], endpoint: str, error: BaseException, cut_short: bool) -> None:
    """Record what went wrong with ``endpoint``, the latest failure first.

    A time-out of an attempt that the deadline cut short says nothing about
    the instance, so it does not replace an earlier, real failure.
    """
    if cut_short and isinstance(error, RequestTimeout) and endpoint in failures:
        return
    failures[endpoint] = describe_failure(endpoint, error)


def _silence(endpoint: str, timeout: float) -> Callable[[], RequestTimeout]:
    """The error for ``endpoint`` not answering within ``timeout`` seconds."""
    return lambda: RequestTimeout(f"{endpoint} did not answer within {timeout:g} s")


def _slow_handshake(endpoint: str, timeout: float) -> Callable[[], RequestTimeout]:
    """The error for ``endpoint`` accepting the connection but not finishing the handshake in time."""
    return lambda: RequestTimeout(
        f"{endpoint} accepted the connection but did not finish the handshake within {timeout:g} s"
    )


def describe_failure(endpoint: str, error: BaseException) -> str:
    """One phrase saying what went wrong with ``endpoint``, naming it once."""
    if isinstance(error, Busy):
        return f"{endpoint} is busy (asked to retry after {error.retry_after_ms} ms)"
    text = str(error) or type(error).__name__
    for prefix in (f"cannot connect to {endpoint}: ", f"connection to {endpoint} failed: "):
        if text.startswith(prefix):
            text = text[len(prefix):]
            break
    lowered = text.lower()
    if "connection was refused" in lowered or "connection refused" in lowered:
        return f"{endpoint} refused the connection"
    if text.startswith(endpoint):
        return text
    return f"{endpoint}: {text}"
