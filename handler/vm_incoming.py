"""The VM manager's target half: incoming guests, from the hand-off to resume or discard.

When a hand-off names this node as the target, ``prepare`` checks that this node serves
migrations on the migration network the hand-off names (if any: never a silent fallback
to another network), starts an incoming guest on the VMI's driver, registers an
``IncomingMigration`` (with the stream token read from the migration's Secret) and
publishes ``targetNodeAddress``/``targetNodePort`` (the shared MigrationEndpoint's).
From then on the migration's state (``target_state``) moves with the frames; the
decision is taken only in :meth:`IncomingGuests.commit` and
:meth:`IncomingGuests.discard`, each of which goes through ``IncomingMigration.decide``
before its first await, so exactly one resume (or one discard) runs whichever path
brings the decision:

- the Commit frame (the services' ``on_commit``);
- the VMI watch event carrying ``switchover: Committed`` (``VMManager._on_vmi_event``);
- the reconcile, when the Commit frame was lost (``reconcile``).

A verified target that hears nothing claims Aborted after ``ARBITER_WAIT``. After a
handler restart an adopted incoming guest is settled: Committed and a restart record →
resume from the record; anything else → destroy.

Across clusters (the hand-off names a ``peerCluster``; this node holds the receiving
half) the arbiter is the *sending* cluster's record (vmferry.decentralized): the target
never claims a decision nor writes ``switchover``. It resumes on the Commit frame or on
``switchover: Committed`` mirrored into its VMI by its sync controller, discards on a
mirrored Aborted or failure, and otherwise keeps the guest paused, however long it waits
(also after a restart, when the guest's device state arrived). Its resume also moves the
receiving VMI, which waited in ``WaitingForSync``, to Running.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from handler.drivers.base import Drivers, PostCopyHandle, VMHandle
from handler.endpoint import MigrationEndpoint
from handler.migration.handoff import HandoffRecord, MigrationFailed, read_token
from handler.migration.incoming import IncomingMigration, IncomingRegistry
from handler.peers import (
    PeerRegistry,
    is_receiver,
    migration_config,
    not_registered,
    peer_cluster,
)
from vmferry import failpoints
from vmferry.client import ApiClient
from vmferry.errors import ApiError, NotFound
from vmferry.failpoints import Step
from vmferry.informer import WorkQueue
from vmferry.migration_network import not_ready_reason
from vmferry.migration_state import Field, Switchover, VMIPhase, raw
from vmferry.objects import conditions

log = logging.getLogger(__name__)
Obj = dict[str, Any]

INCOMING_SUFFIX = ".in-"
ARBITER_WAIT = 20.0  # s a verified target waits for the source's hand-off before claiming abort
# s a handed-off VM must be missing here (no guest, no incoming migration, no adopted
# guest) with its source copy gone before its VMI is failed: many reconcile passes, far
# longer than a resume takes (the commit path holds no handle for a few ms).
LOST_AFTER = 6.0
RESUME_GAP_POLLS = 200  # x 10 ms: how long a resumed guest may take to report its gap


def commit_awaits(inc: IncomingMigration, ms: Obj) -> bool:
    """The arbiter recorded the hand-off of this verified incoming guest, and nothing here
    has acted on it yet (resume, or discard)."""
    return (
        ms.get(Field.SWITCHOVER) == Switchover.COMMITTED
        and not ms.get(Field.FAILED)
        and inc.verified
        and inc.decision is None
    )


def active(ms: Obj) -> bool:
    return (
        bool(ms.get(Field.MIGRATION_UID))
        and not ms.get(Field.COMPLETED)
        and not ms.get(Field.FAILED)
    )


def incoming_id(vmi: Obj, ms: Obj) -> str:
    """The vm id of a VMI's incoming guest (kept after the resume)."""
    return f"{vmi['metadata']['uid']}{INCOMING_SUFFIX}{ms[Field.MIGRATION_UID][:8]}"


class IncomingGuests:
    """The incoming guests of this node. ``handles`` is the VM manager's map of the guests
    running here (VMI uid → handle): a resumed guest joins it."""

    def __init__(
        self,
        api: ApiClient,
        node: str,
        drivers: Drivers,
        incoming: IncomingRegistry,
        queue: WorkQueue,
        handles: dict[str, VMHandle],
        *,
        endpoint: MigrationEndpoint,
        spawn: Callable[[Coroutine[Any, Any, None], str], None],
        peers: PeerRegistry | None = None,
    ) -> None:
        self.api = api
        self.node = node
        self.drivers = drivers
        self.incoming = incoming
        self.queue = queue
        self.handles = handles
        self.endpoint = endpoint
        self.spawn = spawn
        self.peers = peers  # None: no peer checks here (a handler without TLS, tests)
        self._waiting_logged: set[str] = set()  # cross-cluster migrations told to wait
        self.orphans: dict[str, VMHandle] = {}  # vm_id -> adopted guest we do not place yet
        self._publishing: set[str] = set()  # migration uids whose resume is being published
        self._missing_since: dict[str, float] = {}  # migration uid -> first seen lost
        incoming.on_commit = self.commit
        incoming.on_abort = self.discard
        incoming.on_postcopy_done = self._postcopy_done

    def on_vmi_event(self, new: Obj | None) -> None:
        """The watch-event path of the commit decision (see VMManager._on_vmi_event)."""
        ms = raw(new) if new is not None else {}
        inc = self.incoming.get(ms.get(Field.MIGRATION_UID, ""))
        if inc is not None and commit_awaits(inc, ms):
            self.spawn(self.commit(inc), "resuming a migrated guest")

    async def reconcile(self, vmi: Obj, ms: Obj) -> None:
        """One pass for a VMI whose hand-off names this node as the target."""
        mig_uid = ms.get(Field.MIGRATION_UID, "")
        inc = self.incoming.get(mig_uid)
        # Clean up incoming guests of migrations that ended or were replaced.
        for other_uid, other in list(self.incoming.registry.items()):
            if other.vmi_uid == vmi["metadata"]["uid"] and other_uid != mig_uid:
                await self.discard(other, "replaced by another migration")
        switchover = ms.get(Field.SWITCHOVER)
        if inc is None:
            orphan = self.orphans.pop(incoming_id(vmi, ms), None) if mig_uid else None
            if orphan is not None:
                await self.settle_orphan(vmi, ms, orphan)
                return
            if active(ms) and not ms.get(Field.TARGET_NODE_ADDRESS) and switchover is None:
                await self.prepare(vmi, ms)
            elif switchover == Switchover.COMMITTED:
                await self.publish_if_runs_here(vmi, ms)
                await self.fail_if_lost(vmi, ms)
            return
        if (
            active(ms)
            and not ms.get(Field.TARGET_NODE_ADDRESS)
            and switchover is None
            and inc.decision is None
        ):
            # The address write failed (the API was away) after the guest was registered:
            # publish it now, or the source never starts.
            await self._publish_address(inc)
        if inc.state.guest_runs_here and ms.get(Field.FAILED):
            # Post-copy could not finish (the source gave up): the VM is lost; the VMI's
            # Failed phase lets its VM controller start it again.
            self.incoming.forget(inc.migration_uid)
        elif ms.get(Field.FAILED) or switchover == Switchover.ABORTED:
            await self.discard(inc, ms.get(Field.FAILURE_REASON) or "migration aborted")
        elif commit_awaits(inc, ms):
            await self.commit(inc)  # the Commit frame was lost; the arbiter decided
        elif inc.verified and inc.decision is None and switchover is None:
            self.queue.add_after((vmi["metadata"]["namespace"], vmi["metadata"]["name"]), 1.0)
            if inc.peer_cluster:
                self._wait_for_peer(inc)  # never a claim: the sending cluster decides
            elif time.monotonic() - inc.verified_at > ARBITER_WAIT:
                record = HandoffRecord(self.api, inc.namespace, inc.name, inc.migration_uid)
                if await record.claim(Switchover.ABORTED) == Switchover.ABORTED:
                    await self.discard(inc, "the source never recorded the hand-off")

    def _wait_for_peer(self, inc: IncomingMigration) -> None:
        """A verified cross-cluster guest without a decision stays paused (logged once)."""
        if inc.migration_uid in self._waiting_logged:
            return
        self._waiting_logged.add(inc.migration_uid)
        log.info(
            "migration %s: memory verified; waiting for the decision of peer cluster %s "
            "(the Commit frame, or the switchover its sync controller mirrors): the guest "
            "stays paused here until then",
            inc.migration_uid,
            inc.peer_cluster,
        )

    async def prepare(self, vmi: Obj, ms: Obj) -> None:
        meta = vmi["metadata"]
        uid = ms[Field.MIGRATION_UID]
        record = HandoffRecord(self.api, meta["namespace"], meta["name"], uid)
        config = migration_config(ms)
        network = config.network
        peer = peer_cluster(ms)
        reason = None
        if peer and self.peers is not None and self.peers.get(peer) is None:
            reason = not_registered(peer)
        elif network:
            reason = not_ready_reason(network, self.node, self.endpoint.network)
        if reason is not None:
            log.warning("migration %s: refused as its target: %s", uid, reason)
            await record.fail(
                {
                    Field.FAILED: True,
                    Field.FAILURE_REASON: reason,
                    Field.END_TIMESTAMP: conditions.now_rfc3339(),
                }
            )
            return
        try:
            token = await read_token(self.api, uid)
        except MigrationFailed as e:
            # The migration ended before this pass (a stale watch event, or a receiving
            # VMI's mirror written just before the outcome): nothing to prepare.
            log.info("migration %s: not preparing a target: %s", uid, e)
            return
        await record.patch({Field.TARGET_NODE_DOMAIN_DETECTED: True})
        driver = self.drivers.for_vmi(vmi)
        handle = await driver.prepare_incoming_vmi(
            incoming_id(vmi, ms), vmi, postcopy=config.allow_post_copy
        )
        inc = IncomingMigration(
            namespace=meta["namespace"],
            name=meta["name"],
            vmi_uid=meta["uid"],
            migration_uid=uid,
            token=token,
            source_node=ms[Field.SOURCE_NODE],
            handle=handle,
            peer_cluster=peer,
        )
        self.incoming.expect(inc)
        await self._publish_address(inc)

    async def _publish_address(self, inc: IncomingMigration) -> None:
        """``targetNodeAddress``/``targetNodePort``: the source starts on them. Retried
        while the API is away (a restarting controller delays the migration)."""
        record = HandoffRecord(self.api, inc.namespace, inc.name, inc.migration_uid)
        address, port = self.endpoint.published()
        await record.patch_until_written(
            {Field.TARGET_NODE_ADDRESS: address, Field.TARGET_NODE_PORT: port}
        )
        log.info(
            "migration %s: target prepared for %s/%s, listening on %s:%d",
            inc.migration_uid,
            inc.namespace,
            inc.name,
            address,
            port,
        )

    # -- the decision ---------------------------------------------------------------------

    async def commit(self, inc: IncomingMigration) -> None:
        """Resume the incoming guest: the arbiter recorded the hand-off (steps 4-5). Every
        path of the commit decision ends here; ``decide`` runs before the first await, so
        of concurrent callers exactly one resumes."""
        if not inc.decide(Switchover.COMMITTED):
            return
        failpoints.hit(Step.TARGET_COMMITTED)
        if inc.postcopy and not isinstance(inc.handle, PostCopyHandle):
            # QEMU's own post-copy: `cont`; QEMU requests the missing pages itself, and
            # the record stays registered (recoveries) until its post-copy is done.
            await inc.handle.resume(inc.device_state)
        elif inc.postcopy:
            # The guest runs here from now on; its missing pages keep arriving, so the
            # incoming record stays registered (reconnects) until post-copy is done.
            await inc.postcopy_handle.resume_postcopy(inc.device_state or b"{}")
        else:
            inc.release()
            await inc.handle.resume(inc.device_state)
            self.incoming.forget(inc.migration_uid)
            await asyncio.to_thread(self.incoming.records.remove, inc.migration_uid)
        inc.resumed()
        self.handles[inc.vmi_uid] = inc.handle
        failpoints.hit(Step.TARGET_RESUMED)
        log.info(
            "migration %s: guest resumed here%s",
            inc.migration_uid,
            " (post-copy: pages still arriving)" if inc.postcopy else "",
        )
        self._waiting_logged.discard(inc.migration_uid)
        self.spawn(
            self._publish_resumed(
                inc.namespace,
                inc.name,
                inc.migration_uid,
                inc.handle,
                receiver=bool(inc.peer_cluster),  # the target of a cross-cluster hand-off
            ),
            f"migration {inc.migration_uid}: publishing the resume",
        )

    async def discard(self, inc: IncomingMigration, reason: str) -> None:
        """Destroy the incoming guest, unless the hand-off was committed here."""
        if not inc.decide(Switchover.ABORTED):
            return
        self.incoming.forget(inc.migration_uid)
        self._waiting_logged.discard(inc.migration_uid)
        await inc.handle.destroy()
        if inc.record_written is not None:  # the device state came: a record was written
            with contextlib.suppress(Exception):
                await inc.record_written
        await asyncio.to_thread(self.incoming.records.remove, inc.migration_uid)
        log.info("migration %s: incoming guest discarded: %s", inc.migration_uid, reason)

    async def _postcopy_done(self, inc: IncomingMigration) -> None:
        self.incoming.forget(inc.migration_uid)
        await asyncio.to_thread(self.incoming.records.remove, inc.migration_uid)

    async def settle_orphan(self, vmi: Obj, ms: Obj, handle: VMHandle) -> None:
        """An incoming guest adopted after a restart: resume it from its restart record if
        the hand-off was committed, else destroy it."""
        uid = ms[Field.MIGRATION_UID]
        record = await asyncio.to_thread(self.incoming.records.read, uid)
        if (
            peer_cluster(ms)
            and record is not None
            and ms.get(Field.SWITCHOVER) is None
            and not ms.get(Field.FAILED)
        ):
            # Across clusters the source may commit a guest whose device state is here
            # (the sending cluster decides): it stays paused until the decision is known.
            self.orphans[handle.vm_id] = handle
            self.queue.add_after((vmi["metadata"]["namespace"], vmi["metadata"]["name"]), 1.0)
            if uid not in self._waiting_logged:
                self._waiting_logged.add(uid)
                log.info(
                    "migration %s: incoming guest adopted after a restart; waiting for the "
                    "decision of peer cluster %s: the guest stays paused until then",
                    uid,
                    peer_cluster(ms),
                )
            return
        self._waiting_logged.discard(uid)
        if ms.get(Field.SWITCHOVER) == Switchover.COMMITTED and record is not None:
            await handle.resume(record.device_state)
            self.handles[vmi["metadata"]["uid"]] = handle
            log.info("migration %s: incoming guest resumed from its restart record", uid)
            await asyncio.to_thread(self.incoming.records.remove, uid)
            # Like the normal resume: the VMI names this node from now on.
            self.spawn(
                self._publish_resumed(
                    vmi["metadata"]["namespace"],
                    vmi["metadata"]["name"],
                    uid,
                    handle,
                    receiver=is_receiver(ms),
                ),
                f"migration {uid}: publishing the resume",
            )
            return
        await handle.destroy()
        log.info("migration %s: incoming guest destroyed (not handed off)", uid)
        await asyncio.to_thread(self.incoming.records.remove, uid)

    async def publish_if_runs_here(self, vmi: Obj, ms: Obj) -> None:
        """The audit's target half: the hand-off was committed to this node and the guest
        runs here, but the VMI still names another node (this handler died between the
        resume and its publication). Publish what is true."""
        meta = vmi["metadata"]
        handle = self.handles.get(meta["uid"])
        mig_uid = ms.get(Field.MIGRATION_UID, "")
        if handle is None or not handle.is_alive() or mig_uid in self._publishing:
            return
        if (vmi.get("status") or {}).get("nodeName") == self.node:
            return
        # The cache may lag a publication that just landed: judge by the API.
        vmi = await self.api.get("VirtualMachineInstance", meta["namespace"], meta["name"])
        fresh = raw(vmi)
        if (
            (vmi.get("status") or {}).get("nodeName") == self.node
            or fresh.get(Field.MIGRATION_UID) != mig_uid
            or fresh.get(Field.SWITCHOVER) != Switchover.COMMITTED
        ):
            return
        log.warning(
            "correction: vmi %s/%s runs on %s (migration %s committed) but its status names "
            "%s: publishing nodeName %s",
            meta["namespace"],
            meta["name"],
            self.node,
            ms.get(Field.MIGRATION_UID),
            (vmi.get("status") or {}).get("nodeName"),
            self.node,
        )
        await self._publish_resumed(
            meta["namespace"],
            meta["name"],
            ms.get(Field.MIGRATION_UID, ""),
            handle,
            receiver=is_receiver(ms),
        )

    async def fail_if_lost(self, vmi: Obj, ms: Obj) -> None:
        """Status never lies: the hand-off gave the VM to this node, the source completed
        (its copy is destroyed), and no guest of it is here (its process died while this
        handler was away): the VM runs nowhere, so its VMI is not Running. It is failed
        here, on the node that owned it (the migration itself completed; the VMI's VM
        controller starts it again)."""
        meta, status = vmi["metadata"], vmi.get("status") or {}
        mig_uid = ms.get(Field.MIGRATION_UID, "")
        handle = self.handles.get(meta["uid"])
        present = (handle is not None and handle.is_alive()) or mig_uid in self._publishing
        if (
            present
            or not ms.get(Field.COMPLETED)
            or status.get("nodeName") == self.node
            or status.get("phase") != VMIPhase.RUNNING
        ):
            self._missing_since.pop(mig_uid, None)
            return
        since = self._missing_since.setdefault(mig_uid, time.monotonic())
        self.queue.add_after((meta["namespace"], meta["name"]), 1.0)
        if time.monotonic() - since < LOST_AFTER:
            return
        del self._missing_since[mig_uid]
        message = (
            f"the guest was lost on {self.node} after the migration handed it over "
            "(its process is gone)"
        )
        log.warning(
            "correction: vmi %s/%s is Running on %s in its status but no guest of it runs "
            "anywhere (migration %s handed it to %s): failing the VMI",
            meta["namespace"],
            meta["name"],
            status.get("nodeName"),
            mig_uid,
            self.node,
        )
        failed = copy.deepcopy(status)
        conditions.set_phase(failed, VMIPhase.FAILED)
        conditions.set_condition(failed, "Ready", False, "GuestProcessExited", message)
        record = HandoffRecord(self.api, meta["namespace"], meta["name"], mig_uid)
        await record.patch_until_written(
            {},
            {
                "nodeName": self.node,
                "phase": failed["phase"],
                "reason": "GuestProcessExited",
                "conditions": failed["conditions"],
                "phaseTransitionTimestamps": failed["phaseTransitionTimestamps"],
            },
        )

    # -- publishing the resume ------------------------------------------------------------

    async def _publish_resumed(
        self,
        namespace: str,
        name: str,
        migration_uid: str,
        handle: VMHandle,
        *,
        receiver: bool = False,
    ) -> None:
        """Record that the VM runs here (nodeName first), then the gap the guest saw.
        ``receiver``: the receiving VMI of a cross-cluster migration, which waited in
        WaitingForSync, becomes Running here too."""
        record = HandoffRecord(self.api, namespace, name, migration_uid)
        self._publishing.add(migration_uid)
        try:
            extra: Obj = {"nodeName": self.node, "launcher": launcher(handle)}
            if receiver:
                extra.update(await self._running_status(namespace, name))
            await record.patch_until_written(
                {Field.TARGET_NODE_DOMAIN_READY_TIMESTAMP: conditions.now_rfc3339()}, extra
            )
        finally:
            self._publishing.discard(migration_uid)
        status = await handle.status()
        for _ in range(RESUME_GAP_POLLS):  # the gap is known at the guest's first tick
            if status.resume_gap_ms is not None:
                break
            await asyncio.sleep(0.01)
            status = await handle.status()
        gap = status.resume_gap_ms
        log.info("migration %s: the guest saw a %s ms gap", migration_uid, gap)
        if gap is not None:
            await record.patch_until_written(
                {Field.TRANSFER: {"guestDowntimeMilliseconds": round(gap, 3)}},
                {"guest": {"resumeGapMilliseconds": round(gap, 3)}},
            )

    async def _running_status(self, namespace: str, name: str) -> Obj:
        """The status fields that make a receiving VMI Running (its phase, the phase's
        transition time, Ready)."""
        while True:
            try:
                vmi = await self.api.get("VirtualMachineInstance", namespace, name)
                break
            except NotFound:
                return {}
            except ApiError as e:
                log.warning("vmi %s/%s: cannot read it yet (%s); retrying", namespace, name, e)
                await asyncio.sleep(1.0)
        status = copy.deepcopy(vmi.get("status") or {})
        conditions.set_phase(status, VMIPhase.RUNNING)
        conditions.set_condition(status, "Ready", True, "GuestRunning", "")
        return {
            "phase": status["phase"],
            "phaseTransitionTimestamps": status["phaseTransitionTimestamps"],
            "conditions": status["conditions"],
        }


def launcher(handle: VMHandle) -> Obj:
    """``status.launcher`` of a guest."""
    return {"pid": handle.pid, "vmId": handle.vm_id, "driver": handle.driver_name}
