"""A new certificate for one's own identity by CertificateSigningRequest (renewal).

:class:`CsrIssue` is the :data:`~vmferry.pki.renewal.Issue` of every identity that renews
through the API (controller/csr_signer.py signs): from the current certificate it makes a
new key and a request for the same identity, addresses and lifetime, creates the
CertificateSigningRequest (authenticated by the current certificate) and waits for its
certificate. A node asks :data:`~vmferry.pki.csr.NODE_SIGNER`; any other identity (the
sync controller, a user) :data:`~vmferry.pki.csr.SELF_SIGNER`.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from vmferry.client import ApiClient
from vmferry.pki import csr, identity_from_pem
from vmferry.pki.renewal import RenewalError, lifetime_seconds

CSR_KIND = "CertificateSigningRequest"
POLL_S = 0.5  # s between two looks at the request
SIGN_TIMEOUT_S = 60.0  # an automatically approved request is signed within a second


def request_for(old: x509.Certificate) -> tuple[bytes, dict[str, Any], str]:
    """(new key PEM, CertificateSigningRequest spec, name prefix) renewing ``old``."""
    cert_pem = old.public_bytes(serialization.Encoding.PEM)
    who = identity_from_pem(cert_pem)
    try:
        san = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    node = who.node_name
    if node is not None:
        ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] if san else []
        dns = [d for d in san.get_values_for_type(x509.DNSName) if d != node] if san else []
        key_pem, request_pem = csr.make_node_request(node, ips, dns)
        signer, usages, prefix = csr.NODE_SIGNER, list(csr.NODE_USAGES), f"node-csr-{node}"
    else:
        key_pem, request_pem = csr.make_request(old.subject, san)
        try:
            ekus = old.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        except x509.ExtensionNotFound:
            ekus = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
        usages = ["digital signature", "client auth"]
        if ExtendedKeyUsageOID.SERVER_AUTH in ekus:
            usages.append("server auth")
        signer = csr.SELF_SIGNER
        prefix = "csr-" + "".join(c if c.isalnum() else "-" for c in who.user.lower()).strip("-")
    spec = {
        "request": base64.b64encode(request_pem).decode(),
        "signerName": signer,
        "usages": usages,
        "expirationSeconds": max(csr.MIN_SECONDS, lifetime_seconds(old)),
    }
    return key_pem, spec, prefix


class CsrIssue:
    """Renews by CertificateSigningRequest through ``api``; RenewalError when the request
    is denied or failed, or not signed within ``timeout`` seconds. ``on_created`` is told
    the request's name (the CLI prints it for the administrator)."""

    def __init__(
        self,
        api: ApiClient,
        *,
        timeout: float = SIGN_TIMEOUT_S,
        on_created: Callable[[str], None] = lambda name: None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.api = api
        self.timeout = timeout
        self.on_created = on_created
        self.clock = clock
        self.sleep = sleep

    async def __call__(self, old: x509.Certificate) -> tuple[bytes, bytes]:
        key_pem, spec, prefix = request_for(old)
        created = await self.api.create(
            {
                "apiVersion": "certificates.k8s.io/v1",
                "kind": CSR_KIND,
                "metadata": {"name": f"{prefix}-{secrets.token_hex(3)}"},
                "spec": spec,
            }
        )
        name = created["metadata"]["name"]
        self.on_created(name)
        return key_pem, await self._wait_signed(name)

    async def _wait_signed(self, name: str) -> bytes:
        deadline = self.clock() + self.timeout
        while self.clock() < deadline:
            status = (await self.api.get(CSR_KIND, "", name)).get("status") or {}
            if status.get("certificate"):
                return base64.b64decode(status["certificate"])
            for c in status.get("conditions") or []:
                if c.get("type") in ("Denied", "Failed") and c.get("status") == "True":
                    raise RenewalError(f"{name} {c['type'].lower()}: {c.get('message', '')}")
            await self.sleep(POLL_S)
        raise RenewalError(f"{name} not signed within {self.timeout:.0f}s")
