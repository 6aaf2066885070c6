"""Schemas of the storage kinds (core/v1 PersistentVolumeClaim, storage.k8s.io/v1
StorageClass) and of a VMI's volumes and disks; the contract is :mod:`vmferry.volumes`."""

from __future__ import annotations

from typing import Any

from vmferry.objects.schema.core import CONDITIONS
from vmferry.objects.schema.dsl import (
    Bool,
    Errors,
    Int,
    List,
    Name,
    Obj,
    Quantity,
    Str,
    field_path,
    nested,
    show,
)
from vmferry.volumes import (
    IMAGE_FILE_KIND,
    PVC_KIND,
    VMFERRY_GROUP,
    AccessMode,
    ClaimPhase,
    Provisioner,
    VolumeMode,
)


def _rule_pvc_spec(spec: dict[str, Any], path: str, errors: Errors) -> None:
    modes = spec.get("accessModes")
    if not modes:
        errors.add(field_path(path, "accessModes"), "at least 1 access mode is required")
    if nested(spec, "resources", "requests", "storage") is None:
        errors.add(field_path(path, "resources.requests.storage"), "required field is missing")
    ds = spec.get("dataSource")
    if isinstance(ds, dict):
        kind = ds.get("kind")
        if kind == PVC_KIND and not ds.get("name"):
            errors.add(field_path(path, "dataSource.name"), "required: the claim to copy")
        elif kind == IMAGE_FILE_KIND:
            if ds.get("apiGroup") != VMFERRY_GROUP:
                errors.add(
                    field_path(path, "dataSource.apiGroup"),
                    f'must be "{VMFERRY_GROUP}" for kind {IMAGE_FILE_KIND}',
                )
            file = ds.get("path")
            if not isinstance(file, str) or not file.startswith("/"):
                errors.add(
                    field_path(path, "dataSource.path"),
                    f"an absolute image file path is required, got {show(file)}",
                )
        elif kind not in (PVC_KIND, IMAGE_FILE_KIND):
            errors.add(
                field_path(path, "dataSource.kind"),
                f"unsupported value {show(kind)}: supported values: "
                f'"{PVC_KIND}", "{IMAGE_FILE_KIND}"',
            )


PVC_SPEC = Obj(
    {
        "accessModes": List(Str(enum=AccessMode)),
        "storageClassName": Name(),
        "volumeMode": Str(enum=VolumeMode),
        "volumeName": Str(),
        "resources": Obj({"requests": Obj({"storage": Quantity(positive=True)})}),
        "dataSource": Obj(
            {"apiGroup": Str(), "kind": Str(nonempty=True), "name": Str(), "path": Str()},
            required=("kind",),
        ),
    },
    rules=(_rule_pvc_spec,),
)

PVC_STATUS = Obj(
    {
        "phase": Str(enum=ClaimPhase),
        "accessModes": List(Str(enum=AccessMode)),
        "capacity": Obj({"storage": Quantity()}),
        "conditions": CONDITIONS,
        # vmferry: where the image is (the PV's path) and, for a local class, its node
        "imagePath": Str(),
        "nodeName": Str(),
    }
)

STORAGE_CLASS_FIELDS = {
    "provisioner": Str(enum=Provisioner),
    "parameters": Obj({"path": Str(pattern=r"/.*"), "node": Str()}),
    "reclaimPolicy": Str(enum=("Delete", "Retain")),
    "volumeBindingMode": Str(enum=("Immediate", "WaitForFirstConsumer")),
    "allowVolumeExpansion": Bool(),
}


# -- a VMI's volumes and disks ----------------------------------------------------------------

VOLUME = Obj(
    {
        "name": Str(nonempty=True),
        "persistentVolumeClaim": Obj(
            {"claimName": Str(nonempty=True), "readOnly": Bool()}, required=("claimName",)
        ),
    },
    required=("name",),
    open=True,  # the other volume sources (containerDisk, cloudInitNoCloud, ...) pass unchecked
)

DISK = Obj(
    {
        "name": Str(nonempty=True),
        "disk": Obj({"bus": Str(enum=("virtio", "sata", "scsi"))}),
        "bootOrder": Int(min=1),
        "serial": Str(),
        "cache": Str(enum=("none", "writethrough", "writeback")),
    },
    required=("name",),
    open=True,
)

DEVICES = Obj({"disks": List(DISK)}, open=True)  # interfaces etc. pass unchecked


def rule_vmi_volumes(spec: dict[str, Any], path: str, errors: Errors) -> None:
    """Volume names are unique; every disk names a volume; a claim volume has a disk."""
    volumes = [v for v in spec.get("volumes") or [] if isinstance(v, dict)]
    names: set[object] = set()
    for i, v in enumerate(volumes):
        name = v.get("name")
        if name in names:
            errors.add(field_path(path, f"volumes[{i}].name"), f"duplicate volume {show(name)}")
        names.add(name)
    listed = nested(spec, "domain", "devices", "disks")
    disks = [d for d in listed if isinstance(d, dict)] if isinstance(listed, list) else []
    disk_names = {d.get("name") for d in disks}
    for i, d in enumerate(disks):
        if d.get("name") not in names:
            errors.add(
                field_path(path, f"domain.devices.disks[{i}].name"),
                f"disk {show(d.get('name'))} names no volume in spec.volumes",
            )
    for i, v in enumerate(volumes):
        if v.get("persistentVolumeClaim") is not None and v.get("name") not in disk_names:
            errors.add(
                field_path(path, f"volumes[{i}]"),
                f"volume {show(v.get('name'))} has no disk in spec.domain.devices.disks",
            )
