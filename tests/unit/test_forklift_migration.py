"""The orchestrator's Plan and Migration reconcilers with two clusters (StoreApi over two
real Stores; the tests play the sync controllers by writing the VMIMs' status), and the
RBAC refusal through a real destination API with a token that lacks the reference's
cluster role (12.6.1.1)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.forklift.cluster import ClusterApi
from controller.forklift.migration import FINALIZER, MigrationReconciler
from controller.forklift.plan import PlanReconciler
from controller.forklift.provider import ProviderAccess, ProviderReconciler, TokenConnector
from controller.main import bootstrap
from controller.store import Store
from tests.support.fake_api import FakeClock, StoreApi
from tests.support.forklift_clusters import (
    MTV_CLUSTERROLE,
    provider,
    provider_secret,
    service_account_token,
    token_cluster,
)
from vmferry import pki
from vmferry.decentralized import (
    FEATURE_GATE,
    RESTORE_RUN_STRATEGY_ANNOTATION,
    RUN_STRATEGY_WAIT_AS_RECEIVER,
    SYNC_ADDRESSES_FIELD,
)
from vmferry.errors import NotFound
from vmferry.migration_state import Field, MigrationPhase
from vmferry.objects import conditions, kinds
from vmferry.objects.schema.forklift import FEATURE_OCP_LIVE_MIGRATION, MigrationRunPhase, VMPhase

Obj = dict[str, Any]
MTV = kinds.MTV_NAMESPACE
VMIM = "VirtualMachineInstanceMigration"
SYNC_ADDRESS = "10.0.0.2:9443"
C2_SERVER = "cluster2.example:7444"


class TwoClusters:
    """Reaches "cluster2" by its server address; the host provider is home."""

    def __init__(self, home: StoreApi, remote: dict[str, ClusterApi]) -> None:
        self.home = home
        self.remote = remote

    async def check(self, access: ProviderAccess) -> str:
        return "this cluster" if access.local else "system:serviceaccount:mtv:mtv-provider"

    async def connect(self, access: ProviderAccess) -> ClusterApi:
        return self.home if access.local else self.remote[access.server]


async def enable_gates(api: StoreApi | Store) -> None:
    fc = await api.get("ForkliftController", MTV, kinds.FORKLIFT_CONTROLLER_NAME)
    fc["spec"][FEATURE_OCP_LIVE_MIGRATION] = "true"
    await api.update(fc)
    hco = await api.get("HyperConverged", kinds.SYSTEM_NAMESPACE, kinds.HYPERCONVERGED_NAME)
    hco["spec"].setdefault("featureGates", {})[FEATURE_GATE] = True
    await api.update(hco)


def vm_manifest(name: str = "vm1", ns: str = "default") -> Obj:
    return {
        "apiVersion": kinds.KUBEVIRT,
        "kind": "VirtualMachine",
        "metadata": {"name": name, "namespace": ns, "labels": {"app": "busy"}},
        "spec": {
            "runStrategy": "Always",
            "template": {"spec": {"domain": {"memory": {"guest": "64Mi"}}, "memvm": {}}},
        },
    }


def plan_manifest(vms: list[str], name: str = "plan1") -> Obj:
    return {
        "apiVersion": kinds.FORKLIFT,
        "kind": "Plan",
        "metadata": {"name": name, "namespace": MTV},
        "spec": {
            "type": "live",
            "provider": {"source": {"name": "host"}, "destination": {"name": "cluster2"}},
            "targetNamespace": "moved",
            "vms": [{"name": vm, "namespace": "default"} for vm in vms],
        },
    }


def migration_manifest(name: str = "m1", plan: str = "plan1") -> Obj:
    return {
        "apiVersion": kinds.FORKLIFT,
        "kind": "Migration",
        "metadata": {"name": name, "namespace": MTV},
        "spec": {"plan": {"name": plan, "namespace": MTV}},
    }


@dataclass
class Lab:
    home: StoreApi
    dest: StoreApi
    reconciler: MigrationReconciler
    clock: FakeClock

    async def reconcile(self, name: str = "m1") -> Obj:
        await self.reconciler.reconcile((MTV, name))
        return await self.home.get("Migration", MTV, name)

    async def vm_status(self, name: str = "m1", index: int = 0) -> Obj:
        migration = await self.home.get("Migration", MTV, name)
        vm: Obj = migration["status"]["vms"][index]
        return vm

    async def set_vmim(self, api: StoreApi, ns: str, name: str, **status: Any) -> None:
        vmim = await api.get(VMIM, ns, name)
        vmim.setdefault("status", {}).update(status)
        await api.update(vmim, subresource="status")


async def start_vm(home: StoreApi, name: str = "vm1") -> None:
    await home.create(vm_manifest(name))
    await home.create(
        {
            "apiVersion": kinds.KUBEVIRT,
            "kind": "VirtualMachineInstance",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"domain": {"memory": {"guest": "64Mi"}}},
            "status": {"phase": "Running", "nodeName": "node1"},
        }
    )


def run(
    tmp_path: Path,
    test: Callable[[Lab], Awaitable[None]],
    *,
    gates: bool = True,
    vms: tuple[str, ...] = ("vm1",),
) -> None:
    async def main() -> None:
        home = StoreApi(await Store.open(tmp_path / "home.db"))
        dest = StoreApi(await Store.open(tmp_path / "dest.db"))
        try:
            for api in (home, dest):
                await bootstrap(api.store)
                if gates:
                    await enable_gates(api)
            pki.init_ca(tmp_path / "c2pki", "cluster2")
            ca = (tmp_path / "c2pki" / pki.CA_CERT_FILE).read_bytes()
            await home.create(provider("host", MTV))
            await home.create(provider_secret("c2", MTV, "a-token", ca))
            await home.create(provider("cluster2", MTV, f"https://{C2_SERVER}", "c2"))
            connector = TwoClusters(home, {C2_SERVER: dest})
            for name in ("host", "cluster2"):
                await ProviderReconciler(home, connector).reconcile((MTV, name))
            for vm in vms:
                await start_vm(home, vm)
            await home.create(plan_manifest(list(vms)))
            await PlanReconciler(home).reconcile((MTV, "plan1"))
            plan = await home.get("Plan", MTV, "plan1")
            assert conditions.is_true(plan, "Ready"), plan["status"]
            await home.create(migration_manifest())
            clock = FakeClock(1_700_000_000)
            await test(Lab(home, dest, MigrationReconciler(home, connector, clock), clock))
        finally:
            await home.close()
            await dest.close()

    asyncio.run(main())


@pytest.mark.timeout(30)
def test_migration_creates_receiver_then_sender_and_follows_both(tmp_path: Path) -> None:
    async def test(lab: Lab) -> None:
        migration = await lab.reconcile()
        assert FINALIZER in migration["metadata"]["finalizers"]
        assert migration["status"]["phase"] == MigrationRunPhase.RUNNING
        vm = await lab.vm_status()
        assert vm["phase"] == VMPhase.RECEIVING, vm
        mid = vm["migrationID"]
        # the receiving VM: a copy waiting as receiver, restoring the source's strategy
        copy = await lab.dest.get("VirtualMachine", "moved", "vm1")
        assert copy["spec"]["runStrategy"] == RUN_STRATEGY_WAIT_AS_RECEIVER
        assert copy["metadata"]["annotations"][RESTORE_RUN_STRATEGY_ANNOTATION] == "Always"
        assert copy["metadata"]["labels"]["app"] == "busy"
        assert copy["spec"]["template"] == vm_manifest()["spec"]["template"]
        receiving = await lab.dest.get(VMIM, "moved", vm["destinationMigration"])
        assert receiving["spec"] == {"vmiName": "vm1", "receive": {"migrationID": mid}}
        # no sending VMIM until the destination publishes where its sync controller is
        items, _ = await lab.home.store.list(VMIM, "default")
        assert items == []
        assert "synchronization address" in vm["reason"]
        await lab.set_vmim(
            lab.dest,
            "moved",
            vm["destinationMigration"],
            phase=MigrationPhase.WAITING_FOR_SYNC,
            **{SYNC_ADDRESSES_FIELD: [SYNC_ADDRESS]},
        )
        await lab.reconcile()
        vm = await lab.vm_status()
        assert vm["phase"] == VMPhase.MIGRATING
        sending = await lab.home.get(VMIM, "default", vm["sourceMigration"])
        assert sending["spec"] == {
            "vmiName": "vm1",
            "sendTo": {"migrationID": mid, "connectURL": SYNC_ADDRESS},
        }
        # following: phases of both sides in the reason
        await lab.set_vmim(lab.home, "default", vm["sourceMigration"], phase=MigrationPhase.RUNNING)
        await lab.reconcile()
        vm = await lab.vm_status()
        assert vm["reason"] == "sending: Running, receiving: WaitingForSync"
        await lab.set_vmim(
            lab.home, "default", vm["sourceMigration"], phase=MigrationPhase.SUCCEEDED
        )
        await lab.reconcile()
        assert (await lab.vm_status())["phase"] == VMPhase.MIGRATING  # the receiver not yet
        await lab.set_vmim(
            lab.dest, "moved", vm["destinationMigration"], phase=MigrationPhase.SUCCEEDED
        )
        migration = await lab.reconcile()
        assert migration["status"]["phase"] == MigrationRunPhase.SUCCEEDED
        vm = await lab.vm_status()
        assert vm["phase"] == VMPhase.SUCCEEDED
        assert vm["reason"] == "running on cluster2/moved"
        assert vm["completed"]
        migration = await lab.reconcile()  # the next pass lets the finished Migration go
        assert FINALIZER not in (migration["metadata"].get("finalizers") or [])

    run(tmp_path, test)


@pytest.mark.timeout(30)
def test_migration_ids_are_unique_per_vm_and_run(tmp_path: Path) -> None:
    async def test(lab: Lab) -> None:
        await lab.reconcile()
        ids = {(await lab.vm_status(index=i))["migrationID"] for i in range(2)}
        assert len(ids) == 2
        await lab.home.create(migration_manifest("m2"))
        await lab.reconcile("m2")
        m2 = await lab.home.get("Migration", MTV, "m2")
        # the second run of the plan: its receiving VMs exist (from m1) → refused, new ids
        assert {v["migrationID"] for v in m2["status"]["vms"]}.isdisjoint(ids)

    run(tmp_path, test, vms=("vm1", "vm2"))


@pytest.mark.timeout(30)
def test_a_failed_receiving_migration_fails_the_vm_and_leaves_it_on_the_source(
    tmp_path: Path,
) -> None:
    async def test(lab: Lab) -> None:
        await lab.reconcile()
        vm = await lab.vm_status()
        await lab.set_vmim(
            lab.dest, "moved", vm["destinationMigration"], **{SYNC_ADDRESSES_FIELD: [SYNC_ADDRESS]}
        )
        await lab.reconcile()
        await lab.set_vmim(
            lab.dest,
            "moved",
            vm["destinationMigration"],
            phase=MigrationPhase.FAILED,
            migrationState={Field.FAILURE_REASON: "no node fits 64Mi"},
        )
        migration = await lab.reconcile()
        assert migration["status"]["phase"] == MigrationRunPhase.FAILED
        vm = await lab.vm_status()
        assert vm["phase"] == VMPhase.FAILED
        assert "the receiving migration failed: no node fits 64Mi" in vm["reason"]
        assert "1 of 1 VM(s) failed" in migration["status"]["reason"]
        source = await lab.home.get("VirtualMachine", "default", "vm1")
        assert source["spec"]["runStrategy"] == "Always"  # never touched

    run(tmp_path, test)


@pytest.mark.timeout(30)
def test_deleting_the_migration_cancels_the_sending_vmim(tmp_path: Path) -> None:
    async def test(lab: Lab) -> None:
        await lab.reconcile()
        vm = await lab.vm_status()
        await lab.set_vmim(
            lab.dest, "moved", vm["destinationMigration"], **{SYNC_ADDRESSES_FIELD: [SYNC_ADDRESS]}
        )
        await lab.reconcile()
        vm = await lab.vm_status()
        await lab.home.get(VMIM, "default", vm["sourceMigration"])
        await lab.home.delete("Migration", MTV, "m1")  # held by the finalizer
        assert (await lab.home.get("Migration", MTV, "m1"))["metadata"]["deletionTimestamp"]
        await lab.reconciler.reconcile((MTV, "m1"))
        with pytest.raises(NotFound):
            await lab.home.get(VMIM, "default", vm["sourceMigration"])
        with pytest.raises(NotFound):
            await lab.home.get("Migration", MTV, "m1")

    run(tmp_path, test)


@pytest.mark.timeout(30)
def test_cancel_before_the_sender_exists_deletes_the_receiving_vmim(tmp_path: Path) -> None:
    async def test(lab: Lab) -> None:
        await lab.reconcile()
        vm = await lab.vm_status()
        await lab.home.delete("Migration", MTV, "m1")
        await lab.reconciler.reconcile((MTV, "m1"))
        with pytest.raises(NotFound):
            await lab.dest.get(VMIM, "moved", vm["destinationMigration"])

    run(tmp_path, test)


@pytest.mark.timeout(30)
def test_a_deleted_sending_vmim_cancels_the_vm(tmp_path: Path) -> None:
    async def test(lab: Lab) -> None:
        await lab.reconcile()
        vm = await lab.vm_status()
        await lab.set_vmim(
            lab.dest, "moved", vm["destinationMigration"], **{SYNC_ADDRESSES_FIELD: [SYNC_ADDRESS]}
        )
        await lab.reconcile()
        vm = await lab.vm_status()
        await lab.home.delete(VMIM, "default", vm["sourceMigration"])
        migration = await lab.reconcile()
        vm = await lab.vm_status()
        assert vm["phase"] == VMPhase.CANCELED
        assert "was deleted (canceled); the VM stays on the source" in vm["reason"]
        assert migration["status"]["phase"] == MigrationRunPhase.CANCELED

    run(tmp_path, test)


@pytest.mark.timeout(30)
def test_gates_off_fail_the_migration_saying_which(tmp_path: Path) -> None:
    async def test(lab: Lab) -> None:
        migration = await lab.reconcile()
        assert migration["status"]["phase"] == MigrationRunPhase.FAILED
        assert FEATURE_OCP_LIVE_MIGRATION in migration["status"]["reason"]
        assert "this cluster" in migration["status"]["reason"]
        # only the MTV gate here: the HyperConverged gate is named next
        fc = await lab.home.get("ForkliftController", MTV, kinds.FORKLIFT_CONTROLLER_NAME)
        fc["spec"][FEATURE_OCP_LIVE_MIGRATION] = "true"
        await lab.home.update(fc)
        await lab.home.create(migration_manifest("m2"))
        m2 = await lab.reconcile("m2")
        assert FEATURE_GATE in m2["status"]["reason"]
        # both gates here, none on the destination
        await enable_gates(lab.home)
        await lab.home.create(migration_manifest("m3"))
        m3 = await lab.reconcile("m3")
        assert "the destination (provider cluster2)" in m3["status"]["reason"]
        assert FEATURE_OCP_LIVE_MIGRATION in m3["status"]["reason"]
        assert m3["status"]["vms"][0]["phase"] == VMPhase.FAILED
        items, _ = await lab.dest.store.list("VirtualMachine", "moved")
        assert items == []

    run(tmp_path, test, gates=False)


@pytest.mark.timeout(30)
def test_a_vm_that_is_not_running_is_refused(tmp_path: Path) -> None:
    async def test(lab: Lab) -> None:
        vmi = await lab.home.get("VirtualMachineInstance", "default", "vm1")
        vmi["status"]["phase"] = "Succeeded"
        await lab.home.update(vmi, subresource="status")
        await lab.reconcile()
        vm = await lab.vm_status()
        assert vm["phase"] == VMPhase.FAILED
        assert "is not running" in vm["reason"]

    run(tmp_path, test)


def mtv_role_without_forklift() -> Obj:
    """12.6.1.1's role minus its forklift.konveyor.io rule: less than the reference's."""
    role = yaml.safe_load(MTV_CLUSTERROLE.read_text())
    role["metadata"]["name"] = "live-migration-role-partial"
    role["rules"] = [r for r in role["rules"] if r["apiGroups"] != ["forklift.konveyor.io"]]
    assert len(role["rules"]) == 3
    return role


async def bind(store: Store, role: Obj, account: str) -> None:
    await store.create(role)
    await store.create(
        {
            "apiVersion": kinds.RBAC,
            "kind": "ClusterRoleBinding",
            "metadata": {"name": f"{account}-{role['metadata']['name']}"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": role["metadata"]["name"],
            },
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": "mtv"}],
        }
    )


async def migrate_through_real_api(tmp_path: Path, role: str) -> Obj:
    """Run m1 once against a real cluster2 whose provider token has ``role``: "none",
    "partial" (less than the reference's role) or "mtv" (12.6.1.1's role)."""
    home = StoreApi(await Store.open(tmp_path / "home.db"))
    await bootstrap(home.store)
    await enable_gates(home)
    try:
        async with token_cluster(tmp_path, "cluster2") as c2:
            await enable_gates(c2.store)
            token = await service_account_token(
                c2.store, c2.signer, "mtv", "mtv-provider", mtv_role=role == "mtv"
            )
            if role == "partial":
                await bind(c2.store, mtv_role_without_forklift(), "mtv-provider")
            await c2.store.create(
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "moved"}}
            )
            await home.create(provider("host", MTV))
            await home.create(provider_secret("c2", MTV, token, c2.ca_pem))
            await home.create(provider("cluster2", MTV, c2.url, "c2"))
            connector = TokenConnector(home, tmp_path / "cas", timeout=5)
            try:
                for name in ("host", "cluster2"):
                    await ProviderReconciler(home, connector).reconcile((MTV, name))
                assert conditions.is_true(await home.get("Provider", MTV, "cluster2"), "Ready")
                await start_vm(home)
                await home.create(plan_manifest(["vm1"]))
                await home.create(migration_manifest())
                await MigrationReconciler(home, connector).reconcile((MTV, "m1"))
            finally:
                await connector.close()
            return await home.get("Migration", MTV, "m1")
    finally:
        await home.close()


@pytest.mark.timeout(60)
def test_a_provider_token_without_a_role_is_refused_with_the_rbac_message(
    tmp_path: Path,
) -> None:
    """The destination is a real API (TLS, token, RBAC): the service account exists and its
    token is valid (the provider is Ready), but no cluster role is bound to it."""
    migration = asyncio.run(migrate_through_real_api(tmp_path, "none"))
    reason = migration["status"]["reason"]
    assert migration["status"]["phase"] == MigrationRunPhase.FAILED
    # the destination's own refusal: it cannot even read its ForkliftController
    assert (
        'forkliftcontrollers.forklift.konveyor.io "forklift-controller" is forbidden: User '
        '"system:serviceaccount:mtv:mtv-provider" cannot get resource "forkliftcontrollers"'
    ) in reason, reason
    assert migration["status"]["vms"][0]["phase"] == VMPhase.FAILED


@pytest.mark.timeout(60)
def test_a_provider_token_with_less_than_the_mtv_role_is_refused(tmp_path: Path) -> None:
    migration = asyncio.run(migrate_through_real_api(tmp_path, "partial"))
    vm = migration["status"]["vms"][0]
    assert vm["phase"] == VMPhase.FAILED
    assert vm["reason"].startswith("provider cluster2 refused: "), vm["reason"]
    assert ('forkliftcontrollers.forklift.konveyor.io "forklift-controller" is forbidden') in vm[
        "reason"
    ]


@pytest.mark.timeout(60)
def test_the_mtv_cluster_role_is_enough(tmp_path: Path) -> None:
    """With 12.6.1.1's role nothing the orchestrator does on the destination is forbidden
    (whether the destination accepts a WaitAsReceiver VM is its API's business)."""
    migration = asyncio.run(migrate_through_real_api(tmp_path, "mtv"))
    vm = migration["status"]["vms"][0]
    assert "forbidden" not in vm["reason"], vm["reason"]
    assert "forbidden" not in migration["status"].get("reason", "")


@pytest.mark.timeout(30)
def test_a_migration_waits_for_its_providers_first_check(tmp_path: Path) -> None:
    async def test(lab: Lab) -> None:
        c2 = await lab.home.get("Provider", MTV, "cluster2")
        c2["spec"]["url"] = f"https://{C2_SERVER}/"  # edited: not checked since
        await lab.home.update(c2)
        migration = await lab.reconcile()
        assert migration["status"]["phase"] == MigrationRunPhase.PENDING
        assert "waiting: the destination provider" in migration["status"]["reason"]
        assert "is being checked" in migration["status"]["reason"]
        await ProviderReconciler(lab.home, lab.reconciler.connector).reconcile((MTV, "cluster2"))
        migration = await lab.reconcile()
        assert migration["status"]["phase"] == MigrationRunPhase.RUNNING
        assert (await lab.vm_status())["phase"] == VMPhase.RECEIVING

    run(tmp_path, test)


@pytest.mark.timeout(30)
def test_a_provider_that_breaks_after_the_start_does_not_fail_the_running_vm(
    tmp_path: Path,
) -> None:
    async def test(lab: Lab) -> None:
        await lab.reconcile()
        secret = await lab.home.get("Secret", MTV, "c2")
        await lab.home.delete("Secret", MTV, "c2")
        migration = await lab.reconcile()
        assert migration["status"]["phase"] == MigrationRunPhase.RUNNING
        assert (
            'cannot follow the migration: secret "openshift-mtv/c2"'
            in (migration["status"]["reason"])
        )
        assert (await lab.vm_status())["phase"] == VMPhase.RECEIVING
        del secret["metadata"]["resourceVersion"], secret["metadata"]["uid"]
        await lab.home.create(secret)
        migration = await lab.reconcile()
        assert migration["status"]["reason"] == ""

    run(tmp_path, test)


@pytest.mark.timeout(30)
def test_at_home_the_controller_writes_through_validation_and_admission(tmp_path: Path) -> None:
    """The controller's home API (LocalApi): the finalizer, the statuses and the sending
    VMIM pass the schema and the admission the API server runs."""
    from controller.forklift.cluster import LocalApi

    async def test(lab: Lab) -> None:
        home = LocalApi(lab.home.store)
        reconciler = MigrationReconciler(home, lab.reconciler.connector, lab.clock)
        await reconciler.reconcile((MTV, "m1"))
        vm = await lab.vm_status()
        assert vm["phase"] == VMPhase.RECEIVING
        await lab.set_vmim(
            lab.dest, "moved", vm["destinationMigration"], **{SYNC_ADDRESSES_FIELD: [SYNC_ADDRESS]}
        )
        # an unfinished migration of the VM at home: admission refuses the sending VMIM
        await lab.home.create(
            {
                "apiVersion": kinds.KUBEVIRT,
                "kind": VMIM,
                "metadata": {"name": "in-flight", "namespace": "default"},
                "spec": {"vmiName": "vm1"},
                "status": {"phase": MigrationPhase.RUNNING},
            }
        )
        await reconciler.reconcile((MTV, "m1"))
        vm = await lab.vm_status()
        assert vm["phase"] == VMPhase.FAILED
        assert (
            'this cluster refused: VirtualMachineInstanceMigration for "default/vm1"'
            in (vm["reason"])
        )
        assert "in-flight migration detected" in vm["reason"]

    run(tmp_path, test)


@pytest.mark.timeout(30)
def test_at_home_the_sending_vmim_passes_admission(tmp_path: Path) -> None:
    from controller.forklift.cluster import LocalApi

    async def test(lab: Lab) -> None:
        reconciler = MigrationReconciler(
            LocalApi(lab.home.store), lab.reconciler.connector, lab.clock
        )
        await reconciler.reconcile((MTV, "m1"))
        vm = await lab.vm_status()
        await lab.set_vmim(
            lab.dest, "moved", vm["destinationMigration"], **{SYNC_ADDRESSES_FIELD: [SYNC_ADDRESS]}
        )
        await reconciler.reconcile((MTV, "m1"))
        vm = await lab.vm_status()
        assert vm["phase"] == VMPhase.MIGRATING, vm
        sending = await lab.home.get(VMIM, "default", vm["sourceMigration"])
        assert sending["spec"]["sendTo"]["connectURL"] == SYNC_ADDRESS

    run(tmp_path, test)
