"""QemuHandle.wait_migration against a minimal QMP server: the target's digest starts when
QEMU's MIGRATION event says the incoming migration completed, not at the next poll."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest

from handler.drivers import qemu_handle
from handler.drivers.qemu_handle import QemuHandle, QemuSpec

MiB = 1 << 20


class FakeQmpServer:
    """Answers qmp_capabilities and query-migrate (``self.status``); ``complete()``
    sets the status to completed and sends the MIGRATION event."""

    def __init__(self) -> None:
        self.status = "active"
        self.queries = 0
        self.queried = asyncio.Event()
        self.writers: list[asyncio.StreamWriter] = []

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        version = {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}
        greeting = {"QMP": {"version": version, "capabilities": []}}
        writer.write(json.dumps(greeting).encode() + b"\n")
        decoder, buffer = json.JSONDecoder(), ""
        while chunk := await reader.read(4096):  # requests come without a newline
            buffer = (buffer + chunk.decode()).lstrip()
            try:
                request, end = decoder.raw_decode(buffer)
            except ValueError:
                continue
            buffer = buffer[end:]
            reply: dict[str, Any] = {"return": {}}
            if request["execute"] == "query-migrate":
                self.queries += 1
                self.queried.set()
                reply = {"return": {"status": self.status}}
            if "id" in request:
                reply["id"] = request["id"]
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()

    def complete(self) -> None:
        self.status = "completed"
        event = {
            "event": "MIGRATION",
            "data": {"status": "completed"},
            "timestamp": {"seconds": int(time.time()), "microseconds": 0},
        }
        for w in self.writers:
            w.write(json.dumps(event).encode() + b"\n")


def _handle(tmp_path: Path) -> QemuHandle:
    spec = QemuSpec(memory_bytes=16 * MiB, kernel="/nonexistent/vmlinuz")
    return QemuHandle(
        "uid-1.in-mig-1",
        spec,
        1,
        None,
        tmp_path / "vm",
        tmp_path / "vm.ram",
        tmp_path / "qmp.sock",
        incoming=True,
    )


@pytest.mark.timeout(30)
def test_the_migration_event_ends_the_wait_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qemu_handle, "EVENT_POLL_S", 30.0)  # only the event can end it soon

    async def main() -> tuple[dict[str, Any], float, int]:
        fake = FakeQmpServer()
        server = await asyncio.start_unix_server(fake.serve, path=str(tmp_path / "qmp.sock"))
        handle = _handle(tmp_path)
        try:
            waiting = asyncio.create_task(handle.wait_migration(("completed", "failed"), 60))
            await asyncio.wait_for(fake.queried.wait(), 15)
            await asyncio.sleep(0.1)
            t0 = time.monotonic()
            fake.complete()
            info = await asyncio.wait_for(waiting, 5)
            return info, time.monotonic() - t0, fake.queries
        finally:
            await handle._disconnect()
            server.close()

    info, seconds, queries = asyncio.run(main())
    assert info["status"] == "completed"
    assert seconds < 1.0 and queries == 2


@pytest.mark.timeout(30)
def test_without_events_it_polls_and_returns_the_last_answer_at_the_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(qemu_handle, "EVENT_POLL_S", 0.02)

    async def main() -> tuple[dict[str, Any], int]:
        fake = FakeQmpServer()
        server = await asyncio.start_unix_server(fake.serve, path=str(tmp_path / "qmp.sock"))
        handle = _handle(tmp_path)
        try:
            info = await handle.wait_migration(("completed",), 0.3)
            return info, fake.queries
        finally:
            await handle._disconnect()
            server.close()

    info, queries = asyncio.run(main())
    assert info["status"] == "active" and queries >= 5
