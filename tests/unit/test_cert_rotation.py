"""The controller's own certificate rotation (controller/cert_rotation.py) and the shared
renewal loop with the CA as issuer (vmferry/pki/renewal.py), with a fake clock."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from controller import csr_signer
from controller.cert_rotation import NO_CA_KEY_ADVICE, self_renewal
from vmferry import pki
from vmferry.pki.credentials import CertificateReloader, renewal_due
from vmferry.pki.issuing import public_der
from vmferry.pki.renewal import RenewalError, Renewer, ca_issue


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    pki.init_ca(tmp_path, "test")
    return tmp_path


def server_files(pki_dir: Path) -> pki.TlsFiles:
    return pki.issue_server(pki_dir, "ctl", ips=["192.0.2.1"], dns=["ctl.example"], days=3)


def cert_of(tls: pki.TlsFiles) -> x509.Certificate:
    return x509.load_pem_x509_certificate(tls.cert.read_bytes())


class FakeTime:
    """A clock and a sleep advancing it; stops the loop after ``stop_after`` sleeps."""

    def __init__(self, start: float, stop_after: int) -> None:
        self.now = start
        self.waits: list[float] = []
        self.stop_after = stop_after

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.waits.append(seconds)
        if len(self.waits) == self.stop_after:
            raise asyncio.CancelledError
        self.now += seconds


def test_the_controller_renews_its_certificate_at_two_thirds_with_the_ca(
    pki_dir: Path,
) -> None:
    tls = server_files(pki_dir)
    old = cert_of(tls)
    reloader = CertificateReloader(tls)  # what the controller's listeners use
    ca = csr_signer.load_ca(pki_dir / "ca.crt", pki_dir / "ca.key")
    start = datetime.now(UTC).timestamp()
    fake = FakeTime(start, stop_after=2)
    task = self_renewal(tls, ca, clock=fake.clock, sleep=fake.sleep)
    assert task is not None
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(task)
    assert fake.waits[0] == pytest.approx(renewal_due(old).timestamp() - start)
    new = cert_of(tls)
    assert new.serial_number != old.serial_number
    assert new.public_key().public_numbers() != old.public_key().public_numbers()
    assert new.subject == old.subject and new.issuer == old.issuer
    for ext in (x509.SubjectAlternativeName, x509.ExtendedKeyUsage):
        assert (
            new.extensions.get_extension_for_class(ext).value
            == old.extensions.get_extension_for_class(ext).value
        )
    lifetime = new.not_valid_after_utc - new.not_valid_before_utc
    assert lifetime == old.not_valid_after_utc - old.not_valid_before_utc
    # renewed when due (2 days after issuance), valid for 3 days from then
    due = renewal_due(old)
    assert abs(new.not_valid_after_utc - (due + timedelta(days=3))) < timedelta(seconds=2)
    assert tls.key.stat().st_mode & 0o777 == 0o600
    key = serialization.load_pem_private_key(tls.key.read_bytes(), password=None)
    assert public_der(key.public_key()) == public_der(new.public_key())  # a matching pair
    assert reloader._stat() != reloader._stamp  # the next handshake reloads the files
    # the next wait is the renewed certificate's own 2/3 point: no loop
    assert fake.waits[1] == pytest.approx(renewal_due(new).timestamp() - fake.now, abs=2)
    assert fake.waits[1] > 2 * 86400 - 10


def test_the_renewal_waits_the_first_two_thirds(pki_dir: Path) -> None:
    tls = server_files(pki_dir)
    old = cert_of(tls)
    ca = csr_signer.load_ca(pki_dir / "ca.crt", pki_dir / "ca.key")
    start = datetime.now(UTC).timestamp()
    fake = FakeTime(start, stop_after=1)
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(
            Renewer(
                "controller", tls, ca_issue(ca, fake.clock), clock=fake.clock, sleep=fake.sleep
            ).run()
        )
    assert fake.waits == [pytest.approx(renewal_due(old).timestamp() - start)]
    assert cert_of(tls).serial_number == old.serial_number  # untouched before it is due


def test_another_cas_certificate_is_not_renewed(
    pki_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    tls = server_files(pki_dir)
    before = tls.cert.read_bytes(), tls.key.read_bytes()
    other = tmp_path_factory.mktemp("other")
    pki.init_ca(other, "other")
    ca = csr_signer.load_ca(other / "ca.crt", other / "ca.key")
    renewer = Renewer("controller", tls, ca_issue(ca))
    with pytest.raises(RenewalError, match="is not a certificate of the CA"):
        asyncio.run(renewer.renew())
    assert (tls.cert.read_bytes(), tls.key.read_bytes()) == before


def test_without_ca_key_it_says_once_that_it_cannot_renew(
    pki_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tls = server_files(pki_dir)
    old = cert_of(tls)
    start = datetime.now(UTC).timestamp()
    fake = FakeTime(start, stop_after=4)
    task = self_renewal(tls, None, clock=fake.clock, sleep=fake.sleep)
    assert task is not None
    with (
        caplog.at_level(logging.WARNING, logger="vmferry.pki.renewal"),
        pytest.raises(asyncio.CancelledError),
    ):
        asyncio.run(task)
    assert fake.waits[0] == pytest.approx(renewal_due(old).timestamp() - start)
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1, messages  # once, though it keeps looking
    assert "cannot be renewed here" in messages[0] and str(tls.cert) in messages[0]
    assert NO_CA_KEY_ADVICE in messages[0]
    assert cert_of(tls).serial_number == old.serial_number


def test_without_tls_there_is_nothing_to_renew() -> None:
    assert self_renewal(None, None) is None


def test_a_failed_renewal_is_retried(pki_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    tls = server_files(pki_dir)
    old = cert_of(tls)
    attempts: list[int] = []

    async def refuse(cert: x509.Certificate) -> tuple[bytes, bytes]:
        attempts.append(cert.serial_number)
        raise RenewalError("the CA is away")

    fake = FakeTime(renewal_due(old).timestamp() + 1, stop_after=2)
    with caplog.at_level(logging.WARNING), pytest.raises(asyncio.CancelledError):
        asyncio.run(Renewer("controller", tls, refuse, clock=fake.clock, sleep=fake.sleep).run())
    assert attempts == [old.serial_number, old.serial_number]
    assert fake.waits == [10.0, 10.0]
    assert "controller: certificate renewal failed, retrying: the CA is away" in caplog.text
