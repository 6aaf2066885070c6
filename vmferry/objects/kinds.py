"""The kinds the API serves: names, groups, scope, short names.

One place for every kind-level fact; the store, the schema, the CLI and the printers
look kinds up here. ``resolve("vmim")`` accepts every spelling ``oc`` accepts: the kind,
its plural, its singular and its short names, case-insensitively, optionally qualified
with the group (``virtualmachineinstancemigrations.kubevirt.io``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from vmferry.errors import BadRequest


@dataclass(frozen=True)
class Kind:
    kind: str
    api_version: str  # "v1" or "group/version"
    plural: str
    namespaced: bool
    short_names: tuple[str, ...] = field(default_factory=tuple)

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def resource(self) -> str:
        """``plural.group`` (``virtualmachines.kubevirt.io``), or the plural for core kinds."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


KUBEVIRT = "kubevirt.io/v1"
RBAC = "rbac.authorization.k8s.io/v1"
# Multus' kind (reference 12.5.2). vmferry.migration_network names it too (NAD_KIND,
# NAD_API_VERSION; it imports this module, so it cannot be imported here); a unit test
# keeps the two equal.
CNI = "k8s.cni.cncf.io/v1"
COORDINATION = "coordination.k8s.io/v1"
CERTIFICATES = "certificates.k8s.io/v1"
STORAGE = "storage.k8s.io/v1"
# The Migration Toolkit for Virtualization's kinds (reference 12.4.2 and 12.6):
# the orchestrator of cross-cluster live migrations (controller/forklift/).
FORKLIFT = "forklift.konveyor.io/v1beta1"

KINDS: tuple[Kind, ...] = (
    Kind("Namespace", "v1", "namespaces", False, ("ns",)),
    Kind("Node", "v1", "nodes", False, ("no",)),
    Kind("VirtualMachine", KUBEVIRT, "virtualmachines", True, ("vm", "vms")),
    Kind("VirtualMachineInstance", KUBEVIRT, "virtualmachineinstances", True, ("vmi", "vmis")),
    Kind(
        "VirtualMachineInstanceMigration",
        KUBEVIRT,
        "virtualmachineinstancemigrations",
        True,
        ("vmim", "vmims"),
    ),
    Kind("HyperConverged", "hco.kubevirt.io/v1beta1", "hyperconvergeds", True, ("hco",)),
    Kind("MigrationPolicy", "migrations.kubevirt.io/v1alpha1", "migrationpolicies", False),
    Kind(
        "NetworkAttachmentDefinition",
        CNI,
        "network-attachment-definitions",
        True,
        ("net-attach-def",),
    ),
    Kind("ForkliftController", FORKLIFT, "forkliftcontrollers", True),
    Kind("Provider", FORKLIFT, "providers", True),
    Kind("Plan", FORKLIFT, "plans", True),
    Kind("Migration", FORKLIFT, "migrations", True),
    Kind("ServiceAccount", "v1", "serviceaccounts", True, ("sa",)),
    Kind("Secret", "v1", "secrets", True),
    Kind("ConfigMap", "v1", "configmaps", True, ("cm",)),
    Kind("ClusterRole", RBAC, "clusterroles", False),
    Kind("ClusterRoleBinding", RBAC, "clusterrolebindings", False),
    Kind("Role", RBAC, "roles", True),
    Kind("RoleBinding", RBAC, "rolebindings", True),
    # A daemon's heartbeat (a sync controller's, vmferry.decentralized.SYNC_LEASE_PREFIX).
    Kind("Lease", COORDINATION, "leases", True),
    # What happened to an object, for `describe` (vmferry.events records them).
    Kind("Event", "v1", "events", True, ("ev",)),
    # A node's request for its certificate (vmferry join; controller/csr_signer.py).
    Kind("CertificateSigningRequest", CERTIFICATES, "certificatesigningrequests", False, ("csr",)),
    # VM disks (vmferry.volumes): claims and the classes that provision them.
    Kind("PersistentVolumeClaim", "v1", "persistentvolumeclaims", True, ("pvc",)),
    Kind("StorageClass", STORAGE, "storageclasses", False, ("sc",)),
    # Read-only views of the running daemons (controller/pods.py); never stored.
    Kind("Pod", "v1", "pods", True, ("po",)),
)

BY_KIND: dict[str, Kind] = {k.kind: k for k in KINDS}


def _spellings(k: Kind) -> set[str]:
    names = {k.kind.lower(), k.plural, k.singular, *k.short_names}
    if k.group:
        names |= {f"{n}.{k.group}" for n in (k.plural, k.singular)}
    return names


_BY_SPELLING: dict[str, Kind] = {s: k for k in KINDS for s in _spellings(k)}


def resolve(name: str) -> Kind:
    """Return the Kind for any accepted spelling; raise BadRequest naming the input."""
    try:
        return _BY_SPELLING[name.lower()]
    except KeyError:
        raise BadRequest(f'the server doesn\'t have a resource type "{name}"') from None


def by_kind(kind: str) -> Kind:
    """Look up by the exact ``kind`` field of a manifest; raise BadRequest if unknown."""
    try:
        return BY_KIND[kind]
    except KeyError:
        known = ", ".join(sorted(BY_KIND))
        raise BadRequest(f'no kind "{kind}" is registered (known kinds: {known})') from None


SYSTEM_NAMESPACE = "openshift-cnv"
HYPERCONVERGED_NAME = "kubevirt-hyperconverged"
MTV_NAMESPACE = "openshift-mtv"  # the ForkliftController singleton's namespace (12.4.2)
FORKLIFT_CONTROLLER_NAME = "forklift-controller"
# "true" on a VMI: its user paused it (`vmferry pause`); the handler running it keeps the
# guest paused and reports the condition Paused (handler/vm_pause.py).
PAUSE_ANNOTATION = "vmferry.io/paused"
