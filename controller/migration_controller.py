"""VirtualMachineInstanceMigration reconciler: admission to hand-off to the final phase.

Phases (``MigrationPhase``, KubeVirt's): "" → Pending → Scheduling → Scheduled →
PreparingTarget → TargetReady → Running → Succeeded | Failed. One pass advances at most
one phase and records it in ``status.phaseTransitionTimestamps``; the handlers drive the
data path and report in ``vmi.status.migrationState``, which this reconciler mirrors
into the VMIM. Who writes which field of that record: ``FIELD_OWNERS`` in
``vmferry.migration_state``; this reconciler writes the hand-off (Scheduling →
Scheduled), ``abortRequested`` (cancel), and the outcome only while the source has not
started.

The hand-off, in order (a pass may stop after any step; the next one resumes):

1. the stream token's Secret (``controller.migration_token``): created, or the existing
   one of this migration reused;
2. the hand-off in the VMI (``migrationUid`` = this VMIM's uid), with the VMI's
   resourceVersion as precondition;
3. the VMIM's phase Scheduled. A pass that finds the VMI already carrying its own
   ``migrationUid`` does only this step: the hand-off is never written twice.

The token never appears in the VMI or the VMIM; the Secret is deleted before the VMIM's
final phase is written, so a finished migration leaves none behind.

Cancel = delete the VMIM (it carries a finalizer). Before the source starts, the
controller fails the hand-off and the target cleans up; while running it sets
``abortRequested`` and the source aborts, leaving the VM on its source.

A decentralized (cross-cluster) migration's VMIM (``spec.sendTo``/``spec.receive``) is
the sync controller's (``vmferry.decentralized``): this reconciler never writes it. It
still holds a parallel-migration slot while in an active phase
(``controller.migration_queue`` counts every VMIM).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable
from typing import Any

from controller import migration_token, policy, scheduler, volume_migration
from controller.admission import is_decentralized
from controller.events import controller_recorder
from controller.migration_events import MigrationEvents
from controller.network_controller import (
    REASON_NODES_NOT_READY,
    NetworkUnusable,
    load_nad,
    node_problem,
)
from controller.objects import rfc3339, set_phase, write_status
from controller.store import Store
from vmferry import failpoints
from vmferry.errors import Conflict, NotFound
from vmferry.events import EventRecorder
from vmferry.failpoints import Step
from vmferry.informer import Informer, Key, WorkQueue
from vmferry.migration_network import NAD_KIND, NAD_NAMESPACE, nad_key, not_ready_reason
from vmferry.migration_state import (
    FINAL_PHASES,
    LIVE_MIGRATION_DEFAULTS,
    PROGRESS_PHASES,
    AbortStatus,
    ConfigKey,
    Field,
    MigrationMode,
    MigrationPhase,
    MigrationState,
    Switchover,
    raw,
)
from vmferry.objects import conditions, kinds
from vmferry.volumes import PVC_KIND, required_node

log = logging.getLogger(__name__)
Obj = dict[str, Any]

FINALIZER = "kubevirt.io/migrationJobFinalize"
MIGRATION_METHOD = "LiveMigration"  # vmi.status.migrationMethod once handed off
KEEP_FINISHED = 5  # finished VMIMs kept per VMI; older ones are garbage-collected
TARGET_PREPARE_TIMEOUT = 60.0  # s from hand-off; a target handler that never answers fails it
RECHECK_INTERVAL = 2.0  # s; timeouts are evaluated at least this often
# s a migration may stay handed off (switchover Committed, the guest running on the target
# and the VMI naming it) without its completion before this controller records it: the
# source records it itself within RESUMED_TIMEOUT (30 s, its wait for the target's
# Resumed frame) unless it died; past this grace nobody else will (a source handler that
# never comes back), and the VMIM would hold its parallel-migration slot forever.
HANDOFF_COMPLETION_GRACE = 40.0
# The target prepares; the source has not started (the next phase is Running).
TARGET_PHASES = (
    MigrationPhase.SCHEDULED,
    MigrationPhase.PREPARING_TARGET,
    MigrationPhase.TARGET_READY,
)
_FIELDS = frozenset(Field)


def without_heartbeats(node: Obj) -> Obj:
    """``node`` without its conditions' ``lastHeartbeatTime`` (a copy)."""
    view = copy.deepcopy(node)
    view.get("metadata", {}).pop("resourceVersion", None)
    for condition in (view.get("status") or {}).get("conditions") or []:
        condition.pop("lastHeartbeatTime", None)
    return view


def mirror_of(ms: Obj) -> Obj:
    """The VMIM's copy of a VMI's migration state: the contract's fields only (a key that
    is not a ``Field`` — a pre-Secret token, say — never reaches the VMIM)."""
    return {key: copy.deepcopy(value) for key, value in ms.items() if key in _FIELDS}


class MigrationController:
    """Reconciles every VMIM; ``clock`` (seconds since the epoch) times the timeouts and
    stamps the phases, so tests can move time."""

    def __init__(
        self,
        store: Store,
        vmims: Informer,
        vmis: Informer,
        nodes: Informer,
        hco: Informer,
        *,
        clock: Callable[[], float] = time.time,
        recorder: EventRecorder | None = None,
    ) -> None:
        self.store = store
        self.events = MigrationEvents(recorder or controller_recorder(store, clock=clock))
        self.vmims = vmims
        self.vmis = vmis
        self.nodes = nodes
        self.hco = hco
        self.clock = clock
        self.queue = WorkQueue()
        # VMIM uid -> when this controller first saw it handed off with no completion
        # (in memory: a controller restart only restarts the grace).
        self._handed_off_since: dict[str, float] = {}
        vmims.add_handler(self._on_vmim)
        vmis.add_handler(self._on_vmi)
        nodes.add_handler(self._on_node, replay=False)  # the VMIMs' replay wakes them all

    # -- event routing --------------------------------------------------------------------

    def _on_vmim(self, key: Key, old: Obj | None, new: Obj | None) -> None:
        self.queue.add(key)
        if old is not None and (new is None or MigrationPhase.of(new).final):
            self._requeue_pending()  # a slot may have freed (a first sight frees none)

    def _on_vmi(self, key: Key, old: Obj | None, new: Obj | None) -> None:
        ns, name = key
        for vmim_name in self.store.index.queue.migrations_of(ns, name):
            self.queue.add((ns, vmim_name))

    def _on_node(self, key: Key, old: Obj | None, new: Obj | None) -> None:
        """A Node change that placement or a target's readiness can see (a heartbeat
        alone is none) wakes every unfinished migration."""
        if old is None or new is None or without_heartbeats(old) != without_heartbeats(new):
            self._requeue_active()

    def _requeue_pending(self) -> None:
        for key, phase in self.store.index.queue.unfinished().items():
            if phase in (MigrationPhase.UNSET, MigrationPhase.PENDING):
                self.queue.add(key)

    def _requeue_active(self) -> None:
        for key in self.store.index.queue.unfinished():
            self.queue.add(key)

    def _requeue_later(self, vmim: Obj) -> None:
        self.queue.add_after(
            (vmim["metadata"]["namespace"], vmim["metadata"]["name"]), RECHECK_INTERVAL
        )

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
        if is_decentralized(vmim):
            return  # the sync controller owns it (module docstring)
        status = vmim.setdefault("status", {})
        phase = MigrationPhase.of(vmim)
        deleting = bool(vmim["metadata"].get("deletionTimestamp"))

        if phase.final:
            if deleting:
                await self._remove_finalizer(vmim)
            return
        if phase == MigrationPhase.UNSET:
            if deleting:
                await self._remove_finalizer(vmim)
                return
            if FINALIZER not in vmim["metadata"].get("finalizers", []):
                vmim["metadata"].setdefault("finalizers", []).append(FINALIZER)
                vmim = await self.store.update(vmim)
                status = vmim.setdefault("status", {})
            set_phase(status, MigrationPhase.PENDING, self.clock)
            await write_status(self.store, vmim)
            return

        vmi = await self._get_vmi(ns, vmim["spec"]["vmiName"])
        if vmi is None:
            await self._finish(
                vmim,
                MigrationPhase.FAILED,
                f'VirtualMachineInstance "{vmim["spec"]["vmiName"]}" no longer exists',
            )
            return
        ms = MigrationState.of(vmi)
        ours = ms.migration_uid == vmim["metadata"]["uid"]

        # Ordered failure and completion checks first.
        if ours and ms.completed and vmi["status"].get("nodeName") == ms.target_node:
            await self._finish(vmim, MigrationPhase.SUCCEEDED, "", raw(vmi))
            return
        if ours and ms.failed:
            reason = ms.failure_reason or "migration failed"
            await self._finish(vmim, MigrationPhase.FAILED, reason, raw(vmi))
            return
        if deleting:
            await self._cancel(vmim, vmi, ours)
            return

        if phase == MigrationPhase.PENDING:
            await self._admit(vmim)
        elif phase == MigrationPhase.SCHEDULING:
            if ours:  # a pass wrote the hand-off and stopped before the VMIM's phase
                await self._scheduled(vmim, raw(vmi))
            else:
                await self._schedule(vmim, vmi)
        elif ours and phase in TARGET_PHASES:
            await self._follow_target(vmim, vmi, ms)
        elif ours and phase == MigrationPhase.RUNNING:
            if not await self._complete_handed_off(vmim, vmi, ms):
                await self._mirror(vmim, raw(vmi))
        elif not ours:
            await self._finish(
                vmim,
                MigrationPhase.FAILED,
                "the VMI's migration state belongs to another migration",
            )

    # -- phase steps ----------------------------------------------------------------------

    async def _admit(self, vmim: Obj) -> None:
        """Pending -> Scheduling within the parallel limits, in priority order
        (``controller.migration_queue``)."""
        # The store's index: as current as a list, O(nodes x log(Pending)) per decision.
        decision = self.store.index.queue.admit(vmim, self.cluster_config())
        if not decision.start:
            log.info("vmim %s: waiting: %s", vmim["metadata"]["name"], decision.reason)
            self.events.waiting(vmim, decision.reason)
            return
        set_phase(vmim["status"], MigrationPhase.SCHEDULING, self.clock)
        await write_status(self.store, vmim)
        self.events.phase(vmim, MigrationPhase.SCHEDULING)

    async def _schedule(self, vmim: Obj, vmi: Obj) -> None:
        """Scheduling -> Scheduled: place the target, then the hand-off in its three
        steps (module docstring). A migration over a migration network fails here when
        its NAD is missing or invalid, or the source or every target that would fit
        cannot serve on it (``controller.network_controller``): never a fallback."""
        config = self.cluster_config()
        status = vmim["status"]
        source = (vmi.get("status") or {}).get("nodeName", "")
        nodes = self.store.index.nodes()  # and the memory in use: O(nodes), not O(VMIs)
        source_node = self.store.index.node(source)
        configuration, policy_name = await self._effective_config(config, vmi)
        network = str(configuration.get(ConfigKey.NETWORK) or "")
        network_problem: Callable[[Obj], str | None] | None = None
        if network:
            try:
                network_problem = await self._network_filter(
                    network, [n.obj for n in nodes], source_node, source
                )
            except NetworkUnusable as e:
                await self._finish(vmim, MigrationPhase.FAILED, e.message)
                return

        # A storage migration to a local claim: the target is that claim's node.
        claim_objs, _ = await self.store.list(PVC_KIND, vmim["metadata"]["namespace"])
        local = required_node(vmi.get("spec") or {}, {c["metadata"]["name"]: c for c in claim_objs})
        if local is not None:
            nodes = [n for n in nodes if n.name == local]

        def placement_for(problem: Callable[[Obj], str | None] | None) -> scheduler.Placement:
            return scheduler.place_with_usage(
                vmi,
                nodes,
                self.store.index.memory_used(),
                exclude=source,
                added_selector=vmim["spec"].get("addedNodeSelector") or {},
                source_cpu_model=scheduler.node_cpu_model(source_node) if source_node else None,
                network=nad_key(network) if network else "",
                network_problem=problem,
            )

        placement = placement_for(network_problem)
        if placement.node is None and network_problem is not None:
            # A node would fit but for the migration network: that is the failure.
            chosen = placement_for(None).node
            if chosen is not None:
                node = next(n.obj for n in nodes if n.name == chosen)
                reason = network_problem(node) or f"target node {chosen} is not on {network}"
                await self._finish(vmim, MigrationPhase.FAILED, reason)
                return
        if placement.node is None:
            waited = self._seconds_in_phase(vmim, MigrationPhase.SCHEDULING)
            timeout = float(config[ConfigKey.UNSCHEDULABLE_TIMEOUT_S])
            message = f"no node can receive the VMI: {placement.message()}"
            if waited >= timeout:
                await self._finish(vmim, MigrationPhase.FAILED, f"{message} (waited {waited:.0f}s)")
                return
            if conditions.set_condition(
                status, "TargetSchedulable", False, "Unschedulable", message
            ):
                await write_status(self.store, vmim)
                self.events.unschedulable(vmim, message)
            self._requeue_later(vmim)
            return
        uid = vmim["metadata"]["uid"]
        await migration_token.ensure_token_secret(self.store, uid, source, placement.node)
        handoff: Obj = {
            Field.MIGRATION_UID: uid,
            Field.SOURCE_NODE: source,
            Field.TARGET_NODE: placement.node,
            Field.MIGRATION_CONFIGURATION: configuration,
        }
        if policy_name:
            handoff[Field.MIGRATION_POLICY_NAME] = policy_name
        vmi_status = vmi.setdefault("status", {})
        vmi_status["migrationState"] = handoff
        vmi_status["migrationMethod"] = MIGRATION_METHOD
        await write_status(self.store, vmi)  # resourceVersion precondition: no stale hand-off
        log.info("vmim %s: hand-off %s -> %s", vmim["metadata"]["name"], source, placement.node)
        failpoints.hit(Step.CONTROLLER_HANDED_OFF)
        await self._scheduled(vmim, handoff)

    async def _effective_config(self, cluster: Obj, vmi: Obj) -> tuple[Obj, str | None]:
        """The migration's configuration: the cluster's overlaid by the winning policy."""
        policies, _ = await self.store.list("MigrationPolicy")
        try:
            namespace = await self.store.get("Namespace", "", vmi["metadata"]["namespace"])
        except NotFound:
            namespace = {"metadata": {}}
        return policy.effective_config(
            cluster,
            policies,
            vmi["metadata"].get("labels") or {},
            namespace["metadata"].get("labels") or {},
        )

    async def _network_filter(
        self, network: str, nodes: list[Obj], source_node: Obj | None, source: str
    ) -> Callable[[Obj], str | None]:
        """Why a target cannot serve a migration over ``network`` (a NAD's name), as a
        placement filter. Raises NetworkUnusable when the NAD is missing or invalid, or
        the source cannot use the network: the migration fails at once."""
        try:
            nad_obj: Obj | None = await self.store.get(NAD_KIND, NAD_NAMESPACE, network)
        except NotFound:
            nad_obj = None
        nad = load_nad(network, nad_obj, nodes)
        if source_node is None:
            problem = not_ready_reason(network, source, None)
        else:
            problem = node_problem(network, nad, source_node)
        if problem:
            raise NetworkUnusable(REASON_NODES_NOT_READY, problem)
        return lambda node: node_problem(network, nad, node)

    async def _scheduled(self, vmim: Obj, ms: Obj) -> None:
        """Record the hand-off ``ms`` (already in the VMI) on the VMIM: phase Scheduled."""
        status = vmim["status"]
        conditions.set_condition(status, "TargetSchedulable", True, "Scheduled", "")
        set_phase(status, MigrationPhase.SCHEDULED, self.clock)
        status["migrationState"] = mirror_of(ms)
        await write_status(self.store, vmim)
        self.events.phase(vmim, MigrationPhase.SCHEDULED)

    async def _follow_target(self, vmim: Obj, vmi: Obj, ms: MigrationState) -> None:
        """Scheduled -> PreparingTarget -> TargetReady -> Running, as the handlers report;
        fails a hand-off whose target is not Ready or does not prepare in time."""
        status = vmim["status"]
        before = copy.deepcopy(status)
        phase = MigrationPhase.of(vmim)
        target = self.nodes.get("", ms.target_node)
        if target is None or not conditions.is_true(target, "Ready"):
            await self._fail_before_start(vmim, vmi, f"target node {ms.target_node} is not ready")
            return
        waited = self._seconds_in_phase(vmim, MigrationPhase.SCHEDULED)
        if waited > TARGET_PREPARE_TIMEOUT and not ms.start_timestamp:
            await self._fail_before_start(
                vmim,
                vmi,
                f"target node {ms.target_node} did not prepare within "
                f"{TARGET_PREPARE_TIMEOUT:.0f}s",
            )
            return
        if phase == MigrationPhase.SCHEDULED and ms.target_domain_detected:
            set_phase(status, MigrationPhase.PREPARING_TARGET, self.clock)
        elif phase == MigrationPhase.PREPARING_TARGET and ms.target_address:
            set_phase(status, MigrationPhase.TARGET_READY, self.clock)
        elif phase == MigrationPhase.TARGET_READY and ms.start_timestamp:
            set_phase(status, MigrationPhase.RUNNING, self.clock)
        else:
            self._requeue_later(vmim)
        status["migrationState"] = mirror_of(raw(vmi))
        if status != before:
            await write_status(self.store, vmim)
            if status.get("phase") != before.get("phase"):
                self.events.phase(vmim, MigrationPhase.of(vmim), vmi=vmi)

    async def _complete_handed_off(self, vmim: Obj, vmi: Obj, ms: MigrationState) -> bool:
        """The monitor's part of finishing a migration after the decision: a pre-copy
        hand-off whose guest runs on the target (it published its ready timestamp and the
        VMI names it) but whose completion nobody recorded within
        HANDOFF_COMPLETION_GRACE (the source handler died after the hand-off) is
        completed here; the next pass finishes the VMIM Succeeded. True if it wrote."""
        uid = vmim["metadata"]["uid"]
        handed_off = (
            ms.switchover == Switchover.COMMITTED
            and not ms.ended
            and ms.mode != MigrationMode.POST_COPY
            and bool(raw(vmi).get(Field.TARGET_NODE_DOMAIN_READY_TIMESTAMP))
            and (vmi.get("status") or {}).get("nodeName") == ms.target_node
        )
        if not handed_off:
            self._handed_off_since.pop(uid, None)
            return False
        since = self._handed_off_since.setdefault(uid, self.clock())
        if self.clock() - since < HANDOFF_COMPLETION_GRACE:
            self._requeue_later(vmim)
            return False
        log.warning(
            "correction: vmim %s: the VM runs on %s since the hand-off but no handler recorded "
            "the completion within %.0fs: recording it",
            vmim["metadata"]["name"],
            ms.target_node,
            HANDOFF_COMPLETION_GRACE,
        )
        record = raw(vmi)
        record[Field.COMPLETED] = True
        record[Field.END_TIMESTAMP] = rfc3339(self.clock())
        try:
            await write_status(self.store, vmi)
        except Conflict:
            self.queue.add((vmim["metadata"]["namespace"], vmim["metadata"]["name"]))
            return True
        self._handed_off_since.pop(uid, None)
        self.events.repaired(vmim, ms.target_node)
        return True

    async def _mirror(self, vmim: Obj, ms: Obj) -> None:
        mirror = mirror_of(ms)
        before = vmim["status"].get("migrationState") or {}
        if before != mirror:
            vmim["status"]["migrationState"] = mirror
            await write_status(self.store, vmim)
            self.events.mirrored(vmim, before, mirror)

    async def _cancel(self, vmim: Obj, vmi: Obj, ours: bool) -> None:
        """Deletion of a VMIM that has not finished: abort it where it stands."""
        name = vmim["metadata"]["name"]
        if not ours:
            await self._finish(
                vmim,
                MigrationPhase.FAILED,
                "canceled before hand-off",
                abort_status=AbortStatus.SUCCEEDED,
            )
            return
        ms = raw(vmi)
        if not ms.get(Field.START_TIMESTAMP):
            await self._fail_before_start(
                vmim, vmi, "canceled by the user", abort_status=AbortStatus.SUCCEEDED
            )
            return
        if not ms.get(Field.ABORT_REQUESTED):
            log.info("vmim %s: cancel requested while running: asking the source to abort", name)
            ms[Field.ABORT_REQUESTED] = True
            ms[Field.ABORT_STATUS] = AbortStatus.ABORTING
            await write_status(self.store, vmi)
            self.events.abort_requested(vmim)
        await self._mirror(vmim, ms)

    async def _fail_before_start(
        self, vmim: Obj, vmi: Obj, reason: str, abort_status: AbortStatus | None = None
    ) -> None:
        """Fail a hand-off the source has not started; the write races the source's start
        (a Conflict re-queues: the next pass sees whether the source won)."""
        ms = raw(vmi)
        if ms.get(Field.START_TIMESTAMP):
            return  # the source started: it owns failure from now on
        ms[Field.FAILED] = True
        ms[Field.FAILURE_REASON] = reason
        ms[Field.END_TIMESTAMP] = rfc3339(self.clock())
        if abort_status:
            ms[Field.ABORT_STATUS] = abort_status
        try:
            await write_status(self.store, vmi)
        except Conflict:
            self.queue.add((vmim["metadata"]["namespace"], vmim["metadata"]["name"]))
            return
        await self._finish(vmim, MigrationPhase.FAILED, reason, ms, abort_status=abort_status)

    async def _finish(
        self,
        vmim: Obj,
        phase: MigrationPhase,
        reason: str,
        ms: Obj | None = None,
        abort_status: AbortStatus | None = None,
    ) -> None:
        """Write the final ``phase``, the stream token's Secret deleted first (so a
        finished VMIM never leaves one behind), then collect old finished VMIMs."""
        await migration_token.delete_token_secret(self.store, vmim["metadata"]["uid"])
        await self._settle_volumes(vmim, phase)
        status = vmim["status"]
        if ms is not None:
            status["migrationState"] = mirror_of(ms)
        if abort_status:
            status.setdefault("migrationState", {})[Field.ABORT_STATUS] = abort_status
        if reason:
            status.setdefault("migrationState", {})[Field.FAILURE_REASON] = reason
            if phase == MigrationPhase.FAILED:
                status["migrationState"][Field.FAILED] = True
        if phase == MigrationPhase.SUCCEEDED:
            # A fast migration can finish between two passes: record the phases it went
            # through, in order, at the time this controller observed them.
            for skipped in PROGRESS_PHASES:
                set_phase(status, skipped, self.clock)
        set_phase(status, phase, self.clock)
        if phase == MigrationPhase.SUCCEEDED:
            failpoints.hit(Step.CONTROLLER_COMPLETING)
        log.info("vmim %s: %s%s", vmim["metadata"]["name"], phase, f": {reason}" if reason else "")
        vmim = await write_status(self.store, vmim)
        vmi = self.vmis.get(vmim["metadata"]["namespace"], vmim["spec"].get("vmiName", ""))
        self.events.phase(vmim, phase, vmi=vmi, reason=reason, abort_status=abort_status)
        if vmim["metadata"].get("deletionTimestamp"):
            await self._remove_finalizer(vmim)
        await self._collect_garbage(vmim)

    async def _settle_volumes(self, vmim: Obj, phase: MigrationPhase) -> None:
        """A storage migration ended: its VMI keeps the new claims, or goes back to the
        source claims (``controller.volume_migration``)."""
        if volume_migration.VOLUME_MIGRATION_LABEL not in (vmim["metadata"].get("labels") or {}):
            return
        vmi = await self._get_vmi(vmim["metadata"]["namespace"], vmim["spec"]["vmiName"])
        if vmi is None:
            return
        ms = MigrationState.of(vmi)
        if ms.migration_uid not in ("", vmim["metadata"]["uid"]) and ms.active:
            return  # another migration moves it now
        await volume_migration.settle(self.store, vmi, phase == MigrationPhase.SUCCEEDED)

    async def _collect_garbage(self, vmim: Obj) -> None:
        """Keep the KEEP_FINISHED newest finished migrations of a VMI; delete the rest.
        Then delete the token Secrets no unfinished migration owns (one whose VMIM was
        removed without passing here, or survived a crash)."""
        ns, vmi_name = vmim["metadata"]["namespace"], vmim["spec"]["vmiName"]
        index = self.store.index.queue  # as current as a list, without reading every VMIM
        await migration_token.delete_orphans(
            self.store, index.unfinished_uids(), index.ended_uids()
        )
        items = []
        for name in index.migrations_of(ns, vmi_name):
            with contextlib.suppress(NotFound):
                items.append(await self.store.get("VirtualMachineInstanceMigration", ns, name))
        finished = sorted(
            (
                m
                for m in items
                if m["spec"].get("vmiName") == vmi_name
                and MigrationPhase.of(m) in FINAL_PHASES
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

    def _seconds_in_phase(self, vmim: Obj, phase: MigrationPhase) -> float:
        """Seconds since the VMIM entered ``phase`` by this controller's clock (0 if never)."""
        for stamp in (vmim.get("status") or {}).get("phaseTransitionTimestamps", []):
            if stamp.get("phase") == phase:
                started = conditions.parse_time(stamp["phaseTransitionTimestamp"]).timestamp()
                return max(0.0, self.clock() - started)
        return 0.0
