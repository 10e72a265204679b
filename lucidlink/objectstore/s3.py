"""
The ``s3://bucket/prefix`` object store: any S3-compatible service over HTTP(S).

A store URL names the bucket, an optional key prefix, and how to reach it::

    s3://bucket/prefix?endpoint=https://s3.example.net&region=eu-west-1&addressing=path

``endpoint`` defaults to AWS (``https://s3.<region>.amazonaws.com``),
``region`` to the one botocore's configuration names (else ``us-east-1``),
``addressing`` to ``virtual`` on AWS and ``path`` on any other endpoint.
``profile`` picks a named profile of the shared AWS files; ``timeout`` (seconds
per attempt) and ``attempts`` tune retries; ``conditional=off`` makes
create-only puts a HEAD then a PUT, for servers that ignore ``If-None-Match``
(racy, and said so in the log when the store opens).  Credentials come from
botocore's usual chain: the environment, the shared config and credentials
files, profiles.  HTTPS certificates are verified; plain HTTP is refused
except to a loopback endpoint (a test server).

Requests go through one persistent connection pool of Twisted's ``Agent``
(used bare: no layer asks for compressed answers and inflates them, which
would alter a body stored with ``Content-Encoding: gzip``), are signed with
botocore's SigV4 signer (payload hash included) and, when they fail in a
way that may pass — a connection error, a timeout, a 5xx, ``SlowDown``, a
short or corrupted body — are retried after a capped exponential backoff
with full jitter (:class:`~lucidlink.client.backoff.Backoff`).  4xx
answers are not retried (but for the few S3 uses for passing conditions:
429, ``RequestTimeout``, ``ConditionalRequestConflict``; see
``docs/decisions.rst``); they become lucidlink errors that say what was
refused (:func:`error_for`).

Bodies are checked both ways.  A PUT carries the body's CRC32
(``x-amz-checksum-crc32``, which S3 stores and checks) besides the signed
SHA-256; a whole GET asks for the stored checksum (``x-amz-checksum-mode``)
and checks the body against it, or, for an object stored without one,
against its ETag where that is the body's MD5 (:func:`body_check`).  The
CRC32 is ISA-L's (``isal``), which computes the same value as zlib's with
carry-less multiplication, ten times faster or more.  Large bodies are
hashed in the reactor's thread pool (ISA-L and hashlib let go of the GIL),
so the reactor serves other requests meanwhile; a large GET body is also
joined from the pieces it arrived in there, in the same hand-off
(``bytes.join`` lets go of the GIL too).

Beyond :class:`~lucidlink.objectstore.interface.IObjectStore`, the store
offers :meth:`S3ObjectStore.delete_many` (S3's batch delete).
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import ipaddress
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar
from urllib.parse import parse_qsl, quote, unquote, urlsplit
from xml.etree import ElementTree

import botocore.session
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from isal import isal_zlib
from twisted.internet import error as net_error
from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    HTTPConnectionPool,
    RequestNotSent,
    RequestTransmissionFailed,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse
from zope.interface import implementer

from lucidlink import errors
from lucidlink.client.backoff import Backoff
from lucidlink.objectstore.http import BodyReader, BytesProducer, Endpoints
from lucidlink.objectstore.interface import IObjectStore, ObjectInfo, check_key, check_prefix

_T = TypeVar("_T")
_B = TypeVar("_B")

DEFAULT_REGION = "us-east-1"
DEFAULT_TIMEOUT = 60.0
DEFAULT_ATTEMPTS = 6
MAX_PERSISTENT_PER_HOST = 32
LIST_PAGE = 1000
THREAD_HASHING_THRESHOLD = 256 * 1024
"""Bodies at least this large are hashed (and joined) in a thread, not in the reactor."""
DELETE_BATCH = 1000
"""S3 deletes at most this many keys in one request."""

_S3_NAMESPACE = "{http://s3.amazonaws.com/doc/2006-03-01/}"
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_SINGLE_PART_ETAG = re.compile(r'"?([0-9a-fA-F]{32})"?')
_RETRYABLE_CODES = frozenset(
    {
        "SlowDown",
        "InternalError",
        "ServiceUnavailable",
        "RequestTimeout",
        "ConditionalRequestConflict",
        "OperationAborted",
        "Throttling",
    }
)
_CREDENTIALS_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "TokenRefreshRequired",
        "InvalidSecurity",
    }
)
_TRANSPORT_ERRORS = (
    net_error.ConnectError,
    net_error.ConnectionLost,
    net_error.ConnectionDone,
    net_error.TimeoutError,
    CancelledError,
)


def _loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _flag(value: str, name: str, url: str) -> bool:
    if value.lower() in ("on", "yes", "true", "1"):
        return True
    if value.lower() in ("off", "no", "false", "0"):
        return False
    raise errors.InvalidArgument(f"object store URL {url!r}: {name} is on or off, not {value!r}")


@dataclass(frozen=True)
class S3Location:
    """Where an S3 store lives and how to talk to it: what an ``s3://`` URL says."""

    bucket: str
    prefix: str
    """Key prefix inside the bucket, without slashes at either end ("" for none)."""
    endpoint: str
    """``scheme://host[:port]``, no path."""
    region: str
    addressing: str
    """``path`` (``endpoint/bucket/key``) or ``virtual`` (``bucket.host/key``)."""
    profile: str | None = None
    timeout: float = DEFAULT_TIMEOUT
    attempts: int = DEFAULT_ATTEMPTS
    conditional: bool = True
    """Whether the server honours ``If-None-Match: *`` on PUT."""

    def __str__(self) -> str:
        where = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        return f"{where} at {self.endpoint}"

    def object_name(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def bucket_url(self) -> str:
        """The URL of the bucket itself, for listing and batch deletes (ends with ``/``)."""
        scheme, host = self.endpoint.split("://", 1)
        if self.addressing == "virtual":
            return f"{scheme}://{self.bucket}.{host}/"
        return f"{self.endpoint}/{self.bucket}/"

    def object_url(self, key: str) -> str:
        return self.bucket_url() + quote(self.object_name(key), safe="/-_.~")


def parse_url(url: str, default_region: str | None = None) -> S3Location:
    """
    Read an ``s3://bucket/prefix?…`` store URL (see the module).

    Refuses, with InvalidArgument saying why: a bad bucket name or prefix,
    unknown parameters, and plain HTTP to anything but loopback.
    """
    parts = urlsplit(url)
    if parts.scheme.lower() != "s3":
        raise errors.InvalidArgument(f"object store URL {url!r} is not an s3:// URL")
    bucket = parts.netloc
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise errors.InvalidArgument(f"object store URL {url!r}: {bucket!r} is not a valid S3 bucket name")
    prefix = unquote(parts.path).strip("/")
    if prefix:
        try:
            check_key(prefix)
        except errors.InvalidArgument as refused:
            raise errors.InvalidArgument(f"object store URL {url!r}: bad key prefix: {refused}") from None
    if parts.fragment:
        raise errors.InvalidArgument(f"object store URL {url!r} has a fragment")
    query = dict(parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False))
    known = {"endpoint", "region", "addressing", "profile", "timeout", "attempts", "conditional"}
    unknown = sorted(set(query) - known)
    if unknown:
        raise errors.InvalidArgument(
            f"object store URL {url!r} has unknown parameters {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )
    region = query.get("region") or default_region or DEFAULT_REGION
    endpoint = query.get("endpoint") or f"https://s3.{region}.amazonaws.com"
    endpoint = check_endpoint(endpoint, url)
    addressing = query.get("addressing") or ("virtual" if "endpoint" not in query else "path")
    if addressing not in ("path", "virtual"):
        raise errors.InvalidArgument(
            f"object store URL {url!r}: addressing is path or virtual, not {addressing!r}"
        )
    try:
        timeout = float(query.get("timeout", DEFAULT_TIMEOUT))
        attempts = int(query.get("attempts", DEFAULT_ATTEMPTS))
    except ValueError:
        raise errors.InvalidArgument(f"object store URL {url!r}: timeout and attempts are numbers") from None
    if timeout <= 0 or attempts < 1:
        raise errors.InvalidArgument(
            f"object store URL {url!r}: timeout must be positive and attempts at least 1"
        )
    conditional = _flag(query.get("conditional", "on"), "conditional", url)
    return S3Location(
        bucket,
        prefix,
        endpoint,
        region,
        addressing,
        query.get("profile") or None,
        timeout,
        attempts,
        conditional,
    )


def check_endpoint(endpoint: str, url: str = "") -> str:
    """Return ``endpoint`` as ``scheme://host[:port]``; refuse plain HTTP to anything but loopback."""
    parts = urlsplit(endpoint)
    where = f"object store URL {url!r}: endpoint {endpoint!r}" if url else f"endpoint {endpoint!r}"
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise errors.InvalidArgument(f"{where} is not an http(s)://host[:port] URL")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise errors.InvalidArgument(f"{where} must be only scheme://host[:port]")
    if not parts.netloc.isascii():
        raise errors.InvalidArgument(f"{where}: write the host name in its ASCII (xn--) form")
    if parts.scheme == "http" and not _loopback(parts.hostname):
        raise errors.InvalidArgument(
            f"{where} is plain HTTP to a host that is not loopback; credentials and data would cross the"
            " network unprotected, so use https://"
        )
    return f"{parts.scheme}://{parts.netloc}"


def load_credentials(profile: str | None = None) -> tuple[Any, str | None]:
    """
    Find credentials with botocore's usual chain; also the configured region.

    Fails with AuthenticationFailed when the chain finds nothing.
    """
    try:
        session = botocore.session.Session(profile=profile) if profile else botocore.session.get_session()
        credentials = session.get_credentials()
        region = session.get_config_variable("region")
    except Exception as failure:  # botocore's ProfileNotFound, a malformed config file, ...
        raise errors.AuthenticationFailed(f"cannot load object store credentials: {failure}") from failure
    if credentials is None:
        raise errors.AuthenticationFailed(
            "no object store credentials found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE"
            " or profile= to a profile of ~/.aws/credentials"
        )
    return credentials, region


# Answers


@dataclass
class Answer:
    """One HTTP answer, read whole."""

    status: int
    headers: dict[str, str]
    """Lower-case names; the last value of a repeated header."""
    body: bytes
    attempt: int = 0
    """0 for the answer to the first attempt, 1 for the first retry's, ..."""


def parse_error(body: bytes) -> tuple[str, str, dict[str, str]]:
    """The ``Code``, ``Message`` and every field of an S3 ``<Error>`` body (blanks when it has none)."""
    try:
        root = ElementTree.fromstring(body) if body else None
    except ElementTree.ParseError:
        root = None
    if root is None:
        return "", "", {}
    fields = {child.tag.removeprefix(_S3_NAMESPACE): (child.text or "") for child in root}
    return fields.get("Code", ""), fields.get("Message", ""), fields


def retryable(answer: Answer) -> bool:
    """Whether an error answer may pass if asked again: 5xx (not 501), throttling, S3's transient codes."""
    if answer.status < 300:
        return False
    if answer.status >= 500 and answer.status != 501:
        return True
    if answer.status == 429:
        return True
    code, _, _ = parse_error(answer.body)
    return code in _RETRYABLE_CODES


def _skew(fields: dict[str, str]) -> str:
    try:
        server = datetime.fromisoformat(fields["ServerTime"].replace("Z", "+00:00"))
        ours = datetime.fromisoformat(fields["RequestTime"].replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return "too far"
    seconds = (ours - server).total_seconds()
    return f"{abs(seconds):.0f} s {'ahead of' if seconds > 0 else 'behind'}"


def error_for(answer: Answer, operation: str, key: str, location: S3Location) -> errors.LucidError:
    """The lucidlink error an S3 error answer stands for, saying what was refused."""
    code, message, fields = parse_error(answer.body)
    detail = f"{code}: {message}" if code else f"HTTP {answer.status}"
    if code == "NoSuchBucket":
        return errors.NotFound(f"no bucket named {location.bucket!r} at {location.endpoint}")
    if code in _CREDENTIALS_CODES:
        return errors.AuthenticationFailed(
            f"the object store refused the credentials ({detail}) at {location}"
        )
    if code == "RequestTimeTooSkewed":
        return errors.AuthenticationFailed(
            f"this machine's clock is {_skew(fields)} the object store's clock ({location}); S3 refuses requests"
            " signed more than 15 minutes off: set the clock right (NTP) and try again"
        )
    if answer.status == 404:
        return errors.NotFound(f"no object {key!r} in {location}")
    if answer.status == 403:
        if not code:  # a HEAD: no body says why
            return errors.AccessDenied(
                f"the object store denied {operation} of {key!r} in {location} (or refused the credentials)"
            )
        return errors.AccessDenied(f"the object store denied {operation} of {key!r} in {location} ({detail})")
    if answer.status == 412:
        return errors.AlreadyExists(f"object {key!r} already exists in {location}")
    if answer.status in (405, 501):
        return errors.NotSupported(f"the object store does not support {operation} ({detail}) at {location}")
    if answer.status == 400:
        return errors.InvalidArgument(
            f"the object store refused {operation} of {key!r} ({detail}) at {location}"
        )
    return errors.InternalError(f"the object store failed {operation} of {key!r} ({detail}) at {location}")


class _Retry(Exception):
    """An attempt that failed in a way that may pass next time."""


_CHECKSUM_MODE = {"x-amz-checksum-mode": "ENABLED"}
"""Asks S3 to send an object's stored checksum with it."""


class _KnownPayloadAuth(S3SigV4Auth):
    """SigV4 for S3 with the payload's SHA-256 computed beforehand (in a thread, for large bodies)."""

    def __init__(self, credentials: Any, region: str, payload_hash: str) -> None:
        super().__init__(credentials, "s3", region)
        self._payload_hash = payload_hash

    def payload(self, request: Any) -> str:
        return self._payload_hash


def _content_md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode("ascii")


class CRC32:
    """The CRC32 of zlib and S3, with hashlib's ``update`` and ``digest`` (big-endian, as S3 writes it)."""

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes) -> None:
        self.value = isal_zlib.crc32(data, self.value)

    def digest(self) -> bytes:
        return self.value.to_bytes(4, "big")


def _base64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def crc32_checksum(data: bytes) -> str:
    """S3's ``x-amz-checksum-crc32`` of ``data``: its CRC32, big-endian, in base64."""
    return _base64(isal_zlib.crc32(data).to_bytes(4, "big"))


def _sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


_CHECKSUMS: dict[str, Callable[[], Any]] = {
    "x-amz-checksum-crc32": CRC32,
    "x-amz-checksum-sha256": hashlib.sha256,
}
"""The full-object checksums S3 may store that this module can compute (not CRC32C or CRC64NVME)."""


@dataclass(frozen=True)
class BodyCheck:
    """
    How to check a whole object's body: the hash to compute over it
    (``new()``, with hashlib's ``update`` and ``digest``), and what its
    digest, written as ``encode`` writes it, must come to.
    """

    name: str
    """What is compared, for error messages (a header's name)."""
    new: Callable[[], Any]
    encode: Callable[[bytes], str]
    expected: str

    def digest(self, body: bytes) -> str:
        """The value of a whole body, written as the header writes it."""
        running = self.new()
        running.update(body)
        return self.encode(running.digest())

    def join_and_digest(self, pieces: builtins.list[bytes]) -> tuple[bytes, str]:
        """The body the pieces make up, and its value (:meth:`digest`)."""
        body = b"".join(pieces)
        return body, self.digest(body)


def body_check(headers: dict[str, str]) -> BodyCheck | None:
    """
    How the headers of a whole object's answer let its body be checked.

    A full-object checksum S3 stored with the object comes first; then the
    ETag, where it is the MD5 of the body (a single-part object not
    encrypted with KMS or a customer key).  None when neither can check it.
    """
    if headers.get("x-amz-checksum-type", "FULL_OBJECT").upper() == "FULL_OBJECT":
        for name, new in _CHECKSUMS.items():
            value = headers.get(name, "")
            if value and "-" not in value:  # "value-N" is a checksum of part checksums
                return BodyCheck(name, new, _base64, value)
    match = _SINGLE_PART_ETAG.fullmatch(headers.get("etag", ""))
    encrypted = (
        headers.get("x-amz-server-side-encryption", "").startswith("aws:kms")
        or "x-amz-server-side-encryption-customer-algorithm" in headers
    )
    if match is None or encrypted:
        return None
    return BodyCheck("ETag (MD5)", hashlib.md5, bytes.hex, match.group(1).lower())


def _parse_iso(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


# The store


@implementer(IObjectStore)
class S3ObjectStore:
    """
    An object store in an S3 bucket, under a key prefix (see the module).

    ``credentials`` is a botocore credentials object (refreshable ones are
    refreshed as botocore sees fit).  ``backoff`` spaces retries; a store
    makes at most ``location.attempts`` attempts per operation, each bounded
    by ``location.timeout`` seconds.  ``list_page`` is the ``max-keys`` of
    each listing request (tests make it small to see pagination).
    """

    log = Logger()

    def __init__(
        self,
        location: S3Location,
        reactor: Any,
        credentials: Any,
        *,
        backoff: Backoff | None = None,
        list_page: int = LIST_PAGE,
        max_connections: int = MAX_PERSISTENT_PER_HOST,
    ) -> None:
        self.location = location
        self._reactor = reactor
        self._credentials = credentials
        self._backoff = backoff or Backoff(initial=0.2, cap=10.0)
        self._list_page = list_page
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = max_connections
        self._pool.cachedConnectionTimeout = 120
        endpoints = Endpoints(reactor, connect_timeout=min(location.timeout, 30.0))
        self._agent = Agent.usingEndpointFactory(reactor, endpoints, pool=self._pool)
        self._closed = False
        if not location.conditional:
            self._warn_fallback()

    def __repr__(self) -> str:
        return f"<S3ObjectStore {self.location}>"

    def _warn_fallback(self) -> None:
        self.log.warn(
            "object store {location}: create-only puts are a HEAD then a PUT, because conditional writes"
            " (If-None-Match) are off; this is racy: two writers of one key can both succeed",
            location=str(self.location),
        )

    # IObjectStore

    def get(self, key: str) -> Deferred[bytes]:
        return self._start(check_key, key, self._get)

    def get_range(self, key: str, start: int, length: int) -> Deferred[bytes]:
        if start < 0 or length < 0:
            return fail(errors.InvalidArgument(f"no range of {length} bytes at {start} in object {key!r}"))
        return self._start(check_key, key, self._get_range, start, length)

    def put(self, key: str, data: bytes, create_only: bool = False) -> Deferred[None]:
        try:
            body = data if type(data) is bytes else bytes(memoryview(data).cast("B"))
        except TypeError:
            return fail(errors.InvalidArgument(f"object {key!r} must be bytes, not {type(data).__name__}"))
        return self._start(check_key, key, self._put, body, create_only)

    def delete(self, key: str) -> Deferred[None]:
        return self._start(check_key, key, self._delete)

    def head(self, key: str) -> Deferred[ObjectInfo]:
        return self._start(check_key, key, self._head)

    def list(self, prefix: str = "") -> Deferred[builtins.list[ObjectInfo]]:
        return self._start(check_prefix, prefix, self._list)

    def delete_many(self, keys: Iterable[str]) -> Deferred[None]:
        """
        Remove many objects, up to 1000 a request (S3's batch delete).

        Absent objects are no error, as with :meth:`delete`.  Fails with the
        error of the first key the store refused to delete.
        """
        keys = builtins.list(keys)
        for key in keys:
            try:
                check_key(key)
            except errors.InvalidArgument as refused:
                return fail(refused)
        return self._start(lambda value: value, "", self._delete_many, keys)

    def close(self) -> Deferred[None]:
        """Close the pooled connections; later operations fail with Unavailable."""
        self._closed = True
        return self._pool.closeCachedConnections()

    # Operations

    def _start(
        self, check: Callable[[str], str], key: str, work: Callable[..., Any], *args: Any
    ) -> Deferred[Any]:
        if self._closed:
            return fail(errors.Unavailable(f"object store {self.location} is closed"))
        try:
            check(key)
        except errors.InvalidArgument as refused:
            return fail(refused)
        return Deferred.fromCoroutine(work(key, *args))

    async def _get(self, key: str) -> bytes:
        def accept(answer: Answer) -> bytes:
            if answer.status != 200:
                raise error_for(answer, "get", key, self.location)
            return answer.body

        return await self._call(
            "get",
            key,
            "GET",
            self.location.object_url(key),
            headers=_CHECKSUM_MODE,
            accept=accept,
            check_body=True,
        )

    async def _get_range(self, key: str, start: int, length: int) -> bytes:
        if length == 0:
            await self._head(key)
            return b""

        def accept(answer: Answer) -> bytes:
            if answer.status == 416:  # the object exists and starts before `start`
                return b""
            if answer.status == 200:  # a server that ignores Range sends the whole object (checked)
                return answer.body[start : start + length]
            if answer.status != 206:
                raise error_for(answer, "get", key, self.location)
            content_range = answer.headers.get("content-range", "")
            expected = re.fullmatch(r"bytes (\d+)-(\d+)/(\d+|\*)", content_range)
            if expected is None or int(expected.group(1)) != start:
                raise _Retry(f"the object store answered range {content_range!r} for bytes {start}-")
            if int(expected.group(2)) - start + 1 != len(answer.body):
                raise _Retry(f"range {content_range!r} came with {len(answer.body)} bytes")
            return answer.body

        headers = {"Range": f"bytes={start}-{start + length - 1}", **_CHECKSUM_MODE}
        return await self._call(
            "get", key, "GET", self.location.object_url(key), headers=headers, accept=accept, check_body=True
        )

    async def _put(self, key: str, body: bytes, create_only: bool) -> None:
        checksum, payload_hash = await self._digests(body)
        headers = {
            "x-amz-checksum-crc32": checksum,
            "x-amz-sdk-checksum-algorithm": "CRC32",
            "Content-Type": "application/octet-stream",
        }
        if create_only and not self.location.conditional:
            try:
                await self._head(key)
            except errors.NotFound:
                pass
            else:
                raise errors.AlreadyExists(f"object {key!r} already exists in {self.location}")
        elif create_only:
            headers["If-None-Match"] = "*"

        def accept(answer: Answer) -> bool:
            if answer.status == 200:
                return True
            if answer.status == 412 and answer.attempt > 0:
                return False  # perhaps our own earlier attempt, whose answer was lost
            if answer.status == 501 and create_only and self.location.conditional:
                raise _Unconditional()
            raise error_for(answer, "put", key, self.location)

        try:
            stored = await self._call(
                "put",
                key,
                "PUT",
                self.location.object_url(key),
                headers=headers,
                body=body,
                accept=accept,
                payload_hash=payload_hash,
            )
        except _Unconditional:
            self.location = replace(self.location, conditional=False)
            self._warn_fallback()
            return await self._put(key, body, create_only)
        if not stored:
            info_etag = await self._etag(key)
            if info_etag != await self._in_thread(_md5_hex, body, len(body)):
                raise errors.AlreadyExists(f"object {key!r} already exists in {self.location}")

    async def _etag(self, key: str) -> str | None:
        answer = await self._call(
            "head", key, "HEAD", self.location.object_url(key), accept=lambda answer: answer
        )
        match = _SINGLE_PART_ETAG.fullmatch(answer.headers.get("etag", ""))
        return match.group(1).lower() if match else None

    async def _delete(self, key: str) -> None:
        def accept(answer: Answer) -> None:
            if answer.status in (200, 204):
                return
            code, _, _ = parse_error(answer.body)
            if answer.status == 404 and code != "NoSuchBucket":
                return
            raise error_for(answer, "delete", key, self.location)

        await self._call("delete", key, "DELETE", self.location.object_url(key), accept=accept)

    async def _head(self, key: str) -> ObjectInfo:
        def accept(answer: Answer) -> ObjectInfo:
            if answer.status != 200:
                raise error_for(answer, "head", key, self.location)
            try:
                size = int(answer.headers["content-length"])
                modified = parsedate_to_datetime(answer.headers["last-modified"]).timestamp()
            except (KeyError, ValueError, TypeError):
                raise _Retry(f"the object store described {key!r} without a size or date") from None
            return ObjectInfo(key, size, modified)

        return await self._call("head", key, "HEAD", self.location.object_url(key), accept=accept)

    async def _list(self, prefix: str) -> builtins.list[ObjectInfo]:
        found: builtins.list[ObjectInfo] = []
        strip = len(self.location.object_name(""))
        token: str | None = None
        while True:
            params = {
                "list-type": "2",
                "max-keys": str(self._list_page),
                "prefix": self.location.object_name(prefix),
            }
            if token is not None:
                params["continuation-token"] = token
            query = "&".join(
                f"{quote(name, safe='-_.~')}={quote(value, safe='-_.~')}"
                for name, value in sorted(params.items())
            )

            def accept(answer: Answer) -> tuple[builtins.list[ObjectInfo], str | None]:
                if answer.status != 200:
                    raise error_for(answer, "list", prefix, self.location)
                try:
                    return self._parse_listing(answer.body, strip)
                except (ElementTree.ParseError, KeyError, ValueError) as failure:
                    raise _Retry(f"the object store sent a listing that does not parse: {failure}") from None

            page, token = await self._call(
                "list", prefix, "GET", f"{self.location.bucket_url()}?{query}", accept=accept
            )
            found.extend(page)
            if token is None:
                break
        found.sort(key=lambda info: info.key)
        return found

    @staticmethod
    def _parse_listing(body: bytes, strip: int) -> tuple[builtins.list[ObjectInfo], str | None]:
        root = ElementTree.fromstring(body)
        page = []
        for item in root.iter(f"{_S3_NAMESPACE}Contents"):
            name = item.findtext(f"{_S3_NAMESPACE}Key") or ""
            key = name[strip:]
            try:
                check_key(key)
            except errors.InvalidArgument:
                continue  # not one of ours: a console's folder marker, a foreign name
            size = int(item.findtext(f"{_S3_NAMESPACE}Size") or "0")
            modified = _parse_iso(item.findtext(f"{_S3_NAMESPACE}LastModified") or "")
            page.append(ObjectInfo(key, size, modified))
        truncated = (root.findtext(f"{_S3_NAMESPACE}IsTruncated") or "false").lower() == "true"
        token = root.findtext(f"{_S3_NAMESPACE}NextContinuationToken") if truncated else None
        return page, token

    async def _delete_many(self, _: str, keys: builtins.list[str]) -> None:
        for first in range(0, len(keys), DELETE_BATCH):
            batch = keys[first : first + DELETE_BATCH]
            document = ElementTree.Element("Delete", xmlns=_S3_NAMESPACE.strip("{}"))
            ElementTree.SubElement(document, "Quiet").text = "true"
            for key in batch:
                item = ElementTree.SubElement(document, "Object")
                ElementTree.SubElement(item, "Key").text = self.location.object_name(key)
            body = ElementTree.tostring(document, xml_declaration=True, encoding="utf-8")
            described = f"{len(batch)} objects from {batch[0]!r}"

            def accept(answer: Answer, described: str = described) -> None:
                if answer.status != 200:
                    raise error_for(answer, "delete", described, self.location)
                root = ElementTree.fromstring(answer.body)
                for refused in root.iter(f"{_S3_NAMESPACE}Error"):
                    code = refused.findtext(f"{_S3_NAMESPACE}Code") or ""
                    name = refused.findtext(f"{_S3_NAMESPACE}Key") or ""
                    if code == "NoSuchKey":
                        continue
                    message = refused.findtext(f"{_S3_NAMESPACE}Message") or ""
                    status = 403 if code == "AccessDenied" else 400
                    error_body = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()
                    raise error_for(
                        Answer(status, {}, error_body),
                        "delete",
                        name[len(self.location.object_name("")) :],
                        self.location,
                    )

            headers = {"Content-MD5": _content_md5(body), "Content-Type": "application/xml"}
            await self._call(
                "delete",
                described,
                "POST",
                f"{self.location.bucket_url()}?delete=",
                headers=headers,
                body=body,
                accept=accept,
            )

    # One request, with retries

    async def _call(
        self,
        operation: str,
        key: str,
        method: str,
        url: str,
        *,
        accept: Callable[[Answer], _T],
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        payload_hash: str | None = None,
        check_body: bool = False,
    ) -> _T:
        """
        Make a request until ``accept`` takes its answer, or it has failed ``attempts`` times.

        ``accept`` sees every answer that is not a retryable error; it returns
        the result, raises a LucidError (final) or raises _Retry.  With
        ``check_body``, a 200 answer's body is checked against its stored
        checksum or ETag (:func:`body_check`) before ``accept`` sees it.
        """
        attempt = 0
        while True:
            try:
                answer = await self._attempt(method, url, dict(headers or {}), body, payload_hash, check_body)
                answer.attempt = attempt
                if retryable(answer):
                    code, message, _ = parse_error(answer.body)
                    raise _Retry(f"HTTP {answer.status} {code} {message}".strip())
                return accept(answer)
            except _Retry as reason:
                why: BaseException = reason
            except _TRANSPORT_ERRORS as reason:
                why = reason
            except Exception as reason:
                tls = _tls_failure(reason)
                if tls is not None:
                    raise errors.TLSVerificationError(
                        f"the object store at {self.location.endpoint} presented a certificate that was not"
                        f" accepted: {tls}"
                    ) from None
                if not _is_transport(reason):
                    raise
                why = reason
            if self._closed:
                raise errors.Unavailable(
                    f"object store {self.location} was closed during {operation} of {key!r}"
                )
            if attempt + 1 >= self.location.attempts:
                kind = errors.IntegrityError if isinstance(why, _Corrupt) else errors.Unavailable
                raise kind(
                    f"object store {self.location} failed {operation} of {key!r} {attempt + 1} times;"
                    f" last: {_describe(why)}"
                )
            self.log.debug(
                "{operation} of {key} failed ({why}); retrying",
                operation=operation,
                key=key,
                why=_describe(why),
            )
            await _sleep(self._reactor, self._backoff.delay(attempt))
            attempt += 1

    async def _attempt(
        self,
        method: str,
        url: str,
        headers: dict[str, str],
        body: bytes,
        payload_hash: str | None = None,
        check_body: bool = False,
    ) -> Answer:
        """One signed request and its whole answer, within the timeout."""
        signed = self._sign(method, url, headers, body, payload_hash)

        async def exchange() -> Answer:
            response: IResponse = await self._agent.request(
                method.encode("ascii"),
                url.encode("ascii"),
                Headers({name: [value] for name, value in signed.items()}),
                BytesProducer(body, self._reactor) if body or method in ("PUT", "POST") else None,
            )
            received = {
                name.decode("latin-1").lower(): values[-1].decode("latin-1")
                for name, values in response.headers.getAllRawHeaders()
            }
            reader = BodyReader(response.length if isinstance(response.length, int) else None)
            response.deliverBody(reader)
            pieces = await reader.done
            if (
                method != "HEAD"
                and "content-length" in received
                and int(received["content-length"]) != reader.size
            ):
                raise _Retry(f"a body of {received['content-length']} bytes arrived with {reader.size}")
            check = body_check(received) if check_body and response.code == 200 else None
            if check is None:
                return Answer(response.code, received, b"".join(pieces))
            content, digest = await self._in_thread(check.join_and_digest, pieces, reader.size)
            if digest != check.expected:
                raise _Corrupt(f"a body arrived altered: it does not match its {check.name}")
            return Answer(response.code, received, content)

        attempt = Deferred.fromCoroutine(exchange())
        attempt.addTimeout(self.location.timeout, self._reactor)
        return await attempt

    def _sign(
        self, method: str, url: str, headers: dict[str, str], body: bytes, payload_hash: str | None = None
    ) -> dict[str, str]:
        request = AWSRequest(method=method, url=url, headers=headers, data=body)
        credentials = self._credentials.get_frozen_credentials()
        if payload_hash is None:
            signer = S3SigV4Auth(credentials, "s3", self.location.region)
        else:
            signer = _KnownPayloadAuth(credentials, self.location.region, payload_hash)
        signer.add_auth(request)
        return {name: value for name, value in request.headers.items()}

    async def _in_thread(self, work: Callable[[_B], _T], body: _B, size: int) -> _T:
        """``work(body)``; for ``size`` bytes or more in the reactor's thread pool, leaving the reactor free."""
        if size < THREAD_HASHING_THRESHOLD or not hasattr(self._reactor, "getThreadPool"):
            return work(body)
        return await deferToThreadPool(self._reactor, self._reactor.getThreadPool(), work, body)

    async def _digests(self, body: bytes) -> tuple[str, str]:
        """
        The CRC32 (``x-amz-checksum-crc32``) and hex SHA-256 (for SigV4) of a body to put.

        A large body is hashed in two threads of the reactor's pool at once.
        """
        crc32 = Deferred.fromCoroutine(self._in_thread(crc32_checksum, body, len(body)))
        sha256 = Deferred.fromCoroutine(self._in_thread(_sha256_hex, body, len(body)))
        return await crc32, await sha256


class _Corrupt(_Retry):
    """A body that does not match its checksum."""


class _Unconditional(Exception):
    """The server refused If-None-Match as not implemented."""


def _is_transport(reason: BaseException) -> bool:
    return isinstance(
        reason, ResponseFailed | ResponseNeverReceived | RequestTransmissionFailed | RequestNotSent
    )


def _tls_failure(reason: BaseException) -> str | None:
    """The TLS error inside a failed request, if that is what failed it."""
    from OpenSSL import SSL

    for inner in getattr(reason, "reasons", []) or []:
        if isinstance(inner, Failure) and inner.check(SSL.Error):
            return str(inner.value)
    return None


def _describe(reason: BaseException) -> str:
    inner = getattr(reason, "reasons", None)
    if inner:
        return "; ".join(failure.getErrorMessage() for failure in inner if isinstance(failure, Failure))
    return str(reason) or type(reason).__name__


def _sleep(reactor: Any, seconds: float) -> Deferred[None]:
    return deferLater(reactor, seconds, lambda: None)


def open_s3(url: str, reactor: Any, create: bool = False, **options: Any) -> S3ObjectStore:
    """
    Open the store an ``s3://`` URL names (``create`` is ignored: an operator makes buckets).

    ``options`` go to :class:`S3ObjectStore` (``backoff``, ``list_page``, ``max_connections``).
    """
    profile = dict(parse_qsl(urlsplit(url).query)).get("profile") or None
    credentials, region = load_credentials(profile)
    return S3ObjectStore(parse_url(url, default_region=region), reactor, credentials, **options)
