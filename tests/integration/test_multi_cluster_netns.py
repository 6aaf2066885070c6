"""``vmferry lab up --clusters 2 --nodes 2 --netns``: each cluster's nodes on a main
network of their own (cluster1 192.0.2.0/24, cluster2 203.0.113.0/24, not routed to each
other), both clusters' eth1 on ONE migration bridge (198.51.100.0/24, the NADs' disjoint
ranges), the link between them cut by taking that bridge down, and ``lab down`` leaving
no namespace behind.

Needs root and network namespaces; skips and says why otherwise."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_lab_netns import REASON
from tests.support.lab import MultiLabHarness
from vmferry.lab import netns
from vmferry.lab.cluster import NETNS_MIGRATION_PORT
from vmferry.lab.multi import MIGRATION_RANGES
from vmferry.migration_network import MIGRATION_IP

pytestmark = pytest.mark.skipif(REASON is not None, reason=REASON or "")
CLUSTERS = ("cluster1", "cluster2")


@pytest.fixture(scope="module")
def labs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiLabHarness]:
    harness = MultiLabHarness(Path(tmp_path_factory.mktemp("multinetns")))
    try:
        harness.up_clusters(2, nodes=2, memory="1Gi", netns=True)
        yield harness
    finally:
        harness.down()


def _can_connect(ns: str, address: str, port: int) -> bool:
    probe = (
        "import socket,sys\n"
        "try:\n"
        f"    socket.create_connection(({address!r}, {port}), 2).close()\n"
        "except OSError as e:\n"
        "    sys.exit(f'{e}')\n"
    )
    proc = subprocess.run(
        [*netns.exec_prefix(ns), sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        timeout=15,
    )
    return proc.returncode == 0


def _addresses(labs: MultiLabHarness, cluster: str, node: str) -> dict[str, str]:
    status = labs.get_in(cluster, "node", node)["status"]
    return {a["type"]: a["address"] for a in status["addresses"]}


@pytest.mark.timeout(180)
def test_separate_main_networks_one_migration_network(labs: MultiLabHarness) -> None:
    info = {c: labs.cluster(c).info()["netns"] for c in CLUSTERS}
    assert info["cluster1"]["main"] == "192.0.2.0/24"
    assert info["cluster2"]["main"] == "203.0.113.0/24"
    shared = labs.multi.migration_bridge()
    assert shared["namespace"] == info["cluster1"]["lab"]
    assert info["cluster2"]["migrationBridgeNs"] == shared["namespace"]

    def migration_ips() -> dict[tuple[str, str], str] | None:
        out = {}
        for cluster in CLUSTERS:
            for node in ("node1", "node2"):
                ip = _addresses(labs, cluster, node).get(MIGRATION_IP, "")
                if not ip or ipaddress.IPv4Address(ip) not in netns.MIGRATION_NETWORK:
                    return None
                out[(cluster, node)] = ip
        return out

    ips = labs.wait_for("every node's eth1 address from its cluster's NAD", migration_ips, 60)
    for (cluster, _node), ip in ips.items():
        start, end = MIGRATION_RANGES[CLUSTERS.index(cluster)]
        assert (
            ipaddress.IPv4Address(start) <= ipaddress.IPv4Address(ip) <= ipaddress.IPv4Address(end)
        )
    assert len(set(ips.values())) == 4
    c2node1 = labs.cluster("cluster2").netns_of("node1")
    assert c2node1 is not None
    target = ips[("cluster1", "node1")]
    # cluster2's node reaches cluster1's node's migration service over the shared bridge...
    assert labs.wait_for(
        "cluster2/node1 to reach cluster1/node1 on the migration network",
        lambda: _can_connect(c2node1, target, NETNS_MIGRATION_PORT),
        30,
    )
    # ... but not its main address: the main networks are apart
    main1 = _addresses(labs, "cluster1", "node1")["InternalIP"]
    assert ipaddress.IPv4Address(main1) in ipaddress.IPv4Network("192.0.2.0/24")
    assert not _can_connect(c2node1, main1, NETNS_MIGRATION_PORT)
    # the link between the clusters' migration networks is the shared bridge
    bridge = ["ip", "-n", shared["namespace"], "link", "set", shared["bridge"]]
    subprocess.run([*bridge, "down"], check=True, timeout=10)
    try:
        assert not _can_connect(c2node1, target, NETNS_MIGRATION_PORT)
    finally:
        subprocess.run([*bridge, "up"], check=True, timeout=10)
    assert labs.wait_for(
        "the link to come back",
        lambda: _can_connect(c2node1, target, NETNS_MIGRATION_PORT),
        30,
    )


@pytest.mark.timeout(90)
def test_down_removes_both_clusters_namespaces(labs: MultiLabHarness) -> None:
    prefixes = [labs.cluster(c).netns_prefix for c in CLUSTERS]
    assert all(netns.namespaces(p) for p in prefixes)
    labs.cli("lab", "down", timeout=60)
    assert not any(netns.namespaces(p) for p in prefixes)
    assert set(labs.cli("lab", "status").stdout.split()) <= {
        *labs.multi.components(),
        "stopped",
    }
