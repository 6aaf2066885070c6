"""The node certificate renews itself by CSR, without a restart.

At :data:`~vmferry.pki.credentials.RENEW_AT` (2/3) of its certificate's lifetime the
handler makes a new key, asks for a certificate for its own name with the same
addresses and lifetime (a CertificateSigningRequest authenticated by its current
certificate, vmferry/cert_request.py; the controller approves a node's request for
itself automatically: controller/csr_signer.py), and replaces its key and certificate
files: the loop, the writing and what picks the new pair up are vmferry/pki/renewal.py's
(:class:`~vmferry.pki.renewal.Renewer`). A migration in flight keeps the connections it
has; new migrations use the new pair.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from vmferry.cert_request import CsrIssue
from vmferry.client import ApiClient
from vmferry.pki import TlsFiles
from vmferry.pki.renewal import RenewalError, Renewer

__all__ = ["CertRenewer", "RenewalError"]


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
        issue = CsrIssue(api, clock=clock, sleep=sleep)
        super().__init__(f"node {node}", tls, issue, clock=clock, sleep=sleep)
        self.api = api
        self.node = node
