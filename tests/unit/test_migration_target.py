"""The target's switchover frames, applied in order by MigrationService to a real
incoming memvm guest: DeviceState before FinalState, the restart record written from
it, and the frames that break the order refused with a message."""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from handler import stream
from handler.digest import ChunkDigest
from handler.drivers.base import GuestSpec
from handler.drivers.memvm import MemVMDriver, MemVMHandle
from handler.migration.incoming import IncomingMigration, IncomingRegistry
from handler.migration.memvm_target import MigrationService, _ChannelClosed
from handler.migration.restart_record import RestartRecords
from handler.migration.target_state import IllegalTransition, TargetState
from vmferry.migration_state import Switchover
from vmferry.rpc import migration_pb2 as pb

MiB = 1 << 20


@pytest.fixture
def ram_dir() -> Iterator[Path]:
    path = Path(f"/dev/shm/vmferry-test-{uuid.uuid4().hex[:12]}")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class Pair:
    """A paused source guest and an incoming one waiting for its memory."""

    def __init__(self, tmp_path: Path, ram_dir: Path) -> None:
        self.tmp_path, self.ram_dir = tmp_path, ram_dir
        self.registry = IncomingRegistry(RestartRecords(tmp_path / "incoming"))
        self.service = MigrationService(self.registry)
        self.out: asyncio.Queue[pb.TargetFrame | None] = asyncio.Queue()

    async def __aenter__(self) -> Pair:
        spec = GuestSpec(8 * MiB, dirty_rate_bytes=4 * MiB, content="random")
        self.source: MemVMHandle = await MemVMDriver(self.tmp_path / "a", self.ram_dir).start(
            "default_vm_a", spec
        )
        self.incoming: MemVMHandle = await MemVMDriver(
            self.tmp_path / "b", self.ram_dir
        ).prepare_incoming("default_vm_b", spec)
        await asyncio.sleep(0.05)
        await self.source.pause()
        self.inc = IncomingMigration(
            namespace="default",
            name="vm",
            vmi_uid="uid-1",
            migration_uid="mig-1",
            token="t",
            source_node="node1",
            handle=self.incoming,
            channel_count=1,
        )
        self.registry.expect(self.inc)
        self.inc.move(TargetState.RECEIVING, "Hello")  # frames go to _apply directly
        return self

    async def __aexit__(self, *_: object) -> None:
        self.registry.forget(self.inc.migration_uid)
        await self.source.destroy()
        await self.incoming.destroy()

    async def send(self, frame: pb.SourceFrame | bytes) -> None:
        raw = frame if isinstance(frame, bytes) else frame.SerializeToString()
        await self.service._apply(self.inc, 0, raw, self.out)

    async def send_memory(self) -> None:
        pages = stream.page_view(self.source.ram(), self.source.spec.page_size)
        everything = np.arange(self.source.spec.page_count, dtype=np.int64)
        offset = 0
        while offset < len(everything):
            batch = stream.build_batch(pages, everything[offset:], 0, compress=False)
            await self.send(batch.frame)
            offset += batch.pages
        await self.send(pb.SourceFrame(round_end=pb.RoundEnd(round=0, final=True)))

    async def source_digest(self) -> str:
        digest = ChunkDigest(self.source.ram(), self.source.spec.page_size)
        try:
            return await digest.digest_async()
        finally:
            digest.release()

    def verified(self) -> pb.Verified:
        while True:
            frame = self.out.get_nowait()
            assert frame is not None
            if frame.WhichOneof("frame") == "verified":
                return frame.verified

    @property
    def record(self) -> Path:
        path = self.registry.records.path(self.inc.migration_uid)
        assert path is not None
        return path


@pytest.mark.timeout(60)
def test_device_state_first_then_final_state_verifies_with_the_record_written(
    tmp_path: Path, ram_dir: Path
) -> None:
    async def scenario() -> None:
        async with Pair(tmp_path, ram_dir) as pair:
            state = await pair.source.device_state()
            # Before the final pages, as the source sends it when the guest answers first.
            await pair.send(pb.SourceFrame(device_state=pb.DeviceState(state=state)))
            await pair.send_memory()
            await pair.send(
                pb.SourceFrame(final_state=pb.FinalState(digest=await pair.source_digest()))
            )
            verified = pair.verified()
            assert verified.match and pair.inc.verified
            assert pair.inc.state is TargetState.VERIFIED
            record = json.loads(pair.record.read_text())
            assert base64.b64decode(record["deviceState"]) == state
            assert record["vmId"] == pair.incoming.vm_id and record["postcopy"] is False
            await pair.incoming.resume(state)  # the memory and the state fit together
            assert (await pair.incoming.status()).state == "running"

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_final_state_without_device_state_and_a_second_device_state_are_refused(
    tmp_path: Path, ram_dir: Path
) -> None:
    async def scenario() -> None:
        async with Pair(tmp_path, ram_dir) as pair:
            await pair.send_memory()
            digest = pb.SourceFrame(final_state=pb.FinalState(digest=await pair.source_digest()))
            with pytest.raises(stream.ProtocolError, match="FinalState before DeviceState"):
                await pair.send(digest)
            state = pb.SourceFrame(device_state=pb.DeviceState(state=b"{}"))
            await pair.send(state)
            with pytest.raises(stream.ProtocolError, match="DeviceState sent twice"):
                await pair.send(state)
            assert not pair.inc.verified

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_a_digest_mismatch_removes_the_record(tmp_path: Path, ram_dir: Path) -> None:
    async def scenario() -> None:
        async with Pair(tmp_path, ram_dir) as pair:
            await pair.send(pb.SourceFrame(device_state=pb.DeviceState(state=b"{}")))
            await pair.send_memory()
            await pair.send(pb.SourceFrame(final_state=pb.FinalState(digest="0" * 64)))
            verified = pair.verified()
            assert not verified.match and not pair.inc.verified
            assert pair.inc.state is TargetState.MISMATCHED
            assert verified.digest == await pair.source_digest()  # what arrived was right
            assert not pair.record.exists()

    asyncio.run(scenario())


@pytest.mark.timeout(60)
def test_commit_frames_in_the_order_of_the_state_machine(tmp_path: Path, ram_dir: Path) -> None:
    """Commit before verification is refused; after it the VM manager's on_commit runs
    (it decides), Resumed answers, and a frame after the decision is refused."""

    async def scenario() -> None:
        async with Pair(tmp_path, ram_dir) as pair:
            commits: list[TargetState] = []

            async def on_commit(inc: IncomingMigration) -> None:
                commits.append(inc.state)
                assert inc.decide(Switchover.COMMITTED)

            pair.registry.on_commit = on_commit
            commit = pb.SourceFrame(commit=pb.Commit())
            with pytest.raises(stream.ProtocolError, match="Commit before the memory"):
                await pair.send(commit)
            await pair.send(pb.SourceFrame(device_state=pb.DeviceState(state=b"{}")))
            await pair.send_memory()
            digest = await pair.source_digest()
            await pair.send(pb.SourceFrame(final_state=pb.FinalState(digest=digest)))
            assert pair.verified().match
            with pytest.raises(IllegalTransition, match="in state Verified"):
                await pair.send(pb.SourceFrame(final_state=pb.FinalState(digest=digest)))
            with pytest.raises(_ChannelClosed):  # channel 0 ends after Resumed
                await pair.send(commit)
            assert commits == [TargetState.VERIFIED]
            assert pair.inc.state is TargetState.COMMITTED
            resumed = [f for f in drain(pair.out) if f.WhichOneof("frame") == "resumed"]
            assert len(resumed) == 1
            with pytest.raises(stream.ProtocolError, match="after the migration was Committed"):
                await pair.send(pb.SourceFrame(round_end=pb.RoundEnd(round=1, final=True)))

    asyncio.run(scenario())


def drain(queue: asyncio.Queue[pb.TargetFrame | None]) -> list[pb.TargetFrame]:
    frames = []
    while not queue.empty():
        frame = queue.get_nowait()
        if frame is not None:
            frames.append(frame)
    return frames
