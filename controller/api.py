"""The controller's gRPC object API (DESIGN §1): authentication, validation, admission,
then the store.

Every request is authenticated (``controller.authn``: the mTLS client certificate, or a
service-account bearer token) and authorized before anything is stored:

- node identities (``system:node:<name>``) by the node authorizer: they may read
  everything but Secrets (except, with ``get``, the stream-token Secret of a migration in
  flight whose source or target they are), and write only their own Node, the
  VMIs/VMIMs bound to them now (``node_binding``) and Events in their own name;
- everyone else by RBAC (``controller.rbac``), reading the RBAC objects from the store,
  so a binding is in force as soon as its create returns. Writing a role or a binding
  also passes the escalation check; writing a service-account token Secret also needs
  ``create`` on ``serviceaccounts/token`` of its account.

Every request is written once to the audit log (``controller.audit``) with its final
decision and the stage that made it (authentication, validation, rbac, escalation,
admission); a denial names the permission that was missing, as Kubernetes does.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc

from controller import csr_signer, migration_token, pods, rbac
from controller.admission import Admission
from controller.audit import AuditLog
from controller.authn import (
    SA_NAME_ANNOTATION,
    SERVICE_ACCOUNT_TOKEN_TYPE,
    Authenticator,
    TokenSigner,
)
from controller.store import Store
from vmferry import failpoints, pki
from vmferry.client import REASON_KEY
from vmferry.decentralized import Role
from vmferry.errors import (
    ApiError,
    BadRequest,
    Conflict,
    Forbidden,
    Invalid,
    NotFound,
)
from vmferry.failpoints import Step
from vmferry.migration_network import ASSIGNMENT_ANNOTATION
from vmferry.migration_state import (
    TOKEN_MIGRATION_LABEL,
    VMI_FINAL_PHASES,
    Field,
    MigrationMode,
    MigrationPhase,
    MigrationState,
    Switchover,
)
from vmferry.objects import kinds, labels, limits, patch, schema
from vmferry.rpc import api_pb2, api_pb2_grpc
from vmferry.version import BuildInfo

log = logging.getLogger(__name__)

Obj = dict[str, Any]
PATCH_RETRIES = 10  # optimistic retries of a patch without a resourceVersion precondition
# Status of these kinds is owned by the system: a user's create keeps only spec.
STATUS_STRIPPED_ON_CREATE = {
    "VirtualMachine",
    "VirtualMachineInstance",
    "VirtualMachineInstanceMigration",
    "HyperConverged",
    "MigrationPolicy",
}


def _load(data: bytes, what: str) -> Obj:
    obj = limits.loads_json(data, what)
    if not isinstance(obj, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return obj


def _dump(obj: Obj) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def node_binding(obj: Obj, node: str) -> str | None:
    """Why ``node`` may write the VMI or VMIM ``obj`` as it is stored now, or None.

    A node is bound to a VMI that runs on it (``status.nodeName``) or that a committed
    hand-off gave it (``switchover: Committed``, it is the target: it owns the VM even
    before it published ``nodeName``, and after a failure recorded once the target ran
    it). It is bound to a VMI or VMIM while a migration names it as the source or the
    target and has not ended (neither ``completed`` nor ``failed``): the source writes
    its final completion then, the target publishes ``nodeName`` before the record says
    completed. One more window: a post-copy migration that failed leaves the VM's memory
    split, and its source marks the VMI lost (``status.phase: Failed``) until the VMI's
    phase is final. Nothing else: a node that once ran or migrated a VMI has no business
    with it after the migration ended (Kubernetes' NodeRestriction)."""
    status = obj.get("status") or {}
    ms = MigrationState.of(obj)
    is_vmi = obj.get("kind") == "VirtualMachineInstance"
    if is_vmi and status.get("nodeName") == node:
        return f"the VMI runs on node {node}"
    # A cross-cluster migration names one node of the other cluster (a node of that name
    # here is another machine): only this cluster's half counts.
    role = (status.get("migrationState") or {}).get(Field.ROLE)
    local_source = "" if role == Role.RECEIVER else ms.source_node
    local_target = "" if role == Role.SENDER else ms.target_node
    if is_vmi and ms.switchover == Switchover.COMMITTED and local_target == node:
        return f"migration {ms.migration_uid} handed the VMI off to node {node}"
    if not ms.migration_uid or node not in (local_source, local_target):
        return None
    if migration_in_flight(obj):
        return f"node {node} is the source or target of migration {ms.migration_uid} in flight"
    if (
        is_vmi
        and ms.failed
        and ms.mode == MigrationMode.POST_COPY
        and local_source == node
        and status.get("phase") not in VMI_FINAL_PHASES
    ):
        return (
            f"post-copy migration {ms.migration_uid} failed and node {node}, its source, "
            "marks the VMI lost"
        )
    return None


def _records_commit(before: Obj, after: Obj) -> bool:
    """This write recorded the hand-off (``switchover: Committed``) in a VMI."""
    return (
        after.get("kind") == "VirtualMachineInstance"
        and MigrationState.of(after).switchover == Switchover.COMMITTED
        and MigrationState.of(before).switchover != Switchover.COMMITTED
    )


RBAC_KINDS = frozenset({"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"})
MIGRATION_HINT = (
    "; live migration needs the kubevirt.io:migrate cluster role: ask a cluster "
    "administrator to bind it (vmferry create rolebinding NAME "
    "--clusterrole=kubevirt.io:migrate --user=USER -n NAMESPACE)"
)


class NodeAuthorizer:
    """The node authorizer: what a handler's certificate may do, by the current binding.

    A node reads every kind but Secrets; of those it may ``get`` only the stream-token
    Secret of a migration in flight whose source or target it is
    (``controller.migration_token``; ``current`` is that Secret, None when it does not
    exist; ``migration`` the object holding that migration's state: its VMI while the
    VMI's record is this migration's, else its VMIM, None when neither exists). It writes
    only its own Node (not the controller's ``vmferry.io/migration-network`` annotation)
    and the VMIs/VMIMs it is bound to now (``node_binding``), judged by the object as
    stored (``current``), never by what the node sends."""

    def check(
        self,
        who: pki.Identity,
        request: rbac.Request,
        current: Obj | None,
        new: Obj | None = None,
        migration: Obj | None = None,
    ) -> rbac.Decision:
        node = who.node_name or ""
        kind = request.resource
        if request.verb in ("get", "list", "watch"):
            if kind == "secrets":
                return self._check_secret_read(node, request, current, migration)
            return rbac.Decision(True, "Node: nodes may read")
        if kind == "nodes" and request.verb in ("create", "update", "patch"):
            if request.name != node:
                return rbac.Decision(
                    False, f"{request.describe()}: a node may only change its own Node"
                )
            was = _annotation(current, ASSIGNMENT_ANNOTATION)
            if _annotation(new, ASSIGNMENT_ANNOTATION) != was:
                return rbac.Decision(
                    False,
                    f"{request.describe()}: metadata.annotations[{ASSIGNMENT_ANNOTATION}] is "
                    "written by the controller (the migration network assignment); a node "
                    "may not set or change it",
                )
            return rbac.Decision(True, "Node: a node may change its own Node")
        if kind == "events" and request.verb in ("create", "update", "patch"):
            return self._check_event_write(node, request, current, new)
        if kind == "certificatesigningrequests" and request.verb == "create":
            # renewal: the API stamps the node as requester and refuses another name
            return rbac.Decision(True, "Node: a node may request its own certificate")
        if kind in ("virtualmachineinstances", "virtualmachineinstancemigrations") and (
            request.verb in ("update", "patch")
        ):
            why = node_binding(current, node) if current is not None else None
            if why is not None:
                return rbac.Decision(True, f"Node: {why}")
            return rbac.Decision(
                False,
                f"{request.describe()}: a node may only change the virtual machines running "
                "on it and those of a migration in flight whose source or target it is",
            )
        return rbac.Decision(
            False,
            f"{request.describe()}: a node may only change its own Node and the virtual "
            "machines running on it or of a migration in flight from or to it",
        )

    @staticmethod
    def _check_event_write(
        node: str, request: rbac.Request, current: Obj | None, new: Obj | None
    ) -> rbac.Decision:
        """A node records Events (as Kubernetes' node authorizer lets kubelets), in its own
        name only: ``source.host`` of the Event it writes, and of the one it changes, is
        the node."""
        for obj in (current, new):
            host = ((obj or {}).get("source") or {}).get("host")
            if obj is not None and host != node:
                return rbac.Decision(
                    False,
                    f"{request.describe()}: a node may only record events with source.host "
                    f"{node!r} (not {host!r})",
                )
        return rbac.Decision(True, "Node: a node records its own events")

    @staticmethod
    def _check_secret_read(
        node: str, request: rbac.Request, current: Obj | None, migration: Obj | None
    ) -> rbac.Decision:
        if request.verb == "get" and migration_token.is_token_secret_name(
            request.namespace, request.name
        ):
            if current is None:  # the migration ended: let the get answer NotFound
                return rbac.Decision(True, "Node: a migration token Secret that does not exist")
            if not migration_token.may_node_read(current, node):
                return rbac.Decision(
                    False,
                    f"{request.describe()}: node {node} is neither the source nor the target "
                    "of this migration",
                )
            if migration is None or not migration_in_flight(migration):
                return rbac.Decision(
                    False,
                    f"{request.describe()}: the migration of this stream token has ended",
                )
            return rbac.Decision(
                True, f"Node: the stream token of a migration in flight that involves node {node}"
            )
        return rbac.Decision(
            False,
            f"{request.describe()}: nodes may not read secrets (only, with get, the stream "
            "token of a migration in flight that involves them)",
        )


def _annotation(obj: Obj | None, key: str) -> Any:
    return (((obj or {}).get("metadata") or {}).get("annotations") or {}).get(key)


def migration_in_flight(obj: Obj) -> bool:
    """The migration whose state ``obj`` (a VMI, or a VMIM) holds has not ended."""
    if obj.get("kind") == "VirtualMachineInstanceMigration" and MigrationPhase.of(obj).final:
        return False
    return not MigrationState.of(obj).ended


@dataclass
class _Trail:
    """One request's way through the stages, for its single audit entry."""

    peer: str
    verb: str
    who: pki.Identity | None = None
    hint: rbac.Request | None = None  # what is known before the authorizer ran
    request: rbac.Request | None = None  # what the authorizer decided on
    allowed: bool = True
    reason: str = ""
    stage: str = "validation"
    decided: bool = False  # a stage refused: the entry is final

    def refuse(self, stage: str, reason: str) -> None:
        if not self.decided:
            self.allowed, self.reason, self.stage, self.decided = False, reason, stage, True

    def entry(self) -> rbac.Request:
        if self.request is not None:
            return self.request
        if self.hint is not None:
            return self.hint
        user, groups = (self.who.user, self.who.groups) if self.who else ("", ())
        return rbac.Request(user, tuple(groups), self.verb, "", "")


_TRAIL: contextvars.ContextVar[_Trail | None] = contextvars.ContextVar("audit_trail", default=None)


@contextlib.contextmanager
def _stage(stage: str) -> Iterator[None]:
    """Run one stage of the request: an ApiError raised in it is that stage's refusal."""
    trail = _TRAIL.get()
    try:
        yield
    except ApiError as e:
        if trail is not None:
            trail.refuse(stage, e.message)
        raise
    if trail is not None and not trail.decided:
        trail.stage = stage


def _note(who: pki.Identity, verb: str, kind: str, namespace: str, name: str) -> None:
    """What the request is about, for its audit entry, before the authorizer runs."""
    trail = _TRAIL.get()
    if trail is None:
        return
    try:
        k = kinds.by_kind(kind)
        trail.hint = rbac.request_for(who.user, who.groups, verb, k, namespace, name)
    except ApiError:
        trail.hint = rbac.Request(
            who.user, tuple(who.groups), verb, "", kind.lower(), "", namespace, name
        )


def _note_object(who: pki.Identity, verb: str, raw: Obj) -> None:
    """``_note`` for a request that carries an object (before it is validated)."""
    meta = raw.get("metadata")
    meta = meta if isinstance(meta, dict) else {}
    name = meta.get("name") or meta.get("generateName") or ""
    _note(who, verb, str(raw.get("kind", "")), str(meta.get("namespace", "")), str(name))


class ApiService(api_pb2_grpc.ApiServicer):
    """gRPC servicer; each method maps ApiError to a status with the reason attached."""

    def __init__(
        self,
        store: Store,
        admission: Admission,
        *,
        authenticator: Authenticator | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.store = store
        self.admission = admission
        # Without a configured signer no bearer token verifies: certificates only.
        self.authenticator = authenticator or Authenticator(
            store, TokenSigner(secrets.token_bytes(32))
        )
        self.audit = audit or AuditLog(None)
        self.node_authz = NodeAuthorizer()
        self.pods = pods.PodView(store)  # Pods are views of the daemons, never stored

    # -- plumbing -----------------------------------------------------------------------

    async def _guard(
        self,
        context: grpc.aio.ServicerContext,
        verb: str,
        fn: Callable[[pki.Identity], Awaitable[Any]],
    ) -> Any:
        trail = _Trail(peer=str(context.peer() or ""), verb=verb)
        reset = _TRAIL.set(trail)
        audited = False
        try:
            who = await self._authenticate(context, trail)
            return await fn(who)
        except ApiError as e:
            if trail.request is None:  # refused before the authorizer: a malformed request
                trail.refuse("validation", e.message)
            # Before the abort: it sends the status, and a client that reads the log next
            # must find the entry there.
            self._audit(trail)
            audited = True
            message = limits.fit_message(e.message)
            await context.abort(e.grpc_code, message, trailing_metadata=((REASON_KEY, e.reason),))
        finally:
            if not audited:  # an answer (sent after this returns) or an unexpected error
                self._audit(trail)
            _TRAIL.reset(reset)

    async def _authenticate(self, context: grpc.aio.ServicerContext, trail: _Trail) -> pki.Identity:
        try:
            who = await self.authenticator.authenticate(context)
        except ApiError as e:
            trail.refuse("authentication", e.message)
            raise
        trail.who = who
        return who

    def _audit(self, trail: _Trail) -> None:
        """The request's one audit entry: its final decision and the stage that made it."""
        self.audit.record(
            trail.entry(), trail.allowed, trail.reason, stage=trail.stage, peer=trail.peer
        )

    async def decide(
        self,
        who: pki.Identity,
        request: rbac.Request,
        current: Obj | None = None,
        new: Obj | None = None,
        migration: Obj | None = None,
    ) -> rbac.Decision:
        """Decide one request (node authorizer or RBAC), noted for the request's audit
        entry: its first decision names the request; a later one (a second permission the
        same request needs) refuses it when denied."""
        if who.is_node:
            decision = self.node_authz.check(who, request, current, new, migration)
        else:
            policy = await rbac.load_policy(self.store, request.namespace)
            decision = policy.authorize(request)
        trail = _TRAIL.get()
        if trail is not None:
            if trail.request is None:
                trail.request, trail.reason = request, decision.reason
            if not trail.decided:
                trail.stage = "rbac"
            if not decision.allowed:
                trail.refuse("rbac", decision.reason)
        return decision

    async def _authorize(
        self,
        who: pki.Identity,
        verb: str,
        kind: kinds.Kind,
        ns: str,
        name: str,
        current: Obj | None = None,
        subresource: str = "",
        new: Obj | None = None,
        migration: Obj | None = None,
    ) -> None:
        """Raise Forbidden, Kubernetes-style, unless ``who`` may ``verb`` this object."""
        request = rbac.request_for(who.user, who.groups, verb, kind, ns, name, subresource)
        decision = await self.decide(who, request, current, new, migration)
        if not decision.allowed:
            target = f'{kind.resource} "{name}"' if name else kind.resource
            hint = ""
            if (
                kind.kind == "VirtualMachineInstanceMigration"
                and verb in ("create", "update", "patch", "delete")
                and not who.is_node
            ):
                hint = MIGRATION_HINT
            raise Forbidden(f"{target} is forbidden: {decision.reason}{hint}")

    async def _check_escalation(self, who: pki.Identity, obj: Obj) -> None:
        if obj.get("kind") in RBAC_KINDS:
            with _stage("escalation"):
                await rbac.check_escalation(self.store, who.user, who.groups, obj)

    async def _current(
        self, who: pki.Identity, verb: str, kind: kinds.Kind, ns: str, name: str, sub: str = ""
    ) -> Obj:
        """The stored object a write acts on. When it does not exist, RBAC decides first
        (as Kubernetes authorizes before it looks): a caller without the right learns
        Forbidden, not whether the object exists. The node authorizer judges the stored
        object, so a node learns NotFound."""
        try:
            return await self.store.get(kind.kind, ns, name)
        except NotFound:
            if not who.is_node:
                await self._authorize(who, verb, kind, ns, name, None, sub)
            raise

    async def _authorize_token_mint(self, who: pki.Identity, obj: Obj) -> None:
        """Writing a service-account token Secret mints a token for that account (the
        token controller fills it in): it needs ``create`` on ``serviceaccounts/token``
        of the account, as Kubernetes' TokenRequest does."""
        if obj.get("kind") != "Secret" or obj.get("type") != SERVICE_ACCOUNT_TOKEN_TYPE:
            return
        account = str((obj["metadata"].get("annotations") or {}).get(SA_NAME_ANNOTATION) or "")
        await self._authorize(
            who,
            "create",
            kinds.by_kind("ServiceAccount"),
            obj["metadata"].get("namespace", ""),
            account,
            subresource="token",
        )

    async def _token_migration(self, secret: Obj | None) -> Obj | None:
        """The object holding the state of the migration whose stream token ``secret`` is:
        its VMI while the VMI's record is this migration's, else its VMIM; None when the
        migration no longer exists."""
        uid = ((secret or {}).get("metadata", {}).get("labels") or {}).get(
            TOKEN_MIGRATION_LABEL, ""
        )
        if not uid:
            return None
        vmims, _ = await self.store.list("VirtualMachineInstanceMigration")
        vmim = next((m for m in vmims if m["metadata"].get("uid") == uid), None)
        if vmim is None:
            # A receiving (cross-cluster) migration: its uid is the sending VMIM's, in the
            # other cluster; the receiving VMI's record holds it.
            vmis, _ = await self.store.list("VirtualMachineInstance")
            return next((v for v in vmis if MigrationState.of(v).migration_uid == uid), None)
        if not migration_in_flight(vmim):
            return vmim  # the VMIM ended: so did the migration
        with contextlib.suppress(NotFound):
            vmi = await self.store.get(
                "VirtualMachineInstance",
                vmim["metadata"]["namespace"],
                str((vmim.get("spec") or {}).get("vmiName", "")),
            )
            if MigrationState.of(vmi).migration_uid == uid:
                return vmi  # the record itself, ahead of the VMIM's mirror
        return vmim

    @staticmethod
    def _scope(kind: kinds.Kind, namespace: str) -> str:
        if kind.namespaced:
            if not namespace:
                raise BadRequest(f"{kind.plural} are namespaced: a namespace is required")
            return namespace
        if namespace:
            raise BadRequest(f"{kind.plural} are cluster-scoped: do not give a namespace")
        return ""

    async def _ensure_namespace(self, kind: kinds.Kind, namespace: str) -> None:
        if kind.namespaced:
            try:
                await self.store.get("Namespace", "", namespace)
            except NotFound:
                raise NotFound(f'namespaces "{namespace}" not found') from None

    def _prepare(self, obj: Obj) -> tuple[kinds.Kind, Obj]:
        kind = kinds.by_kind(str(obj.get("kind", "")))
        meta = obj.setdefault("metadata", {})
        if not isinstance(meta, dict):
            raise Invalid(f"{kind.kind}: metadata: expected an object")
        pods.refuse_write(kind, "create or update", str(meta.get("name") or ""))
        if kind.namespaced:
            meta.setdefault("namespace", "default")
        obj = schema.validate(obj)  # a normalized copy: defaulted in place
        schema.fill_defaults(obj)
        return kind, obj

    # -- verbs ----------------------------------------------------------------------------

    async def Create(
        self, request: api_pb2.CreateRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ObjectReply:
        async def run(who: pki.Identity) -> api_pb2.ObjectReply:
            raw = _load(request.object_json, "object")
            _note_object(who, "create", raw)
            kind, obj = self._prepare(raw)
            meta = obj["metadata"]
            ns = self._scope(kind, meta.get("namespace", ""))
            await self._authorize(
                who, "create", kind, ns, meta.get("name", meta.get("generateName", "")), new=obj
            )
            await self._authorize_token_mint(who, obj)
            if kind.kind == csr_signer.KIND:  # who asked is the caller, never the client's say
                csr_signer.stamp_requester(obj, who)
            await self._ensure_namespace(kind, ns)
            await self._check_escalation(who, obj)
            if kind.kind in STATUS_STRIPPED_ON_CREATE:
                obj.pop("status", None)
            for key in (
                "uid",
                "resourceVersion",
                "creationTimestamp",
                "deletionTimestamp",
                "generation",
            ):
                meta.pop(key, None)
            with _stage("admission"):
                await self.admission.admit_create(obj)
            if request.dry_run:
                return api_pb2.ObjectReply(object_json=_dump(obj))
            created = await self.store.create(obj)
            return api_pb2.ObjectReply(object_json=_dump(created))

        result: api_pb2.ObjectReply = await self._guard(context, "create", run)
        return result

    async def Get(
        self, request: api_pb2.GetRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ObjectReply:
        async def run(who: pki.Identity) -> api_pb2.ObjectReply:
            _note(who, "get", request.ref.kind, request.ref.namespace, request.ref.name)
            kind = kinds.by_kind(request.ref.kind)
            ns = self._scope(kind, request.ref.namespace)
            current: Obj | None = None
            migration: Obj | None = None
            if who.is_node and kind.kind == "Secret":  # the node authorizer reads its labels
                with contextlib.suppress(NotFound):
                    current = await self.store.get(kind.kind, ns, request.ref.name)
                if current is not None and migration_token.is_token_secret_name(
                    ns, request.ref.name
                ):
                    migration = await self._token_migration(current)
            await self._authorize(
                who, "get", kind, ns, request.ref.name, current, migration=migration
            )
            if kind.kind == pods.POD_KIND:
                current = await self.pods.get(ns, request.ref.name)
            obj = current or await self.store.get(kind.kind, ns, request.ref.name)
            return api_pb2.ObjectReply(object_json=_dump(obj))

        result: api_pb2.ObjectReply = await self._guard(context, "get", run)
        return result

    async def List(
        self, request: api_pb2.ListRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ListReply:
        async def run(who: pki.Identity) -> api_pb2.ListReply:
            _note(who, "list", request.kind, request.namespace, "")
            kind = kinds.by_kind(request.kind)
            ns = request.namespace if kind.namespaced else ""
            if request.namespace and not kind.namespaced:
                raise BadRequest(f"{kind.plural} are cluster-scoped: do not give a namespace")
            selector = (
                labels.parse_selector(request.label_selector) if request.label_selector else None
            )
            await self._authorize(who, "list", kind, ns, "")
            items, rv = await self.store.list(kind.kind, ns or None, selector)
            if kind.kind == pods.POD_KIND:
                items = await self.pods.list(ns or None, selector)
            return api_pb2.ListReply(items_json=[_dump(o) for o in items], resource_version=str(rv))

        result: api_pb2.ListReply = await self._guard(context, "list", run)
        return result

    async def _write(
        self, who: pki.Identity, obj: Obj, subresource: str, verb: str, dry_run: bool = False
    ) -> Obj:
        if subresource not in ("", "status"):
            raise BadRequest(f'unknown subresource "{subresource}" (only "status" is served)')
        kind, obj = self._prepare(obj)
        meta = obj["metadata"]
        ns = self._scope(kind, meta.get("namespace", ""))
        name = meta.get("name", "")
        if not name:
            raise Invalid(f"{kind.kind}: metadata.name: required for {verb}")
        current = await self._current(who, verb, kind, ns, name, subresource)
        await self._authorize(who, verb, kind, ns, name, current, subresource, new=obj)
        if not subresource:
            await self._authorize_token_mint(who, obj)
            await self._check_escalation(who, obj)
        with _stage("admission"):
            await self.admission.admit_update(current, obj, subresource)
        if dry_run:  # validated, authorized and admitted: what would be stored
            if obj["metadata"].get("resourceVersion") not in (
                None,
                "",
                current["metadata"].get("resourceVersion"),
            ):
                raise Conflict(
                    f'Operation cannot be fulfilled on {kind.resource} "{name}": the object '
                    "has been modified; please apply your changes to the latest version and try again"
                )
            return obj
        written = await self.store.update(obj, subresource=subresource or None)
        if _records_commit(current, written):
            failpoints.hit(Step.CONTROLLER_COMMITTED)
        return written

    async def Update(
        self, request: api_pb2.UpdateRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ObjectReply:
        async def run(who: pki.Identity) -> api_pb2.ObjectReply:
            raw = _load(request.object_json, "object")
            _note_object(who, "update", raw)
            obj = await self._write(who, raw, request.subresource, "update", request.dry_run)
            return api_pb2.ObjectReply(object_json=_dump(obj))

        result: api_pb2.ObjectReply = await self._guard(context, "update", run)
        return result

    async def Patch(
        self, request: api_pb2.PatchRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ObjectReply:
        async def run(who: pki.Identity) -> api_pb2.ObjectReply:
            _note(who, "patch", request.ref.kind, request.ref.namespace, request.ref.name)
            kind = kinds.by_kind(request.ref.kind)
            pods.refuse_write(kind, "patch", request.ref.name)
            ns = self._scope(kind, request.ref.namespace)
            body = limits.loads_json(request.patch_json, "patch")
            if request.type == api_pb2.PATCH_TYPE_JSON:
                if not isinstance(body, list):
                    raise BadRequest("a json patch must be a list of operations")
            elif request.type == api_pb2.PATCH_TYPE_MERGE:
                if not isinstance(body, dict):
                    raise BadRequest("a merge patch must be a JSON object")
            else:
                raise BadRequest("patch type must be json or merge")
            for attempt in range(PATCH_RETRIES):
                current = await self._current(who, "patch", kind, ns, request.ref.name)
                rv = current["metadata"]["resourceVersion"]
                if request.type == api_pb2.PATCH_TYPE_JSON:
                    patched = patch.apply_json_patch(current, body)
                else:
                    patched = patch.apply_merge_patch(current, body)
                if not isinstance(patched.get("metadata"), dict):
                    raise Invalid(f"{kind.kind}: metadata: a patch may not remove it")
                for key in ("name", "namespace", "uid"):
                    if patched["metadata"].get(key) != current["metadata"].get(key):
                        raise Invalid(f"{kind.kind}: metadata.{key}: field is immutable")
                # A stale precondition fails in the store's write, after the authorizer.
                patched["metadata"]["resourceVersion"] = request.resource_version or rv
                try:
                    obj = await self._write(
                        who, patched, request.subresource, "patch", request.dry_run
                    )
                    return api_pb2.ObjectReply(object_json=_dump(obj))
                except Conflict:
                    if request.resource_version or attempt == PATCH_RETRIES - 1:
                        raise
                    await asyncio.sleep(0.01 * attempt)
            raise AssertionError("unreachable")

        result: api_pb2.ObjectReply = await self._guard(context, "patch", run)
        return result

    async def Delete(
        self, request: api_pb2.DeleteRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.ObjectReply:
        async def run(who: pki.Identity) -> api_pb2.ObjectReply:
            _note(who, "delete", request.ref.kind, request.ref.namespace, request.ref.name)
            kind = kinds.by_kind(request.ref.kind)
            pods.refuse_write(kind, "delete", request.ref.name)
            ns = self._scope(kind, request.ref.namespace)
            current = await self._current(who, "delete", kind, ns, request.ref.name)
            await self._authorize(who, "delete", kind, ns, request.ref.name, current)
            with _stage("admission"):
                await self.admission.admit_delete(current)
            if request.dry_run:
                return api_pb2.ObjectReply(object_json=_dump(current))
            obj = await self.store.delete(
                kind.kind,
                ns,
                request.ref.name,
                resource_version=request.resource_version or None,
                uid=request.uid or None,
            )
            return api_pb2.ObjectReply(object_json=_dump(obj))

        result: api_pb2.ObjectReply = await self._guard(context, "delete", run)
        return result

    async def Watch(
        self, request: api_pb2.WatchRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[api_pb2.WatchEvent]:
        # Audited once decided, not when the stream ends (a watch lasts for hours).
        pending = _Trail(peer=str(context.peer() or ""), verb="watch")
        trail: _Trail | None = pending
        _TRAIL.set(pending)
        try:
            who = await self._authenticate(context, pending)
            _note(who, "watch", request.kind or "*", request.namespace, "")
            kind = kinds.by_kind(request.kind) if request.kind else None
            ns = request.namespace if (kind is None or kind.namespaced) else ""
            selector = (
                labels.parse_selector(request.label_selector) if request.label_selector else None
            )
            hide_secrets = False
            if kind is not None:
                await self._authorize(who, "watch", kind, ns, "")
            elif who.is_node:
                hide_secrets = True  # a node may watch every kind but Secrets
            else:
                everything = rbac.Request(who.user, who.groups, "watch", "*", "*", "", ns, "")
                decision = await self.decide(who, everything)
                if not decision.allowed:
                    raise Forbidden(
                        f"watching every kind is forbidden: {decision.reason} "
                        "(name a kind to watch)"
                    )
            since = int(request.resource_version or 0) or await self.store.current_rv()
            self._audit(pending)
            trail = None
            _TRAIL.set(None)
            if request.send_initial_bookmark:
                yield api_pb2.WatchEvent(
                    type="BOOKMARK",
                    object_json=_dump({"metadata": {"resourceVersion": str(since)}}),
                    resource_version=str(since),
                )
            # The stored JSON goes out as it is: no decoding and encoding per watcher.
            async for event in self.store.watch_json(
                kind.kind if kind else None, ns or None, since, selector
            ):
                if hide_secrets and event.kind == "Secret":
                    continue
                yield api_pb2.WatchEvent(
                    type=event.type,
                    object_json=event.data.encode(),
                    resource_version=str(event.resource_version),
                )
        except ValueError:
            if trail is not None:
                trail.refuse("validation", "resourceVersion must be a number")
                self._audit(trail)
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                "resourceVersion must be a number",
                trailing_metadata=((REASON_KEY, "BadRequest"),),
            )
        except ApiError as e:
            if trail is not None:
                if trail.request is None:
                    trail.refuse("validation", e.message)
                self._audit(trail)
            message = limits.fit_message(e.message)
            await context.abort(e.grpc_code, message, trailing_metadata=((REASON_KEY, e.reason),))

    async def WhoAmI(
        self, request: api_pb2.WhoAmIRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.WhoAmIReply:
        async def run(who: pki.Identity) -> api_pb2.WhoAmIReply:
            return api_pb2.WhoAmIReply(user=who.user, groups=list(who.groups))

        result: api_pb2.WhoAmIReply = await self._guard(context, "whoami", run)
        return result

    async def Version(
        self, request: api_pb2.VersionRequest, context: grpc.aio.ServicerContext
    ) -> api_pb2.VersionReply:
        async def run(who: pki.Identity) -> api_pb2.VersionReply:
            info = BuildInfo.here()
            return api_pb2.VersionReply(
                version=info.version, python_version=info.python_version, platform=info.platform
            )

        result: api_pb2.VersionReply = await self._guard(context, "version", run)
        return result
