"""Certificate signing requests: a node makes its key where it runs and asks the cluster
CA for a certificate (Kubernetes' kubelet TLS bootstrap).

Node side: :func:`make_node_request` (a fresh EC P-256 key and a PKCS#10 request for
``CN=system:node:<name>, O=system:nodes`` with the node's addresses as SANs);
:func:`ca_hash` pins the CA the node trusts (``sha256:`` + the SHA-256 of its
SubjectPublicKeyInfo, as ``kubeadm join --discovery-token-ca-cert-hash``).

CA side (controller/csr_signer.py): :func:`parse_request` verifies a request's
self-signature, :func:`check_node_request` says why it is not a node request that may be
signed, and :func:`sign_request` signs it with the CA: the subject and SANs of the
request, the usages of a node certificate, the lifetime asked (bounded by the CA's).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vmferry.decentralized import SYNC_IDENTITY
from vmferry.pki.identity import NODE_USER_PREFIX, NODES_GROUP, Identity
from vmferry.pki.issuing import CLOCK_SKEW, _key_pem, _san, public_der, sign_leaf

# signerName of node certificates (client and serving: a handler is both); Kubernetes'
# name for the kubelet's client certificates.
NODE_SIGNER = "kubernetes.io/kube-apiserver-client-kubelet"
NODE_USAGES = ("digital signature", "client auth", "server auth")
# signerName of a certificate for the requester's own identity (a renewal: users'
# `vmferry certificate renew`, the sync controller's own renewal); vmferry's signer.
SELF_SIGNER = "vmferry.io/self"
CLIENT_USAGES = ("digital signature", "client auth")
# Identities whose own requests are approved automatically (daemons renewing themselves);
# the usages each may ask for. Users' requests wait for an administrator.
AUTO_RENEWING: dict[str, tuple[str, ...]] = {SYNC_IDENTITY: NODE_USAGES}
# Users that never get a certificate by SELF_SIGNER: token identities and nodes (theirs
# is NODE_SIGNER).
NOT_SELF_PREFIXES = (
    "system:serviceaccount:",
    "system:bootstrap:",
    "system:anonymous",
    NODE_USER_PREFIX,
)
IMPLICIT_GROUPS = ("system:authenticated",)  # added by the API's authenticator, not in certs
_USAGE_OIDS = {
    "client auth": ExtendedKeyUsageOID.CLIENT_AUTH,
    "server auth": ExtendedKeyUsageOID.SERVER_AUTH,
}
MIN_SECONDS = 120  # s; shortest expirationSeconds (Kubernetes: 600; short-lived test clusters)
DEFAULT_SECONDS = 30 * 24 * 3600  # a node certificate's lifetime when the request names none
HASH_PREFIX = "sha256:"


def ca_hash(ca_pem: bytes) -> str:
    """``sha256:<hex>`` of the (first) CA certificate's SubjectPublicKeyInfo."""
    cert = x509.load_pem_x509_certificate(ca_pem)
    return HASH_PREFIX + hashlib.sha256(public_der(cert.public_key())).hexdigest()


def node_subject(name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, NODES_GROUP),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{NODE_USER_PREFIX}{name}"),
        ]
    )


def make_node_request(
    name: str, ips: Sequence[str] = (), dns: Sequence[str] = ()
) -> tuple[bytes, bytes]:
    """(private key PEM, request PEM) of node ``name``; the key never leaves the node.
    Raises ValueError for a bad IP or DNS name."""
    key = ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(node_subject(name))
        .add_extension(_san(ips, dns, name), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _key_pem(key), request.public_bytes(serialization.Encoding.PEM)


def make_request(
    subject: x509.Name, san: x509.SubjectAlternativeName | None
) -> tuple[bytes, bytes]:
    """(private key PEM, request PEM) of a fresh EC P-256 key for ``subject`` and ``san``
    (a renewal: the current certificate's)."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    request = builder.sign(key, hashes.SHA256())
    return _key_pem(key), request.public_bytes(serialization.Encoding.PEM)


def parse_request(pem: bytes) -> x509.CertificateSigningRequest:
    """The request in ``pem``; ValueError unless it parses and its signature verifies."""
    try:
        request = x509.load_pem_x509_csr(pem)
    except ValueError as e:
        raise ValueError(f"spec.request is not a PEM certificate request: {e}") from None
    if not request.is_signature_valid:
        raise ValueError("spec.request: the request's signature does not verify")
    return request


def requested_node(request: x509.CertificateSigningRequest) -> str | None:
    """The node name a request's subject names (``CN=system:node:<name>``), or None."""
    cns = request.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value) if len(cns) == 1 else ""
    return cn[len(NODE_USER_PREFIX) :] if cn.startswith(NODE_USER_PREFIX) else None


def check_node_request(
    request: x509.CertificateSigningRequest, usages: Sequence[str], requester_node: str | None
) -> str | None:
    """Why ``request`` may not become a node certificate (None: it may). The subject is
    exactly ``CN=system:node:<name>, O=system:nodes``; the usages are a node's; a
    requester that is a node (``requester_node``) asks only for its own name."""
    node = requested_node(request)
    if not node:
        return f"the subject must be CN={NODE_USER_PREFIX}<node name>, O={NODES_GROUP}"
    orgs = [str(a.value) for a in request.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]
    if orgs != [NODES_GROUP] or len(request.subject) != 2:
        return f"the subject must be exactly CN={NODE_USER_PREFIX}{node}, O={NODES_GROUP}"
    extra = sorted(set(usages) - set(NODE_USAGES))
    if extra:
        return f"usages {', '.join(extra)} are not a node's ({', '.join(NODE_USAGES)})"
    if requester_node is not None and requester_node != node:
        return f"node {requester_node} may only request a certificate for itself, not for {node}"
    return None


def subject_identity(subject: x509.Name) -> Identity | None:
    """The Identity a subject names: only CN and O attributes, exactly one CN (else None)."""
    cns = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    orgs = subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    if len(cns) != 1 or len(cns) + len(orgs) != len(subject):
        return None
    return Identity(str(cns[0].value), tuple(str(o.value) for o in orgs))


def self_usages(user: str) -> tuple[str, ...]:
    """The usages user ``user`` may ask for by :data:`SELF_SIGNER`."""
    return AUTO_RENEWING.get(user, CLIENT_USAGES)


def check_self_request(
    request: x509.CertificateSigningRequest, usages: Sequence[str], requester: Identity
) -> str | None:
    """Why ``request`` may not be signed by :data:`SELF_SIGNER` for ``requester`` (None:
    it may): the subject is exactly the requester's own identity (CN = user, one O per
    group the requester is in), the requester has a certificate identity (not a token's,
    not a node: nodes use :data:`NODE_SIGNER`) and the usages are its own."""
    if not requester.user or requester.user.startswith(NOT_SELF_PREFIXES):
        return f"{requester.user or 'an anonymous caller'} cannot request a certificate by {SELF_SIGNER}"
    asked = subject_identity(request.subject)
    own = sorted(set(requester.groups) - set(IMPLICIT_GROUPS))
    if asked is None or asked.user != requester.user or sorted(set(asked.groups)) != own:
        wanted = ", ".join([f"CN={requester.user}", *(f"O={g}" for g in own)])
        return (
            f"{requester.user} may only request a certificate for itself "
            f"({wanted}), not for {request.subject.rfc4514_string() or 'an empty subject'}"
        )
    allowed = self_usages(requester.user)
    if "client auth" not in usages:
        return f"usages must include client auth ({', '.join(allowed)})"
    extra = sorted(set(usages) - set(allowed))
    if extra:
        return f"usages {', '.join(extra)} are not {requester.user}'s ({', '.join(allowed)})"
    return None


def sign_request(
    request: x509.CertificateSigningRequest,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    *,
    seconds: int = DEFAULT_SECONDS,
    now: datetime | None = None,
    usages: Sequence[str] = NODE_USAGES,
) -> bytes:
    """The PEM certificate of a checked request: its subject and SANs, the extended key
    usages of ``usages`` (default a node's), ``seconds`` of lifetime (never past the CA's
    not-after)."""
    now = now or datetime.now(UTC)
    try:
        san = request.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    not_after = min(now + timedelta(seconds=seconds), ca_cert.not_valid_after_utc)
    cert = sign_leaf(
        ca_cert,
        ca_key,
        request.public_key(),
        request.subject,
        san,
        [oid for name, oid in sorted(_USAGE_OIDS.items(), reverse=True) if name in usages],
        now - CLOCK_SKEW,
        not_after,
    )
    return cert.public_bytes(serialization.Encoding.PEM)
