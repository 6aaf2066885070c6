"""The web console (reference 12.1.6, 12.3.1.1, 12.3.2.1), served by the controller.

HTTPS with the controller's server certificate; TLS client authentication is optional
at the handshake. A user logs in either

- with a **client certificate** issued by the cluster CA (the browser presents it;
  every request on that connection is that user), or
- with a **bearer token** pasted into the login form: the console checks it with the
  API's ``WhoAmI`` and keeps it server-side behind a random session cookie
  (``HttpOnly; Secure; SameSite=Strict``); ``Authorization: Bearer`` works as well.

**The console acts as the logged-in user** (``controller.console_api``): every read and
every action is a call of the API's own servicer as that user, so authentication, RBAC,
admission and audit apply unchanged and a refusal shows the API's own message.

Pages (``controller/console_static/``): Migrations (every VMIM, live, with downtime and
failure reason), Virtual machines (Migrate to an automatically selected or a specific
node; Cancel migration; a VM page with its YAML, events and migrations) and Metrics
(uPlot charts of the migration figures, sampled once a second from the controller's
caches: ``controller.console_pages``). Live data reaches the page as server-sent events.
The HTTP server is aiohttp (``vmferry.httpserve``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import yaml
from aiohttp import web

from controller.api import ApiService
from controller.console_api import ConsoleApi, Credential
from controller.console_pages import (
    HOSTNAME_LABEL,
    SAMPLE_PERIOD,
    MetricsHistory,
    event_rows,
    migration_row,
    node_rows,
    vm_rows,
)
from vmferry import httpserve, metrics_http, pki
from vmferry.errors import ApiError, BadRequest, NotFound, Unauthorized
from vmferry.informer import Informer
from vmferry.migration_state import MigrationPhase
from vmferry.objects import kinds, limits

log = logging.getLogger(__name__)
Obj = dict[str, Any]

SESSION_COOKIE = "vmferry-session"
SESSION_TTL = 8 * 3600.0  # s; a console session, like an oc login, ends the working day
EVENT_PERIOD = 1.0  # s between live updates pushed to a page
STATIC_PACKAGE = "controller"
STATIC_DIR = "console_static"
JS, CSS = "text/javascript", "text/css"
STATIC_FILES = {
    "/": ("index.html", "text/html"),
    "/static/app.js": ("app.js", JS),
    "/static/charts.js": ("charts.js", JS),
    "/static/app.css": ("app.css", CSS),
    "/static/uPlot.iife.min.js": ("uPlot.iife.min.js", JS),  # uPlot, vendored (LICENSE.uPlot)
    "/static/uPlot.min.css": ("uPlot.min.css", CSS),
}
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
EVENT_KIND = "Event"  # core/v1 Event; a server without it has "no events"
VM_KINDS = ("VirtualMachine", "VirtualMachineInstance")


@dataclass
class Session:
    credential: Credential
    user: str
    groups: list[str]
    expires: float


def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps(data),
        content_type="application/json",
        headers={"Cache-Control": "no-store", **SECURITY_HEADERS},
    )


def _error(e: ApiError) -> web.Response:
    return _json({"error": e.message, "reason": e.reason}, e.code)


async def _json_body(request: web.Request) -> Obj:
    try:
        body = limits.loads_json(await httpserve.read_body(request) or b"{}", "request body")
    except ValueError as e:
        raise BadRequest(f"the request body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _same_origin(request: web.Request) -> bool:
    """Reject cross-site POSTs (the cookie is SameSite=Strict too)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return True
    return origin.split("://", 1)[-1] == request.headers.get("Host", "")


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """POSTs: same origin and JSON only; API errors become JSON answers; unknown pages 404."""
    if request.method == "POST":
        if not _same_origin(request):
            return _json({"error": "cross-origin request refused"}, 403)
        if request.content_type != "application/json":
            return _json({"error": "send application/json"}, 415)
    try:
        return await handler(request)
    except ApiError as e:
        return _error(e)
    except web.HTTPNotFound:
        return _json({"error": f"no such page: {request.method} {request.path}"}, 404)
    except web.HTTPMethodNotAllowed:
        return _json({"error": f"{request.method} is not allowed on {request.path}"}, 405)


class Console:
    """The console's HTTP application; :meth:`serve` starts it, :meth:`run` its sampler."""

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

    def app(self) -> web.Application:
        app = web.Application(client_max_size=httpserve.MAX_BODY_BYTES, middlewares=[_guard])
        r = app.router
        for path in STATIC_FILES:
            r.add_get(path, self._static_file)
        r.add_post("/api/login", self._login)
        r.add_post("/api/logout", self._logout)
        r.add_get("/api/whoami", self._whoami)
        r.add_get("/api/state", self._state)
        r.add_get("/api/events", self._events)
        r.add_get("/api/metrics-history", self._metrics_history)
        r.add_get("/api/vm", self._vm)
        r.add_post("/api/migrate", self._action)
        r.add_post("/api/cancel", self._action)
        return app

    async def serve(self, listen: str) -> httpserve.Served:
        ctx = metrics_http.ssl_context(self.tls) if self.tls is not None else None
        if ctx is None:
            log.warning("console on %s WITHOUT TLS (--insecure-plaintext)", listen)
        served = await httpserve.serve(self.app(), listen, ssl_context=ctx)
        log.info("web console on %s://%s/", "https" if ctx else "http", listen)
        return served

    async def run(self) -> None:
        await self.history.run()

    # -- authentication ---------------------------------------------------------------------

    def _credential(self, request: web.Request) -> tuple[Credential | None, Session | None]:
        sid = request.cookies.get(SESSION_COOKIE)
        if sid:
            session = self.sessions.get(sid)
            if session is not None and session.expires > self.clock():
                return session.credential, session
            self.sessions.pop(sid, None)
        token = metrics_http.bearer_token(request)
        if token:
            return Credential(token=token), None
        der = httpserve.peer_cert_der(request)
        if der:
            return Credential(cert_pem=ssl.DER_cert_to_PEM_cert(der).encode()), None
        return None, None

    def _api(self, request: web.Request) -> ConsoleApi:
        credential, _ = self._credential(request)
        if credential is None:
            raise Unauthorized("log in with your client certificate or a bearer token")
        return ConsoleApi(self.service, credential, f"console:{httpserve.peer_address(request)}")

    async def _login(self, request: web.Request) -> web.Response:
        token = str((await _json_body(request)).get("token", "")).strip()
        if not token:
            raise BadRequest("paste a bearer token (a service account's token) to log in")
        peer = f"console:{httpserve.peer_address(request)}"
        api = ConsoleApi(self.service, Credential(token=token), peer)
        user, groups = await api.whoami()  # the API decides whether the token is valid
        sid = secrets.token_urlsafe(32)
        self.sessions[sid] = Session(
            Credential(token=token), user, groups, self.clock() + SESSION_TTL
        )
        resp = _json({"user": user, "groups": groups, "via": "token"})
        resp.set_cookie(
            SESSION_COOKIE,
            sid,
            path="/",
            httponly=True,
            samesite="Strict",
            secure=self.tls is not None,
            max_age=int(SESSION_TTL),
        )
        log.info("console: %s logged in with a token", user)
        return resp

    async def _logout(self, request: web.Request) -> web.Response:
        sid = request.cookies.get(SESSION_COOKIE)
        if sid:
            self.sessions.pop(sid, None)
        resp = _json({"ok": True})
        resp.del_cookie(SESSION_COOKIE, path="/")
        return resp

    async def _whoami(self, request: web.Request) -> web.Response:
        api = self._api(request)
        credential, session = self._credential(request)
        user, groups = await api.whoami()
        via = "token" if credential is not None and credential.token else "certificate"
        return _json({"user": user, "groups": groups, "via": via, "session": bool(session)})

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

    async def _state(self, request: web.Request) -> web.Response:
        return _json(await self.state(self._api(request)))

    async def _events(self, request: web.Request) -> web.StreamResponse:
        api = self._api(request)
        await api.whoami()  # refuse before streaming
        resp = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            await resp.write(b"retry: 2000\n\n")
            while True:
                data = json.dumps(await self.state(api))
                await resp.write(f"event: state\ndata: {data}\n\n".encode())
                await asyncio.sleep(EVENT_PERIOD)
        return resp

    async def _metrics_history(self, request: web.Request) -> web.Response:
        api = self._api(request)
        await api.list("VirtualMachineInstanceMigration")  # cluster-wide read, as the user
        return _json({"period": SAMPLE_PERIOD, "samples": list(self.history.samples)})

    async def vm_detail(self, api: ConsoleApi, namespace: str, name: str) -> Obj:
        """The VM page: the VM and its VMI (as YAML), its events and its migrations."""
        objects: dict[str, Obj | None] = {}
        for kind in VM_KINDS:
            try:
                objects[kind] = await api.get(kind, namespace, name)
            except NotFound:
                objects[kind] = None
        if not any(objects.values()):
            raise NotFound(f'no VirtualMachine or VirtualMachineInstance "{namespace}/{name}"')
        try:
            events = event_rows(await api.list(EVENT_KIND, namespace), VM_KINDS, name)
        except BadRequest as e:
            if f'kind "{EVENT_KIND}"' not in e.message:
                raise
            events = []  # this server keeps no events
        vmims = await api.list("VirtualMachineInstanceMigration", namespace)
        vmi = objects["VirtualMachineInstance"]
        by_key = {(namespace, name): vmi} if vmi is not None else {}
        now = self.clock()
        migrations = sorted(
            (
                migration_row(m, by_key, now)
                for m in vmims
                if (m.get("spec") or {}).get("vmiName") == name
            ),
            key=lambda r: (r["created"], r["name"]),
            reverse=True,
        )
        return {
            "namespace": namespace,
            "name": name,
            "yaml": {
                kind: yaml.safe_dump(obj, sort_keys=False) if obj is not None else None
                for kind, obj in objects.items()
            },
            "events": events,
            "migrations": migrations,
        }

    async def _vm(self, request: web.Request) -> web.Response:
        namespace = request.query.get("namespace") or "default"
        name = request.query.get("name") or ""
        if not name:
            raise BadRequest("name the VM: /api/vm?namespace=NS&name=NAME")
        return _json(await self.vm_detail(self._api(request), namespace, name))

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

    async def _action(self, request: web.Request) -> web.Response:
        api = self._api(request)
        body = await _json_body(request)
        try:
            namespace = str(body.get("namespace") or "default")
            vm = str(body["vm"])
            node = str(body.get("node") or "")
        except KeyError:
            raise BadRequest('send {"namespace": ..., "vm": ..., "node": ...}') from None
        if request.path == "/api/migrate":
            return _json(await self.migrate(api, namespace, vm, node), 201)
        return _json(await self.cancel(api, namespace, vm))

    # -- static files ---------------------------------------------------------------------------

    async def _static_file(self, request: web.Request) -> web.Response:
        name, ctype = STATIC_FILES[request.path]
        if name not in self._static:
            ref = resources.files(STATIC_PACKAGE).joinpath(STATIC_DIR, name)
            self._static[name] = ref.read_bytes()
        return web.Response(
            body=self._static[name],
            content_type=ctype,
            charset="utf-8",
            headers={"Cache-Control": "no-cache", **SECURITY_HEADERS},
        )
