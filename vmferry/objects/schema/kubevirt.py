"""Schemas of the KubeVirt kinds: VirtualMachineInstance, VirtualMachine, the migration
(VirtualMachineInstanceMigration, ``migrationState``), HyperConverged and MigrationPolicy.

Phase names, decisions and configuration keys come from the migration contract
(:mod:`vmferry.migration_state`): the enums of ``phase``, ``switchover``, ``mode``,
``abortStatus`` and ``compression`` are its StrEnums, and the fields of
``migrationState`` and of a migration configuration are its ``Field`` and ``ConfigKey``
members, so the schema cannot drift from the contract. The stream token is not part of
``migrationState`` (it lives in a Secret, see ``token_secret_name``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vmferry.decentralized import (
    FEATURE_GATES,
    RESTORE_RUN_STRATEGY_ANNOTATION,
    RUN_STRATEGY_WAIT_AS_RECEIVER,
    SYNC_ADDRESSES_FIELD,
    Role,
)
from vmferry.migration_state import (
    AbortStatus,
    Compression,
    ConfigKey,
    Field,
    MigrationMode,
    MigrationPhase,
    Switchover,
    VMIPhase,
)
from vmferry.objects import limits
from vmferry.objects.quantity import parse_quantity
from vmferry.objects.schema.core import CONDITIONS, PHASE_TRANSITION_TIMESTAMPS, PORT
from vmferry.objects.schema.dsl import (
    Annotations,
    AnyObject,
    Anything,
    Bool,
    Errors,
    Int,
    Labels,
    List,
    Map,
    Name,
    Number,
    Obj,
    Quantity,
    Schema,
    Str,
    Timestamp,
    field_path,
    nested,
    quantity_max_message,
    show,
)
from vmferry.objects.schema.storage import DEVICES, VOLUME, rule_vmi_volumes

# -- the migration configuration and state -----------------------------------------------

# The cluster-wide migration settings (HyperConverged spec.liveMigrationConfig); the
# per-migration subset resolved by the scheduler reuses the same constraints.
_MIGRATION_TUNABLES: dict[str, Schema] = {
    ConfigKey.BANDWIDTH_PER_MIGRATION: Quantity(),
    ConfigKey.COMPLETION_TIMEOUT_PER_GIB: Int(min=1),
    ConfigKey.PROGRESS_TIMEOUT: Int(min=1),
    ConfigKey.ALLOW_AUTO_CONVERGE: Bool(),
    ConfigKey.ALLOW_POST_COPY: Bool(),
    ConfigKey.NETWORK: Name(),  # a NetworkAttachmentDefinition (vmferry.migration_network)
    ConfigKey.DOWNTIME_BUDGET_MS: Int(min=1),
    ConfigKey.PARALLEL_STREAMS: Int(min=1, max=16),
    ConfigKey.UNSCHEDULABLE_TIMEOUT_S: Int(min=1),
    ConfigKey.POST_COPY_RECOVERY_WINDOW_S: Int(min=1),
    ConfigKey.COMPRESSION: Str(enum=Compression),
}

LIVE_MIGRATION_CONFIG = Obj(
    {
        **_MIGRATION_TUNABLES,
        ConfigKey.PARALLEL_MIGRATIONS_PER_CLUSTER: Int(min=1),
        ConfigKey.PARALLEL_OUTBOUND_MIGRATIONS_PER_NODE: Int(min=1),
    }
)

# The defaults live with the migration contract (MigrationConfig, LIVE_MIGRATION_DEFAULTS).

MIGRATION_CONFIGURATION = Obj(_MIGRATION_TUNABLES)

_NON_NEGATIVE = Number(min=0)

MIGRATION_TRANSFER = Obj(
    {
        "dataTotalBytes": _NON_NEGATIVE,
        "dataProcessedBytes": _NON_NEGATIVE,
        "dataRemainingBytes": _NON_NEGATIVE,
        "wireBytes": _NON_NEGATIVE,
        "rounds": _NON_NEGATIVE,
        "dirtyRateBytes": _NON_NEGATIVE,
        "transferRateBytes": _NON_NEGATIVE,
        "averageWireRateBytes": _NON_NEGATIVE,
        "downtimeMilliseconds": Number(),
        "guestDowntimeMilliseconds": Number(),
        # The source's switchover in named parts: pause, final_pass, state_transfer, verify, resume.
        "downtimePartsMilliseconds": Map(_NON_NEGATIVE),
        "digest": Str(),
        "targetDigest": Str(),
        "digestVerified": Bool(),
        "throttlePercent": Int(min=0, max=100),
        # QEMU guests' verified switchover: the mode and the pages re-sent to the target.
        "verifyMode": Str(enum=("off", "detect", "repair")),
        "repairedPages": _NON_NEGATIVE,
        # the steps inside its verify part: source_digest, target_digest (Completed sent ->
        # the target's last digest in), compare, repair (-> the target's Verified)
        "switchoverStepsMilliseconds": Map(_NON_NEGATIVE),
        # a storage migration: the mirrored volumes, how long their mirrors took to catch
        # up (the guest running) and the disk blocks re-sent at the verified switchover
        "mirroredDisks": List(Str()),
        "diskMirrorMilliseconds": _NON_NEGATIVE,
        "repairedDiskBlocks": _NON_NEGATIVE,
        "postCopyStallMilliseconds": _NON_NEGATIVE,
        "postCopyFaults": _NON_NEGATIVE,
        "postCopyInterruptions": _NON_NEGATIVE,
        # which network carried it (handler/net_counters.py): the NIC the migration
        # connections left by, and every non-loopback NIC's bytes over networkSeconds
        "networkInterface": Str(),
        "networkBytes": Map(_NON_NEGATIVE),
        "networkSeconds": _NON_NEGATIVE,
    }
)

MIGRATION_STATE = Obj(
    {
        Field.MIGRATION_UID: Str(),
        Field.SOURCE_NODE: Str(),
        Field.TARGET_NODE: Str(),
        Field.TARGET_NODE_ADDRESS: Str(),
        Field.TARGET_NODE_PORT: PORT,
        Field.TARGET_NODE_DOMAIN_DETECTED: Bool(),
        Field.TARGET_NODE_DOMAIN_READY_TIMESTAMP: Timestamp(),
        Field.START_TIMESTAMP: Timestamp(),
        Field.END_TIMESTAMP: Timestamp(),
        Field.COMPLETED: Bool(),
        Field.FAILED: Bool(),
        Field.ABORT_REQUESTED: Bool(),
        Field.ABORT_STATUS: Str(enum=AbortStatus),
        Field.FAILURE_REASON: Str(),
        Field.MIGRATION_ID: Str(),
        Field.PEER_CLUSTER: Str(),
        Field.ROLE: Str(enum=Role),
        Field.MODE: Str(enum=MigrationMode),
        Field.MIGRATION_POLICY_NAME: Str(),
        Field.MIGRATION_CONFIGURATION: MIGRATION_CONFIGURATION,
        Field.SWITCHOVER: Str(enum=Switchover),
        Field.TRANSFER: MIGRATION_TRANSFER,
    }
)


# -- VirtualMachineInstance spec (also the VirtualMachine template) -----------------------


def _quiet_quantity(value: object) -> int | None:
    """Parse a quantity that was already checked; None if absent or invalid."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    try:
        return parse_quantity(value)
    except ValueError:
        return None


def _rule_vmi_memory(spec: dict[str, Any], path: str, errors: Errors) -> None:
    guest = nested(spec, "domain", "memory", "guest")
    requested = nested(spec, "domain", "resources", "requests", "memory")
    if guest is None and requested is None:
        errors.add(
            field_path(path, "domain.memory.guest"),
            f"required (or set {field_path(path, 'domain.resources.requests.memory')})",
        )
    for section in ("requests", "limits"):
        value = nested(spec, "domain", "resources", section, "memory")
        amount = _quiet_quantity(value)
        if amount is not None and amount > limits.MAX_MEMORY_BYTES:
            errors.add(
                field_path(path, f"domain.resources.{section}.memory"),
                quantity_max_message(limits.MAX_MEMORY_BYTES, value),
            )


def _rule_vmi_one_driver(spec: dict[str, Any], path: str, errors: Errors) -> None:
    if spec.get("memvm") is not None and spec.get("qemu") is not None:
        errors.add(path, "memvm and qemu are mutually exclusive: set one driver section")


def _rule_memvm_fits_guest(spec: dict[str, Any], path: str, errors: Errors) -> None:
    workload = nested(spec, "memvm", "workload")
    if not isinstance(workload, Mapping):
        return
    guest_value = nested(spec, "domain", "memory", "guest")
    if guest_value is None:
        guest_value = nested(spec, "domain", "resources", "requests", "memory")
    guest = _quiet_quantity(guest_value)
    if guest is None:
        return
    for name in ("hotSet", "touched"):
        amount = _quiet_quantity(workload.get(name))
        if amount is not None and amount > guest:
            errors.add(
                field_path(path, f"memvm.workload.{name}"),
                f"{show(workload[name])} is more than the guest memory ({show(guest_value)})",
            )


VMI_SPEC = Obj(
    {
        "domain": Obj(
            {
                "cpu": Obj(
                    {
                        "cores": Int(min=1, max=limits.MAX_CPUS),
                        "sockets": Int(min=1, max=limits.MAX_CPUS),
                        "threads": Int(min=1, max=limits.MAX_CPUS),
                        "model": Str(nonempty=True),
                    }
                ),
                "memory": Obj({"guest": Quantity(positive=True, max=limits.MAX_MEMORY_BYTES)}),
                "resources": Obj({"requests": Map(Quantity()), "limits": Map(Quantity())}),
                "devices": DEVICES,
                "machine": Obj({"type": Str()}),
                "firmware": AnyObject(),
            }
        ),
        "evictionStrategy": Str(enum=("LiveMigrate", "LiveMigrateIfPossible", "None", "External")),
        "nodeSelector": Labels(),
        "terminationGracePeriodSeconds": Int(min=0),
        "affinity": Anything(),
        "tolerations": List(Anything()),
        "networks": List(Anything()),
        "volumes": List(VOLUME),
        "hostname": Str(),
        "subdomain": Str(),
        # The built-in memory-only driver: a synthetic guest whose workload dirties memory.
        "memvm": Obj(
            {
                "workload": Obj(
                    {
                        "dirtyRate": Quantity(),  # bytes/s
                        "hotSet": Quantity(),
                        "content": Str(enum=("random", "text", "zero", "mixed")),
                        "touched": Quantity(),
                        "tickIntervalMilliseconds": Int(min=1),
                    }
                )
            }
        ),
        "qemu": Obj(
            {
                "kernel": Str(),
                "initrd": Str(),
                "cmdline": Str(),
                "accelerator": Str(enum=("kvm", "tcg")),
                "vcpus": Int(min=1, max=limits.MAX_CPUS),
                "verify": Str(enum=("off", "detect", "repair")),
                "extraArgs": List(Str()),
            }
        ),
    },
    rules=(_rule_vmi_memory, _rule_vmi_one_driver, _rule_memvm_fits_guest, rule_vmi_volumes),
)

# KubeVirt's StorageMigratedVolumeInfo (a storage live migration's volume change).
_PVC_INFO = Obj({"claimName": Str(nonempty=True)}, required=("claimName",))
MIGRATED_VOLUME = Obj(
    {
        "volumeName": Str(nonempty=True),
        "sourcePVCInfo": _PVC_INFO,
        "destinationPVCInfo": _PVC_INFO,
    }
)

VMI_STATUS = Obj(
    {
        "phase": Str(enum=VMIPhase),
        "nodeName": Str(),
        "reason": Str(),
        "conditions": CONDITIONS,
        "phaseTransitionTimestamps": PHASE_TRANSITION_TIMESTAMPS,
        "migrationMethod": Str(),
        "migrationState": MIGRATION_STATE,
        "launcher": Obj({"pid": Int(min=0), "vmId": Str(), "driver": Str()}),
        "guest": Obj({"ticks": Int(min=0), "resumeGapMilliseconds": Number()}),
        "migratedVolumes": List(MIGRATED_VOLUME),
    }
)


# -- VirtualMachine, the migration object, HyperConverged, MigrationPolicy ----------------


def _rule_vm_run_strategy(spec: dict[str, Any], path: str, errors: Errors) -> None:
    if spec.get("running") is not None and spec.get("runStrategy") is not None:
        errors.add(
            path,
            "running and runStrategy are mutually exclusive: "
            "set only runStrategy (running is deprecated)",
        )


# WaitAsReceiver: the receiving copy of a VM in a decentralized (cross-cluster) migration;
# its VMI waits (phase WaitingForSync) and, once the migration resumed its guest, the VM
# controller restores the strategy named by RESTORE_RUN_STRATEGY_ANNOTATION.
RUN_STRATEGIES = (
    "Always",
    "Halted",
    "Manual",
    "RerunOnFailure",
    "Once",
    RUN_STRATEGY_WAIT_AS_RECEIVER,
)
# What a receiving VM may be restored to (its annotation's value): any other strategy.
RESTORABLE_RUN_STRATEGIES = tuple(s for s in RUN_STRATEGIES if s != RUN_STRATEGY_WAIT_AS_RECEIVER)


VM_SPEC = Obj(
    {
        "runStrategy": Str(enum=RUN_STRATEGIES),
        # KubeVirt's: how a change of the template's volumes applies to the running VM
        # (Migration: storage live migration, controller/volume_migration.py).
        "updateVolumesStrategy": Str(enum=("Replacement", "Migration")),
        "running": Bool(),
        "template": Obj(
            {
                "metadata": Obj(
                    {
                        "labels": Labels(),
                        "annotations": Annotations(),
                        # `get -o yaml` of a real KubeVirt VM shows `creationTimestamp: null`.
                        "creationTimestamp": Timestamp(),
                    }
                ),
                "spec": VMI_SPEC,
            },
            required=("spec",),
        ),
    },
    required=("template",),
    rules=(_rule_vm_run_strategy,),
)


def rule_vm_restore_annotation(vm: dict[str, Any], path: str, errors: Errors) -> None:
    """A whole VM: ``kubevirt.io/restore-run-strategy``, when set, names a run strategy
    other than WaitAsReceiver (it is what the receiving VM becomes once its guest runs)."""
    annotations = nested(vm, "metadata", "annotations")
    if not isinstance(annotations, Mapping) or RESTORE_RUN_STRATEGY_ANNOTATION not in annotations:
        return
    value = annotations[RESTORE_RUN_STRATEGY_ANNOTATION]
    if value not in RESTORABLE_RUN_STRATEGIES:
        supported = ", ".join(f'"{s}"' for s in RESTORABLE_RUN_STRATEGIES)
        errors.add(
            f"metadata.annotations[{RESTORE_RUN_STRATEGY_ANNOTATION}]",
            f"invalid value {show(value)}: the run strategy the receiving VM is restored to "
            f"once migrated; supported values: {supported}",
        )


VM_STATUS = Obj(
    {
        "printableStatus": Str(),
        "ready": Bool(),
        "created": Bool(),
        "conditions": CONDITIONS,
        "volumeUpdateState": Obj(
            {"volumeMigrationState": Obj({"migratedVolumes": List(MIGRATED_VOLUME)})}
        ),
    }
)


def _rule_vmim_one_side(spec: dict[str, Any], path: str, errors: Errors) -> None:
    if spec.get("sendTo") is not None and spec.get("receive") is not None:
        errors.add(
            path,
            "sendTo and receive are mutually exclusive: "
            "a migration object is either the sending or the receiving side",
        )


VMIM_SPEC = Obj(
    {
        "vmiName": Str(nonempty=True),
        "addedNodeSelector": Labels(),
        "sendTo": Obj(
            {"migrationID": Str(nonempty=True), "connectURL": Str(nonempty=True)},
            required=("migrationID", "connectURL"),
        ),
        "receive": Obj({"migrationID": Str(nonempty=True)}, required=("migrationID",)),
    },
    required=("vmiName",),
    rules=(_rule_vmim_one_side,),
)

# "host:port" (IPv6 hosts in brackets): where a cluster's sync controllers listen.
SYNC_ADDRESS = Str(pattern=r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):[0-9]{1,5}")
SYNC_ADDRESSES = List(SYNC_ADDRESS)

VMIM_STATUS = Obj(
    {
        "phase": Str(enum=MigrationPhase),
        SYNC_ADDRESSES_FIELD: SYNC_ADDRESSES,
        "phaseTransitionTimestamps": PHASE_TRANSITION_TIMESTAMPS,
        "migrationState": MIGRATION_STATE,
        "conditions": CONDITIONS,
    }
)


def _rule_known_feature_gates(spec: dict[str, Any], path: str, errors: Errors) -> None:
    gates = spec.get("featureGates")
    if not isinstance(gates, Mapping):
        return
    known = ", ".join(FEATURE_GATES)
    for gate in gates:
        if isinstance(gate, str) and gate not in FEATURE_GATES:
            errors.add(
                field_path(path, f"featureGates.{limits.shorten(gate, 64)}"),
                f"unknown feature gate {show(gate)}; known gates: {known}",
            )


HYPERCONVERGED_SPEC = Obj(
    {
        "liveMigrationConfig": LIVE_MIGRATION_CONFIG,
        "featureGates": Map(Bool()),
    },
    rules=(_rule_known_feature_gates,),
)

# Open: the HyperConverged's status is extended by each component; these are checked.
HYPERCONVERGED_STATUS = Obj(
    {
        "conditions": CONDITIONS,
        SYNC_ADDRESSES_FIELD: SYNC_ADDRESSES,
    },
    open=True,
)

MIGRATION_POLICY_SPEC = Obj(
    {
        "selectors": Obj(
            {
                "namespaceSelector": Labels(),
                "virtualMachineInstanceSelector": Labels(),
            }
        ),
        ConfigKey.ALLOW_AUTO_CONVERGE: Bool(),
        ConfigKey.BANDWIDTH_PER_MIGRATION: Quantity(),
        ConfigKey.COMPLETION_TIMEOUT_PER_GIB: Int(min=1),
        ConfigKey.ALLOW_POST_COPY: Bool(),
    }
)
