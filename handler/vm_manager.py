"""The handler's VMI reconciler: runs this node's guests and both ends of migrations.

Guests run on the driver their VMI's spec picks (``drivers.base.Drivers``); the manager
never asks which driver a guest has. One pass per VMI key (level-triggered, safe to repeat):
  - deleted / deleting VMI on this node → destroy the guest, drop our finalizer;
  - Scheduled to this node and no guest → boot it, VMI → Running;
  - Running here but the guest is gone → VMI → Failed (the process died);
  - hand-off names this node as target → the target half, ``vm_incoming.IncomingGuests``:
    prepare an incoming guest, register it with the target services, publish
    ``targetNodeAddress``/``targetNodePort``; resume or discard it on the decision;
  - hand-off names this node as source and the target is ready → start the source
    engine the guest's driver supplies; ``abortRequested`` → tell it to abort;
  - a migration that ended or was replaced → clean up what is left of it here;
  - after a handler restart, a migration with no task here is settled through the
    arbiter (``switchover``): Committed → the VM belongs to the target; otherwise the
    migration is failed and the guest resumes here.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from handler.drivers.base import Drivers, EngineContext, VMHandle
from handler.endpoint import MigrationEndpoint
from handler.migration.handoff import HandoffRecord
from handler.migration.incoming import IncomingRegistry
from handler.migration.source import SourceEngine
from handler.migration.stats import Stats
from handler.migration.worker_pool import WorkerPool
from handler.peers import PeerRegistry, holds_source, holds_target
from handler.vm_incoming import INCOMING_SUFFIX, IncomingGuests, active, launcher
from handler.vm_pause import PauseKeeper
from handler.vm_postcopy import PostCopyKeeper
from handler.volumes import VolumeResolver, VolumeUnavailable
from vmferry import pki
from vmferry.client import ApiClient
from vmferry.errors import ApiError, Conflict, NotFound
from vmferry.events import EventRecorder, Reason
from vmferry.informer import Informer, Key, WorkQueue
from vmferry.migration_state import Field, MigrationMode, Switchover, VMIPhase, raw
from vmferry.objects import conditions
from vmferry.volumes import LIVE_MIGRATABLE, VOLUMES_READY, claim_volumes

log = logging.getLogger(__name__)
Obj = dict[str, Any]

FINALIZER = "vmferry.io/handler"
COMPONENT = "vmferry-handler"  # the source.component of the handlers' Events
# The VMI condition a guest that cannot start reports (KubeVirt's Synchronized: False,
# reason SyncFailed, with virt-handler's error as its message).
SYNC_CONDITION = "Synchronized"
PROGRESS_RETENTION = 900.0  # s a finished migration's progress stays (metrics read it)
GUEST_CHECK_INTERVAL = 2.0  # s between liveness checks of local guests


class VMManager:
    def __init__(
        self,
        api: ApiClient,
        node_name: str,
        drivers: Drivers,
        vmis: Informer,
        incoming: IncomingRegistry,
        *,
        tls: pki.TlsFiles | None,
        migration_endpoint: MigrationEndpoint,
        state_dir: Path,
        peers: PeerRegistry | None = None,
        events: EventRecorder | None = None,
        workers: WorkerPool | None = None,
    ) -> None:
        self.api = api
        self.node = node_name
        self.events = events or EventRecorder(api, COMPONENT, node_name)
        self.pause = PauseKeeper(api, self.events)
        self.drivers = drivers
        self.vmis = vmis
        self.incoming = incoming
        self.tls = tls
        self.peers = peers  # registered peer clusters (cross-cluster sources dial their CA)
        self.workers = workers  # stream workers the memvm engine may run channels in
        self.state_dir = state_dir
        self.handles: dict[str, VMHandle] = {}  # VMI uid -> the guest running here
        self.sources: dict[str, tuple[SourceEngine, asyncio.Task[None]]] = {}
        self.progress: dict[str, tuple[Obj, Stats]] = {}  # migration uid -> last progress
        self.queue = WorkQueue()
        self.volumes = VolumeResolver(api, node_name)
        self._tasks: set[asyncio.Task[None]] = set()
        self.target = IncomingGuests(
            api,
            node_name,
            drivers,
            incoming,
            self.queue,
            self.handles,
            endpoint=migration_endpoint,
            spawn=self._spawn,
            peers=peers,
        )
        self.postcopy = PostCopyKeeper(
            api,
            node_name,
            drivers,
            incoming,
            self.handles,
            self.target.orphans,
            tls=tls,
            on_progress=self._on_progress,
            start_source=self._start_source,
            migrating=self._migrating,
            spawn=self._spawn,
        )
        vmis.add_handler(self._on_vmi_event)

    # -- start-up -------------------------------------------------------------------------

    async def adopt(self) -> None:
        """Re-adopt the guests that survived a handler restart."""
        adopted: list[VMHandle] = []
        for driver in self.drivers.all:
            adopted += await driver.adopt_all()
        for handle in adopted:
            try:
                status = await handle.status()
                state = status.state
                if status.postcopy and state != "incoming":  # vm_postcopy.py re-adopts it
                    self.postcopy.adopted[handle.vm_id.split(INCOMING_SUFFIX)[0]] = handle
            except Exception as e:  # one unreachable guest must not stop the handler
                # Judge by its record (never by its name: a migrated guest keeps the
                # incoming id it was born with). A guest still waiting for an incoming
                # migration is settled (resumed or destroyed) through the arbiter.
                state = "incoming" if handle.incoming else "paused"
                log.warning(
                    "guest %s does not answer (%s): adopting it as %s", handle.vm_id, e, state
                )
            if state == "incoming":
                self.target.orphans[handle.vm_id] = handle
            else:
                self.handles[handle.vm_id.split(INCOMING_SUFFIX)[0]] = handle
            log.info("adopted guest %s (pid %d)", handle.vm_id, handle.pid)

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.queue.run(self.reconcile, "vm-manager"))
            tg.create_task(self._watch_guests())

    async def _watch_guests(self) -> None:
        """Periodically requeue every VMI: catches guests that died on their own."""
        await self.vmis.synced.wait()
        while True:
            for key in list(self.vmis.cache):
                self.queue.add(key)
            await asyncio.sleep(GUEST_CHECK_INTERVAL)

    # -- the pass ------------------------------------------------------------------------

    async def reconcile(self, key: Key) -> None:
        vmi = self.vmis.get(*key)
        if vmi is None:
            await self._forget_deleted(key)
            return
        uid = vmi["metadata"]["uid"]
        status = vmi.get("status") or {}
        ms = raw(vmi)
        here = status.get("nodeName") == self.node

        if here and vmi["metadata"].get("deletionTimestamp"):
            await self._delete(vmi)
            return
        if await self.postcopy.reconcile(vmi, ms):  # post-copy across restarts: vm_postcopy.py
            return
        # A cross-cluster hand-off names the other cluster's node as its other end: that
        # end is never this node, whatever its name (peers.holds_source/holds_target).
        if holds_target(ms, self.node) and not here:
            await self.target.reconcile(vmi, ms)
        if not here:
            await self._drop_stale_source_guest(vmi, ms)
            return
        if holds_source(ms, self.node):
            await self._reconcile_source(vmi, ms)
        phase = status.get("phase")
        handle = self.handles.get(uid)
        if phase == VMIPhase.SCHEDULED and handle is None:
            await self._boot(vmi)
        elif phase == VMIPhase.RUNNING and (handle is None or not handle.is_alive()):
            if self._migrating(uid) or ms.get(Field.SWITCHOVER) == Switchover.COMMITTED:
                return  # handed off (or handing off): the target flips nodeName
            if holds_source(ms, self.node) and active(ms):
                return
            await self._guest_lost(vmi, handle)
        elif (
            phase == VMIPhase.RUNNING
            and handle is not None
            and not self._migrating(uid)
            and not active(ms)
        ):
            await self.pause.reconcile(vmi, handle)  # a user's pause/unpause: vm_pause.py

    def _migrating(self, vmi_uid: str) -> bool:
        return any(m.vmi["metadata"]["uid"] == vmi_uid for m, _ in self.sources.values())

    # -- local guests ---------------------------------------------------------------------

    async def _boot(self, vmi: Obj) -> None:
        meta = vmi["metadata"]
        if FINALIZER not in meta.get("finalizers", []):
            meta.setdefault("finalizers", []).append(FINALIZER)
            vmi = await self.api.update(vmi)
        try:
            handle = await self.drivers.for_vmi(vmi).start_vmi(meta["uid"], vmi)
        except VolumeUnavailable as e:  # retried on the next pass (GUEST_CHECK_INTERVAL)
            await self._volume_unavailable(vmi, str(e))
            return
        except (ApiError, asyncio.CancelledError):
            raise
        except Exception as e:
            await self._start_failed(vmi, e)
            raise  # the work queue retries with backoff; the event counts the attempts
        spec = handle.spec
        self.handles[meta["uid"]] = handle
        log.info(
            "vmi %s/%s: guest started (pid %d, %d MiB)",
            meta["namespace"],
            meta["name"],
            handle.pid,
            spec.memory_bytes >> 20,
        )
        await self._set_running(vmi, handle)
        self.events.normal(vmi, Reason.STARTED, "VirtualMachineInstance started.")

    async def _start_failed(self, vmi: Obj, error: Exception) -> None:
        """The guest did not start: a Warning event and the VMI's Synchronized condition
        name the cause (it stays Scheduled; the next attempt may succeed)."""
        message = f"failed to start the guest on node {self.node}: {error}"
        self.events.warning(vmi, Reason.SYNC_FAILED, message)
        status = vmi.setdefault("status", {})
        if conditions.set_condition(status, SYNC_CONDITION, False, Reason.SYNC_FAILED, message):
            try:
                await self.api.update(vmi, subresource="status")
            except ApiError as e:
                log.warning(
                    "vmi %s: could not record the start failure: %s",
                    vmi["metadata"]["name"],
                    e.message,
                )

    async def _volume_unavailable(self, vmi: Obj, message: str) -> None:
        status = vmi.setdefault("status", {})
        if conditions.set_condition(status, VOLUMES_READY, False, "VolumeUnavailable", message):
            log.warning(
                "vmi %s/%s: not started: %s",
                vmi["metadata"]["namespace"],
                vmi["metadata"]["name"],
                message,
            )
            with contextlib.suppress(Conflict):
                await self.api.update(vmi, subresource="status")

    async def _set_running(self, vmi: Obj, handle: VMHandle) -> None:
        # The RWX rule (vmferry.volumes): a volume that is not shared makes it non-migratable.
        migratable, reason, message = await self.volumes.live_migratable(vmi)
        while True:
            status = vmi.setdefault("status", {})
            status["nodeName"] = self.node
            conditions.set_phase(status, VMIPhase.RUNNING)
            conditions.set_condition(status, "Ready", True, "GuestRunning", "")
            if conditions.get(vmi, SYNC_CONDITION) is not None:  # an earlier start failed
                conditions.set_condition(status, SYNC_CONDITION, True, "", "")
            conditions.set_condition(status, LIVE_MIGRATABLE, migratable, reason, message)
            if claim_volumes(vmi.get("spec") or {}):
                conditions.set_condition(status, VOLUMES_READY, True, "VolumesAttached", "")
            status["launcher"] = launcher(handle)
            try:
                await self.api.update(vmi, subresource="status")
                return
            except Conflict:
                vmi = await self.api.get(
                    "VirtualMachineInstance", vmi["metadata"]["namespace"], vmi["metadata"]["name"]
                )

    async def _guest_lost(self, vmi: Obj, handle: VMHandle | None) -> None:
        uid = vmi["metadata"]["uid"]
        if handle is not None:
            await handle.destroy()
            self.handles.pop(uid, None)
        status = vmi.setdefault("status", {})
        log.warning(
            "vmi %s/%s: the guest process is gone",
            vmi["metadata"]["namespace"],
            vmi["metadata"]["name"],
        )
        conditions.set_phase(status, VMIPhase.FAILED)
        status["reason"] = "GuestProcessExited"
        conditions.set_condition(
            status, "Ready", False, "GuestProcessExited", "the guest process exited or was killed"
        )
        await self.api.update(vmi, subresource="status")
        self.events.warning(
            vmi, Reason.STOPPED, f"The guest process on node {self.node} exited or was killed"
        )

    async def _delete(self, vmi: Obj) -> None:
        uid = vmi["metadata"]["uid"]
        if self._migrating(uid):
            for mig, _ in self.sources.values():
                if mig.vmi["metadata"]["uid"] == uid:
                    mig.abort_requested.set()
            return  # requeued when the migration ends
        handle = self.handles.pop(uid, None)
        if handle is not None:
            await handle.destroy()
            log.info(
                "vmi %s/%s: guest destroyed (VMI deleted)",
                vmi["metadata"]["namespace"],
                vmi["metadata"]["name"],
            )
        finalizers = vmi["metadata"].get("finalizers", [])
        if FINALIZER in finalizers:
            vmi["metadata"]["finalizers"] = [f for f in finalizers if f != FINALIZER]
            with contextlib.suppress(NotFound):
                await self.api.update(vmi)

    async def _forget_deleted(self, key: Key) -> None:
        """The VMI is gone from the API: nothing of it may keep running here."""
        live = {o["metadata"]["uid"] for o in self.vmis.cache.values()}
        for uid, handle in list(self.handles.items()):
            if uid not in live:
                self.handles.pop(uid)
                await handle.destroy()
                log.info("guest %s destroyed: its VMI %s no longer exists", uid, "/".join(key))

    # -- migration: source side -------------------------------------------------------------

    async def _reconcile_source(self, vmi: Obj, ms: Obj) -> None:
        mig_uid = ms.get(Field.MIGRATION_UID, "")
        running = self.sources.get(mig_uid)
        if running is not None:
            if ms.get(Field.ABORT_REQUESTED):
                running[0].abort_requested.set()
            return
        if not active(ms):
            return
        handle = self.handles.get(vmi["metadata"]["uid"])
        if ms.get(Field.START_TIMESTAMP):
            await self._settle_orphaned_source(vmi, ms, handle)
            return
        if ms.get(Field.ABORT_REQUESTED) or handle is None:
            return
        if not ms.get(Field.TARGET_NODE_ADDRESS) or not ms.get(Field.TARGET_NODE_PORT):
            return  # the target is still preparing
        migration = self.drivers.by_name(handle.driver_name).source_engine(
            EngineContext(
                self.api, self.node, self.tls, self._on_progress, self.peers, self.workers
            ),
            copy.deepcopy(vmi),
            handle,
        )
        self._start_source(migration)

    def _start_source(self, migration: SourceEngine) -> None:
        """Run a source engine (a new migration, or one re-adopted in post-copy)."""
        self.sources[migration.uid] = (migration, asyncio.create_task(self._run_source(migration)))

    async def _run_source(self, migration: SourceEngine) -> None:
        key = (migration.ns, migration.name)
        try:
            await migration.run()
        except Exception as e:
            log.exception("migration %s crashed", migration.uid)
            self.events.warning(
                migration.vmi,
                Reason.FAILED_MIGRATION,
                f"The outgoing migration {migration.uid} on node {self.node} stopped on an "
                f"internal error: {e!r} (see the handler's log)",
            )
        finally:
            self.sources.pop(migration.uid, None)
            # Keep the final figures for the metrics collector a while, then let them go.
            asyncio.get_running_loop().call_later(
                PROGRESS_RETENTION, self.progress.pop, migration.uid, None
            )
            if migration.committed:
                self.handles.pop(migration.vmi["metadata"]["uid"], None)
            self.queue.add(key)

    def _on_progress(self, vmi: Obj, stats: Stats) -> None:
        self.progress[raw(vmi).get(Field.MIGRATION_UID, "")] = (vmi, stats)

    async def _settle_orphaned_source(self, vmi: Obj, ms: Obj, handle: VMHandle | None) -> None:
        """A migration started by a previous incarnation of this handler."""
        record = self._record(vmi)
        if ms.get(Field.SWITCHOVER) == Switchover.COMMITTED:
            if handle is not None:
                await handle.destroy()
                self.handles.pop(vmi["metadata"]["uid"], None)
            log.warning(
                "correction: migration %s of vmi %s/%s was handed off but no running "
                "source engine recorded its completion: recording it",
                ms.get(Field.MIGRATION_UID),
                vmi["metadata"]["namespace"],
                vmi["metadata"]["name"],
            )
            await record.patch_until_written(
                {Field.COMPLETED: True, Field.END_TIMESTAMP: conditions.now_rfc3339()}
            )
            return
        if await record.claim(Switchover.ABORTED) != Switchover.ABORTED:
            self.queue.add((vmi["metadata"]["namespace"], vmi["metadata"]["name"]))
            return
        if handle is not None:
            with contextlib.suppress(Exception):
                await handle.resume()
        # Only if nothing was recorded: the cache may lag the engine's own failure (its
        # reason is the real one) or completion, and the first outcome stands.
        await record.fail(
            {
                Field.FAILED: True,
                Field.FAILURE_REASON: (
                    f"the source handler on {self.node} restarted during the migration; "
                    "the VM stays on the source: migrate it again"
                ),
                Field.END_TIMESTAMP: conditions.now_rfc3339(),
            }
        )

    async def _drop_stale_source_guest(self, vmi: Obj, ms: Obj) -> None:
        """A guest of a VMI that now runs elsewhere (handed off while we were away); and
        the completion of that hand-off, if this handler died before writing it."""
        if self._migrating(vmi["metadata"]["uid"]):
            return  # post-copy: the paused source still serves the pages the target lacks
        handle = self.handles.get(vmi["metadata"]["uid"])
        committed_from_here = ms.get(Field.SWITCHOVER) == Switchover.COMMITTED and holds_source(
            ms, self.node
        )
        if (
            committed_from_here
            and active(ms)
            and ms.get(Field.MODE) != MigrationMode.POST_COPY
            and ms.get(Field.TARGET_NODE_DOMAIN_READY_TIMESTAMP)
            and vmi["status"].get("nodeName") == ms.get(Field.TARGET_NODE)
        ):
            log.warning(
                "correction: migration %s of vmi %s/%s was handed off and the VM runs on %s, "
                "but its completion was never recorded: recording it",
                ms.get(Field.MIGRATION_UID),
                vmi["metadata"]["namespace"],
                vmi["metadata"]["name"],
                ms.get(Field.TARGET_NODE),
            )
            await self._record(vmi).patch_until_written(
                {Field.COMPLETED: True, Field.END_TIMESTAMP: conditions.now_rfc3339()}
            )
        if handle is not None and committed_from_here:
            log.info(
                "vmi %s/%s runs on %s now: destroying the old guest here",
                vmi["metadata"]["namespace"],
                vmi["metadata"]["name"],
                vmi["status"].get("nodeName"),
            )
            self.handles.pop(vmi["metadata"]["uid"])
            await handle.destroy()

    # -- migration: target side (handler/vm_incoming.py) ----------------------------------

    def _on_vmi_event(self, key: Key, old: Obj | None, new: Obj | None) -> None:
        """Informer handler: queue the VMI; and when it carries the hand-off of a guest
        waiting here, resume that guest now rather than when the queue's one worker
        gets to the key (the guest is paused meanwhile: ~1 ms more, measured, and more
        when the worker is busy with another VMI). The reconcile that follows finds the
        decision made: IncomingGuests.commit decides before its first await, so one
        resume runs. A migration sent from here learns its commit decision from the
        same event (SourceEngine.observe), before the API's answer. Both go before the
        queue: their wake-ups run ahead of the worker's reconcile."""
        if new is not None and (source := self.sources.get(raw(new).get(Field.MIGRATION_UID, ""))):
            source[0].observe(new)  # the commit decision, as soon as the store has it
        self.target.on_vmi_event(new)
        self.queue.add(key)

    def _spawn(self, work: Coroutine[Any, Any, None], what: str) -> None:
        """Run ``work`` in the background, kept until it ends; a failure is logged."""
        task = asyncio.create_task(work)
        self._tasks.add(task)

        def done(task: asyncio.Task[None]) -> None:
            self._tasks.discard(task)
            if not task.cancelled() and (e := task.exception()) is not None:
                log.error("%s failed: %s", what, e, exc_info=e)

        task.add_done_callback(done)

    # -- API helpers ------------------------------------------------------------------------

    def _record(self, vmi: Obj) -> HandoffRecord:
        meta = vmi["metadata"]
        return HandoffRecord(
            self.api, meta["namespace"], meta["name"], raw(vmi).get(Field.MIGRATION_UID, "")
        )
