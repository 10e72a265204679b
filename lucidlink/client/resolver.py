"""
Where is a filespace served?  Asking discovery, and connecting with the cache first.

:class:`Resolver` knows several discovery instances (endpoint strings), the
CA that signs their certificates and the TLS identity they present
(``discovery.lucid`` unless configured otherwise).  :meth:`Resolver.resolve`
asks them in a random order, shuffled for every round so that clients spread
over the instances; an instance that is unreachable, presents a certificate
that is refused, does not answer in time or answers ``Busy`` is passed over
for the next.  When a whole round fails, it waits a backoff delay (capped
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
backoff between rounds.  That is how a reconnect storm misses discovery.

Deadlines are absolute times on the injected clock (``clock.seconds()``).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Generator, Sequence
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.endpoints import clientFromString
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
from lucidlink.protocol.network import connect_tls

DEFAULT_ATTEMPT_TIMEOUT = 5.0
"""Seconds one instance or server has to connect, shake hands and answer."""

DEFAULT_LOG_INTERVAL = 300.0
# Long enough for a metadata server to restart at its address.
DEFAULT_CACHE_PATIENCE = 10.0
"""A long run of failures is logged at least this often (see FallingRateLog)."""

_CLOSE_GRACE = 2.0

Connect = Callable[[str, str], "defer.Deferred[Any]"]
"""``connect(endpoint, identity)``: a Deferred of a ready connection, or a LucidError."""


def tls_connector(reactor: Any, ca_file: Path, **options: Any) -> Connect:
    """
    A :data:`Connect` that speaks TLS, trusting the CA in ``ca_file`` alone.

    ``options`` go to :class:`~lucidlink.protocol.connection.ClientConnection`.

    :raise NotFound: if ``ca_file`` is missing.
    """
    if not Path(ca_file).is_file():
        raise NotFound(f"no CA certificate at {ca_file}")
    options.setdefault("peer_name", "lucid")

    def connect(endpoint: str, identity: str) -> defer.Deferred[Any]:
        return connect_tls(reactor, endpoint, ca_file, identity, **options)

    return connect


def check_endpoints(reactor: Any, endpoints: Sequence[str]) -> None:
    """Raise InvalidArgument naming the first string that is not a client endpoint description."""
    for endpoint in endpoints:
        try:
            clientFromString(reactor, endpoint)
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
        at once.  This keeps a fleet-wide restart from reaching discovery.

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
                resolved = yield self._ask(endpoint, filespace, timeout)
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

    def _ask(self, endpoint: str, filespace: str, timeout: float) -> defer.Deferred[Resolved]:
        self.discovery_requests += 1
        return within(self.clock, self._exchange(endpoint, filespace, timeout), timeout, _silence(endpoint, timeout))

    @defer.inlineCallbacks
    def _exchange(
        self, endpoint: str, filespace: str, timeout: float
    ) -> Generator[defer.Deferred[Any], Any, Resolved]:
        connection = yield self._connect(endpoint, self.identity)
        try:
            answer = yield connection.request(Resolve(filespace), timeout=timeout)
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
) -> Generator[defer.Deferred[Any], Any, Any]:
    """
    Connect to the metadata server of ``filespace``: the cached endpoints first.

    Each round tries the endpoints of the last known location with
    ``connect(endpoint, identity)``; only when they all fail does it ask
    discovery (one round over its instances) and, if the answer is new, try
    its endpoints at once.  Between rounds it waits a backoff delay that
    honours any ``retry_after``; with a ``deadline`` it gives up with
    :class:`~lucidlink.errors.Unavailable` saying what failed, without one
    it keeps trying (logging at a falling rate).  A server that says it does
    not serve the filespace makes the cached entry go (:meth:`Resolver.moved`).

    :return: a Deferred of the connection ``connect`` made.
    :raise UnknownFilespace: when discovery says there is no such filespace.
    """
    clock = resolver.clock
    started = clock.seconds()
    run = FallingRateLog(clock, resolver.log_interval)
    server_failures: dict[str, str] = {}
    discovery_failure: str | None = "discovery was not asked before the deadline"
    known = resolver.cached(filespace)
    patient = known is not None
    rounds = 0
    while True:
        rounds += 1
        retry_after = 0.0
        if known is not None:
            connection, wait = yield _try_location(resolver, known, connect, deadline, server_failures)
            if connection is not None:
                return connection
            retry_after = max(retry_after, wait)
            if resolver.cached(filespace) is None:
                patient = False  # the server said the filespace is not there any more
        if deadline is not None and clock.seconds() >= deadline:
            break
        if patient and clock.seconds() - started < resolver.cache_patience:
            # Most likely the server is restarting at the same address: wait
            # for it there rather than join every other client at discovery.
            discovery_failure = None
        else:
            patient = False
            if known is not None:
                resolver.forget(filespace)
            try:
                fresh = yield resolver.resolve_once(filespace, deadline)
            except Unavailable as error:
                discovery_failure = str(error)
                retry_after = max(retry_after, retry_after_seconds(error))
            else:
                discovery_failure = None
                if known is None or (fresh.endpoints, fresh.identity) != (known.endpoints, known.identity):
                    connection, wait = yield _try_location(resolver, fresh, connect, deadline, server_failures)
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
) -> Generator[defer.Deferred[Any], Any, tuple[Any, float]]:
    """Try each endpoint of ``location``: (a connection, 0) or (None, the largest retry_after)."""
    clock = resolver.clock
    retry_after = 0.0
    for endpoint in location.endpoints:
        timeout = resolver.attempt_timeout
        if deadline is not None:
            timeout = min(timeout, deadline - clock.seconds())
            if timeout <= 0:
                break
        try:
            connection = yield within(
                clock, connect(endpoint, location.identity), timeout, _silence(endpoint, timeout)
            )
        except defer.CancelledError:
            raise
        except (UnknownFilespace, TLSVerificationError) as error:
            # Someone else answers at this address now: the filespace moved.
            failures[endpoint] = describe_failure(endpoint, error)
            resolver.moved(location.filespace)
        except Exception as error:
            _note_failure(failures, endpoint, error, cut_short=timeout < resolver.attempt_timeout)
            retry_after = max(retry_after, retry_after_seconds(error))
        else:
            return connection, 0.0
    return None, retry_after


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

    def stop(error: Exception) -> None:
        if timer.active():
            timer.cancel()
        if not result.called:
            result.errback(Failure(error))
        work.cancel()

    def settled(outcome: Any) -> None:
        if timer.active():
            timer.cancel()
        if result.called:
            return None  # timed out or cancelled: the outcome goes nowhere
        if isinstance(outcome, Failure):
            result.errback(outcome)
        else:
            result.callback(outcome)
        return None

    result: defer.Deferred[Any] = defer.Deferred(lambda _: stop(defer.CancelledError()))
    timer = clock.callLater(max(0.0, timeout), lambda: stop(timeout_error()))
    work.addBoth(settled)
    return result


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
