"""``/metrics``, ``/healthz`` and ``/readyz`` of every daemon (controller, handler, sync
controller), on :mod:`vmferry.httpserve`.

Transport: HTTPS with the daemon's own server certificate, client certificates optional
at the handshake and verified against the cluster CA. Plain HTTP only when asked for
explicitly (``metrics_plain_http``), or when the daemon itself runs without TLS
(``--insecure-plaintext``, tests).

Who may read ``/metrics`` (``metrics_auth``), as kube-rbac-proxy guards KubeVirt's:

- ``none`` (default, as KubeVirt's own endpoints): anyone who reaches the port;
- ``allowlist``: a client certificate from the cluster CA whose user (CN) or one of whose
  groups (O) is listed in ``metrics_allowed_users`` / ``metrics_allowed_groups``
  (default group ``system:monitoring``, Kubernetes' group for scrapers);
- ``rbac`` (controller only): a client certificate or a service-account bearer token,
  authorized as RBAC ``get`` on the non-resource URL ``/metrics`` (the built-in
  ClusterRole ``system:monitoring`` grants it to the group ``system:monitoring``).

Why handlers and sync controllers have ``allowlist`` and not ``rbac``: they hold neither
the RBAC objects nor the token signing key, and asking the controller on every scrape
would make node metrics vanish exactly when the controller is down, when they are most
needed. A certificate from the cluster CA is verified locally by the TLS handshake.

Unauthenticated requests get 401, unauthorized ones 403 naming the user (kube-rbac-proxy's
answers). ``/healthz`` (the event loop answers) and ``/readyz`` (the daemon's own readiness
check) are open, as kubelet probes are unauthenticated.
"""

from __future__ import annotations

import argparse
import logging
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
)
from prometheus_client.exposition import choose_encoder

from vmferry import httpserve, pki
from vmferry.config import ConfigError

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
MONITORING_GROUP = "system:monitoring"


class MetricsAuth(StrEnum):
    NONE = "none"
    ALLOWLIST = "allowlist"
    RBAC = "rbac"


# The configuration keys every daemon accepts (merged into its CONFIG_KEYS/DEFAULTS).
CONFIG_KEYS: dict[str, type | tuple[type, ...]] = {
    "metrics_listen": str,
    "metrics_plain_http": bool,
    "metrics_auth": str,
    "metrics_allowed_users": list,
    "metrics_allowed_groups": list,
}
DEFAULTS: dict[str, Any] = {
    "metrics_listen": "",  # host:port of /metrics, /healthz, /readyz; empty: off
    "metrics_plain_http": False,
    "metrics_auth": MetricsAuth.NONE.value,
    "metrics_allowed_users": [],
    "metrics_allowed_groups": [MONITORING_GROUP],
}


def add_flags(p: argparse.ArgumentParser, modes: tuple[MetricsAuth, ...]) -> None:
    """The daemon flags of the metrics endpoint (``modes``: the auth modes it supports)."""
    p.add_argument(
        "--metrics-listen",
        help="host:port of /metrics, /healthz and /readyz over HTTPS (empty: off)",
    )
    p.add_argument(
        "--metrics-plain-http",
        action="store_true",
        default=None,
        help="serve them over plain HTTP instead of HTTPS (explicit opt-in)",
    )
    p.add_argument(
        "--metrics-auth",
        choices=[m.value for m in modes],
        help="who may read /metrics (default none; README, Observability, lists the modes)",
    )
    p.add_argument(
        "--metrics-allowed-user",
        dest="metrics_allowed_users",
        action="append",
        metavar="USER",
        help="with --metrics-auth allowlist: a certificate user (CN) allowed (repeatable)",
    )
    p.add_argument(
        "--metrics-allowed-group",
        dest="metrics_allowed_groups",
        action="append",
        metavar="GROUP",
        help=f"with --metrics-auth allowlist: a group (O) allowed (default {MONITORING_GROUP})",
    )


@dataclass(frozen=True)
class MetricsSettings:
    listen: str
    plain_http: bool
    auth: MetricsAuth
    allowed_users: frozenset[str]
    allowed_groups: frozenset[str]


def settings(config: dict[str, Any], modes: tuple[MetricsAuth, ...]) -> MetricsSettings | None:
    """The metrics endpoint of a daemon's config (None when ``metrics_listen`` is empty).

    Raises ConfigError naming the bad key."""
    listen = config.get("metrics_listen") or ""
    if not listen:
        return None
    try:
        httpserve.split_hostport(listen)
    except ValueError as e:
        raise ConfigError(f"metrics_listen: {e}") from None
    try:
        auth = MetricsAuth(config.get("metrics_auth") or MetricsAuth.NONE.value)
    except ValueError:
        auth = None
    if auth is None or auth not in modes:
        raise ConfigError(
            f"metrics_auth {config.get('metrics_auth')!r}: expected one of "
            f"{', '.join(m.value for m in modes)}"
        )
    plain = bool(config.get("metrics_plain_http")) or bool(config.get("insecure_plaintext"))
    if plain and auth is not MetricsAuth.NONE:
        why = (
            "which --insecure-plaintext turns off"
            if config.get("insecure_plaintext")
            else "drop metrics_plain_http"
        )
        raise ConfigError(
            f"metrics_auth {auth.value} needs HTTPS: {why} (client certificates and "
            "tokens are never accepted over plain HTTP)"
        )
    users = frozenset(str(u) for u in config.get("metrics_allowed_users") or [])
    groups = frozenset(str(g) for g in config.get("metrics_allowed_groups") or [])
    if auth is MetricsAuth.ALLOWLIST and not users and not groups:
        raise ConfigError("metrics_auth allowlist: list metrics_allowed_users or _groups")
    return MetricsSettings(listen, plain, auth, users, groups)


# -- authentication and authorization --------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    status: int  # 200 allowed, 401 who are you, 403 not you
    reason: str

    @property
    def allowed(self) -> bool:
        return self.status == 200


ALLOWED = Decision(200, "allowed")


class Authorizer(Protocol):
    async def __call__(self, cert_der: bytes | None, token: str | None) -> Decision: ...


async def allow_anyone(cert_der: bytes | None, token: str | None) -> Decision:
    return ALLOWED


def certificate_identity(cert_der: bytes | None) -> pki.Identity | None:
    """The identity of a TLS-verified client certificate (None without one)."""
    if not cert_der:
        return None
    try:
        return pki.identity_from_pem(ssl.DER_cert_to_PEM_cert(cert_der).encode())
    except ValueError:
        return None


def allowlist(users: frozenset[str], groups: frozenset[str]) -> Authorizer:
    """Allow client certificates of the cluster CA naming a listed user or group."""

    async def authorize(cert_der: bytes | None, token: str | None) -> Decision:
        who = certificate_identity(cert_der)
        if who is None:
            reason = (
                "bearer tokens are verified by the controller only: present a client "
                "certificate from the cluster CA"
                if token
                else "present a client certificate from the cluster CA"
            )
            return Decision(401, f"Unauthorized: {reason}")
        if who.user in users or groups.intersection(who.groups):
            return ALLOWED
        return Decision(403, f'Forbidden: User "{who.user}" may not read {METRICS_PATH}')

    return authorize


def bearer_token(request: web.BaseRequest) -> str | None:
    """The token of ``Authorization: Bearer <token>``; a malformed header gives ""."""
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


# -- the endpoint -------------------------------------------------------------------------------

Readiness = Callable[[], str | None]  # None when ready, else why not


def daemon_registry() -> CollectorRegistry:
    """A registry with prometheus_client's process, platform and GC collectors (the
    ``process_*``/``python_*`` series Go daemons export as ``process_*``/``go_*``)."""
    registry = CollectorRegistry()
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


def metrics_app(
    registry: CollectorRegistry, ready: Readiness, authorize: Authorizer
) -> web.Application:
    """``/metrics`` (guarded by ``authorize``), ``/healthz`` and ``/readyz``. Collection
    runs in the event loop, so collectors may read loop-owned state."""

    async def metrics(request: web.Request) -> web.StreamResponse:
        decision = await authorize(httpserve.peer_cert_der(request), bearer_token(request))
        if not decision.allowed:
            headers = {"WWW-Authenticate": "Bearer"} if decision.status == 401 else {}
            return web.Response(
                status=decision.status, text=decision.reason + "\n", headers=headers
            )
        encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
        return web.Response(body=encoder(registry), headers={"Content-Type": content_type})

    async def healthz(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(request: web.Request) -> web.Response:
        why = ready()
        if why is None:
            return web.Response(text="ok\n")
        return web.Response(status=503, text=f"not ready: {why}\n")

    app = httpserve.new_app()
    app.router.add_get(METRICS_PATH, metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


def _tls_context(tls: pki.TlsFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert, tls.key)
    ctx.load_verify_locations(cafile=str(tls.ca))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


class _RenewedFiles:
    """The ``sni_callback`` (called on every ClientHello, SNI or not) switching a
    handshake to a context built from the current files once they changed (a renewal,
    vmferry/pki/renewal.py): a stat per handshake, a read per renewal; a half-written
    pair (key and cert not matching yet) keeps the current context until the next one."""

    def __init__(self, tls: pki.TlsFiles, ctx: ssl.SSLContext) -> None:
        self.tls = tls
        self.current = ctx
        self.stamp = self._stat()
        self.failed: tuple[tuple[int, int, int], ...] | None = None
        self.reloads = 0

    def _stat(self) -> pki.FilesStamp:
        return pki.files_stamp(self.tls.ca, self.tls.cert, self.tls.key)

    def __call__(self, conn: Any, server_name: str | None, ctx: ssl.SSLContext) -> None:
        stamp = None
        try:
            stamp = self._stat()
            if stamp != self.stamp and stamp != self.failed:
                fresh = _tls_context(self.tls)
                fresh.sni_callback = self
                self.current, self.stamp = fresh, stamp
                self.reloads += 1
                log.info("HTTPS: reloaded TLS certificate %s", self.tls.cert)
        except (OSError, ssl.SSLError, ValueError) as e:
            if stamp is not None and stamp != self.failed:  # once per state of the files
                self.failed = stamp
                log.warning(
                    "HTTPS: not reloading %s (keeping the current one): %s", self.tls.cert, e
                )
        if conn.context is not self.current:
            conn.context = self.current


def ssl_context(tls: pki.TlsFiles) -> ssl.SSLContext:
    """Server TLS with the daemon's certificate; client certificates of the cluster CA
    are verified when sent, optional at the handshake. Renewed files are picked up at
    the next handshake (no restart)."""
    ctx = _tls_context(tls)
    ctx.sni_callback = _RenewedFiles(tls, ctx)
    return ctx


async def start(
    what: str,
    config: MetricsSettings,
    registry: CollectorRegistry,
    *,
    tls: pki.TlsFiles | None,
    ready: Readiness,
    rbac: Authorizer | None = None,
) -> httpserve.Served:
    """Serve the endpoint of daemon ``what`` as ``config`` says; ``rbac`` is the
    authorizer of ``metrics_auth = "rbac"`` (the controller's). Raises ConfigError when
    the port cannot be bound or the configuration cannot be served."""
    authorize: Authorizer
    if config.auth is MetricsAuth.RBAC:
        if rbac is None:
            raise ConfigError(f"metrics_auth rbac is not available on the {what}")
        authorize = rbac
    elif config.auth is MetricsAuth.ALLOWLIST:
        authorize = allowlist(config.allowed_users, config.allowed_groups)
    else:
        authorize = allow_anyone
    ctx = None
    if not config.plain_http:
        if tls is None:
            raise ConfigError("metrics over HTTPS need the daemon's certificate")
        ctx = ssl_context(tls)
    start: Awaitable[httpserve.Served] = httpserve.serve(
        metrics_app(registry, ready, authorize), config.listen, ssl_context=ctx
    )
    served = await httpserve.listening("metrics", config.listen, start)
    scheme = "http" if ctx is None else "https"
    log.info(
        "%s: metrics on %s://%s/metrics (auth %s), /healthz, /readyz",
        what,
        scheme,
        config.listen,
        config.auth.value,
    )
    return served
