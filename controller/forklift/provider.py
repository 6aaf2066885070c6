"""Providers: how the orchestrator reaches a cluster, and the ``Ready`` condition.

An ``openshift`` Provider with a ``spec.url`` is another cluster: its ``spec.secret`` holds
``token`` (the long-lived service-account token of 12.6.1.1) and ``cacert`` (that
cluster's ``kube-root-ca.crt``, 12.6.1). The orchestrator connects to the url (the
cluster's bearer-token listener, ``token_listen``) over TLS trusting only ``cacert`` and
authenticates with the token; nothing else is trusted (``insecureSkipVerify`` is refused).
A Provider without a url is this cluster (MTV's local ``host`` provider): no secret.

``Ready`` is True once a connection and the token were accepted, else False with a
:class:`ProviderReason` and a message naming what failed: the Secret, the address
(unreachable), TLS (the server's certificate does not chain to the CA, named by its
subject), or the token (the message of the cluster that refused it).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

from cryptography import x509

from controller.forklift.cluster import ClusterApi
from vmferry.client import ApiClient
from vmferry.config import ClientConfig
from vmferry.errors import ApiError, NotFound, Unauthorized, Unavailable
from vmferry.informer import Key
from vmferry.objects import conditions, schema
from vmferry.objects.schema.forklift import (
    SECRET_CACERT,
    SECRET_INSECURE,
    SECRET_TOKEN,
    ProviderType,
    truthy,
)
from vmferry.pki import TlsFiles

log = logging.getLogger(__name__)
Obj = dict[str, Any]

READY = "Ready"
HOST_PROVIDER = "host"  # the name of the local provider (MTV creates it in its namespace)
CONNECT_TIMEOUT = 10.0  # s: a provider's TLS probe and token check
RECHECK_SECONDS = 60.0  # a Ready provider is checked again this often; a failing one sooner
RETRY_SECONDS = 10.0


class ProviderReason(StrEnum):
    CONNECTED = "Connected"
    HOST = "Host"  # this cluster
    SECRET_MISSING = "SecretNotFound"
    SECRET_INVALID = "SecretInvalid"
    UNREACHABLE = "Unreachable"
    TLS_FAILURE = "TLSFailure"
    TOKEN_REFUSED = "TokenRefused"


class ProviderError(Exception):
    def __init__(self, reason: ProviderReason, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ProviderAccess:
    """How to reach a provider's cluster: ``server`` "" is this cluster."""

    name: str  # namespace/name, for messages
    server: str = ""
    token: str = field(default="", repr=False)
    ca_pem: bytes = field(default=b"", repr=False)

    @property
    def local(self) -> bool:
        return not self.server


def server_of(url: str) -> str:
    """``host:port`` of a provider url (``https://host:port[/]`` or ``host:port``)."""
    text = url.strip()
    for scheme in ("https://", "grpcs://"):
        if text.lower().startswith(scheme):
            text = text[len(scheme) :]
    text = text.rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or "/" in text:
        raise ProviderError(
            ProviderReason.UNREACHABLE,
            f'spec.url "{url}" is not https://HOST:PORT (the cluster\'s token listener)',
        )
    return text


def _decoded(secret: Obj, key: str) -> str:
    value = (secret.get("data") or {}).get(key)
    if value is None:
        return ""
    try:
        return base64.b64decode(value, validate=True).decode().strip()
    except (binascii.Error, UnicodeDecodeError):
        return ""


def ca_subject(ca_pem: bytes) -> str:
    certs = x509.load_pem_x509_certificates(ca_pem)
    return ", ".join(c.subject.rfc4514_string() for c in certs)


async def provider_access(home: ClusterApi, provider: Mapping[str, Any]) -> ProviderAccess:
    """Read a Provider's url and Secret (in this cluster); ProviderError says what is wrong."""
    meta = provider["metadata"]
    name = f"{meta.get('namespace', '')}/{meta['name']}"
    spec = provider.get("spec") or {}
    if spec.get("type") != ProviderType.OPENSHIFT:
        raise ProviderError(
            ProviderReason.SECRET_INVALID, f'provider {name}: type must be "openshift"'
        )
    url = str(spec.get("url") or "")
    if not url:
        return ProviderAccess(name)
    server = server_of(url)
    ref = spec.get("secret") or {}
    secret_ns = ref.get("namespace") or meta.get("namespace", "")
    try:
        secret = await home.get("Secret", secret_ns, ref.get("name", ""))
    except NotFound:
        raise ProviderError(
            ProviderReason.SECRET_MISSING,
            f'secret "{secret_ns}/{ref.get("name", "")}" of provider {name} not found',
        ) from None
    where = f'secret "{secret_ns}/{ref.get("name", "")}"'
    if truthy(_decoded(secret, SECRET_INSECURE)):
        raise ProviderError(
            ProviderReason.SECRET_INVALID,
            f"{where}: {SECRET_INSECURE} is not supported: give the cluster's CA certificate "
            f"({SECRET_CACERT}, what 'vmferry get cm kube-root-ca.crt -o "
            "jsonpath={.data.ca\\.crt}' prints there)",
        )
    token = _decoded(secret, SECRET_TOKEN)
    if not token:
        raise ProviderError(
            ProviderReason.SECRET_INVALID,
            f"{where}: no {SECRET_TOKEN} (the service account's bearer token, 12.6.1.1)",
        )
    ca = _decoded(secret, SECRET_CACERT)
    try:
        if not ca:
            raise ValueError("missing")
        ca_subject(ca.encode())
    except ValueError:
        raise ProviderError(
            ProviderReason.SECRET_INVALID,
            f"{where}: {SECRET_CACERT} is missing or not a PEM certificate (the cluster's "
            "root CA, 12.6.1)",
        ) from None
    return ProviderAccess(name, server, token, ca.encode())


class Connector(Protocol):
    """Reaches providers' clusters: ``check`` proves the access works (returns who the
    cluster says the token is), ``connect`` returns an API client for it."""

    async def check(self, access: ProviderAccess) -> str: ...

    async def connect(self, access: ProviderAccess) -> ClusterApi: ...


async def tls_probe(server: str, ca_pem: bytes, *, timeout: float = CONNECT_TIMEOUT) -> None:
    """Open a TLS connection to ``server`` trusting only ``ca_pem``: ProviderError
    UNREACHABLE or TLS_FAILURE (naming the CA) when it cannot."""
    host, _, port = server.rpartition(":")
    host = host.strip("[]")
    context = ssl.create_default_context(cadata=ca_pem.decode())
    context.set_alpn_protocols(["h2"])
    try:
        async with asyncio.timeout(timeout):
            _, writer = await asyncio.open_connection(
                host, int(port), ssl=context, server_hostname=host
            )
    except ssl.SSLCertVerificationError as e:
        raise ProviderError(
            ProviderReason.TLS_FAILURE,
            f"TLS failure connecting to {server}: its certificate is not trusted by the "
            f"provider's CA ({ca_subject(ca_pem)}): {e.verify_message or e.reason}",
        ) from None
    except ssl.SSLError as e:
        raise ProviderError(
            ProviderReason.TLS_FAILURE,
            f"TLS failure connecting to {server} with the provider's CA "
            f"({ca_subject(ca_pem)}): {e.reason or e}",
        ) from None
    except TimeoutError:
        raise ProviderError(
            ProviderReason.UNREACHABLE, f"{server} unreachable: no answer within {timeout:.0f}s"
        ) from None
    except OSError as e:
        raise ProviderError(
            ProviderReason.UNREACHABLE, f"{server} unreachable: {e.strerror or e}"
        ) from None
    writer.close()
    try:
        await writer.wait_closed()
    except (OSError, ssl.SSLError):
        pass


class TokenConnector:
    """The controller's connector: ``vmferry.client.ApiClient`` with the provider's token
    over TLS trusting only its CA (written under ``ca_dir``, one file per CA). One client is
    kept per provider (replaced when its url, token or CA changes), closed by :meth:`close`."""

    def __init__(self, local: ClusterApi, ca_dir: Path, *, timeout: float = CONNECT_TIMEOUT):
        self.local = local
        self.ca_dir = ca_dir
        self.timeout = timeout
        # per provider (namespace/name): what its client was made with, and the client
        self._clients: dict[str, tuple[tuple[str, str, bytes], ApiClient]] = {}
        self._lock = asyncio.Lock()

    async def _ca_file(self, ca_pem: bytes) -> Path:
        path = self.ca_dir / f"{hashlib.sha256(ca_pem).hexdigest()[:24]}.crt"

        def write() -> None:
            self.ca_dir.mkdir(parents=True, exist_ok=True)
            if not path.exists() or path.read_bytes() != ca_pem:
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(ca_pem)
                tmp.replace(path)

        await asyncio.to_thread(write)
        return path

    async def _client(self, access: ProviderAccess) -> ApiClient:
        wanted = (access.server, access.token, access.ca_pem)
        async with self._lock:  # the provider and migration reconcilers share clients
            cached = self._clients.get(access.name)
            if cached is not None and cached[0] == wanted:
                return cached[1]
            if cached is not None:
                await cached[1].close()  # the provider's url, token or CA changed
            tls = TlsFiles(ca=await self._ca_file(access.ca_pem), cert=Path(), key=Path())
            config = ClientConfig(server=access.server, tls=tls, token=access.token)
            client = ApiClient(config, timeout=self.timeout)
            self._clients[access.name] = (wanted, client)
            return client

    async def check(self, access: ProviderAccess) -> str:
        if access.local:
            return "this cluster"
        await tls_probe(access.server, access.ca_pem, timeout=self.timeout)
        client = await self._client(access)
        try:
            user, _ = await client.whoami()
        except Unauthorized as e:
            raise ProviderError(
                ProviderReason.TOKEN_REFUSED, f"{access.server} refused the token: {e.message}"
            ) from None
        except Unavailable as e:
            raise ProviderError(
                ProviderReason.UNREACHABLE,
                f"{access.server}: {e.message} (is spec.url the cluster's token listener, "
                "token_listen, which needs no client certificate?)",
            ) from None
        return user

    async def connect(self, access: ProviderAccess) -> ClusterApi:
        if access.local:
            return self.local
        return await self._client(access)

    async def close(self) -> None:
        clients, self._clients = self._clients, {}
        for _, client in clients.values():
            await client.close()


class ProviderReconciler:
    """Sets a Provider's ``Ready`` condition by connecting to it."""

    def __init__(self, home: ClusterApi, connector: Connector) -> None:
        self.home = home
        self.connector = connector

    async def reconcile(self, key: Key) -> float | None:
        """Check the Provider ``key``; returns when to check it again (seconds)."""
        ns, name = key
        try:
            provider = await self.home.get("Provider", ns, name)
        except NotFound:
            return None
        if provider["metadata"].get("deletionTimestamp"):
            return None
        try:
            access = await provider_access(self.home, provider)
            who = await self.connector.check(access)
        except ProviderError as e:
            ready, reason, message = False, e.reason, e.message
        except ApiError as e:
            ready, reason, message = False, ProviderReason.UNREACHABLE, e.message
        else:
            ready = True
            if access.local:
                reason, message = ProviderReason.HOST, "this cluster (the local provider)"
            else:
                reason, message = ProviderReason.CONNECTED, f"connected to {access.server} as {who}"
        status = provider.setdefault("status", {})
        changed = conditions.set_condition(status, READY, ready, str(reason), message)
        phase = "Ready" if ready else "ConnectionFailed"
        generation = provider["metadata"].get("generation", 0)
        if (
            changed
            or status.get("phase") != phase
            or status.get("observedGeneration") != generation
        ):
            status["phase"] = phase
            status["observedGeneration"] = generation
            checked = schema.validate(provider, server_managed=True)
            await self.home.update(checked, subresource="status")
            log.info("provider %s/%s: %s %s: %s", ns, name, READY, ready, message)
        return RECHECK_SECONDS if ready else RETRY_SECONDS


def provider_ready(provider: Mapping[str, Any]) -> tuple[bool, str]:
    """(Ready, why not) from a Provider's status."""
    cond = conditions.get(dict(provider), READY)
    if cond is None:
        return False, "not checked yet"
    return cond.get("status") == "True", str(cond.get("message") or cond.get("reason") or "")
