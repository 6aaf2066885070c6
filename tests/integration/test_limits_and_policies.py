"""Migration limits, timeouts, policies, node selection, drain and cancel (issue 3),
enforced by the real daemons and observed through the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.lab import LabHarness, migration_name, vm_manifest
from vmferry.client import ApiClient
from vmferry.config import ClientConfig
from vmferry.errors import ApiError

ACTIVE = ("Scheduling", "Scheduled", "PreparingTarget", "TargetReady", "Running")
DEFAULTS: dict[str, Any] = {
    "bandwidthPerMigration": "0",
    "completionTimeoutPerGiB": 150,
    "parallelMigrationsPerCluster": 5,
    "parallelOutboundMigrationsPerNode": 2,
    "progressTimeout": 150,
    "unschedulableTimeoutSeconds": 300,
}


@pytest.fixture(autouse=True)
def restore_config(lab: LabHarness) -> Iterator[None]:
    yield
    lab.set_live_migration_config(**DEFAULTS)
    for node in lab.lab.node_names():
        lab.cli("adm", "uncordon", node)
    lab.cli("delete", "vm", "--all", check=False, timeout=120)


def place_on(lab: LabHarness, node: str, *manifests: str) -> list[str]:
    """Create VMs on ``node`` by cordoning every other node while they start."""
    others = [n for n in lab.lab.node_names() if n != node]
    for n in others:
        lab.cli("adm", "cordon", n)
    names = []
    try:
        for manifest in manifests:
            lab.apply(manifest)
            name = json.loads(manifest)["metadata"]["name"]
            assert lab.wait_vmi_running(name)["status"]["nodeName"] == node
            names.append(name)
    finally:
        for n in others:
            lab.cli("adm", "uncordon", n)
    return names


def migrate(lab: LabHarness, vm: str, *extra: str) -> str:
    out = lab.cli("migrate", vm, *extra)
    return migration_name(out.stdout)


class PhaseSampler:
    """Samples every VMIM (phase, source node) every 0.1 s through the API, in a thread
    (the CLI's start-up time would make the samples too coarse on a loaded machine)."""

    def __init__(self, lab: LabHarness) -> None:
        self.config = ClientConfig.load(Path(lab.env["VMFERRY_CONFIG"]))
        self.samples: list[list[dict[str, Any]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        async with ApiClient(self.config) as api:
            while not self._stop.is_set():
                with contextlib.suppress(ApiError):
                    items, _ = await api.list("VirtualMachineInstanceMigration", "default")
                    self.samples.append(items)
                await asyncio.sleep(0.1)

    def __enter__(self) -> PhaseSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.mark.timeout(240)
def test_parallel_limits_per_cluster_and_per_node(lab: LabHarness) -> None:
    """At most 2 in the cluster and 1 leaving a node: a and b (node1) one after the
    other, c (node2) alongside one of them."""
    a, b = place_on(
        lab, "node1", vm_manifest("lim-a", "64Mi", "1Mi"), vm_manifest("lim-b", "64Mi", "1Mi")
    )
    (c,) = place_on(lab, "node2", vm_manifest("lim-c", "64Mi", "1Mi"))
    lab.set_live_migration_config(
        parallelMigrationsPerCluster=2,
        parallelOutboundMigrationsPerNode=1,
        bandwidthPerMigration="24Mi",
    )
    with PhaseSampler(lab) as sampler:
        names = [migrate(lab, vm) for vm in (a, b, c)]
        for name in names:
            assert lab.wait_vmim_final(name, timeout=120)["status"]["phase"] == "Succeeded"
    max_cluster = max_node1 = 0
    for sample in sampler.samples:
        active = [
            m
            for m in sample
            # (a VMIM the controller has not seen yet has no status)
            if m["metadata"]["name"] in names and (m.get("status") or {}).get("phase") in ACTIVE
        ]
        max_cluster = max(max_cluster, len(active))
        from_node1 = [
            m
            for m in active
            if (m.get("status", {}).get("migrationState") or {}).get("sourceNode") == "node1"
            or m["spec"]["vmiName"] in (a, b)
        ]
        max_node1 = max(max_node1, len(from_node1))
    assert max_cluster == 2, f"never more than 2 at once, and 2 did run together ({max_cluster})"
    assert max_node1 == 1, "never two migrations leaving node1 at once"


@pytest.mark.timeout(240)
def test_evacuations_are_queued_before_user_requests(lab: LabHarness) -> None:
    first, user, evac = place_on(
        lab,
        "node1",
        vm_manifest("q-first", "64Mi", "1Mi"),
        vm_manifest("q-user", "32Mi", "1Mi"),
        vm_manifest("q-evac", "32Mi", "1Mi"),
    )
    # 64 MiB at 6 MiB/s: the first migration holds the only slot for ~10 s.
    lab.set_live_migration_config(parallelMigrationsPerCluster=1, bandwidthPerMigration="6Mi")
    running = migrate(lab, first)
    lab.wait_for(
        "the first migration to run",
        lambda: (lab.get("vmim", running).get("status") or {}).get("phase") in ACTIVE,
    )
    user_vmim = migrate(lab, user)
    time.sleep(1.1)  # the evacuation is created later (creation time has second precision)
    lab.cli(
        "create",
        "-f",
        "-",
        input=json.dumps(
            {
                "apiVersion": "kubevirt.io/v1",
                "kind": "VirtualMachineInstanceMigration",
                "metadata": {
                    "name": "evacuate-q",
                    "annotations": {"kubevirt.io/evacuationMigration": "node1"},
                },
                "spec": {"vmiName": evac},
            }
        ),
    )
    assert lab.get("vmim", user_vmim)["status"]["phase"] == "Pending"
    finals = {n: lab.wait_vmim_final(n, timeout=120) for n in (running, user_vmim, "evacuate-q")}
    assert all(v["status"]["phase"] == "Succeeded" for v in finals.values())

    def started(vmim: dict[str, Any]) -> str:
        return next(
            p["phaseTransitionTimestamp"]
            for p in vmim["status"]["phaseTransitionTimestamps"]
            if p["phase"] == "Scheduling"
        )

    assert started(finals["evacuate-q"]) < started(finals[user_vmim]), "the evacuation went first"


@pytest.mark.timeout(120)
def test_bandwidth_cap_holds_within_ten_percent(lab: LabHarness) -> None:
    lab.apply(vm_manifest("capped", "128Mi", "0", content="random"))
    lab.wait_vmi_running("capped")
    cap = 24 << 20
    lab.set_live_migration_config(bandwidthPerMigration="24Mi")
    name = migrate(lab, "capped")
    vmim = lab.wait_vmim_final(name, timeout=60)
    assert vmim["status"]["phase"] == "Succeeded"
    transfer = vmim["status"]["migrationState"]["transfer"]
    rate = transfer["averageWireRateBytes"]
    print(
        f"bandwidth cap 24Mi: measured {rate / 2**20:.2f} MiB/s ({100 * (rate - cap) / cap:+.1f}%) "
        f"over {transfer['wireBytes'] / 2**20:.0f} MiB"
    )
    assert 0.9 * cap <= rate <= 1.1 * cap


@pytest.mark.timeout(120)
def test_progress_timeout_aborts_and_leaves_the_vm_on_its_source(lab: LabHarness) -> None:
    lab.apply(vm_manifest("hot", "32Mi", "64Mi", hot_set="0", content="random"))
    vmi = lab.wait_vmi_running("hot")
    lab.set_live_migration_config(
        bandwidthPerMigration="16Mi", progressTimeout=2, completionTimeoutPerGiB=2000
    )
    vmim = lab.wait_vmim_final(migrate(lab, "hot"), timeout=60)
    assert vmim["status"]["phase"] == "Failed"
    reason = vmim["status"]["migrationState"]["failureReason"]
    assert "stuck" in reason and "progressTimeout 2" in reason, reason
    after = lab.get("vmi", "hot")
    assert (
        after["status"]["nodeName"] == vmi["status"]["nodeName"]
        and after["status"]["phase"] == "Running"
    )
    guests = lab.wait_for(
        "one guest", lambda: (g := lab.guests(vmi["metadata"]["uid"])) and len(g) == 1 and g
    )
    assert guests[0][0] == vmi["status"]["nodeName"]


@pytest.mark.timeout(120)
def test_completion_timeout_per_gib_aborts(lab: LabHarness) -> None:
    lab.apply(vm_manifest("slow", "128Mi", "1Mi", content="random"))
    vmi = lab.wait_vmi_running("slow")
    lab.set_live_migration_config(
        bandwidthPerMigration="8Mi", completionTimeoutPerGiB=16
    )  # 2 s for 128Mi
    vmim = lab.wait_vmim_final(migrate(lab, "slow"), timeout=60)
    assert vmim["status"]["phase"] == "Failed"
    reason = vmim["status"]["migrationState"]["failureReason"]
    assert "not completed after" in reason and "completionTimeoutPerGiB 16" in reason, reason
    assert lab.get("vmi", "slow")["status"]["nodeName"] == vmi["status"]["nodeName"]


@pytest.mark.timeout(120)
def test_migration_policy_selected_by_vm_labels_edited_with_vmferry_edit(lab: LabHarness) -> None:
    lab.apply(vm_manifest("prod-vm", "32Mi", "1Mi"))
    lab.wait_vmi_running("prod-vm")
    for name, labels, bandwidth in (
        ("production", {"kubevirt.io/environment": "production"}, "64Mi"),
        ("catch-all-dev", {"kubevirt.io/environment": "dev"}, "8Mi"),
    ):
        lab.cli(
            "apply",
            "-f",
            "-",
            input=json.dumps(
                {
                    "apiVersion": "migrations.kubevirt.io/v1alpha1",
                    "kind": "MigrationPolicy",
                    "metadata": {"name": name},
                    "spec": {
                        "selectors": {"virtualMachineInstanceSelector": labels},
                        "bandwidthPerMigration": bandwidth,
                        "completionTimeoutPerGiB": 300,
                    },
                }
            ),
        )
    # The reference's procedure: `edit vm`, add the label under spec.template.metadata.labels.
    editor = (
        'python3 -c "import sys,yaml;p=sys.argv[1];d=yaml.safe_load(open(p));'
        "d['spec']['template'].setdefault('metadata',{}).setdefault('labels',{})['kubevirt.io/environment']='production';"
        "yaml.safe_dump(d,open(p,'w'))\""
    )
    out = lab.cli("edit", "vm", "prod-vm", extra_env={"VMFERRY_EDITOR": editor})
    assert "edited" in out.stdout
    lab.wait_for(
        "the label on the VMI",
        lambda: (
            lab.get("vmi", "prod-vm")["metadata"]["labels"].get("kubevirt.io/environment")
            == "production"
        ),
    )
    vmim = lab.wait_vmim_final(migrate(lab, "prod-vm"), timeout=60)
    assert vmim["status"]["phase"] == "Succeeded"
    ms = lab.get("vmi", "prod-vm")["status"]["migrationState"]
    assert ms["migrationPolicyName"] == "production"
    assert ms["migrationConfiguration"]["bandwidthPerMigration"] == "64Mi"
    assert ms["migrationConfiguration"]["completionTimeoutPerGiB"] == 300
    assert ms["migrationConfiguration"]["progressTimeout"] == 150  # from the cluster config
    lab.cli("delete", "migrationpolicy", "production", "catch-all-dev")


@pytest.mark.timeout(120)
def test_added_node_selector_picks_the_target_and_an_impossible_one_fails(lab: LabHarness) -> None:
    (vm,) = place_on(lab, "node1", vm_manifest("picky", "32Mi", "1Mi"))
    vmim = lab.wait_vmim_final(migrate(lab, vm, "--addedNodeSelector", "vmferry.io/lab-node=3"))
    assert vmim["status"]["phase"] == "Succeeded"
    assert lab.get("vmi", vm)["status"]["nodeName"] == "node3"
    assert "addedNodeSelector" not in json.dumps(lab.get("vmi", vm)["spec"]), "one migration only"

    lab.set_live_migration_config(unschedulableTimeoutSeconds=2)
    vmim = lab.wait_vmim_final(
        migrate(lab, vm, "--addedNodeSelector", "vmferry.io/lab-node=3,disk=ssd")
    )
    assert vmim["status"]["phase"] == "Failed"
    reason = vmim["status"]["migrationState"]["failureReason"]
    assert "disk=ssd" in reason and "node3: not a migration target" not in reason, reason
    vmi = lab.get("vmi", vm)
    assert vmi["status"]["nodeName"] == "node3" and vmi["status"]["phase"] == "Running"


@pytest.mark.timeout(180)
def test_drain_moves_every_live_migratable_vm_and_names_blockers(lab: LabHarness) -> None:
    names = place_on(lab, "node2", *(vm_manifest(f"drain-{i}", "32Mi", "1Mi") for i in range(3)))
    out = lab.cli("adm", "drain", "node2", timeout=150)
    assert "drained (3 VMIs live-migrated)" in out.stdout
    for name in names:
        assert lab.get("vmi", name)["status"]["nodeName"] != "node2"
    node = lab.get("no", "node2", namespace="")
    assert node["spec"]["unschedulable"] is True
    evacuations = json.loads(lab.cli("get", "vmim", "-o", "json").stdout)["items"]
    assert (
        sum(
            "kubevirt.io/evacuationMigration" in (m["metadata"].get("annotations") or {})
            for m in evacuations
        )
        >= 3
    )
    lab.cli("adm", "uncordon", "node2")

    pinned = json.loads(vm_manifest("pinned", "32Mi", "1Mi"))
    pinned["spec"]["template"]["spec"]["evictionStrategy"] = "None"
    place_on(lab, "node2", json.dumps(pinned))
    out = lab.cli("adm", "drain", "node2", check=False)
    assert out.returncode == 1
    assert "default/pinned has evictionStrategy None" in out.stderr
    assert lab.get("vmi", "pinned")["status"]["nodeName"] == "node2"


def _evacuations_of(lab: LabHarness, vm: str) -> list[dict[str, Any]]:
    items = json.loads(lab.cli("get", "vmim", "-o", "json").stdout)["items"]
    return [
        m
        for m in items
        if m["spec"]["vmiName"] == vm
        and "kubevirt.io/evacuationMigration" in (m["metadata"].get("annotations") or {})
    ]


@pytest.mark.timeout(180)
def test_drain_exits_1_when_the_evacuations_fail(lab: LabHarness) -> None:
    (name,) = place_on(lab, "node2", vm_manifest("stuck-on-2", "128Mi", "1Mi", content="random"))
    lab.set_live_migration_config(
        bandwidthPerMigration="8Mi", completionTimeoutPerGiB=16
    )  # 2 s for 128Mi: every evacuation fails
    out = lab.cli("adm", "drain", "node2", "--timeout", "150", check=False, timeout=170)
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"could not evacuate default/{name} after 3 attempts: " in out.stderr, out.stderr
    assert "Live migration is not completed after" in out.stderr, out.stderr
    assert "drained" not in out.stdout
    assert lab.get("vmi", name)["status"]["nodeName"] == "node2"
    assert len(_evacuations_of(lab, name)) == 3
    assert lab.get("no", "node2", namespace="")["spec"]["unschedulable"] is True


@pytest.mark.timeout(180)
def test_drain_does_not_evacuate_a_vm_a_migration_already_moves_off(lab: LabHarness) -> None:
    (name,) = place_on(lab, "node2", vm_manifest("leaving-2", "64Mi", "1Mi", content="random"))
    lab.set_live_migration_config(bandwidthPerMigration="16Mi")  # ~4 s
    moving = migrate(lab, name, "--addedNodeSelector", "vmferry.io/lab-node=1")
    out = lab.cli("adm", "drain", "node2", "--timeout", "120", timeout=150)
    assert "drained (1 VMIs live-migrated)" in out.stdout
    assert lab.wait_vmim_final(moving)["status"]["phase"] == "Succeeded"
    assert lab.get("vmi", name)["status"]["nodeName"] == "node1"
    assert _evacuations_of(lab, name) == [], "the VM left node2 without an evacuation"


@pytest.mark.timeout(150)
def test_drain_capacity_reports_the_reference_formula(lab: LabHarness) -> None:
    place_on(lab, "node1", vm_manifest("cap-a", "256Mi", "0"), vm_manifest("cap-b", "256Mi", "0"))
    out = lab.cli("adm", "drain-capacity", "--parallel-drains", "2")
    assert "highest total VM memory on one node: 512Mi" in out.stdout
    assert "required spare memory = 2 parallel drain(s) x 512Mi = 1Gi" in out.stdout
    assert "enough spare capacity" in out.stdout
    short = lab.cli("adm", "drain-capacity", "--parallel-drains", "100", check=False)
    assert short.returncode == 1 and "NOT enough" in short.stdout


@pytest.mark.timeout(120)
def test_cancel_while_pending_and_garbage_collection_of_old_migrations(lab: LabHarness) -> None:
    a, b = place_on(
        lab, "node1", vm_manifest("gc-a", "64Mi", "1Mi"), vm_manifest("gc-b", "32Mi", "1Mi")
    )
    # 64 MiB at 6 MiB/s: the first migration occupies the only slot for ~10 s.
    lab.set_live_migration_config(parallelMigrationsPerCluster=1, bandwidthPerMigration="6Mi")
    running = migrate(lab, a)
    queued = migrate(lab, b)
    assert lab.get("vmim", queued)["status"]["phase"] == "Pending"
    lab.cli("delete", "vmim", queued)
    assert lab.try_get("vmim", queued) is None
    vmi_b = lab.get("vmi", b)
    assert vmi_b["status"]["nodeName"] == "node1" and not vmi_b["status"].get("migrationState")
    lab.wait_vmim_final(running)
    lab.set_live_migration_config(parallelMigrationsPerCluster=5, bandwidthPerMigration="0")
    for _ in range(6):
        assert lab.wait_vmim_final(migrate(lab, b))["status"]["phase"] == "Succeeded"
    items = json.loads(lab.cli("get", "vmim", "-o", "json").stdout)["items"]
    mine = [m for m in items if m["spec"]["vmiName"] == b]
    lab.wait_for(
        "garbage collection",
        lambda: (
            len(
                [
                    m
                    for m in json.loads(lab.cli("get", "vmim", "-o", "json").stdout)["items"]
                    if m["spec"]["vmiName"] == b
                ]
            )
            == 5
        ),
        timeout=20,
    )
    assert len(mine) >= 5


@pytest.mark.timeout(60)
def test_hyperconverged_edit_patch_and_key_deletion_restores_the_default(lab: LabHarness) -> None:
    hco = ["hyperconverged", "kubevirt-hyperconverged", "-n", "openshift-cnv"]

    def config() -> dict[str, Any]:
        return lab.get("hco", "kubevirt-hyperconverged", "openshift-cnv")["spec"][
            "liveMigrationConfig"
        ]

    assert config()["parallelMigrationsPerCluster"] == 5 and config()["progressTimeout"] == 150
    lab.cli(
        "patch",
        *hco,
        "--type",
        "merge",
        "-p",
        '{"spec":{"liveMigrationConfig":{"progressTimeout":300}}}',
    )
    assert config()["progressTimeout"] == 300

    def editor(code: str) -> dict[str, str]:
        return {
            "EDITOR": f'python3 -c "import sys,yaml;p=sys.argv[1];d=yaml.safe_load(open(p));{code};'
            "yaml.safe_dump(d,open(p,'w'))\""
        }

    # Deleting the key in the editor restores its default.
    out = lab.cli(
        "edit", *hco, extra_env=editor("del d['spec']['liveMigrationConfig']['progressTimeout']")
    )
    assert "edited" in out.stdout
    assert config()["progressTimeout"] == 150
    # An invalid edit is refused with the reason, and nothing changes.
    before = lab.get("hco", "kubevirt-hyperconverged", "openshift-cnv")
    bad = lab.cli(
        "edit",
        *hco,
        check=False,
        extra_env=editor("d['spec']['liveMigrationConfig']['bandwidthPerMigration']='12Zi'"),
    )
    assert bad.returncode == 1
    assert "spec.liveMigrationConfig.bandwidthPerMigration" in bad.stderr and "12Zi" in bad.stderr
    assert "nothing was changed" in bad.stderr
    after = lab.get("hco", "kubevirt-hyperconverged", "openshift-cnv")
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    # A JSON patch that removes a key restores the default too.
    lab.cli(
        "patch",
        *hco,
        "--type",
        "merge",
        "-p",
        '{"spec":{"liveMigrationConfig":{"parallelMigrationsPerCluster":3}}}',
    )
    lab.cli(
        "patch",
        *hco,
        "--type",
        "json",
        "-p",
        '[{"op":"remove","path":"/spec/liveMigrationConfig/parallelMigrationsPerCluster"}]',
    )
    assert config()["parallelMigrationsPerCluster"] == 5
