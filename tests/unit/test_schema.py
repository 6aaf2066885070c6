"""Tests for vmferry.objects.schema: validation, normalization and defaulting of manifests."""

from __future__ import annotations

import copy
import datetime as dt
from typing import Any

import pytest
import yaml

from tests.unit.test_forklift_schema import FORKLIFT_VALID
from vmferry.errors import ApiError, BadRequest, Invalid
from vmferry.migration_network import MIGRATION_IP
from vmferry.migration_state import (
    LIVE_MIGRATION_DEFAULTS,
    AbortStatus,
    Compression,
    ConfigKey,
    Field,
    MigrationMode,
    MigrationPhase,
    Switchover,
    VMIPhase,
)
from vmferry.objects.kinds import KINDS
from vmferry.objects.schema import SCHEMAS, apply_defaults, memory_bytes, validate
from vmferry.objects.schema.dsl import Str
from vmferry.objects.schema.kubevirt import LIVE_MIGRATION_CONFIG, VMI_STATUS, VMIM_STATUS
from vmferry.objects.schema.kubevirt import MIGRATION_STATE as MIGRATION_STATE_SCHEMA

# --------------------------------------------------------------------------------------
# Valid examples of every kind
# --------------------------------------------------------------------------------------

MIGRATION_STATE: dict[str, Any] = {
    "migrationUid": "0b6c7d3e-1111-2222-3333-444455556666",
    "sourceNode": "node-a",
    "targetNode": "node-b",
    "targetNodeAddress": "10.10.0.2",
    "targetNodePort": 49152,
    "targetNodeDomainDetected": True,
    "targetNodeDomainReadyTimestamp": "2024-05-01T10:00:03Z",
    "startTimestamp": "2024-05-01T10:00:01Z",
    "endTimestamp": None,
    "completed": False,
    "failed": False,
    "abortRequested": False,
    "abortStatus": "Aborting",
    "failureReason": "",
    "mode": "PreCopy",
    "migrationPolicyName": "production",
    "migrationConfiguration": {
        "bandwidthPerMigration": "64Mi",
        "completionTimeoutPerGiB": 800,
        "progressTimeout": 150,
        "allowAutoConverge": False,
        "allowPostCopy": True,
        "downtimeBudgetMilliseconds": 300,
        "parallelStreams": 2,
        "network": "migration-network",
        "unschedulableTimeoutSeconds": 300,
    },
    "switchover": "Committed",
    "transfer": {
        "dataTotalBytes": 1073741824,
        "dataProcessedBytes": 536870912,
        "dataRemainingBytes": 536870912,
        "wireBytes": 400000000,
        "rounds": 3,
        "dirtyRateBytes": 1048576.5,
        "transferRateBytes": 104857600,
        "downtimeMilliseconds": 12.5,
        "guestDowntimeMilliseconds": 14,
        "digest": "sha256:abcd",
        "digestVerified": True,
        "throttlePercent": 20,
    },
}

CONDITIONS: list[dict[str, Any]] = [
    {
        "type": "Ready",
        "status": "True",
        "reason": "",
        "message": "",
        "lastProbeTime": None,
        "lastTransitionTime": "2024-05-01T10:00:00Z",
    },
    {"type": "LiveMigratable", "status": "True"},
]

VMI_SPEC: dict[str, Any] = {
    "domain": {
        "cpu": {"cores": 2, "sockets": 1, "threads": 1, "model": "host-model"},
        "memory": {"guest": "1Gi"},
        "resources": {"requests": {"memory": "1Gi", "cpu": "500m"}, "limits": {"memory": "2Gi"}},
        "devices": {"disks": [{"name": "root", "disk": {"bus": "virtio"}}]},
        "machine": {"type": "q35"},
        "firmware": {"bootloader": {"efi": {}}},
    },
    "evictionStrategy": "LiveMigrate",
    "nodeSelector": {"kubernetes.io/arch": "amd64"},
    "terminationGracePeriodSeconds": 0,
    "affinity": {"nodeAffinity": {}},
    "tolerations": [{"key": "k", "operator": "Exists"}],
    "networks": [{"name": "default", "pod": {}}],
    "volumes": [{"name": "root", "containerDisk": {"image": "fedora"}}],
    "hostname": "vm1",
    "subdomain": "vms",
    "memvm": {
        "workload": {
            "dirtyRate": "64Mi",
            "hotSet": "256Mi",
            "content": "mixed",
            "touched": "1Gi",
            "tickIntervalMilliseconds": 10,
        }
    },
}

VALID: dict[str, dict[str, Any]] = {
    "Namespace": {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "openshift-cnv", "labels": {"env": "prod"}},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    },
    "Node": {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": "node-a.example.com",
            "uid": "u-1",
            "resourceVersion": "42",
            "generation": 3,
            "labels": {"kubernetes.io/hostname": "node-a", "zone": ""},
            "annotations": {"vmferry.io/note": "anything at all: {}"},
            "creationTimestamp": "2024-05-01T10:00:00Z",
        },
        "spec": {
            "unschedulable": False,
            "taints": [{"key": "maintenance", "value": "true", "effect": "NoSchedule"}],
        },
        "status": {
            "capacity": {"memory": "64Gi", "cpu": 16},
            "allocatable": {"memory": "60Gi", "cpu": "15500m"},
            "addresses": [
                {"type": "InternalIP", "address": "192.168.1.10"},
                {"type": MIGRATION_IP, "address": "10.10.0.1"},
            ],
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "lastHeartbeatTime": "2024-05-01T10:00:00Z",
                }
            ],
            "nodeInfo": {
                "cpuModel": "Skylake-Server",
                "hostname": "node-a",
                "handlerVersion": "0.1.0",
                "kernelVersion": "6.8.0",
                "operatingSystem": "linux",
                "architecture": "amd64",
            },
            "migrationEndpoint": {"address": "10.10.0.1", "port": 49152},
            "daemonEndpoints": {"handlerEndpoint": {"address": "192.168.1.10", "port": 8186}},
            "allocatedMemory": "4Gi",
            "vmiCount": 2,
        },
    },
    "VirtualMachine": {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachine",
        "metadata": {"name": "vm1", "namespace": "default"},
        "spec": {
            "runStrategy": "Always",
            "template": {
                "metadata": {"labels": {"kubevirt.io/environment": "production"}},
                "spec": VMI_SPEC,
            },
        },
        "status": {
            "printableStatus": "Running",
            "ready": True,
            "created": True,
            "conditions": CONDITIONS,
        },
    },
    "VirtualMachineInstance": {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": {
            "name": "vm1",
            "namespace": "default",
            "finalizers": ["kubevirt.io/virtualMachineControllerFinalize"],
            "ownerReferences": [
                {
                    "apiVersion": "kubevirt.io/v1",
                    "kind": "VirtualMachine",
                    "name": "vm1",
                    "uid": "u-2",
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": VMI_SPEC,
        "status": {
            "phase": "Running",
            "nodeName": "node-a",
            "reason": "",
            "conditions": CONDITIONS,
            "phaseTransitionTimestamps": [
                {"phase": "Running", "phaseTransitionTimestamp": "2024-05-01T10:00:00Z"}
            ],
            "migrationMethod": "LiveMigration",
            "migrationState": MIGRATION_STATE,
            "launcher": {"pid": 1234, "vmId": "vm-7", "driver": "memvm"},
            "guest": {"ticks": 100, "resumeGapMilliseconds": 3.5},
        },
    },
    "VirtualMachineInstanceMigration": {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstanceMigration",
        "metadata": {"generateName": "kubevirt-migrate-vm-", "namespace": "default"},
        "spec": {
            "vmiName": "vm1",
            "addedNodeSelector": {"kubernetes.io/hostname": "node-b"},
            "sendTo": {"migrationID": "mig-1", "connectURL": "node-b.example:9185"},
        },
        "status": {
            "phase": "Running",
            "phaseTransitionTimestamps": [
                {"phase": "Pending", "phaseTransitionTimestamp": "2024-05-01T10:00:00Z"}
            ],
            "migrationState": MIGRATION_STATE,
            "conditions": [],
        },
    },
    "HyperConverged": {
        "apiVersion": "hco.kubevirt.io/v1beta1",
        "kind": "HyperConverged",
        "metadata": {"name": "kubevirt-hyperconverged", "namespace": "openshift-cnv"},
        "spec": {
            "liveMigrationConfig": {
                "bandwidthPerMigration": "64Mi",
                "completionTimeoutPerGiB": 800,
                "parallelMigrationsPerCluster": 5,
                "parallelOutboundMigrationsPerNode": 2,
                "progressTimeout": 150,
                "allowAutoConverge": True,
                "allowPostCopy": False,
                "network": "migration-network",
                "downtimeBudgetMilliseconds": 300,
                "parallelStreams": 16,
                "unschedulableTimeoutSeconds": 300,
            },
            "featureGates": {"decentralizedLiveMigration": True},
        },
        "status": {"anything": ["goes", 1]},
    },
    "MigrationPolicy": {
        "apiVersion": "migrations.kubevirt.io/v1alpha1",
        "kind": "MigrationPolicy",
        "metadata": {"name": "production"},
        "spec": {
            "selectors": {
                "namespaceSelector": {"hpc-workloads": "true"},
                "virtualMachineInstanceSelector": {"kubevirt.io/environment": "production"},
            },
            "allowAutoConverge": True,
            "bandwidthPerMigration": "1Gi",
            "completionTimeoutPerGiB": 800,
            "allowPostCopy": False,
        },
    },
    "NetworkAttachmentDefinition": {
        "apiVersion": "k8s.cni.cncf.io/v1",
        "kind": "NetworkAttachmentDefinition",
        "metadata": {"name": "migration-network", "namespace": "openshift-cnv"},
        "spec": {
            "config": '{"cniVersion": "0.3.1", "name": "migration-bridge", "type": "macvlan", '
            '"master": "eth1", "mode": "bridge", '
            '"ipam": {"type": "whereabouts", "range": "198.51.100.0/24"}}'
        },
    },
    "ServiceAccount": {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": "mtv", "namespace": "tools"},
    },
    "Secret": {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": "mtv-token",
            "namespace": "tools",
            "annotations": {"kubernetes.io/service-account.name": "mtv"},
        },
        "type": "kubernetes.io/service-account-token",
        "data": {"namespace": "dG9vbHM="},
    },
    "ConfigMap": {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "kube-root-ca.crt", "namespace": "tools"},
        "data": {"ca.crt": "-----BEGIN CERTIFICATE-----"},
    },
    "Event": {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": "vm1.18c2f3a4b5d6e7f8", "namespace": "default"},
        "involvedObject": {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstance",
            "namespace": "default",
            "name": "vm1",
            "uid": "6f1c7c2e-0000-4000-8000-000000000001",
        },
        "reason": "SyncFailed",
        "message": "failed to start the guest on node node1: /nope/vmlinuz does not exist",
        "type": "Warning",
        "count": 3,
        "firstTimestamp": "2026-12-04T22:00:00Z",
        "lastTimestamp": "2026-12-04T22:00:07Z",
        "source": {"component": "vmferry-handler", "host": "node1"},
        "reportingComponent": "vmferry-handler",
        "reportingInstance": "node1",
    },
    "Lease": {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": "virt-synchronization-controller-a1",
            "namespace": "openshift-cnv",
            "annotations": {"vmferry.io/sync-address": "10.0.0.1:9443"},
        },
        "spec": {
            "holderIdentity": "a1",
            "leaseDurationSeconds": 15,
            "acquireTime": "2026-12-04T22:00:00.123456Z",
            "renewTime": "2026-12-04T22:05:00.654321Z",
        },
    },
    "PersistentVolumeClaim": {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "rootdisk", "namespace": "default"},
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "storageClassName": "shared",
            "volumeMode": "Filesystem",
            "resources": {"requests": {"storage": "1Gi"}},
            "dataSource": {"kind": "PersistentVolumeClaim", "name": "golden"},
        },
        "status": {
            "phase": "Bound",
            "accessModes": ["ReadWriteMany"],
            "capacity": {"storage": "1Gi"},
            "imagePath": "/srv/vmferry/default/pvc-1.img",
        },
    },
    "StorageClass": {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": "shared"},
        "provisioner": "vmferry.io/shared",
        "parameters": {"path": "/srv/vmferry"},
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "Immediate",
    },
    "Pod": {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "virt-handler-node1", "namespace": "openshift-cnv"},
        "spec": {"nodeName": "node1", "containers": [{"name": "virt-handler"}]},
        "status": {"phase": "Running"},
    },
    "ClusterRole": {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {
            "name": "kubevirt.io:upgrademigrate",
            "labels": {"rbac.authorization.k8s.io/aggregate-to-admin": "true"},
        },
        "rules": [
            {
                "apiGroups": ["kubevirt.io"],
                "resources": ["virtualmachineinstancemigrations"],
                "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
            },
            {
                "apiGroups": ["subresources.kubevirt.io"],
                "resources": ["virtualmachines/migrate"],
                "verbs": ["update"],
            },
        ],
    },
    "Role": {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "vm-reader", "namespace": "tools"},
        "rules": [
            {"apiGroups": ["kubevirt.io"], "resources": ["virtualmachines"], "verbs": ["get"]}
        ],
    },
    "ClusterRoleBinding": {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "kvmigrate"},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": "kubevirt.io:migrate",
        },
        "subjects": [
            {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "alice"},
            {"kind": "ServiceAccount", "name": "mtv", "namespace": "tools"},
        ],
    },
    "RoleBinding": {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "kvmigrate", "namespace": "tools"},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": "kubevirt.io:migrate",
        },
        "subjects": [
            {"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "migrators"}
        ],
    },
}

VALID.update(FORKLIFT_VALID)  # the MTV kinds' examples live with their tests
VALID["CertificateSigningRequest"] = {
    "apiVersion": "certificates.k8s.io/v1",
    "kind": "CertificateSigningRequest",
    "metadata": {"name": "node-csr-abc12"},
    "spec": {
        "request": "LS0tLS1CRUdJTiBDRVJUSUZJQ0FURSBSRVFVRVNULS0tLS0K",
        "signerName": "kubernetes.io/kube-apiserver-client-kubelet",
        "usages": ["digital signature", "client auth", "server auth"],
        "username": "system:bootstrap:abc123",
        "groups": ["system:bootstrappers", "system:authenticated"],
    },
    "status": {"conditions": [{"type": "Approved", "status": "True", "reason": "AutoApproved"}]},
}


def manifest(kind: str) -> dict[str, Any]:
    return copy.deepcopy(VALID[kind])


def vmi(**spec_overrides: Any) -> dict[str, Any]:
    obj = manifest("VirtualMachineInstance")
    obj.pop("status")
    obj["spec"] = {"domain": {"memory": {"guest": "1Gi"}}, **spec_overrides}
    return obj


def invalid_message(obj: object, **kwargs: Any) -> str:
    with pytest.raises(Invalid) as info:
        validate(obj, **kwargs)
    return str(info.value)


def test_every_kind_has_a_schema_and_an_example() -> None:
    assert {k.kind for k in KINDS} <= set(SCHEMAS)
    assert {k.kind for k in KINDS} <= set(VALID)


@pytest.mark.parametrize("kind", sorted(VALID))
def test_valid_examples_pass_unchanged(kind: str) -> None:
    obj = manifest(kind)
    out = validate(obj)
    assert out == VALID[kind]
    assert obj == VALID[kind]  # the input is not modified


@pytest.mark.parametrize("kind", sorted(VALID))
def test_valid_examples_pass_server_managed(kind: str) -> None:
    obj = manifest(kind)
    obj["metadata"].setdefault("name", "named")
    assert validate(obj, server_managed=True) == obj


def test_returns_a_deep_copy() -> None:
    obj = manifest("VirtualMachineInstance")
    out = validate(obj)
    out["spec"]["domain"]["devices"]["disks"].append({"name": "extra"})
    out["status"]["conditions"][0]["type"] = "Changed"
    assert obj == VALID["VirtualMachineInstance"]


def test_yaml_manifest_with_parsed_timestamps_and_nulls() -> None:
    text = """
apiVersion: kubevirt.io/v1
kind: VirtualMachine
metadata:
  name: vm1
  namespace: default
  creationTimestamp: 2024-05-01T10:00:00Z
  labels:
spec:
  running: false
  template:
    metadata:
      creationTimestamp: null
      labels: {kubevirt.io/environment: production}
    spec:
      domain:
        resources:
          requests: {memory: 2Gi}
status:
  conditions:
  - type: Ready
    status: "False"
    lastProbeTime: null
    lastTransitionTime: 2024-05-01 10:00:00.5+02:00
"""
    obj = yaml.safe_load(text)
    assert isinstance(obj["metadata"]["creationTimestamp"], dt.datetime)
    out = validate(obj)
    assert out["metadata"]["creationTimestamp"] == "2024-05-01T10:00:00Z"
    assert "labels" not in out["metadata"]  # null means absent
    condition = out["status"]["conditions"][0]
    assert condition["lastProbeTime"] is None  # timestamps keep their nulls
    assert condition["lastTransitionTime"] == "2024-05-01T08:00:00.5Z"
    assert out["spec"]["template"]["metadata"]["creationTimestamp"] is None


# --------------------------------------------------------------------------------------
# The examples of the brief
# --------------------------------------------------------------------------------------


def test_unknown_field_names_its_path_and_suggests() -> None:
    obj = vmi()
    obj["spec"]["domain"]["memroy"] = {"guest": "1Gi"}
    message = invalid_message(obj)
    assert message.startswith('VirtualMachineInstance "vm1": ')
    assert 'spec.domain.memroy: unknown field "memroy" (did you mean "memory"?)' in message


def test_invalid_quantity_names_its_path() -> None:
    message = invalid_message(vmi(domain={"memory": {"guest": "12Zi"}}))
    assert 'VirtualMachineInstance "vm1": spec.domain.memory.guest: invalid quantity "12Zi": ' in (
        message
    )


def test_required_field_missing() -> None:
    obj = manifest("VirtualMachineInstanceMigration")
    obj["metadata"] = {"name": "m1"}
    del obj["spec"]["vmiName"]
    message = invalid_message(obj)
    assert message == (
        'VirtualMachineInstanceMigration "m1": spec.vmiName: required field is missing'
    )


def test_boolean_given_as_string() -> None:
    obj = manifest("Node")
    obj["metadata"] = {"name": "n1"}
    obj["spec"]["unschedulable"] = "yes"
    assert (
        invalid_message(obj) == 'Node "n1": spec.unschedulable: expected boolean, got string "yes"'
    )


# --------------------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------------------


def test_boolean_is_not_an_integer() -> None:
    message = invalid_message(vmi(domain={"memory": {"guest": "1Gi"}, "cpu": {"cores": True}}))
    assert "spec.domain.cpu.cores: expected integer, got boolean true" in message


def test_integral_float_is_an_integer_but_a_fraction_is_not() -> None:
    out = validate(vmi(domain={"memory": {"guest": "1Gi"}, "cpu": {"cores": 2.0}}))
    cores = out["spec"]["domain"]["cpu"]["cores"]
    assert cores == 2 and type(cores) is int
    message = invalid_message(vmi(domain={"memory": {"guest": "1Gi"}, "cpu": {"cores": 2.5}}))
    assert "spec.domain.cpu.cores: expected integer, got number 2.5" in message


def test_strings_are_never_coerced() -> None:
    message = invalid_message(vmi(domain={"memory": {"guest": "1Gi"}, "cpu": {"cores": "2"}}))
    assert 'spec.domain.cpu.cores: expected integer, got string "2"' in message
    message = invalid_message(vmi(hostname=5))
    assert "spec.hostname: expected string, got integer 5" in message


def test_quantity_rejects_boolean_and_accepts_integers() -> None:
    assert validate(vmi(domain={"memory": {"guest": 1073741824}}))["spec"]["domain"]["memory"] == {
        "guest": 1073741824
    }
    message = invalid_message(vmi(domain={"memory": {"guest": True}}))
    assert "spec.domain.memory.guest: expected quantity" in message


def test_quantity_sign() -> None:
    assert "spec.domain.memory.guest: must be greater than zero" in invalid_message(
        vmi(domain={"memory": {"guest": "0"}})
    )
    obj = manifest("HyperConverged")
    obj["spec"]["liveMigrationConfig"]["bandwidthPerMigration"] = "-1Mi"
    message = invalid_message(obj)
    assert "spec.liveMigrationConfig.bandwidthPerMigration: " in message
    assert "negative" in message
    obj["spec"]["liveMigrationConfig"]["bandwidthPerMigration"] = 0
    validate(obj)


def test_number_fields_accept_int_and_float_not_bool() -> None:
    obj = manifest("VirtualMachineInstance")
    obj["status"]["migrationState"]["transfer"]["dirtyRateBytes"] = False
    message = invalid_message(obj)
    assert (
        "status.migrationState.transfer.dirtyRateBytes: expected number, got boolean false"
        in message
    )
    obj["status"]["migrationState"]["transfer"]["dirtyRateBytes"] = -1
    message = invalid_message(obj)
    assert "status.migrationState.transfer.dirtyRateBytes: must be at least 0, got -1" in message


def test_wrong_container_types() -> None:
    message = invalid_message(vmi(domain={"memory": {"guest": "1Gi"}, "cpu": [1]}))
    assert "spec.domain.cpu: expected object, got list" in message
    message = invalid_message(vmi(volumes={"name": "root"}))
    assert "spec.volumes: expected list, got object" in message
    message = invalid_message(vmi(domain={"memory": {"guest": "1Gi"}, "devices": []}))
    assert "spec.domain.devices: expected object, got list" in message


def test_enum_lists_supported_values() -> None:
    message = invalid_message(vmi(evictionStrategy="Migrate"))
    assert (
        'spec.evictionStrategy: unsupported value "Migrate": supported values: '
        '"LiveMigrate", "LiveMigrateIfPossible", "None", "External"'
    ) in message


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        ("parallelStreams", 17, "must be between 1 and 16, got 17"),
        ("parallelStreams", 0, "must be between 1 and 16, got 0"),
        ("completionTimeoutPerGiB", 0, "must be at least 1, got 0"),
        ("parallelMigrationsPerCluster", -1, "must be at least 1, got -1"),
        ("allowPostCopy", "true", 'expected boolean, got string "true"'),
        ("network", 7, "expected string, got integer 7"),
    ],
)
def test_live_migration_config_constraints(field: str, value: object, expected: str) -> None:
    obj = manifest("HyperConverged")
    obj["spec"]["liveMigrationConfig"][field] = value
    assert f"spec.liveMigrationConfig.{field}: {expected}" in invalid_message(obj)


def test_port_range() -> None:
    obj = manifest("Node")
    obj["status"]["migrationEndpoint"]["port"] = 70000
    assert "status.migrationEndpoint.port: must be between 1 and 65535, got 70000" in (
        invalid_message(obj)
    )


def test_map_values_are_checked_with_key_paths() -> None:
    obj = manifest("HyperConverged")
    obj["spec"]["featureGates"]["decentralizedLiveMigration"] = "true"
    obj["spec"]["featureGates"]["other"] = None
    message = invalid_message(obj)
    assert (
        'spec.featureGates.decentralizedLiveMigration: expected boolean, got string "true"'
        in message
    )
    assert "spec.featureGates.other: expected boolean, got null" in message


def test_map_keys_that_are_not_identifiers_use_brackets() -> None:
    obj = manifest("Node")
    obj["status"]["capacity"]["hugepages-2Mi"] = "lots"
    assert 'status.capacity[hugepages-2Mi]: invalid quantity "lots"' in invalid_message(obj)


# --------------------------------------------------------------------------------------
# Unknown fields, nested paths, multiple errors
# --------------------------------------------------------------------------------------


def test_unknown_field_inside_a_list_item() -> None:
    obj = manifest("VirtualMachineInstance")
    obj["status"]["conditions"][1]["foo"] = "bar"
    message = invalid_message(obj)
    assert 'status.conditions[1].foo: unknown field "foo"' in message


def test_unknown_field_in_deep_status() -> None:
    obj = manifest("VirtualMachineInstanceMigration")
    obj["status"]["migrationState"]["transfer"]["bytes"] = 1
    assert 'status.migrationState.transfer.bytes: unknown field "bytes"' in invalid_message(obj)


def test_unknown_top_level_field() -> None:
    obj = manifest("Namespace")
    obj["data"] = {}
    assert 'Namespace "openshift-cnv": data: unknown field "data"' == invalid_message(obj)


def test_unknown_spec_field_of_hyperconverged() -> None:
    obj = manifest("HyperConverged")
    obj["spec"]["liveMigrationConfg"] = {}
    message = invalid_message(obj)
    assert 'spec.liveMigrationConfg: unknown field "liveMigrationConfg"' in message
    assert 'did you mean "liveMigrationConfig"' in message


def test_list_item_of_wrong_type() -> None:
    obj = manifest("Node")
    obj["status"]["addresses"].append("10.0.0.1")
    obj["status"]["addresses"].append(None)
    message = invalid_message(obj)
    assert 'status.addresses[2]: expected object, got string "10.0.0.1"' in message
    assert "status.addresses[3]: expected object, got null" in message


def test_required_field_inside_a_list_item() -> None:
    obj = manifest("VirtualMachineInstance")
    obj["metadata"]["ownerReferences"][0].pop("uid")
    obj["status"]["conditions"].append({"status": "True"})
    message = invalid_message(obj)
    assert "metadata.ownerReferences[0].uid: required field is missing" in message
    assert "status.conditions[2].type: required field is missing" in message


def test_all_errors_are_reported_together() -> None:
    obj = manifest("VirtualMachineInstance")
    obj["apiVersion"] = "v1"
    obj["spec"]["domain"]["cpu"]["cores"] = 0
    obj["spec"]["evictionStrategy"] = "Never"
    obj["status"]["conditions"][0]["status"] = "yes"
    obj["status"]["phase"] = "Walking"
    message = invalid_message(obj)
    prefix = 'VirtualMachineInstance "vm1": '
    assert message.startswith(prefix)
    parts = message[len(prefix) :].split("; ")
    assert parts[0] == (
        'apiVersion: expected "kubevirt.io/v1" for kind VirtualMachineInstance, got "v1"'
    )
    paths = [part.split(":")[0] for part in parts]
    assert paths == [
        "apiVersion",
        "spec.domain.cpu.cores",
        "spec.evictionStrategy",
        "status.phase",  # in the order of the manifest
        "status.conditions[0].status",
    ]


# --------------------------------------------------------------------------------------
# apiVersion, kind, metadata
# --------------------------------------------------------------------------------------


def test_wrong_api_version() -> None:
    obj = manifest("VirtualMachine")
    obj["apiVersion"] = "v1"
    assert invalid_message(obj) == (
        'VirtualMachine "vm1": apiVersion: expected "kubevirt.io/v1" for kind VirtualMachine, '
        'got "v1"'
    )


def test_missing_api_version() -> None:
    obj = manifest("MigrationPolicy")
    del obj["apiVersion"]
    assert "apiVersion: required field is missing" in invalid_message(obj)
    assert "migrations.kubevirt.io/v1alpha1" in invalid_message(obj)


def test_unknown_kind_is_a_bad_request() -> None:
    obj = manifest("Namespace")
    obj["kind"] = "Deployment"
    with pytest.raises(BadRequest, match='no kind "Deployment"'):
        validate(obj)


def test_missing_or_wrong_kind_and_non_object() -> None:
    obj = manifest("Namespace")
    del obj["kind"]
    assert invalid_message(obj).startswith("kind: required field is missing")
    obj["kind"] = 3
    assert invalid_message(obj) == "kind: expected string, got integer 3"
    assert invalid_message(["not", "a", "manifest"]) == "manifest: expected object, got list"


def test_kind_without_schema_is_an_internal_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(SCHEMAS, "Namespace")
    from vmferry.objects.schema import registry

    monkeypatch.setattr(registry, "_TOP_LEVEL", {})
    with pytest.raises(ApiError, match="has no schema"):
        validate(manifest("Namespace"))


@pytest.mark.parametrize(
    "name",
    ["My-VM", "vm_1", "-vm", "vm-", "vm..1", "a" * 254, "vm/1", " vm"],
)
def test_invalid_names(name: str) -> None:
    obj = manifest("VirtualMachine")
    obj["metadata"]["name"] = name
    message = invalid_message(obj)
    assert "metadata.name: " in message
    assert "RFC 1123 subdomain" in message or "253" in message


@pytest.mark.parametrize("name", ["vm1", "a.b-c.d", "1", "a" * 253])
def test_valid_names(name: str) -> None:
    obj = manifest("VirtualMachine")
    obj["metadata"]["name"] = name
    assert validate(obj)["metadata"]["name"] == name


def test_namespace_names_are_dns_labels() -> None:
    obj = manifest("Namespace")
    obj["metadata"]["name"] = "my.namespace"
    assert "metadata.name: " in invalid_message(obj)
    assert "RFC 1123 label" in invalid_message(obj)


def test_invalid_namespace_field() -> None:
    obj = manifest("VirtualMachine")
    obj["metadata"]["namespace"] = "Default"
    assert 'metadata.namespace: invalid value "Default"' in invalid_message(obj)


@pytest.mark.parametrize("kind", ["Namespace", "Node", "MigrationPolicy"])
def test_namespace_on_cluster_scoped_kind(kind: str) -> None:
    obj = manifest(kind)
    obj["metadata"]["namespace"] = "default"
    message = invalid_message(obj)
    assert f"metadata.namespace: not allowed: {kind} is cluster-scoped" in message


def test_name_is_required_unless_generate_name() -> None:
    obj = manifest("VirtualMachine")
    del obj["metadata"]["name"]
    assert (
        "metadata.name: required field is missing (or set metadata.generateName)"
        in invalid_message(obj)
    )
    obj["metadata"]["generateName"] = "vm-"
    validate(obj)
    assert "metadata.name: required field is missing" in invalid_message(obj, server_managed=True)
    obj["metadata"]["generateName"] = "VM-"
    assert 'metadata.generateName: invalid value "VM-"' in invalid_message(obj)


def test_missing_metadata() -> None:
    obj = manifest("Namespace")
    del obj["metadata"]
    assert invalid_message(obj).startswith("Namespace: metadata.name: required field is missing")


def test_invalid_label_key_and_value() -> None:
    obj = manifest("VirtualMachine")
    obj["metadata"]["labels"] = {"bad key": "ok", "good": "bad value", "num": 1}
    message = invalid_message(obj)
    assert 'metadata.labels: invalid label key "bad key"' in message
    assert 'metadata.labels.good: invalid label value "bad value"' in message
    assert "metadata.labels.num: expected string, got integer 1 (quote it in YAML)" in message


def test_invalid_label_in_selectors() -> None:
    obj = manifest("MigrationPolicy")
    obj["spec"]["selectors"]["virtualMachineInstanceSelector"] = {"a/b/c": "x"}
    assert "spec.selectors.virtualMachineInstanceSelector: invalid label key" in (
        invalid_message(obj)
    )
    obj = manifest("VirtualMachineInstanceMigration")
    obj["spec"]["addedNodeSelector"] = {"zone": True}
    assert "spec.addedNodeSelector.zone: expected string, got boolean true" in (
        invalid_message(obj)
    )


def test_invalid_annotations() -> None:
    obj = manifest("Node")
    obj["metadata"]["annotations"] = {"not a key": "v", "ok": 5}
    message = invalid_message(obj)
    assert 'metadata.annotations: invalid annotation key "not a key"' in message
    assert "metadata.annotations.ok: expected string, got integer 5" in message
    obj["metadata"]["annotations"] = {"big": "x" * (256 * 1024)}
    assert "metadata.annotations: annotations are" in invalid_message(obj)


def test_template_labels_are_checked() -> None:
    obj = manifest("VirtualMachine")
    obj["spec"]["template"]["metadata"]["labels"] = {"env": "a b"}
    assert 'spec.template.metadata.labels.env: invalid label value "a b"' in invalid_message(obj)


# --------------------------------------------------------------------------------------
# Cross-field rules
# --------------------------------------------------------------------------------------


def test_vmi_needs_guest_memory_or_a_memory_request() -> None:
    obj = vmi()
    obj["spec"]["domain"] = {"cpu": {"cores": 1}}
    assert invalid_message(obj) == (
        'VirtualMachineInstance "vm1": spec.domain.memory.guest: required '
        "(or set spec.domain.resources.requests.memory)"
    )
    obj["spec"]["domain"]["resources"] = {"requests": {"memory": "512Mi"}}
    validate(obj)


def test_vmi_spec_is_required() -> None:
    obj = vmi()
    obj["spec"] = None
    assert "spec: required field is missing" in invalid_message(obj)


def test_vm_template_needs_guest_memory() -> None:
    obj = manifest("VirtualMachine")
    obj["spec"]["template"]["spec"]["domain"]["memory"] = {}
    del obj["spec"]["template"]["spec"]["domain"]["resources"]
    message = invalid_message(obj)
    assert (
        "spec.template.spec.domain.memory.guest: required "
        "(or set spec.template.spec.domain.resources.requests.memory)"
    ) in message


def test_vmi_driver_sections_are_exclusive() -> None:
    message = invalid_message(vmi(memvm={}, qemu={"kernel": "/boot/vmlinuz"}))
    assert "spec: memvm and qemu are mutually exclusive" in message
    out = validate(vmi(qemu={"kernel": "k", "accelerator": "tcg", "vcpus": 2, "extraArgs": ["-s"]}))
    assert out["spec"]["qemu"]["vcpus"] == 2
    assert "spec.qemu.verify: unsupported value" in invalid_message(vmi(qemu={"verify": "yes"}))


def test_memvm_workload_fits_in_the_guest() -> None:
    message = invalid_message(vmi(memvm={"workload": {"hotSet": "2Gi", "touched": "1Gi"}}))
    assert 'spec.memvm.workload.hotSet: "2Gi" is more than the guest memory ("1Gi")' in message
    assert "touched" not in message


def test_vm_running_and_run_strategy_are_exclusive() -> None:
    obj = manifest("VirtualMachine")
    obj["spec"]["running"] = True
    assert "spec: running and runStrategy are mutually exclusive" in invalid_message(obj)


def test_vm_template_is_required() -> None:
    obj = manifest("VirtualMachine")
    del obj["spec"]["template"]
    assert "spec.template: required field is missing" in invalid_message(obj)


def test_vmim_send_to_and_receive_are_exclusive() -> None:
    obj = manifest("VirtualMachineInstanceMigration")
    obj["spec"]["receive"] = {"migrationID": "mig-1"}
    assert "spec: sendTo and receive are mutually exclusive" in invalid_message(obj)
    obj["spec"]["receive"] = {}
    assert "spec.receive.migrationID: required field is missing" in invalid_message(obj)


def test_vmim_phases() -> None:
    obj = manifest("VirtualMachineInstanceMigration")
    for phase in ("", "WaitingForSync", "Synchronizing", "PreparingTarget", "TargetReady"):
        obj["status"]["phase"] = phase
        validate(obj)
    obj["status"]["phase"] = "Migrating"
    assert 'status.phase: unsupported value "Migrating"' in invalid_message(obj)


def test_migration_schema_follows_the_contract() -> None:
    """Fields and enums of the migration schema are the contract's, not a second list."""
    assert set(MIGRATION_STATE_SCHEMA.fields) == {str(f) for f in Field}
    assert set(LIVE_MIGRATION_CONFIG.fields) == {str(k) for k in ConfigKey}
    enums = {
        (VMIM_STATUS, "phase"): MigrationPhase,
        (VMI_STATUS, "phase"): VMIPhase,
        (MIGRATION_STATE_SCHEMA, Field.SWITCHOVER): Switchover,
        (MIGRATION_STATE_SCHEMA, Field.MODE): MigrationMode,
        (MIGRATION_STATE_SCHEMA, Field.ABORT_STATUS): AbortStatus,
        (LIVE_MIGRATION_CONFIG, ConfigKey.COMPRESSION): Compression,
    }
    for (schema, field), enum in enums.items():
        checker = schema.fields[field]
        assert isinstance(checker, Str)
        assert checker.enum == tuple(member.value for member in enum), field


@pytest.mark.parametrize("phase", list(MigrationPhase))
def test_every_migration_phase_validates(phase: MigrationPhase) -> None:
    obj = manifest("VirtualMachineInstanceMigration")
    obj["status"]["phase"] = phase
    assert validate(obj)["status"]["phase"] == phase.value


def test_migration_state_has_no_token() -> None:
    """The stream token lives in a Secret; a status that carries one is refused."""
    obj = manifest("VirtualMachineInstance")
    obj["status"]["migrationState"]["token"] = "s3cr3t"
    assert 'status.migrationState.token: unknown field "token"' in invalid_message(obj)


def test_unsupported_switchover_names_the_contract_values() -> None:
    obj = manifest("VirtualMachineInstance")
    obj["status"]["migrationState"]["switchover"] = "Maybe"
    assert (
        'status.migrationState.switchover: unsupported value "Maybe": '
        'supported values: "Committed", "Aborted"'
    ) in invalid_message(obj)


# --------------------------------------------------------------------------------------
# Defaults
# --------------------------------------------------------------------------------------


def test_live_migration_defaults_are_complete_and_valid() -> None:
    assert set(LIVE_MIGRATION_DEFAULTS) == set(LIVE_MIGRATION_CONFIG.fields) - {"network"}
    obj = manifest("HyperConverged")
    obj["spec"] = {"liveMigrationConfig": dict(LIVE_MIGRATION_DEFAULTS)}
    validate(obj)


def test_hyperconverged_defaults() -> None:
    obj = manifest("HyperConverged")
    obj["spec"] = {"liveMigrationConfig": {"parallelMigrationsPerCluster": 1}}
    out = apply_defaults(obj)
    assert out["spec"]["liveMigrationConfig"] == {
        **LIVE_MIGRATION_DEFAULTS,
        "parallelMigrationsPerCluster": 1,
    }
    assert "network" not in out["spec"]["liveMigrationConfig"]
    assert obj["spec"] == {"liveMigrationConfig": {"parallelMigrationsPerCluster": 1}}
    assert out["spec"]["liveMigrationConfig"]["bandwidthPerMigration"] == "0"
    assert out["spec"]["liveMigrationConfig"]["completionTimeoutPerGiB"] == 150
    assert out["spec"]["liveMigrationConfig"]["progressTimeout"] == 150


def test_hyperconverged_defaults_without_spec() -> None:
    obj = manifest("HyperConverged")
    del obj["spec"]
    out = apply_defaults(validate(obj))
    assert out["spec"]["liveMigrationConfig"] == LIVE_MIGRATION_DEFAULTS
    validate(out)


def test_vmi_defaults() -> None:
    obj = vmi()
    obj["spec"]["domain"] = {"resources": {"requests": {"memory": "2Gi"}}}
    out = apply_defaults(validate(obj))
    assert out["spec"]["domain"]["cpu"]["model"] == "host-model"
    assert out["spec"]["domain"]["memory"]["guest"] == "2Gi"
    assert "evictionStrategy" not in out["spec"]
    assert apply_defaults(out) == out  # idempotent
    validate(out)


def test_vmi_defaults_keep_what_is_set() -> None:
    obj = vmi(domain={"memory": {"guest": "1Gi"}, "cpu": {"model": "Skylake-Server"}})
    obj["spec"]["domain"]["resources"] = {"requests": {"memory": "2Gi"}}
    out = apply_defaults(obj)
    assert out["spec"]["domain"]["cpu"]["model"] == "Skylake-Server"
    assert out["spec"]["domain"]["memory"]["guest"] == "1Gi"


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ({}, "Halted"),
        ({"running": True}, "Always"),
        ({"running": False}, "Halted"),
        ({"runStrategy": "Manual"}, "Manual"),
    ],
)
def test_vm_run_strategy_defaults(spec: dict[str, Any], expected: str) -> None:
    obj = manifest("VirtualMachine")
    obj["spec"].pop("runStrategy")
    obj["spec"].update(spec)
    out = apply_defaults(validate(obj))
    assert out["spec"]["runStrategy"] == expected
    assert "running" not in out["spec"]
    validate(out)


def test_defaults_leave_other_kinds_alone() -> None:
    for kind in ("Namespace", "Node", "VirtualMachineInstanceMigration", "MigrationPolicy"):
        assert apply_defaults(manifest(kind)) == VALID[kind]


def test_memory_bytes() -> None:
    assert memory_bytes({"domain": {"memory": {"guest": "1Gi"}}}) == 1 << 30
    assert memory_bytes({"domain": {"resources": {"requests": {"memory": "512Mi"}}}}) == 512 << 20
    assert (
        memory_bytes(
            {"domain": {"memory": {"guest": 1000}, "resources": {"requests": {"memory": "1Gi"}}}}
        )
        == 1000
    )
    with pytest.raises(Invalid, match=r"spec\.domain\.memory\.guest: required"):
        memory_bytes({"domain": {}})
    with pytest.raises(Invalid, match=r'spec\.domain\.memory\.guest: invalid quantity "x"'):
        memory_bytes({"domain": {"memory": {"guest": "x"}}})
