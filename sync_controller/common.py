"""What the sending and the receiving reconcilers share: the API they write through, the
explicit phase machines of both halves, the cluster's configuration and gate, the final
write of a VMIM, and the subscription to the peer link.

The controller's helpers are imported, not copied: ``set_phase``/``rfc3339``
(:mod:`controller.objects`), ``mirror_of``/``FINALIZER`` (:mod:`controller.migration_controller`),
the token Secret (:mod:`controller.migration_token`) and the configuration resolution
(:mod:`controller.policy`). The controller's helpers take its ``Store``; the API client's
get/create/update/delete verbs they use have the same shape, hence the ``as_store`` view.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol, cast

from controller import policy
from controller.migration_controller import FINALIZER, RECHECK_INTERVAL, mirror_of
from controller.migration_events import MigrationEvents
from controller.objects import set_phase
from controller.store import Store
from sync_controller.peer import PeerLink
from vmferry.decentralized import FEATURE_GATE, Role, SyncState, gate_enabled
from vmferry.errors import Conflict, NotFound
from vmferry.events import EventRecorder, EventWriter
from vmferry.informer import Informer, Key, Source, WorkQueue
from vmferry.migration_state import (
    LIVE_MIGRATION_DEFAULTS,
    PROGRESS_PHASES,
    AbortStatus,
    ConfigKey,
    Field,
    MigrationPhase,
)
from vmferry.objects import conditions, kinds

log = logging.getLogger(__name__)

COMPONENT = "vmferry-sync-controller"  # the source.component of its Events
Obj = dict[str, Any]

VMIM = "VirtualMachineInstanceMigration"
VMI = "VirtualMachineInstance"
VM = "VirtualMachine"


class Api(Protocol):
    """The API verbs the reconcilers use (``vmferry.client.ApiClient``; in unit tests
    ``tests.support.fake_api.StoreApi``)."""

    async def get(self, kind: str, namespace: str | None, name: str) -> Obj: ...

    async def list(self, kind: str, namespace: str | None = None) -> tuple[list[Obj], Any]: ...

    async def create(self, obj: Mapping[str, Any], *, dry_run: bool = False) -> Obj: ...

    async def update(self, obj: Mapping[str, Any], *, subresource: str = "") -> Obj: ...

    async def delete(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        *,
        resource_version: str = "",
        uid: str = "",
    ) -> Obj: ...


def as_store(api: Api) -> Store:
    """``api`` where a controller helper (``controller.migration_token``) expects the
    Store: those helpers call only get/create/update/delete, whose signatures match."""
    return cast(Store, api)


class PhaseError(RuntimeError):
    """A reconciler tried a transition its phase machine does not have (a bug)."""


Transitions = Mapping[MigrationPhase, frozenset[MigrationPhase]]

_FOLLOW = (
    MigrationPhase.SCHEDULED,
    MigrationPhase.PREPARING_TARGET,
    MigrationPhase.TARGET_READY,
    MigrationPhase.RUNNING,
)


def _machine(first: tuple[MigrationPhase, ...]) -> dict[MigrationPhase, frozenset[MigrationPhase]]:
    """``first`` phases in order, then the usual ones; every unfinished phase may fail,
    a handed-off one may also succeed (a fast migration skips phases, recorded then)."""
    order = (MigrationPhase.UNSET, *first, *_FOLLOW)
    out: dict[MigrationPhase, frozenset[MigrationPhase]] = {}
    for i, phase in enumerate(order):
        nxt = {MigrationPhase.FAILED}
        if i + 1 < len(order):
            nxt.add(order[i + 1])
        if phase in _FOLLOW:
            nxt.add(MigrationPhase.SUCCEEDED)
        out[phase] = frozenset(nxt)
    return out


# The sending half: "" → Pending → Synchronizing → Scheduled (the source's hand-off is
# written once the receiver's target listens) → PreparingTarget → TargetReady → Running
# → Succeeded | Failed.
SENDER_TRANSITIONS: Transitions = _machine((MigrationPhase.PENDING, MigrationPhase.SYNCHRONIZING))
# The receiving half: "" → WaitingForSync → Scheduling (the sender is known) → Scheduled
# (target placed, hand-off written) → PreparingTarget → TargetReady → Running →
# Succeeded | Failed.
RECEIVER_TRANSITIONS: Transitions = _machine(
    (MigrationPhase.WAITING_FOR_SYNC, MigrationPhase.SCHEDULING)
)


def advance(
    machine: Transitions, status: Obj, phase: MigrationPhase, clock: Callable[[], float]
) -> None:
    """Move ``status`` to ``phase`` if the machine allows it (PhaseError otherwise),
    recording the transition like the migration controller does."""
    current = MigrationPhase.of({"status": status})
    if phase == current:
        return
    if phase not in machine.get(current, frozenset()):
        raise PhaseError(f"no transition {current or '(none)'} -> {phase}")
    if phase == MigrationPhase.SUCCEEDED:
        for skipped in PROGRESS_PHASES:  # a fast migration: the phases it went through
            if skipped not in {s.get("phase") for s in status.get("phaseTransitionTimestamps", [])}:
                set_phase(status, skipped, clock)
    set_phase(status, phase, clock)


# -- the cluster ------------------------------------------------------------------------


async def hyperconverged(api: Api) -> Obj:
    try:
        return await api.get("HyperConverged", kinds.SYSTEM_NAMESPACE, kinds.HYPERCONVERGED_NAME)
    except NotFound:
        return {}


async def gate_on(api: Api) -> bool:
    return gate_enabled(await hyperconverged(api), FEATURE_GATE)


async def cluster_config(api: Api) -> Obj:
    """The cluster's liveMigrationConfig, defaults filled in (as the migration controller
    reads it)."""
    config = dict(LIVE_MIGRATION_DEFAULTS)
    config.update(((await hyperconverged(api)).get("spec") or {}).get("liveMigrationConfig") or {})
    return config


async def effective_config(api: Api, vmi: Obj) -> tuple[Obj, str | None]:
    """This cluster's configuration for migrating ``vmi`` (liveMigrationConfig overlaid by
    the winning MigrationPolicy, :func:`controller.policy.effective_config`), post-copy
    forced off: it is not offered across clusters."""
    hco = await hyperconverged(api)
    cluster = (hco.get("spec") or {}).get("liveMigrationConfig") or {}
    policies, _ = await api.list("MigrationPolicy")
    try:
        namespace = await api.get("Namespace", "", vmi["metadata"]["namespace"])
    except NotFound:
        namespace = {"metadata": {}}
    config, name = policy.effective_config(
        cluster,
        policies,
        vmi["metadata"].get("labels") or {},
        namespace["metadata"].get("labels") or {},
    )
    config[ConfigKey.ALLOW_POST_COPY] = False
    return config, name


def seconds_in_phase(vmim: Obj, phase: MigrationPhase, clock: Callable[[], float]) -> float:
    for stamp in (vmim.get("status") or {}).get("phaseTransitionTimestamps", []):
        if stamp.get("phase") == phase:
            started = conditions.parse_time(stamp["phaseTransitionTimestamp"]).timestamp()
            return max(0.0, clock() - started)
    return 0.0


# -- the VMIM ---------------------------------------------------------------------------


async def add_finalizer(api: Api, vmim: Obj) -> Obj:
    if FINALIZER in vmim["metadata"].get("finalizers", []):
        return vmim
    vmim["metadata"].setdefault("finalizers", []).append(FINALIZER)
    return await api.update(vmim)


async def remove_finalizer(api: Api, vmim: Obj) -> None:
    finalizers = vmim["metadata"].get("finalizers", [])
    if FINALIZER in finalizers:
        vmim["metadata"]["finalizers"] = [f for f in finalizers if f != FINALIZER]
        with contextlib.suppress(NotFound):
            await api.update(vmim)


async def finish(
    api: Api,
    machine: Transitions,
    vmim: Obj,
    phase: MigrationPhase,
    clock: Callable[[], float],
    *,
    reason: str = "",
    ms: Obj | None = None,
    abort_status: AbortStatus | None = None,
    release: bool = True,
    events: MigrationEvents | None = None,
) -> bool:
    """Write a VMIM's final ``phase`` (mirror of ``ms``, the reason in
    ``migrationState.failureReason`` as the migration controller does), then let a
    deleted one go (True: it went). ``release=False`` keeps a deleted one's finalizer:
    the caller's pass over the final VMIM decides when it goes."""
    status = vmim.setdefault("status", {})
    if ms is not None:
        status["migrationState"] = mirror_of(ms)
    if abort_status:
        status.setdefault("migrationState", {})[Field.ABORT_STATUS] = abort_status
    if reason:
        status.setdefault("migrationState", {})[Field.FAILURE_REASON] = reason
        if phase == MigrationPhase.FAILED:
            status["migrationState"][Field.FAILED] = True
    advance(machine, status, phase, clock)
    log.info("vmim %s: %s%s", vmim["metadata"]["name"], phase, f": {reason}" if reason else "")
    vmim = await api.update(vmim, subresource="status")
    if events is not None:
        events.phase(vmim, phase, reason=reason, abort_status=abort_status)
    if release and vmim["metadata"].get("deletionTimestamp"):
        await remove_finalizer(api, vmim)
        return True
    return False


async def write_status(api: Api, obj: Obj) -> Obj | None:
    """Write ``obj.status`` with its resourceVersion as precondition; None on Conflict
    (the caller's key is queued again and the next pass reads afresh)."""
    try:
        return await api.update(obj, subresource="status")
    except Conflict:
        return None


def mirror_only(old: Obj | None, new: Obj) -> bool:
    """The VMIM update changed nothing but its ``status.migrationState``: the mirror of
    its VMI's record, which only this half writes (``mirror_of``) and which follows VMI
    events. Such an update needs no pass: a running migration's progress, mirrored every
    PROGRESS_PERIOD, would otherwise cost a second pass (and its reads) per VMI write."""
    if old is None:
        return False

    def rest(vmim: Obj) -> Obj:
        meta = {k: v for k, v in vmim.get("metadata", {}).items() if k != "resourceVersion"}
        status = {k: v for k, v in (vmim.get("status") or {}).items() if k != "migrationState"}
        return {**vmim, "metadata": meta, "status": status}

    return rest(old) == rest(new)


# -- the peer link ----------------------------------------------------------------------


def subscribe(link: PeerLink, role: Role, fn: Callable[[SyncState], None]) -> None:
    """Call ``fn`` with each peer update whose sender holds ``role``; chained after any
    earlier subscriber (one link serves both reconcilers of a sync controller)."""
    previous = getattr(link, "on_peer_update", None)

    def deliver(state: SyncState) -> None:
        if state.role == role:
            fn(state)
        if previous is not None:
            previous(state)

    link.on_peer_update = deliver


def peer_final(state: SyncState | None) -> bool:
    return state is not None and (
        state.failed
        or state.cancelled
        or MigrationPhase.of({"status": {"phase": state.phase}}).final
    )


# A VMI event is acted on within this many seconds, not at once: the hand-off's writes
# come in bursts (Committed, then completed and the handler's figures) and each pass reads
# three objects; a pass that waits this long coalesces them and leaves the CPU to the
# switchover that wrote them (a cross-cluster target resumes on the source's Commit frame,
# while the pass relaying the decision is its fallback). Measured: at once, the relay's
# passes in both clusters added ~1.5 ms to the cross-cluster resume on two shared cores.
VMI_EVENT_WITHIN = 0.03


class HalfReconciler(abc.ABC):
    """What the sending and the receiving reconcilers share: the informers, the work queue
    and the routing of VMIM, VMI and peer events to the VMIM keys of this cluster's half
    (``side`` reads a VMIM's ``spec.sendTo`` or ``spec.receive``; empty: not ours)."""

    name = ""  # the work queue's name in logs
    peer_role = Role.SENDER  # the role of the peer's half this half listens to

    @staticmethod
    @abc.abstractmethod
    def side(vmim: Obj) -> Obj:
        """The VMIM's ``spec.sendTo`` or ``spec.receive`` ({} when it has none)."""

    def __init__(
        self,
        api: Api,
        link: PeerLink,
        clock: Callable[[], float],
        *,
        cluster_name: str,
        source: Source | None = None,
    ) -> None:
        self.api = api
        self.link = link
        self.clock = clock
        self.cluster_name = cluster_name
        # The outcome of this cluster's half, as the migration controller words it.
        self.events = MigrationEvents(
            EventRecorder(cast(EventWriter, api), COMPONENT, cluster_name)
        )
        feed = source if source is not None else cast(Source, api)
        self.vmims = Informer(feed, VMIM)
        self.vmis = Informer(feed, VMI)
        self.queue = WorkQueue()
        self._forgotten: set[str] = set()
        # migration ID -> uid of a VMIM that went (deleted) before the peer's half was
        # final: forgotten on the link when it is
        self._gone: dict[str, str] = {}
        self.vmims.add_handler(self._on_vmim)
        self.vmis.add_handler(self._on_vmi)
        subscribe(link, self.peer_role, self._on_peer)

    def _on_vmim(self, key: Key, old: Obj | None, new: Obj | None) -> None:
        if new is not None and self.side(new) and not mirror_only(old, new):
            self.queue.add(key)

    def _on_vmi(self, key: Key, old: Obj | None, new: Obj | None) -> None:
        ns, name = key
        for vmim in self.vmims.cache.values():
            if (
                self.side(vmim)
                and vmim["metadata"]["namespace"] == ns
                and vmim["spec"].get("vmiName") == name
            ):
                self.queue.add_soon((ns, vmim["metadata"]["name"]), VMI_EVENT_WITHIN)

    def _on_peer(self, state: SyncState) -> None:
        if state.migration_id in self._gone and peer_final(state):
            self.link.forget(state.migration_id)
            self._forgotten.add(self._gone.pop(state.migration_id))
        for key, vmim in self.vmims.cache.items():
            if self.side(vmim).get("migrationID") == state.migration_id:
                self.queue.add(key)

    def _later(self, vmim: Obj, delay: float = RECHECK_INTERVAL) -> None:
        self.queue.add_after((vmim["metadata"]["namespace"], vmim["metadata"]["name"]), delay)

    def _again(self, vmim: Obj) -> None:
        self.queue.add((vmim["metadata"]["namespace"], vmim["metadata"]["name"]))

    @abc.abstractmethod
    async def reconcile(self, key: Key) -> None:
        """One pass over the VMIM ``key`` of this half."""

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.vmims.run())
            tg.create_task(self.vmis.run())
            await self.vmims.synced.wait()
            await self.vmis.synced.wait()
            tg.create_task(self.queue.run(self.reconcile, self.name))
