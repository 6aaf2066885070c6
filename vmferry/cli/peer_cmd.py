"""``vmferry adm peer add|list|remove``: the peer clusters this cluster trusts for
cross-cluster (decentralized) live migration.

Each peer is one entry of the ConfigMap :data:`~vmferry.decentralized.PEERS_CONFIGMAP` in
``openshift-cnv``: key = the peer's cluster name (its sync controller's ``cluster_name``),
value = the peer's CA certificate (PEM), which is what ``vmferry get cm kube-root-ca.crt -n
openshift-cnv -o jsonpath='{.data.ca\\.crt}'`` prints in the peer cluster. The sync
controllers and the handlers accept connections of a peer only through a CA registered
here (see :mod:`vmferry.decentralized`).

The edits are read-modify-write with the ConfigMap's resourceVersion (a concurrent edit
makes them read again), so two administrators adding two peers both land.
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from vmferry.cli.common import run_with_client
from vmferry.client import ApiClient
from vmferry.config import ClientConfig
from vmferry.decentralized import PEERS_CONFIGMAP, PEERS_NAMESPACE
from vmferry.errors import AlreadyExists, Conflict, NotFound

Obj = dict[str, Any]
CONFIGMAP_KIND = "ConfigMap"
EDIT_ATTEMPTS = 5  # read-modify-write rounds before a conflicting edit is reported
_PEER_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MAX_PEER_NAME = 63


class PeerError(ValueError):
    """A peer cannot be added or removed; the message says which rule failed."""


class ConfigMapApi(Protocol):
    """What the peer edits need of an API client (ApiClient, or StoreApi in unit tests)."""

    async def get(self, kind: str, namespace: str | None, name: str) -> Obj: ...

    async def create(self, obj: Obj) -> Obj: ...

    async def update(self, obj: Obj) -> Obj: ...


@dataclass(frozen=True)
class PeerCA:
    """A peer's CA certificate, checked."""

    pem: str
    subject: str
    not_after: str  # ISO 8601, UTC
    fingerprint: str  # SHA-256 of the DER, hex

    @classmethod
    def parse(cls, pem: str, where: str = "the CA") -> PeerCA:
        """PeerError unless ``pem`` is one PEM certificate of a CA."""
        text = pem.strip()
        if text.count("-----BEGIN CERTIFICATE-----") != 1:
            raise PeerError(
                f"{where}: expected exactly one PEM certificate (-----BEGIN CERTIFICATE-----)"
            )
        try:
            cert = x509.load_pem_x509_certificate(text.encode())
        except ValueError as e:
            raise PeerError(f"{where}: not a PEM certificate: {e}") from None
        try:
            bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            bc = None
        if bc is None or not bc.ca:
            raise PeerError(
                f"{where}: {cert.subject.rfc4514_string()} is not a CA certificate (basic "
                "constraints CA:TRUE): register the peer cluster's CA, what 'vmferry get cm "
                "kube-root-ca.crt -n openshift-cnv' shows there, not a leaf certificate"
            )
        return cls(
            pem=text + "\n",
            subject=cert.subject.rfc4514_string(),
            not_after=cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
            fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
        )


def check_peer_name(name: str) -> None:
    if len(name) > MAX_PEER_NAME or not _PEER_NAME.match(name):
        raise PeerError(
            f"peer name {name!r}: must be a DNS label (lower-case letters, digits and '-', "
            f"at most {MAX_PEER_NAME} characters): the peer's cluster name"
        )


async def list_peers(api: ConfigMapApi) -> dict[str, str]:
    """{peer name: CA PEM} ({} when the ConfigMap does not exist)."""
    try:
        cm = await api.get(CONFIGMAP_KIND, PEERS_NAMESPACE, PEERS_CONFIGMAP)
    except NotFound:
        return {}
    return dict(cm.get("data") or {})


async def _own_ca(api: ConfigMapApi) -> str:
    """This cluster's CA as published in ``kube-root-ca.crt`` ("" if not published)."""
    from controller.rbac_controller import ROOT_CA_CONFIGMAP, ROOT_CA_KEY

    try:
        cm = await api.get(CONFIGMAP_KIND, PEERS_NAMESPACE, ROOT_CA_CONFIGMAP)
    except NotFound:
        return ""
    return str((cm.get("data") or {}).get(ROOT_CA_KEY) or "")


async def add_peer(api: ConfigMapApi, name: str, ca_pem: str, *, overwrite: bool = False) -> str:
    """Register ``name`` with ``ca_pem``; returns what happened (for the user)."""
    check_peer_name(name)
    ca = PeerCA.parse(ca_pem, f"--ca for peer {name}")
    own = await _own_ca(api)
    if own and PeerCA.parse(own, "kube-root-ca.crt").fingerprint == ca.fingerprint:
        raise PeerError(
            f"peer {name}: that CA is this cluster's own (kube-root-ca.crt): register the "
            "PEER cluster's CA"
        )
    for _ in range(EDIT_ATTEMPTS):
        try:
            cm = await api.get(CONFIGMAP_KIND, PEERS_NAMESPACE, PEERS_CONFIGMAP)
        except NotFound:
            try:
                await api.create(
                    {
                        "apiVersion": "v1",
                        "kind": CONFIGMAP_KIND,
                        "metadata": {"name": PEERS_CONFIGMAP, "namespace": PEERS_NAMESPACE},
                        "data": {name: ca.pem},
                    }
                )
            except AlreadyExists:
                continue
            return f"peer {name} added (CA {ca.subject}, sha256 {ca.fingerprint[:16]}…)"
        data: dict[str, str] = dict(cm.get("data") or {})
        for other, pem in data.items():
            if other != name and PeerCA.parse(pem, other).fingerprint == ca.fingerprint:
                raise PeerError(
                    f"peer {name}: that CA is already registered as peer {other!r} (a CA "
                    "names one cluster: remove it first)"
                )
        if name in data:
            if PeerCA.parse(data[name], name).fingerprint == ca.fingerprint:
                return f"peer {name} unchanged (already registered with this CA)"
            if not overwrite:
                raise PeerError(
                    f"peer {name} is already registered with another CA: pass --overwrite to "
                    "replace it"
                )
        verb = "replaced" if name in data else "added"
        data[name] = ca.pem
        cm["data"] = data
        try:
            await api.update(cm)
        except (Conflict, NotFound):
            continue
        return f"peer {name} {verb} (CA {ca.subject}, sha256 {ca.fingerprint[:16]}…)"
    raise PeerError(f"peer {name}: {PEERS_CONFIGMAP} kept changing; try again")


async def remove_peer(api: ConfigMapApi, name: str) -> str:
    for _ in range(EDIT_ATTEMPTS):
        try:
            cm = await api.get(CONFIGMAP_KIND, PEERS_NAMESPACE, PEERS_CONFIGMAP)
        except NotFound:
            cm = {}
        data = dict(cm.get("data") or {})
        if name not in data:
            raise PeerError(
                f"peer {name} is not registered (peers: {', '.join(sorted(data)) or 'none'})"
            )
        del data[name]
        cm["data"] = data
        try:
            await api.update(cm)
        except (Conflict, NotFound):
            continue
        return f"peer {name} removed"
    raise PeerError(f"peer {name}: {PEERS_CONFIGMAP} kept changing; try again")


def peer_rows(peers: dict[str, str]) -> list[tuple[str, str, str, str]]:
    rows = [("NAME", "CA SUBJECT", "NOT AFTER", "SHA256")]
    for name in sorted(peers):
        try:
            ca = PeerCA.parse(peers[name], name)
            rows.append((name, ca.subject, ca.not_after, ca.fingerprint[:16]))
        except PeerError as e:
            rows.append((name, f"<invalid: {e}>", "", ""))
    return rows


def cmd_add(args: argparse.Namespace) -> int:
    try:
        pem = Path(args.ca).read_text()
    except OSError as e:
        raise PeerError(f"--ca {args.ca}: {e.strerror or e}") from None

    async def run(api: ApiClient, config: ClientConfig) -> int:
        print(await add_peer(api, args.name, pem, overwrite=args.overwrite))
        return 0

    return run_with_client(args, run)


def cmd_remove(args: argparse.Namespace) -> int:
    async def run(api: ApiClient, config: ClientConfig) -> int:
        print(await remove_peer(api, args.name))
        return 0

    return run_with_client(args, run)


def cmd_list(args: argparse.Namespace) -> int:
    async def run(api: ApiClient, config: ClientConfig) -> int:
        peers = await list_peers(api)
        if not peers:
            print(f"no peer clusters (ConfigMap {PEERS_NAMESPACE}/{PEERS_CONFIGMAP})")
            return 0
        rows = peer_rows(peers)
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            print("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        return 0

    return run_with_client(args, run)


def add_parser(asub: Any, common: argparse.ArgumentParser) -> None:
    """``adm peer``, under ``adm``'s subcommands ``asub``."""
    peer = asub.add_parser(
        "peer", help="peer clusters trusted for cross-cluster live migration (their CAs)"
    )
    psub = peer.add_subparsers(dest="peer_command", required=True)
    p = psub.add_parser(
        "add", parents=[common], help="register a peer cluster's CA under its cluster name"
    )
    p.add_argument("name", help="the peer's cluster name (its sync controller's cluster_name)")
    p.add_argument(
        "--ca",
        required=True,
        metavar="FILE",
        help="the peer's CA (PEM): its kube-root-ca.crt in openshift-cnv, data ca.crt",
    )
    p.add_argument("--overwrite", action="store_true", help="replace a peer's registered CA")
    p.set_defaults(func=cmd_add)
    p = psub.add_parser("list", parents=[common], help="the registered peer clusters")
    p.set_defaults(func=cmd_list)
    p = psub.add_parser("remove", parents=[common], help="stop trusting a peer cluster")
    p.add_argument("name")
    p.set_defaults(func=cmd_remove)
