"""Who a peer is: the identity in a certificate's subject, as Kubernetes reads it.

The user is the subject CN, the groups are the subject O attributes; a node is the user
``system:node:<name>`` in the group ``system:nodes``. :func:`peer_identity` reads the
verified client certificate of a gRPC call.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID

log = logging.getLogger(__name__)

NODE_USER_PREFIX = "system:node:"
NODES_GROUP = "system:nodes"

_AUTH_CONTEXT_CERT_KEY = "x509_pem_cert"  # gRPC auth_context key of the verified peer cert


@dataclass(frozen=True)
class Identity:
    """Who a peer is: the certificate subject CN (``user``) and O attributes (``groups``)."""

    user: str
    groups: tuple[str, ...]

    @property
    def is_node(self) -> bool:
        """True for a node identity: user ``system:node:<name>`` in group ``system:nodes``."""
        return (
            self.user.startswith(NODE_USER_PREFIX)
            and len(self.user) > len(NODE_USER_PREFIX)
            and NODES_GROUP in self.groups
        )

    @property
    def node_name(self) -> str | None:
        """The node name of a node identity, ``None`` for anything else."""
        return self.user[len(NODE_USER_PREFIX) :] if self.is_node else None


def identity_from_pem(cert_pem: bytes) -> Identity:
    """Return the Identity (subject CN, subject O attributes in order) of a PEM certificate.

    Raises ValueError if ``cert_pem`` is not a certificate or its subject has no CN.
    """
    cert = x509.load_pem_x509_certificate(cert_pem)
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not cns:
        raise ValueError("certificate subject has no common name (CN)")
    groups = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
    return Identity(user=_attr_str(cns[0].value), groups=tuple(_attr_str(g.value) for g in groups))


# A certificate's identity is a pure function of its bytes: peer_identity parses each
# certificate once, not on every request (~50 us a parse).
_identity_of_peer = functools.lru_cache(maxsize=1024)(identity_from_pem)


def _attr_str(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def peer_identity(context: grpc.aio.ServicerContext) -> Identity | None:
    """Return the Identity of the caller's verified client certificate, or ``None``.

    ``None`` means no certificate identity: a plain-text or server-only-TLS connection, or
    a certificate gRPC verified but whose subject has no CN. Works with the sync
    ``grpc.ServicerContext`` as well.
    """
    auth = context.auth_context() or {}
    pems = auth.get(_AUTH_CONTEXT_CERT_KEY) or []
    if not pems:
        return None
    try:
        return _identity_of_peer(bytes(pems[0]))
    except ValueError:
        log.warning("peer certificate without a usable identity", exc_info=True)
        return None
