"""The receiving half of a decentralized migration: the VMIMs with ``spec.receive`` of this
cluster (the migration controller leaves them alone).

Phases (:data:`sync_controller.common.RECEIVER_TRANSITIONS`): "" → WaitingForSync →
Scheduling → Scheduled → PreparingTarget → TargetReady → Running → Succeeded | Failed.

- WaitingForSync: this half is published (the sender's link brings it over); the VMI
  ``vmiName`` must wait to receive (phase WaitingForSync: its VM's runStrategy
  WaitAsReceiver). When the sender's half arrives (its VMIM uid, source node, token):
  Scheduling.
- Scheduling: a target is placed among this cluster's nodes (``controller.scheduler``);
  the token Secret (``token_secret_name(<sending VMIM uid>)``, readable by the target
  node, holding the relayed token) and the receiving VMI's hand-off (migrationUid = the
  sending VMIM's uid, the sender's source node, the target, this cluster's effective
  configuration with post-copy off, migrationID, peerCluster, role receiver) are written:
  Scheduled.
- The target handler prepares and publishes targetNodeAddress/Port: PreparingTarget,
  TargetReady; this half then carries target node/address/port. Running once the
  sender runs (or a decision is known).
- The sender's switchover/completed/failed/failureReason are mirrored into the
  receiving VMI (``Owner.SYNC``), each field once, never over a different value: the
  target handler resumes on the mirrored Committed, discards on Aborted or failed.
- The guest runs here (targetNodeDomainReadyTimestamp, the VMI naming the target node,
  Committed): target_resumed is published, the VMI is Running, the receiving VM's
  runStrategy is restored from ``kubevirt.io/restore-run-strategy`` (annotation removed),
  the VMIM Succeeded.
- Failure or cancel: the VMIM Failed and the receiving VMI phase Failed. While the target
  address was never published the source cannot have started, so this side may fail on
  its own (cancel, placement, gate, the peer's cancel); afterwards only the sender's
  record decides: a cancel is published (``cancelled``) and the mirrors wait for its
  verdict, however long the link is down.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any, cast

from controller import migration_token, scheduler
from controller.migration_controller import (
    MIGRATION_METHOD,
    TARGET_PREPARE_TIMEOUT,
    mirror_of,
)
from controller.network_controller import NetworkUnusable, load_nad, node_problem
from controller.objects import memory_of, rfc3339
from sync_controller.common import (
    RECEIVER_TRANSITIONS,
    VM,
    VMI,
    VMIM,
    Api,
    HalfReconciler,
    add_finalizer,
    advance,
    as_store,
    cluster_config,
    effective_config,
    finish,
    gate_on,
    peer_final,
    remove_finalizer,
    seconds_in_phase,
    write_status,
)
from sync_controller.peer import PeerLink
from vmferry.decentralized import (
    RESTORE_RUN_STRATEGY_ANNOTATION,
    RUN_STRATEGY_WAIT_AS_RECEIVER,
    SYNC_ADDRESSES_FIELD,
    VMI_PHASE_WAITING_FOR_SYNC,
    Role,
    SyncState,
    gate_off_message,
)
from vmferry.errors import AlreadyExists, NotFound
from vmferry.informer import Key, Source
from vmferry.migration_network import NAD_KIND, NAD_NAMESPACE, nad_key
from vmferry.migration_state import (
    TOKEN_SECRET_NAMESPACE,
    VMI_FINAL_PHASES,
    AbortStatus,
    ConfigKey,
    Field,
    MigrationPhase,
    MigrationState,
    Switchover,
    VMIPhase,
    raw,
    token_secret_name,
)
from vmferry.objects import conditions
from vmferry.objects.kinds import HYPERCONVERGED_NAME, SYSTEM_NAMESPACE

log = logging.getLogger(__name__)
Obj = dict[str, Any]

FINAL_RELAY_SECONDS = 3600.0  # s a finished migration's final half is still relayed
REASON_RECEIVE_FAILED = "MigrationFailed"
# The sender's fields mirrored into the receiving VMI.
MIRRORED = (Field.SWITCHOVER, Field.COMPLETED, Field.FAILED, Field.FAILURE_REASON)


def receive(vmim: Obj) -> Obj:
    return cast(Obj, (vmim.get("spec") or {}).get("receive") or {})


def runs_here(vmi: Obj) -> bool:
    """The guest runs on the receiving target: Committed, its ready timestamp published
    and the VMI naming the target node."""
    ms = MigrationState.of(vmi)
    return (
        ms.switchover == Switchover.COMMITTED
        and bool(raw(vmi).get(Field.TARGET_NODE_DOMAIN_READY_TIMESTAMP))
        and (vmi.get("status") or {}).get("nodeName") == ms.target_node
    )


class ReceiverReconciler(HalfReconciler):
    """Reconciles this cluster's receiving VMIMs; ``source`` (default: ``api``) feeds the
    informers, ``clock`` times the timeouts and stamps the phases."""

    name = "sync-receiver"
    peer_role = Role.SENDER

    @staticmethod
    def side(vmim: Obj) -> Obj:
        return receive(vmim)

    def __init__(
        self,
        api: Api,
        link: PeerLink,
        clock: Callable[[], float] = time.time,
        *,
        cluster_name: str,
        source: Source | None = None,
    ) -> None:
        super().__init__(api, link, clock, cluster_name=cluster_name, source=source)
        self._cancelling: set[str] = set()  # VMIM uids this side asked the sender to cancel

    # -- the peer's half ------------------------------------------------------------------

    @staticmethod
    def _handed_uid(vmim: Obj) -> str:
        """The sending VMIM's uid once this side wrote the hand-off (its mirror)."""
        return str(
            ((vmim.get("status") or {}).get("migrationState") or {}).get(Field.MIGRATION_UID) or ""
        )

    def _peer(self, vmim: Obj) -> SyncState | None:
        state = self.link.latest(receive(vmim)["migrationID"])
        if state is None or state.role != Role.SENDER:
            return None
        handed = self._handed_uid(vmim)
        if handed and state.migration_uid != handed:
            return None  # a half of another sending VMIM with this migrationID
        return state

    # -- publishing this half -------------------------------------------------------------

    def _publish(self, vmim: Obj, vmi: Obj | None, **override: Any) -> None:
        handed = self._handed_uid(vmim)
        peer = self._peer(vmim)
        record = raw(vmi) if vmi is not None else {}
        if not handed or record.get(Field.MIGRATION_UID) != handed:
            record = (vmim.get("status") or {}).get("migrationState") or {}
        ms = MigrationState.from_dict(record)
        phase = MigrationPhase.of(vmim)
        listening = bool(ms.target_address and ms.target_port)
        state = SyncState(
            migration_id=receive(vmim)["migrationID"],
            role=Role.RECEIVER,
            migration_uid=handed or (peer.migration_uid if peer else ""),
            namespace=vmim["metadata"]["namespace"],
            vmi_name=vmim["spec"]["vmiName"],
            phase=str(phase),
            target_node=ms.target_node if listening else "",
            target_address=ms.target_address if listening else "",
            target_port=ms.target_port if listening else 0,
            target_resumed=vmi is not None and bool(handed) and runs_here(vmi),
            failed=ms.failed or phase == MigrationPhase.FAILED,
            failure_reason=ms.failure_reason,
            cancelled=bool(vmim["metadata"].get("deletionTimestamp"))
            or vmim["metadata"]["uid"] in self._cancelling,
        )
        if override:
            state = dataclasses.replace(state, **override)
        self.link.publish(state)

    async def _publish_fresh(self, vmim: Obj) -> None:
        ns = vmim["metadata"]["namespace"]
        try:
            vmim = await self.api.get(VMIM, ns, vmim["metadata"]["name"])
        except NotFound:
            return
        self._publish(vmim, await self._get_vmi(ns, vmim["spec"]["vmiName"]))

    # -- the reconcile pass ---------------------------------------------------------------

    async def reconcile(self, key: Key) -> None:
        ns, name = key
        try:
            vmim = await self.api.get(VMIM, ns, name)
        except NotFound:
            return
        if not receive(vmim):
            return
        vmim.setdefault("status", {})
        phase = MigrationPhase.of(vmim)
        deleting = bool(vmim["metadata"].get("deletionTimestamp"))

        if phase.final:
            await self._final(vmim)
            return
        if phase == MigrationPhase.UNSET:
            if deleting:
                await remove_finalizer(self.api, vmim)
                return
            vmim = await add_finalizer(self.api, vmim)
            advance(
                RECEIVER_TRANSITIONS,
                vmim.setdefault("status", {}),
                MigrationPhase.WAITING_FOR_SYNC,
                self.clock,
            )
            await self._note_sync_addresses(vmim)
            await write_status(self.api, vmim)
            self._again(vmim)
            return
        if phase == MigrationPhase.WAITING_FOR_SYNC and not vmim["status"].get(
            SYNC_ADDRESSES_FIELD
        ):
            if await self._note_sync_addresses(vmim):
                written = await write_status(self.api, vmim)
                if written is None:  # a Conflict: the next pass reads afresh
                    self._again(vmim)
                    return
                vmim = written

        vmi = await self._get_vmi(ns, vmim["spec"]["vmiName"])
        peer = self._peer(vmim)
        handed = self._handed_uid(vmim)
        if vmi is not None and handed and raw(vmi).get(Field.MIGRATION_UID) == handed:
            await self._handed_off(vmim, vmi, peer, deleting)
        else:
            await self._before_handoff(vmim, vmi, peer, deleting)
        await self._publish_fresh(vmim)

    async def _note_sync_addresses(self, vmim: Obj) -> bool:
        """The receiving VMIM shows where this cluster's sync controllers listen (what the
        sending side's connectURL must be: the MTV orchestrator reads it there, with a
        provider token that may not read the HyperConverged). True when it changed."""
        try:
            hco = await self.api.get("HyperConverged", SYSTEM_NAMESPACE, HYPERCONVERGED_NAME)
        except NotFound:
            return False
        addresses = list((hco.get("status") or {}).get(SYNC_ADDRESSES_FIELD) or [])
        if not addresses or addresses == vmim["status"].get(SYNC_ADDRESSES_FIELD):
            return False
        vmim["status"][SYNC_ADDRESSES_FIELD] = addresses
        return True

    async def _before_handoff(
        self, vmim: Obj, vmi: Obj | None, peer: SyncState | None, deleting: bool
    ) -> None:
        """Nothing of this migration is in the receiving VMI yet (no target prepares):
        this side may fail on its own."""
        vmi_name = vmim["spec"]["vmiName"]
        if (
            vmi is not None
            and MigrationPhase.of(vmim) == MigrationPhase.SCHEDULING
            and self._ours_unrecorded(vmim, vmi)
        ):
            # a pass wrote the hand-off and stopped before the VMIM (the link may be down
            # now: the VMI's record says whose it is); the next pass goes on from there
            await self._scheduled(vmim, raw(vmi))
            return
        if self._handed_uid(vmim):  # the VMIM says handed off, the VMI does not: replaced
            await self._fail(vmim, vmi, f'VirtualMachineInstance "{vmi_name}" was replaced')
            return
        if not await gate_on(self.api):
            await self._fail(vmim, vmi, gate_off_message())
            return
        if deleting:
            await self._fail(vmim, vmi, "canceled by the user", AbortStatus.SUCCEEDED)
            return
        if peer is not None and (peer.cancelled or peer.failed):
            where = self.link.peer_cluster(receive(vmim)["migrationID"]) or "the sending cluster"
            reason = (
                f"canceled on the sending cluster {where}"
                if peer.cancelled
                else f"the sending cluster {where} failed: {peer.failure_reason or 'no reason given'}"
            )
            await self._fail(vmim, vmi, reason)
            return
        if vmi is None:
            status = vmim["status"]
            message = f'waiting for VirtualMachineInstance "{vmi_name}" (its VM runStrategy {RUN_STRATEGY_WAIT_AS_RECEIVER})'
            if conditions.set_condition(
                status, "TargetSchedulable", False, "WaitingForVMI", message
            ):
                await write_status(self.api, vmim)
            self._later(vmim)
            return
        vmi_phase = (vmi.get("status") or {}).get("phase", "")
        if vmi_phase != VMI_PHASE_WAITING_FOR_SYNC:
            await self._fail(
                vmim,
                None,
                f'VirtualMachineInstance "{vmi_name}" is not waiting to receive a migration '
                f"(phase {vmi_phase or 'none'}, not {VMI_PHASE_WAITING_FOR_SYNC}): its VM needs "
                f"runStrategy {RUN_STRATEGY_WAIT_AS_RECEIVER}",
            )
            return
        known = peer is not None and bool(peer.migration_uid and peer.source_node and peer.token)
        phase = MigrationPhase.of(vmim)
        if phase == MigrationPhase.WAITING_FOR_SYNC:
            if known:
                advance(RECEIVER_TRANSITIONS, vmim["status"], MigrationPhase.SCHEDULING, self.clock)
                if await write_status(self.api, vmim) is not None:
                    self._again(vmim)
            return
        if phase == MigrationPhase.SCHEDULING and peer is not None and known:
            await self._schedule(vmim, vmi, peer)

    @staticmethod
    def _ours_unrecorded(vmim: Obj, vmi: Obj) -> bool:
        """The receiving VMI carries an unfinished hand-off of this VMIM's migration ID
        that the VMIM does not record yet."""
        record = raw(vmi)
        return (
            bool(record.get(Field.MIGRATION_UID))
            and record.get(Field.MIGRATION_ID) == receive(vmim)["migrationID"]
            and record.get(Field.ROLE) == Role.RECEIVER
            and not MigrationState.from_dict(record).ended
        )

    async def _schedule(self, vmim: Obj, vmi: Obj, peer: SyncState) -> None:
        """Scheduling -> Scheduled: place a target here, the token Secret, the hand-off."""
        mid = receive(vmim)["migrationID"]
        if peer.memory_bytes and peer.memory_bytes != memory_of(vmi):
            await self._fail(
                vmim,
                vmi,
                f"the receiving VMI's memory ({memory_of(vmi)} bytes) differs from the "
                f"source's ({peer.memory_bytes} bytes)",
            )
            return
        peer_cluster = self.link.peer_cluster(mid)
        if not peer_cluster:
            self._later(vmim)
            return
        if peer_cluster == self.cluster_name:
            await self._fail(
                vmim,
                vmi,
                f"the sender of migration {mid} is this cluster ({self.cluster_name}): a "
                "decentralized migration moves a VM from another cluster",
            )
            return
        configuration, policy_name = await effective_config(self.api, vmi)
        network = str(configuration.get(ConfigKey.NETWORK) or "")
        nodes, _ = await self.api.list("Node")
        vmis, _ = await self.api.list(VMI)
        network_problem: Callable[[Obj], str | None] | None = None
        if network:
            try:
                nad_obj: Obj | None = await self.api.get(NAD_KIND, NAD_NAMESPACE, network)
            except NotFound:
                nad_obj = None
            try:
                nad = load_nad(network, nad_obj, nodes)
            except NetworkUnusable as e:
                await self._fail(vmim, vmi, e.message)
                return

            def network_problem(node: Obj) -> str | None:
                return node_problem(network, nad, node)

        placement = scheduler.place(
            vmi,
            nodes,
            vmis,
            added_selector=vmim["spec"].get("addedNodeSelector") or {},
            network=nad_key(network) if network else "",
            network_problem=network_problem,
        )
        status = vmim["status"]
        if placement.node is None:
            waited = seconds_in_phase(vmim, MigrationPhase.SCHEDULING, self.clock)
            timeout = float((await cluster_config(self.api))[ConfigKey.UNSCHEDULABLE_TIMEOUT_S])
            message = f"no node can receive the VMI: {placement.message()}"
            if waited >= timeout:
                await self._fail(vmim, vmi, f"{message} (waited {waited:.0f}s)")
                return
            if conditions.set_condition(
                status, "TargetSchedulable", False, "Unschedulable", message
            ):
                await write_status(self.api, vmim)
            self._later(vmim)
            return
        await self._write_token(peer.migration_uid, placement.node, peer.token)
        handoff: Obj = {
            Field.MIGRATION_UID: peer.migration_uid,
            Field.SOURCE_NODE: peer.source_node,
            Field.TARGET_NODE: placement.node,
            Field.MIGRATION_CONFIGURATION: configuration,
            Field.MIGRATION_ID: mid,
            Field.PEER_CLUSTER: peer_cluster,
            Field.ROLE: Role.RECEIVER,
        }
        if policy_name:
            handoff[Field.MIGRATION_POLICY_NAME] = policy_name
        vmi_status = vmi.setdefault("status", {})
        vmi_status["migrationState"] = handoff
        vmi_status["migrationMethod"] = MIGRATION_METHOD
        if await write_status(self.api, vmi) is None:
            self._again(vmim)
            return
        log.info(
            "vmim %s: receiving %s/%s from %s/%s on %s/%s",
            vmim["metadata"]["name"],
            vmi["metadata"]["namespace"],
            vmi["metadata"]["name"],
            peer_cluster,
            peer.source_node,
            self.cluster_name,
            placement.node,
        )
        await self._scheduled(vmim, handoff)

    async def _write_token(self, migration_uid: str, target: str, token: str) -> None:
        """The relayed token, readable by the target node only (the source is the peer's)."""
        wanted = migration_token.token_secret(migration_uid, "", target, token)
        try:
            await self.api.create(wanted)
            return
        except AlreadyExists:
            pass
        current = await self.api.get(
            "Secret", TOKEN_SECRET_NAMESPACE, token_secret_name(migration_uid)
        )
        if (
            current.get("data") != wanted["data"]
            or current["metadata"].get("labels") != wanted["metadata"]["labels"]
        ):
            current["data"] = wanted["data"]
            current["metadata"]["labels"] = wanted["metadata"]["labels"]
            await self.api.update(current)

    async def _scheduled(self, vmim: Obj, handoff: Obj) -> None:
        status = vmim["status"]
        conditions.set_condition(status, "TargetSchedulable", True, "Scheduled", "")
        advance(RECEIVER_TRANSITIONS, status, MigrationPhase.SCHEDULED, self.clock)
        status["migrationState"] = mirror_of(handoff)
        if await write_status(self.api, vmim) is not None:
            self._again(vmim)

    async def _handed_off(
        self, vmim: Obj, vmi: Obj, peer: SyncState | None, deleting: bool
    ) -> None:
        """The receiving VMI carries this migration: mirror the sender's decision, follow
        the target, finish on the outcome."""
        written = await self._mirror(vmim, vmi, peer)
        if written is None:
            return
        vmi = written
        ms = MigrationState.of(vmi)
        if runs_here(vmi):
            await self._succeed(vmim, vmi)
            return
        if ms.failed:
            await self._fail(vmim, vmi, ms.failure_reason or "migration failed")
            return
        gate = await gate_on(self.api)
        cancel_reason = ""
        if not gate:
            cancel_reason = gate_off_message()
        elif deleting:
            cancel_reason = "canceled by the user"
        elif peer is not None and peer.cancelled:
            cancel_reason = "canceled on the sending cluster"
        elif peer is not None and peer.failed and not ms.switchover:
            cancel_reason = peer.failure_reason or "the sending side failed"
        if cancel_reason:
            await self._cancel(vmim, vmi, cancel_reason)
            return
        await self._follow(vmim, vmi, ms, peer)

    async def _mirror(self, vmim: Obj, vmi: Obj, peer: SyncState | None) -> Obj | None:
        """Write into the receiving VMI what the sender's record says (switchover,
        completed, failed, failureReason): a field once, never over another value.
        Returns the VMI as it stands (None: a Conflict, the key is queued again)."""
        record = raw(vmi)
        if peer is None or peer.migration_uid != record.get(Field.MIGRATION_UID):
            return vmi
        wanted: dict[Field, Any] = {}
        if peer.switchover:
            wanted[Field.SWITCHOVER] = peer.switchover
        if peer.completed:
            wanted[Field.COMPLETED] = True
        if peer.failed:
            wanted[Field.FAILED] = True
            if peer.failure_reason:
                wanted[Field.FAILURE_REASON] = peer.failure_reason
        changes: Obj = {}
        for field, value in wanted.items():
            current = record.get(field)
            if current in (None, "", False):
                changes[field] = value
            elif current != value and field != Field.FAILURE_REASON:
                log.error(
                    "migration %s: the sending cluster says %s=%r but the receiving VMI has "
                    "%r: keeping the recorded value (a decision is never contradicted)",
                    record.get(Field.MIGRATION_UID),
                    field,
                    value,
                    current,
                )
        if Field.COMPLETED in changes and record.get(Field.FAILED):
            del changes[Field.COMPLETED]
        if Field.FAILED in changes and record.get(Field.COMPLETED):
            changes.pop(Field.FAILED)
            changes.pop(Field.FAILURE_REASON, None)
        if not changes:
            return vmi
        if (Field.COMPLETED in changes or Field.FAILED in changes) and not record.get(
            Field.END_TIMESTAMP
        ):
            changes[Field.END_TIMESTAMP] = rfc3339(self.clock())
        record.update(changes)
        result = await write_status(self.api, vmi)
        if result is None:
            self._again(vmim)
            return None
        log.info(
            "migration %s: mirrored from the sending cluster: %s",
            record.get(Field.MIGRATION_UID),
            ", ".join(f"{k}={v}" for k, v in changes.items() if k != Field.END_TIMESTAMP),
        )
        return result

    async def _follow(
        self, vmim: Obj, vmi: Obj, ms: MigrationState, peer: SyncState | None
    ) -> None:
        """Scheduled -> PreparingTarget -> TargetReady -> Running as the target handler
        writes and the sender runs; a target that does not prepare in time fails (the
        address was never published: the source cannot have started)."""
        status = vmim["status"]
        before = copy.deepcopy(status)
        phase = MigrationPhase.of(vmim)
        waited = seconds_in_phase(vmim, MigrationPhase.SCHEDULED, self.clock)
        if not ms.target_address and waited > TARGET_PREPARE_TIMEOUT:
            await self._fail_here(
                vmim,
                vmi,
                f"target node {ms.target_node} did not prepare within {TARGET_PREPARE_TIMEOUT:.0f}s",
            )
            return
        sender_runs = ms.switchover is not None or (
            peer is not None and peer.phase in (MigrationPhase.RUNNING, MigrationPhase.SUCCEEDED)
        )
        if phase == MigrationPhase.SCHEDULED and (ms.target_domain_detected or ms.target_address):
            advance(RECEIVER_TRANSITIONS, status, MigrationPhase.PREPARING_TARGET, self.clock)
        elif phase == MigrationPhase.PREPARING_TARGET and ms.target_address:
            advance(RECEIVER_TRANSITIONS, status, MigrationPhase.TARGET_READY, self.clock)
        elif phase == MigrationPhase.TARGET_READY and sender_runs:
            advance(RECEIVER_TRANSITIONS, status, MigrationPhase.RUNNING, self.clock)
        else:
            self._later(vmim)
        status["migrationState"] = mirror_of(raw(vmi))
        if status != before and await write_status(self.api, vmim) is not None:
            self._again(vmim)

    async def _cancel(self, vmim: Obj, vmi: Obj, reason: str) -> None:
        """Cancel after the hand-off: while the target never published its address the
        source cannot have started, so fail here; otherwise publish the cancel and wait
        for the sender's record (mirrored) — never guess."""
        if not raw(vmi).get(Field.TARGET_NODE_ADDRESS):
            await self._fail_here(vmim, vmi, reason, AbortStatus.SUCCEEDED)
            return
        log.info(
            "vmim %s: %s: waiting for the sending cluster's outcome",
            vmim["metadata"]["name"],
            reason,
        )
        self._cancelling.add(vmim["metadata"]["uid"])
        self._publish(vmim, vmi)
        self._later(vmim)

    async def _fail_here(
        self, vmim: Obj, vmi: Obj, reason: str, abort_status: AbortStatus | None = None
    ) -> None:
        """Record the failure in the receiving VMI (the target handler discards) with the
        resourceVersion precondition: a target publishing its address meanwhile wins."""
        record = raw(vmi)
        if (
            record.get(Field.TARGET_NODE_ADDRESS)
            or record.get(Field.FAILED)
            or record.get(Field.COMPLETED)
        ):
            self._again(vmim)
            return
        record[Field.FAILED] = True
        record[Field.FAILURE_REASON] = reason
        record[Field.END_TIMESTAMP] = rfc3339(self.clock())
        if abort_status:
            record[Field.ABORT_STATUS] = abort_status
        written = await write_status(self.api, vmi)
        if written is None:
            self._again(vmim)
            return
        await self._fail(vmim, written, reason, abort_status)

    async def _fail(
        self, vmim: Obj, vmi: Obj | None, reason: str, abort_status: AbortStatus | None = None
    ) -> None:
        """The receiving VMIM Failed, the receiving VMI phase Failed (no retry)."""
        handed = self._handed_uid(vmim)
        record = raw(vmi) if vmi is not None else {}
        ours = bool(handed) and record.get(Field.MIGRATION_UID) == handed
        if handed:
            await migration_token.delete_token_secret(as_store(self.api), handed)
        waiting = (vmi or {}).get("status", {}).get("phase") == VMI_PHASE_WAITING_FOR_SYNC
        if vmi is not None and (ours or waiting):  # never a VMI that is not receiving this
            status = vmi.setdefault("status", {})
            if status.get("phase") not in VMI_FINAL_PHASES:
                conditions.set_phase(status, VMIPhase.FAILED)
                status["reason"] = REASON_RECEIVE_FAILED
                conditions.set_condition(status, "Ready", False, REASON_RECEIVE_FAILED, reason)
                if await write_status(self.api, vmi) is None:
                    self._again(vmim)
                    return
        self._publish(
            vmim,
            vmi,
            phase=str(MigrationPhase.FAILED),
            failed=True,
            failure_reason=record.get(Field.FAILURE_REASON)
            if ours and record.get(Field.FAILURE_REASON)
            else reason,
        )
        if await finish(
            self.api,
            RECEIVER_TRANSITIONS,
            vmim,
            MigrationPhase.FAILED,
            self.clock,
            reason=reason,
            ms=record if ours else None,
            abort_status=abort_status,
            events=self.events,
        ):
            self._went(vmim)

    async def _succeed(self, vmim: Obj, vmi: Obj) -> None:
        """The guest runs here: the VMI Running, the VM's runStrategy restored, the
        resume published, the VMIM Succeeded."""
        status = vmi.setdefault("status", {})
        if status.get("phase") != VMIPhase.RUNNING:
            conditions.set_phase(status, VMIPhase.RUNNING)
            written = await write_status(self.api, vmi)
            if written is None:
                self._again(vmim)
                return
            vmi = written
        await self._restore_vm(vmim, vmi)
        await migration_token.delete_token_secret(as_store(self.api), raw(vmi)[Field.MIGRATION_UID])
        self._publish(vmim, vmi, phase=str(MigrationPhase.SUCCEEDED), target_resumed=True)
        if await finish(
            self.api,
            RECEIVER_TRANSITIONS,
            vmim,
            MigrationPhase.SUCCEEDED,
            self.clock,
            ms=raw(vmi),
            events=self.events,
        ):
            self._went(vmim)

    async def _restore_vm(self, vmim: Obj, vmi: Obj) -> None:
        ns = vmim["metadata"]["namespace"]
        name = vmim["spec"]["vmiName"]
        for owner in (vmi.get("metadata") or {}).get("ownerReferences") or []:
            if owner.get("kind") == VM and owner.get("controller"):
                name = owner["name"]
        try:
            vm = await self.api.get(VM, ns, name)
        except NotFound:
            return
        annotations = vm["metadata"].get("annotations") or {}
        restore = annotations.get(RESTORE_RUN_STRATEGY_ANNOTATION)
        if restore is None:
            return
        vm["metadata"]["annotations"] = {
            k: v for k, v in annotations.items() if k != RESTORE_RUN_STRATEGY_ANNOTATION
        }
        vm.setdefault("spec", {})["runStrategy"] = restore
        await self.api.update(vm)  # a Conflict: the pass is retried
        log.info("vm %s/%s: received: runStrategy %s restored", ns, name, restore)

    async def _final(self, vmim: Obj) -> None:
        """A finished migration: the sender's late outcome (completion) is still mirrored
        into the VMI; its final half is relayed until the peer's is final too."""
        uid = vmim["metadata"]["uid"]
        mid = receive(vmim)["migrationID"]
        handed = self._handed_uid(vmim)
        peer = self._peer(vmim)
        vmi = await self._get_vmi(vmim["metadata"]["namespace"], vmim["spec"]["vmiName"])
        if vmi is not None and handed and raw(vmi).get(Field.MIGRATION_UID) == handed:
            written = await self._mirror(vmim, vmi, peer)
            if written is not None:
                mirror = mirror_of(raw(written))
                if vmim["status"].get("migrationState") != mirror:
                    vmim["status"]["migrationState"] = mirror
                    updated = await write_status(self.api, vmim)
                    vmim = updated or vmim
        if uid not in self._forgotten:
            age = seconds_in_phase(vmim, MigrationPhase.of(vmim), self.clock)
            if peer_final(peer) or age > FINAL_RELAY_SECONDS:
                self.link.forget(mid)
                self._forgotten.add(uid)
            else:
                self._publish(vmim, vmi)
                self._later(vmim, FINAL_RELAY_SECONDS - age + 1)
        if vmim["metadata"].get("deletionTimestamp"):
            await remove_finalizer(self.api, vmim)
            self._went(vmim)

    def _went(self, vmim: Obj) -> None:
        """The VMIM was deleted: forget its link state once the peer's half is final."""
        uid = vmim["metadata"]["uid"]
        mid = receive(vmim)["migrationID"]
        if uid in self._forgotten:
            return
        if peer_final(self._peer(vmim)):
            self.link.forget(mid)
            self._forgotten.add(uid)
        else:
            self._gone[mid] = uid

    async def _get_vmi(self, ns: str, name: str) -> Obj | None:
        try:
            return await self.api.get(VMI, ns, name)
        except NotFound:
            return None
