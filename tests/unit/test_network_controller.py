"""The migration network with fakes: a real Store in a temporary directory, informers fed
by hand, handlers played by writes of ``Node.status.migrationNetwork``, a fake clock.

Covers the reconciler (controller.network_controller: assignments written once and kept
stable, removed when the network goes or its NAD is missing or invalid, the
HyperConverged condition and its reasons, no writes on heartbeats), the API's admission
of a NAD's config, and the migration reconciler's failures and placement on the network.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from controller import rbac, scheduler
from controller.admission import Admission
from controller.api import NodeAuthorizer
from controller.main import bootstrap
from controller.network_controller import (
    HCO_KEY,
    REASON_NAD_INVALID,
    REASON_NAD_NOT_FOUND,
    REASON_NODES_NOT_READY,
    REASON_READY,
    NetworkController,
)
from controller.objects import StoreSource, rfc3339
from controller.store import Store
from tests.unit.test_migration_controller import NS, Cluster
from vmferry import pki
from vmferry.errors import Invalid
from vmferry.informer import Informer, WorkQueue
from vmferry.migration_network import (
    HCO_CONDITION,
    NAD_API_VERSION,
    NAD_KIND,
    NAD_NAMESPACE,
    STATUS_FIELD,
    NetworkAssignment,
    NodeNetworkStatus,
)
from vmferry.migration_state import ConfigKey, Field, MigrationPhase, raw
from vmferry.objects import conditions, kinds

pytestmark = pytest.mark.timeout(30)
Obj = dict[str, Any]
NET = "mig"
KEY = f"{NAD_NAMESPACE}/{NET}"
NO_NIC = "no network interface eth1 on this node"


def cni_config(range_: str = "198.51.100.0/24", ipam: str = "whereabouts") -> str:
    return json.dumps(
        {
            "cniVersion": "0.3.1",
            "name": "migration-bridge",
            "type": "macvlan",
            "master": "eth1",
            "ipam": {"type": ipam, "range": range_},
        }
    )


def nad(config: str, name: str = NET) -> Obj:
    return {
        "apiVersion": NAD_API_VERSION,
        "kind": NAD_KIND,
        "metadata": {"name": name, "namespace": NAD_NAMESPACE},
        "spec": {"config": config},
    }


class Net(Cluster):
    """The migration reconciler's cluster plus the NAD informer and the network
    reconciler; ``net_pass`` runs one network pass on fresh caches."""

    def __init__(self, store: Store) -> None:
        super().__init__(store)
        self.informers[NAD_KIND] = Informer(StoreSource(store), NAD_KIND)
        self.net = NetworkController(
            store,
            self.informers["HyperConverged"],
            self.informers[NAD_KIND],
            self.informers["Node"],
            clock=self.clock,
        )

    async def net_pass(self) -> None:
        await self.refresh()
        await self.net.reconcile(HCO_KEY)

    async def add_node(self, name: str, ready: bool = True, address: str = "") -> None:
        await super().add_node(name, ready)
        index = name.removeprefix("node")
        node = await self.store.get("Node", "", name)
        node["status"]["addresses"] = [
            {"type": "InternalIP", "address": address or f"192.0.2.1{index}"}
        ]
        await self.store.update(node, subresource="status")

    async def set_network(self, network: str | None) -> None:
        hco = await self.store.get("HyperConverged", *HCO_KEY)
        config = hco["spec"].setdefault("liveMigrationConfig", {})
        if network is None:
            config.pop(ConfigKey.NETWORK, None)
        else:
            config[ConfigKey.NETWORK] = network
        await self.store.update(hco)

    async def add_nad(self, config: str | None = None) -> None:
        await self.store.create(nad(config or cni_config()))

    async def assignment(self, node: str) -> NetworkAssignment | None:
        return NetworkAssignment.of_node(await self.store.get("Node", "", node))

    async def address(self, node: str) -> str:
        """The node's assigned address ("" without an assignment or without an address)."""
        assignment = await self.assignment(node)
        return assignment.address if assignment else ""

    async def condition(self) -> Obj | None:
        return conditions.get(await self.store.get("HyperConverged", *HCO_KEY), HCO_CONDITION)

    async def report(
        self, node: str, ready: bool = True, message: str = "", address: str = ""
    ) -> None:
        """What the node's handler reports after bringing its assignment up (or not)."""
        current = await self.store.get("Node", "", node)
        assignment = NetworkAssignment.of_node(current)
        assert assignment is not None, f"{node} has no assignment"
        served = address or assignment.address.partition("/")[0] if ready else ""
        current["status"][STATUS_FIELD] = NodeNetworkStatus(
            assignment.network, assignment.interface, served, ready, message
        ).as_dict()
        await self.store.update(current, subresource="status")

    async def heartbeat(self, node: str) -> None:
        current = await self.store.get("Node", "", node)
        ready = conditions.get(current, "Ready")
        assert ready is not None
        ready["lastHeartbeatTime"] = rfc3339(self.clock() + 1)
        self.clock.advance(1)
        await self.store.update(current, subresource="status")

    async def versions(self) -> dict[str, str]:
        nodes, _ = await self.store.list("Node")
        hco = await self.store.get("HyperConverged", *HCO_KEY)
        out = {n["metadata"]["name"]: n["metadata"]["resourceVersion"] for n in nodes}
        out["hco"] = hco["metadata"]["resourceVersion"]
        return out


def run(test: Callable[[Net], Awaitable[None]], tmp_path: Path) -> None:
    """Three Ready nodes (InternalIP 192.0.2.1N), a VMI "vm" on node1, then ``test``."""

    async def main() -> None:
        store = await Store.open(tmp_path / "store.db")
        try:
            await bootstrap(store)
            cluster = Net(store)
            for name in ("node1", "node2", "node3"):
                await cluster.add_node(name)
            await cluster.add_vmi("vm", "node1")
            await test(cluster)
        finally:
            await store.close()

    asyncio.run(main())


async def ready_network(c: Net, *nodes: str) -> None:
    """The network configured, its NAD present, the given nodes serving on it."""
    await c.set_network(NET)
    await c.add_nad()
    await c.net_pass()
    for name in nodes:
        await c.report(name)
    await c.net_pass()


# -- the reconciler -------------------------------------------------------------------------


def test_without_a_network_nothing_is_written(tmp_path: Path) -> None:
    async def test(c: Net) -> None:
        await c.add_nad()  # a NAD alone selects nothing
        before = await c.versions()
        await c.net_pass()
        assert await c.versions() == before
        assert await c.assignment("node1") is None
        assert await c.condition() is None

    run(test, tmp_path)


def test_a_missing_nad_is_reported_and_assignments_follow_its_creation(tmp_path: Path) -> None:
    async def test(c: Net) -> None:
        await c.set_network(NET)
        await c.net_pass()
        cond = await c.condition()
        assert cond is not None
        assert (cond["status"], cond["reason"]) == ("False", REASON_NAD_NOT_FOUND)
        assert (
            cond["message"]
            == f"migration network {KEY}: no NetworkAttachmentDefinition of that name"
        )
        assert await c.assignment("node1") is None

        await c.add_nad()  # created after the setting: the order does not matter
        await c.net_pass()
        assert await c.assignment("node1") == NetworkAssignment(
            KEY, "eth1", "198.51.100.0/24", "198.51.100.1/24"
        )
        assert await c.address("node3") == ("198.51.100.3/24")
        cond = await c.condition()
        assert cond is not None and cond["reason"] == REASON_NODES_NOT_READY
        for name in ("node1", "node2", "node3"):
            assert f"node {name} is not on migration network {KEY} yet" in cond["message"]

        for name in ("node1", "node2", "node3"):
            await c.report(name)
        c.clock.advance(60)
        await c.net_pass()
        cond = await c.condition()
        assert cond is not None
        assert (cond["status"], cond["reason"]) == ("True", REASON_READY)
        assert cond["message"] == f"every Ready node serves migrations on {KEY} (3 nodes)"
        assert cond["lastTransitionTime"] == rfc3339(c.clock())

    run(test, tmp_path)


def test_heartbeats_neither_queue_nor_write(tmp_path: Path) -> None:
    async def test(c: Net) -> None:
        await ready_network(c, "node1", "node2", "node3")
        before = await c.versions()
        await c.net_pass()
        assert await c.versions() == before  # steady state: no write
        old = c.informers["Node"].get("", "node2")
        await c.heartbeat("node2")
        new = await c.store.get("Node", "", "node2")
        c.net.queue = WorkQueue()  # the refreshes above queued the key
        c.net._on_node(("", "node2"), old, new)
        assert HCO_KEY not in c.net.queue._queued
        c.net._on_node(("", "node2"), new, None)
        assert HCO_KEY in c.net.queue._queued
        await c.net_pass()
        after = await c.versions()
        assert after.pop("node2") != before.pop("node2")  # the heartbeat itself
        assert after == before

    run(test, tmp_path)


def test_the_condition_names_each_ready_node_and_why(tmp_path: Path) -> None:
    async def test(c: Net) -> None:
        await ready_network(c, "node1")
        await c.report("node2", ready=False, message=NO_NIC)
        await c.set_ready("node3", False)  # a node that is not Ready is not counted
        await c.net_pass()
        cond = await c.condition()
        assert cond is not None
        assert (cond["status"], cond["reason"]) == ("False", REASON_NODES_NOT_READY)
        assert cond["message"] == f"node node2 cannot use migration network {KEY}: {NO_NIC}"

        # A report that does not match the assignment yet (an old address) is not ready.
        await c.report("node2", address="198.51.100.77")
        await c.net_pass()
        cond = await c.condition()
        assert (
            cond is not None
            and "not yet on its assigned address 198.51.100.2/24" in (cond["message"])
        )
        await c.report("node2")
        await c.net_pass()
        cond = await c.condition()
        assert cond is not None and cond["status"] == "True"

    run(test, tmp_path)


def test_addresses_stay_with_their_nodes(tmp_path: Path) -> None:
    async def test(c: Net) -> None:
        await ready_network(c)
        first = {n: await c.assignment(n) for n in ("node1", "node2", "node3")}
        await c.add_node("node4")
        await c.net_pass()
        await c.store.delete("Node", "", "node1")
        await c.net_pass()
        assert await c.assignment("node2") == first["node2"]
        assert await c.assignment("node3") == first["node3"]
        assert await c.address("node4") == "198.51.100.4/24"
        await c.add_node("node5")
        await c.net_pass()
        assert await c.address("node5") == "198.51.100.1/24"

    run(test, tmp_path)


def test_static_ipam_assigns_the_nic_without_an_address(tmp_path: Path) -> None:
    async def test(c: Net) -> None:
        await c.set_network(NET)
        await c.add_nad(cni_config(ipam="static"))
        await c.net_pass()
        assert await c.assignment("node2") == NetworkAssignment(KEY, "eth1", "198.51.100.0/24", "")
        await c.report("node2", address="198.51.100.40/24")
        await c.report("node1", address="203.0.113.9")  # outside the range: not ready
        await c.report("node3", address="198.51.100.41")
        await c.net_pass()
        cond = await c.condition()
        assert cond is not None and cond["status"] == "False"
        assert cond["message"] == (
            f"node node1 serves migrations on 203.0.113.9, outside the range "
            f"198.51.100.0/24 of migration network {KEY} (not re-bound yet)"
        )

    run(test, tmp_path)


def test_an_exhausted_range_names_the_nodes_left_out(tmp_path: Path) -> None:
    async def test(c: Net) -> None:
        await c.set_network(NET)
        await c.add_nad(cni_config("198.51.100.0/30"))  # two addresses
        await c.net_pass()
        assert await c.address("node1")
        assert await c.address("node2")
        assert await c.assignment("node3") is None
        cond = await c.condition()
        assert cond is not None
        assert f"node node3: no free address left in 198.51.100.0/30 of {KEY}" in cond["message"]

    run(test, tmp_path)


def test_an_invalid_nad_removes_the_assignments(tmp_path: Path) -> None:
    async def test(c: Net) -> None:
        await ready_network(c, "node1", "node2", "node3")
        # A node whose main address lies in the range registers after the NAD.
        await c.add_node("node4", address="198.51.100.50")
        await c.net_pass()
        for name in ("node1", "node4"):
            assert await c.assignment(name) is None
        cond = await c.condition()
        assert cond is not None
        assert (cond["status"], cond["reason"]) == ("False", REASON_NAD_INVALID)
        assert cond["message"].startswith(
            f"migration network {KEY}: invalid NetworkAttachmentDefinition: "
            "spec.config: ipam.range: 198.51.100.0/24 overlaps the main network "
            "(node address 198.51.100.50)"
        )

    run(test, tmp_path)


def test_unsetting_the_network_removes_assignments_and_condition(tmp_path: Path) -> None:
    async def test(c: Net) -> None:
        await ready_network(c, "node1", "node2", "node3")
        await c.set_network(None)
        await c.net_pass()
        for name in ("node1", "node2", "node3"):
            assert await c.assignment(name) is None
        assert await c.condition() is None
        other = await c.store.get("HyperConverged", *HCO_KEY)
        assert other["spec"]["liveMigrationConfig"].get(ConfigKey.NETWORK) is None

    run(test, tmp_path)


# -- admission of a NAD ----------------------------------------------------------------------


def test_admission_validates_the_config_against_the_nodes(tmp_path: Path) -> None:
    async def test(c: Net) -> None:
        admission = Admission(c.store)
        await admission.admit_create(nad(cni_config()))
        with pytest.raises(Invalid) as info:
            await admission.admit_create(nad(cni_config("192.0.2.0/24")))
        assert str(info.value) == (
            f'{NAD_KIND} "{NET}": spec.config: ipam.range: 192.0.2.0/24 overlaps the main '
            "network (node address 192.0.2.11); the migration network needs a range of its own"
        )
        cfg = json.loads(cni_config())
        del cfg["master"]
        current = nad(cni_config())
        with pytest.raises(Invalid) as info:
            await admission.admit_update(current, nad(json.dumps(cfg)), "")
        assert str(info.value) == f'{NAD_KIND} "{NET}": spec.config: master: required'

    run(test, tmp_path)


# -- migrations over the network -------------------------------------------------------------


async def schedule(c: Net, vmim: str = "m") -> Obj:
    """Create a migration of "vm" (on node1) and reconcile it past Scheduling."""
    await c.add_vmim(vmim, "vm")
    for _ in range(3):
        await c.reconcile(vmim)
    return await c.vmim(vmim)


def failure(vmim: Obj) -> str:
    assert MigrationPhase.of(vmim) == MigrationPhase.FAILED, MigrationPhase.of(vmim)
    return str(raw(vmim).get(Field.FAILURE_REASON))


def test_a_migration_over_a_missing_nad_fails(tmp_path: Path) -> None:
    async def test(c: Net) -> None:
        await c.set_network(NET)
        vmim = await schedule(c)
        assert (
            failure(vmim) == f"migration network {KEY}: no NetworkAttachmentDefinition of that name"
        )

    run(test, tmp_path)


def test_a_migration_over_an_invalid_nad_fails(tmp_path: Path) -> None:
    async def test(c: Net) -> None:
        await c.set_network(NET)
        await c.add_nad("{not json")  # stored behind the API's back
        vmim = await schedule(c)
        assert failure(vmim).startswith(
            f"migration network {KEY}: invalid NetworkAttachmentDefinition: "
            "spec.config: invalid JSON"
        )

    run(test, tmp_path)


def test_a_source_off_the_network_fails_at_once(tmp_path: Path) -> None:
    async def test(c: Net) -> None:
        await ready_network(c, "node2", "node3")
        await c.report("node1", ready=False, message=NO_NIC)
        vmim = await schedule(c)
        assert failure(vmim) == f"node node1 cannot use migration network {KEY}: {NO_NIC}"

    run(test, tmp_path)


def test_the_target_is_a_node_on_the_network(tmp_path: Path) -> None:
    async def test(c: Net) -> None:
        await ready_network(c, "node1", "node3")
        await c.report("node2", ready=False, message=NO_NIC)  # first by name otherwise
        vmim = await schedule(c)
        assert MigrationPhase.of(vmim) == MigrationPhase.SCHEDULED
        ms = raw(await c.vmi("vm"))
        assert ms[Field.TARGET_NODE] == "node3"
        assert ms[Field.MIGRATION_CONFIGURATION][ConfigKey.NETWORK] == NET

    run(test, tmp_path)


def test_no_target_on_the_network_fails_with_the_reason(tmp_path: Path) -> None:
    async def test(c: Net) -> None:
        await ready_network(c, "node1")
        await c.report("node2", ready=False, message=NO_NIC)
        vmim = await schedule(c)  # node3 never reported
        assert failure(vmim) == f"node node2 cannot use migration network {KEY}: {NO_NIC}"

    run(test, tmp_path)


def test_a_migration_without_a_network_ignores_the_nads(tmp_path: Path) -> None:
    async def test(c: Net) -> None:
        await c.add_nad("{not json")
        vmim = await schedule(c)
        assert MigrationPhase.of(vmim) == MigrationPhase.SCHEDULED
        assert ConfigKey.NETWORK not in raw(await c.vmi("vm"))[Field.MIGRATION_CONFIGURATION]

    run(test, tmp_path)


def test_placement_names_nodes_off_the_network() -> None:
    def node(name: str) -> Obj:
        return {
            "metadata": {"name": name},
            "status": {
                "capacity": {"memory": "4Gi"},
                "conditions": [{"type": "Ready", "status": "True"}],
            },
        }

    vmi = {
        "metadata": {"name": "vm", "namespace": NS},
        "spec": {"domain": {"memory": {"guest": "1Gi"}}},
    }
    placement = scheduler.place(
        vmi,
        [node("node2")],
        [],
        network=KEY,
        network_problem=lambda n: f"node {n['metadata']['name']} has no eth1",
    )
    assert placement.node is None
    assert placement.message() == f"node2: not on migration network {KEY} (node node2 has no eth1)"
    assert kinds.by_kind(NAD_KIND).namespaced


def test_a_node_reads_nads_but_never_writes_them_nor_other_nodes() -> None:
    who = pki.Identity(f"{pki.NODE_USER_PREFIX}node1", (pki.NODES_GROUP,))
    nad_kind = kinds.by_kind(NAD_KIND)

    def allowed(verb: str, kind: kinds.Kind, ns: str, name: str) -> bool:
        request = rbac.request_for(who.user, who.groups, verb, kind, ns, name)
        return NodeAuthorizer().check(who, request, None).allowed

    for verb in ("get", "list", "watch"):
        assert allowed(verb, nad_kind, NAD_NAMESPACE, NET)
    for verb in ("create", "update", "patch", "delete"):
        assert not allowed(verb, nad_kind, NAD_NAMESPACE, NET)
    node_kind = kinds.by_kind("Node")
    assert allowed("patch", node_kind, "", "node1")
    for verb in ("update", "patch"):  # another node's annotations: no
        assert not allowed(verb, node_kind, "", "node2")
