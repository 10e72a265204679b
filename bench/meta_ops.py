"""
Benchmark of the metadata server: metadata operations per second over loopback TLS.

The server is the real thing: ``twistd -n lucid-meta`` in its own process,
with a temporary data folder and certificates, bootstrapped with its token
file.  Clients log in as a writer (Argon2id at the weakest parameters
clients accept, so logging in is not what is measured) and keep many
requests in flight on one connection, as a FUSE client with many threads
would.  Random 32-byte blobs stand in for sealed names.

1. One client: creates (``Create``, which also opens a handle), releases of
   those handles, lookups, getattrs (stat), a full ``ReadDir`` of the
   directory just made, renames within the directory, unlinks.
2. The same operations, the same kind of request list, on a
   ``MetadataStore`` in a temporary folder in this process, through
   ``apply()`` and its reads: the baseline that shows what the protocol,
   TLS and the service cost.
3. Eight client processes, each with its own reactor and connection, run a
   mixed workload for a fixed time: the total operations per second, and
   the same mix on the in-process store (one process, lanes taking turns).
4. The server is stopped, its database filled to ``--entries`` entries (a
   bulk SQL path, checked at start to give the same database as
   ``apply()``), and started again; then a ``ReadDir`` of the 100,000-entry
   directory, lookups and getattrs, and the server's VmRSS / VmHWM.

Every commit waits for an fsync (WAL, ``synchronous=FULL``).  In process
each mutation is its own commit; the server groups the mutations that
arrive together into one commit, so with many requests in flight it can
beat the in-process figure for writes.  A shared disk's fsync time wanders,
so steps 1 to 3 run in rounds that alternate in-process and over the wire
(each first in turn) and report medians; each round also measures fsyncs
per second on the server's disk.

Prints a table, then one line of JSON.

    python bench/meta_ops.py [--quick] [--seconds 10] [--entries 1000000] [--ops 10000]
                             [--scratch DIR] [--durability off|sync|async] [--profile-server DIR]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import re
import select
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.python.failure import Failure

from lucidlink import crypto
from lucidlink.errors import Restoring
from lucidlink.meta import mutations as m
from lucidlink.meta.bootstrap import TOKEN_FILE_NAME, read_token
from lucidlink.meta.config import identity_for
from lucidlink.meta.server import DATABASE_NAME
from lucidlink.meta.store import MAX_READDIR_LIMIT, ROOT_INODE, MetadataStore
from lucidlink.protocol import messages as w
from lucidlink.protocol.network import connect_tls
from lucidlink.supervise import twistd_command
from lucidlink.tls import init_ca, issue_certificate

FILESPACE = "bench"
USER = "bench"
UID = GID = 1000
FILE_MODE = 0o644
DIR_MODE = 0o755
OPEN_FOR_WRITING = 0o101  # O_WRONLY | O_CREAT, as Linux spells them
CHUNK_SIZE = 4 << 20
NAME_LENGTH = 32
LANE_FILES = 16
"""Files each lane of the mixed workload keeps in its directory."""
FILL_DIRECTORY_SIZE = 10_000
"""Entries per directory when filling the server to ``--entries``."""
BIG_STATS = 10_000
"""Lookups and getattrs done on the filled server before its RSS is read."""

TARGET_CREATES = 2_000
TARGET_STATS = 5_000
TARGET_MIXED = 8_000
TARGET_BIG_READDIR_S = 2.0
TARGET_BIG_READDIR_ENTRIES = 100_000
TARGET_RSS_MB = 200
TARGET_RSS_ENTRIES = 1_000_000


def new_name() -> bytes:
    return os.urandom(NAME_LENGTH)


# ---------------------------------------------------------------------------
# Running requests: over the wire (pipelined) or on a store in this process


class InProcess:
    """Answers the benchmark's requests with direct calls on a :class:`MetadataStore`.

    The same request objects go over the wire; here each becomes the store
    call the server's responder makes for it, with no protocol, TLS or
    session in between.  Create holds the inode as an open handle does;
    Release lets it go.
    """

    def __init__(self, store: MetadataStore) -> None:
        self.store = store
        self.handles: dict[int, int] = {}
        self.next_handle = 1
        self.calls: dict[type, Callable[[Any], Any]] = {
            w.Create: self.create,
            w.Release: self.release,
            w.Lookup: lambda r: w.Entry(store.lookup(r.parent, r.name)),
            w.GetAttr: lambda r: w.Entry(store.getattr(r.inode)),
            w.ReadDir: self.readdir,
            w.MkDir: lambda r: w.Entry(store.apply(m.MakeDirectory(r.parent, r.name, r.mode, r.uid, r.gid)).value),
            w.Rename: lambda r: store.apply(m.Rename(r.old_parent, r.old_name, r.new_parent, r.new_name, r.flags)),
            w.Unlink: lambda r: store.apply(m.Unlink(r.parent, r.name)),
        }

    def __call__(self, request: Any) -> Any:
        return self.calls[type(request)](request)

    def create(self, r: w.Create) -> w.Opened:
        attributes, _ = self.store.apply(m.CreateFile(r.parent, r.name, r.mode, r.uid, r.gid, r.exclusive)).value
        self.store.hold(attributes.inode)
        handle, self.next_handle = self.next_handle, self.next_handle + 1
        self.handles[handle] = attributes.inode
        return w.Opened(handle, attributes)

    def release(self, r: w.Release) -> None:
        self.store.release(self.handles.pop(r.handle))

    def readdir(self, r: w.ReadDir) -> w.DirPage:
        entries, cursor, done = self.store.readdir(r.inode, r.cursor, r.limit)
        return w.DirPage([w.DirEntry(name, attributes) for name, attributes in entries], cursor, done)


def run_local(call: InProcess, requests: Sequence[Any]) -> tuple[float, list[Any]]:
    """(seconds, answers) for ``requests`` one after the other."""
    start = time.perf_counter()
    answers = [call(request) for request in requests]
    return time.perf_counter() - start, answers


def run_wire(connection: Any, requests: Sequence[Any], depth: int) -> defer.Deferred[tuple[float, list[Any]]]:
    """(seconds, answers) for ``requests`` with up to ``depth`` in flight; fails on the first error."""
    done: defer.Deferred[tuple[float, list[Any]]] = defer.Deferred()
    answers: list[Any] = [None] * len(requests)
    state = {"next": 0, "pending": 0}
    failures: list[Any] = []
    start = time.perf_counter()

    def send() -> None:
        index = state["next"]
        state["next"] += 1
        state["pending"] += 1
        connection.request(requests[index]).addCallbacks(answered, failed, callbackArgs=(index,))

    def finish() -> None:
        if failures:
            done.errback(failures[0])
        else:
            done.callback((time.perf_counter() - start, answers))

    def answered(answer: Any, index: int) -> None:
        answers[index] = answer
        state["pending"] -= 1
        if not failures and state["next"] < len(requests):
            send()
        elif state["pending"] == 0:
            finish()

    def failed(failure: Any) -> None:
        failures.append(failure)
        state["pending"] -= 1
        if state["pending"] == 0:
            finish()

    if not requests:
        done.callback((0.0, answers))
    for _ in range(min(depth, len(requests))):
        send()
    return done


def read_whole_directory_local(call: InProcess, inode: int) -> tuple[float, int]:
    """(seconds, entries) to read every page of directory ``inode`` at the largest page size."""
    start, count, cursor = time.perf_counter(), 0, b""
    while True:
        page = call(w.ReadDir(inode, cursor, MAX_READDIR_LIMIT))
        count += len(page.entries)
        cursor = page.cursor
        if page.done:
            return time.perf_counter() - start, count


@defer.inlineCallbacks
def read_whole_directory_wire(connection: Any, inode: int) -> Any:
    """(seconds, entries) to read every page over the wire; pages follow cursors, one in flight."""
    start, count, cursor = time.perf_counter(), 0, b""
    while True:
        page = yield connection.request(w.ReadDir(inode, cursor, MAX_READDIR_LIMIT))
        count += len(page.entries)
        cursor = page.cursor
        if page.done:
            return time.perf_counter() - start, count


# ---------------------------------------------------------------------------
# The single-client operations: one list of requests per operation


OPERATIONS = ("create", "release", "lookup", "getattr", "rename", "unlink")


def operation_plans(directory: int, count: int) -> Iterator[tuple[str, Callable[[list[Any]], list[Any]]]]:
    """(operation, make its requests from the previous operation's answers), in the order they run.

    ``readdir`` (no requests) marks where the directory, full, is read.
    """
    names = [new_name() for _ in range(count)]
    renamed = [new_name() for _ in range(count)]
    shuffled = list(range(count))
    random.shuffle(shuffled)
    opened: list[Any] = []

    def creates(_: list[Any]) -> list[Any]:
        return [w.Create(directory, name, FILE_MODE, UID, GID, True, OPEN_FOR_WRITING) for name in names]

    def releases(answers: list[Any]) -> list[Any]:
        opened.extend(answers)
        return [w.Release(answer.handle) for answer in answers]

    yield "create", creates
    yield "release", releases
    yield "lookup", lambda _: [w.Lookup(directory, names[i]) for i in shuffled]
    yield "getattr", lambda _: [w.GetAttr(opened[i].attributes.inode) for i in shuffled]
    yield "readdir", lambda _: []
    yield "rename", lambda _: [w.Rename(directory, names[i], directory, renamed[i], 0) for i in shuffled]
    yield "unlink", lambda _: [w.Unlink(directory, renamed[i]) for i in shuffled]


def single_client_local(call: InProcess, count: int) -> dict[str, float]:
    """Operations per second of each operation (``readdir``: seconds) on the store in this process."""
    figures: dict[str, float] = {}
    directory = call(w.MkDir(ROOT_INODE, new_name(), DIR_MODE, UID, GID)).attributes.inode
    answers: list[Any] = []
    for operation, make in operation_plans(directory, count):
        if operation == "readdir":
            seconds, entries = read_whole_directory_local(call, directory)
            check(entries == count, f"in-process readdir saw {entries} entries, not {count}")
            figures["readdir"] = seconds
            continue
        requests = make(answers)
        seconds, answers = run_local(call, requests)
        figures[operation] = len(requests) / seconds
    return figures


@defer.inlineCallbacks
def single_client_wire(connection: Any, count: int, depth: int) -> Any:
    """The same, over one connection with ``depth`` requests in flight."""
    figures: dict[str, float] = {}
    made = yield connection.request(w.MkDir(ROOT_INODE, new_name(), DIR_MODE, UID, GID))
    directory = made.attributes.inode
    answers: list[Any] = []
    for operation, make in operation_plans(directory, count):
        if operation == "readdir":
            seconds, entries = yield read_whole_directory_wire(connection, directory)
            check(entries == count, f"readdir over the wire saw {entries} entries, not {count}")
            figures["readdir"] = seconds
            continue
        requests = make(answers)
        seconds, answers = yield run_wire(connection, requests, depth)
        figures[operation] = len(requests) / seconds
    _, entries = yield read_whole_directory_wire(connection, directory)
    check(entries == 0, f"{entries} entries left after the unlinks")
    return figures


def fsync_rate(folder: Path, seconds: float = 1.0) -> float:
    """Appends of 4 KiB, each followed by fsync, per second, in ``folder``: what one commit waits for."""
    path = folder / "fsync-probe"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        count, block = 0, os.urandom(4096)
        start = time.perf_counter()
        while time.perf_counter() - start < seconds:
            os.write(descriptor, block)
            os.fsync(descriptor)
            count += 1
        return count / (time.perf_counter() - start)
    finally:
        os.close(descriptor)
        path.unlink()


# ---------------------------------------------------------------------------
# The mixed workload: lanes, each a little sequential program on its own directory


def lane(directory: int, files: collections.deque[tuple[bytes, int]], stopping: Callable[[], bool],
         rng: random.Random) -> Generator[Any, Any, None]:
    """Requests of one lane: create a file, look at it and its neighbours, rename the oldest and remove it.

    One cycle is 10 requests, 3 of them writes: Create, Release, Lookup, GetAttr, Lookup, ReadDir (one
    page of the lane's ~17 entries), GetAttr, Rename, Lookup, Unlink.  The directory keeps its size.
    """
    while not stopping():
        name = new_name()
        opened = yield w.Create(directory, name, FILE_MODE, UID, GID, True, OPEN_FOR_WRITING)
        inode = opened.attributes.inode
        yield w.Release(opened.handle)
        yield w.Lookup(directory, name)
        yield w.GetAttr(rng.choice(files)[1])
        yield w.Lookup(directory, rng.choice(files)[0])
        yield w.ReadDir(directory, b"", MAX_READDIR_LIMIT)
        yield w.GetAttr(inode)
        oldest, _ = files.popleft()
        renamed = new_name()
        yield w.Rename(directory, oldest, directory, renamed, 0)
        yield w.Lookup(directory, renamed)
        yield w.Unlink(directory, renamed)
        files.append((name, inode))


def lane_setup_requests(directories: Sequence[int]) -> list[Any]:
    return [
        w.Create(directory, new_name(), FILE_MODE, UID, GID, True, OPEN_FOR_WRITING)
        for directory in directories
        for _ in range(LANE_FILES)
    ]


def mixed_local(call: InProcess, lanes: int, seconds: float) -> float:
    """Mixed operations per second on the store in this process, lanes taking turns."""
    made = [call(w.MkDir(ROOT_INODE, new_name(), DIR_MODE, UID, GID)).attributes.inode for _ in range(lanes)]
    requests = lane_setup_requests(made)
    _, opened = run_local(call, requests)
    run_local(call, [w.Release(answer.handle) for answer in opened])
    stop = [False]
    rng = random.Random(7)
    programs = []
    for index, directory in enumerate(made):
        files = collections.deque(
            (request.name, answer.attributes.inode)
            for request, answer in zip(requests[index * LANE_FILES:(index + 1) * LANE_FILES],
                                       opened[index * LANE_FILES:(index + 1) * LANE_FILES])
        )
        program = lane(directory, files, lambda: stop[0], rng)
        programs.append([program, next(program)])
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        for entry in programs:
            entry[1] = entry[0].send(call(entry[1]))
        count += len(programs)
    return count / (time.perf_counter() - start)


# ---------------------------------------------------------------------------
# A client process of the mixed workload (``--worker CONFIG``)


def worker(config_path: Path) -> None:
    """Log in, set up lanes, say ready, wait for go, run the mix; print one JSON line."""
    from twisted.internet import reactor, threads

    config = json.loads(config_path.read_text())
    outcome: dict[str, Any] = {}

    @defer.inlineCallbacks
    def main() -> Any:
        connection = yield connect_tls(
            reactor, config["address"], Path(config["ca"]), identity_for(FILESPACE),
            peer_name="bench-worker", filespace=FILESPACE, keepalive_interval=0,
        )
        yield log_in(connection, USER, config["passphrase"])
        depth = config["in_flight"]
        _, made = yield run_wire(connection, [
            w.MkDir(ROOT_INODE, new_name(), DIR_MODE, UID, GID) for _ in range(depth)
        ], depth)
        directories = [answer.attributes.inode for answer in made]
        requests = lane_setup_requests(directories)
        _, opened = yield run_wire(connection, requests, depth)
        yield run_wire(connection, [w.Release(answer.handle) for answer in opened], depth)
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        line = yield threads.deferToThread(sys.stdin.readline)
        check(line.strip() == "go", f"expected go, got {line!r}")

        stop = [False]
        counts = {"all": 0}
        window: dict[str, Any] = {}
        by_kind: collections.Counter[str] = collections.Counter()
        finished: defer.Deferred[None] = defer.Deferred()
        running = [0]
        rng = random.Random(os.getpid())

        def failed(failure: Any) -> None:
            stop[0] = True
            if not finished.called:
                finished.errback(failure)

        def start_lane(directory: int, files: collections.deque[tuple[bytes, int]]) -> None:
            program = lane(directory, files, lambda: stop[0], rng)

            def advance(answer: Any) -> None:
                try:
                    request = program.send(answer)
                except StopIteration:
                    running[0] -= 1
                    if running[0] == 0 and not finished.called:
                        finished.callback(None)
                    return
                send(request)

            def send(request: Any) -> None:
                def answered(answer: Any) -> None:
                    counts["all"] += 1
                    if "start" in window and "end" not in window:
                        by_kind[type(request).__name__] += 1
                    advance(answer)

                connection.request(request).addCallbacks(answered, failed)

            running[0] += 1
            send(next(program))

        for index, directory in enumerate(directories):
            chunk = slice(index * LANE_FILES, (index + 1) * LANE_FILES)
            start_lane(directory, collections.deque(
                (request.name, answer.attributes.inode) for request, answer in zip(requests[chunk], opened[chunk])
            ))

        def begin() -> None:
            window["start"], window["start_count"] = time.perf_counter(), counts["all"]

        def end() -> None:
            window["end"], window["end_count"] = time.perf_counter(), counts["all"]
            stop[0] = True

        reactor.callLater(config["warmup"], begin)
        reactor.callLater(config["warmup"] + config["seconds"], end)
        yield finished
        outcome.update(
            ops=window["end_count"] - window["start_count"],
            seconds=window["end"] - window["start"],
            by_kind=dict(by_kind),
        )
        yield connection.close("benchmark over")

    def done(result: Any) -> None:
        if isinstance(result, Failure):
            outcome["error"] = result.getErrorMessage()
        reactor.stop()

    guard = reactor.callLater(config["warmup"] + config["seconds"] + 300, reactor.stop)
    reactor.callWhenRunning(lambda: main().addBoth(done))
    reactor.run()
    if guard.active():
        guard.cancel()
    sys.stdout.write(json.dumps(outcome) + "\n")
    sys.stdout.flush()
    sys.exit(1 if "error" in outcome or "ops" not in outcome else 0)


def run_clients(config: dict[str, Any], scratch: Path, clients: int) -> dict[str, Any]:
    """Start ``clients`` worker processes, start them together, and add up their operations per second."""
    config_path = scratch / "worker.json"
    descriptor = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as stream:
        json.dump(config, stream)
    processes = [
        subprocess.Popen([sys.executable, __file__, "--worker", str(config_path)],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        for _ in range(clients)
    ]
    try:
        for process in processes:
            line = read_line(process, 120)
            check(line == "ready", f"a client process did not get ready: {line!r}")
        for process in processes:
            process.stdin.write(b"go\n")  # type: ignore[union-attr]
            process.stdin.flush()  # type: ignore[union-attr]
        results = [json.loads(read_line(process, config["warmup"] + config["seconds"] + 120) or "{}")
                   for process in processes]
        for process in processes:
            process.stdin.close()  # type: ignore[union-attr]
            process.wait(30)
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
            for stream in (process.stdin, process.stdout):
                if stream is not None and not stream.closed:
                    stream.close()
    errors = [result.get("error", "no result") for result in results if "ops" not in result]
    check(not errors, f"client processes failed: {errors}")
    by_kind: collections.Counter[str] = collections.Counter()
    for result in results:
        by_kind.update(result["by_kind"])
    return {
        "ops_per_s": sum(result["ops"] / result["seconds"] for result in results),
        "ops": sum(result["ops"] for result in results),
        "by_kind": dict(by_kind),
    }


def read_line(process: subprocess.Popen[bytes], timeout: float) -> str:
    """One line of ``process``'s output within ``timeout`` seconds ('' if none)."""
    stdout = process.stdout
    assert stdout is not None
    deadline = time.monotonic() + timeout
    buffer = b""
    while time.monotonic() < deadline:
        ready, _, _ = select.select([stdout], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        byte = os.read(stdout.fileno(), 1)
        if not byte:
            break
        if byte == b"\n":
            return buffer.decode()
        buffer += byte
    return buffer.decode()


# ---------------------------------------------------------------------------
# The server process


class Server:
    """``twistd -n lucid-meta`` in a child process, started and stopped by PID."""

    def __init__(self, directory: Path, profile_dir: Path | None) -> None:
        self.directory = directory
        self.profile_dir = profile_dir
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.port = 0
        self.log_path = directory / "server-0.log"

    @property
    def data_dir(self) -> Path:
        return self.directory / "data" / FILESPACE

    @property
    def address(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    def start(self) -> None:
        self.starts += 1
        self.log_path = self.directory / f"server-{self.starts}.log"
        arguments = twistd_command("-n", "--pidfile=", f"--logfile={self.log_path}")
        if self.profile_dir is not None:
            arguments += [f"--profile={self.profile_dir / f'meta-server-{self.starts}.prof'}",
                          "--profiler=cprofile", "--savestats"]
        arguments += ["lucid-meta", "--filespace", FILESPACE, "--config", str(self.directory / "meta.ini")]
        self.process = subprocess.Popen(arguments, cwd=self.directory, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the metadata server exited at start; see {self.log_path}")
            text = self.log_path.read_text() if self.log_path.exists() else ""
            found = re.search(r"starting on (\d+)", text)
            if found and "serving filespace" in text:
                self.port = int(found.group(1))
                return
            time.sleep(0.05)
        self.stop()
        raise SystemExit(f"the metadata server did not start within 60 s; see {self.log_path}")

    def memory(self) -> dict[str, float]:
        """VmRSS and VmHWM of the server process, in MB."""
        assert self.process is not None
        figures = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                figures[key] = int(value.split()[0]) / 1024
        return figures

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def write_setup(directory: Path, durability: str = "off") -> None:
    """A CA, the server's certificate for the filespace, and a lucid-meta.ini listening on loopback.

    With ``durability`` sync or async the journal is shipped to a local-directory object store beside it.
    """
    init_ca(directory / "ca")
    issue_certificate(directory / "ca", [identity_for(FILESPACE), "127.0.0.1"], directory / "meta")
    shipping = ""
    if durability != "off":
        objects = directory / "objects"
        objects.mkdir()
        shipping = f"store = {objects.as_uri()}\ndurability = {durability}\n"
    (directory / "meta.ini").write_text(
        "[meta]\n"
        "data_dir = data/{filespace}\n"
        "listen = tcp:0:interface=127.0.0.1\n"
        "certificate = meta.pem\n"
        "private_key = meta.key\n"
        + shipping
    )


def make_credentials(user: str, passphrase: str, master_key: bytes, filespace_id: bytes) -> w.Credentials:
    """Credentials as a client makes them, at the weakest Argon2id parameters clients accept."""
    kdf = crypto.new_kdf_parameters(crypto.MINIMUM_TIME_COST, crypto.MINIMUM_MEMORY_KIB, 1)
    crypto.check_kdf_strength(kdf)
    secrets = crypto.derive_user_secrets(passphrase, kdf)
    wrapped = crypto.wrap_master_key(secrets.wrapping_key, master_key, filespace_id, user)
    return w.Credentials(w.KdfParameters(kdf.salt, kdf.time_cost, kdf.memory_kib, kdf.parallelism),
                         secrets.login_secret, wrapped)


@defer.inlineCallbacks
def log_in(connection: Any, user: str, passphrase: str) -> Any:
    """The client's login: challenge, Argon2id, login secret, then unwrap the master key."""
    challenge = yield connection.request(w.LoginStart(user))
    crypto.check_kdf_strength(challenge.kdf)
    secrets = crypto.derive_user_secrets(passphrase, challenge.kdf)
    ok = yield connection.request(w.Login(user, secrets.login_secret))
    crypto.unwrap_master_key(secrets.wrapping_key, ok.wrapped_key, ok.filespace_id, user)
    return ok


# ---------------------------------------------------------------------------
# Filling a database fast


def bulk_create(store: MetadataStore, parent: int, names: Sequence[bytes], time_ns: int,
                chunks: Sequence[tuple[bytes, int]] | None = None) -> int:
    """Add regular files ``names`` to directory ``parent`` in one transaction; return the first inode.

    The rows are those ``apply(CreateFile(...))`` writes for each name (see
    :func:`check_bulk_create`), then, with ``chunks`` (an ``(object_id,
    size)`` per name), those ``apply(CommitChunks(...))`` writes for a file
    of that one chunk; written with ``executemany`` instead of one
    transaction (and one fsync) per file.  Only for filling a database that
    no server has open.
    """
    db = store._db  # the benchmark's shortcut; the server never does this
    db.execute("BEGIN IMMEDIATE")
    try:
        row = db.execute("SELECT value FROM settings WHERE key = 'next_inode'").fetchone()
        first = row[0] if row is not None else ROOT_INODE + 1
        mode = stat.S_IFREG | FILE_MODE
        sizes = [size for _, size in chunks] if chunks is not None else [0] * len(names)
        version = 1 if chunks is None else 2
        db.executemany(
            "INSERT INTO inodes (id, kind, mode, nlink, uid, gid, size, atime_ns, mtime_ns, ctime_ns, version,"
            " target) VALUES (?, ?, ?, 1, ?, ?, ?, ?, ?, ?, ?, NULL)",
            ((first + i, int(w.FileKind.FILE), mode, UID, GID, sizes[i], time_ns, time_ns, time_ns, version)
             for i in range(len(names))),
        )
        db.executemany(
            "INSERT INTO entries (parent, name, inode) VALUES (?, ?, ?)",
            ((parent, name, first + i) for i, name in enumerate(names)),
        )
        if chunks is not None:
            db.executemany(
                "INSERT INTO chunks (inode, idx, object_id, length, object_length) VALUES (?, 0, ?, ?, ?)",
                ((first + i, object_id, size, size) for i, (object_id, size) in enumerate(chunks)),
            )
        db.execute("UPDATE inodes SET mtime_ns = ?, ctime_ns = ? WHERE id = ?", (time_ns, time_ns, parent))
        db.execute("INSERT OR REPLACE INTO settings (key, value) VALUES ('next_inode', ?)", (first + len(names),))
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise
    return int(first)


class FixedClock:
    def __init__(self, seconds: float) -> None:
        self.now = seconds

    def seconds(self) -> float:
        return self.now


def check_bulk_create(scratch: Path, count: int = 200) -> None:
    """The bulk path must leave exactly the database that ``apply()`` leaves."""
    dumps = []
    names = [new_name() for _ in range(count)]
    for how in ("apply", "bulk"):
        folder = scratch / f"check-{how}"
        folder.mkdir()
        store = MetadataStore(folder / DATABASE_NAME, FixedClock(1_700_000_000.0))
        try:
            kdf = crypto.new_kdf_parameters(crypto.MINIMUM_TIME_COST, crypto.MINIMUM_MEMORY_KIB, 1)
            store.apply(m.Initialise(b"filespace-id", CHUNK_SIZE, "admin", b"0123456789abcdef", kdf.time_cost,
                                     kdf.memory_kib, 1, bytes(32), b"wrapped", server_secret=bytes(32)))
            directory = store.apply(m.MakeDirectory(ROOT_INODE, b"dir", DIR_MODE, UID, GID)).value.inode
            time_ns = store.now_ns() + 1000
            if how == "apply":
                for name in names:
                    store.apply(m.CreateFile(directory, name, FILE_MODE, UID, GID, True, time_ns=time_ns))
            else:
                bulk_create(store, directory, names, time_ns)
            dumps.append(store.dump())
        finally:
            store.close()
        shutil.rmtree(folder)
    check(dumps[0] == dumps[1], "the bulk fill does not give the database apply() gives")


def fill_server_database(path: Path, big_directory_size: int, entries: int) -> dict[str, Any]:
    """Add a directory of ``big_directory_size`` files, then directories of files up to ``entries`` entries.

    Returns the big directory's inode, a sample of (parent, name, inode) to
    look up, the entries now in the database and the seconds taken.
    """
    start = time.perf_counter()
    store = MetadataStore(path, FixedClock(time.time()))
    sample: list[tuple[int, bytes, int]] = []
    step = max(1, entries // BIG_STATS)
    try:
        def directory_of(size: int) -> int:
            inode = store.apply(m.MakeDirectory(ROOT_INODE, new_name(), DIR_MODE, UID, GID)).value.inode
            for offset in range(0, size, 100_000):
                names = sorted(new_name() for _ in range(min(100_000, size - offset)))
                first = bulk_create(store, inode, names, store.now_ns())
                sample.extend((inode, names[i], first + i) for i in range(0, len(names), step))
            return int(inode)

        def count() -> int:
            return int(store._db.execute("SELECT COUNT(*) FROM entries").fetchone()[0])

        big = directory_of(big_directory_size)
        total = count()
        while total < entries:
            directory_of(min(FILL_DIRECTORY_SIZE, entries - total - 1))
            total = count()
        store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        store.close()
    random.shuffle(sample)
    return {"big": big, "sample": sample[:BIG_STATS], "entries": total, "seconds": time.perf_counter() - start}


# ---------------------------------------------------------------------------
# The whole run


def check(condition: bool, problem: str) -> None:
    if not condition:
        raise SystemExit(f"benchmark failed: {problem}")


@dataclass
class Sizes:
    ops: int
    big_directory: int
    entries: int
    seconds: float
    clients: int
    in_flight: int
    rounds: int


def new_local_store(folder: Path) -> MetadataStore:
    """The baseline: an initialised store of its own, as the server keeps it (WAL, synchronous=FULL)."""
    from twisted.internet import reactor

    folder.mkdir()
    store = MetadataStore(folder / DATABASE_NAME, reactor)
    kdf = crypto.new_kdf_parameters(crypto.MINIMUM_TIME_COST, crypto.MINIMUM_MEMORY_KIB, 1)
    store.apply(m.Initialise(crypto.new_filespace_id(), CHUNK_SIZE, "admin", kdf.salt, kdf.time_cost,
                             kdf.memory_kib, kdf.parallelism, bytes(32), b"wrapped"))
    return store


def big_directory_local(path: Path, big: int, size: int, sample: Sequence[tuple[int, bytes, int]],
                        rounds: int) -> dict[str, Any]:
    """The filled server database, read in this process: readdir of the big directory, lookups, getattrs."""
    from twisted.internet import reactor

    store = MetadataStore(path, reactor)
    try:
        call = InProcess(store)
        times = []
        for _ in range(rounds):
            seconds, entries = read_whole_directory_local(call, big)
            check(entries == size, f"in-process readdir saw {entries} entries, not {size}")
            times.append(seconds)
        lookups, _ = run_local(call, [w.Lookup(parent, name) for parent, name, _ in sample])
        getattrs, _ = run_local(call, [w.GetAttr(inode) for _, _, inode in sample])
    finally:
        store.close()
    return {"readdir": times, "lookup": len(sample) / lookups, "getattr": len(sample) / getattrs}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from twisted.internet import reactor

    if args.quick:
        sizes = Sizes(ops=1_000, big_directory=5_000, entries=20_000, seconds=2.0, clients=args.clients,
                      in_flight=args.in_flight, rounds=args.rounds or 1)
    else:
        sizes = Sizes(ops=10_000, big_directory=100_000, entries=1_000_000, seconds=10.0, clients=args.clients,
                      in_flight=args.in_flight, rounds=args.rounds or 3)
    for key in ("ops", "entries", "seconds", "big_directory"):
        if getattr(args, key) is not None:
            setattr(sizes, key, getattr(args, key))
    check(sizes.entries > sizes.big_directory, "--entries must be larger than --big-directory")
    began = time.perf_counter()
    scratch = Path(tempfile.mkdtemp(prefix="lucid-meta-bench-", dir=args.scratch))
    profile_dir = args.profile_server.resolve() if args.profile_server else None
    if profile_dir is not None:
        profile_dir.mkdir(parents=True, exist_ok=True)
    server = Server(scratch / "server", profile_dir)
    result: dict[str, Any] = {"sizes": sizes, "load_at_start": os.getloadavg()[0]}
    store = None
    try:
        check_bulk_create(scratch)
        store = new_local_store(scratch / "in-process")
        server.directory.mkdir()
        write_setup(server.directory, args.durability)
        server.start()
        finished: list[Any] = []
        phases(reactor, server, InProcess(store), sizes, scratch, result).addBoth(finished.append).addBoth(
            lambda _: reactor.stop())
        reactor.run()  # type: ignore[attr-defined]
        if finished and isinstance(finished[0], Failure):
            finished[0].raiseException()
    finally:
        server.stop()
        if store is not None:
            store.close()
        shutil.rmtree(scratch, ignore_errors=True)
    result["run_seconds"] = time.perf_counter() - began
    result["load_at_end"] = os.getloadavg()[0]
    return result


@defer.inlineCallbacks
def phases(reactor: Any, server: Server, call: InProcess, sizes: Sizes, scratch: Path, result: dict[str, Any]) -> Any:
    """Everything but the setup.  In-process rounds alternate with rounds over the wire (in turn first),
    so that a slow moment of the shared disk falls on both; medians are compared."""
    ca_file = server.directory / "ca" / "ca.pem"
    passphrase = os.urandom(16).hex()

    @defer.inlineCallbacks
    def connect(user: str = USER) -> Any:
        deadline = reactor.seconds() + 60
        while True:
            connection = yield connect_tls(reactor, server.address, ca_file, identity_for(FILESPACE),
                                           peer_name="bench", filespace=FILESPACE, keepalive_interval=0)
            try:
                if user:
                    yield log_in(connection, user, passphrase)
                return connection
            except Restoring:  # with a store, a server checks it against its database before it serves
                connection.close("not serving yet", timeout=0)
                if reactor.seconds() > deadline:
                    raise
                yield task.deferLater(reactor, 0.2, lambda: None)

    # Bootstrap as the operator would, then add the writer the clients log in as.
    master_key, filespace_id = crypto.new_master_key(), crypto.new_filespace_id()
    admin = yield connect("")
    token = read_token(server.data_dir / TOKEN_FILE_NAME)
    yield admin.request(w.Bootstrap(token, "admin", make_credentials("admin", passphrase, master_key, filespace_id),
                                    CHUNK_SIZE, filespace_id, b""))
    yield log_in(admin, "admin", passphrase)
    yield admin.request(w.UserAdd(USER, w.Role.WRITER, make_credentials(USER, passphrase, master_key, filespace_id)))
    yield admin.close("bootstrapped")
    result["rss_idle"] = server.memory()

    result["fsync"] = []
    result["local_rounds"], result["wire_rounds"] = [], []
    for round_ in range(sizes.rounds):
        print(f"round {round_ + 1}/{sizes.rounds}: {sizes.ops:,} of each operation, one client,"
              f" {sizes.in_flight} in flight, and in-process ...", flush=True)
        result["fsync"].append(fsync_rate(server.data_dir))
        for which in (("local", "wire") if round_ % 2 == 0 else ("wire", "local")):
            if which == "local":
                result["local_rounds"].append(single_client_local(call, sizes.ops))
                continue
            client = yield connect()  # a connection per round: none sits idle while the store is busy
            result["wire_rounds"].append((yield single_client_wire(client, sizes.ops, sizes.in_flight)))
            yield client.close("round over")

    result["mixed_local"], result["mixed_rounds"] = [], []
    for round_ in range(sizes.rounds):
        print(f"round {round_ + 1}/{sizes.rounds}: mixed, {sizes.clients} client processes and in-process,"
              f" {sizes.seconds:g} s each ...", flush=True)
        result["fsync"].append(fsync_rate(server.data_dir))
        for which in (("local", "wire") if round_ % 2 == 0 else ("wire", "local")):
            if which == "local":
                result["mixed_local"].append(mixed_local(call, sizes.in_flight, sizes.seconds))
                continue
            result["mixed_rounds"].append(run_clients({
                "address": server.address, "ca": str(ca_file), "passphrase": passphrase,
                "in_flight": sizes.in_flight, "warmup": 1.0, "seconds": sizes.seconds,
            }, scratch, sizes.clients))
    result["rss_after_mixed"] = server.memory()

    print(f"stopping the server; filling its database to {sizes.entries:,} entries ...", flush=True)
    server.stop()
    database = server.data_dir / DATABASE_NAME
    fill = fill_server_database(database, sizes.big_directory, sizes.entries)
    result["fill"] = {"entries": fill["entries"], "seconds": fill["seconds"],
                      "database_mb": database.stat().st_size / 2**20}
    server.start()
    result["rss_filled_start"] = server.memory()

    print(f"reading the {sizes.big_directory:,}-entry directory; {len(fill['sample']):,} lookups and getattrs ...",
          flush=True)
    client = yield connect()
    times = []
    for _ in range(sizes.rounds):
        seconds, entries = yield read_whole_directory_wire(client, fill["big"])
        check(entries == sizes.big_directory, f"big readdir saw {entries} entries, not {sizes.big_directory}")
        times.append(seconds)
    lookups, _ = yield run_wire(client, [w.Lookup(parent, name) for parent, name, _ in fill["sample"]],
                                sizes.in_flight)
    getattrs, _ = yield run_wire(client, [w.GetAttr(inode) for _, _, inode in fill["sample"]], sizes.in_flight)
    result["big_wire"] = {"readdir": times, "lookup": len(fill["sample"]) / lookups,
                          "getattr": len(fill["sample"]) / getattrs}
    result["rss_filled"] = server.memory()
    yield client.close("done")
    server.stop()
    result["big_local"] = big_directory_local(database, fill["big"], sizes.big_directory, fill["sample"],
                                             sizes.rounds)


# ---------------------------------------------------------------------------
# Report


def median_of(rounds: Sequence[dict[str, float]], key: str) -> float:
    return statistics.median(figures[key] for figures in rounds)


def report(result: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    sizes: Sizes = result["sizes"]
    wire, local = result["wire_rounds"], result["local_rounds"]
    rows: list[tuple[str, ...]] = []
    summary: dict[str, Any] = {"benchmark": "meta_ops"}
    met_all = True

    def verdict(ok: bool | None) -> str:
        nonlocal met_all
        if ok is None:
            return "n/a"
        met_all = met_all and ok
        return "yes" if ok else "NO"

    targets = {"create": TARGET_CREATES, "lookup": TARGET_STATS, "getattr": TARGET_STATS}
    for operation in OPERATIONS:
        over, here = median_of(wire, operation), median_of(local, operation)
        target = targets.get(operation)
        rows.append((f"{operation}, 1 client", f"{over:,.0f}/s", f"{here:,.0f}/s", f"{over / here:.2f}",
                     f">= {target:,}/s" if target else "", verdict(over >= target) if target else ""))
        summary[f"{operation}_per_s"] = round(over)
        summary[f"{operation}_in_process_per_s"] = round(here)
        summary[f"{operation}_per_s_rounds"] = [round(figures[operation]) for figures in wire]

    small_wire, small_local = median_of(wire, "readdir"), median_of(local, "readdir")
    rows.append((f"readdir {sizes.ops:,} entries", f"{small_wire:.3f} s", f"{small_local:.3f} s",
                 f"{small_local / small_wire:.2f}", "", ""))
    summary.update(readdir_small_entries=sizes.ops, readdir_small_s=round(small_wire, 4),
                   readdir_small_in_process_s=round(small_local, 4))

    mixed_rates = [figures["ops_per_s"] for figures in result["mixed_rounds"]]
    mixed, mixed_here = statistics.median(mixed_rates), statistics.median(result["mixed_local"])
    rows.append((f"mixed, {sizes.clients} client processes", f"{mixed:,.0f}/s", f"{mixed_here:,.0f}/s",
                 f"{mixed / mixed_here:.2f}", f">= {TARGET_MIXED:,}/s", verdict(mixed >= TARGET_MIXED)))
    by_kind: collections.Counter[str] = collections.Counter()
    for figures in result["mixed_rounds"]:
        by_kind.update(figures["by_kind"])
    summary.update(mixed_clients=sizes.clients, mixed_per_s=round(mixed), mixed_in_process_per_s=round(mixed_here),
                   mixed_per_s_rounds=[round(rate) for rate in mixed_rates],
                   mixed_in_process_per_s_rounds=[round(rate) for rate in result["mixed_local"]],
                   mixed_by_kind=dict(by_kind))

    entries = result["fill"]["entries"]
    big_wire = statistics.median(result["big_wire"]["readdir"])
    big_local = statistics.median(result["big_local"]["readdir"])
    full_size = sizes.big_directory >= TARGET_BIG_READDIR_ENTRIES
    rows.append((f"readdir {sizes.big_directory:,} entries", f"{big_wire:.3f} s", f"{big_local:.3f} s",
                 f"{big_local / big_wire:.2f}", f"< {TARGET_BIG_READDIR_S:g} s for {TARGET_BIG_READDIR_ENTRIES:,}",
                 verdict(big_wire < TARGET_BIG_READDIR_S if full_size else None)))
    for operation in ("lookup", "getattr"):
        over, here = result["big_wire"][operation], result["big_local"][operation]
        rows.append((f"{operation}, {entries:,} entries", f"{over:,.0f}/s", f"{here:,.0f}/s", f"{over / here:.2f}",
                     "", ""))
        summary[f"{operation}_filled_per_s"] = round(over)
        summary[f"{operation}_filled_in_process_per_s"] = round(here)
    summary.update(readdir_big_entries=sizes.big_directory, readdir_big_s=round(big_wire, 4),
                   readdir_big_in_process_s=round(big_local, 4),
                   readdir_big_s_rounds=[round(seconds, 4) for seconds in result["big_wire"]["readdir"]])

    memory = result["rss_filled"]
    full_entries = entries >= TARGET_RSS_ENTRIES
    rows.append((f"server VmHWM, {entries:,} entries", f"{memory['VmHWM']:.0f} MB", "", "",
                 f"< {TARGET_RSS_MB} MB for {TARGET_RSS_ENTRIES:,}",
                 verdict(memory["VmHWM"] < TARGET_RSS_MB if full_entries else None)))
    rows.append((f"server VmRSS, {entries:,} entries", f"{memory['VmRSS']:.0f} MB", "", "", "", ""))
    fsync = statistics.median(result["fsync"])
    rows.append(("fsync of a 4 KiB append (disk)", "", f"{fsync:,.0f}/s", "", "", ""))
    summary.update(
        entries=entries, fill_seconds=round(result["fill"]["seconds"], 1),
        database_mb=round(result["fill"]["database_mb"], 1),
        rss_mb={key: {name: round(value, 1) for name, value in result[key].items()}
                for key in ("rss_idle", "rss_after_mixed", "rss_filled_start", "rss_filled")},
        fsync_per_s=round(fsync), fsync_per_s_rounds=[round(rate) for rate in result["fsync"]],
        in_flight=sizes.in_flight, ops=sizes.ops, seconds=sizes.seconds, rounds=sizes.rounds, quick=args.quick,
        durability=args.durability,
        cpus=os.cpu_count(), run_seconds=round(result["run_seconds"], 1),
        load_average_1min=[round(result["load_at_start"], 2), round(result["load_at_end"], 2)],
    )

    headings = ("operation", "over TLS", "in-process", "ratio", "target", "met?")
    widths = [max(len(row[i]) for row in [headings, *rows]) for i in range(6)]
    print()
    for row in (headings, *rows):
        print("  ".join(cell.ljust(widths[i]) if i in (0, 4, 5) else cell.rjust(widths[i])
                        for i, cell in enumerate(row)).rstrip())
    print(f"({sizes.in_flight} requests in flight per connection; readdir pages of {MAX_READDIR_LIMIT} entries follow"
          f" cursors, one in flight; medians of {sizes.rounds} alternating rounds; {os.cpu_count()} CPUs, load"
          f" average {result['load_at_start']:.1f} at start, {result['load_at_end']:.1f} at end;"
          f" run took {result['run_seconds']:.0f} s)")
    summary["meets_targets"] = met_all
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument("--seconds", type=float, help="seconds of the mixed workload (default 10, quick 2)")
    parser.add_argument("--entries", type=int, help="entries in the filled server (default 1,000,000)")
    parser.add_argument("--ops", type=int, help="operations of each kind for one client (default 10,000)")
    parser.add_argument("--big-directory", type=int, help="entries of the big directory (default 100,000)")
    parser.add_argument("--clients", type=int, default=8, help="client processes of the mixed workload")
    parser.add_argument("--in-flight", type=int, default=64, help="requests in flight per connection")
    parser.add_argument("--rounds", type=int, help="alternating rounds; medians reported (default 3, quick 1)")
    parser.add_argument("--scratch", type=Path, metavar="DIR",
                        help="where the server's data, the in-process store and certificates go (default: the"
                             " system's temporary folder); /dev/shm takes the disk's fsync out of the figures")
    parser.add_argument("--durability", choices=("off", "sync", "async"), default="off",
                        help="ship the server's journal to a local-directory object store in the scratch folder"
                             " (sync: a change is answered once its segment is stored); default off")
    parser.add_argument("--profile-server", type=Path, metavar="DIR",
                        help="run the server under cProfile, writing meta-server-N.prof into DIR")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    result = run(args)
    summary = report(result, args)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
