"""
Tests for :mod:`lucidlink.tls` and ``lucid tls``.

The certificate tests look at the files written.  The handshake tests run a
whole TLS connection in memory (``TLSMemoryBIOFactory`` on both ends, bytes
moved by ``iosim``), with no sockets and no reactor, and check that each
kind of bad certificate fails with an explanation naming that problem.
"""

from __future__ import annotations

import argparse
import io
import ipaddress
import stat
from contextlib import redirect_stderr, redirect_stdout
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator, IOpenSSLServerConnectionCreator
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.protocols.tls import TLSMemoryBIOFactory, TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from twisted.test.iosim import connectedServerAndClient
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from lucidlink import tls
from lucidlink.cli.tls import add_tls_commands
from lucidlink.errors import AlreadyExists, InvalidArgument, NotFound, TLSVerificationError


def load_certificate(path: Path) -> x509.Certificate:
    """The single certificate in a PEM file."""
    return x509.load_pem_x509_certificate(path.read_bytes())


def permissions(path: Path) -> int:
    """The permission bits of a file, as in ``0o600``."""
    return stat.S_IMODE(path.stat().st_mode)


class CertificateAuthorityTests(SynchronousTestCase):
    """``init_ca`` writes a CA certificate and a private key nobody else can read."""

    def setUp(self) -> None:
        self.directory = Path(self.mktemp()) / "ca"

    def test_writes_certificate_and_key(self) -> None:
        """The CA certificate and key land in the directory under their fixed names."""
        cert_path, key_path = tls.init_ca(self.directory)
        self.assertEqual(cert_path, self.directory / "ca.pem")
        self.assertEqual(key_path, self.directory / "ca.key")
        self.assertTrue(cert_path.is_file())
        self.assertIn(b"PRIVATE KEY", key_path.read_bytes())

    def test_key_and_directory_are_private(self) -> None:
        """The key is mode 0600 and a directory made for it is mode 0700."""
        _, key_path = tls.init_ca(self.directory)
        self.assertEqual(permissions(key_path), 0o600)
        self.assertEqual(permissions(self.directory), 0o700)

    def test_is_a_certificate_authority(self) -> None:
        """The certificate may sign leaves (and only leaves), and identifies its key."""
        cert_path, _ = tls.init_ca(self.directory, common_name="test CA")
        certificate = load_certificate(cert_path)
        self.assertEqual(certificate.subject, certificate.issuer)
        self.assertEqual(certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, "test CA")
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints)
        self.assertTrue(constraints.critical)
        self.assertTrue(constraints.value.ca)
        self.assertEqual(constraints.value.path_length, 0)
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage)
        self.assertTrue(usage.critical)
        self.assertTrue(usage.value.key_cert_sign)
        self.assertTrue(usage.value.crl_sign)
        self.assertFalse(usage.value.digital_signature)
        certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        certificate.verify_directly_issued_by(certificate)

    def test_days(self) -> None:
        """``days`` sets how long the CA is valid."""
        cert_path, _ = tls.init_ca(self.directory, days=10)
        certificate = load_certificate(cert_path)
        self.assertEqual(
            certificate.not_valid_after_utc - certificate.not_valid_before_utc, timedelta(days=10)
        )

    def test_refuses_to_overwrite(self) -> None:
        """An existing CA is kept, and the error says which file and how to override."""
        cert_path, key_path = tls.init_ca(self.directory)
        before = (cert_path.read_bytes(), key_path.read_bytes())
        error = self.assertRaises(AlreadyExists, tls.init_ca, self.directory)
        self.assertIn(str(cert_path), str(error))
        self.assertIn("--force", str(error))
        self.assertEqual((cert_path.read_bytes(), key_path.read_bytes()), before)

    def test_refuses_when_only_the_key_exists(self) -> None:
        """A stray key alone is enough to refuse: it would be lost."""
        self.directory.mkdir(parents=True)
        (self.directory / "ca.key").write_bytes(b"precious")
        error = self.assertRaises(AlreadyExists, tls.init_ca, self.directory)
        self.assertIn("ca.key", str(error))

    def test_force_overwrites(self) -> None:
        """With ``force`` a new CA replaces the old one, and its key is still private."""
        cert_path, key_path = tls.init_ca(self.directory)
        key_path.chmod(0o644)
        before = key_path.read_bytes()
        tls.init_ca(self.directory, force=True)
        self.assertNotEqual(key_path.read_bytes(), before)
        self.assertEqual(permissions(key_path), 0o600)
        self.assertEqual(sorted(path.name for path in self.directory.iterdir()), ["ca.key", "ca.pem"])


class IssueCertificateTests(SynchronousTestCase):
    """``issue_certificate`` writes a leaf certificate signed by the CA."""

    def setUp(self) -> None:
        base = Path(self.mktemp())
        self.ca_directory = base / "ca"
        self.ca_cert_path, _ = tls.init_ca(self.ca_directory)
        self.prefix = base / "out" / "server"

    def issue(self, *names: str, **options: object) -> x509.Certificate:
        """Issue a certificate for ``names`` and load it back."""
        cert_path, _ = tls.issue_certificate(self.ca_directory, names, self.prefix, **options)  # type: ignore[arg-type]
        return load_certificate(cert_path)

    def test_writes_leaf_and_private_key(self) -> None:
        """``PREFIX.pem`` holds the one leaf certificate; ``PREFIX.key`` is mode 0600."""
        cert_path, key_path = tls.issue_certificate(self.ca_directory, ["server.test"], self.prefix)
        self.assertEqual(cert_path, self.prefix.parent / "server.pem")
        self.assertEqual(key_path, self.prefix.parent / "server.key")
        self.assertEqual(len(x509.load_pem_x509_certificates(cert_path.read_bytes())), 1)
        self.assertEqual(permissions(key_path), 0o600)

    def test_prefix_with_dots(self) -> None:
        """A prefix such as ``meta.example`` gains ``.pem``; nothing is cut off."""
        prefix = self.prefix.parent / "meta.example"
        cert_path, key_path = tls.issue_certificate(self.ca_directory, ["meta.example"], prefix)
        self.assertEqual(cert_path.name, "meta.example.pem")
        self.assertEqual(key_path.name, "meta.example.key")

    def test_names(self) -> None:
        """DNS names and IP addresses become subjectAltNames; the first name is the CN."""
        certificate = self.issue("server.test", "127.0.0.1", "::1", "other.test")
        alternative_names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(alternative_names.get_values_for_type(x509.DNSName), ["server.test", "other.test"])
        self.assertEqual(
            alternative_names.get_values_for_type(x509.IPAddress),
            [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")],
        )
        self.assertEqual(
            certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, "server.test"
        )

    def test_usage(self) -> None:
        """The leaf serves as server and client, is no CA, and points at the CA's key."""
        certificate = self.issue("server.test")
        usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        self.assertEqual(list(usage), [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
        self.assertFalse(certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
        authority = certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
        ca_key_identifier = (
            load_certificate(self.ca_cert_path)
            .extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
            .value
        )
        self.assertEqual(authority.key_identifier, ca_key_identifier.digest)

    def test_signed_by_the_ca(self) -> None:
        """The leaf verifies against its CA and not against another."""
        certificate = self.issue("server.test")
        certificate.verify_directly_issued_by(load_certificate(self.ca_cert_path))
        other_ca_path, _ = tls.init_ca(Path(self.mktemp()))
        self.assertRaises(
            InvalidSignature, certificate.verify_directly_issued_by, load_certificate(other_ca_path)
        )

    def test_validity(self) -> None:
        """By default the leaf is valid from a few minutes ago for ``days`` days."""
        certificate = self.issue("server.test", days=30)
        now = datetime.now(UTC)
        self.assertLess(certificate.not_valid_before_utc, now)
        self.assertGreater(certificate.not_valid_before_utc, now - timedelta(hours=1))
        self.assertEqual(
            certificate.not_valid_after_utc - certificate.not_valid_before_utc, timedelta(days=30)
        )

    def test_expired(self) -> None:
        """``not_after`` in the past makes an already expired certificate."""
        not_after = datetime(2020, 1, 1, tzinfo=UTC)
        certificate = self.issue("server.test", not_after=not_after)
        self.assertEqual(certificate.not_valid_after_utc, not_after)
        self.assertLess(certificate.not_valid_before_utc, not_after)

    def test_explicit_period(self) -> None:
        """``not_before`` and ``not_after`` together set the period exactly."""
        not_before = datetime(2030, 1, 1, tzinfo=UTC)
        not_after = datetime(2031, 1, 1, tzinfo=UTC)
        certificate = self.issue("server.test", not_before=not_before, not_after=not_after)
        self.assertEqual(certificate.not_valid_before_utc, not_before)
        self.assertEqual(certificate.not_valid_after_utc, not_after)

    def test_empty_period(self) -> None:
        """A period that ends before it starts is refused."""
        moment = datetime(2030, 1, 1, tzinfo=UTC)
        self.assertRaises(InvalidArgument, self.issue, "server.test", not_before=moment, not_after=moment)

    def test_needs_a_name(self) -> None:
        """A certificate without names is refused."""
        self.assertRaises(InvalidArgument, tls.issue_certificate, self.ca_directory, [], self.prefix)

    def test_refuses_to_overwrite(self) -> None:
        """Existing output is kept unless forced; forcing replaces it."""
        cert_path, _ = tls.issue_certificate(self.ca_directory, ["server.test"], self.prefix)
        before = cert_path.read_bytes()
        error = self.assertRaises(
            AlreadyExists, tls.issue_certificate, self.ca_directory, ["server.test"], self.prefix
        )
        self.assertIn(str(cert_path), str(error))
        self.assertIn("--force", str(error))
        self.assertEqual(cert_path.read_bytes(), before)
        tls.issue_certificate(self.ca_directory, ["server.test"], self.prefix, force=True)
        self.assertNotEqual(cert_path.read_bytes(), before)

    def test_missing_ca(self) -> None:
        """Without a CA the error is NotFound, naming the file it looked for."""
        missing = Path(self.mktemp())
        error = self.assertRaises(NotFound, tls.issue_certificate, missing, ["server.test"], self.prefix)
        self.assertIn(str(missing / "ca.pem"), str(error))
        self.assertFalse(self.prefix.parent.exists())

    def test_missing_ca_key(self) -> None:
        """A CA certificate without its key is NotFound too, naming the key."""
        (self.ca_directory / "ca.key").unlink()
        error = self.assertRaises(
            NotFound, tls.issue_certificate, self.ca_directory, ["server.test"], self.prefix
        )
        self.assertIn(str(self.ca_directory / "ca.key"), str(error))


class Peer(Protocol):
    """One end of an in-memory connection: records what arrived and how it ended."""

    def __init__(self) -> None:
        self.received = b""
        self.lost_reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost_reason = reason


@implementer(IOpenSSLServerConnectionCreator)
class ClientCertificateRequiringServer:
    """A test server that insists on a client certificate signed by ``client_ca_file``."""

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path) -> None:
        self._context = SSL.Context(SSL.TLS_SERVER_METHOD)
        self._context.use_certificate_chain_file(str(cert_file))
        self._context.use_privatekey_file(str(key_file))
        self._context.load_verify_locations(str(client_ca_file))
        self._context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)

    def serverConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        return SSL.Connection(self._context, None)


class Connection:
    """Both ends of a TLS connection run in memory, after a ping and a pong."""

    def __init__(
        self,
        client_creator: IOpenSSLClientConnectionCreator,
        server_creator: IOpenSSLServerConnectionCreator,
    ) -> None:
        clock = Clock()
        self.client = Peer()
        self.server = Peer()
        client_factory = TLSMemoryBIOFactory(
            client_creator,
            isClient=True,
            wrappedFactory=Factory.forProtocol(lambda: self.client),
            clock=clock,
        )
        server_factory = TLSMemoryBIOFactory(
            server_creator,
            isClient=False,
            wrappedFactory=Factory.forProtocol(lambda: self.server),
            clock=clock,
        )
        self.client_tls: TLSMemoryBIOProtocol
        self.server_tls: TLSMemoryBIOProtocol
        self.client_tls, self.server_tls, self.pump = connectedServerAndClient(
            lambda: server_factory.buildProtocol(None),
            lambda: client_factory.buildProtocol(None),
            greet=False,
            clock=clock,
        )
        self.pump.flush()
        self.client_tls.write(b"ping")
        self.server_tls.write(b"pong")
        self.pump.flush()


class HandshakeTests(SynchronousTestCase):
    """Good certificates connect; each kind of bad one fails and is explained."""

    def setUp(self) -> None:
        self.base = Path(self.mktemp())
        self.ca_cert_path, _ = tls.init_ca(self.base / "ca")
        tls.init_ca(self.base / "other-ca")

    def issue(self, prefix: str, *names: str, ca: str = "ca", **options: object) -> tuple[Path, Path]:
        """Issue a certificate from the CA called ``ca``."""
        return tls.issue_certificate(self.base / ca, names, self.base / prefix, **options)  # type: ignore[arg-type]

    def connect(
        self, cert_and_key: tuple[Path, Path], identity: str, **client_options: Path
    ) -> tuple[Connection, tls.PrivateCAClientTLS]:
        """Connect a client expecting ``identity`` to a server with this certificate."""
        creator = tls.client_tls_options(self.ca_cert_path, identity, **client_options)
        return Connection(creator, tls.server_tls_options(*cert_and_key)), creator

    def assertRefused(self, connection: Connection, creator: tls.PrivateCAClientTLS) -> str:
        """Nothing got through, and the failure is explained; return the explanation."""
        self.assertEqual(connection.server.received, b"")
        self.assertEqual(connection.client.received, b"")
        assert connection.client.lost_reason is not None
        explanation = tls.explain_tls_failure(connection.client.lost_reason, creator)
        self.assertIsInstance(explanation, TLSVerificationError)
        return str(explanation)

    def test_creator_interface(self) -> None:
        """The client settings provide Twisted's client connection creator interface."""
        creator = tls.client_tls_options(self.ca_cert_path, "server.test")
        self.assertTrue(verifyObject(IOpenSSLClientConnectionCreator, creator))

    def test_good_certificate(self) -> None:
        """A certificate from the trusted CA naming the server connects, over TLS 1.3."""
        connection, creator = self.connect(self.issue("server", "server.test"), "server.test")
        self.assertEqual(connection.server.received, b"ping")
        self.assertEqual(connection.client.received, b"pong")
        self.assertIsNone(connection.client.lost_reason)
        self.assertEqual(connection.client_tls.getHandle().get_protocol_version_name(), "TLSv1.3")
        self.assertEqual(connection.server_tls.getHandle().get_servername(), b"server.test")
        self.assertIsNone(creator.last_chain_problem)

    def test_context_shared_until_the_ca_file_changes(self) -> None:
        """Clients of one CA file share one TLS context; a CA file rewritten (rotated) is read again."""
        signed_by_old = self.issue("server-old", "server.test")
        signed_by_new = self.issue("server-new", "server.test", ca="other-ca")
        first = tls.client_tls_options(self.ca_cert_path, "server.test")
        second = tls.client_tls_options(self.ca_cert_path, "other.test")
        self.assertIs(first._context, second._context)
        self.ca_cert_path.write_bytes((self.base / "other-ca" / "ca.pem").read_bytes())
        rotated = tls.client_tls_options(self.ca_cert_path, "server.test")
        self.assertIsNot(rotated._context, first._context)
        connection, creator = self.connect(signed_by_new, "server.test")
        self.assertEqual(connection.client.received, b"pong", "the new CA is the one trusted")
        self.assertIsNone(creator.last_chain_problem)
        connection, creator = self.connect(signed_by_old, "server.test")
        self.assertIn("not signed by", self.assertRefused(connection, creator), "the old CA is trusted no more")

    def test_ip_address(self) -> None:
        """A server reached by IP address is matched against the IP subjectAltName."""
        connection, _ = self.connect(self.issue("server", "server.test", "127.0.0.1"), "127.0.0.1")
        self.assertEqual(connection.client.received, b"pong")
        self.assertIsNone(connection.server_tls.getHandle().get_servername())

    def test_clean_close_is_not_explained(self) -> None:
        """A connection that ends normally has nothing to explain."""
        connection, creator = self.connect(self.issue("server", "server.test"), "server.test")
        connection.client_tls.loseConnection()
        connection.pump.flush()
        assert connection.client.lost_reason is not None
        self.assertIsNone(tls.explain_tls_failure(connection.client.lost_reason, creator))

    def test_other_failures_are_not_explained(self) -> None:
        """Reasons that have nothing to do with certificates give None."""
        creator = tls.client_tls_options(self.ca_cert_path, "server.test")
        self.assertIsNone(tls.explain_tls_failure(Failure(ConnectionDone()), creator))
        no_shared_cipher = SSL.Error([("SSL routines", "", "no shared cipher")])
        self.assertIsNone(tls.explain_tls_failure(Failure(no_shared_cipher), creator))

    def test_wrong_identity(self) -> None:
        """A certificate for another name fails, naming what was expected and what it carries."""
        connection, creator = self.connect(self.issue("server", "server.test", "10.0.0.1"), "meta.test")
        explanation = self.assertRefused(connection, creator)
        self.assertIn("identity", explanation)
        self.assertIn("meta.test", explanation)
        self.assertIn("server.test", explanation)
        self.assertIn("10.0.0.1", explanation)

    def test_wrong_ip_address(self) -> None:
        """An IP address the certificate does not carry fails the same way."""
        connection, creator = self.connect(self.issue("server", "server.test", "127.0.0.1"), "127.0.0.2")
        explanation = self.assertRefused(connection, creator)
        self.assertIn("identity", explanation)
        self.assertIn("127.0.0.2", explanation)

    def test_untrusted_ca(self) -> None:
        """A certificate from another CA fails, naming the trusted CA file."""
        connection, creator = self.connect(self.issue("server", "server.test", ca="other-ca"), "server.test")
        explanation = self.assertRefused(connection, creator)
        self.assertIn("not signed by", explanation)
        self.assertIn(str(self.ca_cert_path), explanation)
        assert creator.last_chain_problem is not None
        self.assertEqual(creator.last_chain_problem.errno, tls.X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY)

    def test_untrusted_chain(self) -> None:
        """A server that sends its own CA along does not make that CA trusted."""
        cert_path, key_path = self.issue("server", "server.test", ca="other-ca")
        with cert_path.open("ab") as chain:
            chain.write((self.base / "other-ca" / "ca.pem").read_bytes())
        connection, creator = self.connect((cert_path, key_path), "server.test")
        explanation = self.assertRefused(connection, creator)
        self.assertIn("not signed by", explanation)
        self.assertIn("chain", explanation)
        assert creator.last_chain_problem is not None
        self.assertEqual(creator.last_chain_problem.errno, tls.X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN)

    def test_self_signed(self) -> None:
        """A self-signed server certificate fails as not signed by the trusted CA."""
        other_ca = self.base / "other-ca"
        connection, creator = self.connect((other_ca / "ca.pem", other_ca / "ca.key"), "server.test")
        explanation = self.assertRefused(connection, creator)
        self.assertIn("self-signed", explanation)
        self.assertIn("not signed by", explanation)

    def test_expired(self) -> None:
        """An expired certificate fails, and the explanation gives its notAfter."""
        not_after = datetime.now(UTC).replace(microsecond=0) - timedelta(days=2)
        connection, creator = self.connect(
            self.issue("server", "server.test", not_after=not_after), "server.test"
        )
        explanation = self.assertRefused(connection, creator)
        self.assertIn("expired", explanation)
        self.assertIn(not_after.strftime("%Y-%m-%d %H:%M:%S"), explanation)

    def test_not_yet_valid(self) -> None:
        """A certificate from the future fails, and the explanation gives its notBefore."""
        not_before = datetime.now(UTC).replace(microsecond=0) + timedelta(days=2)
        connection, creator = self.connect(
            self.issue(
                "server", "server.test", not_before=not_before, not_after=not_before + timedelta(days=1)
            ),
            "server.test",
        )
        explanation = self.assertRefused(connection, creator)
        self.assertIn("not yet valid", explanation)
        self.assertIn(not_before.strftime("%Y-%m-%d %H:%M:%S"), explanation)

    def test_client_certificate(self) -> None:
        """A client certificate is presented to a server that asks for one."""
        server_cert, server_key = self.issue("server", "server.test")
        client_cert, client_key = self.issue("client", "client.test")
        creator = tls.client_tls_options(
            self.ca_cert_path, "server.test", client_cert=client_cert, client_key=client_key
        )
        connection = Connection(
            creator, ClientCertificateRequiringServer(server_cert, server_key, self.ca_cert_path)
        )
        self.assertEqual(connection.client.received, b"pong")
        peer = connection.server_tls.getHandle().get_peer_certificate(as_cryptography=True)
        self.assertEqual(peer.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value, "client.test")

    def test_client_certificate_refused(self) -> None:
        """A server that rejects the client's certificate is explained as such."""
        server_cert, server_key = self.issue("server", "server.test")
        client_cert, client_key = self.issue("client", "client.test", ca="other-ca")
        creator = tls.client_tls_options(
            self.ca_cert_path, "server.test", client_cert=client_cert, client_key=client_key
        )
        connection = Connection(
            creator, ClientCertificateRequiringServer(server_cert, server_key, self.ca_cert_path)
        )
        explanation = self.assertRefused(connection, creator)
        self.assertIn("did not accept this client's certificate", explanation)

    def test_client_certificate_without_key(self) -> None:
        """A client certificate without its key is refused up front."""
        client_cert, _ = self.issue("client", "client.test")
        self.assertRaises(
            InvalidArgument,
            tls.client_tls_options,
            self.ca_cert_path,
            "server.test",
            client_cert=client_cert,
        )

    def test_missing_files(self) -> None:
        """Missing CA, certificate or key files are NotFound, naming the file."""
        missing = self.base / "missing.pem"
        error = self.assertRaises(NotFound, tls.client_tls_options, missing, "server.test")
        self.assertIn(str(missing), str(error))
        cert_path, key_path = self.issue("server", "server.test")
        error = self.assertRaises(NotFound, tls.server_tls_options, missing, key_path)
        self.assertIn(str(missing), str(error))
        error = self.assertRaises(NotFound, tls.server_tls_options, cert_path, missing)
        self.assertIn(str(missing), str(error))


class CommandLineTests(SynchronousTestCase):
    """``lucid tls init-ca`` and ``lucid tls issue`` write files and say so."""

    def setUp(self) -> None:
        self.parser = argparse.ArgumentParser(prog="lucid")
        add_tls_commands(self.parser.add_subparsers(dest="command", required=True))
        self.base = Path(self.mktemp())

    def run_command(self, *argv: str) -> tuple[int, str]:
        """Parse and run one command line; return its exit code and output."""
        args = self.parser.parse_args(list(argv))
        output = io.StringIO()
        with redirect_stdout(output):
            exit_code = args.func(args)
        return exit_code, output.getvalue()

    def test_init_ca_and_issue(self) -> None:
        """Both commands succeed, print one line naming what they wrote, and chain up."""
        ca = self.base / "ca"
        exit_code, output = self.run_command("tls", "init-ca", str(ca), "--days", "30")
        self.assertEqual(exit_code, 0)
        self.assertEqual(output.count("\n"), 1)
        self.assertIn(str(ca / "ca.pem"), output)
        self.assertIn(str(ca / "ca.key"), output)

        prefix = self.base / "meta"
        exit_code, output = self.run_command(
            "tls",
            "issue",
            "--ca",
            str(ca),
            "--name",
            "meta.test",
            "--name",
            "127.0.0.1",
            "--out",
            str(prefix),
        )
        self.assertEqual(exit_code, 0)
        self.assertEqual(output.count("\n"), 1)
        self.assertIn(str(self.base / "meta.pem"), output)
        certificate = load_certificate(self.base / "meta.pem")
        certificate.verify_directly_issued_by(load_certificate(ca / "ca.pem"))
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        self.assertEqual(names.get_values_for_type(x509.DNSName), ["meta.test"])

    def test_errors_are_raised(self) -> None:
        """Errors go up as LucidErrors for the top-level command to print; --force overrides."""
        ca = str(self.base / "ca")
        self.run_command("tls", "init-ca", ca)
        self.assertRaises(AlreadyExists, self.run_command, "tls", "init-ca", ca)
        exit_code, _ = self.run_command("tls", "init-ca", ca, "--force")
        self.assertEqual(exit_code, 0)
        self.assertRaises(
            NotFound,
            self.run_command,
            "tls",
            "issue",
            "--ca",
            str(self.base / "nowhere"),
            "--name",
            "x.test",
            "--out",
            str(self.base / "x"),
        )

    def test_issue_needs_a_name(self) -> None:
        """``--name`` is required."""
        with redirect_stderr(io.StringIO()), self.assertRaises(SystemExit):
            self.parser.parse_args(["tls", "issue", "--ca", "ca", "--out", "x"])
