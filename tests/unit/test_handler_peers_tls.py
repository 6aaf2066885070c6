"""Trust across two CAs, with real mTLS on loopback (issue 18, the handler's half).

Two clusters, each with its own CA made by vmferry.pki; node names repeat (both have a
node1 and a node2). cluster2's node2 is a migration target whose migration service
(the real memvm Transfer service, credentials from ``peers.MigrationTrust``) expects two
migrations: ``m-peer`` from cluster1's node1 (``peerCluster: cluster1``) and ``m-local``
from its own cluster's node1. What the target accepts: the peer CA's node for the peer's
migration; what it refuses, with the rule that failed: a peer node for an in-cluster
migration, this cluster's node for the peer's migration, the wrong CN, an unregistered
CA. The source side: ``peers.dial_credentials`` trusts only the peer's CA (a target
certificate of another CA fails the handshake) and refuses an unknown peer."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from handler import stream
from handler.migration import channels
from handler.migration.handoff import MigrationFailed
from handler.migration.incoming import IncomingMigration, IncomingRegistry
from handler.migration.memvm_target import MigrationService
from handler.migration.restart_record import RestartRecords
from handler.peers import MigrationTrust, PeerRegistry, dial_credentials
from tests.support.fake_handle import FakeHandle
from vmferry import pki
from vmferry.decentralized import PEERS_CONFIGMAP, PEERS_NAMESPACE
from vmferry.rpc import migration_pb2 as pb

pytestmark = pytest.mark.timeout(60)

TOKEN = "the-token"
PEER_MIG, LOCAL_MIG = "m-peer", "m-local"


@dataclass
class Clusters:
    c1: Path  # cluster1's PKI (the sending cluster)
    c2: Path  # cluster2's PKI (the receiving cluster, the target's own)
    c3: Path  # cluster3's PKI: a CA nobody registered

    def node(self, pki_dir: Path, name: str) -> pki.TlsFiles:
        return pki.issue_node(pki_dir, name, ips=["127.0.0.1"])

    def ca_pem(self, pki_dir: Path) -> str:
        return pki.load_ca_pem(pki_dir).decode()


@pytest.fixture
def clusters(tmp_path: Path) -> Clusters:
    dirs = Clusters(tmp_path / "c1", tmp_path / "c2", tmp_path / "c3")
    pki.init_ca(dirs.c1, "cluster1")
    pki.init_ca(dirs.c2, "cluster2")
    pki.init_ca(dirs.c3, "cluster3")
    return dirs


def expected(uid: str, source_node: str, peer_cluster: str) -> IncomingMigration:
    return IncomingMigration(
        namespace="default",
        name="vm",
        vmi_uid=f"uid-{uid}",
        migration_uid=uid,
        token=TOKEN,
        source_node=source_node,
        handle=FakeHandle(f"uid-{uid}.in-x"),
        peer_cluster=peer_cluster,
    )


@asynccontextmanager
async def target(
    tmp_path: Path, tls: pki.TlsFiles, peers: PeerRegistry
) -> AsyncIterator[tuple[str, IncomingRegistry]]:
    """cluster2's node2 migration service on loopback; yields (address, registry)."""
    trust = MigrationTrust(tls, peers)
    registry = IncomingRegistry(
        RestartRecords(tmp_path / "incoming"), require_peer_identity=True, trust=trust
    )
    registry.expect(expected(PEER_MIG, "node1", "cluster1"))
    registry.expect(expected(LOCAL_MIG, "node1", ""))
    server = grpc.aio.server()
    MigrationService(registry).register(server)
    port = server.add_secure_port("127.0.0.1:0", trust.server_credentials())
    await server.start()
    try:
        yield f"127.0.0.1:{port}", registry
    finally:
        await server.stop(grace=None)


async def hello(
    address: str, credentials: grpc.ChannelCredentials | None, uid: str, token: str = TOKEN
) -> str:
    """Open one Transfer stream as the real source does (channels.connect, Hello): "ok"
    on HelloAck, else the refusal as "CODE: details"."""
    (conn,) = channels.connect(address, "node2", credentials, 1)
    try:
        call = stream.open_transfer(conn)
        frame = pb.Hello(
            protocol_version=stream.PROTOCOL_VERSION,
            migration_uid=uid,
            token=token,
            channel_count=1,
            memory_bytes=1 << 20,
            page_size=FakeHandle().spec.page_size,
        )
        try:
            await call.write(pb.SourceFrame(hello=frame).SerializeToString())
            first = await call.read()
        except grpc.aio.AioRpcError as e:
            return f"{e.code().name}: {e.details()}"
        call.cancel()
        assert first is not grpc.aio.EOF
        return "ok" if first.WhichOneof("frame") == "hello_ack" else str(first)
    finally:
        await conn.close()


def run(coro: object) -> None:
    asyncio.run(coro)  # type: ignore[arg-type]


def test_the_peer_node_is_admitted_for_its_migration_and_only_for_it(
    tmp_path: Path, clusters: Clusters
) -> None:
    async def main() -> None:
        peers = PeerRegistry({"cluster1": clusters.ca_pem(clusters.c1)})
        c1_node1 = clusters.node(clusters.c1, "node1")
        c2_node1 = clusters.node(clusters.c2, "node1")
        c1_node2 = clusters.node(clusters.c1, "node2")
        # the source's trust: cluster2's CA registered as its peer (dial_credentials)
        source_peers = PeerRegistry({"cluster2": clusters.ca_pem(clusters.c2)})
        async with target(tmp_path, clusters.node(clusters.c2, "node2"), peers) as (addr, _):
            as_c1_node1 = dial_credentials(c1_node1, source_peers, "cluster2")
            assert await hello(addr, as_c1_node1, PEER_MIG) == "ok"
            # the same peer node, for the target's in-cluster migration: refused
            assert await hello(addr, as_c1_node1, LOCAL_MIG) == (
                "PERMISSION_DENIED: a certificate of cluster1's CA, but migration "
                "m-local's source is in this cluster"
            )
            # this cluster's node1 (same name as the source!) for the peer's migration
            own = dial_credentials(c2_node1, None, "")
            assert await hello(addr, own, PEER_MIG) == (
                "PERMISSION_DENIED: a certificate of this cluster's CA, but migration "
                "m-peer's source is in cluster1"
            )
            assert await hello(addr, own, LOCAL_MIG) == "ok"  # in-cluster as before
            # the right CA, the wrong node
            wrong = dial_credentials(c1_node2, source_peers, "cluster2")
            assert await hello(addr, wrong, PEER_MIG) == (
                "PERMISSION_DENIED: CN system:node:node2 is not the source node node1 of "
                "migration m-peer"
            )
            # the right node, the wrong token
            assert await hello(addr, as_c1_node1, PEER_MIG, "stolen") == (
                "PERMISSION_DENIED: wrong migration token"
            )

    run(main())


def test_an_unregistered_ca_is_refused_and_a_registration_is_taken_without_restart(
    tmp_path: Path, clusters: Clusters
) -> None:
    async def main() -> None:
        peers = PeerRegistry()  # cluster1 not registered yet
        c1_node1 = clusters.node(clusters.c1, "node1")
        c3_node1 = clusters.node(clusters.c3, "node1")
        source_peers = PeerRegistry({"cluster2": clusters.ca_pem(clusters.c2)})
        creds = dial_credentials(c1_node1, source_peers, "cluster2")
        async with target(tmp_path, clusters.node(clusters.c2, "node2"), peers) as (addr, _):
            # No registered CA issued the client certificate: the handshake fails.
            assert (await hello(addr, creds, PEER_MIG)).startswith("UNAVAILABLE")
            # The ConfigMap gains cluster1: the next handshake trusts its CA.
            peers.on_configmap(
                (PEERS_NAMESPACE, PEERS_CONFIGMAP),
                None,
                {"data": {"cluster1": clusters.ca_pem(clusters.c1)}},
            )
            assert await hello(addr, creds, PEER_MIG) == "ok"
            # A CA nobody registered still fails the handshake.
            c3 = dial_credentials(c3_node1, source_peers, "cluster2")
            assert (await hello(addr, c3, PEER_MIG)).startswith("UNAVAILABLE")
            # cluster1 registered under another name than the migration's peerCluster
            peers.replace({"elsewhere": clusters.ca_pem(clusters.c1)})
            assert await hello(addr, creds, PEER_MIG) == (
                "PERMISSION_DENIED: peer cluster cluster1 is not registered in "
                "openshift-cnv/vmferry-peer-clusters"
            )

    run(main())


def test_a_certificate_of_another_registered_peer_is_refused(
    tmp_path: Path, clusters: Clusters
) -> None:
    async def main() -> None:
        peers = PeerRegistry(
            {
                "cluster1": clusters.ca_pem(clusters.c1),
                "cluster3": clusters.ca_pem(clusters.c3),
            }
        )
        source_peers = PeerRegistry({"cluster2": clusters.ca_pem(clusters.c2)})
        c3 = dial_credentials(clusters.node(clusters.c3, "node1"), source_peers, "cluster2")
        async with target(tmp_path, clusters.node(clusters.c2, "node2"), peers) as (addr, _):
            assert await hello(addr, c3, PEER_MIG) == (
                "PERMISSION_DENIED: a certificate of cluster3's CA, but migration "
                "m-peer's source is in cluster1"
            )

    run(main())


def test_the_source_trusts_only_the_peer_ca(tmp_path: Path, clusters: Clusters) -> None:
    async def main() -> None:
        c1_node1 = clusters.node(clusters.c1, "node1")
        source_peers = PeerRegistry({"cluster2": clusters.ca_pem(clusters.c2)})
        creds = dial_credentials(c1_node1, source_peers, "cluster2")
        # The target accepts cluster1's node, but presents a certificate of cluster1's
        # own CA (not cluster2's): the source, trusting only cluster2's CA, refuses it.
        peers = PeerRegistry({"cluster1": clusters.ca_pem(clusters.c1)})
        impostor = clusters.node(clusters.c1, "node2")
        async with target(tmp_path / "a", impostor, peers) as (addr, _):
            assert (await hello(addr, creds, PEER_MIG)).startswith("UNAVAILABLE")
        # cluster3's node2 (a CA the source never registered): refused too
        async with target(tmp_path / "b", clusters.node(clusters.c3, "node2"), peers) as (addr, _):
            assert (await hello(addr, creds, PEER_MIG)).startswith("UNAVAILABLE")
        # cluster2's node2: accepted
        async with target(tmp_path / "c", clusters.node(clusters.c2, "node2"), peers) as (addr, _):
            assert await hello(addr, creds, PEER_MIG) == "ok"

    run(main())


def test_an_unknown_peer_fails_the_migration_with_the_registry_named(
    clusters: Clusters,
) -> None:
    tls = clusters.node(clusters.c1, "node1")
    with pytest.raises(MigrationFailed) as failed:
        dial_credentials(tls, PeerRegistry({"cluster2": clusters.ca_pem(clusters.c2)}), "cluster9")
    assert str(failed.value) == (
        "peer cluster cluster9 is not registered in openshift-cnv/vmferry-peer-clusters"
    )
    with pytest.raises(MigrationFailed, match="peer cluster cluster2 is not registered"):
        dial_credentials(tls, None, "cluster2")
    assert dial_credentials(None, None, "cluster2") is None  # plain text (tests only)


def test_the_registry_follows_its_configmap_only(clusters: Clusters) -> None:
    peers = PeerRegistry()
    pem = clusters.ca_pem(clusters.c1)
    peers.on_configmap((PEERS_NAMESPACE, "other"), None, {"data": {"x": pem}})
    assert peers.names() == []
    peers.on_configmap(
        (PEERS_NAMESPACE, PEERS_CONFIGMAP), None, {"data": {"cluster1": pem, "bad": "nope"}}
    )
    assert peers.names() == ["cluster1"]  # a value that is no certificate is left out
    version = peers.version
    peers.on_configmap(
        (PEERS_NAMESPACE, PEERS_CONFIGMAP), None, {"data": {"cluster1": pem, "bad": "nope"}}
    )
    assert peers.version == version  # the same data: no new TLS configuration
    peers.on_configmap((PEERS_NAMESPACE, PEERS_CONFIGMAP), {"data": {}}, None)
    assert peers.names() == [] and peers.version == version + 1
