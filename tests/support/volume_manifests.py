"""Manifests of VM disks for unit tests: claims, storage classes and VMIs that use
them (tests/unit/test_volumes.py, test_storage_controller.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vmferry.objects import kinds

Obj = dict[str, Any]
NS = "default"


def pvc(name: str, mode: str = "ReadWriteMany", sc: str = "shared", **spec: Any) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "accessModes": [mode],
            "storageClassName": sc,
            "resources": {"requests": {"storage": "1Gi"}},
            **spec,
        },
    }


def storage_class(name: str, provisioner: str, path: Path, **params: str) -> Obj:
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": name},
        "provisioner": provisioner,
        "parameters": {"path": str(path), **params},
    }


def vmi_spec(*claims: str) -> Obj:
    return {
        "domain": {
            "memory": {"guest": "64Mi"},
            "devices": {
                "disks": [{"name": f"v{i}", "disk": {"bus": "virtio"}} for i in range(len(claims))]
            },
        },
        "volumes": [
            {"name": f"v{i}", "persistentVolumeClaim": {"claimName": c}}
            for i, c in enumerate(claims)
        ],
    }


def vmi(name: str, *claims: str) -> Obj:
    return {
        "apiVersion": kinds.KUBEVIRT,
        "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "namespace": NS},
        "spec": vmi_spec(*claims),
    }
