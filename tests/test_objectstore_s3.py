"""
The S3 object store: the IObjectStore contract against a real ``moto_server``
on loopback, and what only S3 can get wrong — URLs and endpoints, credentials,
pagination, batch deletes, 4xx answers that must not be retried, and 5xx,
resets, stalls, truncated and corrupted bodies that must be.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import os
import threading
import zlib
from pathlib import Path
from typing import Any

from botocore.credentials import Credentials
from twisted.internet import reactor
from twisted.internet.defer import DeferredList
from twisted.logger import capturedLogs, formatEvent
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.resource import Resource
from twisted.web.server import Site

from lucidlink import errors, tls
from lucidlink.objectstore import open_store
from lucidlink.objectstore.s3 import (
    CRC32,
    THREAD_HASHING_THRESHOLD,
    Answer,
    BodyCheck,
    S3ObjectStore,
    body_check,
    crc32_checksum,
    error_for,
    parse_url,
    retryable,
)
from tests.objectstore_behaviour import ObjectStoreBehaviourMixin
from tests.processes import free_port
from tests.s3_fixtures import (
    ACCESS_KEY,
    AUTH_BUCKET,
    SECRET_KEY,
    isolate_credentials,
    make_store,
    new_bucket,
    shared_auth_moto,
    shared_moto,
)
from tests.s3_proxy import FaultyS3Proxy


class MotoBehaviourMixin(ObjectStoreBehaviourMixin):
    """
    The IObjectStore contract against moto, which falls short of S3 in one place.

    moto checks ``If-None-Match: *`` and then stores the object, in two
    steps on its request threads, so two concurrent create-only puts can
    both win there (seen under load); AWS S3 and MinIO decide atomically.
    Against moto the race is checked for what the client decides: at least
    one writer wins, every other fails with AlreadyExists, and the object
    holds a winner's bytes.
    """

    async def test_concurrent_create_only_one_wins(self) -> None:
        store = self.store
        attempts = [store.put("race", f"writer {n}".encode(), create_only=True) for n in range(6)]
        results = await DeferredList(attempts, consumeErrors=True)
        winners = [n for n, (ok, _) in enumerate(results) if ok]
        self.assertTrue(winners)
        for ok, outcome in results:
            if not ok:
                outcome.trap(errors.AlreadyExists)
        self.assertIn(await store.get("race"), [f"writer {n}".encode() for n in winners])


class S3BehaviourTests(MotoBehaviourMixin, TestCase):
    """The S3 store keeps the whole IObjectStore contract, against moto."""

    def make_store(self) -> S3ObjectStore:
        moto = shared_moto()
        return make_store(reactor, moto.endpoint, new_bucket(moto))


class S3PrefixedBehaviourTests(MotoBehaviourMixin, TestCase):
    """Under a key prefix, the store behaves as if it had the bucket to itself."""

    def make_store(self) -> S3ObjectStore:
        moto = shared_moto()
        bucket = new_bucket(moto)
        moto.client().put_object(Bucket=bucket, Key="other/tenant", Body=b"not ours")
        moto.client().put_object(Bucket=bucket, Key="fs1/", Body=b"")  # a console's folder marker
        return make_store(reactor, moto.endpoint, bucket, "fs1")


class S3URLTests(SynchronousTestCase):
    """What an s3:// URL may say, and what is refused."""

    def test_defaults(self) -> None:
        """Without an endpoint, AWS with virtual addressing; with one, path addressing."""
        location = parse_url("s3://my-bucket/some/prefix")
        self.assertEqual(
            (location.bucket, location.prefix, location.endpoint, location.region, location.addressing),
            ("my-bucket", "some/prefix", "https://s3.us-east-1.amazonaws.com", "us-east-1", "virtual"),
        )
        self.assertEqual(
            location.object_url("a/b=c"), "https://my-bucket.s3.us-east-1.amazonaws.com/some/prefix/a/b%3Dc"
        )
        location = parse_url("s3://bkt?endpoint=https://minio.example.net:9000&region=eu-1")
        self.assertEqual((location.addressing, location.region, location.prefix), ("path", "eu-1", ""))
        self.assertEqual(location.object_url("k"), "https://minio.example.net:9000/bkt/k")
        self.assertEqual(
            parse_url("s3://bkt/p?region=x&addressing=virtual&endpoint=http://[::1]:9").addressing, "virtual"
        )

    def test_plain_http_only_to_loopback(self) -> None:
        """http:// endpoints are refused unless they are loopback."""
        for endpoint in [
            "http://127.0.0.1:9000",
            "http://localhost:1",
            "http://[::1]:80",
            "http://127.8.9.10",
        ]:
            self.assertTrue(parse_url(f"s3://bkt?endpoint={endpoint}").endpoint.startswith("http://"))
        with self.assertRaises(errors.InvalidArgument) as caught:
            parse_url("s3://bkt?endpoint=http://s3.example.net")
        self.assertIn("plain HTTP to a host that is not loopback", str(caught.exception))

    def test_refused(self) -> None:
        """Bad buckets, prefixes, parameters and endpoints are refused with InvalidArgument."""
        for url in [
            "s3://UPPER/x",
            "s3://ab",
            "s3://bkt/../up",
            "s3://bkt/with space",
            "s3://bkt?colour=blue",
            "s3://bkt?addressing=sideways",
            "s3://bkt?endpoint=ftp://host",
            "s3://bkt?endpoint=https://host/path",
            "s3://bkt?endpoint=https://bücher.example",
            "s3://bkt?timeout=0",
            "s3://bkt?attempts=zero",
            "s3://bkt?conditional=maybe",
        ]:
            self.assertRaises(errors.InvalidArgument, parse_url, url)


class S3ErrorTests(SynchronousTestCase):
    """How S3 error answers become lucidlink errors (no server needed)."""

    location = parse_url("s3://bkt/pre?endpoint=http://127.0.0.1:1")

    def error(self, status: int, code: str, message: str = "m", extra: str = "") -> errors.LucidError:
        body = f"<Error><Code>{code}</Code><Message>{message}</Message>{extra}</Error>".encode()
        return error_for(Answer(status, {}, body), "get", "chunks/k", self.location)

    def test_classes(self) -> None:
        """Each S3 code becomes the lucidlink error that says what happened."""
        missing = self.error(404, "NoSuchBucket")
        self.assertIsInstance(missing, errors.NotFound)
        self.assertIn("no bucket named 'bkt'", str(missing))
        denied = self.error(403, "AccessDenied")
        self.assertIsInstance(denied, errors.AccessDenied)
        self.assertIn("denied get of 'chunks/k'", str(denied))
        for code in ["InvalidAccessKeyId", "SignatureDoesNotMatch"]:
            refused = self.error(403, code)
            self.assertIsInstance(refused, errors.AuthenticationFailed)
            self.assertIn("the object store refused the credentials", str(refused))
        skew = self.error(
            403,
            "RequestTimeTooSkewed",
            extra="<RequestTime>20261126T100000Z</RequestTime><ServerTime>2026-11-26T10:20:00Z</ServerTime>",
        )
        self.assertIsInstance(skew, errors.AuthenticationFailed)
        self.assertIn("clock", str(skew))
        self.assertIsInstance(self.error(404, "NoSuchKey"), errors.NotFound)
        self.assertIsInstance(self.error(412, "PreconditionFailed"), errors.AlreadyExists)
        self.assertIsInstance(self.error(400, "InvalidRequest"), errors.InvalidArgument)
        self.assertIsInstance(
            error_for(Answer(403, {}, b""), "head", "k", self.location), errors.AccessDenied
        )

    def test_retryable(self) -> None:
        """5xx (not 501), 429 and S3's transient codes are retried; other 4xx never."""
        self.assertTrue(retryable(Answer(500, {}, b"")))
        self.assertTrue(retryable(Answer(503, {}, b"<Error><Code>SlowDown</Code></Error>")))
        self.assertTrue(retryable(Answer(429, {}, b"")))
        self.assertFalse(retryable(Answer(501, {}, b"")))
        for status, code in [(403, "AccessDenied"), (404, "NoSuchKey"), (400, "InvalidArgument"), (412, "")]:
            self.assertFalse(retryable(Answer(status, {}, f"<Error><Code>{code}</Code></Error>".encode())))


class S3BodyCheckTests(SynchronousTestCase):
    """Which headers of a whole object's answer check its body, and how."""

    body = b"the object's bytes"

    def test_stored_checksum_first(self) -> None:
        """A full-object CRC32 or SHA-256 S3 stored with the object is preferred to the ETag."""
        etag = f'"{hashlib.md5(self.body).hexdigest()}"'
        check = body_check({"x-amz-checksum-crc32": crc32_checksum(self.body), "etag": etag})
        assert check is not None
        self.assertEqual((check.name, check.digest(self.body)), ("x-amz-checksum-crc32", check.expected))
        self.assertEqual(crc32_checksum(b"hello world"), "DUoRhQ==")  # as S3 and botocore compute it
        sha256 = base64.b64encode(hashlib.sha256(self.body).digest()).decode()
        check = body_check({"x-amz-checksum-sha256": sha256, "x-amz-checksum-type": "FULL_OBJECT"})
        assert check is not None
        self.assertEqual(check.digest(self.body), sha256)

    def test_crc32_is_zlibs(self) -> None:
        """The CRC32 (ISA-L's) is zlib's, whole or over pieces, from any size and alignment of piece."""
        data = os.urandom(3 * 1024 * 1024 + 13)
        self.assertEqual(crc32_checksum(data), base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode())
        running = CRC32()
        cuts = [0, 1, 4096, 70001, 2 * 1024 * 1024 + 7, len(data)]
        for start, end in zip(cuts, cuts[1:]):
            running.update(data[start:end])
        self.assertEqual(running.digest(), zlib.crc32(data).to_bytes(4, "big"))
        self.assertEqual(crc32_checksum(b""), base64.b64encode(bytes(4)).decode())

    def test_join_and_digest(self) -> None:
        """Pieces of a body are joined into it, and its value is the whole body's."""
        check = body_check({"x-amz-checksum-crc32": crc32_checksum(self.body)})
        assert check is not None
        pieces = [self.body[:5], self.body[5:6], self.body[6:]]
        self.assertEqual(check.join_and_digest(pieces), (self.body, check.expected))
        self.assertEqual(check.join_and_digest([]), (b"", crc32_checksum(b"")))

    def test_etag_when_no_usable_checksum(self) -> None:
        """Without a checksum this module computes (or with a composite one), a single-part MD5 ETag checks."""
        etag = f'"{hashlib.md5(self.body).hexdigest()}"'
        for headers in [
            {"etag": etag},
            {"etag": etag, "x-amz-checksum-crc64nvme": "AAAAAAAAAAA="},
            {"etag": etag, "x-amz-checksum-crc32": "AAAAAA==-3"},
            {"etag": etag, "x-amz-checksum-crc32": "AAAAAA==", "x-amz-checksum-type": "COMPOSITE"},
        ]:
            check = body_check(headers)
            assert check is not None
            self.assertEqual((check.name, check.digest(self.body)), ("ETag (MD5)", check.expected), headers)

    def test_nothing_to_check(self) -> None:
        """A multipart ETag, or one under KMS or customer-key encryption, is not an MD5: nothing checks."""
        md5 = hashlib.md5(self.body).hexdigest()
        for headers in [
            {},
            {"etag": f'"{md5}-4"'},
            {"etag": f'"{md5}"', "x-amz-server-side-encryption": "aws:kms"},
            {"etag": f'"{md5}"', "x-amz-server-side-encryption-customer-algorithm": "AES256"},
        ]:
            self.assertIsNone(body_check(headers), headers)


class S3StoreTests(TestCase):
    """What only S3 does: pagination, batch deletes, buckets and credentials, against moto."""

    def setUp(self) -> None:
        self.moto = shared_moto()
        self.bucket = new_bucket(self.moto)

    def store(self, **options: Any) -> S3ObjectStore:
        store = make_store(reactor, self.moto.endpoint, self.bucket, **options)
        self.addCleanup(store.close)
        return store

    async def test_pagination(self) -> None:
        """A listing longer than a page is followed across continuation tokens."""
        store = self.store(list_page=7)
        keys = [f"p/{n:03}" for n in range(30)]
        for key in keys:
            await store.put(key, b"")
        await store.put("q", b"")
        self.assertEqual([info.key for info in await store.list("p/")], keys)
        self.assertEqual(len(await store.list()), 31)

    async def test_content_encoding_not_undone(self) -> None:
        """An object another tool stored with ``Content-Encoding: gzip`` comes back as stored, and checked."""
        stored = gzip.compress(b"compressed by another tool " * 200)
        self.moto.client().put_object(Bucket=self.bucket, Key="zipped", Body=stored, ContentEncoding="gzip")
        store = self.store()
        self.assertEqual(await store.get("zipped"), stored)
        self.assertEqual(await store.get_range("zipped", 3, 10), stored[3:13])

    async def test_delete_many(self) -> None:
        """A batch delete removes every named object; absent ones are no error."""
        store = self.store()
        for n in range(5):
            await store.put(f"d/{n}", b"x")
        await store.put("keep", b"x")
        await store.delete_many([f"d/{n}" for n in range(5)] + ["never/was"])
        self.assertEqual([info.key for info in await store.list()], ["keep"])
        await self.assertFailure(store.delete_many(["ok", "../bad"]), errors.InvalidArgument)

    async def test_put_stores_crc32(self) -> None:
        """A put sends the body's CRC32, which S3 keeps with the object and gives back."""
        store = self.store()
        data = os.urandom(300 * 1024)  # hashed in the thread pool
        await store.put("c/big", data)
        head = self.moto.client().head_object(Bucket=self.bucket, Key="c/big", ChecksumMode="ENABLED")
        self.assertEqual(head["ChecksumCRC32"], crc32_checksum(data))

    async def test_stored_checksum_mismatch(self) -> None:
        """A body that does not match the checksum stored with it is never passed on: IntegrityError."""
        # moto keeps a stated checksum without checking it (AWS would refuse this put with BadDigest).
        self.moto.client().put_object(
            Bucket=self.bucket,
            Key="lies",
            Body=b"some bytes",
            ChecksumCRC32="AAAAAA==",
            ChecksumAlgorithm="CRC32",
        )
        failure = await self.assertFailure(self.store(attempts=2).get("lies"), errors.IntegrityError)
        self.assertIn("x-amz-checksum-crc32", str(failure))

    async def test_no_such_bucket(self) -> None:
        """A missing bucket is NotFound naming the bucket, for reads, writes and listings."""
        store = make_store(reactor, self.moto.endpoint, "no-such-bucket-here")
        self.addCleanup(store.close)
        for attempt in [store.get("k"), store.put("k", b"x"), store.list()]:
            failure = await self.assertFailure(attempt, errors.NotFound)
            self.assertIn("no bucket named 'no-such-bucket-here'", str(failure))

    async def test_credentials_from_environment(self) -> None:
        """open_store finds credentials in the environment and works."""
        isolate_credentials(self, {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY})
        store = open_store(f"s3://{self.bucket}/env?endpoint={self.moto.endpoint}&region=us-east-1", reactor)
        self.addCleanup(store.close)
        self.assertIsInstance(store, S3ObjectStore)
        self.assertEqual(store._credentials.get_frozen_credentials().access_key, ACCESS_KEY)  # type: ignore[attr-defined]
        await store.put("k", b"v")
        self.assertEqual(self.moto.client().get_object(Bucket=self.bucket, Key="env/k")["Body"].read(), b"v")

    def test_no_credentials(self) -> None:
        """With no credentials anywhere, opening says how to provide them."""
        isolate_credentials(self, {})
        with self.assertRaises(errors.AuthenticationFailed) as caught:
            open_store(f"s3://{self.bucket}?endpoint={self.moto.endpoint}", reactor)
        self.assertIn("AWS_ACCESS_KEY_ID", str(caught.exception))

    async def test_unconditional_fallback(self) -> None:
        """With conditional=off, create-only puts are HEAD then PUT, still refuse a clash, and warn it is racy."""
        with capturedLogs() as events:
            store = self.store(conditional=False)
        self.assertTrue(any("racy" in formatEvent(event) for event in events))
        await store.put("k", b"first", create_only=True)
        await self.assertFailure(store.put("k", b"second", create_only=True), errors.AlreadyExists)
        self.assertEqual(await store.get("k"), b"first")

    async def test_moto_honours_if_none_match(self) -> None:
        """moto answers a conditional PUT of an existing key with 412 (so the tests above use it for real)."""
        store = self.store()
        await store.put("k", b"first")
        answer = await store._attempt(
            "PUT", store.location.object_url("k"), {"If-None-Match": "*"}, b"second"
        )
        self.assertEqual(answer.status, 412)

    async def test_unreachable(self) -> None:
        """A server that refuses connections is retried, then Unavailable naming the endpoint."""
        store = make_store(reactor, f"http://127.0.0.1:{free_port()}", self.bucket, attempts=2)
        self.addCleanup(store.close)
        failure = await self.assertFailure(store.head("k"), errors.Unavailable)
        self.assertIn("failed head of 'k' 2 times", str(failure))

    async def test_closed(self) -> None:
        """A closed store refuses operations with Unavailable."""
        store = self.store()
        await store.close()
        await self.assertFailure(store.get("k"), errors.Unavailable)


class S3RetryTests(TestCase):
    """Through a fault-injecting proxy: what is retried, and what never is."""

    def setUp(self) -> Any:
        self.moto = shared_moto()
        self.bucket = new_bucket(self.moto)
        self.proxy = FaultyS3Proxy(reactor, self.moto.endpoint)
        self.addCleanup(self.proxy.stop)
        self.store = make_store(reactor, self.proxy.endpoint, self.bucket, attempts=4, timeout=1.0)
        self.addCleanup(self.store.close)
        return self.store.put("k", b"the object's bytes" * 100)

    def attempts(self) -> int:
        """Requests the proxy saw since the test began (after setUp's put)."""
        return len(self.proxy.requests) - 1

    async def test_5xx_and_slowdown_retried(self) -> None:
        """500, 503 and SlowDown are retried until the server answers."""
        self.proxy.answer_next(1, 500, "InternalError")
        self.proxy.answer_next(1, 503, "SlowDown")
        self.proxy.answer_next(1, 503, "ServiceUnavailable")
        self.assertEqual(await self.store.get("k"), b"the object's bytes" * 100)
        self.assertEqual(self.attempts(), 4)

    async def test_gives_up(self) -> None:
        """After the last attempt the error is Unavailable, saying how often it failed and why."""
        self.proxy.answer_next(4, 503, "SlowDown")
        failure = await self.assertFailure(self.store.put("k", b"x"), errors.Unavailable)
        self.assertIn("4 times", str(failure))
        self.assertIn("SlowDown", str(failure))
        self.assertEqual(self.attempts(), 4)

    async def test_4xx_never_retried(self) -> None:
        """4xx answers fail at once, as the error they stand for."""
        cases = [
            (403, "AccessDenied", errors.AccessDenied, "denied get of 'k'"),
            (403, "InvalidAccessKeyId", errors.AuthenticationFailed, "refused the credentials"),
            (403, "SignatureDoesNotMatch", errors.AuthenticationFailed, "refused the credentials"),
            (403, "RequestTimeTooSkewed", errors.AuthenticationFailed, "clock"),
            (404, "NoSuchBucket", errors.NotFound, f"no bucket named {self.bucket!r}"),
            (400, "InvalidArgument", errors.InvalidArgument, "InvalidArgument"),
        ]
        for status, code, error, words in cases:
            before = len(self.proxy.requests)
            self.proxy.answer_next(1, status, code)
            failure = await self.assertFailure(self.store.get("k"), error)
            self.assertIn(words, str(failure))
            self.assertEqual(len(self.proxy.requests) - before, 1, code)

    async def test_reset_retried(self) -> None:
        """A reset connection is retried, for reads and writes."""
        self.proxy.reset_next(2)
        await self.store.put("j", b"written")
        self.proxy.reset_next(1)
        self.assertEqual(await self.store.get("j"), b"written")
        self.assertEqual(self.attempts(), 5)

    async def test_stall_retried(self) -> None:
        """A server that never answers is given up on after the timeout, and asked again."""
        self.proxy.stall_next(1)
        self.assertEqual(await self.store.head("k"), await self.store.head("k"))
        self.assertEqual(self.attempts(), 3)

    async def test_truncated_body_retried(self) -> None:
        """A body cut short is never passed on: the read is retried."""
        self.proxy.truncate_next(1)
        self.assertEqual(await self.store.get("k"), b"the object's bytes" * 100)
        self.proxy.truncate_next(1)
        self.assertEqual(await self.store.get_range("k", 10, 500), (b"the object's bytes" * 100)[10:510])
        self.assertEqual(self.attempts(), 4)

    async def test_corrupted_body_retried(self) -> None:
        """A body that does not match its stored CRC32 is retried; if it stays wrong, IntegrityError."""
        self.proxy.corrupt_next(1)
        self.assertEqual(await self.store.get("k"), b"the object's bytes" * 100)
        self.assertEqual(self.attempts(), 2)
        self.proxy.corrupt_next(4)
        failure = await self.assertFailure(self.store.get("k"), errors.IntegrityError)
        self.assertIn("x-amz-checksum-crc32", str(failure))

    async def test_corrupted_body_without_checksum(self) -> None:
        """An object stored without a checksum (another tool put it) is checked against its MD5 ETag."""
        import boto3
        from botocore.config import Config

        plain = boto3.client(
            "s3",
            endpoint_url=self.moto.endpoint,
            region_name="us-east-1",
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            config=Config(request_checksum_calculation="when_required"),
        )
        plain.put_object(Bucket=self.bucket, Key="plain", Body=b"no checksum stored" * 50)
        self.assertNotIn(
            "x-amz-checksum-crc32",
            plain.head_object(Bucket=self.bucket, Key="plain", ChecksumMode="ENABLED")["ResponseMetadata"][
                "HTTPHeaders"
            ],
        )
        self.proxy.corrupt_next(1)
        self.assertEqual(await self.store.get("plain"), b"no checksum stored" * 50)
        self.proxy.corrupt_next(4)
        failure = await self.assertFailure(self.store.get("plain"), errors.IntegrityError)
        self.assertIn("ETag (MD5)", str(failure))

    async def test_large_body_checked_in_a_thread(self) -> None:
        """A large body is joined and checked off the reactor's thread; cut short or altered, it is retried."""
        large = os.urandom(THREAD_HASHING_THRESHOLD + 12345)
        await self.store.put("large", large)
        threads: list[str] = []
        join_and_digest = BodyCheck.join_and_digest

        def recorded(check: BodyCheck, pieces: list[bytes]) -> tuple[bytes, str]:
            threads.append(threading.current_thread().name)
            return join_and_digest(check, pieces)

        self.patch(BodyCheck, "join_and_digest", recorded)
        before = len(self.proxy.requests)
        self.proxy.truncate_next(1)
        self.proxy.corrupt_next(1)
        self.assertEqual(await self.store.get("large"), large)
        self.assertEqual(len(self.proxy.requests) - before, 3)
        self.assertEqual(len(threads), 2)  # the truncated body is refused before it is joined
        self.assertNotIn(threading.current_thread().name, threads)
        self.proxy.corrupt_next(4)
        failure = await self.assertFailure(self.store.get("large"), errors.IntegrityError)
        self.assertIn("x-amz-checksum-crc32", str(failure))

    async def test_not_implemented_conditional_falls_back(self) -> None:
        """A server that answers If-None-Match with 501 gets HEAD then PUT from then on, with a warning."""
        self.proxy.answer_next(1, 501, "NotImplemented")
        with capturedLogs() as events:
            await self.store.put("fresh", b"made", create_only=True)
        self.assertTrue(any("racy" in formatEvent(event) for event in events))
        self.assertFalse(self.store.location.conditional)
        self.assertEqual([method for method, _ in self.proxy.requests[1:]], ["PUT", "HEAD", "PUT"])
        await self.assertFailure(self.store.put("fresh", b"again", create_only=True), errors.AlreadyExists)

    async def test_create_only_answer_lost(self) -> None:
        """A create-only put whose first answer was lost is not mistaken for a clash on retry."""
        self.proxy.lose_answer_next()
        await self.store.put("new", b"mine", create_only=True)
        self.assertEqual(self.attempts(), 3)  # the put, its retry (412), the HEAD that shows it is ours
        self.assertEqual(await self.store.get("new"), b"mine")
        self.proxy.lose_answer_next()
        await self.assertFailure(self.store.put("new", b"other", create_only=True), errors.AlreadyExists)
        self.assertEqual(await self.store.get("new"), b"mine")


class S3TLSTests(TestCase):
    """HTTPS endpoints must present a certificate the system trusts."""

    async def test_untrusted_certificate_refused(self) -> None:
        """A certificate from an unknown CA fails at once with TLSVerificationError, never retried."""
        base = Path(self.mktemp())
        tls.init_ca(base / "ca")
        cert, key = tls.issue_certificate(base / "ca", ["127.0.0.1", "localhost"], base / "server")
        seen: list[bytes] = []

        class Anything(Resource):
            isLeaf = True

            def render(self, request: Any) -> bytes:
                seen.append(request.uri)
                return b""

        port = reactor.listenSSL(
            0, Site(Anything()), tls.server_tls_options(cert, key), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        store = make_store(reactor, f"https://127.0.0.1:{port.getHost().port}", "some-bucket")
        self.addCleanup(store.close)
        failure = await self.assertFailure(store.get("k"), errors.TLSVerificationError)
        self.assertIn("certificate", str(failure))
        self.assertEqual(seen, [])


class S3AuthTests(TestCase):
    """Against a moto that checks signatures and IAM policies: the roles of docs/operations.rst."""

    def setUp(self) -> None:
        self.moto = shared_auth_moto()

    def store(
        self, role: str | None = None, credentials: Credentials | None = None, prefix: str = "fs"
    ) -> S3ObjectStore:
        if credentials is None:
            credentials = self.moto.credentials[role]
        store = make_store(reactor, self.moto.endpoint, AUTH_BUCKET, prefix, credentials=credentials)
        self.addCleanup(store.close)
        return store

    async def test_signatures_accepted(self) -> None:
        """Signed requests pass moto's SigV4 check: odd characters, ranges, paginated listings."""
        client = self.store("client")
        for n in range(5):
            await client.put(f"ab12/chunks/sig-a=b-{n}", bytes([n]) * 10, create_only=True)
        self.assertEqual(await client.get_range("ab12/chunks/sig-a=b-3", 2, 3), b"\x03" * 3)
        client._list_page = 2
        listed = await client.list("ab12/chunks/sig-")
        self.assertEqual([info.key for info in listed], [f"ab12/chunks/sig-a=b-{n}" for n in range(5)])

    async def test_client_role(self) -> None:
        """A client puts and gets chunks, but may not delete them nor touch the metadata prefix."""
        client = self.store("client")
        await client.put("ab12/chunks/c1", b"sealed")
        self.assertEqual(await client.get("ab12/chunks/c1"), b"sealed")
        failure = await self.assertFailure(client.delete("ab12/chunks/c1"), errors.AccessDenied)
        self.assertIn("denied delete of 'ab12/chunks/c1'", str(failure))
        await self.assertFailure(client.put("demo/journal/1", b"forged"), errors.AccessDenied)

    async def test_metadata_and_gc_roles(self) -> None:
        """The metadata server writes under its prefix without deleting; the GC credential deletes."""
        meta = self.store("meta")
        await meta.put("demo/journal/seg-1", b"records", create_only=True)
        await meta.put("demo/snapshots/1.db.z", b"snapshot", create_only=True)
        await self.assertFailure(meta.put("ab12/chunks/c9", b"not its prefix"), errors.AccessDenied)
        await self.assertFailure(
            meta.put("demo/journal/seg-1", b"again", create_only=True), errors.AlreadyExists
        )
        await self.assertFailure(meta.delete("demo/journal/seg-1"), errors.AccessDenied)
        gc = self.store("gc")
        # Not delete_many: moto checks a batch delete against the bucket's ARN, AWS against each object's.
        await gc.delete("demo/journal/seg-1")
        await self.assertFailure(meta.get("demo/journal/seg-1"), errors.NotFound)

    async def test_bad_credentials(self) -> None:
        """A wrong secret and an unknown key both fail at once as AuthenticationFailed."""
        right = self.moto.credentials["client"]
        for credentials in [Credentials(right.access_key, "wrong"), Credentials("AKIDUNKNOWN", "x")]:
            failure = await self.assertFailure(
                self.store(credentials=credentials).get("ab12/chunks/x"), errors.AuthenticationFailed
            )
            self.assertIn("the object store refused the credentials", str(failure))
