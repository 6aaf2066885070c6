"""The sending half of a decentralized migration: the VMIMs with ``spec.sendTo`` of this
cluster (the migration controller leaves them alone).

Phases (:data:`sync_controller.common.SENDER_TRANSITIONS`): "" → Pending → Synchronizing
→ Scheduled → PreparingTarget → TargetReady → Running → Succeeded | Failed.

- Pending: admitted within the parallel-migration limits (``controller.migration_queue``).
- Synchronizing: the link to ``connectURL`` is kept for ``migrationID``; the token Secret
  is created (readable by the source node only: the target is the peer's node); this
  half (:class:`~vmferry.decentralized.SyncState`, role sender) is published. When the
  receiver's half names its target node, address and port, the source VMI's hand-off is
  written (``migrationUid`` = this VMIM's uid, role sender, peerCluster, post-copy off)
  and the VMIM is Scheduled. Until then a link that stays down (or a receiver that never
  answers) fails the VMIM after ``unschedulableTimeoutSeconds`` with the link's reason.
- Scheduled … Running follow the source handler's writes, as the migration controller's.
- The decision is the source handler's claim on the source VMI (the one arbiter): its
  switchover/completed/failed are published each time they change. Completed: the source
  VM gets ``runStrategy: Halted`` and :data:`~vmferry.decentralized.MIGRATED_TO_ANNOTATION`
  (first, so its VM controller never restarts it), the source VMI phase Succeeded
  ("migrated to <peer>"), the VMIM Succeeded. Failed: the VM stays on the source, the
  VMIM Failed with the reason.
- Cancel (this VMIM deleted, the peer's cancelled or failed, the gate turned off): before
  the source started the hand-off fails at once; while running ``abortRequested`` asks
  the source to abort, as the migration controller's cancel does; the peer learns it from
  ``cancelled``/``failed``.
"""

from __future__ import annotations

import base64
import binascii
import copy
import dataclasses
import logging
import time
from collections.abc import Callable
from typing import Any, cast

from controller import migration_queue, migration_token
from controller.migration_controller import (
    MIGRATION_METHOD,
    TARGET_PREPARE_TIMEOUT,
    mirror_of,
)
from controller.objects import memory_of, rfc3339
from sync_controller.common import (
    SENDER_TRANSITIONS,
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
    MIGRATED_TO_ANNOTATION,
    Role,
    SyncState,
    gate_off_message,
)
from vmferry.errors import NotFound
from vmferry.informer import Key, Source
from vmferry.migration_state import (
    TOKEN_SECRET_KEY,
    TOKEN_SECRET_NAMESPACE,
    AbortStatus,
    ConfigKey,
    Field,
    MigrationPhase,
    MigrationState,
    VMIPhase,
    raw,
    token_secret_name,
)
from vmferry.objects import conditions

log = logging.getLogger(__name__)
Obj = dict[str, Any]

# s a finished migration's final half is still relayed (a peer that was away learns it)
FINAL_RELAY_SECONDS = 3600.0
HALTED = "Halted"
REASON_MIGRATED = "Migrated"
FOLLOW_PHASES = (
    MigrationPhase.SCHEDULED,
    MigrationPhase.PREPARING_TARGET,
    MigrationPhase.TARGET_READY,
    MigrationPhase.RUNNING,
)


def send_to(vmim: Obj) -> Obj:
    return cast(Obj, (vmim.get("spec") or {}).get("sendTo") or {})


def migrated_reason(peer: str) -> str:
    return f"migrated to {peer}"


class SenderReconciler(HalfReconciler):
    """Reconciles this cluster's sending VMIMs; ``source`` (default: ``api``) feeds the
    informers, ``clock`` times the timeouts and stamps the phases."""

    name = "sync-sender"
    peer_role = Role.RECEIVER

    @staticmethod
    def side(vmim: Obj) -> Obj:
        return send_to(vmim)

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
        self._tokens: dict[str, str] = {}  # VMIM uid -> its stream token (relayed)
        self._holding: set[str] = set()  # deleted final VMIMs kept for the peer (logged once)

    # -- the peer's half ------------------------------------------------------------------

    def _peer(self, vmim: Obj) -> SyncState | None:
        """The receiver's latest half of this migration (one about another sending VMIM
        of the same migrationID, a stale one, is ignored)."""
        state = self.link.latest(send_to(vmim)["migrationID"])
        if state is None or state.role != Role.RECEIVER:
            return None
        if state.migration_uid and state.migration_uid != vmim["metadata"]["uid"]:
            return None
        return state

    def _peer_name(self, vmim: Obj, record: Obj) -> str:
        return str(
            record.get(Field.PEER_CLUSTER)
            or self.link.peer_cluster(send_to(vmim)["migrationID"])
            or "the receiving cluster"
        )

    # -- publishing this half -------------------------------------------------------------

    async def _token(self, uid: str) -> str:
        if uid not in self._tokens:
            try:
                secret = await self.api.get(
                    "Secret",
                    TOKEN_SECRET_NAMESPACE,
                    token_secret_name(uid),
                )
            except NotFound:
                return ""
            self._tokens[uid] = _decode(secret)
        return self._tokens[uid]

    async def _publish(self, vmim: Obj, vmi: Obj | None, **override: Any) -> None:
        uid = vmim["metadata"]["uid"]
        status = vmim.get("status") or {}
        record = raw(vmi) if vmi is not None else {}
        if record.get(Field.MIGRATION_UID) != uid:
            record = status.get("migrationState") or {}
        ms = MigrationState.from_dict(record)
        phase = MigrationPhase.of(vmim)
        state = SyncState(
            migration_id=send_to(vmim)["migrationID"],
            role=Role.SENDER,
            migration_uid=uid,
            namespace=vmim["metadata"]["namespace"],
            vmi_name=vmim["spec"]["vmiName"],
            phase=str(phase),
            source_node=ms.source_node or ((vmi or {}).get("status") or {}).get("nodeName", ""),
            token="" if phase.final else await self._token(uid),
            memory_bytes=memory_of(vmi) if vmi is not None else 0,
            switchover=str(ms.switchover or ""),
            completed=ms.completed,
            failed=ms.failed or phase == MigrationPhase.FAILED,
            failure_reason=ms.failure_reason,
            cancelled=bool(vmim["metadata"].get("deletionTimestamp")),
        )
        if override:
            state = dataclasses.replace(state, **override)
        self.link.publish(state)
        # The link is dialled for every published half past admission, not only while
        # Synchronizing: a sync controller restarted later (Scheduled..Running, or final
        # and still relaying) has no link otherwise, and the receiver would never learn
        # the decision. A failed or cancelled half is told even to a peer never contacted.
        admitted = phase not in (MigrationPhase.UNSET, MigrationPhase.PENDING)
        if admitted or state.failed or state.cancelled:
            self.link.connect(state.migration_id, send_to(vmim)["connectURL"])

    # -- the reconcile pass ---------------------------------------------------------------

    async def reconcile(self, key: Key) -> None:
        ns, name = key
        try:
            vmim = await self.api.get(VMIM, ns, name)
        except NotFound:
            return
        if not send_to(vmim):
            return
        status = vmim.setdefault("status", {})
        phase = MigrationPhase.of(vmim)
        deleting = bool(vmim["metadata"].get("deletionTimestamp"))
        uid = vmim["metadata"]["uid"]

        if phase.final:
            await self._final(vmim)
            return
        if phase == MigrationPhase.UNSET:
            if deleting:
                await remove_finalizer(self.api, vmim)
                return
            vmim = await add_finalizer(self.api, vmim)
            advance(
                SENDER_TRANSITIONS,
                vmim.setdefault("status", {}),
                MigrationPhase.PENDING,
                self.clock,
            )
            await write_status(self.api, vmim)
            self._again(vmim)
            return

        vmi = await self._get_vmi(ns, vmim["spec"]["vmiName"])
        if vmi is None:
            mirror = status.get("migrationState") or {}
            if mirror.get(Field.MIGRATION_UID) == uid and mirror.get(Field.COMPLETED):
                # the VM was halted after the completion and its VMI went with it
                await self._succeed(vmim, None)
                return
            reason = f'VirtualMachineInstance "{vmim["spec"]["vmiName"]}" no longer exists'
            await self._fail(vmim, None, reason, None)
            return
        ms = MigrationState.of(vmi)
        ours = ms.migration_uid == uid
        peer = self._peer(vmim)

        # The arbiter's outcome first: it is never contradicted.
        if ours and ms.completed:
            await self._succeed(vmim, vmi)
            return
        if ours and ms.failed:
            await self._fail(vmim, vmi, ms.failure_reason or "migration failed", raw(vmi))
            return
        if not await gate_on(self.api):
            await self._cancel(vmim, vmi, ours, gate_off_message())
            return
        if deleting:
            await self._cancel(vmim, vmi, ours, "canceled by the user", AbortStatus.SUCCEEDED)
            return
        if peer is not None and (peer.cancelled or peer.failed):
            where = self._peer_name(vmim, raw(vmi) if ours else {})
            reason = (
                f"canceled on the receiving cluster {where}"
                if peer.cancelled
                else f"the receiving cluster {where} failed: "
                f"{peer.failure_reason or 'no reason given'}"
            )
            await self._cancel(vmim, vmi, ours, reason)
            return

        if phase == MigrationPhase.PENDING:
            await self._admit(vmim)
        elif phase == MigrationPhase.SYNCHRONIZING:
            await self._synchronize(vmim, vmi, ms, peer)
        elif ours and phase in FOLLOW_PHASES:
            followed = await self._follow(vmim, vmi, ms)
            if followed is not None:  # as written (or unchanged): no second read
                await self._publish(followed, vmi)
                return
        elif not ours:
            await self._fail(
                vmim, vmi, "the VMI's migration state belongs to another migration", None
            )
            return
        await self._publish_fresh(vmim)

    async def _publish_fresh(self, vmim: Obj) -> None:
        """This half as it stands after the pass (re-read: the pass may have written)."""
        ns = vmim["metadata"]["namespace"]
        try:
            vmim = await self.api.get(VMIM, ns, vmim["metadata"]["name"])
        except NotFound:
            return
        await self._publish(vmim, await self._get_vmi(ns, vmim["spec"]["vmiName"]))

    async def _final(self, vmim: Obj) -> None:
        """A finished migration: relay its final half until the peer's is final too (or
        FINAL_RELAY_SECONDS passed), then forget it. A deleted VMIM goes only then: once
        the VM moved, the source VMI (the arbiter's record) is gone, and this VMIM's final
        half is all that can still tell a receiver cut off at the hand-off to resume; its
        finalizer holds it until the peer has the outcome."""
        uid = vmim["metadata"]["uid"]
        mid = send_to(vmim)["migrationID"]
        if uid not in self._forgotten:
            age = seconds_in_phase(vmim, MigrationPhase.of(vmim), self.clock)
            if peer_final(self._peer(vmim)) or age > FINAL_RELAY_SECONDS:
                self.link.forget(mid)
                self._forgotten.add(uid)
            else:
                await self._publish(vmim, None)
                self._later(vmim, FINAL_RELAY_SECONDS - age + 1)
        if not vmim["metadata"].get("deletionTimestamp"):
            return
        if uid in self._forgotten:
            await remove_finalizer(self.api, vmim)
        elif uid not in self._holding:
            self._holding.add(uid)
            log.info(
                "migration %s: %s deleted; kept until peer cluster %s has its outcome "
                "(at most %.0f s after it ended)",
                mid,
                vmim["metadata"]["name"],
                self._peer_name(vmim, {}),
                FINAL_RELAY_SECONDS,
            )

    # -- phase steps ----------------------------------------------------------------------

    async def _admit(self, vmim: Obj) -> None:
        """Pending -> Synchronizing within the parallel-migration limits."""
        all_vmims, _ = await self.api.list(VMIM)
        vmis, _ = await self.api.list(VMI)
        decision = migration_queue.admit(vmim, all_vmims, vmis, await cluster_config(self.api))
        if not decision.start:
            log.info("vmim %s: waiting: %s", vmim["metadata"]["name"], decision.reason)
            self._later(vmim)
            return
        advance(SENDER_TRANSITIONS, vmim["status"], MigrationPhase.SYNCHRONIZING, self.clock)
        if await write_status(self.api, vmim) is not None:
            self._again(vmim)

    async def _synchronize(
        self, vmim: Obj, vmi: Obj, ms: MigrationState, peer: SyncState | None
    ) -> None:
        """Synchronizing: keep the link, the token, and wait for the receiver's target;
        then write the source's hand-off (Scheduled)."""
        uid = vmim["metadata"]["uid"]
        mid, url = send_to(vmim)["migrationID"], send_to(vmim)["connectURL"]
        name = vmim["metadata"]["name"]
        self.link.connect(mid, url)
        source = (vmi.get("status") or {}).get("nodeName", "")
        if ms.migration_uid == uid:  # a pass wrote the hand-off and stopped before the VMIM
            await self._scheduled(vmim, raw(vmi))
            return
        if ms.active:
            await self._fail(
                vmim, vmi, f"the VMI is being migrated already (migration {ms.migration_uid})", None
            )
            return
        # the receiving node is the peer's: only the source node may read it here
        secret = await migration_token.ensure_token_secret(as_store(self.api), uid, source, "")
        self._tokens[uid] = _decode(secret)
        if peer is None or not (peer.target_node and peer.target_address and peer.target_port):
            await self._wait_for_target(vmim, peer)
            return
        peer_cluster = self.link.peer_cluster(mid)
        if not peer_cluster:
            self._later(vmim)
            return
        if peer_cluster == self.cluster_name:
            await self._fail(
                vmim,
                vmi,
                f"connectURL {url} leads to this cluster ({self.cluster_name}): a "
                "decentralized migration moves a VM to another cluster",
                None,
            )
            return
        configuration, policy_name = await effective_config(self.api, vmi)
        handoff: Obj = {
            Field.MIGRATION_UID: uid,
            Field.SOURCE_NODE: source,
            Field.TARGET_NODE: peer.target_node,
            Field.TARGET_NODE_ADDRESS: peer.target_address,
            Field.TARGET_NODE_PORT: peer.target_port,
            Field.MIGRATION_CONFIGURATION: configuration,
            Field.MIGRATION_ID: mid,
            Field.PEER_CLUSTER: peer_cluster,
            Field.ROLE: Role.SENDER,
        }
        if policy_name:
            handoff[Field.MIGRATION_POLICY_NAME] = policy_name
        vmi_status = vmi.setdefault("status", {})
        vmi_status["migrationState"] = handoff
        vmi_status["migrationMethod"] = MIGRATION_METHOD
        if await write_status(self.api, vmi) is None:  # resourceVersion precondition
            self._again(vmim)
            return
        log.info(
            "vmim %s: hand-off %s/%s -> %s/%s (%s:%s)",
            name,
            self.cluster_name,
            source,
            peer_cluster,
            peer.target_node,
            peer.target_address,
            peer.target_port,
        )
        await self._scheduled(vmim, handoff)

    async def _wait_for_target(self, vmim: Obj, peer: SyncState | None) -> None:
        """No target yet: keep trying until unschedulableTimeoutSeconds, then fail with
        the link's reason (or what the receiver said)."""
        mid = send_to(vmim)["migrationID"]
        timeout = float((await cluster_config(self.api))[ConfigKey.UNSCHEDULABLE_TIMEOUT_S])
        waited = seconds_in_phase(vmim, MigrationPhase.SYNCHRONIZING, self.clock)
        error = self.link.connection_error(mid)
        if error:
            why = error
        elif peer is None:
            why = f"the receiving cluster has not answered for migration ID {mid}"
        else:
            why = f"the receiving cluster has no target ready (its side: {peer.phase or 'new'})"
        if waited >= timeout:
            await self._fail(vmim, None, f"{why} (waited {waited:.0f}s)", None)
            return
        status = vmim["status"]
        if conditions.set_condition(status, "TargetSchedulable", False, "Synchronizing", why):
            await write_status(self.api, vmim)
        self._later(vmim)

    async def _scheduled(self, vmim: Obj, handoff: Obj) -> None:
        status = vmim["status"]
        conditions.set_condition(status, "TargetSchedulable", True, "Scheduled", "")
        advance(SENDER_TRANSITIONS, status, MigrationPhase.SCHEDULED, self.clock)
        status["migrationState"] = mirror_of(handoff)
        if await write_status(self.api, vmim) is not None:
            self._again(vmim)

    async def _follow(self, vmim: Obj, vmi: Obj, ms: MigrationState) -> Obj | None:
        """Scheduled -> PreparingTarget -> TargetReady -> Running as the source handler
        writes (the receiver's target was ready before the hand-off); a source handler
        that does not start within TARGET_PREPARE_TIMEOUT fails the hand-off. Returns the
        VMIM as it stands after the pass (as written, or unchanged); None when the pass
        ended otherwise (failed, or a Conflict: the next pass reads afresh)."""
        status = vmim["status"]
        before = copy.deepcopy(status)
        phase = MigrationPhase.of(vmim)
        waited = seconds_in_phase(vmim, MigrationPhase.SCHEDULED, self.clock)
        if not ms.start_timestamp and waited > TARGET_PREPARE_TIMEOUT:
            await self._fail_before_start(
                vmim,
                vmi,
                f"the source handler on {ms.source_node} did not start within "
                f"{TARGET_PREPARE_TIMEOUT:.0f}s",
            )
            return None
        if phase == MigrationPhase.SCHEDULED:
            advance(SENDER_TRANSITIONS, status, MigrationPhase.PREPARING_TARGET, self.clock)
        elif phase == MigrationPhase.PREPARING_TARGET and ms.target_address:
            advance(SENDER_TRANSITIONS, status, MigrationPhase.TARGET_READY, self.clock)
        elif phase == MigrationPhase.TARGET_READY and ms.start_timestamp:
            advance(SENDER_TRANSITIONS, status, MigrationPhase.RUNNING, self.clock)
        else:
            self._later(vmim)
        status["migrationState"] = mirror_of(raw(vmi))
        if status == before:
            return vmim
        written = await write_status(self.api, vmim)
        if written is None:
            self._again(vmim)  # a Conflict: read afresh
        elif MigrationPhase.of(written) != phase:
            self._again(vmim)  # the next step may be due already
        return written

    # -- endings --------------------------------------------------------------------------

    async def _cancel(
        self,
        vmim: Obj,
        vmi: Obj,
        ours: bool,
        reason: str,
        abort_status: AbortStatus | None = None,
    ) -> None:
        """Abort where it stands: before the hand-off or before the source started it
        fails now; while running the source is asked to abort (it decides)."""
        if not ours:
            await self._fail(vmim, vmi, reason, None, abort_status)
            return
        record = raw(vmi)
        if not record.get(Field.START_TIMESTAMP):
            await self._fail_before_start(vmim, vmi, reason, abort_status)
            return
        if not record.get(Field.ABORT_REQUESTED):
            log.info(
                "vmim %s: %s while running: asking the source to abort",
                vmim["metadata"]["name"],
                reason,
            )
            record[Field.ABORT_REQUESTED] = True
            record[Field.ABORT_STATUS] = AbortStatus.ABORTING
            if await write_status(self.api, vmi) is None:
                self._again(vmim)
                return
        mirror = mirror_of(record)
        if vmim["status"].get("migrationState") != mirror:
            vmim["status"]["migrationState"] = mirror
            await write_status(self.api, vmim)
        await self._publish(vmim, vmi)
        self._later(vmim)

    async def _fail_before_start(
        self, vmim: Obj, vmi: Obj, reason: str, abort_status: AbortStatus | None = None
    ) -> None:
        """Fail a hand-off the source has not started; a Conflict (the source starting
        meanwhile) re-queues, and the next pass sees who won."""
        record = raw(vmi)
        if record.get(Field.START_TIMESTAMP):
            return
        record[Field.FAILED] = True
        record[Field.FAILURE_REASON] = reason
        record[Field.END_TIMESTAMP] = rfc3339(self.clock())
        if abort_status:
            record[Field.ABORT_STATUS] = abort_status
        if await write_status(self.api, vmi) is None:
            self._again(vmim)
            return
        await self._fail(vmim, vmi, reason, record, abort_status)

    async def _fail(
        self,
        vmim: Obj,
        vmi: Obj | None,
        reason: str,
        record: Obj | None,
        abort_status: AbortStatus | None = None,
    ) -> None:
        """The VMIM Failed (the VM stays where it runs, on the source); the peer is told
        before the final write, so a VMIM that goes right after still told it."""
        uid = vmim["metadata"]["uid"]
        await migration_token.delete_token_secret(as_store(self.api), uid)
        self._tokens.pop(uid, None)
        await self._publish(
            vmim,
            vmi if record is not None else None,
            phase=str(MigrationPhase.FAILED),
            failed=True,
            failure_reason=(record or {}).get(Field.FAILURE_REASON) or reason,
            token="",
        )
        await finish(
            self.api,
            SENDER_TRANSITIONS,
            vmim,
            MigrationPhase.FAILED,
            self.clock,
            reason=reason,
            ms=record,
            abort_status=abort_status,
            release=False,  # _final lets a deleted one go once the peer has the outcome
            events=self.events,
        )

    async def _succeed(self, vmim: Obj, vmi: Obj | None) -> None:
        """The source recorded the completion (after the Committed decision): halt the
        source VM (first: its VM controller must never start it again), the source VMI
        Succeeded, the VMIM Succeeded, the peer told."""
        uid = vmim["metadata"]["uid"]
        ns = vmim["metadata"]["namespace"]
        record = raw(vmi) if vmi is not None else dict(vmim["status"].get("migrationState") or {})
        peer_name = self._peer_name(vmim, record)
        mirror = mirror_of(record)
        if vmim["status"].get("migrationState") != mirror:
            vmim["status"]["migrationState"] = mirror
            written = await write_status(self.api, vmim)
            if written is None:
                self._again(vmim)
                return
            vmim = written
        peer = self._peer(vmim)
        where = f"{peer_name}/{(peer.namespace if peer and peer.namespace else ns)}/" + (
            peer.vmi_name if peer and peer.vmi_name else vmim["spec"]["vmiName"]
        )
        await self._halt_vm(vmim, vmi, where)
        if vmi is not None:
            status = vmi.setdefault("status", {})
            if status.get("phase") != VMIPhase.SUCCEEDED:
                conditions.set_phase(status, VMIPhase.SUCCEEDED)
                status["reason"] = migrated_reason(peer_name)
                conditions.set_condition(
                    status, "Ready", False, REASON_MIGRATED, f"migrated to {where}"
                )
                if await write_status(self.api, vmi) is None:
                    self._again(vmim)
                    return
        await migration_token.delete_token_secret(as_store(self.api), uid)
        self._tokens.pop(uid, None)
        if MigrationPhase.of(vmim) == MigrationPhase.SYNCHRONIZING:
            # the hand-off was written but the pass stopped before the VMIM said so
            advance(SENDER_TRANSITIONS, vmim["status"], MigrationPhase.SCHEDULED, self.clock)
        await self._publish(vmim, None, phase=str(MigrationPhase.SUCCEEDED), token="")
        await finish(
            self.api,
            SENDER_TRANSITIONS,
            vmim,
            MigrationPhase.SUCCEEDED,
            self.clock,
            ms=record,
            release=False,  # _final lets a deleted one go once the peer has the outcome
            events=self.events,
        )

    async def _halt_vm(self, vmim: Obj, vmi: Obj | None, where: str) -> None:
        ns = vmim["metadata"]["namespace"]
        name = vmim["spec"]["vmiName"]
        for owner in ((vmi or {}).get("metadata") or {}).get("ownerReferences") or []:
            if owner.get("kind") == VM and owner.get("controller"):
                name = owner["name"]
        try:
            vm = await self.api.get(VM, ns, name)
        except NotFound:
            return
        annotations = vm["metadata"].setdefault("annotations", {})
        spec = vm.setdefault("spec", {})
        if spec.get("runStrategy") == HALTED and annotations.get(MIGRATED_TO_ANNOTATION) == where:
            return
        spec.pop("running", None)
        spec["runStrategy"] = HALTED
        annotations[MIGRATED_TO_ANNOTATION] = where
        await self.api.update(vm)  # a Conflict: the pass is retried
        log.info("vm %s/%s: migrated to %s: runStrategy Halted", ns, name, where)

    # -- helpers --------------------------------------------------------------------------

    async def _get_vmi(self, ns: str, name: str) -> Obj | None:
        try:
            return await self.api.get(VMI, ns, name)
        except NotFound:
            return None


def _decode(secret: Obj) -> str:
    try:
        return base64.b64decode((secret.get("data") or {}).get(TOKEN_SECRET_KEY) or "").decode()
    except (binascii.Error, UnicodeDecodeError):
        return ""
