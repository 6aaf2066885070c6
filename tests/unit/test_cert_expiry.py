"""An expired (or not yet valid) certificate gives an error naming the file, its subject
and the date, for clients and daemons alike; one past 2/3 of its lifetime warns once."""

from __future__ import annotations

import datetime
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from vmferry import pki
from vmferry.pki.credentials import check_validity

UTC = datetime.UTC
NOW = datetime.datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def make_cert(
    cn: str, start: datetime.datetime, end: datetime.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def write_pair(
    tmp_path: Path, cn: str, start: datetime.datetime, end: datetime.datetime
) -> pki.TlsFiles:
    now = datetime.datetime.now(UTC)
    ca, _ = make_cert(
        "test-ca", now - datetime.timedelta(days=30), now + datetime.timedelta(days=3650)
    )
    cert, key = make_cert(cn, start, end)
    (tmp_path / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "leaf.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "leaf.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return pki.TlsFiles(tmp_path / "ca.crt", tmp_path / "leaf.crt", tmp_path / "leaf.key")


def test_expired_names_the_file_subject_and_date() -> None:
    cert, _ = make_cert(
        "system:node:n1", NOW - datetime.timedelta(days=30), NOW - datetime.timedelta(hours=1)
    )
    with pytest.raises(pki.CertificateExpired) as e:
        check_validity(Path("/etc/vmferry/pki/nodes/n1.crt"), cert, NOW)
    assert str(e.value).startswith(
        "certificate /etc/vmferry/pki/nodes/n1.crt (CN=system:node:n1) expired at 2026-12-05T11:00:00Z"
    )


def test_not_yet_valid() -> None:
    cert, _ = make_cert("u", NOW + datetime.timedelta(hours=2), NOW + datetime.timedelta(days=1))
    with pytest.raises(pki.CertificateExpired, match=r"is not valid before 2026-12-05T14:00:00Z"):
        check_validity(Path("u.crt"), cert, NOW)


def test_renewal_warning_past_two_thirds_once(caplog: pytest.LogCaptureFixture) -> None:
    start = NOW - datetime.timedelta(days=21)
    cert, _ = make_cert("u", start, start + datetime.timedelta(days=30))  # 70% used
    with caplog.at_level(logging.WARNING):
        check_validity(Path("u.crt"), cert, NOW)
        check_validity(Path("u.crt"), cert, NOW)
    warnings = [r for r in caplog.records if "past 67% of its lifetime" in r.getMessage()]
    assert len(warnings) == 1
    assert "'vmferry certificate renew'" in warnings[0].getMessage()  # what a user does
    young, _ = make_cert("v", NOW - datetime.timedelta(days=1), NOW + datetime.timedelta(days=29))
    caplog.clear()
    check_validity(Path("v.crt"), young, NOW)
    assert not caplog.records


def test_client_credentials_refuse_an_expired_certificate(tmp_path: Path) -> None:
    now = datetime.datetime.now(UTC)
    tls = write_pair(
        tmp_path, "alice", now - datetime.timedelta(days=2), now - datetime.timedelta(days=1)
    )
    with pytest.raises(
        pki.CertificateExpired, match=rf"certificate {tmp_path}/leaf.crt \(CN=alice\) expired at"
    ):
        pki.channel_credentials(tls)


@pytest.mark.timeout(60)
def test_daemon_with_an_expired_certificate_exits_with_the_reason(tmp_path: Path) -> None:
    now = datetime.datetime.now(UTC)
    tls = write_pair(
        tmp_path,
        "vmferry-controller",
        now - datetime.timedelta(days=2),
        now - datetime.timedelta(minutes=1),
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "controller.main",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            str(tmp_path / "data"),
            "--ca",
            str(tls.ca),
            "--cert",
            str(tls.cert),
            "--key",
            str(tls.key),
        ],
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"certificate {tls.cert} (CN=vmferry-controller) expired at" in proc.stderr
    assert "Traceback" not in proc.stderr
