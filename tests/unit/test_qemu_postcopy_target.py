"""QEMU post-copy on the target's Tunnel service, without QEMU (the harness of
test_target_services: a registered migration, a fake connection to the incoming QEMU;
QMP answered here).

- PostCopyStart → Verified; Commit resumes the guest off the frame loop (QEMU's bytes
  keep flowing to the incoming QEMU after it); PostCopyEnd → PostCopyDone once the
  incoming QEMU completed; the migration is done here;
- channel 0 breaking in post-copy keeps the tunnel state (the guest runs here) and
  starts the recovery window; Open.resume runs migrate-recover on a new socket and
  connects it; the window's clock stops;
- Open.resume for a migration whose guest does not run here in post-copy is refused, and
  so is PostCopyStart on a tunnel opened without post-copy.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from handler.drivers.base import GuestError
from handler.migration import tunnel as tunnel_mod
from handler.migration.incoming import IncomingMigration
from handler.migration.target_state import TargetState
from handler.migration.tunnel import PAGE_SIZE, TUNNEL_PROTOCOL_VERSION
from tests.unit.test_target_services import MIG, CallEnded, FakeContext, MiB, Tunnel
from vmferry.migration_state import Switchover
from vmferry.rpc import tunnel_pb2 as pb

Obj = dict[str, Any]


def open_frame(resume: bool = False, postcopy: bool = True) -> pb.TunnelSourceFrame:
    return pb.TunnelSourceFrame(
        open=pb.Open(
            protocol_version=TUNNEL_PROTOCOL_VERSION,
            migration_uid=MIG,
            token="right-token",
            channel_id=0,
            channel_count=1,
            memory_bytes=16 * MiB,
            page_size=PAGE_SIZE,
            verify=pb.VERIFY_MODE_REPAIR,
            postcopy=postcopy,
            resume=resume,
        )
    )


async def stream(
    tunnel: Tunnel, *frames: pb.TunnelSourceFrame, resume: bool = False, postcopy: bool = True
) -> list[pb.TunnelTargetFrame]:
    async def source() -> AsyncIterator[tunnel_mod.SourceFrame]:
        yield open_frame(resume, postcopy)
        for frame in frames:  # as the target's request deserializer hands them over
            yield tunnel_mod.decode_source_frame(frame.SerializeToString())
            await asyncio.sleep(0.01)

    return [r async for r in tunnel.service.Migrate(source(), FakeContext())]  # type: ignore[arg-type]


class FakeQmp:
    """The incoming QEMU's QMP: query-migrate reports ``status``; migrate-recover
    listens on its URI like QEMU."""

    def __init__(self, status: str) -> None:
        self.status = status
        self.commands: list[tuple[str, Obj]] = []
        self.accepted: list[asyncio.StreamReader] = []
        self.server: asyncio.Server | None = None
        self.refusals = 2  # migrate-recover refused this many times first

    async def __call__(self, command: str, arguments: Obj | None = None, oob: bool = False) -> Any:
        self.commands.append((command, arguments or {}))
        if command == "query-migrate":
            return {"status": self.status}
        if command == "migrate-recover":
            assert oob, "in a paused post-copy only out-of-band commands are sure to run"
            if self.refusals:  # QEMU has not noticed the break yet
                self.refusals -= 1
                raise GuestError("Migrate recover can only be run when postcopy is paused.")

            async def accept(reader: asyncio.StreamReader, _: asyncio.StreamWriter) -> None:
                self.accepted.append(reader)
                self.status = "postcopy-active"

            path = (arguments or {})["uri"].removeprefix("unix:")
            self.server = await asyncio.start_unix_server(accept, path=path)
        return {}


def in_postcopy(tunnel: Tunnel) -> list[IncomingMigration]:
    """Commits resume like the VM manager does (decide, resume); the list of commits."""
    commits: list[IncomingMigration] = []

    async def on_commit(inc: IncomingMigration) -> None:
        commits.append(inc)
        assert inc.decide(Switchover.COMMITTED)
        await asyncio.sleep(0.05)  # `cont` and the first heartbeat take a while
        inc.resumed()

    tunnel.registry.on_commit = on_commit
    return commits


def test_post_copy_hand_off_and_end_on_the_target(tmp_path: Path) -> None:
    async def scenario() -> None:
        tunnel = Tunnel(tmp_path)
        qmp = FakeQmp("completed")
        tunnel.handle.qmp = qmp  # type: ignore[method-assign]
        commits = in_postcopy(tunnel)
        done: list[IncomingMigration] = []

        async def on_done(inc: IncomingMigration) -> None:
            done.append(inc)
            tunnel.registry.forget(inc.migration_uid)

        tunnel.registry.on_postcopy_done = on_done
        replies = await stream(
            tunnel,
            pb.TunnelSourceFrame(postcopy_start=pb.PostCopyStart(last_console_unix_ns=7)),
            pb.TunnelSourceFrame(commit=pb.Commit()),
            pb.TunnelSourceFrame(data=pb.Data(data=b"pages")),
            pb.TunnelSourceFrame(postcopy_end=pb.PostCopyEnd()),
        )
        control = [r for r in replies if r.WhichOneof("frame") != "data_end"]
        kinds = [r.WhichOneof("frame") for r in control]
        assert kinds == ["opened", "verified", "resumed", "postcopy_done"]
        assert control[1].verified.match
        assert commits == done == [tunnel.inc]
        assert tunnel.inc.state is TargetState.POSTCOPY_DONE
        assert bytes(tunnel.writer.data) == b"pages"  # after the Commit: not refused
        assert tunnel.handle.source_last_console_ns == 7
        assert MIG not in tunnel.service.states

    asyncio.run(scenario())


def test_a_break_in_post_copy_keeps_the_state_and_open_resume_recovers(tmp_path: Path) -> None:
    async def scenario() -> None:
        tunnel = Tunnel(tmp_path)
        qmp = FakeQmp("postcopy-paused")
        tunnel.handle.qmp = qmp  # type: ignore[method-assign]
        in_postcopy(tunnel)
        # The stream ends after the Commit, without PostCopyEnd: the tunnel broke.
        await stream(
            tunnel,
            pb.TunnelSourceFrame(postcopy_start=pb.PostCopyStart()),
            pb.TunnelSourceFrame(commit=pb.Commit()),
        )
        state = tunnel.service.states[MIG]
        assert state.resume_task is not None
        await state.resume_task
        assert tunnel.inc.state is TargetState.POSTCOPY_RUNNING
        assert tunnel.inc.disconnected_since is not None and tunnel.writer.closed

        async def resumed() -> list[pb.TunnelTargetFrame]:
            return await stream(tunnel, pb.TunnelSourceFrame(data=pb.Data(data=b"x")), resume=True)

        replies = await asyncio.wait_for(resumed(), 10)
        assert replies[0].WhichOneof("frame") == "opened"
        assert [c[0] for c in qmp.commands] == ["migrate-recover"] * 3  # nothing in-band
        recover = qmp.commands[-1][1]
        assert recover["uri"].startswith("unix:") and recover["uri"].endswith(".in1")
        assert len(qmp.accepted) == 1 and await qmp.accepted[0].read(1) == b"x"
        assert MIG in tunnel.service.states and state.recoveries == 1
        assert qmp.server is not None
        qmp.server.close()

    asyncio.run(scenario())


def test_open_resume_is_refused_unless_the_guest_runs_here_in_post_copy(tmp_path: Path) -> None:
    async def scenario() -> None:
        tunnel = Tunnel(tmp_path)
        with pytest.raises(CallEnded, match="no QEMU migration 'mig-1' is expected") as ended:
            await stream(tunnel, resume=True)
        assert ended.value.code == grpc.StatusCode.NOT_FOUND
        assert tunnel.inc.state is TargetState.AWAITING_HELLO

    asyncio.run(scenario())


def test_post_copy_start_without_post_copy_in_open_is_a_protocol_error(tmp_path: Path) -> None:
    async def scenario() -> None:
        tunnel = Tunnel(tmp_path)
        aborted: list[str] = []

        async def on_abort(inc: IncomingMigration, reason: str) -> None:
            aborted.append(reason)

        tunnel.registry.on_abort = on_abort
        with pytest.raises(CallEnded, match="Open did not enable post-copy") as ended:
            await stream(
                tunnel, pb.TunnelSourceFrame(postcopy_start=pb.PostCopyStart()), postcopy=False
            )
        assert ended.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert aborted and tunnel.inc.state is TargetState.RECEIVING

    asyncio.run(scenario())


def test_open_resume_during_pre_copy_is_a_protocol_error(tmp_path: Path) -> None:
    async def scenario() -> None:
        tunnel = Tunnel(tmp_path)
        tunnel.inc.move(TargetState.RECEIVING, "a first Open")
        with pytest.raises(CallEnded, match=r"Open\.resume in state Receiving") as ended:
            await stream(tunnel, resume=True)
        assert ended.value.code == grpc.StatusCode.INVALID_ARGUMENT

    asyncio.run(scenario())
