"""Which Pending migration may start: the parallel limits and the priority order.

The queue is every Pending VMIM not being deleted, ordered by (priority, creation time,
name): evacuations (node drain, ``EVACUATION_ANNOTATION``) before user requests, then
oldest first. Walking it while simulating admissions, a VMIM starts only if it would get
one of the ``parallelMigrationsPerCluster`` slots left free by the active migrations
(``ACTIVE_PHASES``); a candidate whose source node already has
``parallelOutboundMigrationsPerNode`` migrations leaving is skipped (it waits) without
blocking the ones behind it.

``MigrationQueue`` keeps what that walk needs indexed (the active count, migrations
leaving each node, the Pending queue per source node, sorted), fed with every VMIM and
VMI change, so one decision costs O(source nodes x log(Pending)), not O(VMIMs + VMIs):
the controller's store keeps one (``controller.sched_index``).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from vmferry.migration_state import ConfigKey, Field, MigrationPhase

Obj = dict[str, Any]

EVACUATION_ANNOTATION = "kubevirt.io/evacuationMigration"  # value: the node being drained


def queue_order(vmim: Obj) -> tuple[int, str, str]:
    """Sort key of the Pending queue: evacuations first, then oldest first."""
    annotations = vmim["metadata"].get("annotations") or {}
    priority = 0 if EVACUATION_ANNOTATION in annotations else 1
    return priority, vmim["metadata"].get("creationTimestamp", ""), vmim["metadata"]["name"]


# A Pending VMIM's place in the queue: ``queue_order`` then its namespace (a listing's
# order, by namespace then name, broke the ties of the sort it replaces).
QueueKey = tuple[int, str, str, str]
Key = tuple[str, str]  # (namespace, name)


def queue_key(vmim: Obj) -> QueueKey:
    return (*queue_order(vmim), vmim["metadata"].get("namespace", ""))


@dataclass(frozen=True, slots=True)
class _Entry:
    """What the queue keeps of one VMIM."""

    uid: str
    vmi: Key  # (namespace, spec.vmiName)
    active: bool
    pending: QueueKey | None  # set while Pending and not being deleted
    phase: MigrationPhase
    final: bool
    handoff_uid: str  # status.migrationState.migrationUid (a receiving VMIM's sender)


@dataclass(frozen=True)
class Admission:
    """Whether a Pending VMIM may move to Scheduling now; ``reason`` says why it waits."""

    start: bool
    reason: str = ""


def _remove_sorted(items: list[QueueKey], qkey: QueueKey) -> None:
    at = bisect.bisect_left(items, qkey)
    if at < len(items) and items[at] == qkey:
        del items[at]


class MigrationQueue:
    """The admission walk's inputs, indexed; fed by ``set_vmim`` / ``set_vmi_node`` with
    every change (in the order the store committed them)."""

    def __init__(self) -> None:
        self._vmims: dict[Key, _Entry] = {}
        self._vmi_node: dict[Key, str | None] = {}
        self._active_of_vmi: dict[Key, int] = {}
        self._pending_of_vmi: dict[Key, set[QueueKey]] = {}
        self.active = 0
        self.outbound: dict[str | None, int] = {}  # active migrations per source node
        self._pending: list[QueueKey] = []  # sorted
        self._pending_of_source: dict[str | None, list[QueueKey]] = {}  # each sorted
        self._vmims_of_vmi: dict[Key, set[str]] = {}  # VMIM names per (namespace, vmiName)
        self._unfinished_uids: dict[str, int] = {}
        self._open: dict[Key, MigrationPhase] = {}  # the phase of every unfinished VMIM
        self._ended_uids: dict[str, int] = {}

    # -- feeding ----------------------------------------------------------------------

    def set_vmim(self, key: Key, vmim: Obj | None) -> None:
        """The VMIM at ``key`` is now ``vmim`` (None: deleted)."""
        old = self._vmims.pop(key, None)
        if old is not None:
            self._count(old, -1)
            self._count_uids(key, old, -1)
        if vmim is None:
            return
        phase = MigrationPhase.of(vmim)
        pending = phase == MigrationPhase.PENDING and not vmim["metadata"].get("deletionTimestamp")
        entry = _Entry(
            uid=vmim["metadata"].get("uid", ""),
            vmi=(key[0], str((vmim.get("spec") or {}).get("vmiName", ""))),
            active=phase.active,
            pending=queue_key(vmim) if pending else None,
            phase=phase,
            final=phase.final,
            handoff_uid=str(
                ((vmim.get("status") or {}).get("migrationState") or {}).get(
                    Field.MIGRATION_UID, ""
                )
            ),
        )
        self._vmims[key] = entry
        self._count(entry, +1)
        self._count_uids(key, entry, +1)

    def _count_uids(self, key: Key, entry: _Entry, sign: int) -> None:
        names = self._vmims_of_vmi.setdefault(entry.vmi, set())
        if sign > 0:
            names.add(key[1])
        else:
            names.discard(key[1])
            if not names:
                del self._vmims_of_vmi[entry.vmi]
        if entry.final:
            self._add(self._ended_uids, entry.uid, sign)
            return
        if sign > 0:
            self._open[key] = entry.phase
        else:
            self._open.pop(key, None)
        self._add(self._unfinished_uids, entry.uid, sign)
        if entry.handoff_uid:
            self._add(self._unfinished_uids, entry.handoff_uid, sign)

    def set_vmi_node(self, vmi: Key, node: str | None) -> None:
        """The VMI at ``vmi`` now runs on ``node`` (None: no node, or deleted)."""
        old = self._vmi_node.get(vmi)
        if node is None:
            self._vmi_node.pop(vmi, None)
        else:
            self._vmi_node[vmi] = node
        if old == node:
            return
        active = self._active_of_vmi.get(vmi, 0)
        if active:
            self._add(self.outbound, old, -active)
            self._add(self.outbound, node, active)
        for qkey in self._pending_of_vmi.get(vmi, ()):
            self._unlist(self._pending_of_source, old, qkey)
            bisect.insort(self._pending_of_source.setdefault(node, []), qkey)

    def _count(self, entry: _Entry, sign: int) -> None:
        source = self._vmi_node.get(entry.vmi)
        if entry.active:
            self.active += sign
            self._add(self.outbound, source, sign)
            self._add(self._active_of_vmi, entry.vmi, sign)
        if entry.pending is None:
            return
        of_vmi = self._pending_of_vmi.setdefault(entry.vmi, set())
        if sign > 0:
            bisect.insort(self._pending, entry.pending)
            bisect.insort(self._pending_of_source.setdefault(source, []), entry.pending)
            of_vmi.add(entry.pending)
        else:
            _remove_sorted(self._pending, entry.pending)
            self._unlist(self._pending_of_source, source, entry.pending)
            of_vmi.discard(entry.pending)
        if not of_vmi:
            del self._pending_of_vmi[entry.vmi]

    @staticmethod
    def _add(counts: dict[Any, int], key: Any, delta: int) -> None:
        value = counts.get(key, 0) + delta
        if value:
            counts[key] = value
        else:
            counts.pop(key, None)

    @staticmethod
    def _unlist(lists: dict[str | None, list[QueueKey]], key: str | None, qkey: QueueKey) -> None:
        """Remove ``qkey`` from the sorted list ``lists[key]``; drop the list once empty."""
        items = lists.get(key, [])
        _remove_sorted(items, qkey)
        if not items:
            lists.pop(key, None)

    # -- reading ----------------------------------------------------------------------

    def migrations_of(self, namespace: str, vmi: str) -> list[str]:
        """The names of every VMIM of the VMI ``namespace/vmi``, sorted."""
        return sorted(self._vmims_of_vmi.get((namespace, vmi), ()))

    def unfinished_uids(self) -> set[str]:
        """The uids of the VMIMs not Succeeded or Failed, and the sending uids they name
        (a receiving VMIM's token Secret is named by its sender's uid)."""
        return set(self._unfinished_uids)

    def ended_uids(self) -> set[str]:
        return set(self._ended_uids)

    def unfinished(self) -> dict[Key, MigrationPhase]:
        """Every VMIM not Succeeded or Failed, and its phase."""
        return dict(self._open)

    def pending(self) -> list[Key]:
        """Every Pending VMIM not being deleted, in queue order."""
        return [(qkey[3], qkey[2]) for qkey in self._pending]

    def admit(self, vmim: Obj, config: Mapping[str, Any]) -> Admission:
        """The decision of ``admit`` for ``vmim`` from the indexed state."""
        limit = int(config[ConfigKey.PARALLEL_MIGRATIONS_PER_CLUSTER])
        per_node = int(config[ConfigKey.PARALLEL_OUTBOUND_MIGRATIONS_PER_NODE])
        waiting = Admission(False, f"waiting in the queue ({self.active} running, limit {limit})")
        free = limit - self.active
        meta = vmim["metadata"]
        entry = self._vmims.get((meta.get("namespace", ""), meta["name"]))
        if free <= 0 or entry is None or entry.pending is None or entry.uid != meta["uid"]:
            return waiting
        mine = entry.pending
        # The walk admits, per source node, the first (per_node - outbound) of its Pending
        # VMIMs in queue order (the rest are skipped), the first ``free`` of those overall.
        # It reaches ``vmim`` iff fewer than ``free`` admissions come before it.
        if bisect.bisect_left(self._pending, mine) >= free:
            ahead = 0
            for source, items in self._pending_of_source.items():
                room = per_node - self.outbound.get(source, 0)
                if room > 0:
                    ahead += min(room, bisect.bisect_left(items, mine))
            if ahead >= free:
                return waiting
        source = self._vmi_node.get(entry.vmi)
        leaving = self.outbound.get(source, 0)
        before = bisect.bisect_left(self._pending_of_source.get(source, []), mine)
        if leaving + before >= per_node:
            return Admission(
                False, f"{max(leaving, per_node)} migrations already leave node {source}"
            )
        return Admission(True)


def admit(
    vmim: Obj, vmims: Iterable[Obj], vmis: Iterable[Obj], config: Mapping[str, Any]
) -> Admission:
    """Decide for ``vmim`` given every VMIM and VMI of the cluster (read from the store,
    not a cache, so two passes in a row never both take the last slot) and the cluster's
    ``liveMigrationConfig`` (defaults filled in): a ``MigrationQueue`` built from them."""
    queue = MigrationQueue()
    for vmi in vmis:
        meta = vmi["metadata"]
        queue.set_vmi_node(
            (meta["namespace"], meta["name"]), (vmi.get("status") or {}).get("nodeName")
        )
    for m in vmims:
        queue.set_vmim((m["metadata"]["namespace"], m["metadata"]["name"]), m)
    return queue.admit(vmim, config)
