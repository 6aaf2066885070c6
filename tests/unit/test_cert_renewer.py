"""Rotation: the handler's certificate renews itself by CSR at 2/3 of its lifetime
(handler/cert_renewer.py, against a fake API that signs as the controller would), and
the API client switches to renewed files without a restart (vmferry/client.py)."""

from __future__ import annotations

import asyncio
import base64
import copy
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from controller import csr_signer
from handler.cert_renewer import CertRenewer, RenewalError
from vmferry import pki
from vmferry.client import ApiClient
from vmferry.config import ClientConfig
from vmferry.pki import csr
from vmferry.pki.credentials import renewal_due
from vmferry.pki.issuing import _write_atomic

NODE = pki.Identity("system:node:n1", ("system:nodes", "system:authenticated"))


def write_node_cert(pki_dir: Path, seconds: int, now: datetime) -> pki.TlsFiles:
    ca = csr_signer.load_ca(pki_dir / "ca.crt", pki_dir / "ca.key")
    key_pem, request_pem = csr.make_node_request("n1", ["192.0.2.7"], ["n1.example"])
    cert_pem = csr.sign_request(csr.parse_request(request_pem), *ca, seconds=seconds, now=now)
    (pki_dir / "nodes").mkdir(exist_ok=True)
    tls = pki.TlsFiles(pki_dir / "ca.crt", pki_dir / "nodes/n1.crt", pki_dir / "nodes/n1.key")
    _write_atomic(tls.key, key_pem, 0o600)
    _write_atomic(tls.cert, cert_pem, 0o644)
    return tls


class FakeApi:
    """Creates CSRs as the API does (requester stamped) and settles them as the signer."""

    def __init__(self, pki_dir: Path, deny: bool = False, now: list[float] | None = None) -> None:
        self.ca = csr_signer.load_ca(pki_dir / "ca.crt", pki_dir / "ca.key")
        self.now = now  # the fake clock, when the test runs one
        self.deny = deny
        self.objects: dict[str, dict[str, Any]] = {}

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        csr_signer.stamp_requester(obj, NODE)
        if self.deny:
            obj = csr_signer.with_condition(obj, "Denied", "ByAdmin", "not today")
        while (step := csr_signer.decide(obj).step) is not csr_signer.Step.SETTLED:
            if step is csr_signer.Step.APPROVE:
                obj = csr_signer.with_condition(obj, "Approved", "AutoApproved", "own")
            elif step is csr_signer.Step.SIGN:
                request = csr.parse_request(base64.b64decode(obj["spec"]["request"]))
                when = datetime.fromtimestamp(self.now[0], UTC) if self.now else None
                seconds = obj["spec"]["expirationSeconds"]
                pem = csr.sign_request(request, *self.ca, seconds=seconds, now=when)
                obj["status"]["certificate"] = base64.b64encode(pem).decode()
            else:
                raise AssertionError(step)
        self.objects[obj["metadata"]["name"]] = obj
        return obj

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        return self.objects[name]


@pytest.fixture
def pki_dir(tmp_path: Path) -> Path:
    pki.init_ca(tmp_path, "test")
    return tmp_path


def test_renewal_replaces_the_pair_with_the_same_name_addresses_and_lifetime(
    pki_dir: Path,
) -> None:
    tls = write_node_cert(pki_dir, 120, datetime.now(UTC))
    old = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    renewer = CertRenewer(FakeApi(pki_dir), "n1", tls)  # type: ignore[arg-type]
    asyncio.run(renewer.renew())
    new = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    assert new.serial_number != old.serial_number
    assert pki.identity_from_pem(tls.cert.read_bytes()).node_name == "n1"
    pki.channel_credentials(tls)  # the new key belongs to the new certificate
    san = new.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["192.0.2.7"]
    assert sorted(san.get_values_for_type(x509.DNSName)) == ["n1", "n1.example"]
    lifetime = new.not_valid_after_utc - new.not_valid_before_utc
    assert lifetime == old.not_valid_after_utc - old.not_valid_before_utc
    assert tls.key.stat().st_mode & 0o777 == 0o600


def test_run_waits_for_two_thirds_then_renews(pki_dir: Path) -> None:
    start = datetime.now(UTC)
    tls = write_node_cert(pki_dir, 3000, start)
    old = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    due = renewal_due(old)
    issued = old.not_valid_before_utc + timedelta(minutes=5)  # not-before is back-dated
    assert due == issued + (old.not_valid_after_utc - issued) * 2 / 3
    now = [start.timestamp()]
    waits: list[float] = []

    async def sleep(seconds: float) -> None:
        waits.append(seconds)
        if len(waits) == 2:
            raise asyncio.CancelledError  # stop at the wait after the renewal
        now[0] += seconds

    api = FakeApi(pki_dir, now=now)
    renewer = CertRenewer(api, "n1", tls, clock=lambda: now[0], sleep=sleep)  # type: ignore[arg-type]
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(renewer.run())
    assert renewer.renewals == 1
    assert waits[0] == pytest.approx(due.timestamp() - start.timestamp())
    new = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    assert waits[1] == pytest.approx(renewal_due(new).timestamp() - now[0], abs=1)
    assert waits[1] > 1800  # the renewed certificate's own 2/3 point, not a loop


def test_a_denied_renewal_keeps_the_files(pki_dir: Path) -> None:
    tls = write_node_cert(pki_dir, 120, datetime.now(UTC))
    before = tls.cert.read_bytes(), tls.key.read_bytes()
    renewer = CertRenewer(FakeApi(pki_dir, deny=True), "n1", tls)  # type: ignore[arg-type]
    with pytest.raises(RenewalError, match="denied: not today"):
        asyncio.run(renewer.renew())
    assert (tls.cert.read_bytes(), tls.key.read_bytes()) == before


def test_the_api_client_uses_renewed_files_for_new_calls(pki_dir: Path) -> None:
    tls = write_node_cert(pki_dir, 600, datetime.now(UTC))

    async def scenario() -> None:
        api = ApiClient(ClientConfig(server="127.0.0.1:9", tls=tls))
        first = api._stub
        assert api._stub is first  # nothing changed
        # a half-written renewal (new certificate, old key): the current channel stays
        key_before = tls.key.read_bytes()
        write_node_cert(pki_dir, 600, datetime.now(UTC) + timedelta(seconds=1))
        new_key = tls.key.read_bytes()
        _write_atomic(tls.key, key_before, 0o600)
        assert api._stub is first
        _write_atomic(tls.key, new_key, 0o600)  # the pair matches: a new channel
        second = api._stub
        assert second is not first
        assert len(api._retiring) == 1
        await api.close()
        assert not api._retiring

    asyncio.run(scenario())


def test_a_two_minute_certificate_is_due_after_80_seconds(pki_dir: Path) -> None:
    start = datetime.now(UTC)
    tls = write_node_cert(pki_dir, 120, start)
    cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    assert (renewal_due(cert) - start).total_seconds() == pytest.approx(80, abs=1)
