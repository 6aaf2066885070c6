"""The peer clusters this cluster's sync controller trusts (issue 18, "Trust across two
CAs"): :class:`PeerCAs`, the CAs registered in the ConfigMap
``openshift-cnv/vmferry-peer-clusters`` (fed by the daemon's informer). The sync server's
client roots follow them (link.py, with vmferry.pki.credentials.RegistryReloader)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from vmferry.decentralized import PEERS_CONFIGMAP, PEERS_NAMESPACE

log = logging.getLogger("vmferry.sync.peers")


def common_name(cert: x509.Certificate) -> str:
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = cns[0].value if cns else ""
    return value.decode() if isinstance(value, bytes) else value


class PeerCAs:
    """This cluster's registered peer clusters: name -> CA (the data of the ConfigMap
    :data:`~vmferry.decentralized.PEERS_CONFIGMAP`). Updated on the event loop; read
    also from gRPC's handshake thread (one immutable snapshot, swapped whole)."""

    def __init__(self, data: Mapping[str, Any] | None = None) -> None:
        self._snapshot: tuple[int, dict[str, tuple[bytes, x509.Certificate]]] = (0, {})
        if data:
            self.update(data)

    @property
    def version(self) -> int:
        return self._snapshot[0]

    def update(self, data: Mapping[str, Any]) -> None:
        """Replace the registered peers with ``data`` ({peer name: CA PEM}); an entry that
        is not a CA certificate is left out, with a log line saying why."""
        version, current = self._snapshot
        parsed: dict[str, tuple[bytes, x509.Certificate]] = {}
        for name, pem in sorted(data.items()):
            if name in current and current[name][0] == str(pem).encode():
                parsed[name] = current[name]
                continue
            try:
                cert = x509.load_pem_x509_certificate(str(pem).encode())
                constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
                if not constraints.value.ca:
                    raise ValueError("not a CA certificate (basicConstraints CA:false)")
            except (ValueError, x509.ExtensionNotFound) as e:
                log.warning(
                    "peer cluster %s in %s/%s ignored: its value is not a CA certificate "
                    "in PEM (%s)",
                    name,
                    PEERS_NAMESPACE,
                    PEERS_CONFIGMAP,
                    e,
                )
                continue
            parsed[name] = (str(pem).encode(), cert)
        if parsed.keys() != current.keys() or any(parsed[n][0] != current[n][0] for n in parsed):
            self._snapshot = (version + 1, parsed)
            log.info("registered peer clusters: %s", ", ".join(parsed) or "(none)")

    def names(self) -> list[str]:
        return list(self._snapshot[1])

    def pem(self, name: str) -> bytes | None:
        entry = self._snapshot[1].get(name)
        return entry[0] if entry else None

    def bundle(self) -> bytes:
        """Every registered CA, concatenated (empty when none is registered)."""
        return b"".join(pem if pem.endswith(b"\n") else pem + b"\n" for pem, _ in self._cas())

    def _cas(self) -> list[tuple[bytes, x509.Certificate]]:
        return list(self._snapshot[1].values())

    def issuer_of(self, cert: x509.Certificate) -> str | None:
        """The registered name of the CA that issued ``cert``, or None."""
        for name, (_, ca) in self._snapshot[1].items():
            try:
                cert.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            return name
        return None


def no_peer_ca_rule() -> str:
    return f"register it in ConfigMap {PEERS_NAMESPACE}/{PEERS_CONFIGMAP}"
