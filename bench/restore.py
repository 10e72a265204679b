"""
Benchmark of metadata restore, and of what shipping the journal costs a write.

1. One filespace of ``--entries`` entries (1,000,000: directories of 1,000
   files, each file with a chunk) with a ``--tail`` of journal records
   (100,000) after its last snapshot, in segments of ``--segment-records``:
   the time ``lucid-meta restore`` takes, as a separate process, to rebuild
   it from a ``file://`` store.  Target under 60 s.
2. ``--filespaces`` filespaces (1,000) of ``--small-entries`` entries
   (1,000) each, with ``--small-tail`` records after their snapshot: the
   time ``lucid-meta restore-all --parallel N`` takes.  Target under 5 min.
3. Mutation latency, in one run, on one ``file://`` store: ``durability``
   sync (each mutation waits for its segment), async, off (the journal is
   written, not shipped), and no journal at all; and two variants of sync
   for comparison: a 5 ms group-commit window (the default is none), and the local database
   at ``synchronous=FULL`` (the server runs it at ``NORMAL`` with
   ``durability=sync``: the object store already holds every answered change).  Each mutation runs as the service runs a request: it waits for
   its reactor turn, is applied (``apply()``), then waits for
   ``Shipper.durable()``; its latency is from arrival to durable.  One
   writer with one mutation at a time, then 16 writers at once (where group
   commit shares uploads).  Target: sync p50 at most twice the p50 of
   journal off.

The fixtures are built fast, and are still real where a restore looks: the
snapshot's database is filled with bulk SQL (files, their chunk maps and
their directories as ``apply()`` writes them, checked against ``apply()``
at start), the snapshot is taken by :func:`take_snapshot`, and the tail is
applied through the store's ``apply()`` with the journal installed and
shipped as real segments, which the restore verifies and replays.  The
thousand filespaces are one built filespace copied under a thousand names
(each segment rebuilt for its filespace, each manifest rewritten).  Each
restored database is compared with its source table by table.

Prints a table, then one line of JSON.

    python bench/restore.py [--quick] [--entries N] [--tail N] [--filespaces N] [--small-entries N]
                            [--parallel N] [--ops N] [--scratch DIR] [--profile FILE] [--skip one,many,latency]
"""

from __future__ import annotations

import argparse
import cProfile
import hashlib
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meta_ops import DIR_MODE, FILE_MODE, GID, UID, bulk_create  # the same fill as the metadata benchmark
from twisted.internet import defer, task

from lucidlink.meta import mutations as m
from lucidlink.meta.journal import Journal
from lucidlink.meta.segments import build_segment, segment_key
from lucidlink.meta.server import DATABASE_NAME
from lucidlink.meta.shipper import Shipper
from lucidlink.meta.snapshots import Manifest, manifest_key, restore, snapshot_key, take_snapshot
from lucidlink.meta.store import ROOT_INODE, MetadataStore
from lucidlink.objectstore.local import LocalObjectStore
from lucidlink.protocol.messages import SetAttrField

CHUNK_SIZE = 4 << 20
NAME_LENGTH = 32
OBJECT_ID_LENGTH = 24
START = 1_700_000_000.0

TARGET_ONE_S = 60.0
TARGET_MANY_S = 300.0
TARGET_SYNC_RATIO = 2.0
CONCURRENT_WRITERS = 16
ISSUE = {"entries": 1_000_000, "tail": 100_000, "filespaces": 1_000, "small_entries": 1_000}
TABLES = ("inodes", "entries", "chunks", "xattrs", "users", "settings", "garbage", "journal")


class SettableClock:
    """The time of changes while fixtures are built: moves only when told."""

    def __init__(self, seconds: float) -> None:
        self.now = seconds

    def seconds(self) -> float:
        return self.now


def new_name(rng: random.Random) -> bytes:
    return rng.randbytes(NAME_LENGTH)


# ---------------------------------------------------------------------------
# Fixtures


def initialise(store: MetadataStore, rng: random.Random) -> None:
    store.apply(m.Initialise(rng.randbytes(16), CHUNK_SIZE, "admin", rng.randbytes(16), 3, 65536, 1,
                             rng.randbytes(32), b"wrapped master key", server_secret=rng.randbytes(32)))


def check_bulk_files(scratch: Path, count: int = 200) -> None:
    """The bulk path with chunks must leave exactly the database ``apply()`` leaves."""
    dumps = []
    for how in ("apply", "bulk"):
        rng = random.Random(7)
        store = MetadataStore(scratch / f"check-{how}.sqlite3", SettableClock(START))
        try:
            initialise(store, rng)
            directory = store.apply(m.MakeDirectory(ROOT_INODE, b"dir", DIR_MODE, UID, GID)).value.inode
            names = [new_name(rng) for _ in range(count)]
            sizes = [rng.randrange(1, CHUNK_SIZE) for _ in range(count)]
            ids = [rng.randbytes(OBJECT_ID_LENGTH) for _ in range(count)]
            time_ns = store.now_ns()
            if how == "apply":
                for name, size, object_id in zip(names, sizes, ids):
                    inode = store.apply(m.CreateFile(directory, name, FILE_MODE, UID, GID, True)).value[0].inode
                    store.apply(m.CommitChunks(inode, 0, size, ((0, object_id, size, size),)))
            else:
                bulk_create(store, directory, names, time_ns, list(zip(ids, sizes)))
            dumps.append(store.dump())
        finally:
            store.close()
    check(dumps[0] == dumps[1], "the bulk fill does not give the database apply() gives")


@dataclass
class Source:
    """A filespace built for restoring: its database (the source of truth) and what is in the store."""

    name: str
    path: Path
    entries: int
    snapshot_seq: int = 0
    head: int = 0
    segments: int = 0
    files: list[tuple[int, bytes, int]] = field(default_factory=list)
    directories: list[int] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def build_base(path: Path, name: str, entries: int, files_per_directory: int, rng: random.Random,
               clock: SettableClock) -> tuple[MetadataStore, Source]:
    """A journalled store of ``entries`` entries: directories made by ``apply()``, their files in bulk."""
    started = time.perf_counter()
    store = MetadataStore(path, clock)
    store._db.execute("PRAGMA synchronous=OFF")  # a fixture: nothing to keep if the machine dies
    Journal(clock).install(store)
    initialise(store, rng)
    source = Source(name, path, 0)
    keep_every = max(1, entries // 200_000)
    made = 0
    while made < entries:
        clock.now += 0.001
        directory = store.apply(m.MakeDirectory(ROOT_INODE, new_name(rng), DIR_MODE, UID, GID)).value.inode
        source.directories.append(directory)
        count = min(files_per_directory, entries - made - 1)
        names = [new_name(rng) for _ in range(count)]
        sizes = [rng.randrange(1, CHUNK_SIZE) for _ in range(count)]
        ids = [rng.randbytes(OBJECT_ID_LENGTH) for _ in range(count)]
        first = bulk_create(store, directory, names, store.now_ns(), list(zip(ids, sizes)))
        source.files.extend((directory, names[i], first + i) for i in range(0, count, keep_every))
        made += count + 1
    source.entries = made
    source.timings["fill_s"] = time.perf_counter() - started
    return store, source


def apply_tail(store: MetadataStore, source: Source, count: int, rng: random.Random, clock: SettableClock) -> None:
    """``count`` journal records of a mixed workload through ``apply()``: creates and writes, renames,
    chmods, xattrs, rewrites, unlinks, a few directories."""
    started = time.perf_counter()
    files, directories = source.files, source.directories
    head = store.journal.head()[0]  # type: ignore[union-attr]
    goal = head + count
    while head < goal:
        clock.now += 0.001
        roll = rng.random()
        if roll < 0.30 or len(files) < 10:
            parent = rng.choice(directories)
            name = new_name(rng)
            inode = store.apply(m.CreateFile(parent, name, FILE_MODE, UID, GID, True)).value[0].inode
            files.append((parent, name, inode))
            if head + 1 < goal:
                size = rng.randrange(1, CHUNK_SIZE)
                store.apply(m.CommitChunks(inode, 0, size, ((0, rng.randbytes(OBJECT_ID_LENGTH), size, size),)))
        elif roll < 0.45:
            index = rng.randrange(len(files))
            parent, name, inode = files[index]
            new_parent, new = rng.choice(directories), new_name(rng)
            store.apply(m.Rename(parent, name, new_parent, new))
            files[index] = (new_parent, new, inode)
        elif roll < 0.60:
            inode = rng.choice(files)[2]
            store.apply(m.SetAttributes(inode, int(SetAttrField.MODE), mode=rng.choice((0o600, 0o640, 0o644))))
        elif roll < 0.70:
            store.apply(m.SetXattr(rng.choice(files)[2], b"user.tag", rng.randbytes(40)))
        elif roll < 0.80:
            index = rng.randrange(len(files))
            files[index], files[-1] = files[-1], files[index]
            parent, name, _ = files.pop()
            store.apply(m.Unlink(parent, name))
        elif roll < 0.82:
            directories.append(store.apply(m.MakeDirectory(rng.choice(directories), new_name(rng), DIR_MODE,
                                                           UID, GID)).value.inode)
        else:
            inode = rng.choice(files)[2]
            size = rng.randrange(1, CHUNK_SIZE)
            store.apply(m.CommitChunks(inode, 0, size, ((0, rng.randbytes(OBJECT_ID_LENGTH), size, size),)))
        head = store.journal.head()[0]  # type: ignore[union-attr]
    source.timings["tail_s"] = time.perf_counter() - started


@defer.inlineCallbacks
def ship_tail(store: MetadataStore, objects: LocalObjectStore, source: Source, segment_records: int) -> Any:
    """Store every record after the snapshot as segments of ``segment_records``, create-only, 8 puts at once."""
    started = time.perf_counter()
    journal = store.journal
    assert isinstance(journal, Journal)
    entries = journal.entries(after=source.snapshot_seq)
    prev_hash = journal.hash_at(source.snapshot_seq)
    puts = []
    semaphore = defer.DeferredSemaphore(8)
    for start in range(0, len(entries), segment_records):
        piece = entries[start:start + segment_records]
        data = build_segment(source.name.encode(), prev_hash, piece)
        prev_hash = piece[-1].hash
        key = segment_key(source.name, piece[0].seq, piece[-1].seq)
        puts.append(semaphore.run(objects.put, key, data, True))
    yield defer.gatherResults(puts, consumeErrors=True)
    source.segments = len(puts)
    source.head = journal.head()[0]
    source.timings["ship_s"] = time.perf_counter() - started


@defer.inlineCallbacks
def build_filespace(reactor: Any, folder: Path, root: Path, name: str, entries: int, tail: int,
                    segment_records: int, seed: int) -> Any:
    """A filespace in the store at ``root``: a snapshot of ``entries`` entries, then ``tail`` records in segments."""
    rng = random.Random(seed)
    clock = SettableClock(START)
    root.mkdir()
    objects = LocalObjectStore(root, reactor)
    store, source = build_base(folder / f"{name}.sqlite3", name, entries, 1000, rng, clock)
    try:
        started = time.perf_counter()
        clock.now += 1
        manifest = yield take_snapshot(store, objects, name, clock)
        source.snapshot_seq = manifest.seq
        source.timings["snapshot_s"] = time.perf_counter() - started
        source.timings["snapshot_mb"] = manifest.size / 1e6
        source.timings["database_mb"] = manifest.raw_size / 1e6
        apply_tail(store, source, tail, rng, clock)
        yield ship_tail(store, objects, source, segment_records)
        store._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        store.close()
        yield objects.close()
    source.files = []
    return source


def copy_filespace(root: Path, template: Source, name: str, segment_records: int) -> None:
    """Put ``template``'s snapshot and segments in the store at ``root`` again, as filespace ``name``."""
    data = (root / snapshot_key(template.name, template.snapshot_seq)).read_bytes()
    manifest = Manifest.from_bytes((root / manifest_key(template.name, template.snapshot_seq)).read_bytes())
    copy = Manifest(name, manifest.seq, manifest.hash, manifest.sha256, manifest.size, manifest.raw_size,
                    manifest.time_ns)
    write_object(root, snapshot_key(name, manifest.seq), data)
    write_object(root, manifest_key(name, manifest.seq), copy.to_bytes())
    store = MetadataStore(template.path, SettableClock(START))
    try:
        journal = Journal(SettableClock(START)).install(store)
        entries = journal.entries(after=template.snapshot_seq)
        prev_hash = journal.hash_at(template.snapshot_seq)
    finally:
        store.close()
    for start in range(0, len(entries), segment_records):
        piece = entries[start:start + segment_records]
        write_object(root, segment_key(name, piece[0].seq, piece[-1].seq),
                     build_segment(name.encode(), prev_hash, piece))
        prev_hash = piece[-1].hash


def write_object(root: Path, key: str, data: bytes) -> None:
    """An object of the file:// store at ``root`` as the local store lays it out (a file at its key, mode 0600)."""
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as out:
        out.write(data)


def table_digests(path: Path) -> dict[str, tuple[int, str]]:
    """Rows and a SHA-256 of each table's rows in key order: a full logical comparison of two databases."""
    import sqlite3

    db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
    try:
        digests = {}
        for table in TABLES:
            digest, rows = hashlib.sha256(), 0
            for row in db.execute(f"SELECT * FROM {table} ORDER BY 1, 2"):
                digest.update(repr(row).encode())
                rows += 1
            digests[table] = (rows, digest.hexdigest())
        return digests
    finally:
        db.close()


# ---------------------------------------------------------------------------
# Restores, as the operator runs them


def lucid_meta(*argv: str) -> tuple[float, float, str]:
    """Run ``lucid-meta argv`` in its own process; its wall time, its CPU time and its output (it must succeed).

    The CPU time (user and system) does not depend on what else the machine runs, the wall time does.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "lucidlink.cli.meta", *argv], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)})
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    check(done.returncode == 0, f"lucid-meta {' '.join(argv)} failed: {done.stderr.strip()[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return seconds, cpu, done.stdout


def write_config(scratch: Path, root: Path) -> Path:
    config = scratch / "lucid-meta.ini"
    config.write_text(f"[meta]\ndata_dir = {scratch}/restored/{{filespace}}\nstore = {root.as_uri()}\n")
    return config


@defer.inlineCallbacks
def one_filespace(reactor: Any, args: argparse.Namespace, scratch: Path) -> Any:
    root = scratch / "objects-one"
    source = yield build_filespace(reactor, scratch, root, "big", args.entries, args.tail, args.segment_records, 1)
    print(f"one: {source.entries:,} entries, snapshot at seq {source.snapshot_seq:,} "
          f"({source.timings['database_mb']:.0f} MB, {source.timings['snapshot_mb']:.0f} MB compressed), "
          f"{source.head - source.snapshot_seq:,} records in {source.segments:,} segments; built in "
          + ", ".join(f"{key} {value:.1f}" for key, value in source.timings.items()), flush=True)
    config = write_config(scratch, root)
    target = scratch / "restored" / "big" / DATABASE_NAME
    if args.profile:
        target.parent.mkdir(parents=True)
        profiler = cProfile.Profile(time.process_time)
        objects = LocalObjectStore(root, reactor)
        started = time.perf_counter()
        profiler.enable()
        result = yield restore(objects, "big", target, clock=reactor)
        profiler.disable()
        seconds = cpu = time.perf_counter() - started
        yield objects.close()
        profiler.dump_stats(args.profile)
        output = result.summary
    else:
        seconds, cpu, output = lucid_meta("restore", "--filespace", "big", "--config", str(config))
    check(f"restored to seq {source.head} from snapshot at seq {source.snapshot_seq}" in output,
          f"the restore did not reach seq {source.head}: {output}")
    started = time.perf_counter()
    same = table_digests(target) == table_digests(source.path)
    check(same, "the restored database differs from the original")
    print(f"one: restored in {seconds:.1f} s ({cpu:.1f} s of CPU); equal to the original, table by table "
          f"(compared in {time.perf_counter() - started:.1f} s)", flush=True)
    return {"entries": source.entries, "tail": source.head - source.snapshot_seq, "segments": source.segments,
            "restore_s": seconds, "restore_cpu_s": cpu, "database_mb": source.timings["database_mb"],
            "snapshot_mb": source.timings["snapshot_mb"], "build": source.timings}


@defer.inlineCallbacks
def many_filespaces(reactor: Any, args: argparse.Namespace, scratch: Path) -> Any:
    root = scratch / "objects-many"
    folder = scratch / "many"
    folder.mkdir()
    template = yield build_filespace(reactor, folder, root, "template", args.small_entries, args.small_tail,
                                     args.small_segment_records, 2)
    started = time.perf_counter()
    names = [f"fs-{index:05d}" for index in range(args.filespaces)]
    for name in names:
        copy_filespace(root, template, name, args.small_segment_records)
    shutil.rmtree(root / "template")
    print(f"many: {args.filespaces:,} filespaces of {template.entries:,} entries and "
          f"{template.head - template.snapshot_seq} records in {template.segments} segments each; copied in "
          f"{time.perf_counter() - started:.1f} s", flush=True)
    config = write_config(scratch / "many", root)
    figures, cpu_figures = {}, {}
    for parallel in args.parallel:
        shutil.rmtree(scratch / "many" / "restored", ignore_errors=True)
        seconds, cpu, output = lucid_meta("restore-all", "--config", str(config), "--parallel", str(parallel))
        check(f"restored {args.filespaces} filespaces" in output, f"restore-all did not restore everything: "
              f"{output[-2000:]}")
        sample = scratch / "many" / "restored" / names[-1] / DATABASE_NAME
        check(table_digests(sample) == table_digests(template.path), f"{names[-1]} differs from its original")
        print(f"many: restore-all --parallel {parallel}: {seconds:.1f} s ({cpu:.1f} s of CPU)", flush=True)
        figures[parallel] = seconds
        cpu_figures[parallel] = cpu
    return {"filespaces": args.filespaces, "entries": template.entries, "tail": template.head - template.snapshot_seq,
            "segments": template.segments, "restore_all_s": figures,
            "restore_all_cpu_s": cpu_figures}


# ---------------------------------------------------------------------------
# Mutation latency


@dataclass
class Writer:
    """One filespace store in one durability mode, and the files its writers work on."""

    mode: str
    store: MetadataStore
    shipper: Shipper | None
    directory: int
    files: list[tuple[bytes, int]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)


LATENCY_MODES = {
    # name: (durability, group window, the local database's synchronous)
    "sync": ("sync", None, "NORMAL"),  # as the server runs it (lucidlink.meta.server.MetaServer.synchronous)
    "sync, 5 ms window": ("sync", 0.005, "NORMAL"),
    "sync, local FULL": ("sync", None, "FULL"),
    "async": ("async", None, "FULL"),
    "off": ("off", None, "FULL"),
    "no journal": (None, None, "FULL"),
}


def open_writer(reactor: Any, folder: Path, objects: LocalObjectStore, mode: str, rng: random.Random) -> Writer:
    """A store as the server keeps it (WAL), journalled and shipped as ``mode`` says."""
    durability, window, synchronous = LATENCY_MODES[mode]
    folder.mkdir()
    store = MetadataStore(folder / DATABASE_NAME, reactor)
    store._db.execute(f"PRAGMA synchronous={synchronous}")
    shipper = None
    if durability is not None:
        journal = Journal(reactor).install(store)
        if durability != "off":
            options = {} if window is None else {"group_window": window}
            shipper = Shipper(store, objects, reactor, filespace=f"latency-{folder.name}", durability=durability,
                              journal=journal, **options)
    initialise(store, rng)
    directory = store.apply(m.MakeDirectory(ROOT_INODE, b"work", DIR_MODE, UID, GID)).value.inode
    return Writer(mode, store, shipper, directory)


@defer.inlineCallbacks
def mutate(reactor: Any, writer: Writer, rng: random.Random) -> Any:
    """One mutation (create, write, chmod or rename) as the service runs it: it arrives, waits for its
    reactor turn behind whatever else arrived, is applied, then waits until durable."""
    started = time.perf_counter()
    yield task.deferLater(reactor, 0, lambda: None)
    roll = rng.random()
    if roll < 0.4 or not writer.files:
        name = new_name(rng)
        inode = writer.store.apply(m.CreateFile(writer.directory, name, FILE_MODE, UID, GID, True)).value[0].inode
        writer.files.append((name, inode))
    elif roll < 0.7:
        size = rng.randrange(1, CHUNK_SIZE)
        writer.store.apply(m.CommitChunks(rng.choice(writer.files)[1], 0, size,
                                          ((0, rng.randbytes(OBJECT_ID_LENGTH), size, size),)))
    elif roll < 0.85:
        writer.store.apply(m.SetAttributes(rng.choice(writer.files)[1], int(SetAttrField.MODE), mode=0o600))
    else:
        index = rng.randrange(len(writer.files))
        name, inode = writer.files[index]
        new = new_name(rng)
        writer.store.apply(m.Rename(writer.directory, name, writer.directory, new))
        writer.files[index] = (new, inode)
    if writer.shipper is not None:
        yield writer.shipper.durable()
    writer.latencies.append(time.perf_counter() - started)


@defer.inlineCallbacks
def latency(reactor: Any, args: argparse.Namespace, scratch: Path) -> Any:
    """Every mode with one writer, then with ``CONCURRENT_WRITERS``; rounds alternate the modes."""
    root = scratch / "objects-latency"
    root.mkdir()
    objects = LocalObjectStore(root, reactor)
    rng = random.Random(3)
    results: dict[str, dict[str, Any]] = {}
    try:
        for writers in (1, CONCURRENT_WRITERS):
            opened = {mode: open_writer(reactor, scratch / f"latency-{writers}-{index}", objects, mode, rng)
                      for index, mode in enumerate(LATENCY_MODES)}
            for writer in opened.values():
                if writer.shipper is not None:
                    yield writer.shipper.start()
            rounds = 10
            per_lane = max(1, args.ops // rounds // writers)

            @defer.inlineCallbacks
            def lane(writer: Writer, count: int = per_lane) -> Any:
                for _ in range(count):
                    yield mutate(reactor, writer, rng)

            for _ in range(rounds):
                # Alternating, so a disk that slows down or speeds up touches every mode alike.
                for writer in opened.values():
                    yield defer.gatherResults([lane(writer) for _ in range(writers)], consumeErrors=True)
            for mode, writer in opened.items():
                if writer.shipper is not None:
                    yield writer.shipper.stop()
                writer.store.close()
                ordered = sorted(writer.latencies)
                results[latency_key(mode, writers)] = {
                    "mode": mode, "writers": writers, "count": len(ordered),
                    "p50_ms": 1000 * statistics.median(ordered),
                    "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
                    "uploads": writer.shipper.uploads if writer.shipper is not None else 0,
                }
    finally:
        yield objects.close()
    return results


def latency_key(mode: str, writers: int) -> str:
    return mode if writers == 1 else f"{mode}, {writers} writers"


def fsync_rate(folder: Path, seconds: float = 1.0) -> float:
    """fsyncs per second of a 4 KiB append on ``folder``'s disk: what every commit waits for."""
    path = folder / "fsync-probe"
    count, started = 0, time.perf_counter()
    with open(path, "ab") as out:
        while time.perf_counter() - started < seconds:
            out.write(b"\0" * 4096)
            out.flush()
            os.fsync(out.fileno())
            count += 1
    path.unlink()
    return count / (time.perf_counter() - started)


# ---------------------------------------------------------------------------
# The whole run


def check(condition: bool, problem: str) -> None:
    if not condition:
        raise SystemExit(f"benchmark failed: {problem}")


def verdict(ok: bool | None) -> str:
    return "-" if ok is None else ("yes" if ok else "NO")


@defer.inlineCallbacks
def run(reactor: Any, args: argparse.Namespace) -> Any:
    scratch = Path(tempfile.mkdtemp(prefix="lucid-bench-restore-", dir=args.scratch))
    summary: dict[str, Any] = {"benchmark": "restore", "cpus": os.cpu_count(),
                               "load_average_1min_start": round(os.getloadavg()[0], 2)}
    rows: list[tuple[str, str, str, str]] = []
    started = time.perf_counter()
    try:
        check_bulk_files(scratch)
        summary["fsync_per_s"] = round(fsync_rate(scratch))
        if "one" not in args.skip:
            one = yield one_filespace(reactor, args, scratch)
            full = args.entries >= ISSUE["entries"] and args.tail >= ISSUE["tail"]
            rows.append((f"restore 1 filespace: {one['entries']:,} entries + {one['tail']:,} records",
                         f"{one['restore_s']:.1f} s ({one['restore_cpu_s']:.1f} s CPU)", f"< {TARGET_ONE_S:g} s",
                         verdict(one["restore_s"] < TARGET_ONE_S if full else None)))
            summary["one"] = one
        if "many" not in args.skip:
            many = yield many_filespaces(reactor, args, scratch)
            full = args.filespaces >= ISSUE["filespaces"] and args.small_entries >= ISSUE["small_entries"]
            for parallel, seconds in many["restore_all_s"].items():
                rows.append((f"restore-all --parallel {parallel}: {many['filespaces']:,} x {many['entries']:,} "
                             f"entries", f"{seconds:.1f} s ({many['restore_all_cpu_s'][parallel]:.1f} s CPU)",
                             f"< {TARGET_MANY_S:g} s",
                             verdict(seconds < TARGET_MANY_S if full else None)))
            summary["many"] = many
        if "latency" not in args.skip:
            figures = yield latency(reactor, args, scratch)
            for writers in (1, CONCURRENT_WRITERS):
                base = figures[latency_key("off", writers)]["p50_ms"]
                for mode in LATENCY_MODES:
                    entry = figures[latency_key(mode, writers)]
                    ratio = entry["p50_ms"] / base
                    target = f"p50 <= {TARGET_SYNC_RATIO:g}x off" if mode == "sync" else ""
                    ok = ratio <= TARGET_SYNC_RATIO if mode == "sync" else None
                    uploads = f", {entry['count'] / entry['uploads']:.1f}/upload" if entry["uploads"] else ""
                    rows.append((f"mutation latency, {latency_key(mode, writers)}",
                                 f"p50 {entry['p50_ms']:.2f} ms, p99 {entry['p99_ms']:.2f} ms ({ratio:.2f}x off"
                                 f"{uploads})", target, verdict(ok)))
            summary["latency"] = figures
            summary["sync_p50_over_off"] = round(figures["sync"]["p50_ms"] / figures["off"]["p50_ms"], 2)
            concurrent = latency_key("sync", CONCURRENT_WRITERS), latency_key("off", CONCURRENT_WRITERS)
            summary["sync_p50_over_off_concurrent"] = round(figures[concurrent[0]]["p50_ms"]
                                                            / figures[concurrent[1]]["p50_ms"], 2)
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    summary["run_s"] = round(time.perf_counter() - started, 1)
    summary["load_average_1min_end"] = round(os.getloadavg()[0], 2)
    summary["sizes"] = {key: getattr(args, key) for key in ("entries", "tail", "filespaces", "small_entries",
                                                            "small_tail", "segment_records", "ops")}
    summary["issue_sizes"] = all(summary["sizes"][key] >= value for key, value in ISSUE.items())
    widths = [max(len(row[i]) for row in [("measure", "figure", "target", "met?"), *rows]) for i in range(4)]
    print()
    for row in (("measure", "figure", "target", "met?"), *rows):
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    print(f"({os.cpu_count()} CPUs; fsync {summary['fsync_per_s']}/s; load average "
          f"{summary['load_average_1min_start']} at start, {summary['load_average_1min_end']} at end; "
          f"run took {summary['run_s']:.0f} s)")
    summary["meets_targets"] = all(row[3] != "NO" for row in rows)
    print(json.dumps(summary))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test (figures not comparable)")
    parser.add_argument("--entries", type=int, help="entries of the one big filespace (default 1,000,000)")
    parser.add_argument("--tail", type=int, help="journal records after its snapshot (default 100,000)")
    parser.add_argument("--segment-records", type=int, default=100, help="records a segment (default 100)")
    parser.add_argument("--filespaces", type=int, help="filespaces restored by restore-all (default 1,000)")
    parser.add_argument("--small-entries", type=int, help="entries of each of them (default 1,000)")
    parser.add_argument("--small-tail", type=int, default=100, help="records after each one's snapshot")
    parser.add_argument("--small-segment-records", type=int, default=10, help="records a segment, for those")
    parser.add_argument("--parallel", type=int, nargs="+", default=[os.cpu_count() or 1, 8],
                        help="restore-all --parallel values to time (default: the CPUs, and 8)")
    parser.add_argument("--ops", type=int, help="mutations timed in each mode (default 2,000)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: one, many, latency")
    parser.add_argument("--scratch", type=Path, metavar="DIR", help="where fixtures go (default: the temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the fixtures and restored databases")
    parser.add_argument("--profile", type=Path, metavar="FILE",
                        help="restore the big filespace in this process under cProfile, stats into FILE")
    args = parser.parse_args()
    defaults = {"entries": 20_000, "tail": 5_000, "filespaces": 20, "small_entries": 1_000, "ops": 400} \
        if args.quick else {**ISSUE, "ops": 2_000}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.skip = {part.strip() for part in args.skip.split(",") if part.strip()}
    task.react(lambda reactor: run(reactor, args))


if __name__ == "__main__":
    main()
