"""The QEMU source engine without QEMU: a fake QEMU that answers QMP from a script and
opens its migration connections like QEMU does, a stand-in Tunnel service on a local
gRPC server, the real store behind the API and a fake clock.

Proves that the QEMU engine runs on the shared skeleton: timeouts end pre-copy with
migrate_cancel and the guest keeps running; a cancel is acknowledged (abortStatus);
post-copy starts when the completion timeout elapses and it is allowed, and a failure
then goes through the arbiter before the guest resumes here.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from handler.drivers.base import GuestStatus
from handler.migration import qemu_source
from handler.migration.qemu_source import QemuSourceMigration
from handler.migration.source import CANCELED
from tests.support.fake_api import FakeClock, StoreApi
from vmferry import grpc_options
from vmferry.migration_state import (
    TOKEN_SECRET_KEY,
    TOKEN_SECRET_NAMESPACE,
    AbortStatus,
    MigrationState,
    Switchover,
    token_secret_name,
)
from vmferry.rpc import tunnel_pb2 as pb
from vmferry.rpc import tunnel_pb2_grpc

UID = "qemu-mig-1"
TOKEN = "tunnel-token"
MiB = 1 << 20
Obj = dict[str, Any]


@dataclass
class QSpec:
    memory_bytes: int = 64 * MiB
    verify: str = "repair"


class FakeQemu:
    """QMP from a script: ``query-migrate`` reports ``self.migration`` (a status and RAM
    figures the test sets); ``migrate`` opens the migration connections."""

    def __init__(self) -> None:
        self.vm_id = "default_vm"
        self.qspec = QSpec()
        self.state = "running"
        self.commands: list[str] = []
        self.migration: Obj = {"status": "setup"}
        self.remaining = 32 * MiB
        self.connections: list[asyncio.StreamWriter] = []
        self.channels = 1
        self.resumes: list[Obj] = []  # arguments of each migrate with resume
        self.events: asyncio.Queue[str] = asyncio.Queue()  # QEMU's MIGRATION events
        self.arguments: dict[str, Obj] = {}  # the last arguments of each command
        self.memory = bytearray(self.qspec.memory_bytes)
        self.mapped = False  # map_ram() was called
        self.passes = 1  # query-migrate's dirty-sync-count

    def ram(self) -> memoryview:
        return memoryview(self.memory)

    def map_ram(self) -> None:
        self.mapped = True  # (in a worker thread)

    def console_mtime_ns(self) -> int:
        return 0

    def set_migration(self, status: str) -> None:
        """A status change, announced with a MIGRATION event as QEMU does."""
        self.migration = {"status": status}
        self.events.put_nowait(status)

    @contextlib.asynccontextmanager
    async def migration_events(self) -> AsyncIterator[Callable[[float], Awaitable[None]]]:
        async def wake(timeout: float) -> None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self.events.get()

        yield wake

    async def qmp(self, command: str, arguments: Obj | None = None) -> Any:
        self.commands.append(command)
        self.arguments[command] = arguments or {}
        if command == "migrate" and (arguments or {}).get("resume"):
            self.resumes.append(arguments or {})
            uri = (arguments or {})["uri"].removeprefix("unix:")
            _, writer = await asyncio.open_unix_connection(uri)
            self.connections.append(writer)
            self.set_migration("postcopy-active")
        elif command == "migrate":
            uri = (arguments or {})["uri"].removeprefix("unix:")
            for _ in range(self.channels):
                _, writer = await asyncio.open_unix_connection(uri)
                self.connections.append(writer)
            self.set_migration("active")
        elif command == "migrate-continue":
            self.set_migration("device")
        elif command == "migrate_cancel":
            self.set_migration("cancelled")
        elif command == "migrate-start-postcopy":
            self.set_migration("postcopy-active")
            self.state = "paused"  # the guest runs on the target now
        elif command == "query-migrate":
            ram = {
                "total": self.qspec.memory_bytes,
                "remaining": self.remaining,
                "mbps": 80.0,
                "dirty-sync-count": self.passes,
            }
            return {**self.migration, "ram": ram}
        return {}

    async def status(self) -> GuestStatus:
        return GuestStatus(self.state, 0, 0, 0, None, 1)

    async def resume(self, device_state: bytes | None = None) -> None:
        self.commands.append("cont")
        self.state = "running"

    async def destroy(self) -> None:
        self.commands.append("destroy")
        self.state = "stopped"


@dataclass
class FakeDriver:
    directory: Path
    volumes: None = None  # no claim volumes: no storage migration

    def sock_path(self, vm_id: str, suffix: str) -> Path:
        return self.directory / f"{vm_id}.{suffix}"


@dataclass
class FakeTunnel(tunnel_pb2_grpc.TunnelServicer):
    """Accepts every channel and records its Open (and any Abort reason) and the kinds
    of the control frames; answers the post-copy hand-off like a target (``refuse``:
    Verified without a match, with this detail; ``refuse_resume``: an Open.resume fails
    UNAVAILABLE, as while the target is unreachable)."""

    opened: list[pb.Open] = field(default_factory=list)
    aborts: list[str] = field(default_factory=list)
    control: list[str] = field(default_factory=list)
    refuse: str = ""
    refuse_resume: bool = False
    calls: list[Any] = field(default_factory=list)  # each stream's context
    peers: list[str] = field(default_factory=list)  # each stream's client address

    async def Migrate(
        self, request_iterator: AsyncIterator[pb.TunnelSourceFrame], context: Any
    ) -> AsyncIterator[pb.TunnelTargetFrame]:
        frames = aiter(request_iterator)
        first = await anext(frames)
        self.opened.append(first.open)
        if first.open.resume and self.refuse_resume:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the target is unreachable")
        self.calls.append(context)
        self.peers.append(context.peer())
        yield pb.TunnelTargetFrame(opened=pb.Opened(channel_id=first.open.channel_id))
        async for frame in frames:
            kind = frame.WhichOneof("frame")
            if kind == "abort":
                self.aborts.append(frame.abort.reason)
            elif kind not in ("data", "data_end"):
                self.control.append(str(kind))
            if kind == "postcopy_start":
                yield pb.TunnelTargetFrame(
                    verified=pb.Verified(match=not self.refuse, detail=self.refuse)
                )
            elif kind == "commit":
                yield pb.TunnelTargetFrame(resumed=pb.Resumed())
            elif kind == "postcopy_end":
                yield pb.TunnelTargetFrame(postcopy_done=pb.PostCopyDone())


@dataclass
class QemuLab:
    api: StoreApi
    qemu: FakeQemu
    tunnel: FakeTunnel
    port: int
    tmp: Path

    async def state(self) -> MigrationState:
        return MigrationState.of(await self.api.get("VirtualMachineInstance", "default", "vm"))

    async def engine(self, config: Obj, clock: Callable[[], float]) -> QemuSourceMigration:
        vmi = await self.api.get("VirtualMachineInstance", "default", "vm")
        vmi["status"]["migrationState"] = {
            "migrationUid": UID,
            "sourceNode": "node-a",
            "targetNode": "node-b",
            "targetNodeAddress": "127.0.0.1",
            "targetNodePort": self.port,
            "migrationConfiguration": {"parallelStreams": 1, **config},
        }
        vmi = await self.api.update(vmi, subresource="status")
        return QemuSourceMigration(
            self.api,  # type: ignore[arg-type]
            "node-a",
            vmi,
            self.qemu,  # type: ignore[arg-type]
            None,
            FakeDriver(self.tmp),  # type: ignore[arg-type]
            clock=clock,
        )


@contextlib.asynccontextmanager
async def qemu_lab(tmp_path: Path, tunnel: FakeTunnel | None = None) -> AsyncIterator[QemuLab]:
    api = await StoreApi.open(tmp_path)
    await api.create(
        {
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstance",
            "metadata": {"namespace": "default", "name": "vm"},
            "spec": {},
            "status": {"phase": "Running", "nodeName": "node-a"},
        }
    )
    await api.create(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"namespace": TOKEN_SECRET_NAMESPACE, "name": token_secret_name(UID)},
            "data": {TOKEN_SECRET_KEY: base64.b64encode(TOKEN.encode()).decode()},
        }
    )
    tunnel = tunnel or FakeTunnel()
    server = grpc.aio.server(options=grpc_options.server_options())
    tunnel_pb2_grpc.add_TunnelServicer_to_server(tunnel, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield QemuLab(api, FakeQemu(), tunnel, port, tmp_path)
    finally:
        await server.stop(grace=None)
        await api.close()


def in_lab(
    tmp_path: Path, body: Callable[[QemuLab], Awaitable[None]], tunnel: FakeTunnel | None = None
) -> None:
    async def scenario() -> None:
        async with qemu_lab(tmp_path, tunnel) as lab:
            await body(lab)

    asyncio.run(scenario())


async def advance_when(clock: FakeClock, ready: Callable[[], bool], seconds: float) -> None:
    while True:
        if ready():
            break
        await asyncio.sleep(0.01)
    clock.advance(seconds)


def monitoring(lab: QemuLab) -> Callable[[], bool]:
    """True once the engine's monitor polls QEMU: the tunnel is open and query-migrate
    came twice more since (the monitor's clock baseline is taken before its first poll;
    advancing the clock earlier would move the baseline, not the time stuck)."""
    seen: list[int] = []

    def ready() -> bool:
        if not lab.tunnel.opened:
            return False
        polls = lab.qemu.commands.count("query-migrate")
        seen.append(polls)
        return polls >= seen[0] + 2

    return ready


def test_the_tunnel_opens_with_the_token_from_the_secret_and_the_plan(tmp_path: Path) -> None:
    async def body(lab: QemuLab) -> None:
        clock = FakeClock()
        engine = await lab.engine({"progressTimeout": 5}, clock)
        mover = asyncio.create_task(advance_when(clock, monitoring(lab), 10))
        await asyncio.wait_for(engine.run(), 20)
        await mover
        [opened] = lab.tunnel.opened
        assert opened.token == TOKEN and opened.migration_uid == UID
        assert opened.channel_count == 1 and opened.memory_bytes == 64 * MiB
        assert lab.qemu.commands[:3] == [
            "migrate-set-capabilities",
            "migrate-set-parameters",
            "migrate",
        ]

    in_lab(tmp_path, body)


@contextlib.asynccontextmanager
async def running(engine: QemuSourceMigration) -> AsyncIterator[None]:
    """The engine runs while the block does; it is cancelled at the block's end."""
    run = asyncio.create_task(engine.run())
    try:
        yield
    finally:
        run.cancel()
        with contextlib.suppress(BaseException):
            await run


async def until(ready: Callable[[], bool], timeout: float = 10) -> None:
    await asyncio.wait_for(advance_when(FakeClock(), ready, 0), timeout)


def polled(lab: QemuLab) -> Callable[[], bool]:
    """True once the tunnel is open and the monitor polls QEMU."""
    return lambda: bool(lab.tunnel.opened) and lab.qemu.commands.count("query-migrate") > 1


def capabilities(qemu: FakeQemu) -> dict[str, bool]:
    caps = qemu.arguments["migrate-set-capabilities"]["capabilities"]
    return {c["capability"]: c["state"] for c in caps}


def downtime_limit(qemu: FakeQemu) -> int | None:
    """QEMU's downtime-limit as last set."""
    limit = qemu.arguments["migrate-set-parameters"].get("downtime-limit")
    return None if limit is None else int(limit)


def test_qemus_completion_event_starts_the_switchover_without_waiting_for_a_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The guest is paused from QEMU's stop-and-copy on: the monitor must not sleep
    through the rest of a poll period after QEMU completed."""
    monkeypatch.setattr(qemu_source, "POLL_PERIOD", 60.0)

    async def body(lab: QemuLab) -> None:
        engine = await lab.engine({}, FakeClock())
        async with running(engine):
            await until(polled(lab), 20)
            lab.qemu.set_migration("completed")
            await until(lambda: engine.completed_in_qemu)  # one poll period would be 60 s
            assert engine.completed_in_qemu and "migrate_cancel" not in lab.qemu.commands

    in_lab(tmp_path, body)


def test_the_source_digest_starts_when_qemu_stops_the_guest(tmp_path: Path) -> None:
    """With verification, QEMU pauses before its last pass (pause-before-switchover):
    the source hashes its frozen RAM from there, in the stop-and-copy's shadow, and lets
    QEMU go on once."""

    async def body(lab: QemuLab) -> None:
        engine = await lab.engine({}, FakeClock())
        async with running(engine):
            await until(polled(lab), 20)
            assert capabilities(lab.qemu)["pause-before-switchover"] is True
            assert engine.switchover.source_digest is None
            lab.qemu.set_migration("pre-switchover")
            await until(lambda: "migrate-continue" in lab.qemu.commands)
            digest = engine.switchover.source_digest
            assert digest is not None
            pages = await asyncio.wait_for(digest, 20)
            assert len(pages) == lab.qemu.qspec.memory_bytes // 4096
            for _ in range(5):  # pre-switchover seen again by a late poll: no second continue
                await asyncio.sleep(0.01)
            assert lab.qemu.commands.count("migrate-continue") == 1
            assert engine.switchover.source_digest is digest and not engine.completed_in_qemu
            assert lab.qemu.mapped  # its page tables filled during pre-copy

    in_lab(tmp_path, body)


@pytest.mark.parametrize(("config", "verify"), [({"allowPostCopy": True}, "repair"), ({}, "off")])
def test_no_pause_before_switchover_in_post_copy_or_without_verification(
    tmp_path: Path, config: Obj, verify: str
) -> None:
    """Post-copy's switch pauses in pre-switchover too (it is not the last pass), and
    without verification there is nothing to start there."""

    async def body(lab: QemuLab) -> None:
        lab.qemu.qspec.verify = verify
        engine = await lab.engine({"progressTimeout": 5, **config}, FakeClock())
        async with running(engine):
            await until(lambda: bool(lab.tunnel.opened), 20)
            assert capabilities(lab.qemu).get("pause-before-switchover") is None

    in_lab(tmp_path, body)


def test_qemus_downtime_limit_grows_as_qemu_makes_passes(tmp_path: Path) -> None:
    async def body(lab: QemuLab) -> None:
        engine = await lab.engine({}, FakeClock())
        async with running(engine):
            await until(polled(lab), 20)
            assert downtime_limit(lab.qemu) == engine.plan.downtime_at(1)
            assert engine.plan.downtime_at(1) < engine.plan.downtime_ms
            lab.qemu.passes = 3
            await until(lambda: downtime_limit(lab.qemu) == engine.plan.downtime_at(3))
            lab.qemu.passes = 50
            await until(lambda: downtime_limit(lab.qemu) == engine.plan.downtime_ms)

    in_lab(tmp_path, body)


def test_progress_timeout_cancels_qemu_and_the_guest_keeps_running(tmp_path: Path) -> None:
    async def body(lab: QemuLab) -> None:
        clock = FakeClock()
        engine = await lab.engine({"progressTimeout": 5}, clock)
        mover = asyncio.create_task(advance_when(clock, monitoring(lab), 10))
        await asyncio.wait_for(engine.run(), 20)
        await mover
        state = await lab.state()
        assert state.failed and state.failure_reason.startswith("Live migration stuck for 10 sec")
        assert "migrate_cancel" in lab.qemu.commands
        assert lab.qemu.state == "running" and "cont" not in lab.qemu.commands
        assert state.switchover is None and state.abort_status is None

    in_lab(tmp_path, body)


def test_a_cancel_stops_qemu_and_is_acknowledged(tmp_path: Path) -> None:
    async def body(lab: QemuLab) -> None:
        engine = await lab.engine({}, FakeClock())

        async def cancel() -> None:
            await advance_when(FakeClock(), lambda: bool(lab.tunnel.opened), 0)
            engine.abort_requested.set()

        canceller = asyncio.create_task(cancel())
        await asyncio.wait_for(engine.run(), 20)
        await canceller
        state = await lab.state()
        assert state.failed and state.failure_reason == CANCELED
        assert state.abort_status is AbortStatus.SUCCEEDED
        assert "migrate_cancel" in lab.qemu.commands and lab.qemu.state == "running"

    in_lab(tmp_path, body)


def test_post_copy_starts_when_allowed_and_a_refused_hand_off_goes_through_the_arbiter(
    tmp_path: Path,
) -> None:
    async def body(lab: QemuLab) -> None:
        clock = FakeClock()
        # 64 MiB at 16 s/GiB: the completion timeout is 1 s.
        engine = await lab.engine({"completionTimeoutPerGiB": 16, "allowPostCopy": True}, clock)
        mover = asyncio.create_task(advance_when(clock, monitoring(lab), 2))
        await asyncio.wait_for(engine.run(), 20)
        await mover
        assert "migrate-start-postcopy" in lab.qemu.commands
        assert lab.tunnel.control[0] == "postcopy_start" and "commit" not in lab.tunnel.control
        state = await lab.state()
        assert state.failed
        assert state.failure_reason == (
            "the target did not take the post-copy hand-off: its QEMU failed"
        )
        # the guest had stopped for the target: it resumes here only once Aborted stands
        assert state.switchover is Switchover.ABORTED
        # QEMU refuses `cont` in post-copy until the migration is cancelled
        assert lab.qemu.commands[-1] == "cont" and lab.qemu.state == "running"
        assert (
            "migrate_cancel"
            in lab.qemu.commands[lab.qemu.commands.index("migrate-start-postcopy") :]
        )

    in_lab(tmp_path, body, FakeTunnel(refuse="its QEMU failed"))


def test_each_multifd_channel_has_its_own_connection(tmp_path: Path) -> None:
    async def body(lab: QemuLab) -> None:
        clock = FakeClock()
        lab.qemu.channels = 3  # main + 2 multifd
        engine = await lab.engine({"progressTimeout": 5, "parallelStreams": 2}, clock)
        mover = asyncio.create_task(advance_when(clock, monitoring(lab), 10))
        await asyncio.wait_for(engine.run(), 20)
        await mover
        assert sorted(o.channel_id for o in lab.tunnel.opened) == [0, 1, 2]
        assert {o.channel_count for o in lab.tunnel.opened} == {3}
        assert len(set(lab.tunnel.peers)) == 3, lab.tunnel.peers  # three client ports

    in_lab(tmp_path, body)
