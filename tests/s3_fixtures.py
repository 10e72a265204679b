"""
A real S3 server on loopback for tests: ``moto_server``, one per test process.

:class:`S3StoreMixin` runs a whole integration test class on it, mixed in
before the class (tests/test_s3_system.py).

Starting moto takes over a second, so the first test that asks starts it on
a free 127.0.0.1 port and later tests share it, each in a bucket of its own
(:func:`new_bucket`).  It is stopped by its PID when the test process exits
(``atexit``), and on Linux the kernel kills it should the test process die
first (``PR_SET_DEATHSIG``), so nothing is left running.
"""

from __future__ import annotations

import atexit
import ctypes
import itertools
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from botocore.credentials import Credentials
from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from lucidlink.client.backoff import Backoff
from lucidlink.objectstore.s3 import S3Location, S3ObjectStore
from tests.processes import free_port

ACCESS_KEY = "AKIDLUCIDTEST"
SECRET_KEY = "lucid-test-secret"
REGION = "us-east-1"
CREDENTIALS = Credentials(ACCESS_KEY, SECRET_KEY)
FAST_BACKOFF = Backoff(initial=0.01, cap=0.05)
"""Retries in tests wait milliseconds, not seconds."""

_MOTO_SERVER = Path(sys.executable).with_name("moto_server")
_bucket_numbers = itertools.count(1)


def _die_with_parent() -> None:
    """In the child before exec: be killed if the test process dies (Linux only)."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_DEATHSIG
    except OSError:
        pass


class MotoServer:
    """One ``moto_server`` process on 127.0.0.1, its port and its log."""

    def __init__(self, environment: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = Path(tempfile.mkstemp(prefix="moto-", suffix=".log")[1])
        self._log_file = open(self.log, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [str(_MOTO_SERVER), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(environment or {})},
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
        )
        self._ready = False

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until moto answers HTTP (it takes a second or two to start)."""
        import http.client

        deadline = time.monotonic() + timeout
        while not self._ready:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"moto_server exited with {self.process.returncode}:\n{self.log.read_text()}"
                )
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
                connection.request("GET", "/moto-api/")
                connection.getresponse().read()
                connection.close()
                self._ready = True
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(
                        f"moto_server not ready after {timeout} s:\n{self.log.read_text()}"
                    ) from None
                time.sleep(0.05)

    def stop(self) -> None:
        """Stop the server by its PID and wait for it."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self._log_file.close()
        self.log.unlink(missing_ok=True)

    def client(self) -> Any:
        """A boto3 client for setting up tests (never used by the backend under test)."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )


_shared: MotoServer | None = None


def shared_moto() -> MotoServer:
    """The test process's moto_server, started on first use."""
    global _shared
    if _shared is None:
        _shared = MotoServer()
        atexit.register(_shared.stop)
    _shared.wait_ready()
    return _shared


AUTH_BUCKET = "lucid-auth"
"""The bucket of the moto server that checks signatures and policies."""

ROLE_POLICIES: dict[str, list[dict[str, Any]]] = {
    "client": [
        {
            "Effect": "Allow",
            "Action": ["s3:GetObject", "s3:PutObject"],
            "Resource": f"arn:aws:s3:::{AUTH_BUCKET}/fs/*/chunks/*",
        },
        {"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": f"arn:aws:s3:::{AUTH_BUCKET}"},
    ],
    "meta": [
        {
            "Effect": "Allow",
            "Action": ["s3:GetObject", "s3:PutObject"],
            "Resource": [
                f"arn:aws:s3:::{AUTH_BUCKET}/fs/*/journal/*",
                f"arn:aws:s3:::{AUTH_BUCKET}/fs/*/snapshots/*",
            ],
        },
        {"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": f"arn:aws:s3:::{AUTH_BUCKET}"},
    ],
    "gc": [
        {
            "Effect": "Allow",
            "Action": ["s3:GetObject", "s3:DeleteObject"],
            "Resource": f"arn:aws:s3:::{AUTH_BUCKET}/fs/*",
        },
        {"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": f"arn:aws:s3:::{AUTH_BUCKET}"},
    ],
}
"""Least-privilege policies of each role (as docs/operations.rst describes), for IAM users in moto."""


class AuthMotoServer(MotoServer):
    """A moto_server that checks SigV4 signatures and IAM policies, with one user per role."""

    def __init__(self) -> None:
        # The setup below is the only unauthenticated traffic moto lets through.
        super().__init__({"INITIAL_NO_AUTH_ACTION_COUNT": str(3 * len(ROLE_POLICIES) + 1)})
        self.credentials: dict[str, Credentials] = {}

    def set_up(self) -> None:
        import json

        import boto3

        self.wait_ready()
        iam = boto3.client(
            "iam",
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
        )
        for role, statements in ROLE_POLICIES.items():
            iam.create_user(UserName=role)
            key = iam.create_access_key(UserName=role)["AccessKey"]
            policy = {"Version": "2012-10-17", "Statement": statements}
            iam.put_user_policy(UserName=role, PolicyName=role, PolicyDocument=json.dumps(policy))
            self.credentials[role] = Credentials(key["AccessKeyId"], key["SecretAccessKey"])
        self.client().create_bucket(Bucket=AUTH_BUCKET)


_shared_auth: AuthMotoServer | None = None


def shared_auth_moto() -> AuthMotoServer:
    """The test process's signature-checking moto_server, started and set up on first use."""
    global _shared_auth
    if _shared_auth is None:
        _shared_auth = AuthMotoServer()
        atexit.register(_shared_auth.stop)
        _shared_auth.set_up()
    return _shared_auth


def new_bucket(moto: MotoServer) -> str:
    """A new, empty bucket with a name no other test uses."""
    name = f"lucid-{os.getpid()}-{next(_bucket_numbers)}-{secrets.token_hex(3)}"
    moto.client().create_bucket(Bucket=name)
    return name


def make_store(
    reactor: Any,
    endpoint: str,
    bucket: str,
    prefix: str = "",
    *,
    attempts: int = 4,
    timeout: float = 10.0,
    conditional: bool = True,
    credentials: Credentials = CREDENTIALS,
    **options: Any,
) -> S3ObjectStore:
    """An S3 store on ``endpoint`` with the test credentials (or others) and quick retries."""
    location = S3Location(bucket, prefix, endpoint, REGION, "path", None, timeout, attempts, conditional)
    options.setdefault("backoff", FAST_BACKOFF)
    return S3ObjectStore(location, reactor, credentials, **options)


def wait(seconds: float) -> defer.Deferred[None]:
    """Wait on the global reactor (integration tests only)."""
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)  # type: ignore[arg-type]


def isolate_credentials(case: SynchronousTestCase, environment: dict[str, str]) -> None:
    """
    Make botocore's chain see only ``environment`` until ``case`` ends: no ~/.aws files, no instance metadata.

    Processes the test starts inherit the same environment.
    """
    names = [name for name in os.environ if name.startswith("AWS_")]
    saved = {name: os.environ[name] for name in names}
    for name in names:
        del os.environ[name]
    os.environ.update(
        {
            "AWS_CONFIG_FILE": "/nonexistent/lucid-test/config",
            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/lucid-test/credentials",
            "AWS_EC2_METADATA_DISABLED": "true",
            **environment,
        }
    )

    def restore() -> None:
        for name in [name for name in os.environ if name.startswith("AWS_")]:
            del os.environ[name]
        os.environ.update(saved)

    case.addCleanup(restore)


class OutageProxy:
    """
    A TCP forwarder on 127.0.0.1 to an S3 server, which a test can make unreachable for a while.

    It is Twisted's port forwarder in a process of its own (a forwarder in
    the test's reactor would stall whenever the test blocks, as it does
    while it waits for a server process to exit).  :meth:`go_away` kills
    it, which resets every connection through it and leaves its port
    refusing new ones, as when a store's network is down; :meth:`come_back`
    starts it again on the same port.
    """

    def __init__(self, upstream: MotoServer) -> None:
        self.upstream = upstream
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.come_back()

    def come_back(self, timeout: float = 30.0) -> None:
        """Start forwarding again, on the same port; return once the port accepts connections."""
        if self.process is not None:
            return
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "twisted",
                "--log-level=warn",
                "--log-file=-",
                "portforward",
                "--port",
                f"tcp:{self.port}:interface=127.0.0.1",
                "--host",
                "127.0.0.1",
                "--dest_port",
                str(self.upstream.port),
            ],
            stdout=subprocess.DEVNULL,
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,  # noqa: PLW1509
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"the forwarder to moto exited with {self.process.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"the forwarder to moto not listening after {timeout} s") from None
                time.sleep(0.05)

    def go_away(self) -> None:
        """Reset every connection and refuse new ones (until :meth:`come_back`)."""
        if self.process is not None:
            process, self.process = self.process, None
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)


class S3StoreMixin:
    """
    Runs an integration test class on the S3 backend, for a class whose
    ``store_url()`` names the object store its servers and commands use.

    Each test gets a bucket of its own on the test process's one
    ``moto_server``, a key prefix in it, and the test credentials in the
    environment (so processes the test starts find them through botocore's
    chain, as a deployment would).
    """

    s3_prefix = "lucid/store"
    s3_options = ""
    """More query parameters of the store URL (``&name=value…``)."""

    def s3_endpoint(self) -> str:
        """The endpoint of the store URL: the shared moto server itself."""
        return self.moto.endpoint

    def store_url(self) -> str:
        url: str | None = getattr(self, "_s3_store_url", None)
        if url is None:
            assert isinstance(self, SynchronousTestCase), "S3StoreMixin goes before a trial TestCase"
            self.moto = shared_moto()
            self.s3_bucket = new_bucket(self.moto)
            isolate_credentials(self, {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY})
            url = (
                f"s3://{self.s3_bucket}/{self.s3_prefix}?endpoint={self.s3_endpoint()}&region={REGION}"
                f"{self.s3_options}"
            )
            self._s3_store_url = url
        return url

    def keys_in_bucket(self) -> list[str]:
        """Every key under the store's prefix (without it), as an S3 client other than ours sees them."""
        pages = (
            self.moto.client()
            .get_paginator("list_objects_v2")
            .paginate(Bucket=self.s3_bucket, Prefix=f"{self.s3_prefix}/")
        )
        return sorted(
            item["Key"][len(self.s3_prefix) + 1 :] for page in pages for item in page.get("Contents", [])
        )

    def assertStoredInBucket(self, *parts: str) -> None:
        """Some key under the store's prefix contains each of ``parts`` (the test ran on S3, not a folder)."""
        assert isinstance(self, SynchronousTestCase)
        keys = self.keys_in_bucket()
        for part in parts:
            self.assertTrue(any(part in key for key in keys), f"no key with {part!r} among {keys}")
