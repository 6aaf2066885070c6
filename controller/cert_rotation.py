"""The controller's own server certificate renews itself, without a restart.

With the CA key (``ca_key`` in controller.toml) the controller signs its renewal itself
at 2/3 of the certificate's lifetime: a new key, the same subject, addresses, usages and
lifetime (vmferry/pki/renewal.py :func:`~vmferry.pki.renewal.ca_issue`; why not a CSR
object: see there). Its listeners pick the new pair at their next handshake; open
connections keep theirs. Without ``ca_key`` it logs once, when renewal is due, that it
cannot renew itself and what to do.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from vmferry.pki import TlsFiles
from vmferry.pki.renewal import Renewer, ca_issue, report_when_due

WHAT = "controller"
NO_CA_KEY_ADVICE = (
    "the controller has no ca_key (controller.toml) to sign its own renewal; issue a new "
    "certificate with the CA ('vmferry pki issue server NAME --ip ... --dns ...') and copy "
    "it and its key over the files named by cert and key: the controller picks them up at "
    "its next connection, without a restart"
)


def self_renewal(
    tls: TlsFiles | None,
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None,
    *,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> Coroutine[Any, Any, None] | None:
    """The task keeping the controller's certificate ``tls`` fresh (None without TLS)."""
    if tls is None:
        return None
    if ca is None:
        return report_when_due(WHAT, tls, NO_CA_KEY_ADVICE, clock=clock, sleep=sleep)
    return Renewer(WHAT, tls, ca_issue(ca, clock), clock=clock, sleep=sleep).run()
