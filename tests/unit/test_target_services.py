"""The security checks both target services share (``peer.PeerGate``), and the QEMU
Tunnel service's per-migration state, which ends with every end of the migration (a
source that just disconnects, an Abort, a Commit, the registry forgetting it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from handler.drivers.qemu import QemuDriver, QemuHandle, QemuSpec
from handler.migration.incoming import IncomingMigration, IncomingRegistry
from handler.migration.peer import PeerGate, Refused
from handler.migration.qemu_target import TunnelService
from handler.migration.restart_record import RestartRecords
from handler.migration.target_state import TargetState
from handler.migration.tunnel import (
    PAGE_SIZE,
    TUNNEL_PROTOCOL_VERSION,
    SourceFrame,
    decode_source_frame,
)
from tests.support.fake_handle import FakeHandle
from vmferry import pki
from vmferry.migration_state import Switchover
from vmferry.rpc import tunnel_pb2 as pb

MIG = "mig-1"
MiB = 1 << 20


def node(name: str) -> pki.Identity:
    return pki.Identity(f"{pki.NODE_USER_PREFIX}{name}", (pki.NODES_GROUP,))


def registered(
    handle: Any = None, state: TargetState = TargetState.AWAITING_HELLO
) -> IncomingMigration:
    inc = IncomingMigration(
        namespace="default",
        name="vm",
        vmi_uid="uid-1",
        migration_uid=MIG,
        token="right-token",
        source_node="node1",
        handle=handle or FakeHandle(),
    )
    inc._state = state
    return inc


# -- the peer gate -------------------------------------------------------------------------


def gate_with(inc: IncomingMigration | None) -> PeerGate:
    return PeerGate({MIG: inc} if inc else {}, require_peer_identity=True)


def always(inc: IncomingMigration) -> bool:
    return True


def test_the_source_node_with_the_token_is_admitted() -> None:
    inc = registered()
    assert gate_with(inc).check(node("node1"), MIG, "right-token", acceptable=always) is inc


@pytest.mark.parametrize(
    ("peer", "uid", "token", "code", "message"),
    [
        (node("node1"), "other", "right-token", grpc.StatusCode.NOT_FOUND, "no migration 'other'"),
        (node("node3"), MIG, "right-token", grpc.StatusCode.PERMISSION_DENIED, "not the source"),
        (None, MIG, "right-token", grpc.StatusCode.PERMISSION_DENIED, "unauthenticated peer"),
        (
            pki.Identity("alice", ("devs",)),
            MIG,
            "right-token",
            grpc.StatusCode.PERMISSION_DENIED,
            "alice is not the source node node1",
        ),
        (
            node("node1"),
            MIG,
            "wrong-token",
            grpc.StatusCode.PERMISSION_DENIED,
            "wrong migration token",
        ),
        (node("node1"), MIG, "", grpc.StatusCode.PERMISSION_DENIED, "wrong migration token"),
    ],
)
def test_refusals(
    peer: pki.Identity | None, uid: str, token: str, code: grpc.StatusCode, message: str
) -> None:
    with pytest.raises(Refused, match=message) as refused:
        gate_with(registered()).check(peer, uid, token, acceptable=always)
    assert refused.value.code == code


def test_a_migration_that_takes_no_stream_now_is_not_found() -> None:
    inc = registered(state=TargetState.ABORTED)
    with pytest.raises(Refused, match="no QEMU migration") as refused:
        gate_with(inc).check(
            node("node1"),
            MIG,
            "right-token",
            acceptable=lambda inc: not inc.state.decided,
            what="QEMU migration",
        )
    assert refused.value.code == grpc.StatusCode.NOT_FOUND


def test_without_tls_the_peer_is_not_checked_but_the_token_is() -> None:
    gate = PeerGate({MIG: registered()}, require_peer_identity=False)
    assert gate.check(None, MIG, "right-token", acceptable=always).migration_uid == MIG
    with pytest.raises(Refused, match="wrong migration token"):
        gate.check(None, MIG, "nope", acceptable=always)


# -- the QEMU tunnel's per-migration state ---------------------------------------------------


class CallEnded(Exception):
    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class FakeContext:
    def auth_context(self) -> dict[str, Any]:
        return {}

    async def abort(self, code: grpc.StatusCode, message: str) -> None:
        raise CallEnded(code, message)


class FakeWriter:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    async def drain(self) -> None:
        return None

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True


class Tunnel:
    def __init__(self, tmp_path: Path) -> None:
        self.registry = IncomingRegistry(
            RestartRecords(tmp_path / "incoming"), require_peer_identity=False
        )
        driver = QemuDriver(tmp_path / "qemu", tmp_path / "ram")
        self.service = TunnelService(self.registry, driver)
        spec = QemuSpec(memory_bytes=16 * MiB, kernel="/nonexistent/vmlinuz", verify="off")
        self.handle = QemuHandle(
            "uid-1.in-mig-1",
            spec,
            1,
            None,
            tmp_path / "vm",
            tmp_path / "vm.ram",
            tmp_path / "qmp.sock",
            incoming=True,
        )
        self.inc = registered(self.handle)
        self.registry.expect(self.inc)
        self.writer = FakeWriter()

        async def connect(state: Any, cid: int, postcopy: bool) -> tuple[Any, Any]:
            reader = asyncio.StreamReader()
            reader.feed_eof()  # the target QEMU says nothing back
            return self.writer, reader

        self.service._connect = connect  # type: ignore[method-assign]

    async def stream(self, *frames: pb.TunnelSourceFrame) -> list[pb.TunnelTargetFrame]:
        open_frame = pb.TunnelSourceFrame(
            open=pb.Open(
                protocol_version=TUNNEL_PROTOCOL_VERSION,
                migration_uid=MIG,
                token="right-token",
                channel_id=0,
                channel_count=1,
                memory_bytes=16 * MiB,
                page_size=PAGE_SIZE,
                verify=pb.VERIFY_MODE_OFF,
            )
        )

        async def source() -> AsyncIterator[SourceFrame]:
            # as the server's deserializer hands them to Migrate
            yield decode_source_frame(open_frame.SerializeToString())
            for frame in frames:
                yield decode_source_frame(frame.SerializeToString())
                await asyncio.sleep(0)

        replies = []
        async for reply in self.service.Migrate(source(), FakeContext()):  # type: ignore[arg-type]
            replies.append(reply)
            if reply.WhichOneof("frame") == "opened":
                assert MIG in self.service.states  # the state exists while the stream runs
        return replies


def test_a_source_that_disconnects_before_the_decision_leaves_no_tunnel_state(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        tunnel = Tunnel(tmp_path)
        replies = await tunnel.stream(pb.TunnelSourceFrame(data=pb.Data(data=b"qemu bytes")))
        assert replies[0].WhichOneof("frame") == "opened"
        assert bytes(tunnel.writer.data) == b"qemu bytes" and tunnel.writer.closed
        assert MIG not in tunnel.service.states
        assert tunnel.inc.state is TargetState.RECEIVING  # the arbiter settles the rest

    asyncio.run(scenario())


def test_an_abort_frame_discards_and_leaves_no_tunnel_state(tmp_path: Path) -> None:
    async def scenario() -> None:
        tunnel = Tunnel(tmp_path)
        reasons: list[str] = []

        async def on_abort(inc: IncomingMigration, reason: str) -> None:
            reasons.append(reason)
            inc.decide(Switchover.ABORTED)
            tunnel.registry.forget(inc.migration_uid)

        tunnel.registry.on_abort = on_abort
        await tunnel.stream(pb.TunnelSourceFrame(abort=pb.Abort(reason="cancelled")))
        assert reasons == ["cancelled"] and tunnel.inc.state is TargetState.ABORTED
        assert MIG not in tunnel.service.states and tunnel.registry.get(MIG) is None

    asyncio.run(scenario())


def test_a_commit_frame_resumes_and_leaves_no_tunnel_state(tmp_path: Path) -> None:
    async def scenario() -> None:
        tunnel = Tunnel(tmp_path)
        commits: list[IncomingMigration] = []

        async def on_commit(inc: IncomingMigration) -> None:
            commits.append(inc)
            assert inc.decide(Switchover.COMMITTED)
            inc.resumed()

        tunnel.registry.on_commit = on_commit

        async def verified(state: Any) -> list[pb.TunnelTargetFrame]:
            await tunnel.service._mark_verified(state.inc)  # verify: off
            return [pb.TunnelTargetFrame(verified=pb.Verified(match=True))]

        tunnel.service._complete_and_digest = verified  # type: ignore[method-assign]
        replies = await tunnel.stream(
            pb.TunnelSourceFrame(completed=pb.Completed()),
            pb.TunnelSourceFrame(commit=pb.Commit()),
        )
        kinds = [r.WhichOneof("frame") for r in replies]
        assert "verified" in kinds and "resumed" in kinds
        assert commits == [tunnel.inc] and tunnel.inc.state is TargetState.RESUMED
        assert MIG not in tunnel.service.states
        assert tunnel.registry.records.read(MIG) is not None  # removed by the VM manager

    asyncio.run(scenario())


def test_a_commit_before_verification_is_a_protocol_error(tmp_path: Path) -> None:
    async def scenario() -> None:
        tunnel = Tunnel(tmp_path)
        aborted: list[str] = []

        async def on_abort(inc: IncomingMigration, reason: str) -> None:
            aborted.append(reason)

        tunnel.registry.on_abort = on_abort
        with pytest.raises(CallEnded, match="Commit before the memory was verified") as ended:
            await tunnel.stream(pb.TunnelSourceFrame(commit=pb.Commit()))
        assert ended.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert aborted and MIG not in tunnel.service.states

    asyncio.run(scenario())


def test_forgetting_the_migration_ends_its_tunnel_state(tmp_path: Path) -> None:
    tunnel = Tunnel(tmp_path)
    tunnel.service.states[MIG] = object()  # type: ignore[assignment]
    tunnel.registry.forget(MIG)
    assert MIG not in tunnel.service.states


def test_a_wrong_token_is_refused_before_anything_starts(tmp_path: Path) -> None:
    async def scenario() -> None:
        tunnel = Tunnel(tmp_path)
        tunnel.inc.token = "another"
        with pytest.raises(CallEnded, match="wrong migration token") as ended:
            await tunnel.stream()
        assert ended.value.code == grpc.StatusCode.PERMISSION_DENIED
        assert MIG not in tunnel.service.states and tunnel.inc.state is TargetState.AWAITING_HELLO

    asyncio.run(scenario())
