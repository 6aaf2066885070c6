"""The node certificate renews itself by CSR, without a restart.

At :data:`~vmferry.pki.credentials.RENEW_AT` (2/3) of its certificate's lifetime the
handler makes a new key, asks for a certificate for its own name with the same
addresses and lifetime (a CertificateSigningRequest authenticated by its current
certificate; the controller approves a node's request for itself automatically:
controller/csr_signer.py), and replaces its key and certificate files: the loop, the
writing and what picks the new pair up are vmferry/pki/renewal.py's
(:class:`~vmferry.pki.renewal.Renewer`). A migration in flight keeps the connections it
has; new migrations use the new pair.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cryptography import x509

from vmferry.client import ApiClient
from vmferry.pki import TlsFiles, csr
from vmferry.pki.renewal import RenewalError, Renewer, lifetime_seconds

log = logging.getLogger("vmferry.handler.certs")

CSR_KIND = "CertificateSigningRequest"
POLL_S = 0.5  # s between two looks at the request
SIGN_TIMEOUT_S = 60.0  # a node's own request is approved and signed within a second

__all__ = ["CertRenewer", "CsrIssue", "RenewalError"]


class CsrIssue:
    """An :data:`~vmferry.pki.renewal.Issue` by CertificateSigningRequest for node ``node``
    through ``api``: RenewalError when the request is refused or not signed in time."""

    def __init__(
        self,
        api: ApiClient,
        node: str,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.api = api
        self.node = node
        self.clock = clock
        self.sleep = sleep

    async def __call__(self, old: x509.Certificate) -> tuple[bytes, bytes]:
        san = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
        dns = [d for d in san.get_values_for_type(x509.DNSName) if d != self.node]
        key_pem, request_pem = csr.make_node_request(self.node, ips, dns)
        created = await self.api.create(
            {
                "apiVersion": "certificates.k8s.io/v1",
                "kind": CSR_KIND,
                "metadata": {"name": f"node-csr-{self.node}-{secrets.token_hex(3)}"},
                "spec": {
                    "request": base64.b64encode(request_pem).decode(),
                    "signerName": csr.NODE_SIGNER,
                    "usages": list(csr.NODE_USAGES),
                    "expirationSeconds": max(csr.MIN_SECONDS, lifetime_seconds(old)),
                },
            }
        )
        return key_pem, await self._wait_signed(created["metadata"]["name"])

    async def _wait_signed(self, name: str) -> bytes:
        deadline = self.clock() + SIGN_TIMEOUT_S
        while self.clock() < deadline:
            status = (await self.api.get(CSR_KIND, "", name)).get("status") or {}
            if status.get("certificate"):
                return base64.b64decode(status["certificate"])
            for c in status.get("conditions") or []:
                if c.get("type") in ("Denied", "Failed") and c.get("status") == "True":
                    raise RenewalError(f"{name} {c['type'].lower()}: {c.get('message', '')}")
            await self.sleep(POLL_S)
        raise RenewalError(f"{name} not signed within {SIGN_TIMEOUT_S:.0f}s")


class CertRenewer(Renewer):
    """Renews node ``node``'s certificate files ``tls`` by CSR through ``api``."""

    def __init__(
        self,
        api: ApiClient,
        node: str,
        tls: TlsFiles,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        issue = CsrIssue(api, node, clock=clock, sleep=sleep)
        super().__init__(f"node {node}", tls, issue, clock=clock, sleep=sleep)
        self.api = api
        self.node = node
