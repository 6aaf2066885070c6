"""The MTV kinds' validation (ForkliftController, Provider, Plan, Migration), the
reference's 12.4.2 patch and check, the printers' tables and ``vmferry migrate
--to-cluster``'s arguments and objects."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import pytest

from controller.forklift.cluster import (
    bootstrap_forklift,
    forklift_controller_manifest,
    live_migration_feature,
)
from controller.store import Store
from tests.support.fake_api import StoreApi
from vmferry.cli import migrate_cmd
from vmferry.cli.main import build_parser
from vmferry.cli.printers import print_objects
from vmferry.errors import Invalid
from vmferry.objects import kinds
from vmferry.objects.patch import apply_json_patch
from vmferry.objects.schema import validate
from vmferry.objects.schema.forklift import FEATURE_OCP_LIVE_MIGRATION

Obj = dict[str, Any]
MTV = kinds.MTV_NAMESPACE

# Valid examples (tests/unit/test_schema.py checks them with every kind's).
FORKLIFT_VALID: dict[str, Obj] = {
    "ForkliftController": {
        "apiVersion": "forklift.konveyor.io/v1beta1",
        "kind": "ForkliftController",
        "metadata": {"name": "forklift-controller", "namespace": MTV},
        "spec": {"feature_ocp_live_migration": "true"},
    },
    "Provider": {
        "apiVersion": "forklift.konveyor.io/v1beta1",
        "kind": "Provider",
        "metadata": {"name": "cluster2", "namespace": MTV},
        "spec": {
            "type": "openshift",
            "url": "https://api.cluster2.example:6443",
            "secret": {"name": "cluster2-token", "namespace": MTV},
        },
        "status": {
            "phase": "Ready",
            "observedGeneration": 1,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "Connected",
                    "message": "connected",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
            ],
        },
    },
    "Plan": {
        "apiVersion": "forklift.konveyor.io/v1beta1",
        "kind": "Plan",
        "metadata": {"name": "move-busy", "namespace": MTV},
        "spec": {
            "type": "live",
            "provider": {
                "source": {"name": "host", "namespace": MTV},
                "destination": {"name": "cluster2", "namespace": MTV},
            },
            "targetNamespace": "default",
            "vms": [{"name": "busy-vm", "namespace": "default"}],
        },
    },
    "Migration": {
        "apiVersion": "forklift.konveyor.io/v1beta1",
        "kind": "Migration",
        "metadata": {"name": "move-busy-1", "namespace": MTV},
        "spec": {"plan": {"name": "move-busy", "namespace": MTV}},
        "status": {
            "phase": "Running",
            "started": "2026-01-01T00:00:00Z",
            "vms": [
                {
                    "name": "busy-vm",
                    "namespace": "default",
                    "phase": "Migrating",
                    "reason": "sending: Running, receiving: Running",
                    "migrationID": "busy-vm-mtv-0123456789",
                    "sourceMigration": "busy-vm-mtv-0123456789",
                    "destinationMigration": "busy-vm-mtv-0123456789",
                }
            ],
        },
    },
}


def example(kind: str) -> Obj:
    return copy.deepcopy(FORKLIFT_VALID[kind])


def refused(obj: Obj) -> str:
    with pytest.raises(Invalid) as info:
        validate(obj)
    return str(info.value)


@pytest.mark.parametrize("kind", sorted(FORKLIFT_VALID))
def test_examples_are_valid_and_unknown_fields_refused(kind: str) -> None:
    assert validate(example(kind)) == FORKLIFT_VALID[kind]
    obj = example(kind)
    obj["spec"]["bogus"] = 1
    assert 'spec.bogus: unknown field "bogus"' in refused(obj)


def test_kinds_resolve_like_oc() -> None:
    for spelling in ("ForkliftController", "forkliftcontrollers.forklift.konveyor.io"):
        assert kinds.resolve(spelling).kind == "ForkliftController"
    assert kinds.resolve("providers").kind == "Provider"
    assert kinds.resolve("plan").kind == "Plan"
    assert kinds.resolve("migrations.forklift.konveyor.io").kind == "Migration"
    assert kinds.resolve("vmim").kind == "VirtualMachineInstanceMigration"


def test_the_12_4_2_patch_and_check() -> None:
    fc = forklift_controller_manifest()
    assert not live_migration_feature(fc)
    patched = apply_json_patch(
        fc, [{"op": "add", "path": "/spec/feature_ocp_live_migration", "value": "true"}]
    )
    assert validate(patched)["spec"][FEATURE_OCP_LIVE_MIGRATION] == "true"
    assert live_migration_feature(patched)
    # a YAML boolean means the same; anything else is refused naming the values
    assert live_migration_feature({"spec": {FEATURE_OCP_LIVE_MIGRATION: True}})
    bad = apply_json_patch(
        fc, [{"op": "add", "path": "/spec/feature_ocp_live_migration", "value": "yes"}]
    )
    assert 'unsupported value "yes": supported values: "true", "false"' in refused(bad)


@pytest.mark.timeout(10)
def test_the_singleton_is_created_once_in_openshift_mtv(tmp_path: Path) -> None:
    async def main() -> None:
        store = await Store.open(tmp_path / "s.db")
        try:
            await bootstrap_forklift(store)
            fc = await store.get("ForkliftController", MTV, kinds.FORKLIFT_CONTROLLER_NAME)
            fc["spec"][FEATURE_OCP_LIVE_MIGRATION] = "true"
            await store.update(fc)
            await bootstrap_forklift(store)  # a restart keeps the administrator's setting
            fc = await store.get("ForkliftController", MTV, kinds.FORKLIFT_CONTROLLER_NAME)
            assert live_migration_feature(fc)
            await store.get("Namespace", "", MTV)
        finally:
            await store.close()

    asyncio.run(main())


def test_provider_rules() -> None:
    obj = example("Provider")
    obj["spec"]["type"] = "vsphere"
    assert 'provider type "vsphere" is not supported' in refused(obj)
    obj = example("Provider")
    del obj["spec"]["secret"]
    assert "spec.secret: required with a url" in refused(obj)
    obj = example("Provider")
    obj["spec"]["secret"] = {"namespace": MTV}
    assert "spec.secret.name: required field is missing" in refused(obj)
    host = {"apiVersion": kinds.FORKLIFT, "kind": "Provider", "metadata": {"name": "host"},
            "spec": {"type": "openshift"}}  # fmt: skip
    validate(host)  # the local provider: no url, no secret


@pytest.mark.parametrize("kind", ["cold", "warm"])
def test_plan_warm_and_cold_are_not_supported(kind: str) -> None:
    obj = example("Plan")
    obj["spec"]["type"] = kind
    assert f'spec.type: "{kind}" migrations are not supported' in refused(obj)


def test_plan_and_migration_rules() -> None:
    obj = example("Plan")
    del obj["spec"]["type"]
    assert "spec.type: required field is missing" in refused(obj)
    obj = example("Plan")
    obj["spec"]["vms"] = []
    assert "spec.vms: must name at least one VM" in refused(obj)
    obj = example("Plan")
    obj["spec"]["vms"] = [{"name": "Bad_Name"}]
    assert "spec.vms[0].name" in refused(obj)
    obj = example("Plan")
    del obj["spec"]["provider"]["destination"]
    assert "spec.provider.destination: required field is missing" in refused(obj)
    obj = example("Migration")
    obj["spec"] = {}
    assert "spec.plan: required field is missing" in refused(obj)
    obj = example("Migration")
    obj["status"]["vms"][0]["phase"] = "Teleported"
    assert 'status.vms[0].phase: unsupported value "Teleported"' in refused(obj)


def test_tables() -> None:
    out = print_objects([example("Provider")], kinds.by_kind("Provider"), None)
    assert out.split("\n")[0].split() == ["NAME", "TYPE", "STATUS", "READY", "URL", "AGE"]
    assert out.split("\n")[1].split()[:5] == [
        "cluster2", "openshift", "Ready", "True", "https://api.cluster2.example:6443"
    ]  # fmt: skip
    out = print_objects([example("Plan")], kinds.by_kind("Plan"), None)
    assert out.split("\n")[0].split() == ["NAME", "READY", "SOURCE", "TARGET", "VMS", "AGE"]
    assert out.split("\n")[1].split()[:4] == ["move-busy", "host", "cluster2", "1"]
    out = print_objects([example("Migration")], kinds.by_kind("Migration"), None)
    assert out.split("\n")[0].split()[:5] == ["NAME", "PLAN", "PHASE", "SUCCEEDED", "FAILED"]
    assert out.split("\n")[1].split()[:5] == ["move-busy-1", "move-busy", "Running", "0", "0"]


# -- vmferry migrate VM --to-cluster PROVIDER ---------------------------------------------------


def parse(*argv: str) -> Any:
    return build_parser().parse_args(["migrate", *argv])


def test_migrate_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse("busy-vm", "--to-cluster", "cluster2", "--wait", "-n", "apps")
    assert (args.vm, args.to_cluster, args.wait, args.namespace) == (
        "busy-vm", "cluster2", True, "apps"
    )  # fmt: skip
    assert parse("busy-vm").to_cluster is None
    assert (
        migrate_cmd.cmd_migrate(parse("vm", "--to-cluster", "c2", "--addedNodeSelector", "a=b"))
        == 1
    )
    assert "does not go with --to-cluster" in capsys.readouterr().err
    assert migrate_cmd.cmd_migrate(parse("vm", "--target-namespace", "x")) == 1
    assert "--target-namespace goes with --to-cluster" in capsys.readouterr().err
    assert migrate_cmd.cmd_migrate(parse("vm", "--to-cluster", "")) == 1
    assert "needs the name of a Provider" in capsys.readouterr().err


def test_the_one_vm_plan_and_its_migration_are_valid() -> None:
    plan = migrate_cmd.one_vm_plan("busy-vm", "apps", "cluster2", "moved")
    validate(plan)
    assert plan["spec"]["type"] == "live"
    assert plan["spec"]["vms"] == [{"name": "busy-vm", "namespace": "apps"}]
    assert plan["spec"]["provider"]["source"]["name"] == migrate_cmd.HOST_PROVIDER
    plan["metadata"]["name"] = "busy-vm-to-cluster2-abcde"
    migration = migrate_cmd.plan_migration(plan)
    validate(migration)
    assert migration["spec"]["plan"] == {"name": "busy-vm-to-cluster2-abcde", "namespace": MTV}
    validate(migrate_cmd.host_provider_manifest())


@pytest.mark.timeout(20)
def test_migrate_to_cluster_creates_host_plan_migration_and_waits(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async def main() -> None:
        api = StoreApi(await Store.open(tmp_path / "s.db"))
        try:
            code = await migrate_cmd.migrate_to_cluster(api, "busy-vm", "default", "cluster2")
            assert code == 1
            assert 'virtualmachine "busy-vm" not found in default' in capsys.readouterr().err
            await api.create(
                {"apiVersion": kinds.KUBEVIRT, "kind": "VirtualMachine",
                 "metadata": {"name": "busy-vm", "namespace": "default"}, "spec": {}}
            )  # fmt: skip
            code = await migrate_cmd.migrate_to_cluster(api, "busy-vm", "default", "cluster2")
            assert code == 1
            assert 'no provider "cluster2" in openshift-mtv' in capsys.readouterr().err
            await api.create(FORKLIFT_VALID["Provider"])
            code = await migrate_cmd.migrate_to_cluster(api, "busy-vm", "default", "cluster2")
            assert code == 0
            out = capsys.readouterr().out
            assert "provider.forklift.konveyor.io/host created" in out
            await api.get("Provider", MTV, "host")
            plans, _ = await api.list("Plan", MTV)
            migrations, _ = await api.list("Migration", MTV)
            assert len(plans) == len(migrations) == 1
            assert plans[0]["metadata"]["name"].startswith("busy-vm-to-cluster2-")
            assert migrations[0]["spec"]["plan"]["name"] == plans[0]["metadata"]["name"]

            async def orchestrator() -> None:  # what controller/forklift does, in short
                await asyncio.sleep(0.05)
                m = await api.get("Migration", MTV, migrations[0]["metadata"]["name"])
                m["status"] = {
                    "phase": "Succeeded",
                    "vms": [{"name": "busy-vm", "namespace": "default", "phase": "Succeeded",
                             "reason": "running on cluster2/default"}],
                }  # fmt: skip
                await api.update(m, subresource="status")

            task = asyncio.create_task(orchestrator())
            final = await migrate_cmd.follow_migration(
                api, migrations[0]["metadata"]["name"], timeout=5, interval=0.01
            )
            await task
            assert final["status"]["phase"] == "Succeeded"
            assert (
                "default/busy-vm: Succeeded: running on cluster2/default" in capsys.readouterr().out
            )
        finally:
            await api.close()

    asyncio.run(main())
