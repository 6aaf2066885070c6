"""The web console (reference 12.1.6, 12.3.1.1, 12.3.2.1), served by the controller.

HTTPS with the controller's server certificate; TLS client authentication is optional
at the handshake. A user logs in either

- with a **client certificate** issued by the cluster CA (the browser presents it;
  every request on that connection is that user), or
- with a **bearer token** pasted into the login form: the console checks it with the
  API's ``WhoAmI`` and keeps it server-side behind a random session cookie
  (``HttpOnly; Secure; SameSite=Strict``); ``Authorization: Bearer`` works as well.

**The console acts as the logged-in user.** Every read and every action is a call of
the API's own servicer (:class:`controller.api.ApiService`) with a call context that
carries exactly what a gRPC call of that user would carry: the client certificate in
the auth context, or the token in the ``authorization`` metadata. Authentication,
authorization (RBAC), admission and audit therefore apply unchanged, and a refused
action shows the API's own message.

Pages (``controller/console_static/``): Migrations (every VMIM, live), Virtual machines
(Migrate to an automatically selected or a specific node; Cancel migration) and Metrics
(charts of the migration figures over the last minutes, sampled once a second from
the controller's caches: ``controller.console_pages``). Live data reaches the page as server-sent events.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any, NamedTuple

import grpc

from controller.api import ApiService
from controller.console_pages import (
    HOSTNAME_LABEL,
    SAMPLE_PERIOD,
    MetricsHistory,
    migration_row,
    node_rows,
    vm_rows,
)
from vmferry import pki
from vmferry.client import REASON_KEY
from vmferry.errors import ApiError, BadRequest, NotFound, Unauthorized, error_from_reason
from vmferry.httpserve import Request, Response, serve
from vmferry.informer import Informer
from vmferry.migration_state import MigrationPhase
from vmferry.objects import kinds, limits
from vmferry.rpc import api_pb2

log = logging.getLogger(__name__)
Obj = dict[str, Any]

SESSION_COOKIE = "vmferry-session"
SESSION_TTL = 8 * 3600.0  # s; a console session, like an oc login, ends the working day
EVENT_PERIOD = 1.0  # s between live updates pushed to a page
STATIC_PACKAGE = "controller"
STATIC_DIR = "console_static"
STATIC_FILES = {
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/app.css": ("app.css", "text/css; charset=utf-8"),
}
SECURITY_HEADERS = [
    ("Content-Security-Policy", "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
]


# -- acting as the user ---------------------------------------------------------------------


class Credential(NamedTuple):
    """What a user authenticated with: a verified client certificate or a bearer token."""

    cert_pem: bytes | None = None
    token: str | None = None


class _Metadatum(NamedTuple):
    key: str
    value: str


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str, trailing: Any) -> None:
        super().__init__(details)
        self.code = code
        self.details = details
        self.trailing = tuple(trailing or ())


class UserCallContext:
    """A ``grpc.aio.ServicerContext`` stand-in for an in-process call as one user.

    It presents the credential the way gRPC presents it to a servicer: the PEM of the
    verified client certificate under ``x509_pem_cert`` in ``auth_context()``, a token as
    ``authorization: Bearer …`` in ``invocation_metadata()``. ``abort`` raises, as it
    does in gRPC, and :meth:`ConsoleApi.call` turns that into the API's ApiError.
    """

    def __init__(self, credential: Credential, peer: str) -> None:
        self._credential = credential
        self._peer = peer
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.trailing: tuple[Any, ...] = ()

    def auth_context(self) -> dict[str, list[bytes]]:
        if self._credential.cert_pem is None:
            return {}
        return {
            "x509_pem_cert": [self._credential.cert_pem],
            "transport_security_type": [b"ssl"],
        }

    def invocation_metadata(self) -> tuple[_Metadatum, ...]:
        if not self._credential.token:
            return ()
        return (_Metadatum("authorization", f"Bearer {self._credential.token}"),)

    def peer(self) -> str:
        return self._peer

    def peer_identities(self) -> list[bytes] | None:
        return None

    def time_remaining(self) -> float | None:
        return None

    def cancelled(self) -> bool:
        return False

    def done(self) -> bool:
        return False

    async def abort(
        self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = ()
    ) -> None:
        raise _Aborted(code, details, trailing_metadata)

    def set_code(self, code: grpc.StatusCode) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def set_trailing_metadata(self, trailing_metadata: Any) -> None:
        self.trailing = tuple(trailing_metadata)

    async def send_initial_metadata(self, initial_metadata: Any) -> None:
        return None


class ConsoleApi:
    """The object API as one user: the same calls the CLI makes, without a socket."""

    def __init__(self, service: ApiService, credential: Credential, peer: str) -> None:
        self.service = service
        self.credential = credential
        self.peer = peer

    async def call(self, method: str, request: Any) -> Any:
        ctx = UserCallContext(self.credential, self.peer)
        try:
            reply = await getattr(self.service, method)(request, ctx)
        except _Aborted as e:
            for key, value in e.trailing:
                if key == REASON_KEY:
                    raise error_from_reason(str(value), e.details) from None
            raise ApiError(f"{e.code.name}: {e.details}") from None
        if ctx.code not in (None, grpc.StatusCode.OK):
            raise ApiError(f"{ctx.code.name}: {ctx.details}")
        return reply

    async def whoami(self) -> tuple[str, list[str]]:
        reply = await self.call("WhoAmI", api_pb2.WhoAmIRequest())
        return reply.user, list(reply.groups)

    async def list(self, kind: str, namespace: str = "") -> list[Obj]:
        reply = await self.call("List", api_pb2.ListRequest(kind=kind, namespace=namespace))
        return [json.loads(item) for item in reply.items_json]

    async def create(self, obj: Obj) -> Obj:
        reply = await self.call(
            "Create", api_pb2.CreateRequest(object_json=json.dumps(obj).encode())
        )
        result: Obj = json.loads(reply.object_json)
        return result

    async def delete(self, kind: str, namespace: str, name: str) -> None:
        ref = api_pb2.ObjectRef(kind=kind, namespace=namespace, name=name)
        await self.call("Delete", api_pb2.DeleteRequest(ref=ref))


@dataclass
class Session:
    credential: Credential
    user: str
    groups: list[str]
    expires: float


# -- the server --------------------------------------------------------------------------------


def _json(data: Any, status: int = 200) -> Response:
    return Response(
        status=status,
        body=json.dumps(data).encode(),
        content_type="application/json",
        headers=[("Cache-Control", "no-store"), *SECURITY_HEADERS],
    )


def _error(e: ApiError) -> Response:
    return _json({"error": e.message, "reason": e.reason}, e.code)


def ssl_context(tls: pki.TlsFiles) -> ssl.SSLContext:
    """Server TLS with the controller's certificate; client certificates optional."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(tls.cert, tls.key)
    ctx.load_verify_locations(cafile=str(tls.ca))
    ctx.verify_mode = ssl.CERT_OPTIONAL
    return ctx


class Console:
    """The console's HTTP handler; :meth:`serve` starts it, :meth:`run` its sampler."""

    def __init__(
        self,
        service: ApiService,
        *,
        vmims: Informer,
        vmis: Informer,
        tls: pki.TlsFiles | None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self.tls = tls
        self.clock = clock
        self.sessions: dict[str, Session] = {}
        self.history = MetricsHistory(vmims, vmis, clock)
        self._static: dict[str, bytes] = {}

    async def serve(self, listen: str) -> asyncio.Server:
        ctx = ssl_context(self.tls) if self.tls is not None else None
        if ctx is None:
            log.warning("console on %s WITHOUT TLS (--insecure-plaintext)", listen)
        server = await serve(self.handle, listen, ssl_context=ctx)
        log.info("web console on %s://%s/", "https" if ctx else "http", listen)
        return server

    async def run(self) -> None:
        await self.history.run()

    # -- authentication ---------------------------------------------------------------------

    def _credential(self, req: Request) -> tuple[Credential | None, Session | None]:
        sid = req.cookie(SESSION_COOKIE)
        if sid:
            session = self.sessions.get(sid)
            if session is not None and session.expires > self.clock():
                return session.credential, session
            self.sessions.pop(sid, None)
        auth = req.headers.get("authorization", "")
        if auth.lower().startswith("bearer ") and auth[7:].strip():
            return Credential(token=auth[7:].strip()), None
        if req.peer_cert_der:
            pem = ssl.DER_cert_to_PEM_cert(req.peer_cert_der).encode()
            return Credential(cert_pem=pem), None
        return None, None

    def _api(self, req: Request) -> ConsoleApi:
        credential, _ = self._credential(req)
        if credential is None:
            raise Unauthorized("log in with your client certificate or a bearer token")
        return ConsoleApi(self.service, credential, f"console:{req.peer}")

    async def _login(self, req: Request) -> Response:
        try:
            token = str(
                limits.loads_json(req.body or b"{}", "request body").get("token", "")
            ).strip()
        except (ValueError, AttributeError):
            raise BadRequest('send {"token": "..."}') from None
        if not token:
            raise BadRequest("paste a bearer token (a service account's token) to log in")
        api = ConsoleApi(self.service, Credential(token=token), f"console:{req.peer}")
        user, groups = await api.whoami()  # the API decides whether the token is valid
        sid = secrets.token_urlsafe(32)
        self.sessions[sid] = Session(
            Credential(token=token), user, groups, self.clock() + SESSION_TTL
        )
        secure = "; Secure" if self.tls is not None else ""
        resp = _json({"user": user, "groups": groups, "via": "token"})
        resp.headers.append(
            (
                "Set-Cookie",
                f"{SESSION_COOKIE}={sid}; Path=/; HttpOnly; SameSite=Strict{secure}; "
                f"Max-Age={int(SESSION_TTL)}",
            )
        )
        log.info("console: %s logged in with a token", user)
        return resp

    def _logout(self, req: Request) -> Response:
        sid = req.cookie(SESSION_COOKIE)
        if sid:
            self.sessions.pop(sid, None)
        resp = _json({"ok": True})
        resp.headers.append(("Set-Cookie", f"{SESSION_COOKIE}=; Path=/; Max-Age=0"))
        return resp

    # -- reads --------------------------------------------------------------------------------

    async def state(self, api: ConsoleApi) -> Obj:
        """Everything the Migrations and Virtual machines tabs show, read as the user."""
        errors: dict[str, str] = {}

        async def read(kind: str) -> list[Obj]:
            try:
                return await api.list(kind)
            except ApiError as e:
                errors[kind] = e.message
                return []

        vmims = await read("VirtualMachineInstanceMigration")
        vmis = await read("VirtualMachineInstance")
        vms = await read("VirtualMachine")
        nodes = await read("Node")
        now = self.clock()
        by_key = {(v["metadata"]["namespace"], v["metadata"]["name"]): v for v in vmis}
        migrations = sorted(
            (migration_row(m, by_key, now) for m in vmims),
            key=lambda r: (r["created"], r["name"]),
            reverse=True,
        )
        return {
            "time": now,
            "migrations": migrations,
            "vms": vm_rows(vms, vmis, vmims),
            "nodes": node_rows(nodes),
            "errors": errors,
        }

    async def _events(self, api: ConsoleApi) -> AsyncIterator[bytes]:
        yield b"retry: 2000\n\n"
        while True:
            data = json.dumps(await self.state(api))
            yield f"event: state\ndata: {data}\n\n".encode()
            await asyncio.sleep(EVENT_PERIOD)

    # -- actions ------------------------------------------------------------------------------

    async def migrate(self, api: ConsoleApi, namespace: str, vm: str, node: str) -> Obj:
        """12.3.1.1: create a VMIM; a specific node becomes an addedNodeSelector."""
        vmim: Obj = {
            "apiVersion": kinds.KUBEVIRT,
            "kind": "VirtualMachineInstanceMigration",
            "metadata": {"generateName": "kubevirt-migrate-vm-", "namespace": namespace},
            "spec": {"vmiName": vm},
        }
        if node:
            vmim["spec"]["addedNodeSelector"] = {HOSTNAME_LABEL: node}
        created = await api.create(vmim)
        return {"name": created["metadata"]["name"], "namespace": namespace}

    async def cancel(self, api: ConsoleApi, namespace: str, vm: str) -> Obj:
        """12.3.2.1: delete the VM's unfinished VMIMs (the VM stays on its node)."""
        vmims = await api.list("VirtualMachineInstanceMigration", namespace)
        active = [
            m["metadata"]["name"]
            for m in vmims
            if (m.get("spec") or {}).get("vmiName") == vm
            and not MigrationPhase.of(m).final
            and not m["metadata"].get("deletionTimestamp")
        ]
        if not active:
            raise NotFound(f"found no migration to cancel for {namespace}/{vm}")
        for name in active:
            await api.delete("VirtualMachineInstanceMigration", namespace, name)
        return {"canceled": active}

    # -- routing --------------------------------------------------------------------------------

    def _static_file(self, path: str) -> Response | None:
        entry = STATIC_FILES.get(path)
        if entry is None:
            return None
        name, ctype = entry
        if name not in self._static:
            ref = resources.files(STATIC_PACKAGE).joinpath(STATIC_DIR, name)
            self._static[name] = ref.read_bytes()
        return Response(
            body=self._static[name],
            content_type=ctype,
            headers=[("Cache-Control", "no-cache"), *SECURITY_HEADERS],
        )

    @staticmethod
    def _same_origin(req: Request) -> bool:
        """Reject cross-site POSTs (the cookie is SameSite=Strict too)."""
        origin = req.headers.get("origin")
        if origin is None:
            return True
        return origin.split("://", 1)[-1] == req.headers.get("host", "")

    async def handle(self, req: Request) -> Response:
        try:
            if req.method in ("GET", "HEAD"):
                static = self._static_file(req.path)
                if static is not None:
                    return static
            if req.method == "POST":
                if not self._same_origin(req):
                    return _json({"error": "cross-origin request refused"}, 403)
                if not req.headers.get("content-type", "").startswith("application/json"):
                    return _json({"error": "send application/json"}, 415)
            return await self._route(req)
        except ApiError as e:
            return _error(e)

    async def _route(self, req: Request) -> Response:
        route = (req.method, req.path)
        if route == ("POST", "/api/login"):
            return await self._login(req)
        if route == ("POST", "/api/logout"):
            return self._logout(req)
        api = self._api(req)
        if route == ("GET", "/api/whoami"):
            credential, session = self._credential(req)
            user, groups = await api.whoami()
            via = "token" if credential is not None and credential.token else "certificate"
            return _json({"user": user, "groups": groups, "via": via, "session": bool(session)})
        if route == ("GET", "/api/state"):
            return _json(await self.state(api))
        if route == ("GET", "/api/events"):
            await api.whoami()  # refuse before streaming
            return Response(content_type="text/event-stream", stream=self._events(api))
        if route == ("GET", "/api/metrics-history"):
            await api.list("VirtualMachineInstanceMigration")  # cluster-wide read, as the user
            return _json({"period": SAMPLE_PERIOD, "samples": list(self.history.samples)})
        if req.method == "POST" and req.path in ("/api/migrate", "/api/cancel"):
            try:
                body = limits.loads_json(req.body or b"{}", "request body")
                namespace = str(body.get("namespace") or "default")
                vm = str(body["vm"])
                node = str(body.get("node") or "")
            except (ValueError, KeyError, AttributeError):
                raise BadRequest('send {"namespace": ..., "vm": ..., "node": ...}') from None
            if req.path == "/api/migrate":
                return _json(await self.migrate(api, namespace, vm, node), 201)
            return _json(await self.cancel(api, namespace, vm))
        return _json({"error": f"no such page: {req.method} {req.path}"}, 404)
