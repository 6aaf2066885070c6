"""The VM disk contract: PersistentVolumeClaims, StorageClasses and the RWX rule.

Two provisioners fit hosts without Kubernetes (:class:`Provisioner`):

- ``vmferry.io/shared``: ``parameters.path`` is a directory every node (and the
  controller) mounts at the same path — NFS or a cluster file system in production, one
  directory in the lab. ReadWriteMany is allowed; the controller creates the images.
- ``vmferry.io/local``: ``parameters.path`` is a directory on one node; ReadWriteOnce
  only. The node is the PVC's ``volume.kubernetes.io/selected-node`` annotation, else the
  class's ``parameters.node``; the controller binds the claim to it (``status.nodeName``)
  and that node's handler creates the image when a guest first attaches it.

A bound claim's image is ``<path>/<namespace>/pvc-<uid>.img`` (``status.imagePath``):
a raw, sparse file of ``resources.requests.storage`` bytes, blank or copied from
``spec.dataSource`` (another claim, or an image file on the provisioning host).

The RWX rule (KubeVirt's): a VMI with a volume whose claim is not ReadWriteMany has
``LiveMigratable=False``, reason ``DisksNotLiveMigratable``, and its migration is
refused with the same message (:func:`migration_blocker`).
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass
from enum import StrEnum
from pathlib import PurePosixPath
from typing import Any

from vmferry.objects.quantity import parse_quantity

Obj = dict[str, Any]

PVC_KIND = "PersistentVolumeClaim"
STORAGE_CLASS_KIND = "StorageClass"
SELECTED_NODE_ANNOTATION = "volume.kubernetes.io/selected-node"
DEFAULT_CLASS_ANNOTATION = "storageclass.kubernetes.io/is-default-class"
IMAGE_FILE_KIND = "ImageFile"  # spec.dataSource.kind of a copy from a file (vmferry.io group)
VMFERRY_GROUP = "vmferry.io"

LIVE_MIGRATABLE = "LiveMigratable"
REASON_MIGRATABLE = "Migratable"
REASON_DISKS_NOT_LIVE_MIGRATABLE = "DisksNotLiveMigratable"
# The VMI condition while a claim volume is missing, unbound or not reachable on its node.
VOLUMES_READY = "VolumesReady"
# The PVC condition of a claim that cannot be provisioned (its message says why).
CONDITION_PROVISIONING = "Provisioning"


class AccessMode(StrEnum):
    RWO = "ReadWriteOnce"
    RWX = "ReadWriteMany"


class VolumeMode(StrEnum):
    FILESYSTEM = "Filesystem"
    BLOCK = "Block"


class Provisioner(StrEnum):
    SHARED = "vmferry.io/shared"
    LOCAL = "vmferry.io/local"


class ClaimPhase(StrEnum):
    PENDING = "Pending"
    BOUND = "Bound"
    LOST = "Lost"


@dataclass(frozen=True)
class StorageClass:
    name: str
    provisioner: Provisioner
    path: str
    node: str = ""  # local classes: the default node

    @classmethod
    def of(cls, obj: Obj) -> StorageClass:
        params = obj.get("parameters") or {}
        return cls(
            name=obj["metadata"]["name"],
            provisioner=Provisioner(obj["provisioner"]),
            path=str(params.get("path") or ""),
            node=str(params.get("node") or ""),
        )


@dataclass(frozen=True)
class DataSource:
    """What a new image is filled from: another claim (same namespace) or a file."""

    claim: str = ""
    file: str = ""


@dataclass(frozen=True)
class Claim:
    """The parts of a PersistentVolumeClaim that provisioning and the RWX rule read."""

    namespace: str
    name: str
    uid: str
    access_modes: tuple[AccessMode, ...]
    storage_class: str
    size_bytes: int
    volume_mode: VolumeMode
    source: DataSource
    selected_node: str
    phase: ClaimPhase
    image_path: str
    node_name: str

    @property
    def shared(self) -> bool:
        return AccessMode.RWX in self.access_modes

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def of(cls, obj: Obj) -> Claim:
        meta = obj["metadata"]
        spec = obj.get("spec") or {}
        status = obj.get("status") or {}
        ds = spec.get("dataSource") or {}
        if ds.get("kind") == PVC_KIND:
            source = DataSource(claim=str(ds.get("name") or ""))
        elif ds.get("kind") == IMAGE_FILE_KIND:
            source = DataSource(file=str(ds.get("path") or ""))
        else:
            source = DataSource()
        requested = ((spec.get("resources") or {}).get("requests") or {}).get("storage", 0)
        return cls(
            namespace=meta.get("namespace") or "",
            name=meta["name"],
            uid=meta.get("uid") or "",
            access_modes=tuple(AccessMode(m) for m in spec.get("accessModes") or ()),
            storage_class=str(spec.get("storageClassName") or ""),
            size_bytes=parse_quantity(requested),
            volume_mode=VolumeMode(spec.get("volumeMode") or VolumeMode.FILESYSTEM),
            source=source,
            selected_node=str((meta.get("annotations") or {}).get(SELECTED_NODE_ANNOTATION) or ""),
            phase=ClaimPhase(status.get("phase") or ClaimPhase.PENDING),
            image_path=str(status.get("imagePath") or ""),
            node_name=str(status.get("nodeName") or ""),
        )


def image_path(sc: StorageClass, claim: Claim) -> str:
    """Where a bound claim's image lives (one file per claim, by uid)."""
    return str(PurePosixPath(sc.path) / claim.namespace / f"pvc-{claim.uid}.img")


def class_problem(sc: StorageClass, claim: Claim) -> str | None:
    """Why ``claim`` cannot be provisioned by ``sc``, or None."""
    if not sc.path:
        return f'StorageClass "{sc.name}": parameters.path is required (the image directory)'
    if sc.provisioner == Provisioner.LOCAL:
        if claim.shared:
            return (
                f'StorageClass "{sc.name}" ({Provisioner.LOCAL}) is on one node: '
                f"{AccessMode.RWX} is not supported, use {AccessMode.RWO} "
                f"or a {Provisioner.SHARED} class"
            )
        if not (claim.selected_node or sc.node):
            return (
                f'StorageClass "{sc.name}" ({Provisioner.LOCAL}): no node for the claim: '
                f"set the annotation {SELECTED_NODE_ANNOTATION} on the claim "
                "or parameters.node on the class"
            )
    return None


# -- a VMI's volumes ------------------------------------------------------------------------


@dataclass(frozen=True)
class VolumeRef:
    """One ``spec.volumes[]`` entry backed by a claim, and its disk (``bus``)."""

    name: str
    claim: str
    bus: str


def claim_volumes(vmi_spec: Mapping[str, Any]) -> list[VolumeRef]:
    """The VMI's ``persistentVolumeClaim`` volumes, in ``spec.volumes`` order."""
    disks = {
        d.get("name"): d
        for d in (vmi_spec.get("domain") or {}).get("devices", {}).get("disks") or []
        if isinstance(d, Mapping)
    }
    out = []
    for v in vmi_spec.get("volumes") or []:
        pvc = v.get("persistentVolumeClaim") if isinstance(v, Mapping) else None
        if not isinstance(pvc, Mapping):
            continue
        disk = disks.get(v.get("name")) or {}
        bus = str((disk.get("disk") or {}).get("bus") or "virtio")
        out.append(VolumeRef(str(v.get("name")), str(pvc.get("claimName")), bus))
    return out


def not_shared_message(claim: str) -> str:
    return (
        f"cannot migrate VMI: PVC {claim} is not shared, live migration requires that all "
        "PVCs must be shared (using ReadWriteMany access mode)"
    )


def unknown_share_message(claim: str) -> str:
    return (
        f"cannot migrate VMI: Unable to determine if PVC {claim} is shared, live migration "
        "requires that all PVCs must be shared (using ReadWriteMany access mode)"
    )


def migration_blocker(
    vmi_spec: Mapping[str, Any],
    claims: Mapping[str, Obj],
    exempt: Set[str] = frozenset(),
) -> str | None:
    """KubeVirt's RWX rule: the message of the first volume whose claim is not shared
    (``claims``: the namespace's PVC objects by name), None when every one is.
    ``exempt``: claims a storage migration copies (their disk moves with the guest)."""
    for ref in claim_volumes(vmi_spec):
        if ref.claim in exempt:
            continue
        obj = claims.get(ref.claim)
        if obj is None:
            return unknown_share_message(ref.claim)
        if not Claim.of(obj).shared:
            return not_shared_message(ref.claim)
    return None


def live_migratable(
    vmi_spec: Mapping[str, Any], claims: Mapping[str, Obj]
) -> tuple[bool, str, str]:
    """The ``LiveMigratable`` condition (status, reason, message) a VMI's volumes give."""
    blocker = migration_blocker(vmi_spec, claims)
    if blocker is not None:
        return False, REASON_DISKS_NOT_LIVE_MIGRATABLE, blocker
    refs = claim_volumes(vmi_spec)
    if refs:
        names = ", ".join(r.claim for r in refs)
        return True, REASON_MIGRATABLE, f"every volume is shared (ReadWriteMany): {names}"
    return True, REASON_MIGRATABLE, "no persistent volumes: memory and device state migrate"


def attach_problem(ref: VolumeRef, obj: Obj | None, node: str | None = None) -> str | None:
    """Why the volume cannot be attached to a guest (on ``node``, when given) now, or None."""
    if obj is None:
        return f'volume "{ref.name}": PersistentVolumeClaim "{ref.claim}" does not exist'
    claim = Claim.of(obj)
    if claim.phase != ClaimPhase.BOUND or not claim.image_path:
        return (
            f'volume "{ref.name}": PersistentVolumeClaim "{ref.claim}" is not bound '
            f"(phase {claim.phase})"
        )
    if node is not None and claim.node_name and claim.node_name != node:
        return (
            f'volume "{ref.name}": PersistentVolumeClaim "{ref.claim}" is local to node '
            f"{claim.node_name}, not {node}"
        )
    return None


def required_node(vmi_spec: Mapping[str, Any], claims: Mapping[str, Obj]) -> str | None:
    """The node a VMI must run on because of a local volume, or None."""
    for ref in claim_volumes(vmi_spec):
        obj = claims.get(ref.claim)
        if obj is not None:
            node = Claim.of(obj).node_name
            if node:
                return node
    return None
