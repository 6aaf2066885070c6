"""gRPC TLS credentials from an identity's files, and the server's certificate reload.

A server built with :func:`server_credentials` re-reads its files on the first handshake
after they change (renewal): no restart, and established connections keep theirs.
Clients reload by building a new channel with :func:`channel_credentials`.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from vmferry.pki.issuing import CLOCK_SKEW, TlsFiles, public_der

log = logging.getLogger(__name__)


RENEW_AT = 2 / 3  # of a certificate's lifetime: past it, using it logs a renewal warning


class CertificateExpired(ValueError):
    """A certificate file is outside its validity period; the message names the file,
    its subject and the date."""


_warned_renewal: set[tuple[Path, datetime.datetime]] = set()


FilesStamp = tuple[tuple[int, int, int], ...]


def files_stamp(*paths: Path | str) -> FilesStamp:
    """(mtime, size, inode) of each file: what changes when a renewal replaces it, for
    the readers that reload certificate files (API and etcd clients, HTTPS listeners).
    OSError when one cannot be read."""
    out = []
    for path in paths:
        st = os.stat(path)
        out.append((st.st_mtime_ns, st.st_size, st.st_ino))
    return tuple(out)


def issued_at(cert: x509.Certificate) -> datetime.datetime:
    """When ``cert`` was issued: vmferry back-dates not-before by ``CLOCK_SKEW``
    (issuing.py), so a certificate lasting longer than that was issued that much later."""
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return start + CLOCK_SKEW if end - start > CLOCK_SKEW else start


def renewal_due(cert: x509.Certificate) -> datetime.datetime:
    """When ``cert`` is to be renewed: at :data:`RENEW_AT` of its lifetime."""
    start = issued_at(cert)
    return start + (cert.not_valid_after_utc - start) * RENEW_AT


def check_validity(
    path: Path, cert: x509.Certificate, now: datetime.datetime | None = None
) -> None:
    """Raise CertificateExpired when ``cert`` (read from ``path``) has expired or is not
    valid yet; log a warning (once per file and expiry) past :data:`RENEW_AT` of its
    lifetime."""
    now = now or datetime.datetime.now(datetime.UTC)
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    subject = cert.subject.rfc4514_string() or "no subject"
    if now > end:
        raise CertificateExpired(
            f"certificate {path} ({subject}) expired at {end:%Y-%m-%dT%H:%M:%SZ}: "
            "renew it ('vmferry pki issue ...') and retry"
        )
    if now < start:
        raise CertificateExpired(
            f"certificate {path} ({subject}) is not valid before {start:%Y-%m-%dT%H:%M:%SZ} "
            "(is this host's clock right?)"
        )
    if now > renewal_due(cert) and (path, end) not in _warned_renewal:
        _warned_renewal.add((path, end))
        log.warning(
            "certificate %s (%s) is past %d%% of its lifetime: it expires at %s, renew it "
            "(a user's: 'vmferry certificate renew'; a daemon renews its own: see its log)",
            path,
            subject,
            round(RENEW_AT * 100),
            f"{end:%Y-%m-%dT%H:%M:%SZ}",
        )


def _read_pair(tls: TlsFiles) -> tuple[bytes, bytes, bytes]:
    """Read (ca, cert, key) PEMs; ValueError unless they parse and the key matches the
    cert, CertificateExpired when the certificate or a CA is out of its validity period."""
    ca_pem, cert_pem, key_pem = tls.ca.read_bytes(), tls.cert.read_bytes(), tls.key.read_bytes()
    for ca in x509.load_pem_x509_certificates(ca_pem):
        check_validity(tls.ca, ca)
    cert = x509.load_pem_x509_certificate(cert_pem)
    check_validity(tls.cert, cert)
    key = serialization.load_pem_private_key(key_pem, password=None)
    if public_der(key.public_key()) != public_der(cert.public_key()):
        raise ValueError(f"{tls.key} does not belong to {tls.cert}")
    return ca_pem, cert_pem, key_pem


_FileStamp = tuple[tuple[int, int, int], ...]


class CertificateReloader:
    """The certificate-configuration fetcher behind :func:`server_credentials`.

    gRPC calls it (from a core thread) before every new TLS handshake. It stats the CA,
    cert and key files and, when any of them changed (mtime, size or inode), rebuilds the
    configuration; otherwise it returns ``None`` ("keep the current one"). A half-renewed
    pair (key and cert not matching yet) or an unreadable file keeps the current
    configuration and is retried on the next handshake. ``_lock`` guards ``_stamp``.
    Established connections are never affected.
    """

    def __init__(self, tls: TlsFiles) -> None:
        self._tls = tls
        self._lock = threading.Lock()
        self._stamp = self._stat()
        self._failed_stamp: _FileStamp | None = None
        self.initial = self._config(*_read_pair(tls))
        self.reloads = 0  # how many times a new configuration was handed to gRPC

    def _stat(self) -> _FileStamp:
        stamps = []
        for path in (self._tls.ca, self._tls.cert, self._tls.key):
            st = os.stat(path)
            stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamps)

    @staticmethod
    def _config(ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> Any:
        # The chain served ends with the CA: a joining node (vmferry join) reads it from
        # the handshake and trusts it only if its hash is the --ca-hash it was given.
        chain = cert_pem.rstrip(b"\n") + b"\n" + ca_pem
        return grpc.ssl_server_certificate_configuration(
            [(key_pem, chain)], root_certificates=ca_pem
        )

    def __call__(self) -> Any:
        with self._lock:
            stamp: _FileStamp | None = None
            try:
                stamp = self._stat()  # before reading: a later change is seen next time
                if stamp == self._stamp:
                    return None
                config = self._config(*_read_pair(self._tls))
            except Exception:
                if stamp != self._failed_stamp:  # log once per state of the files
                    self._failed_stamp = stamp
                    log.warning(
                        "not reloading TLS files %s, %s (keeping the current ones)",
                        self._tls.cert,
                        self._tls.key,
                        exc_info=True,
                    )
                return None
            self._stamp = stamp
            self.reloads += 1
            log.info("reloaded TLS certificate %s", self._tls.cert)
            return config


class RegistryReloader:
    """The certificate-configuration fetcher of a server whose client roots follow a
    registry of peer CAs as well as its own TLS files (the handler's migration service,
    the sync controller's server): a new configuration when the files change (renewal,
    via :class:`CertificateReloader`) or the registry's ``version()`` does; None ("keep
    the current one") otherwise. ``roots(ca_pem)`` gives the client roots from this
    node's CA; ``what`` names the server in the log line of a failed reload."""

    def __init__(
        self,
        tls: TlsFiles,
        version: Callable[[], int],
        roots: Callable[[bytes], bytes],
        what: str,
    ) -> None:
        self._tls = tls
        self._files = CertificateReloader(tls)
        self._version_now = version
        self._roots = roots
        self._what = what
        self._lock = threading.Lock()
        self._version = version()
        self.initial = self._build()

    def _build(self) -> Any:
        ca_pem, cert_pem, key_pem = _read_pair(self._tls)
        return grpc.ssl_server_certificate_configuration(
            [(key_pem, cert_pem)], root_certificates=self._roots(ca_pem)
        )

    def __call__(self) -> Any:  # gRPC's handshake thread, before every new handshake
        with self._lock:
            files_changed = self._files() is not None
            version = self._version_now()
            if not files_changed and version == self._version:
                return None
            try:
                config = self._build()
            except Exception:
                log.warning("not reloading %s's TLS trust", self._what, exc_info=True)
                return None
            self._version = version
            return config


def registry_server_credentials(
    tls: TlsFiles, version: Callable[[], int], roots: Callable[[bytes], bytes], what: str
) -> grpc.ServerCredentials:
    """mTLS server credentials whose client roots follow a peer registry
    (:class:`RegistryReloader`). Reads the files: OSError / ValueError as
    :func:`server_credentials`."""
    fetcher = RegistryReloader(tls, version, roots, what)
    return grpc.dynamic_ssl_server_credentials(
        fetcher.initial, fetcher, require_client_authentication=True
    )


def server_credentials(
    tls: TlsFiles, *, require_client_cert: bool = True
) -> grpc.ServerCredentials:
    """Return mTLS server credentials: clients must present a cert signed by ``tls.ca``.

    ``require_client_cert=False`` makes server-only TLS (no client certificate is even
    requested; gRPC Python cannot request one optionally): the controller's listener for
    bearer-token clients.

    The cert, key and CA files are re-read on the first new connection after any of them
    changes (renewal), so the server never needs a restart; connections already open keep
    the credentials they were established with. Raises OSError if a file cannot be read,
    ValueError if they do not parse or the key does not match the cert.
    """
    reloader = CertificateReloader(tls)
    return grpc.dynamic_ssl_server_credentials(
        reloader.initial, reloader, require_client_authentication=require_client_cert
    )


def ca_only_channel_credentials(ca: Path) -> grpc.ChannelCredentials:
    """TLS channel credentials that trust only ``ca`` and present no certificate (clients
    that authenticate with a bearer token)."""
    ca_pem = Path(ca).read_bytes()
    for cert in x509.load_pem_x509_certificates(ca_pem):
        check_validity(Path(ca), cert)
    return grpc.ssl_channel_credentials(root_certificates=ca_pem)


def channel_credentials(tls: TlsFiles) -> grpc.ChannelCredentials:
    """Return mTLS channel credentials: trust only ``tls.ca``, present ``tls.cert``/``tls.key``.

    The files are read once. To pick up a renewed certificate, build a new channel with
    fresh credentials (existing channels keep the old ones). gRPC checks the dialled host
    against the server's SAN; use the ``grpc.ssl_target_name_override`` channel option when
    dialling an address the certificate does not name. Raises OSError if a file cannot be
    read, ValueError if they do not parse or the key does not match the cert.
    """
    ca_pem, cert_pem, key_pem = _read_pair(tls)
    return grpc.ssl_channel_credentials(
        root_certificates=ca_pem, private_key=key_pem, certificate_chain=cert_pem
    )
