"""Pods: read-only, Pod-shaped views of the daemons that run a vmferry cluster.

vmferry runs no pods, but the reference verifies its components with ``oc get pod -n
openshift-cnv`` (e.g. ``| grep virt-synchronization``). The API answers ``get``/``list``
of ``Pod`` (core/v1) in :data:`POD_NAMESPACE` from what it knows about its daemons, and
refuses every write (:func:`refuse_write`):

- ``virt-controller-<host>``: this controller (it answers, so it is Running), aged from
  its start;
- ``virt-handler-<node>``: one per Node: ``Running`` while the Node is Ready,
  ``NotReady`` when its Ready condition is False, ``Unknown`` when the controller has
  not heard from it (Ready Unknown or missing); aged from the Node's registration;
- ``virt-synchronization-controller-<id>``: one per Lease in :data:`POD_NAMESPACE`
  whose name has :data:`~vmferry.decentralized.SYNC_LEASE_PREFIX`, ``Running`` while
  renewed within its ``leaseDurationSeconds`` (:data:`~vmferry.decentralized.
  LEASE_SECONDS` when unset), ``Unknown`` once expired, no longer listed
  :data:`EXPIRED_LISTED_SECONDS` after it expired.

:func:`synthesize` is pure (nodes, leases, a clock's ``now``); :class:`PodView` reads
the store for it.
"""

from __future__ import annotations

import re
import socket
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from controller.objects import rfc3339
from controller.store import Store
from vmferry.decentralized import (
    LEASE_SECONDS,
    SYNC_ADDRESS_ANNOTATION,
    SYNC_LEASE_PREFIX,
)
from vmferry.errors import Forbidden, NotFound
from vmferry.objects import kinds
from vmferry.objects.labels import Selector

Obj = dict[str, Any]

POD_KIND = "Pod"
POD_NAMESPACE = kinds.SYSTEM_NAMESPACE
CONTROLLER = "virt-controller"
HANDLER = "virt-handler"
SYNC_CONTROLLER = SYNC_LEASE_PREFIX.rstrip("-")  # virt-synchronization-controller
COMPONENT_LABEL = "kubevirt.io"  # as KubeVirt labels its pods: kubevirt.io=virt-handler
VIEW_OF_ANNOTATION = "vmferry.io/view-of"  # the object a Pod row is made from
READ_ONLY_MESSAGE = "pods in vmferry are read-only views of its daemons"
# An expired sync controller's row stays (Unknown) this long, then disappears.
EXPIRED_LISTED_SECONDS = 300.0

RUNNING = "Running"
UNKNOWN = "Unknown"
NOT_READY = "NotReady"  # the row's STATUS (status.reason) of a handler whose Node is not Ready


def refuse_write(kind: kinds.Kind, verb: str, name: str = "") -> None:
    """Raise Forbidden for any write of a Pod (a read-only view); other kinds pass."""
    if kind.kind != POD_KIND:
        return
    target = f'{kind.plural} "{name}"' if name else kind.plural
    raise Forbidden(
        f"{target} is forbidden: {READ_ONLY_MESSAGE} ({verb} is refused; they change "
        "when the daemons do: start or stop the daemon itself)"
    )


def _dns_label(text: str) -> str:
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    return label[:63].strip("-") or "localhost"


def _seconds(timestamp: Any) -> float | None:
    if not isinstance(timestamp, str) or not timestamp:
        return None
    try:
        return datetime.fromisoformat(timestamp).timestamp()
    except ValueError:
        return None


def _pod(
    component: str,
    name: str,
    *,
    since: str,
    phase: str,
    ready: bool,
    node: str = "",
    ip: str = "",
    reason: str = "",
    view_of: str = "",
) -> Obj:
    """One Pod-shaped row: one container named after the component, never restarted."""
    meta: Obj = {
        "name": name,
        "namespace": POD_NAMESPACE,
        "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"vmferry:pod:{name}:{since}")),
        "creationTimestamp": since,
        "labels": {COMPONENT_LABEL: component},
    }
    if view_of:
        meta["annotations"] = {VIEW_OF_ANNOTATION: view_of}
    state: Obj = {"running": {"startedAt": since}} if phase == RUNNING else {"waiting": {}}
    status: Obj = {
        "phase": phase,
        "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        "startTime": since,
        "containerStatuses": [
            {
                "name": component,
                "ready": ready,
                "started": phase == RUNNING,
                "restartCount": 0,
                "state": state,
            }
        ],
    }
    if reason:
        status["reason"] = reason
    if ip:
        status["podIP"] = status["hostIP"] = ip
    spec: Obj = {"containers": [{"name": component}]}
    if node:
        spec["nodeName"] = node
    return {"apiVersion": "v1", "kind": POD_KIND, "metadata": meta, "spec": spec, "status": status}


def _node_ip(node: Obj) -> str:
    for address in (node.get("status") or {}).get("addresses") or []:
        if address.get("type") == "InternalIP":
            return str(address.get("address") or "")
    return ""


def _handler_pod(node: Obj) -> Obj:
    name = node["metadata"]["name"]
    ready = next(
        (
            c.get("status")
            for c in (node.get("status") or {}).get("conditions") or []
            if c.get("type") == "Ready"
        ),
        None,
    )
    if ready == "True":
        phase, reason = RUNNING, ""
    elif ready == "False":
        phase, reason = RUNNING, NOT_READY
    else:
        phase, reason = UNKNOWN, ""
    return _pod(
        HANDLER,
        f"{HANDLER}-{name}",
        since=node["metadata"].get("creationTimestamp", ""),
        phase=phase,
        ready=ready == "True",
        node=name,
        ip=_node_ip(node),
        reason=reason,
        view_of=f"Node/{name}",
    )


def _sync_pod(lease: Obj, now: float) -> Obj | None:
    """The row of a sync controller's Lease; None once it expired long ago."""
    meta = lease["metadata"]
    spec = lease.get("spec") or {}
    renewed = _seconds(spec.get("renewTime")) or _seconds(meta.get("creationTimestamp"))
    duration = float(spec.get("leaseDurationSeconds") or LEASE_SECONDS)
    if renewed is None:
        return None
    expired_for = now - renewed - duration
    if expired_for > EXPIRED_LISTED_SECONDS:
        return None
    fresh = expired_for <= 0
    address = (meta.get("annotations") or {}).get(SYNC_ADDRESS_ANNOTATION, "")
    host = address.rpartition(":")[0].strip("[]") if address else ""
    return _pod(
        SYNC_CONTROLLER,
        meta["name"],
        since=spec.get("acquireTime") or meta.get("creationTimestamp", ""),
        phase=RUNNING if fresh else UNKNOWN,
        ready=fresh,
        ip=host,
        view_of=f"Lease/{meta['namespace']}/{meta['name']}",
    )


def synthesize(
    nodes: Iterable[Obj], leases: Iterable[Obj], *, host: str, started: float, now: float
) -> list[Obj]:
    """Every Pod row (module docstring), sorted by name."""
    pods = [
        _pod(
            CONTROLLER,
            f"{CONTROLLER}-{_dns_label(host)}",
            since=rfc3339(started),
            phase=RUNNING,
            ready=True,
        )
    ]
    pods += [_handler_pod(node) for node in nodes]
    for lease in leases:
        if lease["metadata"]["name"].startswith(SYNC_LEASE_PREFIX):
            pod = _sync_pod(lease, now)
            if pod is not None:
                pods.append(pod)
    return sorted(pods, key=lambda p: p["metadata"]["name"])


@dataclass
class PodView:
    """The Pod rows of this controller's cluster, from the store's Nodes and Leases."""

    store: Store
    host: str = field(default_factory=socket.gethostname)
    started: float = field(default_factory=time.time)
    clock: Callable[[], float] = time.time

    async def list(self, namespace: str | None, selector: Selector | None = None) -> list[Obj]:
        if namespace not in (None, POD_NAMESPACE):
            return []
        nodes, _ = await self.store.list("Node")
        leases, _ = await self.store.list("Lease", POD_NAMESPACE)
        pods = synthesize(nodes, leases, host=self.host, started=self.started, now=self.clock())
        if selector is not None and not selector.empty():
            pods = [p for p in pods if selector.matches(p["metadata"]["labels"])]
        return pods

    async def get(self, namespace: str, name: str) -> Obj:
        for pod in await self.list(namespace):
            if pod["metadata"]["name"] == name:
                return pod
        raise NotFound(f'pods "{name}" not found')
