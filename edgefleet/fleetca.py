"""The fleet CA: X.509 certificates for TLS between devices, the broker and the fleet server.

Separate from the Ed25519 keys of the trust root (edgefleet.keys): those decide
what a device may install; these only say who may open a TLS connection to
the broker (client certificates, mosquitto's `require_certificate`) and let
devices recognise the broker and the server (server certificates).

A CA directory (`edgefleet ca init DIR`) holds `ca.crt` (give it to every
device and to the broker) and `ca.key` (mode 0600; whoever holds it issues
identities: the fleet server, to sign devices' requests at enrollment).
Keys are ECDSA P-256, which every TLS stack of the fleet (OpenSSL in mosquitto
and in Python's `ssl`) accepts. A certificate's subject common name is the
identity the broker takes as the user name: a device id for a device, a
service name for the server. The issuer, never the requester, decides it: a
signing request's own subject is ignored.

`cryptography` is imported at module level: the agent never imports this
module in its process (docs/adr/0004-verification-with-libsodium.md); it makes
its key and signing request in a short child process (`make_key_and_csr`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet.errors import KeyFileError, MalformedDocumentError, UsageError
from edgefleet.fileio import atomic_write_bytes
from edgefleet.timefmt import utcnow

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
CA_LIFETIME = dt.timedelta(days=3650)
DEVICE_CERT_LIFETIME = dt.timedelta(days=90)
SERVICE_CERT_LIFETIME = dt.timedelta(days=825)
MAX_CSR_BYTES = 16 * 1024
# Issued certificates start a little in the past, so a device whose clock lags
# the server's by minutes accepts them at once.
BACKDATE = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class IssuedCertificate:
    pem: bytes
    serial: str  # lower-case hex, as the revocation list and the database name it
    common_name: str
    not_before: dt.datetime
    not_after: dt.datetime


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _name(common_name: str) -> x509.Name:
    if not common_name or len(common_name) > 64:
        raise UsageError(f"certificate name {common_name!r} must be 1 to 64 characters")
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_usage(*, issuer: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs; a leaf signs handshakes and agrees keys (ECDHE)."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not issuer,
        key_cert_sign=issuer,
        crl_sign=issuer,
        encipher_only=False,
        decipher_only=False,
    )


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _issued(cert: x509.Certificate) -> IssuedCertificate:
    common_name = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    return IssuedCertificate(
        pem=cert.public_bytes(serialization.Encoding.PEM),
        serial=format(cert.serial_number, "x"),
        common_name=str(common_name),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
    )


class FleetCa:
    """A loaded CA: its certificate and key."""

    def __init__(self, certificate: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.certificate = certificate
        self._key = key

    @property
    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def _sign(
        self,
        public_key: ec.EllipticCurvePublicKey,
        common_name: str,
        lifetime: dt.timedelta,
        *,
        server_names: Sequence[str],
        client: bool,
        now: dt.datetime | None,
    ) -> IssuedCertificate:
        now = now or utcnow()
        not_after = min(now + lifetime, self.certificate.not_valid_after_utc)
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH] if client else []
        if server_names:
            usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(issuer=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
        )
        if server_names:
            builder = builder.add_extension(_san(server_names), critical=False)
        return _issued(builder.sign(self._key, hashes.SHA256()))

    def issue_for_csr(
        self,
        csr_pem: bytes,
        common_name: str,
        *,
        lifetime: dt.timedelta = DEVICE_CERT_LIFETIME,
        now: dt.datetime | None = None,
    ) -> IssuedCertificate:
        """A client certificate for the key of a signing request, named `common_name`.

        The request's own subject and extensions are ignored: the CA decides the name.

        Raises:
            MalformedDocumentError: not a PEM signing request, too large, its signature
                does not verify, or its key is not an ECDSA P-256 key.
        """
        csr = parse_csr(csr_pem)
        public_key = csr.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)  # parse_csr checked it
        return self._sign(public_key, common_name, lifetime, server_names=(), client=True, now=now)

    def issue_key_pair(
        self,
        common_name: str,
        *,
        server_names: Sequence[str] = (),
        client: bool = True,
        lifetime: dt.timedelta = SERVICE_CERT_LIFETIME,
        now: dt.datetime | None = None,
    ) -> tuple[IssuedCertificate, bytes]:
        """A new key and its certificate (for the broker, the server): (certificate, key PEM).

        `server_names` (DNS names or IP addresses) make it a server certificate too.
        """
        key = _new_key()
        issued = self._sign(
            key.public_key(),
            common_name,
            lifetime,
            server_names=server_names,
            client=client,
            now=now,
        )
        return issued, private_key_pem(key)

    def revocation_list(
        self,
        revoked: Iterable[tuple[str, dt.datetime]],
        *,
        now: dt.datetime | None = None,
    ) -> bytes:
        """A signed CRL (PEM) naming `revoked` (serial in hex, revocation time).

        Its next update is the CA certificate's own expiry: a broker refuses every
        client once its CRL has expired, and a CRL is reissued on every change anyway.
        """
        now = now or utcnow()
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.certificate.subject)
            .last_update(now - BACKDATE)
            .next_update(self.certificate.not_valid_after_utc)
        )
        for serial, when in revoked:
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder()
                .serial_number(int(serial, 16))
                .revocation_date(when)
                .build()
            )
        crl = builder.sign(self._key, hashes.SHA256())
        return crl.public_bytes(serialization.Encoding.PEM)


def parse_csr(csr_pem: bytes) -> x509.CertificateSigningRequest:
    """A signing request whose signature verifies and whose key is ECDSA P-256.

    Raises:
        MalformedDocumentError: otherwise, saying why.
    """
    if len(csr_pem) > MAX_CSR_BYTES:
        raise MalformedDocumentError(f"certificate request over {MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise MalformedDocumentError(f"not a PEM certificate request: {exc}") from None
    if not csr.is_signature_valid:
        raise MalformedDocumentError("the certificate request's signature does not verify")
    key = csr.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp256r1":
        raise MalformedDocumentError("the certificate request's key is not ECDSA P-256")
    return csr


def init_ca(
    directory: Path,
    *,
    common_name: str = "edgefleet fleet CA",
    lifetime: dt.timedelta = CA_LIFETIME,
    now: dt.datetime | None = None,
) -> FleetCa:
    """Create a CA in `directory` (made 0700 when missing): ca.crt, and ca.key mode 0600.

    Raises:
        UsageError: the directory already holds a CA (never overwritten).
    """
    directory = Path(directory)
    if (directory / CA_KEY_FILE).exists() or (directory / CA_CERT_FILE).exists():
        raise UsageError(
            f"{directory} already holds a CA ({CA_CERT_FILE}, {CA_KEY_FILE}): "
            "it is never overwritten; choose another directory"
        )
    now = now or utcnow()
    key = _new_key()
    name = _name(common_name)
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(issuer=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    atomic_write_bytes(directory / CA_KEY_FILE, private_key_pem(key), mode=0o600)
    atomic_write_bytes(
        directory / CA_CERT_FILE, cert.public_bytes(serialization.Encoding.PEM), mode=0o644
    )
    return FleetCa(cert, key)


def load_ca(directory: Path) -> FleetCa:
    """The CA in `directory`.

    Raises:
        KeyFileError: a file is missing or unreadable, or the key is not the certificate's.
    """
    directory = Path(directory)
    try:
        cert = x509.load_pem_x509_certificate((directory / CA_CERT_FILE).read_bytes())
        key = serialization.load_pem_private_key((directory / CA_KEY_FILE).read_bytes(), None)
    except FileNotFoundError as exc:
        raise KeyFileError(
            f"{exc.filename} does not exist: create a CA with `edgefleet ca init {directory}`"
        ) from None
    except (OSError, ValueError, TypeError) as exc:
        raise KeyFileError(f"the CA in {directory} cannot be read: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or key.public_key() != cert.public_key():
        raise KeyFileError(f"{directory / CA_KEY_FILE} is not the key of {CA_CERT_FILE}")
    return FleetCa(cert, key)


def make_key_and_csr(common_name: str) -> tuple[bytes, bytes]:
    """A new ECDSA P-256 key and a signing request for it: (key PEM, request PEM)."""
    key = _new_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name(common_name))
        .sign(key, hashes.SHA256())
    )
    return private_key_pem(key), csr.public_bytes(serialization.Encoding.PEM)


def write_private_pem(path: Path, pem: bytes) -> None:
    """Write a private key atomically, mode 0600, creating no parent directory."""
    atomic_write_bytes(Path(path), pem, mode=0o600)


__all__ = [
    "CA_CERT_FILE",
    "CA_KEY_FILE",
    "DEVICE_CERT_LIFETIME",
    "FleetCa",
    "IssuedCertificate",
    "init_ca",
    "load_ca",
    "make_key_and_csr",
    "parse_csr",
    "write_private_pem",
]
