"""
Benchmark of the S3 object store (lucid: Twisted's Agent) against boto3 in a thread pool.

Both PUT and then GET the same 4 MiB objects on one ``moto_server`` started
on loopback for the run, with 1, 8 and 32 operations in flight.  Each
phase runs ``--rounds`` times, the two clients taking turns to go first,
and the median of each is reported.  boto3 is not a lucidlink dependency;
moto brings it along.

Both clients do the same work per object: a PUT is signed with the body's
SHA-256 and carries its CRC32 (``x-amz-checksum-crc32``; botocore's default
since 1.36), and a GET checks the body against the stored CRC32 (botocore's
``response_checksum_validation=when_supported``; the run checks that it
did, see ``boto3_get_check`` in the JSON).
The JSON also gives the CPU time the benchmark's process spent in each
phase (``…_cpu_s``, median; moto's own CPU is not in it).

Target: lucid at least matches boto3 at 8 and 32 in flight.
Prints a table, then one line of JSON.

    python bench/objectstore.py [--objects 32] [--size-mib 4] [--concurrency 1 8 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.credentials import Credentials
from twisted.internet import defer, task, threads

from lucidlink.client.backoff import Backoff
from lucidlink.objectstore.s3 import S3Location, S3ObjectStore

REGION = "us-east-1"
ACCESS_KEY, SECRET_KEY = "AKIDBENCH", "bench-secret"
BUCKET = "lucid-bench"
TARGET_CONCURRENCIES = (8, 32)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    log = tempfile.TemporaryFile()
    process = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return process, endpoint
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            raise SystemExit("moto_server did not start")
        time.sleep(0.05)


def boto3_phase(client: Any, operation: str, keys: list[str], data: bytes, concurrency: int) -> float:
    def one(key: str) -> None:
        if operation == "put":
            client.put_object(Bucket=BUCKET, Key=f"boto3/{key}", Body=data)
        else:
            body = client.get_object(Bucket=BUCKET, Key=f"boto3/{key}")["Body"].read()
            assert len(body) == len(data)

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, keys))
    return time.perf_counter() - started


def boto3_get_check(client: Any, key: str) -> str:
    """How boto3 checks a GET's body: the class of the stream it reads it through, and the header it checks."""
    response = client.get_object(Bucket=BUCKET, Key=f"boto3/{key}")
    body = response["Body"]
    body.read()
    checked = sorted(
        name for name in response["ResponseMetadata"]["HTTPHeaders"] if name.startswith("x-amz-checksum-")
    )
    return f"{type(body).__name__} {' '.join(checked) or '(no checksum header)'}"


async def lucid_phase(
    store: S3ObjectStore, operation: str, keys: list[str], data: bytes, concurrency: int
) -> float:
    limit = defer.DeferredSemaphore(concurrency)

    async def one(key: str) -> None:
        if operation == "put":
            await store.put(key, data)
        else:
            assert len(await store.get(key)) == len(data)

    started = time.perf_counter()
    await defer.gatherResults(
        [limit.run(lambda key=key: defer.Deferred.fromCoroutine(one(key))) for key in keys],
        consumeErrors=True,
    )
    return time.perf_counter() - started


async def run(reactor: Any, args: argparse.Namespace, endpoint: str) -> dict[str, Any]:
    data = secrets.token_bytes(args.size_mib * 1024 * 1024)
    keys = [f"object-{n:04}" for n in range(args.objects)]
    mib = args.objects * args.size_mib
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
        config=Config(max_pool_connections=max(args.concurrency)),
    )
    client.create_bucket(Bucket=BUCKET)
    location = S3Location(BUCKET, "lucid", endpoint, REGION, "path", None, 120.0, 3, True)
    store = S3ObjectStore(
        location, reactor, Credentials(ACCESS_KEY, SECRET_KEY), backoff=Backoff(initial=0.05, cap=1.0)
    )
    seconds: dict[str, list[float]] = {}
    cpu_seconds: dict[str, list[float]] = {}

    async def lucid(operation: str, concurrency: int) -> float:
        return await lucid_phase(store, operation, keys, data, concurrency)

    async def boto(operation: str, concurrency: int) -> float:
        return await threads.deferToThread(boto3_phase, client, operation, keys, data, concurrency)

    check = ""
    try:
        for concurrency in args.concurrency:
            for operation in ("put", "get"):
                for round_ in range(args.rounds):
                    clients = [("lucid", lucid), ("boto3", boto)]
                    for name, phase in clients if round_ % 2 == 0 else clients[::-1]:
                        cpu = time.process_time()
                        elapsed = await phase(operation, concurrency)
                        phase_cpu = time.process_time() - cpu
                        phase_name = f"{name}_{operation}_{concurrency}"
                        seconds.setdefault(f"{phase_name}_mib_per_s", []).append(elapsed)
                        cpu_seconds.setdefault(f"{phase_name}_cpu_s", []).append(phase_cpu)
                if operation == "put" and not check:
                    check = await threads.deferToThread(boto3_get_check, client, keys[0])
    finally:
        await store.close()
    figures = {name: round(mib / statistics.median(runs), 1) for name, runs in seconds.items()}
    cpu = {name: round(statistics.median(runs), 3) for name, runs in cpu_seconds.items()}
    meets = all(
        figures[f"lucid_{operation}_{concurrency}_mib_per_s"]
        >= figures[f"boto3_{operation}_{concurrency}_mib_per_s"]
        for concurrency in TARGET_CONCURRENCIES
        if concurrency in args.concurrency
        for operation in ("put", "get")
    )
    return {
        "benchmark": "objectstore",
        "objects": args.objects,
        "object_mib": args.size_mib,
        "rounds": args.rounds,
        "boto3_get_check": check,
        "load_average": round(os.getloadavg()[0], 1),
        **figures,
        **cpu,
        "meets_target": meets,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--objects", type=int, default=32, help="objects per phase")
    parser.add_argument("--size-mib", type=int, default=4, help="size of each object")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--rounds", type=int, default=3, help="runs of each phase; the median is reported")
    args = parser.parse_args()
    process, endpoint = start_moto()
    result: dict[str, Any] = {}
    try:

        async def go(reactor: Any) -> None:
            result.update(await run(reactor, args, endpoint))

        try:
            task.react(lambda reactor: defer.Deferred.fromCoroutine(go(reactor)))
        except SystemExit as finished:
            if finished.code:
                raise
    finally:
        os.kill(process.pid, signal.SIGTERM)
        process.wait(10)
    print(
        f"{args.objects} objects of {args.size_mib} MiB, moto_server on loopback; MiB/s, median of"
        f" {args.rounds} rounds; load average {result['load_average']}"
    )
    print(f"boto3 checks GET bodies with: {result['boto3_get_check']}")
    print(f"{'operation':<12}{'in flight':>10}{'lucid':>10}{'boto3':>10}{'ratio':>8}")
    for concurrency in args.concurrency:
        for operation in ("put", "get"):
            ours = result[f"lucid_{operation}_{concurrency}_mib_per_s"]
            theirs = result[f"boto3_{operation}_{concurrency}_mib_per_s"]
            print(f"{operation.upper():<12}{concurrency:>10}{ours:>10}{theirs:>10}{ours / theirs:>8.2f}")
    print(
        f"target: lucid >= boto3 at {' and '.join(map(str, TARGET_CONCURRENCIES))}: "
        f"{'met' if result['meets_target'] else 'NOT met'}"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
