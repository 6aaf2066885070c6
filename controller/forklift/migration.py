"""Migrations: running a ``live`` Plan, VM by VM (KubeVirt decentralized live migration).

Per VM (:class:`VMPhase`, transitions in :data:`VM_TRANSITIONS`):

- ``Pending``: the VM runs here. On the destination, through its provider's token, the
  receiving VM (a copy of the source VM, ``runStrategy: WaitAsReceiver``, annotation
  ``kubevirt.io/restore-run-strategy: <source's>``) and the receiving VMIM
  (``spec.receive.migrationID``, ``vmiName``) are created → ``Receiving``.
- ``Receiving``: waits for the destination's synchronization address (the receiving
  VMIM's ``status.synchronizationAddresses``, else the destination HyperConverged's),
  then creates the sending VMIM here (``spec.sendTo{migrationID, connectURL}``) →
  ``Migrating``.
- ``Migrating``: follows both VMIMs; ``Succeeded`` when both succeeded, ``Failed`` (with
  the reason) when either failed or disappeared. A failure leaves the VM on the source:
  the orchestrator never touches it.

Before the first VM starts, the gates: ``feature_ocp_live_migration`` on this cluster's
ForkliftController and on the destination's, and ``decentralizedLiveMigration`` on this
cluster's HyperConverged and on the destination's (read through the provider when its
role allows; otherwise the destination's admission refuses the receiving VMIM naming it).

The migrationID is unique per plan, Migration and VM (:func:`migration_id`). Deleting the
Migration cancels: a finalizer holds it while the sending VMIMs (or, before they exist,
the receiving ones) are deleted.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from controller.forklift.cluster import ClusterApi, feature_off_message, live_migration_feature
from controller.forklift.plan import (
    PlanError,
    PlanPending,
    PlanVM,
    ResolvedPlan,
    plan_vms,
    resolve_plan,
)
from controller.forklift.provider import Connector, ProviderError, provider_access
from controller.objects import rfc3339
from vmferry.decentralized import (
    RESTORE_RUN_STRATEGY_ANNOTATION,
    RUN_STRATEGY_WAIT_AS_RECEIVER,
    SYNC_ADDRESSES_FIELD,
    gate_enabled,
    gate_off_message,
)
from vmferry.errors import AlreadyExists, ApiError, Conflict, Forbidden, NotFound, Unavailable
from vmferry.informer import Key
from vmferry.migration_state import Field, MigrationPhase, VMIPhase
from vmferry.objects import kinds, schema
from vmferry.objects.schema.forklift import MIGRATION_FINAL_PHASES, MigrationRunPhase, VMPhase

log = logging.getLogger(__name__)
Obj = dict[str, Any]

FINALIZER = "forklift.konveyor.io/migration"
MIGRATION_LABEL = "forklift.konveyor.io/migration"  # the Migration's uid
PLAN_LABEL = "forklift.konveyor.io/plan"  # the Plan's uid
MIGRATION_ID_ANNOTATION = "forklift.konveyor.io/migration-id"
FOLLOW_SECONDS = 1.0  # how often a running Migration reads the VMIMs of both clusters
VMIM = "VirtualMachineInstanceMigration"


VM_TRANSITIONS: dict[VMPhase, frozenset[VMPhase]] = {
    VMPhase.PENDING: frozenset({VMPhase.RECEIVING, VMPhase.FAILED, VMPhase.CANCELED}),
    VMPhase.RECEIVING: frozenset({VMPhase.MIGRATING, VMPhase.FAILED, VMPhase.CANCELED}),
    VMPhase.MIGRATING: frozenset({VMPhase.SUCCEEDED, VMPhase.FAILED, VMPhase.CANCELED}),
    VMPhase.SUCCEEDED: frozenset(),
    VMPhase.FAILED: frozenset(),
    VMPhase.CANCELED: frozenset(),
}


def migration_id(plan: Mapping[str, Any], migration: Mapping[str, Any], vm: PlanVM) -> str:
    """The decentralized migration's id (and both VMIMs' name): unique per plan,
    Migration and VM, stable across reconciles."""
    seed = "/".join((plan["metadata"]["uid"], migration["metadata"]["uid"], vm.namespace, vm.name))
    digest = hashlib.sha256(seed.encode()).hexdigest()[:10]
    return f"{vm.name[:200]}-mtv-{digest}"


class VMFailure(Exception):
    """This VM's migration cannot go on: the message says why."""


class VMCanceled(VMFailure):
    """One of the VM's VMIMs was deleted: that cancels the migration (both sides)."""


@dataclass
class VMRecord:
    """One ``status.vms[]`` entry, typed."""

    namespace: str
    name: str
    phase: VMPhase = VMPhase.PENDING
    reason: str = ""
    migration_id: str = ""
    source_migration: str = ""
    destination_migration: str = ""
    started: str | None = None
    completed: str | None = None

    def move(self, phase: VMPhase, reason: str = "") -> None:
        if phase != self.phase and phase not in VM_TRANSITIONS[self.phase]:
            raise ValueError(f"VM {self.name}: no transition {self.phase} -> {phase}")
        self.phase = phase
        self.reason = reason

    def as_dict(self) -> Obj:
        out: Obj = {
            "namespace": self.namespace,
            "name": self.name,
            "phase": str(self.phase),
            "reason": self.reason,
            "migrationID": self.migration_id,
            "sourceMigration": self.source_migration,
            "destinationMigration": self.destination_migration,
        }
        if self.started:
            out["started"] = self.started
        if self.completed:
            out["completed"] = self.completed
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> VMRecord:
        try:
            phase = VMPhase(data.get("phase") or VMPhase.PENDING)
        except ValueError:
            phase = VMPhase.PENDING
        return cls(
            namespace=str(data.get("namespace") or ""),
            name=str(data.get("name") or ""),
            phase=phase,
            reason=str(data.get("reason") or ""),
            migration_id=str(data.get("migrationID") or ""),
            source_migration=str(data.get("sourceMigration") or ""),
            destination_migration=str(data.get("destinationMigration") or ""),
            started=data.get("started"),
            completed=data.get("completed"),
        )


def _vmim_failure(vmim: Mapping[str, Any]) -> str:
    state = (vmim.get("status") or {}).get("migrationState") or {}
    reason = str(state.get(Field.FAILURE_REASON) or "")
    if not reason:
        for cond in (vmim.get("status") or {}).get("conditions") or []:
            if cond.get("message"):
                reason = str(cond["message"])
    return reason or "no reason given"


def sync_addresses(obj: Mapping[str, Any]) -> list[str]:
    return [str(a) for a in (obj.get("status") or {}).get(SYNC_ADDRESSES_FIELD) or [] if a]


def _refused(where: str, e: ApiError) -> VMFailure:
    return VMFailure(f"{where} refused: {e.message}")


class MigrationReconciler:
    """Runs Migrations of live plans. ``home`` is this cluster's API, ``connector`` reaches
    the destination providers' clusters, ``clock`` stamps the status."""

    def __init__(
        self, home: ClusterApi, connector: Connector, clock: Callable[[], float] = time.time
    ) -> None:
        self.home = home
        self.connector = connector
        self.clock = clock

    async def reconcile(self, key: Key) -> float | None:
        """Advance the Migration ``key``; returns when to look again (seconds) or None."""
        ns, name = key
        try:
            migration = await self.home.get("Migration", ns, name)
        except NotFound:
            return None
        meta = migration["metadata"]
        if meta.get("deletionTimestamp"):
            await self._cancel(migration)
            return None
        status = migration.get("status") or {}
        if status.get("phase") in MIGRATION_FINAL_PHASES:
            if FINALIZER in (meta.get("finalizers") or []):
                await self._drop_finalizer(migration)
            return None
        if FINALIZER not in (meta.get("finalizers") or []):
            meta.setdefault("finalizers", []).append(FINALIZER)
            migration = await self.home.update(migration)
        before = copy.deepcopy(migration.get("status") or {})
        try:
            resolved, destination = await self._start(migration)
        except (PlanError, ProviderError, VMFailure) as e:
            await self._cannot_go_on(migration, e)
        else:
            await self._run_vms(migration, resolved, destination)
        status = migration.setdefault("status", {})
        if status != before:
            await self.home.update(
                schema.validate(migration, server_managed=True), subresource="status"
            )
        if status.get("phase") in MIGRATION_FINAL_PHASES:
            return 0.0  # drop the finalizer on the next pass
        return FOLLOW_SECONDS

    # -- start: the plan, the providers and the gates ------------------------------------

    async def _start(self, migration: Obj) -> tuple[ResolvedPlan, ClusterApi]:
        resolved = await resolve_plan(self.home, await self._plan_of(migration))
        access = await provider_access(self.home, resolved.destination)
        destination = await self.connector.connect(access)
        status = migration.setdefault("status", {})
        if not status.get("started"):
            await self._check_gates(resolved, destination)
            status["started"] = rfc3339(self.clock())
            status["phase"] = MigrationRunPhase.RUNNING
        status["reason"] = ""
        return resolved, destination

    async def _check_gates(self, resolved: ResolvedPlan, destination: ClusterApi) -> None:
        dest_name = resolved.destination["metadata"]["name"]
        here = await self._read(
            self.home,
            "ForkliftController",
            kinds.MTV_NAMESPACE,
            kinds.FORKLIFT_CONTROLLER_NAME,
            "this cluster",
        )
        if here is None or not live_migration_feature(here):
            raise VMFailure(feature_off_message("this cluster"))
        hco = await self._read(
            self.home,
            "HyperConverged",
            kinds.SYSTEM_NAMESPACE,
            kinds.HYPERCONVERGED_NAME,
            "this cluster",
        )
        if hco is None or not gate_enabled(hco):
            raise VMFailure(f"this cluster: {gate_off_message()}")
        there = await self._read(
            destination,
            "ForkliftController",
            kinds.MTV_NAMESPACE,
            kinds.FORKLIFT_CONTROLLER_NAME,
            f"provider {dest_name}",
        )
        if there is None or not live_migration_feature(there):
            raise VMFailure(feature_off_message(f"the destination (provider {dest_name})"))
        try:
            dest_hco = await destination.get(
                "HyperConverged", kinds.SYSTEM_NAMESPACE, kinds.HYPERCONVERGED_NAME
            )
        except (Forbidden, NotFound):
            return  # the provider's role does not read it: the destination's admission checks
        except ApiError as e:
            raise _refused(f"the destination (provider {dest_name})", e) from None
        if not gate_enabled(dest_hco):
            raise VMFailure(f"the destination (provider {dest_name}): {gate_off_message()}")

    @staticmethod
    async def _read(api: ClusterApi, kind: str, ns: str, name: str, where: str) -> Obj | None:
        try:
            return await api.get(kind, ns, name)
        except NotFound:
            return None
        except (Unavailable, Conflict):
            raise
        except ApiError as e:
            raise _refused(where, e) from None

    async def _cannot_go_on(self, migration: Obj, e: Exception) -> None:
        """Before the start: a plan waiting for its providers' first check stays Pending,
        anything else fails every VM. Once started, the VMIMs run on without the
        orchestrator: it says why it cannot follow them and looks again (a provider whose
        token was revoked, say)."""
        status = migration.setdefault("status", {})
        if status.get("started"):
            status["reason"] = f"cannot follow the migration: {e}"
        elif isinstance(e, PlanPending):
            status.update(phase=MigrationRunPhase.PENDING, reason=f"waiting: {e}")
        else:
            self._fail_all(migration, str(e), await self._declared_vms(migration))

    async def _plan_of(self, migration: Obj) -> Obj:
        ref = migration["spec"]["plan"]
        plan_ns = ref.get("namespace") or migration["metadata"]["namespace"]
        try:
            return await self.home.get("Plan", plan_ns, ref["name"])
        except NotFound:
            raise PlanError(f'plan "{plan_ns}/{ref["name"]}" does not exist') from None

    async def _declared_vms(self, migration: Obj) -> tuple[PlanVM, ...]:
        """The plan's VMs, to report each as failed; none when the plan cannot be read."""
        try:
            return plan_vms(await self._plan_of(migration))
        except (PlanError, ApiError):
            return ()

    def _fail_all(self, migration: Obj, reason: str, declared: tuple[PlanVM, ...]) -> None:
        status = migration.setdefault("status", {})
        records = [VMRecord.from_dict(v) for v in status.get("vms") or []]
        if not records:
            records = [VMRecord(vm.namespace, vm.name) for vm in declared]
        for record in records:
            if not record.phase.final:
                record.move(VMPhase.FAILED, reason)
        status["vms"] = [r.as_dict() for r in records]
        status["phase"] = MigrationRunPhase.FAILED
        status["reason"] = reason
        status.setdefault("started", rfc3339(self.clock()))
        status["completed"] = rfc3339(self.clock())
        log.info("migration %s: failed: %s", migration["metadata"]["name"], reason)

    # -- per VM --------------------------------------------------------------------------

    async def _run_vms(
        self, migration: Obj, resolved: ResolvedPlan, destination: ClusterApi
    ) -> None:
        status = migration.setdefault("status", {})
        known = {(v.get("namespace"), v.get("name")): v for v in status.get("vms") or []}
        records: list[VMRecord] = []
        for vm in resolved.vms:
            record = VMRecord.from_dict(known.get((vm.namespace, vm.name)) or {})
            record.namespace, record.name = vm.namespace, vm.name
            if not record.migration_id:
                record.migration_id = migration_id(resolved.plan, migration, vm)
            records.append(record)
        for record in records:
            if record.phase.final:
                continue
            try:
                await self._step(migration, resolved, destination, record)
            except VMCanceled as e:
                record.move(VMPhase.CANCELED, str(e))
            except VMFailure as e:
                record.move(VMPhase.FAILED, str(e))
            if record.phase.final and not record.completed:
                record.completed = rfc3339(self.clock())
        status["vms"] = [r.as_dict() for r in records]
        if all(r.phase.final for r in records):
            failed = [r for r in records if r.phase == VMPhase.FAILED]
            canceled = [r for r in records if r.phase == VMPhase.CANCELED]
            if failed:
                status["phase"] = MigrationRunPhase.FAILED
                status["reason"] = (
                    f"{len(failed)} of {len(records)} VM(s) failed: {failed[0].name}: "
                    f"{failed[0].reason}"
                )
            elif canceled:
                status["phase"] = MigrationRunPhase.CANCELED
                status["reason"] = f"{len(canceled)} of {len(records)} VM(s) canceled"
            else:
                status["phase"] = MigrationRunPhase.SUCCEEDED
                status["reason"] = f"{len(records)} VM(s) migrated"
            status["completed"] = rfc3339(self.clock())

    def _labels(self, migration: Obj, resolved: ResolvedPlan) -> dict[str, str]:
        return {
            MIGRATION_LABEL: migration["metadata"]["uid"],
            PLAN_LABEL: resolved.plan["metadata"]["uid"],
        }

    async def _step(
        self, migration: Obj, resolved: ResolvedPlan, destination: ClusterApi, record: VMRecord
    ) -> None:
        dest_name = f"the destination (provider {resolved.destination['metadata']['name']})"
        if record.phase == VMPhase.PENDING:
            await self._create_receiver(migration, resolved, destination, record, dest_name)
        if record.phase == VMPhase.RECEIVING:
            await self._create_sender(migration, resolved, destination, record, dest_name)
        if record.phase == VMPhase.MIGRATING:
            await self._follow(resolved, destination, record, dest_name)

    async def _create_receiver(
        self,
        migration: Obj,
        resolved: ResolvedPlan,
        destination: ClusterApi,
        record: VMRecord,
        dest_name: str,
    ) -> None:
        try:
            source_vm = await self.home.get("VirtualMachine", record.namespace, record.name)
        except NotFound:
            raise VMFailure(f'VM "{record.namespace}/{record.name}" does not exist') from None
        try:
            vmi = await self.home.get("VirtualMachineInstance", record.namespace, record.name)
        except NotFound:
            vmi = {}
        if (vmi.get("status") or {}).get("phase") != VMIPhase.RUNNING:
            raise VMFailure(
                f'VM "{record.namespace}/{record.name}" is not running: a live migration '
                "moves a running VM (start it first)"
            )
        labels = self._labels(migration, resolved)
        target_ns = resolved.target_namespace
        receiving_vm = self._receiving_vm(source_vm, target_ns, labels, record.migration_id)
        try:
            await destination.create(receiving_vm)
        except AlreadyExists:
            existing = await destination.get("VirtualMachine", target_ns, record.name)
            ours = (existing["metadata"].get("annotations") or {}).get(MIGRATION_ID_ANNOTATION)
            if ours != record.migration_id:
                raise VMFailure(
                    f'{dest_name}: a VM "{target_ns}/{record.name}" already exists there'
                ) from None
        except (Unavailable, Conflict):
            raise
        except ApiError as e:
            raise _refused(dest_name, e) from None
        vmim = {
            "apiVersion": kinds.KUBEVIRT,
            "kind": VMIM,
            "metadata": {"name": record.migration_id, "namespace": target_ns, "labels": labels},
            "spec": {"vmiName": record.name, "receive": {"migrationID": record.migration_id}},
        }
        try:
            await destination.create(vmim)
        except AlreadyExists:
            pass
        except (Unavailable, Conflict):
            raise
        except ApiError as e:
            raise _refused(dest_name, e) from None
        record.destination_migration = record.migration_id
        record.started = record.started or rfc3339(self.clock())
        record.move(VMPhase.RECEIVING, "waiting for the destination's synchronization address")

    @staticmethod
    def _receiving_vm(source_vm: Obj, target_ns: str, labels: dict[str, str], mid: str) -> Obj:
        spec = copy.deepcopy(source_vm.get("spec") or {})
        running = spec.pop("running", None)
        restore = spec.get("runStrategy") or ("Always" if running else "Halted")
        spec["runStrategy"] = RUN_STRATEGY_WAIT_AS_RECEIVER
        meta = source_vm["metadata"]
        return {
            "apiVersion": kinds.KUBEVIRT,
            "kind": "VirtualMachine",
            "metadata": {
                "name": meta["name"],
                "namespace": target_ns,
                "labels": {**(meta.get("labels") or {}), **labels},
                "annotations": {
                    RESTORE_RUN_STRATEGY_ANNOTATION: restore,
                    MIGRATION_ID_ANNOTATION: mid,
                },
            },
            "spec": spec,
        }

    async def _get_vmim(
        self, api: ClusterApi, ns: str, name: str, where: str, record: VMRecord
    ) -> Obj:
        try:
            return await api.get(VMIM, ns, name)
        except NotFound:
            raise VMCanceled(
                f'{where}: the migration "{ns}/{name}" was deleted (canceled); the VM stays '
                "on the source"
            ) from None
        except (Unavailable, Conflict):
            raise
        except ApiError as e:
            raise _refused(where, e) from None

    async def _create_sender(
        self,
        migration: Obj,
        resolved: ResolvedPlan,
        destination: ClusterApi,
        record: VMRecord,
        dest_name: str,
    ) -> None:
        receiving = await self._get_vmim(
            destination, resolved.target_namespace, record.destination_migration, dest_name, record
        )
        if MigrationPhase.of(receiving) == MigrationPhase.FAILED:
            raise VMFailure(
                f"{dest_name}: the receiving migration failed: {_vmim_failure(receiving)}"
            )
        addresses = sync_addresses(receiving)
        if not addresses:
            try:
                hco = await destination.get(
                    "HyperConverged", kinds.SYSTEM_NAMESPACE, kinds.HYPERCONVERGED_NAME
                )
                addresses = sync_addresses(hco)
            except (Forbidden, NotFound):
                pass
        if not addresses:
            record.reason = (
                "waiting for the destination's synchronization address (is its sync "
                "controller running?)"
            )
            return
        vmim = {
            "apiVersion": kinds.KUBEVIRT,
            "kind": VMIM,
            "metadata": {
                "name": record.migration_id,
                "namespace": record.namespace,
                "labels": self._labels(migration, resolved),
            },
            "spec": {
                "vmiName": record.name,
                "sendTo": {"migrationID": record.migration_id, "connectURL": addresses[0]},
            },
        }
        try:
            await self.home.create(vmim)
        except AlreadyExists:
            pass
        except (Unavailable, Conflict):
            raise
        except ApiError as e:
            raise _refused("this cluster", e) from None
        record.source_migration = record.migration_id
        record.move(VMPhase.MIGRATING, f"sending to {addresses[0]}")

    async def _follow(
        self, resolved: ResolvedPlan, destination: ClusterApi, record: VMRecord, dest_name: str
    ) -> None:
        sending = await self._get_vmim(
            self.home, record.namespace, record.source_migration, "this cluster", record
        )
        receiving = await self._get_vmim(
            destination, resolved.target_namespace, record.destination_migration, dest_name, record
        )
        send_phase, receive_phase = MigrationPhase.of(sending), MigrationPhase.of(receiving)
        if send_phase == MigrationPhase.FAILED:
            record.move(VMPhase.FAILED, f"the sending migration failed: {_vmim_failure(sending)}")
        elif receive_phase == MigrationPhase.FAILED:
            record.move(
                VMPhase.FAILED,
                f"{dest_name}: the receiving migration failed: {_vmim_failure(receiving)}",
            )
        elif send_phase == receive_phase == MigrationPhase.SUCCEEDED:
            record.move(
                VMPhase.SUCCEEDED,
                f"running on {resolved.destination['metadata']['name']}/"
                f"{resolved.target_namespace}",
            )
        else:
            record.reason = (
                f"sending: {send_phase or 'Pending'}, receiving: {receive_phase or 'Pending'}"
            )

    # -- cancel ----------------------------------------------------------------------------

    async def _cancel(self, migration: Obj) -> None:
        """The Migration is being deleted: delete the VMIMs of its unfinished VMs (the sync
        controllers cancel both sides), then let it go."""
        for data in (migration.get("status") or {}).get("vms") or []:
            record = VMRecord.from_dict(data)
            if record.phase.final:
                continue
            if record.source_migration:
                try:
                    await self.home.delete(VMIM, record.namespace, record.source_migration)
                    log.info(
                        "migration %s: canceled %s",
                        migration["metadata"]["name"],
                        record.source_migration,
                    )
                except NotFound:
                    pass
            elif record.destination_migration:
                await self._cancel_receiver(migration, record)
        await self._drop_finalizer(migration)

    async def _cancel_receiver(self, migration: Obj, record: VMRecord) -> None:
        """No sending VMIM yet: delete the receiving one on the destination, if reachable."""
        try:
            resolved = await resolve_plan(self.home, await self._plan_of(migration))
            destination = await self.connector.connect(
                await provider_access(self.home, resolved.destination)
            )
            await destination.delete(VMIM, resolved.target_namespace, record.destination_migration)
        except (PlanError, ProviderError, ApiError) as e:
            log.info(
                "migration %s: receiving migration %s not deleted: %s",
                migration["metadata"]["name"],
                record.destination_migration,
                e,
            )

    async def _drop_finalizer(self, migration: Obj) -> None:
        meta = migration["metadata"]
        meta["finalizers"] = [f for f in meta.get("finalizers") or [] if f != FINALIZER]
        try:
            await self.home.update(migration)
        except NotFound:
            pass
