"""The fleet CA: what it issues chains to it, names what the issuer decides, and revokes."""

from __future__ import annotations

import datetime as dt
import stat
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edgefleet.errors import KeyFileError, MalformedDocumentError, UsageError
from edgefleet.fleetca import (
    CA_CERT_FILE,
    CA_KEY_FILE,
    init_ca,
    load_ca,
    make_key_and_csr,
)
from edgefleet.timefmt import utcnow


def _openssl_verify(
    ca: Path,
    cert: bytes,
    tmp_path: Path,
    crl: bytes | None = None,
    at: dt.datetime | None = None,
) -> bool:
    cert_path = tmp_path / "leaf.crt"
    cert_path.write_bytes(cert)
    command = ["openssl", "verify", "-CAfile", str(ca)]
    if at is not None:
        command += ["-attime", str(int(at.timestamp()))]
    if crl is not None:
        (tmp_path / "crl.pem").write_bytes(crl)
        command += ["-crl_check", "-CRLfile", str(tmp_path / "crl.pem")]
    return subprocess.run([*command, str(cert_path)], capture_output=True).returncode == 0


def test_init_writes_a_private_key_and_refuses_to_overwrite(tmp_path: Path) -> None:
    init_ca(tmp_path / "ca")
    assert stat.S_IMODE((tmp_path / "ca" / CA_KEY_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "ca").stat().st_mode) == 0o700
    before = (tmp_path / "ca" / CA_KEY_FILE).read_bytes()
    with pytest.raises(UsageError, match="never overwritten"):
        init_ca(tmp_path / "ca")
    assert (tmp_path / "ca" / CA_KEY_FILE).read_bytes() == before


def test_a_request_is_signed_under_the_name_the_ca_chooses(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "ca")
    _key, csr = make_key_and_csr("someone-else")
    issued = ca.issue_for_csr(csr, "dev-7")
    cert = x509.load_pem_x509_certificate(issued.pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-7"
    assert issued.common_name == "dev-7"
    usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usages) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert _openssl_verify(tmp_path / "ca" / CA_CERT_FILE, issued.pem, tmp_path)
    assert issued.not_after - issued.not_before > dt.timedelta(days=80)


def test_a_certificate_from_another_ca_does_not_chain(tmp_path: Path) -> None:
    init_ca(tmp_path / "ours")
    theirs = init_ca(tmp_path / "theirs")
    issued, _key = theirs.issue_key_pair("dev-1")
    assert not _openssl_verify(tmp_path / "ours" / CA_CERT_FILE, issued.pem, tmp_path)


def test_a_revoked_certificate_fails_a_crl_check(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "ca")
    kept, _ = ca.issue_key_pair("dev-1")
    revoked, _ = ca.issue_key_pair("dev-2")
    crl = ca.revocation_list([(revoked.serial, revoked.not_before)])
    ca_file = tmp_path / "ca" / CA_CERT_FILE
    assert _openssl_verify(ca_file, kept.pem, tmp_path, crl)
    assert not _openssl_verify(ca_file, revoked.pem, tmp_path, crl)


def test_a_revocation_list_stays_valid_until_the_ca_expires(tmp_path: Path) -> None:
    # A broker refuses every client once its CRL is past its next update: the list must
    # not expire before the CA does, however long nobody rewrites it.
    ca = init_ca(tmp_path / "ca")
    expiry = ca.certificate.not_valid_after_utc
    kept, _ = ca.issue_key_pair("dev-1", lifetime=expiry - utcnow())
    revoked, _ = ca.issue_key_pair("dev-2", lifetime=expiry - utcnow())
    crl = ca.revocation_list([(revoked.serial, revoked.not_before)])
    assert x509.load_pem_x509_crl(crl).next_update_utc == expiry
    ca_file = tmp_path / "ca" / CA_CERT_FILE
    shortly_before_expiry = expiry - dt.timedelta(days=1)
    assert _openssl_verify(ca_file, kept.pem, tmp_path, crl, at=shortly_before_expiry)
    assert not _openssl_verify(ca_file, revoked.pem, tmp_path, crl, at=shortly_before_expiry)


def test_a_server_certificate_names_its_hosts(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "ca")
    issued, key = ca.issue_key_pair("broker", server_names=["localhost", "127.0.0.1"], client=False)
    cert = x509.load_pem_x509_certificate(issued.pem)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["localhost"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert b"PRIVATE KEY" in key


def test_bad_requests_are_refused(tmp_path: Path) -> None:
    ca = init_ca(tmp_path / "ca")
    with pytest.raises(MalformedDocumentError, match="not a PEM"):
        ca.issue_for_csr(b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n", "dev-1")
    with pytest.raises(MalformedDocumentError, match="over"):
        ca.issue_for_csr(b"x" * 20_000, "dev-1")
    _key, csr = make_key_and_csr("dev-1")
    tampered = csr.replace(csr.splitlines()[3], csr.splitlines()[3][::-1])
    with pytest.raises(MalformedDocumentError):
        ca.issue_for_csr(tampered, "dev-1")


def test_load_says_what_is_missing_and_checks_the_pair(tmp_path: Path) -> None:
    with pytest.raises(KeyFileError, match="edgefleet ca init"):
        load_ca(tmp_path / "none")
    init_ca(tmp_path / "a")
    init_ca(tmp_path / "b")
    (tmp_path / "a" / CA_KEY_FILE).write_bytes((tmp_path / "b" / CA_KEY_FILE).read_bytes())
    with pytest.raises(KeyFileError, match="is not the key"):
        load_ca(tmp_path / "a")
    assert load_ca(tmp_path / "b").certificate_pem.startswith(b"-----BEGIN CERTIFICATE")
