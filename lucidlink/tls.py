"""
Certificates for a private CA, and the TLS settings lucidlink speaks with.

Every lucidlink service is reached over TLS 1.2 or newer, and a client trusts
exactly one certificate authority: the private CA made by :func:`init_ca`,
whose leaf certificates :func:`issue_certificate` writes.  Servers use
:func:`server_tls_options`; clients use :func:`client_tls_options`, which
checks both the certificate chain and the server's identity.

A failed handshake should say which problem it was.  The client's connection
creator remembers what OpenSSL first objected to, and
:func:`explain_tls_failure` turns the ``connectionLost`` reason into a
:class:`~lucidlink.errors.TLSVerificationError` that says whether the
certificate expired, is not yet valid, was not signed by the trusted CA, or
names a different server.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import (
    CertificateIssuerPrivateKeyTypes,
)
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from OpenSSL import SSL, crypto
from service_identity import CertificateError, VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import CertificateOptions, TLSVersion
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from lucidlink.errors import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    TLSVerificationError,
)

if TYPE_CHECKING:
    from twisted.protocols.tls import TLSMemoryBIOProtocol

_log = Logger()

CA_CERT_NAME = "ca.pem"
CA_KEY_NAME = "ca.key"

# A freshly issued certificate is dated a little in the past so that a peer
# whose clock runs slightly behind still accepts it.
CLOCK_SKEW_ALLOWANCE = timedelta(minutes=5)

# RFC 5280's upper bound for a commonName.
MAX_COMMON_NAME_LENGTH = 64

# OpenSSL's X509_V_ERR_* codes that we explain in words.
X509_V_ERR_CERT_NOT_YET_VALID = 9
X509_V_ERR_CERT_HAS_EXPIRED = 10
X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT = 18
X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN = 19
X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY = 20
X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE = 21


# ---------------------------------------------------------------------------
# Writing certificates and keys


def init_ca(
    directory: Path,
    *,
    common_name: str = "lucidlink private CA",
    days: int = 3650,
    force: bool = False,
) -> tuple[Path, Path]:
    """
    Create a private CA: ``directory/ca.pem`` and ``directory/ca.key``.

    The key is an ECDSA P-256 key readable by its owner alone, and the
    directory is created with mode 0700 when it does not exist.  Existing
    files are kept unless ``force`` is true.

    :return: the certificate path and the key path.
    :raise AlreadyExists: if either file exists and ``force`` is false.
    """
    cert_path = directory / CA_CERT_NAME
    key_path = directory / CA_KEY_NAME
    if not force:
        _refuse_to_overwrite(cert_path, key_path)
    if days <= 0:
        raise InvalidArgument(f"a CA must be valid for at least one day, not {days}")

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    not_before = datetime.now(UTC) - CLOCK_SKEW_ALLOWANCE
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_before + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            _key_usage(key_cert_sign=True, crl_sign=True),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )

    _make_private_directory(directory)
    _write_file(key_path, _private_key_pem(key), private=True)
    _write_file(cert_path, certificate.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def issue_certificate(
    ca_directory: Path,
    names: Sequence[str],
    out_prefix: Path,
    *,
    days: int = 825,
    not_before: datetime | None = None,
    not_after: datetime | None = None,
    force: bool = False,
) -> tuple[Path, Path]:
    """
    Issue a certificate for ``names``, signed by the CA in ``ca_directory``.

    Writes ``PREFIX.pem`` (the leaf certificate alone) and ``PREFIX.key``
    (mode 0600; a missing directory is made with mode 0700).  Each name
    becomes a subjectAltName entry: an IPAddress when it parses as an IP
    address, a DNSName otherwise; the first name is also the common name.
    The certificate serves both as a server and as a client certificate.

    ``not_before`` and ``not_after`` override the validity period, which
    otherwise starts a few minutes ago and lasts ``days`` days; tests use them
    to make certificates that are expired or not yet valid.

    :return: the certificate path and the key path.
    :raise NotFound: if the CA certificate or key is missing.
    :raise AlreadyExists: if an output file exists and ``force`` is false.
    :raise InvalidArgument: if no names are given or the period is empty.
    """
    if not names:
        raise InvalidArgument("a certificate needs at least one name")
    if len(names[0]) > MAX_COMMON_NAME_LENGTH:
        raise InvalidArgument(
            f"the first name becomes the common name, which holds at most"
            f" {MAX_COMMON_NAME_LENGTH} characters; put a shorter name first"
        )
    cert_path = _with_suffix_appended(out_prefix, ".pem")
    key_path = _with_suffix_appended(out_prefix, ".key")
    ca_certificate, ca_key = _load_ca(ca_directory)
    if not force:
        _refuse_to_overwrite(cert_path, key_path)
    not_before, not_after = _validity_period(days, not_before, not_after)

    key = ec.generate_private_key(ec.SECP256R1())
    certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.SubjectAlternativeName([_general_name(name) for name in names]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
            critical=False,
        )
        .add_extension(
            _authority_key_identifier(ca_certificate),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )

    _make_private_directory(cert_path.parent)
    _write_file(key_path, _private_key_pem(key), private=True)
    _write_file(cert_path, certificate.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def _refuse_to_overwrite(*paths: Path) -> None:
    for path in paths:
        if path.exists():
            raise AlreadyExists(f"{path} already exists; use --force to overwrite it")


def _make_private_directory(directory: Path) -> None:
    if not directory.is_dir():
        directory.mkdir(mode=0o700, parents=True)


def _write_file(path: Path, data: bytes, *, private: bool = False) -> None:
    """
    Replace ``path`` with ``data`` in one step.

    The bytes go to a new file beside it, created with the final mode (0600
    for a private file), which is then renamed over ``path``: a key is never
    readable by others, not even for a moment, and a crash never leaves half
    a file.
    """
    mode = 0o600 if private else 0o644
    temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(data)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _with_suffix_appended(prefix: Path, suffix: str) -> Path:
    # Not Path.with_suffix: "server.example" must become "server.example.pem".
    return prefix.with_name(prefix.name + suffix)


def _authority_key_identifier(ca_certificate: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ca_key_identifier = ca_certificate.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    except x509.ExtensionNotFound:
        # A CA made elsewhere may lack one; derive it the same way.
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_certificate.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_key_identifier.value)


def _key_usage(
    *,
    digital_signature: bool = False,
    key_cert_sign: bool = False,
    crl_sign: bool = False,
) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=key_cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _general_name(name: str) -> x509.GeneralName:
    address = _parse_ip_address(name)
    if address is not None:
        return x509.IPAddress(address)
    try:
        return x509.DNSName(_dns_name_ascii(name))
    except (UnicodeError, ValueError) as error:
        raise InvalidArgument(f"{name!r} is neither a DNS name nor an IP address: {error}") from None


def _parse_ip_address(
    name: str,
) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def _validity_period(
    days: int, not_before: datetime | None, not_after: datetime | None
) -> tuple[datetime, datetime]:
    if not_before is None:
        not_before = datetime.now(UTC) - CLOCK_SKEW_ALLOWANCE
        if not_after is not None and not_after <= not_before:
            # Asked for a certificate that has already expired.
            not_before = not_after - timedelta(days=days)
    if not_after is None:
        not_after = not_before + timedelta(days=days)
    if not_after <= not_before:
        raise InvalidArgument(
            f"the certificate would be valid from {not_before} until {not_after}, which is no time at all"
        )
    return not_before, not_after


def _load_ca(
    ca_directory: Path,
) -> tuple[x509.Certificate, CertificateIssuerPrivateKeyTypes]:
    cert_path = ca_directory / CA_CERT_NAME
    key_path = ca_directory / CA_KEY_NAME
    certificate = x509.load_pem_x509_certificate(_read_file(cert_path, "CA certificate"))
    key = serialization.load_pem_private_key(_read_file(key_path, "CA private key"), password=None)
    if not isinstance(key, CertificateIssuerPrivateKeyTypes):
        raise InvalidArgument(f"{key_path} holds a key that cannot sign certificates")
    return certificate, key


def _read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise NotFound(f"no {what} at {path}") from None


# ---------------------------------------------------------------------------
# Server side


def server_tls_options(cert_file: Path, key_file: Path) -> CertificateOptions:
    """
    TLS settings for a server presenting the certificate in ``cert_file``.

    Accepts TLS 1.2 and newer; OpenSSL negotiates TLS 1.3 whenever the client
    offers it.  Certificates after the first in ``cert_file`` are sent as the
    rest of the chain.

    :raise NotFound: if either file is missing.
    """
    certificates = x509.load_pem_x509_certificates(_read_file(cert_file, "certificate"))
    key = serialization.load_pem_private_key(_read_file(key_file, "private key"), password=None)
    # CertificateOptions is annotated with pyOpenSSL's X509 and PKey, but it
    # only hands them to Context.use_certificate and use_privatekey, which
    # take cryptography's objects too; pyOpenSSL deprecates its own.
    return CertificateOptions(
        privateKey=key,  # type: ignore[arg-type]
        certificate=certificates[0],  # type: ignore[arg-type]
        extraCertChain=certificates[1:],  # type: ignore[arg-type]
        raiseMinimumTo=TLSVersion.TLSv1_2,
    )


# ---------------------------------------------------------------------------
# Client side


@dataclass(frozen=True)
class ChainProblem:
    """The first objection OpenSSL raised against the server's certificate chain."""

    errno: int
    """OpenSSL's ``X509_V_ERR_*`` code."""
    depth: int
    """Where in the chain: 0 is the server's own certificate."""
    subject: str
    """The subject of the certificate objected to, as an RFC 4514 string."""
    not_before: datetime
    not_after: datetime

    @classmethod
    def from_verify_callback(cls, certificate: crypto.X509, errno: int, depth: int) -> ChainProblem:
        """Record what OpenSSL's verify callback was given."""
        parsed = certificate.to_cryptography()
        return cls(
            errno=errno,
            depth=depth,
            subject=parsed.subject.rfc4514_string(),
            not_before=parsed.not_valid_before_utc,
            not_after=parsed.not_valid_after_utc,
        )

    def describe(self, server: str, ca_file: Path) -> str:
        """Say in words what is wrong, for a server reached as ``server``."""
        if self.depth == 0:
            which = f"the certificate of the server at {server} ({self.subject})"
        else:
            which = f"the certificate {self.subject} in the chain of the server at {server}"
        if self.errno == X509_V_ERR_CERT_HAS_EXPIRED:
            return f"{which} has expired: it was valid until {_when(self.not_after)}"
        if self.errno == X509_V_ERR_CERT_NOT_YET_VALID:
            return f"{which} is not yet valid: it is valid from {_when(self.not_before)}; check the clocks"
        not_signed = f"is not signed by the trusted CA in {ca_file}"
        if self.errno == X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT:
            return f"{which} is self-signed, so it {not_signed}"
        if self.errno == X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN:
            return f"{which} {not_signed}: the chain ends in a different self-signed CA"
        if self.errno == X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY:
            return f"{which} {not_signed}: its issuer is unknown"
        if self.errno == X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE:
            return f"{which} {not_signed}: its signature cannot be verified"
        return f"{which} was rejected: verification error {self.errno}"


@implementer(IOpenSSLClientConnectionCreator)
class PrivateCAClientTLS:
    """
    Client TLS settings that trust one CA file and expect one server identity.

    Modelled on Twisted's ``ClientTLSOptions``: the chain is verified by
    OpenSSL against ``ca_file`` only, and the identity is checked against the
    server's own certificate in the verify callback, so a server with the
    wrong name fails the handshake before any application data flows.

    Build it with :func:`client_tls_options`.  One object serves the
    connections to one server, one after another (as a ``ClientService``
    makes them): :attr:`last_chain_problem` belongs to the latest handshake.
    """

    def __init__(
        self,
        ca_file: Path,
        expected_identity: str,
        *,
        client_cert: Path | None = None,
        client_key: Path | None = None,
    ) -> None:
        self.ca_file = ca_file
        self.expected_identity = expected_identity
        self._identity_is_ip_address = _parse_ip_address(expected_identity) is not None
        self.last_chain_problem: ChainProblem | None = None
        if (client_cert is None) != (client_key is None):
            raise InvalidArgument("give both a client certificate and its key, or neither")
        _require_file(ca_file, "CA certificate")
        files = [ca_file]
        if client_cert is not None and client_key is not None:
            _require_file(client_cert, "client certificate")
            _require_file(client_key, "client private key")
            files += [client_cert, client_key]
        # Contexts are shared: making one (reading and parsing the CA) costs
        # more than a handshake.  A file that changes makes a new one.
        self._context = _client_context(tuple((str(path), _file_version(path)) for path in files))

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        """Make the OpenSSL connection for one handshake with the server."""
        self.last_chain_problem = None
        connection = SSL.Connection(self._context, None)
        if not self._identity_is_ip_address:
            # RFC 6066 forbids IP addresses in SNI.
            connection.set_tlsext_host_name(_dns_name_ascii(self.expected_identity).encode("ascii"))
        connection.set_verify(
            SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
            self._verify_callback(tlsProtocol),
        )
        return connection

    def _verify_callback(
        self, tlsProtocol: TLSMemoryBIOProtocol
    ) -> Callable[[SSL.Connection, crypto.X509, int, int, int], bool]:

        def verify(
            connection: SSL.Connection,
            certificate: crypto.X509,
            errno: int,
            depth: int,
            ok: int,
        ) -> bool:
            try:
                if not ok:
                    # Returning False ends the handshake, so this is the
                    # first problem; OpenSSL's alert tells the server why.
                    self.last_chain_problem = ChainProblem.from_verify_callback(certificate, errno, depth)
                    return False
                if depth != 0:
                    return True
                mismatch = self._identity_mismatch(certificate.to_cryptography())
                if mismatch is None:
                    return True
                tlsProtocol.failVerification(Failure(mismatch))
                return False
            except BaseException:
                # An exception escaping an OpenSSL callback would surface from
                # do_handshake as something Twisted does not expect; log it.
                _log.failure("while verifying the server's certificate")
                return False

        return verify

    def _identity_mismatch(self, certificate: x509.Certificate) -> TLSVerificationError | None:
        try:
            if self._identity_is_ip_address:
                verify_certificate_ip_address(certificate, self.expected_identity)
            else:
                verify_certificate_hostname(certificate, _dns_name_ascii(self.expected_identity))
        except (VerificationError, CertificateError):
            names = _names_in(certificate)
            carried = ", ".join(names) if names else "no subjectAltName names at all"
            return TLSVerificationError(
                f"the server's identity did not match: expected"
                f" {self.expected_identity!r}, but its certificate carries {carried}"
            )
        return None


def _file_version(path: Path) -> tuple[int, int, int]:
    status = os.stat(path)
    return status.st_ino, status.st_size, status.st_mtime_ns


@functools.lru_cache(maxsize=32)
def _client_context(files: tuple[tuple[str, tuple[int, int, int]], ...]) -> SSL.Context:
    """A client context trusting the CA file ``files[0]``, presenting ``files[1:]`` (certificate, key) if given."""
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_min_proto_version(SSL.TLS1_2_VERSION)
    context.set_options(SSL.OP_NO_COMPRESSION)
    # Only this file: no call to set_default_verify_paths.
    context.load_verify_locations(files[0][0])
    if len(files) == 3:
        context.use_certificate_chain_file(files[1][0])
        context.use_privatekey_file(files[2][0])
        context.check_privatekey()
    context.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    return context


def client_tls_options(
    ca_file: Path,
    expected_identity: str,
    *,
    client_cert: Path | None = None,
    client_key: Path | None = None,
) -> PrivateCAClientTLS:
    """
    TLS settings for a client of a lucidlink service.

    The server must present a certificate signed by the CA in ``ca_file``
    (and no other) that names ``expected_identity``, a DNS name or an IP
    address.  ``client_cert`` and ``client_key``, given together, are
    presented to servers that ask for a client certificate.

    :raise NotFound: if a named file is missing.
    :raise InvalidArgument: if only one of ``client_cert`` and ``client_key``
        is given.
    """
    return PrivateCAClientTLS(ca_file, expected_identity, client_cert=client_cert, client_key=client_key)


def explain_tls_failure(reason: Failure, creator: PrivateCAClientTLS) -> TLSVerificationError | None:
    """
    Say why a handshake made with ``creator`` failed, if it was verification.

    ``reason`` is what the client protocol's ``connectionLost`` received.
    The result names the problem: an expired or not yet valid certificate,
    one not signed by the trusted CA, or a server identity that did not
    match.  A server that refused this client's certificate is explained too.

    :return: the explanation, or ``None`` if ``reason`` is not about
        certificate verification.
    """
    if reason.check(TLSVerificationError):
        error = reason.value
        assert isinstance(error, TLSVerificationError)
        return error
    if not reason.check(SSL.Error):
        return None
    server = creator.expected_identity
    openssl_reasons = _openssl_reasons(reason.value)
    if "certificate verify failed" in openssl_reasons:
        problem = creator.last_chain_problem
        if problem is None:
            return TLSVerificationError(
                f"the certificate of the server at {server} was not accepted"
                f" (checked against the CA in {creator.ca_file})"
            )
        return TLSVerificationError(problem.describe(server, creator.ca_file))
    for text in openssl_reasons:
        if "alert" in text and ("certificate" in text or "unknown ca" in text):
            return TLSVerificationError(
                f"the server at {server} did not accept this client's certificate ({text})"
            )
    return None


def _names_in(certificate: x509.Certificate) -> list[str]:
    try:
        alternative_names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return [str(name.value) for name in alternative_names]


def _openssl_reasons(error: BaseException) -> list[str]:
    """The reason strings in an ``OpenSSL.SSL.Error``, lower-cased."""
    reasons: list[str] = []
    for entry in error.args[0] if error.args else ():
        if isinstance(entry, tuple) and entry:
            reasons.append(str(entry[-1]).lower())
        else:
            reasons.append(str(entry).lower())
    return reasons


def _when(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _dns_name_ascii(name: str) -> str:
    return name if name.isascii() else name.encode("idna").decode("ascii")


def _require_file(path: Path, what: str) -> None:
    if not path.is_file():
        raise NotFound(f"no {what} at {path}")
