"""The migration contract: phases, the hand-off fields, who writes them, and the defaults.

Every component that reads or writes a migration's state (the controller's migration
reconciler, both handlers' engines, the CLI's progress and printers, the web console,
the metrics collectors) takes names and defaults from here; no phase name, decision or
configuration key is spelled as a string literal elsewhere.

``vmi.status.migrationState`` is one migration's shared record. Each field has exactly
one owner that writes it (``FIELD_OWNERS``); the controller mirrors the record, minus
nothing secret (the stream token lives in a Secret, see ``token_secret_name``), into the
VMIM's ``status.migrationState``.

The enums are ``StrEnum``: their members *are* the strings stored in objects, so a
member compares equal to the stored value and serializes as it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum, StrEnum
from typing import Any

from vmferry.decentralized import VMI_PHASE_WAITING_FOR_SYNC
from vmferry.objects.kinds import SYSTEM_NAMESPACE
from vmferry.objects.quantity import parse_quantity

Obj = dict[str, Any]


class MigrationPhase(StrEnum):
    """``VirtualMachineInstanceMigration.status.phase`` (KubeVirt's, in order)."""

    UNSET = ""
    PENDING = "Pending"
    SCHEDULING = "Scheduling"
    SCHEDULED = "Scheduled"
    PREPARING_TARGET = "PreparingTarget"
    TARGET_READY = "TargetReady"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    # decentralized (cross-cluster) migration: the receiving and the sending side
    WAITING_FOR_SYNC = "WaitingForSync"
    SYNCHRONIZING = "Synchronizing"

    @property
    def final(self) -> bool:
        return self in FINAL_PHASES

    @property
    def active(self) -> bool:
        """Holds a parallel-migration slot (admitted, not finished)."""
        return self in ACTIVE_PHASES

    @classmethod
    def of(cls, vmim: Mapping[str, Any]) -> MigrationPhase:
        """The phase of a VMIM object (UNSET when it has none or an unknown one)."""
        value = (vmim.get("status") or {}).get("phase") or ""
        try:
            return cls(value)
        except ValueError:
            return cls.UNSET


FINAL_PHASES = frozenset({MigrationPhase.SUCCEEDED, MigrationPhase.FAILED})
ACTIVE_PHASES = (
    MigrationPhase.SCHEDULING,
    MigrationPhase.SCHEDULED,
    MigrationPhase.PREPARING_TARGET,
    MigrationPhase.TARGET_READY,
    MigrationPhase.RUNNING,
)
# The phases a migration passes through after Scheduling, in order (a fast migration
# can finish between two controller passes; the skipped ones are recorded then).
PROGRESS_PHASES = (
    MigrationPhase.SCHEDULED,
    MigrationPhase.PREPARING_TARGET,
    MigrationPhase.TARGET_READY,
    MigrationPhase.RUNNING,
)


class VMIPhase(StrEnum):
    """``VirtualMachineInstance.status.phase``."""

    UNSET = ""
    PENDING = "Pending"
    SCHEDULING = "Scheduling"
    SCHEDULED = "Scheduled"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    UNKNOWN = "Unknown"
    # the receiving VMI of a decentralized migration (runStrategy WaitAsReceiver): created,
    # never scheduled, no guest, until its migration resumes the guest on a target
    WAITING_FOR_SYNC = VMI_PHASE_WAITING_FOR_SYNC


# A VMI in one of these has stopped for good (its VM, if any, makes a new one).
VMI_FINAL_PHASES = frozenset({VMIPhase.SUCCEEDED, VMIPhase.FAILED})


class Switchover(StrEnum):
    """The arbiter's decision (``migrationState.switchover``): written once, with the
    VMI's resourceVersion as a precondition, by whichever side decides first."""

    COMMITTED = "Committed"  # the target owns the VM
    ABORTED = "Aborted"  # the source keeps it


class MigrationMode(StrEnum):
    PRE_COPY = "PreCopy"
    POST_COPY = "PostCopy"


class AbortStatus(StrEnum):
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    ABORTING = "Aborting"


class Compression(StrEnum):
    ZSTD = "Zstd"  # page batches: zstd where it saves >= 10%, raw otherwise
    NONE = "None"


class Field(StrEnum):
    """The keys of ``vmi.status.migrationState`` (and of the VMIM's mirror)."""

    MIGRATION_UID = "migrationUid"
    SOURCE_NODE = "sourceNode"
    TARGET_NODE = "targetNode"
    MIGRATION_CONFIGURATION = "migrationConfiguration"
    MIGRATION_POLICY_NAME = "migrationPolicyName"
    ABORT_REQUESTED = "abortRequested"
    TARGET_NODE_DOMAIN_DETECTED = "targetNodeDomainDetected"
    TARGET_NODE_ADDRESS = "targetNodeAddress"
    TARGET_NODE_PORT = "targetNodePort"
    TARGET_NODE_DOMAIN_READY_TIMESTAMP = "targetNodeDomainReadyTimestamp"
    START_TIMESTAMP = "startTimestamp"
    END_TIMESTAMP = "endTimestamp"
    MODE = "mode"
    TRANSFER = "transfer"
    SWITCHOVER = "switchover"
    COMPLETED = "completed"
    FAILED = "failed"
    FAILURE_REASON = "failureReason"
    ABORT_STATUS = "abortStatus"
    # decentralized (cross-cluster) migrations only, see vmferry.decentralized
    MIGRATION_ID = "migrationID"
    PEER_CLUSTER = "peerCluster"
    ROLE = "role"


class Owner(Enum):
    CONTROLLER = "controller"
    SOURCE = "source handler"
    TARGET = "target handler"
    # decentralized migrations: the sync controller writes the hand-off of its cluster's
    # half, and mirrors there what the other cluster's owner wrote (vmferry.decentralized)
    SYNC = "sync controller"


# Who writes which field. ``completed``/``failed``/``failureReason``/``endTimestamp`` have
# two owners in time: the controller only until the source recorded ``startTimestamp``
# (a hand-off nobody started), the source from then on; after a pre-copy hand-off whose
# guest runs on the target (``targetNodeDomainReadyTimestamp`` set, ``nodeName`` = the
# target) the controller also records ``completed``/``endTimestamp`` when the source has
# not within ``HANDOFF_COMPLETION_GRACE`` (it died). ``switchover`` is written by the
# side that decides first (the source commits; either side may record Aborted).
_SYNC_MIRRORS = frozenset(
    {
        Field.MIGRATION_UID,
        Field.SOURCE_NODE,
        Field.TARGET_NODE,
        Field.MIGRATION_CONFIGURATION,
        Field.ABORT_REQUESTED,
        Field.TARGET_NODE_ADDRESS,
        Field.TARGET_NODE_PORT,
        Field.TARGET_NODE_DOMAIN_READY_TIMESTAMP,
        Field.SWITCHOVER,
        Field.COMPLETED,
        Field.FAILED,
        Field.FAILURE_REASON,
        Field.END_TIMESTAMP,
        Field.MIGRATION_ID,
        Field.PEER_CLUSTER,
        Field.ROLE,
    }
)

FIELD_OWNERS: dict[Field, frozenset[Owner]] = {
    Field.MIGRATION_UID: frozenset({Owner.CONTROLLER}),
    Field.SOURCE_NODE: frozenset({Owner.CONTROLLER}),
    Field.TARGET_NODE: frozenset({Owner.CONTROLLER}),
    Field.MIGRATION_CONFIGURATION: frozenset({Owner.CONTROLLER}),
    Field.MIGRATION_POLICY_NAME: frozenset({Owner.CONTROLLER}),
    Field.ABORT_REQUESTED: frozenset({Owner.CONTROLLER}),
    Field.TARGET_NODE_DOMAIN_DETECTED: frozenset({Owner.TARGET}),
    Field.TARGET_NODE_ADDRESS: frozenset({Owner.TARGET}),
    Field.TARGET_NODE_PORT: frozenset({Owner.TARGET}),
    Field.TARGET_NODE_DOMAIN_READY_TIMESTAMP: frozenset({Owner.TARGET}),
    Field.START_TIMESTAMP: frozenset({Owner.SOURCE}),
    Field.MODE: frozenset({Owner.SOURCE}),
    Field.TRANSFER: frozenset({Owner.SOURCE}),
    Field.SWITCHOVER: frozenset({Owner.SOURCE, Owner.TARGET}),
    Field.COMPLETED: frozenset({Owner.SOURCE, Owner.CONTROLLER}),
    # the target too, once, in post-copy when no source came back within the recovery window
    Field.FAILED: frozenset({Owner.SOURCE, Owner.CONTROLLER, Owner.TARGET}),
    Field.FAILURE_REASON: frozenset({Owner.SOURCE, Owner.CONTROLLER, Owner.TARGET}),
    Field.END_TIMESTAMP: frozenset({Owner.SOURCE, Owner.CONTROLLER, Owner.TARGET}),
    Field.ABORT_STATUS: frozenset({Owner.SOURCE, Owner.CONTROLLER}),
    Field.MIGRATION_ID: frozenset(),
    Field.PEER_CLUSTER: frozenset(),
    Field.ROLE: frozenset(),
}
for _field in _SYNC_MIRRORS:
    FIELD_OWNERS[_field] = FIELD_OWNERS[_field] | {Owner.SYNC}


@dataclass(frozen=True)
class MigrationState:
    """A typed, read-only view of one ``migrationState`` record.

    Writers build their changes with ``Field`` keys (``{Field.COMPLETED: True}``); readers
    take this view: ``MigrationState.of(vmi)``."""

    migration_uid: str = ""
    source_node: str = ""
    target_node: str = ""
    target_address: str = ""
    target_port: int = 0
    target_domain_detected: bool = False
    start_timestamp: str = ""
    end_timestamp: str = ""
    mode: MigrationMode | None = None
    switchover: Switchover | None = None
    completed: bool = False
    failed: bool = False
    failure_reason: str = ""
    abort_requested: bool = False
    abort_status: AbortStatus | None = None
    policy_name: str = ""
    config: MigrationConfig = dataclasses.field(default_factory=lambda: MigrationConfig())
    transfer: Obj = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, ms: Mapping[str, Any] | None) -> MigrationState:
        ms = ms or {}
        return cls(
            migration_uid=str(ms.get(Field.MIGRATION_UID) or ""),
            source_node=str(ms.get(Field.SOURCE_NODE) or ""),
            target_node=str(ms.get(Field.TARGET_NODE) or ""),
            target_address=str(ms.get(Field.TARGET_NODE_ADDRESS) or ""),
            target_port=int(ms.get(Field.TARGET_NODE_PORT) or 0),
            target_domain_detected=bool(ms.get(Field.TARGET_NODE_DOMAIN_DETECTED)),
            start_timestamp=str(ms.get(Field.START_TIMESTAMP) or ""),
            end_timestamp=str(ms.get(Field.END_TIMESTAMP) or ""),
            mode=MigrationMode(ms[Field.MODE]) if ms.get(Field.MODE) else None,
            switchover=Switchover(ms[Field.SWITCHOVER]) if ms.get(Field.SWITCHOVER) else None,
            completed=bool(ms.get(Field.COMPLETED)),
            failed=bool(ms.get(Field.FAILED)),
            failure_reason=str(ms.get(Field.FAILURE_REASON) or ""),
            abort_requested=bool(ms.get(Field.ABORT_REQUESTED)),
            abort_status=AbortStatus(ms[Field.ABORT_STATUS])
            if ms.get(Field.ABORT_STATUS)
            else None,
            policy_name=str(ms.get(Field.MIGRATION_POLICY_NAME) or ""),
            config=MigrationConfig.from_dict(ms.get(Field.MIGRATION_CONFIGURATION)),
            transfer=dict(ms.get(Field.TRANSFER) or {}),
        )

    @classmethod
    def of(cls, obj: Mapping[str, Any]) -> MigrationState:
        """The migration state of a VMI (or VMIM) object."""
        return cls.from_dict(raw(obj))

    @property
    def ended(self) -> bool:
        return self.completed or self.failed

    @property
    def active(self) -> bool:
        """A hand-off exists and the migration has not ended."""
        return bool(self.migration_uid) and not self.ended

    @property
    def target_endpoint(self) -> str:
        return f"{self.target_address}:{self.target_port}"


def raw(obj: Mapping[str, Any]) -> Obj:
    """The ``status.migrationState`` dict of an object ({} when there is none)."""
    return (obj.get("status") or {}).get("migrationState") or {}


# -- the migration configuration --------------------------------------------------------


@dataclass(frozen=True)
class MigrationConfig:
    """The effective migration configuration of one migration (HyperConverged
    ``spec.liveMigrationConfig`` overlaid by the winning MigrationPolicy, resolved by the
    scheduler into ``migrationState.migrationConfiguration``). The defaults here are the
    only ones: the schema's defaulting and both engines read them from this class."""

    bandwidth_per_migration: str | int = "0"  # bytes/s as a quantity; 0 = unlimited
    completion_timeout_per_gib: int = 150  # s per GiB of guest memory
    progress_timeout: int = 150  # s without progress before the migration is cancelled
    allow_auto_converge: bool = False
    allow_post_copy: bool = False
    downtime_budget_ms: int = 300
    parallel_streams: int = 2
    unschedulable_timeout_s: int = 300  # s a pending target may stay unschedulable
    # s a post-copy migration waits for a broken migration network to come back
    post_copy_recovery_window_s: int = 600
    compression: Compression = Compression.ZSTD
    network: str = ""  # a NetworkAttachmentDefinition's name; "" = the main network

    @classmethod
    def from_dict(cls, config: Mapping[str, Any] | None) -> MigrationConfig:
        """From a stored configuration; a missing or null key takes its default."""
        config = config or {}
        values: dict[str, Any] = {}
        for key, attr in _CONFIG_KEYS.items():
            value = config.get(key)
            if value is not None and value != "":
                values[attr] = value
        if "compression" in values:
            values["compression"] = Compression(values["compression"])
        return cls(**values)

    @property
    def bandwidth_bytes(self) -> int:
        """bandwidthPerMigration in bytes/s (0 = unlimited)."""
        return parse_quantity(self.bandwidth_per_migration or 0)

    def as_dict(self) -> Obj:
        """The stored form (``network`` only when set)."""
        out: Obj = {}
        for key, attr in _CONFIG_KEYS.items():
            value = getattr(self, attr)
            if key == ConfigKey.NETWORK and not value:
                continue
            out[key] = str(value) if isinstance(value, Compression) else value
        return out


class ConfigKey(StrEnum):
    """The keys of a migration configuration (and of ``liveMigrationConfig``)."""

    BANDWIDTH_PER_MIGRATION = "bandwidthPerMigration"
    COMPLETION_TIMEOUT_PER_GIB = "completionTimeoutPerGiB"
    PROGRESS_TIMEOUT = "progressTimeout"
    ALLOW_AUTO_CONVERGE = "allowAutoConverge"
    ALLOW_POST_COPY = "allowPostCopy"
    DOWNTIME_BUDGET_MS = "downtimeBudgetMilliseconds"
    PARALLEL_STREAMS = "parallelStreams"
    UNSCHEDULABLE_TIMEOUT_S = "unschedulableTimeoutSeconds"
    POST_COPY_RECOVERY_WINDOW_S = "postCopyRecoveryWindowSeconds"
    COMPRESSION = "compression"
    NETWORK = "network"
    # cluster-wide only (liveMigrationConfig), not per migration
    PARALLEL_MIGRATIONS_PER_CLUSTER = "parallelMigrationsPerCluster"
    PARALLEL_OUTBOUND_MIGRATIONS_PER_NODE = "parallelOutboundMigrationsPerNode"


_CONFIG_KEYS: dict[str, str] = {
    ConfigKey.BANDWIDTH_PER_MIGRATION: "bandwidth_per_migration",
    ConfigKey.COMPLETION_TIMEOUT_PER_GIB: "completion_timeout_per_gib",
    ConfigKey.PROGRESS_TIMEOUT: "progress_timeout",
    ConfigKey.ALLOW_AUTO_CONVERGE: "allow_auto_converge",
    ConfigKey.ALLOW_POST_COPY: "allow_post_copy",
    ConfigKey.DOWNTIME_BUDGET_MS: "downtime_budget_ms",
    ConfigKey.PARALLEL_STREAMS: "parallel_streams",
    ConfigKey.UNSCHEDULABLE_TIMEOUT_S: "unschedulable_timeout_s",
    ConfigKey.POST_COPY_RECOVERY_WINDOW_S: "post_copy_recovery_window_s",
    ConfigKey.COMPRESSION: "compression",
    ConfigKey.NETWORK: "network",
}

PARALLEL_MIGRATIONS_PER_CLUSTER = 5
PARALLEL_OUTBOUND_MIGRATIONS_PER_NODE = 2

LIVE_MIGRATION_DEFAULTS: dict[str, Any] = {
    **MigrationConfig().as_dict(),
    ConfigKey.PARALLEL_MIGRATIONS_PER_CLUSTER: PARALLEL_MIGRATIONS_PER_CLUSTER,
    ConfigKey.PARALLEL_OUTBOUND_MIGRATIONS_PER_NODE: PARALLEL_OUTBOUND_MIGRATIONS_PER_NODE,
}
"""HyperConverged ``spec.liveMigrationConfig`` defaults (``network`` stays unset)."""


# -- the per-migration stream token -------------------------------------------------------

TOKEN_SECRET_NAMESPACE = SYSTEM_NAMESPACE
TOKEN_SECRET_KEY = "token"
TOKEN_SECRET_PREFIX = "vmferry-migration-"
# Labels on the token Secret: the node authorizer lets exactly these two nodes read it.
TOKEN_SOURCE_NODE_LABEL = "migration.vmferry.io/source-node"
TOKEN_TARGET_NODE_LABEL = "migration.vmferry.io/target-node"
TOKEN_MIGRATION_LABEL = "migration.vmferry.io/uid"


def token_secret_name(migration_uid: str) -> str:
    """The Secret (in TOKEN_SECRET_NAMESPACE) holding one migration's stream token, under
    ``data[TOKEN_SECRET_KEY]`` (base64, as every Secret's data). Readable by cluster
    admins and by the migration's two nodes only; never copied into a status."""
    return f"{TOKEN_SECRET_PREFIX}{migration_uid}"
