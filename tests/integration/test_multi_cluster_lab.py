"""``vmferry lab up --clusters 2 --nodes 2`` (loopback): two clusters with their own CAs,
controllers, (sync controllers) and handlers; client contexts; each cluster the other's
registered peer; qualified component names; ``lab down`` stops everything."""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.lab import MultiLabHarness
from vmferry.decentralized import PEERS_CONFIGMAP
from vmferry.lab.cluster import SYNC, sync_unavailable_reason
from vmferry.migration_network import MIGRATION_IP

CLUSTERS = ("cluster1", "cluster2")


@pytest.fixture(scope="module")
def labs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MultiLabHarness]:
    harness = MultiLabHarness(Path(tmp_path_factory.mktemp("multilab")))
    try:
        harness.up_clusters(2, nodes=2, memory="1Gi")
        yield harness
    finally:
        harness.down()


def _status(labs: MultiLabHarness) -> dict[str, str]:
    out = labs.cli("lab", "status").stdout
    return {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines() if line.strip()}


@pytest.mark.timeout(180)
def test_both_controllers_answer_through_contexts(labs: MultiLabHarness) -> None:
    contexts = labs.cli("config", "get-contexts").stdout.splitlines()
    assert contexts[1].split()[:2] == ["*", "cluster1"]
    assert contexts[2].split()[0] == "cluster2"
    assert labs.cli("config", "current-context").stdout.strip() == "cluster1"
    servers = set()
    for k, cluster in enumerate(CLUSTERS, start=1):
        for argv in (
            ["--context", cluster, "get", "node", "-o", "json"],
            ["get", "node", "-o", "json", "--context", cluster],  # the flag after the verb
        ):
            nodes = json.loads(labs.cli(*argv).stdout)["items"]
            assert sorted(n["metadata"]["name"] for n in nodes) == ["node1", "node2"]
            for n in nodes:
                addresses = {a["type"]: a["address"] for a in n["status"]["addresses"]}
                index = n["metadata"]["name"].removeprefix("node")
                # the clusters' migration addresses never collide: 127.0.<cluster>.<node>
                assert addresses[MIGRATION_IP] == f"127.0.{k}.{index}"
        servers.add(labs.cluster(cluster).info()["apiPort"])
        assert "admin" in labs.in_cluster(cluster, "whoami").stdout
    assert len(servers) == 2
    # without --context: the current one; use-context switches it
    labs.cli("config", "use-context", "cluster2")
    try:
        assert labs.cli("config", "current-context").stdout.strip() == "cluster2"
        cm = json.loads(
            labs.cli("get", "cm", PEERS_CONFIGMAP, "-n", "openshift-cnv", "-o", "json").stdout
        )
        assert set(cm["data"]) == {"cluster1"}  # cluster2's peers
    finally:
        labs.cli("config", "use-context", "cluster1")
    bad = labs.cli("--context", "cluster3", "get", "node", check=False)
    assert bad.returncode == 1 and "context 'cluster3' is not in" in bad.stderr


@pytest.mark.timeout(60)
def test_each_cluster_registered_the_other_as_peer(labs: MultiLabHarness) -> None:
    for cluster, peer in (CLUSTERS, CLUSTERS[::-1]):
        # what the reference's 12.6.1 command prints in the peer cluster...
        ca = labs.in_cluster(
            peer,
            "get",
            "cm",
            "kube-root-ca.crt",
            "-n",
            "openshift-cnv",
            "-o",
            "jsonpath={.data.ca\\.crt}",
        ).stdout
        assert "BEGIN CERTIFICATE" in ca
        assert ca.strip() == (labs.cluster(peer).pki_dir / "ca.crt").read_text().strip()
        # ... is what this cluster trusts under the peer's name
        peers = labs.get_in(cluster, "cm", PEERS_CONFIGMAP, "openshift-cnv")["data"]
        assert set(peers) == {peer}
        assert peers[peer].strip() == ca.strip()
        listed = labs.in_cluster(cluster, "adm", "peer", "list").stdout.splitlines()
        assert listed[0].split()[:3] == ["NAME", "CA", "SUBJECT"]
        assert listed[1].split()[:2] == [peer, f"CN=vmferry-lab-{peer}-ca"]


@pytest.mark.timeout(60)
def test_peer_verbs_against_a_real_controller(labs: MultiLabHarness, tmp_path: Path) -> None:
    own = labs.cluster("cluster1").pki_dir / "ca.crt"
    refused = labs.in_cluster(
        "cluster1", "adm", "peer", "add", "cluster9", "--ca", str(own), check=False
    )
    assert refused.returncode == 1 and "this cluster's own" in refused.stderr
    other = labs.cluster("cluster2").pki_dir / "ca.crt"
    dup = labs.in_cluster(
        "cluster1", "adm", "peer", "add", "cluster9", "--ca", str(other), check=False
    )
    assert dup.returncode == 1 and "already registered as peer 'cluster2'" in dup.stderr
    missing = labs.in_cluster(
        "cluster1",
        "adm",
        "peer",
        "add",
        "cluster9",
        "--ca",
        str(tmp_path / "nope.crt"),
        check=False,
    )
    assert missing.returncode == 1 and "nope.crt" in missing.stderr
    gone = labs.in_cluster("cluster1", "adm", "peer", "remove", "cluster9", check=False)
    assert (
        gone.returncode == 1 and "peer cluster9 is not registered (peers: cluster2)" in gone.stderr
    )


@pytest.mark.timeout(60)
def test_status_lists_every_component_qualified(labs: MultiLabHarness) -> None:
    status = _status(labs)
    expected = ["controller", "node1", "node2"]
    if sync_unavailable_reason() is None:
        expected.insert(1, SYNC)
    assert list(status) == [f"{c}/{comp}" for c in CLUSTERS for comp in expected]
    assert all(s.startswith("running, pid ") for s in status.values()), status
    # kill and start one node of cluster2 by its qualified name; cluster1's node1 stays
    labs.cli("lab", "kill", "cluster2/node1")
    assert _status(labs)["cluster2/node1"] == "stopped"
    assert _status(labs)["cluster1/node1"].startswith("running")
    unqualified = labs.cli("lab", "kill", "node1", check=False)
    assert unqualified.returncode == 1 and "CLUSTER/COMPONENT" in unqualified.stderr
    labs.restart("cluster2/node1")  # starts it again, waits until it posted Ready
    if SYNC in expected:  # a sync controller killed and started again listens again
        labs.restart("cluster1/sync")
        assert _status(labs)["cluster1/sync"].startswith("running")
    again = labs.cli("lab", "up", "--clusters", "2", "--nodes", "2", check=False)
    assert again.returncode == 1 and "already running" in again.stderr


@pytest.mark.timeout(30)
def test_sync_controllers_serve_readyz_and_metrics_over_https(labs: MultiLabHarness) -> None:
    if sync_unavailable_reason() is not None:
        pytest.skip(f"no sync controller: {sync_unavailable_reason()}")
    for name in CLUSTERS:
        lab = labs.cluster(name)
        port = lab.info()["sync"]["metricsPort"]
        ctx = ssl.create_default_context(cafile=str(lab.pki_dir / "ca.crt"))

        def get(path: str, port: int = port, ctx: ssl.SSLContext = ctx) -> str:
            url = f"https://127.0.0.1:{port}{path}"
            with urllib.request.urlopen(url, timeout=5, context=ctx) as resp:
                return str(resp.read().decode())

        labs.wait_for(f"{name}'s sync controller to be ready", lambda: get("/readyz") == "ok\n")
        text = get("/metrics")
        assert "vmferry_sync_controller_ready_status 1.0" in text
        assert "process_cpu_seconds_total" in text


@pytest.mark.timeout(90)
def test_down_stops_everything(labs: MultiLabHarness) -> None:
    pids = [labs.multi.pid(c) for c in labs.multi.components()]
    assert all(pids)
    out = labs.cli("lab", "down", timeout=60).stdout
    assert "cluster1/controller" in out and "cluster2/node2" in out
    assert set(_status(labs).values()) == {"stopped"}
    for pid in pids:
        assert pid is not None
        assert (
            not Path(f"/proc/{pid}").exists()
            or "Z" in Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        )
