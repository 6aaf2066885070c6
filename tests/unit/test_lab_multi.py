"""The multi-cluster lab's names, addresses and configuration files (nothing is started
here: tests/integration/test_multi_cluster_lab.py brings two clusters up)."""

from __future__ import annotations

import ipaddress
import json
import tomllib
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from vmferry.lab import Lab, LabError, netns
from vmferry.lab.cluster import SYNC
from vmferry.lab.multi import (
    MULTI_FILE,
    MultiLab,
    cluster_names,
    migration_nad,
    open_lab,
    split_component,
)
from vmferry.migration_network import allocate, parse_nad_config


def _write_multi(root: Path, *, sync: bool, netns_mode: bool = False) -> MultiLab:
    """What MultiLab.up writes, without starting anything."""
    multi = MultiLab(root)
    root.mkdir(parents=True)
    (root / MULTI_FILE).write_text(json.dumps({"clusters": ["cluster1", "cluster2"]}))
    for spec in multi._specs(["cluster1", "cluster2"], sync=sync):
        lab = Lab(root / spec.name, spec)
        lab.write(2, "1Gi", lab._topology(2) if netns_mode else None)
    return multi


@pytest.mark.timeout(10)
def test_component_names() -> None:
    assert split_component("cluster2/node1") == ("cluster2", "node1")
    assert split_component("cluster1/sync") == ("cluster1", "sync")
    for bad in ("node1", "/node1", "cluster1/", "cluster1"):
        with pytest.raises(LabError, match="name a component as CLUSTER/COMPONENT"):
            split_component(bad)
    assert cluster_names(2) == ["cluster1", "cluster2"]
    for bad_count in (0, 1, 3):
        with pytest.raises(LabError, match=f"--clusters {bad_count}"):
            cluster_names(bad_count)


@pytest.mark.timeout(30)
def test_two_clusters_loopback_files(tmp_path: Path) -> None:
    multi = _write_multi(tmp_path / "lab", sync=True)
    assert isinstance(open_lab(multi.dir), MultiLab)
    assert isinstance(open_lab(tmp_path / "other"), Lab)
    assert multi.clusters() == ["cluster1", "cluster2"]
    assert multi.components() == [
        f"{c}/{comp}"
        for c in ("cluster1", "cluster2")
        for comp in ("controller", SYNC, "node1", "node2")
    ]
    with pytest.raises(LabError, match="no cluster 'cluster3'"):
        multi.pid("cluster3/node1")
    with pytest.raises(LabError, match="no component 'node9'"):
        multi.start("cluster1/node9")
    ports = set()
    for k, cluster in enumerate(("cluster1", "cluster2"), start=1):
        lab = multi.lab(cluster)
        info = lab.info()
        assert info["cluster"] == {
            "name": cluster,
            "index": k,
            "peers": [n for n in ("cluster1", "cluster2") if n != cluster],
        }
        # migration addresses: 127.0.<cluster index>.<node index>, never the other's
        for i in (1, 2):
            cfg = tomllib.loads((lab.dir / "nodes" / f"node{i}" / "handler.toml").read_text())
            assert cfg["migration_address"] == f"127.0.{k}.{i}"
            ports.add(cfg["migration_port"])
        sync = tomllib.loads(lab.sync_config_path.read_text())
        assert set(sync) == {
            "cluster_name",
            "api_server",
            "ca",
            "cert",
            "key",
            "listen",
            "advertise",
            "log_level",
            "metrics_listen",
        }
        assert sync["metrics_listen"] == f"127.0.0.1:{info['sync']['metricsPort']}"
        assert sync["cluster_name"] == cluster
        assert sync["api_server"] == f"127.0.0.1:{info['apiPort']}"
        assert sync["listen"] == sync["advertise"] == info["sync"]["advertise"]
        assert sync["advertise"].startswith("127.0.0.1:")
        # the sync controller's certificate is from its own cluster's CA and names 127.0.0.1
        cert = x509.load_pem_x509_certificate(Path(sync["cert"]).read_bytes())
        ca = x509.load_pem_x509_certificate(Path(sync["ca"]).read_bytes())
        assert cert.issuer == ca.subject
        assert ca.subject.rfc4514_string() == f"CN=vmferry-lab-{cluster}-ca"
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert ipaddress.IPv4Address("127.0.0.1") in sans.get_values_for_type(x509.IPAddress)
        assert lab._component(SYNC).argv[1:] == [
            "-m",
            "sync_controller.main",
            "--config",
            str(lab.sync_config_path),
        ]
    # two different CAs
    c1, c2 = (multi.lab(c).pki_dir / "ca.crt" for c in ("cluster1", "cluster2"))
    assert c1.read_bytes() != c2.read_bytes()


@pytest.mark.timeout(30)
def test_without_sync_controllers_no_component(tmp_path: Path) -> None:
    multi = _write_multi(tmp_path / "lab", sync=False)
    assert "cluster1/sync" not in multi.components()
    assert not multi.lab("cluster1").sync_config_path.exists()


@pytest.mark.timeout(30)
def test_two_clusters_netns_topology(tmp_path: Path) -> None:
    multi = _write_multi(tmp_path / "lab", sync=False, netns_mode=True)
    one, two = multi.lab("cluster1"), multi.lab("cluster2")
    n1, n2 = one.info()["netns"], two.info()["netns"]
    assert one.netns_prefix != two.netns_prefix
    assert (n1["main"], n1["gateway"]) == ("192.0.2.0/24", "192.0.2.1")
    assert (n2["main"], n2["gateway"]) == ("203.0.113.0/24", "203.0.113.1")
    # one migration bridge: cluster1's
    assert n1["migrationBridgeNs"] == n2["migrationBridgeNs"] == f"{one.netns_prefix}-lab"
    spec2 = multi._specs(["cluster1", "cluster2"], sync=False)[1]
    topo2 = Lab(two.dir, spec2)._topology(2)
    assert topo2.peer("node1", netns.MIGRATION_NIC) == "c2v1-mig"  # no clash with v1-mig
    assert topo2.bridge_ns(netns.MIGRATION_NIC) == f"{one.netns_prefix}-lab"
    assert topo2.bridge_ns(netns.MAIN_NIC) == f"{two.netns_prefix}-lab"
    cfg = tomllib.loads((two.dir / "nodes" / "node2" / "handler.toml").read_text())
    assert cfg["api_server"] == f"203.0.113.1:{two.info()['apiPort']}"
    assert cfg["main_address"] == "203.0.113.12"
    controller = tomllib.loads((two.dir / "controller.toml").read_text())
    cert = x509.load_pem_x509_certificate(Path(controller["cert"]).read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert ipaddress.IPv4Address("203.0.113.1") in sans.get_values_for_type(x509.IPAddress)
    assert multi.components()[:3] == ["cluster1/controller", "cluster1/gateway", "cluster1/node1"]


@pytest.mark.timeout(10)
def test_migration_nads_share_one_subnet_with_disjoint_addresses() -> None:
    main = ["192.0.2.11", "192.0.2.12", "203.0.113.11", "203.0.113.12"]
    nads = [
        parse_nad_config(migration_nad(c, k)["spec"]["config"], main)
        for k, c in enumerate(("cluster1", "cluster2"), start=1)
    ]
    assert nads[0].network == nads[1].network == netns.MIGRATION_NETWORK  # on-link both ways
    assert not set(nads[0].usable()) & set(nads[1].usable())
    nodes = [f"node{i}" for i in range(1, 101)]  # even 100 nodes each never collide
    a, b = allocate(nads[0], {}, nodes), allocate(nads[1], {}, nodes)
    assert not set(a.values()) & set(b.values())
    assert a["node1"] == "198.51.100.10/24" and b["node1"] == "198.51.100.138/24"


@pytest.mark.timeout(60)
def test_lab_providers_are_what_12_6_produces(tmp_path: Path) -> None:
    """The objects MultiLab.up creates to make cluster2 a Provider in cluster1: in cluster2
    the reference's cluster role, the service account, its binding and token Secret; in
    cluster1 the Secret {token, cacert} and the Provider, which the orchestrator's own
    reconciler finds Ready against a real token listener."""
    import asyncio
    import base64

    from controller.authn import SA_NAME_ANNOTATION
    from controller.forklift.provider import (
        READY,
        ProviderReason,
        ProviderReconciler,
        TokenConnector,
        provider_access,
    )
    from controller.store import Store
    from tests.support.fake_api import StoreApi
    from tests.support.forklift_clusters import MTV_CLUSTERROLE, token_cluster
    from vmferry.lab.multi import (
        GATE_PATCHES,
        PROVIDER_SERVICE_ACCOUNT,
        PROVIDER_TOKEN_SECRET,
        mtv_cluster_role,
        provider_account_manifests,
        provider_manifests,
    )
    from vmferry.objects import conditions, kinds, schema

    assert mtv_cluster_role() == yaml.safe_load(MTV_CLUSTERROLE.read_text())
    assert [(k, name) for k, _, name, _ in GATE_PATCHES] == [
        ("HyperConverged", "kubevirt-hyperconverged"),
        ("ForkliftController", "forklift-controller"),
    ]
    ns = kinds.MTV_NAMESPACE

    async def main() -> None:
        async with token_cluster(tmp_path, "cluster2") as c2:
            role = mtv_cluster_role()
            await c2.store.create(schema.validate(role))
            made = {}
            for obj in provider_account_manifests(role["metadata"]["name"]):
                made[obj["kind"]] = await c2.store.create(schema.validate(obj))
            binding = made["ClusterRoleBinding"]
            assert binding["roleRef"]["name"] == "live-migration-role"
            assert binding["subjects"] == [
                {"kind": "ServiceAccount", "name": PROVIDER_SERVICE_ACCOUNT, "namespace": ns}
            ]
            secret = made["Secret"]
            assert secret["metadata"]["name"] == PROVIDER_TOKEN_SECRET
            assert secret["metadata"]["annotations"] == {SA_NAME_ANNOTATION: "mtv-provider"}
            # what the cluster's token controller does with that Secret
            token = c2.signer.issue(ns, secret, made["ServiceAccount"])
            secret["data"] = {"token": base64.b64encode(token.encode()).decode()}
            await c2.store.update(secret)
            home = StoreApi(await Store.open(tmp_path / "home.db"))
            await home.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
            for obj in provider_manifests("cluster2", c2.url, token, c2.ca_pem.decode()):
                await home.create(schema.validate(obj))
            provider = await home.get("Provider", ns, "cluster2")
            access = await provider_access(home, provider)
            assert access.server == f"127.0.0.1:{c2.port}"
            assert access.token == token and access.ca_pem.strip() == c2.ca_pem.strip()
            connector = TokenConnector(home, tmp_path / "cas", timeout=5)
            try:
                await ProviderReconciler(home, connector).reconcile((ns, "cluster2"))
            finally:
                await connector.close()
            cond = conditions.get(await home.get("Provider", ns, "cluster2"), READY)
            assert cond is not None and cond["status"] == "True", cond
            assert cond["reason"] == ProviderReason.CONNECTED
            assert f"system:serviceaccount:{ns}:mtv-provider" in cond["message"]
            await home.close()

    asyncio.run(main())
