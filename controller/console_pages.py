"""What the web console's pages show, computed from the controller's informer caches:
the rows of the Migrations, Virtual machines and Nodes tabs, and the Metrics tab's
history (``MetricsHistory``, sampled every ``SAMPLE_PERIOD``), and the VM page's events. Pure reads: the server in
``controller.console`` serves them as the logged-in user may see them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from vmferry.informer import Informer
from vmferry.migration_state import (
    PROGRESS_PHASES,
    Field,
    MigrationPhase,
    MigrationState,
    VMIPhase,
    raw,
)
from vmferry.objects.conditions import parse_time

Obj = dict[str, Any]

SAMPLE_PERIOD = 0.5  # s between samples: a one-second migration is seen in two
HISTORY_SAMPLES = 1200  # 10 minutes at SAMPLE_PERIOD
RUNNING_PHASES = PROGRESS_PHASES  # the Metrics tab counts them all as "running"
HOSTNAME_LABEL = "kubernetes.io/hostname"  # every Node carries it (handler/node_agent.py)


def _elapsed(vmim: Obj, now: float) -> float:
    """Seconds from the VMIM's creation to its end (or now, while it runs)."""
    status = vmim.get("status") or {}
    try:
        start = parse_time(vmim["metadata"]["creationTimestamp"]).timestamp()
    except (KeyError, ValueError):
        return 0.0
    end = now
    if MigrationPhase.of(vmim).final:
        stamps = [
            p.get("phaseTransitionTimestamp")
            for p in status.get("phaseTransitionTimestamps") or []
            if p.get("phase") == status.get("phase")
        ]
        if stamps and stamps[-1]:
            with contextlib.suppress(ValueError):
                end = parse_time(stamps[-1]).timestamp()
    return max(0.0, end - start)


def migration_row(vmim: Obj, vmis: dict[tuple[str, str], Obj], now: float) -> Obj:
    """One row of the Migrations tab."""
    meta = vmim["metadata"]
    status = vmim.get("status") or {}
    vmi_name = (vmim.get("spec") or {}).get("vmiName", "")
    vmi = vmis.get((meta["namespace"], vmi_name))
    vmi_ms = raw(vmi or {})
    # The VMI has the freshest figures.
    fresh = vmi_ms.get(Field.MIGRATION_UID) == meta.get("uid")
    ms = MigrationState.from_dict({**raw(vmim), **vmi_ms} if fresh else raw(vmim))
    transfer = ms.transfer
    return {
        "namespace": meta["namespace"],
        "name": meta["name"],
        "vmi": vmi_name,
        "phase": status.get("phase") or "",
        "source": ms.source_node,
        "target": ms.target_node,
        "mode": ms.mode or "",
        "total": transfer.get("dataTotalBytes", 0),
        "processed": transfer.get("dataProcessedBytes", 0),
        "remaining": transfer.get("dataRemainingBytes", 0),
        "transferRate": transfer.get("transferRateBytes", 0),
        "dirtyRate": transfer.get("dirtyRateBytes", 0),
        "rounds": transfer.get("rounds", 0),
        "downtimeMs": transfer.get("downtimeMilliseconds"),
        "elapsed": round(_elapsed(vmim, now), 1),
        "created": meta.get("creationTimestamp", ""),
        "deleting": bool(meta.get("deletionTimestamp")),
        "failureReason": ms.failure_reason,
        "abortStatus": ms.abort_status or "",
    }


def vm_rows(vms: list[Obj], vmis: list[Obj], vmims: list[Obj]) -> list[Obj]:
    """The Virtual machines tab: each VM (and each VMI without a VM) with node and phase."""
    by_key = {(v["metadata"]["namespace"], v["metadata"]["name"]): v for v in vmis}
    active: dict[tuple[str, str], str] = {}
    for m in vmims:
        if not MigrationPhase.of(m).final and not m["metadata"].get("deletionTimestamp"):
            active[(m["metadata"]["namespace"], (m.get("spec") or {}).get("vmiName", ""))] = m[
                "metadata"
            ]["name"]
    rows = []
    keys = [(v["metadata"]["namespace"], v["metadata"]["name"]) for v in vms]
    keys += [k for k in by_key if k not in set(keys)]
    for ns, name in sorted(keys):
        vmi = by_key.get((ns, name))
        status = (vmi or {}).get("status") or {}
        conds = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
        rows.append(
            {
                "namespace": ns,
                "name": name,
                "phase": status.get("phase") or ("Stopped" if vmi is None else VMIPhase.PENDING),
                "node": status.get("nodeName", ""),
                "migratable": conds.get("LiveMigratable") == "True",
                # why not (the RWX rule's message, say): the console shows it on Migrate
                "notMigratable": _not_migratable(status),
                "migration": active.get((ns, name), ""),
            }
        )
    return rows


def event_rows(events: list[Obj], involved_kinds: tuple[str, ...], name: str) -> list[Obj]:
    """The VM page's events: those of ``name`` (as one of ``involved_kinds``), newest
    first, with Kubernetes' core/v1 Event fields."""
    rows = []
    for event in events:
        involved = event.get("involvedObject") or {}
        if involved.get("name") != name or involved.get("kind") not in involved_kinds:
            continue
        rows.append(
            {
                "type": event.get("type") or "Normal",
                "reason": event.get("reason") or "",
                "message": event.get("message") or "",
                "count": event.get("count") or 1,
                "first": event.get("firstTimestamp") or "",
                "last": event.get("lastTimestamp") or event.get("firstTimestamp") or "",
                "object": f"{involved.get('kind')}/{name}",
                "source": (event.get("source") or {}).get("component") or "",
            }
        )
    return sorted(rows, key=lambda r: r["last"], reverse=True)


def _not_migratable(status: Obj) -> str:
    for c in status.get("conditions") or []:
        if c.get("type") == "LiveMigratable" and c.get("status") == "False":
            return str(c.get("message") or c.get("reason") or "not live-migratable")
    return ""


def node_rows(nodes: list[Obj]) -> list[Obj]:
    rows = []
    for n in nodes:
        conds = {
            c.get("type"): c.get("status") for c in (n.get("status") or {}).get("conditions") or []
        }
        rows.append(
            {
                "name": n["metadata"]["name"],
                "hostname": (n["metadata"].get("labels") or {}).get(
                    HOSTNAME_LABEL, n["metadata"]["name"]
                ),
                "ready": conds.get("Ready") == "True",
                "schedulable": not (n.get("spec") or {}).get("unschedulable"),
            }
        )
    return sorted(rows, key=lambda r: r["name"])


class MetricsHistory:
    """The Metrics tab's data: a ring of samples taken from the controller's caches."""

    def __init__(self, vmims: Informer, vmis: Informer, clock: Callable[[], float] = time.time):
        self.vmims = vmims
        self.vmis = vmis
        self.clock = clock
        self.samples: deque[Obj] = deque(maxlen=HISTORY_SAMPLES)

    def sample(self) -> Obj:
        now = self.clock()
        counts = {"pending": 0, "scheduling": 0, "running": 0, "succeeded": 0, "failed": 0}
        migrations: dict[str, Obj] = {}
        vmis = {
            (v["metadata"]["namespace"], v["metadata"]["name"]): v for v in self.vmis.cache.values()
        }
        for vmim in self.vmims.cache.values():
            phase = MigrationPhase.of(vmim)
            if phase in (MigrationPhase.UNSET, MigrationPhase.PENDING):
                counts["pending"] += 1
            elif phase == MigrationPhase.SCHEDULING:
                counts["scheduling"] += 1
            elif phase in RUNNING_PHASES:
                counts["running"] += 1
            elif phase == MigrationPhase.SUCCEEDED:
                counts["succeeded"] += 1
            elif phase == MigrationPhase.FAILED:
                counts["failed"] += 1
            if phase == MigrationPhase.RUNNING:
                row = migration_row(vmim, vmis, now)
                migrations[f"{row['namespace']}/{row['name']}"] = {
                    "vmi": row["vmi"],
                    "processed": row["processed"],
                    "remaining": row["remaining"],
                    "transferRate": row["transferRate"],
                    "dirtyRate": row["dirtyRate"],
                }
        sample = {"t": round(now, 3), **counts, "migrations": migrations}
        self.samples.append(sample)
        return sample

    async def run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(SAMPLE_PERIOD)
