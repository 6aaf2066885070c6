"""Certificate rotation of every daemon identity, without a restart.

:class:`Renewer` is the loop all daemons share: at :data:`~vmferry.pki.credentials.RENEW_AT`
(2/3) of the certificate's lifetime it asks an :data:`Issue` function for a new key and
certificate (the same subject, addresses and lifetime) and replaces the identity's key
and certificate files (key first; every reader waits for a matching pair). Servers built
on the files pick the new pair at their next handshake (pki.server_credentials), API
clients open a new channel for their next call (vmferry/client.py); connections in use
(a migration in flight) keep theirs.

Two ways to get the new certificate:

- by CertificateSigningRequest, for a daemon that talks to the API (the handler's node
  certificate: handler/cert_renewer.py);
- :func:`ca_issue`, directly with the CA key, for the controller's own server
  certificate when it holds ``ca_key`` (controller.toml). The controller does not go
  through a CSR object for itself: its server certificate must be renewed on every
  replica, leader or not, and even while the store is unavailable, and the CSR signer runs
  on the leader only; every renewal is logged with the old and new serial and expiry.

Without a way to renew (a controller without ``ca_key``), :func:`report_when_due` logs
once, when renewal is due, what to do instead.

A failed attempt is logged and retried after :data:`RETRY_S`; the certificate in use
stays until it expires.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from vmferry.errors import ApiError
from vmferry.pki.credentials import issued_at, renewal_due
from vmferry.pki.issuing import (
    CERT_MODE,
    CLOCK_SKEW,
    KEY_MODE,
    TlsFiles,
    _key_pem,
    _write_atomic,
    sign_leaf,
)

log = logging.getLogger("vmferry.pki.renewal")

RETRY_S = 10.0  # s between two attempts when one failed
MIN_INTERVAL_S = 60.0  # s between renewals whose result is due at once (a CA near its end)

# The new (private key PEM, certificate PEM) for the identity of the certificate given.
Issue = Callable[[x509.Certificate], Awaitable[tuple[bytes, bytes]]]


class RenewalError(Exception):
    """A renewal attempt failed; the message says why."""


def _utc(moment: datetime) -> str:
    return f"{moment:%Y-%m-%dT%H:%M:%SZ}"


class Renewer:
    """Renews the certificate files ``tls`` of ``what`` (a name for the logs) with ``issue``."""

    def __init__(
        self,
        what: str,
        tls: TlsFiles,
        issue: Issue,
        *,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self.what = what
        self.tls = tls
        self.issue = issue
        self.clock = clock
        self.sleep = sleep
        self.renewals = 0

    def current(self) -> x509.Certificate:
        return x509.load_pem_x509_certificate(self.tls.cert.read_bytes())

    async def run(self) -> None:
        """Renew at each 2/3 point, forever (until cancelled)."""
        while True:
            wait = renewal_due(self.current()).timestamp() - self.clock()
            if wait > 0:
                await self.sleep(wait)
                continue  # the files may have been replaced meanwhile: look again
            try:
                await self.renew()
            except (RenewalError, ApiError, OSError, ValueError) as e:
                log.warning("%s: certificate renewal failed, retrying: %s", self.what, e)
                await self.sleep(RETRY_S)
                continue
            new = self.current()
            if renewal_due(new).timestamp() <= self.clock():  # never a renewal loop
                log.warning(
                    "%s: the renewed certificate is due already (valid until %s: the CA's "
                    "own expiry?); next attempt in %.0fs",
                    self.what,
                    _utc(new.not_valid_after_utc),
                    MIN_INTERVAL_S,
                )
                await self.sleep(MIN_INTERVAL_S)

    async def renew(self) -> None:
        """One renewal: a new key and certificate from ``issue``, written in place;
        RenewalError (or the issuer's error) leaves the files as they were."""
        old = self.current()
        key_pem, cert_pem = await self.issue(old)
        new = x509.load_pem_x509_certificate(cert_pem)
        if new.subject != old.subject:
            raise RenewalError(
                f"the new certificate is for {new.subject.rfc4514_string()}, "
                f"not {old.subject.rfc4514_string()}"
            )
        _write_atomic(self.tls.key, key_pem, KEY_MODE)
        _write_atomic(self.tls.cert, cert_pem, CERT_MODE)
        self.renewals += 1
        log.info(
            "%s: certificate renewed (%s: serial %x valid until %s, now serial %x until %s)",
            self.what,
            self.tls.cert,
            old.serial_number,
            _utc(old.not_valid_after_utc),
            new.serial_number,
            _utc(new.not_valid_after_utc),
        )


def lifetime_seconds(cert: x509.Certificate) -> int:
    """How long ``cert`` lasts, from its issuance (not-before is back-dated)."""
    return int((cert.not_valid_after_utc - issued_at(cert)).total_seconds())


def renew_with_ca(
    old: x509.Certificate,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    now: datetime,
) -> tuple[bytes, bytes]:
    """(key PEM, certificate PEM): a new key certified for ``old``'s subject, SANs and
    extended key usages, for ``old``'s lifetime from ``now`` (never past the CA's)."""
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        san = old.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    try:
        usages = list(old.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
    except x509.ExtensionNotFound:
        usages = []
    not_after = min(now + (old.not_valid_after_utc - issued_at(old)), ca_cert.not_valid_after_utc)
    cert = sign_leaf(
        ca_cert, ca_key, key.public_key(), old.subject, san, usages, now - CLOCK_SKEW, not_after
    )
    return _key_pem(key), cert.public_bytes(serialization.Encoding.PEM)


def ca_issue(
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    clock: Callable[[], float] = time.time,
) -> Issue:
    """An :data:`Issue` signing with the CA itself (:func:`renew_with_ca`)."""
    ca_cert, ca_key = ca

    async def issue(old: x509.Certificate) -> tuple[bytes, bytes]:
        now = datetime.fromtimestamp(clock(), UTC)
        if old.issuer != ca_cert.subject:
            raise RenewalError(
                f"{old.subject.rfc4514_string()} is not a certificate of the CA "
                f"{ca_cert.subject.rfc4514_string()}"
            )
        # EC key generation and signing take about a millisecond: no thread needed.
        return renew_with_ca(old, ca_cert, ca_key, now)

    return issue


async def report_when_due(
    what: str,
    tls: TlsFiles,
    advice: str,
    *,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
) -> None:
    """For an identity that cannot renew itself: wait until its certificate is due and
    log once (per certificate) that it cannot, and ``advice``; then wait for new files."""
    reported: int | None = None
    while True:
        cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
        wait = renewal_due(cert).timestamp() - clock()
        if wait > 0:
            await sleep(wait)
            continue
        if reported != cert.serial_number:
            reported = cert.serial_number
            log.warning(
                "%s: certificate %s is due for renewal (expires at %s) and cannot be renewed "
                "here: %s",
                what,
                tls.cert,
                _utc(cert.not_valid_after_utc),
                advice,
            )
        await sleep(RETRY_S)  # until new files replace it
