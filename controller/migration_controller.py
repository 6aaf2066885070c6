"""VirtualMachineInstanceMigration reconciler: admission to hand-off to the final phase.

Phases (KubeVirt's): "" → Pending → Scheduling → Scheduled → PreparingTarget →
TargetReady → Running → Succeeded | Failed. One pass advances at most one phase and
records it in ``status.phaseTransitionTimestamps``; the handlers drive the data path
and report in ``vmi.status.migrationState``, which this reconciler mirrors into the VMIM.

Who writes what in ``vmi.status.migrationState``:
  controller     migrationUid, sourceNode, targetNode, token, migrationConfiguration
                 (the hand-off, at Scheduling → Scheduled); abortRequested (cancel);
                 failed/failureReason only while the source has not started.
  target handler targetNodeDomainDetected, targetNodeAddress/Port,
                 targetNodeDomainReadyTimestamp; VMI nodeName after resuming.
  source handler startTimestamp (with a resourceVersion precondition, so it cannot
                 start a migration the controller just failed), mode, transfer,
                 switchover (the arbiter), completed/failed/failureReason, abortStatus,
                 endTimestamp.

Cancel = delete the VMIM (it carries a finalizer). Before the source starts, the
controller fails the hand-off and the target cleans up; while running it sets
``abortRequested`` and the source aborts, leaving the VM on its source.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import secrets
import time
from collections import Counter
from typing import Any

from controller import policy, scheduler
from controller.objects import set_phase, write_status
from controller.store import Store
from vmferry.errors import Conflict, NotFound
from vmferry.informer import Informer, Key, WorkQueue
from vmferry.migration_state import LIVE_MIGRATION_DEFAULTS
from vmferry.objects import conditions, kinds

log = logging.getLogger(__name__)
Obj = dict[str, Any]

FINALIZER = "kubevirt.io/migrationJobFinalize"
EVACUATION_ANNOTATION = "kubevirt.io/evacuationMigration"  # value: the node being drained
KEEP_FINISHED = 5  # finished VMIMs kept per VMI; older ones are garbage-collected
ACTIVE_PHASES = ("Scheduling", "Scheduled", "PreparingTarget", "TargetReady", "Running")
TARGET_PREPARE_TIMEOUT = 60.0  # s from hand-off; a target handler that never answers fails it
RECHECK_INTERVAL = 2.0  # s; timeouts are evaluated at least this often


def queue_order(vmim: Obj) -> tuple[int, str, str]:
    """Sort key of the Pending queue: evacuations first, then oldest first."""
    annotations = vmim["metadata"].get("annotations") or {}
    priority = 0 if EVACUATION_ANNOTATION in annotations else 1
    return priority, vmim["metadata"].get("creationTimestamp", ""), vmim["metadata"]["name"]


class MigrationController:
    def __init__(
        self, store: Store, vmims: Informer, vmis: Informer, nodes: Informer, hco: Informer
    ) -> None:
        self.store = store
        self.vmims = vmims
        self.vmis = vmis
        self.nodes = nodes
        self.hco = hco
        self.queue = WorkQueue()
        vmims.add_handler(self._on_vmim)
        vmis.add_handler(self._on_vmi)
        nodes.add_handler(lambda key, old, new: self._requeue_active())

    # -- event routing --------------------------------------------------------------------

    def _on_vmim(self, key: Key, old: Obj | None, new: Obj | None) -> None:
        self.queue.add(key)
        if new is None or (new.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            self._requeue_pending()  # a slot may have freed

    def _on_vmi(self, key: Key, old: Obj | None, new: Obj | None) -> None:
        ns, name = key
        for vmim in self.vmims.cache.values():
            if vmim["metadata"]["namespace"] == ns and vmim["spec"].get("vmiName") == name:
                self.queue.add((ns, vmim["metadata"]["name"]))

    def _requeue_pending(self) -> None:
        for key, vmim in self.vmims.cache.items():
            if (vmim.get("status") or {}).get("phase") in ("", None, "Pending"):
                self.queue.add(key)

    def _requeue_active(self) -> None:
        for key, vmim in self.vmims.cache.items():
            if (vmim.get("status") or {}).get("phase") not in ("Succeeded", "Failed"):
                self.queue.add(key)

    async def run(self) -> None:
        await self.queue.run(self.reconcile, "migration-controller")

    # -- configuration ----------------------------------------------------------------------

    def cluster_config(self) -> Obj:
        hco = self.hco.get(kinds.SYSTEM_NAMESPACE, kinds.HYPERCONVERGED_NAME) or {}
        config = dict(LIVE_MIGRATION_DEFAULTS)
        config.update(((hco.get("spec") or {}).get("liveMigrationConfig")) or {})
        return config

    # -- the reconcile pass -------------------------------------------------------------

    async def reconcile(self, key: Key) -> None:
        ns, name = key
        try:
            vmim = await self.store.get("VirtualMachineInstanceMigration", ns, name)
        except NotFound:
            return
        status = vmim.setdefault("status", {})
        phase = status.get("phase", "")
        deleting = bool(vmim["metadata"].get("deletionTimestamp"))

        if phase in ("Succeeded", "Failed"):
            if deleting:
                await self._remove_finalizer(vmim)
            return
        if phase == "":
            if deleting:
                await self._remove_finalizer(vmim)
                return
            if FINALIZER not in vmim["metadata"].get("finalizers", []):
                vmim["metadata"].setdefault("finalizers", []).append(FINALIZER)
                vmim = await self.store.update(vmim)
                status = vmim.setdefault("status", {})
            set_phase(status, "Pending")
            await write_status(self.store, vmim)
            return

        vmi = await self._get_vmi(ns, vmim["spec"]["vmiName"])
        uid = vmim["metadata"]["uid"]
        if vmi is None:
            await self._finish(
                vmim,
                "Failed",
                f'VirtualMachineInstance "{vmim["spec"]["vmiName"]}" no longer exists',
            )
            return
        ms = (vmi.get("status") or {}).get("migrationState") or {}
        ours = ms.get("migrationUid") == uid

        # Ordered failure and completion checks first.
        if ours and ms.get("completed") and vmi["status"].get("nodeName") == ms.get("targetNode"):
            await self._finish(vmim, "Succeeded", "", ms)
            return
        if ours and ms.get("failed"):
            await self._finish(vmim, "Failed", ms.get("failureReason") or "migration failed", ms)
            return
        if deleting:
            await self._cancel(vmim, vmi, ours)
            return

        if phase == "Pending":
            await self._admit(vmim, vmi)
        elif phase == "Scheduling":
            await self._schedule(vmim, vmi)
        elif phase in ("Scheduled", "PreparingTarget", "TargetReady") and ours:
            await self._follow_target(vmim, vmi, ms)
        elif phase == "Running" and ours:
            await self._mirror(vmim, ms)
        elif not ours:
            await self._finish(
                vmim, "Failed", "the VMI's migration state belongs to another migration"
            )

    # -- phase steps ----------------------------------------------------------------------

    async def _admit(self, vmim: Obj, vmi: Obj) -> None:
        """Pending -> Scheduling within the parallel limits, in priority order.

        The queue is every Pending VMIM ordered by (priority, creation time, name):
        evacuations (node drain) before user requests. Walking it while simulating
        admissions, this VMIM starts only if it would get one of the free slots; a
        candidate whose source node is at ``parallelOutboundMigrationsPerNode`` is
        skipped (it waits) without blocking the ones behind it. Counts come from the
        store, not the informer cache, so two passes in a row never both take the
        last slot.
        """
        config = self.cluster_config()
        all_vmims, _ = await self.store.list("VirtualMachineInstanceMigration")
        vmis, _ = await self.store.list("VirtualMachineInstance")
        node_of = {
            (v["metadata"]["namespace"], v["metadata"]["name"]): (v.get("status") or {}).get(
                "nodeName"
            )
            for v in vmis
        }

        def source(m: Obj) -> str | None:
            return node_of.get((m["metadata"]["namespace"], m["spec"]["vmiName"]))

        active = [m for m in all_vmims if (m.get("status") or {}).get("phase") in ACTIVE_PHASES]
        outbound = Counter(source(m) for m in active)
        free = int(config["parallelMigrationsPerCluster"]) - len(active)
        per_node = int(config["parallelOutboundMigrationsPerNode"])
        queue = sorted(
            (
                m
                for m in all_vmims
                if (m.get("status") or {}).get("phase") == "Pending"
                and not m["metadata"].get("deletionTimestamp")
            ),
            key=queue_order,
        )
        uid = vmim["metadata"]["uid"]
        for candidate in queue:
            if free <= 0:
                break
            src = source(candidate)
            if outbound[src] >= per_node:
                if candidate["metadata"]["uid"] == uid:
                    log.info(
                        "vmim %s: waiting: %d migrations already leave node %s",
                        vmim["metadata"]["name"],
                        outbound[src],
                        src,
                    )
                    return
                continue
            if candidate["metadata"]["uid"] == uid:
                set_phase(vmim["status"], "Scheduling")
                await write_status(self.store, vmim)
                return
            free -= 1
            outbound[src] += 1
        log.info(
            "vmim %s: waiting in the queue (%d running, limit %s)",
            vmim["metadata"]["name"],
            len(active),
            config["parallelMigrationsPerCluster"],
        )

    async def _schedule(self, vmim: Obj, vmi: Obj) -> None:
        config = self.cluster_config()
        status = vmim["status"]
        source = (vmi.get("status") or {}).get("nodeName", "")
        nodes, _ = await self.store.list("Node")
        vmis, _ = await self.store.list("VirtualMachineInstance")
        source_node = next((n for n in nodes if n["metadata"]["name"] == source), None)
        placement = scheduler.place(
            vmi,
            nodes,
            vmis,
            exclude=source,
            added_selector=vmim["spec"].get("addedNodeSelector") or {},
            source_cpu_model=scheduler.node_cpu_model(source_node) if source_node else None,
        )
        if placement.node is None:
            waited = self._seconds_in_phase(vmim, "Scheduling")
            timeout = float(config["unschedulableTimeoutSeconds"])
            message = f"no node can receive the VMI: {placement.message()}"
            if waited >= timeout:
                await self._finish(vmim, "Failed", f"{message} (waited {waited:.0f}s)")
                return
            if conditions.set_condition(
                status, "TargetSchedulable", False, "Unschedulable", message
            ):
                await write_status(self.store, vmim)
            self.queue.add_after(
                (vmim["metadata"]["namespace"], vmim["metadata"]["name"]), RECHECK_INTERVAL
            )
            return
        policies, _ = await self.store.list("MigrationPolicy")
        try:
            namespace = await self.store.get("Namespace", "", vmi["metadata"]["namespace"])
        except NotFound:
            namespace = {"metadata": {}}
        configuration, policy_name = policy.effective_config(
            config,
            policies,
            vmi["metadata"].get("labels") or {},
            namespace["metadata"].get("labels") or {},
        )
        handoff = {
            "migrationUid": vmim["metadata"]["uid"],
            "sourceNode": source,
            "targetNode": placement.node,
            "token": secrets.token_urlsafe(24),
            "migrationConfiguration": configuration,
        }
        if policy_name:
            handoff["migrationPolicyName"] = policy_name
        vmi_status = vmi.setdefault("status", {})
        vmi_status["migrationState"] = handoff
        vmi_status["migrationMethod"] = "LiveMigration"
        await write_status(self.store, vmi)  # resourceVersion precondition: no stale hand-off
        log.info("vmim %s: hand-off %s -> %s", vmim["metadata"]["name"], source, placement.node)
        conditions.set_condition(status, "TargetSchedulable", True, "Scheduled", "")
        set_phase(status, "Scheduled")
        status["migrationState"] = self._public(handoff)
        await write_status(self.store, vmim)

    async def _follow_target(self, vmim: Obj, vmi: Obj, ms: Obj) -> None:
        status = vmim["status"]
        before = copy.deepcopy(status)
        phase = status["phase"]
        target = self.nodes.get("", ms.get("targetNode", ""))
        if target is None or not conditions.is_true(target, "Ready"):
            await self._fail_before_start(
                vmim, vmi, f"target node {ms.get('targetNode')} is not ready"
            )
            return
        if self._seconds_in_phase(vmim, "Scheduled") > TARGET_PREPARE_TIMEOUT and not ms.get(
            "startTimestamp"
        ):
            await self._fail_before_start(
                vmim,
                vmi,
                f"target node {ms.get('targetNode')} did not prepare within {TARGET_PREPARE_TIMEOUT:.0f}s",
            )
            return
        if phase == "Scheduled" and ms.get("targetNodeDomainDetected"):
            set_phase(status, "PreparingTarget")
        elif phase == "PreparingTarget" and ms.get("targetNodeAddress"):
            set_phase(status, "TargetReady")
        elif phase == "TargetReady" and ms.get("startTimestamp"):
            set_phase(status, "Running")
        else:
            self.queue.add_after(
                (vmim["metadata"]["namespace"], vmim["metadata"]["name"]), RECHECK_INTERVAL
            )
        status["migrationState"] = self._public(ms)
        if status != before:
            await write_status(self.store, vmim)

    async def _mirror(self, vmim: Obj, ms: Obj) -> None:
        public = self._public(ms)
        if vmim["status"].get("migrationState") != public:
            vmim["status"]["migrationState"] = public
            await write_status(self.store, vmim)

    async def _cancel(self, vmim: Obj, vmi: Obj, ours: bool) -> None:
        """Deletion of a VMIM that has not finished: abort it where it stands."""
        name = vmim["metadata"]["name"]
        ms = (vmi.get("status") or {}).get("migrationState") or {}
        if not ours:
            await self._finish(vmim, "Failed", "canceled before hand-off", abort_status="Succeeded")
            return
        if not ms.get("startTimestamp"):
            await self._fail_before_start(
                vmim, vmi, "canceled by the user", abort_status="Succeeded"
            )
            return
        if not ms.get("abortRequested"):
            log.info("vmim %s: cancel requested while running: asking the source to abort", name)
            ms["abortRequested"] = True
            ms["abortStatus"] = "Aborting"
            await write_status(self.store, vmi)
        if vmim["status"].get("migrationState") != self._public(ms):
            vmim["status"]["migrationState"] = self._public(ms)
            await write_status(self.store, vmim)

    async def _fail_before_start(
        self, vmim: Obj, vmi: Obj, reason: str, abort_status: str | None = None
    ) -> None:
        """Fail a hand-off the source has not started; the write races the source's start."""
        ms = vmi["status"]["migrationState"]
        if ms.get("startTimestamp"):
            return  # the source started: it owns failure from now on
        ms.update(failed=True, failureReason=reason, endTimestamp=conditions.now_rfc3339())
        if abort_status:
            ms["abortStatus"] = abort_status
        try:
            await write_status(self.store, vmi)
        except Conflict:
            self.queue.add((vmim["metadata"]["namespace"], vmim["metadata"]["name"]))
            return
        await self._finish(vmim, "Failed", reason, ms, abort_status=abort_status)

    async def _finish(
        self,
        vmim: Obj,
        phase: str,
        reason: str,
        ms: Obj | None = None,
        abort_status: str | None = None,
    ) -> None:
        status = vmim["status"]
        if ms is not None:
            status["migrationState"] = self._public(ms)
        if abort_status:
            status.setdefault("migrationState", {})["abortStatus"] = abort_status
        if reason:
            status.setdefault("migrationState", {})["failureReason"] = reason
            if phase == "Failed":
                status["migrationState"]["failed"] = True
        if phase == "Succeeded":
            # A fast migration can finish between two passes: record the phases it went
            # through, in order, at the time this controller observed them.
            for skipped in ("Scheduled", "PreparingTarget", "TargetReady", "Running"):
                set_phase(status, skipped)
        set_phase(status, phase)
        log.info("vmim %s: %s%s", vmim["metadata"]["name"], phase, f": {reason}" if reason else "")
        vmim = await write_status(self.store, vmim)
        if vmim["metadata"].get("deletionTimestamp"):
            await self._remove_finalizer(vmim)
        await self._collect_garbage(vmim)

    async def _collect_garbage(self, vmim: Obj) -> None:
        """Keep the KEEP_FINISHED newest finished migrations of a VMI; delete the rest."""
        ns, vmi_name = vmim["metadata"]["namespace"], vmim["spec"]["vmiName"]
        items, _ = await self.store.list("VirtualMachineInstanceMigration", ns)
        finished = sorted(
            (
                m
                for m in items
                if m["spec"].get("vmiName") == vmi_name
                and (m.get("status") or {}).get("phase") in ("Succeeded", "Failed")
                and not m["metadata"].get("deletionTimestamp")
            ),
            key=lambda m: (
                m["metadata"].get("creationTimestamp", ""),
                int(m["metadata"]["resourceVersion"]),
            ),
            reverse=True,
        )
        for old in finished[KEEP_FINISHED:]:
            log.info(
                "vmim %s: garbage-collected (more than %d finished migrations of %s/%s)",
                old["metadata"]["name"],
                KEEP_FINISHED,
                ns,
                vmi_name,
            )
            with contextlib.suppress(NotFound, Conflict):
                await self.store.delete(
                    "VirtualMachineInstanceMigration",
                    ns,
                    old["metadata"]["name"],
                    uid=old["metadata"]["uid"],
                )

    async def _remove_finalizer(self, vmim: Obj) -> None:
        finalizers = vmim["metadata"].get("finalizers", [])
        if FINALIZER in finalizers:
            vmim["metadata"]["finalizers"] = [f for f in finalizers if f != FINALIZER]
            await self.store.update(vmim)

    # -- helpers --------------------------------------------------------------------------

    async def _get_vmi(self, ns: str, name: str) -> Obj | None:
        try:
            return await self.store.get("VirtualMachineInstance", ns, name)
        except NotFound:
            return None

    @staticmethod
    def _public(ms: Obj) -> Obj:
        """The VMI's migration state minus the per-migration secret."""
        public = copy.deepcopy(ms)
        public.pop("token", None)
        return public

    @staticmethod
    def _seconds_in_phase(vmim: Obj, phase: str) -> float:
        for stamp in (vmim.get("status") or {}).get("phaseTransitionTimestamps", []):
            if stamp.get("phase") == phase:
                started = conditions.parse_time(stamp["phaseTransitionTimestamp"]).timestamp()
                return max(0.0, time.time() - started)
        return 0.0
