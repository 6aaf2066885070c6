"""Node certificates by request: vmferry/pki/csr.py, vmferry/bootstrap_token.py and the
decisions of controller/csr_signer.py (pure functions, no API)."""

from __future__ import annotations

import base64
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from controller import csr_signer
from controller.csr_signer import Step, decide
from vmferry import bootstrap_token, pki
from vmferry.errors import Invalid
from vmferry.pki import csr

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pki_dir = tmp_path_factory.mktemp("pki")
    pki.init_ca(pki_dir, "test")
    return pki_dir


def request_obj(name: str, who: pki.Identity, **spec: Any) -> dict[str, Any]:
    _, pem = csr.make_node_request(name, ["192.0.2.7"])
    obj = {
        "apiVersion": "certificates.k8s.io/v1",
        "kind": "CertificateSigningRequest",
        "metadata": {"name": f"node-csr-{name}"},
        "spec": {
            "request": base64.b64encode(pem).decode(),
            "signerName": csr.NODE_SIGNER,
            "usages": list(csr.NODE_USAGES),
            **spec,
        },
    }
    csr_signer.stamp_requester(obj, who)
    return obj


BOOTSTRAP = pki.Identity(
    "system:bootstrap:abc123",
    ("system:bootstrappers", bootstrap_token.NODE_BOOTSTRAPPERS_GROUP, "system:authenticated"),
)
MANUAL = pki.Identity("system:bootstrap:def456", ("system:bootstrappers", "system:authenticated"))
NODE1 = pki.Identity("system:node:n1", ("system:nodes", "system:authenticated"))


def test_request_sign_and_identity(ca: Path) -> None:
    key_pem, request_pem = csr.make_node_request("n1", ["192.0.2.7"], ["n1.example"])
    request = csr.parse_request(request_pem)
    assert csr.check_node_request(request, csr.NODE_USAGES, None) is None
    ca_cert, ca_key = csr_signer.load_ca(ca / "ca.crt", ca / "ca.key")
    cert_pem = csr.sign_request(request, ca_cert, ca_key, seconds=120)
    cert = x509.load_pem_x509_certificate(cert_pem)
    assert pki.identity_from_pem(cert_pem).node_name == "n1"
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == timedelta(minutes=7)  # skew 5
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(map(str, san.get_values_for_type(x509.DNSName))) == ["n1", "n1.example"]
    assert cert.issuer == ca_cert.subject
    assert b"PRIVATE KEY" in key_pem and b"PRIVATE KEY" not in request_pem


def test_ca_hash_is_the_public_key_pin(ca: Path) -> None:
    pem = (ca / "ca.crt").read_bytes()
    pin = csr.ca_hash(pem)
    assert pin.startswith("sha256:") and len(pin) == 7 + 64
    assert pin == csr.ca_hash(pem + b"\n")


def test_a_tampered_request_is_refused() -> None:
    _, pem = csr.make_node_request("n1")
    with pytest.raises(ValueError, match="not a PEM certificate request"):
        csr.parse_request(b"garbage")
    request = csr.parse_request(pem)
    assert request.is_signature_valid


def test_bootstrap_token_round_trip_and_refusals() -> None:
    token = bootstrap_token.new_token(timedelta(minutes=10), now=NOW)
    secret = bootstrap_token.to_secret(token)
    assert secret["metadata"] == {"name": token.secret_name, "namespace": "kube-system"}
    found = bootstrap_token.from_secret(token.token, secret, NOW)
    assert found.user == f"system:bootstrap:{token.id}"
    assert found.groups == (bootstrap_token.NODE_BOOTSTRAPPERS_GROUP,)
    with pytest.raises(bootstrap_token.TokenError, match=r"expired at 2026-12-05T12:10:00Z"):
        bootstrap_token.from_secret(token.token, secret, NOW + timedelta(minutes=11))
    wrong = f"{token.id}.{'0' * 16}"
    with pytest.raises(bootstrap_token.TokenError, match="does not match"):
        bootstrap_token.from_secret(wrong, secret, NOW)
    with pytest.raises(bootstrap_token.TokenError, match="expected <6 chars>"):
        bootstrap_token.from_secret("nope", secret, NOW)
    assert not bootstrap_token.new_token(auto_approve=False).groups


def test_the_server_records_who_asked() -> None:
    obj = request_obj("n1", BOOTSTRAP, username="system:admin", groups=["system:masters"])
    assert obj["spec"]["username"] == "system:bootstrap:abc123"
    assert "system:masters" not in obj["spec"]["groups"]


def test_unknown_signer_and_foreign_subject_are_refused_at_create() -> None:
    with pytest.raises(Invalid, match=r'spec\.signerName: "example\.com/x" is not served'):
        request_obj("n1", BOOTSTRAP, signerName="example.com/x")
    with pytest.raises(
        Invalid, match="node n1 may only request a certificate for itself, not for n2"
    ):
        request_obj("n2", NODE1)
    with pytest.raises(Invalid, match="usages code signing are not a node's"):
        request_obj("n1", BOOTSTRAP, usages=["code signing"])


def test_decisions() -> None:
    assert decide(request_obj("n1", BOOTSTRAP)).step is Step.APPROVE
    assert decide(request_obj("n1", NODE1)).step is Step.APPROVE  # renewal of its own
    pending = request_obj("n1", MANUAL)
    assert decide(pending).step is Step.WAIT
    approved = csr_signer.with_condition(pending, "Approved", "ByAdmin", "ok")
    assert decide(approved).step is Step.SIGN
    denied = csr_signer.with_condition(pending, "Denied", "ByAdmin", "no")
    assert decide(denied).step is Step.SETTLED
    issued = {**approved, "status": {**approved["status"], "certificate": "eA=="}}
    assert decide(issued).step is Step.SETTLED
    # a stored request that became invalid (a node's for another name): Failed, saying why
    forged = request_obj("n2", BOOTSTRAP)
    forged["spec"]["username"], forged["spec"]["groups"] = NODE1.user, list(NODE1.groups)
    decision = decide(forged)
    assert decision.step is Step.FAIL and "not for n2" in decision.message


def test_status_rules_through_the_api() -> None:
    current = request_obj("n1", MANUAL)
    changed = {**current, "spec": {**current["spec"], "usages": ["client auth"]}}
    with pytest.raises(Invalid, match="spec: field is immutable"):
        csr_signer.admit_update(current, changed, "")
    forged = {**current, "status": {"certificate": "eA=="}}
    with pytest.raises(Invalid, match=r"status\.certificate: only the signer writes it"):
        csr_signer.admit_update(current, forged, "status")
    both = csr_signer.with_condition(
        csr_signer.with_condition(current, "Approved", "a", "a"), "Denied", "d", "d"
    )
    with pytest.raises(Invalid, match="both Approved and Denied"):
        csr_signer.admit_update(current, both, "status")
    csr_signer.admit_update(
        current, csr_signer.with_condition(current, "Approved", "a", "a"), "status"
    )


def test_load_ca_refuses_a_foreign_key(ca: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    pki.init_ca(other, "other")
    with pytest.raises(ValueError, match="is not the EC key of"):
        csr_signer.load_ca(ca / "ca.crt", other / "ca.key")
