"""Issue 18, the API and object side of cross-cluster (decentralized) live migration:

- HyperConverged ``spec.featureGates``: every known gate defaulted (also on a store from
  before), the reference's JSON-patch ``replace`` works, an unknown gate is refused;
- admission: ``sendTo``/``receive`` refused while the gate is off, migrationIDs not
  reused, the receiving VMI must wait;
- ``runStrategy: WaitAsReceiver``: the VM controller's waiting VMI, never scheduled, the
  run strategy restored once it runs, ``Failed`` when its migration failed;
- the migration controller leaves decentralized VMIMs alone;
- Pods: read-only views of the daemons (controller, handlers, sync controllers' Leases);
- RBAC: ``view`` reads pods; the sync controller's built-in role.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from controller import pods, rbac, scheduler
from controller.admission import Admission, is_decentralized
from controller.api import ApiService
from controller.main import bootstrap
from controller.migration_controller import MigrationController
from controller.objects import StoreSource, rfc3339
from controller.rbac_builtin import SYNC_CONTROLLER_ROLE
from controller.store import Store
from controller.vm_controller import WAITING_FOR_RECEIVER, VMController
from controller.vmi_controller import VMIController
from vmferry import grpc_options, pki
from vmferry.cli import printers
from vmferry.client import ApiClient
from vmferry.config import ClientConfig
from vmferry.decentralized import (
    FEATURE_GATE,
    FEATURE_GATES,
    RESTORE_RUN_STRATEGY_ANNOTATION,
    RUN_STRATEGY_WAIT_AS_RECEIVER,
    SYNC_ADDRESS_ANNOTATION,
    SYNC_IDENTITY,
    gate_off_message,
)
from vmferry.errors import Forbidden, Invalid, NotFound
from vmferry.informer import Informer
from vmferry.migration_state import VMIPhase
from vmferry.objects import kinds, schema
from vmferry.objects.jsonpath import render
from vmferry.rpc import api_pb2_grpc

pytestmark = pytest.mark.timeout(60)
Obj = dict[str, Any]
NS = "default"
HCO = ("HyperConverged", kinds.SYSTEM_NAMESPACE, kinds.HYPERCONVERGED_NAME)
GATE_PATCH = [{"op": "replace", "path": f"/spec/featureGates/{FEATURE_GATE}", "value": True}]


def vm(name: str = "v", *, strategy: str = "Always", restore: str | None = None) -> Obj:
    meta: Obj = {"name": name, "namespace": NS}
    if restore is not None:
        meta["annotations"] = {RESTORE_RUN_STRATEGY_ANNOTATION: restore}
    return {
        "apiVersion": kinds.KUBEVIRT,
        "kind": "VirtualMachine",
        "metadata": meta,
        "spec": {
            "runStrategy": strategy,
            "template": {"spec": {"domain": {"memory": {"guest": "64Mi"}}}},
        },
    }


def vmi(name: str = "v", phase: str = VMIPhase.RUNNING) -> Obj:
    return {
        "apiVersion": kinds.KUBEVIRT,
        "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "namespace": NS},
        "spec": {"domain": {"memory": {"guest": "64Mi"}}},
        "status": {"phase": phase, "nodeName": "node1" if phase == VMIPhase.RUNNING else ""},
    }


def vmim(name: str, vmi_name: str = "v", **side: Obj) -> Obj:
    return {
        "apiVersion": kinds.KUBEVIRT,
        "kind": "VirtualMachineInstanceMigration",
        "metadata": {"name": name, "namespace": NS, "uid": f"uid-{name}"},
        "spec": {"vmiName": vmi_name, **side},
    }


def send_to(migration_id: str = "m1") -> Obj:
    return {"sendTo": {"migrationID": migration_id, "connectURL": "10.0.0.2:9443"}}


def receive(migration_id: str = "m1") -> Obj:
    return {"receive": {"migrationID": migration_id}}


def node(name: str, ready: str | None = "True") -> Obj:
    status: Obj = {"addresses": [{"type": "InternalIP", "address": f"10.0.0.{name[-1]}"}]}
    if ready is not None:
        status["conditions"] = [{"type": "Ready", "status": ready}]
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "creationTimestamp": "2026-12-04T20:00:00Z"},
        "status": status,
    }


def lease(ident: str, renewed: float, duration: int = 15) -> Obj:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {
            "name": f"virt-synchronization-controller-{ident}",
            "namespace": kinds.SYSTEM_NAMESPACE,
            "annotations": {SYNC_ADDRESS_ANNOTATION: "192.168.1.5:9443"},
        },
        "spec": {
            "holderIdentity": ident,
            "leaseDurationSeconds": duration,
            "acquireTime": rfc3339(renewed - 60, precise=True),
            "renewTime": rfc3339(renewed, precise=True),
        },
    }


def informer(store: Store, kind: str) -> Informer:
    return Informer(StoreSource(store), kind)


def with_store(tmp_path: Path, body: Callable[[Store], Awaitable[None]]) -> None:
    async def main() -> None:
        store = await Store.open(tmp_path / "store.db")
        try:
            await bootstrap(store)
            await body(store)
        finally:
            await store.close()

    asyncio.run(main())


async def enable_gate(store: Store) -> None:
    hco = await store.get(*HCO)
    hco["spec"]["featureGates"][FEATURE_GATE] = True
    await store.update(hco)


# -- schema and defaults -------------------------------------------------------------------


def test_hyperconverged_defaults_every_feature_gate() -> None:
    hco = schema.validate(
        {
            "apiVersion": "hco.kubevirt.io/v1beta1",
            "kind": "HyperConverged",
            "metadata": {"name": "h", "namespace": "openshift-cnv"},
            "spec": {"featureGates": {FEATURE_GATE: True}},
        }
    )
    gates = schema.apply_defaults(hco)["spec"]["featureGates"]
    assert gates == {**FEATURE_GATES, FEATURE_GATE: True}  # the user's value wins


def test_an_unknown_feature_gate_is_refused_listing_the_known_ones() -> None:
    hco = {
        "apiVersion": "hco.kubevirt.io/v1beta1",
        "kind": "HyperConverged",
        "metadata": {"name": "h", "namespace": "openshift-cnv"},
        "spec": {"featureGates": {"decentralisedLiveMigration": True}},
    }
    with pytest.raises(Invalid) as e:
        schema.validate(hco)
    assert "spec.featureGates.decentralisedLiveMigration: unknown feature gate" in e.value.message
    for gate in FEATURE_GATES:
        assert gate in e.value.message


def test_sync_addresses_are_host_port_lists() -> None:
    base = vmim("r", **receive())
    ok = copy.deepcopy(base)
    ok["status"] = {"synchronizationAddresses": ["10.0.0.1:9443", "[fd00::1]:9443", "sync.c2:1"]}
    schema.validate(ok)
    bad = copy.deepcopy(base)
    bad["status"] = {"synchronizationAddresses": ["10.0.0.1"]}
    with pytest.raises(
        Invalid, match=r"status.synchronizationAddresses\[0\]|synchronizationAddresses"
    ):
        schema.validate(bad)
    hco = {
        "apiVersion": "hco.kubevirt.io/v1beta1",
        "kind": "HyperConverged",
        "metadata": {"name": "h", "namespace": "openshift-cnv"},
        "status": {"synchronizationAddresses": ["10.0.0.1:9443"], "versions": []},
    }
    schema.validate(hco)  # the status is open: other fields pass


def test_wait_as_receiver_and_its_restore_annotation() -> None:
    schema.validate(vm(strategy=RUN_STRATEGY_WAIT_AS_RECEIVER, restore="Always"))
    for wrong in (RUN_STRATEGY_WAIT_AS_RECEIVER, "Sometimes"):
        with pytest.raises(Invalid) as e:
            schema.validate(vm(strategy=RUN_STRATEGY_WAIT_AS_RECEIVER, restore=wrong))
        assert f"metadata.annotations[{RESTORE_RUN_STRATEGY_ANNOTATION}]" in e.value.message
        assert (
            '"Always"' in e.value.message
            and f'"{RUN_STRATEGY_WAIT_AS_RECEIVER}"'
            not in (e.value.message.partition("supported values:")[2])
        )


def test_bootstrap_fills_the_gates_into_an_existing_hyperconverged(tmp_path: Path) -> None:
    async def main() -> None:
        store = await Store.open(tmp_path / "store.db")
        try:
            await store.create(
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": kinds.SYSTEM_NAMESPACE},
                }
            )
            old = {  # as a controller before issue 18 stored it
                "apiVersion": "hco.kubevirt.io/v1beta1",
                "kind": "HyperConverged",
                "metadata": {"name": HCO[2], "namespace": HCO[1]},
                "spec": {"liveMigrationConfig": {"parallelMigrationsPerCluster": 3}},
            }
            await store.create(old)
            await bootstrap(store)
            hco = await store.get(*HCO)
            assert hco["spec"]["featureGates"] == FEATURE_GATES
            assert hco["spec"]["liveMigrationConfig"]["parallelMigrationsPerCluster"] == 3
        finally:
            await store.close()

    asyncio.run(main())


# -- admission -------------------------------------------------------------------------------


def test_decentralized_migrations_need_the_feature_gate(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        admission = Admission(store)
        await store.create(vmi())
        for side in (send_to(), receive()):
            with pytest.raises(Invalid) as e:
                await admission.admit_create(vmim("m", **side))
            assert gate_off_message() in e.value.message
        await admission.admit_create(vmim("plain"))  # an ordinary migration needs no gate
        await enable_gate(store)
        await admission.admit_create(vmim("m", **send_to()))

    with_store(tmp_path, body)


def test_a_migration_id_is_not_reused_while_its_migration_runs(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        admission = Admission(store)
        await enable_gate(store)
        await store.create(vmi("a"))
        await store.create(vmi("b"))
        await store.create(vmim("first", "a", **send_to("m1")))
        with pytest.raises(Invalid, match="'m1' is already used by the unfinished migration"):
            await admission.admit_create(vmim("second", "b", **send_to("m1")))
        await admission.admit_create(vmim("other", "b", **send_to("m2")))

    with_store(tmp_path, body)


def test_the_receiving_side_needs_a_waiting_vmi_or_a_receiving_vm(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        admission = Admission(store)
        await enable_gate(store)
        with pytest.raises(Invalid, match="no VirtualMachine of that name has runStrategy"):
            await admission.admit_create(vmim("r", "w", **receive()))
        await store.create(vm("w", strategy=RUN_STRATEGY_WAIT_AS_RECEIVER, restore="Always"))
        await admission.admit_create(vmim("r", "w", **receive()))  # its VMI comes later
        await store.create(vmi("w", VMIPhase.WAITING_FOR_SYNC))
        await admission.admit_create(vmim("r", "w", **receive()))
        await store.create(vmi("running"))
        with pytest.raises(Invalid, match="must be waiting to receive a migration"):
            await admission.admit_create(vmim("r2", "running", **receive("m2")))

    with_store(tmp_path, body)


# -- controllers -----------------------------------------------------------------------------


def test_a_receiving_vm_waits_then_restores_its_run_strategy(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        ctl = VMController(
            store, informer(store, "VirtualMachine"), informer(store, "VirtualMachineInstance")
        )
        await store.create(vm(strategy=RUN_STRATEGY_WAIT_AS_RECEIVER, restore="RerunOnFailure"))
        await ctl.reconcile((NS, "v"))
        waiting = await store.get("VirtualMachineInstance", NS, "v")
        assert waiting["status"]["phase"] == VMIPhase.WAITING_FOR_SYNC
        assert not waiting["status"].get("nodeName")
        got = await store.get("VirtualMachine", NS, "v")
        assert got["status"]["printableStatus"] == WAITING_FOR_RECEIVER

        # the VMI controller never places it, though a node fits
        await store.create(node("node1"))
        vmis = VMIController(
            store, informer(store, "VirtualMachineInstance"), informer(store, "Node")
        )
        await vmis.reconcile((NS, "v"))
        still = await store.get("VirtualMachineInstance", NS, "v")
        assert still["status"]["phase"] == VMIPhase.WAITING_FOR_SYNC
        assert not still["status"].get("nodeName")

        # the target handler resumed the guest: the VM becomes an ordinary VM
        still["status"].update(phase=VMIPhase.RUNNING, nodeName="node1")
        await store.update(still, subresource="status")
        await ctl.reconcile((NS, "v"))
        got = await store.get("VirtualMachine", NS, "v")
        assert got["spec"]["runStrategy"] == "RerunOnFailure"
        assert RESTORE_RUN_STRATEGY_ANNOTATION not in (got["metadata"].get("annotations") or {})
        assert got["status"]["printableStatus"] == "Running"

    with_store(tmp_path, body)


def test_a_receiving_vm_whose_migration_failed_shows_failed_and_stays(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        ctl = VMController(
            store, informer(store, "VirtualMachine"), informer(store, "VirtualMachineInstance")
        )
        await store.create(vm(strategy=RUN_STRATEGY_WAIT_AS_RECEIVER, restore="Always"))
        await ctl.reconcile((NS, "v"))
        waiting = await store.get("VirtualMachineInstance", NS, "v")
        waiting["status"]["phase"] = VMIPhase.FAILED
        await store.update(waiting, subresource="status")
        await ctl.reconcile((NS, "v"))
        await ctl.reconcile((NS, "v"))
        got = await store.get("VirtualMachine", NS, "v")
        assert got["status"]["printableStatus"] == "Failed"
        assert got["spec"]["runStrategy"] == RUN_STRATEGY_WAIT_AS_RECEIVER
        kept = await store.get("VirtualMachineInstance", NS, "v")
        assert kept["metadata"]["uid"] == waiting["metadata"]["uid"]  # no retry

    with_store(tmp_path, body)


def test_the_migration_controller_leaves_decentralized_migrations_alone(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        await store.create(vmi())
        created = await store.create(vmim("s", **send_to()))
        assert is_decentralized(created) and not is_decentralized(vmim("plain"))
        ctl = MigrationController(
            store,
            informer(store, "VirtualMachineInstanceMigration"),
            informer(store, "VirtualMachineInstance"),
            informer(store, "Node"),
            informer(store, "HyperConverged"),
        )
        await ctl.reconcile((NS, "s"))
        after = await store.get("VirtualMachineInstanceMigration", NS, "s")
        assert after["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
        assert not after["metadata"].get("finalizers")

    with_store(tmp_path, body)


# -- pods ------------------------------------------------------------------------------------


def test_pods_are_synthesized_from_the_controller_nodes_and_fresh_leases() -> None:
    now = 1_800_000_000.0
    rows = pods.synthesize(
        [node("node1"), node("node2", "False"), node("node3", None)],
        [
            lease("fresh", now - 3),
            lease("stale", now - 60),
            lease("gone", now - 3600),
            {**lease("x", now), "metadata": {"name": "other-lease", "namespace": "openshift-cnv"}},
        ],
        host="Host.Example",
        started=now - 300,
        now=now,
    )
    by_name = {p["metadata"]["name"]: p for p in rows}
    assert sorted(by_name) == [
        "virt-controller-host-example",
        "virt-handler-node1",
        "virt-handler-node2",
        "virt-handler-node3",
        "virt-synchronization-controller-fresh",
        "virt-synchronization-controller-stale",
    ]
    assert all(p["metadata"]["namespace"] == pods.POD_NAMESPACE for p in rows)
    phase = {n: (p["status"].get("reason") or p["status"]["phase"]) for n, p in by_name.items()}
    assert phase["virt-controller-host-example"] == "Running"
    assert phase["virt-handler-node1"] == "Running"
    assert phase["virt-handler-node2"] == "NotReady"
    assert phase["virt-handler-node3"] == "Unknown"
    assert phase["virt-synchronization-controller-fresh"] == "Running"
    assert phase["virt-synchronization-controller-stale"] == "Unknown"
    assert by_name["virt-handler-node1"]["spec"]["nodeName"] == "node1"
    assert by_name["virt-synchronization-controller-fresh"]["status"]["podIP"] == "192.168.1.5"
    for row in rows:
        schema.validate(row, server_managed=True)


def test_pod_writes_are_refused_with_the_read_only_message() -> None:
    kind = kinds.resolve("pod")
    for verb in ("create or update", "patch", "delete"):
        with pytest.raises(Forbidden, match=pods.READ_ONLY_MESSAGE):
            pods.refuse_write(kind, verb, "virt-handler-node1")
    pods.refuse_write(kinds.resolve("vm"), "delete")  # other kinds pass


# -- through the API ----------------------------------------------------------------------------


@asynccontextmanager
async def serving_api(tmp_path: Path) -> AsyncIterator[tuple[Path, int, Store]]:
    pki_dir = tmp_path / "pki"
    pki.init_ca(pki_dir, "xapi")
    server_tls = pki.issue_server(pki_dir, "controller", ips=["127.0.0.1"])
    store = await Store.open(tmp_path / "state.db")
    await bootstrap(store)
    server = grpc.aio.server(options=grpc_options.api_server_options())
    api_pb2_grpc.add_ApiServicer_to_server(ApiService(store, Admission(store)), server)
    port = server.add_secure_port("127.0.0.1:0", pki.server_credentials(server_tls))
    await server.start()
    try:
        yield pki_dir, port, store
    finally:
        await server.stop(None)
        await store.close()


def client_for(pki_dir: Path, port: int, user: str, groups: tuple[str, ...] = ()) -> ApiClient:
    tls = pki.issue_user(pki_dir, user, groups=list(groups))
    return ApiClient(ClientConfig(server=f"127.0.0.1:{port}", tls=tls), timeout=30)


def test_through_the_api_gates_pods_and_the_sync_controller_role(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving_api(tmp_path) as (pki_dir, port, store):
            admin = client_for(pki_dir, port, "admin", ("system:masters",))
            sync = client_for(pki_dir, port, SYNC_IDENTITY)
            viewer = client_for(pki_dir, port, "viewer")
            try:
                # 12.4.1 as written, and its check
                await admin.patch(*HCO, GATE_PATCH, patch_type="json")
                hco = await admin.get(*HCO)
                assert render("{.spec.featureGates.decentralizedLiveMigration}", hco) == "true"
                with pytest.raises(Invalid, match="unknown feature gate"):
                    await admin.patch(*HCO, {"spec": {"featureGates": {"nope": True}}})

                await store.create(node("node1"))
                items, _ = await admin.list("Pod", kinds.SYSTEM_NAMESPACE)
                names = [p["metadata"]["name"] for p in items]
                assert "virt-handler-node1" in names
                assert any(n.startswith("virt-controller-") for n in names)
                assert (await admin.list("Pod", NS))[0] == []
                assert len((await admin.list("Pod"))[0]) == len(items)
                got = await admin.get("Pod", kinds.SYSTEM_NAMESPACE, "virt-handler-node1")
                assert got["spec"]["nodeName"] == "node1"
                with pytest.raises(NotFound):
                    await admin.get("Pod", kinds.SYSTEM_NAMESPACE, "virt-handler-node9")
                with pytest.raises(Forbidden, match=pods.READ_ONLY_MESSAGE):
                    await admin.delete("Pod", kinds.SYSTEM_NAMESPACE, "virt-handler-node1")
                with pytest.raises(Forbidden, match=pods.READ_ONLY_MESSAGE):
                    await admin.create({**got, "metadata": {"name": "p", "namespace": NS}})
                with pytest.raises(Forbidden, match=pods.READ_ONLY_MESSAGE):
                    await admin.patch("Pod", kinds.SYSTEM_NAMESPACE, "virt-handler-node1", {})

                # view reads pods; without it, no (aggregated as the rbac reconciler does)
                roles, _ = await store.list("ClusterRole", "")
                view = await store.get("ClusterRole", "", "view")
                view["rules"] = rbac.aggregated_rules(view, roles)
                await store.update(view)
                with pytest.raises(Forbidden, match='cannot list resource "pods"'):
                    await viewer.list("Pod", kinds.SYSTEM_NAMESPACE)
                await admin.create(
                    {
                        "apiVersion": rbac.RBAC_API_VERSION,
                        "kind": "RoleBinding",
                        "metadata": {"name": "viewer", "namespace": kinds.SYSTEM_NAMESPACE},
                        "roleRef": {
                            "apiGroup": rbac.RBAC_GROUP,
                            "kind": "ClusterRole",
                            "name": "view",
                        },
                        "subjects": [
                            {"apiGroup": rbac.RBAC_GROUP, "kind": "User", "name": "viewer"}
                        ],
                    }
                )
                assert (await viewer.list("Pod", kinds.SYSTEM_NAMESPACE))[0]

                # the sync controller: its Lease makes a row; it writes the HCO status
                role = await admin.get("ClusterRole", None, SYNC_CONTROLLER_ROLE)
                assert role["rules"]
                fresh = lease("s1", 0)
                fresh["spec"] = {"holderIdentity": "s1", "leaseDurationSeconds": 15}
                created = await sync.create(fresh)
                created["spec"]["renewTime"] = created["metadata"]["creationTimestamp"]
                await sync.update(created)
                items, _ = await sync.list("Pod", kinds.SYSTEM_NAMESPACE)
                row = next(p for p in items if p["metadata"]["name"].endswith("-s1"))
                assert row["status"]["phase"] == "Running"
                await sync.patch(
                    *HCO,
                    {"status": {"synchronizationAddresses": ["10.0.0.1:9443"]}},
                    subresource="status",
                )
                with pytest.raises(Forbidden):
                    await sync.patch(*HCO, GATE_PATCH, patch_type="json")  # spec: not its own
                with pytest.raises(Forbidden, match='cannot create resource "configmaps"'):
                    await sync.create(
                        {
                            "apiVersion": "v1",
                            "kind": "ConfigMap",
                            "metadata": {"name": "c", "namespace": NS},
                        }
                    )
            finally:
                for c in (admin, sync, viewer):
                    await c.close()

    asyncio.run(main())


# -- printers and placement ------------------------------------------------------------------


def test_pod_rows_print_as_kubectl_does() -> None:
    now = 1_800_000_000.0
    rows = pods.synthesize(
        [node("node1"), node("node2", "False")], [lease("a", now)], host="h", started=now, now=now
    )
    moment = datetime.fromtimestamp(now + 300, UTC)
    table = printers.print_objects(rows, kinds.resolve("pod"), None, now=moment)
    lines = [line.split() for line in table.splitlines()]
    assert lines[0] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert ["virt-controller-h", "1/1", "Running", "0", "5m"] in lines
    assert ["virt-handler-node2", "0/1", "NotReady", "0"] == lines[3][:4]
    assert ["virt-synchronization-controller-a", "1/1", "Running", "0", "6m"] in lines
    wide = printers.print_objects(rows, kinds.resolve("pod"), "wide", now=moment)
    assert wide.splitlines()[0].split()[-2:] == ["IP", "NODE"]
    assert "10.0.0.1" in wide and "node1" in wide


def test_decentralized_phases_print() -> None:
    obj = vmim("r", **receive()) | {"status": {"phase": "WaitingForSync"}}
    table = printers.print_objects([obj], kinds.resolve("vmim"), None)
    assert table.splitlines()[1].split()[:3] == ["r", "WaitingForSync", "v"]
    obj["status"]["phase"] = "Synchronizing"
    assert "Synchronizing" in printers.print_objects([obj], kinds.resolve("vmim"), None)


def test_a_waiting_vmi_counts_on_its_target_only_once_named() -> None:
    small = node("node1")
    small["status"]["allocatable"] = {"memory": "100Mi"}
    waiting = vmi("w", VMIPhase.WAITING_FOR_SYNC)
    assert scheduler.memory_in_use("node1", [waiting]) == 0
    assert scheduler.place(vmi("new", VMIPhase.PENDING), [small], [waiting]).node == "node1"
    waiting["status"]["migrationState"] = {"migrationUid": "u", "targetNode": "node1"}
    assert scheduler.memory_in_use("node1", [waiting]) == 64 << 20
    placed = scheduler.place(vmi("new", VMIPhase.PENDING), [small], [waiting])
    assert placed.node is None and "insufficient memory" in placed.message()


def test_a_sent_vm_is_not_restarted_on_its_source(tmp_path: Path) -> None:
    async def body(store: Store) -> None:
        ctl = VMController(
            store, informer(store, "VirtualMachine"), informer(store, "VirtualMachineInstance")
        )
        await store.create(vm())
        await ctl.reconcile((NS, "v"))
        sent = await store.get("VirtualMachineInstance", NS, "v")
        sent["status"] = {
            "phase": VMIPhase.SUCCEEDED,
            "migrationState": {
                "migrationUid": "u",
                "switchover": "Committed",
                "role": "sender",
                "peerCluster": "cluster2",
            },
        }
        await store.update(sent, subresource="status")
        await ctl.reconcile((NS, "v"))
        kept = await store.get("VirtualMachineInstance", NS, "v")
        assert kept["metadata"]["uid"] == sent["metadata"]["uid"]
        assert not kept["metadata"].get("deletionTimestamp")

    with_store(tmp_path, body)
