"""vmferry.cli.printers: tables, -o yaml|json|name|jsonpath, describe, ages."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from vmferry.cli import printers
from vmferry.cli.printers import (
    OutputFormatError,
    describe,
    empty_message,
    format_age,
    format_table,
    human_duration,
    is_empty_notice,
    print_objects,
    resource_name,
    smart_label,
    to_json,
    to_yaml,
    validate_output,
)
from vmferry.migration_network import MIGRATION_IP
from vmferry.objects.jsonpath import JsonPathError
from vmferry.objects.kinds import BY_KIND, Kind

NOW = datetime(2025, 1, 10, 12, 0, 0, tzinfo=UTC)
NS = BY_KIND["Namespace"]
NODE = BY_KIND["Node"]
VM = BY_KIND["VirtualMachine"]
VMI = BY_KIND["VirtualMachineInstance"]
VMIM = BY_KIND["VirtualMachineInstanceMigration"]
HCO = BY_KIND["HyperConverged"]
POLICY = BY_KIND["MigrationPolicy"]


def meta(name: str, created: str = "2025-01-10T11:56:40Z", **extra: Any) -> dict[str, Any]:
    return {"name": name, "creationTimestamp": created, **extra}


def vmi(name: str = "vm1", namespace: str = "default", **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstance",
        "metadata": meta(name, namespace=namespace, uid="0b5d", resourceVersion="12"),
        "spec": {"domain": {"memory": {"guest": "1Gi"}}},
        "status": {
            "phase": "Running",
            "nodeName": "node-a",
            "conditions": [
                {"type": "Ready", "status": "True"},
                {"type": "LiveMigratable", "status": "True"},
            ],
            **status,
        },
    }


def vmim(name: str = "m1", phase: str | None = "Running", **state: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "kubevirt.io/v1",
        "kind": "VirtualMachineInstanceMigration",
        "metadata": meta(name, namespace="default"),
        "spec": {"vmiName": "vm1"},
    }
    if phase is not None:
        obj["status"] = {"phase": phase, "migrationState": state} if state else {"phase": phase}
    return obj


# --- ages ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (-5, "<invalid>"),
        (-1, "0s"),
        (0, "0s"),
        (5, "5s"),
        (119, "119s"),
        (120, "2m"),
        (200, "3m20s"),
        (599, "9m59s"),
        (600, "10m"),
        (179 * 60 + 59, "179m"),
        (3 * 3600, "3h"),
        (3 * 3600 + 5 * 60 + 7, "3h5m"),
        (8 * 3600, "8h"),
        (47 * 3600, "47h"),
        (48 * 3600, "2d"),
        (52 * 3600, "2d4h"),
        (8 * 86400, "8d"),
        (400 * 86400, "400d"),
        (730 * 86400, "2y"),
        (830 * 86400, "2y100d"),
        (9 * 365 * 86400, "9y"),
    ],
)
def test_human_duration_matches_kubectl(seconds: int, expected: str) -> None:
    assert human_duration(seconds) == expected


def test_format_age() -> None:
    assert format_age("2025-01-10T11:56:40Z", NOW) == "3m20s"
    assert format_age("2025-01-10T11:56:40.123456+00:00", NOW) == "3m19s"
    assert format_age("2025-01-08T08:00:00Z", NOW) == "2d4h"
    assert format_age(None, NOW) == "<unknown>"
    assert format_age("not a time", NOW) == "<unknown>"
    assert format_age("2025-01-10T11:59:55Z", NOW.replace(tzinfo=None)) == "5s"


# --- tables -------------------------------------------------------------------------------


def test_format_table_pads_like_kubectl_tabwriter() -> None:
    # Each column but the last: widest cell + 3 spaces, at least 6; no trailing spaces.
    assert format_table([["NAME", "IP", "X"], ["a", "", "1"], ["longer-name", "", ""]]) == (
        "NAME          IP    X\na                   1\nlonger-name\n"
    )
    assert format_table([]) == ""


def test_namespace_table() -> None:
    objs = [
        {"metadata": meta("default"), "status": {"phase": "Active"}},
        {"metadata": meta("openshift-cnv", "2025-01-01T00:00:00Z")},
        {"metadata": meta("gone", deletionTimestamp="2025-01-10T11:59:00Z")},
    ]
    assert print_objects(objs, NS, None, now=NOW) == (
        "NAME            STATUS        AGE\n"
        "default         Active        3m20s\n"
        "openshift-cnv   Active        9d\n"
        "gone            Terminating   3m20s\n"
    )


def node(name: str, *, ready: str | None = "True", unschedulable: bool = False) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "metadata": meta(name, "2025-01-08T08:00:00Z", labels={"kubernetes.io/hostname": name}),
        "spec": {"unschedulable": unschedulable},
        "status": {
            "nodeInfo": {"handlerVersion": "0.1.0", "cpuModel": "Skylake-Client"},
            "addresses": [
                {"type": "InternalIP", "address": "10.0.0.1"},
                {"type": MIGRATION_IP, "address": "192.168.10.1"},
            ],
            "capacity": {"memory": "16Gi"},
        },
    }
    if ready is not None:
        obj["status"]["conditions"] = [{"type": "Ready", "status": ready}]
    return obj


def test_node_table() -> None:
    objs = [
        node("node-a"),
        node("node-b", ready="False"),
        node("node-c", unschedulable=True),
        node("node-d", ready=None),
    ]
    assert print_objects(objs, NODE, None, now=NOW) == (
        "NAME     STATUS                     ROLES    AGE    VERSION\n"
        "node-a   Ready                      <none>   2d4h   0.1.0\n"
        "node-b   NotReady                   <none>   2d4h   0.1.0\n"
        "node-c   Ready,SchedulingDisabled   <none>   2d4h   0.1.0\n"
        "node-d   Unknown                    <none>   2d4h   0.1.0\n"
    )


def test_node_wide_table_and_roles() -> None:
    bare = {"metadata": meta("bare", labels={"node-role.kubernetes.io/worker": ""}), "status": {}}
    roles = node("node-a")
    roles["metadata"]["labels"]["node-role.kubernetes.io/control-plane"] = ""
    roles["metadata"]["labels"]["node-role.kubernetes.io/worker"] = ""
    assert print_objects([roles, bare], NODE, "wide", now=NOW) == (
        "NAME     STATUS    ROLES                  AGE     VERSION"
        "   INTERNAL-IP   MIGRATION-IP   CPU-MODEL        MEMORY\n"
        "node-a   Ready     control-plane,worker   2d4h    0.1.0"
        "     10.0.0.1      192.168.10.1   Skylake-Client   16Gi\n"
        "bare     Unknown   worker                 3m20s"
        "             <none>        <none>         <none>           <none>\n"
    )


def test_virtual_machine_table() -> None:
    objs = [
        {"metadata": meta("vm1"), "status": {"printableStatus": "Running", "ready": True}},
        {"metadata": meta("vm2"), "status": {"printableStatus": "Stopped", "ready": False}},
        {
            "metadata": meta("vm3"),
            "status": {
                "printableStatus": "Migrating",
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        },
        {"metadata": meta("vm4")},
    ]
    assert print_objects(objs, VM, None, now=NOW) == (
        "NAME   AGE     STATUS      READY\n"
        "vm1    3m20s   Running     True\n"
        "vm2    3m20s   Stopped     False\n"
        "vm3    3m20s   Migrating   True\n"
        "vm4    3m20s               False\n"
    )


def test_virtual_machine_instance_table() -> None:
    pending = vmi("vm2", phase="Scheduling", nodeName=None, conditions=[])
    with_ip = vmi("vm3", interfaces=[{"ipAddress": "10.128.0.5", "name": "default"}])
    assert print_objects([vmi(), pending, with_ip], VMI, None, now=NOW) == (
        "NAME   AGE     PHASE        IP           NODENAME   READY\n"
        "vm1    3m20s   Running                   node-a     True\n"
        "vm2    3m20s   Scheduling                           False\n"
        "vm3    3m20s   Running      10.128.0.5   node-a     True\n"
    )


def test_virtual_machine_instance_wide_and_all_namespaces() -> None:
    paused = vmi("vm2", "prod")
    paused["status"]["conditions"].append({"type": "Paused", "status": "True"})
    out = print_objects([vmi(), paused], VMI, "wide", all_namespaces=True, now=NOW)
    assert out == (
        "NAMESPACE   NAME   AGE     PHASE     IP    NODENAME   READY   LIVE-MIGRATABLE   PAUSED\n"
        "default     vm1    3m20s   Running         node-a     True    True\n"
        "prod        vm2    3m20s   Running         node-a     True    True              True\n"
    )


def test_migration_table_and_wide_progress() -> None:
    running = vmim(
        "m1",
        sourceNode="node-a",
        targetNode="node-b",
        transfer={"processed": 768, "total": 1024},
    )
    remaining = vmim(
        "m2",
        "Running",
        sourceNode="node-a",
        targetNode="node-c",
        transfer={"processedBytes": 100, "remainingBytes": 300},
    )
    pending = vmim("m3", "Pending")
    new = vmim("m4", None)
    objs = [running, remaining, pending, new]
    assert print_objects(objs, VMIM, None, now=NOW) == (
        "NAME   PHASE     VMI\n"
        "m1     Running   vm1\n"
        "m2     Running   vm1\n"
        "m3     Pending   vm1\n"
        "m4               vm1\n"
    )
    assert print_objects(objs, VMIM, "wide", now=NOW) == (
        "NAME   PHASE     VMI   SOURCE   TARGET   PROGRESS\n"
        "m1     Running   vm1   node-a   node-b   75%\n"
        "m2     Running   vm1   node-a   node-c   25%\n"
        "m3     Pending   vm1\n"
        "m4               vm1\n"
    )


def test_migration_no_headers_and_all_namespaces() -> None:
    out = print_objects([vmim()], VMIM, None, no_headers=True, all_namespaces=True, now=NOW)
    assert out == "default   m1    Running   vm1\n"  # widths from the rows only


@pytest.mark.parametrize("kind", [HCO, POLICY, Kind("Widget", "example.com/v1", "widgets", True)])
def test_name_age_kinds(kind: Kind) -> None:
    obj = {"metadata": meta("kubevirt-hyperconverged", namespace="openshift-cnv")}
    assert print_objects([obj], kind, None, now=NOW) == (
        "NAME                      AGE\nkubevirt-hyperconverged   3m20s\n"
    )


def test_cluster_scoped_kind_gets_no_namespace_column() -> None:
    out = print_objects([{"metadata": meta("p1")}], POLICY, None, all_namespaces=True, now=NOW)
    assert out.splitlines()[0] == "NAME   AGE"


def test_rbac_and_config_kinds() -> None:
    secret = Kind("Secret", "v1", "secrets", True)
    config_map = Kind("ConfigMap", "v1", "configmaps", True)
    binding = Kind("RoleBinding", "rbac.authorization.k8s.io/v1", "rolebindings", True)
    s = {"metadata": meta("tok"), "type": "kubernetes.io/service-account-token", "data": {"a": 1}}
    assert print_objects([s], secret, None, now=NOW) == (
        "NAME   TYPE                                  DATA   AGE\n"
        "tok    kubernetes.io/service-account-token   1      3m20s\n"
    )
    cm = {"metadata": meta("kube-root-ca.crt"), "data": {"ca.crt": "x"}}
    assert print_objects([cm], config_map, None, now=NOW) == (
        "NAME               DATA   AGE\nkube-root-ca.crt   1      3m20s\n"
    )
    rb = {
        "metadata": meta("migrate"),
        "roleRef": {"kind": "ClusterRole", "name": "kubevirt.io:migrate"},
        "subjects": [
            {"kind": "User", "name": "alice"},
            {"kind": "ServiceAccount", "name": "sync", "namespace": "openshift-cnv"},
        ],
    }
    assert print_objects([rb], binding, "wide", now=NOW) == (
        "NAME      ROLE                              AGE     USERS   GROUPS   SERVICEACCOUNTS\n"
        "migrate   ClusterRole/kubevirt.io:migrate   3m20s   alice            openshift-cnv/sync\n"
    )


def test_age_uses_the_current_time_by_default() -> None:
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = print_objects([{"metadata": meta("x", now)}], POLICY, None)
    assert out.splitlines()[1].split()[1] in ("0s", "1s", "2s")


# --- empty lists --------------------------------------------------------------------------


def test_empty_message() -> None:
    assert empty_message(VMIM, "default") == "No resources found in default namespace."
    assert empty_message(VMIM, None) == "No resources found"
    assert empty_message(NODE, "default") == "No resources found"


def test_empty_table_returns_the_notice() -> None:
    out = print_objects([], VMIM, None, namespace="default")
    assert out == "No resources found in default namespace.\n"
    assert is_empty_notice(out)
    assert print_objects([], VMIM, "wide", namespace="x", all_namespaces=True) == (
        "No resources found\n"
    )
    assert print_objects([], NODE, None) == "No resources found\n"


def test_empty_list_in_other_formats() -> None:
    assert print_objects([], VMIM, "name") == ""
    assert json.loads(print_objects([], VMIM, "json"))["items"] == []
    assert yaml.safe_load(print_objects([], VMIM, "yaml"))["items"] == []
    assert print_objects([], VMIM, "jsonpath={.items[*].metadata.name}") == ""
    assert not is_empty_notice(print_objects([vmim()], VMIM, None, now=NOW))


# --- yaml / json / name -------------------------------------------------------------------


def test_json_of_one_object_and_of_a_list() -> None:
    obj = vmim()
    assert print_objects([obj], VMIM, "json", single=True) == json.dumps(obj, indent=4) + "\n"
    listed = json.loads(print_objects([obj, vmim("m2")], VMIM, "json"))
    assert listed == {
        "apiVersion": "v1",
        "items": [obj, vmim("m2")],
        "kind": "List",
        "metadata": {"resourceVersion": ""},
    }
    # one object from a list (not asked for by name) is still a List, as in kubectl
    assert json.loads(print_objects([obj], VMIM, "json"))["kind"] == "List"


def test_to_json_indents_by_four_and_keeps_order() -> None:
    assert to_json({"b": 1, "a": ["é"]}) == '{\n    "b": 1,\n    "a": [\n        "é"\n    ]\n}\n'


def test_yaml_of_one_object() -> None:
    out = print_objects([vmim()], VMIM, "yaml", single=True)
    assert out == (
        "apiVersion: kubevirt.io/v1\n"
        "kind: VirtualMachineInstanceMigration\n"
        "metadata:\n"
        "  name: m1\n"
        '  creationTimestamp: "2025-01-10T11:56:40Z"\n'
        "  namespace: default\n"
        "spec:\n"
        "  vmiName: vm1\n"
        "status:\n"
        "  phase: Running\n"
    )


def test_yaml_of_a_list() -> None:
    out = print_objects([vmim("m1", None), vmim("m2", None)], VMIM, "yaml")
    assert out.startswith("apiVersion: v1\nitems:\n- apiVersion: kubevirt.io/v1\n")
    assert out.endswith('kind: List\nmetadata:\n  resourceVersion: ""\n')
    assert yaml.safe_load(out)["items"][1]["metadata"]["name"] == "m2"


def test_to_yaml_style() -> None:
    shared = {"x": 1}
    doc = {
        "data": {"ca.crt": "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"},
        "resourceVersion": "123",
        "flag": "true",
        "empty": "",
        "none": None,
        "list": [],
        "items": [{"a": 1, "b": [1, 2]}],
        "one": shared,
        "two": shared,
        "long": "word " * 40,
        "quoted": "it's: here",
    }
    out = to_yaml(doc)
    assert "ca.crt: |\n    -----BEGIN CERTIFICATE-----\n    MIIB\n" in out
    assert 'resourceVersion: "123"\n' in out
    assert 'flag: "true"\n' in out
    assert 'empty: ""\n' in out
    assert "none: null\n" in out
    assert "list: []\n" in out
    assert "items:\n- a: 1\n  b:\n  - 1\n  - 2\n" in out
    assert "&" not in out and "*" not in out  # no anchors or aliases
    assert "one:\n  x: 1\ntwo:\n  x: 1\n" in out
    assert out.count("\n") == len(out.splitlines())  # long strings are not folded
    assert 'quoted: "it\'s: here"\n' in out
    assert yaml.safe_load(out) == doc


def test_name_output() -> None:
    assert print_objects([vmim("m1"), vmim("m2")], VMIM, "name") == (
        "virtualmachineinstancemigration.kubevirt.io/m1\n"
        "virtualmachineinstancemigration.kubevirt.io/m2\n"
    )
    assert print_objects([node("n1")], NODE, "name") == "node/n1\n"
    assert resource_name(HCO) == "hyperconverged.hco.kubevirt.io"
    assert resource_name(POLICY) == "migrationpolicy.migrations.kubevirt.io"
    assert resource_name(NS) == "namespace"


# --- jsonpath / custom-columns ------------------------------------------------------------


def test_jsonpath_on_a_single_object() -> None:
    obj = vmi(migrationState={"targetNodeAddress": "192.168.10.2:49152"})
    out = print_objects(
        [obj], VMI, "jsonpath={.status.migrationState.targetNodeAddress}", single=True
    )
    assert out == "192.168.10.2:49152"


def test_jsonpath_on_a_list() -> None:
    objs = [vmim("m1"), vmim("m2", "Succeeded")]
    template = 'jsonpath={range .items[*]}{.metadata.name}{"\\t"}{.status.phase}{"\\n"}{end}'
    assert print_objects(objs, VMIM, template) == "m1\tRunning\nm2\tSucceeded\n"
    assert print_objects(objs, VMIM, "jsonpath={.kind}") == "List"


def test_jsonpath_missing_keys_print_nothing_by_default() -> None:
    tmpl = "jsonpath={.status.migrationState.targetNodeAddress}"
    assert print_objects([vmi()], VMI, tmpl, single=True) == ""
    with pytest.raises(JsonPathError, match='key "migrationState" not found'):
        print_objects([vmi()], VMI, tmpl, single=True, allow_missing_keys=False)


def test_jsonpath_as_json() -> None:
    out = print_objects(
        [vmim("m1"), vmim("m2")], VMIM, "jsonpath-as-json={.items[*].metadata.name}"
    )
    assert json.loads(out) == ["m1", "m2"]


def test_jsonpath_file(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonpath"
    path.write_text("{.metadata.name}")
    assert print_objects([vmim()], VMIM, f"jsonpath-file={path}", single=True) == "m1"


def test_custom_columns() -> None:
    unscheduled = vmi("vm2")
    del unscheduled["status"]["nodeName"]
    objs = [vmi("vm1"), unscheduled, vmi("vm3", nodeName=None)]
    spec = (
        "custom-columns=NAME:.metadata.name,NODE:status.nodeName,CONDS:{.status.conditions[*].type}"
    )
    assert print_objects(objs, VMI, spec) == (
        "NAME   NODE     CONDS\n"
        "vm1    node-a   Ready,LiveMigratable\n"
        "vm2    <none>   Ready,LiveMigratable\n"
        "vm3    <nil>    Ready,LiveMigratable\n"  # an explicit null, as kubectl prints it
    )


@pytest.mark.parametrize(
    ("output", "message"),
    [
        ("table", 'unable to match a printer suitable for the output format "table"'),
        ("jsonpath", "jsonpath format specified but no template given"),
        ("jsonpath=", "jsonpath format specified but no template given"),
        ("custom-columns=NAME", "expected <header>:<json-path-expr>"),
        ("custom-columns=", "no custom columns given"),
        ("jsonpath-file=/nonexistent/t", "error reading --template /nonexistent/t"),
    ],
)
def test_bad_output_formats(output: str, message: str) -> None:
    with pytest.raises(OutputFormatError, match=message):
        validate_output(output)
    with pytest.raises(OutputFormatError):
        print_objects([vmim()], VMIM, output)


def test_bad_template_is_reported_before_anything_is_printed() -> None:
    with pytest.raises(JsonPathError, match="error parsing jsonpath"):
        validate_output("jsonpath={.items[0")
    for ok in (None, "wide", "yaml", "json", "name", "jsonpath={.a}", "custom-columns=A:.a"):
        validate_output(ok)


# --- describe -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "label"),
    [
        ("apiVersion", "API Version"),
        ("uid", "UID"),
        ("migrationUid", "Migration UID"),
        ("migrationState", "Migration State"),
        ("phaseTransitionTimestamps", "Phase Transition Timestamps"),
        ("targetNodeAddress", "Target Node Address"),
        ("ipAddress", "Ip Address"),
        ("resourceVersion", "Resource Version"),
        ("evictionStrategy", "Eviction Strategy"),
        ("URLPath", "URL Path"),
        ("ca.crt", "ca.crt"),
        ("kubevirt.io/vm", "kubevirt.io/vm"),
        ("parallelMigrationsPerCluster", "Parallel Migrations Per Cluster"),
        ("bandwidthPerMigration", "Bandwidth Per Migration"),
    ],
)
def test_smart_label(field: str, label: str) -> None:
    assert smart_label(field) == label


def test_describe_vmi() -> None:
    obj = vmi(
        migrationState={
            "migrationUid": "m-uid",
            "sourceNode": "node-a",
            "targetNode": "node-b",
            "completed": True,
            "mode": "PreCopy",
        },
        phaseTransitionTimestamps=[
            {"phase": "Pending", "phaseTransitionTimestamp": "2025-01-10T11:56:40Z"},
            {"phase": "Running", "phaseTransitionTimestamp": "2025-01-10T11:56:50Z"},
        ],
    )
    obj["metadata"]["labels"] = {"kubevirt.io/vm": "vm1", "app": "db"}
    obj["metadata"]["annotations"] = {
        "kubevirt.io/latest-observed-api-version": "v1",
        "kubectl.kubernetes.io/last-applied-configuration": "{...}",
    }
    obj["metadata"]["generation"] = 3
    obj["metadata"]["managedFields"] = [{"manager": "x"}]
    obj["status"]["conditions"][1] = {
        "type": "LiveMigratable",
        "status": "False",
        "reason": "DisksNotLiveMigratable",
        "message": "cannot migrate VMI: PVC rootdisk is not shared",
    }
    assert describe(obj, VMI) == (
        "Name:         vm1\n"
        "Namespace:    default\n"
        "Labels:       app=db\n"
        "              kubevirt.io/vm=vm1\n"
        "Annotations:  kubevirt.io/latest-observed-api-version: v1\n"
        "API Version:  kubevirt.io/v1\n"
        "Kind:         VirtualMachineInstance\n"
        "Metadata:\n"
        "  Creation Timestamp:  2025-01-10T11:56:40Z\n"
        "  Generation:          3\n"
        "  Resource Version:    12\n"
        "  UID:                 0b5d\n"
        "Spec:\n"
        "  Domain:\n"
        "    Memory:\n"
        "      Guest:  1Gi\n"
        "Status:\n"
        "  Conditions:\n"
        "    Type            Status  Reason                  Message\n"
        "    ----            ------  ------                  -------\n"
        "    Ready           True\n"
        "    LiveMigratable  False   DisksNotLiveMigratable  cannot migrate VMI: PVC rootdisk is not shared\n"
        "  Migration State:\n"
        "    Completed:      true\n"
        "    Migration UID:  m-uid\n"
        "    Mode:           PreCopy\n"
        "    Source Node:    node-a\n"
        "    Target Node:    node-b\n"
        "  Node Name:        node-a\n"
        "  Phase:            Running\n"
        "  Phase Transition Timestamps:\n"
        "    Phase:                       Pending\n"
        "    Phase Transition Timestamp:  2025-01-10T11:56:40Z\n"
        "    Phase:                       Running\n"
        "    Phase Transition Timestamp:  2025-01-10T11:56:50Z\n"
        "Events:  <none>\n"
    )


def test_describe_cluster_scoped_without_labels() -> None:
    policy = {
        "apiVersion": "migrations.kubevirt.io/v1alpha1",
        "kind": "MigrationPolicy",
        "metadata": {"name": "fast", "uid": "u"},
        "spec": {
            "allowPostCopy": False,
            "bandwidthPerMigration": "1Gi",
            "selectors": {"namespaceSelector": {"tier": "gold"}},
            "extra": [1, "two", None, [3]],
        },
    }
    out = describe(policy, POLICY)
    assert "Namespace:" not in out
    assert out.startswith(
        "Name:         fast\nLabels:       <none>\nAnnotations:  <none>\nAPI Version:  migrations"
    )
    assert "  Allow Post Copy:          false\n" in out
    assert "  Bandwidth Per Migration:  1Gi\n" in out
    assert "  Extra:\n    1\n    two\n    <nil>\n    [3]\n" in out
    assert "  Selectors:\n    Namespace Selector:\n      Tier:  gold\n" in out
    assert out.endswith("Events:  <none>\n")


def test_describe_multi_line_value_and_missing_metadata() -> None:
    config_map = Kind("ConfigMap", "v1", "configmaps", True)
    obj = {"kind": "ConfigMap", "data": {"ca.crt": "line1\nline2"}}
    out = describe(obj, config_map)
    assert "Name:\nNamespace:\n" in out
    assert "Data:\n  ca.crt:  line1\nline2\n" in out
    assert "Metadata:\n" in out


def test_module_exports() -> None:
    for name in printers.__all__:
        assert hasattr(printers, name)
