"""A replicated control plane (``lab up --ha``: 3 etcd members, 3 controller replicas):
the leading controller SIGKILLed during a migration together with an etcd member; the
leader killed by a failpoint at each phase of the migration's hand-off (its reconciler
wrote the hand-off but not the VMIM's Scheduled; the switchover decision committed in
the store by the replica serving it; its reconciler saw the completion but did not
record Succeeded); and a watcher whose replica dies. Skipped, saying why, without
etcd."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from controller.leader import LEASE_NAME
from tests.integration.test_failures import _start_slow_migration
from tests.support.lab import LabHarness, migration_name, vm_manifest
from vmferry.client import ApiClient
from vmferry.config import ClientConfig
from vmferry.errors import ApiError, Gone, Unavailable
from vmferry.failpoints import Step
from vmferry.lab.etcd import accepts, etcd_binary, missing_reason
from vmferry.lab.ha import HOST
from vmferry.objects import kinds


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHarness]:
    if etcd_binary() is None:
        pytest.skip(missing_reason())
    harness = LabHarness(Path(tmp_path_factory.mktemp("halab")))
    harness.up(nodes=2, ha=True)
    try:
        yield harness
    finally:
        harness.down()


def lease_spec(lab: LabHarness) -> dict:
    """The leader Lease's spec ({} while no replica answers), read in-process (a CLI
    call costs a second of start-up under load: too coarse to time a failover)."""
    config = ClientConfig.load(Path(lab.env["VMFERRY_CONFIG"]))

    async def read() -> dict:
        async with ApiClient(config, timeout=3) as api:
            try:
                lease = await api.get("Lease", kinds.SYSTEM_NAMESPACE, LEASE_NAME)
            except ApiError:
                return {}
        return dict(lease.get("spec") or {})

    return asyncio.run(read())


def holder(lab: LabHarness) -> str:
    return str(lease_spec(lab).get("holderIdentity") or "")


def armed_leader(lab: LabHarness, step: Step) -> str:
    """The leading replica restarted with ``step`` armed: the others stopped while it
    takes the lease again and the handlers' channels (pick-first: they stay on it once
    the others are back), then the others started again, unarmed, as followers."""
    leader = lab.wait_for("a leader", lambda: holder(lab), timeout=30)
    acquired = lease_spec(lab).get("acquireTime")
    ports = lab.info()["ha"]["controllers"]
    others = [name for name in ports if name != leader]
    for name in others:
        lab.lab.kill(name)
    lab.restart(leader, step.value, ready=False)
    lab.wait_for(
        f"{leader} to lead again, armed",
        lambda: (
            (spec := lease_spec(lab)).get("holderIdentity") == leader
            and spec.get("acquireTime") != acquired
        ),
        timeout=30,
    )
    for name in others:
        lab.lab.start(name)
    lab.wait_for("the followers to serve", lambda: all(accepts(HOST, ports[n]) for n in others), 30)
    return leader


@pytest.mark.timeout(150)
def test_leader_and_an_etcd_member_killed_mid_migration(lab: LabHarness) -> None:
    lab.apply(vm_manifest("ha-vm", memory="128Mi", dirty_rate="4Mi"))
    uid = lab.wait_vmi_running("ha-vm")["metadata"]["uid"]
    leader = lab.wait_for("a leader", lambda: holder(lab), timeout=30)
    name, source, target = _start_slow_migration(lab, "ha-vm")
    member = "etcd-2"
    try:
        lab.cli("lab", "kill", leader)
        killed = time.monotonic()
        lab.cli("lab", "kill", member)
        successor = lab.wait_for(
            "a new leader", lambda: (h := holder(lab)) and h != leader and h, timeout=30
        )
        took = time.monotonic() - killed
        print(f"\nnew leader {successor} {took:.2f} s after SIGKILL of {leader} (+ {member})")
        assert took < 12, f"the new leader took {took:.1f} s"
        vmim = lab.wait_vmim_final(name, timeout=120)
        phase = vmim["status"]["phase"]
        if phase == "Failed":
            assert vmim["status"]["migrationState"]["failureReason"]
        expected = target if phase == "Succeeded" else source
        assert lab.get("vmi", "ha-vm")["status"]["nodeName"] == expected
        guests = lab.wait_for(
            "exactly one guest", lambda: (g := lab.guests(uid)) and len(g) == 1 and g
        )
        assert guests[0][0] == expected
    finally:
        lab.set_live_migration_config(bandwidthPerMigration="0")
        for component in (leader, member):
            if lab.lab.pid(component) is None:
                lab.cli("lab", "start", component)
    lab.cli("delete", "vm", "ha-vm")


@pytest.mark.timeout(90)
def test_a_watcher_resumes_at_its_resource_version_across_a_replica_kill(
    lab: LabHarness,
) -> None:
    config = ClientConfig.load(Path(lab.env["VMFERRY_CONFIG"]))
    first = config.server.split(",")[0]  # the client's channel starts on the first replica
    replica = next(
        name for name, port in lab.info()["ha"]["controllers"].items() if first.endswith(f":{port}")
    )
    names = [f"cm-{i}" for i in range(20)]

    async def main() -> tuple[list[tuple[str, str, int]], bool]:
        seen: list[tuple[str, str, int]] = []
        relisted = False
        async with ApiClient(config, timeout=10) as api:
            _, rv = await api.list("ConfigMap", "default")

            async def watcher() -> None:
                nonlocal rv, relisted
                while not {n for _, n, _ in seen} >= set(names):
                    try:
                        async for kind, obj in api.watch(
                            "ConfigMap", "default", resource_version=rv
                        ):
                            rv = obj["metadata"]["resourceVersion"]
                            seen.append((kind, obj["metadata"]["name"], int(rv)))
                            if {n for _, n, _ in seen} >= set(names):
                                return
                    except Gone:
                        relisted = True
                        _, rv = await api.list("ConfigMap", "default")
                    except Unavailable:
                        await asyncio.sleep(0.1)

            async def writer() -> None:
                for i, name in enumerate(names):
                    if i == 10:
                        await asyncio.to_thread(lab.cli, "lab", "kill", replica)
                    for _attempt in range(50):
                        try:
                            await api.create(
                                {
                                    "apiVersion": "v1",
                                    "kind": "ConfigMap",
                                    "metadata": {"name": name, "namespace": "default"},
                                    "data": {"i": str(i)},
                                }
                            )
                            break
                        except Unavailable:
                            await asyncio.sleep(0.1)

            async with asyncio.timeout(60):
                await asyncio.gather(watcher(), writer())
            for name in names:
                await api.delete("ConfigMap", "default", name)
        return seen, relisted

    try:
        seen, relisted = asyncio.run(main())
    finally:
        if lab.lab.pid(replica) is None:
            lab.cli("lab", "start", replica)
    if not relisted:  # resumed at its resourceVersion: every change exactly once, in order
        assert [n for _, n, _ in seen] == names, seen
        assert all(kind == "ADDED" for kind, _, _ in seen)
        rvs = [rv for _, _, rv in seen]
        assert rvs == sorted(set(rvs))
    print(f"\nwatcher {'re-listed' if relisted else 'resumed at its resourceVersion'}")


@pytest.mark.timeout(90)
def test_a_vm_created_while_no_replica_leads_is_started_by_the_next_leader(
    lab: LabHarness,
) -> None:
    """The new leader's reconcilers start from what exists, not only from the changes
    after they started: a VM created between the leader's death and its successor's
    first term gets its VMI."""
    config = ClientConfig.load(Path(lab.env["VMFERRY_CONFIG"]))
    manifest = json.loads(vm_manifest("ha-leaderless", memory="64Mi", dirty_rate="1Mi"))
    manifest["metadata"]["namespace"] = "default"
    leader = lab.wait_for("a leader", lambda: holder(lab), timeout=30)

    async def create() -> None:
        async with ApiClient(config, timeout=5) as api:
            for _attempt in range(50):  # the client moves off the dead replica
                try:
                    await api.create(manifest)
                    return
                except Unavailable:
                    await asyncio.sleep(0.05)

    try:
        lab.lab.kill(leader)
        asyncio.run(create())
        # No successor had written its term's Lease yet: the VM came in the gap.
        assert holder(lab) in ("", leader), "a successor led before the VM was created"
        lab.wait_vmi_running("ha-leaderless", timeout=60)
    finally:
        if lab.lab.pid(leader) is None:
            lab.lab.start(leader)
    lab.cli("delete", "vm", "ha-leaderless")


@pytest.fixture(scope="module")
def phase_vm(lab: LabHarness) -> Iterator[tuple[str, str]]:
    """One VM for the failover-phase tests (each moves it to the other node)."""
    lab.apply(vm_manifest("ha-phases", memory="64Mi", dirty_rate="2Mi"))
    uid = lab.wait_vmi_running("ha-phases")["metadata"]["uid"]
    yield "ha-phases", uid
    lab.cli("delete", "vm", "ha-phases")


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "step",
    [Step.CONTROLLER_HANDED_OFF, Step.CONTROLLER_COMMITTED, Step.CONTROLLER_COMPLETING],
    ids=["before-decision", "at-decision", "after-decision"],
)
def test_leader_killed_at_each_phase_of_the_hand_off(
    lab: LabHarness, phase_vm: tuple[str, str], step: Step
) -> None:
    vm, uid = phase_vm
    leader = armed_leader(lab, step)
    source = lab.get("vmi", vm)["status"]["nodeName"]
    try:
        out = lab.cli("migrate", vm)
        name = migration_name(out.stdout)
        lab.wait_for(f"{leader} to die at {step}", lambda: lab.lab.pid(leader) is None, 60, 0.02)
        died = time.monotonic()
        successor = lab.wait_for(
            "a new leader", lambda: (h := holder(lab)) and h != leader and h, 30, 0.05
        )
        took = time.monotonic() - died
        print(f"\n{step}: new leader {successor} {took:.2f} s after {leader} died")
        assert took < 8, f"the new leader took {took:.1f} s"
        vmim = lab.wait_vmim_final(name, timeout=60)
        phase = vmim["status"]["phase"]
        # The hand-off was recorded before each kill: the migration goes on to the end.
        assert phase == "Succeeded", (phase, vmim["status"].get("migrationState"))
        target = vmim["status"]["migrationState"]["targetNode"]
        assert target != source and lab.get("vmi", vm)["status"]["nodeName"] == target
        nodes = lab.wait_for(
            "exactly one guest", lambda: (g := lab.guests(uid)) and len(g) == 1 and [g[0][0]]
        )
        assert nodes == [target]
    finally:
        if lab.lab.pid(leader) is not None:  # still armed: it never reached the step
            lab.lab.kill(leader)
        for replica in lab.info()["ha"]["controllers"]:
            if lab.lab.pid(replica) is None:
                lab.lab.start(replica)
