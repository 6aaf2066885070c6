"""The peer clusters this handler trusts for cross-cluster migrations (vmferry.decentralized).

``PeerRegistry`` holds the current registry: peer cluster name -> that cluster's CA, as
the ConfigMap :data:`PEERS_CONFIGMAP` in :data:`PEERS_NAMESPACE` says (nodes may read
ConfigMaps; ``on_configmap`` is the handler of an Informer on ConfigMaps there). It is
replaced whole on every change; readers (including gRPC's TLS fetcher, on a core thread)
see one consistent snapshot.

``MigrationTrust`` is this node's trust for migrations, in one place:

- ``server_credentials()``: the migration service's mTLS credentials. The handshake lets
  in client certificates of this cluster's CA *and* of every registered peer's CA (the
  fetcher hands gRPC a new configuration when the files or the registry change); which
  CA a given migration accepts is decided per stream, by ``issuer_refusal``;
- ``issuer_refusal()``: the per-migration rule. A migration whose hand-off names a
  ``peerCluster`` takes only a certificate issued by *that* peer's registered CA; an
  in-cluster migration only one of this cluster's own CA (a peer cluster's node never
  joins an in-cluster migration, whatever its CN);
- :func:`dial_credentials`: the source's trust when it dials the target: this cluster's
  CA in-cluster; *only* the peer's CA across clusters.

Node names repeat across clusters: a node is (the CA that issued its certificate, its
name). :func:`holds_source` / :func:`holds_target` say whether a hand-off's source or
target node is *this* node, never a node of the same name in the peer cluster.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from handler.migration.handoff import MigrationFailed
from vmferry import pki
from vmferry.decentralized import PEERS_CONFIGMAP, PEERS_NAMESPACE, Role
from vmferry.migration_state import Field, MigrationConfig
from vmferry.pki.credentials import _read_pair, registry_server_credentials

log = logging.getLogger(__name__)
Obj = dict[str, Any]

REGISTRY_NAME = f"{PEERS_NAMESPACE}/{PEERS_CONFIGMAP}"


# -- which half of a hand-off this cluster holds -----------------------------------------


def peer_cluster(ms: Mapping[str, Any]) -> str:
    """The other cluster of a cross-cluster hand-off; "" for an in-cluster one."""
    return str(ms.get(Field.PEER_CLUSTER) or "")


def migration_config(ms: Mapping[str, Any]) -> MigrationConfig:
    """The configuration a hand-off runs with, on either side: its
    ``migrationConfiguration``, except that post-copy is never offered across clusters
    (the guest would run at the target while its memory is still in the other cluster)."""
    config = MigrationConfig.from_dict(ms.get(Field.MIGRATION_CONFIGURATION))
    if peer_cluster(ms) and config.allow_post_copy:
        config = dataclasses.replace(config, allow_post_copy=False)
    return config


def is_receiver(ms: Mapping[str, Any]) -> bool:
    """The hand-off is the receiving half of a cross-cluster migration."""
    return ms.get(Field.ROLE) == Role.RECEIVER


def holds_source(ms: Mapping[str, Any], node: str) -> bool:
    """``node`` (of this cluster) is the hand-off's source: on the receiving cluster
    ``sourceNode`` names a node of the other cluster, never this one."""
    return ms.get(Field.SOURCE_NODE) == node and not is_receiver(ms)


def holds_target(ms: Mapping[str, Any], node: str) -> bool:
    """``node`` (of this cluster) is the hand-off's target: on the sending cluster
    ``targetNode`` names a node of the other cluster, never this one."""
    return ms.get(Field.TARGET_NODE) == node and ms.get(Field.ROLE) != Role.SENDER


def not_registered(name: str) -> str:
    return f"peer cluster {name} is not registered in {REGISTRY_NAME}"


def no_postcopy(migration_uid: str, peer: str) -> str:
    """The target's refusal of post-copy in a cross-cluster migration (its guest would
    run here before the sending cluster's record decided)."""
    return (
        f"post-copy is not offered across clusters (migration {migration_uid} comes from "
        f"peer cluster {peer})"
    )


# -- the registry ------------------------------------------------------------------------


@dataclass(frozen=True)
class PeerCA:
    """One registered peer: its name and its CA certificate(s) (a PEM bundle)."""

    name: str
    pem: bytes
    certs: tuple[x509.Certificate, ...]


def issued_by(cert: x509.Certificate, cas: tuple[x509.Certificate, ...]) -> bool:
    """``cert`` was signed directly by one of ``cas`` (issuer name and signature)."""
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
            return True
        except (ValueError, TypeError, InvalidSignature):
            continue
    return False


class PeerRegistry:
    """The registered peer clusters (name -> CA), replaced whole from the ConfigMap."""

    def __init__(self, data: Mapping[str, str] | None = None) -> None:
        self._peers: dict[str, PeerCA] = {}
        self._raw: dict[str, str] = {}
        self.version = 0  # bumped on every change (the TLS fetcher compares it)
        if data:
            self.replace(data)

    def replace(self, data: Mapping[str, str]) -> None:
        """The registry from the ConfigMap's ``data``. A value that is not a PEM
        certificate is left out (and logged): that peer is not registered."""
        if dict(data) == self._raw:
            return
        peers: dict[str, PeerCA] = {}
        for name, value in sorted(data.items()):
            pem = str(value).encode()
            try:
                certs = tuple(x509.load_pem_x509_certificates(pem))
            except ValueError as e:
                log.warning(
                    "%s: the CA of peer cluster %s is not a PEM certificate (%s): not registered",
                    REGISTRY_NAME,
                    name,
                    e,
                )
                continue
            peers[name] = PeerCA(name, pem, certs)
        self._raw = dict(data)
        self._peers = peers  # one assignment: readers see the old or the new registry
        self.version += 1
        log.info("peer clusters: %s", ", ".join(sorted(peers)) or "none registered")

    def on_configmap(self, key: Any, old: Obj | None, new: Obj | None) -> None:
        """Informer handler (ConfigMaps in PEERS_NAMESPACE)."""
        if tuple(key) != (PEERS_NAMESPACE, PEERS_CONFIGMAP):
            return
        self.replace((new or {}).get("data") or {})

    def get(self, name: str) -> PeerCA | None:
        return self._peers.get(name)

    def names(self) -> list[str]:
        return sorted(self._peers)

    def bundle(self) -> bytes:
        """Every registered peer CA, one PEM bundle."""
        return b"".join(
            p.pem if p.pem.endswith(b"\n") else p.pem + b"\n" for p in self._peers.values()
        )

    def issuer_of(self, cert: x509.Certificate) -> str | None:
        """The registered peer whose CA issued ``cert``, None if none did."""
        for peer in list(self._peers.values()):
            if issued_by(cert, peer.certs):
                return peer.name
        return None


# -- this node's trust -------------------------------------------------------------------


class MigrationTrust:
    """This node's TLS files and the peer registry: who may stream a migration here, and
    whom the source trusts when it dials."""

    def __init__(self, tls: pki.TlsFiles, peers: PeerRegistry) -> None:
        self.tls = tls
        self.peers = peers
        self._own: tuple[x509.Certificate, ...] = ()
        self._own_stamp: tuple[int, int, int] | None = None

    def own_cas(self) -> tuple[x509.Certificate, ...]:
        """This cluster's CA certificate(s), re-read when the file changes."""
        st = os.stat(self.tls.ca)
        stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
        if stamp != self._own_stamp:
            self._own = tuple(x509.load_pem_x509_certificates(self.tls.ca.read_bytes()))
            self._own_stamp = stamp
        return self._own

    def server_credentials(self) -> grpc.ServerCredentials:
        """The migration service's: this node's certificate; as client roots this
        cluster's CA plus every registered peer CA (rebuilt when either changes)."""
        peers = self.peers

        def roots(ca_pem: bytes) -> bytes:
            return (ca_pem if ca_pem.endswith(b"\n") else ca_pem + b"\n") + peers.bundle()

        return registry_server_credentials(
            self.tls, lambda: peers.version, roots, "the migration service"
        )

    def issuer_refusal(self, cert_pem: bytes | None, migration_uid: str, peer: str) -> str | None:
        """Why a client certificate may not stream migration ``migration_uid`` (whose
        hand-off names ``peer`` as the other cluster, "" in-cluster); None: the right CA
        issued it. The CN is checked by the caller (peer.PeerGate)."""
        if cert_pem is None:
            return "an unauthenticated peer may not stream a migration"
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            return "the peer's certificate cannot be read"
        own = issued_by(cert, self.own_cas())
        issuer = None if own else self.peers.issuer_of(cert)
        if peer:
            registered = self.peers.get(peer)
            if registered is None:
                return not_registered(peer)
            if issued_by(cert, registered.certs):
                return None
            if own:
                return (
                    f"a certificate of this cluster's CA, but migration {migration_uid}'s "
                    f"source is in {peer}"
                )
            if issuer is not None:
                return (
                    f"a certificate of {issuer}'s CA, but migration {migration_uid}'s "
                    f"source is in {peer}"
                )
            return "no registered peer CA issued this certificate"
        if own:
            return None
        if issuer is not None:
            return (
                f"a certificate of {issuer}'s CA, but migration {migration_uid}'s source "
                "is in this cluster"
            )
        return "neither this cluster's CA nor a registered peer CA issued this certificate"


def dial_credentials(
    tls: pki.TlsFiles | None, peers: PeerRegistry | None, peer: str
) -> grpc.ChannelCredentials | None:
    """The source's credentials for dialling a hand-off's target (None: plain text,
    tests only): this node's certificate as the client's, trusting this cluster's CA
    in-cluster and ONLY the peer's registered CA when the hand-off names ``peer``.
    MigrationFailed when that peer is not registered."""
    if tls is None:
        return None
    if not peer:
        return pki.channel_credentials(tls)
    registered = peers.get(peer) if peers is not None else None
    if registered is None:
        raise MigrationFailed(not_registered(peer))
    _, cert_pem, key_pem = _read_pair(tls)
    return grpc.ssl_channel_credentials(
        root_certificates=registered.pem, private_key=key_pem, certificate_chain=cert_pem
    )
