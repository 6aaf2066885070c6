"""The cluster CA and the files of every identity: ``vmferry pki init`` and ``issue``.

Everything is EC P-256 with SHA-256 signatures. Each file is written atomically (a
temporary file in the same directory, fsync, rename), so a reader (a server reloading its
certificate) sees the old or the new content, never a partial file, and a private key is
never readable by others, not even for a moment.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vmferry.decentralized import SYNC_IDENTITY
from vmferry.pki.identity import NODE_USER_PREFIX, NODES_GROUP

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
NODES_DIR = "nodes"
USERS_DIR = "users"
SERVERS_DIR = "servers"
SYNC_DIR = "sync"

KEY_MODE = 0o600  # private keys: owner only
CERT_MODE = 0o644  # certificates are public
CLOCK_SKEW = timedelta(minutes=5)  # not-before is back-dated so skewed peers accept a fresh cert
SERIAL_BITS = 159  # RFC 5280: positive, at most 20 octets


@dataclass(frozen=True)
class TlsFiles:
    """Paths of one identity's TLS material: the CA to trust, its certificate and key."""

    ca: Path
    cert: Path
    key: Path


# ---------------------------------------------------------------------------------------
# Validation


def _validate_name(kind: str, name: str, *, ascii_only: bool = False) -> None:
    """Raise ValueError unless ``name`` is usable as an identity and a file name."""
    if not name:
        raise ValueError(f"{kind} name must not be empty")
    if "/" in name or "\\" in name:
        raise ValueError(f"invalid {kind} name {name!r}: must not contain '/' or '\\'")
    if any(ch.isspace() for ch in name):
        raise ValueError(f"invalid {kind} name {name!r}: must not contain whitespace")
    if not name.isprintable():
        raise ValueError(f"invalid {kind} name {name!r}: must not contain control characters")
    if name in (".", ".."):
        raise ValueError(f"invalid {kind} name {name!r}")
    if ascii_only and not name.isascii():
        raise ValueError(
            f"invalid {kind} name {name!r}: must be ASCII (it is also a DNS name in the certificate)"
        )


def _validate_group(group: str) -> None:
    if not group or group != group.strip() or not group.isprintable():
        raise ValueError(
            f"invalid group {group!r}: must be non-empty, printable, without surrounding spaces"
        )


def _validate_days(days: int) -> None:
    if days <= 0:
        raise ValueError(f"validity must be at least 1 day, got {days}")


def _san(ips: Sequence[str], dns: Sequence[str], default_dns: str) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    seen_ips: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    for ip in ips:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            raise ValueError(f"invalid IP address {ip!r}") from None
        if addr not in seen_ips:
            seen_ips.add(addr)
            names.append(x509.IPAddress(addr))
    seen_dns: set[str] = set()
    for name in [*dns, default_dns]:
        if not name or not name.isascii() or any(ch.isspace() for ch in name):
            raise ValueError(f"invalid DNS name {name!r}: must be non-empty ASCII without spaces")
        if name.lower() not in seen_dns:
            seen_dns.add(name.lower())
            names.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(names)


# ---------------------------------------------------------------------------------------
# Files


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with ``mode``: temp file in the same directory, fsync, rename.

    The file never exists with a wider mode than ``mode``, and readers see either the old
    or the new content, never a partial file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # best effort: make the rename durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _load_ca(pki_dir: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """Return the CA certificate and key; FileNotFoundError if there is no CA yet."""
    cert_path, key_path = pki_dir / CA_CERT_FILE, pki_dir / CA_KEY_FILE
    if not cert_path.exists() or not key_path.exists():
        raise FileNotFoundError(
            f"no CA in {pki_dir} ({CA_CERT_FILE} and {CA_KEY_FILE} are needed); "
            "run 'vmferry pki init' first"
        )
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path} is not an EC private key")
    if public_der(key.public_key()) != public_der(cert.public_key()):
        raise ValueError(f"{key_path} does not belong to {cert_path}")
    return cert, key


def public_der(public_key: Any) -> bytes:
    der: bytes = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def _now() -> datetime:
    return datetime.now(UTC)


# ---------------------------------------------------------------------------------------
# CA and issuing


def init_ca(
    pki_dir: Path, cluster_name: str = "vmferry", *, days: int = 3650, force: bool = False
) -> Path:
    """Create the cluster CA: ``ca.crt`` and ``ca.key`` (mode 0600) in ``pki_dir``.

    The CA is self-signed, ``CN=<cluster_name>-ca``, basicConstraints CA:true (no
    intermediates) and key usage keyCertSign/cRLSign.

    Returns the path of ``ca.crt``. Raises FileExistsError if ``ca.key`` exists and
    ``force`` is false (with ``force`` the CA is replaced and every certificate issued by
    the old one stops being trusted), ValueError for an empty cluster name or ``days < 1``.
    """
    pki_dir = Path(pki_dir)
    _validate_days(days)
    if not cluster_name or not cluster_name.isprintable():
        raise ValueError(f"invalid cluster name {cluster_name!r}")
    key_path, cert_path = pki_dir / CA_KEY_FILE, pki_dir / CA_CERT_FILE
    if key_path.exists() and not force:
        raise FileExistsError(
            f"a CA already exists in {pki_dir} ({key_path}); "
            "use --force to replace it (this invalidates every issued certificate)"
        )
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{cluster_name}-ca")])
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(secrets.randbits(SERIAL_BITS) | 1)
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), False)
        .sign(key, hashes.SHA256())
    )
    pki_dir.mkdir(parents=True, exist_ok=True)
    # Key first: a crash in between leaves a key without a cert, which init detects.
    _write_atomic(key_path, _key_pem(key), KEY_MODE)
    _write_atomic(cert_path, _cert_pem(cert), CERT_MODE)
    return cert_path


def sign_leaf(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    public_key: Any,
    subject: x509.Name,
    san: x509.SubjectAlternativeName | None,
    usages: Sequence[x509.ObjectIdentifier],
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    """The CA's signature on a leaf certificate for ``public_key`` (every vmferry leaf:
    not a CA, digital signature, ``usages`` as extended key usage, key identifiers)."""
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(secrets.randbits(SERIAL_BITS) | 1)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(list(usages)), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
    )
    if san is not None:
        builder = builder.add_extension(san, critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def _issue(
    pki_dir: Path,
    subdir: str,
    name: str,
    subject: x509.Name,
    *,
    san: x509.SubjectAlternativeName | None,
    usages: Sequence[x509.ObjectIdentifier],
    days: int,
    validity: tuple[datetime, datetime] | None = None,
) -> TlsFiles:
    """Sign a fresh key for ``subject`` with the CA and write ``<subdir>/<name>.{crt,key}``.

    The leaf never outlives the CA: its not-after is clamped to the CA's. ``validity``
    (not-before, not-after) overrides the window; tests use it to make expired
    certificates.
    """
    pki_dir = Path(pki_dir)
    _validate_days(days)
    ca_cert, ca_key = _load_ca(pki_dir)
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    not_after = min(now + timedelta(days=days), ca_cert.not_valid_after_utc)
    not_before = now - CLOCK_SKEW
    if validity is not None:
        not_before, not_after = validity
        if not_after <= not_before:
            raise ValueError("validity: not-after must be later than not-before")
    cert = sign_leaf(ca_cert, ca_key, key.public_key(), subject, san, usages, not_before, not_after)

    files = TlsFiles(
        ca=pki_dir / CA_CERT_FILE,
        cert=pki_dir / subdir / f"{name}.crt",
        key=pki_dir / subdir / f"{name}.key",
    )
    # A server reloading meanwhile may see the new key with the old cert (or the reverse);
    # the reloader in server_credentials() only switches once the pair matches.
    _write_atomic(files.key, _key_pem(key), KEY_MODE)
    _write_atomic(files.cert, _cert_pem(cert), CERT_MODE)
    return files


def issue_node(
    pki_dir: Path,
    name: str,
    *,
    ips: Sequence[str] = (),
    dns: Sequence[str] = (),
    days: int = 30,
) -> TlsFiles:
    """Issue (or renew) the certificate of node ``name``: ``nodes/<name>.crt`` and ``.key``.

    Subject ``CN=system:node:<name>, O=system:nodes``; SAN = ``ips`` + ``dns`` + DNS
    ``<name>``; EKU serverAuth and clientAuth (a handler serves and calls other handlers).

    Returns the identity's files. Raises ValueError for a bad name, IP or DNS name or
    ``days < 1``; FileNotFoundError if the CA does not exist yet.
    """
    _validate_name("node", name, ascii_only=True)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, NODES_GROUP),
            x509.NameAttribute(NameOID.COMMON_NAME, f"{NODE_USER_PREFIX}{name}"),
        ]
    )
    return _issue(
        pki_dir,
        NODES_DIR,
        name,
        subject,
        san=_san(ips, dns, name),
        usages=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
        days=days,
    )


def issue_user(
    pki_dir: Path,
    name: str,
    *,
    groups: Sequence[str] = (),
    days: int = 30,
    validity: tuple[datetime, datetime] | None = None,
) -> TlsFiles:
    """Issue (or renew) the client certificate of user ``name``: ``users/<name>.crt``/``.key``.

    Subject ``CN=<name>`` plus one ``O=<group>`` per group (in order, duplicates dropped);
    EKU clientAuth only. ``validity`` = (not-before, not-after) replaces the usual window
    (tests: an already expired certificate).

    Returns the identity's files. Raises ValueError for a bad name or group or
    ``days < 1``; FileNotFoundError if the CA does not exist yet.
    """
    _validate_name("user", name)
    unique_groups: list[str] = []
    for group in groups:
        _validate_group(group)
        if group not in unique_groups:
            unique_groups.append(group)
    subject = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, g) for g in unique_groups]
        + [x509.NameAttribute(NameOID.COMMON_NAME, name)]
    )
    return _issue(
        pki_dir,
        USERS_DIR,
        name,
        subject,
        san=None,
        usages=(ExtendedKeyUsageOID.CLIENT_AUTH,),
        days=days,
        validity=validity,
    )


def issue_server(
    pki_dir: Path,
    name: str,
    *,
    ips: Sequence[str] = (),
    dns: Sequence[str] = (),
    days: int = 30,
) -> TlsFiles:
    """Issue (or renew) a server certificate (the controller): ``servers/<name>.crt``/``.key``.

    Subject ``CN=<name>``; SAN = ``ips`` + ``dns`` + DNS ``<name>``; EKU serverAuth and
    clientAuth. Clients check the address they dial against the SAN, so list every IP and
    DNS name the server is reached by.

    Returns the identity's files. Raises ValueError for a bad name, IP or DNS name or
    ``days < 1``; FileNotFoundError if the CA does not exist yet.
    """
    _validate_name("server", name, ascii_only=True)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    return _issue(
        pki_dir,
        SERVERS_DIR,
        name,
        subject,
        san=_san(ips, dns, name),
        usages=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
        days=days,
    )


def issue_sync(
    pki_dir: Path,
    name: str,
    *,
    ips: Sequence[str] = (),
    dns: Sequence[str] = (),
    days: int = 30,
) -> TlsFiles:
    """Issue (or renew) the certificate of the sync controller ``name`` (cross-cluster
    migration, ``vmferry-sync-controller``): ``sync/<name>.crt`` and ``.key``.

    Subject ``CN=system:vmferry:sync-controller`` (``vmferry.decentralized.SYNC_IDENTITY``:
    the user its cluster's API sees, and what a peer cluster's sync controller checks), no
    O; SAN = ``ips`` + ``dns`` + DNS ``<name>``; EKU serverAuth and clientAuth (it serves
    the peers' sync controllers and dials them and its own API). Peers dial the address it
    advertises: list that IP or DNS name.

    Returns the identity's files. Raises ValueError for a bad name, IP or DNS name or
    ``days < 1``; FileNotFoundError if the CA does not exist yet.
    """
    _validate_name("sync controller", name, ascii_only=True)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, SYNC_IDENTITY)])
    return _issue(
        pki_dir,
        SYNC_DIR,
        name,
        subject,
        san=_san(ips, dns, name),
        usages=(ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH),
        days=days,
    )


def load_ca_pem(pki_dir: Path) -> bytes:
    """Return the PEM bytes of ``<pki_dir>/ca.crt``; FileNotFoundError if there is no CA."""
    path = Path(pki_dir) / CA_CERT_FILE
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no CA certificate at {path}; run 'vmferry pki init' first"
        ) from None


def cert_not_after(path: Path) -> datetime:
    """Return the (timezone-aware, UTC) expiry of the PEM certificate at ``path``.

    Raises OSError if the file cannot be read, ValueError if it is not a PEM certificate.
    """
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    return cert.not_valid_after_utc
