"""
Benchmark: reconnect and resolve storms against one discovery instance.

Real processes on loopback, real TLS, no mocks:

- one discovery instance, ``twistd -n lucid-discovery`` with a generated
  configuration, pinned to core 0 (``taskset -c 0``) when it can be, and
  with ``--discovery-cpu SHARE`` capped at that share of the core by a
  cgroup CPU quota (the load generators, on the other core, do the clients'
  side of every handshake and cannot outrun a whole core of discovery:
  capped below what they offer, discovery is what the rates measure);
- a simulated fleet of metadata servers in one process: the filespaces
  ``fs0000``... spread over a few TLS listeners that share one wildcard
  certificate ``*.meta.lucid`` (filespace ``fsNNNN`` is served as
  ``fsNNNN.meta.lucid`` on listener ``NNNN % 10``), answering Hello with a
  Welcome, and registering every filespace with discovery (signed Register,
  then Heartbeats, over a few connections);
- K load generator processes, each running N/K simulated clients in one
  reactor.  Each client has a loopback source address of its own
  (127.1.x.y), as separate machines would, so discovery's per-source token
  buckets see N sources, not one.

A *designed* client is the library's: a :class:`~lucidlink.client.resolver.Resolver`
with an :class:`~lucidlink.client.endpoint_cache.EndpointCache` of its own,
full-jitter backoff, honouring ``Busy``'s ``retry_after``, and connecting
with :func:`~lucidlink.client.resolver.connect_to_filespace` over
:func:`~lucidlink.client.resolver.tls_connector`.  A *naive* client has no
cache, asks discovery on every (re)connect and retries at once on any
failure, ``Busy`` included.  Both count their discovery requests.

Scenario A, metadata servers restart at the same addresses: N clients
connect (paced), then the fleet process is killed and started again on the
same ports; every client loses its connection and reconnects.  Target: the
designed clients make fewer than 1% of N discovery requests.  The naive
clients do the same in a second round, on the same fleet.

Scenario B, discovery must answer everyone: first discovery's sustained
capacity, then N fresh designed clients resolve at once.  The capacity is
measured twice.  A closed loop (fresh TLS connection + Hello + Resolve,
``--capacity-concurrency`` in flight, no shedding) gives a first figure,
printed for reference.  Then a paced, open loop: the load generators start
fresh resolves at a fixed offered rate, whatever the answers, for
``--paced-seconds`` a step, the rate stepping up from 0.3 to 2.5 times the
closed-loop figure; the sustained (paced) capacity is the highest offered
rate that kept up: goodput at least 95% of offered, p99 latency at most
0.5 s, nothing failed.  The first step that does not keep up ends the
ladder.  Targets: none gives up, and goodput (N / time to all resolved) is
at least 80% of the paced capacity.  Then N naive clients do the same, bounded in
time.

The baseline of each scenario (the naive client, the capacity) is measured
in the same run.  Prints a table, then one line of JSON; exits 1 when a
target is not met.

How far to trust the figures is printed with them:

- the load generators' lag (how late their reactors ran a timer): a
  simulated client shares its process's CPU with thousands of others, so a
  saturated generator times out attempts that a real client, alone on its
  CPU, would not;
- the CPU other programs took, on discovery's core and on the whole machine
  (``--wait-for-quiet S`` waits, before each phase, for a quiet machine);
- discovery's CPU per resolve, and the single-core rate that extrapolates
  to: when discovery is far from busy, the capacity measured is the load
  generators', not discovery's.

A simulated client starts in about a millisecond of its generator's CPU, and
a resolve costs it about 2.5 times what it costs discovery, so a generator
process cannot outrun one discovery core.  On a 2-core machine the storm
reaches discovery at the generators' pace.  Scenario A's reconnect wave
costs the fleet and the generators a few ms of CPU per client, all on one
core: at 10,000 clients it takes tens of seconds, longer than the clients'
``cache_patience`` (10 s).  The designed client copes by design: an attempt
whose TCP connection is made (the fleet's listen backlog holds it while the
fleet works through its handshakes) is not cut off at ``attempt_timeout``,
and a client that does ask discovery and hears the same endpoint does not
ask again until the TTL.  ``--reconnect-clients`` can still size scenario A
apart from scenario B.

    python bench/discovery_storm.py [--clients 10000] [--reconnect-clients N]
        [--filespaces 1000] [--generators 4] [--max-connections 1000]
        [--max-handshakes 128] [--paced-seconds 3] [--paced-steps 18]
        [--wait-for-quiet S] [--quick] [--time-limit 900]

``LUCID_BENCH_PROFILE=DIR`` profiles every process (discovery with
twistd's ``--profile``) into ``DIR``.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import json
import math
import os
import queue
import random
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DISCOVERY_NAME = "discovery.lucid"
META_DOMAIN = "meta.lucid"
META_LISTENERS = 10
KEY_ID = "bench"
REGISTRATION_CONNECTIONS = 4
FLEET_MAX_CONNECTIONS = 1_000_000
LAG_TICK = 0.05
CAPACITY_SOURCES = 4000
QUIET_LOAD = 0.1
START_SLICE = 20
QUIET_WINDOW = 4.0
SATURATED_LAG = 1.0
NOISY_CORES = 0.2

SOURCE_RANGE = 1 << 16
"""Loopback source addresses per phase: phase p uses indices p*SOURCE_RANGE + i."""

TARGET_RECONNECT_SHARE = 0.01
TARGET_GOODPUT_RATIO = 0.8

# The paced (open-loop) capacity: offered rates as shares of the closed-loop
# figure, stepped up until goodput stops keeping up with the offered rate.
PACED_LADDER = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.15, 1.3, 1.45, 1.6, 1.75, 1.9, 2.05, 2.2, 2.35, 2.5)
PACED_KEEP_UP = 0.95
PACED_P99_BOUND = 0.5
PACED_GRACE = 5.0

# Discovery's limits: a production-like instance, scaled to one core.
DISCOVERY_LIMITS = {
    "entry_ttl": 15,
    "heartbeat_interval": 5,
    "max_entries": 20000,
    "max_connections": 1000,
    "max_handshakes": 128,
    "max_in_flight": 1000,
    "per_source_rate": 20,
    "per_source_burst": 40,
    "max_sources": 65536,
    "idle_timeout": 60,
    "handshake_timeout": 10,
}


def filespace_name(number: int) -> str:
    return f"fs{number:04d}"


def source_address(index: int) -> str:
    """The loopback address of simulated source ``index``: 127.a.b.c, never 127.0.0.x."""
    c = 1 + index % 254
    b = (index // 254) % 256
    a = 1 + index // (254 * 256)
    if a > 254:
        raise ValueError(f"source index {index} is beyond 127.254.255.254")
    return f"127.{a}.{b}.{c}"


def emit_to(write: Callable[[bytes], Any]) -> Callable[..., None]:
    def emit(event: str, **fields: Any) -> None:
        write((json.dumps({"event": event, **fields}) + "\n").encode("utf-8"))

    return emit


def quiet_logging(stream: Any) -> dict[str, int]:
    """Send Twisted log events of level error and above to ``stream``; count the rest.

    Simulated clients log their first failures (as real ones do, each on its
    own machine); writing ten thousand such lines from one process would
    only measure the log file.
    """
    from twisted.logger import LogLevel, formatEventAsClassicLogText, globalLogBeginner

    counts: dict[str, int] = {}

    def observer(event: dict[str, Any]) -> None:
        level = event.get("log_level")
        if level is not None and level >= LogLevel.error:
            text = formatEventAsClassicLogText(event)
            if text:
                stream.write(text)
                stream.flush()
        else:
            name = level.name if level is not None else "other"
            counts[name] = counts.get(name, 0) + 1

    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False, discardBuffer=True)
    return counts


def watch_stdin(reactor: Any, on_line: Callable[[dict[str, Any]], Any]) -> None:
    """Read JSON commands from stdin; stop the reactor when stdin closes (the coordinator is gone)."""
    from twisted.internet import stdio
    from twisted.protocols.basic import LineReceiver

    class Commands(LineReceiver):
        delimiter = b"\n"
        MAX_LENGTH = 1 << 24

        def lineReceived(self, line: bytes) -> None:
            if line.strip():
                on_line(json.loads(line))

        def connectionLost(self, reason: Any) -> None:
            if reactor.running:
                reactor.stop()

    stdio.StandardIO(Commands(), reactor=reactor)


def sleep(reactor: Any, seconds: float) -> Any:
    from twisted.internet import task

    return task.deferLater(reactor, max(0.0, seconds), lambda: None)


# ---------------------------------------------------------------------------
# The fleet of metadata servers (child process)


def run_fleet(args: argparse.Namespace) -> None:
    """Serve Hello on the fleet's listeners and keep every filespace registered with discovery."""
    from twisted.internet import defer, reactor
    from twisted.internet.endpoints import serverFromString
    from twisted.protocols.tls import TLSMemoryBIOFactory
    from zope.interface import implementer

    from lucidlink.discovery.auth import sign
    from lucidlink.discovery.shedding import AcceptGate
    from lucidlink.errors import NotSupported, UnknownFilespace
    from lucidlink.protocol.connection import IResponder, ServerFactory
    from lucidlink.protocol.messages import PROTOCOL_VERSION, Heartbeat, Register, ServerStatus, Welcome
    from lucidlink.protocol.network import connect_tls
    from lucidlink.tls import server_tls_options

    quiet_logging(sys.stderr)
    ports = [int(p) for p in args.ports.split(",")]
    names = [filespace_name(n) for n in range(args.filespaces)]
    served = set(names)
    secret = bytes.fromhex(args.secret)
    ca_file = Path(args.ca)
    out: list[Any] = []

    @implementer(IResponder)
    class FleetResponder:
        """A metadata server's handshake, for every filespace of the fleet."""

        def __init__(self) -> None:
            self.sessions = 0

        gate: Any = None

        def welcome(self, connection: Any, hello: Any) -> Welcome:
            self.gate.handshake_done(connection)
            if hello.filespace and hello.filespace not in served:
                raise UnknownFilespace(f"{hello.filespace!r} is not served here")
            self.sessions += 1
            return Welcome(PROTOCOL_VERSION, "bench-meta", self.sessions, 0, ServerStatus.SERVING)

        def respond(self, connection: Any, message: Any) -> Any:
            raise NotSupported("the simulated metadata server only says Welcome")

        def connection_ended(self, connection: Any, reason: Any) -> None:
            pass

    # A thousand real metadata servers would each shake hands with their ten
    # clients at once; one process shaking hands with ten thousand at once
    # shares its CPU among them until every one of them times out.  So the
    # fleet's listeners sit behind discovery's accept gate: at most
    # --handshakes at once, the rest wait in the listen backlog.
    responder = FleetResponder()
    tls_factory = TLSMemoryBIOFactory(
        server_tls_options(Path(args.cert), Path(args.key)), False,
        ServerFactory(responder, reactor, keepalive_interval=0),
    )
    gate = AcceptGate(tls_factory, max_connections=FLEET_MAX_CONNECTIONS, max_handshakes=args.handshakes)
    responder.gate = gate

    def registration(kind: type, number: int) -> Any:
        name = names[number]
        return sign(
            kind(
                filespace=name,
                server_id=f"meta-{name}",
                endpoints=[f"tcp:127.0.0.1:{ports[number % len(ports)]}"],
                identity=f"{name}.{META_DOMAIN}",
                status=ServerStatus.SERVING,
                timestamp_ms=int(time.time() * 1000),
                nonce=os.urandom(16),
                key_id=KEY_ID,
                mac=b"",
            ),
            KEY_ID,
            secret,
        )

    registered = {"count": 0, "failures": 0}

    @defer.inlineCallbacks
    def keep_registered(share: list[int], first: defer.Deferred[None]) -> Any:
        """Register ``share`` over one connection, then heartbeat; reconnect if it drops."""
        kind: type = Register
        interval = 5.0
        while True:
            try:
                connection = yield connect_tls(
                    reactor, f"tcp:127.0.0.1:{args.discovery_port}", ca_file, DISCOVERY_NAME,
                    keepalive_interval=0, peer_name="bench-fleet",
                )
                while True:
                    answers = yield defer.gatherResults(
                        [connection.request(registration(kind, n)) for n in share], consumeErrors=True
                    )
                    if kind is Register:
                        registered["count"] += len(share)
                        if not first.called:
                            first.callback(None)
                    kind = Heartbeat
                    interval = answers[0].heartbeat_ms / 1000 if answers else interval
                    yield sleep(reactor, interval)
            except Exception as error:  # noqa: BLE001 - keep the registrations alive whatever happened
                registered["failures"] += 1
                sys.stderr.write(f"fleet: registration connection failed: {error}\n")
                kind = Register
                yield sleep(reactor, 1.0)

    @defer.inlineCallbacks
    def start() -> Any:
        listening = yield defer.gatherResults(
            [serverFromString(reactor, f"tcp:{port}:interface=127.0.0.1:backlog={args.backlog}").listen(gate)
             for port in ports]
        )
        for port in listening:
            gate.add_port(port)
        out[0]("listening")
        firsts = []
        for c in range(REGISTRATION_CONNECTIONS):
            share = list(range(c, len(names), REGISTRATION_CONNECTIONS))
            if share:
                first: defer.Deferred[None] = defer.Deferred()
                firsts.append(first)
                keep_registered(share, first)
        yield defer.gatherResults(firsts)
        out[0]("ready", registered=registered["count"], pid=os.getpid())

    def stdout_write(data: bytes) -> None:
        os.write(1, data)

    out.append(emit_to(stdout_write))
    def command(line: dict[str, Any]) -> None:
        if line.get("cmd") == "go":
            start()

    # The process is started ahead of the restart, and loaded (Python and
    # Twisted imported: seconds of CPU on a busy machine), then told to go:
    # the restart measured is the servers', not the interpreter's.
    watch_stdin(reactor, command)
    reactor.callLater(args.lifetime, reactor.stop)
    reactor.callWhenRunning(lambda: out[0]("loaded", pid=os.getpid()))
    run_reactor(reactor, f"fleet-{os.getpid()}")


# ---------------------------------------------------------------------------
# Load generators (child processes)


class Starter:
    """Starts clients a slice at a time, one slice per reactor turn.

    Starting a client costs its generator about a millisecond of CPU (a TLS
    context, an endpoint, a socket).  Starting thousands in one callback
    would block the reactor for seconds, and the first clients' replies
    would sit unread while their attempt timers ran out: a failure of the
    simulation, not of what it measures.  Slices let I/O and timers run in
    between, as they do on a real client, which has its CPU to itself.
    """

    def __init__(self, reactor: Any, per_turn: int = START_SLICE) -> None:
        self.reactor = reactor
        self.per_turn = per_turn
        self.queue: collections.deque[Callable[[], Any]] = collections.deque()
        self.scheduled = False

    def add(self, start: Callable[[], Any]) -> None:
        self.queue.append(start)
        if not self.scheduled:
            self.scheduled = True
            self.reactor.callLater(0, self._turn)

    def _turn(self) -> None:
        for _ in range(min(self.per_turn, len(self.queue))):
            self.queue.popleft()()
        if self.queue:
            self.reactor.callLater(0, self._turn)
        else:
            self.scheduled = False


class HeldClient:
    """A client that connects to its filespace's metadata server and stays connected (scenario A)."""

    def __init__(self, generator: LoadGenerator, kind: str, index: int, filespace: str, resolver: Any) -> None:
        self.generator = generator
        self.kind = kind
        self.index = index
        self.filespace = filespace
        self.resolver = resolver
        self.connect = generator.meta_connector(filespace)
        self.connection: Any = None
        self.connected_at: float | None = None
        self.lost_at: float | None = None
        self.failure: str | None = None
        self.asked_before = 0
        """Its discovery requests when the fleet was about to be killed."""

    def start(self, deadline: float) -> None:
        if self.kind == "designed":
            from lucidlink.client.resolver import connect_to_filespace

            attempt = connect_to_filespace(self.resolver, self.filespace, self.connect, deadline)
        else:
            attempt = self.generator.naive_connect(self.resolver, self.filespace, self.connect, deadline)
        attempt.addCallbacks(self._connected, self._failed)

    def _connected(self, connection: Any) -> None:
        if not self.generator.holding:
            connection.close("released")
            return
        self.connection = connection
        self.connected_at = self.generator.reactor.seconds()
        self.failure = None
        connection.when_lost().addCallback(self._lost)
        self.generator.progress()

    def _failed(self, failure: Any) -> None:
        self.failure = failure.getErrorMessage()
        self.generator.progress()

    def _lost(self, reason: Any) -> None:
        self.connection = None
        self.lost_at = self.generator.reactor.seconds()
        if self.generator.holding:
            self.generator.starter.add(lambda: self.start(self.generator.deadline))


class LoadGenerator:
    """N/K simulated clients in one reactor, driven by the coordinator's commands."""

    def __init__(self, reactor: Any, args: argparse.Namespace, emit: Callable[..., None], log_counts: dict[str, int]) -> None:
        self.reactor = reactor
        self.index = args.index
        self.generators = args.generators
        self.discovery_port = args.discovery_port
        self.ca_file = Path(args.ca)
        self.state = Path(args.state)
        self.seed = args.seed
        self.emit = emit
        self.log_counts = log_counts
        self.held: list[HeldClient] = []
        self.holding = False
        self.deadline = 0.0
        self.mark: float | None = None
        self.mark_requests = 0
        self.phase_done: Callable[[], Any] | None = None
        self.lags: list[float] = []
        self.starter = Starter(reactor)
        self._tick_at = time.monotonic()
        from twisted.internet import task

        ticker = task.LoopingCall(self._tick)
        ticker.clock = reactor
        ticker.start(LAG_TICK, now=False)

    def _tick(self) -> None:
        """How late the reactor runs a timer: the generator's own saturation."""
        now = time.monotonic()
        self.lags.append(max(0.0, now - self._tick_at - LAG_TICK))
        self._tick_at = now

    def lag(self) -> dict[str, float]:
        """The reactor's lateness since the last call (max and p99, seconds), then start afresh."""
        lags, self.lags = self.lags, []
        return {"max": max(lags, default=0.0), "p99": percentile(lags, 0.99) or 0.0}

    # -- clients ------------------------------------------------------------

    def my_clients(self, clients: int, filespaces: int) -> list[tuple[int, str]]:
        """(global index, filespace) of this generator's clients."""
        return [(i, filespace_name(i % filespaces)) for i in range(self.index, clients, self.generators)]

    def resolver(self, source: int, cache_dir: Path | None, seed: int) -> Any:
        from lucidlink.client.endpoint_cache import EndpointCache
        from lucidlink.client.resolver import Resolver

        endpoint = f"tcp:host=127.0.0.1:port={self.discovery_port}:bindAddress={source_address(source)}"
        return Resolver(
            self.reactor, [endpoint], self.ca_file, DISCOVERY_NAME,
            cache=EndpointCache(cache_dir) if cache_dir is not None else None,
            rng=random.Random(seed),
        )

    def meta_connector(self, filespace: str) -> Any:
        from lucidlink.client.resolver import tls_connector

        return tls_connector(self.reactor, self.ca_file, keepalive_interval=0, filespace=filespace)

    def naive_resolve(self, resolver: Any, filespace: str, deadline: float, delay: float) -> Any:
        """Ask discovery until it answers: at once again after any failure, Busy included."""
        from twisted.internet import defer

        from lucidlink.errors import Unavailable

        @defer.inlineCallbacks
        def attempt() -> Any:
            last = "no attempt before the deadline"
            while self.reactor.seconds() < deadline:
                try:
                    location = yield resolver.resolve_once(filespace, deadline)
                except Unavailable as error:
                    last = str(error)
                else:
                    return location
                yield sleep(self.reactor, delay)
            raise Unavailable(f"naive client gave up: {last}")

        return attempt()

    def naive_connect(self, resolver: Any, filespace: str, connect: Any, deadline: float, delay: float = 0.0) -> Any:
        """Ask discovery, connect to its answer; on any failure start again at once."""
        from twisted.internet import defer

        from lucidlink.client.resolver import within
        from lucidlink.errors import RequestTimeout, Unavailable

        @defer.inlineCallbacks
        def attempt() -> Any:
            last = "no attempt before the deadline"
            while self.reactor.seconds() < deadline:
                try:
                    location = yield resolver.resolve_once(filespace, deadline)
                    timeout = min(resolver.attempt_timeout, deadline - self.reactor.seconds())
                    connection = yield within(
                        self.reactor, connect(location.endpoints[0], location.identity), timeout,
                        lambda: RequestTimeout("no answer in time"),
                    )
                except Exception as error:  # noqa: BLE001 - a naive client retries whatever failed
                    last = str(error)
                else:
                    return connection
                yield sleep(self.reactor, delay)
            raise Unavailable(f"naive client gave up: {last}")

        return attempt()

    # -- commands -------------------------------------------------------------

    def command(self, command: dict[str, Any]) -> None:
        handler = getattr(self, f"do_{command['cmd']}")
        try:
            handler(command)
        except Exception as error:  # noqa: BLE001 - report, do not die silently
            self.emit("error", error=f"{type(error).__name__}: {error}")

    def do_quit(self, command: dict[str, Any]) -> None:
        self.reactor.stop()

    def do_capacity(self, command: dict[str, Any]) -> None:
        """A closed loop of resolves (fresh connection each) with ``concurrency`` workers."""
        from twisted.internet import defer

        from lucidlink.errors import Unavailable

        t0, warmup, seconds = command["t0"], command["warmup"], command["seconds"]
        window = (t0 + warmup, t0 + warmup + seconds)
        # A pool of clients, one source address each, built before the
        # window (as the storm's clients are); each is used every few seconds,
        # far below the per-source rate.
        sources = range(command["source_base"] + self.index, command["source_base"] + command["sources"], self.generators)
        rng = random.Random(self.seed)
        pool = [self.resolver(source, None, rng.random()) for source in sources]
        stats = {"ok": 0, "failed": 0, "requests": 0, "latencies": [], "errors": {}}
        next_source = [0]

        @defer.inlineCallbacks
        def worker() -> Any:
            while self.reactor.seconds() < window[1]:
                resolver = pool[next_source[0] % len(pool)]
                next_source[0] += 1
                before = resolver.discovery_requests
                started = self.reactor.seconds()
                try:
                    yield resolver.resolve_once(filespace_name(rng.randrange(command["filespaces"])), window[1] + 5)
                except Unavailable as error:
                    stats["failed"] += 1
                    key = str(error)[-120:]
                    stats["errors"][key] = stats["errors"].get(key, 0) + 1
                    yield sleep(self.reactor, 0.05)
                else:
                    done = self.reactor.seconds()
                    if window[0] <= done < window[1]:
                        stats["ok"] += 1
                        stats["latencies"].append(round(done - started, 5))
                stats["requests"] += resolver.discovery_requests - before

        @defer.inlineCallbacks
        def run() -> Any:
            yield sleep(self.reactor, t0 - time.time())
            self.lag()
            yield defer.gatherResults([worker() for _ in range(command["concurrency"])])
            self.emit("capacity", lag=self.lag(), **stats)

        run()

    def do_paced(self, command: dict[str, Any]) -> None:
        """Open loop: start fresh resolves at ``rate`` per second for ``seconds``, whatever the answers."""
        from twisted.internet import defer

        t0, seconds, rate = command["t0"], command["seconds"], command["rate"]
        end = t0 + seconds
        sources = range(command["source_base"] + self.index, command["source_base"] + command["sources"], self.generators)
        rng = random.Random(self.seed + int(rate))
        pool = [self.resolver(source, None, rng.random()) for source in sources]
        stats: dict[str, Any] = {"started": 0, "ok": 0, "failed": 0, "latencies": [], "errors": {}}
        pending: list[defer.Deferred[Any]] = []

        def one() -> None:
            resolver = pool[stats["started"] % len(pool)]
            stats["started"] += 1
            started = self.reactor.seconds()

            def ok(_: Any) -> None:
                stats["ok"] += 1
                stats["latencies"].append(round(self.reactor.seconds() - started, 5))

            def failed(failure: Any) -> None:
                stats["failed"] += 1
                key = str(failure.value)[-120:]
                stats["errors"][key] = stats["errors"].get(key, 0) + 1

            d = resolver.resolve_once(filespace_name(rng.randrange(command["filespaces"])), end + command["grace"])
            d.addCallbacks(ok, failed)
            pending.append(d)

        def tick() -> None:
            now = time.time()
            due = int(min(now - t0, seconds) * rate)
            while stats["started"] < due:
                one()
            if now < end:
                self.reactor.callLater(0.005, tick)
            else:
                finish()

        def finish() -> None:
            def report(_: Any) -> None:
                if self.reactor.running:
                    self.emit("paced", lag=self.lag(), **stats)
            defer.DeferredList(pending).addCallback(report)

        @defer.inlineCallbacks
        def run() -> Any:
            yield sleep(self.reactor, t0 - time.time())
            self.lag()
            tick()

        run()

    def do_connect(self, command: dict[str, Any]) -> None:
        """Scenario A: connect every client (paced), and keep them connected."""
        kind = command["kind"]
        clients = self.my_clients(command["clients"], command["filespaces"])
        rate = command["rate"] / self.generators
        self.holding = True
        self.deadline = command["deadline"]
        self.mark = None
        folder = self.state / f"{command['phase']}-{self.index}"
        self.held = []
        for k, (i, filespace) in enumerate(clients):
            resolver = self.resolver(
                command["source_base"] + i, folder / f"c{i}" if kind == "designed" else None, self.seed * 1_000_003 + i
            )
            client = HeldClient(self, kind, i, filespace, resolver)
            self.held.append(client)
            self.reactor.callLater(k / rate, client.start, self.deadline)

        def connected() -> bool:
            if not all(c.connection is not None or c.failure is not None for c in self.held):
                return False
            self.emit(
                "connected",
                lag=self.lag(),
                connected=sum(c.connection is not None for c in self.held),
                failed=sum(c.failure is not None for c in self.held),
                discovery_requests=sum(c.resolver.discovery_requests for c in self.held),
                errors=_first_errors(c.failure for c in self.held),
            )
            return True

        self.phase_done = connected

    def do_mark(self, command: dict[str, Any]) -> None:
        """The fleet is about to be killed: count from here, report once everyone is back."""
        self.mark = self.reactor.seconds()
        self.deadline = command["deadline"]
        self.mark_requests = sum(c.resolver.discovery_requests for c in self.held)
        for client in self.held:
            client.failure = None

        def back(c: HeldClient) -> bool:
            return c.lost_at is not None and c.lost_at >= self.mark and c.connection is not None  # type: ignore[operator]

        def reconnected(final: bool = False) -> bool:
            if not final and not all(back(c) or c.failure is not None for c in self.held):
                return False
            self.emit(
                "reconnected",
                lag=self.lag(),
                reconnected=sum(back(c) for c in self.held),
                missing=sum(not back(c) for c in self.held),
                discovery_requests=sum(c.resolver.discovery_requests for c in self.held) - self.mark_requests,
                clients_that_asked=sum(c.resolver.discovery_requests > c.asked_before for c in self.held),
                times=[round(c.connected_at, 4) for c in self.held if back(c)],  # type: ignore[misc]
                errors=_first_errors(c.failure for c in self.held),
            )
            self.phase_done = None
            return True

        for client in self.held:
            client.asked_before = client.resolver.discovery_requests
        self.lag()
        self.phase_done = reconnected
        self.reactor.callLater(max(0.0, self.deadline - self.reactor.seconds()) + 1, self._report_late, reconnected)
        self.emit("marked")

    def _report_late(self, report: Callable[..., bool]) -> None:
        if self.phase_done is report:
            report(final=True)

    def do_release(self, command: dict[str, Any]) -> None:
        """Scenario A is over: close every connection, stop reconnecting."""
        from twisted.internet import defer

        self.holding = False
        self.phase_done = None
        closing = [c.connection.close("benchmark phase over") for c in self.held if c.connection is not None]
        done = defer.DeferredList(closing)
        done.addCallback(lambda _: sleep(self.reactor, 0.5))
        done.addCallback(lambda _: self.emit("released", closed=len(closing)))
        self.held = []

    def progress(self) -> None:
        if self.phase_done is not None and self.phase_done():
            self.phase_done = None

    def do_storm(self, command: dict[str, Any]) -> None:
        """Scenario B: every client resolves at ``t0``; report who got an answer, and when."""
        from twisted.internet import defer

        kind = command["kind"]
        clients = self.my_clients(command["clients"], command["filespaces"])
        t0, deadline = command["t0"], command["deadline"]
        folder = self.state / f"{command['phase']}-{self.index}"
        resolvers = [
            self.resolver(command["source_base"] + i, folder / f"c{i}" if kind == "designed" else None, self.seed * 7_919 + i)
            for i, _ in clients
        ]
        latencies: list[float] = []
        failures: list[str] = []

        def resolved(_: Any) -> None:
            latencies.append(round(time.time() - t0, 4))

        def gave_up(failure: Any) -> None:
            failures.append(failure.getErrorMessage())

        @defer.inlineCallbacks
        def run() -> Any:
            yield sleep(self.reactor, t0 - time.time())
            self.lag()
            attempts: list[defer.Deferred[Any]] = []
            everyone = defer.Deferred()

            def start(resolver: Any, filespace: str) -> None:
                if kind == "designed":
                    attempt = resolver.resolve(filespace, deadline)
                else:
                    attempt = self.naive_resolve(resolver, filespace, deadline, command["naive_delay"])
                attempts.append(attempt.addCallbacks(resolved, gave_up))
                if len(attempts) == len(resolvers):
                    everyone.callback(None)

            for resolver, (_, filespace) in zip(resolvers, clients):
                self.starter.add(lambda resolver=resolver, filespace=filespace: start(resolver, filespace))
            yield everyone
            started_all = time.time() - t0
            yield defer.DeferredList(attempts)
            self.emit(
                "storm",
                started_all_s=round(started_all, 3),
                lag=self.lag(),
                latencies=latencies,
                gave_up=len(failures),
                discovery_requests=sum(r.discovery_requests for r in resolvers),
                errors=_first_errors(failures),
                log_events=dict(self.log_counts),
            )

        run()


def _first_errors(errors: Iterable[str | None], keep: int = 3) -> dict[str, int]:
    """The commonest error messages (their ends, where the reason is), with counts."""
    counts: dict[str, int] = {}
    for error in errors:
        if error:
            key = error[-160:]
            counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items(), key=lambda item: -item[1])[:keep])


def run_generator(args: argparse.Namespace) -> None:
    from twisted.internet import reactor

    log_counts = quiet_logging(sys.stderr)
    emit = emit_to(lambda data: os.write(1, data))
    generator = LoadGenerator(reactor, args, emit, log_counts)
    watch_stdin(reactor, generator.command)
    reactor.callLater(args.lifetime, reactor.stop)
    reactor.callWhenRunning(lambda: emit("hello", pid=os.getpid()))
    run_reactor(reactor, f"generator-{args.index}")


def run_reactor(reactor: Any, name: str) -> None:
    """reactor.run(), under cProfile when LUCID_BENCH_PROFILE names a folder."""
    folder = os.environ.get("LUCID_BENCH_PROFILE")
    if not folder:
        reactor.run()
        return
    import cProfile

    signal.signal(signal.SIGTERM, lambda *_: reactor.callFromThread(reactor.stop))
    profiler = cProfile.Profile()
    profiler.runcall(reactor.run)
    profiler.dump_stats(str(Path(folder) / f"{name}.prof"))


# ---------------------------------------------------------------------------
# The coordinator (this process)


class TimeLimit(Exception):
    """The benchmark's overall time limit was reached."""


class Clock:
    def __init__(self, limit: float) -> None:
        self.started = time.monotonic()
        self.limit = limit

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def remaining(self) -> float:
        return self.limit - self.elapsed()

    def bound(self, timeout: float) -> float:
        remaining = self.remaining()
        if remaining <= 0:
            raise TimeLimit(f"the time limit of {self.limit:g} s was reached")
        return min(timeout, remaining)


def _die_with_parent() -> None:
    """In a child, before exec: be killed if the coordinator dies (PR_SET_PDEATHSIG)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


class CpuQuota:
    """
    At most ``share`` of one core for a process, through a cgroup of its own (v2 ``cpu.max`` or v1 CFS quota).

    On two cores the load generators, which do the clients' side of every
    TLS handshake, cannot outrun a whole core of discovery: unthrottled, they
    set every rate measured.  Capping discovery below what they can offer
    makes discovery the limit of the capacity and of the storm alike.
    :meth:`apply` says why not when the machine offers no such cgroup.
    """

    PERIOD_US = 100_000

    def __init__(self, share: float) -> None:
        self.share = share
        self.folder: Path | None = None

    def apply(self, pid: int) -> str:
        """Put ``pid`` under the quota; "" when done, else why not."""
        quota = max(1000, int(self.share * self.PERIOD_US))
        v2 = Path("/sys/fs/cgroup")
        v1 = Path("/sys/fs/cgroup/cpu")
        try:
            if (v2 / "cgroup.controllers").exists():
                if "cpu" not in (v2 / "cgroup.subtree_control").read_text().split():
                    (v2 / "cgroup.subtree_control").write_text("+cpu")
                folder = v2 / f"lucid-bench-{os.getpid()}"
                folder.mkdir()
                self.folder = folder
                (folder / "cpu.max").write_text(f"{quota} {self.PERIOD_US}")
            elif (v1 / "cpu.cfs_quota_us").exists():
                folder = v1 / f"lucid-bench-{os.getpid()}"
                folder.mkdir()
                self.folder = folder
                (folder / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
                (folder / "cpu.cfs_quota_us").write_text(str(quota))
            else:
                return "no cgroup cpu controller on this machine"
            (self.folder / "cgroup.procs").write_text(str(pid))
        except OSError as error:
            self.remove()
            return f"cannot make a cgroup: {error.strerror or error}"
        return ""

    def remove(self) -> None:
        """Remove the cgroup (its process has ended, or goes back to the root)."""
        if self.folder is None:
            return
        with contextlib.suppress(OSError):
            for pid in (self.folder / "cgroup.procs").read_text().split():
                (self.folder.parent / "cgroup.procs").write_text(pid)
        with contextlib.suppress(OSError):
            self.folder.rmdir()
        self.folder = None


class Child:
    """A process this benchmark started, and its stdout lines as JSON events."""

    def __init__(self, name: str, argv: list[str], log: Path, *, events: bool = True) -> None:
        self.name = name
        self.log_path = log
        self.log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.process = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if events else subprocess.DEVNULL,
            stdout=subprocess.PIPE if events else self.log,
            stderr=self.log,
            preexec_fn=_die_with_parent,
            cwd=ROOT,
        )
        self.pid = self.process.pid
        if events:
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                self.log.write(line)
        self.events.put(None)

    def send(self, **command: Any) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(command) + "\n").encode("utf-8"))
        self.process.stdin.flush()

    def expect(self, event: str, clock: Clock, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + clock.bound(timeout)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                clock.bound(0.001)
                raise TimeoutError(f"{self.name} did not report {event!r} in {timeout:g} s (log: {self.log_path})")
            try:
                message = self.events.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                continue
            if message is None:
                raise RuntimeError(f"{self.name} exited ({self.process.poll()}) before {event!r}; see {self.log_path}")
            if message.get("event") == "error":
                raise RuntimeError(f"{self.name}: {message.get('error')}")
            if message.get("event") == event:
                return message

    def stop(self, grace: float = 5.0) -> None:
        """End the process (by its pid): politely, then for sure; wait for it."""
        if self.process.poll() is None:
            if self.process.stdin is not None:
                with contextlib.suppress(OSError):
                    self.process.stdin.close()
            try:
                self.process.wait(grace if self.process.stdin is not None else 0.01)
            except subprocess.TimeoutExpired:
                pass
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()

    def kill(self) -> None:
        """SIGKILL by pid, and reap it."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.log.close()


def free_ports(count: int) -> list[int]:
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class DiscoveryWatch:
    """What can be read of the discovery process from outside: metrics, health, CPU, memory."""

    def __init__(self, pid: int, metrics_port: int) -> None:
        self.pid = pid
        self.base = f"http://127.0.0.1:{metrics_port}"
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def get(self, path: str) -> bytes:
        with self.opener.open(self.base + path, timeout=10) as answer:
            return answer.read()

    def health(self) -> dict[str, Any]:
        return json.loads(self.get("/health"))

    def metrics(self) -> dict[str, float]:
        samples = {}
        for line in self.get("/metrics").decode("utf-8").splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def status(self, key: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def reset_peak(self) -> bool:
        """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs)."""
        try:
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")
            return True
        except OSError:
            return False


class Sampler:
    """Polls discovery while a phase runs: peak connections and memory, and a timeline.

    Every ``interval`` it notes the open connections, the handshakes in
    progress, the resolves answered ``ok`` and the pauses of the accept gate
    since the phase began.
    """

    def __init__(self, watch: DiscoveryWatch, interval: float = 0.5) -> None:
        self.watch = watch
        self.interval = interval
        self.peak_connections = 0
        self.peak_rss = 0
        self.peak_handshakes = 0
        self.timeline: list[tuple[float, int, int, int, int]] = []
        self._started = time.time()
        self._base = watch.metrics()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _point(self) -> None:
        metrics = self.watch.metrics()
        ok = 'lucid_discovery_requests_total{outcome="ok",type="resolve"}'
        pauses = "lucid_discovery_accept_pauses_total"
        connections = int(metrics.get("lucid_discovery_connections", 0))
        handshakes = int(metrics.get("lucid_discovery_handshakes", 0))
        self.peak_connections = max(self.peak_connections, connections)
        self.peak_handshakes = max(self.peak_handshakes, handshakes)
        self.peak_rss = max(self.peak_rss, self.watch.status("VmRSS"))
        self.timeline.append((
            round(time.time() - self._started, 1), connections, handshakes,
            int(metrics.get(ok, 0) - self._base.get(ok, 0)), int(metrics.get(pauses, 0) - self._base.get(pauses, 0)),
        ))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(Exception):
                self._point()

    def per_second(self, since: float = 0.0) -> list[list[int]]:
        """[second, connections, handshakes, resolves ok in that second, accept pauses in that second], from ``since``."""
        rows = []
        last_ok = last_pauses = 0
        for t, connections, handshakes, ok, pauses in self.timeline:
            if t < since or (rows and int(t - since) == rows[-1][0]):
                continue
            rows.append([int(t - since), connections, handshakes, ok - last_ok, pauses - last_pauses])
            last_ok, last_pauses = ok, pauses
        return rows


def core_busy_seconds(core: int) -> float:
    """CPU seconds processes have run on core ``core`` since boot (user + nice + system), from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            user, nice, system = (int(v) for v in line.split()[1:4])
            # Not irq and softirq: loopback traffic of this benchmark lands there.
            return (user + nice + system) / os.sysconf("SC_CLK_TCK")
    return 0.0


def process_cpu_seconds(pid: int) -> float:
    """utime + stime of a live process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CoreShare:
    """How much of discovery's core went to other processes during a phase.

    Discovery is pinned to core 0 and everything else of this benchmark kept
    off it, so busy time of core 0 beyond discovery's own CPU time is another
    program's: a noisy neighbour, reported beside the figures it disturbs.
    """

    def __init__(self, watch: DiscoveryWatch, ours: Callable[[], float]) -> None:
        self.watch = watch
        self.ours = ours
        self.started = time.monotonic()
        self.core = core_busy_seconds(0)
        self.discovery = watch.cpu_seconds()
        self.machine = self._machine()
        self.mine = ours()

    @staticmethod
    def _machine() -> float:
        return sum(core_busy_seconds(c) for c in range(os.cpu_count() or 1))

    def others(self) -> float:
        """Cores' worth of CPU (0..cores) that other programs used since the start, on the whole machine."""
        wall = max(time.monotonic() - self.started, 1e-9)
        return max(0.0, (self._machine() - self.machine) - (self.ours() - self.mine)) / wall

    def foreign(self) -> float:
        """Share of core 0 (0..1) used by other processes since the start."""
        wall = max(time.monotonic() - self.started, 1e-9)
        return max(0.0, (core_busy_seconds(0) - self.core) - (self.watch.cpu_seconds() - self.discovery)) / wall


def worst_lag(reports: list[dict[str, Any]]) -> float:
    return round(max((r.get("lag", {}).get("max", 0.0) for r in reports), default=0.0), 3)


def sheds(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    out = {}
    for key, value in after.items():
        if key.startswith("lucid_discovery_shed_total{"):
            reason = key.split('reason="', 1)[1].split('"', 1)[0]
            out[reason] = int(value - before.get(key, 0.0))
    return out


def accept_pauses(before: dict[str, float], after: dict[str, float]) -> int:
    """Times discovery's accept gate stopped the listeners between two /metrics readings."""
    name = "lucid_discovery_accept_pauses_total"
    return int(after.get(name, 0.0) - before.get(name, 0.0))


def resolves_answered(before: dict[str, float], after: dict[str, float]) -> dict[str, int]:
    out = {}
    for key, value in after.items():
        if key.startswith("lucid_discovery_requests_total{") and 'type="resolve"' in key:
            outcome = key.split('outcome="', 1)[1].split('"', 1)[0]
            delta = int(value - before.get(key, 0.0))
            if delta:
                out[outcome] = delta
    return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


class Bench:
    """Starts everything, runs the phases, stops everything."""

    def __init__(self, args: argparse.Namespace, scratch: Path, state: Path) -> None:
        self.args = args
        self.scratch = scratch
        self.state = state
        self.clock = Clock(args.time_limit)
        self.children: list[Child] = []
        self.python = sys.executable
        self.pin = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2 and not args.no_pin
        self.result: dict[str, Any] = {}
        self.fleet: Child | None = None
        self.dead_cpu = 0.0
        self.quiet_budget = args.wait_for_quiet
        self.quiet_waited = 0.0
        self.quota: CpuQuota | None = None
        self.quota_refused = ""

    def log(self, text: str) -> None:
        print(f"[{self.clock.elapsed():6.1f} s] {text}", file=sys.stderr, flush=True)

    # -- set-up -------------------------------------------------------------------

    def prepare(self) -> None:
        from lucidlink.tls import init_ca, issue_certificate

        init_ca(self.scratch / "ca")
        issue_certificate(self.scratch / "ca", [DISCOVERY_NAME], self.scratch / "discovery")
        issue_certificate(self.scratch / "ca", [f"*.{META_DOMAIN}"], self.scratch / "meta")
        self.ca_file = self.scratch / "ca" / "ca.pem"
        self.secret = secrets.token_hex(32)
        self.discovery_port, self.metrics_port, *self.meta_ports = free_ports(2 + META_LISTENERS)
        self.limits = dict(DISCOVERY_LIMITS, max_connections=self.args.max_connections,
                           max_handshakes=self.args.max_handshakes)
        limits = "\n".join(f"{key} = {value}" for key, value in self.limits.items())
        listen = f"tcp:{self.discovery_port}:interface=127.0.0.1"
        if self.args.backlog_discovery:
            listen += f":backlog={self.args.backlog_discovery}"
        self.config = self.scratch / "discovery.ini"
        self.config.write_text(
            "[discovery]\n"
            f"listen = {listen}\n"
            "certificate = discovery.pem\n"
            "private_key = discovery.key\n"
            f"registration_secret_current = {KEY_ID}:{self.secret}\n"
            f"{limits}\n"
            f"metrics_listen = tcp:{self.metrics_port}:interface=127.0.0.1\n"
        )

    def pinned(self, core: int, argv: list[str]) -> list[str]:
        return ["taskset", "-c", str(core), *argv] if self.pin else argv

    def start_discovery(self) -> None:
        argv = [str(Path(self.python).parent / "twistd"), "-n", "--pidfile=", "--logfile",
                str(self.scratch / "discovery.log")]
        profile = os.environ.get("LUCID_BENCH_PROFILE")
        if profile:
            argv += [f"--profile={Path(profile) / 'discovery.prof'}", "--profiler=cprofile", "--savestats"]
        argv += ["lucid-discovery", "--config", str(self.config)]
        child = Child("discovery", self.pinned(0, argv), self.scratch / "discovery.out", events=False)
        self.children.append(child)
        self.discovery = child
        if self.args.discovery_cpu:
            self.quota = CpuQuota(self.args.discovery_cpu)
            refused = self.quota.apply(child.pid)
            if refused:
                self.quota_refused = refused
                self.log(f"discovery runs without a CPU quota: {refused}")
        self.watch = DiscoveryWatch(child.pid, self.metrics_port)
        deadline = time.monotonic() + self.clock.bound(30)
        while True:
            if child.process.poll() is not None:
                raise RuntimeError(f"discovery exited at start; see {self.scratch / 'discovery.log'}")
            try:
                self.watch.health()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise TimeoutError("discovery did not start in 30 s") from None
                time.sleep(0.1)

    def spawn_fleet(self) -> Child:
        """Start a fleet process and wait until it is loaded; it listens once told to go."""
        argv = [self.python, __file__, "--role", "fleet", "--ca", str(self.ca_file),
                "--cert", str(self.scratch / "meta.pem"), "--key", str(self.scratch / "meta.key"),
                "--ports", ",".join(map(str, self.meta_ports)), "--filespaces", str(self.args.filespaces),
                "--discovery-port", str(self.discovery_port), "--secret", self.secret,
                "--backlog", str(self.args.backlog_fleet), "--handshakes", str(self.args.fleet_handshakes),
                "--lifetime", str(self.args.time_limit + self.args.wait_for_quiet + 60)]
        fleet = Child("fleet", self.pinned(1, argv), self.scratch / "fleet.log")
        self.children.append(fleet)
        fleet.expect("loaded", self.clock, 60)
        return fleet

    def start_fleet(self, fleet: Child | None = None) -> tuple[float, float]:
        """Tell a loaded fleet to go (a new one if none): the times (time.time()) it listened and had registered all."""
        fleet = fleet or self.spawn_fleet()
        self.fleet = fleet
        fleet.send(cmd="go")
        fleet.expect("listening", self.clock, 60)
        listening = time.time()
        fleet.expect("ready", self.clock, 60)
        return listening, time.time()

    def our_cpu(self) -> float:
        """CPU seconds of this benchmark's processes, the killed ones included."""
        usage = resource.getrusage(resource.RUSAGE_SELF)
        alive = sum(process_cpu_seconds(child.pid) for child in self.children)
        return usage.ru_utime + usage.ru_stime + alive + self.dead_cpu

    def kill_fleet(self) -> None:
        assert self.fleet is not None
        self.dead_cpu += process_cpu_seconds(self.fleet.pid)
        self.fleet.kill()
        self.children.remove(self.fleet)
        self.fleet = None

    def start_generators(self) -> None:
        self.generators = []
        for g in range(self.args.generators):
            argv = [self.python, __file__, "--role", "generator", "--index", str(g),
                    "--generators", str(self.args.generators), "--ca", str(self.ca_file),
                    "--discovery-port", str(self.discovery_port), "--state", str(self.state),
                    "--seed", str(self.args.seed + g), "--lifetime", str(self.args.time_limit + self.args.wait_for_quiet + 60)]
            child = Child(f"generator {g}", self.pinned(1, argv), self.scratch / f"generator-{g}.log")
            self.children.append(child)
            self.generators.append(child)
        for child in self.generators:
            child.expect("hello", self.clock, 60)

    def everyone(self, **command: Any) -> None:
        for child in self.generators:
            child.send(**command)

    def collect(self, event: str, timeout: float) -> list[dict[str, Any]]:
        return [child.expect(event, self.clock, timeout) for child in self.generators]

    def stop_all(self) -> None:
        for child in reversed(self.children):
            with contextlib.suppress(Exception):
                if child.name.startswith("generator"):
                    child.send(cmd="quit")
            child.stop()
        self.children = []
        if self.quota is not None:
            self.quota.remove()

    def settle(self, timeout: float = 15.0) -> None:
        """Wait until discovery holds only the fleet's connections again."""
        deadline = time.monotonic() + self.clock.bound(timeout)
        while time.monotonic() < deadline:
            if self.watch.health()["connections"] <= REGISTRATION_CONNECTIONS:
                return
            time.sleep(0.2)

    # -- phases -------------------------------------------------------------------

    def measure_capacity(self) -> dict[str, Any]:
        args = self.args
        before, cpu_before = self.watch.metrics(), self.watch.cpu_seconds()
        share = CoreShare(self.watch, self.our_cpu)
        t0 = time.time() + 0.5
        self.everyone(cmd="capacity", t0=t0, warmup=args.capacity_warmup, seconds=args.capacity_seconds,
                      concurrency=max(1, args.capacity_concurrency // args.generators),
                      source_base=0, sources=CAPACITY_SOURCES, filespaces=args.filespaces)
        with Sampler(self.watch) as sampler:
            reports = self.collect("capacity", args.capacity_warmup + args.capacity_seconds + 60)
        after = self.watch.metrics()
        ok = sum(r["ok"] for r in reports)
        latencies = [x for r in reports for x in r["latencies"]]
        errors: dict[str, int] = {}
        for r in reports:
            for key, count in r["errors"].items():
                errors[key] = errors.get(key, 0) + count
        wall = args.capacity_warmup + args.capacity_seconds
        discovery_cpu = (self.watch.cpu_seconds() - cpu_before) / wall
        answered = sum(resolves_answered(before, after).values())
        cpu_per_resolve = discovery_cpu * wall / answered if answered else None
        return {
            "resolves_per_s": ok / args.capacity_seconds,
            "discovery_cpu_ms_per_resolve": cpu_per_resolve and cpu_per_resolve * 1000,
            "projected_one_core_resolves_per_s": cpu_per_resolve and 1 / cpu_per_resolve,
            "concurrency": max(1, args.capacity_concurrency // args.generators) * args.generators,
            "seconds": args.capacity_seconds,
            "failed": sum(r["failed"] for r in reports),
            "errors": errors,
            "sheds": sheds(before, after),
            "p50_s": percentile(latencies, 0.5),
            "p99_s": percentile(latencies, 0.99),
            "discovery_cpu": discovery_cpu,
            "discovery_peak_connections": sampler.peak_connections,
            "generator_lag_max_s": worst_lag(reports),
            "other_processes_on_discovery_core": share.foreign(),
            "other_programs_cores": share.others(),
        }

    def measure_paced(self, closed_loop: float) -> dict[str, Any]:
        """Step an open-loop offered rate up until goodput stops keeping up; the last rate that kept up is the capacity."""
        args = self.args
        steps: list[dict[str, Any]] = []
        sustained: dict[str, Any] | None = None
        base = max(20.0, closed_loop)
        for share in PACED_LADDER[:args.paced_steps]:
            rate = round(base * share)
            before = self.watch.metrics()
            cpu_before = self.watch.cpu_seconds()
            t0 = time.time() + 0.5
            self.everyone(cmd="paced", t0=t0, seconds=args.paced_seconds, rate=rate / args.generators,
                          grace=PACED_GRACE, source_base=0, sources=CAPACITY_SOURCES, filespaces=args.filespaces)
            reports = self.collect("paced", args.paced_seconds + PACED_GRACE + 30)
            after = self.watch.metrics()
            started = sum(r["started"] for r in reports)
            ok = sum(r["ok"] for r in reports)
            failed = sum(r["failed"] for r in reports)
            latencies = [x for r in reports for x in r["latencies"]]
            p99 = percentile(latencies, 0.99)
            step = {
                "offered_per_s": started / args.paced_seconds,
                "goodput_per_s": ok / args.paced_seconds,
                "failed": failed,
                "p50_s": percentile(latencies, 0.5),
                "p99_s": p99,
                "sheds": sum(sheds(before, after).values()),
                "discovery_cpu": (self.watch.cpu_seconds() - cpu_before) / (args.paced_seconds + PACED_GRACE),
                "generator_lag_max_s": worst_lag(reports),
            }
            step["kept_up"] = (started > 0 and ok >= PACED_KEEP_UP * started and failed == 0
                               and p99 is not None and p99 <= PACED_P99_BOUND)
            steps.append(step)
            self.log(f"  paced {step['offered_per_s']:.0f}/s offered: goodput {step['goodput_per_s']:.0f}/s, "
                     f"p99 {_fmt(p99 and p99 * 1000, ' ms', 0)}, failed {failed}: {'kept up' if step['kept_up'] else 'did not keep up'}")
            self.settle()
            if not step["kept_up"]:
                break
            sustained = step
        return {
            "resolves_per_s": sustained["offered_per_s"] if sustained else 0.0,
            "criteria": {"goodput_share_of_offered": PACED_KEEP_UP, "p99_s_at_most": PACED_P99_BOUND, "failed": 0},
            "seconds_per_step": args.paced_seconds,
            "top_of_ladder_kept_up": bool(steps) and steps[-1]["kept_up"],
            "steps": steps,
        }

    def scenario_a(self, kind: str, phase: int, warm_rate: float) -> dict[str, Any]:
        args = self.args
        n = args.reconnect_clients
        self.wait_for_quiet(f"scenario A, {kind}")
        self.log(f"scenario A, {kind}: {n} clients connect at {warm_rate:.0f}/s")
        warm_started = time.monotonic()
        self.everyone(cmd="connect", kind=kind, phase=f"a-{kind}", clients=n,
                      filespaces=args.filespaces, rate=warm_rate, source_base=phase * SOURCE_RANGE,
                      deadline=time.time() + n / warm_rate + 120)
        warm = self.collect("connected", n / warm_rate + 150)
        warm_seconds = time.monotonic() - warm_started
        failed = sum(r["failed"] for r in warm)
        if failed:
            self.log(f"  {failed} clients could not connect: {[r['errors'] for r in warm]}")
        self.settle()
        self.wait_for_quiet(f"the restart of the fleet ({kind})")
        before = self.watch.metrics()
        self.everyone(cmd="mark", deadline=time.time() + args.reconnect_timeout)
        self.collect("marked", 30)
        self.log(f"  all connected in {warm_seconds:.1f} s; killing the fleet (pid {self.fleet.pid if self.fleet else '?'})")
        standby = self.spawn_fleet()
        killed = time.time()
        cpu_before = self.watch.cpu_seconds()
        share = CoreShare(self.watch, self.our_cpu)
        with Sampler(self.watch) as sampler:
            self.kill_fleet()
            listening, registered = self.start_fleet(standby)
            listening, restart = listening - killed, registered - killed
            self.log(f"  fleet restarted on the same ports: listening after {listening:.2f} s, registered after {restart:.2f} s")
            reports = self.collect("reconnected", args.reconnect_timeout + 30)
        reconnect_wall = time.time() - killed
        after = self.watch.metrics()
        times = [t - killed for r in reports for t in r["times"]]
        requests = sum(r["discovery_requests"] for r in reports)
        self.everyone(cmd="release")
        self.collect("released", 60)
        self.settle()
        result = {
            "kind": kind,
            "connected_before": sum(r["connected"] for r in warm),
            "warmup_s": warm_seconds,
            "warmup_discovery_requests": sum(r["discovery_requests"] for r in warm),
            "fleet_restart_s": restart,
            "fleet_listening_s": listening,
            "reconnected": sum(r["reconnected"] for r in reports),
            "not_reconnected": sum(r["missing"] for r in reports),
            "discovery_requests": requests,
            "discovery_requests_share": requests / n,
            "clients_that_asked_discovery": sum(r["clients_that_asked"] for r in reports),
            "discovery_resolves_answered": resolves_answered(before, after),
            "sheds": sheds(before, after),
            "discovery_cpu": (self.watch.cpu_seconds() - cpu_before) / reconnect_wall,
            "discovery_peak_connections": sampler.peak_connections,
            "generator_lag_max_s": worst_lag(reports),
            "warmup_generator_lag_max_s": worst_lag(warm),
            "other_processes_on_discovery_core": share.foreign(),
            "other_programs_cores": share.others(),
            "time_to_all_reconnected_s": max(times) if times and not sum(r["missing"] for r in reports) else None,
            "reconnect_p50_s": percentile(times, 0.5),
            "reconnect_p99_s": percentile(times, 0.99),
            "errors": [r["errors"] for r in reports if r["errors"]],
        }
        self.log(f"  {result['reconnected']} reconnected, {requests} discovery requests,"
                 f" last after {_fmt(result['time_to_all_reconnected_s'], ' s')}, generator lag up to {result['generator_lag_max_s']} s")
        return result

    def scenario_b(self, kind: str, phase: int, deadline: float) -> dict[str, Any]:
        args = self.args
        self.settle()
        self.wait_for_quiet(f"scenario B, {kind}")
        self.log(f"scenario B, {kind}: {args.clients} fresh clients resolve at once (bound {deadline:g} s)")
        peak_reset = self.watch.reset_peak()
        before, cpu_before = self.watch.metrics(), self.watch.cpu_seconds()
        share = CoreShare(self.watch, self.our_cpu)
        t0 = time.time() + 1.0
        self.everyone(cmd="storm", kind=kind, phase=f"b-{kind}", clients=args.clients, filespaces=args.filespaces,
                      t0=t0, deadline=t0 + deadline, source_base=phase * SOURCE_RANGE, naive_delay=args.naive_delay)
        with Sampler(self.watch) as sampler:
            reports = self.collect("storm", deadline + 60)
        wall = time.time() - t0
        after = self.watch.metrics()
        latencies = [x for r in reports for x in r["latencies"]]
        gave_up = sum(r["gave_up"] for r in reports)
        all_resolved = max(latencies) if latencies and not gave_up else None
        result = {
            "kind": kind,
            "resolved": len(latencies),
            "gave_up": gave_up,
            "bound_s": deadline,
            "time_to_all_resolved_s": all_resolved,
            "generators_started_everyone_after_s": max(r["started_all_s"] for r in reports),
            "goodput_per_s": (len(latencies) / all_resolved) if all_resolved else None,
            "resolved_per_s_within_bound": len(latencies) / max(latencies) if latencies else 0.0,
            "p50_s": percentile(latencies, 0.5),
            "p99_s": percentile(latencies, 0.99),
            "discovery_requests": sum(r["discovery_requests"] for r in reports),
            "discovery_resolves_answered": resolves_answered(before, after),
            "sheds": sheds(before, after),
            "discovery_cpu": (self.watch.cpu_seconds() - cpu_before) / max(wall, 1e-9),
            "discovery_peak_rss_bytes": self.watch.status("VmHWM"),
            "discovery_peak_connections": sampler.peak_connections,
            "discovery_peak_handshakes": sampler.peak_handshakes,
            "accept_pauses": accept_pauses(before, after),
            "generator_lag_max_s": worst_lag(reports),
            "other_processes_on_discovery_core": share.foreign(),
            "other_programs_cores": share.others(),
            "timeline_per_s": sampler.per_second(since=t0 - sampler._started),
            "peak_rss_is_of_this_phase": peak_reset,
            "errors": [r["errors"] for r in reports if r["errors"]],
        }
        self.log(f"  {len(latencies)} resolved, {gave_up} gave up, last at {_fmt(all_resolved, ' s')},"
                 f" sheds {result['sheds']}, discovery CPU {result['discovery_cpu']:.0%},"
                 f" generator lag up to {result['generator_lag_max_s']} s")
        return result

    def machine_load(self, seconds: float = 2.0) -> float:
        """Cores' worth of CPU other programs use now (before anything of ours runs)."""
        cores = os.cpu_count() or 1
        before = sum(core_busy_seconds(c) for c in range(cores))
        time.sleep(seconds)
        return (sum(core_busy_seconds(c) for c in range(cores)) - before) / seconds

    def wait_for_quiet(self, before: str) -> None:
        """Wait until other programs use under a tenth of a core, within the --wait-for-quiet budget.

        The machine this runs on may be shared: a phase measured while
        another program takes half a core measures that program.  Time spent
        waiting is added to the hard time limit (and taken from the budget).
        """
        while self.quiet_budget > 0:
            started = time.monotonic()
            ours = self.our_cpu()
            cores = os.cpu_count() or 1
            busy = sum(core_busy_seconds(c) for c in range(cores))
            time.sleep(QUIET_WINDOW)
            load = (sum(core_busy_seconds(c) for c in range(cores)) - busy - (self.our_cpu() - ours)) / QUIET_WINDOW
            waited = time.monotonic() - started
            self.quiet_budget -= waited
            self.clock.limit += waited
            self.quiet_waited += waited
            if load < QUIET_LOAD:
                return
            self.log(f"before {before}: other programs use {load:.2f} cores; waiting for a quiet machine")
        self.log(f"before {before}: no quiet moment left to wait for; measuring anyway")

    def run(self) -> dict[str, Any]:
        args = self.args
        self.wait_for_quiet("the start")
        self.result["machine_load_before"] = load = self.machine_load()
        self.log(f"other programs use {load:.2f} cores of {os.cpu_count()} before the start"
                 + ("; the figures will be disturbed" if load > QUIET_LOAD else ""))
        self.prepare()
        self.start_discovery()
        self.log(f"discovery pid {self.discovery.pid} on 127.0.0.1:{self.discovery_port}"
                 f"{' pinned to core 0' if self.pin else ''}")
        self.start_fleet()
        entries = self.watch.health()["registry_entries"]
        self.log(f"fleet registered {entries} filespaces on {META_LISTENERS} listeners")
        self.start_generators()
        rss_idle = self.watch.status("VmRSS")

        self.wait_for_quiet("the capacity")
        self.log(f"scenario B: capacity, {args.capacity_concurrency} resolves in flight for {args.capacity_seconds:g} s")
        capacity = self.measure_capacity()
        self.log(f"  {capacity['resolves_per_s']:.0f} resolves/s, discovery CPU {capacity['discovery_cpu']:.0%}")
        self.settle()
        self.log(f"scenario B: paced capacity, fresh resolves at a fixed rate for {args.paced_seconds:g} s a step")
        paced = self.measure_paced(capacity["resolves_per_s"])
        self.log(f"  sustained {paced['resolves_per_s']:.0f} resolves/s (closed loop {capacity['resolves_per_s']:.0f})")
        warm_rate = max(10.0, capacity["resolves_per_s"] * args.warmup_share)

        a_designed: dict[str, Any] | None = None
        a_naive: dict[str, Any] | None = None
        if not args.only_b:
            a_designed = self.scenario_a("designed", 1, warm_rate)
            a_naive = self.scenario_a("naive", 2, warm_rate)
        b_designed = self.scenario_b("designed", 3, args.storm_deadline)
        naive_bound = args.naive_bound or max(20.0, min(args.storm_deadline, 2 * (b_designed["time_to_all_resolved_s"] or args.storm_deadline)))
        b_naive = self.scenario_b("naive", 4, naive_bound)

        warnings = []
        phases = {"capacity": capacity, **({"A designed": a_designed, "A naive": a_naive} if a_designed else {}),
                  "B designed": b_designed, "B naive": b_naive}
        for name, phase in phases.items():
            if phase["generator_lag_max_s"] > SATURATED_LAG:
                warnings.append(f"{name}: the load generators were saturated (their reactors ran up to "
                                f"{phase['generator_lag_max_s']:.1f} s late), so client-side time-outs weigh on these figures")
            if phase["other_programs_cores"] > NOISY_CORES or phase["other_processes_on_discovery_core"] > NOISY_CORES:
                warnings.append(f"{name}: other programs used {phase['other_programs_cores']:.2f} cores "
                                f"({phase['other_processes_on_discovery_core']:.0%} of discovery's core)")
        goodput = b_designed["goodput_per_s"] or 0.0
        reference = paced["resolves_per_s"]
        if not reference:
            warnings.append("paced capacity: not even the lowest offered rate kept up; goodput is compared to the closed-loop capacity")
            reference = capacity["resolves_per_s"]
        targets = {
            **({} if a_designed is None else {
                "a_designed_discovery_requests_under_1pct":
                    a_designed["discovery_requests"] < TARGET_RECONNECT_SHARE * args.reconnect_clients
                    and a_designed["not_reconnected"] == 0,
            }),
            "b_designed_none_gave_up": b_designed["gave_up"] == 0,
            "b_designed_goodput_at_least_80pct_of_capacity": goodput >= TARGET_GOODPUT_RATIO * reference,
        }
        return {
            "benchmark": "discovery_storm",
            "clients": args.clients,
            "reconnect_clients": args.reconnect_clients,
            "filespaces": args.filespaces,
            "generators": args.generators,
            "discovery_pinned_to_core_0": self.pin,
            "discovery_cpu_quota": (None if not args.discovery_cpu or self.quota_refused
                                    else args.discovery_cpu),
            "source_addresses": "one 127.x.y.z per simulated client",
            "discovery_limits": self.limits,
            "discovery_listen_backlog": args.backlog_discovery or "discovery's default (4096, capped by net.core.somaxconn)",
            "discovery_rss_idle_bytes": rss_idle,
            "capacity": capacity,
            "paced_capacity": paced,
            "goodput_reference_per_s": reference,
            "scenario_a": {"designed": a_designed, "naive": a_naive} if a_designed else None,
            "scenario_b": {"designed": b_designed, "naive": b_naive,
                           "goodput_ratio": goodput / reference if reference else 0.0},
            "targets": targets,
            "meets_targets": all(targets.values()),
            "warnings": warnings,
            "machine_load_before": round(self.result["machine_load_before"], 2),
            "duration_s": round(self.clock.elapsed(), 1),
            "waited_for_quiet_s": round(self.quiet_waited, 1),
        }


# ---------------------------------------------------------------------------
# Output


def _fmt(value: Any, unit: str = "", digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}{unit}"
    return f"{value:,}{unit}"


def print_report(result: dict[str, Any]) -> None:
    a, b, cap = result["scenario_a"], result["scenario_b"], result["capacity"]
    n = result["clients"]
    rows: list[tuple[str, str, str]] = []

    def row(label: str, designed: Any, naive: Any) -> None:
        rows.append((label, designed, naive))

    print(f"discovery storm: {result['filespaces']:,} filespaces, {result['generators']} generator processes, "
          f"discovery {'pinned to core 0' if result['discovery_pinned_to_core_0'] else 'not pinned'}"
          + (f", capped at {result['discovery_cpu_quota']:.0%} of a core" if result["discovery_cpu_quota"] else ""))
    paced, ref = result["paced_capacity"], result["goodput_reference_per_s"]
    print(f"paced capacity (open loop, {paced['seconds_per_step']:g} s a step, kept up: goodput >= "
          f"{PACED_KEEP_UP:.0%} of offered, p99 <= {PACED_P99_BOUND * 1000:.0f} ms, nothing failed): "
          f"{paced['resolves_per_s']:,.0f} resolves/s"
          + (" (the ladder's top rate kept up: the capacity is at least this)" if paced["top_of_ladder_kept_up"] else ""))
    print("  steps, offered -> goodput (p99): " + ", ".join(
        f"{s['offered_per_s']:,.0f} -> {s['goodput_per_s']:,.0f} ({_fmt(s['p99_s'] and s['p99_s'] * 1000, ' ms', 0)})"
        + ("" if s["kept_up"] else " no") for s in paced["steps"]))
    print(f"capacity (closed loop, for reference, {cap['concurrency']} in flight, {cap['seconds']:g} s): "
          f"{cap['resolves_per_s']:,.0f} resolves/s, p50 {_fmt(cap['p50_s'] and cap['p50_s'] * 1000, ' ms', 1)}, "
          f"sheds {sum(cap['sheds'].values())}, discovery CPU {cap['discovery_cpu']:.0%}, "
          f"other programs on its core {cap['other_processes_on_discovery_core']:.0%} "
          f"(on the machine {cap['other_programs_cores']:.2f} cores), "
          f"load generators' worst lag {cap['generator_lag_max_s']:.2f} s")
    if cap["projected_one_core_resolves_per_s"]:
        print(f"  discovery spent {cap['discovery_cpu_ms_per_resolve']:.2f} ms of CPU per resolve: one core of it would answer "
              f"~{cap['projected_one_core_resolves_per_s']:,.0f} resolves/s (extrapolated; "
              f"{'discovery was the bottleneck' if cap['discovery_cpu'] >= 0.8 * (result['discovery_cpu_quota'] or 1) else 'the load generators, not discovery, set the capacity above'})")
    print()
    if a is not None:
        row(f"A: fleet restarts at the same addresses, {result['reconnect_clients']:,} clients", "designed", "naive")
        ad, an = a["designed"], a["naive"]
        row("  discovery requests while reconnecting", _fmt(ad["discovery_requests"]), _fmt(an["discovery_requests"]))
        row("  ... as a share of N", f"{ad['discovery_requests_share']:.2%}", f"{an['discovery_requests_share']:.2%}")
        row("  clients that asked discovery", _fmt(ad["clients_that_asked_discovery"]), _fmt(an["clients_that_asked_discovery"]))
        row("  reconnected / not", f"{ad['reconnected']:,} / {ad['not_reconnected']:,}", f"{an['reconnected']:,} / {an['not_reconnected']:,}")
        row("  time to all reconnected (from kill)", _fmt(ad["time_to_all_reconnected_s"], " s"), _fmt(an["time_to_all_reconnected_s"], " s"))
        row("  reconnect p50 / p99", f"{_fmt(ad['reconnect_p50_s'], ' s')} / {_fmt(ad['reconnect_p99_s'], ' s')}",
            f"{_fmt(an['reconnect_p50_s'], ' s')} / {_fmt(an['reconnect_p99_s'], ' s')}")
        row("  discovery sheds", _fmt(sum(ad["sheds"].values())), _fmt(sum(an["sheds"].values())))
        row("  fleet listening again, after the kill", _fmt(ad["fleet_listening_s"], " s"), _fmt(an["fleet_listening_s"], " s"))
        row("  fleet registered again, after the kill", _fmt(ad["fleet_restart_s"], " s"), _fmt(an["fleet_restart_s"], " s"))
        row("  load generators' worst lag", _fmt(ad["generator_lag_max_s"], " s"), _fmt(an["generator_lag_max_s"], " s"))
        row("  other programs on discovery's core", f"{ad['other_processes_on_discovery_core']:.0%}",
            f"{an['other_processes_on_discovery_core']:.0%}")
        row("  other programs, whole machine (cores)", f"{ad['other_programs_cores']:.2f}", f"{an['other_programs_cores']:.2f}")
    bd, bn = b["designed"], b["naive"]
    row(f"B: {n:,} clients resolve at once", "designed", "naive")
    row("  resolved / gave up", f"{bd['resolved']:,} / {bd['gave_up']:,}", f"{bn['resolved']:,} / {bn['gave_up']:,}")
    row("  load generators had started everyone after", _fmt(bd["generators_started_everyone_after_s"], " s"),
        _fmt(bn["generators_started_everyone_after_s"], " s"))
    row("  time to all resolved", _fmt(bd["time_to_all_resolved_s"], " s"),
        _fmt(bn["time_to_all_resolved_s"], " s") if bn["time_to_all_resolved_s"] else f"not in {bn['bound_s']:g} s")
    row("  goodput (N / time to all resolved)", _fmt(bd["goodput_per_s"], "/s", 0), _fmt(bn["goodput_per_s"], "/s", 0))
    row("  ... as a share of paced capacity", f"{b['goodput_ratio']:.0%}",
        f"{bn['goodput_per_s'] / ref:.0%}" if bn["goodput_per_s"] and ref else "-")
    row("  resolve latency p50 / p99", f"{_fmt(bd['p50_s'], ' s')} / {_fmt(bd['p99_s'], ' s')}",
        f"{_fmt(bn['p50_s'], ' s')} / {_fmt(bn['p99_s'], ' s')}")
    row("  discovery requests (client side)", _fmt(bd["discovery_requests"]), _fmt(bn["discovery_requests"]))
    row("  sheds (discovery /metrics)", _fmt(sum(bd["sheds"].values())), _fmt(sum(bn["sheds"].values())))
    row("  discovery CPU", f"{bd['discovery_cpu']:.0%}", f"{bn['discovery_cpu']:.0%}")
    row("  discovery peak connections", _fmt(bd["discovery_peak_connections"]), _fmt(bn["discovery_peak_connections"]))
    row("  discovery peak handshakes in progress", _fmt(bd["discovery_peak_handshakes"]), _fmt(bn["discovery_peak_handshakes"]))
    row("  accept gate pauses (/metrics)", _fmt(bd["accept_pauses"]), _fmt(bn["accept_pauses"]))
    row("  BUSY answers (/metrics)", _fmt(bd["discovery_resolves_answered"].get("busy", 0)),
        _fmt(bn["discovery_resolves_answered"].get("busy", 0)))
    row("  load generators' worst lag", _fmt(bd["generator_lag_max_s"], " s"), _fmt(bn["generator_lag_max_s"], " s"))
    row("  other programs on discovery's core", f"{bd['other_processes_on_discovery_core']:.0%}",
        f"{bn['other_processes_on_discovery_core']:.0%}")
    row("  other programs, whole machine (cores)", f"{bd['other_programs_cores']:.2f}", f"{bn['other_programs_cores']:.2f}")
    row("  discovery peak RSS", _fmt(bd["discovery_peak_rss_bytes"] / 2**20, " MiB", 1), _fmt(bn["discovery_peak_rss_bytes"] / 2**20, " MiB", 1))
    width = max(len(r[0]) for r in rows) + 2
    for label, designed, naive in rows:
        print(f"{label:<{width}}{designed:>18}{naive:>18}")
    print()
    t = result["targets"]
    if a is not None:
        print(f"target A: designed discovery requests < 1% of N ({ad['discovery_requests']:,} < "
              f"{result['reconnect_clients'] * TARGET_RECONNECT_SHARE:,.0f}), all reconnected: "
              f"{'met' if t['a_designed_discovery_requests_under_1pct'] else 'NOT met'}")
    print(f"target B: designed clients, none gives up: {'met' if t['b_designed_none_gave_up'] else 'NOT met'}")
    print(f"target B: goodput >= 80% of paced capacity ({_fmt(bd['goodput_per_s'], '/s', 0)} vs {0.8 * ref:,.0f}/s): "
          f"{'met' if t['b_designed_goodput_at_least_80pct_of_capacity'] else 'NOT met'}")
    for warning in result["warnings"]:
        print(f"warning: {warning}")
    print(f"run time {result['duration_s']:g} s (of which {result['waited_for_quiet_s']:g} s waiting for a quiet machine)")
    print(json.dumps(result, sort_keys=True))


# ---------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=10_000, help="simulated clients N (default 10000)")
    parser.add_argument("--reconnect-clients", type=int, default=0,
                        help="scenario A's clients, if not --clients (a 2-core machine cannot simulate 10,000 reconnecting at once)")
    parser.add_argument("--filespaces", type=int, default=1_000, help="filespaces of the simulated fleet")
    parser.add_argument("--generators", type=int, default=4, help="load generator processes K")
    parser.add_argument("--quick", action="store_true", help="a smoke run: N=1000, 200 filespaces, shorter phases")
    parser.add_argument("--time-limit", type=float, default=900.0, help="stop everything after this many seconds")
    parser.add_argument("--capacity-seconds", type=float, default=8.0, help="measuring time of the capacity")
    parser.add_argument("--capacity-warmup", type=float, default=1.0, help="time before the capacity is measured")
    parser.add_argument("--capacity-concurrency", type=int, default=128,
                        help="resolves in flight while measuring capacity (enough to saturate: 32 is bound by latency on a loaded machine)")
    parser.add_argument("--paced-seconds", type=float, default=3.0, help="paced capacity: offered-rate time of each step")
    parser.add_argument("--paced-steps", type=int, default=len(PACED_LADDER),
                        help="paced capacity: at most this many steps (rates 0.3x, 0.4x... 2.5x the closed-loop capacity)")
    parser.add_argument("--warmup-share", type=float, default=0.3,
                        help="scenario A connects clients at this share of capacity (each costs two handshakes and a fleet one)")
    parser.add_argument("--reconnect-timeout", type=float, default=120.0, help="scenario A: bound of the reconnect")
    parser.add_argument("--storm-deadline", type=float, default=120.0, help="scenario B: deadline of the designed clients")
    parser.add_argument("--naive-bound", type=float, default=0.0, help="scenario B: bound of the naive storm (default 2x designed)")
    parser.add_argument("--naive-delay", type=float, default=0.0, help="naive clients' fixed delay between attempts")
    parser.add_argument("--max-connections", type=int, default=DISCOVERY_LIMITS["max_connections"],
                        help="discovery's max_connections (its connection cap)")
    parser.add_argument("--max-handshakes", type=int, default=DISCOVERY_LIMITS["max_handshakes"],
                        help="discovery's max_handshakes (handshakes in progress before it stops accepting)")
    parser.add_argument("--backlog-discovery", type=int, default=0, help="listen backlog of discovery (default: discovery's, 4096)")
    parser.add_argument("--backlog-fleet", type=int, default=4096, help="listen backlog of the fleet's listeners")
    parser.add_argument("--fleet-handshakes", type=int, default=128,
                        help="the simulated fleet shakes hands with at most this many clients at once")
    parser.add_argument("--only-b", action="store_true", help="scenario B alone (capacity and the storm), without A")
    parser.add_argument("--no-pin", action="store_true", help="do not pin discovery to core 0 and the rest to core 1")
    parser.add_argument("--discovery-cpu", type=float, default=0.0, metavar="SHARE",
                        help="cap discovery at this share of a core (a cgroup CPU quota), so that it, not the "
                             "load generators, sets the rates measured (default: no cap)")
    parser.add_argument("--wait-for-quiet", type=float, default=0.0,
                        help="first wait up to this many seconds for other programs to leave the CPUs alone")
    parser.add_argument("--seed", type=int, default=1)
    # child roles
    parser.add_argument("--role", choices=["fleet", "generator"], help=argparse.SUPPRESS)
    for hidden in ("--ca", "--cert", "--key", "--ports", "--secret", "--state"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    for hidden in ("--discovery-port", "--index", "--backlog", "--handshakes"):
        parser.add_argument(hidden, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--lifetime", type=float, default=600.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "fleet":
        run_fleet(args)
        return
    if args.role == "generator":
        run_generator(args)
        return
    if args.quick:
        args.clients, args.filespaces = 1_000, 200
        args.capacity_seconds = min(args.capacity_seconds, 5.0)
        args.paced_seconds = min(args.paced_seconds, 2.0)
        args.storm_deadline = min(args.storm_deadline, 60.0)
    args.reconnect_clients = args.reconnect_clients or args.clients
    if min(args.clients, args.reconnect_clients) < args.generators:
        parser.error("--clients and --reconnect-clients must be at least --generators")

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    cores = os.sched_getaffinity(0)
    if not args.no_pin and len(cores) >= 2 and 0 in cores:
        os.sched_setaffinity(0, cores - {0})  # the coordinator stays off discovery's core too
    scratch = Path(tempfile.mkdtemp(prefix="lucid-storm-"))
    shm = Path("/dev/shm")
    # Client state (the endpoint caches, fsynced on every write) on tmpfs: a
    # real client fsyncs its own disk; ten thousand fsyncs in one process
    # would measure this machine's disk, not discovery.
    state = Path(tempfile.mkdtemp(prefix="lucid-storm-state-", dir=shm if shm.is_dir() else None))
    bench = Bench(args, scratch, state)
    try:
        result = bench.run()
    except BaseException:
        print(f"benchmark failed; logs are in {scratch}", file=sys.stderr)
        bench.stop_all()
        shutil.rmtree(state, ignore_errors=True)
        raise
    bench.stop_all()
    shutil.rmtree(state, ignore_errors=True)
    shutil.rmtree(scratch, ignore_errors=True)
    print_report(result)
    sys.exit(0 if result["meets_targets"] else 1)


if __name__ == "__main__":
    main()
