"""Cross-cluster ("decentralized") live migration (reference 12.4-12.6): the contract
between the API, the controllers, the sync controllers of both clusters and the handlers.

Two clusters, two stores, two CAs. The *sending* cluster has the running VM and a VMIM
with ``spec.sendTo{migrationID, connectURL}``; the *receiving* cluster a copy of the VM
with ``runStrategy: WaitAsReceiver`` (annotation ``kubevirt.io/restore-run-strategy``:
the source's strategy) whose VMI waits (phase ``WaitingForSync``), and a VMIM with
``spec.receive{migrationID}``. Each cluster's ``vmferry-sync-controller`` owns the
decentralized VMIMs of its cluster (the migration controller leaves them alone) and
relays a :class:`SyncState` per migration to the peer's sync controller over mTLS gRPC.

The one arbiter: the **sending** cluster's source VMI record (``migrationState.switchover``,
claimed with the usual :class:`handler.migration.handoff.HandoffRecord` compare-and-set by
the source handler, or by the sending cluster's controller/monitor when the source died).
The receiving side only *mirrors* the decision (its sync controller writes the relayed
switchover/completed/failed into the receiving VMI); its target handler never claims a
decision itself: a target that cannot learn the decision keeps the guest paused.

Identity: both sides use the **sending VMIM's uid** as ``migrationState.migrationUid``
(the stream's key and the token Secret's name, :func:`vmferry.migration_state.
token_secret_name`, in each cluster); ``migrationState.migrationID`` is the user's id and
``migrationState.peerCluster`` names the other cluster (a registered peer). Node names
are per cluster: a node is identified by (the CA that issued its certificate, its name).

Trust: each cluster registers its peers' CAs in the ConfigMap :data:`PEERS_CONFIGMAP`
(namespace ``openshift-cnv``; data key = peer cluster name, value = the peer's CA PEM,
what ``vmferry get cm kube-root-ca.crt -o jsonpath={.data.ca\\.crt}`` prints there). The
sync controllers accept only peers whose certificate chains to a registered CA; a target
handler accepts a cross-cluster stream only from the source node the sending cluster
named, with a certificate of *that* peer's CA, and that migration's token; a source
handler dials the target trusting only the peer's CA.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from typing import Any

from vmferry.objects.kinds import SYSTEM_NAMESPACE

Obj = dict[str, Any]

# -- feature gates (HyperConverged.spec.featureGates) ---------------------------------------

FEATURE_GATE = "decentralizedLiveMigration"
# Every gate the HyperConverged knows, with its default: the API fills them in, so the
# reference's JSON-patch ``replace /spec/featureGates/decentralizedLiveMigration`` works;
# an unknown gate is refused listing these.
FEATURE_GATES: dict[str, bool] = {
    "alignCPUs": False,
    "decentralizedLiveMigration": False,
    "deployKubeSecondaryDNS": False,
    "disableMDevConfiguration": False,
    "downwardMetrics": False,
    "enableMultiArchBootImageImport": False,
    "persistentReservation": False,
    "videoConfig": True,
}


def gate_enabled(hco: Mapping[str, Any], gate: str = FEATURE_GATE) -> bool:
    gates = (hco.get("spec") or {}).get("featureGates") or {}
    return bool(gates.get(gate, FEATURE_GATES.get(gate, False)))


def gate_off_message(gate: str = FEATURE_GATE) -> str:
    return (
        f"decentralized (cross-cluster) live migration needs the feature gate {gate}: "
        "vmferry patch hyperconverged kubevirt-hyperconverged -n openshift-cnv --type json "
        f'-p \'[{{"op":"replace","path":"/spec/featureGates/{gate}","value":true}}]\''
    )


# -- the receiving VM ---------------------------------------------------------------------

RUN_STRATEGY_WAIT_AS_RECEIVER = "WaitAsReceiver"
RESTORE_RUN_STRATEGY_ANNOTATION = "kubevirt.io/restore-run-strategy"
VMI_PHASE_WAITING_FOR_SYNC = "WaitingForSync"  # the receiving VMI until its guest resumes
# On the sending VM after a successful move: it is stopped (runStrategy Halted) and says
# where it went (``<cluster>/<namespace>/<name>``).
MIGRATED_TO_ANNOTATION = "vmferry.io/migrated-to"

# -- trust and addresses ------------------------------------------------------------------

PEERS_CONFIGMAP = "vmferry-peer-clusters"  # in SYSTEM_NAMESPACE: {peer name: CA PEM}
PEERS_NAMESPACE = SYSTEM_NAMESPACE
SYNC_IDENTITY = "system:vmferry:sync-controller"  # CN of a sync controller's certificate
# HyperConverged.status.synchronizationAddresses and the receiving VMIM's
# status.synchronizationAddresses: where this cluster's sync controllers listen
# ("host:port"; connectURL is one of them).
SYNC_ADDRESSES_FIELD = "synchronizationAddresses"
# A sync controller announces itself with a Lease (coordination.k8s.io/v1) in
# SYSTEM_NAMESPACE named virt-synchronization-controller-<id>, renewed every
# LEASE_RENEW_SECONDS, holderIdentity = its id; annotation SYNC_ADDRESS_ANNOTATION = its
# "host:port". Leases fresher than LEASE_SECONDS make the Pod-like rows of `get pod`.
SYNC_LEASE_PREFIX = "virt-synchronization-controller-"
SYNC_ADDRESS_ANNOTATION = "vmferry.io/sync-address"
LEASE_SECONDS = 15
LEASE_RENEW_SECONDS = 5


# migrationState keys of a decentralized migration: Field.MIGRATION_ID, Field.PEER_CLUSTER
# and Field.ROLE (a Role: which half this cluster holds), in vmferry.migration_state.


class Role(StrEnum):
    SENDER = "sender"
    RECEIVER = "receiver"


@dataclass(frozen=True)
class SyncState:
    """What one side of a decentralized migration tells the other (level-triggered: the
    whole half, on every change and periodically). Empty/zero = not known yet.

    Sender → receiver: the source's identity and progress and the decision.
    Receiver → sender: where the target listens and how the receiving side is doing."""

    migration_id: str
    role: Role  # of the side that sends this state
    migration_uid: str = ""  # the sending VMIM's uid (sender → receiver)
    namespace: str = ""
    vmi_name: str = ""
    phase: str = ""  # this side's VMIM phase
    # sender → receiver
    source_node: str = ""
    token: str = ""  # the per-migration stream token
    memory_bytes: int = 0
    switchover: str = ""  # the arbiter's decision ("" / Committed / Aborted)
    completed: bool = False
    # receiver → sender
    target_node: str = ""
    target_address: str = ""
    target_port: int = 0
    target_resumed: bool = False  # the guest runs on the target (targetNodeDomainReadyTimestamp)
    # both
    failed: bool = False
    failure_reason: str = ""
    cancelled: bool = False  # this side's VMIM was deleted: cancel both

    def as_dict(self) -> Obj:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SyncState:
        names = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in names}
        values["role"] = Role(values["role"])
        return cls(**values)
