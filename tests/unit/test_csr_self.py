"""Renewal of one's own identity by CSR (signer vmferry.io/self): the rules of
vmferry/pki/csr.py check_self_request, the signer's decisions (controller/csr_signer.py)
and the requester side (vmferry/cert_request.py) with a fake API and clock."""

from __future__ import annotations

import asyncio
import base64
import copy
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controller import csr_signer
from controller.csr_signer import Step, decide
from vmferry import pki
from vmferry.cert_request import CsrIssue, request_for
from vmferry.decentralized import SYNC_IDENTITY
from vmferry.errors import Invalid
from vmferry.pki import csr
from vmferry.pki.renewal import RenewalError, Renewer

AUTH = "system:authenticated"
SYNC = pki.Identity(SYNC_IDENTITY, (AUTH,))
ALICE = pki.Identity("alice", ("dev", AUTH))
NODE1 = pki.Identity("system:node:n1", ("system:nodes", AUTH))
SA = pki.Identity("system:serviceaccount:default:ci", ("system:serviceaccounts", AUTH))


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("pki")
    pki.init_ca(d, "test")
    pki.issue_sync(d, "sync1", ips=["192.0.2.5"], days=3)
    pki.issue_user(d, "alice", groups=["dev"], days=3)
    return d


def cert(pki_dir: Path, rel: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((pki_dir / rel).read_bytes())


def self_request(subject: list[tuple[x509.ObjectIdentifier, str]], usages: list[str]) -> dict:
    _, pem = csr.make_request(x509.Name([x509.NameAttribute(o, v) for o, v in subject]), None)
    return {
        "apiVersion": "certificates.k8s.io/v1",
        "kind": "CertificateSigningRequest",
        "metadata": {"name": "csr-x"},
        "spec": {
            "request": base64.b64encode(pem).decode(),
            "signerName": csr.SELF_SIGNER,
            "usages": usages,
        },
    }


CN, ORG = NameOID.COMMON_NAME, NameOID.ORGANIZATION_NAME


def test_the_sync_controller_renewal_is_approved_automatically(pki_dir: Path) -> None:
    _, spec, prefix = request_for(cert(pki_dir, "sync/sync1.crt"))
    assert spec["signerName"] == csr.SELF_SIGNER and prefix == "csr-system-vmferry-sync-controller"
    assert spec["usages"] == ["digital signature", "client auth", "server auth"]
    obj = {"metadata": {"name": "csr-s"}, "spec": spec}
    csr_signer.stamp_requester(obj, SYNC)
    assert decide(obj).step is Step.APPROVE
    assert SYNC_IDENTITY in decide(obj).message


def test_a_users_renewal_waits_for_an_administrator(pki_dir: Path) -> None:
    _, spec, _ = request_for(cert(pki_dir, "users/alice.crt"))
    assert spec["usages"] == ["digital signature", "client auth"]
    obj = {"metadata": {"name": "csr-a"}, "spec": spec}
    csr_signer.stamp_requester(obj, ALICE)
    assert decide(obj).step is Step.WAIT
    approved = csr_signer.with_condition(obj, "Approved", "ByAdmin", "ok")
    assert decide(approved).step is Step.SIGN


@pytest.mark.parametrize(
    ("who", "subject", "usages", "error"),
    [
        # another identity, or more groups than one has: never
        (
            SYNC,
            [(CN, "admin"), (ORG, "system:masters")],
            ["client auth"],
            "only request a certificate for itself",
        ),
        (
            ALICE,
            [(CN, "alice"), (ORG, "dev"), (ORG, "system:masters")],
            ["client auth"],
            "for itself",
        ),
        (ALICE, [(CN, "bob"), (ORG, "dev")], ["client auth"], "for itself"),
        (ALICE, [(CN, "alice")], ["client auth"], "for itself"),  # groups must match too
        # a user's certificate is a client's
        (ALICE, [(CN, "alice"), (ORG, "dev")], ["client auth", "server auth"], "are not alice's"),
        (ALICE, [(CN, "alice"), (ORG, "dev")], ["digital signature"], "must include client auth"),
        # token identities and nodes do not use this signer
        (SA, [(CN, SA.user), (ORG, "system:serviceaccounts")], ["client auth"], "cannot request"),
        (NODE1, [(CN, NODE1.user), (ORG, "system:nodes")], ["client auth"], "cannot request"),
    ],
)
def test_refused_at_create(who: pki.Identity, subject: list, usages: list[str], error: str) -> None:
    with pytest.raises(Invalid, match=error):
        csr_signer.stamp_requester(self_request(subject, usages), who)


def test_a_self_request_settles_failed_if_it_slipped_through() -> None:
    obj = self_request([(CN, "bob"), (ORG, "dev")], ["client auth"])
    obj["spec"].update(username="alice", groups=["dev", AUTH])  # as if stored by an older API
    decision = decide(obj)
    assert decision.step is Step.FAIL and "alice may only request" in decision.message


def test_signed_usages_follow_the_signer(pki_dir: Path) -> None:
    ca = csr_signer.load_ca(pki_dir / "ca.crt", pki_dir / "ca.key")
    _, pem = csr.make_request(x509.Name([x509.NameAttribute(CN, "alice")]), None)
    request = csr.parse_request(pem)
    now = datetime.now(UTC)
    user = x509.load_pem_x509_certificate(
        csr.sign_request(request, *ca, seconds=600, now=now, usages=csr.CLIENT_USAGES)
    )
    eku = user.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    node = x509.load_pem_x509_certificate(csr.sign_request(request, *ca, seconds=600, now=now))
    eku = node.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]


class FakeApi:
    """Creates CSRs as the API does (requester stamped) and runs the signer's decisions;
    a request that waits stays pending until ``approve``."""

    def __init__(self, pki_dir: Path, who: pki.Identity) -> None:
        self.ca = csr_signer.load_ca(pki_dir / "ca.crt", pki_dir / "ca.key")
        self.who = who
        self.objects: dict[str, dict[str, Any]] = {}

    def settle(self, name: str) -> None:
        obj = self.objects[name]
        while (step := decide(obj).step) not in (Step.SETTLED, Step.WAIT):
            if step is Step.APPROVE:
                obj = csr_signer.with_condition(obj, "Approved", "AutoApproved", "own")
            elif step is Step.SIGN:
                spec = obj["spec"]
                pem = csr.sign_request(
                    csr.parse_request(base64.b64decode(spec["request"])),
                    *self.ca,
                    seconds=spec["expirationSeconds"],
                    usages=spec["usages"],
                )
                obj["status"]["certificate"] = base64.b64encode(pem).decode()
            else:
                raise AssertionError(decide(obj))
        self.objects[name] = obj

    async def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        obj = copy.deepcopy(obj)
        csr_signer.stamp_requester(obj, self.who)
        self.objects[obj["metadata"]["name"]] = obj
        self.settle(obj["metadata"]["name"])
        return obj

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        return self.objects[name]

    def approve(self, name: str) -> None:
        self.objects[name] = csr_signer.with_condition(
            self.objects[name], "Approved", "ApprovedByAdministrator", "ok"
        )
        self.settle(name)


def test_the_sync_controller_renews_its_files_by_csr(tmp_path: Path) -> None:
    pki.init_ca(tmp_path, "test")
    tls = pki.issue_sync(tmp_path, "sync1", ips=["192.0.2.5"], days=3)
    old = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    api = FakeApi(tmp_path, SYNC)
    asyncio.run(Renewer("sync controller s1", tls, CsrIssue(api)).renew())  # type: ignore[arg-type]
    new = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    assert new.serial_number != old.serial_number and new.subject == old.subject
    for ext in (x509.SubjectAlternativeName, x509.ExtendedKeyUsage):
        assert new.extensions.get_extension_for_class(ext).value == (
            old.extensions.get_extension_for_class(ext).value
        )
    pki.channel_credentials(tls)  # a matching pair, valid now


def test_a_user_renewal_waits_for_approval_then_writes(tmp_path: Path) -> None:
    pki.init_ca(tmp_path, "test")
    tls = pki.issue_user(tmp_path, "alice", groups=["dev"], days=3)
    api = FakeApi(tmp_path, ALICE)
    created: list[str] = []
    now = [0.0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds
        if now[0] >= 2:  # the administrator approves after two seconds
            api.approve(created[0])

    issue = CsrIssue(api, timeout=600, on_created=created.append, clock=lambda: now[0], sleep=sleep)  # type: ignore[arg-type]
    asyncio.run(Renewer("user alice", tls, issue).renew())
    assert now[0] == pytest.approx(2)
    assert created[0].startswith("csr-alice-")
    assert pki.identity_from_pem(tls.cert.read_bytes()) == pki.Identity("alice", ("dev",))
    pki.channel_credentials(tls)


def test_an_unapproved_user_renewal_times_out_and_keeps_the_files(tmp_path: Path) -> None:
    pki.init_ca(tmp_path, "test")
    tls = pki.issue_user(tmp_path, "alice", groups=["dev"], days=3)
    before = tls.cert.read_bytes(), tls.key.read_bytes()
    now = [0.0]

    async def sleep(seconds: float) -> None:
        now[0] += seconds

    issue = CsrIssue(FakeApi(tmp_path, ALICE), timeout=30, clock=lambda: now[0], sleep=sleep)  # type: ignore[arg-type]
    with pytest.raises(RenewalError, match="not signed within 30s"):
        asyncio.run(Renewer("user alice", tls, issue).renew())
    assert (tls.cert.read_bytes(), tls.key.read_bytes()) == before
