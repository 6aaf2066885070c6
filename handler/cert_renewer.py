"""The node certificate renews itself by CSR, without a restart.

At :data:`~vmferry.pki.credentials.RENEW_AT` (2/3) of its certificate's lifetime the
handler makes a new key, asks for a certificate for its own name with the same
addresses and lifetime (a CertificateSigningRequest authenticated by its current
certificate; the controller approves a node's request for itself automatically:
controller/csr_signer.py), and replaces its key and certificate files (key first; every
reader waits for a matching pair). Then:

- the migration service and every other server built on the files picks the new pair at
  its next TLS handshake (pki.server_credentials, handler/peers.py);
- the API client opens a new channel for its next call (vmferry/client.py) and retires
  the old one after a grace period;
- a migration in flight keeps the connections it has; new migrations use the new pair.

A failed attempt (controller away, request refused) is logged and retried after
:data:`RETRY_S`; the certificate in use stays until it expires.
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
from vmferry.errors import ApiError
from vmferry.pki import TlsFiles, csr
from vmferry.pki.credentials import issued_at, renewal_due
from vmferry.pki.issuing import CERT_MODE, KEY_MODE, _write_atomic

log = logging.getLogger("vmferry.handler.certs")

CSR_KIND = "CertificateSigningRequest"
RETRY_S = 10.0  # s between two attempts when one failed
MIN_INTERVAL_S = 60.0  # s between renewals whose result is due at once (a CA near its end)
POLL_S = 0.5  # s between two looks at the request
SIGN_TIMEOUT_S = 60.0  # a node's own request is approved and signed within a second


class RenewalError(Exception):
    """A renewal attempt failed; the message says why."""


class CertRenewer:
    """Renews node ``node``'s certificate files ``tls`` through ``api``."""

    def __init__(
        self,
        api: ApiClient,
        node: str,
        tls: TlsFiles,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.api = api
        self.node = node
        self.tls = tls
        self.clock = clock
        self.sleep = sleep
        self.renewals = 0

    def current(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.tls.cert.read_bytes())

    async def run(self) -> None:
        """Renew at each 2/3 point, forever (until cancelled)."""
        while True:
            due = renewal_due(self.current()).timestamp()
            wait = due - self.clock()
            if wait > 0:
                await self.sleep(wait)
                continue  # the files may have been replaced meanwhile: look again
            try:
                await self.renew()
            except (RenewalError, ApiError, OSError, ValueError) as e:
                log.warning("node %s: certificate renewal failed, retrying: %s", self.node, e)
                await self.sleep(RETRY_S)
                continue
            new = self.current()
            if renewal_due(new).timestamp() <= self.clock():  # never a renewal loop
                log.warning(
                    "node %s: the renewed certificate is due already (valid until %s: the "
                    "CA's own expiry?); next attempt in %.0fs",
                    self.node,
                    f"{new.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}",
                    MIN_INTERVAL_S,
                )
                await self.sleep(MIN_INTERVAL_S)

    async def renew(self) -> None:
        """One renewal: a new key and certificate for the same name, addresses and
        lifetime; RenewalError when the request is refused or not signed in time."""
        old = self.current()
        san = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
        dns = [d for d in san.get_values_for_type(x509.DNSName) if d != self.node]
        key_pem, request_pem = csr.make_node_request(self.node, ips, dns)
        lifetime = old.not_valid_after_utc - issued_at(old)
        created = await self.api.create(
            {
                "apiVersion": "certificates.k8s.io/v1",
                "kind": CSR_KIND,
                "metadata": {"name": f"node-csr-{self.node}-{secrets.token_hex(3)}"},
                "spec": {
                    "request": base64.b64encode(request_pem).decode(),
                    "signerName": csr.NODE_SIGNER,
                    "usages": list(csr.NODE_USAGES),
                    "expirationSeconds": max(csr.MIN_SECONDS, int(lifetime.total_seconds())),
                },
            }
        )
        cert_pem = await self._wait_signed(created["metadata"]["name"])
        _write_atomic(self.tls.key, key_pem, KEY_MODE)
        _write_atomic(self.tls.cert, cert_pem, CERT_MODE)
        self.renewals += 1
        new = x509.load_pem_x509_certificate(cert_pem)
        log.info(
            "node %s: certificate renewed (was valid until %s, now until %s)",
            self.node,
            f"{old.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}",
            f"{new.not_valid_after_utc:%Y-%m-%dT%H:%M:%SZ}",
        )

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
