"""Certificates by request: the CertificateSigningRequest API rules and the signer.

A node (``vmferry join``) creates a CertificateSigningRequest (certificates.k8s.io/v1)
with its own key's request; :func:`stamp_requester` (on create, in the API) records who
asked (``spec.username``/``groups``/``uid``: never what the client wrote) and refuses a
request that cannot be signed. :func:`admit_update` keeps the spec immutable and
``status.certificate`` the signer's alone. An administrator approves or denies
(``vmferry certificate approve|deny``: an ``Approved``/``Denied`` condition written on
the status); requests of a bootstrap token of the group
:data:`vmferry.bootstrap_token.NODE_BOOTSTRAPPERS_GROUP`, and a node's request for its
own name, are approved automatically.

A second signer, :data:`~vmferry.pki.csr.SELF_SIGNER`, renews the requester's own
identity (:func:`~vmferry.pki.csr.check_self_request`: the subject is exactly the
requester's CN and groups; never a token's identity or a node's): the sync controller's
own requests (:data:`~vmferry.pki.csr.AUTO_RENEWING`) are approved automatically, users'
(``vmferry certificate renew``) wait for an administrator, as Kubernetes has no
automatic approval of users' client certificates.

:class:`CsrSigner` (runs in the controller when it holds the CA key, ``ca_key`` in
controller.toml) takes each request through :func:`decide`, in order:

1. a request with a certificate, or Denied, or Failed, is settled: nothing to do;
2. a signer not served, a request that does not parse or verify, or one its signer may
   not sign (:func:`check`: the subject, the usages, a node asking for another name, an
   identity asking for another's) gets ``Failed``, with why;
3. Approved: it signs, ``status.certificate`` = the PEM certificate;
4. not approved yet: auto-approval as above, else it waits for an administrator.
"""

from __future__ import annotations

import base64
import copy
import enum
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controller.store import Store
from vmferry import pki
from vmferry.bootstrap_token import NODE_BOOTSTRAPPERS_GROUP
from vmferry.errors import Invalid
from vmferry.informer import Informer, Key, WorkQueue
from vmferry.objects import conditions
from vmferry.pki import csr
from vmferry.pki.issuing import public_der

log = logging.getLogger("vmferry.controller.csr")

KIND = "CertificateSigningRequest"
APPROVED, DENIED, FAILED = "Approved", "Denied", "Failed"

Obj = dict[str, Any]


class Step(enum.Enum):
    SETTLED = "settled"
    FAIL = "fail"
    SIGN = "sign"
    APPROVE = "approve"
    WAIT = "wait"


@dataclass(frozen=True)
class Decision:
    step: Step
    message: str = ""


def condition_types(obj: Obj) -> set[str]:
    return {
        c.get("type", "")
        for c in (obj.get("status") or {}).get("conditions") or []
        if c.get("status") == "True"
    }


def _request(obj: Obj) -> x509.CertificateSigningRequest:
    try:
        pem = base64.b64decode(obj["spec"]["request"])
    except (KeyError, ValueError):
        raise ValueError("spec.request: not base64") from None
    return csr.parse_request(pem)


SIGNERS = (csr.NODE_SIGNER, csr.SELF_SIGNER)


def _requester(spec: Obj) -> pki.Identity:
    return pki.Identity(user=str(spec.get("username", "")), groups=tuple(spec.get("groups") or ()))


def _requester_node(spec: Obj) -> str | None:
    return _requester(spec).node_name


def check(request: x509.CertificateSigningRequest, spec: Obj) -> str | None:
    """Why ``request`` may not be signed by the signer ``spec`` names (None: it may)."""
    usages = spec.get("usages") or []
    if spec.get("signerName") == csr.SELF_SIGNER:
        return csr.check_self_request(request, usages, _requester(spec))
    return csr.check_node_request(request, usages, _requester_node(spec))


def stamp_requester(obj: Obj, who: pki.Identity) -> None:
    """On create: ``spec.username``/``groups`` are the caller's; Invalid for a request
    that can never be signed (the reason names the field)."""
    spec = obj["spec"]
    name = obj["metadata"].get("name") or obj["metadata"].get("generateName", "")
    if spec.get("signerName") not in SIGNERS:
        raise Invalid(
            f'{KIND} "{name}": spec.signerName: "{spec.get("signerName")}" is not served '
            f"(only {', '.join(SIGNERS)})"
        )
    spec["username"], spec["groups"], spec["uid"] = who.user, list(who.groups), ""
    try:
        reason = check(_request(obj), spec)
    except ValueError as e:
        raise Invalid(f'{KIND} "{name}": {e}') from None
    if reason:
        raise Invalid(f'{KIND} "{name}": spec.request: {reason}')
    obj.pop("status", None)


def admit_update(current: Obj, new: Obj, subresource: str) -> None:
    """The spec never changes; through the API the status may only gain Approved or
    Denied (never both), and ``status.certificate`` is written by the signer alone."""
    name = current["metadata"]["name"]
    if new.get("spec") != current.get("spec"):
        raise Invalid(f'{KIND} "{name}": spec: field is immutable')
    before = (current.get("status") or {}).get("certificate")
    if (new.get("status") or {}).get("certificate") != before:
        raise Invalid(f'{KIND} "{name}": status.certificate: only the signer writes it')
    if {APPROVED, DENIED} <= condition_types(new):
        raise Invalid(f'{KIND} "{name}": status.conditions: both Approved and Denied')


def decide(obj: Obj) -> Decision:
    """The next step of one request (module docstring, steps 1-4)."""
    types = condition_types(obj)
    if (obj.get("status") or {}).get("certificate") or types & {DENIED, FAILED}:
        return Decision(Step.SETTLED)
    spec = obj.get("spec") or {}
    if spec.get("signerName") not in SIGNERS:
        return Decision(Step.FAIL, f"signer {spec.get('signerName')!r} is not served")
    try:
        request = _request(obj)
    except ValueError as e:
        return Decision(Step.FAIL, str(e))
    reason = check(request, spec)
    if reason:
        return Decision(Step.FAIL, reason)
    if APPROVED in types:
        return Decision(Step.SIGN)
    if spec["signerName"] == csr.SELF_SIGNER:
        user = str(spec.get("username", ""))
        if user in csr.AUTO_RENEWING:  # check() made sure it is its own identity
            return Decision(Step.APPROVE, f"auto-approved: {user} renews its own certificate")
        return Decision(Step.WAIT)  # a user's: an administrator approves (as Kubernetes)
    requester = _requester_node(spec)
    if NODE_BOOTSTRAPPERS_GROUP in (spec.get("groups") or ()):
        return Decision(
            Step.APPROVE, f"auto-approved: a bootstrap token of {NODE_BOOTSTRAPPERS_GROUP}"
        )
    if requester is not None and requester == csr.requested_node(request):
        return Decision(Step.APPROVE, f"auto-approved: node {requester} renews its own certificate")
    return Decision(Step.WAIT)


def with_condition(obj: Obj, kind: str, reason: str, message: str) -> Obj:
    out = copy.deepcopy(obj)
    status = out.setdefault("status", {})
    now = conditions.now_rfc3339()
    status.setdefault("conditions", []).append(
        {
            "type": kind,
            "status": "True",
            "reason": reason,
            "message": message,
            "lastUpdateTime": now,
            "lastTransitionTime": now,
        }
    )
    return out


def load_ca(cert_path: Path, key_path: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """The CA certificate and its key (``ca``, ``ca_key`` of controller.toml); ValueError
    unless the key is the certificate's EC key."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or public_der(
        key.public_key()
    ) != public_der(cert.public_key()):
        raise ValueError(f"ca_key {key_path} is not the EC key of {cert_path}")
    return cert, key


class CsrSigner:
    """Approves (automatically, as above) and signs CertificateSigningRequests."""

    def __init__(
        self,
        store: Store,
        csrs: Informer,
        ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.csrs = csrs
        self.ca_cert, self.ca_key = ca
        self.clock = clock
        self.queue = WorkQueue()
        csrs.add_handler(lambda key, old, new: self.queue.add(key))

    async def run(self) -> None:
        await self.queue.run(self.reconcile, "csr-signer")

    async def reconcile(self, key: Key) -> None:
        obj = self.csrs.get("", key[-1])
        if obj is None:
            return
        decision = decide(obj)
        name = obj["metadata"]["name"]
        if decision.step in (Step.SETTLED, Step.WAIT):
            if decision.step is Step.WAIT:
                log.info(
                    "csr %s: waiting for approval ('vmferry certificate approve %s')", name, name
                )
            return
        if decision.step is Step.FAIL:
            log.warning("csr %s: not signed: %s", name, decision.message)
            new = with_condition(obj, FAILED, "SignerValidationFailure", decision.message)
        elif decision.step is Step.APPROVE:
            log.info("csr %s: %s", name, decision.message)
            new = with_condition(obj, APPROVED, "AutoApproved", decision.message)
        else:
            spec = obj["spec"]
            pem = csr.sign_request(
                _request(obj),
                self.ca_cert,
                self.ca_key,
                seconds=int(spec.get("expirationSeconds") or csr.DEFAULT_SECONDS),
                usages=spec["usages"] if spec["signerName"] == csr.SELF_SIGNER else csr.NODE_USAGES,
            )
            new = copy.deepcopy(obj)
            new.setdefault("status", {})["certificate"] = base64.b64encode(pem).decode()
            log.info("csr %s: signed a certificate for %s", name, spec.get("username"))
        await self.store.update(new, subresource="status")
