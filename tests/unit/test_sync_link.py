"""SyncLink (sync_controller/link.py): two real links over loopback mTLS, each cluster with
its own CA made by vmferry.pki, the peers ConfigMap replaced by PeerCAs updated by hand."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from sync_controller import link as link_mod
from sync_controller.link import SyncLink, state_from_proto, state_to_proto
from sync_controller.peer import PeerError
from sync_controller.peer_cas import PeerCAs
from vmferry import pki
from vmferry.decentralized import Role, SyncState
from vmferry.rpc import sync_pb2, sync_pb2_grpc

TIMEOUT = 30


@dataclass
class Cluster:
    name: str
    pki_dir: Path
    tls: pki.TlsFiles

    @property
    def ca_pem(self) -> str:
        return self.tls.ca.read_text()


def make_cluster(tmp: Path, name: str) -> Cluster:
    d = tmp / name
    pki.init_ca(d, name)
    return Cluster(name, d, pki.issue_sync(d, "sync", ips=["127.0.0.1"]))


@pytest.fixture
def clusters(tmp_path: Path) -> tuple[Cluster, Cluster, Cluster]:
    return (
        make_cluster(tmp_path, "cluster1"),
        make_cluster(tmp_path, "cluster2"),
        make_cluster(tmp_path, "cluster3"),
    )


async def eventually(check: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def sender_state(mid: str = "m1", **kw: object) -> SyncState:
    values: dict[str, object] = {
        "migration_id": mid,
        "role": Role.SENDER,
        "migration_uid": "uid-1",
        "namespace": "default",
        "vmi_name": "busy-vm",
        "phase": "Synchronizing",
        "source_node": "node1",
        "token": "tok",
        "memory_bytes": 1 << 30,
    }
    values.update(kw)
    return SyncState(**values)  # type: ignore[arg-type]


def receiver_state(mid: str = "m1", **kw: object) -> SyncState:
    values: dict[str, object] = {
        "migration_id": mid,
        "role": Role.RECEIVER,
        "phase": "Scheduling",
        "target_node": "node2",
        "target_address": "10.0.0.2",
        "target_port": 7444,
    }
    values.update(kw)
    return SyncState(**values)  # type: ignore[arg-type]


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), TIMEOUT - 5))


def test_every_syncstate_field_is_on_the_wire() -> None:
    names = {f.name for f in dataclasses.fields(SyncState)}
    assert names == set(sync_pb2.SyncState.DESCRIPTOR.fields_by_name)
    full = SyncState(
        migration_id="m",
        role=Role.RECEIVER,
        migration_uid="u",
        namespace="ns",
        vmi_name="v",
        phase="Running",
        source_node="n1",
        token="t",
        memory_bytes=5,
        switchover="Committed",
        completed=True,
        target_node="n2",
        target_address="a",
        target_port=7,
        target_resumed=True,
        failed=True,
        failure_reason="r",
        cancelled=True,
    )
    assert state_from_proto(state_to_proto(full)) == full


@pytest.mark.timeout(TIMEOUT)
def test_state_both_ways_and_again_after_a_reconnect(
    clusters: tuple[Cluster, Cluster, Cluster],
) -> None:
    c1, c2, _ = clusters

    async def scenario() -> None:
        a = SyncLink(c1.name, c1.tls, PeerCAs({c2.name: c2.ca_pem}))
        b = SyncLink(c2.name, c2.tls, PeerCAs({c1.name: c1.ca_pem}))
        seen_a: list[SyncState] = []
        seen_b: list[SyncState] = []
        a.on_peer_update = seen_a.append
        b.on_peer_update = seen_b.append
        await a.start()
        port = await b.start()
        try:
            b.publish(receiver_state())  # before the sender is there: delivered on connect
            a.publish(sender_state())
            a.connect("m1", f"127.0.0.1:{port}")
            await eventually(lambda: b.latest("m1") == sender_state(), "sender -> receiver")
            await eventually(lambda: a.latest("m1") == receiver_state(), "receiver -> sender")
            assert a.peer_cluster("m1") == c2.name
            assert b.peer_cluster("m1") == c1.name
            assert a.connection_error("m1") is None and b.connection_error("m1") is None
            # a change goes out at once, and on_peer_update sees each change once
            a.publish(sender_state(switchover="Committed"))
            await eventually(
                lambda: b.latest("m1") == sender_state(switchover="Committed"), "change"
            )
            assert [s.switchover for s in seen_b] == ["", "Committed"]
            assert seen_a == [receiver_state()]

            # the receiving sync controller restarts: the sender reconnects and both
            # halves are delivered again to the new one
            await b.close()
            await eventually(lambda: a.connection_error("m1") is not None, "the link down")
            b2 = SyncLink(
                c2.name, c2.tls, PeerCAs({c1.name: c1.ca_pem}), listen=f"127.0.0.1:{port}"
            )
            await b2.start()
            try:
                b2.publish(receiver_state(target_resumed=True))
                await eventually(
                    lambda: b2.latest("m1") == sender_state(switchover="Committed"),
                    "re-sent after reconnect",
                )
                await eventually(
                    lambda: a.latest("m1") == receiver_state(target_resumed=True), "new state"
                )
                assert a.connection_error("m1") is None
                a.forget("m1")
                assert a.latest("m1") is None and a.connection_error("m1") is None
            finally:
                await b2.close()
        finally:
            await a.close()
            await b.close()

    run(scenario)


@pytest.mark.timeout(TIMEOUT)
def test_a_server_of_an_unregistered_ca_is_refused(
    clusters: tuple[Cluster, Cluster, Cluster],
) -> None:
    c1, c2, c3 = clusters

    async def scenario() -> None:
        a = SyncLink(c1.name, c1.tls, PeerCAs({c3.name: c3.ca_pem}))  # cluster2 not registered
        b = SyncLink(c2.name, c2.tls, PeerCAs({c1.name: c1.ca_pem}))
        port = await b.start()
        try:
            a.publish(sender_state())
            a.connect("m1", f"127.0.0.1:{port}")
            await eventually(lambda: a.connection_error("m1") is not None, "a refusal")
            error = a.connection_error("m1") or ""
            assert "presented a certificate of no registered peer CA" in error, error
            assert b.latest("m1") is None
            # registering cluster2 takes effect on the next attempt
            a._peers.update({c2.name: c2.ca_pem})
            await eventually(lambda: b.latest("m1") is not None, "delivery once registered")
            assert a.peer_cluster("m1") == c2.name
        finally:
            await a.close()
            await b.close()

    run(scenario)


@pytest.mark.timeout(TIMEOUT)
def test_a_client_of_an_unregistered_ca_is_refused(
    clusters: tuple[Cluster, Cluster, Cluster],
) -> None:
    c1, c2, c3 = clusters

    async def scenario() -> None:
        a = SyncLink(c1.name, c1.tls, PeerCAs({c2.name: c2.ca_pem}))
        b_peers = PeerCAs({c3.name: c3.ca_pem})  # cluster1 not registered in cluster2
        b = SyncLink(c2.name, c2.tls, b_peers)
        port = await b.start()
        try:
            a.publish(sender_state())
            a.connect("m1", f"127.0.0.1:{port}")
            await eventually(lambda: a.connection_error("m1") is not None, "a refusal")
            error = a.connection_error("m1") or ""
            assert "refused our certificate" in error, error
            assert "vmferry-peer-clusters" in error, error
            assert b.latest("m1") is None
            b_peers.update({c1.name: c1.ca_pem, c3.name: c3.ca_pem})  # the ConfigMap changes
            await eventually(lambda: b.latest("m1") is not None, "delivery once registered")
            assert b.peer_cluster("m1") == c1.name
        finally:
            await a.close()
            await b.close()

    run(scenario)


@pytest.mark.timeout(TIMEOUT)
def test_no_peer_registered_refuses_with_the_rule(
    clusters: tuple[Cluster, Cluster, Cluster],
) -> None:
    c1, c2, _ = clusters

    async def scenario() -> None:
        a = SyncLink(c1.name, c1.tls, PeerCAs())
        b = SyncLink(c2.name, c2.tls, PeerCAs())
        port = await b.start()
        try:
            a.connect("m1", f"127.0.0.1:{port}")
            await eventually(lambda: a.connection_error("m1") is not None, "a refusal")
            assert "no registered peer CA" in (a.connection_error("m1") or "")
        finally:
            await a.close()
            await b.close()

    run(scenario)


@dataclass
class Ended:
    """How a raw stream ended: its status."""

    code: grpc.StatusCode
    details: str


async def raw_exchange(
    port: int,
    tls: pki.TlsFiles,
    ca_pem: bytes,
    frames: list[sync_pb2.SyncFrame],
) -> tuple[list[sync_pb2.SyncFrame], Ended]:
    """Dial a SyncLink's server with ``tls`` (trusting ``ca_pem``), send ``frames``; the
    frames that came back and the status the stream ended with."""
    creds = grpc.ssl_channel_credentials(
        root_certificates=ca_pem,
        private_key=tls.key.read_bytes(),
        certificate_chain=tls.cert.read_bytes(),
    )
    got: list[sync_pb2.SyncFrame] = []
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as channel:
        call = sync_pb2_grpc.SyncStub(channel).Exchange()
        try:
            for frame in frames:
                await call.write(frame)
            while True:
                reply = await asyncio.wait_for(call.read(), 10)
                if reply is grpc.aio.EOF:
                    break
                got.append(reply)
        except grpc.aio.AioRpcError:
            pass  # the server ended the stream (maybe while we wrote): its status below
        return got, Ended(await call.code(), await call.details() or "")


def hello(name: str) -> sync_pb2.SyncFrame:
    return sync_pb2.SyncFrame(hello=sync_pb2.SyncHello(protocol_version=1, cluster_name=name))


def state_frame(state: SyncState) -> sync_pb2.SyncFrame:
    return sync_pb2.SyncFrame(state=state_to_proto(state))


@pytest.mark.timeout(TIMEOUT)
def test_a_certificate_of_a_registered_ca_but_not_a_sync_controller_is_refused(
    clusters: tuple[Cluster, Cluster, Cluster],
) -> None:
    c1, c2, _ = clusters
    node = pki.issue_node(c1.pki_dir, "node1", ips=["127.0.0.1"])

    async def scenario() -> None:
        b = SyncLink(c2.name, c2.tls, PeerCAs({c1.name: c1.ca_pem}))
        port = await b.start()
        try:
            _, err = await raw_exchange(port, node, c2.tls.ca.read_bytes(), [hello(c1.name)])
            assert err.code == grpc.StatusCode.PERMISSION_DENIED, err
            assert "CN='system:node:node1'" in err.details
            assert "only a sync controller" in err.details
            assert b.latest("m1") is None
        finally:
            await b.close()

    run(scenario)


@pytest.mark.timeout(TIMEOUT)
def test_a_server_that_is_not_a_sync_controller_is_refused(
    clusters: tuple[Cluster, Cluster, Cluster],
) -> None:
    c1, c2, _ = clusters
    # cluster2's "sync controller" serves with a node certificate of cluster2's CA
    wrong = pki.issue_node(c2.pki_dir, "node1", ips=["127.0.0.1"])

    async def scenario() -> None:
        a = SyncLink(c1.name, c1.tls, PeerCAs({c2.name: c2.ca_pem}))
        b = SyncLink(c2.name, wrong, PeerCAs({c1.name: c1.ca_pem}))
        port = await b.start()
        try:
            a.connect("m1", f"127.0.0.1:{port}")
            await eventually(lambda: a.connection_error("m1") is not None, "a refusal")
            error = a.connection_error("m1") or ""
            assert "is not a sync controller" in error and "system:node:node1" in error, error
        finally:
            await a.close()
            await b.close()

    run(scenario)


@pytest.mark.timeout(TIMEOUT)
def test_a_migration_id_reused_by_another_peer_cluster_is_refused(
    clusters: tuple[Cluster, Cluster, Cluster],
) -> None:
    c1, c2, c3 = clusters

    async def scenario() -> None:
        b = SyncLink(c2.name, c2.tls, PeerCAs({c1.name: c1.ca_pem, c3.name: c3.ca_pem}))
        a1 = SyncLink(c1.name, c1.tls, PeerCAs({c2.name: c2.ca_pem}))
        a3 = SyncLink(c3.name, c3.tls, PeerCAs({c2.name: c2.ca_pem}))
        port = await b.start()
        try:
            a1.publish(sender_state())
            a1.connect("m1", f"127.0.0.1:{port}")
            await eventually(lambda: b.latest("m1") is not None, "the first sender")
            a3.publish(sender_state(migration_uid="uid-3", source_node="node9"))
            a3.connect("m1", f"127.0.0.1:{port}")
            await eventually(lambda: a3.connection_error("m1") is not None, "a refusal")
            error = a3.connection_error("m1") or ""
            assert "reused migrationID" in error and "cluster1" in error, error
            assert b.latest("m1") == sender_state()  # the first one's state stands
            assert b.peer_cluster("m1") == c1.name
            assert a1.connection_error("m1") is None
        finally:
            await a1.close()
            await a3.close()
            await b.close()

    run(scenario)


@pytest.mark.timeout(TIMEOUT)
@pytest.mark.parametrize(
    ("frames", "message"),
    [
        ([state_frame(sender_state())], "the first frame must be a hello"),
        ([hello("cluster1"), sync_pb2.SyncFrame()], "unexpected empty frame"),
        (
            [hello("cluster1"), state_frame(sender_state(migration_id=""))],
            "a state without a migration_id",
        ),
        (
            [
                hello("cluster1"),
                sync_pb2.SyncFrame(state=sync_pb2.SyncState(migration_id="m1")),
            ],
            "has no role",
        ),
        (
            [hello("cluster1"), state_frame(sender_state(token="x" * 600))],
            "token is 600 characters",
        ),
        ([hello("cluster1"), hello("cluster1")], "unexpected hello frame"),
    ],
)
def test_a_malformed_frame_closes_the_stream_with_the_reason(
    clusters: tuple[Cluster, Cluster, Cluster],
    frames: list[sync_pb2.SyncFrame],
    message: str,
) -> None:
    c1, c2, _ = clusters

    async def scenario() -> None:
        b = SyncLink(c2.name, c2.tls, PeerCAs({c1.name: c1.ca_pem}))
        port = await b.start()
        try:
            _, err = await raw_exchange(port, c1.tls, c2.tls.ca.read_bytes(), frames)
            assert err.code == grpc.StatusCode.INVALID_ARGUMENT, err
            assert "malformed sync frame" in err.details
            assert message in err.details, err.details
        finally:
            await b.close()

    run(scenario)


@pytest.mark.timeout(TIMEOUT)
def test_a_peer_that_claims_our_half_is_refused(
    clusters: tuple[Cluster, Cluster, Cluster],
) -> None:
    c1, c2, _ = clusters

    async def scenario() -> None:
        b = SyncLink(c2.name, c2.tls, PeerCAs({c1.name: c1.ca_pem}))
        port = await b.start()
        b.publish(receiver_state())
        try:
            _, err = await raw_exchange(
                port,
                c1.tls,
                c2.tls.ca.read_bytes(),
                [hello(c1.name), state_frame(receiver_state())],
            )
            assert err.code == grpc.StatusCode.FAILED_PRECONDITION, err
            assert "also holds the receiver half" in err.details
        finally:
            await b.close()

    run(scenario)


@pytest.mark.timeout(TIMEOUT)
def test_plaintext_links_use_the_hello_names(tmp_path: Path) -> None:
    async def scenario() -> None:
        a = SyncLink("cluster1", None, PeerCAs())
        b = SyncLink("cluster2", None, PeerCAs())
        port = await b.start()
        try:
            a.publish(sender_state())
            b.publish(receiver_state())
            a.connect("m1", f"127.0.0.1:{port}")
            await eventually(lambda: a.latest("m1") is not None, "receiver -> sender")
            assert b.latest("m1") == sender_state()
            assert a.peer_cluster("m1") == "cluster2" and b.peer_cluster("m1") == "cluster1"
        finally:
            await a.close()
            await b.close()

    run(scenario)


def test_bad_peer_entries_are_left_out(clusters: tuple[Cluster, Cluster, Cluster]) -> None:
    c1, _, _ = clusters
    leaf = c1.tls.cert.read_text()
    peers = PeerCAs({"good": c1.ca_pem, "junk": "not a pem", "leaf": leaf})
    assert peers.names() == ["good"]
    assert link_mod.PeerCAs().bundle() == b""


@pytest.mark.timeout(TIMEOUT)
def test_each_reconciler_view_hears_only_its_migrations(
    clusters: tuple[Cluster, Cluster, Cluster],
) -> None:
    c1, c2, _ = clusters

    async def scenario() -> None:
        a = SyncLink(c1.name, c1.tls, PeerCAs({c2.name: c2.ca_pem}))
        b = SyncLink(c2.name, c2.tls, PeerCAs({c1.name: c1.ca_pem}))
        heard: dict[str, list[str]] = {"a-sender": [], "a-receiver": [], "b-receiver": []}
        a.view(Role.SENDER).on_peer_update = lambda s: heard["a-sender"].append(s.migration_id)
        a.view(Role.RECEIVER).on_peer_update = lambda s: heard["a-receiver"].append(s.migration_id)
        b.view(Role.RECEIVER).on_peer_update = lambda s: heard["b-receiver"].append(s.migration_id)
        port = await b.start()
        try:
            sender = a.view(Role.SENDER)
            sender.publish(sender_state())
            sender.connect("m1", f"127.0.0.1:{port}")
            await eventually(lambda: b.latest("m1") is not None, "sender -> receiver")
            b.view(Role.RECEIVER).publish(receiver_state())
            await eventually(lambda: sender.latest("m1") is not None, "receiver -> sender")
            assert heard == {"a-sender": ["m1"], "a-receiver": [], "b-receiver": ["m1"]}
            assert sender.peer_cluster("m1") == c2.name
        finally:
            await a.close()
            await b.close()

    run(scenario)


@pytest.mark.timeout(TIMEOUT)
def test_a_sending_side_with_a_node_certificate_learns_why_it_is_refused(
    clusters: tuple[Cluster, Cluster, Cluster],
) -> None:
    c1, c2, _ = clusters
    node = pki.issue_node(c1.pki_dir, "node1", ips=["127.0.0.1"])

    async def scenario() -> None:
        a = SyncLink(c1.name, node, PeerCAs({c2.name: c2.ca_pem}))
        b = SyncLink(c2.name, c2.tls, PeerCAs({c1.name: c1.ca_pem}))
        port = await b.start()
        try:
            a.publish(sender_state())
            a.connect("m1", f"127.0.0.1:{port}")
            await eventually(lambda: a.connection_error("m1") is not None, "a refusal")
            error = a.connection_error("m1") or ""
            assert "refused the stream" in error and "only a sync controller" in error, error
            assert b.latest("m1") is None
        finally:
            await a.close()
            await b.close()

    run(scenario)


@pytest.mark.timeout(TIMEOUT)
def test_bytes_that_are_not_a_frame_close_the_stream_with_the_reason(
    clusters: tuple[Cluster, Cluster, Cluster],
) -> None:
    c1, c2, _ = clusters

    async def scenario() -> None:
        b = SyncLink(c2.name, c2.tls, PeerCAs({c1.name: c1.ca_pem}))
        port = await b.start()
        creds = grpc.ssl_channel_credentials(
            root_certificates=c2.tls.ca.read_bytes(),
            private_key=c1.tls.key.read_bytes(),
            certificate_chain=c1.tls.cert.read_bytes(),
        )
        try:
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as channel:
                call = channel.stream_stream("/vmferry.rpc.Sync/Exchange")()
                await call.write(b"\xff\xff\xff\xff not a frame")
                with pytest.raises(grpc.aio.AioRpcError):
                    await asyncio.wait_for(call.read(), 10)
                assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "malformed sync frame: not a SyncFrame" in (await call.details() or "")
        finally:
            await b.close()

    run(scenario)


@pytest.mark.timeout(TIMEOUT)
def test_a_taken_port_is_a_clear_error() -> None:
    async def scenario() -> None:
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", 0))
            squatter.listen()
            port = squatter.getsockname()[1]
            link = SyncLink("cluster1", None, PeerCAs(), listen=f"127.0.0.1:{port}")
            with pytest.raises(PeerError, match=f"cannot listen on 127.0.0.1:{port}"):
                await link.start()

    run(scenario)
